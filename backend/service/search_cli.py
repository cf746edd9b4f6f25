"""`farslip index`, `search`, `classify`, `evaluate-retrieval`: find places by sentence, classify tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from backend.engine.atomic import write_text_atomically
from backend.engine.errors import FarslipError
from backend.engine.files import raster_label
from backend.engine.options import WEIGHTS_HELP
from backend.service.cli_common import (ProgressReporter, check_model_given, check_raster_opens, fail, interrupted,
                                        parse_bands, signals_as_interrupt)

MODEL_HELP = "Registry name, checkpoint file or fine-tuned model folder."
INDEX_KEPT = ("Interrupted; the windows indexed so far are kept, and the next index or search of this raster "
              "continues from them.")
SEARCH_KEPT = ("Interrupted; no hits were written (the windows indexed so far are kept, and the next run "
               "continues from them).")


def _load(model: Optional[str], weights: Optional[Path], device: str):
    from backend.engine.devices import resolve_device
    from backend.engine.models import load_model

    return load_model(model, str(weights) if weights else None, resolve_device(device))


def _inputs(raster: Optional[str | Path], model: Optional[str], weights: Optional[Path], **more: Optional[Path]):
    """The files a run reads, which no output may replace (a registry model name is not a file)."""
    from backend.engine.files import input_paths, raster_file

    return input_paths([("input raster", raster_file(raster) if raster is not None else None), ("model", model),
                        ("weights", weights), *more.items()])


def _note(sentence: str) -> None:
    typer.echo(f"Note: {sentence}", err=True)


def index_command(
    raster: str = typer.Argument(..., help="GeoTIFF (or any GDAL raster) to index."),
    bbox: Optional[tuple[float, float, float, float]] = typer.Option(
        None, help="XMIN YMIN XMAX YMAX: index only the windows over this area (default: whole raster)."),
    bbox_crs: Optional[str] = typer.Option(None, help="CRS of --bbox (default: the raster's)."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    bands: Optional[str] = typer.Option(None, help="Band numbers for red,green,blue, e.g. 3,2,1 (or one)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per batch (default: 8 on the CPU; on a GPU, "
                                                        "from its free memory, as segment picks it)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Build (or complete) RASTER's search index: CLIP embeddings of windows at three ground scales."""
    from backend.engine.options import check_batch_size

    try:
        with signals_as_interrupt():
            if batch_size is not None:
                check_batch_size(batch_size)
            check_raster_opens(raster)
            check_model_given(model, weights)
            from backend.engine.search_index import check_bbox, describe, open_index

            loaded = _load(model, weights, device)
            # A batch that ran out of GPU memory, retried at half the size: said as it happens, as segment says it.
            with open_index(raster, loaded, parse_bands(bands), batch_size=batch_size, notice=_note,
                            flags=("--batch-size", "--device")) as index:
                check_bbox(index, bbox, bbox_crs)
                if index.rebuilt_reason and not quiet:
                    typer.echo(index.rebuilt_reason, err=True)
                with ProgressReporter(quiet, f"indexing {raster_label(raster)}", unit="windows") as reporter:
                    stats = index.ensure(bbox, bbox_crs, progress=reporter)
                info = describe(index, stats)
    except FarslipError as error:
        fail(error)
    except KeyboardInterrupt as error:
        interrupted(error, INDEX_KEPT)
    if not quiet:
        levels = ", ".join(f"{lv['windows']} x {lv['scale_m']:g} m" for lv in info["levels"])
        typer.echo(f"Index of {raster_label(raster)}: {levels} windows; {info['computed']} embedded now "
                   f"({info['windows_per_s'] or 0:g} windows/s), {info['reused']} reused, {info['empty']} empty; "
                   f"{info['size_bytes'] / 2**20:.2f} MiB in {info['folder']}")


