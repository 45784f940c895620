"""click parameter types shared by the commands (graphopt's and graphopt.train's), so that
an option is checked where it is parsed and a bad value is click's one-line usage error."""
from __future__ import annotations

import collections
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


def refuse_repeated_options(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """click keeps only the last of a repeated single-valued option, silently (`--threads 1
    --threads 8` ran on 8): any option that takes one value, given twice to `command`, is a usage
    error. A group calls this with the arguments it hands the command; a parse error is left to
    the command's own parse, which reports it."""
    own = click.Context(command, parent=ctx, info_name=command.name, resilient_parsing=True)  # its parse settings
    try:
        _, _, order = command.make_parser(own).parse_args(args=list(args))
    except click.UsageError:
        return
    counts = collections.Counter(order)
    for param in order:
        if isinstance(param, click.Option) and counts[param] > 1 and not (param.multiple or param.count
                                                                          or param.is_flag):
            raise click.UsageError(f"{' / '.join(param.opts)} given {counts[param]} times: give it once "
                                   f"({ctx.command_path} {command.name} --help)")


def once(ctx, param, value):
    """Callback of a single-valued option declared `multiple=True`: click keeps only the last of a
    repeated option, silently (two --accuracy-budget would enforce one); here a repeat is the
    usage error it is, and the option's value is the one given (or None)."""
    if len(value) > 1:
        raise click.BadParameter(f"given {len(value)} times ({', '.join(map(str, value))}): give it once", ctx, param)
    return value[0] if value else None
