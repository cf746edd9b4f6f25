"""`make test` (what CI runs) runs every test file once: a folder or file left off its pytest lines is never run,
and one on two of them (the backend suite runs in two halves) runs twice."""

from __future__ import annotations

import shlex
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_file_is_run_once_by_make_test():
    # make's own reading of the Makefile (variables, wildcards, the recursive make), without running anything.
    printed = subprocess.run(["make", "--no-print-directory", "-n", "test"], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=60).stdout
    runs = [shlex.split(line) for line in printed.splitlines() if " -m pytest " in line]
    assert len(runs) >= 2, f"make test runs no pytest suites:\n{printed}"
    given = [Path(arg) for run in runs for arg in run[run.index("pytest") + 1:] if arg.startswith("tests/")]
    files = sorted(path.relative_to(ROOT) for path in (ROOT / "tests").rglob("test_*.py"))
    assert files, "no test files found"
    count = Counter(file for file in files for path in given if file == path or path in file.parents)
    missing = [str(file) for file in files if count[file] == 0]
    twice = [str(file) for file in files if count[file] > 1]
    assert not missing, f"make test does not run {', '.join(missing)}"
    assert not twice, f"make test runs {', '.join(twice)} more than once"
