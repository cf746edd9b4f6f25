"""Encoder runtimes: OpenVINO / ONNX Runtime match torch, fall back with one line, and the GPU path's choices."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine import runtimes
from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.devices import resolve_device
from backend.engine.encoders import NullEncoder, TorchEncoder, autocast_enabled
from backend.engine.errors import InputError, ModelError
from backend.engine.models import load_model
from backend.engine.options import SegmentOptions
from backend.engine.segment import default_batch_size, segment_raster
from backend.engine.sliding import NODATA_CLASS, label_probabilities
from backend.service.cli import app

CLASSES = ["water, lake", "cropland", "road"]
EXPORTED = {"openvino": "encoder.xml", "onnxruntime": "encoder.onnx"}  # what each runtime reads from the cache
REPO = Path(__file__).resolve().parents[2]


def tiny_loaded(seed: int):
    return SimpleNamespace(model=make_tiny_clip(16, seed=seed), device=torch.device("cpu"),
                           weights_id=f"tiny-runtime-{seed}".ljust(40, "0"))


def crops(count: int = 3) -> torch.Tensor:
    return normalize_pixels(torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(5)) * 255)


def write_rgb(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A random uint8 RGB GeoTIFF (UTM, 2 m pixels)."""
    rgb = np.random.default_rng(seed).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 2.0, 2.0)) as ds:
        ds.write(rgb)
    return path


def segment_args(raster: Path, model: Path, out: Path, runtime: str, quiet: bool = True) -> list[str]:
    """`farslip segment` of three classes (one with a synonym) with a probability raster, into folder `out`."""
    out.mkdir(exist_ok=True)
    return ["segment", str(raster), "--model", str(model), "-c", "water", "-c", "field, grass", "-c", "road",
            "--runtime", runtime, "-o", str(out / "r.gpkg"), "--prob-raster", str(out / "p.tif"),
            *(["--quiet"] if quiet else [])]


def report_of(out: Path) -> dict:
    return json.loads((out / "r.report.json").read_text())


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own (exports, verdicts), so no other test's exports are seen."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FARSLIP_CACHE", str(cache))
    return cache


def timed_as(monkeypatch, **speeds: float) -> list[str]:
    """auto's timing of the runtimes gives `speeds` (crops per second by runtime): the names it timed, in order."""
    timed: list[str] = []

    def crops_per_second(encoder, crop):
        timed.append(encoder.name)
        return speeds[encoder.name]

    monkeypatch.setattr(runtimes, "crops_per_second", crops_per_second)
    return timed


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_compiled_runtime_matches_torch_within_1e_4(name):
    loaded = tiny_loaded(1)
    notes = []
    encoder = runtimes.make_encoder(loaded, "segearth", name, notice=notes.append)
    assert encoder.name == name and notes == []
    pixels = crops()
    with torch.inference_mode():
        expected = dense_patch_features(loaded.model.visual, pixels)
    got = encoder(pixels)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4
    # The export is on disk, keyed by weights, attention, crop size and recipe; a second variant gets its own
    # (converted in the same process: OpenVINO's own trace check used to refuse a second trace).
    exported = EXPORTED[name]
    assert (runtimes.export_folder(loaded, "segearth", 224) / exported).is_file()
    other = runtimes.make_encoder(loaded, "clearclip", name)
    assert other.name == name
    assert (runtimes.export_folder(loaded, "clearclip", 224) / exported).is_file()
    with torch.inference_mode():
        expected = dense_patch_features(loaded.model.visual, pixels, "clearclip")
    assert float((other(pixels) - expected).abs().max()) < 1e-4


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_the_region_checks_global_path_runs_under_the_same_runtime_and_matches_torch(name):
    """The quality estimate's region checks embed their crops with CLIP's global path: under the compiled
    runtime too, exported beside the dense tower when first asked for, within 1e-4 of torch."""
    seed = {"openvino": 21, "onnxruntime": 22}[name]
    loaded = tiny_loaded(seed)
    encoder = runtimes.make_encoder(loaded, "segearth", name)
    folder = runtimes.export_folder(loaded, "segearth", 224)
    assert not list(folder.glob("global.*"))  # a run without region checks never exports it
    pixels = crops(3)
    with torch.inference_mode():
        expected = loaded.model.encode_image(pixels)
        got = encoder.embed_images(pixels)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4
    assert (folder / {"openvino": "global.xml", "onnxruntime": "global.onnx"}[name]).is_file()
    assert json.loads(runtimes._verdict_path(name, folder, "global").read_text())["ok"]


def test_an_export_is_not_shared_by_the_same_weights_loaded_another_way():
    """The same weight bytes load as QuickGELU or GELU (a model's name decides), or in fp16 after --half:
    each runs another tower, so each gets its own export (they shared the weights' sha256 before)."""
    quick = tiny_loaded(30)
    gelu = SimpleNamespace(**{**vars(quick), "metadata": {"activation": "gelu"}})
    half = SimpleNamespace(**{**vars(quick), "metadata": {"precision": "fp16"}})
    folders = {runtimes.export_folder(model, "segearth", 224) for model in (quick, gelu, half)}
    assert len(folders) == 3


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_an_export_cached_by_an_older_recipe_is_not_reused(name):
    loaded = tiny_loaded(8)
    # What an older version left in the cache: same weights, attention and crop size, no recipe in the name.
    old = runtimes.exports_dir() / f"{loaded.weights_id[:24]}-segearth-224"
    old.mkdir(parents=True, exist_ok=True)
    for stale in ("encoder.onnx", "encoder.xml", "encoder.bin"):
        (old / stale).write_bytes(b"an export from an older recipe")
    (old / f"check-{name}.json").write_text(json.dumps({"runtime": name, "max_abs_diff": 0.0, "ok": True}))
    notes = []
    encoder = runtimes.make_encoder(loaded, "segearth", name, notice=notes.append)
    assert encoder.name == name and notes == []
    pixels = crops(2)
    with torch.inference_mode():
        expected = dense_patch_features(loaded.model.visual, pixels)
    assert float((encoder(pixels) - expected).abs().max()) < 1e-4
    assert (old / EXPORTED[name]).read_bytes() == b"an export from an older recipe"


