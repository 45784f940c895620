"""CLI commands owned by graphopt.train (`train`, `eval`, `generate`). Keep torch imports inside
the command bodies."""
from __future__ import annotations

COMMANDS: list = []
