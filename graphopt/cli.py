"""The `graphopt` command line: one click group, one function per command.

Commands import the heavy parts (onnx, torch, transformers) inside their bodies so that
`graphopt --help` stays fast. A user mistake (a `UserError`, or a click usage error) becomes
one line on stderr and exit code 2 -- never a traceback. Anything else is a bug of ours:
exit code 1, a one-line summary, and `--debug` (or GRAPHOPT_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

from graphopt import progress
from graphopt.click_types import once
from graphopt.errors import GraphoptError, UserError

DEBUG_ENV = "GRAPHOPT_DEBUG"


# Optional packages and the extra that installs each (a missing one is a one-line error).
_EXTRAS = {"torch": "torch", "onnxscript": "torch", "safetensors": "torch", "transformers": "hf",
           "tokenizers": "training", "tvm": "tvm", "tvm_ffi": "tvm"}
_debug = {"on": False}  # set by the group's --debug before any command runs


def _debug_requested() -> bool:
    return _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class _Group(click.Group):
    """Turns `UserError` and click's usage errors into one line and exit code 2, and any
    other exception (a bug) into one line and exit code 1 unless debugging."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _debug["on"] = False
        _exit_cleanly_on_sigterm()
        try:
            with progress.held():  # progress notes only once the command succeeds: an error is its one line
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `graphopt`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f" ({e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {_one_line(e.format_message())}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except GraphoptError as e:  # an invariant of ours broke: a bug, whatever the input
            _internal(e, where="")
        except UserError as e:
            if _debug_requested():
                traceback.print_exc()
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
        except (click.Abort, KeyboardInterrupt):
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except (SystemExit, click.exceptions.Exit):
            raise
        except BrokenPipeError:  # `graphopt inspect --ir | head`
            sys.exit(0)
        except OSError as e:  # the file system said no (permissions, a full disk, a file where a folder goes)
            if _debug_requested():
                traceback.print_exc()
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or _one_line(e)}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            package = (e.name or "").split(".")[0]
            if package not in _EXTRAS or _debug_requested():
                _internal(e, where="ModuleNotFoundError: ")
            click.echo(f"error: this needs {package}, which is not installed: pip install 'graphopt[{_EXTRAS[package]}]'",
                       err=True)
            sys.exit(2)
        except Exception as e:
            _internal(e, where=f"{type(e).__name__}: ")
        sys.exit(rv if isinstance(rv, int) else 0)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a `kill`, a job scheduler, torchrun stopping its workers) unwinds like Ctrl-C,
    so scratch folders are removed and nothing half-written is left; SIGKILL cannot be caught,
    and the writes are atomic for that case."""
    import signal
    import threading

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)


def _internal(e: BaseException, where: str):
    if _debug_requested():
        traceback.print_exc()
    else:
        click.echo(f"internal error: {where}{_one_line(e)[:300]} -- a bug in graphopt (or a plugin); "
                   f"rerun with --debug (or {DEBUG_ENV}=1) for the traceback, and report it", err=True)
    sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphopt")
@click.option("--debug", is_flag=True, help=f"Show the traceback of an error (also {DEBUG_ENV}=1).")
def cli(debug: bool) -> None:
    """graphopt: optimize trained neural networks for ONNX Runtime and TVM.

    \b
    Examples:
      graphopt inspect examples/tiny_mlp.onnx
      graphopt convert examples/tiny_mlp.onnx -o tiny.gir
      graphopt --debug optimize model.onnx -o out    # a traceback if graphopt fails
    """
    _debug["on"] = debug


def _register_train_commands() -> None:
    # graphopt.train owns `train`, `eval`, `finetune` and `prune` (torch out of module scope);
    # `generate` (checkpoints and artifacts) is graphopt.generation_cli's.
    try:
        from graphopt.train import cli as train_cli
    except ImportError:  # pragma: no cover - train/ not present in this build
        return
    for command in getattr(train_cli, "COMMANDS", []):
        cli.add_command(command)
    from graphopt.generation_cli import generate  # checkpoints (torch) and artifacts (ort, tvm)
    from graphopt.train.evaluate import register_artifact_evaluator

    def evaluate_artifact(*args):  # `graphopt eval` on an artifact folder; imported when used
        from graphopt.evaluation import evaluate_artifact as run

        return run(*args)

    register_artifact_evaluator(evaluate_artifact)

    cli.add_command(generate)


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

    from graphopt.fileutil import artifact_extras
    from graphopt.models import load_graph
    from graphopt.summary import format_artifact, format_summary, summarize, summarize_artifact

    artifact = Path(model).is_dir() and artifact_extras(Path(model)) is not None  # a folder graphopt optimize wrote
    if artifact and show_ir:
        raise UserError(f"{model}: an artifact folder, lowered for its backend (no graphopt IR to print): inspect it "
                        "without --ir, or give --ir the model it was optimized from")
    if artifact:
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
    from graphopt.verify import verify

    try:  # as convert and optimize would refuse it (an op no one registered, a wrong shape)
        verify(graph)
    except Exception as e:
        raise UserError(f"{model}: the graph does not verify: {e} (inspect --ir prints it as it is)") from None
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
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (and the weights file beside "
              "it), only once the new ones are complete. The input is never replaced.")
def convert(source: str, output: str, external_data: bool | None, overwrite: bool) -> None:
    """Convert between an ONNX model and graphopt's textual IR.

    A .gir file is readable and editable by hand; its weights live in a safetensors file
    beside it (named in the .gir header). An existing output file is not replaced without
    --overwrite: it may be a model or hand edits of yours.

    \b
    Examples:
      graphopt convert examples/tiny_mlp.onnx -o tiny.gir
      graphopt convert tiny.gir -o back.onnx
      graphopt convert tiny.gir -o back.onnx --overwrite   # after editing tiny.gir
    """
    from graphopt.fileutil import check_output_files
    from graphopt.models import load_graph, model_files, output_files, save_graph
    from graphopt.verify import verify

    planned = output_files(output, external_data=external_data)
    existing = [p for p in planned if os.path.lexists(p)]
    check_output_files(planned, model_files(source) if existing else [source], overwrite=overwrite)
    graph = load_graph(source)
    try:
        verify(graph)
    except Exception as e:
        raise UserError(f"{source}: the graph does not verify: {e}") from None
    files = save_graph(graph, output, external_data=external_data, overwrite=overwrite, inputs=[source])
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


# --------------------------------------------------------------------------------------
# optimize / passes


def _progress(quiet: bool):
    """Progress on stderr (graphopt.progress). A message about one pass ("running NAME") or a
    counter of long work ("gptq 3/36", "calibration 2/8") is transient: on a terminal it
    overwrites itself on one line, elsewhere it is not printed. Any other message is a note,
    printed once the command succeeds."""
    if quiet:
        return None
    import re

    from graphopt import progress

    counter = re.compile(r"\b\d+/\d+\b")

    def report(msg: str) -> None:
        if msg.startswith("running ") or counter.search(msg):
            progress.status(f"graphopt: {msg}")
        else:
            progress.note(f"graphopt: {msg}")

    return report


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=str),
              help="Artifact folder to write (model.onnx, manifest.json, report.json).")
@click.option("--passes", "pipeline", default=None, metavar="PIPELINE",
              help='Pipeline text, e.g. "dce,cse,fold-constants{max-size=1024}". Default: cleanup, the fusions, cleanup '
                   'again, then on a decoder rewrite-kv-cache and slice-last-token-logits (a pipeline given here runs '
                   'as written: add those two yourself for a generation-ready artifact).')
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
@click.option("--overwrite", is_flag=True, help="Replace an -o folder that holds other files (only once the "
              "new artifact is complete). Not needed for an empty folder or an earlier artifact.")
@click.option("--explain-fusions", type=click.Choice(["summary", "all"]), is_flag=False, flag_value="summary",
              default=None, help="Per fusion, the sites fused and the near misses (where a fusion's root op "
              "matched but a later constraint failed), grouped by reason; =all lists every near miss.")
@click.option("--logits", type=click.Choice(["last", "all"]), multiple=True, callback=once,
              help="Decoders: logits at the last position only (generation; the default) or at every "
                   "position (scoring, perplexity).")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="Decoders: a generation-ready artifact with a KV cache (rewrite-kv-cache), or one that "
                   "recomputes the whole sequence.")
@click.option("--kv-layout", type=click.Choice(["BNSH", "BSNH", "static", "paged"]), multiple=True, callback=once,
              help="Decoders: the cache layout. BNSH (default): a cache that grows each step (on ORT, where "
                   "GroupQueryAttention computes it, `generate` and onnxruntime-genai share one buffer between "
                   "past and present, as static does); static: one "
                   "preallocated max-positions buffer that past and present share (ORT, TVM); paged: pools of "
                   "16-position blocks and a block_table input (ORT, TVM); BSNH: TVM.")
@click.option("--max-positions", type=click.IntRange(min=1), multiple=True, callback=once, metavar="N",
              help="Decoders: the longest sequence the static or paged cache holds (default: the model's "
                   "context, from its config.json; an ONNX file alone records none).")
@click.option("--quantize", multiple=True, callback=once, metavar="int8|int4[:BLOCK]|int8-dynamic|int8-static",
              help="Append quantization to the pipeline: weight-only int8 (block 128) or int4 (block 32; int4:64, "
                   "int4:128), int8-dynamic (activations quantized per call) or int8-static (activation ranges "
                   "from --calibration data, QDQ). See docs/quantization.md.")
@click.option("--quant-method", default="rtn", show_default=True, type=click.Choice(["rtn", "gptq", "awq"]),
              help="rtn: round to nearest (no data); gptq: error-compensated; awq: activation-aware "
                   "per-channel scaling, then gptq (gptq and awq calibrate on --calibration data).")
@click.option("--prune", multiple=True, callback=once, metavar="heads=R,mlp=R[,importance=wanda][,scope=global][,min-keep=N]",
              help="Remove the fraction R of attention heads (whole KV groups) and/or MLP channels of every "
                   "layer after the fusions; importance magnitude (default) or wanda (on --calibration data); "
                   "scope layer (default) or global. See docs/pruning.md.")
@click.option("--calibration", type=click.Path(path_type=str), multiple=True, callback=once,
              help="Calibration data for gptq, awq, int8-static and --prune importance=wanda: a text file, .jsonl "
                   "of texts, or .npz of inputs (default for graphopt.train checkpoints: their training corpus).")
@click.option("--accuracy-budget", multiple=True, callback=once, metavar="METRIC=VALUE",
              help="perplexity=+2%, top1=0.99 (decoders) or cosine=0.995 (encoders' pooled output) against the "
                   "float model (after --prune, if given) on held-out data: the most sensitive layers stay in "
                   "float until it holds; exit 2 and nothing written when no mix does.")
@click.option("--accuracy-data", type=click.Path(path_type=str), multiple=True, callback=once,
              help="Held-out text (.txt/.jsonl) for --accuracy-budget; for cosine, one sentence a line "
                   "(default: a graphopt.train checkpoint's val.txt).")
@click.option("--tune-minutes", type=float, default=None, metavar="M",
              help="--backend tvm (cpu): tune the kernels with MetaSchedule for at most M minutes (wall) at "
                   "--tune-shapes, keep the records in --tune-db, and build each kernel with its record only where "
                   "that beat the untuned schedule, timed side by side (the hand-written kernels are kept). A "
                   "second run on the same shapes finds its records and tunes nothing. See docs/tvm.md (Tuning).")
@click.option("--tune-shapes", default=None, metavar="BxS[+PAST],...",
              help="The static shapes to tune, batch x seq after PAST cached tokens (default: "
                   "1x128,4x128,1x1+128: prefill at 1 and 4 sequences of 128, one decode step after 128).")
@click.option("--tune-db", type=click.Path(path_type=str), default=None, metavar="DIR",
              help="The tuning database's folder (one subfolder per target; default "
                   "~/.cache/graphopt/tvm-tuning).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages (the report is still printed; --json "
              "prints it as JSON).")
def optimize(model, output_dir, pipeline, recipe, backend, backend_options, target, check_numerics, inputs_file,
             no_verify, overwrite, explain_fusions, logits, kv_cache, kv_layout, max_positions, quantize, quant_method, prune,
             calibration,
             accuracy_budget, accuracy_data, tune_minutes, tune_shapes, tune_db, as_json, quiet):
    """Optimize MODEL and write an artifact folder.

    MODEL is an .onnx or .gir file (Hugging Face folders, training checkpoints and .pt files
    go through the frontends). The output folder appears whole or not at all; an existing
    one is replaced only if it is empty or an earlier artifact (else --overwrite).

    A decoder (a causal LM: input_ids in, logits out) becomes a generation-ready artifact by
    default: one graph for prefill and decode with a KV cache (past_key_values.* in,
    present.* out), logits at the last position, its tokenizer beside it; run it with
    `graphopt generate OUT --prompt TEXT`. An ORT one also gets genai_config.json, so the
    same folder runs in onnxruntime-genai (og.Model(OUT)).

    \b
    Examples:
      graphopt optimize examples/tiny_mlp.onnx -o out/tiny
      graphopt optimize model.onnx -o out --passes "dce,cse,fold-constants{max-size=4096}"
      graphopt optimize model.onnx -o out --check-numerics --explain-fusions
      graphopt optimize examples/default -o out/default && graphopt generate out/default --prompt "def "
      graphopt optimize examples/default -o out/static --kv-layout static
      graphopt optimize examples/default -o out/paged --kv-layout paged --backend tvm
      graphopt optimize optimum_export/model.onnx -o out/cached   # a decoder exported with past_key_values
      graphopt optimize examples/default -o out/int4 --quantize int4 --quant-method gptq
      graphopt optimize examples/default -o out/int4 --quantize int4 --quant-method awq
      graphopt optimize examples/default -o out/int8s --quantize int8-static
      graphopt optimize examples/default -o out/int4 --quantize int4 --accuracy-budget perplexity=+1%
      graphopt optimize examples/default -o out/pruned --prune heads=0.5,mlp=0.5,importance=wanda
      graphopt optimize examples/default -o out/tuned --backend tvm --tune-minutes 8
      graphopt optimize examples/default -o out/tuned --backend tvm --tune-minutes 2 --tune-shapes 1x1+128
      python -c "import graphopt; print(graphopt.load('out/tiny'))"
    """
    from graphopt.driver import format_fusions, format_report, optimize as run_optimize
    from graphopt.fileutil import check_output_dir
    from graphopt.sample_inputs import load_inputs

    if quiet:
        progress.quiet()  # (the export reports through graphopt.progress too)
    if inputs_file and not check_numerics:
        raise UserError("--inputs gives the sample inputs of --check-numerics; add --check-numerics")
    check_output_dir(output_dir, [p for p in (model, inputs_file, recipe, calibration, accuracy_data) if p],
                     overwrite=overwrite)
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
                          progress=_progress(quiet), overwrite=overwrite, logits=logits, kv_cache=kv_cache,
                          kv_layout=kv_layout, max_positions=max_positions, quantize=quantize,
                          quant_method=quant_method, calibration=calibration,
                          accuracy_budget=accuracy_budget, accuracy_data=accuracy_data, prune=prune,
                          tune_minutes=tune_minutes, tune_shapes=tune_shapes, tune_db=tune_db)
    progress.flush()  # the artifact is written: what it took goes above the report
    if as_json:
        from graphopt.fileutil import json_text

        click.echo(json_text(result.report, indent=2))
    else:
        click.echo(format_report(result.report))
        if explain_fusions:
            click.echo(format_fusions(result.report, full=explain_fusions == "all"))
        click.echo(f"wrote {os.path.join(str(output_dir), '')}")  # out/ as given: not out//


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def list_passes(as_json: bool) -> None:
    """List the registered passes (built-in and from plugins) with their options.

    \b
    Examples:
      graphopt passes
      graphopt optimize model.onnx -o out --passes "simplify-shapes,dce"
    """
    import dataclasses

    from graphopt.pass_manager import all_passes, options_of, required_options

    rows = []
    for info in all_passes():
        required = required_options(info.cls)  # no default: listed with the value None (JSON null)
        opts = {k: None if k in required else f.default_factory() if f.default is dataclasses.MISSING
                else f.default for k, f in options_of(info.cls).items()}
        rows.append({"name": info.name, "aliases": list(info.aliases), "options": opts, "required": required,
                     "summary": info.summary, "source": info.source})
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        alias = f" ({', '.join(r['aliases'])})" if r["aliases"] else ""
        opts = "{" + ", ".join(f"{k}=<required>" if k in r["required"] else f"{k}={v}"
                               for k, v in r["options"].items()) + "}" if r["options"] else ""
        src = "" if r["source"] == "graphopt" else f"  [{r['source']}]"
        click.echo(f"{r['name']}{opts}{alias}{src}")
        click.echo(f"    {r['summary']}")


# --------------------------------------------------------------------------------------
# compare (graphopt.compare owns it)

from graphopt.compare.command import compare as _compare_command  # noqa: E402  (click only; the work is lazy)

cli.add_command(_compare_command)
