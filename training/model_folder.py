"""The folder a training writes: a hidden `.NAME.partial` working folder beside --out, renamed into place.

The working folder names its owner (the process writing it), so a second training for the same
--out is refused while the first runs, and a dead one's folder is taken over. It holds the
checkpoint that `--resume` continues from. Only a finished model replaces --out, and only when
--out is a model folder `farslip train` wrote.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from backend.engine.atomic import StagedOutputs, atomic_output, shared_file_mode, write_text_atomically
from backend.engine.errors import InputError
from backend.engine.files import check_output_folder, check_output_name, is_inside, missing_folder
from backend.engine.finetuned import FINETUNED_FORMAT, FINETUNED_META, recover_model_folder
from backend.engine.temporary import new_run_tag, process_is_alive

if TYPE_CHECKING:  # torch-free at import: the command line checks --out before torch loads
    import torch

    from backend.engine.models import LoadedModel

CHECKPOINT_DIR = "checkpoint"
OWNER_FILE = "owner.json"  # in the working folder: the pid (and machine) of the training writing it
OTHER_MACHINE = -1  # _owner's answer for a training of another machine


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors creates 0600 files; model folders are meant to be shared.
    with atomic_output(path, mode=shared_file_mode()) as staged:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staged), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def copy_text_tower(loaded: LoadedModel, work: Path) -> None:
    """A model with a Hugging Face text tower keeps that tower's files in its own text_tower/ folder,
    so the fine-tuned model loads offline anywhere."""
    from backend.engine.hf_text import copy_tower

    tower = loaded.metadata.get("text_tower")
    if tower:
        copy_tower(Path(tower["config"]), Path(tower["tokenizer"]), work / "text_tower")


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def is_model_folder(path: Path) -> bool:
    """A folder `farslip train` wrote: its farslip_model.json names our format."""
    try:
        return json.loads((path / FINETUNED_META).read_text(encoding="utf-8")).get("format") == FINETUNED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def out_folder(value: str | os.PathLike, option: str = "--out") -> Path:
    """--out (`option`, as the user spells it) as a Path; an empty or blank one is refused: Path("") is the
    current folder, which training would then be asked to replace."""
    if isinstance(value, str) and not value.strip():
        raise InputError(f"{option} is empty: give the folder to write the fine-tuned model into (a new or empty "
                         "folder).")
    return Path(value)


def default_model_name(raster: str | os.PathLike, labels: str | os.PathLike) -> str:
    """The name a training without --out gives its model: the raster's and the labels' file names (no
    extensions, no layer), in letters, digits, '.', '_' and '-' only, so it is typed as --model NAME as is."""
    from backend.engine.files import raster_file
    from training.labels import vector_file

    def stem(path: Path | None) -> str:
        text = re.sub(r"[^\w.-]+", "-", path.stem if path is not None else "").strip(".-_")
        # At most 60 bytes (not characters): two of them, the joining '-' and a '-2' stay within a folder
        # name's limit in any script (Cyrillic takes 2 bytes a letter, CJK 3).
        return text.encode("utf-8")[:60].decode("utf-8", "ignore").rstrip(".-_")

    parts = [part for part in (stem(raster_file(raster)), stem(vector_file(os.fspath(labels)))) if part]
    return "-".join(dict.fromkeys(parts)) or "model"


def default_out_folder(raster: str | os.PathLike, labels: str | os.PathLike, taken: Iterable[str] = ()) -> Path:
    """Where a training without --out writes its model: a new folder in the models folder
    ($FARSLIP_HOME/models, which `farslip models` and GET /v1/models list, so the model is then used by its
    name), named by default_model_name with -2, -3 ... after it where that name is in use: an existing
    file or folder, an interrupted training's working folder, a registry model's name, a path in `taken`
    (what queued trainings will write), or a file or folder of that name in the current folder (which
    `--model NAME` would load first). Nothing existing is ever replaced. The models folder is made here, and
    the chosen name's working folder is made and claimed for this process (reserve): two trainings without
    --out started at once never choose the same folder (the second was refused once it had loaded its model,
    or with --overwrite replaced the first one's model)."""
    from backend.engine import paths
    from backend.engine.registry import known_models
    from backend.engine.sam_models import known_sam_models

    root = paths.models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"The models folder {root} cannot be made ({error.strerror or error}); give --out, the "
                         "folder to write the fine-tuned model into.") from None
    reserved = {name.lower() for name in (*known_models(), *known_sam_models())}
    busy = {os.path.realpath(path) for path in taken}
    base = default_model_name(raster, labels)
    for number in itertools.count(1):
        out = root / (base if number == 1 else f"{base}-{number}")
        if (out.name.lower() not in reserved and not os.path.lexists(out) and os.path.realpath(out) not in busy
                and not os.path.lexists(out.name) and (_own_reservation(partial_dir(out)) or reserve(out))):
            return out
    raise AssertionError("unreachable")


