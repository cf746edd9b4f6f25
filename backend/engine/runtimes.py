"""Faster CPU runtimes for the image encoder: OpenVINO and ONNX Runtime, torch eager as the reference.

The dense vision tower (with its training-free last block) is exported once per (weights sha256,
attention variant, crop size, RECIPE) into the cache folder and reused by later runs: OpenVINO
converts the torch module itself (its attention becomes one fused ScaledDotProductAttention op,
which the ONNX route loses), ONNX Runtime reads a torch.onnx export. An export is kept only if it
reproduces torch within EXPORT_TOLERANCE on a check batch. The tower's global (CLS) path, which the
quality estimate's region checks run, is exported beside it on first use (global.xml / global.onnx).
The verdict of that check names the sha256 of the exact files it judged: files changed since (a damaged
or replaced export) are judged again, and an export that no longer loads or no longer passes is exported
again, once, on that run. Anything else that goes wrong (runtime not installed, export or compile
failure, a result too far from torch) falls back to the next runtime, torch last, with a one-line
notice: a run never fails because of its runtime (but the engine refuses output that is not a number).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_output, write_text_atomically
from .options import RUNTIMES  # declared with the --runtime option (its choices)
from .encoders import DenseTower, Encoder, TorchEncoder, crop_size
from .feature_cache import (TOWER_CODE, TOWER_LIBRARIES, engine_digest, identity_digest, library_versions,
                            model_identity)
from .paths import cache_dir
from .weights import files_sha256

log = logging.getLogger("farslip.runtimes")

COMPILED = ("openvino", "onnxruntime")
EXPORT_TOLERANCE = 1e-4
EXTRA_HINT = "pip install 'farslip-qgis[cpu-runtimes]'"
AUTO_MIN_CROPS = 32  # below this, a first export would cost more than it saves
# How the exports are made; part of the cache folder's name, so a changed recipe never reuses the
# files of an older one. 2: OpenVINO converted from torch directly instead of from the ONNX file.
RECIPE = 2
# The files each runtime reads, beside the export's stem (encoder, global).
EXPORT_SUFFIXES = {"openvino": (".xml", ".bin"), "onnxruntime": (".onnx",)}
OPENVINO_BLOBS = "openvino"  # OpenVINO's compiled-model cache, inside the export folder


def runtime_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def import_openvino():
    """`import openvino`, without OpenVINO's usage telemetry.

    Importing openvino (its model converter) otherwise sends an event to Google Analytics from a
    forked process unless the user opted out: a network call a GIS analyst did not ask for, and a
    fork of a process that runs threads, whose child can deadlock in the resolver and then holds the
    process at exit. With the telemetry package marked absent, OpenVINO uses its built-in no-op stub.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: importing it raises ImportError
    import openvino

    return openvino


def exports_dir() -> Path:
    return cache_dir() / "encoders"