def test_a_missing_runtime_falls_back_to_torch_with_one_line(monkeypatch):
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: False)
    notes = []
    encoder = runtimes.make_encoder(tiny_loaded(2), "segearth", "openvino", notice=notes.append)
    assert encoder.name == "torch"
    assert notes == ["openvino is not installed; using torch (pip install 'farslip-qgis[cpu-runtimes]')."]


def test_a_runtime_that_cannot_compile_falls_back_to_torch(monkeypatch):
    def broken(tower, example, folder, stem="encoder"):
        raise RuntimeError("unsupported operator Foo\nlong details")

    monkeypatch.setitem(runtimes.BUILDERS, "onnxruntime", broken)
    notes = []
    encoder = runtimes.make_encoder(tiny_loaded(3), "segearth", "onnxruntime", notice=notes.append)
    assert encoder.name == "torch"
    assert notes == ["onnxruntime could not compile the model (unsupported operator Foo); using torch."]


def test_a_runtime_that_failed_for_want_of_disk_space_is_tried_again_by_the_next_run(monkeypatch, own_cache):
    """A server kept a one-off failure (a full disk) for the model's life: every later job of the runtime ran
    torch and said the full disk again. A system error is now tried again; a compile error is remembered."""
    import errno

    real, calls = runtimes.BUILDERS["onnxruntime"], []

    def full_disk_once(tower, example, folder, stem="encoder"):
        calls.append(stem)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "encoder.onnx"))
        return real(tower, example, folder, stem)

    monkeypatch.setitem(runtimes.BUILDERS, "onnxruntime", full_disk_once)
    loaded, notes = tiny_loaded(52), []
    assert runtimes.make_encoder(loaded, "segearth", "onnxruntime", notice=notes.append).name == "torch"
    assert len(notes) == 1 and notes[0].startswith("onnxruntime could not compile the model (No space left on device")
    assert notes[0].endswith("; using torch; the next run tries it again.")
    later: list[str] = []
    assert runtimes.make_encoder(loaded, "segearth", "onnxruntime", notice=later.append).name == "onnxruntime"
    assert later == []

    def broken(tower, example, folder, stem="encoder"):
        calls.append(stem)
        raise RuntimeError("unsupported operator Foo")

    monkeypatch.setitem(runtimes.BUILDERS, "openvino", broken)
    calls.clear()
    for _ in range(2):
        assert runtimes.make_encoder(loaded, "segearth", "openvino").name == "torch"
    assert calls == ["encoder"]  # built (and failed) once for the process


def test_a_global_path_that_failed_for_want_of_disk_space_is_tried_again_by_the_next_run():
    """The region checks' global path gave up for the process at any failure, a full disk too."""
    import errno

    attempts = []

    def build_global():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return lambda pixels: np.zeros((len(pixels), 8), np.float32)

    fallback = TorchEncoder(make_tiny_clip(16, seed=53).visual, "segearth", torch.device("cpu"))
    encoder = runtimes.CompiledEncoder("onnxruntime", lambda pixels: pixels, 224, fallback, build_global)
    assert encoder.global_runtime() == "torch" and encoder.global_runtime() == "torch"  # not again in this run
    encoder.retry_failed()  # what make_encoder does for the next run
    assert encoder.global_runtime() == "onnxruntime" and len(attempts) == 2


def test_figures_auto_timed_on_fewer_crops_than_it_times_now_are_timed_again(monkeypatch, own_cache):
    """Figures of an earlier version, timed on 4 crops, stood for ONNX Runtime on a machine of more cores."""
    loaded = tiny_loaded(54)
    monkeypatch.setattr(runtimes, "timing_batch", lambda: 4)
    assert runtimes._remember_speeds(loaded, "segearth", {"openvino": 5.0, "onnxruntime": 4.0, "torch": 3.0}) is None
    assert runtimes.measured_speeds(loaded, "segearth") == {"openvino": 5.0, "onnxruntime": 4.0, "torch": 3.0}
    monkeypatch.setattr(runtimes, "timing_batch", lambda: 8)
    assert runtimes.measured_speeds(loaded, "segearth") == {}


def test_auto_uses_torch_for_small_runs_and_on_a_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtimes.pick_runtime("auto", cpu, crops=4) == ["torch"]
    assert runtimes.pick_runtime("auto", cpu, crops=500)[-1] == "torch"
    assert runtimes.pick_runtime("auto", cpu, crops=500)[0] == "openvino"
    assert runtimes.pick_runtime("auto", cuda, crops=500) == ["torch"]
    assert runtimes.pick_runtime("openvino", cuda) == ["torch"]


def test_fp16_autocast_is_for_cuda_only_and_the_cpu_stays_exact():
    assert autocast_enabled(torch.device("cuda"), None) is True
    assert autocast_enabled(torch.device("cuda"), False) is False
    assert autocast_enabled(torch.device("cpu"), True) is False
    loaded = tiny_loaded(4)
    encoder = TorchEncoder(loaded.model.visual, "segearth", torch.device("cpu"), half=True)
    assert encoder.name == "torch"
    pixels = crops(2)
    with torch.inference_mode():
        assert torch.equal(encoder(pixels), dense_patch_features(loaded.model.visual, pixels))


