"""/v1/index and /v1/search on a real backend process: jobs with progress and cancel, hits on disk, 4xx."""

from __future__ import annotations

import pyogrio
import pytest
from rasterio.crs import CRS


@pytest.fixture
def search_body(tiny_model, out_dir, naip, small_bbox):
    def body(**changes) -> dict:
        request = {"raster": str(naip), "sentences": ["a lake next to a road", "cropland"], "bbox": small_bbox,
                   "model": str(tiny_model), "top": 3, "out": str(out_dir / "hits.gpkg")}
        request.update(changes)
        return request

    return body


def submit(backend, path: str, body: dict) -> str:
    response = backend.client.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def test_index_then_search_reuses_the_index_and_writes_ranked_hits(backend, search_body, naip, tiny_model, out_dir,
                                                                   small_bbox):
    history: list[dict] = []
    index_job = backend.wait(submit(backend, "/v1/index", {"raster": str(naip), "bbox": small_bbox,
                                                           "model": str(tiny_model)}), history=history)
    assert index_job["state"] == "done", index_job
    assert index_job["kind"] == "index"
    built = index_job["result"]["index"]
    assert built["computed"] > 0 and built["computed"] == index_job["tiles_total"]
    assert history[-1]["progress"] == 1.0

    job = backend.wait(submit(backend, "/v1/search", search_body()))
    assert job["state"] == "done", job
    result = job["result"]
    assert result["index"]["computed"] == 0 and result["index"]["reused"] >= built["computed"]
    hits = result["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 1, 2, 3]
    assert {h["query"] for h in hits} == {"a lake next to a road", "cropland"}
    meta, _fids, _geometry, fields = pyogrio.raw.read(result["outputs"]["vector"])
    assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(26914)
    assert list(fields[0]) == [h["rank"] for h in hits]
    assert meta["fields"].tolist() == ["rank", "score", "scale_m", "query", "model", "run_id"]


def test_bad_search_requests_get_a_sentence_and_no_job(backend, search_body, out_dir):
    cases = [
        (search_body(sentences=[""]), "empty"),
        (search_body(sentences=[]), "empty"),
        (search_body(raster="relative.tif"), "absolute"),
        (search_body(bbox=[0, 0, 1, 1]), "does not overlap"),
        (search_body(keywords=["a; b"]), "once per sentence"),
        (search_body(raster=str((out_dir / "missing.tif").resolve())), "does not exist"),
        # as the class lines refuse them (a NUL was searched for; like_crs without like ignored)
        (search_body(sentences=["a\x00lake"]), "The search sentence 'a\\x00lake' contains the control character"),
        (search_body(sentences=["a lake", "\u200b"]), "The search sentence '\\u200b' holds only invisible characters"),
        (search_body(keywords=["lake; \ufeff", "field"]),
         "The keyword '\\ufeff' of \"keywords\": \"lake; \\ufeff\" holds"),
        (search_body(like_crs="EPSG:4326"), '"like_crs": "EPSG:4326" says which CRS the "like" point is in, and '
                                            'no "like" was given; add "like": [X, Y], or leave "like_crs" out.'),
    ]
    before = len(backend.client.get("/v1/jobs").json()["jobs"])
    for body, words in cases:
        response = backend.client.post("/v1/search", json=body)
        assert response.status_code in (400, 422), (body, response.text)
        assert words in response.json()["detail"], response.text
    assert len(backend.client.get("/v1/jobs").json()["jobs"]) == before
    assert list(out_dir.iterdir()) == []


def test_index_and_search_of_an_all_nodata_raster_say_there_is_nothing_to_index(backend, search_body, naip,
                                                                                 tiny_model):
    """/v1/index said "there is nothing to segment" (the raster check's words), where `farslip index` and
    `farslip search` say what they do."""
    raster = str(naip.parent / "all-nodata.tif")
    for path, body in (("/v1/index", {"raster": raster, "model": str(tiny_model)}),
                       ("/v1/search", search_body(raster=raster, bbox=None))):
        response = backend.client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["detail"] == (f"Every pixel of {raster} is nodata or masked: there is nothing to index "
                                             "or search. Check the raster's nodata value and alpha band.")


def test_a_cancelled_search_writes_nothing(backend, search_body, tmp_path):
    # A fresh 2000 x 2000 px raster: hundreds of windows to embed, so the cancel arrives mid-index.
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    raster = tmp_path / "big.tif"
    data = np.random.default_rng(1).integers(0, 255, (3, 2000, 2000), dtype=np.uint8)
    with rasterio.open(raster, "w", driver="GTiff", width=2000, height=2000, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 1, 1), tiled=True) as dst:
        dst.write(data)
    out = tmp_path / "out" / "hits.gpkg"
    job_id = submit(backend, "/v1/search", search_body(raster=str(raster), bbox=None))
    backend.wait(job_id, until=lambda job: job["tiles_done"] > 0 or job["state"] not in ("queued", "running"))
    assert backend.client.delete(f"/v1/jobs/{job_id}").status_code == 200
    job = backend.wait(job_id)
    assert job["state"] == "cancelled", job
    assert not out.exists() and not list(out.parent.glob(".*"))


def test_band_zero_is_refused_by_index_and_search_as_segment_refuses_it(backend, search_body, naip, tiny_model):
    """Bands count from 1: segment's request refused band 0 as a field (422); index and search took it to the
    raster check, a 400 in other words."""
    answers = {}
    for path, body in [("/v1/segment", {"raster": str(naip), "class_lines": ["water"], "model": str(tiny_model),
                                        "out": search_body()["out"].replace("hits", "seg"), "bands": [0, 1, 2]}),
                       ("/v1/index", {"raster": str(naip), "model": str(tiny_model), "bands": [0, 1, 2]}),
                       ("/v1/search", search_body(bands=[0, 1, 2]))]:
        response = backend.client.post(path, json=body)
        answers[path] = (response.status_code, response.json()["detail"])
    assert {status for status, _ in answers.values()} == {422}, answers
    assert all("bands" in detail and "greater than or equal to 1" in detail for _, detail in answers.values()), answers
