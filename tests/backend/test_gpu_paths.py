"""The CUDA paths, their control flow checked on the CPU (this machine has no GPU): a --half model through the
quality estimate's region checks; the out-of-memory retry of the server's segment jobs and of `farslip segment`
(only for the dense pass's batches, the failed attempt's memory freed first, one sentence when nothing fits);
the feature cache's copy from a GPU other than GPU 0; a GPU's default batch size; the search index's and the
evaluation's batches on a GPU (fp16 autocast kept apart from fp32 in the index's cache, the batch from the free
memory, the out-of-memory retry, one wait for the device per chunk); index, evaluate and classify sizing their batch
as segment does, recording the one that ran and saying their retries in a job's message and result; the sentence
when not even one crop fits naming only the command's own options."""

from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from sample_rasters import naip_corner
from training_data import write_two_image_benchmark

from backend.engine import quality, search_index, sliding
from backend.engine.devices import DeviceMemoryError
from backend.engine.models import load_model, to_half
from backend.engine.raster import PixelWindow
from backend.engine.temporary import new_run_tag
from backend.engine.presets import parse_class_lines
from backend.service.cli import app
from backend.service.jobs import runners
from backend.service.jobs.model_cache import ModelCache

GPU_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


@pytest.fixture(scope="module")
def small_raster(tmp_path_factory, shared_data) -> Path:
    """A 400x400 corner of the NAIP sample: 9 crops, each run short."""
    return naip_corner(shared_data, tmp_path_factory.mktemp("raster") / "naip_small.tif", 400)


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
    # A job cannot choose its device (the backend's): its advice does not offer one.
    assert "--device" not in str(failed.value)


def test_a_job_whose_batch_of_one_does_not_fit_offers_only_what_a_request_can_change(
        small_raster, tiny_model, tmp_path, monkeypatch, segmenters):
    encoder_out_of_memory_above(monkeypatch, 0)
    fake_cuda_cache(monkeypatch, segmenters.alive)
    with pytest.raises(DeviceMemoryError) as failed:
        runners.run_segment(segment_request(small_raster, tiny_model, tmp_path / "x.gpkg", 2, region_checks=False),
                            Control(), ModelCache("cpu"))
    assert segmenters.built == [2, 1]
    said = str(failed.value)
    assert "--batch-size 1" in said and "try --half" in said and "--device" not in said, said


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


# --------------------------------------------------------------------------- the search index on a GPU

def windows_out_of_memory_above(monkeypatch, crops: int) -> list[int]:
    """The search index's model step raises CUDA's out-of-memory error for batches of more than `crops` windows;
    the sizes of the batches that ran."""
    ran: list[int] = []
    real = search_index.image_and_patch_features

    def image_and_patch_features(visual, pixels, attention="segearth"):
        if len(pixels) > crops:
            raise torch.cuda.OutOfMemoryError(GPU_OOM)
        ran.append(len(pixels))
        return real(visual, pixels, attention)

    monkeypatch.setattr(search_index, "image_and_patch_features", image_and_patch_features)
    return ran


def fake_cuda_autocast(monkeypatch) -> list[bool]:
    """The model's device taken for a GPU where the precision is chosen (encoders.autocast_enabled), and
    torch.autocast recorded (whether it was asked to run fp16) instead of run: this machine has no GPU."""
    entered: list[bool] = []

    @contextmanager
    def autocast(device_type, dtype=None, enabled=True, **more):
        entered.append(enabled and device_type == "cuda" and dtype == torch.float16)
        yield

    monkeypatch.setattr(search_index, "autocast_enabled", lambda device, half: half is not False)
    monkeypatch.setattr(torch, "autocast", autocast)
    return entered


