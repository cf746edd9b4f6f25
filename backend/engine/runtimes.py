"""Faster CPU runtimes for the image encoder: OpenVINO and ONNX Runtime, torch eager as the reference.

The dense vision tower (with its training-free last block) is exported once per (weights sha256,
attention variant, crop size, RECIPE) into the cache folder and reused by later runs: OpenVINO
converts the torch module itself (its attention becomes one fused ScaledDotProductAttention op,
which the ONNX route loses), ONNX Runtime reads a torch.onnx export. An export is kept only if it
reproduces torch within EXPORT_TOLERANCE on a check batch. The tower's global (CLS) path, which the
quality estimate's region checks run, is exported beside it on first use (global.xml / global.onnx).
Anything that goes wrong
(runtime not installed, export or compile failure, a result too far from torch) falls back to
torch with a one-line notice: a run never fails because of its runtime.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
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
from .feature_cache import identity_digest, model_identity
from .paths import cache_dir

log = logging.getLogger("farslip.runtimes")

COMPILED = ("openvino", "onnxruntime")
EXPORT_TOLERANCE = 1e-4
EXTRA_HINT = "pip install 'farslip-qgis[cpu-runtimes]'"
AUTO_MIN_CROPS = 32  # below this, a first export would cost more than it saves
# How the exports are made; part of the cache folder's name, so a changed recipe never reuses the
# files of an older one. 2: OpenVINO converted from torch directly instead of from the ONNX file.
RECIPE = 2


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
    (`build_global`); if that fails, torch runs it, with a line in the log.
    """

    def __init__(self, name: str, infer: Callable[[np.ndarray], np.ndarray], crop: int, fallback: TorchEncoder,
                 build_global: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None):
        self.name = name
        self.infer = infer
        self.crop = crop
        self.fallback = fallback
        self._build_global = build_global
        self._global: Callable[[np.ndarray], np.ndarray] | None = None
        self._global_lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.crop, self.crop):
            return self.fallback(pixels)
        return torch.from_numpy(self.infer(np.ascontiguousarray(pixels.cpu().numpy(), dtype=np.float32)))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop, crop) normalised crops -> (B, D) image embeddings of CLIP's global path (unnormalised)."""
        with self._global_lock:
            if self._global is None and self._build_global is not None:
                try:
                    self._global = self._build_global()
                except Exception:  # an exporter or compiler failure must never fail the run
                    log.warning("runtime %s: global image path unavailable, using torch", self.name, exc_info=True)
                self._build_global = None
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
    core.set_property({"CACHE_DIR": str(folder / "openvino")})  # compiled blobs: later starts are quick
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


def _checked(name: str, infer, tower: torch.nn.Module, example: torch.Tensor, folder: Path,
             stem: str = "encoder") -> None:
    """Compare with torch once per export; remember the verdict beside the exported files."""
    verdict_path = folder / (f"check-{name}.json" if stem == "encoder" else f"check-{name}-{stem}.json")
    if verdict_path.exists():
        verdict = json.loads(verdict_path.read_text())
    else:
        with torch.inference_mode():
            expected = tower(example).numpy()
        difference = float(np.abs(infer(example.numpy()) - expected).max())
        verdict = {"runtime": name, "max_abs_diff": difference, "ok": difference <= EXPORT_TOLERANCE}
        write_text_atomically(verdict_path, json.dumps(verdict), durable=False)
    if not verdict["ok"]:
        raise RuntimeError(f"its features differ from torch by {verdict['max_abs_diff']:.1e} "
                           f"(more than {EXPORT_TOLERANCE:g})")


def export_folder(loaded, attention: str, crop: int) -> Path:
    """Where the exported tower of `loaded` lives: keyed by everything that changes its features (the same
    weight bytes load as QuickGELU or GELU, in fp32 or fp16: feature_cache.model_identity; not the weights'
    sha256 alone), the attention variant, the crop size and the export recipe."""
    return exports_dir() / f"{identity_digest(model_identity(loaded))[:24]}-{attention}-{crop}-r{RECIPE}"


def compiled_encoder(name: str, loaded, attention: str) -> CompiledEncoder:
    """Export (or reuse) and compile the dense tower for `name`; raises on any failure."""
    visual = loaded.model.visual
    crop = crop_size(visual)
    folder = export_folder(loaded, attention, crop)
    folder.mkdir(parents=True, exist_ok=True)
    tower = DenseTower(visual, attention).eval()
    example = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0)) * 4 - 2
    infer = BUILDERS[name](tower, example, folder)
    _checked(name, infer, tower, example, folder)

    def build_global() -> Callable[[np.ndarray], np.ndarray]:
        # open_clip's vision tower returns the projected CLS embedding: encode_image without normalising.
        embed = BUILDERS[name](visual.eval(), example, folder, "global")
        _checked(name, embed, visual, example, folder, "global")
        return embed

    return CompiledEncoder(name, infer, crop, TorchEncoder(visual, attention, torch.device("cpu")), build_global)


def pick_runtime(runtime: str, device: torch.device, crops: int | None = None) -> list[str]:
    """Runtimes to try in order for `runtime` on `device` (torch always last).

    auto: on the CPU the installed compiled runtimes, fastest first, when the run is large enough
    (AUTO_MIN_CROPS) to repay a first export; on a GPU torch with fp16 autocast.
    """
    if device.type != "cpu":
        return ["torch"]  # the compiled runtimes here are CPU builds
    if runtime == "auto":
        if crops is not None and crops < AUTO_MIN_CROPS:
            return ["torch"]
        return [name for name in COMPILED if runtime_installed(name)] + ["torch"]
    return [runtime, "torch"] if runtime in COMPILED else ["torch"]


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(runtimes, attention, half): encoder}


def make_encoder(loaded, attention: str, runtime: str = "auto", half: bool | None = None,
                 notice: Callable[[str], None] | None = None, crops: int | None = None) -> Encoder:
    """The image encoder for `runtime` (auto, torch, openvino, onnxruntime), falling back to torch.

    Kept per loaded model, so a server compiles once and later jobs start at once.
    """
    assert runtime in RUNTIMES, runtime
    device = loaded.device
    if runtime in COMPILED and device.type != "cpu" and notice is not None:
        notice(f"--runtime {runtime} runs on the CPU only; using torch on {device}.")
    candidates = pick_runtime(runtime, device, crops)
    known = _ENCODERS.setdefault(loaded.model, {})
    key = (tuple(candidates), attention, half)
    if key not in known:
        known[key] = _build_encoder(loaded, attention, candidates, half, notice)
    return known[key]


def _build_encoder(loaded, attention: str, candidates: list[str], half: bool | None,
                   notice: Callable[[str], None] | None) -> Encoder:
    for name in candidates:
        if name == "torch":
            break
        if not runtime_installed(name):
            if notice is not None:
                notice(f"{name} is not installed; using torch ({EXTRA_HINT}).")
            continue
        try:
            return compiled_encoder(name, loaded, attention)
        except Exception as error:  # an exporter or compiler failure must never fail the run
            log.warning("runtime %s unavailable", name, exc_info=True)
            if notice is not None:
                notice(f"{name} could not compile the model ({str(error).splitlines()[0][:160]}); using torch.")
    return TorchEncoder(loaded.model.visual, attention, loaded.device, half)
