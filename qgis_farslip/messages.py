"""Sentences for the dock's banner and status line, and the actions offered with them.

The banner is rich text; its links are actions the dock carries out
(restart the backend, open its log, open the settings, install the backend).
"""

from __future__ import annotations

import html
import re
from typing import Callable

from .i18n import tr

RESTART, OPEN_LOG, SETTINGS, INSTALL = "farslip:restart", "farslip:log", "farslip:settings", "farslip:install"
RECONNECT = "farslip:reconnect"




def action_labels() -> dict[str, str]:
    return {RESTART: tr("Restart backend"), OPEN_LOG: tr("Open log"), SETTINGS: tr("Settings"),
            INSTALL: tr("Install backend..."), RECONNECT: tr("Reconnect")}


def action_links(*actions: str) -> str:
    """Actions as rich-text links: 'Restart backend · Open log'."""
    labels = action_labels()
    return " · ".join(f'<a href="{action}">{html.escape(labels[action])}</a>' for action in actions)


def with_actions(rich_text: str, *actions: str) -> str:
    """The message followed by its actions as links."""
    links = action_links(*actions)
    return f"{rich_text}<br>{links}" if links else rich_text


# The backend says the request field an HTTP client sent ("threshold": 0.99); a QGIS user set the dock's
# control of that name. Fields the dock's controls set, as the dock labels them.
CONTROL_LABELS = {"threshold": "Threshold", "top": "Hits", "class_lines": "Classes", "model": "Model",
                  "base_model": "Base model", "method": "Method", "epochs": "Epochs", "background": "Background",
                  "class_field": "Class field", "refine": "Refine outlines", "labels": "Labels"}


def _overlap_said(found: re.Match[str]) -> str:
    return tr("by more than {:.0%}; search a larger area for more").format(float(found.group(1)))


# Sentences that name a request field the dock has no control for, or name it in a way its user cannot follow:
# (the backend's words, what the dock's user can do).
DOCK_REMEDIES: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r'pass "weights": PATH'), "choose the file with Browse... beside Model"),
    # A search's hits: the Search tab has no overlap setting; a larger area has more places to find.
    (re.compile(r'by more than "max_overlap": (\d+(?:\.\d+)?) \(raise it, or search a larger area, for more\)'),
     _overlap_said),
    (re.compile(r'not "top" (\d+)'), lambda found: tr("not the {} asked for in Hits").format(found.group(1))),
    (re.compile(r'the "bbox" area'), "the area searched"),
)
FIELD_SAID = re.compile(r'"(' + "|".join(map(re.escape, CONTROL_LABELS)) + r')"(: )?')


def dock_words(text: str) -> str:
    """A backend sentence with the request fields the dock's controls set said by the controls' labels."""
    for pattern, said in DOCK_REMEDIES:
        text = pattern.sub(said, text)
    return FIELD_SAID.sub(lambda found: tr(CONTROL_LABELS[found.group(1)]) + (" " if found.group(2) else ""), text)


# The dock's controls as the Processing algorithms name their parameters (Search's Hits is its TOP parameter).
PROCESSING_LABELS = {"Hits": "Number of places per sentence"}


def processing_words(text: str) -> str:
    """A sentence in the dock's words (dock_words) with the dock's controls said by the Processing algorithms'
    parameter names: "not the 10 asked for in Number of places per sentence", not "... in Hits"."""
    for dock_label, parameter in PROCESSING_LABELS.items():
        text = re.sub(r"\b(asked for in )" + re.escape(tr(dock_label)) + r"\b",
                      lambda found, said=tr(parameter): found.group(1) + said, text)
    return text


def job_in_dock_words(job: dict) -> dict:
    """A job as GET /v1/jobs gave it, its error, message, warnings and notices in the dock's words."""
    said = dict(job)
    for key in ("error", "message"):
        if isinstance(said.get(key), str):
            said[key] = dock_words(said[key])
    if isinstance(said.get("result"), dict):
        result = dict(said["result"])
        for key in ("warnings", "notices"):
            if isinstance(result.get(key), list):
                result[key] = [dock_words(line) if isinstance(line, str) else line for line in result[key]]
        said["result"] = result
    return said
