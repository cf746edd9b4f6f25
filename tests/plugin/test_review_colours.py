"""The Review tab's "Colour by class" gives back the run's own colours, those of its class raster."""

from __future__ import annotations

from plugin_helpers import run_dock_job

CLASSES = ["water", "building", "road", "tree", "field", "bare soil", "parking lot"]


def colours(layer) -> dict[str, str]:
    categories = layer.renderer().categories()  # kept alive while their symbols are read
    return {category.label(): category.symbol().color().name() for category in categories}


def test_colour_by_class_after_colour_by_quality_restores_the_runs_colours(naip_dock):
    from qgis_farslip.results import CLASSES_PROPERTY
    from qgis_farslip.review_tab import STYLE_CLASS, STYLE_QUALITY

    naip_dock.form.classesEdit.setPlainText("\n".join(CLASSES))
    naip_dock.form.classRasterCheck.setChecked(True)
    naip_dock.form.regionChecksCheck.setChecked(False)
    assert run_dock_job(naip_dock) == "done", naip_dock.last_error
    vector = naip_dock.last_layers[0]
    class_raster = next(layer for layer in naip_dock.last_layers
                        if layer.customProperty("farslip/kind") == "class_raster")
    run_colours = colours(vector)
    assert list(run_colours) == CLASSES
    table = {int(item.value): item.color.name() for item in class_raster.dataProvider().colorTable(1)}
    assert [table[class_id] for class_id in range(len(CLASSES))] == list(run_colours.values())
    # In alphabetical order the palette's clash rule hands out other colours: the case the tab got wrong.
    from qgis_farslip.results import class_colours
    assert {name: colour.name() for name, colour in class_colours(sorted(CLASSES)).items()} != run_colours

    tab = naip_dock.review_tab
    assert tab.layer() is vector
    combo = tab.form.styleCombo
    combo.setCurrentIndex(combo.findData(STYLE_QUALITY))
    assert vector.renderer().type() == "graduatedSymbol"
    combo.setCurrentIndex(combo.findData(STYLE_CLASS))
    assert colours(vector) == run_colours
    assert list(colours(vector)) == CLASSES, "the legend lists the classes in the order they were asked for"

    # A layer of an older project (no classes kept on it) is coloured in the order of its class ids; with
    # every class present that is the run's colouring again.
    vector.removeCustomProperty(CLASSES_PROPERTY)
    combo.setCurrentIndex(combo.findData(STYLE_QUALITY))
    combo.setCurrentIndex(combo.findData(STYLE_CLASS))
    found = {feature["class"] for feature in vector.getFeatures()}
    assert list(colours(vector)) == [name for name in CLASSES if name in found]
    if found == set(CLASSES):
        assert colours(vector) == run_colours
