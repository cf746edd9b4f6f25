"""A run whose project is closed (File > New, or another project opened) before it ends: its result is not added
to the project open then, which is not the one it was run in; its files are kept and said."""

from __future__ import annotations

import pytest
from plugin_helpers import NAIP, TWO_CLASSES, write_result_file
from qgis.core import Qgis, QgsProject, QgsRasterLayer


@pytest.fixture
def dock(bare_dock):
    """A dock with a 'ready' backend that records the jobs submitted (a test ends them)."""
    from qgis_farslip.client import Connection

    bare_dock.manager.ensure = lambda: None
    bare_dock.submitted = []
    bare_dock.runner.start = lambda description, connection, kind, request, prepare=None: \
        bare_dock.submitted.append(request)
    bare_dock.states = []
    bare_dock.jobFinished.connect(bare_dock.states.append)

    def ready():
        connection = Connection("http://127.0.0.1:1")
        bare_dock.manager.connection, bare_dock.manager.state = connection, "ready"
        bare_dock.manager.ready.emit(connection, {})

    bare_dock.ready = ready
    return bare_dock


def press_run(dock) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    dock.form.classesEdit.setPlainText("water\nforest")
    dock.run()
    return layer


def finish(dock, tmp_path) -> str:
    """The submitted job ends done, as the backend reports it."""
    vector = str(tmp_path / "naip_result.gpkg")
    write_result_file(vector, "EPSG:26914", TWO_CLASSES)
    classes = [{"class": "water", "class_id": 0, "polygons": 1}, {"class": "forest", "class_id": 1, "polygons": 1}]
    job = {"id": "j1", "state": "done", "request": dict(dock.submitted[-1]),
           "result": {"run_id": "r1", "outputs": {"vector": vector}, "classes": classes}}
    dock.runner.finished.emit("done", job, "")
    return vector


def farslip_layers() -> list[str]:
    return [layer.name() for layer in QgsProject.instance().mapLayers().values()
            if layer.customProperty("farslip/kind")]


def test_a_result_is_loaded_into_the_project_it_was_run_in(dock, tmp_path):
    dock.ready()
    press_run(dock)
    finish(dock, tmp_path)
    assert dock.states == ["done"] and len(farslip_layers()) == 1, dock.form.statusLabel.text()


@pytest.mark.parametrize("how", ["File > New", "another project opened"])
def test_a_result_of_a_closed_project_is_not_added_to_the_next_one(dock, tmp_path, qgis_iface, how):
    other = QgsProject.instance()
    if how == "another project opened":
        other.addMapLayer(QgsRasterLayer(str(NAIP.parent / "RGB.byte.tif"), "landsat of project B"))
        assert other.write(str(tmp_path / "B.qgz"))
        other.clear()
    dock.ready()
    press_run(dock)
    assert dock.submitted, dock.form.statusLabel.text()
    if how == "File > New":
        QgsProject.instance().clear()
    else:
        assert QgsProject.instance().read(str(tmp_path / "B.qgz"))
    qgis_iface.messageBar().clear_messages()
    vector = finish(dock, tmp_path)
    assert dock.states == ["done"]
    assert farslip_layers() == [], "the result is not this project's"
    assert dock.last_layers == [] and not dock.form.exportButton.isEnabled()
    text = dock.form.statusLabel.text()
    assert text == (f"Done, but the project this run was started in was closed meanwhile: its result was not added "
                    f"to the project open now. Its files are kept: {vector}. Add them with Layer > Add Layer, or "
                    "run again in this project.")
    assert any(vector in message for message in qgis_iface.messageBar().get_messages(Qgis.Info))

    # The next run, in the project open now, is loaded into it.
    press_run(dock)
    finish(dock, tmp_path / "..")
    assert dock.states == ["done", "done"] and len(farslip_layers()) == 1


def test_a_run_waiting_for_the_backend_is_not_sent_once_its_project_is_closed(dock, tmp_path):
    project = QgsProject.instance()
    layer_id = press_run(dock).id()
    assert project.write(str(tmp_path / "A.qgz"))
    project.clear()
    assert project.read(str(tmp_path / "A.qgz"))  # the same project again: the layer has its id
    assert project.mapLayer(layer_id) is not None
    dock.ready()
    assert dock.submitted == [] and dock.states == ["failed"]
    assert dock.form.statusLabel.text() == ("Not run: the project was closed while the FarSLIP backend started; "
                                            "choose the layer and press Run again.")
