"""Sentences for the dock's banner and status line, and the actions offered with them.

The banner is rich text; its links are actions the dock carries out
(restart the backend, open its log, open the settings, install the backend).
"""

from __future__ import annotations

import html

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
