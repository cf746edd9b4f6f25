"""Class lines typed by the user and the presets bundled with the plugin."""

from __future__ import annotations

import os
import re

from .i18n import tr

# The backend's limits (backend/engine/options.py CLASS_LINES_MAX, CLASS_LINE_MAX_CHARS): class ids are one byte
# in the class raster; a class line is a few names, not a text.
MAX_CLASSES = 250
MAX_CLASS_LINE_CHARS = 1000


# What separates synonyms: the backend's set (backend/engine/presets.py SYNONYM_SEPARATORS): commas and
# semicolons as Latin, CJK (full-width, ideographic) and Arabic keyboards type them.
SYNONYM_SEPARATORS = re.compile("[,;\uff0c\uff1b\u3001\u060c]")


def synonyms_of(line: str) -> list[str]:
    """The names of a class line as the backend reads them: split at the separators, white space runs
    made one space, empty parts left out."""
    return [" ".join(word.split()) for word in SYNONYM_SEPARATORS.split(line) if word.split()]


def parse_class_text(text: str) -> list[str]:
    """Class lines of the text box: one class per line, commas separate synonyms, '#' starts a comment.

    Synonyms are normalised to "a, b" exactly as the backend reads them, so that
    the same text gives the same classes (and colours) in the plugin and the CLI.
    """
    class_lines = []
    for raw_line in text.splitlines():
        synonyms = synonyms_of(raw_line.split("#", 1)[0])
        if synonyms:
            class_lines.append(", ".join(synonyms))
    return class_lines


def class_list_refusal(class_lines: list[str]) -> str | None:
    """The sentence for a class list the backend would refuse for its length or for a line's length, or None."""
    if len(class_lines) > MAX_CLASSES:
        return tr("At most {} classes per run; you typed {}.").format(MAX_CLASSES, len(class_lines))
    for number, line in enumerate(class_lines, 1):
        if len(line) > MAX_CLASS_LINE_CHARS:
            return tr("Class {} ({}...) is {} characters long; a class line holds at most {}: name the class in a "
                      "few words.").format(number, line[:40], len(line), MAX_CLASS_LINE_CHARS)
    return None


def class_name(class_line: str) -> str:
    """The name a class line is shown under: its first synonym."""
    names = synonyms_of(class_line)
    return names[0] if names else class_line.strip()


def resources_dir() -> str | None:
    """The resources folder: inside the installed package, or the checkout's resources/."""
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.path.join(here, "resources"), os.path.join(os.path.dirname(here), "resources")):
        if os.path.isdir(candidate):
            return candidate
    return None


def bundled_presets() -> dict[str, list[str]]:
    """Presets read from resources/presets/*.txt, used while no backend answers GET /v1/presets."""
    root = resources_dir()
    folder = os.path.join(root, "presets") if root else ""
    if not os.path.isdir(folder):
        return {}
    presets = {}
    for file_name in sorted(os.listdir(folder)):
        if file_name.endswith(".txt"):
            with open(os.path.join(folder, file_name), encoding="utf-8-sig") as handle:
                class_lines = parse_class_text(handle.read())
            if class_lines:
                presets[file_name[: -len(".txt")]] = class_lines
    return presets