def test_auto_device_prefers_a_cuda_gpu_and_a_missing_one_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(InputError, match=r"^Device 'cuda' was requested but no CUDA GPU is usable here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="this machine has 1 CUDA GPU"):
        resolve_device("cuda:1")


def test_on_a_gpu_the_encoder_is_torch_under_fp16_autocast_and_a_cpu_runtime_says_so():
    # Building the encoder for a CUDA device touches no GPU, so this runs on any machine.
    loaded = SimpleNamespace(model=make_tiny_clip(16, seed=7), device=torch.device("cuda"),
                             weights_id="tiny-runtime-7".ljust(40, "0"))
    notes = []
    encoder = runtimes.make_encoder(loaded, "segearth", "openvino", notice=notes.append)
    assert isinstance(encoder, TorchEncoder) and encoder.autocast and encoder.name == "torch-fp16"
    assert notes == ["--runtime openvino runs on the CPU only; using torch on cuda."]
    exact = runtimes.make_encoder(loaded, "segearth", "auto", half=False)
    assert not exact.autocast and exact.name == "torch"


def test_gpu_batch_size_follows_free_memory(monkeypatch):
    assert default_batch_size(torch.device("cpu")) == 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    assert default_batch_size(torch.device("cuda")) == 170
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 2**20, 16 * 2**30))
    assert default_batch_size(torch.device("cuda")) == 8


def test_null_encoder_has_the_encoder_output_shape():
    loaded = tiny_loaded(5)
    pixels = crops(2)
    null = NullEncoder(loaded.model.visual, torch.device("cpu"))(pixels)
    with torch.inference_mode():
        real = dense_patch_features(loaded.model.visual, pixels)
    assert null.shape == real.shape
    assert torch.allclose(null.norm(dim=-1), torch.ones(null.shape[:-1]), atol=1e-5)
    # It follows the image patch by patch (so the bench's class maps and polygons are realistic).
    patch = loaded.model.visual.conv1.kernel_size[0]
    changed = pixels.clone()
    changed[0, :, patch:2 * patch, :patch] = torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1)
    moved = NullEncoder(loaded.model.visual, torch.device("cpu"))(changed) != null
    assert moved[0, 1, 0].all() and moved.any(dim=-1).sum() == 1


def test_segment_with_a_compiled_runtime_matches_torch(tmp_path):
    loaded = load_model(str(save_plain(make_tiny_clip(16, seed=6), tmp_path / "tiny.pt")))
    raster = write_rgb(tmp_path / "image.tif", 300, 300)
    probs = {}
    for name in ("torch", "onnxruntime"):
        out = tmp_path / name
        out.mkdir()
        options = SegmentOptions(raster=raster, class_lines=CLASSES, runtime=name, out=out / "r.gpkg",
                                 prob_raster=out / "p.tif")
        result = segment_raster(options, loaded)
        assert result.report["encoder"] == name
        with rasterio.open(out / "p.tif") as ds:
            probs[name] = ds.read()
    assert np.nanmax(np.abs(probs["torch"] - probs["onnxruntime"])) < 1e-4


def test_unknown_runtime_is_a_clear_error(tmp_path, shared_data):
    model = save_plain(make_tiny_clip(16), tmp_path / "tiny.pt")
    result = CliRunner().invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"), "--model", str(model),
                                      "-c", "water", "--runtime", "tensorrt", "-o", str(tmp_path / "x.gpkg")])
    assert result.exit_code == 2
    assert "Unknown runtime 'tensorrt'; use one of auto, torch, openvino, onnxruntime." in result.output
    assert not (tmp_path / "x.gpkg").exists()


def test_openvino_runs_without_sending_usage_telemetry_or_forking(tmp_path):
    """OpenVINO's converter sends a usage event to Google Analytics from a forked process unless the user
    opted out (a network call nobody asked for; the fork of a threaded process could deadlock and hold
    the run at exit). A `farslip segment --runtime openvino` run sends nothing, forks nothing and leaves
    no telemetry files in the user's home."""
    model = save_plain(make_tiny_clip(16, seed=23), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 240, 240, seed=1)
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import atexit, multiprocessing, sys\n"
        "atexit.register(lambda: print('AT EXIT', type(sys.modules.get('openvino_telemetry')).__name__,"
        " len(multiprocessing.active_children()), 'openvino' in sys.modules, flush=True))\n"
        "from backend.service.cli import app\n"
        f"app(['segment', {str(raster)!r}, '--classes', 'water', '--classes', 'road', '--model', {str(model)!r},"
        f" '--runtime', 'openvino', '--out', {str(tmp_path / 'out.gpkg')!r}], prog_name='farslip')\n"
    )
    env = {**os.environ, "HOME": str(home)}
    env.pop("CI", None)  # OpenVINO skips its telemetry when it sees CI=true: test what a user gets
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out.gpkg").is_file()
    assert "AT EXIT NoneType 0 True" in done.stdout, done.stdout[-2000:]
    assert not (home / "intel").exists(), sorted(str(p) for p in home.rglob("*"))


def test_under_auto_the_fallback_note_names_the_runtime_that_ran(monkeypatch, own_cache):
    """auto tries OpenVINO, then ONNX Runtime: when OpenVINO fails and ONNX Runtime runs, the note said
    'using torch'. It names the runtime used, and the reason behind OpenVINO's source locations."""
    def broken(tower, example, folder, stem="encoder"):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nunsupported operator Foo\n")

    monkeypatch.setitem(runtimes.BUILDERS, "openvino", broken)
    timed_as(monkeypatch, onnxruntime=9.0, torch=3.0)
    notes = []
    encoder = runtimes.make_encoder(tiny_loaded(41), "segearth", "auto", notice=notes.append, crops=100)
    assert encoder.name == "onnxruntime"
    assert notes == ["openvino could not compile the model (unsupported operator Foo); using onnxruntime."]
    # Every later run still says why its fastest runtime is not used.
    runtimes._ENCODERS.clear()
    later = []
    assert runtimes.make_encoder(tiny_loaded(41), "segearth", "auto", notice=later.append, crops=100).name == \
        "onnxruntime"
    assert later == notes


