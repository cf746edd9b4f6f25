"""The CUDA paths, their control flow checked on the CPU (this machine has no GPU): a --half model through the
quality estimate's region checks; the out-of-memory retry of the server's segment jobs and of `farslip segment`
(only for the dense pass's batches, the failed attempt's memory freed first, one sentence when nothing fits);
the feature cache's copy from a GPU other than GPU 0; a GPU's default batch size."""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from backend.engine import quality, sliding
from backend.engine.devices import DeviceMemoryError
from backend.engine.models import load_model, to_half
from backend.engine.raster import PixelWindow
from backend.engine.temporary import new_run_tag
from backend.engine.text import parse_class_lines
from backend.service.cli import app
from backend.service.jobs import runners
from backend.service.jobs.model_cache import ModelCache

GPU_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


@pytest.fixture(scope="module")
def small_raster(tmp_path_factory, shared_data) -> Path:
    """A 400x400 corner of the NAIP sample: 9 crops, each run short."""
    path = tmp_path_factory.mktemp("raster") / "naip_small.tif"
    with rasterio.open(shared_data / "naip_2020_5m.tif") as src:
        window = rasterio.windows.Window(100, 100, 400, 400)
        profile = {**src.profile, "width": 400, "height": 400, "transform": src.window_transform(window)}
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.update(tiled=False)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


# --------------------------------------------------------------------------- --half and the region checks

def test_a_half_model_embeds_region_crops_in_its_own_precision(tiny_model):
    """`segment --half` loads the model with to_half; the region checks after the dense pass fed it float32
    pixels (RuntimeError: Input type (torch.FloatTensor) and weight type (torch.HalfTensor) should be the same)."""
    image = np.random.default_rng(0).uniform(0, 255, (3, 96, 96)).astype(np.float32)
    crops = [PixelWindow(0, 0, 64, 64), PixelWindow(32, 32, 64, 64)]
    full = quality.crop_embeddings(load_model(str(tiny_model)), sliding.ArraySource(image), crops)
    half = quality.crop_embeddings(to_half(load_model(str(tiny_model))), sliding.ArraySource(image), crops)
    assert half.dtype == np.float32 and half.shape == full.shape
    assert np.isfinite(half).all()
    assert np.abs(half - full).max() < 0.02  # the same embeddings, to fp16's rounding


# --------------------------------------------------------------------------- out of memory: server jobs

class Control:
    """What a segment runner is given by the job worker, recording what it is told."""

    def __init__(self):
        self.run_tag = new_run_tag()
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)

    def progress(self, done: int, total: int) -> None:
        pass

    def should_cancel(self) -> bool:
        return False

    def will_create(self, prefixes) -> None:
        pass

    def restart_timing(self) -> None:
        pass

    def live_message(self, text: str) -> None:
        pass


@pytest.fixture
def segmenters(monkeypatch):
    """The Segmenters runs build (one per dense pass), by batch size, and those still alive (weakly held)."""
    built: list[int] = []
    alive: weakref.WeakSet = weakref.WeakSet()
    real_init = sliding.Segmenter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self.batch_size)
        alive.add(self)

    monkeypatch.setattr(sliding.Segmenter, "__init__", init)
    return SimpleNamespace(built=built, alive=alive)


def encoder_out_of_memory_above(monkeypatch, crops: int) -> None:
    """The encoder step raises CUDA's out-of-memory error for batches of more than `crops` crops, as a GPU would."""
    real = sliding.Segmenter.crop_features

    def crop_features(self, batch, keys=None):
        if len(batch) > crops:
            raise torch.cuda.OutOfMemoryError(GPU_OOM)
        return real(self, batch, keys)

    monkeypatch.setattr(sliding.Segmenter, "crop_features", crop_features)


def fake_cuda_cache(monkeypatch, alive: weakref.WeakSet) -> list[int]:
    """torch.cuda.empty_cache as a probe: how many Segmenters are still alive each time it is called (their
    device memory is what it cannot give back)."""
    seen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: seen.append(len(alive)))
    return seen


def segment_request(raster: Path, model: Path, out: Path, batch_size: int, **more) -> dict:
    return {"raster": str(raster), "weights": str(model), "class_lines": ["water", "road"], "out": str(out),
            "batch_size": batch_size, "runtime": "torch", **more}


