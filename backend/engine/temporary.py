"""Temporary files and folders a run writes beside its outputs, and who may remove them.

Every temporary name carries the run's tag, `<pid>h<host>-<run id>` (`<host>`: 8 hex digits of the
computer's name, host_mark): the work folder is `.farslip-<tag>` and a file staged for `result.gpkg` is
`.result.gpkg.farslip-<tag>.tmp.gpkg` (plus sidecars). So a run (or the server job that owns the run id)
removes exactly what it created, and a later run may remove what a dead process of this computer left
behind, while the temporary files of a live process (another `farslip segment`, the server) and those of
another computer writing to the same network folder (whose pid means nothing here) are never touched.
Nothing here ever removes a name without a tag. A tag without a host (`<pid>-<run id>`, an earlier
version's) is this computer's.

A commit that renames several files into place (backend.engine.atomic) first writes its journal,
`.farslip-<tag>.commit.json`, in each folder it changes; a dead run's journal is not removed but
rolled back (its outputs taken back, the previous ones restored) before its other leftovers go.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path

WORK_PREFIX = ".farslip-"
OWNER_FILE = "owner.json"
# A run's tag: `<pid>h<host>-<id>`, or `<pid>-<id>` (an earlier version's, this computer's).
_TAG = r"(?P<tag>(?P<pid>\d+)(?:h(?P<host>[0-9a-f]{8}))?-(?P<run>[0-9a-f]{8,32}))"
# `.farslip-<tag>` (a work folder) or `.<name>.farslip-<tag>.tmp[.<ext>...]` (a staged file).
_TAGGED = re.compile(r"^\.(?:.+\.)?farslip-" + _TAG + r"(?P<tmp>\.tmp(?:\..*)?)?$", re.DOTALL)
JOURNAL_SUFFIX = ".commit.json"
# `.farslip-<tag>.commit.json`: the journal of a commit.
_JOURNAL = re.compile(r"^\.farslip-" + _TAG + r"\.commit\.json$")


def host_mark(host: str | None = None) -> str:
    """The computer in a run's tag: the first 8 hex digits of the SHA-256 of its name (socket.gethostname), so
    that two computers writing to one network folder tell their temporary files apart."""
    return hashlib.sha256((host if host is not None else socket.gethostname()).encode("utf-8")).hexdigest()[:8]


def new_run_tag(run_id: str | None = None) -> str:
    """The tag of a run in this process: `<pid>h<host>-<run id>` (a fresh random id unless given)."""
    run_id = run_id or uuid.uuid4().hex[:12]
    assert re.fullmatch(r"[0-9a-f]{8,32}", run_id), run_id
    return f"{os.getpid()}h{host_mark()}-{run_id}"


def _of_another_computer(match: re.Match, mine: str) -> bool:
    """Whether a tagged name's tag names another computer than `mine` (host_mark; a tag without a host is this
    computer's)."""
    return match["host"] is not None and match["host"] != mine


def journal_path(folder: str | Path, tag: str) -> Path:
    """The journal of run `tag`'s commit in `folder` (see backend.engine.atomic.commit_outputs)."""
    return Path(folder) / f"{WORK_PREFIX}{tag}{JOURNAL_SUFFIX}"


def run_journals(prefixes: Sequence[str | Path]) -> list[Path]:
    """The commit journals found beside the tagged temporary names `prefixes` (a job's record), of their runs."""
    found: dict[Path, None] = {}
    for prefix in prefixes:
        prefix = Path(prefix)
        match = _TAGGED.match(prefix.name)
        if match:
            journal = journal_path(prefix.parent, match["tag"])
            if journal.is_file():
                found[journal] = None
    return list(found)


def work_dir_path(folder: str | Path, tag: str) -> Path:
    """The work folder of run `tag` in `folder` (not created)."""
    return Path(folder) / f"{WORK_PREFIX}{tag}"


URL_MARKS = re.compile(r"[;?#]")  # what urllib.parse takes as the end of a URL's path


def staged_stem(path: str | Path, tag: str) -> Path:
    """`folder/.name.farslip-<tag>.tmp`: the staged copy of `path` is this + `path`'s suffix, sidecars likewise.

    The whole file name is kept, so `a.gpkg` and `a.tif` of one run are staged apart; but `;`, `?` and `#` are
    written as `_`: pyogrio reads a path as a URL and cut it there (`a;b.gpkg` was written to a stray file `.a`,
    and the run ended in a traceback). The rename into place gives the output the name asked for.
    """
    path = Path(path)
    return path.parent / f".{URL_MARKS.sub('_', path.name)}.farslip-{tag}.tmp"


