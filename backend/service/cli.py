"""`farslip` command line: segment, models, bench, serve, evaluate, train."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import typer

from backend import __version__
from backend.engine.atomic import write_text_atomically
from backend.engine.errors import FarslipError, InputError, shortened
from backend.engine.files import NAME_MAX_BYTES, PATH_MAX_BYTES
from backend.service.cli_common import (ProgressReporter, check_model_given, fail, interruptible, interrupted,
                                        signals_as_interrupt)
from backend.service.cli_options import options_from_cli, own_option, with_segment_options
from backend.service.scale_cli import SCALE_OPTIONS, segment_scaled, single_raster, wants_ray, with_many_inputs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Open-vocabulary segmentation of GeoTIFFs with FarSLIP (and other CLIP models).")


@app.callback()
def _every_command() -> None:
    # GDAL/PROJ errors reach Python logging through rasterio; without a handler Python prints them
    # ("ERROR 1: PROJ: ...") beside our one-line sentence. The sentence says it all.
    for name in ("rasterio", "pyogrio", "fiona"):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False


@app.command()
@interruptible
@with_many_inputs
@with_segment_options([
    own_option("device", str, "auto", help="auto, cpu, cuda or mps."),
    own_option("quiet", bool, False, "--quiet", "-q", help="No progress output."),
    *SCALE_OPTIONS,
])
def segment(**values: Any) -> None:
    """Segment INPUTS into the given classes and write georeferenced polygons."""
    # The options are SegmentOptions' fields (backend/engine/options.py), plus --device and --quiet,
    # and those of a run on Ray (backend/service/scale_cli.py), which takes several inputs.
    if wants_ray(values):
        return segment_scaled(values)
    try:
        values = single_raster(values)
    except FarslipError as error:
        fail(error)
    device, quiet = values.pop("device"), values.pop("quiet")
    # SIGTERM/SIGHUP interrupt as Ctrl+C does, until the outputs are in place.
    stop_on_signals = signals_as_interrupt()
    stop_on_signals.__enter__()
    try:
        from dataclasses import replace

        from backend.engine.checks import check_inputs, class_lines_of
        from backend.engine.presets import parse_class_lines

        options = options_from_cli(values)
        # The inputs first: checking them needs no torch or open_clip, whose imports take seconds, so a wrong
        # file name or class list is said at once; the device is checked once torch is there.
        check_inputs(options)
        check_model_given(options.model, options.weights)
        from backend.engine.devices import resolve_device, retry_smaller_batches
        from backend.engine.feature_cache import feature_cache_for
        from backend.engine.files import raster_label
        from backend.engine.finetuned import trained_resolution_said
        from backend.engine.models import check_half, load_model
        from backend.engine.segment import segment_raster, segment_warnings, with_model_defaults

        dev = resolve_device(device)
        check_half(options.half, dev)
        loading = time.perf_counter()
        loaded = load_model(options.model, str(options.weights) if options.weights else None, dev,
                            half=options.half)
        load_s = time.perf_counter() - loading
        given, options = options, with_model_defaults(options, loaded)  # segment_raster applies them again
        warned = segment_warnings(loaded, parse_class_lines(class_lines_of(options)))
        for warning in warned:
            typer.echo(f"Warning: {warning}", err=True)
        if options.refine == "sam":
            from backend.engine.sam_models import ensure_sam_weights

            ensure_sam_weights(options.sam_model)
        cache = feature_cache_for(options.cache_features, options.cache_mb)
        noted: list[str] = []  # printed as they happen; the report's warnings repeat them

        def note(sentence: str) -> None:
            noted.append(sentence)
            typer.echo(f"Note: {sentence}", err=True)

        def attempt(batch_size: int):
            with ProgressReporter(quiet, f"segmenting {raster_label(options.raster)}") as reporter, \
                    trained_resolution_said(options.model or loaded.name, given, options):
                return segment_raster(replace(options, batch_size=batch_size), loaded, progress=reporter,
                                      feature_cache=cache, notice=note, inform=None if quiet else
                                      lambda sentence: typer.echo(f"Note: {sentence}", err=True))

        assert options.batch_size is not None, "with_model_defaults chose the batch size"
        # On a GPU that runs out of memory in the dense pass: again with half the batch (backend.engine.devices).
        result = retry_smaller_batches(attempt, options.batch_size, note)
    except FarslipError as error:
        fail(error)
    except KeyboardInterrupt as error:
        interrupted(error)
    finally:
        stop_on_signals.__exit__(None, None, None)
    for warning in result.report.get("warnings", []):
        if warning not in warned and warning not in noted:
            typer.echo(f"Warning: {warning}", err=True)
    if not quiet:
        for entry in result.classes:
            typer.echo(f"  {entry['class']:<24} {entry['polygons']:>6} polygons {entry['area_m2']:>14.1f} m²")
        cached = f", features of {result.features['cached']} cached" if result.features.get("cached") else ""
        # The run's own time, and the model's loading before it (the report's timings are the run's).
        typer.echo(f"Wrote {result.outputs['vector']} ({result.tiles} tiles{cached}, "
                   f"{result.timings['total_s']:.1f} s after {load_s:.1f} s of loading the model); report: "
                   f"{result.outputs['report']}")


@app.command()
@interruptible
def models(
    inspect: Optional[str] = typer.Option(None, "--inspect", metavar="NAME",
                                          help="Print the tensor shapes that decide a model's text context "
                                               "(77 or 248 tokens) and patch grid, checked against the "
                                               "registry (a registry name, checkpoint file or model folder)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With --inspect and a registry name: the "
                                                                   "weights file to inspect under that name."),
) -> None:
    """List known models, which are on disk, and where to put missing weights."""
    if weights is not None and inspect is None:
        fail(InputError("--weights names the file --inspect reads under a registry name; add --inspect NAME."))
    if inspect is not None and not inspect.strip():  # "" listed every model, as if --inspect were not given
        fail(InputError("--inspect needs a model: a registry name (see `farslip models`), a checkpoint file or a "
                        "model folder."))
    if inspect is not None:
        from backend.engine.inspect_weights import format_inspection, inspect_model

        try:
            info = inspect_model(inspect, str(weights) if weights else None)
        except FarslipError as error:
            fail(error)
        typer.echo(format_inspection(info))
        if info["agrees"] is False:  # the file is refused under this name (segment exits 3): so does this
            raise typer.Exit(3)
        return
    from backend.engine.models import list_models
    from backend.service.models_table import format_models_table
    from backend.engine.sam_models import list_sam_models

    typer.echo(format_models_table(list_models() + list_sam_models()))


@app.command()
def presets() -> None:
    """List the class presets."""
    from backend.engine.presets import list_presets

    for name, lines in list_presets().items():
        typer.echo(f"{name}: {' | '.join(lines)}")


# Bounds of the benchmark's sizes: a raster side of 32768 is a 1 Gpx raster (3 GB before compression) to generate.
BENCH_MAX_SIDE = 32768
BENCH_MAX_BATCH = 4096
TRAIN_BENCH_BATCH = 4  # crops per step of `bench --train` unless --batch-size says otherwise


@app.command()
@interruptible
def bench(
    ctx: typer.Context,
    arch: str = typer.Option("ViT-B-16", help="open_clip architecture (random weights: speed only)."),
    batch_size: Optional[int] = typer.Option(None, min=1, max=BENCH_MAX_BATCH,
                                             help="Crops per batch (default: as segment picks it, 8 on a CPU, from "
                                                  "the free memory on a GPU; 4 with --train)."),
    size: Optional[int] = typer.Option(None, min=224, max=BENCH_MAX_SIDE,
                                       help="Side of the generated raster for the pipeline run (default 1024; 4096 "
                                            "with --null-encoder)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    rss_sizes: Optional[str] = typer.Option(None, help="Raster sides for the peak-memory runs ('' = skip; "
                                                       "default 2000,10000; 2048,8192 with --null-encoder)."),
    json_out_given: Optional[str] = typer.Option(None, "--json", help="Also write the figures as JSON."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    server: bool = typer.Option(False, "--server", help="Instead: HTTP latencies and server vs CLI overhead."),
    train: bool = typer.Option(False, "--train", help="Instead: training step time vs its bare passes."),
    null_encoder: bool = typer.Option(False, "--null-encoder",
                                      help="Instead: the host side alone (encoder replaced by a zero-cost "
                                           "stand-in); Mpx/s and each stage's share of the time."),
    runs: Optional[int] = typer.Option(None, "--runs", min=1, help="With --null-encoder: host-side runs (default 3), "
                                                                    "each in a fresh process; the median run's "
                                                                    "figures are reported."),
    search: bool = typer.Option(False, "--search", help="Instead: search index build, size, memory and "
                                                        "query latency."),
    search_sides: Optional[str] = typer.Option(None, help="Raster sides for the --search index runs (default "
                                                          "3000,10000)."),
    refine: bool = typer.Option(False, "--refine", help="Instead: outline refinement quality (no weights) and cost "
                                                        "as a share of the segment run."),
    sam_model: Optional[str] = typer.Option(None, help="With --refine: SAM model to time (default: a random "
                                                       "SAM ViT-B, speed only)."),
    data_dir: Optional[Path] = typer.Option(None, help="With --refine: folder with the solaris raster and labels "
                                                       "(default: ../shared/data beside the checkout)."),
    ray: bool = typer.Option(False, "--ray", help="Instead: chunks/s of segment --workers with 1 and 2 workers "
                                                  "against one process, and the driver's share as chunks shrink."),
) -> None:
    """Measure encoder, pipeline, reference loop, text encoding and peak memory; print a table."""
    import json

    from backend.engine.devices import resolve_device

    from backend.engine.files import check_output_file, output_file_option

    try:  # everything checked before minutes of measuring, not after
        dev = resolve_device(device)
        if json_out_given is not None and not json_out_given.strip():
            raise InputError("--json takes the name of the file to write the figures to; give one, or leave "
                             "--json out.")
        if overwrite and json_out_given is None:
            raise InputError("--overwrite applies only with --json (it lets the figures replace that file); add "
                             "--json FILE, or leave --overwrite out.")
        json_out = output_file_option(json_out_given, "figures file (--json)")
        if json_out:
            check_output_file(json_out, "figures file (--json)", overwrite=overwrite, gdal=False)
        from .bench import arch_config

        arch_config(arch)
        modes = {"--server": server, "--train": train, "--null-encoder": null_encoder, "--search": search,
                 "--refine": refine, "--ray": ray}
        arch_given = arch if getattr(ctx.get_parameter_source("arch"), "name", "DEFAULT") not in (
            "DEFAULT", "DEFAULT_MAP") else None  # by the source's name: typer brings its own copy of click
        _check_bench_options(modes, {"--runs": (runs, ("--null-encoder",)),
                                     "--search-sides": (search_sides, ("--search",)),
                                     "--sam-model": (sam_model, ("--refine",)),
                                     "--data-dir": (data_dir, ("--refine",)),
                                     "--rss-sizes": (rss_sizes, ("", "--null-encoder")),
                                     "--size": (size, ("", "--null-encoder", "--refine", "--ray")),
                                     "--batch-size": (batch_size, ("", "--null-encoder", "--refine", "--train")),
                                     "--arch": (arch_given, ("", "--null-encoder", "--refine", "--ray", "--search",
                                                             "--train"))})
        if data_dir is not None:
            _check_refine_data_dir(data_dir)
        sides = {"--rss-sizes": _sides(rss_sizes, "2048,8192" if null_encoder else "2000,10000", "--rss-sizes"),
                 "--search-sides": _sides(search_sides, "3000,10000", "--search-sides", none_allowed=False)}
    except FarslipError as error:
        fail(error)
    train_batch = batch_size or TRAIN_BENCH_BATCH
    if batch_size is None:
        from backend.engine.segment import default_batch_size

        batch_size = default_batch_size(dev)
    if ray:
        from .ray_bench import run_ray_bench

        results = run_ray_bench(arch, size or 1024, str(dev), echo=typer.echo)
    elif refine:
        from backend.engine.paths import resources_dir

        from .refine_bench import run_refine_bench

        folder = data_dir or resources_dir().parent.parent / "shared" / "data"  # the default: where it is
        results = run_refine_bench(arch, batch_size, size or 1024, str(dev), folder if folder.is_dir() else None,
                                   sam_model, echo=typer.echo)
    elif server:
        results = _bench_server(str(dev))
    elif search:
        from .search_bench import run_search_bench

        results = run_search_bench(arch, sides["--search-sides"], str(dev), echo=typer.echo)
    elif null_encoder:
        from .host_bench import run_host_bench

        results = run_host_bench(arch, batch_size, size or 4096, str(dev), sides["--rss-sizes"],
                                 echo=typer.echo, repeat=runs or 3)
    elif train:
        from backend.service.training_bench import format_training, measure_training

        from .bench import random_model

        results = {"arch": arch, **measure_training(random_model(arch, dev), batch_size=train_batch, steps=3)}
        typer.echo(f"# farslip bench --train: {arch} (random weights; speed only), {dev}")
        typer.echo(format_training(results))
    else:
        from .bench import run_bench

        results = run_bench(arch, batch_size, size or 1024, str(dev), sides["--rss-sizes"], echo=typer.echo)
    if json_out:
        _write_figures(json_out, json.dumps(results, indent=2), overwrite)


def _write_figures(path: Path, text: str, overwrite: bool) -> None:
    """The --json figures at the end of a benchmark: never over a file that appeared meanwhile (unless --overwrite),
    and a file that cannot be written is a sentence (the figures are printed above), not a traceback."""
    from backend.engine.files import check_output_file

    try:
        check_output_file(path, "figures file (--json)", overwrite=overwrite, gdal=False)
        write_text_atomically(path, text)
    except FarslipError as error:
        fail(InputError(f"{error} The figures were not written; they are printed above."))
    except OSError as error:
        reason = error.strerror or str(error)
        fail(InputError(f"The figures file (--json) {path} could not be written ({reason}); the figures are printed "
                        "above."))


def _check_bench_options(modes: dict[str, bool], options: dict[str, tuple[object, tuple[str, ...]]]) -> None:
    """One benchmark per run, and no option its benchmark ignores (each option: its value, None when not given,
    and the modes that read it, "" for the default benchmark): said, as segment says such options, not ignored."""
    chosen = [flag for flag, on in modes.items() if on]
    if len(chosen) > 1:
        raise InputError(f"{' and '.join(chosen)} are different benchmarks; run them one at a time.")
    mode = chosen[0] if chosen else ""
    for flag, (value, readers) in options.items():
        if value is not None and mode not in readers:
            named = " or ".join(r for r in readers if r) + (" or without a benchmark flag" if "" in readers else "")
            if mode:
                raise InputError(f"{flag} applies only with {named}, not with {mode}; leave {flag} out.")
            raise InputError(f"{flag} applies only with {named}; add {named}, or leave {flag} out.")


REFINE_DATA_FILES = ("solaris_sample_geotiff.tif", "solaris_geotiff_labels.geojson")


def _check_refine_data_dir(folder: Path) -> None:
    """A --data-dir given is a folder holding the solaris raster and labels (one that is not was ignored: the
    quality table lacked the solaris row without a word)."""
    advice = f"give the folder holding {' and '.join(REFINE_DATA_FILES)}, or leave --data-dir out."
    if not folder.exists():
        raise InputError(f"--data-dir {folder} does not exist; {advice}")
    if not folder.is_dir():
        raise InputError(f"--data-dir {folder} is a file, not a folder; {advice}")
    absent = [name for name in REFINE_DATA_FILES if not (folder / name).is_file()]
    if absent:
        raise InputError(f"--data-dir {folder} holds no {' and no '.join(absent)}; {advice}")


def _sides(text: str | None, default: str, option: str, none_allowed: bool = True) -> tuple[int, ...]:
    """Raster sides typed as 2000,10000 ('' for none where `none_allowed`; None: `default`), each at least one
    224 px crop and at most BENCH_MAX_SIDE, each once."""
    typed = default if text is None else text
    try:
        sides = tuple(int(side) for side in typed.split(",") if side.strip())
    except ValueError:
        sides = ()
    empty = not sides and (bool(typed.strip()) or not none_allowed)
    if empty or any(not 224 <= side <= BENCH_MAX_SIDE for side in sides):
        none = ", or '' for none" if none_allowed else ""
        raise InputError(f"{option} takes raster sides in pixels, each from 224 to {BENCH_MAX_SIDE}, separated by "
                         f"commas (e.g. 2000,10000){none}; got {typed!r}.")
    twice = next((side for side in sides if sides.count(side) > 1), None)
    if twice is not None:
        raise InputError(f"{option} names the side {twice} twice; give each side once.")
    return sides


def _bench_server(device: str) -> dict:
    """The server benchmark on the bundled sample raster with a tiny random checkpoint."""
    import tempfile

    from .bench import tiny_checkpoint
    from backend.engine.paths import resources_dir
    from .server_bench import bench_server, format_results

    with tempfile.TemporaryDirectory(prefix="farslip-bench-") as folder:
        model = tiny_checkpoint(Path(folder) / "tiny.pt")
        results = bench_server(resources_dir() / "sample" / "naip_2020_5m_crop.tif", str(model), device=device)
    typer.echo(format_results(results))
    return results


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# serve: the implementation lives in backend/service/server/


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; one other machines can reach warns."),
    port: int = typer.Option(0, help="TCP port; 0 picks a free one."),
    token: Optional[str] = typer.Option(None, help="Access token (default: $FARSLIP_TOKEN, else a new random "
                                                   "one per start): at least 16 visible ASCII characters "
                                                   "(letters, digits, punctuation; no spaces)."),
    connection_file: Optional[str] = typer.Option(None, help="Where to write {url, port, token, pid, "
                                                              "version} (default: STATE_DIR/backend.json)."),
    state_dir: Optional[Path] = typer.Option(None, help="Job history and logs (default: $FARSLIP_HOME)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    feature_cache_mb: int = typer.Option(1024, help="Memory for image features kept between jobs, so that new "
                                                    "classes on a seen extent skip the encoder (0 = off)."),
    feature_cache_disk_mb: int = typer.Option(0, help="Also keep up to this many MiB of features on disk in "
                                                      "STATE_DIR/features, across restarts (0 = off)."),
    parent_pid: Optional[int] = typer.Option(None, help="Stop when the process of this id ends (the QGIS plugin "
                                                        "passes its own, so a QGIS that crashed leaves no backend)."),
) -> None:
    """Run the local HTTP backend the QGIS plugin talks to (until Ctrl+C or SIGTERM)."""
    from .server import serve_command
    from .server.lifecycle import exit_now

    code = serve_command(host, port, token, connection_file or None,
                         str(state_dir) if state_dir else None, device, feature_cache_mb, feature_cache_disk_mb,
                         parent_pid)
    if code:
        raise typer.Exit(code)
    exit_now(0)  # the server ran and stopped


# evaluate, train: the implementations live in training/

from backend.service.training_cli import evaluate_command, train_command  # noqa: E402 - typer-only module, heavy imports are lazy

app.command("evaluate")(interruptible(evaluate_command))
app.command("train")(interruptible(train_command))

# index, search, classify, evaluate-retrieval: find places by sentence (backend/service/search_cli.py)

from backend.service.search_cli import (  # noqa: E402 - typer-only module, heavy imports are lazy
    classify_command,
    evaluate_retrieval_command,
    index_command,
    search_command,
)

app.command("index")(interruptible(index_command))
app.command("search")(interruptible(search_command))
app.command("classify")(interruptible(classify_command))
app.command("evaluate-retrieval")(interruptible(evaluate_retrieval_command))


def main() -> None:
    try:
        app()
    except FarslipError as error:  # one a command's own handling does not meet (a folder variable naming a file)
        typer.echo(f"Error: {error}", err=True)
        raise SystemExit(error.exit_code) from None
    except OSError as error:
        # A path longer than the file system takes, met wherever a command first asks about it (an input
        # raster, a model, a folder): one sentence, as for every other unusable input.
        if error.errno != errno.ENAMETOOLONG:
            raise
        named = f" {os.fsdecode(error.filename)}" if error.filename else ""
        typer.echo(shortened(f"Error: The path{named} is too long for the file system (a folder or file name "
                             f"of more than {NAME_MAX_BYTES} bytes, or more than {PATH_MAX_BYTES} in all); choose "
                             "a shorter one."), err=True)
        raise SystemExit(InputError.exit_code) from None


if __name__ == "__main__":
    main()
