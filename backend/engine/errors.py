"""Errors meant for users: each message says what was wrong and what to do."""

import re

LONG_WORD = re.compile(r"\S{301,}")


def shown(text: str, limit: int = 200) -> str:
    """A value the user gave, as a sentence quotes it: its first `limit` characters, so a message never
    repeats a hostile or mistaken value (a 10,000-character CRS) back whole."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def shortened(sentence: str) -> str:
    """A sentence whose runs of more than 300 characters without a space (a pasted value, a path thousands
    of characters deep) keep their first 200 and last 60 characters, joined by "...": what an HTTP answer
    carries whatever the engine quoted."""
    return LONG_WORD.sub(lambda match: match.group()[:200] + "..." + match.group()[-60:], sentence)


class FarslipError(Exception):
    """A problem the user can fix (bad input, missing weights, ...). Never a bug."""

    exit_code = 2
    http_status = 400


class InputError(FarslipError):
    """The raster, bbox, class list or an option is unusable."""


class OutsideBboxError(InputError):
    """The --bbox does not meet the raster (a run over many rasters skips such a raster instead)."""


class ModelError(FarslipError):
    """The model name is unknown or its weights are not available."""

    exit_code = 3
    http_status = 422


class EmptyResultError(FarslipError):
    """The requested area holds no valid pixels (all nodata / masked)."""

    exit_code = 4


def nothing_valid(raster, whole_raster: bool, task: str) -> EmptyResultError:
    """No valid pixel where a run looked: in the extent it was given, or (no extent) in the whole raster,
    where choosing another extent cannot help."""
    if whole_raster:
        return EmptyResultError(f"{raster} holds only nodata or masked pixels (or NaN): there is nothing to {task}. "
                                "Check the raster's nodata value, alpha band or mask (gdalinfo shows them), or "
                                "choose another raster.")
    return EmptyResultError(f"The requested area of {raster} holds only nodata or masked pixels: there is nothing "
                            f"to {task}. Choose another extent.")


class CancelledError(FarslipError):
    """The run was cancelled; nothing was written."""

    exit_code = 130
    http_status = 409
