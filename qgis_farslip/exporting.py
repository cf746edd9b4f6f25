"""Export a FarSLIP result with its style: a GeoPackage (style stored in it) or a shapefile (+ .qml).

The dialog names the layer it exports (the latest result unless the user picks
another) and can load the exported file, styled, into the project.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import uuid
from collections.abc import Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFormLayout

from .filenames import MAX_STEM, first_free, gpkg_table_name, same_file, sqlite_uri
from .parameters import safe_name
from .i18n import tr

DRIVERS = {".shp": "ESRI Shapefile", ".gpkg": "GPKG"}
FILTERS = "GeoPackage (*.gpkg);;ESRI Shapefile (*.shp)"
# The files of a shapefile an export writes (.qml: its style), and those of an earlier one that would describe
# the new one wrongly (a spatial index, an ArcGIS or QGIS projection file) and go when it is replaced.
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qml")
STALE_SHAPEFILE_PARTS = (".sbn", ".sbx", ".qix", ".qpj", ".shp.xml", ".aux.xml")


def driver_for(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension not in DRIVERS:
        raise ValueError(tr("Cannot export to {}: choose a .shp or .gpkg file.").format(path))
    return DRIVERS[extension]


def result_layers(preferred: Sequence[QgsMapLayer] = ()) -> list[QgsVectorLayer]:
    """FarSLIP polygon results in the project that can be read (a layer whose file is gone is not offered),
    the given (latest) ones first, then newest first."""
    found = [layer for layer in QgsProject.instance().mapLayers().values()
             if isinstance(layer, QgsVectorLayer) and layer.customProperty("farslip/run_id") is not None
             and layer.isValid()]
    latest = [layer for layer in preferred if layer in found]
    rest = sorted((layer for layer in found if layer not in latest), key=lambda layer: layer.name(), reverse=True)
    return latest + rest


def gpkg_layer_name(layer: QgsVectorLayer) -> str:
    """The table a result is written to in a GeoPackage: the result's name, letters of any script, digits
    and `_` (exporting the same result again replaces it; another table of that name gets the result beside it,
    free_table_name); GeoPackage reserves names that begin with
    'gpkg', 'rtree_' or 'sqlite_' (GDAL refused them), which get a leading `_` (gpkg_table_name)."""
    return gpkg_table_name(re.sub(r"\W+", "_", layer.name()).strip("_")[:MAX_STEM] or "farslip_result")


def result_key(layer: QgsVectorLayer) -> str:
    """What a result's GeoPackage table is marked with (gpkg_contents.description): its run, so that the same
    result exported again replaces its own table and never another's."""
    run_id = str(layer.customProperty("farslip/run_id") or "")
    return f"FarSLIP result, run {run_id}" if run_id else f"FarSLIP result, layer {layer.id()}"


def _table_descriptions(path: str) -> dict[str, str]:
    """The tables of a GeoPackage (lower case: SQLite's names ignore case) and their descriptions. A GeoPackage
    whose tables cannot be listed is refused: the export could replace one of them."""
    try:
        with contextlib.closing(sqlite3.connect(sqlite_uri(path), uri=True)) as database:
            rows = database.execute("SELECT table_name, description FROM gpkg_contents").fetchall()
    except sqlite3.Error as error:
        raise RuntimeError(tr("The layers of {} cannot be read ({}); it is left as it is: export to another "
                              "file.").format(path, error)) from None
    return {str(table).lower(): str(description or "") for table, description in rows}


def free_table_name(path: str, table: str, key: str) -> str:
    """`table`, where the GeoPackage at `path` has no table of that name or has this result's own there (an
    export of the same result again replaces it); else `table_2`, `table_3`...: a table of another result, or
    the user's own, is never replaced."""
    tables = _table_descriptions(path) if os.path.isfile(path) else {}
    return first_free(table, lambda candidate: tables.get(candidate.lower(), key) != key,
                      lambda number: gpkg_table_name(f"{table[:MAX_STEM - 1 - len(str(number))]}_{number}"))


def export_path(path: str) -> str:
    """The file an export to `path` writes: `.gpkg` added to a name without an extension, the extension in
    lower case (GDAL names a shapefile's parts in lower case: R.SHP is written as R.shp)."""
    root, extension = os.path.splitext(path)
    return root + (extension.lower() or ".gpkg")


def replaces_a_file(path: str) -> bool:
    """Whether an export to `path` would replace a whole file the user has: an existing shapefile (into an
    existing GeoPackage, the result is a layer of its own and the file's other layers stay)."""
    path = export_path(path)
    return os.path.splitext(path)[1] == ".shp" and os.path.lexists(path)


