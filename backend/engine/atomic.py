"""Writing a file under a temporary name and renaming it into place: how every file is written.

Outputs, reports, caches, checkpoints and state files alike: the writer fills a hidden name in the
final folder, tagged with the process and run (see backend.engine.temporary, whose sweep of dead
runs' leftovers recognises it), and only a complete file is renamed over the final name. So a crash,
a full disk or a cancelled run (Ctrl-C, SIGTERM, a cancelled job) never leaves a half-written file
under the final name, and a file being replaced stays readable until its successor is complete.
A run's several outputs (polygons, rasters, a folder of rasters, the run report) are renamed in together, the
report last, all or nothing: a rename failing midway undoes the ones before it and restores the files (or
folder) they replaced (StagedOutputs, commit_outputs). A commit of several renames first writes its journal (what
goes where, and which file each target holds once renamed): a process killed in the middle of it (SIGKILL, a power
cut) leaves the journal, and the next sweep of that folder (backend.engine.temporary.remove_stale, or the server's
restart for its jobs) rolls the commit back from it (recover_commit): old and new outputs are never left mixed.
A folder replacing a folder takes two renames (the old one aside, the new one in), so it is journaled too, even
alone; a staged folder the caller keeps (a training's working folder: `keep`) goes back to its own name on a
rollback instead of being deleted (recover_dead_commits rolls back the dead commits of one folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import threading
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from .temporary import (dead_journals, journal_path, new_run_tag, owned_entries, process_is_alive, remove_owned,
                        staged_path, staged_stem)

# A shapefile's files, QGIS's metadata (.qmd), style (.qml) and old CRS file (.qpj), and ArcGIS's metadata
# (.shp.xml) beside it, which describe its fields and data.
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qmd", ".qml", ".qpj",
                   ".shp.xml")


def is_shapefile(path: str | os.PathLike) -> bool:
    """Whether `path` names a shapefile, by its extension in any letter case (.shp, .SHP)."""
    return Path(path).suffix.lower() == ".shp"


def shapefile_part(path: str | os.PathLike, part: str) -> Path:
    """The file `part` (".dbf", ".PRJ", ...) of the shapefile `path`, in the letter case of its extension:
    X.SHP -> X.DBF, x.shp -> x.dbf. GDAL writes every part in lower case whatever the name it is given (X.shp,
    X.dbf for X.SHP, which it then cannot open under that name), and opens a shapefile by x.shp or X.SHP with
    parts of either case; one case for all keeps the files together in any tool."""
    path = Path(path)
    return path.with_suffix(part.upper() if path.suffix.isupper() else part.lower())


def shapefile_parts(path: str | os.PathLike, every_case: bool = False) -> list[Path]:
    """The files beside the shapefile `path` that belong to it (SHAPEFILE_PARTS but the .shp), in its case.

    `every_case` adds each part, and the .shp itself, in the other case too: where the file system tells case
    apart, GDAL opening X.SHP reads an old x.shp or X.shx before X.SHP and X.SHX, so those belong to it as well."""
    path = Path(path)
    own = [shapefile_part(path, part) for part in SHAPEFILE_PARTS]
    if not every_case:
        return own[1:]
    found = {p.name: p for p in (*own, *(path.with_suffix(p) for p in (*SHAPEFILE_PARTS,
                                                                     *map(str.upper, SHAPEFILE_PARTS))))}
    return [p for name, p in found.items() if name != path.name]
# SQLite's journal files beside a GeoPackage: left beside a replaced file, they would be replayed into it.
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
# What GDAL reads beside a raster X.tif: external overviews (X.tif.ovr, which QGIS's Build pyramids writes), a
# mask (X.tif.msk) and metadata (X.tif.aux.xml: statistics, band names). Left beside a replaced raster, they
# would describe the old one: QGIS draws a zoomed-out map from the old overviews.
GDAL_SIDECARS = (".ovr", ".msk", ".aux.xml")
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")


def raster_sidecars(path: str | os.PathLike) -> tuple[str, ...]:
    """The endings of the files GDAL reads beside the raster output `path` (GDAL_SIDECARS), which replacing it
    takes along; none for an output that is no raster."""
    return GDAL_SIDECARS if Path(path).suffix.lower() in RASTER_SUFFIXES else ()


def _fsync_file(path: Path) -> None:
    # Windows flushes only a handle open for writing; POSIX any.
    descriptor = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_folder(path: Path) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _remove(path: Path) -> None:
    """Delete a file, or a folder with what it holds."""
    if _is_folder(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _fsync_entry(entry: Path) -> None:
    """A staged file, or every file and folder of a staged folder, reaches the disk."""
    if not _is_folder(entry):
        _fsync_file(entry)
        return
    for folder, _folders, names in os.walk(entry):
        for name in names:
            _fsync_file(Path(folder) / name)
        _fsync_folder(Path(folder))


def _fsync_folder(folder: Path) -> None:
    """The renames themselves reach the disk (a folder cannot be opened for this everywhere: best effort)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def backup_path(path: str | Path, tag: str) -> Path:
    """Where a commit keeps the file (or folder) it replaces until every output of the run is in place:
    `.name.farslip-<tag>.bak` beside it. Not a temporary name (backend.engine.temporary's sweep never removes
    it): a process killed in the middle of a commit leaves the user's previous result findable."""
    path = Path(path)
    return path.parent / f".{path.name}.farslip-{tag}.bak"


