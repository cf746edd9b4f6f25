"""`farslip segment INPUTS... --workers N | --cluster ray://HOST:PORT`: the Ray path of segment.

The command's options are the single-process ones (backend/service/cli.py hands them all over);
the few that a scaled run does not offer yet are refused with a sentence. Exit codes are those of
`segment`, plus 5: some rasters failed (each named with its reason), the others were written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from backend.engine.errors import FarslipError, InputError
from backend.service.cli_common import check_model_given, fail, interrupted, signals_as_interrupt
from backend.service.cli_options import options_from_cli, own_option

# Checked by the scaled run itself: a .vrt mosaic over one GeoTIFF per raster (or a .tif for one raster).
RASTER_OUTPUTS = ("class_raster", "prob_raster")
SCALE_ONLY = ("workers", "cluster", "out_crs", "restart", "chunk_size")
SCALE_OPTIONS = [
    own_option("workers", Optional[int], None, help="Run on a local Ray with this many worker processes, "
                                                    "resumable (docs/SCALE.md)."),
    own_option("cluster", Optional[str], None, help="Run on a Ray cluster at ray://HOST:PORT (default: $RAY_ADDRESS "
                                                    "when set)."),
    own_option("out_crs", Optional[str], None, help="With --workers/--cluster: CRS of the merged polygons "
                                                    "(default: the first raster's)."),
    own_option("restart", bool, False, help="With --workers/--cluster: start over instead of resuming an "
                                            "unfinished run of the same output."),
]
# Not offered in --help: the side of a work unit (default: the engine's units, the only size whose
# output equals a single-process run's bit for bit); tests use small units to get many chunks.
SCALE_OPTIONS.append(inspect.Parameter("chunk_size", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
                                       default=typer.Option(None, hidden=True)))


def with_many_inputs(command: Callable[..., None]) -> Callable[..., None]:
    """Decorator: the RASTER argument of the generated signature becomes INPUTS... (one or more)."""
    parameters = [inspect.Parameter("raster", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[str],
                                    default=typer.Argument(..., metavar="INPUTS", help=INPUTS_HELP))
                  if p.name == "raster" else p for p in inspect.signature(command).parameters.values()]
    command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    return command


INPUTS_HELP = ("GeoTIFF (or any GDAL raster) to segment; several rasters, VRT mosaics, folders, globs, .txt lists "
               "and STAC item JSON files run on a local Ray (--workers, --cluster).")


def wants_ray(values: dict) -> bool:
    # --workers 0 too: the scaled run refuses it with a sentence (a single run ignored it).
    from backend.scale.inputs import names_many

    # A folder, glob, list or STAC file is several rasters too: it was refused as "a folder, not a file".
    return bool(values.get("workers") is not None or values.get("cluster") or os.environ.get("RAY_ADDRESS")
                or len(values["raster"]) > 1 or names_many(str(values["raster"][0])))


def single_raster(values: dict) -> dict:
    """The values of a single-process run: one raster, no Ray options (--out-crs and --restart, which only a
    run on Ray has, are refused with a sentence: a single run ignored them without a word)."""
    given = [flag for key, flag in (("out_crs", "--out-crs"), ("restart", "--restart")) if values.get(key)]
    if given:
        raise InputError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to runs on Ray, and "
                         "this one runs one raster in this process; add --workers 1 to run it on a local Ray"
                         + (", or reproject the result (ogr2ogr -t_srs)." if values.get("out_crs") else "."))
    values = {k: v for k, v in values.items() if k not in SCALE_ONLY}
    values["raster"] = values["raster"][0]  # as typed: a GDAL name must reach GDAL unchanged
    return values


class ChunkProgress:
    """Plain progress lines: chunks and megapixels done, and the time left."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.started = time.perf_counter()
        self.first: int | None = None
        self.last_line = 0.0

    def __call__(self, done: int, total: int, pixels: int, total_pixels: int) -> None:
        if self.quiet:
            return
        if self.first is None:
            self.first = done  # resumed chunks cost nothing: the ETA counts this run's chunks only
        now = time.perf_counter()
        if done != total and now - self.last_line < 5 and done != self.first:
            return
        self.last_line = now
        ran = done - self.first
        eta = f", ETA {(now - self.started) / ran * (total - done):.0f} s" if ran else ""
        typer.echo(f"segmenting: {done}/{total} chunks, {pixels / 1e6:.1f}/{total_pixels / 1e6:.1f} Mpx{eta}",
                   err=True)


