"""The plugin's settings, kept in QgsSettings under "farslip/"."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from qgis.core import QgsProject, QgsSettings
from qgis.PyQt.QtCore import QStandardPaths

PREFIX = "farslip/"


def default_output_folder() -> str:
    documents = (QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
                 or os.path.expanduser("~"))
    return os.path.join(documents, "FarSLIP")


def backend_home() -> str:
    """The backend's state folder (its default FARSLIP_HOME): connection file, logs, fine-tuned models."""
    home = os.environ.get("FARSLIP_HOME")
    if not home:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        home = os.path.join(data, "farslip")
    return os.path.expanduser(home)


def plugin_cache_dir() -> str:
    """Files the plugin keeps for the backend between runs, in the backend's cache folder ($FARSLIP_CACHE,
    default ~/.cache/farslip): removable at any time, remade when needed."""
    cache = os.environ.get("FARSLIP_CACHE")
    if not cache:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                             "farslip")
    return os.path.expanduser(cache)


def backend_log_file() -> str:
    return os.path.join(backend_home(), "logs", "backend.log")


@dataclass
class PluginSettings:
    backend_command: str = ""   # a `farslip` executable or the Python of the backend's environment; "" = find it
    backend_url: str = ""       # connect to a backend someone else started instead of starting one
    backend_token: str = ""
    connection_file: str = ""   # or read url + token from the file `farslip serve` wrote
    auto_start: bool = True
    ray_address: str = ""       # a backend the plugin starts runs segment jobs on this Ray (FARSLIP_RAY_ADDRESS)
    default_model: str = ""
    output_folder: str = ""

    @classmethod
    def load(cls) -> PluginSettings:
        store = QgsSettings()
        values = {}
        for field in fields(cls):
            default = field.default
            value = store.value(PREFIX + field.name, default, type=type(default))
            values[field.name] = value if value is not None else default
        return cls(**values)

    def save(self) -> None:
        store = QgsSettings()
        for field in fields(self):
            store.setValue(PREFIX + field.name, getattr(self, field.name))

    def output_dir(self) -> str:
        """The output folder as an absolute path: ~ expanded, a relative one taken from the project's folder (as
        QGIS takes relative layer paths), or the home folder without a saved project. The backend has no
        working folder a relative path could mean, and QGIS's own is wherever it was started."""
        folder = os.path.expanduser(self.output_folder.strip()) if self.output_folder.strip() else ""
        if not folder:
            return default_output_folder()
        if not os.path.isabs(folder):
            folder = os.path.join(QgsProject.instance().homePath() or os.path.expanduser("~"), folder)
        return os.path.normpath(folder)