def test_index_retries_with_half_the_batch_when_the_gpu_runs_out_of_memory_and_embeds_the_same(
        small_raster, tiny_model, tmp_path, monkeypatch):
    """`farslip index` (and search) ran a fixed batch with no retry: a batch too big for the GPU ended the run."""
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "clean"))
    loaded = load_model(str(tiny_model))
    with search_index.open_index(small_raster, loaded) as index:
        index.ensure()
        clean = index.entries()
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "retried"))
    ran = windows_out_of_memory_above(monkeypatch, 2)
    result = CliRunner().invoke(app, ["index", str(small_raster), "--weights", str(tiny_model), "--batch-size", "8",
                                      "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "out of memory" in line]
    assert said == ["Note: The GPU ran out of memory with batch size 8; retrying with batch size 4.",
                    "Note: The GPU ran out of memory with batch size 4; retrying with batch size 2."]
    assert ran and max(ran) == 2  # the later batches kept the size that fitted
    with search_index.open_index(small_raster, loaded) as index:
        assert index.missing() == 0
        retried = index.entries()
    assert np.array_equal(retried.embeddings, clean.embeddings) and np.array_equal(retried.pixels, clean.pixels)


def test_search_says_a_retry_once_among_its_notices_and_one_sentence_when_not_even_one_window_fits(
        small_raster, tiny_model, tmp_path, monkeypatch):
    windows_out_of_memory_above(monkeypatch, 2)
    args = ["search", str(small_raster), "farmland", "--weights", str(tiny_model), "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "hits.gpkg")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("The GPU ran out of memory with batch size 8; retrying with batch size 4.") == 1
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "none-fits"))
    windows_out_of_memory_above(monkeypatch, 0)
    failed = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "none.gpkg")])
    assert failed.exit_code == DeviceMemoryError.exit_code, failed.output
    errors = [line for line in failed.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "even with a batch of one" in errors[0] and "Traceback" not in failed.output


def test_an_index_embedded_in_fp16_on_a_gpu_is_never_served_for_fp32_nor_the_reverse(small_raster, tiny_model,
                                                                                       tmp_path, monkeypatch):
    """On a GPU the index ran fp32 while segment's dense pass ran fp16 autocast; with autocast, an fp16 index
    kept in the same folder as the fp32 one would answer fp32 searches with fp16 embeddings."""
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(tiny_model))
    entered = fake_cuda_autocast(monkeypatch)
    with search_index.open_index(small_raster, loaded, batch_size=4) as fp16:
        fp16.ensure()
        assert fp16.precision == "fp16" and fp16.manifest["precision"] == "fp16"
    assert entered and all(entered)  # every batch asked for fp16 autocast, as the dense pass does on a GPU
    entered.clear()
    with search_index.open_index(small_raster, loaded, batch_size=4, half=False) as fp32:
        assert fp32.precision == "fp32" and fp32.folder != fp16.folder
        assert fp32.missing() == fp32.window_count()  # none of the fp16 windows stands in for fp32 ones
        fp32.ensure()
    assert entered and not any(entered)
    with search_index.open_index(small_raster, loaded, batch_size=4) as again:
        assert again.folder == fp16.folder and again.missing() == 0  # each precision keeps its own windows


def test_an_index_on_a_gpu_sizes_its_batch_from_free_memory_unless_given(small_raster, tiny_model, monkeypatch):
    from backend.engine.segment import GPU_BYTES_PER_CROP

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    loaded = load_model(str(tiny_model))
    loaded.device = torch.device("cuda", 0)  # only sized here: nothing runs on it
    with search_index.open_index(small_raster, loaded) as index:
        assert index.batch_size == 6 * gib // 2 // GPU_BYTES_PER_CROP
    with search_index.open_index(small_raster, loaded, batch_size=5) as index:
        assert index.batch_size == 5
    loaded.device = torch.device("cpu")
    with search_index.open_index(small_raster, loaded) as index:
        assert index.batch_size == 8 and index.precision == "fp32"  # the CPU as before


def test_an_index_copies_each_chunk_back_while_the_next_one_runs(small_raster, tiny_model, tmp_path, monkeypatch):
    """One wait for the device per chunk of windows, after the next chunk is queued: not one per batch."""
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cache"))
    events: list[str] = []
    real_embeddings, real_copy = search_index.window_embeddings, search_index.host_copy

    def window_embeddings(*args, **kwargs):
        events.append("run")
        return real_embeddings(*args, **kwargs)

    def host_copy(vectors):
        wait = real_copy(vectors)

        def waited():
            events.append("wait")
            return wait()
        return waited

    monkeypatch.setattr(search_index, "window_embeddings", window_embeddings)
    monkeypatch.setattr(search_index, "host_copy", host_copy)
    monkeypatch.setattr(search_index, "CHUNK_WINDOWS", 1)
    with search_index.open_index(small_raster, load_model(str(tiny_model)), batch_size=1, half=False) as index:
        index.ensure()
    # A 400-px raster: one level of 3 x 3 windows (224 px, stride 112, the last shifted to the edge), row by row;
    # each window a chunk, whose copy is waited for once the next one of its row runs.
    assert events == ["run", "run", "wait", "run", "wait", "wait"] * 3


