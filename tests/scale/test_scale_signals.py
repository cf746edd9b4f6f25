"""SIGTERM during a scaled run exits 143 (128 + the signal), even where Ray's ray.wait turns the interruption
raised in its loop into a plain KeyboardInterrupt."""

from __future__ import annotations

import signal

import pytest
import typer

from backend.service.cli_common import interrupted, signals_as_interrupt


def sigterm() -> None:
    """What the process does on SIGTERM: it calls the handler installed for it (called here directly: a real
    signal to the test process would also reach the C handlers a Ray started by other tests leaves behind)."""
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)


def ray_wait_like() -> None:
    """What ray.wait does with an exception raised by a signal handler during its wait."""
    try:
        sigterm()
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
        sigterm()
    with pytest.raises(typer.Exit) as exit_info:
        with signals_as_interrupt():
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as error:
                interrupted(error)
    assert exit_info.value.exit_code == 130