def _staged_moves(staged: Path, target: str | Path) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """What renaming a staged file and its sidecars over `target` takes: the old files it removes (stale parts
    of a replaced shapefile, a replaced GeoPackage's journal, a replaced raster's overviews, mask and metadata)
    and the renames, its main file last."""
    path = Path(target)
    if _is_folder(staged):  # a folder output (a folder of rasters) is renamed whole, over the folder it replaces
        return [], [(staged, path)]
    # The staged name is the target's staged stem + the target's own suffix (none for a bare name).
    stem = staged.name[: len(staged.name) - len(path.suffix)]
    written = [entry for entry in owned_entries(staged.with_name(stem)) if entry.is_file()]
    # A writer may change the case of the extension it was given (GDAL writes .shp for .SHP).
    main = staged if staged.exists() else next((entry for entry in written
                                                 if entry.name.lower() == staged.name.lower()), None)
    if main is None:
        raise FileNotFoundError(f"{staged} was not written")
    shapefile = is_shapefile(path)

    def final(entry: Path) -> Path:
        """Where a staged file goes: the target's name, plus the sidecar's own ending; a shapefile's parts
        in the case of the target's extension."""
        rest = entry.name[len(stem):]
        if entry == main:
            return path
        if shapefile and rest.lower() in SHAPEFILE_PARTS:
            return shapefile_part(path, rest)
        return path.parent / (path.stem + rest)

    targets = {entry: final(entry) for entry in written}
    removed: list[Path] = []
    if shapefile:
        # Stale parts of a replaced shapefile (an old index, an old .cpg, an x.dbf beside the new X.DBF) would
        # describe the wrong data.
        for old in [path, *shapefile_parts(path, every_case=True)]:
            successor = next((new for new in targets.values() if new.name.lower() == old.name.lower()), None)
            if successor is None or (old.name != successor.name and not _same_existing(old, successor)):
                removed.append(old)
    successors = {new.name for new in targets.values()}
    removed += [path.parent / (path.name + sidecar) for sidecar in raster_sidecars(path)
                if path.name + sidecar not in successors]
    if path.suffix.lower() == ".gpkg":
        # The old file's journal (another program had it open) describes the old file's pages.
        removed += [path.parent / (path.name + sidecar) for sidecar in SQLITE_SIDECARS
                    if not (main.parent / (main.name + sidecar)).exists()]
    # The main file goes last, so it only appears once its sidecars are in place.
    return removed, [(entry, targets[entry]) for entry in sorted(written, key=lambda p: p == main)]


