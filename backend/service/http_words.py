"""The engine's sentences as an HTTP client reads them: JSON fields instead of command-line flags.

The engine names an option as `farslip` spells it ("add --refine sam", "--gsd 0.5 would resample"), which
is right on the command line and wrong in an answer to a script that sent `{"refine": "sam"}`. At the HTTP
boundary (4xx answers, a job's error, message and warnings, the request schemas' descriptions) each flag of
the request's kind becomes its field, with the value the CLI sentence gives written as JSON:
`"refine": "sam"`, `"gsd_m": 0.5`, `"overwrite": true`, `"bbox": [XMIN, YMIN, XMAX, YMAX]`. A command the
sentence suggests running (`farslip evaluate --calibrate-quality`) stays as it is, and the few remedies that
only exist on the command line are said as an HTTP client can follow them.
"""

from __future__ import annotations

import functools
import json
import re
import typing
from dataclasses import dataclass

from backend.engine.options import SegmentOptions, cli_name, option_fields, spec_of


@dataclass(frozen=True)
class RequestField:
    name: str
    kind: str  # "bool", "value", "list"
    items: int = 1  # values a "list" flag takes on the command line (bbox 4, value_range 2)
    choices: tuple[str, ...] = ()
    negated: bool = False  # the flag says the opposite of the field (--no-region-checks: region_checks false)


# Sentences whose remedy has no HTTP form: (CLI wording, what an HTTP client can do instead).
REMEDIES = (
    (re.compile(r"add --workers 1 to run this one on a local Ray, or use"),
     "farslip segment --workers 1 writes one; here use"),
    (re.compile(r"\(\.parquet with --workers\)"), "(.parquet: farslip segment --workers)"),
    (re.compile(r"or use --device cuda"), "or start the backend with farslip serve --device cuda"),
    (re.compile(r' \(an unset shell variable in -c "\$NAME"\?\)'), ""),
    (re.compile(r'e\.g\. --classes "([^"]*)" --classes "([^"]*)"'), r'e.g. "class_lines": ["\1", "\2"]'),
)
# Values of options that take a word (beside the segment options' declared choices).
WORDS = ("auto", "cpu", "cuda", "mps", "all", "validation", "lora", "last-blocks", "full", "frozen", "ema", "active")

# A command the sentence tells the user to run (farslip evaluate --calibrate-quality): kept as it is.
COMMAND = re.compile(r"farslip [a-z][a-z-]*(?:\s+--?[a-z][\w-]*(?:\s+(?!-)[^\s;,)]+)?)*")
FLAG = re.compile(r"(?<![\w\-/.])(no )?(--[a-z][a-z0-9-]*|-c)(?![\w-])")
NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?"
PLACEHOLDER = r"[A-Z][A-Z0-9_]*(?:\.[a-z]+)?"  # XMIN, PATH, FILE.tif
END = r"(?![\w:/]|\.\w)"  # a value ends at a space, a comma or the sentence's full stop
SINGLE = re.compile(rf" ({NUMBER}{END}|{PLACEHOLDER}{END}|[A-Za-z]+:[\w.]*\w|/[^\s,;)]*[^\s,;).]|'[^']*')")
LIST_ITEM = re.compile(rf" ({NUMBER}|{PLACEHOLDER}){END}")
BANDS = re.compile(rf" (\d+(?:,\d+)+){END}")


def _segment_fields() -> dict[str, RequestField]:
    hints = typing.get_type_hints(SegmentOptions)
    fields: dict[str, RequestField] = {}
    for item in option_fields():
        declared = spec_of(item)
        if declared.argument:
            continue
        hint = str(hints[item.name])
        if hints[item.name] is bool:
            field = RequestField(item.name, "bool")
        elif "tuple[" in hint:  # bbox, value_range: that many numbers
            field = RequestField(item.name, "list", items=hint.count("float"))
        elif item.name == "bands":  # --bands 3,2,1 or three numbers
            field = RequestField(item.name, "list", items=3)
        else:
            field = RequestField(item.name, "value", choices=declared.choices or ())
        for flag in {cli_name(item), *declared.flags}:
            fields[flag] = field
        if field.kind == "bool":
            fields["--no-" + item.name.replace("_", "-")] = RequestField(item.name, "bool", negated=True)
    return fields


def _request_fields(model, renamed: dict[str, str]) -> dict[str, RequestField]:
    """The flags of a request model's fields (--the-field-name), and `renamed` flags (flag -> field)."""
    fields: dict[str, RequestField] = {}
    for name, info in model.model_fields.items():
        annotation = str(info.annotation)
        kind = "bool" if info.annotation is bool else "list" if annotation.startswith("list[float]") else "value"
        items = int(info.metadata[0].min_length) if kind == "list" and info.metadata and hasattr(
            info.metadata[0], "min_length") else 2
        fields["--" + name.replace("_", "-")] = RequestField(name, kind, items=items)
        if kind == "bool":
            fields["--no-" + name.replace("_", "-")] = RequestField(name, "bool", negated=True)
    for flag, name in renamed.items():
        fields[flag] = fields.get("--" + name.replace("_", "-"), RequestField(name, "value"))
    if "bands" in model.model_fields:
        fields["--bands"] = RequestField("bands", "list", items=3)
    return fields


