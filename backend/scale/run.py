"""The driver of a scaled run: plan the chunks, feed them to the Ray workers, keep the results, merge.

Ray Core, not Ray Data: a chunk is an irregular 2-D window (with the crops around it) of one
raster's own grid, and each worker must keep its model loaded and its class lines embedded, so
the natural unit is an actor method call per chunk. Actors restart when their process dies
(max_restarts) and Ray retries the chunk calls they had (max_task_retries); the driver keeps at
most two chunks per worker in flight, so results never pile up in memory. Finished chunks go to
the partial folder's manifest first (manifest.py), so a killed driver resumes; a raster is
finished (finish.py) in a driver thread while the workers compute the next ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import threading
import time
import warnings
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rasterio.crs import CRS

from backend import __version__
from backend.engine.errors import CancelledError, FarslipError, InputError, OutsideBboxError
from backend.engine.colours import write_category_names
from backend.engine.devices import intra_op_threads, usable_cores
from backend.engine.atomic import StagedOutputs, interrupts_deferred, write_text_atomically
from backend.engine.export import check_format_crs, driver_for, layer_name, report_json, report_path_for
from backend.engine.feature_cache import RasterReads, identity_digest, model_identity, raster_reads
from backend.engine.weights import stat_identity
from backend.engine.diskspace import writing_to
from backend.engine.checks import (coarse_vector_path, earlier_coarse_warning, input_files, named_outputs,
                                   outputs_by_role)
from backend.engine.files import (absolute_outputs, absolute_raster_name, check_output_files, held_file,
                                  is_gdal_name, is_gdal_virtual, is_inside, raster_file, same_file)
from backend.engine.options import SegmentOptions, check_language
from backend.engine.outlines import engine_window
from backend.engine.quality import QualityModel
from backend.engine.runtimes import AUTO_MIN_CROPS, measured_speeds, time_auto_runtimes
from backend.engine.raster import is_rotated, open_dataset, open_source, parse_crs, pixel_size, request_window
from backend.engine.segment import deliver_prob_raster, run_warnings
from backend.engine.sliding import CHUNK_COLUMNS, CHUNK_ROWS, count_crops, units
from backend.engine.temporary import new_run_tag

from .finish import FinishSettings, RasterPlan, finish_raster
from .inputs import raster_folder
from .manifest import DamagedPartial, Manifest
from .merge import check_merged_output, merge_layers, write_raster_vrt
from .reproject import check_reach
from .worker import ChunkWorker, EngineSettings, engine_settings, load_segmenter

RAY_HINT = "pip install 'farslip-qgis[ray]'"
PARTIAL_EXIT = 5  # some rasters failed, the others were written


@dataclass
class ScaleRequest:
    """Where and how a scaled run writes, and where it runs."""

    out: Path
    class_raster: Path | None = None  # .vrt: a mosaic over one GeoTIFF per raster; .tif: one input raster's
    out_crs: str | None = None
    overwrite: bool = False
    restart: bool = False
    workers: int | None = None
    cluster: str | None = None
    min_area: float = 0.0
    simplify: float = 0.0
    quality_calibration: str | None = None
    bbox: tuple[float, float, float, float] | None = None  # applied to every raster (one it misses is skipped)
    bbox_crs: str | None = None
    prob_raster: Path | None = None  # as class_raster, the class probabilities
    prob_dtype: str = "float32"  # how prob_raster stores them (segment.deliver_prob_raster)
    refine: str = "none"  # run on the driver, where `segment` runs it, over each raster's finished rasters
    sam_model: str | None = None
    # The files the run reads besides its rasters (model, weights, class list: checks.input_files), which no
    # output may replace; by what a sentence calls them.
    inputs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: SegmentOptions, **where: Any) -> ScaleRequest:
        """The request for `options` (the one conversion, used by the CLI and the server): every field
        that is also a segment option takes the option's value (paths of models and calibrations as text), and
        `inputs` the files a one-raster run of `options` protects besides its raster; `where` gives the rest
        (out_crs, restart, workers, cluster) or overrides (out, class_raster, ...)."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            if item.name in where or not hasattr(options, item.name):
                continue
            value = getattr(options, item.name)
            values[item.name] = str(value) if item.name in TEXT_OPTIONS and value is not None else value
        if "inputs" not in where:  # the rasters are the run's own (check_outputs): options.raster is only the first
            values["inputs"] = {what: path for what, path in input_files(options).items() if what != "input raster"}
        return cls(**values, **where)

    def rasters(self) -> dict[str, Path]:
        """The raster outputs asked for, by role, with the per-raster file finish.py writes for each."""
        return {role: Path(path) for role, path in (("class_raster", self.class_raster),
                                                     ("prob_raster", self.prob_raster)) if path}


TEXT_OPTIONS = ("quality_calibration", "sam_model")  # paths or registry names, carried as text
RASTER_FILES = {"class_raster": "classes.tif", "prob_raster": "probs.tif"}
RASTER_NAMES = {"class_raster": "--class-raster", "prob_raster": "--prob-raster"}


@dataclass
class ScaleResult:
    outputs: dict[str, str]
    rasters: list[dict]
    failed: list[dict]
    chunks: dict
    timings: dict
    run_id: str = ""
    outside: list[str] = field(default_factory=list)  # rasters the --bbox does not reach (skipped)
    warnings: list[str] = field(default_factory=list)  # the run's, then each raster's (named) as `segment` says them

    @property
    def exit_code(self) -> int:
        return PARTIAL_EXIT if self.failed else 0


Progress = Callable[[int, int, int, int], None]  # chunks done, chunks total, pixels done, pixels total


# What a run on Ray cannot do yet: option name -> (the value that asks for it, its command-line spelling).
NOT_YET = {"cache_features": (True, "--cache-features"), "region_checks": (False, "--no-region-checks")}


