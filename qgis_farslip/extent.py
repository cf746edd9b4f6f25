"""Extents and rasters for a request: CRS handling and local copies of non-file layers."""

from __future__ import annotations

import os

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMultiBandColorRenderer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsSingleBandGrayRenderer,
)

# A WMS/XYZ layer has no pixel size of its own; it is fetched at the canvas's resolution, within reason.
MAX_EXPORT_SIDE_PX = 8192


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """What the backend's bbox_crs takes: 'EPSG:xxxx', or WKT for a CRS without an authority id."""
    return crs.authid() or crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


def transform_extent(extent: QgsRectangle, source_crs: QgsCoordinateReferenceSystem,
                     target_crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """The bounding box of `extent` (densified edges) in another CRS."""
    if source_crs == target_crs:
        return QgsRectangle(extent)
    transform = QgsCoordinateTransform(source_crs, target_crs, QgsProject.instance())
    return transform.transformBoundingBox(extent)


def local_raster_path(layer: QgsRasterLayer) -> str | None:
    """The GeoTIFF (or other GDAL file) behind the layer, or None when it is not a plain local file."""
    if layer.providerType() != "gdal":
        return None
    path = layer.source().split("|", 1)[0]
    return path if os.path.isfile(path) else None


def displayed_bands(layer: QgsRasterLayer) -> list[int] | None:
    """The bands the layer shows, as the backend's `bands`, when the user chose them in the layer's
    symbology: red, green, blue of a multiband colour renderer (a Sentinel-2 stack shown as 4, 3, 2),
    or the one band of a grey or paletted renderer. The model then sees the colours the analyst sees.

    None for QGIS's own first choice (bands 1, 2, 3 of a colour image, band 1 of a grey one), for a
    colour channel left unset and for other renderers: the backend then picks the bands by their colour
    interpretation, which QGIS does not (it shows a file stored blue, green, red in bands 1, 2, 3 with
    red and blue swapped). One band of a colour image (three bands or more) shown in grey is a choice.
    """
    renderer = layer.renderer()
    if isinstance(renderer, QgsMultiBandColorRenderer):
        bands = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        return None if min(bands) < 1 or bands == [1, 2, 3] else bands
    if isinstance(renderer, QgsSingleBandGrayRenderer):
        band = renderer.grayBand()
    elif isinstance(renderer, QgsPalettedRasterRenderer):
        band = renderer.band()
    else:
        return None
    return [band] if band > 1 or layer.bandCount() >= 3 else None


def export_size(layer: QgsRasterLayer, extent: QgsRectangle, canvas_extent: QgsRectangle,
                canvas_size: tuple[int, int]) -> tuple[int, int]:
    """Pixels of the local copy: the layer's own resolution, or the canvas's for WMS/XYZ layers.

    `extent` is in the layer's CRS; `canvas_extent` is the canvas's visible extent in the layer's CRS.
    """
    provider = layer.dataProvider()
    if provider.capabilities() & QgsRasterDataProvider.Size and provider.xSize() > 0:
        width = extent.width() / layer.rasterUnitsPerPixelX()
        height = extent.height() / layer.rasterUnitsPerPixelY()
    else:
        width = canvas_size[0] * extent.width() / max(canvas_extent.width(), 1e-12)
        height = canvas_size[1] * extent.height() / max(canvas_extent.height(), 1e-12)
    scale = max(width, height) / MAX_EXPORT_SIDE_PX
    if scale > 1:
        width, height = width / scale, height / scale
    return max(1, round(width)), max(1, round(height))


def write_geotiff(provider: QgsRasterDataProvider, extent: QgsRectangle, size: tuple[int, int],
                  crs: QgsCoordinateReferenceSystem, path: str, feedback=None) -> str:
    """Write `extent` (in `crs`, the provider's CRS) of a cloned provider to a GeoTIFF.

    Safe to call from a worker thread as long as `provider` is a clone made for it.
    """
    pipe = QgsRasterPipe()
    if not pipe.set(provider):
        raise RuntimeError("The layer's data cannot be read for export.")
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    error = writer.writeRaster(pipe, size[0], size[1], extent, crs, QgsProject.instance().transformContext(),
                               feedback)
    if error != QgsRasterFileWriter.NoError or not os.path.isfile(path):
        raise RuntimeError(f"The layer could not be written to {path} for the backend (error {int(error)}).")
    return path
