"""Class names in any script through the HTTP API: request, job JSON, output file and report agree."""

from __future__ import annotations

import json
from pathlib import Path

import pyogrio.raw

NAMES = ["edifício, prédio", "建筑物", "здание"]


def test_unicode_class_names_round_trip_through_the_server(backend, segment_body, out_dir):
    out = out_dir / "건물_результат.gpkg"
    body = segment_body(class_lines=NAMES, out=str(out))
    job = backend.wait(backend.submit(body))
    assert job["state"] == "done", job
    names = [line.split(",")[0] for line in NAMES]
    assert [c["class"] for c in job["result"]["classes"]] == names
    assert job["result"]["outputs"]["vector"] == str(out)
    meta, _, _, columns = pyogrio.raw.read(out)
    assert set(columns[list(meta["fields"]).index("class")]) <= set(names)
    report = json.loads(Path(job["result"]["outputs"]["report"]).read_text(encoding="utf-8"))
    assert [c["class"] for c in report["classes"]] == names
    assert report["warnings"] and "English only" in report["warnings"][0]
    models = backend.client.get("/v1/models").json()["models"]
    multilingual = {m["name"]: m["multilingual"] for m in models}
    assert multilingual["rs-m-clip"] is True and multilingual["farslip2-vit-b-16"] is False
