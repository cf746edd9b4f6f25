"""`make test` (what CI runs) collects every test folder: a folder left off its pytest lines is never run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_folder_is_run_by_make_test():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipes = {
        name: body
        for name, body in re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)+)", makefile, flags=re.MULTILINE)
    }
    test_targets = re.search(r"^test:([^\n]*)", makefile, flags=re.MULTILINE).group(1).split()
    run = " ".join(recipes.get(target, "") for target in test_targets)
    folders = sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py")))
    assert folders, "no test folders found"
    missing = [name for name in folders if not re.search(rf"\btests/{name}\b", run)]
    assert not missing, f"make test does not run tests/{', tests/'.join(missing)}"
