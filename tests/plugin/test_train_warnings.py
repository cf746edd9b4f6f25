"""The Train tab's log shows every warning of a finished training, each once, though polls miss some."""

from __future__ import annotations

UNSEEN = "The class 'sand' has no pixels in the validation strip; its validation IoU is not measured."
SEEN = "2 polygons of labels.gpkg lie outside the raster and are left out."


def test_every_warning_of_the_training_is_in_the_log_once(bare_dock, tmp_path, monkeypatch):
    tab = bare_dock.train_tab
    monkeypatch.setattr(bare_dock, "refresh_backend_lists", lambda: None)  # no backend to ask here
    # The backend sends each warning as the job's message: the poll saw only the second, the first was replaced.
    tab._job_updated({"state": "running", "message": f"Warning: {SEEN}"})
    tab._job_updated({"state": "running", "message": "epoch 1/1: loss 0.6931, validation mIoU 12.0 %"})
    model_dir = str(tmp_path / "my-model")
    tab._job_finished("done", {"state": "done", "request": {"out": model_dir},
                               "result": {"outputs": {"model_dir": model_dir}, "warnings": [UNSEEN, SEEN]}}, "")
    log = bare_dock.form.trainLog.toPlainText()
    assert log.count(UNSEEN) == 1, log
    assert log.count(SEEN) == 1, log
    assert f"Warning: {UNSEEN}" in log
