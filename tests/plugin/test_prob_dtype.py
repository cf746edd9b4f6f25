"""A uint8 probability raster (`segment --prob-dtype uint8`) opens in QGIS as probabilities 0..1: QGIS applies the
scale the file carries, so the plugin's probability style (a 0..1 ramp) and Identify show what the float one shows."""

from __future__ import annotations

import subprocess

from plugin_helpers import NAIP
from qgis.core import QgsPointXY, QgsRasterBandStats, QgsRasterLayer, QgsSingleBandPseudoColorRenderer

from conftest import BACKEND_FARSLIP

CLASSES = ["water", "cropland", "road"]
BBOX = ["486500", "5206500", "488000", "5208000"]


def test_a_uint8_probability_raster_reads_and_styles_as_probabilities_in_qgis(farslip, backend_home, tiny_model,
                                                                              tmp_path):
    from qgis_farslip.results import style_probability_layer

    rasters = {}
    for kind in ("float32", "uint8"):
        rasters[kind] = tmp_path / f"{kind}.tif"
        done = subprocess.run([str(BACKEND_FARSLIP), "segment", str(NAIP), *[a for c in CLASSES for a in ("-c", c)],
                               "--model", str(tiny_model), "--bbox", *BBOX, "--out", str(tmp_path / f"{kind}.gpkg"),
                               "--prob-raster", str(rasters[kind]), "--prob-dtype", kind, "--quiet"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    exact, small = (QgsRasterLayer(str(rasters[kind]), kind) for kind in ("float32", "uint8"))
    assert exact.isValid() and small.isValid()
    assert small.dataProvider().bandScale(1) == 1 / 254
    assert [small.bandName(band) for band in (1, 2, 3)] == [exact.bandName(band) for band in (1, 2, 3)]
    for band in (1, 2, 3):
        stats = small.dataProvider().bandStatistics(band, QgsRasterBandStats.Min | QgsRasterBandStats.Max)
        assert 0.0 <= stats.minimumValue <= stats.maximumValue <= 1.0
    extent = small.extent()
    for fx, fy in ((0.25, 0.25), (0.5, 0.5), (0.8, 0.3)):
        point = QgsPointXY(extent.xMinimum() + fx * extent.width(), extent.yMinimum() + fy * extent.height())
        for band in (1, 2, 3):
            value, ok = small.dataProvider().sample(point, band)
            expected, found = exact.dataProvider().sample(point, band)
            assert ok and found and abs(value - expected) <= 0.5 / 254 + 1e-6, (point, band, value, expected)
    style_probability_layer(small, "road", [(name, i) for i, name in enumerate(CLASSES)])
    renderer = small.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer) and renderer.band() == 3
    assert (renderer.classificationMin(), renderer.classificationMax()) == (0.0, 1.0)
