"""Run inside the real QGIS desktop (qgis --code): one segmentation from the FarSLIP dock, checked.

Reads its inputs from the FARSLIP_DESKTOP_* environment variables, writes a JSON report and a
screenshot of the main window, then quits QGIS. Driven by tests/plugin/test_desktop.py.
"""

import json
import os
import sys
import time
import traceback

import qgis.utils
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer

sys.path.insert(0, os.environ["FARSLIP_DESKTOP_TESTS"])  # qgis --code runs this file without __file__
from plugin_helpers import wait_until  # the tests' helpers, here in QGIS's own Python

REPORT = os.environ["FARSLIP_DESKTOP_REPORT"]
SCREENSHOT = os.environ["FARSLIP_DESKTOP_SCREENSHOT"]
RASTER = os.environ["FARSLIP_DESKTOP_RASTER"]
MODEL = os.environ["FARSLIP_DESKTOP_MODEL"]


def session():
    report = {}
    try:
        iface = qgis.utils.iface
        wait_until(lambda: "qgis_farslip" in qgis.utils.plugins, 60, "the plugin to load")
        plugin = qgis.utils.plugins["qgis_farslip"]
        report["plugin_file"] = qgis.utils.sys.modules["qgis_farslip"].__file__
        raster = QgsRasterLayer(RASTER, "naip")
        QgsProject.instance().addMapLayer(raster)
        iface.setActiveLayer(raster)
        iface.mapCanvas().setExtent(raster.extent())
        plugin.dock_action.trigger()  # what a user clicks: the toolbar button
        dock = plugin.dock
        wait_until(lambda: plugin.manager.state in ("ready", "failed"), 150, "the backend")
        report["backend"] = plugin.manager.state
        dock.form.layerCombo.setLayer(raster)
        dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
        dock.form.classesEdit.setPlainText("water\ngrass\nroad")
        dock.models.use_path(MODEL)
        states = []
        dock.jobFinished.connect(states.append)
        dock.form.runButton.click()
        wait_until(lambda: states, 300, "the segmentation")
        report["state"] = states[0]
        report["error"] = dock.last_error
        root = QgsProject.instance().layerTreeRoot()
        top_layer = root.findLayers()[0].layer()
        report["top_group"] = root.children()[0].name()
        report["top_layer"] = top_layer.name()
        report["top_is_result"] = top_layer is dock.last_layers[0]
        report["renderer"] = top_layer.renderer().type()
        categories = top_layer.renderer().categories()
        report["categories"] = [category.label() for category in categories]
        report["fill_alpha"] = [category.symbol().color().alpha() for category in categories]
        report["features"] = top_layer.featureCount()
        for _ in range(50):
            QgsApplication.processEvents()
            time.sleep(0.02)
        iface.mapCanvas().refreshAllLayers()
        wait_until(lambda: not iface.mapCanvas().isDrawing(), 30, "the map to draw")
        report["screenshot"] = iface.mainWindow().grab().save(SCREENSHOT)
    except Exception:
        report["exception"] = traceback.format_exc()
    with open(REPORT, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    # Unload the plugin (it stops the backend it started), then leave without "save the project?".
    qgis.utils.unloadPlugin("qgis_farslip")
    QgsProject.instance().clear()
    QgsApplication.exit(0)


QTimer.singleShot(1000, session)
