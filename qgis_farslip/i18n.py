"""tr(): every sentence the plugin shows goes through Qt's translation, in one context."""

from __future__ import annotations

from qgis.PyQt.QtCore import QCoreApplication

CONTEXT = "FarSLIP"


def tr(text: str) -> str:
    return QCoreApplication.translate(CONTEXT, text)
