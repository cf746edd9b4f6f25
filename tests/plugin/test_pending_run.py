"""Run pressed while the backend starts: what was pressed is what runs once the backend is ready, whatever the
form holds by then (another layer, a panned map, other classes); a layer removed meanwhile is said in words."""

from __future__ import annotations

import os

import pytest
from plugin_helpers import NAIP
from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle

LANDSAT = str(NAIP.parent / "RGB.byte.tif")


@pytest.fixture
def waiting_dock(bare_dock):
    """A dock whose backend is 'starting': Run waits; `ready()` says it is ready; `submitted` records the jobs."""
    from qgis_farslip.client import Connection

    dock = bare_dock
    dock.manager.ensure = lambda: None  # no backend is started: the test says when it is ready
    submitted = []
    dock.runner.start = lambda description, connection, kind, request, prepare=None: submitted.append(
        (description, kind, request, prepare))

    def ready():
        connection = Connection("http://127.0.0.1:1")
        dock.manager.connection = connection
        dock.manager.state = "ready"
        dock.manager.ready.emit(connection, {})

    dock.ready, dock.submitted = ready, submitted
    states = []
    dock.jobFinished.connect(states.append)
    dock.states = states
    return dock


def two_rasters():
    a = QgsRasterLayer(str(NAIP), "A naip")
    b = QgsRasterLayer(LANDSAT, "B landsat")
    assert a.isValid() and b.isValid()
    QgsProject.instance().addMapLayers([a, b])
    return a, b


def press_run(dock, layer, classes="water\ngrass"):
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    dock.form.classesEdit.setPlainText(classes)
    dock.run()
    assert dock.form.statusLabel.text() == "Connecting to the FarSLIP backend..."
    assert not dock.form.runButton.isEnabled()


def test_the_run_pressed_is_the_one_submitted_once_the_backend_is_ready(waiting_dock, qgis_iface):
    dock = waiting_dock
    a, b = two_rasters()
    press_run(dock, a)
    # While the backend starts, the analyst goes on: another layer, the map's extent, other classes.
    dock.form.layerCombo.setLayer(b)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("canvas"))
    qgis_iface.mapCanvas().setExtent(QgsRectangle(b.extent().center(), b.extent().center()).buffered(100))
    dock.form.classesEdit.setPlainText("road\nforest\nroof")
    dock.run()  # a second press while waiting changes nothing
    dock.ready()
    assert len(dock.submitted) == 1, dock.form.statusLabel.text()
    description, kind, request, _prepare = dock.submitted[0]
    assert kind == "segment" and description == "FarSLIP: segmenting A naip"
    assert os.path.samefile(request["raster"], NAIP)
    assert request["class_lines"] == ["water", "grass"]
    assert "bbox" not in request, "the whole layer was chosen when Run was pressed"
    assert dock._run_name.startswith("water, grass ")


def test_a_layer_removed_while_the_backend_starts_is_not_run(waiting_dock):
    dock = waiting_dock
    a, b = two_rasters()
    press_run(dock, a)
    QgsProject.instance().removeMapLayer(a.id())
    assert dock.form.layerCombo.currentLayer() is b
    dock.ready()
    assert dock.submitted == [] and dock.states == ["failed"]
    assert dock.form.statusLabel.text() == ("Not run: the layer A naip was removed from the project while the "
                                            "FarSLIP backend started; add it again and press Run.")
    assert dock.form.runButton.isEnabled()
    dock.ready()  # a later 'ready' (Connect pressed) submits nothing
    assert dock.submitted == []