@dataclasses.dataclass
class _Undo:
    """One rename of a commit, as undone: `target` got a staged file (`renamed`) or lost an old file that
    the commit removes; `backup` holds what was there (a hard link to it when `linked`)."""

    target: Path
    backup: Path | None
    linked: bool = False
    renamed: bool = False
    source: Path | None = None  # a kept staged folder: renamed back there on a rollback, never deleted


class _Renames:
    """The renames of one commit, in order; on a failure midway the ones done are undone, newest first.

    A file about to be replaced is first kept under its backup name (a hard link, so the final name never
    goes missing; renamed away where the file system has no hard links), an old file the commit removes is
    renamed to its backup name, and the backups go once the last rename is done. The last rename needs no
    backup: nothing after it can fail."""

    def __init__(self, tag: str):
        self.tag = tag
        self.done: list[_Undo] = []

    def remove(self, old: Path) -> None:
        if os.path.lexists(old) and not os.path.isdir(old):
            backup = backup_path(old, self.tag)
            os.replace(old, backup)
            self.done.append(_Undo(old, backup))

    def replace(self, new: Path, target: Path, keep: bool, kept_source: bool = False) -> None:
        # A folder replacing a folder: the old one is renamed aside first (no rename goes over a folder that
        # holds files), even in the last rename; its backup goes once all is in place.
        folders = _is_folder(new) and _is_folder(target)
        step = self._keep(target, aside=folders) if keep or folders else _Undo(target, None)
        step.source = new if kept_source else None
        self.done.append(step)
        os.replace(new, target)
        step.renamed = True

    def _keep(self, target: Path, aside: bool = False) -> _Undo:
        backup = backup_path(target, self.tag)
        if aside:
            os.replace(target, backup)
            return _Undo(target, backup)
        if not os.path.lexists(target) or _is_folder(target):
            return _Undo(target, None)  # nothing to keep (a folder in the way fails the rename: all is undone)
        try:
            os.link(target, backup, follow_symlinks=False)
            return _Undo(target, backup, linked=True)
        except (OSError, NotImplementedError):
            os.replace(target, backup)
            return _Undo(target, backup)

    def roll_back(self) -> list[str]:
        """Undo the renames done; returns what could not be undone, in words."""
        left = []
        for step in reversed(self.done):
            try:
                if step.backup is None:
                    if step.renamed:
                        _take_back(step.target, step.source)
                elif step.linked and not step.renamed:
                    os.unlink(step.backup)  # the old file never left its name (renaming a link over it does nothing)
                else:
                    if step.renamed and _is_folder(step.target):
                        _take_back(step.target, step.source)  # the new folder: no rename goes over it
                    os.replace(step.backup, step.target)
            except OSError:
                if step.source is not None and step.renamed and not os.path.lexists(step.source):
                    left.append(f"{step.target} holds what was to go there (kept as {step.source} before)")
                elif step.backup is None:
                    left.append(f"{step.target} is from the failed run")
                elif not (step.linked and not step.renamed):
                    left.append(f"the previous {step.target.name} is kept as {step.backup}")
        self.done.clear()
        return left

    def drop_backups(self) -> None:
        for step in self.done:
            if step.backup is not None:
                with contextlib.suppress(OSError):
                    _remove(step.backup)
        self.done.clear()


def _take_back(target: Path, source: Path | None) -> None:
    """Undo the rename of a new output at `target`: back to `source` (a staged folder the caller keeps), else
    deleted."""
    if source is not None:
        os.rename(target, source)
    else:
        _remove(target)


