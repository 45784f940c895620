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


# --------------------------------------------------------------------------------------
# inspect / convert


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--ir", "show_ir", is_flag=True, help="Print the graph in graphopt's textual IR.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model: str, show_ir: bool, as_json: bool) -> None:
    """Summarize MODEL: op histogram, parameters, inputs and outputs with symbolic shapes.

    \b
    Examples:
      graphopt inspect examples/tiny_mlp.onnx
      graphopt inspect model.onnx --json
      graphopt inspect model.onnx --ir | less
    """
    from graphopt.models import load_graph
    from graphopt.summary import format_summary, summarize

    graph = load_graph(model)
    if show_ir:
        from graphopt.text import print_graph

        click.echo(print_graph(graph), nl=False)
        return
    s = summarize(graph)
    if as_json:
        import json

        click.echo(json.dumps(s, indent=2))
    else:
        click.echo(format_summary(s))


@cli.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Output file: .gir (text IR + weights beside it) or .onnx.")
@click.option("--external-data/--inline-data", default=None,
              help="For .onnx output: put weights in a .data file beside it (default: only over 1 GiB).")
def convert(source: str, output: str, external_data: bool | None) -> None:
    """Convert between an ONNX model and graphopt's textual IR.

    A .gir file is readable and editable by hand; its weights live in a safetensors file
    beside it (named in the .gir header).

    \b
    Examples:
      graphopt convert examples/tiny_mlp.onnx -o tiny.gir
      graphopt convert tiny.gir -o back.onnx
    """
    from graphopt.models import load_graph, save_graph
    from graphopt.verify import verify

    graph = load_graph(source)
    try:
        verify(graph)
    except Exception as e:
        raise UserError(f"{source}: the graph does not verify: {e}") from None
    files = save_graph(graph, output, external_data=external_data)
    click.echo(f"wrote {', '.join(str(f) for f in files)}")
