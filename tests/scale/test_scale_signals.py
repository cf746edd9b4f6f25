"""SIGTERM during a scaled run exits 143 (128 + the signal), even where Ray's ray.wait turns the interruption
raised in its loop into a plain KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import time

import pytest
import typer

from backend.service.cli_common import interrupted, signals_as_interrupt


def ray_wait_like() -> None:
    """What ray.wait does with an exception raised by a signal handler during its wait."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
    except KeyboardInterrupt:
        raise KeyboardInterrupt from None


def test_sigterm_lost_in_a_plain_keyboard_interrupt_still_exits_143():
    with pytest.raises(typer.Exit) as exit_info:
        try:
            with signals_as_interrupt():
                ray_wait_like()
        except KeyboardInterrupt as error:
            assert not hasattr(error, "signum")
            interrupted(error)
    assert exit_info.value.exit_code == 128 + signal.SIGTERM


def test_ctrl_c_after_a_run_stopped_by_sigterm_exits_130():
    with pytest.raises(KeyboardInterrupt), signals_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(typer.Exit) as exit_info:
        with signals_as_interrupt():
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as error:
                interrupted(error)
    assert exit_info.value.exit_code == 130