def reserve(out: Path) -> bool:
    """Make the working folder of `out` and claim it for this process, all at once or not at all: False when it
    exists (another training has it). Until this process's training takes it over (start_work_folder), it holds
    nothing but its owner; it is removed when the process ends without having used it."""
    work = partial_dir(out)
    try:
        work.mkdir()
    except FileExistsError:
        if not _take_over_abandoned(work):
            return False
        try:
            work.mkdir()
        except OSError:  # another training took it over first: the next name
            return False
    except OSError:
        return True  # not made here: start_work_folder says why, in its own words
    try:
        claim(work)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        return True
    atexit.register(_release, work)
    return True


# A working folder with no owner file is taken for abandoned only this long after it was made: a training that
# reserves a name writes its owner file right after making the folder.
UNCLAIMED_GRACE_S = 60.0


def _take_over_abandoned(work: Path) -> bool:
    """Remove `work` when it is a reservation whose training died before it used it (SIGKILL, a power cut, a
    closed terminal: the exit handler that removes it never ran): nothing in it but its owner file, naming a
    process that no longer runs, or nothing at all for over UNCLAIMED_GRACE_S. Such a folder made every later
    training without --out skip to the next name (NAME-2) for good. A working folder with anything else in it
    (an interrupted training's checkpoint, a trained model kept after a failed replace) is never touched.
    True when it was removed here; of two trainings at once, only one removes it (a rename aside first)."""
    try:
        if not work.is_dir() or work.is_symlink():
            return False
        seen = _abandoned(work)
        if seen is None:
            return False
        aside = work.with_name(f"{work.name}.abandoned-{new_run_tag()}")
        os.rename(work, aside)  # whole: another training removing it too finds nothing to rename
        if _abandoned(aside, grace=False) != seen:  # another training took it over in between: its own again
            os.rename(aside, work)
            return False
    except OSError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _abandoned(work: Path, grace: bool = True) -> str | None:
    """What shows the reservation `work` abandoned ("owner PID", a process no longer running, or "unclaimed"
    past the grace time), else None."""
    entries = os.listdir(work)
    if entries == [OWNER_FILE]:
        pid = _owner(work)
        return None if pid is None or pid == os.getpid() or _running(pid) else f"owner {pid}"
    if entries or (grace and time.time() - work.stat().st_mtime < UNCLAIMED_GRACE_S):
        return None
    return "unclaimed"


def _own_reservation(work: Path) -> bool:
    """A working folder this process reserved and has not used (a server's request refused after its folder was
    chosen): nothing in it but its owner, this process."""
    try:
        return (work.is_dir() and not work.is_symlink() and _owner(work) == os.getpid()
                and os.listdir(work) == [OWNER_FILE])
    except OSError:
        return False


def _release(work: Path) -> None:
    if _own_reservation(work):
        shutil.rmtree(work, ignore_errors=True)


def release_reservation(out: Path) -> None:
    """Let the name `out` go when this process reserved it (default_out_folder) and has not used it: a server's
    train request refused after its folder was chosen (the server lives on, so its exit handler would not)."""
    _release(partial_dir(out))


