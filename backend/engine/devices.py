"""Which torch device a run uses: 'auto' or a device the user named, checked to be usable here."""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

from backend.engine.cores import usable_cores as usable_cores  # its home before
from backend.engine.errors import FarslipError, InputError

T = TypeVar("T")


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be usable here."""
    if isinstance(device, torch.device):
        return device
    name = (device or "cpu").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"Unknown device {device!r}. Use auto, cpu, cuda or mps.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was requested but no CUDA GPU is usable here. Use --device cpu.")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         "GPU(s), numbered from 0.")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("Device 'mps' was requested but Apple MPS is not available. Use --device cpu.")
    return dev


def set_intra_op_threads(threads: int) -> int:
    """From now on, torch ops called from this thread use `threads` threads each; returns the count before.

    torch keeps the count per calling thread (OpenMP's); a thread new to torch first takes the value last
    set anywhere, which `get_num_threads` makes happen before the count is set here, not after.
    """
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    return before


def copies_async(device: torch.device) -> bool:
    """Whether a host-to-device copy to `device` may return before it is done (non_blocking): on CUDA, which
    stages pageable memory first. Not on a Mac's GPU (MPS), whose non-blocking copies can read a temporary host
    array after Python freed it (pytorch/pytorch#139550): the input would be silently corrupted."""
    return device.type == "cuda"


def pinned_upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as float32 on the GPU `device`, through page-locked memory and without waiting: torch's caching
    host allocator hands the block out again only once its upload is done."""
    staging = torch.empty(array.shape, dtype=torch.float32, pin_memory=True)
    np.copyto(staging.numpy(), array)
    return staging.to(device, non_blocking=True)


def start_host_copy(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """A copy of the GPU `tensor` into page-locked host memory, queued without waiting, and the event that marks
    its end: recorded on the current stream of the tensor's own GPU (a bare record() marks the current device's,
    GPU 0's, and reported a copy on cuda:1 done before it was)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensor.device))
    return host, done


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Within, torch ops called from this thread use `threads` threads each; the count before is restored."""
    before = set_intra_op_threads(threads)
    try:
        yield
    finally:
        set_intra_op_threads(before)


# --------------------------------------------------------------------------- running out of device memory

def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device running out of memory (CUDA's own type, or a RuntimeError that says so)."""
    out_of_memory = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if out_of_memory is not None and isinstance(error, out_of_memory):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class BatchOutOfMemory(RuntimeError):
    """The device ran out of memory on one batch of crops (segment's and evaluate's dense pass, the search
    index's windows, classify's tiles): a smaller batch size may fit (`retry_smaller_batches`). Raised only
    around a batch's model step, so an out-of-memory error anywhere else (the region checks, refinement, the
    text embeddings) is never answered with the batches run again."""

    def __init__(self, batch_size: int, error: BaseException):
        super().__init__(f"out of memory on a batch of {batch_size} crops ({error})")
        self.batch_size = batch_size


class DeviceMemoryError(FarslipError):
    """The device has too little free memory for the run, even with the smallest batch."""

    http_status = 507


def release_device_memory() -> None:
    """Give the memory of dropped tensors back to the device (an out-of-memory error's attempt): collect
    them, then empty torch's CUDA cache. Call it outside the `except` block, whose traceback keeps them."""
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except RuntimeError:  # freeing a cache must never fail a run
        pass


# The options of `farslip segment` (and `evaluate`) that a sentence on running out of GPU memory may name.
SEGMENT_FLAGS = ("--batch-size", "--half", "--device")


@contextmanager
def batch_step(batch_size: int) -> Iterator[None]:
    """Around one batch's model step, whose memory grows with the batch: a device that runs out of memory in it
    raises BatchOutOfMemory (a smaller batch may fit: retry_smaller_batches); any other error passes as it is."""
    try:
        yield
    except Exception as error:
        if is_out_of_memory(error):
            raise BatchOutOfMemory(batch_size, error) from error
        raise


def retry_smaller_batches(run: Callable[[int], T], batch_size: int, notice: Callable[[str], None] | None = None,
                          flags: Collection[str] = SEGMENT_FLAGS) -> T:
    """run(batch_size), and on an out-of-memory error of the batches of crops (BatchOutOfMemory) again
    with half the batch, down to 1, the memory of the failed attempt freed first; `notice` hears one
    sentence per retry. Out of memory with a batch of 1, or elsewhere in the run, ends in DeviceMemoryError
    (one sentence, whose advice names only the options among `flags` that the command at hand has:
    out_of_memory_advice)."""
    while True:
        try:
            return run(batch_size)
        except BatchOutOfMemory:
            failed: int | None = batch_size
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            failed, said = None, _first_line(error)  # not the batches: a smaller batch would not help
        # Here, not in the except block: its traceback held the failed attempt's tensors.
        release_device_memory()
        if failed is None:
            step = "--batch-size" if "--batch-size" in flags else "the batch size"
            raise DeviceMemoryError(f"The GPU ran out of memory in a step that {step} does not change ({said}). "
                                    f"{out_of_memory_advice(flags, half=False)}") from None
        if failed <= 1:
            smallest = "--batch-size 1" if "--batch-size" in flags else "a batch of one"
            raise DeviceMemoryError(
                # "1," not "1:": a server job's sentence reads '"batch_size": 1, so' (http_words).
                f"The GPU ran out of memory even with {smallest}, so the model does not fit in the GPU memory that "
                f"is free. {out_of_memory_advice(flags)}") from None
        batch_size = max(1, failed // 2)
        if notice is not None:
            notice(f"The GPU ran out of memory with batch size {failed}; retrying with batch size {batch_size}.")


def out_of_memory_advice(flags: Collection[str], half: bool = True) -> str:
    """What to do when the GPU's memory does not suffice, naming only the options among `flags` (the command's
    own: --half where `half`, --device): `search` has neither --batch-size nor --half, a server job no flag."""
    remedies = ["Free GPU memory (other programs or jobs using it)"]
    if half and "--half" in flags:
        remedies.append("try --half")
    if "--device" in flags:
        remedies.append("run with --device cpu")
    if len(remedies) == 1:
        return remedies[0] + "."
    return ", ".join(remedies[:-1]) + ", or " + remedies[-1] + "."


def _first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:200] + "..."
