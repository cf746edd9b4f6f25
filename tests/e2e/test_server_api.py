"""`farslip serve`: authentication, OpenAPI page, and refusal of malformed requests (real uvicorn process)."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest

ENDPOINTS = [
    ("GET", "/v1/health", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/presets", None),
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef", None),
    ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef", None),
    ("POST", "/v1/segment", {"raster": "/x.tif", "class_lines": ["water"], "out": "/tmp/x.gpkg"}),
    ("POST", "/v1/train", {"raster": "/x.tif", "labels": "/l.gpkg", "class_field": "c", "out": "/tmp/m"}),
    ("POST", "/v1/models/download", {"model": "clip-vit-b-16"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "{token}", "Basic {token}",
                                           "Bearer {token}x", "Bearer", "Bearer{token}", "Bearer x{token}"])
def test_every_v1_endpoint_refuses_a_missing_or_wrong_token(backend, method, path, body, authorization):
    headers = {"Authorization": authorization.format(token=backend.token)} if authorization else {}
    response = httpx.request(method, backend.url + path, json=body, headers=headers)
    assert response.status_code == 401
    assert "token" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/v1/health", "/v1/models", "/v1/presets", "/v1/jobs"])
def test_every_v1_endpoint_answers_the_right_token(backend, path):
    assert backend.client.get(path).status_code == 200


@pytest.mark.parametrize("authorization", ["bearer {token}", "BEARER {token}", "Bearer  {token}"])
def test_the_bearer_scheme_is_case_insensitive(backend, authorization):
    """RFC 7235: the scheme is case-insensitive and separated by one or more spaces."""
    headers = {"Authorization": authorization.format(token=backend.token)}
    assert httpx.get(backend.url + "/v1/health", headers=headers).status_code == 200


def test_health_reports_version_device_and_loaded_model(backend):
    health = backend.client.get("/v1/health").json()
    assert health["status"] == "ok"
    assert health["version"] == backend.info["version"]
    assert health["device"]["type"] == "cpu"
    # DESIGN's "free memory" on the CPU too: the system's available memory, what a job can still take.
    import psutil

    assert 0 < health["device"]["free_memory_mb"] <= psutil.virtual_memory().total // 2**20
    assert "loaded_model" in health


def test_models_and_presets_follow_the_contract(backend):
    models = backend.client.get("/v1/models").json()
    assert models["default"] in [m["name"] for m in models["models"]]
    for entry in models["models"]:
        assert {"name", "arch", "present", "loaded", "kind"} <= set(entry)
    presets = backend.client.get("/v1/presets").json()["presets"]
    assert presets and all(isinstance(lines, list) and lines for lines in presets.values())


def test_connection_file_is_private_and_complete(backend):
    mode = stat.S_IMODE(os.stat(backend.connection_file).st_mode)
    assert mode == 0o600
    assert set(backend.info) == {"url", "port", "token", "pid", "version"}
    assert backend.info["url"] == f"http://127.0.0.1:{backend.info['port']}"
    assert backend.info["pid"] == backend.process.pid
    assert len(backend.token) >= 32


def test_docs_show_the_openapi_page_without_a_token(backend):
    assert backend.client.get("/docs", headers={"Authorization": ""}).status_code == 200
    schema = httpx.get(backend.url + "/openapi.json").json()
    assert "/v1/segment" in schema["paths"]
    assert "SegmentRequest" in schema["components"]["schemas"]


def _malformed_requests(valid: dict) -> list[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments): 200 requests that must all be refused with a 4xx."""
    cases: list[tuple[str, str, dict]] = []
    raw_bodies = [b"", b"{", b"}", b"{bad json", b'{"raster": }', b"[", b"null", b"true", b"1", b'"text"',
                  b"[]", b"[1, 2]", b'{"raster": "/a.tif",}', b"\xff\xfe\x00", b"NaN", b'{"a": NaN}',
                  b"<xml/>", b"raster=/a.tif&out=/b.gpkg", b'{"raster": "/a.tif"' * 10, b"\x00" * 64]
    for content in raw_bodies:
        cases.append(("POST", "/v1/segment", {"content": content, "headers": {"Content-Type": "application/json"}}))
        cases.append(("POST", "/v1/train", {"content": content, "headers": {"Content-Type": "application/json"}}))
    wrong_types = {
        "raster": [1, None, [], {}, True, ""], "class_lines": [True, 5, [1], [None], {"a": 1}, ["x" * 5000]],
        "bbox": [[1, 2, 3], [1, 2, 3, 4, 5], "1 2 3 4", ["a", "b", "c", "d"], {"xmin": 1}, [None] * 4],
        "bbox_crs": [5, ["EPSG:4326"]], "model": [5, ["a"]], "weights": [5], "bands": [[], [1, 2, 3, 4], "1,2,3",
                                                                                        [1.5, 2, 3], ["r"]],
        "threshold": ["high", None, [], "nan"], "attention": ["nope", 3, None], "batch_size": [0, -1, 10**9, "8", 1.5],
        "scale": [0, -2, "x"], "gsd_m": [0, -1, "5m"], "min_area": [-1, "big"], "simplify": [-0.5, "x"],
        "value_range": [[1], [1, 2, 3], "0-255"], "out": [None, 7, "", []], "class_raster": ["", 3],
        "prob_raster": ["", 3], "overwrite": ["maybe", [], {}], "preset": [3, ["urban"]],
        "format": [3, "kml", ["GPKG"]],
    }
    for name, values in wrong_types.items():
        for value in values:
            cases.append(("POST", "/v1/segment", {"json": {**valid, name: value}}))
    for name in ("raster", "out"):
        cases.append(("POST", "/v1/segment", {"json": {k: v for k, v in valid.items() if k != name}}))
    valid_train = {"raster": valid["raster"], "labels": "/nonexistent/labels.gpkg", "class_field": "cls",
                   "out": valid["out"]}
    for name, values in {"raster": [1, None, "", []], "labels": [2, None, ""], "class_field": [3, "", None],
                         "out": [None, 4, ""], "epochs": [0, -3, "ten", 1.5], "overwrite": ["maybe"],
                         "base_model": [5], "method": [6]}.items():
        for value in values:
            cases.append(("POST", "/v1/train", {"json": {**valid_train, name: value}}))
    for content in (b"[" * 100000 + b"]" * 100000, b'{"raster": 1e999999}', b'{"raster": "\\ud800"}',
                    b'{"raster": "/a.tif", "raster": 5}', "{\"raster\": \"\u00e9\u00e8\"}".encode("latin-1")):
        cases.append(("POST", "/v1/segment", {"content": content, "headers": {"Content-Type": "application/json"}}))
    cases += [
        ("POST", "/v1/segment", {"json": {}}),
        ("POST", "/v1/segment", {"json": {**valid, "unknown_option": 1}}),
        ("POST", "/v1/segment", {"json": {**valid, "class_lines": ["x"] * 1000}}),
        ("POST", "/v1/segment", {"json": {**valid, "raster": "x" * 5000}}),
        ("POST", "/v1/train", {"json": {}}),
        ("POST", "/v1/train", {"json": {"raster": 1, "labels": [], "class_field": "", "out": None}}),
        ("POST", "/v1/train", {"json": {"raster": "/a.tif", "labels": "/l.gpkg", "class_field": "c", "out": "/m",
                                        "epochs": 0}}),
    ]
    # Paths that escape, do not exist, or are not what they should be: the engine's checks refuse them.
    for raster in ("../../../../etc/passwd", "relative.tif", "/etc/passwd", "/nonexistent/a.tif", "/",
                   "/proc/self/environ", "~/../../etc/shadow", "/tmp/\x00.tif", "/dev/null", "C:\\x.tif"):
        cases.append(("POST", "/v1/segment", {"json": {**valid, "raster": raster}}))
    for out in ("../../etc/x.gpkg", "/nonexistent/dir/x.gpkg", "/tmp/x.exe", "/", "relative.gpkg", "/tmp/\x00.gpkg"):
        cases.append(("POST", "/v1/segment", {"json": {**valid, "out": out}}))
    # An out without an extension is written in its format (GeoPackage by default): one its format contradicts.
    cases.append(("POST", "/v1/segment", {"json": {**valid, "out": "/tmp/x.shp", "format": "GPKG"}}))
    cases.append(("POST", "/v1/segment", {"json": {**valid, "out": "/tmp/no-extension", "format": "kml"}}))
    for model in ("no-such-model", "/nonexistent/model.pt", "../model.pt"):
        cases.append(("POST", "/v1/segment", {"json": {**valid, "model": model}}))
    cases.append(("POST", "/v1/segment", {"json": {**valid, "preset": "../../etc/passwd"}}))
    cases.append(("POST", "/v1/segment", {"json": {**valid, "class_lines": [], "preset": None}}))
    cases.append(("POST", "/v1/segment", {"json": {**valid, "bbox": [0, 0, 1, 1]}}))
    cases.append(("POST", "/v1/segment", {"json": {**valid, "bbox_crs": "EPSG:999999"}}))
    # Bodies over the limit, with and without an honest Content-Length.
    huge = json.dumps({**valid, "class_lines": ["x" * 1000] * 2000}).encode()
    cases.append(("POST", "/v1/segment", {"content": huge, "headers": {"Content-Type": "application/json"}}))
    cases.append(("POST", "/v1/segment", {"content": b" " * (2 * 1024 * 1024)}))
    cases.append(("POST", "/v1/segment", {"content": iter([b"{" + b" " * 65536] * 40)}))  # chunked, no length
    cases.append(("POST", "/v1/segment", {"content": json.dumps(valid), "headers": {"Content-Type": "text/plain"}}))
    # Unknown paths, traversal, wrong methods, hostile job ids.
    for path in ("/v1", "/v1/", "/v1/nope", "/v1/jobs/../../etc/passwd", "/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "/v1/jobs/..%2f..%2fjobs.sqlite", "/v1/jobs/' OR 1=1 --", "/v1/jobs/0123456789abcdef0123456789abcdef",
                 "/v1/jobs/" + "a" * 5000, "/v1/jobs/%00", "/v2/health", "/v1/health/../../etc/passwd",
                 "/v1/segment/x", "/v1/jobs/1/2"):
        cases.append(("GET", path, {}))
        cases.append(("DELETE", path, {}))
    for method, path in (("PUT", "/v1/segment"), ("GET", "/v1/segment"), ("PATCH", "/v1/jobs"),
                         ("POST", "/v1/health"), ("DELETE", "/v1/jobs"), ("POST", "/v1/jobs"),
                         ("DELETE", "/v1/jobs/not-a-job"), ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef")):
        cases.append((method, path, {}))
    cases.append(("GET", "/v1/jobs?limit=0", {}))
    cases.append(("GET", "/v1/jobs?limit=abc", {}))
    cases.append(("GET", "/v1/jobs?limit=-5", {}))
    return cases


def test_two_hundred_malformed_requests_get_4xx_and_the_server_keeps_serving(backend, segment_body):
    valid = segment_body()
    cases = _malformed_requests(valid)
    assert len(cases) >= 200
    jobs_before = len(backend.client.get("/v1/jobs").json()["jobs"])
    failures = []
    for method, path, kwargs in cases:
        response = backend.client.request(method, path, **kwargs)
        if not 400 <= response.status_code < 500:
            failures.append((method, path, str(kwargs)[-200:], response.status_code, response.text[:200]))
        elif response.headers.get("content-type", "").startswith("application/json"):
            assert isinstance(response.json()["detail"], str)
    assert not failures, failures
    assert backend.client.get("/v1/health").status_code == 200
    assert len(backend.client.get("/v1/jobs").json()["jobs"]) == jobs_before
    job_id = backend.submit(valid)
    assert backend.wait(job_id)["state"] == "done"


def test_a_body_over_the_limit_is_refused_with_413(backend, segment_body):
    body = json.dumps({**segment_body(), "class_lines": ["y" * 1000] * 1100}).encode()
    response = backend.client.post("/v1/segment", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "KiB" in response.json()["detail"]


def test_validation_errors_are_sentences_naming_the_field(backend, segment_body):
    response = backend.client.post("/v1/segment", json=segment_body(threshold="high"))
    assert response.status_code == 422
    assert "threshold" in response.json()["detail"]


def test_an_unknown_job_is_404(backend):
    response = backend.client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert response.status_code == 404
    assert "no job" in response.json()["detail"]