class CompiledEncoder:
    """A compiled encoder for full-size crops; other crop sizes (rasters smaller than a crop) use torch.

    `embed_images` runs the global (CLS) path under the same runtime, compiled when first asked for
    (`build_global`); if that fails, torch runs it, with a line in the log. `remedy`: what a user can do
    when its output is not a number (the engine refuses such a run).
    """

    def __init__(self, name: str, infer: Callable[[np.ndarray], np.ndarray], crop: int, fallback: TorchEncoder,
                 build_global: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None,
                 folder: Path | None = None):
        self.name = name
        self.remedy = (f"Its cached export may be damaged: delete {folder} (the next run exports and checks it "
                       f"again), or run with --runtime torch." if folder is not None else
                       "Run with --runtime torch.")
        self.infer = infer
        self.crop = crop
        self.fallback = fallback
        self._build_global = build_global
        self._global: Callable[[np.ndarray], np.ndarray] | None = None
        self._retry_global: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None
        self._global_lock = threading.Lock()

    def retry_failed(self) -> None:
        """Try the global path's build again at its next use, if it failed for a reason of the moment."""
        with self._global_lock:
            if self._retry_global is not None:
                self._build_global, self._retry_global = self._retry_global, None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.crop, self.crop):
            return self.fallback(pixels)
        return torch.from_numpy(self.infer(np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.float32)))

    def global_runtime(self) -> str:
        """The runtime that runs the global path of full-size crops: this one once it is built (now, if it was
        not yet), torch when it could not be."""
        with self._global_lock:
            if self._global is None and self._build_global is not None:
                try:
                    self._global = self._build_global()
                except Exception as error:  # an exporter or compiler failure must never fail the run
                    log.debug("runtime %s: global image path", self.name, exc_info=True)
                    log.warning("runtime %s: global image path unavailable (%s); using torch", self.name,
                                error_reason(error))
                    if _of_the_moment(error):  # a full disk: the next run tries again (make_encoder)
                        self._retry_global = self._build_global
                self._build_global = None
        return self.name if self._global is not None else "torch"

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop, crop) normalised crops -> (B, D) image embeddings of CLIP's global path (unnormalised)."""
        self.global_runtime()
        if self._global is None or tuple(pixels.shape[-2:]) != (self.crop, self.crop):
            return self.fallback.visual(pixels)
        return torch.from_numpy(self._global(np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.float32)))


