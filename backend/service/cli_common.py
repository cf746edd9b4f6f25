"""Helpers shared by the typer commands: the one-line error exit, progress lines, band lists."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
from collections.abc import Callable, Iterator

import typer

from backend.engine.errors import FarslipError
from backend.engine.options import parse_bands  # noqa: F401 - --bands of every command reads as segment's


def fail(error: FarslipError) -> None:
    typer.echo(f"Error: {error}", err=True)
    raise typer.Exit(error.exit_code)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, as Ctrl+C is: every `finally` and cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The last SIGTERM/SIGHUP received: some libraries (Ray's ray.wait) catch the Interrupted raised in their
# loop and raise a plain KeyboardInterrupt, losing the signal; the exit code is then taken from here.
received_signal: int | None = None


def _raise_interrupted(signum, _frame) -> None:
    global received_signal
    received_signal = signum
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM (`kill`, `timeout`) and SIGHUP (a closed terminal) interrupt like Ctrl+C."""
    global received_signal
    received_signal = None
    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {}
    for sig in wanted:
        with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner): leave them
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interruptible(command: Callable) -> Callable:
    """`command`, interrupted by SIGTERM/SIGHUP as by Ctrl+C from its first line on (its imports take
    seconds), with one line for an interruption its own handling does not see: typer turns Ctrl+C into a
    silent exit 130, and SIGTERM killed the process. Neutral words: outputs may be in place by then."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with signals_as_interrupt():
                return command(*args, **kwargs)
        except KeyboardInterrupt as error:
            interrupted(error, "Interrupted.")

    return run


def interrupted(error: KeyboardInterrupt, message: str = "Interrupted; nothing was written.") -> None:
    """Say so in one line and exit 130 for Ctrl+C, 128 + the signal's number for SIGTERM/SIGHUP. An interrupt
    that came while the outputs were put in place is delivered once they all are (atomic.commit_outputs):
    then they are complete, and the line says so instead."""
    written = getattr(error, "outputs_written", None)
    if written:
        message = f"Interrupted once the outputs were in place; they are complete: {', '.join(written)}."
    typer.echo(message, err=True)
    raise typer.Exit(128 + getattr(error, "signum", received_signal or signal.SIGINT)) from None


class ProgressReporter:
    """A progress bar with ETA on a terminal; occasional plain lines otherwise; nothing when quiet."""

    def __init__(self, quiet: bool, label: str, unit: str = "tiles"):
        self.quiet = quiet
        self.label = label
        self.unit = unit
        self.bar = None
        self.task = None
        self.started = time.perf_counter()
        self.last_line = 0.0

    def __enter__(self):
        if not self.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn(self.unit), TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.__enter__()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(self.label, total=total)
            self.bar.update(self.task, completed=done, total=total)
            return
        now = time.perf_counter()
        if done == total or now - self.last_line > 5:
            self.last_line = now
            elapsed = now - self.started
            eta = f", ETA {elapsed / done * (total - done):.0f} s" if done else ""
            typer.echo(f"{self.label}: {done}/{total} {self.unit}{eta}", err=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def check_raster_opens(raster: str) -> None:
    """The raster opens and is georeferenced (raster.open_dataset): said before the model's imports and loading,
    which take seconds."""
    from backend.engine.raster import open_dataset

    open_dataset(raster).close()


def check_model_given(model, weights) -> None:
    """--model and --weights name a model that is there (model_location.check_model, load_model's sentences):
    said before the model's imports and loading, which take seconds."""
    from backend.engine.model_location import check_model

    check_model(model, str(weights) if weights else None)