def test_auto_times_the_runtimes_once_on_this_computer_and_runs_the_fastest(monkeypatch, own_cache):
    """auto tried OpenVINO first on every computer, though ONNX Runtime measured faster on some (1.34x against
    1.13x torch on a busy 2-core host). It now times each runtime once per computer and model shape, keeps the
    figures in the cache, says them, and runs the fastest; later runs (other processes) read the figures."""
    timed = timed_as(monkeypatch, openvino=5.0, onnxruntime=9.0, torch=3.0)
    notes, told = [], []
    encoder = runtimes.make_encoder(tiny_loaded(44), "segearth", "auto", notice=notes.append, crops=100,
                                    inform=told.append)
    assert encoder.name == "onnxruntime"
    assert sorted(timed) == ["onnxruntime", "openvino", "torch"]
    assert notes == []  # no warning: a line for the user, not for the report's warnings
    assert told == ["--runtime auto timed the encoder runtimes for this model on this computer (openvino 5, "
                     "onnxruntime 9, torch 3 crops per second) and uses the fastest, onnxruntime; the figures are "
                     "kept for the next runs."]
    record = json.loads((own_cache / "encoders" / runtimes.SPEEDS_FILE).read_text())
    assert [entry["crops_per_s"] for entry in record.values()] == [{"openvino": 5.0, "onnxruntime": 9.0,
                                                                     "torch": 3.0}]
    # Another process: no encoder built yet. The figures on disk decide; nothing is timed again, and a model of
    # the same shape with other weights (a fine-tuned one) runs as fast, so it is not timed either.
    runtimes._ENCODERS.clear()
    timed.clear()
    again = []
    assert runtimes.make_encoder(tiny_loaded(45), "segearth", "auto", notice=again.append, crops=100,
                                 inform=again.append).name == "onnxruntime"
    assert timed == [] and again == []
    # A small run with the faster runtime exported runs it too (the larger run's features are then found).
    assert runtimes.make_encoder(tiny_loaded(44), "segearth", "auto", crops=4).name == "onnxruntime"


def test_a_ray_worker_never_times_the_runtimes_but_follows_earlier_figures(monkeypatch, own_cache):
    """Ray workers share the cores: timing there would time the siblings too, and could give one output's chunks
    different runtimes. A worker (timing=False) follows the figures timed before, else the fixed order."""
    timed = timed_as(monkeypatch, openvino=5.0, onnxruntime=9.0, torch=3.0)
    first = runtimes.make_encoder(tiny_loaded(48), "segearth", "auto", crops=100, timing=False)
    assert timed == [] and first.name == runtimes.COMPILED[0]
    runtimes.make_encoder(tiny_loaded(49), "segearth", "auto", crops=100)  # the driver, or a run before
    assert sorted(timed) == ["onnxruntime", "openvino", "torch"]
    runtimes._ENCODERS.clear()
    timed.clear()
    assert runtimes.make_encoder(tiny_loaded(48), "segearth", "auto", crops=100, timing=False).name == "onnxruntime"
    assert timed == []


def test_a_runtime_that_did_not_build_when_timed_is_tried_and_timed_again_later(monkeypatch, own_cache):
    """A runtime whose export failed while auto timed the others (a full disk, or an export of other weights of
    the same shape that differed from torch) went first in every later run, untimed, even when slower than torch.
    Now later large runs try it again: while it fails it is left out, with its sentence; once it builds it is
    timed, and runs only if it is the fastest."""
    real = runtimes.BUILDERS["openvino"]

    def full_disk(tower, example, folder, stem="encoder"):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(runtimes.BUILDERS, "openvino", full_disk)
    timed = timed_as(monkeypatch, openvino=2.0, onnxruntime=1.0, torch=5.0)
    notes = []
    assert runtimes.make_encoder(tiny_loaded(52), "segearth", "auto", notice=notes.append, crops=100).name == "torch"
    assert notes == ["openvino could not compile the model (No space left on device); using torch; the next run "
                     "tries it again."]
    assert sorted(timed) == ["onnxruntime", "torch"]
    for attempt in ("still failing", "disk freed"):
        if attempt == "disk freed":
            monkeypatch.setitem(runtimes.BUILDERS, "openvino", real)
        runtimes._ENCODERS.clear()
        timed.clear()
        later = []
        encoder = runtimes.make_encoder(tiny_loaded(52), "segearth", "auto", notice=later.append, crops=100)
        assert encoder.name == "torch"  # never openvino, untimed
        assert later == (notes if attempt == "still failing" else [])
        assert timed == ([] if attempt == "still failing" else ["openvino"])
    speeds = runtimes.measured_speeds(tiny_loaded(52), "segearth")
    assert speeds == {"openvino": 2.0, "onnxruntime": 1.0, "torch": 5.0}


