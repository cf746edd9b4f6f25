"""The labelled polygons Processing's Train and Evaluate send the backend: what the algorithm writes and asks for,
with the backend's job replaced by one that records the request (and the labels file as it was sent)."""

from __future__ import annotations

import os

import pytest
from plugin_helpers import NAIP
from qgis.core import (QgsApplication, QgsFeature, QgsField, QgsGeometry, QgsProcessingException,
                       QgsProcessingFeatureSourceDefinition, QgsRectangle, QgsVectorLayer)
from qgis.PyQt.QtCore import QVariant

RECTANGLES = (("water", (486000, 5206000, 486600, 5206600)), ("field", (487000, 5207000, 487800, 5207800)),
              ("road", (488500, 5208000, 489500, 5208200)))


def memory_labels(field: str = "cls") -> QgsVectorLayer:
    """Three labelled squares on NAIP in a memory layer (the labels are copied before they are sent)."""
    layer = QgsVectorLayer(f"Polygon?crs=EPSG:26914&field={field}:string&field=note:string", "labels", "memory")
    features = []
    for name, rectangle in RECTANGLES:
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(*rectangle)))
        feature.setAttributes([name, "n"])
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    layer.updateExtents()
    return layer


@pytest.fixture
def sent(farslip, qgis_processing, backend_home, monkeypatch):
    """The requests the algorithms send (each with 'sent_labels': the class values of the labels file, read
    while the job runs), the FarSLIP provider registered with no backend behind it."""
    from qgis_farslip import processing_provider

    registry = QgsApplication.processingRegistry()
    provider = None
    if registry.providerById("farslip") is None:
        provider = processing_provider.FarslipProvider(lambda: None)
        registry.addProvider(provider)
    requests: list[dict] = []

    def recorded(manager, kind, request, feedback):
        labels = request.get("labels")
        if labels and os.path.exists(labels):
            layer = QgsVectorLayer(labels, "sent", "ogr")
            has_field = request["class_field"] in layer.fields().names()  # None: the backend would refuse
            request = {**request, "sent_fields": layer.fields().names(), "sent_labels": sorted(
                str(f[request["class_field"]]) for f in layer.getFeatures()) if has_field else None}
        requests.append({"kind": kind, **request})
        if kind == "train":
            return {"state": "done", "result": {"outputs": {"model_dir": request["out"]}}}
        if kind == "evaluate":
            return {"state": "done", "result": {"metrics": {"classes": [], "miou": 0.5, "split": "all"}}}
        return {"state": "done", "result": {}}

    monkeypatch.setattr(processing_provider, "run_backend_job", recorded)
    yield requests
    if provider is not None:
        registry.removeProvider(provider)


def evaluate(labels, class_field: str, tmp_path, **more) -> dict:
    import processing

    return processing.run("farslip:evaluate_on_labelled_polygons", {
        "INPUT": str(NAIP), "LABELS": labels, "CLASS_FIELD": class_field, "OUTPUT": str(tmp_path / "report.json"),
        **more})


def test_a_class_field_the_labels_lack_is_refused_in_words_not_a_crash(sent, tmp_path):
    """A misspelled CLASS_FIELD on labels that are copied (a memory layer) crashed QGIS: the copy was asked for
    the field at index -1."""
    with pytest.raises(QgsProcessingException, match=r"The labels layer labels has no field 'klass'; its fields "
                                                     r"are: cls, note\."):
        evaluate(memory_labels(), "klass", tmp_path)
    assert not sent


def test_a_class_field_that_differs_only_in_case_is_the_layers_field(sent, tmp_path):
    evaluate(memory_labels(), "CLS", tmp_path)
    assert sent[0]["class_field"] == "cls"
    assert sent[0]["sent_labels"] == ["field", "road", "water"] and sent[0]["sent_fields"] == ["fid", "cls"]
    two = memory_labels("cls")
    two.dataProvider().addAttributes([QgsField("Cls", QVariant.String)])
    two.updateFields()
    with pytest.raises(QgsProcessingException, match="has no field 'CLS'"):  # which of two: not guessed
        evaluate(two, "CLS", tmp_path)


def test_the_train_tab_refuses_a_field_the_labels_lack(farslip, tmp_path):
    from qgis_farslip.train_tab import UserError, labels_file

    with pytest.raises(UserError, match="has no field 'klass'"):
        labels_file(memory_labels(), "klass", lambda: str(tmp_path))
    copy = labels_file(memory_labels(), "Cls", lambda: str(tmp_path))
    assert QgsVectorLayer(copy, "copy", "ogr").fields().names() == ["fid", "cls"]


def test_a_virtual_or_joined_class_field_is_sent_in_a_copy(sent, tmp_path):
    """An unedited GeoPackage was sent as its file, where the backend found no field 'klass' (an expression
    field of the layer) or 'name' (joined from another layer)."""
    from plugin_helpers import save_as_geopackage
    from qgis.core import QgsProject, QgsVectorLayerJoinInfo

    path = str(tmp_path / "plain.gpkg")
    save_as_geopackage(memory_labels(), path)
    layer = QgsVectorLayer(path, "plain", "ogr")
    layer.addExpressionField("CASE WHEN \"cls\" = 'field' THEN 'vegetation' ELSE \"cls\" END",
                             QgsField("klass", QVariant.String))
    names = QgsVectorLayer("None?field=code:string&field=name:string", "names", "memory")
    rows = []
    for code, name in (("water", "open water"), ("field", "cropland"), ("road", "paved")):
        row = QgsFeature(names.fields())
        row.setAttributes([code, name])
        rows.append(row)
    names.dataProvider().addFeatures(rows)
    QgsProject.instance().addMapLayers([layer, names])
    join = QgsVectorLayerJoinInfo()
    join.setJoinLayer(names)
    join.setJoinFieldName("code")
    join.setTargetFieldName("cls")
    join.setPrefix("")
    join.setJoinFieldNamesSubset(["name"])
    assert layer.addJoin(join)
    evaluate(layer, "cls", tmp_path)
    evaluate(layer, "klass", tmp_path)
    evaluate(layer, "name", tmp_path)
    assert sent[0]["labels"] == path  # the file's own field: the file itself
    assert sent[1]["labels"] != path and sent[1]["sent_labels"] == ["road", "vegetation", "water"]
    assert sent[2]["labels"] != path and sent[2]["sent_labels"] == ["cropland", "open water", "paved"]
    QgsProject.instance().removeMapLayers([layer.id(), names.id()])