def _source_file(layer: QgsVectorLayer) -> tuple[str, str | None]:
    """(the file a layer reads, its table in a GeoPackage or None), from the layer's source."""
    parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
    path, table = str(parts.get("path") or ""), parts.get("layerName") or None
    if table is None and path.lower().endswith(".gpkg"):  # a GeoPackage opened without a table: its first
        tables = [sublayer.name() for sublayer in QgsProviderRegistry.instance().querySublayers(path)]
        table = tables[0] if tables else None
    return path, table


def _has_styles_table(path: str) -> bool:
    """Whether a GeoPackage has QGIS's layer_styles table (asking QGIS logs "No styles available on DB")."""
    try:
        with contextlib.closing(sqlite3.connect(sqlite_uri(path), uri=True)) as database:
            return database.execute("SELECT 1 FROM sqlite_master WHERE name = 'layer_styles'").fetchone() is not None
    except sqlite3.Error:
        return False


def _refuse_own_source(layer: QgsVectorLayer, path: str, table: str | None) -> None:
    """An export may not replace what it reads: the result's own shapefile, or its own table of a GeoPackage
    (the writer empties the table it then reads: the file held 0 polygons and the export said "Exported")."""
    source, source_table = _source_file(layer)
    if not source or not os.path.exists(path) or not same_file(source, path):
        return
    if table is None or source_table == table:
        raise RuntimeError(tr("{} is where {} is read from; export it to another file.").format(path, layer.name()))


def _move_shapefile(staged: str, path: str) -> None:
    """The staged shapefile's parts take the place of `path`'s; parts of an earlier one at `path` that would
    now describe the new one wrongly (a spatial index, a projection file of another program) go.

    The earlier parts are first moved aside, and removed only once every new part is in place: a part the system
    will not let go (Windows refuses to replace a file a program holds open, as QGIS does a loaded layer's) puts
    every part back as it was, and the export says so."""
    staged_root, root = os.path.splitext(staged)[0], os.path.splitext(path)[0]
    aside_root = os.path.join(os.path.dirname(path), f".farslip-replaced-{uuid.uuid4().hex[:8]}")
    aside: list[str] = []  # the extensions of the earlier parts moved aside
    placed: list[str] = []  # and of the new parts put in their place
    try:
        for extension in SHAPEFILE_PARTS + STALE_SHAPEFILE_PARTS:
            if os.path.lexists(root + extension):
                os.replace(root + extension, aside_root + extension)
                aside.append(extension)
        for extension in SHAPEFILE_PARTS:
            if os.path.exists(staged_root + extension):
                os.replace(staged_root + extension, root + extension)
                placed.append(extension)
    except OSError as error:
        kept = _put_back(staged_root, root, aside_root, aside, placed)
        loaded = [layer.name() for layer in QgsProject.instance().mapLayers().values()
                  if isinstance(layer, QgsVectorLayer) and _source_file(layer)[0]
                  and same_file(_source_file(layer)[0], path)]
        why = tr("it is open in QGIS as the layer {}: remove that layer from the project, or export to another "
                 "file name.").format(", ".join(loaded)) if loaded else tr(
                 "it may be open in another program, or the folder may not let it be replaced: close it there, or "
                 "export to another file name.")
        raise RuntimeError(tr("{} cannot be replaced ({}), so it is left as it was; {}").format(
            path, error.strerror or error, why) + kept) from None
    for extension in aside:
        with contextlib.suppress(OSError):  # let go of since it was moved: removed as soon as it can be
            os.remove(aside_root + extension)


def _put_back(staged_root: str, root: str, aside_root: str, aside: list[str], placed: list[str]) -> str:
    """Undo a replacement that failed half way; "" when the earlier shapefile is back as it was, else a sentence
    naming where its parts are."""
    for extension in placed:
        with contextlib.suppress(OSError):
            os.replace(root + extension, staged_root + extension)
    left = []
    for extension in aside:
        try:
            os.replace(aside_root + extension, root + extension)
        except OSError:
            left.append(aside_root + extension)
    return tr(" Parts of the earlier shapefile could not be put back: they are {}.").format(", ".join(left)) \
        if left else ""


def _remove_shapefile(path: str) -> None:
    """Remove a staged shapefile's parts (after a failure; renamed away after a success), as far as the system
    lets go of them."""
    root = os.path.splitext(path)[0]
    for extension in SHAPEFILE_PARTS:
        if os.path.lexists(root + extension):
            with contextlib.suppress(OSError):
                os.remove(root + extension)