def test_a_job_that_runs_out_of_gpu_memory_in_a_batch_retries_with_half_the_batch_after_freeing_the_last(
        small_raster, tiny_model, tmp_path, monkeypatch, segmenters):
    encoder_out_of_memory_above(monkeypatch, 2)
    emptied = fake_cuda_cache(monkeypatch, segmenters.alive)
    control = Control()
    result = runners.run_segment(segment_request(small_raster, tiny_model, tmp_path / "x.gpkg", 8,
                                                 region_checks=False), control, ModelCache("cpu"))
    assert segmenters.built == [8, 4, 2]
    assert Path(result["outputs"]["vector"]).is_file()
    # Each failed attempt's Segmenter (and its device buffers) was gone when the cache was emptied.
    assert emptied[:2] == [0, 0]
    said = ["The GPU ran out of memory with batch size 8; retrying with batch size 4.",
            "The GPU ran out of memory with batch size 4; retrying with batch size 2."]
    assert [m for m in control.messages if "out of memory" in m] == said
    assert [w for w in result["warnings"] if "out of memory" in w] == said


def test_out_of_memory_after_the_dense_pass_fails_the_job_in_one_sentence_without_running_it_again(
        small_raster, tiny_model, tmp_path, monkeypatch, segmenters):
    """The region checks batch their crops whatever --batch-size is: running the dense pass again at 4, 2 and 1
    only repeated the run five times before failing."""
    def region_checks_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(GPU_OOM)

    monkeypatch.setattr(quality, "crop_embeddings", region_checks_out_of_memory)
    fake_cuda_cache(monkeypatch, segmenters.alive)
    with pytest.raises(DeviceMemoryError) as failed:
        runners.run_segment(segment_request(small_raster, tiny_model, tmp_path / "x.gpkg", 8, min_area=0),
                            Control(), ModelCache("cpu"))
    assert segmenters.built == [8]
    assert "\n" not in str(failed.value) and "--batch-size does not change" in str(failed.value)


# --------------------------------------------------------------------------- out of memory: farslip segment

def cli_segment(raster: Path, model: Path, out: Path, batch_size: int):
    return CliRunner().invoke(app, ["segment", str(raster), "--weights", str(model), "-c", "water", "-c", "road",
                                    "--out", str(out), "--batch-size", str(batch_size), "--runtime", "torch",
                                    "--no-region-checks", "--quiet"])


def test_segment_on_the_command_line_retries_with_half_the_batch_when_the_gpu_runs_out_of_memory(
        small_raster, tiny_model, tmp_path, monkeypatch, segmenters):
    encoder_out_of_memory_above(monkeypatch, 2)
    result = cli_segment(small_raster, tiny_model, tmp_path / "x.gpkg", 8)
    assert result.exit_code == 0, result.output
    assert segmenters.built == [8, 4, 2]
    assert "Note: The GPU ran out of memory with batch size 8; retrying with batch size 4." in result.output
    assert (tmp_path / "x.gpkg").is_file()


def test_segment_says_in_one_line_when_not_even_a_batch_of_one_fits(small_raster, tiny_model, tmp_path,
                                                                    monkeypatch, segmenters):
    encoder_out_of_memory_above(monkeypatch, 0)
    result = cli_segment(small_raster, tiny_model, tmp_path / "x.gpkg", 2)
    assert result.exit_code == DeviceMemoryError.exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "even with --batch-size 1" in errors[0], result.output
    assert "Traceback" not in result.output
    assert segmenters.built == [2, 1]
    assert not (tmp_path / "x.gpkg").exists()


# --------------------------------------------------------------------------- feature cache on cuda:1

def test_the_feature_cache_waits_for_the_copy_on_the_stream_of_the_features_gpu(monkeypatch, tiny_model):
    """The copy to the host runs on the current stream of the features' GPU; an event recorded with no stream
    marks the current device's (GPU 0's) and says the copy from cuda:1 is done before it is."""
    recorded: list = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self):
            return True

    segmenter = sliding.Segmenter(load_model(str(tiny_model)), parse_class_lines(["water"]))
    segmenter.device = torch.device("cuda", 1)  # what the engine takes for a GPU; the features stay here
    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    features = torch.zeros(2, 3, 3, 4)
    segmenter._queue_for_cache([("a",), ("b",)], features)
    assert recorded == [("stream of", features.device)]


# --------------------------------------------------------------------------- a GPU's default batch size

def test_a_gpus_default_batch_counts_torchs_cached_memory_as_free_and_a_ray_worker_sizes_from_its_share(monkeypatch):
    from backend.engine.segment import GPU_BYTES_PER_CROP, default_batch_size

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)  # an earlier job's cache
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    cuda = torch.device("cuda", 0)
    assert default_batch_size(cuda) == 6 * gib // 2 // GPU_BYTES_PER_CROP
    assert default_batch_size(cuda, 0.5) == 3 * gib // 2 // GPU_BYTES_PER_CROP
    assert default_batch_size(torch.device("cpu")) == 8