def test_selected_features_only_scores_and_trains_on_the_selection(sent, tmp_path):
    """LABELS could not be 'Selected features only' (a vector layer parameter): all polygons were sent."""
    import processing
    from plugin_helpers import save_as_geopackage
    from qgis.core import QgsProject

    path = str(tmp_path / "labels.gpkg")
    save_as_geopackage(memory_labels(), path)
    layer = QgsVectorLayer(path, "labels", "ogr")
    QgsProject.instance().addMapLayer(layer)
    selected = QgsProcessingFeatureSourceDefinition(layer.id(), True)
    with pytest.raises(QgsProcessingException, match="No polygons of labels are selected"):
        evaluate(selected, "cls", tmp_path)
    layer.selectByExpression("\"cls\" IN ('water', 'road')")
    evaluate(selected, "cls", tmp_path)
    processing.run("farslip:train_on_labelled_polygons", {
        "INPUT": str(NAIP), "LABELS": selected, "CLASS_FIELD": "cls", "EPOCHS": 1, "NAME": "selected"})
    evaluate(QgsProcessingFeatureSourceDefinition(layer.id(), False), "cls", tmp_path)
    assert [request["kind"] for request in sent] == ["evaluate", "train", "evaluate"]
    assert sent[0]["labels"] != path and sent[0]["sent_labels"] == ["road", "water"]
    assert sent[1]["labels"] != path and sent[1]["sent_labels"] == ["road", "water"]
    assert sent[2]["labels"] == path  # all of them: the file itself
    QgsProject.instance().removeMapLayer(layer.id())


def test_train_then_evaluate_on_a_copied_layer_send_the_same_kept_file(sent, tmp_path):
    """Each run wrote a new temporary copy of a memory layer (another sha256, then deleted): an evaluation of the
    model trained on it could not tell its labels were the training's and scored the training pixels."""
    import hashlib

    import processing
    from qgis.core import QgsProject

    layer = memory_labels()
    QgsProject.instance().addMapLayer(layer)
    processing.run("farslip:train_on_labelled_polygons", {
        "INPUT": str(NAIP), "LABELS": layer.id(), "CLASS_FIELD": "cls", "EPOCHS": 1, "NAME": "kept"})
    evaluate(layer.id(), "cls", tmp_path)
    trained, evaluated = sent[0]["labels"], sent[1]["labels"]
    assert trained == evaluated
    from qgis_farslip.train_tab import kept_labels_dir

    assert os.path.dirname(trained) == kept_labels_dir()
    assert os.path.isfile(trained)  # still there: the path farslip_model.json records
    digest = hashlib.sha256(open(trained, "rb").read()).hexdigest()
    evaluate(memory_labels(), "cls", tmp_path)  # the same labels in another layer: the same file, unchanged
    assert sent[2]["labels"] == trained and hashlib.sha256(open(trained, "rb").read()).hexdigest() == digest
    assert sent[2]["sent_labels"] == ["field", "road", "water"]
    # Other labels (a class changed, a selection) are another file.
    layer.dataProvider().changeAttributeValues({next(layer.getFeatures()).id(): {0: "lake"}})
    evaluate(layer.id(), "cls", tmp_path)
    assert sent[3]["labels"] != trained and sent[3]["sent_labels"] == ["field", "lake", "road"]
    layer.selectByIds([next(layer.getFeatures()).id()])
    evaluate(QgsProcessingFeatureSourceDefinition(layer.id(), True), "cls", tmp_path)
    assert sent[4]["labels"] not in (trained, sent[3]["labels"]) and sent[4]["sent_labels"] == ["lake"]
    assert not [name for name in os.listdir(kept_labels_dir()) if name.startswith(".")]  # no draft left
    QgsProject.instance().removeMapLayer(layer.id())


def test_a_feature_limit_on_the_labels_is_refused_not_ignored(sent, tmp_path):
    """The dialog's Advanced options can limit a feature source to its first N features: the algorithm sent all
    of them without a word. It refuses the limit (a sample of the labels is not what the analyst drew)."""
    from plugin_helpers import save_as_geopackage
    from qgis.core import QgsFeatureRequest, QgsProject

    path = str(tmp_path / "labels.gpkg")
    save_as_geopackage(memory_labels(), path)
    layer = QgsVectorLayer(path, "labels", "ogr")
    QgsProject.instance().addMapLayer(layer)
    limited = QgsProcessingFeatureSourceDefinition(layer.id(), False, 2, QgsProcessingFeatureSourceDefinition.Flags(),
                                                   QgsFeatureRequest.GeometryAbortOnInvalid)
    with pytest.raises(QgsProcessingException, match=r"A feature limit \(2\) is set on the labelled polygons"):
        evaluate(limited, "cls", tmp_path)
    assert sent == []
    QgsProject.instance().removeMapLayer(layer.id())
