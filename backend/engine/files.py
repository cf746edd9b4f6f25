"""Checks on the user's files before a run: inputs are regular files, outputs never replace an input.

An output "is" an input when both names lead to the same file: through symlinks, `..`,
hard links, or letter case on a case-insensitive filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from .atomic import is_shapefile, raster_sidecars, shapefile_parts
from .errors import FarslipError, InputError, shortened, shown
from .options import not_utf8
from .temporary import URL_MARKS


def expand_user(text: str | os.PathLike, what: str, error: type[FarslipError] = InputError) -> Path:
    """`~/x` and `~user/x` expanded; an unknown user is a sentence, not a RuntimeError."""
    path = Path(text)
    try:
        return path.expanduser()
    except RuntimeError:
        user = str(text).split("/", 1)[0]
        raise error(f"The {what} path {str(text)!r} starts with {user}, but there is no such user's home "
                    "folder here; give the full path.") from None


def check_utf8_name(path: str | os.PathLike, what: str, writes: bool = False) -> None:
    """A file GDAL opens (a raster, a vector file, an output it writes; `what` names it) has a UTF-8 name, and so
    has the working folder a relative name is in: GDAL takes names as UTF-8 text, and one Python read from
    bytes that are not UTF-8 (a file really named in Latin-1, or a name typed in a Latin-1 terminal) holds lone
    surrogates that no GDAL call accepts (UnicodeEncodeError). Python reads other files (a class file) by
    such names, so only GDAL's are checked."""
    text = os.fspath(path)
    opens = "writes" if writes else "opens"
    why = not_utf8(text)
    if why is not None:
        raise InputError(f"The {what} path {shown(text)} {why}: "
                         + ("outputs are written only under UTF-8 names (GDAL takes no other). Choose a UTF-8 name"
                            if writes else "GDAL opens only files named in UTF-8. Rename the file (or its folder) "
                            "in UTF-8") + ", or, if the terminal that typed it is not set to UTF-8, set it to UTF-8.")
    if os.path.isabs(text) or is_gdal_virtual(text):
        return
    try:
        folder = os.getcwd()
    except OSError:  # a deleted working folder: the run's own sentence says so
        return
    why = not_utf8(folder)
    if why is not None:
        raise InputError(f"The working folder {shown(folder)}, where the {what} {shown(text)} is, {why}: GDAL "
                         f"{opens} only files named in UTF-8. Give a full path through folders named in UTF-8, or "
                         "rename the folder.")


# --------------------------------------------------------------------------- raster names GDAL resolves itself

# GDAL's virtual file systems that read a file on this machine: a member of an archive (/vsizip/a.zip/x.tif,
# /vsizip//abs/a.zip/x.tif, /vsizip/{a.zip}/x.tif, /vsitar/a.tar.gz/x.tif) or a whole compressed file
# (/vsigzip/a.tif.gz). Any other (/vsicurl/, /vsis3/, /vsimem/ ...) reads bytes whose version this machine
# cannot tell.
ARCHIVE_FILE_SYSTEMS = ("/vsizip/", "/vsitar/", "/vsi7z/", "/vsirar/")
COMPRESSED_FILE_SYSTEMS = ("/vsigzip/",)
# DRIVER:... names a subdataset (GPKG:a.gpkg:table, NETCDF:"a.nc":var, HDF5:"a.h5"://var, GTIFF_DIR:2:a.tif);
# two letters at least (a Windows drive C:\x.tif is a file), and not DRIVER://, which is a URL.
_SUBDATASET = re.compile(r"(?P<driver>[A-Za-z][A-Za-z0-9_]+):(?!//)(?P<rest>.+)", re.DOTALL)


class HeldFile(NamedTuple):
    """The file on this machine that holds a raster (`file`, resolved) and where a raster name writes its path
    (`name[start:end]`): all of a plain path, an archive's path in /vsizip/a.zip/x.tif, a container's in
    GPKG:a.gpkg:table."""

    file: Path
    start: int
    end: int


