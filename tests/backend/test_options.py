"""The segment options model: every field of SegmentOptions is an option of `farslip segment` and a
field of POST /v1/segment (in the real app's OpenAPI schema), both routes give the same SegmentOptions,
and one check refuses bad values with the CLI's sentence before any model is looked for.
(tests/e2e/test_server_options.py sends every option to a real server.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from backend.engine.feature_cache import FeatureCache, LayeredFeatureCache, feature_cache_for
from backend.engine.errors import InputError
from backend.service.http_words import for_http
from backend.engine.options import (SegmentOptions, check_values, cli_name, option_field, option_fields, path_fields,
                                    spec_of)
from backend.service.cli import app
from backend.service.cli_options import options_from_cli
from backend.service.scale_cli import SCALE_ONLY, single_raster
from backend.service.schemas import SegmentRequest, options_from_request
from backend.service.server import create_app

# How this process runs, not what a run does (the server has its own); and where: a Ray run's options.
CLI_OWN = {"device", "quiet", *SCALE_ONLY}
NAIP = Path(__file__).resolve().parents[3] / "shared" / "data" / "naip_2020_5m.tif"

# A value other than the default for every option, as a request body gives it. An option added to the
# model without a value here fails test_every_option_has_a_test_value_that_is_not_its_default: add one.
REQUEST = {
    "raster": "/data/in.tif", "class_lines": ["water, lake", "road"], "classes_file": "/data/classes.txt",
    "preset": "urban", "out": "/data/out.fgb", "format": "FlatGeobuf", "class_raster": "/data/classes.tif",
    "prob_raster": "/data/probs.tif", "prob_dtype": "uint8", "overwrite": True, "model": "farslip-vit-b-16",
    "weights": "/w/model.pt",
    "bbox": [1.0, 2.0, 3.0, 4.0], "bbox_crs": "EPSG:4326", "bands": [3, 2, 1], "threshold": 0.25,
    "attention": "clearclip", "batch_size": 5, "scale": 0.5, "gsd_m": 2.5, "min_area": 10.0, "simplify": 1.5,
    "value_range": [0.0, 3000.0], "refine": "sam", "sam_model": "/w/sam", "runtime": "torch",
    "language": "pt", "quality_calibration": "/w/quality.json", "region_checks": False, "half": True,
    "cache_features": True, "cache_mb": 64,
}


def cli_args(request: dict) -> list[str]:
    """The same values as `farslip segment` arguments, spelt by the model's CLI names."""
    args: list[str] = []
    for item in option_fields():
        value, declared = request[item.name], spec_of(item)
        if declared.argument:
            args.insert(0, str(value))
        elif isinstance(value, bool):  # a switch: --name turns on, --no-name off what is on by default
            args += [] if value == item.default else [cli_name(item) if value else f"--no-{cli_name(item)[2:]}"]
        elif declared.parse is not None:
            args += [cli_name(item), ",".join(map(str, value))]
        elif isinstance(value, list) and "tuple" in str(item.type):
            args += [cli_name(item), *map(str, value)]
        elif isinstance(value, list):
            for entry in value:
                args += [cli_name(item), str(entry)]
        else:
            args += [cli_name(item), str(value)]
    return args


def segment_command():
    return typer.main.get_command(app).commands["segment"]


def test_every_option_has_a_test_value_that_is_not_its_default():
    assert sorted(REQUEST) == sorted(item.name for item in option_fields())
    defaults = SegmentOptions(raster=Path("/x.tif"))
    given = options_from_request(REQUEST)
    for item in option_fields():
        if not spec_of(item).argument:
            assert getattr(given, item.name) != getattr(defaults, item.name), item.name


def test_every_option_is_a_parameter_of_farslip_segment_with_the_models_help():
    params = {param.name: param for param in segment_command().params}
    for item in option_fields():
        assert item.name in params, f"{item.name} is not an option of `farslip segment`"
        param = params[item.name]
        if spec_of(item).argument:
            assert param.param_type_name == "argument" and param.required
        else:
            assert cli_name(item) in param.opts
            assert param.help == spec_of(item).help
    assert set(params) == {item.name for item in option_fields()} | CLI_OWN
    shown = CliRunner().invoke(app, ["segment", "--help"], env={"COLUMNS": "300"}).output
    for item in option_fields():
        # The raster argument is INPUTS: one raster, or several with --workers/--cluster.
        assert ("INPUTS" if spec_of(item).argument else cli_name(item)) in shown


