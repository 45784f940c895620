"""click parameter types shared by the commands (graphopt's and graphopt.train's), so that
an option is checked where it is parsed and a bad value is click's one-line usage error."""
from __future__ import annotations

import math

import click


# Intra-op threads: more than this is a typo, and a runtime asked for 100,000 threads exhausts
# memory creating them before it fails.
MAX_THREADS = 256


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange without nan and infinities (which pass a range check silently)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return number


class PositiveInts(click.ParamType):
    """A comma list of positive whole numbers (`--seq 32,128`)."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            numbers = [int(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"expected whole numbers separated by commas, got {value!r}", param, ctx)
        if any(n < 1 for n in numbers):
            self.fail(f"{value!r}: every number must be positive", param, ctx)
        return numbers


def once(ctx, param, value):
    """Callback of a single-valued option declared `multiple=True`: click keeps only the last of a
    repeated option, silently (two --accuracy-budget would enforce one); here a repeat is the
    usage error it is, and the option's value is the one given (or None)."""
    if len(value) > 1:
        raise click.BadParameter(f"given {len(value)} times ({', '.join(map(str, value))}): give it once", ctx, param)
    return value[0] if value else None
