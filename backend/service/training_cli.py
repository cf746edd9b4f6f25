"""`farslip evaluate` and `farslip train`: typer commands, wired into backend/service/cli.py's app.

    from backend.service.training_cli import evaluate_command, train_command
    app.command("evaluate")(evaluate_command)
    app.command("train")(train_command)
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import typer

from backend.engine.errors import FarslipError, InputError
from backend.engine.files import check_output_file, is_inside, output_file_option, raster_file, raster_label
from backend.engine.options import WEIGHTS_HELP, check_batch_size
from backend.service.cli_common import fail as _fail
from backend.service.cli_common import check_model_given, check_raster_opens, interrupted, signals_as_interrupt
from backend.service.cli_common import parse_bands as _bands

AOI_HELP = ("Area-of-interest polygon layer: only the labels inside it count; with --background, its unlabelled "
            "pixels are that class.")


class _Lines:
    """Occasional progress lines on stderr (every epoch, at most every few seconds otherwise)."""

    def __init__(self, quiet: bool, every_s: float = 10.0):
        self.quiet, self.every_s, self.last = quiet, every_s, 0.0

    def __call__(self, step: int, total: int, info: dict) -> None:
        phase = info.get("phase")
        if phase == "warning":  # printed even with --quiet, as segment's warnings are
            typer.echo(f"Warning: {info['message']}", err=True)
            return
        if self.quiet:
            return
        now = time.perf_counter()
        if phase == "validate" and info.get("epoch"):
            best = info.get("best_miou")
            miou = info.get("val_miou")
            typer.echo(f"epoch {info['epoch']}/{info['epochs']}: loss {info['loss']:.4f}, validation mIoU "
                       f"{100 * (miou or 0):.2f} % (best {100 * (best or 0):.2f} % at epoch "
                       f"{info.get('best_epoch')})", err=True)
        elif phase == "validate":
            typer.echo("validating the base model on the held-out strip ...", err=True)
        elif phase is None and "image" in info:  # evaluate --benchmark, image by image; the last one always
            if now - self.last > self.every_s or step == total:
                self.last = now
                typer.echo(f"image {step}/{total} ({info['image']})", err=True)
        elif now - self.last > self.every_s:
            self.last = now
            extra = f", loss {info['loss']:.4f}" if "loss" in info else ""
            typer.echo(f"{phase}: {step}/{total}{extra}", err=True)


def evaluate_command(
    ctx: typer.Context,
    raster: Optional[str] = typer.Argument(None, help="GeoTIFF (or any GDAL raster) the labels lie on."),
    labels: Optional[Path] = typer.Argument(None, help="Polygon layer (GeoPackage, Shapefile, GeoJSON)."),
    class_field: Optional[str] = typer.Option(None, help="Field of LABELS holding each polygon's class."),
    model: Optional[str] = typer.Option(None, help="Registry name, checkpoint file or fine-tuned model folder."),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    background: Optional[str] = typer.Option(None, help="Unlabelled pixels inside the labels' extent (or "
                                                        "--aoi) become this class."),
    aoi: Optional[Path] = typer.Option(None, help=AOI_HELP),
    class_name: Optional[list[str]] = typer.Option(None, help="VALUE=NAME: rename a label value, e.g. "
                                                              "yes=building (repeatable)."),
    split: str = typer.Option("auto", help="auto, all or validation (the held-out strip of a model "
                                           "fine-tuned on these files)."),
    bands: Optional[str] = typer.Option(None, help="Band numbers for red,green,blue, e.g. 3,2,1."),
    scale: Optional[float] = typer.Option(None, help="Resample by this factor."),
    gsd: Optional[float] = typer.Option(None, help="Resample to this ground sample distance in metres."),
    attention: str = typer.Option("segearth", help="Last-block attention variant."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per batch (default: 8 on the CPU; on a GPU, from its "
                                                        "free memory, as segment picks it)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    json_out_given: Optional[str] = typer.Option(None, "--json", metavar="PATH", help="Write the metrics as JSON."),
    png_given: Optional[str] = typer.Option(None, "--png", metavar="PATH",
                                            help="Write the confusion matrix as a PNG."),
    benchmark: Optional[Path] = typer.Option(None, help="A benchmark dataset folder (a preset's layout, e.g. "
                                                        "UDD5's val/src + val/gt; else img_dir/ann_dir or "
                                                        "images/labels) instead of RASTER and LABELS."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help="Benchmark classes, in label "
                                                                              "value order."),
    preset: Optional[str] = typer.Option(None, help="Benchmark classes, folder layout and label coding from a "
                                                    "preset (e.g. potsdam)."),
    protocol: str = typer.Option("farslip", help="Benchmark protocol: farslip (threshold 0, background 0: the "
                                                 "paper's FarSLIP rows) or segearth (per-dataset thresholds)."),
    benchmark_split: Optional[str] = typer.Option(None, help="Benchmark split (default: the preset's, e.g. "
                                                             "val; UAVid and VDD: test)."),
    long_side: int = typer.Option(448, help="Benchmark images are resized to this long side (0: native)."),
    reduce_zero_label: Optional[bool] = typer.Option(None, help="Benchmark labels: 0 is ignored, v means class "
                                                                "v-1 (default: the preset's coding)."),
    prob_threshold: Optional[float] = typer.Option(None, help="Benchmark: pixels less sure than this get the "
                                                              "background class (default: the protocol's)."),
    background_index: Optional[int] = typer.Option(None, help="Benchmark: class index for unsure pixels "
                                                              "(default: the protocol's)."),
    half: bool = typer.Option(False, "--half", help="fp16 weights and inputs on a CUDA GPU, as the RS-OVSS "
                                                    "evaluation runs (parity runs); refused without one."),
    ignore_index: int = typer.Option(255, help="Benchmark label value to ignore (with --reduce-zero-label, a "
                                     "value after the reduction, as mmsegmentation applies it: raw 0 becomes 255)."),
    limit: Optional[int] = typer.Option(None, help="Benchmark: only the first N images."),
    calibrate_quality: bool = typer.Option(False, "--calibrate-quality", help="Also fit the label-free quality "
                                           "estimate on labelled tiles and store it (with a fine-tuned model, "
                                           "or in --quality-out); reports SROCC/PLCC with the true tile IoU."),
    quality_out_given: Optional[str] = typer.Option(None, "--quality-out", metavar="PATH",
                                                    help="Calibration file to write (default: inside the "
                                                         "fine-tuned model folder)."),
    quality_tile: int = typer.Option(64, help="Tile side in pixels for --calibrate-quality."),
    force_calibration: bool = typer.Option(False, "--force-calibration", help="Write the new calibration even "
                                           "when it ranks the tiles worse than the built-in estimate or the "
                                           "calibration it replaces (the better one is kept otherwise)."),
    overwrite: bool = typer.Option(False, help="Replace existing --json, --png and --quality-out files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Report per-class IoU, mIoU, accuracy and the confusion matrix of a model against labelled polygons."""
    loaded = None
    try:  # a signal or Ctrl+C: "Interrupted." from cli_common.interruptible, which wraps every command
        # Without torch: every check below is said in about a second, before the model's imports.
        from training.labels import label_layer
        from training.run_checks import (check_attention, check_evaluation, check_quality_tile, check_report_outputs,
                                         class_names_from_pairs, evaluation_inputs)

        # Options that do nothing in this run are refused, not ignored.
        _check_used(ctx, calibrate_quality, benchmark)
        # A name ending in "/" names a folder (Path would drop the "/" and write a file of the folder's name).
        json_out = output_file_option(json_out_given, "--json file")
        png = output_file_option(png_given, "--png file")
        quality_out = output_file_option(quality_out_given, "--quality-out file")
        # Every output is checked before a model loads: a run never ends in a traceback over a missing folder.
        check_attention(attention)
        if batch_size is not None:  # segment's sentence (-5, 0 or 100000 crops per batch ran, or failed late)
            check_batch_size(batch_size)
        if calibrate_quality:
            check_quality_tile(quality_tile)
        inputs = evaluation_inputs(raster_file(raster) if raster else None, labels, aoi, model, weights)
        check_report_outputs({"--json file": json_out, "--png file": png,
                              "--quality-out file": quality_out if calibrate_quality else None}, inputs, overwrite)
        class_names: dict[str, str] = {}
        if benchmark is None:
            if raster is None or labels is None or not class_field:
                raise InputError("Give RASTER, LABELS and --class-field (or --benchmark FOLDER).")
            class_names = class_names_from_pairs(class_name or [])
            check_evaluation(model, str(weights) if weights else None, background, class_names, split)
            label_layer(labels, class_field)  # the labels file and its field, then the raster
            check_raster_opens(raster)
        check_model_given(model, weights)
        from backend.engine.devices import resolve_device
        from backend.engine.models import check_half, load_model, to_half

        from training.api import evaluate_model
        from training.quality_calibration import calibrate_and_keep_the_better, calibration_target

        dev = resolve_device(device)
        check_half(half, dev)
        if benchmark is not None:
            _benchmark(benchmark, classes, preset, protocol, reduce_zero_label, prob_threshold,
                       background_index, model, weights, dev, half, benchmark_split, long_side, ignore_index,
                       attention, batch_size, limit, quiet, json_out, png)
            return
        assert raster is not None and labels is not None and class_field  # said above
        if half or calibrate_quality:  # the model loads here, before evaluate_model reads the labels
            loaded = load_model(model, str(weights) if weights else None, dev)
            loaded = to_half(loaded) if half else loaded
        if calibrate_quality:  # where the calibration goes, checked before the evaluation runs
            target = calibration_target(loaded, quality_out)
            if quality_out is None:  # an existing one is compared, then replaced only with --overwrite
                check_output_file(target, "quality calibration", inputs, overwrite=True, gdal=False)
        result = evaluate_model(raster, labels, class_field, model=model,
                                weights=str(weights) if weights else None, background=background, aoi=aoi,
                                class_names=class_names, split=split,
                                bands=_bands(bands), scale=scale, gsd_m=gsd, attention=attention,
                                batch_size=batch_size, device=str(dev),
                                # With --calibrate-quality, the report files land with the calibration, below.
                                out_json=None if calibrate_quality else json_out,
                                out_png=None if calibrate_quality else png,
                                progress=_Lines(quiet), overwrite=overwrite, loaded=loaded)
        typer.echo(f"{result['model']} on {_scored_pixels(result, aoi)}")
        typer.echo(result["text"])
        if calibrate_quality:
            # On the same classes, bands, grid and area as the evaluation above (the model's own defaults).
            used = result["processing"]
            fit = calibrate_and_keep_the_better(
                raster, labels, class_field, loaded, target, force=force_calibration,
                background=result["background"], aoi=used["aoi"], class_names=used["class_names"],
                bands=used["bands"], scale=used["scale"], gsd_m=used["gsd_m"], tile=quality_tile,
                attention=attention, batch_size=result["batch_size"], square=used.get("square", True),
                along=_report_files(result, json_out, png), may_replace=overwrite or quality_out is not None)
    except FarslipError as error:
        _fail(error)
    if calibrate_quality:
        from training.quality_calibration import figures_text

        compared = f"; existing {figures_text(fit['existing'])}" if fit["existing"] else ""
        typer.echo(f"Quality estimate on {fit['tiles']} tiles: default {figures_text(fit['default'])}; calibrated "
                   f"(spatially held out) {figures_text(fit['calibrated'])}{compared}. {fit['sentence']}")