def test_every_option_is_a_field_of_the_served_apps_segment_request_schema(tmp_path):
    schema = create_app("token", tmp_path / "state", device="cpu").openapi()["components"]["schemas"]
    properties = schema["SegmentRequest"]["properties"]
    assert list(properties) == [item.name for item in option_fields()]
    for item in option_fields():
        # The --help text, with its command-line flags said as the request's fields (http_words).
        assert properties[item.name]["description"].startswith(for_http(spec_of(item).help, "segment")), item.name
    for name in path_fields():
        assert "absolute path" in properties[name]["description"], name
    assert set(schema["SegmentRequest"]["required"]) == {"raster", "out"}
    assert properties["threshold"]["exclusiveMaximum"] == 1.0 and properties["threshold"]["minimum"] == 0.0
    assert properties["runtime"]["enum"] == ["auto", "torch", "openvino", "onnxruntime"]


def test_the_command_line_and_the_request_give_the_same_options():
    context = segment_command().make_context("segment", cli_args(REQUEST))
    values = {name: value for name, value in context.params.items() if name not in CLI_OWN}
    from_cli = options_from_cli(single_raster(values))
    from_api = options_from_request(SegmentRequest.model_validate(REQUEST).model_dump())
    assert from_cli == from_api
    assert from_cli.bands == [3, 2, 1] and from_cli.bbox == (1.0, 2.0, 3.0, 4.0)
    assert from_cli.gsd_m == 2.5 and from_cli.raster == "/data/in.tif" and from_cli.half is True
    assert all(dataclasses.asdict(from_cli)[name] is not None for name in REQUEST)


def test_class_lines_given_as_one_text_are_a_class_per_line_and_a_line_break_in_a_list_item_stays_refused():
    """The plugin's class box holds a class per line; a client sending that text as it is gets those classes
    (blank lines dropped), not a 422 asking for a list."""
    from backend.engine.presets import parse_class_lines

    body = {"raster": "/data/in.tif", "out": "/data/out.gpkg",
            "class_lines": "water, lake\r\ncropland\n\n  \ngrassland\n"}
    options = options_from_request(SegmentRequest.model_validate(body).model_dump())
    assert options.class_lines == ["water, lake", "cropland", "grassland"]
    schema = SegmentRequest.model_json_schema()["properties"]["class_lines"]
    assert {"type": "string"} in schema["anyOf"] and "an item per line" in schema["description"]
    # A BOM (a text saved by Notepad) is no part of the first class; a line ends only at a line break: a
    # control or separator character inside it stays there, and is refused as in a list item.
    bom = options_from_request(
        SegmentRequest.model_validate({**body, "class_lines": "\ufeffwater\rfield"}).model_dump())
    assert bom.class_lines == ["water", "field"]
    for inside in ("\x1c", "\x85", "\u2028"):
        parsed = options_from_request(SegmentRequest.model_validate(
            {**body, "class_lines": f"water{inside}field\nroad"}).model_dump())
        assert parsed.class_lines == [f"water{inside}field", "road"]
    with pytest.raises(ValueError, match="at most 250 items"):  # the bound on the number of classes holds too
        SegmentRequest.model_validate({**body, "class_lines": "\n".join(f"class {i}" for i in range(251))})
    listed = options_from_request(SegmentRequest.model_validate({**body, "class_lines": ["water\nlake"]}).model_dump())
    with pytest.raises(InputError, match="control character"):
        parse_class_lines(listed.class_lines)