def _onnx_file(tower: torch.nn.Module, example: torch.Tensor, folder: Path, stem: str = "encoder") -> Path:
    """The tower as ONNX (batch dimension free), exported once."""
    path = folder / f"{stem}.onnx"
    if path.exists():
        return path
    # nn.MultiheadAttention's fused inference kernel (the global path's blocks) has no ONNX form.
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with atomic_output(path, durable=False) as staged, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape checks
            torch.onnx.export(tower, (example,), str(staged), input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=17, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return path


def _openvino_file(tower: torch.nn.Module, example: torch.Tensor, folder: Path, stem: str = "encoder") -> Path:
    """The tower as OpenVINO IR (<stem>.xml + .bin, fp32 weights, batch dimension free), converted once."""
    ov = import_openvino()

    path = folder / f"{stem}.xml"
    if path.exists():
        return path
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Traced here rather than by convert_model: its trace check fails when a model is traced twice
        # in one process (two attention variants, a server), and the check adds nothing to ours below.
        traced = torch.jit.trace(tower, example, check_trace=False, strict=False)
        model = ov.convert_model(traced, input=[ov.PartialShape([-1, *example.shape[1:]])])
    with atomic_output(path, durable=False) as staged:
        ov.save_model(model, str(staged), compress_to_fp16=False)  # writes the .bin beside it, renamed with it
    return path


def _split_batch(pixels: np.ndarray, parts: int) -> list[np.ndarray]:
    """A batch cut into up to `parts` slices of whole crops (fewer when the batch is smaller)."""
    return np.array_split(pixels, max(1, min(parts, len(pixels))))


def _openvino(tower: torch.nn.Module, example: torch.Tensor, folder: Path,
              stem: str = "encoder") -> Callable[[np.ndarray], np.ndarray]:
    ov = import_openvino()

    core = ov.Core()
    # Compiled blobs, one folder per exported tower: later starts are quick, and each tower's verdict covers
    # the blob that runs it (_judged_files).
    core.set_property({"CACHE_DIR": str(_blob_folder(folder, stem))})
    # One request, all cores. Throughput streams with a slice of the batch per request were as fast and
    # less slowed down by other programs, but with more requests than streams (and another compiled model
    # in the process) some requests intermittently returned wrong features (0.01-0.1 off) until the
    # process ended, a failure that no one-off check would see.
    compiled = core.compile_model(str(_openvino_file(tower, example, folder, stem)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    lock = threading.Lock()  # a server's jobs share the encoder: one batch at a time through the request

    def infer(pixels: np.ndarray) -> np.ndarray:
        with lock:
            return np.array(request.infer({0: pixels})[0], dtype=np.float32, copy=True)

    return infer


def _onnxruntime(tower: torch.nn.Module, example: torch.Tensor, folder: Path,
                 stem: str = "encoder") -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    onnx_path = _onnx_file(tower, example, folder, stem)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One single-threaded run per core, each on a slice of the batch (a session runs concurrent calls
    # safely): as fast as one run on all cores on an idle machine, and much less slowed down when other
    # programs share the cores, as a single-threaded run never waits for a descheduled sibling thread.
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    threads = max(1, torch.get_num_threads())
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="farslip-onnxruntime")
    lock = threading.Lock()

    def run(part: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": part})[0]

    def infer(pixels: np.ndarray) -> np.ndarray:
        with lock:
            return np.concatenate(list(pool.map(run, _split_batch(pixels, threads))))

    return infer


BUILDERS = {"openvino": _openvino, "onnxruntime": _onnxruntime}

# OpenVINO puts where an error was raised before its reason, a line per layer it passed through.
_LOCATION_LINE = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:?)$")


def error_reason(error: BaseException) -> str:
    """An exporter's or runtime's error in one line: its first line that says what went wrong (not one of
    OpenVINO's source locations), with the lines that one introduces when it ends in ':'. A system error in its
    words ("No space left on device: /path"), without Python's "[Errno 28]"."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not _LOCATION_LINE.match(line)]
    if not lines:
        return type(error).__name__
    reason = lines.pop(0)
    while reason.endswith(":") and lines:
        reason += " " + lines.pop(0)
    return reason[:200]


def _export_files(name: str, folder: Path, stem: str) -> list[Path]:
    return [folder / f"{stem}{suffix}" for suffix in EXPORT_SUFFIXES[name]]


def _host_key() -> str:
    """8 hex digits of host_identity: this computer as OpenVINO compiles for it (its processor, the threads)."""
    return identity_digest({"host": host_identity()})[:8]


def _blob_folder(folder: Path, stem: str) -> Path:
    """OpenVINO's compiled blobs of one exported tower on this computer (a blob is compiled for its processor
    and thread count), which this computer's verdict covers (_verdict_path)."""
    return folder / OPENVINO_BLOBS / f"{stem}-{_host_key()}"


def _judged_files(name: str, folder: Path, stem: str) -> list[Path]:
    """What a verdict vouches for: the export's files, and OpenVINO's compiled blob of them, which is what later
    starts run (imported instead of compiling the files; damaged, it would give wrong features unjudged)."""
    files = _export_files(name, folder, stem)
    if name == "openvino":
        blobs = _blob_folder(folder, stem)
        files += sorted(path for path in blobs.iterdir() if path.is_file()) if blobs.is_dir() else []
    return files


def _verdict_path(name: str, folder: Path, stem: str) -> Path:
    """check-<runtime>[-<stem>].json; OpenVINO's per computer (-<host key>), as it vouches for this computer's
    compiled blob too: one verdict shared by two computers, or by a run and Ray workers of other thread counts,
    named one blob at a time, and each start of the other judged and compiled again."""
    parts = [f"check-{name}", *([] if stem == "encoder" else [stem]), *([_host_key()] if name == "openvino" else [])]
    return folder / ("-".join(parts) + ".json")


def _files_identity(files: list[Path]) -> dict[str, str]:
    """File name -> sha256 (remembered by the files' stat identity, so unchanged files are not read again)."""
    return {path.name: sha for path, sha in zip(files, files_sha256([*files]))}


def _verdict(name: str, folder: Path, stem: str) -> dict | None:
    """The comparison with torch of the export files as they are now; None when these bytes were never
    judged (no verdict, an unreadable one, one about other bytes or an older version's, a file missing)."""
    files = _export_files(name, folder, stem)
    try:
        verdict = json.loads(_verdict_path(name, folder, stem).read_text())
        if not isinstance(verdict, dict) or not isinstance(verdict.get("ok"), bool) or \
                not isinstance(verdict.get("files"), dict) or not all(path.is_file() for path in files):
            return None
        return verdict if verdict["files"] == _files_identity(_judged_files(name, folder, stem)) else None
    except (OSError, ValueError):
        return None


def _judge(name: str, infer, tower: torch.nn.Module, example: torch.Tensor, folder: Path, stem: str) -> dict:
    """Compare the runtime with torch on the check batch; remember the verdict with the files it judged."""
    with torch.inference_mode():
        expected = tower(example).numpy()
    difference = float(np.abs(infer(example.numpy()) - expected).max())
    verdict = {"runtime": name, "max_abs_diff": difference,
               "ok": difference <= EXPORT_TOLERANCE,  # False for NaN too
               "files": _files_identity(_judged_files(name, folder, stem))}
    write_text_atomically(_verdict_path(name, folder, stem), json.dumps(verdict), durable=False)
    return verdict


def _differs(verdict: dict) -> str:
    difference = verdict["max_abs_diff"]
    if not np.isfinite(difference):
        return "its features are not numbers (NaN or infinite) where torch's are"
    return f"its features differ from torch by {difference:.1e} (more than {EXPORT_TOLERANCE:g})"


def _remove_export(name: str, folder: Path, stem: str) -> None:
    """The export's files and verdict gone, and OpenVINO's compiled blobs (made from such files)."""
    for path in (*_export_files(name, folder, stem), _verdict_path(name, folder, stem)):
        path.unlink(missing_ok=True)
    if name == "openvino":
        shutil.rmtree(_blob_folder(folder, stem), ignore_errors=True)


def load_runtime(name: str) -> None:
    """Import runtime `name`'s package. Raises when it does not load (a broken install): then the runtime is
    what fails, not the export on disk, which is kept for when the runtime works again."""
    if name == "openvino":
        import_openvino()
    else:
        import onnxruntime  # noqa: F401


def _checked_runtime(name: str, tower: torch.nn.Module, example: torch.Tensor, folder: Path,
                     stem: str = "encoder", notice: Callable[[str], None] | None = None
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """Runtime `name` running the export of `tower` in `folder`, made when missing, compared with torch once
    per version of its files. Files never judged as they are now are judged again; files that do not load,
    or fail a judgement they had not passed as these bytes (a damaged export), are exported again on this
    run, with a notice. Raises when the runtime cannot run the tower within EXPORT_TOLERANCE of torch, or
    does not load at all (the export is then left as it is)."""
    load_runtime(name)
    verdict = _verdict(name, folder, stem)
    if verdict is not None and not verdict["ok"]:
        raise RuntimeError(_differs(verdict))  # these very files were judged before
    if all(path.is_file() for path in _export_files(name, folder, stem)):
        if verdict is None and name == "openvino":
            # Judge the files themselves, and the blob compiled from them now: OpenVINO would run a blob compiled
            # from the files as they were, or one damaged since.
            shutil.rmtree(_blob_folder(folder, stem), ignore_errors=True)
        try:
            infer = BUILDERS[name](tower, example, folder, stem)
            verdict = verdict or _judge(name, infer, tower, example, folder, stem)
            if verdict["ok"]:
                return infer
            problem = _differs(verdict)
        except Exception as error:  # a damaged export: made again below
            log.debug("runtime %s: cached export %s in %s", name, stem, folder, exc_info=True)
            problem = f"it did not load: {error_reason(error)}"
        if notice is not None:
            notice(f"The cached {name} export in {folder} could not be used ({problem}); exporting it again.")
    _remove_export(name, folder, stem)
    infer = BUILDERS[name](tower, example, folder, stem)
    verdict = _judge(name, infer, tower, example, folder, stem)
    if not verdict["ok"]:
        raise RuntimeError(_differs(verdict))
    return infer


def export_folder(loaded, attention: str, crop: int) -> Path:
    """Where the exported tower of `loaded` lives: keyed by everything that changes its features (the same
    weight bytes load as QuickGELU or GELU, in fp32 or fp16: feature_cache.model_identity; not the weights'
    sha256 alone), the attention variant, the crop size, the export recipe and the code of the tower exported
    (an upgrade that changes it exports again instead of running the earlier tower)."""
    versions = library_versions()
    tower = identity_digest({"code": engine_digest(TOWER_CODE),
                             "libraries": {name: versions[name] for name in TOWER_LIBRARIES}})[:8]
    return exports_dir() / f"{identity_digest(model_identity(loaded))[:24]}-{attention}-{crop}-r{RECIPE}-{tower}"


def _log_notice(sentence: str) -> None:
    log.warning("%s", sentence)


def _log_info(sentence: str) -> None:
    log.info("%s", sentence)


def compiled_encoder(name: str, loaded, attention: str,
                     notice: Callable[[str], None] | None = None) -> CompiledEncoder:
    """Export (or reuse) and compile the dense tower for `name`; raises on any failure. `notice` hears
    about a damaged export made again."""
    visual = loaded.model.visual
    crop = crop_size(visual)
    folder = export_folder(loaded, attention, crop)
    folder.mkdir(parents=True, exist_ok=True)
    tower = DenseTower(visual, attention).eval()
    example = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0)) * 4 - 2
    infer = _checked_runtime(name, tower, example, folder, notice=notice)

    def build_global() -> Callable[[np.ndarray], np.ndarray]:
        # open_clip's vision tower returns the projected CLS embedding: encode_image without normalising.
        # Built while a run estimates its quality, long after its notices were said: into the log.
        return _checked_runtime(name, visual.eval(), example, folder, "global", notice=_log_notice)

    return CompiledEncoder(name, infer, crop, TorchEncoder(visual, attention, torch.device("cpu")), build_global,
                           folder)


def pick_runtime(runtime: str, device: torch.device, crops: int | None = None, full_size: bool = True) -> list[str]:
    """Runtimes to try in order for `runtime` on `device` (torch always last).

    auto: on the CPU the installed compiled runtimes, fastest first, when the run is large enough
    (AUTO_MIN_CROPS) to repay a first export; on a GPU torch with fp16 autocast. Without `full_size`
    crops (a raster smaller than the model input on a side has only smaller ones, which only torch
    runs), torch.
    """
    if device.type != "cpu" or not full_size:
        return ["torch"]  # the compiled runtimes here are CPU builds
    if runtime == "auto":
        if crops is not None and crops < AUTO_MIN_CROPS:
            return ["torch"]
        return [name for name in COMPILED if runtime_installed(name)] + ["torch"]
    return [runtime, "torch"] if runtime in COMPILED else ["torch"]


# model -> {(runtimes, attention, half): (encoder, the sentences of the runtimes it fell back from)}
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_encoder(loaded, attention: str, runtime: str = "auto", half: bool | None = None,
                 notice: Callable[[str], None] | None = None, crops: int | None = None,
                 raster_shape: tuple[int, int] | None = None, timing: bool = True,
                 inform: Callable[[str], None] | None = None) -> Encoder:
    """The image encoder for `runtime` (auto, torch, openvino, onnxruntime), falling back to the next, torch last.

    `crops`: how many crops the run encodes; `raster_shape`: (height, width) of the grid they are cut from.
    Kept per loaded model, so a server compiles once and later jobs start at once; `notice` hears, on every
    call, each runtime the encoder fell back from; `inform` (default: the log) the one-time timing of the
    runtimes under auto, with its figures, which is no warning. Without `timing`, auto never times the runtimes
    itself (a Ray worker, whose siblings share the cores): it follows earlier figures, else the fixed order.
    """
    assert runtime in RUNTIMES, runtime
    device = loaded.device
    crop = crop_size(loaded.model.visual)
    full_size = raster_shape is None or min(raster_shape) >= crop
    say = notice or (lambda sentence: None)
    if runtime in COMPILED and device.type != "cpu":
        say(f"--runtime {runtime} runs on the CPU only; using torch on {device}.")
    elif runtime in COMPILED and not full_size:
        say(f"--runtime {runtime} runs only crops of the model's input size ({crop}x{crop} pixels), and this "
            "raster is smaller than that on a side, so all its crops are too; using torch.")
    candidates = pick_runtime(runtime, device, crops, full_size)
    known = _ENCODERS.setdefault(loaded.model, {})
    if runtime == "auto" and device.type == "cpu" and full_size:
        if candidates == ["torch"]:
            # A small run: a runtime already built for this model (in this process, or exported and judged on
            # disk) costs no export, and gives the features the larger runs before it cached, so a zoomed-in
            # re-run finds them (the feature cache keeps each runtime's features apart).
            ready = [name for name in COMPILED
                     if runtime_installed(name) and _ready(loaded, attention, half, name, known)]
            candidates = _fastest_first(loaded, attention, [*ready, "torch"], timed_only=True)
        else:
            candidates = _fastest_first(loaded, attention, candidates, timed_only=not timing, known=known,
                                        half=half, notice=say, inform=inform or _log_info)
    key = (tuple(candidates), attention, half)
    built = known.pop(key, None) or _build_encoder(loaded, attention, candidates, half, say)
    if _lasting(built[1]):  # else this run's only: the next one tries the runtime again
        known[key] = built
    encoder, fallbacks = built
    if isinstance(encoder, CompiledEncoder):
        encoder.retry_failed()
    for sentence in fallbacks:
        say(sentence)
    return encoder


SPEEDS_FILE = "runtime-speeds.json"  # in exports_dir(): crops per second of each runtime, per computer and tower
TIMING_BATCH = 4  # crops per timed call at least; each runtime gets a warm-up call of one crop and the best of two
CPU_BATCH = 8  # crops per batch of a CPU run (segment.default_batch_size)


def host_identity() -> str:
    """What a runtime's speed depends on besides the model: the processor, the cores torch uses, and the
    versions of the runtimes (a cache folder shared by two computers, or an upgrade, is timed again)."""
    import platform

    processor = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            processor = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                             processor)
    except OSError:
        pass
    installed = library_versions()
    versions = [f"{package}={installed[package] or 'none'}" for package in ("torch", *COMPILED)]
    return "|".join([platform.machine(), processor, f"cores={os.cpu_count()}",
                     f"threads={torch.get_num_threads()}", *versions])


