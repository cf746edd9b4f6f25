"""Labels that show the plugin's and the backend's sentences show them as written: no &#x27;, no HTML."""

from __future__ import annotations

from plugin_helpers import NAIP
from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt


def test_search_status_shows_quotes_and_angle_brackets_as_typed(bare_dock):
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    tab = bare_dock.search_tab
    tab.form.searchRasterCombo.setLayer(layer)
    tab.form.sentencesEdit.setPlainText("")
    tab.form.searchButton.click()
    label = tab.form.searchStatusLabel
    assert label.textFormat() == Qt.PlainText
    assert "'Like this place...'" in label.text() and "&#x27;" not in label.text(), label.text()

    tab.task = None
    tab._job_failed("The raster <b>a.tif</b> cannot be read: 'x' < 'y'.")  # a backend sentence, as sent
    assert label.text() == "The raster <b>a.tif</b> cannot be read: 'x' < 'y'."


def test_labels_with_backend_or_user_text_are_plain_text(bare_dock):
    from qgis_farslip.client import Connection

    form = bare_dock.form
    review = bare_dock.review_tab.form
    for label in (form.deviceLabel, form.statusLabel, review.estimateLabel, review.reviewStatusLabel,
                  bare_dock.search_tab.form.searchStatusLabel):
        assert label.textFormat() == Qt.PlainText, label.objectName()
    manager = bare_dock.manager
    manager.connection, manager.state = Connection("http://127.0.0.1:9"), "ready"
    manager.ready.emit(manager.connection, {"device": {"type": "cuda", "name": "<i>GPU</i>"}})
    assert form.deviceLabel.text() == "Backend: <i>GPU</i> (cuda)"


def test_installer_status_is_plain_text(farslip, qgis_iface):
    from qgis_farslip.installer_dialog import InstallerDialog

    dialog = InstallerDialog(qgis_iface.mainWindow())
    try:
        assert dialog.statusLabel.textFormat() == Qt.PlainText
    finally:
        dialog.deleteLater()
