"""Dense patch features kept between runs, so that new classes on the same extent skip the image encoder.

A crop's patch features depend on the pixels it sees and on the encoder, never on the classes.
They are keyed by a *scope* (the raster's identity: every file GDAL reads for it, see
:func:`raster_identity`; the processing grid that turns its bands into RGB; the model's weights sha256,
activation, architecture and precision; the attention variant and the runtime) and the crop's place on the
grid. A run on the same or an overlapping extent with other classes then only pays for the text,
the blending and the polygons. Features are stored exactly (float32), so a cached run writes the
same output as an uncached one.

Memory is a bounded LRU (the server keeps one for its lifetime); an optional disk tier (bounded,
oldest files removed first) survives restarts and serves the command line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import GDAL_SIDECARS, atomic_output
from .files import held_file, is_gdal_name
from .temporary import remove_stale
from .weights import files_sha256, stat_identity

# (row, col, height, width) of the crop on the processing grid; for a resampled raster also the columns of the
# strip it was cut from (sliding.py), on which its pixels depend.
CropKey = tuple[int, ...]


# 2: every file GDAL reads for the raster, and the model's activation, architecture, precision;
# 3: the engine's source (engine_digest) is part of each raster scope. (The scope's other parts, such as the
# libraries' versions and the device, change every scope without this version, which a raster's search index
# keeps too: a new version here rebuilds every index on disk.)
IDENTITY_VERSION = 3
# The disk tier lists its folder again each time this process has written this share of the budget since.
RESCAN_SHARE = 8
COMPANION_HASH_MAX = 64 * 2**20  # companions up to this size are told apart by content, larger ones by stat
SIDECAR_SUFFIXES = GDAL_SIDECARS  # what GDAL may read beside each source of a VRT
# What SQLite reads beside a database (a GeoPackage, MBTiles): the write-ahead log holds the edits that QGIS
# (which opens GeoPackages in WAL mode) made since the last checkpoint; a hot journal, an unfinished write.
SQLITE_SIDECARS = ("-wal", "-journal")


class RasterReads(NamedTuple):
    """What GDAL reads for a raster: `files`, every file on this machine, the one holding the raster first;
    `where`, the raster's place in that file: its name with the file's path written {} ('{}' for a raster
    that is its file, '/vsizip/{}/x.tif' for an archive's member, 'GPKG:{}:table' for a subdataset)."""

    where: str
    files: list[Path]


def _gdal_name(path: str | os.PathLike, dataset=None) -> str:
    """The name GDAL opened for the raster: the dataset's own when it is a virtual path or a subdataset (a
    pathlib.Path folds their '//': /vsizip//abs/a.zip/x.tif, HDF5:"a.h5"://var), else `path`."""
    opened = getattr(dataset, "name", None)
    if isinstance(opened, str) and is_gdal_name(opened):
        return opened
    return os.fspath(path)


def _held(name: str) -> tuple[Path, str] | None:
    """The file on this machine that GDAL reads for the raster name `name` (resolved) and the name with that
    file's path written {} (files.held_file)."""
    held = held_file(name)
    return None if held is None else (held.file, name[:held.start] + "{}" + name[held.end:])


def _beside(file: Path, source_of_vrt: bool) -> list[Path]:
    """The files GDAL or SQLite may read beside `file` that are there: a database's write-ahead log or hot
    journal unless empty (SQLite makes an empty log while any reader, this run's GDAL too, has the database
    open), and for a source of a VRT its overviews, mask and .aux.xml."""
    found = []
    for suffix in SQLITE_SIDECARS + (SIDECAR_SUFFIXES if source_of_vrt else ()):
        side = Path(str(file) + suffix)
        try:
            if side.is_file() and (suffix not in SQLITE_SIDECARS or side.stat().st_size > 0):
                found.append(side)
        except OSError:  # gone since: the checkpoint of a log, which the database's own bytes then hold
            pass
    return found


def raster_reads(path: str | os.PathLike, dataset=None) -> RasterReads | None:
    """Every file GDAL reads for the raster at `path` (open as `dataset`, else opened here): the file that holds
    it first (the raster's own file; an archive for a member read through /vsizip/, /vsitar/, /vsigzip/; the
    container of a subdataset such as GPKG:a.gpkg:table), then what rasterio's `dataset.files` lists (.msk,
    .aux.xml, .ovr, world files, a VRT's sources, their archives and containers), the files of nested VRTs,
    the .ovr/.msk/.aux.xml beside each source of a VRT and a GeoPackage's write-ahead log. None when one of
    them is read through a GDAL virtual path over no file here (/vsis3/, /vsicurl/, /vsimem/ ...), whose
    version this machine cannot tell, or is a subdataset whose file its name does not tell."""
    import rasterio

    name = _gdal_name(path, dataset)
    held = _held(name)
    if held is None:
        return None
    found = [held[0], *_beside(held[0], False)]
    pending, opened = [(name, dataset)], {held}
    while pending:
        current, ds = pending.pop(0)
        try:
            if ds is None:
                with rasterio.open(current) as reading:
                    listed, vrt = list(reading.files), reading.driver == "VRT"
            else:
                listed, vrt = list(ds.files), ds.driver == "VRT"
        except Exception:  # a nested VRT GDAL cannot open: its own bytes still count
            listed, vrt = [], False
        for listed_name in listed:
            source = _held(listed_name)
            if source is None:
                return None
            local = source[0]
            nested = vrt and listed_name.lower().endswith(".vrt")
            if nested and source not in opened:  # its sources may lie outside the archive that holds it
                opened.add(source)
                pending.append((listed_name, None))
            if local in found:
                continue
            found.append(local)  # listed but missing: raster_identity records it as missing
            found.extend(side for side in _beside(local, vrt and not nested) if side not in found)
    return RasterReads(held[1], found)


def raster_files(path: str | os.PathLike, dataset=None) -> list[Path] | None:
    """Every file GDAL reads for the raster at `path` (:func:`raster_reads`), its own file first. None when one
    of them is read through a GDAL virtual path over no file here (/vsis3/...), whose version this machine
    cannot tell, and when the raster is one of those its file holds (an archive's member, a subdataset), which a
    list of files cannot tell apart (:func:`raster_identity` names it)."""
    reads = raster_reads(path, dataset)
    return reads.files if reads is not None and reads.where == "{}" else None


def raster_identity(path: str | os.PathLike, dataset=None) -> dict | None:
    """What tells this version of a raster from any other: its file's path and sha256 (an archive's or a
    container's for a raster inside one, with the raster's name in it: "name": "/vsizip/{}/x.tif" or
    "GPKG:{}:table"), and each companion file GDAL reads (:func:`raster_reads`) by sha256 when small, by
    size, mtime, ctime and inode when larger than COMPANION_HASH_MAX (a large VRT mosaic is then not read
    through on every run; a touched or copied-over source only costs a rebuild). sha256s are remembered by
    the files' stat identity (weights.files_sha256). None for a raster read through GDAL virtual paths over
    no file on this machine (/vsis3/, /vsicurl/ ...)."""
    reads = raster_reads(path, dataset)
    if reads is None:
        return None
    files = reads.files
    companions: list[dict] = []
    hashed: list[tuple[dict, Path]] = []
    for file in files[1:]:
        entry: dict = {"file": str(file)}
        try:
            st = file.stat()
        except OSError:
            entry["missing"] = True
        else:
            if st.st_size <= COMPANION_HASH_MAX:
                hashed.append((entry, file))
            else:
                entry.update(stat_identity(st))
        companions.append(entry)
    shas = files_sha256([files[0], *(file for _, file in hashed)])
    for (entry, _), sha in zip(hashed, shas[1:]):
        entry["sha256"] = sha
    identity = {"version": IDENTITY_VERSION, "file": str(files[0]), "sha256": shas[0], "companions": companions}
    if reads.where != "{}":  # a raster's own file keeps the identity it always had
        identity["name"] = reads.where
    return identity


def held_stamp(name: str | os.PathLike) -> dict | None:
    """The stat identity of the file on this machine that holds the raster `name` (None: none, or unreadable)."""
    held = _held(os.fspath(name))
    if held is None:
        return None
    try:
        return stat_identity(held[0].stat())
    except OSError:
        return None


def opened_raster_identity(name: str | os.PathLike, opener):
    """(opener(), the raster's identity) for the raster `name`, the identity None unless it is surely that of
    the file GDAL opened: the file's stat before the open and after the hashing must agree. A file renamed over
    the raster in between (a re-export, rsync) would otherwise key the old pixels' features by the new file's
    sha256, and every later run of the new file would be served them. `opener` returns the opened source (its
    .path and .dataset are hashed); an exception of it propagates."""
    before = held_stamp(name)
    source = opener()
    try:
        identity = raster_identity(source.path, source.dataset)
    except OSError:  # deleted since it was opened (GDAL still reads it): a run to make, not to cache
        return source, None
    if identity is not None and (before is None or held_stamp(name) != before):
        identity = None
    return source, identity


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# The engine code between a raster's bytes and a crop's features: how pixels are read, resampled, stretched and
# cut into crops, and what the tower computes of them. Its source is part of every cached entry's key, so an
# upgrade that changes any of it (a fix to how a float raster's NaN holes are resampled changed 110 class pixels
# of a test raster) does not serve features the earlier code computed.
# TOWER_CODE, the part an exported encoder holds (runtimes.export_folder): how the tower is built from the
# weights and what it computes.
TOWER_CODE = ("encoders.py", "dense.py", "runtimes.py", "models.py", "checkpoints.py", "hf_text.py")
PIXEL_PIPELINE = ("raster.py", "sliding.py", "quality.py", *TOWER_CODE)
# The libraries between them: GDAL resamples and decodes, torch (or a compiled runtime) computes. An upgrade of
# any of them may change features in their last bits, so it is part of the key too. TOWER_LIBRARIES: those an
# exported encoder depends on.
TOWER_LIBRARIES = ("torch", "open_clip_torch", "openvino", "onnxruntime")
PIXEL_LIBRARIES = (*TOWER_LIBRARIES, "numpy", "rasterio")


@functools.lru_cache(maxsize=8)
def engine_digest(names: tuple[str, ...] = PIXEL_PIPELINE) -> str:
    """sha256 of the engine's source files `names` (the package version where a file cannot be read)."""
    from backend import __version__

    digest = hashlib.sha256()
    for name in names:
        try:
            digest.update((Path(__file__).parent / name).read_bytes())
        except OSError:
            digest.update(f"{name} of {__version__}".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """The installed versions of PIXEL_LIBRARIES (None: not installed) and GDAL's, read without importing them."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in PIXEL_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import rasterio

        versions["gdal"] = rasterio.__gdal_version__
    except ImportError:
        versions["gdal"] = None
    return versions


def code_identity() -> dict:
    """The engine's source and its libraries, as this process loaded them: taken once (the server takes it as
    it starts, see segment.py), so an upgrade on disk under a running server does not key the features its
    loaded code computes as the new code's. The exported tower's code is taken with it (runtimes.export_folder)."""
    engine_digest(TOWER_CODE)
    return {"engine": engine_digest(), "libraries": library_versions()}


def device_identity(loaded) -> str:
    """The device a model's features are computed on: its type, and a GPU's name (fp16 kernels differ by
    generation); a CPU and a Mac's GPU (both fp32, both "torch") never share entries."""
    device = getattr(loaded, "device", None)
    kind = str(getattr(device, "type", device or "cpu"))
    if kind == "cuda":
        import torch

        return f"cuda:{torch.cuda.get_device_name(device)}"
    return kind


def model_identity(loaded) -> dict:
    """What besides the pixels changes a model's image embeddings: the weights' sha256, the MLP activation
    (the same bytes load as QuickGELU or GELU), the architecture and the precision (fp16 after --half)."""
    metadata = getattr(loaded, "metadata", None) or {}
    visual = loaded.model.visual
    activation = metadata.get("activation")
    if not activation:  # a LoadedModel built without metadata: the activation its vision tower runs
        kinds = (type(m).__name__.lower() for m in visual.modules())
        activation = next((k for k in kinds if k in ("quickgelu", "gelu")), "quickgelu")
    conv = getattr(getattr(visual, "conv1", None), "weight", None)
    half = str(getattr(conv, "dtype", "")) == "torch.float16"
    return {"weights": loaded.weights_id, "activation": activation, "architecture": metadata.get("architecture"),
            "precision": metadata.get("precision") or ("fp16" if half else "fp32")}


def raster_scope(source, model, attention: str, encoder_name: str) -> str:
    """What, besides the crop's place, the features of a crop of `source` depend on; "" (nothing is
    cached) for a raster read through GDAL virtual paths over no file on this machine. `model`: the
    LoadedModel (its weights, activation, architecture and precision)."""
    return raster_scopes(source, model, [(attention, encoder_name)])[0]


_UNKNOWN = object()


def raster_scopes(source, model, variants: list[tuple[str, str]], raster=_UNKNOWN) -> list[str]:
    """raster_scope of each (attention, encoder_name) in `variants`, the raster identified (its files
    hashed) once for all of them: a run's dense features and its region checks. `raster`: its identity
    when the caller took it (opened_raster_identity; None: not one to cache)."""
    if raster is _UNKNOWN:
        raster = raster_identity(source.path, source.dataset)
    if raster is None:
        return [""] * len(variants)
    shared = {
        "raster": raster,
        "grid": [source.height, source.width], "scale": source.scale_record, "bands": list(source.bands),
        "value_range": [list(r) for r in source.value_range] if source.value_range else None,
        "palette": getattr(source, "palette", None) is not None,
        "model": model_identity(model),
        "device": device_identity(model),
        **code_identity(),
    }
    return [identity_digest({**shared, "attention": attention, "encoder": encoder_name})[:32]
            for attention, encoder_name in variants]


Shape = tuple[int | None, ...]  # an expected array shape; None: any length on that axis


def fits(array: np.ndarray, ndim: int | None = None, shape: Shape | None = None) -> bool:
    """Whether `array` has `ndim` dimensions and, axis by axis, the lengths `shape` fixes."""
    if ndim is not None and array.ndim != ndim:
        return False
    return shape is None or (array.ndim == len(shape) and all(
        want is None or int(want) == got for want, got in zip(shape, array.shape)))


def read_cached_array(path: str | os.PathLike, ndim: int | None = None, shape: Shape | None = None,
                      unit: bool = False) -> np.ndarray | None:
    """The float32 array a cache file holds, or None where it cannot serve: missing, empty (np.load raises
    EOFError, which the command line turned into a bare "Aborted." on every later run), truncated, not one
    array, another dtype, number of dimensions (`ndim`) or shape (`shape`: a file of another model's width
    stopped every later run with a traceback), not finite, or (`unit`) not of length 1. The header is read
    first, so a header claiming a huge array costs nothing. A cache file is only ever a miss (the entry is
    computed again), never the reason a run fails or a wrong value."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mapped, np.ndarray) or mapped.dtype != np.float32 or not fits(mapped, ndim, shape):
            return None
        array = np.array(mapped)  # read, and the file let go (Windows keeps a mapped file from being replaced)
        del mapped
    except (OSError, ValueError, EOFError, MemoryError):
        return None
    if not np.isfinite(array).all():
        return None
    if unit and abs(float(np.linalg.norm(array)) - 1.0) > 1e-3:
        return None
    return array


class FeatureCache:
    """Crop features in memory (LRU, at most `max_bytes`) and optionally on disk (at most `disk_max_bytes`)."""

    def __init__(self, max_bytes: int = 1 << 30, folder: str | os.PathLike | None = None,
                 disk_max_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self.home = Path(folder) if folder else None  # where disk features go, with or without a disk tier
        self.folder = self.home if disk_max_bytes > 0 else None
        self.disk_max_bytes = int(disk_max_bytes) if self.folder else 0
        self._memory: OrderedDict[tuple[str, CropKey], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._disk: OrderedDict[Path, int] = OrderedDict()  # oldest first
        self._disk_bytes = 0
        self._written_since_scan = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        if self.folder is not None:
            self._scan_disk(self.folder)

    # -- public

    def get(self, scope: str, crop: CropKey, ndim: int | None = None, shape: Shape | None = None,
            unit: bool = False) -> np.ndarray | None:
        """The features of `crop` kept before, or None; an entry of another number of dimensions than `ndim`
        or another shape than `shape` (or a damaged file; see read_cached_array) is a miss."""
        key = (scope, crop)
        with self._lock:
            found = self._memory.get(key)
            if found is not None and fits(found, ndim, shape):
                self._memory.move_to_end(key)
                self.hits += 1
                return found
        found = self._load(scope, crop, ndim, shape, unit)
        with self._lock:
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, found)
        return found

    def put(self, scope: str, crop: CropKey, features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        with self._lock:
            self._remember((scope, crop), features)
        if self.folder is not None:
            self._store(scope, crop, features)

    def count_served_elsewhere(self) -> None:
        """A miss of this cache that a cache behind it served (LayeredFeatureCache): a hit of the whole."""
        with self._lock:
            self.misses -= 1
            self.hits += 1

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._memory), "memory_bytes": self._bytes, "memory_max_bytes": self.max_bytes,
                    "disk_bytes": self._disk_bytes, "disk_max_bytes": self.disk_max_bytes,
                    "disk_folder": str(self.folder) if self.folder else None,
                    "hits": self.hits, "misses": self.misses}

    def clear(self) -> None:
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    # -- memory tier

    def _remember(self, key, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes:
            return
        old = self._memory.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._memory[key] = features
        self._bytes += features.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._bytes -= evicted.nbytes

    # -- disk tier: one .npy per crop under folder/scope/

    def _path(self, scope: str, crop: CropKey) -> Path:
        """folder/scope/r_c_h_w.npy, the scope always one folder (a separator in it would put the entry where
        the scan of the folder, one level deep, never finds it again, nor counts or trims it)."""
        assert self.folder is not None, "only the disk tier has paths"
        folder = scope.replace("/", "-").replace("\\", "-")
        return self.folder / folder / ("_".join(str(v) for v in crop) + ".npy")

    def _scan_disk(self, folder: Path) -> None:
        """Count every entry in `folder` (other processes' too: a server and command-line runs share one
        folder, which is to stay within the budget of each), oldest first, and trim to the budget. Staged
        files that a killed process left are removed (those of running processes are theirs)."""
        files, staged = [], set()
        try:
            for path in folder.glob("*/*.npy"):
                if path.name.startswith("."):
                    staged.add(path.parent)  # a crop being written (backend.engine.atomic), not yet an entry
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    continue
                files.append((stat.st_mtime_ns, path, stat.st_size))
            for parent in staged:
                remove_stale(parent)
            # Earlier versions kept a GPU's fp16 region checks one folder deeper, where no scan counted them.
            for nested in folder.glob("*/fp16"):
                shutil.rmtree(nested, ignore_errors=True)
        except OSError:  # a folder another process trimmed away meanwhile: the next scan counts again
            return
        with self._lock:
            # Oldest first by modification time, which is each process's order of use (a hit touches its file).
            listed = OrderedDict((path, size) for _, path, size in sorted(files))
            for path, size in self._disk.items():  # stored while the folder was listed
                if path not in listed and path.exists():
                    listed[path] = size
            self._disk = listed
            self._disk_bytes = sum(listed.values())
            self._written_since_scan = 0
            self._trim_disk()

    def _load(self, scope: str, crop: CropKey, ndim: int | None = None, shape: Shape | None = None,
              unit: bool = False) -> np.ndarray | None:
        if self.folder is None:
            return None
        path = self._path(scope, crop)
        features = read_cached_array(path, ndim, shape, unit)
        if features is None:
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        with self._lock:
            if path in self._disk:
                self._disk.move_to_end(path)
        return features

    def _store(self, scope: str, crop: CropKey, features: np.ndarray) -> None:
        path = self._path(scope, crop)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path, durable=False) as staged:
                np.save(staged, features, allow_pickle=False)
            size = path.stat().st_size
        except OSError:
            return  # a full or read-only disk only costs the cache, never the run
        with self._lock:
            self._disk_bytes += size - self._disk.pop(path, 0)
            self._disk[path] = size
            self._written_since_scan += size
            rescan = self._written_since_scan > self.disk_max_bytes // RESCAN_SHARE
            if not rescan:
                self._trim_disk()
        if rescan:  # what other processes wrote meanwhile counts too
            self._scan_disk(path.parents[1])

    def _trim_disk(self) -> None:
        while self._disk_bytes > self.disk_max_bytes and self._disk:
            path, size = self._disk.popitem(last=False)
            self._disk_bytes -= size
            try:
                path.unlink()
                if not any(path.parent.iterdir()):
                    path.parent.rmdir()
            except OSError:
                pass


class LayeredFeatureCache(FeatureCache):
    """A shared memory cache (a server's) in front of a disk cache (a job that asks for --cache-features):
    features found on disk are remembered in memory too, new ones go to both."""

    def __init__(self, front: FeatureCache, back: FeatureCache):
        super().__init__(0)
        self.front, self.back = front, back

    def get(self, scope: str, crop: CropKey, ndim: int | None = None, shape: Shape | None = None,
            unit: bool = False) -> np.ndarray | None:
        found = self.front.get(scope, crop, ndim, shape, unit)
        if found is None:
            found = self.back.get(scope, crop, ndim, shape, unit)
            if found is not None:
                self.front.count_served_elsewhere()  # the front's counters are what a server reports
                self.front.put(scope, crop, found)
        return found

    def put(self, scope: str, crop: CropKey, features: np.ndarray) -> None:
        self.front.put(scope, crop, features)
        self.back.put(scope, crop, features)

    def stats(self) -> dict:
        disk = self.back.stats()
        return {**self.front.stats(), **{key: disk[key] for key in ("disk_bytes", "disk_max_bytes", "disk_folder")}}

    def clear(self) -> None:
        self.front.clear()


def feature_cache_for(cache_features: bool, cache_mb: int, shared: FeatureCache | None = None) -> FeatureCache | None:
    """The cache a run uses: the process's `shared` one (a server's, or none), plus up to `cache_mb` MiB
    on disk when the run asks for `cache_features` (in the shared cache's folder, else STATE_DIR/features).

    On the command line nothing is kept in memory past a batch; features on disk serve the next run.
    """
    if not cache_features or (shared is not None and shared.folder is not None):
        return shared  # no disk tier asked for, or the server keeps features on disk already
    from .paths import state_dir

    folder = shared.home if shared is not None and shared.home is not None else state_dir() / "features"
    disk = FeatureCache(max_bytes=0, folder=folder, disk_max_bytes=int(cache_mb) * 2**20)
    return disk if shared is None else LayeredFeatureCache(shared, disk)