def is_gdal_virtual(name: str | os.PathLike) -> bool:
    """A path through one of GDAL's virtual file systems (/vsizip/, /vsicurl/, /vsis3/ ...)."""
    return os.fspath(name).startswith("/vsi")


def is_subdataset(name: str | os.PathLike) -> bool:
    """A name in GDAL's subdataset syntax (DRIVER:...), unless a file exists under that very name."""
    text = os.fspath(name)
    return _SUBDATASET.fullmatch(text) is not None and not os.path.lexists(text)


def held_file(name: str | os.PathLike, folder: str | os.PathLike = "") -> HeldFile | None:
    """The file on this machine that GDAL reads for the raster name `name`, and where the name writes it: a
    plain path is its file (there or not); an archive's member or a compressed file (/vsizip/, /vsitar/,
    /vsigzip/, also chained) its archive; a subdataset the one part of its name that is a file here. None when
    no file here holds it (/vsicurl/, /vsis3/, /vsimem/, an archive on one of those) or the name does not tell
    which file does. A relative file is in `folder` (default: the working folder)."""
    text, folder = os.fspath(name), os.fspath(folder)
    if is_gdal_virtual(text):
        return _held_virtual(text, 0, folder)
    if is_subdataset(text):
        return _held_subdataset(text, folder)
    return HeldFile(Path(os.path.join(folder, text)).resolve(), 0, len(text))


def _held_at(name: str, start: int, end: int, folder: str) -> HeldFile | None:
    """`name[start:end]` as the file holding the raster: a regular file here, or a virtual path over one."""
    text = name[start:end]
    if text.startswith("/vsi"):  # a chain: /vsitar//vsigzip//d/a.tar.gz/x.tif, /vsizip/{/vsizip/a.zip/b.zip}/x
        return _held_virtual(text, start, folder)
    if not text or not os.path.isfile(os.path.join(folder, text)):
        return None
    return HeldFile(Path(os.path.join(folder, text)).resolve(), start, end)


def _held_virtual(text: str, offset: int, folder: str) -> HeldFile | None:
    """held_file of the virtual path `text`, which starts at `offset` of the name being read."""
    system = next((s for s in ARCHIVE_FILE_SYSTEMS + COMPRESSED_FILE_SYSTEMS if text.startswith(s)), None)
    if system is None:
        return None
    start = len(system)

    def at(begin: int, end: int) -> HeldFile | None:
        held = _held_at(text, begin, end, folder)
        return None if held is None else HeldFile(held.file, held.start + offset, held.end + offset)

    if system in COMPRESSED_FILE_SYSTEMS:
        return at(start, len(text))
    if text.startswith("{", start):  # /vsizip/{archive}/member: the archive's path in braces, which may nest
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return at(start + 1, end)
        return None
    # The archive is the first prefix of the rest that is a file: the prefixes before it are its folders.
    ends = [i for i in range(start + 1, len(text)) if text[i] == "/"] + [len(text)]
    return next((held for end in ends if (held := at(start, end)) is not None), None)


def _subdataset_spans(name: str) -> list[tuple[int, int]]:
    """Where a subdataset name may write its file, first the place drivers usually give it: each quoted part
    (NETCDF:"a.nc":var, HDF4_SDS:UNKNOWN:"a.hdf":0), else each ':'-separated part (GPKG:a.gpkg:table,
    GTIFF_DIR:2:a.tif), a drive letter joined to the next (GPKG:C:\\d\\a.gpkg:table)."""
    rest = name.index(":") + 1
    if '"' in name[rest:]:
        return [(rest + a, rest + b) for a, b in (m.span(1) for m in re.finditer(r'"([^"]*)"', name[rest:]))]
    bounds = [rest - 1, *(i for i in range(rest, len(name)) if name[i] == ":"), len(name)]
    drives = [(a + 1, c) for a, b, c in zip(bounds, bounds[1:], bounds[2:])
              if b - a == 2 and name[a + 1].isalpha() and name[b + 1:b + 2] in ("\\", "/")]
    return drives + [(a + 1, b) for a, b in zip(bounds, bounds[1:])]