@pytest.mark.parametrize(("out", "name", "written"), [
    ("/data/r", None, "/data/r.gpkg"), ("/data/r", "GeoJSON", "/data/r.geojson"),
    ("/data/r", "esri shapefile", "/data/r.shp"), ("/data/r", "SHP", "/data/r.shp"),
    ("/data/r", "fgb", "/data/r.fgb"), ("/data/r", "GeoPackage", "/data/r.gpkg"),
    ("/data/r.GPKG", "gpkg", "/data/r.GPKG"), ("/data/r.fgb", None, "/data/r.fgb")])
def test_format_gives_an_out_without_an_extension_its_own_on_the_command_line_and_in_a_request(out, name, written):
    """DESIGN's POST /v1/segment takes an "output path + format": an out without an extension was refused."""
    format_args = ["--format", name] if name else []
    context = segment_command().make_context("segment", ["/data/in.tif", "--out", out, *format_args])
    values = {key: value for key, value in context.params.items() if key not in CLI_OWN}
    from_cli = options_from_cli(single_raster(values))
    body = {"raster": "/data/in.tif", "out": out, **({"format": name} if name else {})}
    from_api = options_from_request(SegmentRequest.model_validate(body).model_dump())
    assert from_cli == from_api and from_api.out == Path(written)
    check_values(from_api)


@pytest.mark.parametrize(("name", "written"), [(None, "result.gpkg"), ("shp", "result.shp"),
                                              ("GeoJSON", "result.geojson")])
def test_without_out_the_default_result_takes_the_formats_extension(name, written):
    """`segment R -c a --format shp` without --out was refused: the default result.gpkg contradicted --format."""
    format_args = ["--format", name] if name else []
    context = segment_command().make_context("segment", ["/data/in.tif", *format_args])
    values = {key: value for key, value in context.params.items() if key not in CLI_OWN}
    options = options_from_cli(single_raster(values))
    assert options.out == Path(written)
    check_values(options)


@pytest.mark.parametrize(("out", "name", "words"), [
    ("/data/r.shp", "GPKG", "--out /data/r.shp ends in '.shp', but --format GPKG writes GPKG (.gpkg)"),
    ("/data/r.geojson", "FlatGeobuf", "--format FlatGeobuf writes FlatGeobuf (.fgb)"),
    ("/data/r", "kml", "Unknown --format 'kml'")])
def test_a_format_its_out_contradicts_or_no_format_is_one_sentence(out, name, words):
    options = options_from_request(SegmentRequest.model_validate({"raster": "/data/in.tif", "out": out,
                                                                   "format": name}).model_dump())
    with pytest.raises(InputError, match=re.escape(words)):
        check_values(options)


def test_defaults_agree_between_the_command_line_and_the_request():
    context = segment_command().make_context("segment", ["/data/in.tif", "--out", "/data/out.gpkg"])
    values = {name: value for name, value in context.params.items() if name not in CLI_OWN}
    from_api = options_from_request(SegmentRequest.model_validate({"raster": "/data/in.tif",
                                                                    "out": "/data/out.gpkg"}).model_dump())
    assert options_from_cli(single_raster(values)) == from_api == SegmentOptions(raster=Path("/data/in.tif"),
                                                                  out=Path("/data/out.gpkg"))


def test_the_report_records_the_processing_options_in_their_order():
    options = options_from_request(REQUEST)
    assert list(options.processing()) == [
        "bbox", "bbox_crs", "bands", "threshold", "attention", "batch_size", "scale", "gsd_m", "min_area",
        "simplify", "value_range", "refine", "sam_model", "runtime", "language", "quality_calibration"]