def _check_json_outside(json_out: Path, out: Path) -> None:
    if is_inside(json_out, out):
        raise InputError(f"The --json file {json_out} lies inside --out {out}, which training writes; choose another "
                         "place for it.")


def _scored_pixels(result: dict, aoi: Optional[Path]) -> str:
    """Which pixels of the raster an evaluation scored, as its header line says it: the held-out strip, the
    labelled pixels inside the area of --aoi, or all labelled pixels."""
    raster = raster_label(result["raster"])
    if result["split"] == "validation":
        return f"the held-out validation strip of {raster}"
    if aoi is not None:
        return f"the labelled pixels of {raster} inside the area of --aoi {aoi}"
    return f"all labelled pixels of {raster}"


def _report_files(result: dict, json_out: Optional[Path], png: Optional[Path]) -> dict:
    """The evaluation's --png and --json as files that land with the quality calibration, all or nothing
    (calibrate_and_keep_the_better's `along`): the PNG, then the JSON report last, which holds the calibration's
    figures and the estimate kept, in the form training.api.write_report gives the evaluation's own report."""
    from training.api import report_outputs, report_title, write_report_json, write_report_png

    outputs = report_outputs(json_out, png)
    files: dict = {}
    if png is not None:
        files[png] = lambda staged, fit: write_report_png(result, staged, report_title(result))
    if json_out is not None:
        def write_json(staged: Path, fit: dict) -> None:
            write_report_json(result, outputs, staged, {"quality_calibration": _plain({key: fit[key] for key in (
                "calibration", "written", "kept", "forced", "tiles", "default", "calibrated", "existing",
                "file_at_target", "existing_scored", "existing_not_comparable", "sentence")})})

        files[json_out] = write_json
    return files