def _held_subdataset(name: str, folder: str = "") -> HeldFile | None:
    """The file of a subdataset: the one part of its name that is a file here; None unless exactly one is."""
    found = {held.file: held for a, b in _subdataset_spans(name)
             if (held := _held_at(name, a, b, folder)) is not None}
    return next(iter(found.values())) if len(found) == 1 else None


def subdataset_file(name: str | os.PathLike) -> str | None:
    """The file a GDAL subdataset name reads, as the name gives it: NETCDF:"/d/a.nc":var, NETCDF:/d/a.nc:var,
    HDF5:"/d/a.h5"://group/var, GPKG:/d/a.gpkg:table -> /d/a.*, GTIFF_DIR:2:/d/a.tif -> /d/a.tif (the part that
    is a file here; else where drivers put it, for a sentence naming a missing file); None for any other name
    (a file that exists under a name with a colon is that file)."""
    text = os.fspath(name)
    if not is_subdataset(text):
        return None
    held = _held_subdataset(text)
    if held is not None:
        return text[held.start:held.end]
    spans = _subdataset_spans(text)  # none in NETCDF:"a.nc:var (no closing quote)
    if not spans:
        return None
    start, end = spans[0]
    return text[start:end] or None


def is_gdal_name(name: str | os.PathLike) -> bool:
    """A raster name GDAL resolves itself (a virtual path or a subdataset), not a plain file path. It must reach
    GDAL as typed: a pathlib.Path folds its '//' (HDF5:"a.h5"://var, /vsizip//data/a.zip/x.tif: the archive's
    absolute path), which GDAL then does not find."""
    return is_gdal_virtual(name) or subdataset_file(name) is not None


def raster_name(text: str | os.PathLike, what: str = "raster") -> str:
    """A raster as given on a command line or in a request, as the text GDAL must get: a GDAL name as typed,
    a path with `~` expanded."""
    return os.fspath(text) if is_gdal_name(text) else str(expand_user(text, what))


def raster_file(name: str | os.PathLike) -> Path | None:
    """The file on this machine that a raster name reads, which no output may replace: the file itself, a
    subdataset's file, the archive of a /vsizip/ (/vsitar/, /vsigzip/) path as the name gives them; None for a
    virtual path over no file here (/vsicurl/, /vsis3/ ...)."""
    text = os.fspath(name)
    if is_gdal_virtual(text):
        held = held_file(text)
        return Path(text[held.start:held.end]) if held is not None else None
    file = subdataset_file(text)
    return Path(file if file is not None else text)


def absolute_raster_name(name: str | os.PathLike, folder: str | os.PathLike = "") -> str:
    """A raster name with its file made absolute and resolved, the rest as typed: what names this raster
    wherever it is read (a report read elsewhere, the key of its search index). A path resolved; a
    subdataset's file inside its name (GPKG:/abs/a.gpkg:table); an archive inside a virtual path
    (/vsizip//abs/a.zip/x.tif). A virtual path over no file here, as given. A relative file is in `folder`
    (default: the working folder)."""
    text = os.fspath(name)
    held = held_file(text, folder)
    if held is not None:
        return text[:held.start] + str(held.file) + text[held.end:]
    spans = _subdataset_spans(text) if is_subdataset(text) else []
    if not spans or spans[0][0] == spans[0][1]:  # a virtual path over no file here
        return text
    start, end = spans[0]  # a missing file: where drivers put it, as a sentence would name it
    return text[:start] + str(Path(os.path.join(folder, text[start:end])).resolve()) + text[end:]


def raster_label(name: str | os.PathLike) -> str:
    """A raster as a sentence names it: a file by its name, a GDAL name whole."""
    return os.fspath(name) if is_gdal_name(name) else Path(name).name


def kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _mode(path: Path, label: str) -> int:
    """The file mode of `path`; a missing or unreadable path is a sentence naming it as `label`."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"The {label} {path} does not exist.") from None
    except OSError as error:
        raise InputError(f"The {label} {path} cannot be read ({error.strerror or error}).") from None


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` exists and is a regular file (a FIFO or device would block or never end)."""
    path = Path(path)
    mode = _mode(path, what)
    if not stat.S_ISREG(mode):
        raise InputError(f"The {what} {path} is {kind_of(mode)}, not a file; give the path of a file.")
    return path


def check_raster_name(name: str | os.PathLike, what: str = "raster") -> str:
    """A raster name a run can open, as the text GDAL gets: a virtual path as it is (GDAL reads it wherever it
    reaches), a subdataset once its file is a regular file here, else a regular file; named in UTF-8."""
    text = os.fspath(name)
    check_utf8_name(text, what)
    if is_gdal_virtual(text):
        return text
    file = subdataset_file(text)
    if file is None:
        check_regular_file(text, what)
        return text
    if not os.path.exists(file):
        raise InputError(f"The {what} {text} names the file {file}, which does not exist.")
    check_regular_file(file, what)
    return text


def check_vector_source(path: str | os.PathLike, what: str) -> Path:
    """A vector dataset: a regular file, or a folder (a FileGDB, a folder of shapefiles); never a FIFO; named in
    UTF-8."""
    check_utf8_name(path, f"{what} file")
    path = Path(path)
    mode = _mode(path, f"{what} file")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"The {what} file {path} is {kind_of(mode)}, not a file; give the path of a vector file "
                         "(or of a folder GDAL reads as one, such as a FileGDB).")
    return path


