"""The options of a segment run, defined once.

`SegmentOptions` is the only place an option of `farslip segment` / POST /v1/segment is declared:
its name, type, default, allowed range or choices, help text and the sentence a wrong value gets.
The command line (backend/service/cli_options.py) and the HTTP request body
(backend/service/schemas.py) are generated from it, and `check_values` checks every value against
it, so an option added here is offered, documented and checked everywhere.
This module stays light (no torch, GDAL, open_clip or pydantic): the CLI builds its help from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import typing
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import InputError

# The choices of the options that take one of a few words; the modules that implement them import these.
ATTENTION_VARIANTS = ("segearth", "clearclip", "sclip", "maskclip", "vanilla")
REFINE_CHOICES = ("none", "edges", "sam")
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
PROB_DTYPES = ("float32", "float16", "uint8")
# The polygon formats (GDAL driver names) a run writes, with the extension --out has in each; the first is the default.
VECTOR_FORMATS = {"GPKG": ".gpkg", "ESRI Shapefile": ".shp", "GeoJSON": ".geojson", "FlatGeobuf": ".fgb"}
# What a user may call each (any case): the driver name, the format's name, its extension.
FORMAT_NAMES = {"gpkg": "GPKG", "geopackage": "GPKG", "esri shapefile": "ESRI Shapefile", "shapefile": "ESRI Shapefile",
                "shp": "ESRI Shapefile", "geojson": "GeoJSON", "flatgeobuf": "FlatGeobuf", "fgb": "FlatGeobuf"}
# --weights wherever a command takes a model (models.locate_model): a registry name's weights, or a model alone.
WEIGHTS_HELP = ("Checkpoint file (or fine-tuned model folder): the weights of the registry model --model names; "
                "without --model, a model of its own.")
LANGUAGES: dict[str, str] = {
    "en": "English", "pt": "Portuguese", "es": "Spanish", "fr": "French", "de": "German", "nl": "Dutch",
    "it": "Italian", "zh": "Chinese", "ko": "Korean", "ru": "Russian",
}
# Bounds that keep a request body small; a user never comes near them.
PATH_MAX_CHARS = 4096
CLASS_LINE_MAX_CHARS = 1000
CLASS_LINES_MAX = 250  # class ids are one byte in the class raster the polygons come from (255: none)
# A class file holds at most CLASS_LINES_MAX lines of CLASS_LINE_MAX_CHARS, with room for comments.
CLASS_FILE_MAX_BYTES = 1024 * 1024
SENTENCE_MAX_CHARS = 2000  # a search sentence, or its --keywords
# What a reader sees nothing of: control and format characters (zero-width space, BOM, soft hyphen), spaces.
INVISIBLE_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp")
BATCH_MAX = 1024


@dataclass(frozen=True)
class Range:
    """Allowed numbers: low/high are inclusive unless the matching *_open flag says otherwise."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, whole: bool) -> str:
        kind = "a whole number" if whole else "a number"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"{kind} from {self.low:g} to {self.high:g}"
        parts = []
        if self.low is not None:
            parts.append(f"above {self.low:g}" if self.low_open else f"at least {self.low:g}")
        if self.high is not None:
            parts.append(f"below {self.high:g}" if self.high_open else f"at most {self.high:g}")
        return f"{kind} {' and '.join(parts)}"


