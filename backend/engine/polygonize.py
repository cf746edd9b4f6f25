"""Region ids -> polygons through GDAL's polygoniser, without holding Python's GIL while it runs.

`rasterio.features.shapes` calls GDALPolygonize while holding the GIL, then builds GeoJSON-like
lists point by point. In a run the polygon thread does this beside the engine, whose own Python
work (the crop rows, the hand-over of blocks, the writes) then waits for it. Here the same GDAL
function of the same GDAL library (the one rasterio loaded, at the version rasterio reports) is
called through ctypes, which lets go of the GIL for the length of each call, and the polygons come
back as WKB that shapely parses in one call: the same algorithm with the same options, so the
polygons are the same vertex for vertex.

Where that library is not among the process's loaded libraries (only Linux and macOS are looked
at), reports another version, or any call fails, rasterio's `shapes` gives the polygons instead.
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import shapely
from rasterio.transform import Affine

_GDT_BYTE, _GDT_INT32 = 1, 5
_WKB_POLYGON = 3
_OFT_INTEGER = 0
_WKB_NDR = 1  # little-endian WKB
# libgdal.so.34 (a system GDAL), libgdal-<hash>.so.36.3.10.3 (a wheel's copy), libgdal.36.dylib (macOS)
_LIBRARY_NAME = re.compile(r"(^|/)libgdal([-.][^/]*)?\.(so|dylib)(\.[0-9.]+)?$")


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries this process has loaded (empty where that cannot be listed)."""
    import rasterio._base  # noqa: F401  (loads rasterio's GDAL)

    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                fields = (line.split(None, 5) for line in maps)
                return sorted({parts[5].strip() for parts in fields if len(parts) == 6 and parts[5].startswith("/")})
        except OSError:
            return []
    if sys.platform == "darwin":
        try:
            process = ctypes.CDLL(None)
            process._dyld_get_image_name.restype = ctypes.c_char_p
            process._dyld_get_image_name.argtypes = [ctypes.c_uint32]
            names = (process._dyld_get_image_name(i) for i in range(process._dyld_image_count()))
            return sorted({name.decode(errors="replace") for name in names if name})
        except (OSError, AttributeError):
            return []
    return []


class _Gdal:
    """The C functions of one GDAL library that polygonising needs, with their signatures."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        handle, text, integer = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        signatures = {
            "GDALVersionInfo": (text, [text]),
            "GDALAllRegister": (None, []),
            "GDALGetDriverByName": (handle, [text]),
            "GDALCreate": (handle, [handle, text, integer, integer, integer, integer, handle]),
            "GDALAddBand": (integer, [handle, integer, ctypes.POINTER(text)]),
            "GDALGetRasterBand": (handle, [handle, integer]),
            "GDALSetGeoTransform": (integer, [handle, ctypes.POINTER(ctypes.c_double)]),
            "GDALDatasetCreateLayer": (handle, [handle, text, handle, integer, handle]),
            "GDALClose": (None, [handle]),
            "OGR_Fld_Create": (handle, [text, integer]),
            "OGR_Fld_Destroy": (None, [handle]),
            "OGR_L_CreateField": (integer, [handle, handle, integer]),
            "OGR_L_ResetReading": (None, [handle]),
            "OGR_L_GetNextFeature": (handle, [handle]),
            "OGR_F_GetFieldAsInteger": (integer, [handle, integer]),
            "OGR_F_GetGeometryRef": (handle, [handle]),
            "OGR_F_Destroy": (None, [handle]),
            "OGR_G_WkbSize": (integer, [handle]),
            "OGR_G_ExportToWkb": (integer, [handle, integer, ctypes.c_char_p]),
            "GDALPolygonize": (integer, [handle, handle, handle, integer, handle, handle, handle]),
        }
        for name, (result, arguments) in signatures.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = result, arguments
        self.lib = lib
        self.version = (lib.GDALVersionInfo(b"RELEASE_NAME") or b"").decode()
        lib.GDALAllRegister()  # idempotent: rasterio registers the same drivers when it opens a file
        self.raster_driver = lib.GDALGetDriverByName(b"MEM")
        # The in-memory vector driver: "Memory" until GDAL 3.11 merged it into "MEM" (the old name is an alias).
        self.vector_driver = lib.GDALGetDriverByName(b"Memory") or self.raster_driver

    def _band(self, array: np.ndarray, data_type: int, opened: list, transform: Affine | None = None) -> int:
        """A band of a MEM dataset over `array`'s own memory (kept alive by the caller)."""
        lib = self.lib
        height, width = array.shape
        dataset = lib.GDALCreate(self.raster_driver, b"", width, height, 0, data_type, None)
        if not dataset:
            raise RuntimeError("GDAL could not create an in-memory raster")
        opened.append(dataset)
        options = (ctypes.c_char_p * 2)(f"DATAPOINTER={array.ctypes.data}".encode(), None)
        if lib.GDALAddBand(dataset, data_type, options) != 0:
            raise RuntimeError("GDAL could not wrap the array as a band")
        if transform is not None:
            lib.GDALSetGeoTransform(dataset, (ctypes.c_double * 6)(*transform.to_gdal()))
        band = lib.GDALGetRasterBand(dataset, 1)
        if not band:
            raise RuntimeError("GDAL lost the in-memory band")
        return band

    def polygons(self, ids: np.ndarray, transform: Affine) -> tuple[np.ndarray, np.ndarray]:
        """(region value, polygon) of each 4-connected region of equal nonzero value in `ids`."""
        lib = self.lib
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        mask = np.ascontiguousarray(ids > 0).view(np.uint8)
        opened: list = []
        values: list[int] = []
        wkbs: list[bytes] = []
        try:
            band = self._band(ids, _GDT_INT32, opened, transform)
            mask_band = self._band(mask, _GDT_BYTE, opened)
            vector = lib.GDALCreate(self.vector_driver, b"", 0, 0, 0, 0, None)
            if not vector:
                raise RuntimeError("GDAL could not create an in-memory vector dataset")
            opened.append(vector)
            layer = lib.GDALDatasetCreateLayer(vector, b"regions", None, _WKB_POLYGON, None)
            field = lib.OGR_Fld_Create(b"value", _OFT_INTEGER)
            if not layer or not field:
                raise RuntimeError("GDAL could not create an in-memory layer")
            created = lib.OGR_L_CreateField(layer, field, 1)
            lib.OGR_Fld_Destroy(field)
            if created != 0 or lib.GDALPolygonize(band, mask_band, layer, 0, None, None, None) != 0:
                raise RuntimeError("GDALPolygonize failed")
            lib.OGR_L_ResetReading(layer)
            while feature := lib.OGR_L_GetNextFeature(layer):
                try:
                    geometry = lib.OGR_F_GetGeometryRef(feature)
                    if not geometry:
                        raise RuntimeError("GDAL gave a region without a polygon")
                    buffer = ctypes.create_string_buffer(lib.OGR_G_WkbSize(geometry))
                    if lib.OGR_G_ExportToWkb(geometry, _WKB_NDR, buffer) != 0:
                        raise RuntimeError("GDAL could not export a polygon")
                    wkbs.append(buffer.raw)
                    values.append(lib.OGR_F_GetFieldAsInteger(feature, 0))
                finally:
                    lib.OGR_F_Destroy(feature)
        finally:
            for dataset in reversed(opened):
                lib.GDALClose(dataset)
        return np.array(values, dtype=np.int64), shapely.from_wkb(wkbs) if wkbs else np.empty(0, dtype=object)


