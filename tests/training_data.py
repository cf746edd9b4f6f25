"""Synthetic labelled GeoTIFFs and fast training options, shared by the training tests.

(Kept out of conftest.py: test modules import these names, and several conftest modules share one
import name when all test folders run in one pytest session.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin

from training.finetune import TrainOptions

COLOURS = {"water": (40, 70, 160), "forest": (40, 120, 50), "sand": (210, 190, 130)}
RASTER_CRS = "EPSG:32633"


def write_labels(path: Path, geometries: list, values: list, crs: str, field: str = "cls") -> Path:
    pyogrio.raw.write(path, shapely.to_wkb(np.array(geometries, dtype=object)),
                      [np.array(values, dtype=object)], [field], driver="GPKG" if path.suffix == ".gpkg"
                      else "GeoJSON", geometry_type="Polygon", crs=crs)
    return path


def make_synthetic(folder: Path, size: int = 384, block: int = 48, labels_crs: str = "EPSG:4326",
                   seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """Blocks of three colours with noise; labels = each block inset by 3 px, in another CRS."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    blocks = size // block
    classes = np.zeros((size, size), int)
    for by in range(blocks):
        for bx in range(blocks):
            classes[by * block:(by + 1) * block, bx * block:(bx + 1) * block] = (bx + 2 * by + (bx * by) % 2) % 3
    rgb = np.zeros((3, size, size), np.float32)
    for i, name in enumerate(names):
        for band in range(3):
            rgb[band][classes == i] = COLOURS[name][band]
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    transform = from_origin(500000, 5000000, 2.0, 2.0)
    raster = folder / "synthetic.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs=RASTER_CRS, transform=transform) as ds:
        ds.write(rgb)
    to_labels = Transformer.from_crs(RASTER_CRS, labels_crs, always_xy=True)
    geometries, values = [], []
    for by in range(blocks):
        for bx in range(blocks):
            x0, y0 = transform @ (bx * block + 3, by * block + 3)
            x1, y1 = transform @ ((bx + 1) * block - 3, (by + 1) * block - 3)
            box = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            geometries.append(shapely.transform(
                box, lambda xy: np.column_stack(to_labels.transform(xy[:, 0], xy[:, 1]))))
            values.append(names[classes[by * block + 5, bx * block + 5]])
    labels = write_labels(folder / "labels.gpkg", geometries, values, labels_crs)
    return raster, labels, classes


def fast_options(**changes) -> TrainOptions:
    """Few, small steps: the tiny model learns the colours in seconds on a CPU."""
    values = {"batch_size": 2, "steps_per_epoch": 4, "distill_boxes": 2, "regions_per_step": 4}
    values.update(changes)
    return TrainOptions(**values)


def copy_as_gpkg_table(raster: Path, gpkg: Path, table: str = "t1") -> Path:
    """`raster`'s pixels and georeferencing as raster table `table` of a new GeoPackage `gpkg` (one replaced)."""
    gpkg.unlink(missing_ok=True)
    with rasterio.open(raster) as source:
        profile = {key: source.profile[key] for key in ("width", "height", "count", "dtype", "crs", "transform")}
        with rasterio.open(gpkg, "w", driver="GPKG", RASTER_TABLE=table, **profile) as written:
            written.write(source.read())
    return gpkg


def write_two_image_benchmark(folder: Path, ignored_rows: int = 0) -> Path:
    """An img_dir/val + ann_dir/val benchmark (RS-OVSS layout) of two 128 x 96 PNGs, dark left (class 0) and
    bright right (class 1); the top `ignored_rows` rows labelled 255 (ignored)."""
    rng = np.random.default_rng(0)
    for part in ("img_dir/val", "ann_dir/val"):
        (folder / part).mkdir(parents=True)
    for index in range(2):
        label = np.zeros((96, 128), np.uint8)
        label[:, 64:] = 1
        label[:ignored_rows] = 255
        image = np.where(label[None] == 1, 200, 40).astype(np.uint8) * np.ones((3, 1, 1), np.uint8)
        image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
        for path, data in ((folder / "img_dir/val" / f"{index}.png", image),
                           (folder / "ann_dir/val" / f"{index}.png", label[None])):
            with rasterio.open(path, "w", driver="PNG", width=128, height=96, count=data.shape[0],
                               dtype="uint8") as ds:
                ds.write(data)
    return folder
