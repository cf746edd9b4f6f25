"""Helpers shared by the typer commands: the one-line error exit, progress lines, band lists."""

from __future__ import annotations

import sys
import time

import typer

from backend.engine.errors import FarslipError, InputError


def fail(error: FarslipError) -> None:
    typer.echo(f"Error: {error}", err=True)
    raise typer.Exit(error.exit_code)


class ProgressReporter:
    """A progress bar with ETA on a terminal; occasional plain lines otherwise; nothing when quiet."""

    def __init__(self, quiet: bool, label: str):
        self.quiet = quiet
        self.label = label
        self.bar = None
        self.task = None
        self.started = time.perf_counter()
        self.last_line = 0.0

    def __enter__(self):
        if not self.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("tiles"), TimeRemainingColumn(), console=Console(stderr=True))
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
            eta = elapsed / done * (total - done) if done else float("nan")
            typer.echo(f"{self.label}: {done}/{total} tiles, ETA {eta:.0f} s", err=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def parse_bands(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(f"--bands takes band numbers separated by commas, e.g. 3,2,1; got {text!r}.") from None