def test_figures_that_cannot_be_kept_are_said_so(monkeypatch, tmp_path):
    """A cache folder that cannot be written: each run timed the runtimes again and said it timed them 'once'."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FARSLIP_CACHE", str(blocker / "cache"))
    timed_as(monkeypatch, torch=3.0, onnxruntime=4.0, openvino=5.0)
    monkeypatch.setattr(runtimes, "_try_build", lambda loaded, attention, name, half, notice=None: (
        (SimpleNamespace(name=name), None)))
    told = []
    runtimes.make_encoder(tiny_loaded(53), "segearth", "auto", crops=100, inform=told.append)
    assert len(told) == 1 and told[0].startswith("--runtime auto timed the encoder runtimes for this model"), told
    assert "; the figures could not be kept (" in told[0] and told[0].endswith("so the next run times them again.")


def test_auto_runs_torch_when_torch_timed_fastest(monkeypatch, own_cache):
    """On a computer where torch beats both compiled runtimes, auto runs torch, for large and small runs,
    though the exports made for the timing are on disk and judged."""
    timed_as(monkeypatch, openvino=2.0, onnxruntime=1.5, torch=4.0)
    told = []
    assert runtimes.make_encoder(tiny_loaded(46), "segearth", "auto", inform=told.append, crops=100).name == "torch"
    assert len(told) == 1 and "and uses the fastest, torch;" in told[0]
    runtimes._ENCODERS.clear()
    assert runtimes.make_encoder(tiny_loaded(46), "segearth", "auto", crops=100).name == "torch"
    assert runtimes.make_encoder(tiny_loaded(46), "segearth", "auto", crops=4).name == "torch"


@pytest.mark.parametrize("damage", ["another computer", "unreadable", "not figures"])
def test_auto_times_again_on_another_computer_or_when_its_figures_are_damaged(monkeypatch, own_cache, damage):
    """Figures timed on another computer (a cache folder on a shared drive, or runtimes upgraded since) or a
    damaged figures file are not trusted: the runtimes are timed again, without a traceback."""
    timed = timed_as(monkeypatch, openvino=5.0, onnxruntime=9.0, torch=3.0)
    runtimes.make_encoder(tiny_loaded(47), "segearth", "auto", crops=100)
    path = own_cache / "encoders" / runtimes.SPEEDS_FILE
    if damage == "another computer":
        monkeypatch.setattr(runtimes, "host_identity", lambda: "x86_64|another processor|cores=64")
    elif damage == "unreadable":
        path.write_text("{not json")
    else:
        path.write_text(json.dumps({key: {"crops_per_s": {"openvino": "fast", "onnxruntime": -1}}
                                    for key in json.loads(path.read_text())}))
    runtimes._ENCODERS.clear()
    timed.clear()
    monkeypatch.setattr(runtimes, "crops_per_second", lambda encoder, crop: timed.append(encoder.name) or
                        {"openvino": 9.0, "onnxruntime": 5.0, "torch": 3.0}[encoder.name])
    assert runtimes.make_encoder(tiny_loaded(47), "segearth", "auto", crops=100).name == "openvino"
    assert sorted(timed) == ["onnxruntime", "openvino", "torch"]


def test_a_raster_smaller_than_the_model_input_runs_and_reports_torch_without_exporting(tmp_path, own_cache):
    """Every crop of a raster under 224 pixels on a side is smaller than the model input, which only torch
    runs: --runtime openvino exported the model for nothing and reported "encoder": "openvino". Now the run
    says why torch ran, reports torch and exports nothing."""
    model = save_plain(make_tiny_clip(16, seed=42), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "small.tif", 150, 300)
    result = CliRunner().invoke(app, segment_args(raster, model, tmp_path / "out", "openvino"))
    assert result.exit_code == 0, result.output
    report = report_of(tmp_path / "out")
    assert report["encoder"] == "torch"
    assert [w for w in report["warnings"] if "--runtime openvino" in w] == [
        "--runtime openvino runs only crops of the model's input size (224x224 pixels), and this raster is smaller "
        "than that on a side, so all its crops are too; using torch."]
    assert not (own_cache / "encoders").exists()
    # Said once on the terminal: as a note while the run goes, not again as a warning from the report.
    assert sum("--runtime openvino runs only crops" in line for line in result.output.splitlines()) == 1, \
        result.output


def test_every_run_reports_its_runtime_fallback_in_the_reports_warnings(tmp_path, monkeypatch):
    """A fallback was said on stderr only, and only by the run that built the encoder: a server's later jobs,
    which reuse it, ran torch without a word. Each run's report lists it among its warnings."""
    monkeypatch.setattr(runtimes, "runtime_installed", lambda name: False)
    loaded = load_model(str(save_plain(make_tiny_clip(16, seed=43), tmp_path / "tiny.pt")))
    raster = write_rgb(tmp_path / "image.tif", 240, 240)
    expected = "onnxruntime is not installed; using torch (pip install 'farslip-qgis[cpu-runtimes]')."
    for job in ("first", "second"):
        heard = []
        options = SegmentOptions(raster=raster, class_lines=CLASSES, runtime="onnxruntime",
                                 out=tmp_path / job / "r.gpkg")
        (tmp_path / job).mkdir()
        result = segment_raster(options, loaded, notice=heard.append)
        assert heard == [expected]
        assert result.report["encoder"] == "torch"
        assert expected in report_of(tmp_path / job)["warnings"]


def test_the_cli_says_autos_timing_once_and_no_report_lists_it_as_a_warning(tmp_path, own_cache, monkeypatch):
    """The first large run under auto on a computer times the runtimes: `farslip segment` says the figures in one
    note on stderr (not with --quiet, which a script uses), the runs after it say nothing of it, and no report
    counts it among its warnings."""
    timed = timed_as(monkeypatch, openvino=5.0, onnxruntime=9.0, torch=3.0)
    model = save_plain(make_tiny_clip(16, seed=50), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 700, 700)
    runner = CliRunner()
    quietly = runner.invoke(app, segment_args(raster, model, tmp_path / "quiet", "auto"))
    assert quietly.exit_code == 0 and quietly.output == "", quietly.output
    assert sorted(timed) == ["onnxruntime", "openvino", "torch"]
    (own_cache / "encoders" / runtimes.SPEEDS_FILE).unlink()  # as on another computer: timed again
    runtimes._ENCODERS.clear()
    timed.clear()
    for run in ("first", "second"):
        result = runner.invoke(app, segment_args(raster, model, tmp_path / run, "auto", quiet=False))
        assert result.exit_code == 0, result.output
        said = [line for line in result.output.splitlines() if "timed the encoder runtimes" in line]
        assert said == ([] if run == "second" else [
            "Note: --runtime auto timed the encoder runtimes for this model on this computer (openvino 5, "
            "onnxruntime 9, torch 3 crops per second) and uses the fastest, onnxruntime; the figures are kept for "
            "the next runs."]), result.output
        report = report_of(tmp_path / run)
        assert report["encoder"] == "onnxruntime" and report["warnings"] == []
    assert sorted(timed) == ["onnxruntime", "openvino", "torch"]


