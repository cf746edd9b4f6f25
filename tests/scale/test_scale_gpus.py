"""Ray workers and the GPUs (no GPU here: a stand-in for Ray that records what the workers are given): a worker on
a CUDA device gets its GPU from Ray (a share of one when there are more workers than GPUs), --device cpu takes none,
a local --device cuda:N gives the workers GPU N, and inside a worker a CUDA device names the GPU Ray gave it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sample_rasters import naip_corner

from backend.scale import run
from backend.scale.worker import EngineSettings, worker_device


class FakeRay:
    """What Workers asks of Ray: a cluster of `gpus` GPUs; records ray.init and each actor's options."""

    def __init__(self, gpus: int, cpus: int = 8):
        self.gpus, self.cpus = gpus, cpus
        self.initialised: dict | None = None
        self.actor_options: list[dict] = []

    def is_initialized(self) -> bool:
        return self.initialised is not None

    def init(self, **kwargs) -> None:
        import os

        self.initialised = {**kwargs, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def cluster_resources(self) -> dict:
        return {"GPU": self.gpus, "CPU": self.cpus}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": self.cpus, "GPU": self.gpus}}]

    def remote(self, cls):
        fake = self

        class Options:
            def options(self, **options):
                def create(engine):
                    fake.actor_options.append(options)
                    return SimpleNamespace(engine=engine)

                return SimpleNamespace(remote=create)

        return Options()

    def shutdown(self) -> None:
        self.initialised = None


def start(monkeypatch, gpus: int, device: str, workers: int | None, cluster: str | None = None) -> FakeRay:
    fake = FakeRay(gpus)
    if cluster:
        fake.initialised = {}
    monkeypatch.setattr(run, "import_ray", lambda: fake)
    run.Workers(EngineSettings(class_lines=["water"], device=device), workers, cluster)
    return fake


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_workers_than_gpus_share_them_evenly(monkeypatch, device):
    """Without num_gpus every worker saw every GPU and sized its batch from half the free memory of each."""
    fake = start(monkeypatch, gpus=1, device=device, workers=3)
    assert [options.get("num_gpus") for options in fake.actor_options] == [0.3333] * 3
    fake = start(monkeypatch, gpus=2, device=device, workers=3)  # two on one GPU, one on the other: none waits
    assert [options.get("num_gpus") for options in fake.actor_options] == [0.5] * 3


def test_one_worker_per_gpu_of_a_cluster_gets_a_whole_gpu(monkeypatch):
    fake = start(monkeypatch, gpus=4, device="auto", workers=None, cluster="ray://head:10001")
    assert [options.get("num_gpus") for options in fake.actor_options] == [1] * 4


def test_workers_on_the_cpu_take_no_gpu(monkeypatch):
    fake = start(monkeypatch, gpus=2, device="cpu", workers=2)
    assert all("num_gpus" not in options for options in fake.actor_options)


def test_a_local_run_on_cuda_n_gives_its_workers_gpu_n(monkeypatch):
    """--device cuda:1: the local Ray has GPU 1 only (each worker sees it as cuda:0); its actors resolved cuda:1
    themselves and failed ('does not exist') when Ray showed them one GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = start(monkeypatch, gpus=1, device="cuda:1", workers=1)
    assert fake.initialised is not None and fake.initialised["CUDA_VISIBLE_DEVICES"] == "1"
    import os

    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # this process's own GPUs stay as they were
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # cuda:1 is the second GPU this process sees
    assert start(monkeypatch, gpus=1, device="cuda:1", workers=1).initialised["CUDA_VISIBLE_DEVICES"] == "3"


def test_inside_a_worker_a_cuda_device_is_the_gpu_ray_gave_it():
    assert worker_device("cuda:1", 1.0) == "cuda:0"
    assert worker_device("cuda", 0.5) == "cuda:0"
    assert worker_device("auto", 1.0) == "cuda:0"
    assert worker_device("cuda:1", None) == "cuda:1"  # not a Ray worker with a GPU: the device as given
    assert worker_device("cpu", None) == "cpu"


def test_a_worker_whose_gpu_runs_out_of_memory_runs_the_chunk_again_with_half_the_batch(tiny_model, shared_data,
                                                                                        tmp_path, monkeypatch):
    """Ray's max_task_retries ran the chunk again with the same batch, which failed the same way."""
    import torch

    from backend.engine import sliding
    from backend.scale.worker import ChunkWorker

    raster = naip_corner(shared_data, tmp_path / "corner.tif", 400)
    real = sliding.Segmenter.crop_features
    tried: list[int] = []

    def crop_features(self, batch, keys=None):
        tried.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, batch, keys)

    monkeypatch.setattr(sliding.Segmenter, "crop_features", crop_features)
    worker = ChunkWorker(EngineSettings(class_lines=["water", "road"], weights=str(tiny_model), device="cpu",
                                        batch_size=8, runtime="torch"))
    arrays = worker.run_chunk(str(raster), (0, 0, 400, 400), 9, False)
    assert int(arrays["valid"]) > 0 and arrays["class_ids"].shape == (400, 400)
    assert worker.segmenter.batch_size == 2 and max(tried) == 8  # kept for the worker's next chunks