def check_out_folder(out: Path, overwrite: bool, resume: bool, inputs: dict[str, Path]) -> None:
    """--out may be replaced only when it is a model folder this project wrote, holding none of the inputs."""
    if not out.parent.is_dir():
        raise InputError(missing_folder(out.parent, "--out"))
    check_output_name(out, "--out folder", gdal=False)
    check_output_folder(out)  # the folder that takes --out (and its working folder beside it)
    # Said before whether an input lies inside it: an existing file (an input itself, say) is no folder at all.
    if os.path.lexists(out) and (not out.is_dir() or out.is_symlink()):
        raise InputError(f"{out} exists and is not a model folder; choose another --out (a fine-tuned model is "
                         "written as a new folder).")
    for what, path in inputs.items():
        if is_inside(path, out):
            raise InputError(f"The {what} {path} lies inside {out}, which training writes; choose another --out.")
    work = partial_dir(out)
    if not resume and not overwrite and kept_checkpoint(out) and not _is_live(work):
        raise InputError(f"An interrupted training of {out} kept its last finished epoch in {work}; continue it "
                         "with --resume, or start over with --overwrite (which discards it).")
    if not os.path.lexists(out):
        return
    if not out.is_dir() or out.is_symlink():
        raise InputError(f"{out} exists and is not a model folder; choose another --out (a fine-tuned model is "
                         "written as a new folder).")
    if resume or empty_folder(out):  # an empty folder (`mkdir my-model`) holds nothing to lose: the model goes in it
        return
    if not is_model_folder(out):  # said first: --overwrite, which the next sentence offers, never replaces it
        raise InputError(f"{out} is a folder that farslip train did not write (it has no {FINETUNED_META}) and "
                         "it is not empty: training never replaces it, with or without --overwrite. Choose another "
                         "--out (a new or empty folder).")
    if not overwrite:
        raise InputError(f"{out} already exists; choose another --out, continue it with --resume, or "
                         "replace it with --overwrite.")


def empty_folder(path: Path) -> bool:
    """A real folder (not a link to one) with nothing in it."""
    try:
        if not path.is_dir() or path.is_symlink():
            return False
        with os.scandir(path) as entries:
            return not any(entries)
    except OSError:
        return False