@dataclass(frozen=True)
class Spec:
    """How an option is offered and checked.

    help: the text of `--help` and of the API schema; flags: command-line names (default
    --the-field-name); argument: a positional CLI argument; required_in_api: the HTTP body must give
    it (its CLI default is a relative path, meaningless to a server); parse: the CLI takes this list
    as one text (e.g. "3,2,1") turned into the list by `parse`; range / choices: allowed values;
    error: the sentence for a value out of range ({value} is replaced); label: what a wrong choice is
    called in its sentence (default: the CLI name); check: a function that checks (and may normalise)
    the value instead of range/choices; max_chars / max_items / item_max_chars: bounds of a text / list
    in a request body; in_report: recorded in the run report's "options"; needs: the option (field name) and
    value without which this one does nothing, e.g. ("refine", "sam") (GIVEN: any value but None): a value
    given without it is refused (check_needs) rather than ignored without a word; needs_error: the sentence
    for that ({value} is replaced), instead of the generic one; gdal_name: a raster, kept as the text given
    (a file path, or a name GDAL resolves: /vsizip//d/a.zip/x.tif, NETCDF:"a.nc":var, HDF5:"a.h5"://var);
    internal: what the engine decides, never the user: no CLI option, no request field, not in the report
    (option_fields leaves it out); text_lines: a request body may give this list as one text, an item per line
    (blank lines dropped); crs: a CRS as the user types it, which a request body may also give as an EPSG code
    (a whole number).
    """

    help: str
    flags: tuple[str, ...] = ()
    argument: bool = False
    required_in_api: bool = False
    parse: Callable[[str | None], Any] | None = None
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    error: str | None = None
    label: str | None = None
    check: Callable[[Any], Any] | None = None
    max_chars: int | None = None
    max_items: int | None = None
    item_max_chars: int | None = None
    in_report: bool = True
    needs: tuple[str, Any] | None = None
    needs_error: str | None = None
    gdal_name: bool = False
    internal: bool = False
    text_lines: bool = False
    crs: bool = False


# `Spec.needs` value: the enabling option just has to be given (not None).
GIVEN = object()


def spec(**details: Any) -> dict[str, Spec]:
    """A dataclass field's metadata: its Spec."""
    return {"spec": Spec(**details)}


def spec_of(item: dataclasses.Field) -> Spec:
    return item.metadata["spec"]


# --------------------------------------------------------------------------- checks of single values

def parse_bands(text: str | None) -> list[int] | None:
    """--bands text ("3,2,1", "3 2 1", "3, 2, 1") -> band numbers."""
    if not text:
        return None
    try:
        return [int(part) for part in re.split(r"[\s,]+", text.strip()) if part]
    except ValueError:
        raise InputError(f"--bands takes band numbers separated by commas, e.g. 3,2,1; got {text!r}.") from None


def check_language(language: str | None) -> str | None:
    """None/'auto' (detect per class name) or one of the ten codes; anything else is refused."""
    if language is None or language.strip().lower() in ("", "auto"):
        return None
    code = language.strip().lower()
    if code not in LANGUAGES:
        raise InputError(f"Unknown language '{language}'. Use auto or one of: "
                         + ", ".join(f"{c} ({n})" for c, n in LANGUAGES.items()) + ".")
    return code


def check_value_range(value_range: tuple[float, float] | list[float]) -> None:
    low, high = (float(v) for v in value_range)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise InputError(f"--value-range takes MIN MAX with finite MIN < MAX; got {low:g} {high:g}.")


def check_bbox(bbox: tuple[float, ...] | list[float]) -> None:
    """Four finite, ordered corners (the CRS's own range is checked once the raster is open)."""
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    if not (xmin < xmax and ymin < ymax) or not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
        raise InputError(f"The bbox {list(bbox)} is not a valid box: give XMIN YMIN XMAX YMAX with "
                         "XMIN < XMAX and YMIN < YMAX.")


MIN_SCALE, MAX_SCALE = 0.05, 8.0  # how far the engine resamples a raster (--scale, or --gsd's factor)


def not_utf8(text: str) -> str | None:
    """Why `text` is not UTF-8 text, as the end of a sentence ("is not valid UTF-8 text (the byte 0xe9 is not
    UTF-8)"), or None when it is. Python hands on a command line's bytes that are not UTF-8 (é typed in a Latin-1
    terminal, or in a Latin-1 file name, is the byte 0xe9) as lone surrogates (U+DCE9), and a JSON "\\ud800" is
    one too; no model, file system call or GDAL takes such text (encoding it raises UnicodeEncodeError)."""
    lone = next((c for c in text if unicodedata.category(c) == "Cs"), None)
    if lone is None:
        return None
    if 0xDC80 <= ord(lone) <= 0xDCFF:  # a byte the UTF-8 decoder could not read, kept by surrogateescape
        return f"is not valid UTF-8 text (the byte 0x{ord(lone) - 0xDC00:02x} is not UTF-8)"
    return f"is not valid UTF-8 text (it holds the lone surrogate U+{ord(lone):04X}, which is no character)"


