"""Is this segment run possible? Every input check, before any work, in one function.

`check_inputs` is what `farslip segment`, POST /v1/segment and `segment_raster` itself call, so a
bad input gets the same sentence (and the same order of checks) wherever it comes from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .atomic import is_shapefile, shapefile_parts
from .export import driver_for, report_path_for
from .files import check_output_files, check_regular_file, input_paths, listed_output, raster_file
from .options import SegmentOptions, check_values
from .presets import check_class_lines, collect_class_lines

if TYPE_CHECKING:
    import torch

# How long a check before a job is queued waits for each HTTP request of a network raster (/vsicurl/,
# /vsis3/ ...), unless the user set GDAL's own timeouts: the check holds one of the server's request threads.
CHECK_HTTP_TIMEOUT_S = 5


@contextlib.contextmanager
def quick_network_reads(seconds: int = CHECK_HTTP_TIMEOUT_S) -> Iterator[None]:
    """Around a check that may open a network raster: GDAL's HTTP requests in this thread end within
    `seconds` (GDAL_HTTP_CONNECTTIMEOUT / GDAL_HTTP_TIMEOUT from the environment win), and a timeout is
    a sentence saying so. Call it in a worker thread: on a process's main thread rasterio sets GDAL's
    options for every thread."""
    import rasterio

    from . import GDAL_HTTP_TIMEOUTS, GDAL_HTTP_TIMEOUTS_OF_USER

    quick = {name: str(seconds) for name in GDAL_HTTP_TIMEOUTS if name not in GDAL_HTTP_TIMEOUTS_OF_USER}
    try:
        with rasterio.Env(**quick):
            yield
    except InputError as error:
        if "timed out" not in str(error).lower():
            raise
        waited = quick.get("GDAL_HTTP_TIMEOUT") or os.environ.get("GDAL_HTTP_TIMEOUT")
        raise InputError(f"{error} Its server did not answer within {waited} s; check the address and that the "
                         "server is up, or set GDAL_HTTP_TIMEOUT (seconds) in the backend's environment to wait "
                         "longer.") from None


def class_lines_of(options: SegmentOptions) -> list[str]:
    """The class lines given one by one, then those of the class file, then the preset's."""
    return collect_class_lines(options.class_lines, options.classes_file, options.preset)


def coarse_vector_path(out: Path) -> Path:
    """Where `--refine` puts the unrefined polygons: beside the refined ones, `_coarse` added to the name."""
    out = Path(out)
    return out.with_name(f"{out.stem}_coarse{out.suffix}")


def earlier_coarse_warning(out: str | Path, refine: str) -> list[str]:
    """A run without --refine that replaces a --refine run's result leaves that run's unrefined polygons
    (`_coarse`) beside the new ones: said in one sentence (the file is the user's to keep or delete), when the
    report being replaced names it as its own."""
    coarse = coarse_vector_path(Path(out))
    if refine != "none" or not coarse.exists():
        return []
    listed = listed_output(report_path_for(out), "coarse_vector")
    if listed is None or os.path.abspath(listed) != os.path.abspath(coarse):
        return []
    return [f"{coarse.name} beside the output holds the unrefined polygons of the earlier --refine run this run "
            "replaces, not of this run: delete it, or run with --refine to replace it too."]


def output_paths(options: SegmentOptions) -> dict[str, Path]:
    """The files a run writes, by role: vector, report, the unrefined polygons of --refine, the rasters."""
    return outputs_by_role(options.out, options.refine, options.class_raster, options.prob_raster)


def outputs_by_role(out: str | Path, refine: str = "none", class_raster: str | Path | None = None,
                    prob_raster: str | Path | None = None) -> dict[str, Path]:
    """output_paths of a run (also a scaled one) writing `out` and these rasters."""
    out = Path(out)
    found = {"vector": out, "report": report_path_for(out)}
    if refine != "none":
        found["coarse_vector"] = coarse_vector_path(out)
    if class_raster:
        found["class_raster"] = Path(class_raster)
    if prob_raster:
        found["prob_raster"] = Path(prob_raster)
    return found


# What each output is called in a sentence.
OUTPUT_NAMES = {"vector": "polygon output", "report": "run report", "coarse_vector": "unrefined polygon output",
                "class_raster": "class raster", "prob_raster": "probability raster"}


def output_files(options: SegmentOptions) -> dict[str, Path]:
    """Every file a run writes, by what it is: the outputs, the report and a shapefile's parts."""
    return named_outputs(output_paths(options))


def named_outputs(paths: dict[str, Path]) -> dict[str, Path]:
    """output_files of a run (also a scaled one) writing `paths` (by role, as output_paths gives them)."""
    named: dict[str, Path] = {}
    for role, path in paths.items():
        named[OUTPUT_NAMES[role]] = path
        if role == "report" and is_shapefile(paths["vector"]):
            named.update({f"shapefile part {part.suffix}": part for part in shapefile_parts(paths["vector"])})
    return named


def input_files(options: SegmentOptions) -> dict[str, Path]:
    """The files a run reads, which no output may replace (a registry model name is not a file)."""
    return input_paths([("input raster", raster_file(options.raster)), ("model", options.model),
                        ("weights", options.weights), ("class list", options.classes_file),
                        ("quality calibration", options.quality_calibration),
                        ("SAM model", options.sam_model if options.refine == "sam" else None)])


def _check_tif(path: Path, what: str) -> None:
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"The {what} {path} must be a GeoTIFF (.tif).")


def check_outputs(options: SegmentOptions) -> None:
    """Refuse outputs that cannot be written, or that would replace an input, before any work is done."""
    driver_for(options.out)
    if options.class_raster:
        _check_tif(Path(options.class_raster), "class raster")
    if options.prob_raster:
        _check_tif(Path(options.prob_raster), "probability raster")
    check_output_files(output_files(options), input_files(options), options.overwrite,
                       replaced=output_paths(options).values())


def check_inputs(options: SegmentOptions, read_raster: bool = True, device: torch.device | None = None) -> None:
    """Class lists, option values, outputs, (unless `read_raster` is False) the raster and bbox, and
    (given the `device` the run will use) whether --half can run there.

    Raises InputError / EmptyResultError with one sentence. An empty class list passes: a fine-tuned
    model brings its own classes (the engine refuses an empty list once the model is known).
    Opening the raster reads only its decimated sample, never the model.
    """
    lines = class_lines_of(options)
    check_values(options)
    check_class_lines(lines)
    if options.quality_calibration is not None:
        if not Path(options.quality_calibration).exists():
            raise InputError(f"The quality calibration file {options.quality_calibration} does not exist.")
        check_regular_file(options.quality_calibration, "quality calibration")  # a FIFO or device: say so
        from .quality import QualityModel

        # Its values and class list now, not after the whole run (the model's weights: once it is loaded).
        QualityModel.load(Path(options.quality_calibration), None, lines or None)
    check_outputs(options)
    if read_raster:
        from .raster import open_source, request_window

        with open_source(options.raster, options.bands, options.scale, options.gsd_m,
                         options.value_range, options.square_gsd) as source:
            request_window(source, options.bbox, options.bbox_crs)
    if device is not None:
        from .models import check_half

        check_half(options.half, device)