def commit_outputs(staged: Mapping[Path, str | Path], tag: str, durable: bool = True,
                   keep: Collection[Path] = ()) -> None:
    """Rename complete staged files (and their sidecars) or folders over their targets, in the order given, all
    or nothing: the only way outputs are replaced. A staged folder replaces the folder at its target whole.
    When a rename fails midway (a name taken by a folder, a folder that stopped taking files, a full disk),
    the outputs already renamed are removed again and the files (or folders) they replaced restored, and the
    error is raised; so a run's report, committed last, only ever lies beside the data it describes, and a
    user's previous result survives a failed commit. The staged folders in `keep` (a trained model, which took
    hours) are renamed back to their staged names by a rollback, here or after a kill (recover_commit), never
    deleted."""
    plans = [(target, *_staged_moves(Path(file), target)) for file, target in staged.items()]
    if durable:
        for _target, _removed, moves in plans:
            for entry, _final in moves:
                _fsync_entry(entry)
    steps: list[tuple[Path, Path | None]] = []  # (final name, the staged file renamed to it; None: removed)
    for _target, removed, moves in plans:
        steps += [(old, None) for old in removed] + [(final, entry) for entry, final in moves]
    # More than one rename: a journal, so a process killed midway is rolled back later; a folder replacing a
    # folder is two renames (the old one aside, then the new one in).
    journaled = len(steps) > 1 or any(source is not None and _is_folder(source) and _is_folder(name)
                                      for name, source in steps)
    kept = {Path(path) for path in keep}
    renames = _Renames(tag)
    # Ctrl+C or SIGTERM is held while the outputs are put in place, and delivered once they all are: one that
    # came between a rename and its record undid the others but left that new file, deleting the only copy of
    # the file it had replaced (old and new outputs mixed, the run saying nothing was written).
    try:
        with interrupts_deferred():
            journals = _write_journals(steps, list(staged.values()), tag, durable, kept) if journaled else []
            try:
                try:
                    for number, (name, source) in enumerate(steps, 1):
                        if source is None:
                            renames.remove(name)
                        else:
                            renames.replace(source, name, keep=number < len(steps), kept_source=source in kept)
                except BaseException as error:
                    left = renames.roll_back()
                    if left:
                        raise _not_restored(error, left) from error
                    raise
                # Every output is in place: make the renames durable, delete the previous files kept as backups.
                if durable:
                    for folder in dict.fromkeys(Path(target).parent for target, _removed, _moves in plans):
                        _fsync_folder(folder)
                renames.drop_backups()
            finally:
                _remove_journals(journals)
    except KeyboardInterrupt as interrupt:  # delivered after the commit: the outputs are complete and in place
        interrupt.outputs_written = [str(target) for target in staged.values()]  # type: ignore[attr-defined]
        raise


def _identity(path: Path) -> list[int]:
    """What tells a file (or folder) apart after a rename: its device and inode."""
    info = os.lstat(path)
    return [info.st_dev, info.st_ino]


def _write_journals(steps: list[tuple[Path, Path | None]], outputs: list, tag: str, durable: bool,
                    kept: Collection[Path] = ()) -> list[Path]:
    """Before the first rename of a commit: its journal in each folder it changes (whichever folder a later sweep
    looks at finds it), and, when `durable`, on disk before any rename. It lists the renames in order: each
    target, whether something was there before, and the identity of the staged file renamed to it (the target
    holds that file once renamed; None for an old file removed). A journal cut short (the process killed while
    writing it) is no JSON: recover_commit takes it as a commit that never began, which it is. A staged folder
    in `kept` is named too ("keep"): a rollback renames it back there."""
    folders = list(dict.fromkeys(Path(name).parent for name, _source in steps))
    journals = [journal_path(folder, tag) for folder in folders]
    text = json.dumps({
        "tag": tag, "host": socket.gethostname(),  # a sweep on another machine sharing the folder leaves it alone
        "journals": [str(journal) for journal in journals], "outputs": [str(out) for out in outputs],
        "steps": [{"target": str(name), "previous": os.path.lexists(name),
                   "identity": None if source is None else _identity(source),
                   **({"keep": os.path.abspath(source)} if source is not None and source in kept else {})}
                  for name, source in steps]})
    written: list[Path] = []
    try:
        for journal in journals:
            descriptor = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            written.append(journal)
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                stream.write(text)
                if durable:
                    stream.flush()
                    os.fsync(stream.fileno())
            if durable:
                _fsync_folder(journal.parent)
    except BaseException:
        _remove_journals(written)
        raise
    return journals


