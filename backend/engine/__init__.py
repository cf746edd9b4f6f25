"""Engine layer: raster reading, models, dense patch features, text, the sliding-window engine,
segmentation, vectorising, export and presets. No CLI, HTTP or training imports."""

import os as _os


def _quiet_gdal_and_proj() -> None:
    """Library lines on stderr that our sentences replace: GDAL's default error handler prints warnings
    ("Warning 1: RowsPerStrip not defined") from threads outside a rasterio environment, and the PROJ
    context libgeotiff makes for a CRS in other units ("Cannot find proj.db") does not see the data
    folder rasterio gives GDAL. Errors still raise through rasterio; a user's own settings are kept."""
    _os.environ.setdefault("CPL_LOG", _os.devnull)
    if "PROJ_DATA" not in _os.environ and "PROJ_LIB" not in _os.environ:
        from importlib.util import find_spec

        spec = find_spec("rasterio")  # where rasterio keeps its PROJ data, without importing it (startup time)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if _os.path.isfile(_os.path.join(folder, "proj_data", "proj.db")):
                _os.environ["PROJ_DATA"] = _os.path.join(folder, "proj_data")
                break


_quiet_gdal_and_proj()

# GDAL's HTTP reads (/vsicurl/, /vsis3/ ...) wait forever by default: a server that accepts a connection and
# never answers would hold a run, or a request's check in the server, for good. A stalled transfer (under a
# byte a second for a minute) ends; a slow one that moves does not (a cap on a request's whole time ended
# large reads over slow links). A user's own settings win.
GDAL_HTTP_DEFAULTS = {"GDAL_HTTP_CONNECTTIMEOUT": "30", "GDAL_HTTP_LOW_SPEED_TIME": "60",
                      "GDAL_HTTP_LOW_SPEED_LIMIT": "1"}
# The checks of a request cap each read's whole time instead (checks.quick_network_reads), unless set here.
GDAL_HTTP_TIMEOUTS = ("GDAL_HTTP_CONNECTTIMEOUT", "GDAL_HTTP_TIMEOUT")
GDAL_HTTP_TIMEOUTS_OF_USER = frozenset(name for name in GDAL_HTTP_TIMEOUTS if name in _os.environ)
for _name, _value in GDAL_HTTP_DEFAULTS.items():
    _os.environ.setdefault(_name, _value)
