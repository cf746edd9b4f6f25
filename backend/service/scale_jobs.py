"""Segment jobs of the HTTP backend on Ray, when the backend's settings name a Ray address.

`FARSLIP_RAY_ADDRESS` (read when a job starts): `ray://HOST:PORT` (or `auto`) runs every segment job
on that cluster; `local` or `local:N` on a Ray the job starts on this machine with N workers
(default: the cores this process may use). The job keeps its progress (chunks done of all) and its
cancel: a cancel stops the dispatch, kills the job's actors (their running chunks with them) and
keeps what was finished in `<out>.partial/`, so the same request resumes.
"""

from __future__ import annotations

import os

from backend.engine.devices import usable_cores
from backend.engine.options import SegmentOptions

RAY_ADDRESS_ENV = "FARSLIP_RAY_ADDRESS"


def ray_address() -> str | None:
    return os.environ.get(RAY_ADDRESS_ENV) or None


def _where(address: str) -> tuple[int | None, str | None]:
    """(local workers, cluster address) of a FARSLIP_RAY_ADDRESS value."""
    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2]
        return (int(count) if count.isdigit() else usable_cores()), None
    return None, address


def run_segment_on_ray(options: SegmentOptions, control, address: str, device: str) -> dict:
    """The worker side of a segment job on Ray: the job's result in `run_segment`'s shape."""
    from backend.scale.run import ScaleRequest, check_scale_options, segment_rasters
    from backend.scale.worker import engine_settings

    check_scale_options(options)
    workers, cluster = _where(address)
    # One raster per job: its class and probability rasters are the GeoTIFFs the request names.
    request = ScaleRequest.from_options(options, workers=workers, cluster=cluster)
    control.message(f"Segmenting on Ray ({cluster or f'{workers} local workers'}).")
    result = segment_rasters([str(options.raster)], engine_settings(options, device), request,
                             progress=lambda done, total, _pixels, _all: control.progress(done, total),
                             should_cancel=control.should_cancel, stage=control.message)
    raster = result.rasters[0]
    return {"outputs": dict(result.outputs), "classes": list(raster["class_stats"]), "run_id": result.run_id,
            "tiles": raster["tiles"], "timings": dict(result.timings), "warnings": list(result.warnings),
            "quality": dict(raster.get("quality") or {}), "features": {},
            "encoder": _ray_encoder(raster, result.chunks)}


def _ray_encoder(raster: dict, chunks) -> str:
    """A job's `encoder` on Ray: the runtimes its chunks ran under (none named when all were kept by an unfinished
    run of an earlier version), and its chunk counts."""
    names = ", ".join(raster.get("encoders") or [])
    return f"ray ({names}): {chunks}" if names else f"ray: {chunks}"