BAD_VALUES = [
    (["--threshold", "nan"], "The probability threshold must be in [0, 1); got nan."),
    (["--threshold", "1"], "The probability threshold must be in [0, 1); got 1.0."),
    (["--scale", "inf"], "--scale must be between 0.05 and 8; got inf."),
    (["--scale", "9"], "--scale must be between 0.05 and 8; got 9.0."),
    (["--gsd", "0"], "--gsd must be a positive number of metres; got 0.0."),
    (["--min-area", "nan"], "--min-area must be a finite number, 0 or more; got nan."),
    (["--simplify", "-inf"], "--simplify must be a finite number, 0 or more; got -inf."),
    (["--batch-size", "0"], "The batch size must be a whole number from 1 to 1024; got 0."),
    (["--cache-mb", "0"], "--cache-mb must be at least 1; got 0."),
    (["--bands", "0,1,2"], "--bands must be a whole number at least 1; got 0."),
    (["--bands", "red"], "--bands takes band numbers separated by commas"),
    (["--value-range", "nan", "5"], "--value-range takes MIN MAX with finite MIN < MAX"),
    (["--bbox", "0", "0", "inf", "1"], "is not a valid box"),
    (["-c", "water\nroad"], "control character '\\n' (a line break)"),
    (["-c", "wa\x01ter"], "control character '\\x01' (U+0001); type it as plain text"),
    (["-c", ", ;"], "The class line ', ;' holds only separators and no class name"),
    # A class line is bounded as a request's class_lines are, and one no one can see is no class.
    (["-c", "w" * 1001], f"The class line {'w' * 60!r}... is 1001 characters long; give at most 1000 characters."),
    (["-c", "\u200b"], "The class line '\\u200b' holds only invisible characters (U+200B ZERO WIDTH SPACE); type "
                       "visible text, or leave it out."),
    (["-c", "\u200e\ufeff"], "holds only invisible characters (U+200E LEFT-TO-RIGHT MARK)"),
    (["-c", "\u00ad"], "holds only invisible characters (U+00AD SOFT HYPHEN)"),
    (["-c", "road, \u200b"], "The class name '\\u200b' in the class line 'road, \\u200b' holds only invisible"),
    (["-c", "lake, water"], "'water' is a name of two classes ('water' and 'lake')"),
    (["-c", "road, Water"], "'Water' is a name of two classes ('water' and 'road')"),
    (["-c", "WATER"], "The class 'WATER' is given twice"),
    # Names a reader cannot tell apart: full-width letters, a no-break space or two spaces for one.
    (["-c", "\uff57\uff41\uff54\uff45\uff52"], "The class '\uff57\uff41\uff54\uff45\uff52' is given twice"),
    (["-c", "deep\u00a0lake", "-c", "deep  lake"], "The class 'deep lake' is given twice"),
    # ... or an invisible character pasted along (a zero-width space, a soft hyphen, a byte-order mark).
    (["-c", "water\u200b"], "The class 'water\\u200b' is given twice"),
    (["-c", "wa\u00adter"], "The class 'wa\\xadter' is given twice"),
    (["-c", "\ufeffWater"], "The class '\\ufeffWater' is given twice"),
    # Full-width and ideographic commas separate synonyms as commas do.
    (["-c", "\u6e56\u6cca\uff0cwater"], "'water' is a name of two classes ('water' and '\u6e56\u6cca')"),
    (["-c", "\u6e56\u6cca\u3001Water"], "'Water' is a name of two classes ('water' and '\u6e56\u6cca')"),
    (["--bbox-crs", "EPSG:4326"], "--bbox-crs EPSG:4326 says which CRS the --bbox is in, and no --bbox was given"),
    (["--bands", "3 2 9"], "Band(s) [9] do not exist"),  # spaces separate band numbers (it read 329)
    (["--attention", "magic"], "Unknown attention variant 'magic'; use one of segearth"),
    (["--runtime", "tensorrt"], "Unknown runtime 'tensorrt'; use one of auto, torch, openvino, onnxruntime."),
    (["--refine", "blur"], "Unknown --refine 'blur'; use one of none, edges, sam."),
    (["--language", "klingon"], "Unknown language 'klingon'. Use auto or one of: en (English)"),
    (["--scale", "1", "--gsd", "5"], "Give either --scale or --gsd, not both."),
    # An option that only works with another is refused without it, not ignored.
    (["--sam-model", "sam-vit-b"], "Error: --sam-model applies only with --refine sam (this run has --refine "
                                   "none); add --refine sam, or leave --sam-model out."),
    (["--refine", "edges", "--sam-model", "sam-vit-b"], "(this run has --refine edges)"),
    (["--cache-mb", "64"], "Error: --cache-mb applies only with --cache-features; add --cache-features, or leave "
                           "--cache-mb out."),
    (["--quality-calibration", "/nonexistent/q.json"], "The quality calibration file /nonexistent/q.json does"),
]


