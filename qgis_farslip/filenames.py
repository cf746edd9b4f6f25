"""File names made from layer and class names: any script kept, safe on Windows, macOS and Linux."""

from __future__ import annotations

import os
import re
import unicodedata
import urllib.parse
from typing import Callable

# Characters Windows refuses in file names, control characters, and path separators.
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]+')
_SPACES = re.compile(r"[\s_]+")
# Device names Windows reserves whatever the extension ("CON.gpkg" cannot be created).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_STEM = 80  # characters; leaves room for folder, suffixes and extension under Windows' 260-char paths


def safe_file_stem(text: str, fallback: str = "result") -> str:
    """`text` as a file name stem: letters of every script kept (NFC), forbidden characters and
    separators replaced by `_`, no leading/trailing dots or spaces, not a reserved device name."""
    stem = unicodedata.normalize("NFC", text)
    stem = _FORBIDDEN.sub("_", stem)
    stem = _SPACES.sub("_", stem).strip("._ ")
    stem = stem[:MAX_STEM].rstrip("._ ")
    if not stem:
        return fallback
    if stem.split(".")[0].upper() in _RESERVED:
        stem = f"_{stem}"
    return stem


def first_free(name: str, taken: Callable[[str], bool], numbered: Callable[[int], str]) -> str:
    """`name`, or the first of `numbered(2)`, `numbered(3)`, ... that is not `taken`."""
    candidate, number = name, 1
    while taken(candidate):
        number += 1
        candidate = numbered(number)
    return candidate


def unused_stem(folder: str, stem: str) -> str:
    """`folder/stem`, or `folder/stem-2`, `-3`, ... when a file of that run already exists there.

    Names made from a clock can repeat (two runs in the same second); a run's files are `stem.*` and
    `stem_*`, plus the hidden temporary names of a run still writing (`.stem.*`, `.stem_*`)."""
    try:
        taken = os.listdir(folder)
    except OSError:
        taken = []

    def used(candidate: str) -> bool:
        return any(name.lstrip(".").startswith((candidate + ".", candidate + "_")) for name in taken)

    return os.path.join(folder, first_free(stem, used, lambda number: f"{stem}-{number}"))


# Table names a GeoPackage keeps for itself (its own tables, its spatial indexes, SQLite's): GDAL refuses a layer
# so named, which gets a leading `_`, as the backend's layers do (backend/engine/export.py: layer_name).
RESERVED_TABLE_PREFIXES = ("gpkg", "rtree_", "sqlite_")


def gpkg_table_name(name: str) -> str:
    """`name` as a GeoPackage layer may be called."""
    return f"_{name}" if name.lower().startswith(RESERVED_TABLE_PREFIXES) else name


def same_file(first: str, second: str) -> bool:
    """Whether two paths name one file (links and letter case resolved as the system does)."""
    return os.path.normcase(os.path.realpath(first)) == os.path.normcase(os.path.realpath(second))


def sqlite_uri(path: str, mode: str = "ro") -> str:
    """A SQLite URI (sqlite3.connect(..., uri=True)) of the file `path`, opened in `mode`: the path
    percent-quoted, so that a '#', '?', '%', a space or any script in a folder or file name is read as part of
    the name (unquoted, '#' ends the path and '?' begins the options: another file, or none, was read)."""
    absolute = os.path.abspath(path).replace(os.sep, "/")
    if not absolute.startswith("/"):  # C:/x on Windows: file:///C:/x
        absolute = "/" + absolute
    return f"file://{urllib.parse.quote_from_bytes(os.fsencode(absolute), safe='/:')}?mode={mode}"
