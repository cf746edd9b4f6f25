"""FarSLIP for QGIS: type class names, get a styled polygon layer of them.

The plugin is a thin client of the FarSLIP backend (a separate process with its
own Python, torch and open_clip), which it reaches over HTTP only.
"""

from __future__ import annotations


def classFactory(iface):
    from .plugin import FarslipPlugin

    return FarslipPlugin(iface)
