"""The rasters of a scaled run: files, VRT mosaics, folders, globs, text lists and STAC items, expanded.

Every input names one or more rasters; the result is one flat list in a stable order (inputs in
the order given, a folder's or glob's files sorted by name), without repeats (one file named twice, by two
spellings or through a link, is one raster). A folder or glob leaves out hidden files and farslip's own
outputs (see own_outputs), so a run writing into its input folder does not segment its results next time;
the outputs left out are told to the caller (expand_inputs' left_out), who says so. The working files of a run
on Ray (`<out>.partial/`) are never inputs either: the same command resumes its unfinished run.
A name that exists is that file or folder, even with [ ] * ? in it; only other names are globs. A name GDAL resolves
itself (GPKG:a.gpkg:table, NETCDF:"a.nc":var, /vsizip/a.zip/x.tif) is one raster, as typed. Remote hrefs of a
STAC item (s3://, gs://, https://) are turned into GDAL's virtual paths (/vsis3/, /vsigs/,
/vsicurl/), which workers open wherever GDAL can reach them.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from backend.engine.errors import InputError
from backend.engine.files import absolute_raster_name, held_file, is_gdal_name, is_gdal_virtual

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
# STAC asset roles / keys that hold the image itself, most specific first.
STAC_IMAGE_KEYS = ("visual", "image", "data", "rgb")
REMOTE_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/", "https://": "/vsicurl/https://",
                   "http://": "/vsicurl/http://"}


def expand_inputs(inputs: Iterable[str | Path], left_out: list[str] | None = None) -> list[str]:
    """The raster paths named by `inputs`, in order, each once. `left_out`, when given, gets the raster files a
    folder or glob held that are farslip's outputs of earlier runs (each once), left out of the run."""
    found: list[str] = []
    seen: set[str] = set()
    outputs: list[str] = []
    for given in inputs:
        for path in _expand(str(given), outputs):
            key = _file_key(path)
            if key not in seen:
                seen.add(key)
                found.append(path)
    if left_out is not None:
        left_out += [path for path in dict.fromkeys(outputs) if _file_key(path) not in seen]
    if not found:
        raise InputError("No rasters to segment: give raster files, a folder, a glob, a .txt list or STAC JSON.")
    return found


def _file_key(path: str) -> str:
    """What makes two names one raster: its name with its file resolved (a file's real path, GPKG:/abs/a.gpkg:t,
    /vsizip//abs/a.zip/x.tif), the normalised text of a GDAL virtual path over no file here."""
    if is_gdal_virtual(path) and held_file(path) is None:
        return posixpath.normpath(path)
    return absolute_raster_name(path)


RASTERS_TAIL = "_rasters"  # what a .vrt output's name becomes for its folder of per-raster GeoTIFFs


def raster_folder(mosaic: Path) -> Path:
    """The folder of a .vrt raster output's per-raster GeoTIFFs, beside it: x.vrt -> x_rasters/."""
    return mosaic.with_name(mosaic.stem + RASTERS_TAIL)


def mosaic_of(folder: Path) -> Path | None:
    """The .vrt output whose raster_folder `folder` is named like (x_rasters/ -> x.vrt), or None."""
    if not folder.name.endswith(RASTERS_TAIL):
        return None
    mosaic = folder.with_name(folder.name[:-len(RASTERS_TAIL)] + ".vrt")
    return mosaic if raster_folder(mosaic) == folder else None


def own_outputs(folder: Path) -> set[str]:
    """farslip's outputs in `folder` (real paths): each `x.vrt` beside its `x_rasters/` folder (a class or
    probability mosaic of a run on Ray; the GeoTIFFs in that folder, see _in_rasters_folder), and the files a
    farslip report there (`*.report.json`) names as outputs at that very path: a report names outputs
    anywhere, and a file of the same name in this folder is not one of them."""
    found = {os.path.realpath(vrt) for vrt in folder.glob("*.vrt") if raster_folder(vrt).is_dir()}
    for report in folder.glob("*.report.json"):
        try:
            document = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(document, dict) or "farslip_version" not in document:
            continue
        outputs = document.get("outputs")
        if not isinstance(outputs, dict):
            continue
        ran_in = _ran_in(report, outputs)
        for written in outputs.values():
            path = Path(str(written))
            if not path.is_absolute():
                if ran_in is None:
                    continue  # relative to a folder this report no longer tells
                path = ran_in / path
            found.add(os.path.realpath(path))
    return found