def _plain(value):
    """A figure that could not be measured (NaN) is null, as the report's own are."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


_CALIBRATION_ONLY = ("quality_out_given", "quality_tile", "force_calibration")
_BENCHMARK_ONLY = ("classes", "preset", "protocol", "benchmark_split", "long_side", "reduce_zero_label",
                   "prob_threshold", "background_index", "ignore_index", "limit")

_RASTER_ONLY = ("class_field", "class_name", "split", "bands", "scale", "gsd", "background", "aoi",
                "calibrate_quality")


def _check_used(ctx: typer.Context, calibrate_quality: bool, benchmark: Optional[Path]) -> None:
    """evaluate's options that only work with another: --quality-out, --quality-tile and --force-calibration with
    --calibrate-quality, the benchmark's with --benchmark. Given without it, each is refused with
    options.unused_options' sentence; RASTER, LABELS and the raster mode's options are refused with --benchmark.
    "Given" is what the command line (or the environment) set, whatever its value: `--quality-tile 64`, the
    default typed out, is refused too, not silently ignored."""
    from backend.engine.options import unused_options

    if not calibrate_quality and (given := _given(ctx, _CALIBRATION_ONLY)):
        raise unused_options(given, "--calibrate-quality")
    if benchmark is None and (given := _given(ctx, _BENCHMARK_ONLY)):
        raise unused_options(given, "--benchmark FOLDER")
    if benchmark is not None:
        positional = [name for name in ("RASTER", "LABELS") if ctx.params.get(name.lower()) is not None]
        if positional:
            raise InputError(f"{' and '.join(positional)} {'is' if len(positional) == 1 else 'are'} not read with "
                             "--benchmark FOLDER, which scores the folder's images and labels; give the one or the "
                             "other.")
        if given := _given(ctx, _RASTER_ONLY):
            names = " and ".join(given)
            raise InputError(f"{names} {'applies' if len(given) == 1 else 'apply'} only to RASTER and LABELS, not "
                             f"with --benchmark FOLDER; leave {names} out.")


def _given(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The flags (as --help spells them) of the options among `names` that this run set, in `names`' order."""
    flags = {param.name: next(opt for opt in param.opts if opt.startswith("--")) for param in ctx.command.params
             if param.param_type_name == "option"}
    return [flags[name] for name in _typed(ctx, names)]