def test_a_damaged_cached_export_is_judged_again_and_exported_anew(tmp_path, own_cache):
    """4000 bytes of a cached ONNX export flipped after torch judged it: the old verdict was trusted, and the run
    exited 0 with every probability NaN and every pixel class 0 (one 'water' polygon over everything). The
    verdict names the sha256 of the files it judged: the changed file is judged again, fails, is exported
    anew, and the run writes what the first one wrote."""
    model = save_plain(make_tiny_clip(16, seed=44), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 300, 300)
    first, second = tmp_path / "first", tmp_path / "second"
    assert CliRunner().invoke(app, segment_args(raster, model, first, "onnxruntime")).exit_code == 0
    [export] = (own_cache / "encoders").glob("*/encoder.onnx")
    damaged = bytearray(export.read_bytes())
    middle = len(damaged) // 2
    damaged[middle:middle + 4000] = bytes(byte ^ 0x5A for byte in damaged[middle:middle + 4000])
    export.write_bytes(damaged)
    result = CliRunner().invoke(app, segment_args(raster, model, second, "onnxruntime"))
    assert result.exit_code == 0, result.output
    report = report_of(second)
    assert report["encoder"] == "onnxruntime"
    assert [w for w in report["warnings"] if "export" in w] == [
        f"The cached onnxruntime export in {export.parent} could not be used (its features are not numbers (NaN or "
        "infinite) where torch's are); exporting it again."]
    with rasterio.open(first / "p.tif") as before, rasterio.open(second / "p.tif") as after:
        probs = after.read()
        assert np.isfinite(probs).all()
        assert np.abs(probs - before.read()).max() < 1e-5
    assert export.read_bytes() != bytes(damaged)


@pytest.mark.parametrize("name, damage, reason", [
    ("onnxruntime", "truncate encoder.onnx", "it did not load: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF"),
    ("openvino", "truncate encoder.bin", "it did not load: Incorrect weights in bin file!"),
    ("onnxruntime", "empty verdict", None),
])
def test_a_cached_export_that_does_not_load_is_said_in_one_line_and_made_again(tmp_path, own_cache, name, damage,
                                                                                 reason):
    """A cached export that no longer loads printed a full traceback and a note holding OpenVINO's first line
    ('Exception from src/inference/src/cpp/core.cpp:132:') instead of the reason, and every later run fell
    back to torch; an empty verdict file did the same. Now the run says the reason in one line (no traceback),
    exports the model again and runs the runtime asked for; an unreadable verdict is only judged again."""
    model = save_plain(make_tiny_clip(16, seed=45), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 240, 240)
    runtimes.make_encoder(load_model(str(model)), "segearth", name)  # the export a first run leaves
    [folder] = (own_cache / "encoders").iterdir()
    if damage == "empty verdict":
        runtimes._verdict_path(name, folder, "encoder").write_text("")
    else:
        damaged = folder / damage.split()[-1]
        damaged.write_bytes(damaged.read_bytes()[:1000])
        shutil.rmtree(folder / "openvino", ignore_errors=True)  # OpenVINO's compiled blobs would hide the damage
    out = tmp_path / "out"
    args = segment_args(raster, model, out, name)
    script = f"from backend.service.cli import app\napp({args!r}, prog_name='farslip')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("Note: ")]
    if reason is None:
        assert said == [], done.stderr
    else:
        assert len(said) == 1 and said[0].startswith(f"Note: The cached {name} export in {folder} could not be used "
                                                     f"({reason}"), done.stderr
        assert said[0].endswith("); exporting it again."), said
    assert report_of(out)["encoder"] == name
    assert json.loads(runtimes._verdict_path(name, folder, "encoder").read_text())["ok"]


def test_a_damaged_openvino_blob_is_judged_again_and_compiled_anew(tmp_path, own_cache):
    """Later starts of OpenVINO import the blob it compiled from the judged export instead of compiling the
    export, and the verdict covered only the export's files: a blob damaged since ran unjudged. The verdict now
    names the blob too; a changed blob is compiled anew from the export and judged."""
    model = save_plain(make_tiny_clip(16, seed=46), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 240, 240)
    runtimes.make_encoder(load_model(str(model)), "segearth", "openvino")  # the export a first run leaves
    [folder] = (own_cache / "encoders").iterdir()
    [blob_folder] = (folder / "openvino").glob("encoder-*")  # this computer's blobs of the dense tower
    blobs = [path for path in blob_folder.iterdir() if path.is_file()]
    judged = json.loads(runtimes._verdict_path("openvino", folder, "encoder").read_text())["files"]
    assert blobs and {blob.name for blob in blobs} <= set(judged)
    blob = max(blobs, key=lambda path: path.stat().st_size)
    damaged = bytearray(blob.read_bytes())
    at = len(damaged) * 3 // 4
    damaged[at:at + 4000] = bytes(byte ^ 0x5A for byte in damaged[at:at + 4000])
    blob.write_bytes(damaged)
    out, reference = tmp_path / "out", tmp_path / "torch"
    for folder_out, runtime in ((out, "openvino"), (reference, "torch")):
        script = f"from backend.service.cli import app\napp({segment_args(raster, model, folder_out, runtime)!r}, " \
                 "prog_name='farslip')\n"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=str(REPO))
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert report_of(out)["encoder"] == "openvino"
    with rasterio.open(out / "p.tif") as ran, rasterio.open(reference / "p.tif") as expected:
        assert np.abs(ran.read() - expected.read()).max() < 1e-4
    now = [path for path in blob_folder.iterdir() if path.is_file()]
    assert all(path.read_bytes() != bytes(damaged) for path in now)
    verdict = json.loads(runtimes._verdict_path("openvino", folder, "encoder").read_text())
    assert verdict["ok"] and {path.name for path in now} <= set(verdict["files"])