def check_typed_text(text: str, what: str, max_chars: int, where: str = "") -> None:
    """The rules of a text typed for the model to read (a class line, a name in it, a search sentence, a
    keyword), the same for all: at most `max_chars` characters; UTF-8 text (not_utf8); no control character (a
    line break, tab or NUL splits or ends the text on its way into a file); and, unless it is blank, something a
    reader can see (a zero-width space alone would be a class no one sees). `what` opens the sentence ("The class
    line"), `where` follows the text (" (line 3 of the class file /d/c.txt)")."""
    shown = repr(text[:60]) + ("..." if len(text) > 60 else "") + where
    if len(text) > max_chars:
        raise InputError(f"{what} {shown} is {len(text)} characters long; give at most {max_chars} characters.")
    why = not_utf8(text)
    if why is not None:
        raise InputError(f"{what} {shown} {why}: the terminal (or the program that sent it) does not write UTF-8; "
                         "set it to UTF-8 and type the text again.")
    control = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        named = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x00": "NUL"}
        raise InputError(f"{what} {shown} contains the control character {control!r} "
                         f"({named.get(control, f'U+{ord(control):04X}')}); type it as plain text on one line.")
    if text.strip() and all(unicodedata.category(c) in INVISIBLE_CATEGORIES for c in text):
        hidden = next(c for c in text if not c.isspace())
        raise InputError(f"{what} {shown} holds only invisible characters (U+{ord(hidden):04X} "
                         f"{unicodedata.name(hidden, 'a format character')}); type visible text, or leave it out.")


def vector_format(name: str) -> str:
    """The GDAL driver of a --format name (GPKG, GeoPackage, ESRI Shapefile, shp, GeoJSON, FlatGeobuf, fgb, any
    case, a leading dot allowed); InputError naming the choices otherwise."""
    driver = FORMAT_NAMES.get(name.strip().lstrip(".").lower()) if isinstance(name, str) else None
    if driver is None:
        raise InputError(f"Unknown --format {name!r}; use one of GPKG (GeoPackage), ESRI Shapefile (shp), GeoJSON "
                         "or FlatGeobuf (fgb).")
    return driver


def with_format_extension(out: Path, name: str | None) -> Path:
    """`out` with the extension of the --format `name` (GeoPackage when None) when it has none; `out` as it is
    otherwise, and when the name is no format (check_out_format says so)."""
    if out.suffix or out.name in ("", ".", "..") or out.is_dir():
        return out  # a folder stays what it is, and is refused as an output (not a file beside it written)
    try:
        driver = vector_format(name) if name is not None else "GPKG"
    except InputError:
        return out
    return out.with_name(out.name + VECTOR_FORMATS[driver])


def check_out_format(out: Path, name: str | None) -> None:
    """An --out whose extension is not the one of the --format given is refused: one of them is a mistake."""
    if name is None:
        return
    driver = vector_format(name)
    wanted = VECTOR_FORMATS[driver]
    if not out.suffix and out.is_dir():  # a folder: the polygon writer's sentence says so (export.driver_for)
        return
    if out.suffix.lower() != wanted:
        raise InputError(f"--out {out} ends in {out.suffix!r}, but --format {name} writes {driver} ({wanted}): end "
                         f"--out in {wanted}, or leave its extension out (it is added), or leave --format out.")