# --------------------------------------------------------------------------- out of memory: farslip evaluate

@pytest.fixture
def benchmark_folder(tmp_path) -> Path:
    """An img_dir/ann_dir benchmark of two 128 x 96 images, dark left and bright right."""
    return write_two_image_benchmark(tmp_path / "bench")


def test_evaluate_benchmark_retries_with_half_the_batch_when_the_gpu_runs_out_of_memory(
        benchmark_folder, tiny_model, tmp_path, monkeypatch, segmenters):
    """The benchmark evaluation ran the engine's dense pass with no retry: BatchOutOfMemory ended it."""
    args = ["evaluate", "--benchmark", str(benchmark_folder), "-c", "dark", "-c", "bright", "--weights",
            str(tiny_model), "--device", "cpu", "--batch-size", "8", "--quiet"]
    clean = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "clean.json")])
    assert clean.exit_code == 0, clean.output
    encoder_out_of_memory_above(monkeypatch, 2)
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "retried.json")])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "out of memory" in line]
    assert said == ["Warning: The GPU ran out of memory with batch size 8; retrying with batch size 4.",
                    "Warning: The GPU ran out of memory with batch size 4; retrying with batch size 2."]
    figures = [json.loads((tmp_path / f"{name}.json").read_text())["metrics"] for name in ("clean", "retried")]
    assert figures[0]["confusion"] == figures[1]["confusion"]


def test_evaluate_on_labels_retries_the_dense_pass_with_half_the_batch(tiny_model, monkeypatch, segmenters):
    from training.evaluate import predict_classes, segmenter_for

    image = np.random.default_rng(0).uniform(0, 255, (3, 300, 300)).astype(np.float32)
    loaded = load_model(str(tiny_model))
    window = PixelWindow(0, 0, 300, 300)
    clean = predict_classes(segmenter_for(loaded, ["water", "road"]), sliding.ArraySource(image), window)
    encoder_out_of_memory_above(monkeypatch, 1)
    notes: list[str] = []
    segmenter = segmenter_for(loaded, ["water", "road"], batch_size=4)
    retried = predict_classes(segmenter, sliding.ArraySource(image), window, notice=notes.append)
    assert notes == ["The GPU ran out of memory with batch size 4; retrying with batch size 2.",
                     "The GPU ran out of memory with batch size 2; retrying with batch size 1."]
    assert segmenter.batch_size == 1 and np.array_equal(retried, clean)
    encoder_out_of_memory_above(monkeypatch, 0)
    with pytest.raises(DeviceMemoryError, match="even with --batch-size 1"):
        predict_classes(segmenter, sliding.ArraySource(image), window, notice=notes.append)


# --------------------------------------------------------------------------- batch sizes as segment picks them

def default_batch_of(monkeypatch, crops: int) -> None:
    """segment's default batch (from the free memory on a GPU) taken as `crops`, whatever the device: on this
    machine's CPU it is 8, so a command that sized its batch elsewhere (a fixed 8) shows."""
    from backend.engine import segment

    monkeypatch.setattr(segment, "default_batch_size", lambda device, share=1.0: crops)


def test_index_without_batch_size_sizes_its_batch_as_segment_does(small_raster, tiny_model, tmp_path, monkeypatch):
    """`farslip index` and the server's index job defaulted to a fixed 8 windows: on a GPU never sized from its
    free memory."""
    from backend.service.search_jobs import run_index

    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cli"))
    default_batch_of(monkeypatch, 2)
    ran = windows_out_of_memory_above(monkeypatch, 100)  # records the batches, all fit
    result = CliRunner().invoke(app, ["index", str(small_raster), "--weights", str(tiny_model), "--device", "cpu",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert ran and max(ran) == 2  # rows of 3 windows: a batch of 8 would have run 3 at once
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "job"))
    job = run_index({"raster": str(small_raster), "weights": str(tiny_model)}, Control(), ModelCache("cpu"))
    assert job["index"]["batch_size"] == 2