def test_two_computers_sharing_an_openvino_export_judge_their_own_blobs_once(monkeypatch, own_cache):
    """One verdict for the export named one computer's compiled blob at a time: a start on the other computer
    (or a run of another thread count, such as Ray workers') found it unjudged and compiled and judged again, and
    so on at every alternation. Each computer's verdict now covers its own blob."""
    loaded = tiny_loaded(55)
    judged: list[str] = []
    real_judge = runtimes._judge

    def judge(name, infer, tower, example, folder, stem):
        judged.append(runtimes.host_identity())
        return real_judge(name, infer, tower, example, folder, stem)

    monkeypatch.setattr(runtimes, "_judge", judge)
    for host in ("computer A", "computer B", "computer A", "computer B"):
        monkeypatch.setattr(runtimes, "host_identity", lambda host=host: host)
        runtimes._ENCODERS.clear()
        assert runtimes.make_encoder(loaded, "segearth", "openvino").name == "openvino"
    assert judged == ["computer A", "computer B"]


def nan_on_the_rasters_crops(exported):
    """A runtime builder whose encoder passes its export check (the check's own crops come out right) and
    returns NaN for every other crop: a damaged export that still loads."""
    def build(tower, example, folder, stem="encoder"):
        infer = exported(tower, example, folder, stem)
        checked = example.numpy()

        def run(pixels: np.ndarray) -> np.ndarray:
            features = infer(pixels)
            judged = pixels.shape == checked.shape and np.array_equal(pixels, checked)
            return features if judged else np.full_like(features, np.nan)

        return run

    return build


def test_a_runtime_whose_output_is_not_a_number_fails_the_run_and_writes_nothing(tmp_path, own_cache, monkeypatch):
    """A runtime that passes its check but returns NaN for the raster's crops: the engine turned NaN into
    class 0 on every pixel and exited 0. Now the run stops with one sentence naming the runtime and what to
    do, exit code 3, and no file."""
    exported = runtimes.BUILDERS["onnxruntime"]
    monkeypatch.setitem(runtimes.BUILDERS, "onnxruntime", nan_on_the_rasters_crops(exported))
    model = save_plain(make_tiny_clip(16, seed=46), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 240, 240)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, segment_args(raster, model, out, "onnxruntime"))
    assert result.exit_code == 3, result.output
    [folder] = (own_cache / "encoders").iterdir()
    assert result.output.strip() == (
        f"Error: The output of the image encoder (onnxruntime) is not a number (NaN or infinite) at {240 * 240} "
        "valid pixels, so no class can be chosen there; nothing was written. Its cached export may be damaged: "
        f"delete {folder} (the next run exports and checks it again), or run with --runtime torch.")
    assert list(out.iterdir()) == []


def test_probabilities_that_are_not_numbers_are_refused_not_labelled_class_0():
    """label_probabilities (the outline refinement's labelling) made a valid pixel's NaN probabilities class 0."""
    probs = np.full((3, 2, 2), 0.2, np.float32)
    probs[1] = 0.6
    probs[:, 0, 0] = np.nan
    valid = np.ones((2, 2), bool)
    with pytest.raises(ModelError, match=r"^The output of the model is not a number \(NaN or infinite\) at 1 valid"):
        label_probabilities(probs, valid)
    valid[0, 0] = False
    class_ids, score = label_probabilities(probs, valid)
    assert class_ids.tolist() == [[NODATA_CLASS, 1], [1, 1]]
    assert np.isnan(score[0, 0]) and np.allclose(score[valid], 0.6)


def test_features_that_are_not_numbers_are_not_cached_so_a_repaired_runtime_recovers(tmp_path, own_cache,
                                                                                    monkeypatch):
    """With --cache-features, the NaN features of a damaged export were kept: the run failed, and after the user
    deleted the export as the failure advises, every later run of the raster failed again, from the cache."""
    exported = runtimes.BUILDERS["onnxruntime"]
    monkeypatch.setitem(runtimes.BUILDERS, "onnxruntime", nan_on_the_rasters_crops(exported))
    model = save_plain(make_tiny_clip(16, seed=46), tmp_path / "tiny.pt")
    raster = write_rgb(tmp_path / "image.tif", 240, 240)
    broken = CliRunner().invoke(app, [*segment_args(raster, model, tmp_path / "a", "onnxruntime"), "--cache-features"])
    assert broken.exit_code == 3, broken.output
    monkeypatch.setitem(runtimes.BUILDERS, "onnxruntime", exported)  # exported again, sound this time
    for folder in (own_cache / "encoders").iterdir():
        shutil.rmtree(folder)
    recovered = CliRunner().invoke(app, [*segment_args(raster, model, tmp_path / "b", "onnxruntime"),
                                         "--cache-features"])
    assert recovered.exit_code == 0, recovered.output
    assert report_of(tmp_path / "b")["features"]["cached"] == 0


