"""`farslip evaluate --calibrate-quality`: the calibration, the --png and the --json report (which records the
calibration's figures) land together in one commit, the calibration first and the report last, or not at all.
Before, the report was written, then the calibration, then the report again: a failure at that last step left
the new calibration beside a report that did not mention it. The failures are real ones at the commit step
(os.replace failing in the output folder), and the folder is read back."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


class FailingRename:
    """os.replace failing once: on the first rename onto `name` in `folder` after `after` was renamed in there
    (None: the first rename onto `name`)."""

    def __init__(self, monkeypatch, folder: Path, name: str, after: str | None = None, code: int = errno.EACCES):
        self.folder, self.name, self.after, self.code = folder, name, after, code
        self.real, self.seen, self.failed = os.replace, after is None, False
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, src, dst, **kwargs):
        dst_path = Path(os.path.abspath(dst))
        if dst_path.parent == self.folder and not self.failed:
            if self.seen and dst_path.name == self.name:
                self.failed = True
                raise OSError(self.code, os.strerror(self.code), str(src), None, str(dst))
            if dst_path.name == self.after:
                self.seen = True
        return self.real(src, dst, **kwargs)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def evaluate(raster, labels, model, folder: Path, *extra):
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model", str(model),
                                 "--device", "cpu", "-q", "--calibrate-quality", "--quality-tile", "32",
                                 "--force-calibration", "--quality-out", str(folder / "q.json"),
                                 "--json", str(folder / "m.json"), "--png", str(folder / "m.png"),
                                 *map(str, extra)])
    return result.exit_code, result.output.strip().splitlines()


@pytest.mark.parametrize("fails, after", [("m.json", "q.json"), ("m.png", None), ("q.json", None)],
                         ids=["report-after-the-calibration", "png", "calibration"])
def test_a_failed_commit_keeps_the_previous_calibration_and_report(synthetic, tiny_model, tmp_path, monkeypatch,
                                                                   fails, after):
    raster, labels, _ = synthetic
    folder = tmp_path / "out"
    folder.mkdir()
    code, lines = evaluate(raster, labels, tiny_model, folder)
    assert code == 0, lines
    before = files(folder)
    assert sorted(before) == ["m.json", "m.png", "q.json"]
    report = json.loads(before["m.json"])
    assert report["quality_calibration"]["written"] is True
    assert report["quality_calibration"]["calibration"] == str(folder / "q.json")
    assert report["outputs"] == {"json": str(folder / "m.json"), "png": str(folder / "m.png")}

    with monkeypatch.context() as patch:
        failing = FailingRename(patch, folder, fails, after)
        code, lines = evaluate(raster, labels, tiny_model, folder, "--overwrite", "--background", "other")
    assert failing.failed, f"{fails} was never renamed in"
    assert code == 2 and lines[-1].startswith("Error: ") and fails in lines[-1] and "Permission denied" in lines[-1]
    assert files(folder) == before  # the old calibration, PNG and report; no temporary or backup file


def test_the_report_records_the_calibration_it_was_committed_with(synthetic, tiny_model, tmp_path, monkeypatch):
    raster, labels, _ = synthetic
    folder = tmp_path / "out"
    folder.mkdir()
    order: list[str] = []
    real = os.replace

    def recording(src, dst, **kwargs):
        if Path(os.path.abspath(dst)).parent == folder and not str(dst).endswith(".bak"):
            order.append(Path(dst).name)
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", recording)
    code, lines = evaluate(raster, labels, tiny_model, folder)
    assert code == 0, lines
    # Each file renamed in once (the staged calibration's own atomic write aside): the calibration first, the
    # report last.
    placed = [name for name in order if not name.startswith(".")]
    assert placed == ["q.json", "m.png", "m.json"]
    stored = json.loads((folder / "q.json").read_text())
    figures = json.loads((folder / "m.json").read_text())["quality_calibration"]
    assert figures["tiles"] == stored["metrics"]["tiles"] and figures["kept"] == "new"
