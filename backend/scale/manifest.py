"""The partial folder of a scaled run: what is finished, so a killed run resumes where it stopped.

`<out>.partial/` beside the output holds `run.json` (the fingerprint of the inputs and options),
`manifest.jsonl` (one line per finished chunk or raster, appended and fsync'ed before the run goes
on), the chunks' block files and each finished raster's outputs. A block file is written under a
temporary name, fsync'ed and renamed before its manifest line, so every line names a complete file;
a line cut short by a kill is ignored. The folder's name carries no process tag, so the sweep of
dead processes' temporary files (backend.engine.temporary) leaves it for the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from backend.engine.atomic import atomic_output, write_text_atomically
from backend.engine.errors import InputError

FORMAT = "farslip-scale/1"


def partial_folder(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def fingerprint(facts: dict) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


class Manifest:
    """The partial folder of one run, locked by its driver while it runs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.blocks = folder / "blocks"
        self.rasters = folder / "rasters"
        self.chunks: dict[str, dict] = {}   # chunk key -> its line
        self.finished: dict[int, dict] = {}  # raster index -> its line
        self._lock = None

    @classmethod
    def open(cls, out: str | Path, facts: dict, restart: bool) -> Manifest:
        """Resume the run of `facts` in `out`'s partial folder, or start one (`restart`: always start over)."""
        folder = partial_folder(out)
        manifest = cls(folder)
        try:
            if folder.exists():
                manifest._take_lock()
                if restart:
                    manifest._clear()
                else:
                    manifest._check(facts)
            folder.mkdir(exist_ok=True)
            manifest._take_lock()
            manifest.blocks.mkdir(exist_ok=True)
            manifest.rasters.mkdir(exist_ok=True)
            run = folder / "run.json"
            if not run.exists():
                write_text_atomically(run, json.dumps({"format": FORMAT, "fingerprint": fingerprint(facts),
                                                       "facts": facts}, indent=2, default=str))
            manifest._read()
        except BaseException:
            manifest.close()
            raise
        return manifest

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        self._lock = open(self.folder / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise InputError(f"Another farslip run is writing {self.folder}; wait for it to finish, or choose "
                             "another --out.") from None

    def _clear(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name == "lock":
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def _check(self, facts: dict) -> None:
        try:
            recorded = json.loads((self.folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._clear()  # killed before its first line was written: nothing to keep
            return
        if recorded.get("fingerprint") == fingerprint(facts):
            return
        before = recorded.get("facts", {})
        changed = sorted(key for key in set(before) | set(facts)
                         if json.dumps(before.get(key), default=str) != json.dumps(facts.get(key), default=str))
        changes = ", ".join(changed) or "settings"
        if "inputs" in changed:  # the same command finds other inputs when a raster (or a file it reads) changed
            changes = changes.replace("inputs", "inputs (rasters, or files they read, added, removed or changed "
                                                "since)")
        raise InputError(f"{self.folder} holds an unfinished run with other {changes}; re-run that command on "
                         "the same data to finish it, or delete that folder (or add --restart) to start this "
                         "one over.")

    def _read(self) -> None:
        path = self.folder / "manifest.jsonl"
        if not path.exists():
            return
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut by a kill: drop it, so the next line starts clean
            text = text[:text.rfind("\n") + 1]
            with open(path, "r+", encoding="utf-8") as handle:
                handle.truncate(len(text.encode("utf-8")))
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line, cut by a kill
            if "chunk" in entry and (self.blocks / entry["file"]).exists():
                self.chunks[entry["chunk"]] = entry
            elif "raster" in entry:
                self.finished[int(entry["raster"])] = entry

    def _append(self, entry: dict) -> None:
        with open(self.folder / "manifest.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add_chunk(self, key: str, arrays: dict[str, np.ndarray], facts: dict) -> None:
        """Store a finished chunk's arrays as a block file, then record it."""
        name = f"{key}.npz"
        with atomic_output(self.blocks / name) as staged:
            np.savez(staged, **arrays)
        entry = {"chunk": key, "file": name, **facts}
        self._append(entry)
        self.chunks[key] = entry

    def load_chunk(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.blocks / self.chunks[key]["file"]) as data:
            return {name: data[name] for name in data.files}

    def raster_folder(self, index: int) -> Path:
        folder = self.rasters / f"r{index:06d}"
        folder.mkdir(exist_ok=True)
        return folder

    def add_raster(self, index: int, facts: dict, chunk_keys: list[str]) -> None:
        """Record a finished raster (its outputs are in raster_folder(index)); its block files go."""
        entry = {"raster": index, **facts}
        self._append(entry)
        self.finished[index] = entry
        for key in chunk_keys:
            with contextlib.suppress(FileNotFoundError):
                (self.blocks / self.chunks.pop(key)["file"]).unlink()

    def remove(self) -> None:
        """The run is complete: the folder goes."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