def left_out_line(files: list[str], shown: int = 5) -> str:
    """The line naming the raster files of the folders and patterns given that were left out as outputs of
    earlier farslip runs (the first `shown`, then how many more)."""
    one = len(files) == 1
    names = ", ".join(files[:shown]) + (f" and {len(files) - shown} more" if len(files) > shown else "")
    return (f"Left out {len(files)} raster file{'' if one else 's'} of the folders and patterns given that "
            f"{'an earlier farslip run' if one else 'earlier farslip runs'} wrote "
            f"({'an output' if one else 'outputs'}, not imagery): {names}; name {'it' if one else 'one'} on its "
            "own to segment it.")


def segment_scaled(values: dict) -> None:
    """Run `farslip segment` with these option values on Ray; exits with the run's code."""
    stop_on_signals = signals_as_interrupt()
    stop_on_signals.__enter__()
    out = Path(values["out"])
    try:
        from backend.engine.checks import class_lines_of
        from backend.engine.options import check_values
        from backend.engine.presets import check_class_lines
        from backend.scale.inputs import expand_inputs

        options = options_from_cli({k: v for k, v in values.items()
                                    if k not in (*SCALE_ONLY, "device", "quiet")}
                                   | {"raster": values["raster"][0]})
        out = Path(options.out)  # with the extension of --format (or .gpkg) when it was given without one
        check_values(options)
        lines = class_lines_of(options)
        check_class_lines(lines)
        left_out: list[str] = []
        # The inputs and class list first: Ray's and the engine's imports take seconds.
        paths = expand_inputs(values["raster"], left_out)
        check_model_given(options.model, options.weights)
        from backend.scale.run import ScaleRequest, check_scale_options, check_workers, segment_rasters
        from backend.scale.worker import engine_settings

        check_scale_options(options)
        check_workers(values.get("workers"), values.get("cluster") or os.environ.get("RAY_ADDRESS"))
        rasters = {role: Path(values[role]) if values.get(role) else None for role in RASTER_OUTPUTS}
        chunk = values.get("chunk_size")
        if chunk is not None and chunk < 256:
            raise InputError(f"--chunk-size must be at least 256 pixels; got {chunk}.")
        engine = engine_settings(options, values.get("device", "auto"), chunk)
        request = ScaleRequest.from_options(options, out=out, class_raster=rasters["class_raster"],
                                            prob_raster=rasters["prob_raster"], out_crs=values.get("out_crs"),
                                            restart=bool(values.get("restart")), workers=values.get("workers"),
                                            cluster=values.get("cluster") or os.environ.get("RAY_ADDRESS"))
        quiet = bool(values.get("quiet"))
        if left_out:  # said even with --quiet: a file of the folder the user gave is not segmented
            typer.echo(left_out_line(left_out), err=True)
        if not quiet:
            where = request.cluster or f"a local Ray with {request.workers or 1} worker(s)"
            typer.echo(f"segmenting {len(paths)} raster(s) on {where}", err=True)
        result = segment_rasters(paths, engine, request, progress=ChunkProgress(quiet))
    except FarslipError as error:
        fail(error)
    except KeyboardInterrupt as error:
        with contextlib.suppress(ValueError):  # leaving: a second Ctrl+C must not cut Ray's exit short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        from backend.scale.manifest import partial_folder

        kept = partial_folder(out)
        interrupted(error, f"Interrupted; finished chunks are kept in {kept.name}: run the same command again to "
                           "resume." if kept.is_dir() else "Interrupted; nothing was finished, so nothing was kept.")
    finally:
        stop_on_signals.__exit__(None, None, None)
    for warning in result.warnings:
        typer.echo(f"Warning: {warning}", err=True)
    for failure in result.failed:
        typer.echo(f"Failed: {failure['raster']}: {failure['error']}", err=True)
    if result.outside:
        typer.echo(f"Skipped {len(result.outside)} raster(s) the --bbox does not reach (listed in the report's "
                   "outside_bbox).", err=True)
    if not quiet:
        polygons = sum(sum(c["polygons"] for c in r["class_stats"]) for r in result.rasters)
        chunks = result.chunks
        resumed = f", {chunks['resumed']} resumed" if chunks["resumed"] else ""
        typer.echo(f"Wrote {result.outputs['vector']} ({len(result.rasters)} raster(s), {polygons} polygons, "
                   f"{chunks['total']} chunks{resumed}, {result.timings['total_s']:.1f} s); "
                   f"report: {result.outputs['report']}")
    if result.exit_code:
        raise typer.Exit(result.exit_code)
