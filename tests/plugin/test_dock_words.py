"""The backend's sentences name the request fields an HTTP client sent; the dock's user set the dock's controls,
and reads their labels (messages.dock_words, applied to every 4xx answer and every job the client reads)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("said, shown", [
    ("No polygon was drawn: no pixel's most likely class reached \"threshold\": 0.99; lower it.",
     "No polygon was drawn: no pixel's most likely class reached Threshold 0.99; lower it."),
    ("The model is not here (or set FARSLIP_WEIGHTS to the folder holding it, or pass \"weights\": PATH).",
     "The model is not here (or set FARSLIP_WEIGHTS to the folder holding it, or choose the file with Browse... "
     "beside Model)."),
    ("'a lake' has 4 hits, not \"top\" 20.", "'a lake' has 4 hits, not the 20 asked for in Hits."),
    # A search's notice named "max_overlap", which the Search tab has no control for: what its user can do.
    ("'a lake' has 1 hit, not \"top\" 20: the area's other windows each overlap a better one by more than "
     "\"max_overlap\": 0.5 (raise it, or search a larger area, for more).",
     "'a lake' has 1 hit, not the 20 asked for in Hits: the area's other windows each overlap a better one by more "
     "than 50%; search a larger area for more."),
    ("No window with valid pixels lies in the \"bbox\" area (it holds only nodata), so there are no hits; choose "
     "another area.", "No window with valid pixels lies in the area searched (it holds only nodata), so there are "
     "no hits; choose another area."),
    ("\"base_model\" is empty.", "Base model is empty."),
    # A field the dock has no control for stays the field's name.
    ("\"max_overlap\": 0.5 was too small.", "\"max_overlap\": 0.5 was too small."),
])
def test_backend_sentences_in_the_docks_words(farslip, said, shown):
    from qgis_farslip.messages import dock_words

    assert dock_words(said) == shown


def test_a_refusal_and_a_job_read_by_the_client_are_in_the_docks_words(farslip):
    from qgis_farslip.client import _detail
    from qgis_farslip.messages import job_in_dock_words

    body = json.dumps({"detail": "Give either \"threshold\" or nothing."}).encode()
    assert _detail(body, 400) == "Give either Threshold or nothing."
    job = {"state": "failed", "error": "\"method\" must be lora.", "message": "\"epochs\": 3",
           "result": {"warnings": ["\"threshold\": 0.5 left nothing"], "notices": None}}
    shown = job_in_dock_words(job)
    assert (shown["error"], shown["message"], shown["result"]["warnings"]) == (
        "Method must be lora.", "Epochs 3", ["Threshold 0.5 left nothing"])
    assert job["error"] == "\"method\" must be lora."
