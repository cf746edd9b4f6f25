"""/v1/health, /v1/models, /v1/models/download, /v1/presets: what this backend runs on and can load."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request

from backend import __version__
from backend.service.schemas import DeviceInfo, DownloadRequest, Health, JobCreated, ModelList, PresetList, Stopping

from ..security import request_checks
from .jobs import manager_of, queue_job

router = APIRouter()


def device_info(device: str) -> DeviceInfo:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index or 0
        free, _total = torch.cuda.mem_get_info(index)
        return DeviceInfo(type="cuda", name=torch.cuda.get_device_name(index), free_memory_mb=free // 2**20)
    import psutil

    # On the CPU (and Apple's GPU, which shares it) the memory a job can still take is the system's available.
    available = psutil.virtual_memory().available // 2**20
    if kind == "mps":
        return DeviceInfo(type="mps", name="Apple GPU (MPS)", free_memory_mb=available)
    import platform

    return DeviceInfo(type="cpu", name=platform.processor() or platform.machine() or "CPU", free_memory_mb=available)


def health_now(request: Request) -> Health:
    manager = manager_of(request)
    features = manager.models.features
    return Health(version=__version__, device=device_info(request.app.state.device),
                  loaded_model=manager.loaded_model,
                  feature_cache=features.stats() if features is not None else None)


@router.get("/health", response_model=Health)
async def health(request: Request):
    # On threads of its own (app.state.health_threads): requests whose checks wait on a slow disk or network
    # server may fill the shared pool, and the plugin takes a health that does not answer for a dead backend.
    return await anyio.to_thread.run_sync(health_now, request, limiter=request.app.state.health_threads)


@router.get("/models", response_model=ModelList)
def models(request: Request):
    from backend.engine.models import is_loaded, list_models, loaded_identity
    from backend.engine.registry import DEFAULT_MODEL
    from backend.engine.sam_models import list_sam_models

    held = manager_of(request).models.loaded
    identity = loaded_identity(held) if held is not None else None
    # Marked by what the entry is (folder, weights file), never by name alone; "loaded" says which it is whether
    # or not an entry is (a checkpoint file, a fine-tuned folder outside the models folder).
    entries = [dict(entry, loaded=is_loaded(entry, identity)) for entry in list_models()]
    return {"default": DEFAULT_MODEL, "models": entries, "sam_models": list_sam_models(), "loaded": identity}


@router.post("/models/download", response_model=JobCreated, status_code=202)
def submit_download(body: DownloadRequest, request: Request):
    from backend.service.downloads import check_download_request

    with request_checks():
        check_download_request(body.model_dump())
    return queue_job(request, "download", body, [])


@router.get("/presets", response_model=PresetList)
def presets():
    from backend.engine.presets import list_presets

    return {"presets": list_presets()}


@router.post("/shutdown", response_model=Stopping, status_code=202)
def shutdown(request: Request):
    """Stop this backend as SIGTERM does (jobs still running are marked interrupted). The plugin asks this
    first: on Windows a process has no SIGTERM, and QProcess.terminate() does not reach a console program."""
    stop = getattr(request.app.state, "request_exit", None)
    if stop is None:
        raise HTTPException(409, "This backend was not started by `farslip serve`; stop the program that runs it.")
    stop()
    return {"status": "stopping"}