def staged_path(path: str | Path, tag: str) -> Path:
    """The temporary name `path` is written under before it is renamed into place."""
    path = Path(path)
    stem = staged_stem(path, tag)
    return stem.with_name(stem.name + path.suffix)


def make_work_dir(folder: str | Path, tag: str) -> Path:
    """Create the work folder of run `tag`, with its owner (pid, host) recorded inside."""
    work = work_dir_path(folder, tag)
    work.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    (work / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    return work


def owned_entries(prefix: str | Path) -> list[Path]:
    """The entries of `prefix`'s folder named `prefix` or `prefix.<anything>` (a tagged temporary name)."""
    prefix = Path(prefix)
    assert _TAGGED.match(prefix.name), f"{prefix} is not a tagged temporary name"
    try:
        names = os.listdir(prefix.parent)
    except OSError:
        return []
    return [prefix.parent / name for name in names if name == prefix.name or name.startswith(prefix.name + ".")]


def remove_entry(path: Path) -> bool:
    """Remove one temporary file or folder; False when it was already gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def remove_owned(prefixes: Sequence[str | Path]) -> list[str]:
    """Remove the temporary entries named by `prefixes` (tagged names); returns what was removed."""
    removed = []
    for prefix in prefixes:
        for entry in owned_entries(prefix):
            if remove_entry(entry):
                removed.append(str(entry))
    return removed


def run_prefixes(output_paths: list[str | Path], tag: str) -> list[Path]:
    """Every temporary name run `tag` may create for these outputs: its work folder and staged files."""
    prefixes: list[Path] = []
    if output_paths:
        prefixes.append(work_dir_path(Path(output_paths[0]).parent, tag))
    prefixes += [staged_stem(path, tag) for path in output_paths]
    return prefixes


PROBE_BY_SIGNAL = os.name != "nt"


def process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if not PROBE_BY_SIGNAL:
        # os.kill(pid, 0) on Windows is not a probe: signal 0 is CTRL_C_EVENT, sent to a process group.
        import psutil

        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner_host(entry: Path) -> str | None:
    try:
        return json.loads((entry / OWNER_FILE).read_text(encoding="utf-8")).get("host")
    except (OSError, ValueError, AttributeError):
        return None


def dead_journals(folder: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """The commit journals in `folder` (whose entries are `names`, when listed already) of processes of this
    machine that no longer run (a journal records its machine: written_elsewhere): commits killed midway, for
    backend.engine.atomic.recover_commit."""
    folder = Path(folder)
    if names is None:
        try:
            names = os.listdir(folder)
        except OSError:
            return []
    mine = host_mark()
    return [folder / name for name in names
            if (match := _JOURNAL.match(name)) and not _of_another_computer(match, mine)
            and not process_is_alive(int(match["pid"])) and not written_elsewhere(folder / name)]


def written_elsewhere(journal: Path) -> bool:
    """Whether a commit journal records another machine as its writer (a folder shared over the network): whether
    that process still runs cannot be told from here, so its commit is never rolled back from here. A journal
    without a host (an earlier version's, or one cut short) is this machine's."""
    try:
        host = json.loads(journal.read_text(encoding="utf-8")).get("host")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(host, str) and host != socket.gethostname()


def remove_stale(folder: str | Path) -> list[str]:
    """Remove temporary entries in `folder` left by processes of this machine that no longer run.

    Only tagged names are considered; those of live processes, of this process, those whose tag names another
    machine, work folders recorded as belonging to another machine and the entries of a commit another machine
    journaled here (a shared network folder) are left alone.
    """
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    # A dead run's commit first: rolled back (or finished) while its staged files, which tell how far it got,
    # are still there.
    for journal in dead_journals(folder, names):
        from .atomic import recover_commit

        try:
            recover_commit(journal)
        except OSError:
            continue  # left for the next sweep
        removed.append(str(journal))
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = socket.gethostname()
    mine = host_mark(host)
    # The runs whose commit another machine is making here (a shared folder): their staged files and the
    # previous outputs they set aside are that commit's, whatever their pid means on this machine.
    elsewhere = {match["tag"] for name in names if (match := _JOURNAL.match(name)) and written_elsewhere(folder / name)}
    for name in names:
        match = _TAGGED.match(name)
        # Another computer's run (its tag says so): whether its process runs cannot be told from here.
        if (not match or _of_another_computer(match, mine) or process_is_alive(int(match["pid"]))
                or match["tag"] in elsewhere):
            continue
        entry = folder / name
        if entry.is_dir() and _owner_host(entry) not in (None, host):
            continue
        try:
            if remove_entry(entry):
                removed.append(str(entry))
        except OSError:
            continue  # not ours to fight over: leave it
    return removed