def write_styled(layer: QgsVectorLayer, path: str) -> QgsVectorLayer:
    """Write `layer` (in its own CRS) and its style; the written layer is returned, styled.

    Into an existing GeoPackage, the result is added as a layer of its own (its own table of an earlier export
    of it is replaced; a table of that name holding anything else is kept, and the result gets a numbered name);
    the file's other layers and their styles are kept. A shapefile is written under a
    temporary name beside `path` and renamed over it once it is complete with its style: an export that
    fails leaves an existing shapefile as it was.
    """
    if not layer.isValid():
        source, _table = _source_file(layer)
        raise RuntimeError(tr("{} cannot be read (its file {} is gone or damaged); nothing to export.").format(
            layer.name(), source or layer.source()))
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = driver_for(path)
    options.fileEncoding = "UTF-8"
    path = export_path(path)
    existed = os.path.isfile(path)
    source = path
    target = path  # where the writer writes: a shapefile goes to a staged name first
    if options.driverName == "GPKG":
        options.layerName = gpkg_layer_name(layer)
        if existed:
            with open(path, "rb") as existing:
                if existing.read(16) != b"SQLite format 3\x00":
                    raise RuntimeError(tr("{} exists and is not a GeoPackage; choose another file name.").format(path))
            options.actionOnExistingFile = QgsVectorFileWriter.ActionOnExistingFile.CreateOrOverwriteLayer
        _refuse_own_source(layer, path, options.layerName)
        key = result_key(layer)
        options.layerName = free_table_name(path, options.layerName, key)
        options.layerOptions = [f"DESCRIPTION={key}"]
        source = f"{path}|layername={options.layerName}"
    else:
        options.layerName = os.path.splitext(os.path.basename(path))[0]
        _refuse_own_source(layer, path, None)
        target = os.path.join(os.path.dirname(path), f".farslip-export-{uuid.uuid4().hex[:8]}.shp")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise RuntimeError(tr("Cannot create the folder {} ({}); choose another place to export to.").format(
            folder, error.strerror or error)) from error
    try:
        return _write_and_style(layer, path, target, source, options, existed)
    finally:
        if target != path:
            _remove_shapefile(target)  # after a failure; renamed away after a success


def _write_and_style(layer: QgsVectorLayer, path: str, target: str, source: str,
                     options: QgsVectorFileWriter.SaveVectorOptions, existed: bool) -> QgsVectorLayer:
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, target, QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.WriterError.NoError:
        raise RuntimeError(tr("Export to {} failed: {}").format(
            path, message or tr("QGIS gave no reason; check that the folder can be written to")))
    staged = QgsVectorLayer(target, options.layerName, "ogr") if target != path else None
    if staged is not None:
        if not staged.isValid():
            raise RuntimeError(tr("The exported file {} cannot be opened.").format(path))
        renderer = layer.renderer().clone()
        match_categories_to_values(renderer, staged)
        staged.setRenderer(renderer)
        qml = os.path.splitext(target)[0] + ".qml"  # QGIS loads a .qml of the same name with the shapefile
        message, ok = staged.saveNamedStyle(qml)
        if not ok:
            del staged  # closed, so that its files can be removed
            raise RuntimeError(tr("The style could not be saved as {}: {}").format(
                os.path.splitext(path)[0] + ".qml", message))
        del staged  # the staged files are closed before they are renamed
        _move_shapefile(target, path)
    written = QgsVectorLayer(source, options.layerName, "ogr")
    if not written.isValid():
        raise RuntimeError(tr("The exported file {} cannot be opened.").format(path))
    renderer = layer.renderer().clone()
    if options.driverName != "GPKG":
        match_categories_to_values(renderer, written)
    written.setRenderer(renderer)
    if options.driverName == "GPKG":
        # Stored in the GeoPackage's layer_styles table as the default: QGIS applies it on every open.
        # That layer's style of an earlier export is replaced (QGIS would otherwise ask in a message box).
        if existed and _has_styles_table(path):  # asking a file without one logs "No styles available on DB"
            related, ids, names, _descriptions, _error = written.listStylesInDatabase()
            for style_id, name in list(zip(ids, names))[:related]:
                if name == options.layerName:
                    written.deleteStyleFromDatabase(style_id)
        failure = written.saveStyleToDatabase(options.layerName, tr("FarSLIP classes"), True, "")
        if failure:
            raise RuntimeError(tr("The style could not be saved in {}: {}").format(path, failure))
    return written


def match_categories_to_values(renderer, written: QgsVectorLayer) -> None:
    """Categories of a class a shapefile holds shortened (a .dbf text field keeps 254 bytes) get the shortened
    value, so that the .qml still styles that class."""
    if not isinstance(renderer, QgsCategorizedSymbolRenderer):
        return
    index = written.fields().indexOf(renderer.classAttribute())
    if index < 0:
        return
    values = {str(value) for value in written.uniqueValues(index)}
    for position, category in enumerate(renderer.categories()):
        value = str(category.value())
        if value in values:
            continue
        prefixes = [written_value for written_value in values if written_value and value.startswith(written_value)]
        if prefixes:
            renderer.updateCategoryValue(position, max(prefixes, key=len))


