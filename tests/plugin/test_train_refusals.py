"""The Train tab refuses labels it cannot train on in a sentence, and a refused press (or a run waiting for the
backend) leaves no temporary copy of the labels or of a web layer behind."""

from __future__ import annotations

import os
import time

import pytest
from plugin_helpers import NAIP, added, subdataset, xyz_source
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
    edit,
)
from qgis.PyQt.QtCore import QVariant


def labels_layer(crs: str, rectangles: list[QgsRectangle]) -> QgsVectorLayer:
    """A memory layer of polygons labelled 'water' (field `class`), in the project."""
    layer = QgsVectorLayer(f"Polygon?crs={crs}", "labels", "memory")
    layer.dataProvider().addAttributes([QgsField("class", QVariant.String)])
    layer.updateFields()
    for rectangle in rectangles:
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromRect(rectangle))
        feature.setAttributes(["water"])
        layer.dataProvider().addFeature(feature)
    layer.updateExtents()
    QgsProject.instance().addMapLayer(layer)
    return layer


def choose(dock, raster, labels) -> None:
    form = dock.form
    form.trainRasterCombo.setLayer(raster)
    form.labelsCombo.setLayer(labels)
    form.classFieldCombo.setField("class")
    form.modelNameEdit.setText("never-trained")


@pytest.fixture
def made_folders(bare_dock, backend_home):
    """The temporary folders the dock's job runners hand out in the test (for local copies)."""
    made = []
    for runner in (bare_dock.runner, bare_dock.train_tab.runner):
        def recorded(prefix="farslip-", give=runner.temporary_dir):
            made.append(give(prefix))
            return made[-1]
        runner.temporary_dir = recorded
    bare_dock.manager.ensure = lambda: None  # no backend: a press is refused as 'not connected'
    return made


def test_an_empty_labels_layer_is_said_to_have_no_polygons(bare_dock, made_folders, tmp_path):
    from qgis_farslip.train_tab import UserError

    table = added(subdataset(tmp_path), "table")  # read through a VRT: the labels' extent is taken into its CRS
    naip = added(str(NAIP), "naip")
    for raster, crs in ((table, "EPSG:4326"), (naip, naip.crs().authid())):
        choose(bare_dock, raster, labels_layer(crs, []))
        with pytest.raises(UserError, match=r"^The labels layer labels has no polygons\.$"):
            bare_dock.train_tab.build_request()


def test_a_refused_training_leaves_no_copy_of_the_labels(bare_dock, made_folders, tmp_path):
    naip = added(str(NAIP), "naip")
    corner = naip.extent()
    choose(bare_dock, naip, labels_layer(naip.crs().authid(), [QgsRectangle(
        corner.xMinimum(), corner.yMinimum(), corner.xMinimum() + 400, corner.yMinimum() + 400)]))
    bare_dock.train_tab.train()
    assert bare_dock.train_tab.last_error == "The FarSLIP backend is not connected; press Connect below."
    choose(bare_dock, added(subdataset(tmp_path), "table"), labels_layer("EPSG:4326", [QgsRectangle(10, 10, 11, 11)]))
    bare_dock.train_tab.train()
    assert bare_dock.train_tab.last_error == "The labels of labels do not overlap the raster table."
    assert not [folder for folder in made_folders if os.path.exists(folder)]


def choose_naip_and_a_corners_labels(bare_dock):
    """NAIP and a memory layer labelling a 400 m square in its corner, chosen in the Train tab; the labels."""
    naip = added(str(NAIP), "naip")
    corner = naip.extent()
    labels = labels_layer(naip.crs().authid(), [QgsRectangle(corner.xMinimum(), corner.yMinimum(),
                                                             corner.xMinimum() + 400, corner.yMinimum() + 400)])
    choose(bare_dock, naip, labels)
    return labels


def test_the_labels_copy_is_kept_and_the_same_labels_give_the_same_file(bare_dock, made_folders):
    """A memory layer's labels are copied for the backend; the copy is kept (the model records it) and named
    after what it holds, so training again, or an evaluation, on the same labels finds the same file."""
    from qgis_farslip.train_tab import kept_labels_dir

    labels = choose_naip_and_a_corners_labels(bare_dock)
    first = bare_dock.train_tab.build_request()[0]["labels"]
    assert os.path.dirname(first) == kept_labels_dir() and os.path.isfile(first)
    written = os.stat(first).st_ino
    assert bare_dock.train_tab.build_request()[0]["labels"] == first and os.stat(first).st_ino == written
    # Pruned (or removed by hand), the copy is remade byte for byte: the sha256 a model recorded still holds.
    with open(first, "rb") as file:
        held = file.read()
    os.remove(first)
    time.sleep(1.1)  # the GeoPackage's timestamp would differ
    assert bare_dock.train_tab.build_request()[0]["labels"] == first
    with open(first, "rb") as file:
        assert file.read() == held
    with edit(labels):
        labels.changeAttributeValue(next(labels.getFeatures()).id(), labels.fields().indexOf("class"), "other")
    assert bare_dock.train_tab.build_request()[0]["labels"] != first


def test_labels_copies_no_run_used_for_months_are_removed(bare_dock, made_folders):
    """The kept copies do not pile up in the cache for ever: those no run used for 90 days go (with drafts a
    crash left), a copy used again is kept another 90 days, and recent ones stay."""
    from qgis_farslip.train_tab import kept_labels_dir

    choose_naip_and_a_corners_labels(bare_dock)
    current = bare_dock.train_tab.build_request()[0]["labels"]
    made = os.stat(current).st_ino
    folder = kept_labels_dir()
    old, recent, draft, mine = (os.path.join(folder, name) for name in (
        f"old-{'0' * 20}.gpkg", f"recent-{'4' * 20}.gpkg", ".draft-x", "mine.gpkg"))
    for path in (old, recent, mine):
        with open(path, "wb") as file:
            file.write(b"a labels copy")
    os.makedirs(draft)
    days = 86400
    for path, age in ((old, 100 * days), (draft, 100 * days), (recent, 10 * days), (current, 100 * days),
                      (mine, 100 * days)):
        os.utime(path, (time.time() - age, time.time() - age))
    assert bare_dock.train_tab.build_request()[0]["labels"] == current
    assert not os.path.exists(old) and not os.path.exists(draft)
    assert os.path.isfile(mine)  # not a name the plugin gives: never removed
    assert os.path.isfile(recent) and os.stat(current).st_ino == made  # used again: kept, not remade
    assert time.time() - os.path.getmtime(current) < days


@pytest.mark.parametrize("ending", ["cancel", "backend failed"])
def test_a_run_waiting_for_the_backend_leaves_no_copy_of_a_web_layer(bare_dock, made_folders, tmp_path, qgis_iface,
                                                                     ending):
    """The copy folder of the run pressed (its step is what runs once the backend is ready) goes when the
    wait ends without a job."""
    layer = added(xyz_source(tmp_path), "empty tiles", "wms")
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(-11044000, 5942000, -11034000, 5946000))
    bare_dock.form.classesEdit.setPlainText("water")
    bare_dock.form.layerCombo.setLayer(layer)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("canvas"))
    bare_dock.run()
    assert bare_dock.form.statusLabel.text() == "Connecting to the FarSLIP backend..."
    assert made_folders
    if ending == "cancel":
        bare_dock.cancel()
    else:
        bare_dock.manager.failed.emit("the backend did not start")
    assert not [folder for folder in made_folders if os.path.exists(folder)]
    assert bare_dock.form.runButton.isEnabled()