def _ran_in(report: Path, outputs: dict) -> Path | None:
    """The folder a report's relative output paths are relative to (where its run ran; reports of older versions
    recorded them as given), told by its vector output, whose report it is (r.gpkg -> r.report.json); None when
    that does not tell it."""
    vector = outputs.get("vector")
    if not isinstance(vector, str) or Path(vector).is_absolute():
        return None
    parts = Path(vector).with_suffix(".report.json").parts
    if ".." in parts or tuple(report.absolute().parts[-len(parts):]) != parts:
        return None
    ran_in = report.absolute()
    for _ in parts:
        ran_in = ran_in.parent
    return ran_in


def _rasters_of(paths: list[Path], left_out: list[str]) -> list[str]:
    """The raster files among `paths` (a folder's entries or a glob's matches), sorted, without hidden files
    (temporary files of a run writing there), the working files of a run on Ray (in `<out>.partial/`) and
    farslip's outputs (added to `left_out`)."""
    own: dict[Path, set[str]] = {}
    rasters, outputs = [], []
    for path in paths:
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in RASTER_SUFFIXES:
            continue
        if _in_partial_folder(path):
            continue
        if path.parent not in own:
            own[path.parent] = own_outputs(path.parent)
        if os.path.realpath(path) in own[path.parent] or _in_rasters_folder(path):
            outputs.append(str(path))
        else:
            rasters.append(str(path))
    left_out += sorted(outputs)
    return sorted(rasters)


def _in_rasters_folder(path: Path) -> bool:
    """Whether `path` lies in the `x_rasters/` folder of a VRT output `x.vrt` (what a recursive glob finds)."""
    return any((mosaic := mosaic_of(folder)) is not None and mosaic.is_file() for folder in path.parents)


PARTIAL_FILES = ("run.json", "manifest.jsonl", "lock")  # what a run on Ray keeps in <out>.partial/ (manifest.py)


def _in_partial_folder(path: Path) -> bool:
    """Whether `path` lies in the partial folder of a run on Ray, `<out>.partial/` (its chunks' and finished
    rasters' working files, which a recursive glob over the output's folder finds: never imagery, and taken as
    inputs they made the same command an unfinished run 'with other inputs', which it could not resume)."""
    return any(folder.name.endswith(".partial") and any((folder / name).is_file() for name in PARTIAL_FILES)
               for folder in path.parents)


def _kind(text: str) -> str:
    """What one input names: "gdal" (a GDAL name), "glob", "folder", "list" (.txt), "stac" (.json), "file", or
    "missing"."""
    if is_gdal_name(text):
        return "gdal"
    path = Path(text).expanduser()
    if not path.exists():
        return "glob" if any(ch in text for ch in "*?[") else "missing"
    if path.is_dir():
        return "folder"
    return {".txt": "list", ".json": "stac"}.get(path.suffix.lower(), "file")


def names_many(text: str) -> bool:
    """Whether one input stands for a set of rasters (a folder, a glob, a .txt list, STAC JSON): such a run is
    a run over many rasters, as several names are."""
    return _kind(text) in ("glob", "folder", "list", "stac")


def _expand(text: str, left_out: list[str]) -> list[str]:
    kind = _kind(text)
    if kind == "gdal":  # as typed: a pathlib.Path would fold its '//' (/vsizip//abs/a.zip/x.tif)
        return [text]
    path = Path(text).expanduser()
    if kind == "glob":
        matches = _rasters_of([Path(p) for p in glob.glob(text, recursive=True)], left_out)
        if not matches:
            raise InputError(f"The pattern {text!r} matches no raster ({', '.join(RASTER_SUFFIXES)}).")
        return matches
    if kind == "folder":
        rasters = _rasters_of(list(path.iterdir()), left_out)
        if not rasters:
            raise InputError(f"The folder {path} holds no raster ({', '.join(RASTER_SUFFIXES)}).")
        return rasters
    if kind == "missing":
        raise InputError(f"The input {path} does not exist.")
    if kind == "list":
        return _listed(path, left_out)
    if kind == "stac":
        return _stac(path)
    return [str(path)]


def _listed(path: Path, left_out: list[str]) -> list[str]:
    """A text file: one raster (or folder, glob, STAC file) per line; relative lines are beside the list."""
    rasters: list[str] = []
    # utf-8-sig: Notepad and Excel save "UTF-8" lists with a byte order mark before the first path.
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_gdal_name(line):  # a relative archive or subdataset file is beside the list too
            entry = absolute_raster_name(line, path.parent)
        elif "://" in line:
            entry = _remote(line)
        else:
            entry = line if Path(line).is_absolute() else str(path.parent / line)
        rasters += _expand(entry, left_out)
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