def claim(work: Path) -> None:
    # Whole or not at all: another training reading an empty owner file would take the folder as free. The
    # machine too: on a folder shared over the network, another machine cannot tell whether the pid runs.
    write_text_atomically(work / OWNER_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def kept_checkpoint(out: Path) -> bool:
    """Whether the working folder of --out holds the checkpoint of an interrupted training (--resume's)."""
    return (partial_dir(out) / CHECKPOINT_DIR / "state.pt").is_file()


def _owner(work: Path) -> int | None:
    """The pid of the training that owns `work`, None when none is recorded. One recorded on another machine
    (a folder shared over the network) is OTHER_MACHINE: a pid that runs nowhere here, always taken as live."""
    try:
        owner = json.loads((work / OWNER_FILE).read_text(encoding="utf-8"))
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    host = owner.get("host")
    return OTHER_MACHINE if isinstance(host, str) and host != socket.gethostname() else pid


def _running(pid: int) -> bool:
    """Whether the owner `pid` (as _owner gives it) runs: another machine's always counts as running."""
    return pid == OTHER_MACHINE or process_is_alive(pid)


def _is_live(work: Path) -> bool:
    """Whether another process that is still running owns the working folder."""
    pid = _owner(work)
    return pid is not None and pid != os.getpid() and _running(pid)


def interrupted_training(out: Path) -> str | None:
    """After a training that was stopped without cleaning up (its process killed): where its kept checkpoint
    is, as a sentence, or None when it left none to resume (its working folder, no longer anyone's, removed).
    One killed while it put its model in place is rolled back (or finished) first, and says so."""
    recovered = recover_model_folder(out)
    if recovered is not None:
        return recovered
    work = partial_dir(out)
    if kept_checkpoint(out):
        # Each way on offers what check_out_folder then accepts: a plain run is refused while a checkpoint is kept.
        return (f"{out} was not written, but its last checkpoint is kept in {work}: train again with --resume "
                "and this --out to go on from it, or start over with --overwrite (which discards it).")
    if work.is_dir() and not _is_live(work):
        shutil.rmtree(work, ignore_errors=True)
    return None


def refuse_if_live(work: Path) -> None:
    """Another training writing the same --out right now keeps its working folder."""
    pid = _owner(work)
    if pid is None:
        return
    if pid == OTHER_MACHINE:
        raise InputError(f"A training on another computer is writing {work} for the same --out (its owner file "
                         "names that computer); wait for it to finish or choose another --out.")
    if pid != os.getpid() and process_is_alive(pid):
        raise InputError(f"Another training (process {pid}) is writing {work} for the same --out right now; "
                         "wait for it to finish or choose another --out.")


def check_resumable(out: Path) -> Path:
    """The folder a resumed training continues from: the working folder of an interrupted run, else the
    finished model's own checkpoint; InputError when neither holds one."""
    work = partial_dir(out)
    for folder in (work, out):
        if (folder / CHECKPOINT_DIR / "state.pt").is_file():
            return folder
    raise InputError(f"There is no training to resume for {out}: neither {out} nor {work} holds a "
                     f"{CHECKPOINT_DIR}/ folder. Run without --resume to start training.")


def start_work_folder(out: Path, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The working folder, and whether it holds a checkpoint to resume."""
    check_out_folder(out, overwrite, resume, {})
    work = partial_dir(out)
    refuse_if_live(work)
    if resume:
        if check_resumable(out) == work:
            claim(work)
            return work, True
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(out, work)
        claim(work)
        return work, True
    if _owner(work) == os.getpid() and work.is_dir() and not work.is_symlink():
        # This process's own (reserved by default_out_folder): emptied, but never let go of, so no other training
        # can take the name meanwhile.
        for entry in list(work.iterdir()):
            if entry.name == OWNER_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        claim(work)
        return work, False
    # A working folder left by a training that is no longer running (ours by name, its owner gone).
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        claim(work)
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        raise InputError(f"Cannot create the working folder {work} for --out {out} ({error.strerror or error}); "
                         "choose another --out.") from error
    return work, False


def move_into_place(work: Path, out: Path, report: tuple[Path, str] | None = None) -> None:
    """Replace `out` (a model folder, checked before training) by the finished `work` folder, then write
    `report` ((path, text): the --json file, the marker of a finished run), all or nothing: when a step fails,
    the previous `out` is back in place, the trained model is back in `work` (--resume puts it in place) and
    no report is written. A commit like segment's outputs' (backend.engine.atomic.commit_outputs): its journal
    is written first, so a process killed between the renames (the previous model set aside, the new one not
    yet in) is rolled back by the next training of `out`, a load of the model there or the server's restart
    (backend.engine.finetuned.recover_model_folder), which say so."""
    out, work = Path(os.path.abspath(out)), Path(os.path.abspath(work))
    tag = new_run_tag()
    target = Path(os.path.abspath(report[0])) if report else None
    with StagedOutputs({"report": target} if target else {}, tag) as staged:
        if report is not None:
            staged["report"].write_text(report[1], encoding="utf-8")
        try:
            # A folder at --out (a model, checked before training, or an empty folder) is set aside first.
            staged.commit(first={work: out}, keep={work})
        except OSError as error:
            reason = error.strerror or str(error)
            where = f" for {error.filename}" if error.filename else ""
            raise InputError(f"Cannot put the trained model in place ({reason}{where}); {out} is as it was and "
                             f"the trained model is kept in {work}: free the place, then run the same command "
                             "with --resume to put it in place.") from error
        finally:
            # Kept until the model is in place (also when a Ctrl+C held by the commit comes once it is): another
            # training for this --out is refused until then.
            if staged.committed:
                (out / OWNER_FILE).unlink(missing_ok=True)
