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
      graphopt inspect out/default            # an artifact folder: backend, signature, kernels
    """
    from pathlib import Path

    from graphopt.models import load_graph
    from graphopt.summary import format_artifact, format_summary, summarize, summarize_artifact

    if (Path(model) / "manifest.json").is_file() and not show_ir:  # an artifact `graphopt optimize` wrote
        s = summarize_artifact(model)
        if as_json:
            import json

            click.echo(json.dumps(s, indent=2))
        else:
            click.echo(format_artifact(s))
        return
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


# --------------------------------------------------------------------------------------
# optimize / passes


def _progress(quiet: bool):
    if quiet:
        return None
    return lambda msg: click.echo(f"graphopt: {msg}", err=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=str),
              help="Artifact folder to write (model.onnx, manifest.json, report.json).")
@click.option("--passes", "pipeline", default=None, metavar="PIPELINE",
              help='Pipeline text, e.g. "dce,cse,fold-constants{max-size=1024}". Default: the cleanup pipeline.')
@click.option("--recipe", type=click.Path(path_type=str), default=None, help="A TOML recipe file instead of --passes.")
@click.option("--backend", default="ort", show_default=True,
              help="ort (onnxruntime), or tvm (a compiled library; pip install 'graphopt[tvm]').")
@click.option("--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE",
              help="An option for the backend's lowering, e.g. attention_kernel=onnx (repeatable).")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--check-numerics", is_flag=True, help="Run the graph before and after every pass on sample "
              "inputs; stop at the first pass that changes results and name it.")
@click.option("--inputs", "inputs_file", type=click.Path(path_type=str), default=None,
              help="Sample inputs (.npz, one array per model input) for --check-numerics.")
@click.option("--no-verify", is_flag=True, help="Skip verifying the graph after every pass.")
@click.option("--explain-fusions", is_flag=True, help="List, per fusion, the sites fused and the near misses "
              "(where a fusion's root op matched but a later constraint failed, and where).")
@click.option("--quantize", default=None, metavar="int8|int4[:BLOCK]|int8-dynamic",
              help="Append quantization to the pipeline: weight-only int8 (block 128) or int4 (block 32; int4:64, "
                   "int4:128), or int8-dynamic (activations quantized per call). See docs/quantization.md.")
@click.option("--quant-method", default="rtn", show_default=True, type=click.Choice(["rtn", "gptq"]),
              help="rtn: round to nearest (no data); gptq: error-compensated, on calibration data.")
@click.option("--calibration", type=click.Path(path_type=str), default=None,
              help="Calibration data for gptq: a text file, .jsonl of texts, or .npz of inputs "
                   "(default for graphopt.train checkpoints: their training corpus).")
@click.option("--accuracy-budget", default=None, metavar="METRIC=VALUE",
              help="perplexity=+2% or top1=0.99 against fp32 on held-out text: the most sensitive layers stay "
                   "in float until it holds; exit 2 and nothing written when no mix does.")
@click.option("--accuracy-data", type=click.Path(path_type=str), default=None,
              help="Held-out text (.txt/.jsonl) for --accuracy-budget (default: a graphopt.train checkpoint's val.txt).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def optimize(model, output_dir, pipeline, recipe, backend, backend_options, target, check_numerics, inputs_file,
             no_verify, explain_fusions, quantize, quant_method, calibration, accuracy_budget, accuracy_data,
             as_json, quiet):
    """Optimize MODEL and write an artifact folder.

    MODEL is an .onnx or .gir file (Hugging Face folders, training checkpoints and .pt files
    go through the frontends). The output folder appears whole or not at all.

    \b
    Examples:
      graphopt optimize examples/tiny_mlp.onnx -o out/tiny
      graphopt optimize model.onnx -o out --passes "dce,cse,fold-constants{max-size=4096}"
      graphopt optimize model.onnx -o out --check-numerics --explain-fusions
      graphopt optimize examples/default -o out/int4 --quantize int4 --quant-method gptq
      graphopt optimize examples/default -o out/int4 --quantize int4 --accuracy-budget perplexity=+1%
      python -c "import graphopt; print(graphopt.load('out/tiny'))"
    """
    from graphopt.driver import format_fusions, format_report, optimize as run_optimize
    from graphopt.sample_inputs import load_inputs

    inputs = load_inputs(inputs_file) if inputs_file else None
    options = {}
    for item in backend_options:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--backend-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    result = run_optimize(model, output_dir, passes=pipeline, recipe=recipe, backend=backend,
                          backend_options=options, target=target,
                          check_numerics=check_numerics, inputs=inputs, verify=not no_verify,
                          progress=_progress(quiet), quantize=quantize, quant_method=quant_method,
                          calibration=calibration, accuracy_budget=accuracy_budget, accuracy_data=accuracy_data)
    if as_json:
        import json

        click.echo(json.dumps(result.report, indent=2))
    else:
        click.echo(format_report(result.report))
        if explain_fusions:
            click.echo(format_fusions(result.report))
        click.echo(f"wrote {output_dir}/")


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def list_passes(as_json: bool) -> None:
    """List the registered passes (built-in and from plugins) with their options.

    \b
    Examples:
      graphopt passes
      graphopt optimize model.onnx -o out --passes "simplify-shapes,dce"
    """
    from graphopt.pass_manager import all_passes, options_of

    rows = []
    for info in all_passes():
        opts = {k: f.default for k, f in options_of(info.cls).items()}
        rows.append({"name": info.name, "aliases": list(info.aliases), "options": opts,
                     "summary": info.summary, "source": info.source})
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        alias = f" ({', '.join(r['aliases'])})" if r["aliases"] else ""
        opts = "{" + ", ".join(f"{k}={v}" for k, v in r["options"].items()) + "}" if r["options"] else ""
        src = "" if r["source"] == "graphopt" else f"  [{r['source']}]"
        click.echo(f"{r['name']}{opts}{alias}{src}")
        click.echo(f"    {r['summary']}")