def check_not_special(path: str | os.PathLike, what: str) -> None:
    """An existing output may only be a regular file; nothing at all is fine too."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        raise InputError(f"The {what} {path} is a folder; give a file name (an existing folder is never "
                         "replaced).")
    if not stat.S_ISREG(mode):
        raise InputError(f"The {what} {path} is {kind_of(mode)}; give the name of a regular file.")


def _case_insensitive(folder: Path) -> bool:
    """Whether `folder`'s filesystem ignores letter case (probed on the folder's own name, no writes)."""
    for candidate in (folder, *folder.parents):
        swapped = candidate.name.swapcase()
        if swapped != candidate.name:
            other = candidate.with_name(swapped)
            try:
                return os.path.samefile(candidate, other)
            except OSError:
                return False
    return False


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether the names `a` and `b` lead to one file (existing or to be created)."""
    real_a, real_b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    if real_a == real_b:
        return True
    try:
        return os.path.samefile(real_a, real_b)
    except OSError:
        pass
    return (real_a.name.casefold() == real_b.name.casefold() and real_a.parent == real_b.parent
            and _case_insensitive(real_a.parent))


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` resolves to `folder` or something inside it."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == root or root in real.parents


def files_read_with(path: Path) -> list[Path]:
    """The other files GDAL reads to give the pixels of the raster file `path` (feature_cache.raster_reads: a
    VRT's sources and nested VRTs, overviews, masks, metadata, a GeoPackage's journal); none when `path` is no
    raster GDAL opens (a model, a class list, a vector file) or no regular file (a FIFO is not opened)."""
    from .feature_cache import raster_reads  # feature_cache imports this module

    if not os.path.isfile(path):
        return []
    with warnings.catch_warnings():  # opening a model or a class list as a raster says nothing
        warnings.simplefilter("ignore")
        reads = raster_reads(path)
    return [] if reads is None else [file for file in reads.files if not same_file(file, path)]


def refuse_outputs_over_inputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """No output may be an input or a file GDAL reads for one (files_read_with), and no two outputs may be one file."""
    for out_name, out_path in outputs.items():
        for in_name, in_path in inputs.items():
            if in_path is not None and same_file(out_path, in_path):
                raise InputError(f"The {out_name} {out_path} is the {in_name} {in_path}: writing it would destroy "
                                 "the input. Choose another output name.")
    for in_name, in_path in inputs.items():
        read = files_read_with(in_path) if in_path is not None else []
        for out_name, out_path in outputs.items():
            if any(same_file(out_path, name) for name in read):
                raise InputError(f"The {out_name} {out_path} is a file that the {in_name} {in_path.name} reads "
                                 "(a source of a VRT, its overviews, mask or metadata): writing it would destroy "
                                 "the input. Choose another output name.")
    names = list(outputs.items())
    for i, (first_name, first) in enumerate(names):
        for second_name, second in names[i + 1:]:
            if same_file(first, second):
                raise InputError(f"The {first_name} and the {second_name} are the same file ({first}); give "
                                 "each output its own path.")


def missing_folder(directory: Path, option: str = "") -> str:
    """The sentence for an output folder that is not a folder: missing, or a file (or a path through one)."""
    another = f"another {option}" if option else "another"
    for above in (directory, *directory.parents):
        if above.exists() and not above.is_dir():
            return (f"The output folder {directory} is not a folder: {above} is a file. Choose {another}, or "
                    "remove the file.")
        if above.exists():
            break
    return f"The output folder {directory} does not exist; create it or choose {another}."


def check_output_folder(path: Path) -> None:
    """The folder of an output exists and takes new files."""
    directory = path.parent
    if not directory.is_dir():
        raise InputError(missing_folder(directory))
    read_only = pseudo = False
    try:
        info = os.statvfs(directory)
        read_only = bool(info.f_flag & os.ST_RDONLY)
        # /proc, /sys: no disk behind them, and they refuse files even to root (a FUSE mount may also say
        # 0 blocks yet take files, so only these two are refused here).
        pseudo = info.f_blocks == 0 and Path(os.path.realpath(directory)).parts[1:2] in (("proc",), ("sys",))
    except (OSError, AttributeError):
        pass
    if pseudo:
        raise InputError(f"The output folder {directory} is a system folder with no disk behind it, which "
                         "takes no files; choose another.")
    if read_only or not os.access(directory, os.W_OK):
        raise InputError(f"The output folder {directory} is not writable; choose another.")


# The longest run tag (`<pid>h<8 hex>-<32 hex>`, temporary.new_run_tag) and the text a staged name adds around an
# output's name: `.` + name + `.farslip-<tag>.tmp` + the output's suffix (and a sidecar's, e.g. `.aux.xml`).
STAGED_NAME_EXTRA = len(".") + len(".farslip-") + 20 + 1 + 8 + 1 + 32 + len(".tmp") + len(".aux.xml")


PATH_MAX_BYTES = 4095  # Linux's PATH_MAX (4096) less the closing NUL
NAME_MAX_BYTES = 255  # one folder or file name, on every common file system


def too_long(path: str | os.PathLike) -> str | None:
    """Why `path` is longer than a file system takes (a name over NAME_MAX_BYTES, or over PATH_MAX_BYTES in
    all), in words; None when it is not. Asking the file system about such a path raises OSError."""
    text = os.fsencode(os.path.abspath(path))
    if len(text) > PATH_MAX_BYTES:
        return f"is {len(text)} bytes long, more than the {PATH_MAX_BYTES} a path may have"
    longest = max(text.split(b"/"), key=len)
    if len(longest) > NAME_MAX_BYTES:
        return (f"holds a name of {len(longest)} bytes ({os.fsdecode(longest)[:40]}...), more than the "
                f"{NAME_MAX_BYTES} a folder or file name may have")
    return None


def check_path_length(path: str | os.PathLike, what: str) -> None:
    """InputError when `path` (the `what`) is too long for the file system (too_long)."""
    why = too_long(path)
    if why is not None:
        raise InputError(shortened(f"The {what} path {os.fspath(path)} {why}; choose a shorter one."))


def check_output_name(path: str | os.PathLike, what: str, gdal: bool = True) -> Path:
    """An output's name is one the file system and our temporary names can hold: no control
    characters (a newline in a file name breaks every tool that lists the folder), and short enough
    that its staged copy (a longer hidden name beside it) still fits; for a file GDAL writes (`gdal`), a UTF-8
    name (check_utf8_name). Python writes the others (a --json report, a PNG, a model folder) by any name."""
    path = Path(path)
    text = str(path)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InputError(f"The {what} path {text!r} holds the control character {bad!r}; give a file name "
                         "without tabs, newlines or other control characters.")
    if gdal:
        check_utf8_name(text, what, writes=True)
    check_path_length(path.parent, what)  # a folder's name or the whole path: asking about the folder would fail
    try:
        name_max = os.pathconf(path.parent if path.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = max(name_max - STAGED_NAME_EXTRA - len(os.fsencode(path.suffix)), 16)
    if len(os.fsencode(path.name)) > longest:
        size = len(os.fsencode(path.name))
        raise InputError(f"The name of the {what} ({path.name[:40]}...) is too long: {size} bytes, at most "
                         f"{longest} here; choose a shorter name.")
    check_path_length(path, what)
    return path


def absolute_outputs(outputs) -> dict[str, str]:
    """A run's output paths by role, as its report lists them: absolute (a report is read from anywhere, and
    a relative path meant the folder the command ran in), symbolic links and `..` kept as the user named them."""
    return {role: os.path.abspath(path) for role, path in outputs.items()}


def listed_output(report: Path, role: str) -> Path | None:
    """The output of `role` an existing run report lists (None when the report is unreadable or lists none)."""
    try:
        listed = json.loads(report.read_text("utf-8"))["outputs"][role]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(listed) if isinstance(listed, str) else None


def _report_of_another(path: Path, named: dict[str, Path]) -> str:
    """For a run report in the way: whose report it is, when it belongs to another output of the same name
    (r.shp's report is r.report.json, as r.geojson's would be), else nothing."""
    other = listed_output(path, "vector") if path.name.endswith(".report.json") else None
    if other is None or any(os.path.abspath(other) == os.path.abspath(mine) for mine in named.values()):
        return ""
    return (f" (the report of {other.name}, another result named {other.stem}: every format's report is "
            "NAME.report.json)")


def refuse_folder_name(path: str | os.PathLike, what: str) -> None:
    """An output file's name that ends in a path separator names a folder: refused, as an existing folder is.
    (pathlib drops the separator: `Path("out/")` is `out`, which the run would write as a file.) Check the
    name as given, before it becomes a Path."""
    text = os.fspath(path)
    separators = tuple(sep for sep in ("/", os.sep, os.altsep) if sep)
    if isinstance(text, str) and text.endswith(separators) and text.strip("".join(separators)):
        raise InputError(f"The {what} {text} names a folder (it ends in {text[-1]!r}); give a file name.")


def output_file_option(value: str | os.PathLike | None, what: str) -> Path | None:
    """A command's output file option as a Path (None when not given), refused by refuse_folder_name first."""
    if value is None:
        return None
    refuse_folder_name(value, what)
    return Path(value)


def check_output_files(given: Mapping[str, str | os.PathLike], inputs: dict[str, Path] | None = None,
                       overwrite: bool = False, option: str = "--overwrite",
                       replaced: Iterable[Path] | None = None, gdal: bool = True) -> None:
    """Everything the files a run writes (`given`: {what it is called in a sentence: path}) must pass
    before it starts: names the disk can hold (not a folder's: a name ending in a separator), folders that
    exist and take files, no folder or device there, none of them one of the run's `inputs` or another of
    them, and (unless `overwrite`) none of `replaced` (default: all of them) there yet. `option` is how the
    user allows overwriting; `gdal`: whether GDAL writes them (check_output_name)."""
    for what, path in given.items():
        refuse_folder_name(path, what)
    named = {what: Path(path) for what, path in given.items()}
    for what, path in named.items():
        check_output_name(path, what, gdal)
    refuse_outputs_over_inputs(named, {what: Path(path) for what, path in (inputs or {}).items() if path})
    for what, path in named.items():
        check_output_folder(path)
        check_not_special(path, what)
    if overwrite:
        from .export import check_gpkg_layer_free  # export imports what files does not: no cycle

        for what, path in named.items():
            check_gpkg_layer_free(path, what)
        return
    checked = {Path(path) for path in replaced} if replaced is not None else set(named.values())
    for what, path in named.items():
        if path not in checked:
            continue
        # A symbolic link counts as there even when it leads nowhere (or in a loop): the run's rename would
        # replace the link itself.
        if os.path.islink(path) and not os.path.exists(path):
            raise InputError(f"The {what} {path} already exists as a symbolic link to {os.readlink(path)}, which "
                             f"cannot be followed; choose another name or allow overwriting ({option}), which "
                             "replaces the link.")
        try:
            exists = path.exists()
        except OSError as error:
            raise InputError(f"The {what} {path} cannot be used ({error.strerror or error}).") from None
        if exists:
            raise InputError(f"The {what} {path} already exists{_report_of_another(path, named)}; choose another "
                             f"name or allow overwriting ({option}).")
        if is_shapefile(path):  # a shapefile is several files: its parts replace theirs, in either case
            found: list[Path] = []
            for part in shapefile_parts(path, every_case=True):
                if os.path.lexists(part) and not any(same_file(part, other) for other in found):
                    found.append(part)
            if found:
                raise InputError(f"The {what} {path} would replace {', '.join(p.name for p in found)}, which "
                                 f"already exist{'s' if len(found) == 1 else ''} beside it (the parts of another "
                                 f"shapefile, or a QGIS style); choose another name or allow overwriting ({option}).")
        # A raster's commit takes the overviews, mask and metadata of an earlier raster of its name with it
        # (atomic._staged_moves): they are the user's files until --overwrite says otherwise.
        old_sidecars = [path.name + ending for ending in raster_sidecars(path)
                        if os.path.lexists(path.parent / (path.name + ending))]
        if old_sidecars:
            raise InputError(f"The {what} {path} would replace {', '.join(old_sidecars)}, which already "
                             f"exist{'s' if len(old_sidecars) == 1 else ''} beside it (overviews, a mask or "
                             "metadata of an earlier raster of that name); choose another name or allow overwriting "
                             f"({option}).")


def check_output_file(path: str | os.PathLike, what: str, inputs: dict[str, Path] | None = None,
                      overwrite: bool = False, option: str = "--overwrite", gdal: bool = True) -> Path:
    """check_output_files for a run that writes one file."""
    check_output_files({what: path}, inputs, overwrite, option, gdal=gdal)
    return Path(path)


def input_paths(entries: Iterable[tuple[str, str | os.PathLike | None]]) -> dict[str, Path]:
    """{what: path} of the inputs that are files (registry model names and None are left out)."""
    return {what: Path(value) for what, value in entries if value is not None and os.path.exists(value)}


@contextlib.contextmanager
def vector_readable(path: str | os.PathLike) -> Iterator[Path]:
    """A name pyogrio opens `path` by: pyogrio reads a path as a URL, so `labels;2.gpkg` (or a folder `a#b`) was
    opened as `labels` (another file, or 'No such file'). Such a path is given as a link under a plain name in a
    temporary folder, with its sidecars (a shapefile's parts, a GeoPackage's journal); a copy where links
    cannot be made."""
    path = Path(path)
    if not URL_MARKS.search(str(path)):
        yield path
        return
    stem = path.name[: len(path.name) - len(path.suffix)]
    with tempfile.TemporaryDirectory(prefix="farslip-read-") as folder:
        for sibling in path.parent.iterdir():
            if sibling.name == path.name or sibling.name.startswith(stem + "."):
                alias = Path(folder) / ("layer" + sibling.name[len(stem):])
                try:
                    os.symlink(sibling.resolve(), alias)
                except OSError:  # no links here (Windows without the privilege)
                    shutil.copy2(sibling, alias)
        yield Path(folder) / ("layer" + path.suffix)