def check_scale_or_gsd(scale: float | None, gsd_m: float | None) -> None:
    """--scale and --gsd both set the processing resolution: one of them, each in its range."""
    if scale is not None and gsd_m is not None:
        raise InputError("Give either --scale or --gsd, not both.")
    check_option("scale", scale)
    check_option("gsd_m", gsd_m)


# --------------------------------------------------------------------------- the options

@dataclass(kw_only=True)
class SegmentOptions:
    """Everything `farslip segment` and POST /v1/segment accept (the device and --quiet aside: they
    belong to the process, `farslip segment --device` or `farslip serve --device`).

    Field order is the order of `farslip segment --help`; the fields from `bbox` to
    `quality_calibration` are the run report's "options", in this order. The internal fields at the end
    (Spec.internal) are what the engine decided from the model (with_model_defaults), never options.
    """

    # Text, not a Path: a GDAL name reaches GDAL as typed (files.is_gdal_name).
    raster: str = field(metadata=spec(
        argument=True, help="GeoTIFF (or any GDAL raster) to segment.", max_chars=PATH_MAX_CHARS, gdal_name=True))
    class_lines: list[str] = field(default_factory=list, metadata=spec(
        flags=("--classes", "-c"), help="One class per option; commas or semicolons separate synonyms.",
        max_items=CLASS_LINES_MAX, item_max_chars=CLASS_LINE_MAX_CHARS, text_lines=True))
    classes_file: Path | None = field(default=None, metadata=spec(
        help="Text file, one class per line.", max_chars=PATH_MAX_CHARS))
    preset: str | None = field(default=None, metadata=spec(
        help="A named class list (see `farslip presets`).", max_chars=100))
    # No extension: --format's is added (result.gpkg without --format, result.shp with --format shp).
    out: Path = field(default=Path("result"), metadata=spec(
        flags=("--out", "-o"), required_in_api=True,
        help="Polygons: .gpkg (default), .shp, .geojson or .fgb (.parquet with --workers); without an extension, "
             "that of --format (.gpkg without it).",
        max_chars=PATH_MAX_CHARS))
    format: str | None = field(default=None, metadata=spec(
        help="Format of --out: GPKG (GeoPackage), ESRI Shapefile (shp), GeoJSON or FlatGeobuf (fgb), any case "
             "(default: --out's extension). An --out without an extension gets the format's; one with another "
             "extension is refused.",
        max_chars=100, check=vector_format))
    class_raster: Path | None = field(default=None, metadata=spec(
        help="Also write a uint8 class GeoTIFF.", max_chars=PATH_MAX_CHARS))
    prob_raster: Path | None = field(default=None, metadata=spec(
        help="Also write a GeoTIFF of the class probabilities, a band per class.", max_chars=PATH_MAX_CHARS))
    prob_dtype: str = field(default="float32", metadata=spec(
        help="Values of --prob-raster: float32 (0 to 1, NaN where nodata), float16 (the same as 16-bit floats, "
             "about 3 significant digits; half the size) or uint8 (0 to 254 for 0 to 1, the scale 1/254 in the "
             "file for GDAL and QGIS, 255 where nodata; a quarter of the size).",
        choices=PROB_DTYPES, label="--prob-dtype", needs=("prob_raster", GIVEN),
        needs_error="--prob-dtype {value} says how the probability raster stores its values, and no --prob-raster "
                    "was given; add --prob-raster FILE.tif, or leave --prob-dtype out."))
    overwrite: bool = field(default=False, metadata=spec(help="Replace existing output files."))
    model: str | None = field(default=None, metadata=spec(
        help="Registry name, checkpoint file or fine-tuned model folder.", max_chars=PATH_MAX_CHARS))
    weights: Path | None = field(default=None, metadata=spec(
        help=WEIGHTS_HELP, max_chars=PATH_MAX_CHARS))
    # From here to quality_calibration: the processing options, in the order the run report lists them.
    bbox: tuple[float, float, float, float] | None = field(default=None, metadata=spec(
        help="XMIN YMIN XMAX YMAX of the area to segment (default: whole raster).", check=check_bbox))
    bbox_crs: str | None = field(default=None, metadata=spec(
        help="CRS of --bbox, e.g. EPSG:4326, 4326, CRS84 or a WKT string (default: raster's).", max_chars=10000,
        crs=True, needs=("bbox", GIVEN),
        needs_error="--bbox-crs {value} says which CRS the --bbox is in, and no --bbox was given; add --bbox XMIN "
                    "YMIN XMAX YMAX, or leave --bbox-crs out."))
    bands: list[int] | None = field(default=None, metadata=spec(
        help="Band numbers for red,green,blue, e.g. 3,2,1 (or one).", parse=parse_bands, range=Range(1, None),
        max_items=3))
    threshold: float = field(default=0.0, metadata=spec(
        help="Pixels whose best probability is below this stay unclassified.",
        range=Range(0.0, 1.0, high_open=True), error="The probability threshold must be in [0, 1); got {value}."))
    attention: str = field(default="segearth", metadata=spec(
        help="Last-block attention: segearth, clearclip, sclip, maskclip or vanilla.",
        choices=ATTENTION_VARIANTS, label="attention variant"))
    batch_size: int | None = field(default=None, metadata=spec(
        help="Crops per batch (default 8 on CPU; on a GPU from its free memory).", range=Range(1, BATCH_MAX),
        error=f"The batch size must be a whole number from 1 to {BATCH_MAX}; got {{value}}."))
    scale: float | None = field(default=None, metadata=spec(
        help="Resample by this factor before segmenting.", range=Range(MIN_SCALE, MAX_SCALE),
        error=f"--scale must be between {MIN_SCALE:g} and {MAX_SCALE:g}; got {{value}}."))
    gsd_m: float | None = field(default=None, metadata=spec(
        flags=("--gsd",), help="Resample to square pixels of this ground size in metres (across and down).",
        range=Range(0.0, None, low_open=True), error="--gsd must be a positive number of metres; got {value}."))
    min_area: float = field(default=0.0, metadata=spec(
        help="Drop polygons smaller than this many m².", range=Range(0.0, None),
        error="--min-area must be a finite number, 0 or more; got {value}."))
    simplify: float = field(default=0.0, metadata=spec(
        help="Simplify polygons with this tolerance in CRS units.", range=Range(0.0, None),
        error="--simplify must be a finite number, 0 or more; got {value}."))
    value_range: tuple[float, float] | None = field(default=None, metadata=spec(
        help="MIN MAX pixel values mapped to 0..255 (default: 2-98 % stretch for non-8-bit data).",
        check=check_value_range))
    refine: str = field(default="none", metadata=spec(
        help="Refine outlines: none, edges (with the image; no weights) or sam (Segment Anything prompted "
             "by the classes).", choices=REFINE_CHOICES, label="--refine"))
    sam_model: str | None = field(default=None, metadata=spec(
        help="SAM model for --refine sam: registry name (default sam-vit-b), .safetensors file or model folder.",
        max_chars=PATH_MAX_CHARS, needs=("refine", "sam")))
    runtime: str = field(default="auto", metadata=spec(
        help="Image encoder runtime: auto, torch, openvino or onnxruntime (auto: the fastest installed here).",
        choices=RUNTIMES, label="runtime"))
    language: str = field(default="auto", metadata=spec(
        help="Language of the class names, for the prompt templates of a multilingual model: auto (detected "
             "per name), " + ", ".join(LANGUAGES) + ".", choices=("auto", *LANGUAGES), check=check_language))
    quality_calibration: Path | None = field(default=None, metadata=spec(
        help="Quality calibration from `farslip evaluate --calibrate-quality` (default: the fine-tuned model's "
             "own, else the built-in one).", max_chars=PATH_MAX_CHARS))
    # How the run is computed, not what it computes: not in the report ("quality" there counts the
    # region checks run, 0 with --no-region-checks).
    region_checks: bool = field(default=True, metadata=spec(
        help="Let the quality estimate look again at the largest polygons with the model (about one crop per "
             "8 of the dense pass); --no-region-checks is faster and leaves region_agr empty.", in_report=False))
    half: bool = field(default=False, metadata=spec(
        flags=("--half",), help="fp16 weights and inputs on a CUDA GPU (as the RS-OVSS evaluation runs); the "
                                "default is fp16 autocast on CUDA and fp32 on CPU.", in_report=False))
    cache_features: bool = field(default=False, metadata=spec(
        help="Keep image features on disk (STATE_DIR/features, at most --cache-mb) so a re-run with other "
             "classes skips the encoder.", in_report=False))
    cache_mb: int = field(default=4096, metadata=spec(
        help="Disk budget of --cache-features in MiB; oldest features go first.", range=Range(1, None),
        error="--cache-mb must be at least 1; got {value}.", in_report=False, needs=("cache_features", True)))
    # Internal: not an option (option_fields leaves it out).
    square_gsd: bool = field(default=True, metadata=spec(
        help="How gsd_m resamples (raster.processing_scale): to square ground pixels of that size (a --gsd the "
             "user gave), or False: pixels gsd_m wide in the raster's own pixel shape (the resolution of a "
             "fine-tuned model trained on its raster's own grid, set by finetuned.with_trained_resolution).",
        in_report=False, internal=True))

    def __post_init__(self) -> None:
        self.raster = os.fspath(self.raster)  # a caller's Path (a plain file) as the text it is
        # An --out without an extension is written in --format (GeoPackage by default), with its extension.
        self.out = with_format_extension(Path(self.out), self.format)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SegmentOptions:
        """Options from plain values (a parsed command line, a request body): texts become Paths,
        coordinate lists tuples, an absent list an empty one, an absent value the default.
        Unknown names are an error (a bug in the caller, not the user's)."""
        hints = typing.get_type_hints(cls)
        unknown = set(values) - {item.name for item in option_fields()}
        if unknown:
            raise TypeError(f"unknown segment options: {', '.join(sorted(unknown))}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            kind = str(hints[name])
            if value is None and "None" not in kind and not kind.startswith("list["):
                continue  # not given: the default
            if name in OUTPUT_FILES and value is not None:  # before Path() drops a trailing separator
                from .files import refuse_folder_name

                refuse_folder_name(value, cli_name(option_field(name)))
            converted[name] = _typed(kind, value)
        return cls(**converted)

    def processing(self) -> dict[str, Any]:
        """The options that shape the result, as the run report records them (paths absolute, as the report's
        outputs: a report read elsewhere still says which file was used)."""
        names = [item.name for item in option_fields() if spec_of(item).in_report]
        def recorded(name: str, value: Any) -> Any:
            named_file = name == "sam_model" and isinstance(value, str) and os.path.exists(value)  # not a registry name
            return Path(os.path.abspath(value)) if isinstance(value, Path) or named_file else value

        return {name: recorded(name, getattr(self, name)) for name in names[names.index("bbox"):]}


# The files a run writes: a name ending in a separator names a folder (Path("x.gpkg/") is x.gpkg, written as a file).
OUTPUT_FILES = ("out", "class_raster", "prob_raster")


def _typed(kind: str, value: Any) -> Any:
    """A plain value (text, list) as the field of type `kind` holds it."""
    if value is None:
        return None if "None" in kind else []  # an absent list is an empty one
    if "Path" in kind:
        return Path(value)
    if kind.startswith("tuple["):
        return tuple(float(v) for v in value)
    if kind.startswith("list["):
        return list(value)
    return value


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The options a user gives (the CLI's, the request body's), in their order: every field but the internal ones."""
    return tuple(item for item in dataclasses.fields(SegmentOptions) if not spec_of(item).internal)


def option_field(name: str) -> dataclasses.Field:
    return next(item for item in option_fields() if item.name == name)


def cli_name(item: dataclasses.Field) -> str:
    """The option's name on the command line, as the user types it."""
    declared = spec_of(item)
    if declared.argument:
        return item.name.upper()
    long_flags = [flag for flag in declared.flags if flag.startswith("--")]
    return long_flags[0] if long_flags else "--" + item.name.replace("_", "-")


def path_fields() -> list[str]:
    """The options that name files (a request gives them as absolute paths)."""
    hints = typing.get_type_hints(SegmentOptions)
    return [item.name for item in option_fields() if "Path" in str(hints[item.name]) or spec_of(item).gdal_name]


# --------------------------------------------------------------------------- value checks

def check_option(name: str, value: Any) -> Any:
    """One option's value against its declared check, choices or range (None, "not given", passes).

    Returns the value (normalised by the option's check function where it has one)."""
    item = option_field(name)
    declared = spec_of(item)
    if value is None:
        return None
    if declared.check is not None:
        return declared.check(value)
    if declared.choices is not None and value not in declared.choices:
        raise InputError(f"Unknown {declared.label or cli_name(item)} {value!r}; use one of "
                         f"{', '.join(declared.choices)}.")
    if declared.range is not None:
        whole = "int" in str(item.type)
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, bool) or number not in declared.range or (whole and number != int(number)):
                sentence = declared.error or (f"{cli_name(item)} must be "
                                              f"{declared.range.describe(whole)}; got {{value}}.")
                raise InputError(sentence.format(value=number))
    return value


