"""The rasters of a scaled run: files, VRT mosaics, folders, globs, text lists and STAC items, expanded.

Every input names one or more rasters; the result is one flat list in a stable order (inputs in
the order given, a folder's or glob's files sorted by name), without repeats. Remote hrefs of a
STAC item (s3://, gs://, https://) are turned into GDAL's virtual paths (/vsis3/, /vsigs/,
/vsicurl/), which workers open wherever GDAL can reach them.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path

from backend.engine.errors import InputError

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
# STAC asset roles / keys that hold the image itself, most specific first.
STAC_IMAGE_KEYS = ("visual", "image", "data", "rgb")
REMOTE_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/", "https://": "/vsicurl/https://",
                   "http://": "/vsicurl/http://"}


def expand_inputs(inputs: Iterable[str | Path]) -> list[str]:
    """The raster paths named by `inputs`, in order, each once."""
    found: list[str] = []
    for given in inputs:
        for path in _expand(str(given)):
            if path not in found:
                found.append(path)
    if not found:
        raise InputError("No rasters to segment: give raster files, a folder, a glob, a .txt list or STAC JSON.")
    return found


def _expand(text: str) -> list[str]:
    if text.startswith("/vsi"):
        return [text]
    if any(ch in text for ch in "*?["):
        matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).suffix.lower() in RASTER_SUFFIXES)
        if not matches:
            raise InputError(f"The pattern {text!r} matches no raster ({', '.join(RASTER_SUFFIXES)}).")
        return matches
    path = Path(text).expanduser()
    if path.is_dir():
        rasters = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
        if not rasters:
            raise InputError(f"The folder {path} holds no raster ({', '.join(RASTER_SUFFIXES)}).")
        return rasters
    if not path.exists():
        raise InputError(f"The input {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _listed(path)
    if suffix == ".json":
        return _stac(path)
    return [str(path)]


def _listed(path: Path) -> list[str]:
    """A text file: one raster (or folder, glob, STAC file) per line; relative lines are beside the list."""
    rasters: list[str] = []
    # utf-8-sig: Notepad and Excel save "UTF-8" lists with a byte order mark before the first path.
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line:
            entry = _remote(line)
        else:
            entry = line if line.startswith("/vsi") or Path(line).is_absolute() else str(path.parent / line)
        rasters += _expand(entry)
    if not rasters:
        raise InputError(f"The list {path} names no raster (one path per line; # starts a comment).")
    return rasters


def _remote(href: str) -> str:
    for prefix, vsi in REMOTE_PREFIXES.items():
        if href.startswith(prefix):
            return vsi + href[len(prefix):]
    return href


def _stac(path: Path) -> list[str]:
    """A STAC item, item collection (FeatureCollection) or a collection whose links point at item files."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a JSON file I can read ({error}).") from None
    if not isinstance(document, dict):
        raise InputError(f"{path} is not a STAC item, item collection or collection.")
    kind = document.get("type")
    if kind == "Feature":
        return [_item_image(document, path)]
    if kind == "FeatureCollection":
        return [_item_image(item, path) for item in document.get("features", [])]
    if kind == "Collection":
        items = [link["href"] for link in document.get("links", []) if link.get("rel") == "item" and "href" in link]
        if not items:
            raise InputError(f"The STAC collection {path} links no items (links with rel 'item').")
        return [raster for href in items for raster in _stac(_local(href, path))]
    raise InputError(f"{path} is not a STAC item, item collection or collection (its type is {kind!r}).")


def _local(href: str, base: Path) -> Path:
    if "://" in href:
        raise InputError(f"The STAC link {href} is remote; download the item files, or list their images in a "
                         ".txt file.")
    return Path(href) if Path(href).is_absolute() else base.parent / href


def _item_image(item: dict, base: Path) -> str:
    """The image asset of a STAC item: a known key, else the one GeoTIFF asset; relative hrefs beside the file."""
    assets = item.get("assets") or {}
    chosen = next((assets[key] for key in STAC_IMAGE_KEYS if key in assets), None)
    if chosen is None:
        tiffs = [a for a in assets.values() if "geotiff" in str(a.get("type", "")).lower()
                 or str(a.get("href", "")).lower().endswith((".tif", ".tiff"))]
        if len(tiffs) != 1:
            raise InputError(f"The STAC item {item.get('id', '?')} in {base} has no asset named "
                             f"{' / '.join(STAC_IMAGE_KEYS)} and not exactly one GeoTIFF asset; "
                             "list its image in a .txt file instead.")
        chosen = tiffs[0]
    href = str(chosen.get("href", ""))
    if "://" in href:
        return _remote(href)
    return href if href.startswith("/vsi") or Path(href).is_absolute() else str(base.parent / href)