def test_an_index_job_returns_its_retries_among_its_notices_and_records_the_batch_that_ran(
        small_raster, tiny_model, tmp_path, monkeypatch):
    """The index job's retries went to the worker's stderr only: neither its message nor its result said them."""
    from backend.service.search_jobs import run_index

    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cache"))
    windows_out_of_memory_above(monkeypatch, 2)
    control = Control()
    job = run_index({"raster": str(small_raster), "weights": str(tiny_model), "batch_size": 8}, control,
                    ModelCache("cpu"))
    said = ["The GPU ran out of memory with batch size 8; retrying with batch size 4.",
            "The GPU ran out of memory with batch size 4; retrying with batch size 2."]
    assert job["notices"] == said
    assert [m for m in control.messages if "out of memory" in m] == said
    assert job["index"]["batch_size"] == 2  # the one that ran


def test_evaluate_records_the_batch_it_ran_and_sizes_it_as_segment_does(
        benchmark_folder, tiny_model, tmp_path, monkeypatch, segmenters):
    """`farslip evaluate --batch-size` defaulted to a fixed 8, and the report recorded the size asked for, not the
    one a retry after running out of GPU memory left."""
    args = ["evaluate", "--benchmark", str(benchmark_folder), "-c", "dark", "-c", "bright", "--weights",
            str(tiny_model), "--device", "cpu", "--quiet"]
    default_batch_of(monkeypatch, 3)
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "default.json")])
    assert result.exit_code == 0, result.output
    assert segmenters.built == [3]
    assert json.loads((tmp_path / "default.json").read_text())["batch_size"] == 3
    encoder_out_of_memory_above(monkeypatch, 1)
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--json", str(tmp_path / "retried.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "retried.json").read_text())
    assert report["batch_size"] == 1 and "batch_size" not in report["metrics"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    from training_data import make_synthetic

    raster, labels, _ = make_synthetic(tmp_path_factory.mktemp("labelled"))
    return raster, labels


def test_an_evaluate_job_says_its_retries_in_its_message_and_warnings(labelled, tiny_model, tmp_path, monkeypatch):
    """evaluate_model took no notice: a server evaluate job's retries went to the worker's stderr only."""
    from backend.service.evaluate_jobs import run_evaluate

    raster, labels = labelled
    request = {"raster": str(raster), "labels": str(labels), "class_field": "cls", "model": str(tiny_model),
               "out_json": str(tmp_path / "job.json")}
    clean = run_evaluate(request, Control(), ModelCache("cpu"))
    default_batch_of(monkeypatch, 4)
    encoder_out_of_memory_above(monkeypatch, 1)
    control = Control()
    job = run_evaluate({**request, "out_json": str(tmp_path / "retried.json")}, control, ModelCache("cpu"))
    said = ["The GPU ran out of memory with batch size 4; retrying with batch size 2.",
            "The GPU ran out of memory with batch size 2; retrying with batch size 1."]
    assert [m for m in control.messages if "out of memory" in m][:2] == said  # as it happens (then as warnings)
    assert [w for w in job["warnings"] if "out of memory" in w] == said
    assert job["metrics"]["confusion"] == clean["metrics"]["confusion"]
    assert json.loads((tmp_path / "retried.json").read_text())["batch_size"] == 1
    encoder_out_of_memory_above(monkeypatch, 0)
    with pytest.raises(DeviceMemoryError) as failed:
        run_evaluate({**request, "out_json": str(tmp_path / "none.json")}, Control(), ModelCache("cpu"))
    assert "--" not in str(failed.value)  # an evaluate request has no --batch-size, --half nor --device


def test_the_quality_calibration_retries_with_half_the_batch_and_fits_the_same(labelled, tiny_model, tmp_path,
                                                                               monkeypatch, capsys):
    """`farslip evaluate --calibrate-quality` ran its tiles' dense pass with no retry: a batch too big for the GPU
    ended the calibration after the evaluation had run."""
    from training.quality_calibration import calibrate_and_keep_the_better

    raster, labels = labelled
    loaded = load_model(str(tiny_model))

    def fit(name: str) -> dict:
        return calibrate_and_keep_the_better(raster, labels, "cls", loaded, tmp_path / f"{name}.json", force=True,
                                             tile=64)

    clean = fit("clean")
    default_batch_of(monkeypatch, 4)
    encoder_out_of_memory_above(monkeypatch, 1)
    capsys.readouterr()
    retried = fit("retried")
    assert [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line] == [
        "Note: The GPU ran out of memory with batch size 4; retrying with batch size 2.",
        "Note: The GPU ran out of memory with batch size 2; retrying with batch size 1."]
    assert retried["tiles"] == clean["tiles"] and retried["calibrated"] == clean["calibrated"]


def test_a_training_whose_validation_runs_out_of_gpu_memory_retries_once_and_says_so(labelled, tiny_model,
                                                                                     tmp_path, monkeypatch):
    """The validation strip's dense pass (before training, after each epoch, and on the written model) went to
    stderr with its retries, which a server train job does not show, and retried again at every epoch. Now the
    retries are the run's warnings (said as they happen), and the batch that fitted is kept for the later ones."""
    from training.api import train_model
    from training_data import fast_options

    raster, labels = labelled
    encoder_out_of_memory_above(monkeypatch, 2)
    heard: list[str] = []

    def progress(step, total, info):
        if info.get("phase") == "warning":
            heard.append(info["message"])

    result = train_model(raster, labels, "cls", tmp_path / "model", base_model=str(tiny_model), epochs=2,
                         options=fast_options(eval_batch_size=8), progress=progress)
    said = ["The GPU ran out of memory with batch size 8; retrying with batch size 4.",
            "The GPU ran out of memory with batch size 4; retrying with batch size 2."]
    assert [line for line in heard if "out of memory" in line] == said  # once, not at every validation
    assert [line for line in result["warnings"] if "out of memory" in line] == said
    assert result["metrics"]["after"]["miou"] is not None


# --------------------------------------------------------------------------- out of memory: farslip classify

def test_classify_retries_with_half_the_batch_when_the_gpu_runs_out_of_memory(small_raster, tiny_model, tmp_path,
                                                                             monkeypatch):
    """classify ran its tiles in a fixed batch with no retry: a batch too big for the GPU ended the run in a
    traceback."""
    import pyogrio.raw

    from backend.engine.export import report_path_for

    args = ["classify", str(small_raster), "-c", "water", "-c", "field", "--tile", "100", "--weights",
            str(tiny_model), "--device", "cpu", "--quiet"]
    clean = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "clean.gpkg")])
    assert clean.exit_code == 0, clean.output
    ran = windows_out_of_memory_above(monkeypatch, 2)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "retried.gpkg")])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "out of memory" in line]
    assert said == ["Note: The GPU ran out of memory with batch size 8; retrying with batch size 4.",
                    "Note: The GPU ran out of memory with batch size 4; retrying with batch size 2."]
    assert max(ran) == 2
    tiles = []
    for name in ("clean", "retried"):
        meta, _, geometry, fields = pyogrio.raw.read(tmp_path / f"{name}.gpkg")
        tiles.append((list(geometry), dict(zip(meta["fields"], fields))))
    (clean_boxes, clean_fields), (boxes, fields) = tiles
    assert boxes == clean_boxes and list(fields["class"]) == list(clean_fields["class"])
    assert np.allclose(fields["prob"], clean_fields["prob"], atol=1e-6)  # the same tiles, the same classes
    report = json.loads(report_path_for(tmp_path / "retried.gpkg").read_text())
    assert [w for w in report["warnings"] if "out of memory" in w] == [line[len("Note: "):] for line in said]
    windows_out_of_memory_above(monkeypatch, 0)
    failed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "none.gpkg")])
    assert failed.exit_code == DeviceMemoryError.exit_code, failed.output
    errors = [line for line in failed.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in failed.output
    assert "--batch-size" not in errors[0] and "--half" not in errors[0] and "--device cpu" in errors[0]


# --------------------------------------------------------------------------- the last sentence names what exists

def test_when_not_even_one_window_fits_the_sentence_names_only_the_commands_own_options(
        small_raster, tiny_model, tmp_path, monkeypatch):
    """The sentence told `farslip search` (and the index) to try --batch-size 1 and --half, which they lack."""
    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cache"))
    windows_out_of_memory_above(monkeypatch, 0)
    search = CliRunner().invoke(app, ["search", str(small_raster), "farmland", "--weights", str(tiny_model),
                                      "--device", "cpu", "--quiet", "--out", str(tmp_path / "hits.gpkg")])
    index = CliRunner().invoke(app, ["index", str(small_raster), "--weights", str(tiny_model), "--device", "cpu",
                                     "--batch-size", "2", "--quiet"])
    for result, named in ((search, ["--device cpu"]), (index, ["--batch-size 1", "--device cpu"])):
        assert result.exit_code == DeviceMemoryError.exit_code, result.output
        error = next(line for line in result.output.splitlines() if line.startswith("Error:"))
        assert all(flag in error for flag in named), error
        assert "--half" not in error and error.count("--") == len(named), error