def filter_note(layer: QgsVectorLayer) -> str:
    """What the status says of a layer exported under a filter (the Review tab's "Hide low quality", or one the
    user set): the file holds only the polygons the filter shows."""
    if not layer.subsetString():
        return ""
    unfiltered = layer.clone()
    unfiltered.setSubsetString("")
    shown = sum(1 for _feature in layer.getFeatures())  # featureCount() is -1 where the provider does not know
    return tr(" It holds {} of the {} polygons: those the layer's filter shows ({}); turn 'Hide low quality' off "
              "(Review tab) or clear the filter to export them all.").format(
                  shown, sum(1 for _feature in unfiltered.getFeatures()), layer.subsetString())


def shortened_classes(layer: QgsVectorLayer, written: QgsVectorLayer) -> list[str]:
    """The class names of `layer` that the written file holds shortened (see match_categories_to_values)."""
    before, after = layer.renderer(), written.renderer()
    if not isinstance(before, QgsCategorizedSymbolRenderer) or not isinstance(after, QgsCategorizedSymbolRenderer):
        return []
    return [str(old.value()) for old, new in zip(before.categories(), after.categories())
            if str(old.value()) != str(new.value())]


class ExportDialog(QDialog):
    def __init__(self, latest: Sequence[QgsMapLayer], folder: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle(tr("Export a FarSLIP result"))
        self.folder = folder
        self.layers = result_layers(latest)
        self.layerCombo = QComboBox(self)
        for layer in self.layers:
            self.layerCombo.addItem(layer.name(), layer.id())
        self.fileWidget = QgsFileWidget(self)
        self.fileWidget.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
        self.fileWidget.setFilter(FILTERS)
        self.fileWidget.setDialogTitle(tr("Export the FarSLIP result"))
        self.loadCheck = QCheckBox(tr("Add the exported layer to the project"), self)
        self.loadCheck.setChecked(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        form.addRow(tr("Layer"), self.layerCombo)
        form.addRow(tr("File"), self.fileWidget)
        form.addRow(self.loadCheck)
        form.addRow(buttons)
        self.layerCombo.currentIndexChanged.connect(self._suggest_path)
        self._suggest_path()

    def has_results(self) -> bool:
        return bool(self.layers)

    def chosen_layer(self) -> QgsVectorLayer | None:
        return QgsProject.instance().mapLayer(self.layerCombo.currentData() or "")

    def _suggest_path(self) -> None:
        layer = self.chosen_layer()
        if layer is not None:
            self.fileWidget.setFilePath(os.path.join(self.folder, safe_name(layer.name()) + ".gpkg"))

    def chosen_path(self) -> str:
        """The file typed or picked in the dialog (`.gpkg` added to a name without an extension)."""
        path = self.fileWidget.filePath().strip()
        return path + ".gpkg" if path and not os.path.splitext(path)[1] else path

    def export(self, path: str | None = None, layer: QgsVectorLayer | None = None) -> tuple[str | None, str]:
        """(the written file or None, a sentence for the status line)."""
        layer = layer or self.chosen_layer()
        path = path or self.chosen_path()
        if path and not os.path.splitext(path)[1]:
            path += ".gpkg"
        if layer is None:
            return None, tr("There is no FarSLIP result to export yet; run a segmentation first.")
        try:
            written = write_styled(layer, path)
        except (RuntimeError, ValueError) as error:
            return None, str(error)
        except OSError as error:  # a file the system would not let the export read, write or replace
            return None, tr("Export to {} failed: {}").format(path, f"{error.strerror}: {error.filename}"
                                                              if error.strerror and error.filename else error)
        path = written.source().split("|", 1)[0]  # as written (R.SHP is R.shp)
        shortened = shortened_classes(layer, written)
        names = ", ".join(repr(name[:40] + "...") for name in shortened)
        note = tr(" A shapefile keeps 254 bytes of text: the class {} is stored shortened (its style too); export to "
                  "a GeoPackage to keep the full names.").format(names) if shortened else ""
        note += filter_note(layer)
        table = written.name()
        if os.path.splitext(path)[1].lower() == ".gpkg" and table != gpkg_layer_name(layer):
            note = tr(" The GeoPackage already had a layer {} (another result, or one of yours); it is kept.").format(
                gpkg_layer_name(layer)) + note
        others = [sublayer.name() for sublayer in QgsProviderRegistry.instance().querySublayers(path)
                  if sublayer.name() != table]
        if self.loadCheck.isChecked():
            # A file of its own is shown under the file's name; a layer among others under its own.
            written.setName(table if others else os.path.splitext(os.path.basename(path))[0])
            QgsProject.instance().addMapLayer(written, False)
            QgsProject.instance().layerTreeRoot().insertLayer(0, written)
        if others:
            return path, tr("Exported {} with its style to {} as the layer {}; its other layers are kept.").format(
                layer.name(), path, table) + note
        return path, tr("Exported {} with its style to {}.").format(layer.name(), path) + note