def _typed(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among `names` (parameter names) this command has and this run set, whatever their value."""
    options = {param.name for param in ctx.command.params if param.param_type_name == "option"}
    # By the source's name: typer brings its own copy of click, whose ParameterSource is not click's.
    return [name for name in names if name in options
            and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]


# --------------------------------------------------------------------------- evaluate --calibrate-quality
def _benchmark(benchmark, classes, preset, protocol, reduce_zero_label, prob_threshold, background_index, model,
               weights, dev, half, benchmark_split, long_side, ignore_index, attention, batch_size, limit, quiet,
               json_out, png) -> None:
    """`evaluate --benchmark FOLDER`: the paper's protocol on a benchmark dataset's layout."""
    from backend.engine.models import load_model, to_half
    from backend.engine.presets import collect_class_lines

    from training.api import write_report
    from training.evaluate import (benchmark_layout, benchmark_metrics, benchmark_protocol, check_benchmark_options,
                                   format_metrics)

    check_benchmark_options(limit, long_side, prob_threshold, ignore_index)
    # The class list is in label value order: a blank line dropped, or a preset's appended, would give every
    # later class another label value's pixels.
    if classes and preset:
        raise InputError("Give --classes or --preset, not both: with --benchmark the class list is in label value "
                         "order, and the two together would score a concatenation of both lists.")
    for number, line in enumerate(classes or [], start=1):
        if not line.strip():
            raise InputError(f"class {number} is blank: with --benchmark the classes are in label value order, so "
                             "each needs a name (a blank one would shift every later class's label value).")
    lines = collect_class_lines(classes, preset=preset)
    if not lines:
        raise InputError("--benchmark needs the class list, in label value order: --preset NAME or "
                         "--classes (one per class).")
    settings = benchmark_protocol(preset, protocol)
    if reduce_zero_label is not None:
        settings["reduce_zero_label"] = reduce_zero_label
    overrides = {}
    for key, value in (("prob_threshold", prob_threshold), ("background_index", background_index)):
        if value is not None:
            if value != settings[key]:
                overrides[key] = {"given": value, "protocol": settings[key]}
            settings[key] = value
    # The report names what overrode the protocol: its numbers are not the protocol's then.
    protocol_used = protocol + "".join(
        f", --{key.replace('_', '-')} {item['given']} instead of its {item['protocol']}"
        for key, item in overrides.items())
    layout = benchmark_layout(preset)
    loaded = load_model(model, str(weights) if weights else None, dev)
    if half:
        loaded = to_half(loaded)
    metrics = benchmark_metrics(
        benchmark, lines, loaded, layout=layout, split=benchmark_split, long_side=long_side or None,
        ignore_index=ignore_index, attention=attention, batch_size=batch_size, limit=limit,
        progress=None if quiet else _Lines(quiet), **settings)
    typer.echo(f"{loaded.name} on {benchmark} ({metrics['images']} images; protocol {protocol}: "
               f"threshold {settings['prob_threshold']}, background index {settings['background_index']}"
               f"{', fp16' if half else ''})")
    typer.echo(format_metrics(metrics))
    from backend.engine.presets import parse_class_lines

    write_report({"model": loaded.name, "benchmark": str(benchmark), "dataset": str(Path(benchmark).resolve()),
                  "preset": preset, "protocol": protocol_used, "protocol_overrides": overrides,
                  "settings": settings, "long_side": long_side or None, "ignore_index": ignore_index,
                  "reduce_zero_label": settings["reduce_zero_label"], "split": metrics["split"], "limit": limit,
                  "attention": attention, "batch_size": metrics.pop("batch_size"), "device": str(dev), "fp16": half,
                  "class_lines": list(lines),
                  "classes": [{"class": spec.name, "queries": list(spec.queries)}
                              for spec in parse_class_lines(lines)],
                  "images": metrics["images"], "image_names": metrics["image_names"], "metrics": metrics},
                 json_out, png, "")


def train_command(
    ctx: typer.Context,
    rasters: Optional[list[str]] = typer.Argument(None, metavar="RASTER",
                                        help="GeoTIFF (or any GDAL raster) to train on; several rasters on one "
                                             "pixel grid (the tiles of one survey) are trained on as one mosaic."),
    labels: Path = typer.Argument(..., help="Polygon layer with a class field (any CRS)."),
    class_field: str = typer.Option(..., help="Field of LABELS holding each polygon's class."),
    out_given: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH",
                                            help="Folder to write the fine-tuned model into (default: a new folder "
                                                 "in the models folder, named after the raster and labels, "
                                                 "which `farslip models` lists and --model NAME loads)."),
    base_model: Optional[str] = typer.Option(None, help="Model to start from (default: the default model)."),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP.replace("--model", "--base-model")),
    method: str = typer.Option("lora", help="lora (default), last-blocks or full."),
    epochs: int = typer.Option(5, help="Epochs (each about two passes of crops over the training area, "
                                          "at least 20 steps)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 2e-4 lora, 2e-5 last-blocks, "
                                                  "1e-5 full)."),
    patch_loss_weight: float = typer.Option(1.0, help="Weight of the dense patch cross-entropy (0: off)."),
    background: Optional[str] = typer.Option(None, help="Unlabelled pixels inside the labels' extent (or "
                                                        "--aoi) become this class."),
    aoi: Optional[Path] = typer.Option(None, help=AOI_HELP),
    class_name: Optional[list[str]] = typer.Option(None, help="VALUE=NAME: rename a label value, e.g. "
                                                              "yes=building (repeatable)."),
    bands: Optional[str] = typer.Option(None, help="Band numbers for red,green,blue, e.g. 3,2,1."),
    scale: Optional[float] = typer.Option(None, help="Resample by this factor."),
    gsd: Optional[float] = typer.Option(None, help="Resample to this ground sample distance in metres."),
    teacher: str = typer.Option("frozen", help="Distillation teacher: frozen (the base model; default for "
                                               "small data) or active (the network being trained, as "
                                               "FarSLIP's release)."),
    batch_size: int = typer.Option(4, help="Crops per step."),
    steps_per_epoch: Optional[int] = typer.Option(None, help="Steps per epoch (default: from the area)."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue an interrupted or finished training of --out."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder (and --json file)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    json_out_given: Optional[str] = typer.Option(None, "--json", metavar="PATH",
                                                 help="Also write the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Fine-tune a model on labelled polygons; report validation mIoU before and after.

    Loss: 1.0 x dense patch cross-entropy + 0.1 x patch-to-patch distillation + 1.0 x region-category alignment.

    Region alignment: labelled polygons whose sqrt(box area) is 64-1024 native pixels (a warning says if too few).

    FarSLIP's global image-text contrastive loss is left out: labels have no captions.

    AdamW, weight decay 0.01 on weight matrices only (not on biases, norms or other 1-D parameters).
    """
    # Without torch: the options, --out, --json, the labels and the raster are said in about a second.
    from backend.engine.mosaic import mosaic_of

    from training.model_folder import default_out_folder, out_folder
    from training.run_checks import (RESUMED_OPTIONS, check_base_model, class_names_from_pairs, prepare_training,
                                     training_inputs)
    from training.train_options import TrainOptions

    if not rasters:  # one file given: click took it for LABELS, the last argument
        typer.echo(ctx.get_usage() + "\nTry 'farslip train --help' for help.\n\nError: Missing argument "
                   "'RASTER... LABELS': give the raster(s) to train on, then the labels file.", err=True)
        raise typer.Exit(2)
    out = Path(out_given or ".")
    raster = rasters[0]
    try:
        with signals_as_interrupt():
            raster = mosaic_of(rasters)  # several tiles: a VRT of them, kept (the model records it)
            if len(rasters) > 1:
                typer.echo(f"The {len(rasters)} rasters are trained on as one mosaic: {raster} (give it as "
                           "RASTER to farslip evaluate).", err=True)
            if out_given is None and resume:
                raise InputError("--resume continues the training of the folder --out names: give it (an "
                                 "interrupted training's message says which).")
            if out_given is not None:
                out = out_folder(out_given)  # Path("") would be the current folder
            json_out = output_file_option(json_out_given, "--json file")
            if json_out is not None:
                # Checked before the model loads: the training's report never fails after the model is written.
                if out_given is not None:
                    _check_json_outside(json_out, out)
                check_output_file(json_out, "--json file", training_inputs(raster_file(raster), labels, aoi, base_model,
                                                                           weights),
                                  overwrite=overwrite, gdal=False)
            options = TrainOptions(batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=seed,
                                   teacher=teacher)
            progress, class_names = _Lines(quiet), class_names_from_pairs(class_name or [])
            checked = prepare_training(raster, labels, class_field, out if out_given is not None else None,
                                       base_model, str(weights) if weights else None, method, epochs, lr,
                                       patch_loss_weight, background, aoi, class_names, resume, overwrite, options,
                                       progress)
            check_raster_opens(checked.raster)
            check_base_model(base_model, str(weights) if weights else None)
            if out_given is None:
                # Chosen (and reserved) once the inputs passed: a refused run neither makes the models folder nor
                # says where a model it will not make would have gone.
                out = default_out_folder(rasters[0], labels)  # a new folder: nothing existing is replaced
                if json_out is not None:
                    _check_json_outside(json_out, out)
                checked = dataclasses.replace(checked, out=out)
                typer.echo(f"No --out given: the model goes to {out} (--model {out.name} loads it).", err=True)
            from backend.engine.devices import resolve_device

            from training.api import train_model

            dev = resolve_device(device)
            result = train_model(raster, labels, class_field, out, base_model=base_model,
                                 weights=str(weights) if weights else None, method=method, epochs=epochs, lr=lr,
                                 patch_loss_weight=patch_loss_weight, background=background, aoi=aoi,
                                 class_names=class_names, bands=_bands(bands),
                                 scale=scale, gsd_m=gsd, resume=resume, overwrite=overwrite, device=str(dev),
                                 options=options, progress=progress, out_json=json_out,
                                 typed=frozenset(_typed(ctx, tuple(RESUMED_OPTIONS))), checked=checked)
    except FarslipError as error:
        _fail(error)
    except KeyboardInterrupt as error:
        from training.model_folder import kept_checkpoint, partial_dir

        if kept_checkpoint(out):
            again = "the same command with --resume" if out_given else f"it again with --out {out} --resume"
            interrupted(error, f"Interrupted; no model was written. The last finished epoch is kept in "
                               f"{partial_dir(out)}: run {again} to continue from it.")
        interrupted(error, "Interrupted before an epoch finished; no model was written and nothing was kept "
                           "(run the command again to start over).")
    before, after = result["metrics"]["before"]["miou"] or 0, result["metrics"]["after"]["miou"] or 0
    typer.echo(f"Validation mIoU: {100 * before:.2f} % before, {100 * after:.2f} % after "
               f"(best epoch {result['best_epoch']} of {result['epochs']}).")
    use = result["model_dir"] if out_given is not None else Path(result["model_dir"]).name  # in the models folder
    typer.echo(f"Wrote {result['model_dir']}; use it with --model {use}.")
