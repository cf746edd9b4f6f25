"""The `farslip segment` command-line options, generated from the options model.

Each field of backend.engine.options.SegmentOptions becomes one typer option (or the RASTER
argument) with the model's flags, help text and default; `options_from_cli` turns the parsed
command line back into SegmentOptions. Nothing about an option is written here.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from typing import Any, Callable, Optional

import typer

from backend.engine.options import OUTPUT_FILES, SegmentOptions, option_fields, spec_of


def _optional_inner(annotation: Any) -> Any:
    """T for `T | None`, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def _cli_parameter(item: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    declared = spec_of(item)
    if declared.argument:
        return inspect.Parameter(item.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                 default=typer.Argument(..., help=declared.help))
    inner = _optional_inner(annotation)
    if item.name in OUTPUT_FILES:  # the text as typed: typer's Path would drop a trailing separator
        annotation, default = Optional[str], (os.fspath(item.default) if item.default is not None else None)
        return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, *declared.flags, help=declared.help))
    if declared.parse is not None:  # a list typed as one text, e.g. --bands 3,2,1
        annotation, default = Optional[str], None
    elif typing.get_origin(annotation) is list:  # a repeatable option; none given -> []
        annotation, default = Optional[annotation], None
    elif inner is not None:
        annotation, default = Optional[inner], None
    else:
        default = item.default
    return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *declared.flags, help=declared.help))


def segment_parameters() -> list[inspect.Parameter]:
    """One typer parameter per segment option, in the model's order."""
    hints = typing.get_type_hints(SegmentOptions)
    return [_cli_parameter(item, hints[item.name]) for item in option_fields()]


def options_from_cli(values: dict[str, Any]) -> SegmentOptions:
    """The parsed `farslip segment` command line -> SegmentOptions (the one CLI conversion)."""
    values = dict(values)
    for item in option_fields():
        parse = spec_of(item).parse
        if parse is not None:
            values[item.name] = parse(values.get(item.name))
    return SegmentOptions.from_values(values)


def with_segment_options(own: list[inspect.Parameter]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: give `command(**values)` the generated signature, followed by the command's `own` options."""
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        command.__signature__ = inspect.Signature(segment_parameters() + own, return_annotation=None)  # type: ignore[attr-defined]
        return command

    return decorate


def own_option(name: str, annotation: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
    """A command's option that is not a segment option (e.g. --device, --quiet)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *flags, help=help))