@functools.cache
def fields_of(kind: str) -> dict[str, RequestField]:
    """Command-line flag -> request field, for requests of `kind` (a job kind or the endpoint's)."""
    if kind not in ("search", "index", "evaluate", "train"):
        return _segment_fields()  # segment, and download (whose sentences are segment's: --weights, --sam-model)
    # Here, not at the top: the segment request's schema is built with for_http.
    from backend.service.schemas import EvaluateRequest, SearchRequest, TrainRequest

    if kind in ("search", "index"):
        return {**_request_fields(SearchRequest, {}),
                "--no-keywords": RequestField("use_keywords", "bool", negated=True)}
    if kind == "train":
        try:
            from training.finetune import TrainOptions
            trainer = list(TrainOptions.__dataclass_fields__)
        except ImportError:  # a backend without the training package answers no train job
            trainer = []
        fields = {"--" + name.replace("_", "-"): RequestField(name, "value") for name in trainer}
        fields.update(_request_fields(TrainRequest, {"--model": "base_model", "--class-name": "class_names",
                                                     "--gsd": "gsd_m"}))
        return fields
    return _request_fields(EvaluateRequest, {"--json": "out_json", "--base-model": "model"})


def _value(text: str) -> str:
    """One command-line value as JSON: a number or a placeholder as it is, any other text quoted."""
    if re.fullmatch(NUMBER, text) or re.fullmatch(PLACEHOLDER, text):
        return text
    if text.startswith("'") and text.endswith("'"):  # a value the sentence quoted (repr): shown as it was
        return f'"{text[1:-1]}"' if '"' not in text else text
    return json.dumps(text, ensure_ascii=False)


def _as_field(field: RequestField, negated_by_no: bool, rest: str) -> tuple[str, int]:
    """The JSON for one flag and the values that follow it in `rest`; returns (text, characters of rest used)."""
    if field.kind == "bool":
        on = not (field.negated ^ negated_by_no)
        return f'"{field.name}": {"true" if on else "false"}', 0
    if negated_by_no:
        return f'no "{field.name}"', 0
    if field.kind == "list":
        bands = BANDS.match(rest)
        if bands and field.name == "bands":
            return f'"{field.name}": [{", ".join(bands.group(1).split(","))}]', bands.end()
        values: list[str] = []
        used = 0
        while len(values) < field.items and (item := LIST_ITEM.match(rest, used)):
            values.append(item.group(1))
            used = item.end()
        if len(values) == field.items:
            return f'"{field.name}": [{", ".join(values)}]', used
        return f'"{field.name}"', 0
    choice = re.match(r" ([a-z0-9-]+)(?![\w-])", rest)
    if choice and choice.group(1) in (*field.choices, *WORDS):
        return f'"{field.name}": {_value(choice.group(1))}', choice.end()
    single = SINGLE.match(rest)
    if single:
        return f'"{field.name}": {_value(single.group(1))}', single.end()
    return f'"{field.name}"', 0


def _translate(text: str, fields: dict[str, RequestField]) -> str:
    out, position = [], 0
    while (found := FLAG.search(text, position)) is not None:
        field = fields.get(found.group(2))
        out.append(text[position:found.start()])
        if field is None:  # a flag with no field in this request (--workers, --quiet): said as it is
            out.append(found.group(0))
            position = found.end()
            continue
        words, used = _as_field(field, bool(found.group(1)), text[found.end():])
        out.append(words)
        position = found.end() + used
        if text.startswith(f" ({field.name})", position):  # a sentence that named the field beside the flag
            position += len(field.name) + 3
    out.append(text[position:])
    return "".join(out)


def for_http(text: str, kind: str | None) -> str:
    """`text` (an engine sentence) with the flags of a `kind` request said as its JSON fields."""
    if not text or "-" not in text:
        return text
    for pattern, replacement in REMEDIES:
        text = pattern.sub(replacement, text)
    fields = fields_of(kind or "segment")
    pieces, position = [], 0
    for command in COMMAND.finditer(text):
        pieces.append(_translate(text[position:command.start()], fields))
        pieces.append(command.group(0))
        position = command.end()
    pieces.append(_translate(text[position:], fields))
    return "".join(pieces)


def job_for_http(job: dict) -> dict:
    """A job as GET /v1/jobs answers it: its error, message, warnings and notices in the request's terms."""
    kind = job.get("kind")
    said = dict(job)
    for key in ("error", "message"):
        if isinstance(said.get(key), str):
            said[key] = for_http(said[key], kind)
    result = said.get("result")
    if isinstance(result, dict):
        result = dict(result)
        for key in ("warnings", "notices"):
            if isinstance(result.get(key), list):
                result[key] = [for_http(line, kind) if isinstance(line, str) else line for line in result[key]]
        said["result"] = result
    return said


def kind_of_path(path: str) -> str | None:
    """The request kind of an endpoint (/v1/segment -> segment), for the sentences of its 4xx answers."""
    for kind in ("segment", "search", "index", "evaluate", "train"):
        if path.rstrip("/").endswith("/v1/" + kind):
            return kind
    return "download" if path.rstrip("/").endswith("/v1/models/download") else None
