"""A cancel that reaches a job in the moment it finishes: the backend has written the results (perhaps into a
GeoPackage that holds the user's other layers) and keeps them; the plugin deleted the whole output file."""

from __future__ import annotations

import sqlite3

import pytest
from plugin_helpers import users_roads_geopackage


class FinishingBackend:
    """A backend whose job is running at the first poll and done (its outputs written) when the cancel reaches
    it, or cancelled when `in_time`."""

    def __init__(self, out: str, in_time: bool = False, on_poll=lambda: None):
        self.out = out
        self.on_poll = on_poll  # the user's press of Cancel, while the job runs
        self.in_time = in_time
        self.cancelled = False
        self.polls = 0

    def submit(self, kind, request):
        return "job-1"

    def job(self, job_id):
        self.polls += 1
        self.on_poll()
        state = "running" if not self.cancelled else "cancelled" if self.in_time else "done"
        job = {"id": job_id, "state": state, "progress": 1.0 if state == "done" else 0.5}
        if state == "done":
            job["message"] = "Done in 1.0 s. The cancel came after the results were written."
            job["result"] = {"outputs": {"vector": self.out, "report": self.out + ".report.json"}}
        return job

    def cancel(self, job_id):
        self.cancelled = True
        return self.job(job_id)


def users_geopackage(path: str) -> None:
    """A GeoPackage with the user's layer 'roads' (the job adds its own layer to it)."""
    users_roads_geopackage(path, "EPSG:26914", "LINESTRING(486000 5206000, 487000 5207000)")


def tables(path: str) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("SELECT table_name FROM gpkg_contents"))


def test_a_cancel_after_the_job_finished_keeps_its_results_and_the_users_layers(farslip, tmp_path):
    from qgis_farslip.jobs import run_job

    out = str(tmp_path / "project.gpkg")
    users_geopackage(out)
    updates = []
    job = run_job(FinishingBackend(out), "segment", {"out": out}, updates.append, lambda: True)
    assert job["state"] == "done" and job["cancelled_too_late"]
    assert updates[-1] is job
    assert "roads" in tables(out)


def test_the_dock_reports_a_job_that_finished_as_it_was_cancelled_done(farslip, tmp_path):
    from qgis_farslip.client import Connection
    from qgis_farslip.jobs import JobTask

    out = str(tmp_path / "project.gpkg")
    users_geopackage(out)
    task = JobTask("segment", Connection("http://127.0.0.1:1", ""), "segment", {"out": out}, None)
    task.client = FinishingBackend(out, on_poll=task.cancel)
    ended = []
    task.succeeded.connect(lambda job: ended.append(("done", job)))
    task.cancelledJob.connect(lambda: ended.append(("cancelled", None)))
    task.finished(task.run())
    assert [state for state, _ in ended] == ["done"] and ended[0][1]["cancelled_too_late"]
    assert "roads" in tables(out)


def test_a_cancel_in_time_ends_cancelled_and_leaves_the_file_alone(farslip, tmp_path):
    from qgis_farslip.jobs import JobCancelled, run_job

    out = str(tmp_path / "project.gpkg")
    users_geopackage(out)
    with pytest.raises(JobCancelled):
        run_job(FinishingBackend(out, in_time=True), "segment", {"out": out}, lambda job: None, lambda: True)
    assert tables(out) == ["roads"]


def test_the_train_tab_says_the_cancel_came_too_late(bare_dock, tmp_path):
    """The dock's tabs load a job that finished as it was cancelled: the analyst pressed Cancel, so the log says
    why the model is there all the same."""
    from qgis_farslip.jobs import CANCEL_TOO_LATE

    tab = bare_dock.train_tab
    model = str(tmp_path / "my-model")
    tab._job_finished("done", {"state": "done", "cancelled_too_late": True, "request": {"out": model},
                               "result": {"outputs": {"model_dir": model}}}, "")
    said = tab.form.trainLog.toPlainText()
    assert CANCEL_TOO_LATE in said and "Saved the model my-model" in said
    tab.form.trainLog.clear()
    tab._job_finished("done", {"state": "done", "request": {"out": model}, "result": {"outputs": {"model_dir": model}}},
                      "")
    assert CANCEL_TOO_LATE not in tab.form.trainLog.toPlainText()