def _remove_journals(journals: list[Path]) -> None:
    for journal in journals:
        with contextlib.suppress(OSError):
            os.unlink(journal)


@dataclasses.dataclass
class Recovery:
    """What recover_commit did with a dead run's commit."""

    outputs: list[str]  # the outputs the commit was putting in place
    finished: bool  # every rename was done: the outputs are the run's (only its leftover backups went)
    restored: list[str] = dataclasses.field(default_factory=list)  # outputs whose previous file is back
    removed: list[str] = dataclasses.field(default_factory=list)  # new outputs that had no previous file
    left: list[str] = dataclasses.field(default_factory=list)  # what could not be undone, in words
    # the staged folders the commit kept (commit_outputs' `keep`) under their own names again: rolled back
    kept: list[str] = dataclasses.field(default_factory=list)
    tag: str = ""  # the run's, whose staged files (backend.engine.temporary.staged_stem) may be left


def recover_commit(journal: str | Path) -> Recovery | None:
    """Finish or roll back the commit a dead process left with `journal` (see commit_outputs), then remove its
    journals. A commit whose last rename was done is finished: the backups it kept go. Any other is rolled back,
    newest rename first: each previous file (or folder) kept as a backup goes back over its target, a new output
    that had no previous version is removed, a removed old file comes back. Which renames were done is read from
    the targets themselves (each holds the staged file the journal identifies once renamed), not from the staged
    files, which a cleanup may have removed. None when the journal is gone (another sweep took it) or another
    process is recovering it right now (two sweeps at once: the second would undo the first's work midway)."""
    journal = Path(journal)
    try:
        copies = json.loads(journal.read_text(encoding="utf-8")).get("journals") or [str(journal)]
        lock = _recovery_lock(Path(sorted(map(str, copies))[0]))  # the same lock whichever copy a sweep found
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        lock = _recovery_lock(journal)
    if not _take(lock):
        return None
    try:
        return _recover_commit(journal)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


def _recovery_lock(journal: Path) -> Path:
    """Held by the process recovering the commit of `journal` (named so that no temporary sweep removes it)."""
    return journal.with_name(journal.name[: -len(".json")] + ".lock")


def _take(lock: Path) -> bool:
    """Create `lock` naming this process and machine; False while another live process holds it, or one of
    another machine sharing the folder (whether it runs cannot be told from here). A lock whose holder died
    is taken over; one that cannot be made (a folder this process may not write) lets the recovery try, and
    say what it could not undo."""
    for _attempt in range(2):
        try:
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                pid, _, host = lock.read_text(encoding="utf-8").partition(" ")
                holder = int(pid)
            except (OSError, ValueError):
                return False  # being written by its holder this instant (or gone: the next sweep sees)
            if holder == os.getpid() or process_is_alive(holder) or host.strip() not in ("", socket.gethostname()):
                return False
            with contextlib.suppress(OSError):
                os.unlink(lock)
            continue
        except OSError:
            return True
        try:
            os.write(descriptor, f"{os.getpid()} {socket.gethostname()}".encode())  # pid, then machine
        finally:
            os.close(descriptor)
        return True
    return False


