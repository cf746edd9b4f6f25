"""A process that kills itself (SIGKILL) at a chosen step of a commit: crash-safety tests count the renames and
links a commit makes and kill the committing process right after the k-th, for every k."""

from __future__ import annotations

import os
import signal


def die_after(count: int, *operations: str) -> list[int]:
    """Wrap each of os.<operations> (replace, rename, link) so that this process is killed right after the
    `count`-th call among them; returns the counter ([calls so far]) for the caller to report."""
    calls = [0]

    def counted(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call

    for name in operations:
        setattr(os, name, counted(getattr(os, name)))
    return calls