_lock = threading.Lock()
_found: list[_Gdal | None] = []


def rasterio_gdal() -> _Gdal | None:
    """The loaded GDAL library rasterio uses (found once per process), or None where it is not found."""
    with _lock:
        if not _found:
            _found.append(_find_rasterio_gdal())
        return _found[0]


def _find_rasterio_gdal() -> _Gdal | None:
    home = Path(rasterio.__file__).resolve().parent.parent

    def bundled_with_rasterio(path: str) -> bool:  # wheels: rasterio.libs/ (Linux), rasterio/.dylibs/ (macOS)
        return any(Path(path).resolve().is_relative_to(home / folder) for folder in ("rasterio.libs", "rasterio"))

    # rasterio's own copy first: pyogrio's wheel bundles another GDAL, which may be loaded too.
    libraries = sorted((path for path in _loaded_libraries() if _LIBRARY_NAME.search(path)),
                       key=lambda path: not bundled_with_rasterio(path))
    for path in libraries:
        try:
            gdal = _Gdal(path)
        except (OSError, AttributeError):
            continue
        if gdal.version == rasterio.__gdal_version__ and gdal.raster_driver and gdal.vector_driver:
            return gdal
    return None


def _with_rasterio(ids: np.ndarray, transform: Affine) -> tuple[np.ndarray, np.ndarray]:
    """The same through rasterio.features.shapes (GeoJSON-like dicts built into polygons)."""
    shapes = list(rasterio.features.shapes(ids, mask=ids > 0, connectivity=4, transform=transform))
    values = np.array([int(value) for _, value in shapes], dtype=np.int64)
    return values, polygons_of([geometry for geometry, _ in shapes])


def polygons_of(geometries: list[dict]) -> np.ndarray:
    """GeoJSON-like polygon dicts (shell ring, then holes) -> shapely Polygons, built from one array of
    all their coordinates: a quarter of the time of writing and parsing GeoJSON text."""
    rings = [ring for geometry in geometries for ring in geometry["coordinates"]]
    owner = np.repeat(np.arange(len(geometries)), [len(geometry["coordinates"]) for geometry in geometries])
    coords = np.array([xy for ring in rings for xy in ring], dtype=np.float64).reshape(-1, 2)
    ring_of = np.repeat(np.arange(len(rings)), [len(ring) for ring in rings])
    return shapely.polygons(shapely.linearrings(coords, indices=ring_of), indices=owner)


def region_polygons(ids: np.ndarray, transform: Affine) -> tuple[np.ndarray, np.ndarray]:
    """(value, polygon) of each 4-connected region of equal value in the int32 raster `ids` (0 = none),
    in the coordinates of `transform`: GDAL's polygons, outside the GIL where rasterio's GDAL is found."""
    gdal = rasterio_gdal()
    if gdal is not None:
        try:
            return gdal.polygons(ids, transform)
        except RuntimeError:
            pass  # the same polygons through rasterio, which reports what went wrong if it fails too
    return _with_rasterio(ids, transform)
