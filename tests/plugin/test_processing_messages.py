"""What the Processing algorithms send the backend and tell the analyst from a finished job (its warnings and
notices, in the algorithm's words). The backend is one that answers as the real one does over HTTP (job_for_http's
words), at once."""

from __future__ import annotations

import contextlib
import threading

import pytest
from plugin_helpers import NAIP, RecordingFeedback
from qgis.core import QgsApplication

NOTICES = ["'a lake' has 6 hits, not \"top\" 10: the area searched holds only 6 windows.",
           "'a boat' has 2 hits, not \"top\" 10: the area's other windows each overlap a better one by more than "
           "\"max_overlap\": 0.5 (raise it, or search a larger area, for more)."]


class ReadyManager:
    """A backend manager whose backend is ready."""

    @contextlib.contextmanager
    def processing_job(self, what):
        yield threading.Event()

    def wait_ready(self, should_cancel=lambda: False):
        from qgis_farslip.client import Connection

        return Connection("http://127.0.0.1:1")


@pytest.fixture
def finished_jobs(farslip, qgis_processing, monkeypatch):
    """The FarSLIP provider with a ready backend whose jobs end done at once, with `result` (set by the test)."""
    from qgis_farslip import processing_provider
    from qgis_farslip.client import BackendClient

    answer: dict = {"result": {}, "requests": []}

    class Backend(BackendClient):
        def _request(self, method, path, body=None, timeout=None):
            if method == "POST":
                answer["requests"].append(body)
                return {"job_id": "job-1"}
            return {"id": "job-1", "state": "done", "progress": 1.0, "kind": "search", "result": answer["result"]}

    monkeypatch.setattr(processing_provider, "BackendClient", Backend)
    registry = QgsApplication.processingRegistry()
    provider = processing_provider.FarslipProvider(lambda: ReadyManager())
    if registry.providerById("farslip") is not None:
        pytest.skip("another test's FarSLIP provider is registered")
    registry.addProvider(provider)
    yield answer
    registry.removeProvider(provider)


def test_a_searchs_notices_are_said_in_the_algorithms_words(finished_jobs, tmp_path):
    import processing

    finished_jobs["result"] = {"outputs": {}, "notices": NOTICES, "warnings": []}
    feedback = RecordingFeedback()
    processing.run("farslip:search_by_sentences", {
        "INPUT": str(NAIP), "SENTENCES": "a lake\na boat", "TOP": 10, "OUTPUT": str(tmp_path / "hits.gpkg")},
        feedback=feedback)
    assert feedback.warnings == [
        "'a lake' has 6 hits, not the 10 asked for in Number of places per sentence: the area searched holds only "
        "6 windows.",
        "'a boat' has 2 hits, not the 10 asked for in Number of places per sentence: the area's other windows each "
        "overlap a better one by more than 50%; search a larger area for more."]


@pytest.mark.parametrize("algorithm", ["search_by_sentences", "segment_by_class_names"])
def test_an_output_without_extension_is_a_geopackage_as_qgis_writes_it(finished_jobs, tmp_path, algorithm):
    import processing

    finished_jobs["result"] = {"outputs": {}, "classes": []}
    results = processing.run(f"farslip:{algorithm}", {
        "INPUT": str(NAIP), "SENTENCES": "a lake", "CLASSES": "water", "OUTPUT": str(tmp_path / "places")})
    assert finished_jobs["requests"][0]["out"] == str(tmp_path / "places.gpkg")
    assert results["OUTPUT"] == f"{tmp_path / 'places.gpkg'}|layername=places"


class InfoFeedback(RecordingFeedback):
    def __init__(self):
        super().__init__()
        self.infos: list[str] = []

    def pushInfo(self, text):
        self.infos.append(text)
        super().pushInfo(text)


def test_a_fine_tuned_model_without_classes_segments_its_own_classes(finished_jobs, tmp_path, monkeypatch):
    """As the dock fills them in: Segment with a fine-tuned model folder and no classes was refused ("Give at
    least one class name")."""
    import json

    import processing

    monkeypatch.setenv("FARSLIP_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "models" / "lakes"
    folder.mkdir(parents=True)
    (folder / "farslip_model.json").write_text(json.dumps({"class_lines": ["water, lake", "forest"]}))
    finished_jobs["result"] = {"outputs": {}, "classes": []}
    for model in (str(folder), "lakes"):  # its folder, or its name in the models folder
        feedback = InfoFeedback()
        processing.run("farslip:segment_by_class_names", {
            "INPUT": str(NAIP), "MODEL": model, "OUTPUT": str(tmp_path / "lakes.gpkg")}, feedback=feedback)
        assert finished_jobs["requests"][-1]["class_lines"] == ["water, lake", "forest"]
        assert f"Classes of the fine-tuned model {model}: 'water, lake'; 'forest'" in feedback.infos
    feedback = InfoFeedback()
    processing.run("farslip:segment_by_class_names", {
        "INPUT": str(NAIP), "MODEL": str(folder), "CLASSES": "water", "OUTPUT": str(tmp_path / "lakes.gpkg")},
        feedback=feedback)
    assert finished_jobs["requests"][-1]["class_lines"] == ["water"]
    assert feedback.warnings == ["This model was trained on the classes 'water, lake'; 'forest'; the classes given "
                                 "differ, so their results are less reliable."]