def search_command(
    raster: str = typer.Argument(..., help="GeoTIFF (or any GDAL raster) to search."),
    sentences: Optional[list[str]] = typer.Argument(None, help="What to look for; several sentences are allowed."),
    out_given: str = typer.Option("hits.gpkg", "--out", "-o", help="Hits: .gpkg (default), .shp, .geojson, .fgb."),
    top: int = typer.Option(20, help="Hits per sentence."),
    keywords: Optional[list[str]] = typer.Option(
        None, help="Keyword phrases separated by ';', once per sentence (default: split from the sentence)."),
    no_keywords: bool = typer.Option(False, "--no-keywords", help="Score by the whole sentence only."),
    like: Optional[tuple[float, float]] = typer.Option(None, help="X Y: find places like the window under "
                                                                  "this point."),
    like_crs: Optional[str] = typer.Option(None, help="CRS of --like (default: the raster's)."),
    bbox: Optional[tuple[float, float, float, float]] = typer.Option(None, help="XMIN YMIN XMAX YMAX to search in."),
    bbox_crs: Optional[str] = typer.Option(None, help="CRS of --bbox (default: the raster's)."),
    max_overlap: float = typer.Option(0.5, help="Drop a hit whose overlap with a better one covers more than this "
                                                "share of the smaller of the two."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    bands: Optional[str] = typer.Option(None, help="Band numbers for red,green,blue, e.g. 3,2,1 (or one)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Rank RASTER's windows by a sentence (or by an example place) and write the best as rectangles."""
    out = Path(out_given)
    try:
        with signals_as_interrupt():
            check_raster_opens(raster)
            from backend.engine.search_queries import SearchOptions, validate_search_options

            options = SearchOptions(list(sentences or []), list(keywords) if keywords else None, not no_keywords,
                                    top, bbox, bbox_crs, like, like_crs, max_overlap)
            queries = validate_search_options(options)
            check_model_given(model, weights)
            from backend.engine.search import check_hits_output, search_raster
            from backend.engine.search_index import open_index

            check_hits_output(out_given, overwrite, _inputs(raster, model, weights), [q.text for q in queries])
            loaded = _load(model, weights, device)
            with open_index(raster, loaded, parse_bands(bands), flags=("--device",)) as index:
                with ProgressReporter(quiet, f"indexing {raster_label(raster)}", unit="windows") as reporter:
                    result = search_raster(index, options, out, overwrite, progress=reporter)
    except FarslipError as error:
        fail(error)
    except KeyboardInterrupt as error:
        interrupted(error, SEARCH_KEPT)
    for notice in result.notices:
        typer.echo(notice, err=True)
    if not quiet:
        records = result.hits.records()
        for record in records[:10]:
            typer.echo(f"  {record['rank']:>3}  {record['score']:.4f}  {record['scale_m']:>8g} m  {record['query']}")
        if len(records) > 10:
            typer.echo(f"  ... and {len(records) - 10} more in {out}")
        index_info = result.report["index"]
        typer.echo(f"Wrote {len(result.hits.query)} hits to {out} ({index_info['computed']} windows embedded, "
                   f"{index_info['reused']} reused; ranking {result.report['timings']['rank_s']:.3f} s).")


def classify_command(
    raster: str = typer.Argument(..., help="GeoTIFF (or any GDAL raster) to classify."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c",
                                                help="One class per option; commas separate synonyms."),
    classes_file: Optional[Path] = typer.Option(None, help="Text file, one class per line."),
    preset: Optional[str] = typer.Option(None, help="A named class list (see `farslip presets`)."),
    tile: int = typer.Option(224, help="Tile side in raster pixels (tiles are resized to the model's input)."),
    out_given: str = typer.Option("tiles.gpkg", "--out", "-o", help="Tiles: .gpkg (default), .shp, .geojson, .fgb."),
    bbox: Optional[tuple[float, float, float, float]] = typer.Option(None, help="XMIN YMIN XMAX YMAX to classify."),
    bbox_crs: Optional[str] = typer.Option(None, help="CRS of --bbox (default: the raster's)."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    bands: Optional[str] = typer.Option(None, help="Band numbers for red,green,blue, e.g. 3,2,1 (or one)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Zero-shot scene classification: the most likely class of every tile, with its probability."""
    from backend.engine.presets import check_class_lines, collect_class_lines

    out = Path(out_given)
    noted: list[str] = []  # a batch retried after the GPU ran out of memory: said as it happens, not again below

    def note(sentence: str) -> None:
        noted.append(sentence)
        _note(sentence)

    try:
        with signals_as_interrupt():
            lines = collect_class_lines(classes, classes_file, preset)
            check_class_lines(lines)
            check_raster_opens(raster)
            check_model_given(model, weights)
            from backend.engine.classify import (ClassifyOptions, check_classify_output, classify_raster,
                                                 validate_classify_options)
            from backend.engine.search import check_hits_output

            options = ClassifyOptions(lines, tile, bbox, bbox_crs, parse_bands(bands))
            inputs = _inputs(raster, model, weights, **{"class list": classes_file})
            check_hits_output(out_given, overwrite, inputs)
            loaded = _load(model, weights, device)
            if not options.class_lines and loaded.class_lines:
                options.class_lines = list(loaded.class_lines)
            validate_classify_options(options)
            check_classify_output(out, overwrite, options, inputs)
            with ProgressReporter(quiet, f"classifying {raster_label(raster)}") as reporter:
                result = classify_raster(raster, options, out, loaded, overwrite, progress=reporter,
                                         notice=note, flags=("--device",))
    except FarslipError as error:
        fail(error)
    except KeyboardInterrupt as error:
        interrupted(error)
    for warning in result.warnings:
        if warning not in noted:
            typer.echo(f"Warning: {warning}", err=True)
    if not quiet:
        for entry in result.classes:
            typer.echo(f"  {entry['class']:<24} {entry['tiles']:>6} tiles")
        typer.echo(f"Wrote {result.tiles} tiles to {out}.")


def evaluate_retrieval_command(
    folder: Path = typer.Argument(..., help="RSICD/RSITMD folder (caption JSON + images), or its caption JSON."),
    split: str = typer.Option("test", help="Split to evaluate (train, val, test, or all)."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    protocol: str = typer.Option(
        "farslip", help="How hits are counted: farslip (FarSLIP's evaluation and paper: 'a satellite image. ' "
                        "before each caption, distinct images and caption texts, a hit is any image with that "
                        "text) or mpsclip (MPS-CLIP's: each caption as written against its one image)."),
    json_out_given: Optional[str] = typer.Option(None, "--json", help="Also write the figures as JSON."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Image-text retrieval recalls (R@1/5/10 both ways, mR) on an RSICD/RSITMD-layout folder, counted as
    FarSLIP's evaluation (--protocol farslip, the default) or MPS-CLIP's (--protocol mpsclip)."""
    import json

    from backend.engine.files import check_output_file, output_file_option
    from backend.engine.options import check_batch_size
    from backend.engine.retrieval import check_protocol, dataset_files, load_caption_set
    from backend.engine.retrieval import evaluate_retrieval as evaluate

    try:
        with signals_as_interrupt():
            check_batch_size(batch_size)
            check_protocol(protocol)
            json_out = output_file_option(json_out_given, "--json file")
            load_caption_set(folder, split)
            if json_out is not None:  # checked before the model loads: the figures are never lost at the end
                caption_file, *images = dataset_files(folder)
                check_output_file(json_out, "--json file",
                                  _inputs(None, model, weights, **{"caption JSON": caption_file},
                                          **{f"dataset image {path.name}": path for path in images}),
                                  overwrite=overwrite, gdal=False)
            loaded = _load(model, weights, device)
            with ProgressReporter(quiet, f"embedding {folder.name}", unit="images") as reporter:
                result = evaluate(folder, loaded, split, batch_size, progress=reporter, protocol=protocol)
    except FarslipError as error:
        fail(error)
    except KeyboardInterrupt as error:
        interrupted(error)
    for notice in result["notices"]:
        typer.echo(f"Warning: {notice}", err=True)
    recalls = result["recalls"]
    typer.echo(f"Captions from {result['caption_file']}")
    typer.echo(f"Protocol {result['protocol']}: {result['protocol_summary']}.")
    counted = (f" ({result['distinct_captions']} distinct texts scored)" if result["protocol"] == "farslip"
               else "")
    typer.echo(f"{result['images']} images, {result['captions']} captions{counted} ({split}), "
               f"model {result['model']}")
    typer.echo("  image->text  R@1 {i2t_R@1:6.2f}  R@5 {i2t_R@5:6.2f}  R@10 {i2t_R@10:6.2f}".format(**recalls))
    typer.echo("  text->image  R@1 {t2i_R@1:6.2f}  R@5 {t2i_R@5:6.2f}  R@10 {t2i_R@10:6.2f}".format(**recalls))
    typer.echo(f"  mR {recalls['mR']:.2f}")
    if json_out:
        write_text_atomically(json_out, json.dumps(result, indent=2))
