"""Running out of disk space: refused before a run where the estimate says so, a sentence when a write fails.

GDAL, pyogrio and the OS each word a full disk differently ("No space left on device", "Free disk
space available is ...", a short write); any write error while an output folder has next to no
free space left is reported as a full disk, naming the output and the space it needs.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import FarslipError, InputError

# Compressed GeoTIFFs of class ids are far smaller than their uncompressed size; refuse up front only
# when not even this fraction of the estimate fits.
UP_FRONT_FRACTION = 0.05
NEARLY_FULL_BYTES = 2**20
_SPACE_WORDS = ("no space left", "disk space", "disk full", "not enough space", "file too large")


def free_bytes(folder: Path) -> int | None:
    """Free bytes in `folder`'s file system; None when unknown, or on a pseudo file system (/proc, /sys)
    that reports no size at all, where a write fails for another reason than space."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return usage.free if usage.total > 0 else None


def no_space_error(path: Path, needed_mb: float) -> InputError:
    return InputError(f"Not enough space on the disk for {path} (needs about {max(1, round(needed_mb))} MB); "
                      "free some space or choose another output folder.")


def nearly_full(paths: Iterable[Path]) -> list[Path]:
    """The paths whose folder has next to no free space left."""
    full = []
    for path in paths:
        free = free_bytes(Path(path).parent)
        if free is not None and free < NEARLY_FULL_BYTES:
            full.append(Path(path))
    return full


def check_written(paths: Iterable[Path], needed_mb: float) -> None:
    """Before outputs are put in place: GDAL reports some failed writes (a disk that fills up while a
    GeoTIFF is flushed on closing) only as a printed line, so a folder left with next to no space
    means such a write may have failed."""
    full = nearly_full(paths)
    if full:
        raise no_space_error(full[0], needed_mb)


def check_free_space(paths: Iterable[Path], needed_mb: float) -> None:
    """Refuse a run whose outputs clearly cannot fit in their folders."""
    for path in paths:
        free = free_bytes(Path(path).parent)
        if free is not None and free < needed_mb * UP_FRONT_FRACTION * 2**20:
            raise no_space_error(Path(path), needed_mb)


def _looks_like_no_space(first: BaseException) -> bool:
    error: BaseException | None = first
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(words in str(error).lower() for words in _SPACE_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _what_failed(filename, outputs: list[Path]) -> str:
    """The output a failed write was for (temporary files and work folders lie beside the outputs)."""
    failed = Path(str(filename))
    for output in outputs:
        if failed == output or (failed.parent == output.parent and failed.name.startswith(f".{output.name}")):
            return str(output)
    if any(output.parent == failed.parent for output in outputs):
        return f"files in {failed.parent}"
    return str(failed)


@contextlib.contextmanager
def writing_to(paths: Iterable[Path], needed_mb: float) -> Iterator[None]:
    """Turn a failed write of these outputs into a sentence (a full disk, or a folder that refuses files)."""
    paths = [Path(p) for p in paths]
    try:
        yield
    except FarslipError:
        raise
    except Exception as error:
        # Checked before the caller removes its temporary files, while the disk is still full.
        full = nearly_full(paths)
        if _looks_like_no_space(error) or full:
            raise no_space_error((full or paths)[0], needed_mb) from error
        if isinstance(error, OSError) and error.filename is not None:
            raise InputError(f"Cannot write {_what_failed(error.filename, paths)} ({error.strerror or error}); "
                             "choose another output folder.") from error
        raise
