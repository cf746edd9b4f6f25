"""A train job's message (GET /v1/jobs/ID) follows its training steps as the CLI's `train: n/N, loss L` lines do.
Before, it stayed "validating the base model on the held-out strip" while the steps counted (progress 3/8, 5/15),
until an epoch ended."""

from __future__ import annotations

import re

from training_data import make_synthetic

STEP = re.compile(r"^train: (\d+)/(\d+), loss \d+\.\d{4} \(epoch (\d+)/2\)$")


def test_the_message_of_a_train_job_follows_its_steps(backend, tiny_model, tmp_path):
    raster, labels, _ = make_synthetic(tmp_path, size=192)
    body = {"raster": str(raster), "labels": str(labels), "class_field": "cls", "out": str(tmp_path / "model"),
            "base_model": str(tiny_model), "method": "lora", "epochs": 2, "steps_per_epoch": 6, "batch_size": 2,
            "distill_boxes": 1, "regions_per_step": 4}
    response = backend.client.post("/v1/train", json=body)
    assert response.status_code == 202, response.text
    history: list[dict] = []
    job = backend.wait(response.json()["job_id"], timeout=300, history=history)
    assert job["state"] == "done", job
    stepping = [seen for seen in history if seen["state"] == "running" and 0 < (seen["tiles_done"] or 0)
                and seen["tiles_done"] < seen["tiles_total"]]
    assert stepping, "no snapshot was taken while the job trained"
    for seen in stepping:
        assert "validating the base model" not in seen["message"], seen
        step = STEP.match(seen["message"])
        if step:  # the message is said just before its step's progress: the same step, or the next one
            assert int(step[2]) == seen["tiles_total"] == 12 and int(step[1]) - seen["tiles_done"] in (0, 1), seen
            assert int(step[3]) == (int(step[1]) - 1) // 6 + 1, seen
        else:  # an epoch's end, said once its validation is done
            assert seen["message"].startswith("epoch 1/2: loss "), seen
    assert len({seen["message"] for seen in stepping if STEP.match(seen["message"])}) >= 2, [
        (seen["tiles_done"], seen["message"]) for seen in stepping]