def check_workers(workers: int | None, cluster: str | None) -> None:
    """--workers: at least 1, and on this computer's own Ray at most its usable cores (each local worker takes
    one and holds a copy of the model; more only queue up memory). A cluster's size is told once connected."""
    if workers is None:
        return
    if workers < 1:
        raise InputError(f"--workers must be at least 1; got {workers}.")
    cores = usable_cores()
    if not cluster and workers > cores:
        raise InputError(f"--workers {workers} is more than the {cores} CPU cores this computer lets the run use: "
                         f"each local worker takes a core and a copy of the model. Use at most {cores}, or "
                         "--cluster ADDRESS to run on more machines.")


def check_scale_options(options) -> None:
    """Refuse, in one sentence each, what a run on Ray cannot do yet; check the class lines and files."""
    from backend.engine.presets import parse_class_lines

    for name, (asked, flag) in NOT_YET.items():
        if getattr(options, name) == asked:
            raise InputError(f"{flag} is not available yet in runs on Ray (several inputs, --workers, --cluster, "
                             "RAY_ADDRESS; in the server FARSLIP_RAY_ADDRESS); leave it out, or segment one raster "
                             "without those.")
    lines = engine_settings(options).class_lines
    if lines:
        parse_class_lines(lines)
    calibration = options.quality_calibration
    if calibration is not None and not Path(calibration).is_file():
        raise InputError(f"The quality calibration file {calibration} does not exist.")
    if calibration is not None:  # its values and class list now, as `segment` checks them; the model once loaded
        QualityModel.load(Path(calibration), None, lines or None)
    from backend.engine import outlines

    outlines.check(options.refine, options.sam_model)  # SAM weights that do not fit: before any chunk runs


NO_CRASH_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"  # Ray's switch for its C++ crash report handler


