"""Class presets: named class lists stored as text files in resources/presets/; class lines parsed into classes.

A class file holds one class per line; commas separate synonyms of the same class
("road, parking lot"), '#' starts a comment, blank lines are ignored. Its lines follow the rules of
class lines given one by one (check_class_line), and the file is at most CLASS_FILE_MAX_BYTES.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from backend.engine.errors import InputError
from backend.engine.files import check_regular_file
from backend.engine.options import (CLASS_FILE_MAX_BYTES, CLASS_LINE_MAX_CHARS, CLASS_LINES_MAX,
                                    check_typed_text)
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


def check_class_line(line: str, where: str = "") -> None:
    """A class line and each name in it by the rules of typed text (options.check_typed_text): at most
    CLASS_LINE_MAX_CHARS characters, no control character, no name made only of invisible characters."""
    check_typed_text(line, "The class line", CLASS_LINE_MAX_CHARS, where)
    in_line = f" in the class line {line[:60]!r}{where}"
    for name in _SEPARATOR.split(line):
        check_typed_text(name.strip(), "The class name", CLASS_LINE_MAX_CHARS, in_line)


def parse_class_text(text: str, source: str = "the class list") -> list[str]:
    """Class lines of a class file's text, synonyms normalised to "a, b" as the plugin's class box does (a
    line of separators only is left out, as there). Each line is checked (check_class_line); a sentence names
    it by its number in `source`."""
    class_lines = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        where = f" (line {number} of {source})"
        if len(line) > CLASS_LINE_MAX_CHARS:  # as typed, as a request's class_lines are bounded: refused
            check_typed_text(line, "The class line", CLASS_LINE_MAX_CHARS, where)
        synonyms = split_class_line(line)
        if synonyms:
            class_lines.append(", ".join(synonyms))
            check_class_line(class_lines[-1], where)
    return class_lines


def read_class_file(path: str | Path) -> list[str]:
    """The class lines of a user's class file (the --classes-file format), checked as class lines given one by
    one are; a file larger than a class list can be is refused before it is read."""
    path = check_regular_file(path, "class file")
    try:
        with path.open("rb") as stream:
            data = stream.read(CLASS_FILE_MAX_BYTES + 1)
    except OSError as error:
        raise InputError(f"The class file {path} cannot be read: {error.strerror or error}.") from None
    if len(data) > CLASS_FILE_MAX_BYTES:
        raise InputError(f"The class file {path} is larger than {CLASS_FILE_MAX_BYTES // 2**20} MiB; a class file "
                         f"holds at most {CLASS_LINES_MAX} classes of at most {CLASS_LINE_MAX_CHARS} characters, "
                         "one per line. Check that it is the class list you meant.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"The class file {path} is not UTF-8 text; save it as plain UTF-8 text.") from None
    class_lines = parse_class_text(text, f"the class file {path}")
    if not class_lines:
        raise InputError(
            f"The class file {path} holds no classes; write one class per line "
            "(commas separate synonyms, '#' starts a comment)."
        )
    if len(class_lines) > CLASS_LINES_MAX:
        raise InputError(f"The class file {path} holds {len(class_lines)} classes; one run tells at most "
                         f"{CLASS_LINES_MAX} apart (class ids are one byte); split the list over several files.")
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
    """Class lines given one by one, then those of a class file (blank lines left out), then a preset's, in that
    order; each checked (check_class_line) before any model reads it. A blank line given on its own is refused:
    it is a mistake (an unset shell variable in -c "$NAME"), not a layout."""
    lines = list(class_lines or [])
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"Class line {number} of {len(lines)} given one by one is blank; give a class name "
                             "or leave it out (an unset shell variable in -c \"$NAME\"?).")
        check_class_line(line)
    if classes_file is not None:
        lines += read_class_file(classes_file)
    if preset:
        lines += load_preset(preset)
    return lines


@dataclass(frozen=True)
class ClassSpec:
    name: str
    queries: tuple[str, ...]


def same_name_key(name: str) -> str:
    """Names that a reader cannot tell apart compare equal: letter case, full-width letters, runs of spaces,
    and invisible format characters (a zero-width space, a soft hyphen or a byte-order mark pasted along)."""
    visible = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    return " ".join(visible.casefold().split())


def check_class_lines(lines: list[str]) -> None:
    """The class list, checked as parse_class_lines reads it (each class once, names within their limits) before
    the model's imports; an empty list passes: a fine-tuned model may bring its own classes."""
    if lines:
        parse_class_lines(lines)


def parse_class_lines(lines: list[str]) -> list[ClassSpec]:
    """Turn user class lines ("road, parking lot") into classes with synonym queries."""
    classes: list[ClassSpec] = []
    seen: dict[str, str] = {}  # every name (lower case) -> the class it belongs to
    nameless: str | None = None  # the first line of separators only
    for line in lines:
        check_class_line(line)
        queries = split_class_line(line)
        if not queries:
            if line.strip() and nameless is None:
                nameless = line.strip()
            continue
        for query in queries:
            owner = seen.get(same_name_key(query))
            if owner is not None and same_name_key(owner) == same_name_key(query) == same_name_key(queries[0]):
                raise InputError(f"The class {queries[0]!r} is given twice; give each class once "
                                 "(put synonyms on one line, separated by commas).")
            if owner is not None:
                raise InputError(f"{query!r} is a name of two classes ({owner!r} and {queries[0]!r}), so a pixel "
                                 "of it could be either; give each name in one class line only.")
        seen.update((same_name_key(query), queries[0]) for query in queries)
        classes.append(ClassSpec(name=queries[0], queries=queries))
    if not classes:
        raise InputError("The class list is empty: give at least one class name "
                         "(e.g. --classes \"building\" --classes \"road, parking lot\").")
    if nameless is not None:
        raise InputError(f"The class line {nameless[:60]!r} holds only separators and no class name; give a name "
                         "(commas separate synonyms of one class) or leave the line out.")
    if len(classes) > CLASS_LINES_MAX:
        raise InputError(f"{len(classes)} classes were given; one run tells at most {CLASS_LINES_MAX} apart (class "
                         "ids are one byte); split the list over several runs.")
    return classes
