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
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from backend.engine.atomic import atomic_output, write_text_atomically
from backend.engine.errors import InputError

FORMAT = "farslip-scale/1"


class DamagedPartial(InputError):
    """A file of the partial folder, kept by an earlier run, cannot be read: the run stops (it is not one
    raster's failure), the partial folder stays."""


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reason(error: BaseException) -> str:
    return str(getattr(error, "strerror", None) or error) or type(error).__name__


def _file_problem(folder: Path, names: Iterable[str]) -> str | None:
    """Why one of the files `names` in a finished raster's folder cannot be opened, or None. Their headers only
    (a layer's table of contents, a raster's header): the merge reads the rest, and names a file it cannot."""
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            if path.suffix == ".gpkg":
                import pyogrio

                pyogrio.read_info(path, layer="polygons")
            else:
                import rasterio

                with rasterio.open(path):
                    pass
        except Exception as error:  # GDAL's errors for a damaged file vary
            return f"{path} cannot be opened: {_reason(error)}"
    return None


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
        except OSError as error:  # a file where it keeps a folder, or the other way round; a file it cannot read
            manifest.close()
            name = f" ({error.filename})" if error.filename else ""
            raise InputError(f"The partial folder {folder} of an unfinished run cannot be used{name}: "
                             f"{_reason(error)}; add --restart to start the run over, or delete that folder.") from None
        except BaseException:
            manifest.close()
            raise
        return manifest

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        try:
            self._lock = open(self.folder / "lock", "a+")
        except OSError as error:
            raise InputError(f"Cannot lock the partial folder {self.folder} of an unfinished run "
                             f"({self.folder / 'lock'}: {_reason(error)}); delete that folder to start the run "
                             "over.") from None
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the manifest's own checks remain
            return
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
            recorded = None
        if not isinstance(recorded, dict):  # killed before its first line was written (or damaged): nothing to
            self._clear()                   # keep, what it holds cannot be told to be of this run
            return
        if recorded.get("fingerprint") == fingerprint(facts):
            return
        before = recorded.get("facts")
        if not isinstance(before, dict):
            before = {}
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
        """The finished chunks and rasters the manifest lists. A line that is not one this run writes (cut by a
        kill, not UTF-8, not an object, a raster that is not a number) is skipped, and so is a chunk whose block
        file is missing or is not a whole .npz: what it stood for is computed again."""
        path = self.folder / "manifest.jsonl"
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line cut by a kill: drop it, so the next line starts clean
            data = data[:data.rfind(b"\n") + 1]
            with open(path, "r+b") as handle:
                handle.truncate(len(data))
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # the last line, cut by a kill; a damaged one (not JSON, not UTF-8)
                continue
            if not isinstance(entry, dict):
                continue
            if "chunk" in entry:  # a chunk's line never says its raster is finished
                key, file = entry.get("chunk"), entry.get("file")
                if (isinstance(key, str) and isinstance(file, str) and file and Path(file).name == file
                        and self._block_problem(self.blocks / file) is None):
                    self.chunks[key] = entry
            elif _is_index(entry.get("raster")):
                self.finished[entry["raster"]] = entry
            elif _is_index(entry.get("unfinished")):  # found damaged by an earlier resume (drop_damaged)
                self.finished.pop(entry["unfinished"], None)

    def _block_problem(self, path: Path, arrays: Iterable[str] = ()) -> str | None:
        """Why the block file `path` cannot be used (missing, not a whole .npz, without one of `arrays`), or None.
        Only its table of contents is read here: a block whose data is damaged is found by load_chunk."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    return "not an .npz file"
                missing = sorted(set(arrays) - set(data.files))
        except FileNotFoundError:
            return "missing"
        except Exception as error:  # whatever a damaged file raises (EOFError, BadZipFile, ...)
            return _reason(error)
        return f"without {', '.join(missing)}" if missing else None

    def drop_damaged(self, chunk_arrays: Iterable[str], raster_files: Iterable[str],
                     raster_facts: Iterable[str]) -> list[str]:
        """Forget what the partial folder kept but cannot give back: a chunk whose block file lacks one of
        `chunk_arrays`, a finished raster whose line lacks one of `raster_facts` or one of whose `raster_files`
        (in its raster folder) cannot be opened. Each is computed again; a raster's folder is emptied and a line
        says it is unfinished again. Returns a sentence for each."""
        said = []
        chunk_arrays, raster_files, raster_facts = list(chunk_arrays), list(raster_files), list(raster_facts)
        for key, entry in list(self.chunks.items()):
            block = self.blocks / entry["file"]
            problem = self._block_problem(block, chunk_arrays)
            if problem is not None:
                del self.chunks[key]
                said.append(f"{block}, kept by the unfinished run, is damaged ({problem}): that part is computed "
                            "again.")
        for index, entry in sorted(self.finished.items()):
            folder = self.rasters / f"r{index:06d}"
            missing = [name for name in raster_facts if name not in entry]
            problem = (f"{self.folder / 'manifest.jsonl'} lacks its {', '.join(missing)}" if missing else
                       _file_problem(folder, raster_files))
            if problem is None:
                continue
            del self.finished[index]
            shutil.rmtree(folder, ignore_errors=True)
            self._append({"unfinished": index})
            said.append(f"The finished raster {entry.get('path', index)} kept by the unfinished run is damaged "
                        f"({problem}): it is computed again.")
        return said

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
        """A kept chunk's arrays; a block file that cannot be read (damaged after it was written) is removed, so
        that the same command computes it again, and DamagedPartial says so."""
        path = self.blocks / self.chunks[key]["file"]
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except Exception as error:  # whatever a damaged file raises (EOFError, BadZipFile, ...)
            with contextlib.suppress(OSError):
                path.unlink()
            raise DamagedPartial(f"{path}, a finished chunk kept by the unfinished run in {self.folder}, cannot be "
                                 f"read ({_reason(error)}); it was removed: run the same command again to compute "
                                 "that part again (or add --restart to start the whole run over).") from None

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
