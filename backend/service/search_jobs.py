"""Index and search jobs of the HTTP backend: request checks before queueing, and the worker's runners."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("farslip.jobs")


def _search_options(request: dict):
    from backend.engine.search_queries import DEFAULT_MAX_OVERLAP, DEFAULT_TOP, SearchOptions

    return SearchOptions(
        sentences=list(request.get("sentences") or []), keywords=request.get("keywords") or None,
        use_keywords=bool(request.get("use_keywords", True)), top=int(request.get("top") or DEFAULT_TOP),
        bbox=tuple(request["bbox"]) if request.get("bbox") else None, bbox_crs=request.get("bbox_crs"),
        like=tuple(request["like"]) if request.get("like") else None, like_crs=request.get("like_crs"),
        max_overlap=float(request.get("max_overlap") or DEFAULT_MAX_OVERLAP))


def _raster(request: dict) -> str:
    """The request's raster as GDAL must get it: a GDAL name as typed (NETCDF:"/d/a.nc":var, /vsizip//d/a.zip/x.tif:
    a pathlib.Path folds its '//'), a path with ~ expanded."""
    from backend.engine.files import raster_name

    return raster_name(request["raster"])


def _check_raster(request: dict) -> None:
    """Open the raster as the engine will (cheap: header and a decimated sample), check bbox and point."""
    from backend.engine.files import raster_label
    from backend.engine.raster import open_source
    from backend.engine.search_index import INDEX_TASK, check_bbox_on

    raster = _raster(request)
    with open_source(raster, request.get("bands"), task=INDEX_TASK) as source:
        # As the search checks it: on a rotated grid, against the raster's footprint (not its envelope).
        check_bbox_on(source, raster_label(raster), tuple(request["bbox"]) if request.get("bbox") else None,
                      request.get("bbox_crs"))
        if request.get("like") is not None:
            _check_like_point(source, request["like"], request.get("like_crs"), raster_label(raster))


def _check_like_point(source, like: list[float], like_crs: str | None, raster_name: str) -> None:
    """The `like` point is in a CRS we know and lies on the raster (the search checks it again on its grid)."""
    from backend.engine.raster import pixel_envelope
    from backend.engine.search import point_in_raster_crs
    from backend.engine.search_index import outside_raster

    x, y = point_in_raster_crs(like, like_crs, source.crs, pixel_envelope(source.transform, 0, 0, source.width,
                                                                          source.height))
    col, row = ~source.transform @ (x, y)
    if not (0 <= col < source.width and 0 <= row < source.height):
        raise outside_raster(x, y, raster_name, source.transform, source.width, source.height, source.crs)


def check_index_request(request: dict) -> list[str]:
    from backend.engine.models import check_model

    _check_raster(request)
    check_model(request.get("model"), request.get("weights"))
    return []


def check_search_request(request: dict) -> list[str]:
    """The checks of `farslip search`, same sentences; returns the files the job will write."""
    from backend.engine.export import report_path_for
    from backend.engine.files import input_paths, raster_file
    from backend.engine.models import check_model
    from backend.engine.search import check_hits_output
    from backend.engine.search_queries import validate_search_options

    validate_search_options(_search_options(request))
    out_text = os.path.expanduser(request["out"])  # as typed: a Path would drop a trailing separator
    check_hits_output(out_text, bool(request.get("overwrite")),
                      input_paths([("raster", raster_file(_raster(request)))]), option='"overwrite": true',
                      what='"out" file')
    out = Path(out_text)
    _check_raster(request)
    check_model(request.get("model"), request.get("weights"))
    return [str(out), str(report_path_for(out))]


def _loading(request: dict) -> str:
    """The job's message while its model loads, naming the model it loads as a segment job's does: the
    weights' file when the request gives one (the model the request names, if any, first)."""
    return f"Loading the model {request.get('model') or request.get('weights') or 'default'}."


def _batch_size(request: dict) -> int | None:
    """The request's batch size; none given: as segment picks it (8 on the CPU, from the free memory on a GPU)."""
    return int(request["batch_size"]) if request.get("batch_size") else None


def _retry_notice(control):
    """A batch that ran out of GPU memory, retried at half the size: in the log and the job's message as it
    happens (the index keeps the sentence, which the job's notices repeat)."""
    def notice(sentence: str) -> None:
        log.warning("%s", sentence)
        control.message(sentence)

    return notice


# The request fields the sentence when not even one window fits may name (as http_words writes the flags).
JOB_FLAGS = ("--batch-size",)


def run_index(request: dict, control, models) -> dict:
    from backend.engine.search_index import describe, open_index

    control.message(_loading(request))
    loaded = models.get(request.get("model"), request.get("weights"))
    bbox = tuple(request["bbox"]) if request.get("bbox") else None
    with open_index(_raster(request), loaded, request.get("bands"), batch_size=_batch_size(request),
                    notice=_retry_notice(control), flags=JOB_FLAGS) as index:
        control.message("Indexing.")
        stats = index.ensure(bbox, request.get("bbox_crs"), control.progress, control.should_cancel)
        info = describe(index, stats)  # its batch_size: the one that ran, after any retry
    notices = ([info["rebuilt"]] if info["rebuilt"] else []) + list(index.notices)
    return {"outputs": {}, "index": info, "notices": notices}  # as a search job returns its retries


def run_search(request: dict, control, models) -> dict:
    from backend.engine.search import search_raster
    from backend.engine.search_index import open_index

    control.message(_loading(request))
    loaded = models.get(request.get("model"), request.get("weights"))
    options = _search_options(request)
    out = Path(request["out"]).expanduser()
    with open_index(_raster(request), loaded, request.get("bands"), batch_size=_batch_size(request),
                    notice=_retry_notice(control), flags=JOB_FLAGS) as index:
        control.message("Indexing the windows not in the index yet, then ranking.")
        result = search_raster(index, options, out, bool(request.get("overwrite")), control.progress,
                               control.should_cancel)
    return {"outputs": dict(result.outputs), "run_id": result.run_id, "hits": result.hits.records(),
            "notices": list(result.notices), "index": result.report["index"],
            "timings": result.report["timings"]}
