"""Class colours by the rule in resources/palette.json, which the QGIS plugin reads too.

The plugin cannot import the backend, so the rule is data: keyword groups (water is blue in every
run), a palette picked by a hash of the class name, and the unclassified grey. The same class list
gets the same colours in the class raster's colour table and in the plugin's layer styles.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from backend.engine.paths import resources_dir

PALETTE_FILE = "palette.json"
RGB = tuple[int, int, int]


@lru_cache(maxsize=1)
def _palette_file() -> dict:
    return json.loads((resources_dir() / PALETTE_FILE).read_text("utf-8"))


def _rgb(hex_colour: str) -> RGB:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def class_colour_codes(class_names: Sequence[str]) -> list[str]:
    """'#rrggbb' per class name: stable across runs, distinct within a run while the palette lasts."""
    rule = _palette_file()
    palette: list[str] = rule["palette"]
    chosen: list[str] = []
    for name in class_names:
        lowered = name.lower()
        keyword = (group["colour"] for group in rule["keywords"] if any(word in lowered for word in group["words"]))
        colour = next(keyword, None) or palette[zlib.crc32(lowered.encode("utf-8")) % len(palette)]
        if colour in chosen:
            start = palette.index(colour) if colour in palette else 0
            later = (palette[(start + step) % len(palette)] for step in range(1, len(palette) + 1))
            colour = next((code for code in later if code not in chosen), colour)
        chosen.append(colour)
    return chosen


def class_colors(class_names: Sequence[str]) -> list[RGB]:
    """8-bit RGB per class name (see class_colour_codes)."""
    return [_rgb(code) for code in class_colour_codes(class_names)]


def class_colormap(class_names: Sequence[str],
                   unclassified_value: int | None = None) -> dict[int, tuple[int, int, int, int]]:
    """A GeoTIFF colour table (for `dataset.write_colormap(1, ...)`): class id i gets the colour of class_names[i].

    `unclassified_value` (if given) is the palette file's grey; every other entry up to 255 is transparent.
    """
    colormap = {value: (0, 0, 0, 0) for value in range(256)}
    for class_id, (r, g, b) in enumerate(class_colors(class_names)):
        colormap[class_id] = (r, g, b, 255)
    if unclassified_value is not None:
        colormap[unclassified_value] = (*_rgb(_palette_file()["unclassified"]), 255)
    return colormap


def category_names(tags: dict[str, str]) -> list[str] | None:
    """The class raster's category names, one per value from 0 (GDAL's list: value i is names[i]), from the
    tags a class raster carries (CLASS_i, UNCLASSIFIED); None for a raster without them."""
    classes = {int(key[6:]): name for key, name in tags.items() if key.startswith("CLASS_") and key[6:].isdigit()}
    if not classes:
        return None
    unclassified = int(tags["UNCLASSIFIED"]) if tags.get("UNCLASSIFIED", "").isdigit() else None
    names = [""] * (max(max(classes), unclassified or 0) + 1)
    for value, name in classes.items():
        names[value] = name
    if unclassified is not None:
        names[unclassified] = "unclassified"
    return names


def category_names_xml(names: Sequence[str]) -> str:
    """GDAL's <CategoryNames> element for `names` (a PAM .aux.xml or a VRT band holds it)."""
    from xml.sax.saxutils import escape

    return "<CategoryNames>" + "".join(f"<Category>{escape(name)}</Category>" for name in names) + "</CategoryNames>"


def write_category_names(raster) -> None:
    """Give the class raster `raster` (a GeoTIFF) its classes' names as GDAL category names, in the .aux.xml
    beside it, where GDAL keeps what a TIFF cannot hold: QGIS's legend and gdalinfo then show 'water' for 0
    and 'unclassified' for 254, not bare numbers (the CLASS_i tags hold them too, for scripts)."""
    import rasterio

    with rasterio.open(raster) as ds:
        names = category_names(ds.tags(1))
    if names is None:
        return
    import xml.etree.ElementTree as ET

    aux = Path(f"{raster}.aux.xml")
    root = ET.parse(aux).getroot() if aux.exists() else ET.Element("PAMDataset")  # GDAL's own, if it wrote one
    band = next((b for b in root.findall("PAMRasterBand") if b.get("band") == "1"), None)
    if band is None:
        band = ET.SubElement(root, "PAMRasterBand", band="1")
    for old in band.findall("CategoryNames"):
        band.remove(old)
    band.append(ET.fromstring(category_names_xml(names)))
    aux.write_text(ET.tostring(root, encoding="unicode", short_empty_elements=False) + "\n", encoding="utf-8")
