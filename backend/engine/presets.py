"""Class presets: named class lists stored as text files in resources/presets/.

A class file holds one class per line; commas separate synonyms of the same class
("road, parking lot"), '#' starts a comment, blank lines are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from backend.engine.errors import InputError
from backend.engine.files import check_regular_file
from backend.engine.paths import resources_dir


def presets_dir() -> Path:
    return resources_dir() / "presets"


# What separates synonyms in a class line: commas and semicolons, as typed on Latin, CJK (full-width,
# ideographic) and Arabic keyboards. The plugin's qgis_farslip/classes.py keeps the same set.
SYNONYM_SEPARATORS = ",;\uff0c\uff1b\u3001\u060c"
_SEPARATOR = re.compile(f"[{SYNONYM_SEPARATORS}]")


def split_class_line(line: str) -> tuple[str, ...]:
    """The names of a class line, in order: split at the separators, every run of white space (a
    no-break space, a tab, two spaces) made one space, empty parts left out."""
    return tuple(" ".join(part.split()) for part in _SEPARATOR.split(line) if part.split())


def parse_class_text(text: str) -> list[str]:
    """Class lines of a class file's text, synonyms normalised to "a, b" as the plugin's class box does (a
    line of separators only is left out, as there)."""
    class_lines = []
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0]
        synonyms = split_class_line(line)
        if synonyms:
            class_lines.append(", ".join(synonyms))
    return class_lines


def read_class_file(path: str | Path) -> list[str]:
    """The class lines of a user's class file (the --classes-file format)."""
    path = check_regular_file(path, "class file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"The class file {path} is not UTF-8 text; save it as plain UTF-8 text.") from None
    except OSError as error:
        raise InputError(f"The class file {path} cannot be read: {error.strerror or error}.") from None
    class_lines = parse_class_text(text)
    if not class_lines:
        raise InputError(
            f"The class file {path} holds no classes; write one class per line "
            "(commas separate synonyms, '#' starts a comment)."
        )
    return class_lines


def list_presets() -> dict[str, list[str]]:
    """All presets by name (the file stem), sorted by name."""
    return {path.stem: read_class_file(path) for path in sorted(presets_dir().glob("*.txt"))}


def load_preset(name: str) -> list[str]:
    """The class lines of the preset called `name` (case-insensitive)."""
    path = presets_dir() / f"{name.strip().lower()}.txt"
    if not name.strip() or "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(sorted(p.stem for p in presets_dir().glob("*.txt")))
        raise InputError(f"There is no class preset called {name!r}. Known presets: {known}.")
    return read_class_file(path)


def collect_class_lines(class_lines: list[str] | None = None, classes_file: str | Path | None = None,
                        preset: str | None = None) -> list[str]:
    """Class lines given one by one, then those of a class file, then a preset's, in that order."""
    lines = [line for line in (class_lines or []) if line.strip()]
    if classes_file is not None:
        lines += read_class_file(classes_file)
    if preset:
        lines += load_preset(preset)
    return lines
