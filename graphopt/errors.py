"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (a file, an option, a model): one line, exit 2."""


class GraphoptError(Exception):
    """An internal invariant broke (a bug in graphopt or in a pass)."""


class VerificationError(GraphoptError):
    """`verify(graph)` found a broken invariant."""


class ParseError(UserError):
    """The textual IR could not be parsed; the message names the file and line."""

