"""An HTTP client is told the JSON fields it sent, not the command line's flags (backend/service/http_words.py).

The sentences are the engine's own (raised by the checks a request runs through); each kind of request
has its own field names (train's base model is `base_model`, evaluate's metrics file `out_json`)."""

from __future__ import annotations

import pytest

from backend.engine.models import check_half
from backend.engine.options import SegmentOptions, check_values
from backend.engine.errors import InputError
from backend.service.http_words import for_http, job_for_http, kind_of_path


def _sentence(**options) -> str:
    with pytest.raises(InputError) as refused:
        check_values(SegmentOptions(raster="/d/a.tif", class_lines=["a", "b"], **options))
    return str(refused.value)


@pytest.mark.parametrize("options, said", [
    ({"sam_model": "sam-vit-b"}, '"sam_model" applies only with "refine": "sam" (this run has "refine": "none"); '
                                 'add "refine": "sam", or leave "sam_model" out.'),
    ({"cache_mb": 64}, '"cache_mb" applies only with "cache_features": true; add "cache_features": true, or leave '
                       '"cache_mb" out.'),
    ({"scale": 2.0, "gsd_m": 1.0}, 'Give either "scale" or "gsd_m", not both.'),
])
def test_the_engines_refusals_name_the_segment_requests_fields(options, said):
    assert for_http(_sentence(**options), "segment") == said


@pytest.mark.parametrize("sentence, kind, said", [
    ("--bbox-crs EPSG:4326 says which CRS --bbox is in, and no --bbox was given; add --bbox XMIN YMIN XMAX YMAX.",
     "segment", '"bbox_crs": "EPSG:4326" says which CRS "bbox" is in, and no "bbox" was given; add "bbox": '
                '[XMIN, YMIN, XMAX, YMAX].'),
    ("--gsd 0.5 would resample this raster's 5 m pixels by 10", "segment",
     '"gsd_m": 0.5 would resample this raster\'s 5 m pixels by 10'),
    ("--bands takes 3 band numbers, e.g. --bands 3,2,1.", "segment", '"bands" takes 3 band numbers, e.g. "bands": '
                                                                    '[3, 2, 1].'),
    ("The file exists; allow overwriting (--overwrite).", "search", 'The file exists; allow overwriting '
                                                                    '("overwrite": true).'),
    ("Run it with --no-region-checks.", "segment", 'Run it with "region_checks": false.'),
    ("--like-crs EPSG:3857 needs --like; add --like X Y.", "search",
     '"like_crs": "EPSG:3857" needs "like"; add "like": [X, Y].'),
    ("--model is empty.", "train", '"base_model" is empty.'),
    ("--model is empty.", "evaluate", '"model" is empty.'),
    ("Replace it with --overwrite or continue it with --resume.", "train",
     'Replace it with "overwrite": true or continue it with "resume": true.'),
    ("--split validation needs a fine-tuned model; use --split all.", "evaluate",
     '"split": "validation" needs a fine-tuned model; use "split": "all".'),
    ("Use --device cpu.", "train", 'Use "device": "cpu".'),
    ("Cannot write polygons to /d/a.parquet: GeoParquet is written by runs on Ray; add --workers 1 to run this one "
     "on a local Ray, or use one of .gpkg, .shp.", "segment",
     "Cannot write polygons to /d/a.parquet: GeoParquet is written by runs on Ray; farslip segment --workers 1 "
     "writes one; here use one of .gpkg, .shp."),
    ("Class line 2 is empty (an unset shell variable in -c \"$NAME\"?).", "segment", "Class line 2 is empty."),
    ("No class given (e.g. --classes \"building\" --classes \"road, parking lot\").", "segment",
     'No class given (e.g. "class_lines": ["building", "road, parking lot"]).'),
    # A command to run is said as it is typed.
    ("Calibrate again (farslip evaluate --calibrate-quality) for these classes.", "segment",
     "Calibrate again (farslip evaluate --calibrate-quality) for these classes."),
    # A flag the request has no field for stays a flag.
    ("Run it with --quiet.", "segment", "Run it with --quiet."),
    # A path in a sentence is not a flag.
    ("The folder /d/--out/x does not exist.", "segment", "The folder /d/--out/x does not exist."),
])
def test_sentences_of_each_kind_of_request(sentence, kind, said):
    assert for_http(sentence, kind) == said


def test_half_on_a_cpu_backend_says_how_to_start_it_on_a_gpu():
    import torch

    with pytest.raises(InputError) as refused:
        check_half(True, torch.device("cpu"))
    said = for_http(str(refused.value), "segment")
    assert said.startswith('"half": true (fp16 weights')
    assert 'Drop "half": true, or start the backend with farslip serve --device cuda' in said


def test_a_jobs_error_message_and_warnings_are_said_in_its_kinds_fields():
    job = {"kind": "train", "state": "failed", "error": "Run without --resume to start training.",
           "message": "Training with --method lora.",
           "result": {"warnings": ["--class-name renames 'x'"], "notices": None, "outputs": {}}}
    said = job_for_http(job)
    assert said["error"] == 'Run without "resume": true to start training.'
    assert said["message"] == 'Training with "method": "lora".'
    assert said["result"]["warnings"] == ["\"class_names\" renames 'x'"]
    assert job["error"] == "Run without --resume to start training."  # the stored job is not changed


@pytest.mark.parametrize("path, kind", [("/v1/segment", "segment"), ("/v1/search", "search"), ("/v1/index", "index"),
                                        ("/v1/train", "train"), ("/v1/evaluate", "evaluate"),
                                        ("/v1/models/download", "download"), ("/v1/jobs", None)])
def test_the_kind_of_an_endpoint(path, kind):
    assert kind_of_path(path) == kind
