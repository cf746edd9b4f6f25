"""Errors meant for users: each message says what was wrong and what to do."""


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


class CancelledError(FarslipError):
    """The run was cancelled; nothing was written."""

    exit_code = 130
    http_status = 409