def tower_structure(loaded, attention: str) -> str:
    """The shape of the dense tower (not its weight values: a fine-tuned model runs as fast as its base)."""
    visual = loaded.model.visual
    shapes = [(name, tuple(value.shape), str(value.dtype)) for name, value in visual.state_dict().items()]
    identity = model_identity(loaded)
    return identity_digest({"shapes": shapes, "activation": identity["activation"], "attention": attention,
                            "crop": crop_size(visual), "precision": identity["precision"]})[:24]


def _speeds_key(loaded, attention: str) -> str:
    return f"{tower_structure(loaded, attention)}@{identity_digest({'host': host_identity()})[:16]}"


def measured_speeds(loaded, attention: str) -> dict[str, float | None]:
    """Runtime name -> crops per second on this computer for this tower, as timed before (None: it did not
    build then); {} when never timed here, or the record is unreadable."""
    try:
        record = json.loads((exports_dir() / SPEEDS_FILE).read_text()).get(_speeds_key(loaded, attention))
        if record.get("batch") != timing_batch():  # timed on fewer crops than cores (an earlier version)
            return {}
        speeds = record["crops_per_s"]
        if isinstance(speeds, dict) and all(isinstance(name, str) and (value is None or (
                isinstance(value, (int, float)) and np.isfinite(value) and value > 0))
                for name, value in speeds.items()):
            return speeds
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return {}


