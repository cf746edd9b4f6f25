"""`farslip serve` refuses, before queueing, what a job would only fail on (or get wrong) later; and it names
unknown endpoints, unreadable bodies and foreign Host headers in one sentence (a real server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The CLI of this venv, and the checkout (the server's working folder), as the other e2e tests name them.
FARSLIP = Path(sys.executable).parent / "farslip"
REPO = Path(__file__).resolve().parents[2]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def data(naip):
    return naip.parent


@pytest.fixture
def evaluate_body(data, tiny_model):
    def body(**changes) -> dict:
        request = {"raster": str(data / "solaris_sample_geotiff.tif"),
                   "labels": str(data / "solaris_geotiff_labels.geojson"), "class_field": "building",
                   "model": str(tiny_model)}
        request.update(changes)
        return request

    return body


@pytest.fixture
def train_body(data, tiny_model, out_dir):
    def body(**changes) -> dict:
        request = {"raster": str(data / "solaris_sample_geotiff.tif"),
                   "labels": str(data / "solaris_geotiff_labels.geojson"), "class_field": "building",
                   "out": str(out_dir / "model"), "base_model": str(tiny_model), "epochs": 1}
        request.update(changes)
        return request

    return body


@pytest.fixture
def search_body(tiny_model, out_dir, naip, small_bbox):
    def body(**changes) -> dict:
        request = {"raster": str(naip), "sentences": ["a lake"], "bbox": small_bbox, "model": str(tiny_model),
                   "out": str(out_dir / "hits.gpkg")}
        request.update(changes)
        return request

    return body


def _refused(backend, path: str, body: dict, status: int = 400) -> str:
    response = backend.client.post(path, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail.endswith(".") and "\n" not in detail, detail
    return detail


def _job_count(backend) -> int:
    return len(backend.client.get("/v1/jobs").json()["jobs"])


# --------------------------------------------------------------------------- paths: control characters, length

@pytest.mark.parametrize("character", ["\n", "\t", "\r", "\x1b"])
def test_control_characters_in_any_path_are_refused_and_the_worker_keeps_serving(
        backend, segment_body, evaluate_body, train_body, search_body, out_dir, character):
    bad = str(out_dir / f"new{character}name.gpkg")
    before = _job_count(backend)
    for path, body in [("/v1/segment", segment_body(out=bad)), ("/v1/segment", segment_body(raster=bad)),
                       ("/v1/segment", segment_body(class_raster=bad.replace(".gpkg", ".tif"))),
                       ("/v1/evaluate", evaluate_body(out_json=bad.replace(".gpkg", ".json"))),
                       ("/v1/evaluate", evaluate_body(labels=bad)), ("/v1/train", train_body(out=bad)),
                       ("/v1/search", search_body(out=bad)), ("/v1/index", {"raster": bad})]:
        detail = _refused(backend, path, body)
        assert f"control character {character!r}" in detail, (path, detail)
    assert _job_count(backend) == before
    assert list(out_dir.iterdir()) == []
    job_id = backend.submit(segment_body())
    assert backend.wait(job_id)["state"] == "done"


@pytest.mark.parametrize("length", [200, 300])
def test_an_output_name_too_long_for_its_staged_copy_is_a_400(backend, segment_body, evaluate_body, search_body,
                                                               out_dir, length):
    long_name = str(out_dir / ("d" * length))
    for path, body in [("/v1/segment", segment_body(out=long_name + ".gpkg")),
                       ("/v1/evaluate", evaluate_body(out_json=long_name + ".json")),
                       ("/v1/search", search_body(out=long_name + ".gpkg"))]:
        assert "too long" in _refused(backend, path, body), path
    # The connection stays usable (a 500 used to drop the keep-alive connection).
    assert backend.client.get("/v1/health").status_code == 200


def test_an_over_long_folder_name_in_any_path_is_a_4xx_not_a_500(backend, segment_body, evaluate_body, train_body,
                                                                  search_body, out_dir):
    folder = str(out_dir / ("f" * 300))
    cases = [("/v1/segment", segment_body(raster=folder + "/x.tif")),
             ("/v1/segment", segment_body(out=folder + "/x.gpkg")),
             ("/v1/segment", segment_body(model=folder + "/m.safetensors")),
             ("/v1/evaluate", evaluate_body(raster=folder + "/x.tif")),
             ("/v1/evaluate", evaluate_body(labels=folder + "/x.gpkg")),
             ("/v1/evaluate", evaluate_body(out_json=folder + "/x.json")),
             ("/v1/train", train_body(out=folder + "/m")), ("/v1/train", train_body(labels=folder + "/l.gpkg")),
             ("/v1/search", search_body(out=folder + "/h.gpkg")), ("/v1/index", {"raster": folder + "/x.tif"})]
    for path, body in cases:
        response = backend.client.post(path, json=body)
        assert 400 <= response.status_code < 500, (path, body, response.text)


def test_an_output_path_with_no_name_is_a_sentence(backend, segment_body, evaluate_body, train_body, search_body):
    for path, body in [("/v1/segment", segment_body(out="/")), ("/v1/segment", segment_body(class_raster="/")),
                       ("/v1/evaluate", evaluate_body(out_json="/")), ("/v1/train", train_body(out="/")),
                       ("/v1/search", search_body(out="/"))]:
        assert "has no name to write to" in _refused(backend, path, body), path


# --------------------------------------------------------------------------- evaluate

def test_evaluate_never_writes_its_json_over_an_input_or_an_existing_file(backend, evaluate_body, data, out_dir):
    raster = out_dir / "in.tif"
    raster.write_bytes((data / "solaris_sample_geotiff.tif").read_bytes())
    before = _digest(raster)
    assert "would destroy the input" in _refused(backend, "/v1/evaluate", evaluate_body(
        raster=str(raster), out_json=str(raster), overwrite=True))
    assert _digest(raster) == before
    earlier = out_dir / "metrics.json"
    earlier.write_text("{}")
    assert "already exists" in _refused(backend, "/v1/evaluate", evaluate_body(out_json=str(earlier)))
    assert "is a folder" in _refused(backend, "/v1/evaluate", evaluate_body(out_json=str(out_dir), overwrite=True))
    assert "device" in _refused(backend, "/v1/evaluate", evaluate_body(out_json="/dev/null", overwrite=True))
    assert earlier.read_text() == "{}"


def test_evaluate_checks_the_model_the_labels_folder_and_the_class_field_at_submit(backend, evaluate_body, out_dir):
    before = _job_count(backend)
    assert "Unknown model" in _refused(backend, "/v1/evaluate", evaluate_body(model="nope"), 422)
    assert '"model" is empty' in _refused(backend, "/v1/evaluate", evaluate_body(model=" "), 422)
    assert "is a folder" in _refused(backend, "/v1/evaluate", evaluate_body(labels=str(out_dir)))
    detail = _refused(backend, "/v1/evaluate", evaluate_body(class_field="no_such_field"))
    assert "has no field 'no_such_field'" in detail
    assert _job_count(backend) == before


# --------------------------------------------------------------------------- train

@pytest.mark.parametrize("changes, status, words", [
    ({"lr": "abc"}, 422, "lr"), ({"lr": [1]}, 422, "lr"), ({"lr": 0}, 422, "lr"),
    ({"batch_size": "x"}, 400, "batch_size must be a whole number"),
    ({"augment": "yes"}, 400, "augment must be true or false"),
    ({"method": "nope"}, 400, '"method" must be one of'),
    ({"validation_fraction": 0.9}, 400, "validation fraction"),
    ({"class_field": "no_such_field"}, 400, "has no field 'no_such_field'"),
])
def test_train_values_are_checked_at_submit(backend, train_body, changes, status, words):
    before = _job_count(backend)
    assert words in _refused(backend, "/v1/train", train_body(**changes), status)
    assert _job_count(backend) == before


def test_train_labels_must_be_vector_data(backend, train_body, data, out_dir):
    assert "is a folder" in _refused(backend, "/v1/train", train_body(labels=str(out_dir)))
    detail = _refused(backend, "/v1/train", train_body(labels=str(data / "solaris_sample_geotiff.tif")))
    assert "cannot be read as a vector layer" in detail


# --------------------------------------------------------------------------- search

def test_search_checks_the_like_crs_and_point_at_submit(backend, search_body):
    before = _job_count(backend)
    detail = _refused(backend, "/v1/search", search_body(like=[487000, 5207000], like_crs="nope"))
    assert "like CRS 'nope'" in detail and "bbox" not in detail
    detail = _refused(backend, "/v1/search", search_body(like=[0, 0], like_crs="EPSG:26914"))
    assert "outside the raster" in detail
    assert _job_count(backend) == before


def test_a_crs_is_an_epsg_code_alone_or_crs84_and_never_a_vertical_one_in_every_crs_field(backend, segment_body,
                                                                                          search_body):
    """bbox_crs 26914 (a number) was a 422, "26914" and "CRS84" were 'not a CRS I know'; a vertical CRS gave
    'does not overlap'. Read as CRSs, boxes and points far from the raster are refused as outside it."""
    before = _job_count(backend)
    for crs in (26914, "26914", 26914.0):
        assert "does not overlap" in _refused(backend, "/v1/segment", segment_body(bbox=[0, 0, 1, 1], bbox_crs=crs))
        assert "outside the raster" in _refused(backend, "/v1/search", search_body(like=[0, 0], like_crs=crs))
    for crs in ("CRS84", "OGC:CRS84"):
        assert "does not overlap" in _refused(backend, "/v1/segment",
                                              segment_body(bbox=[10.0, 50.0, 10.1, 50.1], bbox_crs=crs))
    for crs, kind in (("EPSG:5703", "vertical"), (4978, "geocentric")):
        for path, body in (("/v1/segment", segment_body(bbox=[0, 0, 1, 1], bbox_crs=crs)),
                           ("/v1/search", search_body(like=[0, 0], like_crs=crs)),
                           ("/v1/search", search_body(bbox=[0, 0, 1, 1], bbox_crs=crs))):
            detail = _refused(backend, path, body)
            assert f"is a {kind} CRS" in detail and "not a horizontal 2-D CRS" in detail, (path, detail)
    _refused(backend, "/v1/segment", segment_body(bbox=[0, 0, 1, 1], bbox_crs=True), status=422)
    assert _job_count(backend) == before


def test_segment_takes_an_output_path_and_a_format_as_design_says(backend, segment_body, out_dir):
    """An out without an extension gets its format's (GeoPackage without one); an out the format contradicts is a
    400 in the request's words; class_lines may be the plugin's box text, a class per line."""
    before = _job_count(backend)
    detail = _refused(backend, "/v1/segment", segment_body(out=str(out_dir / "r.shp"), format="GeoJSON"))
    assert "ends in '.shp', but \"format\" GeoJSON writes GeoJSON (.geojson)" in detail, detail
    assert 'Unknown "format": "kml"' in _refused(backend, "/v1/segment", segment_body(format="kml"))
    assert _job_count(backend) == before
    job = backend.wait(backend.submit(segment_body(out=str(out_dir / "hits"), format="geojson",
                                                   class_lines="water, lake\ncropland\n\nroad\n")))
    assert job["state"] == "done", job
    assert job["result"]["outputs"]["vector"] == str(out_dir / "hits.geojson")
    assert [entry["class"] for entry in job["result"]["classes"]] == ["water", "cropland", "road"]
    assert (out_dir / "hits.geojson").is_file() and not (out_dir / "hits").exists()
    job = backend.wait(backend.submit(segment_body(out=str(out_dir / "plain"))))
    assert job["state"] == "done" and job["result"]["outputs"]["vector"] == str(out_dir / "plain.gpkg"), job


# --------------------------------------------------------------------------- segment class lines

def test_a_synonym_in_two_class_lines_and_a_long_shapefile_class_name_are_refused_at_submit(
        backend, segment_body, out_dir):
    before = _job_count(backend)
    assert "'lake' is a name of two classes" in _refused(
        backend, "/v1/segment", segment_body(class_lines=["water, lake", "lake"]))
    detail = _refused(backend, "/v1/segment", segment_body(class_lines=["x" * 300, "road"],
                                                           out=str(out_dir / "r.shp")))
    assert "shapefile" in detail and "254" in detail
    assert _job_count(backend) == before


@pytest.fixture
def class_files(tmp_path):
    """Class files no run can use, by what is wrong with them."""
    files = {"huge": "w" * (3 * 2**20), "long line": "water\n" + "w" * 5000 + "\n",
             "251 classes": "".join(f"class {i}\n" for i in range(251)), "invisible line": "water\n\u200b\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    return {name: tmp_path / f"{name}.txt" for name in files}


def test_a_class_file_is_bounded_and_checked_as_class_lines_are_before_the_job_is_queued(
        backend, segment_body, class_files, out_dir):
    """A 50 MB one-line class file was queued (202), its job sat at "Segmenting." while the server's memory grew,
    and cancel and SIGTERM could not stop it; a 5000-character line in a class file passed where the same line in
    class_lines is refused. Each is refused at submit, naming the file (and the line)."""
    before = _job_count(backend)
    refusals = {"huge": f"The class file {class_files['huge']} is larger than 1 MiB",
                "long line": f"(line 2 of the class file {class_files['long line']}) is 5000 characters long; give "
                             "at most 1000 characters.",
                "251 classes": f"The class file {class_files['251 classes']} holds 251 classes; one run tells at "
                               "most 250 apart",
                "invisible line": f"The class line '\\u200b' (line 2 of the class file "
                                  f"{class_files['invisible line']}) holds only invisible characters (U+200B ZERO "
                                  "WIDTH SPACE)"}
    for name, words in refusals.items():
        detail = _refused(backend, "/v1/segment", segment_body(class_lines=[], classes_file=str(class_files[name])))
        assert words in detail, (name, detail)
    assert _job_count(backend) == before and list(out_dir.iterdir()) == []


@pytest.mark.parametrize("line, character", [("\u200b", "U+200B ZERO WIDTH SPACE"),
                                             ("\u200e\ufeff", "U+200E LEFT-TO-RIGHT MARK"),
                                             ("\u00ad", "U+00AD SOFT HYPHEN"), ("road, \u2060", "U+2060 WORD JOINER")])
def test_a_class_line_of_invisible_characters_is_refused_at_submit(backend, segment_body, line, character):
    """It became a class no one could see in the legend or the output's class field."""
    before = _job_count(backend)
    detail = _refused(backend, "/v1/segment", segment_body(class_lines=["water", line]))
    assert f"holds only invisible characters ({character}); type visible text, or leave it out." in detail
    assert _job_count(backend) == before