def import_ray():
    """`import ray`, with Ray's usage statistics (reported to Anyscale by default from a cluster that
    ray.init starts) off unless the user turned them on (RAY_USAGE_STATS_ENABLED=1)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # inherited by the processes Ray starts
    # Without Ray's C++ crash report handler (unless the user asks for it: RAY_DISABLE_FAILURE_SIGNAL_HANDLER=0):
    # ray.shutdown removes it by setting SIGTERM to the default action, for every thread, before
    # _own_signal_handlers can put this process's handler back, and a SIGTERM then killed the run without a word.
    os.environ.setdefault(NO_CRASH_HANDLER, "1")
    try:
        import ray
    except ImportError:
        raise InputError(f"Running on Ray needs the ray extra: {RAY_HINT}.") from None
    # Ray reads the variable when imported: one imported before (by a caller) is told it here.
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if hasattr(constants, NO_CRASH_HANDLER):
        setattr(constants, NO_CRASH_HANDLER, os.environ[NO_CRASH_HANDLER].lower() in ("1", "true"))
    return ray


def plan_rasters(paths: list[str], engine: EngineSettings, crop: int, bbox=None, bbox_crs: str | None = None,
                 refine: str = "none") -> tuple[list[RasterPlan], list[dict], list[str]]:
    """Open every raster (bands, scale, stretch as segment does); a bad one is reported, the rest planned, and
    those a --bbox does not reach are skipped (the third list: a folder of tiles cut to an area of interest
    is no run of failures).

    The chunks cover the window the engine computes for `refine` (edges: the request plus its halo); each plan
    keeps the files GDAL read for its raster (its `reads`, for the resume facts: _input_facts)."""
    plans, failed, outside = [], [], []
    rows, columns = engine.chunk_rows or CHUNK_ROWS, engine.chunk_columns or CHUNK_COLUMNS
    for index, path in enumerate(paths):
        try:
            with open_source(path, engine.bands, engine.scale, engine.gsd_m, engine.value_range,
                             engine.square_gsd) as source:
                reads = raster_reads(path, source.dataset)
                window = request_window(source, bbox, bbox_crs, clip=True)
                computed = engine_window(refine, source, window)
                chunks = units(computed, rows, columns)
                crops = count_crops(source.height, source.width, computed, crop, crop // 2, columns, rows)
                plan = RasterPlan(index, path, source.crs, window, chunks, crops, computed=computed,
                                  transform=source.window_transform(window), clip=source.clip, reads=reads)
        except OutsideBboxError:
            outside.append(path)
            continue
        except FarslipError as error:
            failed.append({"raster": path, "error": str(error), "exit_code": error.exit_code})
            continue
        plan.keys = [f"r{index:06d}-{u.row_off}-{u.col_off}" for u in chunks]
        plans.append(plan)
    return plans, failed, outside


def raster_grids(paths: list[str]) -> list[tuple[str, CRS, Any, int, int]]:
    """Each raster's CRS and grid (path, CRS, transform, width, height) from its header, for check_reach; the
    rasters that cannot be opened are left out (plan_rasters reports them)."""
    grids = []
    for path in paths:
        try:
            with open_dataset(path) as ds:
                grids.append((path, ds.crs, ds.transform, ds.width, ds.height))
        except FarslipError:
            continue
    return grids


def _input_facts(paths: list[str], plans: Sequence[RasterPlan] = ()) -> list[dict]:
    """Each input as a resumed run must find it again: its path and every file GDAL reads for it (a VRT
    mosaic's sources, masks, overviews, .aux.xml), each by its stat identity (a changed tile of an unchanged
    VRT is another input). A raster inside a file (an archive's member, a subdataset) by that file and its
    name in it (feature_cache.raster_reads: a rewritten archive or container is another input). GDAL virtual
    paths over no file here (/vsis3/...) by their path only: this machine cannot tell their version. The files
    of a raster `plans` holds are those read when it was planned (plan_rasters); the others' are looked up."""
    planned: dict[int, RasterReads | None] = {plan.index: plan.reads for plan in plans}
    facts = []
    for index, path in enumerate(paths):
        reads = planned[index] if index in planned else raster_reads(path)
        if reads is None:
            facts.append({"path": path})
            continue
        files = reads.files
        entry: dict = {"path": str(files[0])}
        if reads.where != "{}":
            entry["name"] = reads.where
        try:
            # With ctime and inode: a file copied over with its size and mtime kept is another raster.
            entry.update(stat_identity(os.stat(files[0])))
        except OSError:
            pass
        companions = []
        for file in files[1:]:
            try:
                companions.append({"file": str(file), **stat_identity(file.stat())})
            except OSError:
                companions.append({"file": str(file), "missing": True})
        if companions:
            entry["reads"] = companions
        facts.append(entry)
    return facts


def _whole_sentences(text: str) -> str:
    """The first line of an error's text, cut back to its last whole sentence where it ends in a colon that
    introduces what came on the next lines (Ray: "Invalid Ray address: 'http://x'. ... To fix this, either:")."""
    line = (text.strip().splitlines() or [""])[0].strip()
    if line.endswith(":"):
        end = line.rfind(". ")
        line = line[:end + 1] if end > 0 else line[:-1].rstrip()
    return line


@contextlib.contextmanager
def _own_signal_handlers(signals=(signal.SIGTERM,)):
    """Keep this process's SIGTERM handling across Ray's start and shutdown.

    Ray's core installs a crash-report handler for SIGTERM at the C level when it starts, and resets
    SIGTERM to the default when it shuts down: a `farslip serve` that ran a Ray job would then die
    on SIGTERM instead of stopping cleanly, and `segment` could not say "Interrupted". The handlers
    are saved and put back with sigaction itself (any thread may do that) and, in the main thread,
    Python's own table too.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    main = threading.current_thread() is threading.main_thread()
    saved = {}
    for sig in signals:
        action = ctypes.create_string_buffer(512)  # larger than any platform's struct sigaction
        if libc.sigaction(int(sig), None, action) == 0:
            saved[sig] = (action, signal.getsignal(sig))
    try:
        yield
    finally:
        for sig, (action, handler) in saved.items():
            if main and handler is not None:
                signal.signal(sig, handler)
            libc.sigaction(int(sig), action, None)


@contextlib.contextmanager
def _ignoring_ctrl_c():
    """Within, in the main thread: Ctrl+C (SIGINT) is ignored, so a cleanup that must finish does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def worker_threads() -> int | None:
    """The torch threads of each worker as FARSLIP_WORKER_THREADS sets them (docs/SCALE.md); None when unset."""
    threads = os.environ.get("FARSLIP_WORKER_THREADS")
    return int(threads) if threads else None


def uses_gpu(device: str) -> bool:
    """Whether a run on `device` takes the GPUs Ray has (auto, cuda, cuda:N), not only CPU cores."""
    name = (device or "auto").strip().lower()
    return name in ("auto", "cuda") or name.startswith("cuda:")


def gpus_per_worker(workers: int, gpus: int) -> float:
    """Each worker's num_gpus: a whole GPU while there are enough; else an equal share of one (0.5 for two
    workers per GPU), rounded down to Ray's 1e-4 so that that many fit on one GPU, and none waits for one."""
    if workers <= gpus:
        return 1
    per_gpu = -(-workers // gpus)
    return (10_000 // per_gpu) / 10_000


def local_gpu(device: str) -> str | None:
    """The GPU a local Ray is limited to for --device cuda:N (its id as CUDA_VISIBLE_DEVICES lists it), or
    None (every GPU, as Ray finds them)."""
    name = (device or "").strip().lower()
    if not name.startswith("cuda:") or not name[5:].isdigit():
        return None
    index = int(name[5:])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    return ids[index] if index < len(ids) else None


@contextlib.contextmanager
def _visible_gpus(ids: str | None):
    """Within (while a local Ray starts, whose processes inherit it): CUDA_VISIBLE_DEVICES is `ids`."""
    if ids is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ids
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class Workers:
    """The Ray actors of a run, created on a local Ray or a cluster."""

    def __init__(self, engine: EngineSettings, workers: int | None, cluster: str | None):
        self.ray = import_ray()
        self.started_ray = False
        self.actors: list = []
        try:
            self._start(engine, workers, cluster)
        except BaseException:
            self.stop()  # a failed or interrupted start (Ctrl+C in ray.init) leaves no Ray behind
            raise

    def _start(self, engine: EngineSettings, workers: int | None, cluster: str | None) -> None:
        ray = self.ray
        if not ray.is_initialized():
            import logging

            self.started_ray = True  # before ray.init: an interrupted one may have started processes already
            try:
                # Ray's client warns (a library path and a URL) before it fails: the sentence below says it.
                with _own_signal_handlers(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if cluster:
                        ray.init(address=cluster, logging_level=logging.ERROR, log_to_driver=False)
                    else:  # --device cuda:N: the local Ray has that GPU only, so its workers run on it
                        with _visible_gpus(local_gpu(engine.device)):
                            ray.init(address="local", num_cpus=workers or 1, include_dashboard=False,
                                     logging_level=logging.ERROR, log_to_driver=False)
            except Exception as error:  # not KeyboardInterrupt: that is the user's
                if cluster and cluster.startswith("ray://") and "ray[client]" in str(error):
                    raise FarslipError(f"Connecting to the Ray cluster at {cluster} needs Ray's client package, "
                                       "which this backend lacks: pip install 'ray[client]' in the backend's "
                                       "environment (make setup installs it), then run again.") from None
                where = f"connect to the Ray cluster at {cluster}" if cluster else "start a local Ray"
                said = _whole_sentences(str(error)) or type(error).__name__
                if cluster and cluster.lower().startswith(("http://", "https://")):
                    advice = ("give the cluster's GCS address (HOST:6379) or its client address "
                              "(ray://HOST:10001), not the dashboard's http:// one.")
                elif cluster:
                    advice = "check the address and that the cluster is up."
                else:
                    advice = "check that this machine can run Ray, or segment without Ray."
                raise FarslipError(f"Could not {where} ({said}); {advice}") from None
        # --device cpu leaves the GPUs to others.
        gpus = int(ray.cluster_resources().get("GPU", 0)) if uses_gpu(engine.device) else 0
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cluster and workers and workers > max(cpus, gpus):
            raise InputError(f"--workers {workers} is more than the Ray cluster at {cluster} has room for ({cpus} "
                             f"CPUs, {gpus} GPUs): the workers beyond would never start. Use at most "
                             f"{max(cpus, gpus, 1)}.")
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        count = workers or gpus or max(1, len(nodes))
        options: dict = {"max_restarts": 3, "max_task_retries": 3, "num_cpus": 1}
        if gpus:
            # One worker per GPU, or as many per GPU as it takes: Ray shows each worker its GPU alone, and
            # workers sharing one size their batches from their share of its memory (worker.load_segmenter).
            options["num_gpus"] = gpus_per_worker(count, gpus)
        elif cluster and not workers:
            # A cluster without GPUs: one worker per node, with the cores of the smallest node.
            cores = int(min(n.get("Resources", {}).get("CPU", 1) for n in nodes)) if nodes else 1
            options["num_cpus"] = max(1, cores)
            engine.threads = max(1, cores)
        # Workers keep torch's thread count unless told: some CPU kernels round differently with fewer
        # threads, and the output must equal a single process's bit for bit (docs/SCALE.md).
        # (Ray itself would pin a one-CPU worker to one thread.)
        threads = worker_threads()
        if threads is not None or not cluster:
            import torch

            engine.threads = threads if threads is not None else torch.get_num_threads()
        remote = ray.remote(ChunkWorker).options(**options)
        self.actors = [remote.remote(engine) for _ in range(count)]

    def pids(self) -> list[int]:
        return self.ray.get([actor.pid.remote() for actor in self.actors])

    def stop(self) -> None:
        """Kill the actors and shut down the Ray this run started; a second Ctrl+C does not cut this short."""
        with _ignoring_ctrl_c():
            for actor in [] if self.started_ray else self.actors:  # a shutdown ends them, without a word
                with contextlib.suppress(Exception):
                    self.ray.kill(actor, no_restart=True)
            if self.started_ray:
                self.started_ray = False
                # SIGTERM and SIGHUP wait for the shutdown (a handler that raised cut it short in Ray's Python code,
                # leaving its processes behind), then stop the run as they asked.
                with interrupts_deferred(("SIGTERM", "SIGHUP")), _own_signal_handlers():
                    self.ray.shutdown()


def segment_rasters(paths: list[str], engine: EngineSettings, request: ScaleRequest, progress: Progress | None = None,
                    should_cancel: Callable[[], bool] | None = None,
                    notice: Callable[[str], None] | None = None,
                    stage: Callable[[str], None] | None = None) -> ScaleResult:
    """Segment every raster of `paths` on Ray workers; write one layer (and a class VRT); see the module.
    `stage` hears what the run does besides its chunks (timing the runtimes, the polygons, the outputs)."""
    stage = stage or (lambda _sentence: None)
    started = time.perf_counter()
    check_workers(request.workers, request.cluster)
    check_merged_output(request.out)
    typed_crs = parse_crs(request.out_crs, CRS(), "--out-crs") if request.out_crs else None  # before the model loads
    # The output CRS must reach every raster: told from their headers before the model loads (a raster that
    # cannot be opened is left to plan_rasters, which reports it), and again below for the windows planned.
    # With a --bbox only its windows count (a Web Mercator output of a window of a raster up to latitude 90),
    # and those are known once the rasters are planned.
    grids = raster_grids(paths) if request.bbox is None else []
    if grids:
        check_reach(grids, typed_crs if typed_crs is not None else grids[0][1], typed_crs is not None)
    # The chunks' block files then hold the class probabilities too (--refine reads them).
    with_probs = request.prob_raster is not None or request.refine != "none"
    loaded, segmenter = load_segmenter(engine)  # the driver's copy: checks the model, scores the polygons
    if request.quality_calibration:  # made for this model: told before any chunk runs
        QualityModel.load(Path(request.quality_calibration), loaded.weights_id, engine.class_lines)
    plans, failed, outside = plan_rasters(paths, engine, segmenter.crop, request.bbox, request.bbox_crs,
                                          request.refine)
    if not plans and not failed:
        raise InputError(f"The bbox overlaps none of the {len(outside)} rasters; choose an area they cover.")
    if not plans:
        first = failed[0]
        error = FarslipError(" ".join(f"{f['raster']}: {f['error']}" for f in failed))
        error.exit_code = first["exit_code"]
        raise error
    out_crs = typed_crs if typed_crs is not None else plans[0].crs
    # What `segment` says of the run as a whole (each raster's own sentences come with its facts: finish_raster);
    # the coarse-polygons sentence is read before this run's report replaces the one that names them.
    said = (run_warnings(loaded, segmenter.classes, check_language(engine.language))
                + earlier_coarse_warning(request.out, request.refine))
    if Path(request.out).suffix.lower() != ".parquet":
        said += check_format_crs(request.out, out_crs)
    check_reach([(p.path, p.crs, p.transform, p.window.width, p.window.height) for p in plans], out_crs,
                typed_crs is not None)
    check_raster_outputs(request, paths, plans)
    check_outputs(request, paths)
    # What decides the output, named as the command line names it (a resumed run must match them all).
    engine_facts = {("classes" if k == "class_lines" else "--" + k.replace("_", "-")): v
                    for k, v in asdict(engine).items() if k not in ("threads", "device", "facts", "model", "weights")}
    facts = {"version": __version__, "inputs": _input_facts(paths, plans),
             "model": identity_digest(model_identity(loaded)), **engine_facts,
             "--min-area": request.min_area, "--simplify": request.simplify, "--out-crs": out_crs.to_string(),
             "--quality-calibration": request.quality_calibration, "--bbox": request.bbox,
             "--bbox-crs": request.bbox_crs, "--prob-raster": request.prob_raster is not None,
             "--refine": request.refine, "--sam-model": request.sam_model if request.refine == "sam" else None}
    manifest = Manifest.open(request.out, facts, request.restart)
    try:
        # What a damaged partial folder cannot give back is computed again, and said.
        said += manifest.drop_damaged(CHUNK_ARRAYS, kept_raster_files(request), FINISHED_FACTS)
        run_id = _kept_run_id(manifest.folder / "run_id")
    except BaseException:
        manifest.close()
        raise
    finish = FinishSettings([c.name for c in segmenter.classes], list(engine.class_lines), loaded.name, run_id,
                            request.min_area, request.simplify, request.quality_calibration, with_probs,
                            engine.chunk_columns or CHUNK_COLUMNS, request.refine, request.sam_model,
                            engine.threshold, loaded.device)
    total_chunks = sum(len(p.units) for p in plans)
    total_pixels = sum(p.pixels for p in plans)
    resumed = sum(1 for p in plans for key in p.keys if key in manifest.chunks or p.index in manifest.finished)
    counters = {"done": resumed, "pixels": sum(u.height * u.width for p in plans for key, u in zip(p.keys, p.units)
                                               if key in manifest.chunks or p.index in manifest.finished)}

    def report_progress():
        if progress is not None:
            progress(counters["done"], total_chunks, counters["pixels"], total_pixels)

    timings = {"plan_s": time.perf_counter() - started}
    if engine.runtime == "auto" and request.cluster is None and loaded.device.type == "cpu" and \
            any(plan.crops >= AUTO_MIN_CROPS for plan in plans):
        # Timed here, once per computer and model shape, not by the workers, which share the cores; at the
        # workers' thread count (FARSLIP_WORKER_THREADS), which the figures are kept (and looked up) for.
        threads = worker_threads()
        with contextlib.ExitStack() as threads_set:
            if threads is not None and threads > 0:
                threads_set.enter_context(intra_op_threads(threads))
            if not measured_speeds(loaded, engine.attention):
                stage("Timing the encoder runtimes (once for this model on this computer).")
            time_auto_runtimes(loaded, engine.attention, stage)
        timings["runtimes_timed_s"] = time.perf_counter() - started - timings["plan_s"]
    workers = None
    computed = 0
    failures = {f["raster"]: f for f in failed}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farslip-finish")
    try:
        t0 = time.perf_counter()
        workers = Workers(engine, request.workers, request.cluster)
        # Read by others while the run goes on (whole or not at all, never an empty file).
        write_text_atomically(manifest.folder / "workers.json", str(workers.pids()), durable=False)
        timings["workers_s"] = time.perf_counter() - t0
        report_progress()
        ray = workers.ray
        t0 = time.perf_counter()
        finishing: dict[int, Future] = {}

        def agreement(plan: RasterPlan, regions: list):
            window = plan.window
            return ray.get(workers.actors[0].region_agreement.remote(
                plan.path, (window.row_off, window.col_off, window.height, window.width), regions, plan.crops))

        def start_finish(plan: RasterPlan) -> None:
            if plan.index not in manifest.finished and plan.index not in finishing:
                finishing[plan.index] = pool.submit(finish_raster, plan, manifest, engine, finish, segmenter,
                                                    agreement)

        todo = [(plan, key, unit) for plan in plans if plan.index not in manifest.finished
                for key, unit in zip(plan.keys, plan.units) if key not in manifest.chunks]
        for plan in plans:
            if all(key in manifest.chunks for key in plan.keys):
                start_finish(plan)
        in_flight: dict = {}
        limit = 2 * len(workers.actors)
        next_actor = 0
        while todo or in_flight:
            if should_cancel is not None and should_cancel():
                raise CancelledError("The run was cancelled; finished chunks are kept for a re-run." if manifest.chunks
                                     else "The run was cancelled before any chunk was finished; nothing was kept.")
            while todo and len(in_flight) < limit:
                plan, key, unit = todo.pop(0)
                if plan.path in failures:
                    continue
                actor = workers.actors[next_actor % len(workers.actors)]
                next_actor += 1
                ref = actor.run_chunk.remote(plan.path, (unit.row_off, unit.col_off, unit.height, unit.width),
                                             plan.crops, with_probs, plan.clip)
                in_flight[ref] = (plan, key, unit)
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                plan, key, unit = in_flight.pop(ref)
                try:
                    arrays = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    cause = getattr(error, "cause", None)
                    if not isinstance(cause, FarslipError):
                        raise
                    failures[plan.path] = {"raster": plan.path, "error": str(cause), "exit_code": cause.exit_code}
                    continue
                manifest.add_chunk(key, arrays, {"raster": plan.index})
                computed += 1
                counters["done"] += 1
                counters["pixels"] += unit.height * unit.width
                report_progress()
                if all(k in manifest.chunks for k in plan.keys):
                    start_finish(plan)
        timings["chunks_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if finishing:
            refining = ", refining outlines" if request.refine != "none" else ""
            stage(f"Making polygons{refining} and checking regions.")
        for index, future in finishing.items():
            plan = next(p for p in plans if p.index == index)
            try:
                manifest.add_raster(index, future.result(), plan.keys)
            except DamagedPartial:  # the partial folder's, not this raster's: the run stops, the folder stays
                raise
            except FarslipError as error:
                failures[plan.path] = {"raster": plan.path, "error": str(error), "exit_code": error.exit_code}
        timings["finish_wait_s"] = time.perf_counter() - t0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        try:
            if workers is not None:
                workers.stop()  # a signal held while Ray shut down is delivered as it returns
        finally:
            manifest.close()
            if not manifest.chunks and not manifest.finished:
                manifest.remove()  # stopped before a chunk was kept: nothing to resume, and no folder in the way
    done = [p for p in plans if p.index in manifest.finished]
    order = {path: number for number, path in enumerate(paths)}
    # In the order given: the first failure's exit code is the first failing raster's on the command line.
    failed = sorted(failures.values(), key=lambda f: order.get(f["raster"], len(order)))
    if not done:
        # Every raster failed (what they computed cannot make them succeed): the partial folder goes too.
        manifest.remove()
        error = FarslipError(" ".join(f"{f['raster']}: {f['error']}" for f in failed))
        error.exit_code = failed[0]["exit_code"] if failed else 2
        raise error
    t0 = time.perf_counter()
    # Chunks of rasters that failed and were not computed: total = resumed + computed + not_computed.
    chunk_counts = {"total": total_chunks, "resumed": resumed, "computed": computed,
                    "not_computed": max(0, total_chunks - resumed - computed)}
    rasters = [manifest.finished[p.index] for p in done]
    # Each raster's sentences under the name its polygons carry in the `raster` field.
    said += [f"{name}: {warning}" for name, raster in zip(raster_names([p.path for p in done]), rasters)
                 for warning in raster.get("warnings", [])]
    stage("Writing the outputs.")
    outputs = _write_outputs(done, manifest, request, out_crs, run_id, loaded.name, facts, failed, chunk_counts,
                             timings, started, outside, said)
    timings["merge_s"] = time.perf_counter() - t0
    manifest.remove()
    return ScaleResult(outputs, rasters, failed, chunk_counts, timings, run_id, list(outside), said)


# The arrays of a chunk's block file (worker.run_chunk; "probs" only when asked), and the facts of a finished
# raster's line (finish.finish_raster) that the run's outputs and its report read.
CHUNK_ARRAYS = ("class_ids", "score", "signals", "valid", "block_rows")
FINISHED_FACTS = ("path", "crs", "bbox", "valid_pixels", "class_stats", "warnings", "quality", "finish_s")


def run_encoders(done: list[RasterPlan], manifest: Manifest) -> list[str]:
    """The encoders (runtimes) the run's chunks ran under, as `segment`'s report names its one: more than one
    when a worker fell back to torch (its notice is among the warnings)."""
    return sorted({name for plan in done for name in manifest.finished[plan.index].get("encoders", [])})


def kept_raster_files(request: ScaleRequest) -> list[str]:
    """The files of a finished raster's folder that the outputs are made of (_write_outputs)."""
    files = ["polygons.gpkg", *(RASTER_FILES[role] for role in request.rasters())]
    return [*files, "coarse.gpkg"] if request.refine != "none" else files


def _kept_run_id(path: Path) -> str:
    """The run id an interrupted run recorded in its partial folder, or a new one (recorded there) when there is
    none or it is damaged."""
    try:
        run_id = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        run_id = ""
    if re.fullmatch(r"[0-9a-f]{12}", run_id):
        return run_id
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    run_id = uuid.uuid4().hex[:12]
    write_text_atomically(path, run_id)
    return run_id


def run_inputs(request: ScaleRequest, paths: list[str]) -> dict[str, Path]:
    """The files the run reads, which no output may replace, by what a sentence calls them: each input raster's
    file (a subdataset's or an archive's too), then the model, weights and class list (request.inputs)."""
    files = [file for path in paths if (file := raster_file(path)) is not None]
    inputs = {"input raster" if len(files) == 1 else f"input raster {i}": file for i, file in enumerate(files, 1)}
    return inputs | dict(request.inputs)


def check_outputs(request: ScaleRequest, paths: list[str]) -> None:
    """The outputs as a one-raster run checks them (checks.check_outputs): names the disk takes, in folders that
    take files, none of them an input (run_inputs: the rasters, the model, weights and class list) or another
    output, none there yet unless --overwrite, nor the other parts of a shapefile output; and the folder of each
    .vrt output (check_raster_folder)."""
    roles = outputs_by_role(request.out, request.refine, request.class_raster, request.prob_raster)
    inputs = run_inputs(request, paths)
    check_output_files(named_outputs(roles), inputs, request.overwrite, replaced=roles.values())
    for target in request.rasters().values():
        if target.suffix.lower() == ".vrt":
            check_raster_folder(target, request.overwrite, inputs)


def check_raster_outputs(request: ScaleRequest, paths: list[str], plans: list[RasterPlan]) -> None:
    """A raster output is a .vrt mosaic (rasters in one CRS, north-up grids or all turned the same way), or a
    .tif when there is one input raster."""
    crss = {plan.crs.to_string() for plan in plans}
    rotated = [plan.path for plan in plans if is_rotated(plan.transform)]
    flips = {(plan.transform.a > 0, plan.transform.e > 0) for plan in plans}
    for role, target in request.rasters().items():
        flag = RASTER_NAMES[role]
        if target.suffix.lower() in (".tif", ".tiff"):
            if len(paths) > 1:
                raise InputError(f"{flag} {target} is one GeoTIFF, but {len(paths)} rasters are segmented; name it "
                                 ".vrt to get a VRT mosaic over one GeoTIFF per raster.")
        elif target.suffix.lower() != ".vrt":
            raise InputError(f"With --workers/--cluster, {flag} is a VRT mosaic over one GeoTIFF per raster (or a "
                             f".tif for a single raster); name it .vrt (got {target}).")
        elif len(crss) > 1:
            raise InputError(f"{flag} builds one VRT mosaic, which needs rasters in one CRS; these are in "
                             f"{', '.join(sorted(crss))}. Run each CRS's rasters apart, or leave {flag} out.")
        elif rotated:
            # A VRT places each raster by a pixel offset in one north-up grid: a rotated one would be squeezed.
            how = "name it .tif" if len(paths) == 1 else f"segment rotated rasters one at a time with {flag} x.tif"
            raise InputError(f"{flag} {target} would be a VRT mosaic, which cannot place rotated rasters, and "
                             f"{rotated[0]} has a rotated grid; {how}, or warp the rasters north-up first (gdalwarp).")
        elif len(flips) > 1:
            raise InputError(f"{flag} {target} would be a VRT mosaic, which needs every raster's rows in one "
                             "direction, but some of these rasters are north-up and others south-up (or flipped "
                             "east-west); run each kind apart, or warp them north-up first (gdalwarp).")


# What a per-raster GeoTIFF's name keeps of a GDAL name: letters, digits and . + - (a run of anything else, ':'
# '"' '*' '?' '<' '>' '|' '/' included, is one '_'), so that the file can be copied to any system.
_UNPORTABLE = re.compile(r"[^\w.+-]+")


def _portable(text: str) -> str:
    return _UNPORTABLE.sub("_", text).strip("._")


def _raster_place(path: str) -> tuple[str | None, str]:
    """Where a raster is on this machine, for its names in a run's outputs: the file (absolute, as given) that
    holds it, and what in its name picks it out of that file: '' for a plain path; the table, variable or
    subdataset of GPKG:a.gpkg:t1, NETCDF:"a.nc":var, HDF5:"a.h5"://g/var (t1, var, g_var); the member of an
    archive (/vsizip/a.zip/sub/x.tif: sub_x). A GDAL name over no file here (/vsis3/b/k.tif) has no file: the
    whole name picks it out."""
    if not is_gdal_name(path):
        return os.path.abspath(path), ""
    held = held_file(path)
    if held is None:
        return None, _portable(os.path.splitext(path)[0])
    if is_gdal_virtual(path):  # the member after the archive (none in /vsigzip/a.tif.gz), without its suffix
        inside = os.path.splitext(path[held.end:])[0]
    else:  # the subdataset's name without its driver and file
        inside = path[path.index(":") + 1:held.start] + path[held.end:]
    return os.path.abspath(path[held.start:held.end]), _portable(inside)


def _top_folder(places: list[tuple[str | None, str]]) -> str:
    """The folder that holds every raster's file here (that of the one file when there is one)."""
    folders = [os.path.dirname(file) for file, _ in places if file is not None]
    return os.path.commonpath(folders) if folders else ""


Places = tuple[list[tuple[str | None, str]], str]  # each raster's _raster_place, and their _top_folder


def _places(paths: list[str]) -> Places:
    places = [_raster_place(path) for path in paths]
    return places, _top_folder(places)


def raster_names(paths: list[str], placed: Places | None = None) -> list[str]:
    """The name of each raster in the merged layer's `raster` field: a file's path relative to the folder that
    holds all of them (its file name when they share one folder); a raster named in GDAL's syntax (a
    subdataset, a virtual path) by its whole name with its file absolute, as `segment` records it
    (files.absolute_raster_name). `placed`: _places(paths), when known."""
    places, top = placed or _places(paths)
    names, seen = [], set()
    for index, (path, (file, _)) in enumerate(zip(paths, places)):
        name = absolute_raster_name(path) if is_gdal_name(path) else Path(os.path.relpath(file, top)).as_posix()
        if name in seen:  # the same file under two spellings
            name = f"{name}_{index}"
        seen.add(name)
        names.append(name)
    return names


def raster_files(paths: list[str], done: list[RasterPlan], placed: Places | None = None) -> list[str]:
    """The per-raster GeoTIFFs of a .vrt output, relative to its folder: a file's path relative to the folder
    that holds all the rasters' files, ending in .tif; a raster named in GDAL's syntax beside its file, named
    for the file and what it reads of it (GPKG:d/a.gpkg:t1 -> d/a_t1.tif, /vsizip/d/b.zip/x.tif -> d/b_x.tif,
    NETCDF:"d/c.nc":var -> d/c_var.tif); one over no file here (/vsis3/b/k.tif) at the top, named for its
    whole name (vsis3_b_k.tif). A name two rasters would share (a.jp2 and a.tif) takes the raster's input
    number. `placed`: _places(paths), when known."""
    places, top = placed or _places(paths)
    files, seen = [], set()
    for plan, path, (held, inside) in zip(done, paths, places):
        if not is_gdal_name(path):
            file = Path(Path(os.path.relpath(held, top)).as_posix()).with_suffix(".tif")
        else:
            folder = Path(os.path.relpath(os.path.dirname(held), top)) if held is not None else Path()
            stem = "_".join(part for part in (_portable(Path(held).stem) if held else "", inside) if part)
            name = stem or f"raster_{plan.index}"
            file = folder / (name if name.lower().endswith(".tif") else f"{name}.tif")
        while file in seen:
            file = file.with_name(f"{file.stem}_{plan.index}.tif")
        seen.add(file)
        files.append(file.as_posix())
    return files


# What GDAL and QGIS write beside a GeoTIFF of a .vrt output's folder (statistics from gdalinfo -stats or QGIS,
# pyramids): replaced with it.
SIDECARS = (".aux.xml", ".ovr")


def _resolved(path: str | os.PathLike) -> str:
    """`path` with its folder's links resolved, not its own (a link in a folder is that link, not its target)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mosaic_sources(mosaic: Path) -> set[str]:
    """The files a VRT reads (_resolved), with their SIDECARS; none when it is not a VRT this can read."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(mosaic).getroot()
    except (OSError, ElementTree.ParseError):
        return set()
    found = set()
    for source in root.iter("SourceFilename"):
        name = (source.text or "").strip()
        if not name or is_gdal_name(name):
            continue
        file = _resolved(mosaic.parent / name if source.get("relativeToVRT") == "1" else name)
        found.update([file, *(file + sidecar for sidecar in SIDECARS)])
    return found


def check_raster_folder(target: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """The folder of the .vrt output `target` (raster_folder) can be replaced whole: it holds none of the run's
    `inputs` (run_inputs), and it is absent, or (with --overwrite) a folder of the previous output only: every
    file in it a source of the `target` there now, or one's SIDECARS."""
    folder = raster_folder(target)
    for what, path in inputs.items():
        if is_inside(path, folder):
            if same_file(path, folder):
                raise InputError(f"The {what} {path} is the folder of {target}'s per-raster GeoTIFFs: writing it "
                                 "would destroy the input. Choose another output name.")
            raise InputError(f"{folder} holds the {what} {path}, and a run replaces that folder with its class or "
                             "probability GeoTIFFs; choose another output name, or move it.")
    if not folder.exists() and not folder.is_symlink():
        return
    if not overwrite:
        raise InputError(f"{folder} already exists; choose another name or allow overwriting (--overwrite).")
    if not folder.is_dir() or folder.is_symlink():
        raise InputError(f"{folder} is {'a link' if folder.is_symlink() else 'a file'}, not the folder of a run's "
                         f"per-raster GeoTIFFs beside {target.name}; move it, or choose another output name.")
    listed = mosaic_sources(target)
    for entry in sorted(folder.rglob("*")):
        if (entry.is_dir() and not entry.is_symlink()) or _resolved(entry) in listed:
            continue
        why = f"{target.name} beside it does not read it" if target.exists() else f"there is no {target.name} beside it"
        raise InputError(f"{folder} holds files a run did not write, such as {entry.relative_to(folder)} ({why}), "
                         "and --overwrite replaces that folder whole; move them, or choose another output name.")


def _write_outputs(done: list[RasterPlan], manifest: Manifest, request: ScaleRequest, out_crs: CRS, run_id: str,
                   model: str, facts: dict, failed: list[dict], chunks: dict, timings: dict,
                   started: float, outside: Sequence[str] = (), said: Sequence[str] = ()) -> dict[str, str]:
    """Merge the finished rasters' layers and write every output under a temporary name, then rename them all
    into place together (atomic.StagedOutputs): the raster outputs (each VRT's folder before it), the polygon
    layers, and the report last. A failure, the commit's included, leaves every output as it was."""
    out = Path(request.out)
    outputs = {"vector": str(out), "report": str(report_path_for(out))}
    inputs = run_inputs(request, [p.path for p in done])
    for target in request.rasters().values():  # checked before the run too; files may have appeared since
        if target.suffix.lower() == ".vrt":
            check_raster_folder(target, request.overwrite, inputs)
    targets: dict[str, Path] = {}
    for role, target in request.rasters().items():
        if target.suffix.lower() == ".vrt":  # the folder first: the VRT only appears over the rasters it reads
            targets[role.replace("_raster", "_rasters")] = raster_folder(target)
        targets[role] = target
    if request.refine != "none":  # the unrefined polygons beside the refined ones, as `segment` writes them
        targets["coarse_vector"] = coarse_vector_path(out)
    targets.update(vector=out, report=report_path_for(out))
    # What staging copies or converts from the finished rasters' folders: a disk that fills up while the outputs
    # are staged (not only when they are renamed) is a sentence, seen before the staged files go.
    needed_mb = sum(f.stat().st_size for p in done for f in manifest.raster_folder(p.index).iterdir()
                    if f.is_file()) / 2**20
    with StagedOutputs(targets, new_run_tag(run_id)) as staged, writing_to(targets.values(), needed_mb):
        paths = [p.path for p in done]
        placed = _places(paths)
        names = raster_names(paths, placed)
        parts = [(manifest.raster_folder(p.index) / "polygons.gpkg", name, p.crs, min(pixel_size(p.transform)))
                 for p, name in zip(done, names)]
        count = merge_layers(parts, staged["vector"], out_crs, out.stem, keep_from=out)
        if "coarse_vector" in targets:
            coarse = targets["coarse_vector"]
            merge_layers([(manifest.raster_folder(p.index) / "coarse.gpkg", *part[1:])
                          for p, part in zip(done, parts)], staged["coarse_vector"], out_crs, coarse.stem,
                         keep_from=coarse)
            outputs["coarse_vector"] = str(coarse)
        files = raster_files(paths, done, placed)
        for role, target in request.rasters().items():
            outputs.update(_stage_raster_output(staged, role, target, done, files, manifest, request.prob_dtype))
        timings["total_s"] = time.perf_counter() - started
        outputs = absolute_outputs(outputs)
        report = {"farslip_version": __version__, "run_id": run_id, "model": model, "crs": out_crs.to_string(),
                  "rasters": [manifest.finished[p.index] for p in done], "failed": failed,
                  "outside_bbox": list(outside), "chunks": chunks, "encoders": run_encoders(done, manifest),
                  "polygons": count, "options": facts, "outputs": outputs, "warnings": list(said),
                  "layer": out.stem if out.suffix.lower() == ".parquet" else layer_name(out.stem, driver_for(out)),
                  "timings": {k: round(v, 3) for k, v in timings.items()}}
        staged["report"].write_text(report_json(report), "utf-8")
        staged.commit()
    return outputs


def _stage_raster_output(staged: StagedOutputs, role: str, target: Path, done: list[RasterPlan],
                         files: list[str], manifest: Manifest, prob_dtype: str = "float32") -> dict[str, str]:
    """One raster output of the finished rasters' own files (`role`: class_raster or prob_raster), written at
    its staged name: the file itself for a .tif, or a VRT over copies of them in the folder `<name>_rasters`
    beside it (each at its raster's file name, see raster_files), staged as an output of its own (the folder is
    replaced whole by the commit). Both in the rasters' own CRS (one for all: check_raster_outputs), whatever
    --out-crs says: that reprojects the polygons only. Probabilities in `prob_dtype`, as `segment` writes them."""
    own = RASTER_FILES[role]

    def copy(source: Path, target: Path) -> None:
        if role == "prob_raster":
            deliver_prob_raster(source, target, prob_dtype, keep=True)
        else:
            shutil.copyfile(source, target)

    if target.suffix.lower() != ".vrt":
        assert len(done) == 1, "check_raster_outputs allows a .tif for one raster only"
        copy(manifest.raster_folder(done[0].index) / own, staged[role])
        if role == "class_raster":
            write_category_names(staged[role])
        return {role: str(target)}
    key = role.replace("_raster", "_rasters")
    folder, staged_folder = raster_folder(target), staged[key]
    staged_folder.mkdir()
    for plan, file in zip(done, files):
        (staged_folder / file).parent.mkdir(parents=True, exist_ok=True)
        copy(manifest.raster_folder(plan.index) / own, staged_folder / file)
    write_raster_vrt(staged[role], [folder / file for file in files], done[0].crs,
                     read_from=[staged_folder / file for file in files])
    return {role: str(target), key: str(folder)}