def _remember_speeds(loaded, attention: str, speeds: dict[str, float | None]) -> str | None:
    """Keep `speeds` for this tower and computer; None when kept, else why not (in words)."""
    path = exports_dir() / SPEEDS_FILE
    try:
        records = json.loads(path.read_text())
        records = records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        records = {}
    records[_speeds_key(loaded, attention)] = {"host": host_identity(), "batch": timing_batch(),
                                               "crops_per_s": speeds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(records, indent=1), durable=False)
    except OSError as error:  # a read-only cache: timed again next time, the run goes on
        return f"{path}: {error.strerror or error}"
    return None


def timing_batch() -> int:
    """Crops per timed call: as many as the cores torch uses, between TIMING_BATCH and a CPU run's batch. ONNX
    Runtime spreads a batch over the cores crop by crop, so fewer crops than cores would time it on fewer
    cores than a run gives it."""
    return max(TIMING_BATCH, min(CPU_BATCH, torch.get_num_threads()))


def crops_per_second(encoder: Encoder, crop: int) -> float:
    """How many crops per second `encoder` embeds: the best of two calls on timing_batch() crops, after a
    warm-up call on one."""
    count = timing_batch()
    pixels = torch.rand(count, 3, crop, crop, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.inference_mode():
        encoder(pixels[:1])
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            encoder(pixels)
            best = min(best, time.perf_counter() - start)
    return count / max(best, 1e-9)


def _fastest_first(loaded, attention: str, candidates: list[str], timed_only: bool = False,
                   known: dict | None = None, half: bool | None = None,
                   notice: Callable[[str], None] | None = None,
                   inform: Callable[[str], None] | None = None) -> list[str]:
    """`candidates` (compiled runtimes, torch last) in the order auto tries them: fastest first, as timed on
    this computer for this tower, down to torch (which always runs: runtimes slower than torch are not tried).

    A candidate never timed here, or that did not build when it was (an export that failed, or differed from
    torch: it may work for other weights of the same shape, or once the disk has room), is built and timed now,
    the figures kept (SPEEDS_FILE) and said to `inform`; one that does not build is left out, said as a fallback
    (`known` keeps the encoder this run uses with that sentence). With `timed_only` (a small run, a Ray worker)
    nothing is built or timed: the figures there are, or the given order when there are none. `notice` hears of
    a damaged export made again."""
    if len(candidates) < 2:
        return candidates
    speeds = dict(measured_speeds(loaded, attention))
    todo = [name for name in candidates if not speeds.get(name)]
    if timed_only and todo:
        if not any(speeds.get(name) for name in candidates):
            return candidates
        todo = []
    failures: list[tuple[str, str]] = []
    best: tuple[float, Encoder] | None = None  # only the fastest encoder built here is kept (memory)
    for name in todo:
        if name == "torch" and not any(speeds.get(other) for other in candidates if other != "torch"):
            break  # nothing to compare torch with: it runs untimed
        encoder, failure = _try_build(loaded, attention, name, half, notice)
        if encoder is None:
            assert failure is not None
            speeds[name] = None
            failures.append(failure)
            continue
        speed = speeds[name] = crops_per_second(encoder, crop_size(loaded.model.visual))
        if best is None or speed > best[0]:
            best = (speed, encoder)
        del encoder
    measured = sorted((name for name in candidates if speeds.get(name)), key=lambda name: -float(speeds[name] or 0))
    ordered = measured[:measured.index("torch") + 1] if "torch" in measured else [*measured, "torch"]
    if any(speeds.get(name) for name in todo):
        where = _remember_speeds(loaded, attention, {name: speeds.get(name) for name in candidates})
        figures = ", ".join(f"{name} {speeds[name]:.3g}" for name in candidates if speeds.get(name))
        if len(measured) > 1:
            (inform or _log_info)(
                f"--runtime auto timed the encoder runtimes for this model on this computer ({figures} crops per "
                f"second) and uses the fastest, {ordered[0]}" + (
                    "; the figures are kept for the next runs." if where is None else
                    f"; the figures could not be kept ({where}), so the next run times them again."))
    if known is not None and (failures or best is not None):
        fallbacks: list[str] = []
        if best is not None and best[1].name == ordered[0]:
            encoder = best[1]
        else:
            encoder, fallbacks = _build_encoder(loaded, attention, ordered, half, notice or (lambda sentence: None))
        known[(tuple(ordered), attention, half)] = (encoder, _fell_back(failures, encoder) + fallbacks)
    return ordered


def time_auto_runtimes(loaded, attention: str, inform: Callable[[str], None] | None = None) -> None:
    """Time auto's runtimes for this model now if they were never timed on this computer (a scaled run's driver,
    before its workers start: they follow the figures, and find the exports made for the timing). Keeps none
    of the encoders it builds."""
    _fastest_first(loaded, attention, pick_runtime("auto", torch.device("cpu")), notice=_log_notice, inform=inform)


def _ready(loaded, attention: str, half: bool | None, name: str, known: dict) -> bool:
    """Whether runtime `name` runs this model's dense tower without a new export: built in this process, or
    its export for `attention` on disk with a verdict that it matches torch."""
    if any(key[1:] == (attention, half) and encoder.name == name for key, (encoder, _) in known.items()):
        return True
    verdict = _verdict(name, export_folder(loaded, attention, crop_size(loaded.model.visual)), "encoder")
    return verdict is not None and verdict["ok"]


def _try_build(loaded, attention: str, name: str, half: bool | None,
               notice: Callable[[str], None] | None = None) -> tuple[Encoder | None, tuple[str, str] | None]:
    """Runtime `name`'s encoder, or None and (what went wrong, a hint) when it cannot run here."""
    if name == "torch":
        return TorchEncoder(loaded.model.visual, attention, loaded.device, half), None
    if not runtime_installed(name):
        return None, (f"{name} is not installed", f" ({EXTRA_HINT})")
    try:
        return compiled_encoder(name, loaded, attention, notice), None
    except Exception as error:  # an exporter or compiler failure must never fail the run
        log.debug("runtime %s unavailable", name, exc_info=True)
        # A system error (a full disk, a folder not writable) may be gone by the next run: never remembered.
        hint = TRANSIENT if _of_the_moment(error) else ""
        return None, (f"{name} could not compile the model ({error_reason(error)})", hint)


# The hint of a failure that the next run tries again (one of this computer's, not of the runtime).
TRANSIENT = "; the next run tries it again"


def _of_the_moment(error: BaseException) -> bool:
    """Whether a runtime failed for a reason of this computer that may be gone by the next run: a system error
    (a folder not writable), or a full disk, which OpenVINO's C++ reports as a RuntimeError."""
    from .diskspace import _looks_like_no_space

    return isinstance(error, OSError) or _looks_like_no_space(error)


def _fell_back(failures: list[tuple[str, str]], encoder: Encoder) -> list[str]:
    """A sentence for each runtime that could not run ((what went wrong, a hint)), naming the one used."""
    return [f"{what}; using {encoder.name}{hint}." for what, hint in failures]


def _lasting(fallbacks: list[str]) -> bool:
    """Whether an encoder built with these fallback sentences may serve later runs of the process: none of
    them failed for a reason of the moment (TRANSIENT)."""
    return not any(sentence.endswith(TRANSIENT + ".") for sentence in fallbacks)


def _build_encoder(loaded, attention: str, candidates: list[str], half: bool | None,
                   notice: Callable[[str], None]) -> tuple[Encoder, list[str]]:
    """The first candidate that works, and a sentence for each one before it that did not, naming the one used."""
    failed: list[tuple[str, str]] = []  # (what went wrong, a hint): said once the runtime used is known
    for name in [*candidates[:candidates.index("torch") if "torch" in candidates else None], "torch"]:
        encoder, failure = _try_build(loaded, attention, name, half, notice)
        if encoder is not None:
            return encoder, _fell_back(failed, encoder)
        assert failure is not None
        failed.append(failure)
    raise AssertionError("torch always builds")