def finite_number(value: Any) -> bool:
    """Whether `value` from JSON is a finite number (true and false are not numbers, though Python counts them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_batch_size(value: Any) -> int:
    """--batch-size of index, search and retrieval: segment's option and its sentence (a whole number only)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(str(spec_of(option_field("batch_size")).error).format(value=value))
    return int(check_option("batch_size", value))


def check_values(options: SegmentOptions) -> None:
    """Every option's value against its declaration, and the values that go together.

    Reads no file. Raises InputError with one sentence naming the option as the CLI spells it.
    """
    check_scale_or_gsd(options.scale, options.gsd_m)
    for item in option_fields():
        if item.name not in ("scale", "gsd_m"):
            check_option(item.name, getattr(options, item.name))
    check_out_format(Path(options.out), options.format)
    check_needs(options)


def _spelt(name: str, value: Any) -> str:
    """Option `name` with `value` as the command line gives it: --refine sam, --cache-features, --bbox."""
    flag = cli_name(option_field(name))
    if value is GIVEN or value is True:
        return flag
    if value is False or value is None:
        return f"no {flag}"
    return f"{flag} {value}"


def check_needs(options: SegmentOptions) -> None:
    """An option that only works with another (Spec.needs) is refused when given without it: a user who
    names a SAM model expects SAM refinement, not a run that ignores the model without a word.

    "Given" is a value other than the default (a switch's default, e.g. --cache-mb 4096, is the same run).
    """
    for item in option_fields():
        declared = spec_of(item)
        value = getattr(options, item.name)
        if declared.needs is None or value is None or value == item.default:
            continue
        name, wanted = declared.needs
        present = getattr(options, name)
        if (present is not None) if wanted is GIVEN else present == wanted:
            continue
        if declared.needs_error is not None:
            raise InputError(declared.needs_error.format(value=value))
        raise unused_options([cli_name(item)], _spelt(name, wanted),
                             "" if present is None or present is False else _spelt(name, present))


def unused_options(flags: Sequence[str], enabling: str, instead: str = "") -> InputError:
    """The sentence for options given without the one that makes them do anything (`enabling`, e.g. --refine
    sam; `instead`: what the run has in its place, e.g. --refine edges). Every command refuses such options
    with it: ignored, they would leave the user believing they had their effect."""
    names = " and ".join(flags)
    has = f" (this run has {instead})" if instead else ""
    return InputError(f"{names} {'applies' if len(flags) == 1 else 'apply'} only with {enabling}{has}; add "
                      f"{enabling}, or leave {names} out.")