def _recover_commit(journal: Path) -> Recovery | None:
    """recover_commit, under its lock: the journal read again (the holder before may have finished it)."""
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        tag = record["tag"]
        steps = [(Path(step["target"]), step["identity"], bool(step["previous"])) for step in record["steps"]]
        sources = [Path(step["keep"]) if step.get("keep") else None for step in record["steps"]]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # cut short before the first rename (or another version's)
        with contextlib.suppress(OSError):
            os.unlink(journal)
        return None

    def renamed(target: Path, identity: list[int] | None) -> bool:
        try:
            return identity is not None and _identity(target) == list(identity)
        except OSError:
            return False

    result = Recovery([str(out) for out in record.get("outputs") or []], renamed(*steps[-1][:2]) if steps else True,
                      tag=str(tag))
    ordered = list(zip(steps, sources))
    for (target, identity, previous), source in (ordered if result.finished else reversed(ordered)):
        backup = backup_path(target, tag)
        kept = os.path.lexists(backup)
        try:
            if result.finished:
                if kept:
                    _remove(backup)
            elif identity is not None and renamed(target, identity):
                if source is not None and not os.path.lexists(source):  # a kept folder: back under its own name
                    os.rename(target, source)
                if kept:  # the previous file or folder back over the new one
                    if _is_folder(target):
                        shutil.rmtree(target)
                    os.replace(backup, target)
                    result.restored.append(str(target))
                elif not previous:  # a new output, where there was none
                    if os.path.lexists(target):
                        _remove(target)
                    result.removed.append(str(target))
                else:
                    result.left.append(f"{target} is from the interrupted run")
            elif kept:  # not renamed (or an old file the commit removed): the previous file is where it was
                if not os.path.lexists(target):
                    os.replace(backup, target)
                    result.restored.append(str(target))
                elif _same_existing(target, backup):
                    os.unlink(backup)  # a hard link: the file never left its name
                else:
                    result.left.append(f"the previous {target.name} is kept as {backup}")
        except OSError:
            result.left.append(f"the previous {target.name} is kept as {backup}" if kept and os.path.lexists(backup)
                               else f"{target} is from the interrupted run")
    if not result.finished:
        result.kept = [str(source) for source in sources if source is not None and _is_folder(source)]
    for folder in dict.fromkeys(target.parent for target, _identity, _previous in steps):
        _fsync_folder(folder)
    _remove_journals([Path(path) for path in record.get("journals") or [journal]])
    return result


def recover_dead_commits(folder: str | Path, output: str | Path | None = None) -> list[Recovery]:
    """Roll back (or finish: recover_commit) the commits that processes no longer running were killed in the
    middle of, from their journals in `folder`; with `output`, only those putting it in place. A journal that
    cannot be read or undone now stays for the next sweep."""
    wanted = None if output is None else os.path.abspath(output)
    recoveries = []
    for journal in dead_journals(folder):
        if wanted is not None:
            try:
                outputs = json.loads(journal.read_text(encoding="utf-8")).get("outputs") or []
            except (OSError, ValueError, AttributeError):
                continue
            if wanted not in {os.path.abspath(out) for out in outputs if isinstance(out, str)}:
                continue
        try:
            recovery = recover_commit(journal)
        except OSError:
            continue
        if recovery is not None:
            recoveries.append(recovery)
    return recoveries


