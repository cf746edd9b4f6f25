"""The dock's last choices (model, classes, options), kept in the project and in the user's settings.

A project remembers what was run in it (QgsProject entries, saved with the
.qgz); a new project starts from what the user ran last anywhere (QgsSettings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from qgis.core import QgsProject, QgsSettings

SCOPE = "farslip"
SETTINGS_PREFIX = "farslip/last/"


@dataclass
class LastChoices:
    model: str = ""
    classes: str = ""
    preset: str = ""
    threshold: float = 0.0
    class_raster: bool = False
    prob_raster: bool = False
    refine: str = "none"
    region_checks: bool = True

    def save(self, project: QgsProject | None = None) -> None:
        project = project or QgsProject.instance()
        store = QgsSettings()
        for name, value in asdict(self).items():
            store.setValue(SETTINGS_PREFIX + name, value)
            if isinstance(value, bool):
                project.writeEntryBool(SCOPE, name, value)
            elif isinstance(value, float):
                project.writeEntryDouble(SCOPE, name, value)
            else:
                project.writeEntry(SCOPE, name, value)

    @classmethod
    def load(cls, project: QgsProject | None = None) -> LastChoices:
        """The project's entries where it has them, else the user's last choices."""
        project = project or QgsProject.instance()
        store = QgsSettings()
        values = {}
        for item in fields(cls):
            default = item.default
            value = store.value(SETTINGS_PREFIX + item.name, default, type=type(default))
            if isinstance(default, bool):
                from_project, found = project.readBoolEntry(SCOPE, item.name, bool(value))
            elif isinstance(default, float):
                from_project, found = project.readDoubleEntry(SCOPE, item.name, float(value))
            else:
                from_project, found = project.readEntry(SCOPE, item.name, str(value))
            values[item.name] = from_project if found else value
        return cls(**values)
