"""Writing a file under a temporary name and renaming it into place: how every file is written.

Outputs, reports, caches, checkpoints and state files alike: the writer fills a hidden name in the
final folder, tagged with the process and run (see backend.engine.temporary, whose sweep of dead
runs' leftovers recognises it), and only a complete file is renamed over the final name. So a crash,
a full disk or a cancelled run (Ctrl-C, SIGTERM, a cancelled job) never leaves a half-written file
under the final name, and a file being replaced stays readable until its successor is complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .temporary import new_run_tag, owned_entries, remove_owned, staged_path, staged_stem

# A shapefile's files, and QGIS's metadata (.qmd) and style (.qml) beside it, which describe its fields.
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qmd", ".qml")


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


def _fsync_file(path: Path) -> None:
    # Windows flushes only a handle open for writing; POSIX any.
    descriptor = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def commit_staged(staged: Path, target: str | Path, durable: bool = True) -> None:
    """Rename a complete staged file and its sidecars over `target`: the only way an output is replaced."""
    path = Path(target)
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
    if durable:
        for entry in written:
            _fsync_file(entry)
    if shapefile:
        # Stale parts of a replaced shapefile (an old index, an old .cpg, an x.dbf beside the new X.DBF) would
        # describe the wrong data.
        for old in [path, *shapefile_parts(path, every_case=True)]:
            successor = next((new for new in targets.values() if new.name.lower() == old.name.lower()), None)
            if successor is None or (old.name != successor.name and not _same_existing(old, successor)):
                old.unlink(missing_ok=True)
    if path.suffix.lower() == ".gpkg":
        # The old file's journal (another program had it open) describes the old file's pages.
        for sidecar in SQLITE_SIDECARS:
            if not (main.parent / (main.name + sidecar)).exists():
                (path.parent / (path.name + sidecar)).unlink(missing_ok=True)
    # The main file goes last, so it only appears once its sidecars are in place.
    for entry in sorted(written, key=lambda p: p == main):
        os.replace(entry, targets[entry])
    if durable:
        _fsync_folder(path.parent)


def _same_existing(a: Path, b: Path) -> bool:
    """Whether two names lead to one existing file (x.dbf and X.DBF where the file system ignores case)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: str | Path, tag: str | None = None, durable: bool = True,
                  mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends normally it (and its sidecars) replace `path`.

    On any exception (including cancellation) the temporary files are deleted and nothing at `path`
    changes. The temporary path keeps the extension, so GDAL, numpy or matplotlib pick the same format.
    `tag` is the run's (a fresh one by default, so concurrent writers of one name never share a
    temporary name); `durable` flushes the file to disk before the rename (caches, which only cost
    time when lost, skip it); `mode` sets the file's permissions before it appears.
    """
    tag = tag or new_run_tag()
    staged = staged_path(path, tag)
    try:
        yield staged
        if mode is not None:
            staged.chmod(mode)
        commit_staged(staged, path, durable)
    except BaseException:
        remove_owned([staged_stem(path, tag)])
        raise


def write_bytes_atomically(path: str | Path, data: bytes, durable: bool = True, mode: int | None = None) -> Path:
    """`path` holds `data`, all or nothing; with `mode`, the file never exists with other permissions."""
    with atomic_output(path, durable=durable, mode=mode) as staged:
        # Created with `mode` from the start: a secret (a token) is never readable by others, even briefly.
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
    return Path(path)


def write_text_atomically(path: str | Path, text: str, durable: bool = True, mode: int | None = None) -> Path:
    """`path` holds `text` (UTF-8), all or nothing."""
    return write_bytes_atomically(path, text.encode("utf-8"), durable, mode)


def shared_file_mode() -> int:
    """The permissions a new file gets from the umask (some writers, like safetensors, create 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
