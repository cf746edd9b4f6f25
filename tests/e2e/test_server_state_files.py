"""`farslip serve` on a state folder with a folder where a file belongs (or the other way round), or that is a
file itself: one sentence naming the path, exit 2, and nothing removed."""

from __future__ import annotations


import pytest


@pytest.mark.parametrize("name, folder, what", [
    ("logs", False, "log folder"),
    ("logs/backend.log", True, "log"),
    ("backend.lock", True, "lock"),
])
def test_a_folder_or_file_in_place_of_a_state_file_is_one_sentence(serve_refusal, tmp_path, name, folder, what):
    """A folder at backend.lock or logs/backend.log, or a file at logs, ended in a traceback
    (FileExistsError, IsADirectoryError)."""
    state_dir = tmp_path / "state"
    target = state_dir / name
    target.parent.mkdir(parents=True)
    if folder:
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    else:
        target.write_text("mine")
    code, stderr = serve_refusal("--state-dir", str(state_dir))
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("Error: ") and str(target) in stderr and what in stderr
    assert (target / "keep.txt" if folder else target).read_text() == "mine"  # left as it was


def test_a_state_dir_that_is_a_file_is_one_sentence(serve_refusal, tmp_path):
    state_file = tmp_path / "state"
    state_file.write_text("mine")
    code, stderr = serve_refusal("--state-dir", str(state_file))
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip() == f"Error: The state folder {state_file} is a file, not a folder; give --state-dir a folder."
    assert state_file.read_text() == "mine"