@contextlib.contextmanager
def interrupts_deferred(names: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGHUP")) -> Iterator[None]:
    """Hold these signals (Ctrl+C, SIGTERM and SIGHUP) until the block ends, then deliver the first one that came
    (through the handler that was in place: KeyboardInterrupt, or the process's default action). Only the main
    thread can hold them (Python runs signal handlers there); elsewhere the block simply runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held: dict[int, object] = {}
    for number in [int(getattr(signal, name)) for name in names if hasattr(signal, name)]:
        try:
            held[number] = signal.signal(number, lambda signum, _frame: came.append(signum))
        except (ValueError, OSError):  # not settable here: left as it was
            continue
    try:
        yield
    finally:
        for kept, handler in held.items():
            # None: a handler not set from Python (a library's C handler); the default action stands in for it.
            signal.signal(kept, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]
    if came:
        handler = held.get(came[0])
        if callable(handler):
            handler(came[0], None)
        elif handler in (signal.SIG_DFL, None):
            os.kill(os.getpid(), came[0])


def _not_restored(error: BaseException, left: list[str]) -> Exception:
    """The sentence for a commit that failed and could not be undone entirely."""
    from .errors import InputError

    reason = (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__
    return InputError(f"Putting the outputs in place failed ({reason}), and undoing it failed too: "
                      f"{'; '.join(left)}. Rename the previous files back, or delete them if they are not needed.")


def _same_existing(a: Path, b: Path) -> bool:
    """Whether two names lead to one existing file (x.dbf and X.DBF where the file system ignores case)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class StagedOutputs:
    """The outputs of one run, each written under its staged name (`staged[key]`), then renamed into place
    together by commit() in the order of `targets` (the data first, the run report, the marker of a finished
    run, last), all or nothing (commit_outputs). An output may be a folder (the writer creates it at its staged
    name): it replaces the folder at its target whole.

    As a context manager: a block that ends normally commits (unless commit() was called in it); on any
    exception (cancellation included) the staged files are deleted and nothing at the targets changes.
    Calling commit() inside the block lets a surrounding handler (diskspace.writing_to) see a failed
    rename while the staged files still exist."""

    def __init__(self, targets: Mapping[str, str | Path], tag: str | None = None, durable: bool = True):
        self.targets = {key: Path(path) for key, path in targets.items()}
        self.tag = tag or new_run_tag()
        self.durable = durable
        self.staged = {key: staged_path(path, self.tag) for key, path in self.targets.items()}
        self.committed = False

    def __getitem__(self, key: str) -> Path:
        return self.staged[key]

    def __contains__(self, key: object) -> bool:
        return key in self.staged

    def commit(self, first: Mapping[Path, Path] | None = None, keep: Collection[Path] = ()) -> None:
        """Rename the staged files into place (commit_outputs); `first`: other complete files or folders renamed
        over their targets before them, in the same commit (a finished model folder), `keep` as commit_outputs'."""
        assert not self.committed, "committed once"
        try:
            commit_outputs({**(first or {}), **{self.staged[key]: target for key, target in self.targets.items()}},
                           self.tag, self.durable, keep)
        except KeyboardInterrupt as interrupt:  # one held until every output was in place: committed all the same
            self.committed = bool(getattr(interrupt, "outputs_written", None))
            raise
        self.committed = True

    def discard(self) -> None:
        """Delete the staged files (none of the targets)."""
        remove_owned([staged_stem(path, self.tag) for path in self.targets.values()])

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None and not self.committed:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        elif error_type is not None:
            self.discard()


@contextlib.contextmanager
def atomic_output(path: str | Path, tag: str | None = None, durable: bool = True,
                  mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends normally it (and its sidecars) replace `path`.

    On any exception (including cancellation) the temporary files are deleted and nothing at `path`
    changes. The temporary path keeps the extension, so GDAL, numpy or matplotlib pick the same format.
    `tag` is the run's (a fresh one by default, so concurrent writers of one name never share a
    temporary name); `durable` flushes the file to disk before the rename (caches, which only cost
    time when lost, skip it); `mode` sets the file's permissions before it appears. Several outputs
    that land together: StagedOutputs.
    """
    with StagedOutputs({"": path}, tag, durable) as outputs:
        yield outputs[""]
        if mode is not None:
            outputs[""].chmod(mode)


def write_bytes_atomically(path: str | Path, data: bytes, durable: bool = True, mode: int | None = None) -> Path:
    """`path` holds `data`, all or nothing; with `mode`, the file never exists with other permissions."""
    with atomic_output(path, durable=durable, mode=mode) as staged:
        # Created with `mode` from the start: a secret (a token) is never readable by others, even briefly.
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
    return Path(path)


def finite_json(value):
    """`value` with each float that JSON cannot hold (NaN: a figure that could not be measured; infinity) as
    null, in dicts, lists and tuples at any depth: json.dumps would write them as the bare NaN and Infinity that
    no JSON reader takes."""
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomically(path: str | Path, text: str, durable: bool = True, mode: int | None = None) -> Path:
    """`path` holds `text` (UTF-8), all or nothing."""
    return write_bytes_atomically(path, text.encode("utf-8"), durable, mode)


def shared_file_mode() -> int:
    """The permissions a new file gets from the umask (some writers, like safetensors, create 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