def test_an_option_without_the_option_it_works_with_is_refused_at_submit(backend, segment_body, out_dir):
    """sam_model without refine "sam", cache_mb without cache_features and bbox_crs without bbox did nothing:
    the job ran as if they were not there. Refused with the command line's sentence, and no job is queued."""
    before = _job_count(backend)
    detail = _refused(backend, "/v1/segment", segment_body(sam_model="sam-vit-b"))
    assert detail == ('"sam_model" applies only with "refine": "sam" (this run has "refine": "none"); add '
                      '"refine": "sam", or leave "sam_model" out.')
    assert '(this run has "refine": "edges")' in _refused(backend, "/v1/segment",
                                                       segment_body(refine="edges", sam_model="sam-vit-b"))
    assert _refused(backend, "/v1/segment", segment_body(cache_mb=64)) == (
        '"cache_mb" applies only with "cache_features": true; add "cache_features": true, or leave "cache_mb" out.')
    assert 'no "bbox" was given' in _refused(backend, "/v1/segment", segment_body(bbox=None, bbox_crs="EPSG:4326"))
    assert _job_count(backend) == before and list(out_dir.iterdir()) == []


def test_a_raster_in_gdals_subdataset_or_archive_syntax_is_run_and_a_relative_one_refused(
        backend, segment_body, naip, out_dir, tmp_path):
    """NETCDF:"/abs/a.nc":var was refused as a relative path, and /vsizip//abs/a.zip/x.tif lost the slash that
    makes its archive absolute on the way to GDAL. Both run as typed; a subdataset of a relative file is refused
    (the backend has no working folder it could be relative to)."""
    import zipfile

    import rasterio.shutil

    nc = tmp_path / "naip.nc"
    rasterio.shutil.copy(naip, nc, driver="netCDF", FORMAT="NC4")
    archive = tmp_path / "naip.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(naip, "naip.tif")
    for i, name in enumerate([f'NETCDF:"{nc}":Band2', f"/vsizip/{archive}/naip.tif"]):
        out = out_dir / f"r{i}.gpkg"
        job = backend.wait(backend.submit(segment_body(raster=name, out=str(out))))
        assert job["state"] == "done", (name, job)
        assert json.loads(out.with_suffix(".report.json").read_text())["raster"] == name
    detail = _refused(backend, "/v1/segment", segment_body(raster='NETCDF:"naip.nc":Band2'))
    assert detail.startswith("The raster 'NETCDF:\"naip.nc\":Band2' names the file 'naip.nc', which is relative")


