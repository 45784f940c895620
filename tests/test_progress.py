"""graphopt.progress: notes are held while a command runs and dropped when it fails, so an
error is the one line left on stderr; -q drops them; outside a command they print at once."""
from __future__ import annotations

import pytest

from graphopt import progress


def test_outside_a_command_notes_and_status_print_at_once(capsys):
    progress.note("exported m in 1.0 s")
    progress.status("exporting m to ONNX ...")
    assert capsys.readouterr().err == "exported m in 1.0 s\nexporting m to ONNX ...\n"


def test_held_notes_print_on_success_in_order_and_flush_prints_early(capsys):
    with progress.held():
        progress.status("running dce")  # not a terminal: no status line at all
        progress.note("a")
        assert capsys.readouterr().err == ""
        progress.flush()
        assert capsys.readouterr().err == "a\n"
        progress.note("b")
        progress.note("c")
    assert capsys.readouterr().err == "b\nc\n"


def test_held_notes_are_dropped_when_the_command_fails(capsys):
    with pytest.raises(ValueError):
        with progress.held():
            progress.note("exported m in 1.0 s")
            raise ValueError("token ids out of range")
    assert capsys.readouterr().err == ""
    progress.note("after")  # the next command starts clean
    assert capsys.readouterr().err == "after\n"


def test_quiet_drops_everything_until_the_command_ends(capsys):
    with progress.held():
        progress.quiet()
        progress.note("exported m in 1.0 s")
        progress.status("running dce")
    assert capsys.readouterr().err == ""
    progress.note("loud again")
    assert capsys.readouterr().err == "loud again\n"