@pytest.mark.parametrize(("args", "words"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_refused_with_one_sentence_before_the_model_is_looked_for(tmp_path, args, words):
    result = CliRunner().invoke(app, ["segment", str(NAIP), "-c", "water", "--out", str(tmp_path / "x.gpkg"),
                                      "--model", "no-such-model", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert words in result.output and "Unknown model" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_every_option_that_works_only_with_another_is_refused_without_it_and_passes_with_it():
    """Spec.needs, checked by check_values for the command line and the server alike."""
    given = options_from_request(REQUEST)
    needing = [item for item in option_fields() if spec_of(item).needs]
    assert {item.name for item in needing} == {"bbox_crs", "sam_model", "cache_mb", "prob_dtype"}
    for item in needing:
        enabling, _ = spec_of(item).needs
        alone = SegmentOptions(raster="/x.tif", **{item.name: getattr(given, item.name)})
        with pytest.raises(InputError) as refused:
            check_values(alone)
        assert str(refused.value).startswith(cli_name(item)) and cli_name(option_field(enabling)) in str(refused.value)
        check_values(dataclasses.replace(alone, **{enabling: getattr(given, enabling)}))


@pytest.mark.parametrize(("args", "words"), [
    (["--quality-tile", "32"], "--quality-tile applies only with --calibrate-quality; add --calibrate-quality, or "
                               "leave --quality-tile out."),
    (["--quality-out", "q.json", "--quality-tile", "32"], "--quality-out and --quality-tile apply only with "
                                                          "--calibrate-quality"),
    (["--limit", "3", "--protocol", "segearth"], "--protocol and --limit apply only with --benchmark FOLDER; add "
                                                 "--benchmark FOLDER, or leave --protocol and --limit out."),
    (["--ignore-index", "0"], "--ignore-index applies only with --benchmark FOLDER"),
])
def test_evaluate_refuses_options_that_do_nothing_in_its_run(tmp_path, args, words):
    """farslip evaluate ignored --quality-out/--quality-tile without --calibrate-quality, and the benchmark's
    options without --benchmark."""
    result = CliRunner().invoke(app, ["evaluate", str(NAIP), str(tmp_path / "labels.gpkg"), "--class-field", "c",
                                      "--model", "no-such-model", "--device", "cpu", *args])
    assert result.exit_code == 2 and words in result.output, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_half_on_a_cpu_is_refused_by_the_command_line_before_loading(tmp_path, monkeypatch):
    # A registry model whose weights are not on this computer (offline): --half is said before they are looked for.
    monkeypatch.setenv("FARSLIP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["segment", str(NAIP), "-c", "water", "--out", str(tmp_path / "x.gpkg"),
                                      "--model", "clip-vit-b-16", "--device", "cpu", "--half"])
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output, result.output


def test_a_run_that_asks_for_cached_features_keeps_them_on_disk_behind_a_servers_memory(tmp_path):
    shared = FeatureCache(1 << 20, tmp_path / "features", 0)  # a server without a disk tier
    assert feature_cache_for(False, 64, shared) is shared
    layered = feature_cache_for(True, 64, shared)
    assert isinstance(layered, LayeredFeatureCache)
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    layered.put("scope", (0, 0, 224, 224), features)
    assert len(list((tmp_path / "features").glob("*/*.npy"))) == 1
    shared.clear()  # a restart: memory is gone, the disk keeps the features
    again = feature_cache_for(True, 64, shared)
    assert again is not None
    assert np.array_equal(again.get("scope", (0, 0, 224, 224)), features)
    assert shared.get("scope", (0, 0, 224, 224)) is not None  # remembered in memory on the way
    assert again.stats()["disk_max_bytes"] == 64 * 2**20
    with_disk = FeatureCache(1 << 20, tmp_path / "features", 1 << 20)
    assert feature_cache_for(True, 64, with_disk) is with_disk  # the server's own disk tier serves it