# --------------------------------------------------------------------------- HTTP

@pytest.mark.parametrize("host", ["127.0.0.1.evil.example", "127.attacker.com:8080", "127.0.0.1:80:81",
                                  "localhost.evil.example", "[::1].evil.example", "127.0.0.1@evil.example"])
def test_host_headers_that_only_start_like_loopback_are_refused(backend, host):
    for path in ("/v1/health", "/openapi.json"):
        response = backend.client.get(path, headers={"Host": host})
        assert response.status_code == 421 and "Host header" in response.json()["detail"], (host, path)


@pytest.mark.parametrize("host", ["[::1]", "[::1]:{port}", "127.0.0.2:{port}", "LOCALHOST:{port}"])
def test_loopback_literals_in_any_form_are_served(backend, host):
    response = backend.client.get("/v1/health", headers={"Host": host.format(port=backend.info["port"])})
    assert response.status_code == 200


@pytest.mark.parametrize("method, path", [("GET", "/v1/nonexistent"), ("GET", "/health"), ("GET", "/v1/jobs/"),
                                          ("POST", "/v1/nonexistent"), ("OPTIONS", "/v1/nonexistent"),
                                          ("DELETE", "/nothing/here")])
def test_an_unknown_path_is_a_404_naming_it(backend, method, path):
    response = backend.client.request(method, path)
    assert response.status_code == 404, response.text
    detail = response.json()["detail"]
    assert repr(path) in detail and "/v1/" in detail
    assert "allow" not in response.headers


