"""The `graphopt` command line: one click group, one function per command.

Commands import the heavy parts (onnx, torch, transformers) inside their bodies so that
`graphopt --help` stays fast. A user mistake raises `UserError`, which becomes a one-line
message on stderr and exit code 2 -- never a traceback.
"""
from __future__ import annotations

import sys

import click

from graphopt.errors import UserError


class _Group(click.Group):
    """Turns `UserError` (and click's own usage errors) into one line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphopt")
def cli() -> None:
    """graphopt: optimize trained neural networks for ONNX Runtime and TVM.

    \b
    Examples:
      graphopt inspect examples/tiny_mlp.onnx
      graphopt convert examples/tiny_mlp.onnx -o tiny.gir
    """


def _register_train_commands() -> None:
    # graphopt.train owns `train`, `eval` and `generate`; it keeps torch out of module scope.
    try:
        from graphopt.train import cli as train_cli
    except ImportError:  # pragma: no cover - train/ not present in this build
        return
    for command in getattr(train_cli, "COMMANDS", []):
        cli.add_command(command)


_register_train_commands()


def main() -> None:
    cli(prog_name="graphopt")