def test_a_zoomed_in_rerun_under_auto_finds_the_features_of_the_larger_run(tmp_path, own_cache, monkeypatch):
    """auto runs a small run (under AUTO_MIN_CROPS crops) on torch, which would not repay a first export; but once
    a larger run has exported and judged a runtime, a zoomed-in re-run uses it too, so it finds every feature the
    larger run cached (the cache keeps each runtime's features apart) and writes what an uncached run writes."""
    from backend.engine.feature_cache import FeatureCache

    loaded = load_model(str(save_plain(make_tiny_clip(16, seed=8), tmp_path / "tiny.pt")))
    raster = write_rgb(tmp_path / "image.tif", 700, 700)
    compiled = next(name for name in runtimes.COMPILED if runtimes.runtime_installed(name))
    timed_as(monkeypatch, **{**{name: 1.0 for name in runtimes.COMPILED}, compiled: 9.0, "torch": 0.5})
    cache = FeatureCache(max_bytes=1 << 30)

    def run(name: str, cache, **options):
        out = tmp_path / name
        out.mkdir()
        result = segment_raster(SegmentOptions(raster=raster, class_lines=CLASSES, out=out / "r.gpkg",
                                               class_raster=out / "c.tif", **options),
                                loaded, feature_cache=cache)
        with rasterio.open(out / "c.tif") as ds:
            return result, ds.read()

    whole, _ = run("whole", cache)
    assert whole.tiles >= runtimes.AUTO_MIN_CROPS and whole.report["encoder"] == compiled
    zoom = {"bbox": (500600.0, 4999200.0, 500800.0, 4999400.0)}
    assert runtimes.pick_runtime("auto", torch.device("cpu"), crops=16) == ["torch"]
    zoomed, classes = run("zoomed", cache, **zoom)
    assert zoomed.tiles < runtimes.AUTO_MIN_CROPS
    assert zoomed.report["encoder"] == compiled
    assert zoomed.features["cached"] == zoomed.tiles and zoomed.features["encoded"] == 0
    # A new process (no encoder built yet) finds the judged export on disk; uncached, it writes the same.
    runtimes._ENCODERS.pop(loaded.model, None)
    fresh, fresh_classes = run("fresh", FeatureCache(max_bytes=1 << 30), **zoom)
    assert fresh.report["encoder"] == compiled and fresh.features["encoded"] == fresh.tiles
    assert np.array_equal(classes, fresh_classes)


def test_a_runtime_that_does_not_load_keeps_the_cached_export_and_says_one_line(tmp_path, own_cache):
    """A broken OpenVINO install (its import fails) was blamed on the checked export on disk: "the cached export
    could not be used; exporting it again", the export deleted, then a second line that openvino failed."""
    loaded = tiny_loaded(43)
    assert runtimes.make_encoder(loaded, "segearth", "openvino").name == "openvino"
    folder = runtimes.export_folder(loaded, "segearth", 224)
    kept = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    assert "encoder.xml" in kept and runtimes._verdict_path("openvino", folder, "encoder").name in kept
    broken = tmp_path / "broken"
    (broken / "openvino").mkdir(parents=True)
    (broken / "openvino" / "__init__.py").write_text("raise ImportError('simulated broken OpenVINO build')\n")
    child = (
        "import sys; sys.modules.pop('openvino', None)\n"
        "from backend.engine import runtimes\n"
        "from tests.backend.test_runtimes import tiny_loaded\n"
        "notes = []\n"
        "encoder = runtimes.make_encoder(tiny_loaded(43), 'segearth', 'openvino', notice=notes.append)\n"
        "print(encoder.name); print(notes)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken), str(Path(__file__).resolve().parents[2]),
                                                         str(Path(__file__).resolve().parents[1])])}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, notes = out.stdout.strip().splitlines()[-2:]
    assert name == "torch"
    assert notes == str(["openvino could not compile the model (simulated broken OpenVINO build); using torch."])
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == kept


def test_exports_and_cached_features_of_an_earlier_engine_are_not_reused(tmp_path, monkeypatch):
    """The keys hold the engine's own source: after an upgrade that changed how pixels are read (a fix to the
    resampling of NaN holes changed 110 class pixels), a disk cache filled by the earlier version served its
    features, and the earlier version's exported tower would run."""
    from backend.engine import feature_cache

    loaded = load_model(str(save_plain(make_tiny_clip(16, seed=44), tmp_path / "tiny.pt")))
    raster = write_rgb(tmp_path / "image.tif", 300, 300)
    folder = tmp_path / "features"

    def run(name: str):
        options = SegmentOptions(raster=raster, class_lines=["water", "road"], runtime="torch", region_checks=False,
                                 out=tmp_path / f"{name}.gpkg")
        cache = feature_cache.FeatureCache(max_bytes=0, folder=folder, disk_max_bytes=2**26)
        return segment_raster(options, loaded, feature_cache=cache).features

    first, same = run("first"), run("same")
    assert first["cached"] == 0 and same["encoded"] == 0 and same["cached"] == first["encoded"] > 0
    export = runtimes.export_folder(loaded, "segearth", 224)
    assert feature_cache.engine_digest() == feature_cache.engine_digest()  # stable within a version
    upgraded = "0" * 16  # what another version of the engine's source hashes to
    monkeypatch.setattr(feature_cache, "engine_digest", lambda names=feature_cache.PIXEL_PIPELINE: upgraded)
    monkeypatch.setattr(runtimes, "engine_digest", lambda names=feature_cache.PIXEL_PIPELINE: upgraded)
    after = run("after")
    assert after["cached"] == 0 and after["encoded"] == first["encoded"]
    assert runtimes.export_folder(loaded, "segearth", 224) != export
    # An upgrade of a library between the bytes and the features (GDAL resamples, torch computes) too.
    monkeypatch.undo()
    assert run("same again")["encoded"] == 0
    versions = {**feature_cache.library_versions(), "torch": "99.0"}
    monkeypatch.setattr(feature_cache, "library_versions", lambda: versions)
    monkeypatch.setattr(runtimes, "library_versions", lambda: versions)
    assert run("upgraded")["encoded"] == first["encoded"]
    assert runtimes.export_folder(loaded, "segearth", 224) != export