def test_a_wrong_method_on_a_real_endpoint_is_still_a_405(backend):
    response = backend.client.get("/v1/segment")
    assert response.status_code == 405 and response.headers["allow"] == "OPTIONS, POST"


def test_a_body_not_sent_as_json_and_malformed_json_are_named(backend, segment_body):
    import json

    response = backend.client.post("/v1/segment", content=json.dumps(segment_body()),
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 422
    assert "send the body as JSON with Content-Type: application/json" in response.json()["detail"]
    response = backend.client.post("/v1/segment", content=b'{"raster": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("The request body is not valid JSON (at character 11)")


@pytest.mark.parametrize("body, words", [
    (b"[" * 5000 + b"]" * 5000, "The request body nests lists or objects too deeply; send one JSON object"),
    (b'{"raster": "\xff\xfe"}', "The request body is not UTF-8 text (byte 0xff at position 12); send the JSON as "
                                "UTF-8."),
    (b'{"top": ' + b"9" * 5000 + b"}", "The request body holds a number with too many digits"),
], ids=["deeply nested", "not UTF-8", "5000-digit number"])
def test_a_body_the_json_reader_cannot_read_is_named_in_a_sentence(backend, body, words):
    """These got FastAPI's own "There was an error parsing the body" instead of a sentence saying what is wrong."""
    for path in ("/v1/search", "/v1/segment"):
        response = backend.client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith(words), response.text


def test_an_unknown_job_id_is_quoted_cut_as_an_unknown_path_is(backend):
    """A 404 for a 5000-character job id echoed all of it (5 KB)."""
    job_id = "x" * 5000
    for method in ("GET", "DELETE"):
        response = backend.client.request(method, f"/v1/jobs/{job_id}")
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == (f"There is no job {'x' * 200!r}...; GET /v1/jobs lists the jobs.")
    short = backend.client.get("/v1/jobs/nope")
    assert short.json()["detail"] == "There is no job 'nope'; GET /v1/jobs lists the jobs."


# --------------------------------------------------------------------------- connection file

def test_a_connection_file_without_an_extension_lands_under_exactly_that_name(env, tmp_path):
    folder = tmp_path / "conn"
    folder.mkdir()
    connection = folder / "connnoext"
    process = subprocess.Popen([str(FARSLIP), "serve", "--port", "0", "--state-dir", str(tmp_path / "state"),
                                "--connection-file", str(connection)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while not connection.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # (a hidden staged copy may exist for a moment while the server rewrites the file)
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["connnoext"]
        import json

        port = json.loads(connection.read_text())["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert list(folder.iterdir()) == []


# --------------------------------------------------------------------------- what a job would only fail on later

@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_a_named_pipe_or_device_given_as_an_input_file_is_refused_at_submit(backend, segment_body, train_body,
                                                                          fifo):
    before = _job_count(backend)
    detail = _refused(backend, "/v1/segment", segment_body(refine="sam", sam_model=str(fifo)))
    assert detail.startswith(f"The SAM model {fifo} is a named pipe (FIFO), not a file")
    detail = _refused(backend, "/v1/segment", segment_body(quality_calibration="/dev/zero"))
    assert detail.startswith("The quality calibration /dev/zero is a device, not a file")
    detail = _refused(backend, "/v1/segment", segment_body(quality_calibration=str(fifo)))
    assert detail.startswith(f"The quality calibration {fifo} is a named pipe (FIFO), not a file")
    detail = _refused(backend, "/v1/train", train_body(aoi=str(fifo)))
    assert f"{fifo} is a named pipe (FIFO), not a file" in detail
    assert _job_count(backend) == before


@pytest.mark.parametrize("changes, words", [
    ({"scale": 1e9}, '"scale" must be between 0.05 and 8; got 1000000000.0.'),
    ({"scale": 2, "gsd_m": 1}, 'Give either "scale" or "gsd_m", not both.'),
    ({"gsd_m": 1e-6}, '"gsd_m": 1e-06 would resample this raster\'s 0.5 m pixels'),
    ({"bands": [1, 2, 9]}, "9"),
])
def test_train_resolution_and_bands_are_checked_at_submit(backend, train_body, changes, words):
    before = _job_count(backend)
    assert words in _refused(backend, "/v1/train", train_body(**changes))
    assert _job_count(backend) == before


def test_a_model_fine_tuned_at_another_resolution_is_refused_at_submit_naming_it(backend, segment_body, tmp_path,
                                                                               tiny_model):
    model = tmp_path / "fine-0.5m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(tiny_model.read_bytes())
    (model / "farslip_model.json").write_text(json.dumps({
        "format": "farslip-finetuned/1", "name": "fine-0.5m", "class_lines": ["building", "ground"],
        "processing": {"scale": 1.0, "bands": [1, 2, 3], "bands_chosen": None, "gsd_m": 0.5}}))
    before = _job_count(backend)
    detail = _refused(backend, "/v1/segment", segment_body(model=str(model)))  # 5 m pixels, resampled by 10
    assert detail.startswith(f"The model {model} was fine-tuned on 0.5 m pixels, so it segments at that "
                             "resolution unless the request gives scale or gsd_m")
    assert '"gsd_m": 0.5 would resample this raster\'s 5 m pixels by 10' in detail
    assert _job_count(backend) == before


@pytest.mark.parametrize("path, field", [("/v1/search", "batch_size"), ("/v1/search", "top"),
                                         ("/v1/index", "batch_size"), ("/v1/segment", "batch_size"),
                                         ("/v1/train", "epochs")])
def test_a_whole_number_written_as_a_float_is_that_number_on_every_endpoint(backend, segment_body, train_body,
                                                                          search_body, out_dir, path, field):
    bodies = {"/v1/search": search_body, "/v1/index": lambda **c: {**search_body(**c), "out": None},
              "/v1/segment": segment_body, "/v1/train": lambda **c: train_body(background="other", **c)}

    def body(value):
        request = {key: value for key, value in bodies[path](**{field: value}).items() if value is not None}
        if path == "/v1/index":
            request = {key: request[key] for key in ("raster", "bbox", "model", field)}
        return request

    for bad in (8.5, "8", True):
        assert _refused(backend, path, body(bad), 422).startswith(f"The request is not valid: {field}:")
    accepted = backend.client.post(path, json=body(8.0))
    assert accepted.status_code == 202, accepted.text
    job = backend.job(accepted.json()["job_id"])
    assert job["request"][field] == 8 and isinstance(job["request"][field], int)
    backend.client.delete(f"/v1/jobs/{job['id']}")
    backend.wait(job["id"], timeout=300)
    typo = backend.client.post(path, json={**body(8.0), "batch_sise": 8})  # unknown fields stay refused
    assert typo.status_code in (400, 422) and "batch_sise" in typo.json()["detail"], typo.text


def test_labels_of_one_class_are_refused_before_queueing(backend, train_body, evaluate_body, tmp_path):
    """The solaris labels hold one class ('yes'): without a background class neither training nor scoring can
    tell two classes apart. Refused with a 400 naming it, no job queued; with the background, queued."""
    count = _job_count(backend)
    for path, body in (("/v1/train", train_body()), ("/v1/evaluate", evaluate_body()),
                       ("/v1/train", train_body(background="yes")),
                       ("/v1/train", train_body(class_names={"yes": "building"}, background="Building"))):
        detail = _refused(backend, path, body)
        assert "hold only one class" in detail, detail
    assert _job_count(backend) == count
    response = backend.client.post("/v1/evaluate", json=evaluate_body(background="other"))
    assert response.status_code == 202, response.text
    assert backend.wait(response.json()["job_id"], timeout=300)["state"] == "done"


def test_a_sam_model_is_a_registry_name_or_an_absolute_path_that_exists(backend, segment_body, tmp_path):
    """A relative SAM path would be looked up in the server's working folder; a path that does not exist is
    said to be missing, not an unknown registry name."""
    before = _job_count(backend)
    for relative in ("tiny.safetensors", "models/sam"):
        detail = _refused(backend, "/v1/segment", segment_body(refine="sam", sam_model=relative))
        assert detail.startswith(f"The SAM model path {relative!r} is relative;"), detail
    missing = tmp_path / "no-sam" / "sam.safetensors"
    detail = _refused(backend, "/v1/segment", segment_body(refine="sam", sam_model=str(missing)), 422)
    assert detail == f"SAM model file or folder {missing} does not exist."
    assert _job_count(backend) == before


def test_train_refuses_an_unknown_base_model_a_resume_of_nothing_and_a_rename_of_an_absent_value_at_submit(
        backend, train_body, out_dir):
    before = _job_count(backend)
    assert "Unknown model 'no-such-model'" in _refused(backend, "/v1/train", train_body(base_model="no-such-model"),
                                                       422)
    assert _refused(backend, "/v1/train", train_body(base_model=""), 422).startswith('"base_model" is empty')
    missing = out_dir / "missing.pt"
    assert _refused(backend, "/v1/train", train_body(base_model="clip-vit-b-16", weights=str(missing)), 422) == (
        f"The weights file {missing} does not exist.")
    detail = _refused(backend, "/v1/train", train_body(resume=True))
    assert detail.startswith(f"There is no training to resume for {out_dir / 'model'}") and detail.endswith(
        'Run without "resume": true to start training.')
    detail = _refused(backend, "/v1/train", train_body(class_names={"zzz": "x"}))
    assert detail.startswith("\"class_names\" renames the label value 'zzz', which no feature of "), detail
    assert _job_count(backend) == before and list(out_dir.iterdir()) == []


def test_the_segment_requests_schema_describes_its_fields_without_command_line_flags(backend):
    fields = backend.client.get("/openapi.json").json()["components"]["schemas"]["SegmentRequest"]["properties"]
    described = {name: field.get("description", "") for name, field in fields.items()}
    flags = [name for name, text in described.items()  # a command to run (farslip segment --workers) aside
             if re.search(r"(?<![\w/])--[a-z]", re.sub(r"farslip [a-z]+( --[a-z-]+)*", "", text))]
    assert not flags, described
    assert '"refine": "sam"' in described["sam_model"]
