"""The sentence of a training the backend died in offers only what the backend then accepts. Before, it said
'train again with "resume": true and this "out" to go on from it, or without to start over', and a train request
"without" was refused: a kept checkpoint is only discarded with "overwrite": true."""

from __future__ import annotations

import json

import pytest

from backend.engine.errors import InputError
from backend.service.http_words import for_http
from backend.service.jobs.store import JobStore
from training.model_folder import CHECKPOINT_DIR, check_out_folder, partial_dir


def test_each_way_on_the_sentence_offers_is_accepted(tmp_path):
    out = tmp_path / "my-model"
    work = partial_dir(out)
    (work / CHECKPOINT_DIR).mkdir(parents=True)
    (work / CHECKPOINT_DIR / "state.pt").write_bytes(b"state")
    (work / "owner.json").write_text(json.dumps({"pid": 2**22 + 12345}))  # the backend that died
    store = JobStore(tmp_path / "jobs.sqlite")
    job = {"id": "0123456789abcdef", "kind": "train", "state": "running", "progress": 0.5, "tiles_done": 3,
           "tiles_total": 6, "eta_s": None, "message": "", "created": "2026-12-06T00:00:00Z",
           "started": "2026-12-06T00:00:01Z", "finished": None, "request": {"out": str(out)}, "result": None,
           "error": None}
    store.insert(job, [str(out)])
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")
    [interrupted] = reopened.mark_interrupted()
    reopened.close()
    served = for_http(interrupted["message"], "train")  # as GET /v1/jobs/ID gives it
    assert served == (
        f'The backend stopped while this job was running; {out} was not written, but its last checkpoint is kept in '
        f'{work}: train again with "resume": true and this "out" to go on from it, or start over with '
        '"overwrite": true (which discards it).'), served
    # What it offers, as the request's check of "out" takes it ...
    check_out_folder(out, overwrite=False, resume=True, inputs={})
    check_out_folder(out, overwrite=True, resume=False, inputs={})
    # ... and what it no longer offers: a plain run is refused while the checkpoint is kept.
    with pytest.raises(InputError, match="start over with --overwrite"):
        check_out_folder(out, overwrite=False, resume=False, inputs={})
