"""`graphopt compare`: the click command (registered by graphopt.cli)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from graphopt.click_types import MAX_THREADS, FiniteFloatRange, PositiveInts
from graphopt.errors import UserError
from graphopt.fileutil import check_output_files


def _lengths(seqs: list[int]) -> list[int]:
    twice = sorted({n for n in seqs if seqs.count(n) > 1})
    if twice:  # the same shape measured twice: two identical columns
        raise UserError(f"--seq: {', '.join(map(str, twice))} given more than once")
    return seqs


def _split(values: tuple[str, ...] | str | None, option: str = "") -> list[str] | None:
    """A comma list option's names (None: not given); an empty list or a name given twice is
    refused (`--variants fp32,fp32` was "two cells would have the same name")."""
    if values is None or values == ():
        return None
    if isinstance(values, str):
        values = (values,)
    names = [v.strip() for item in values for v in item.split(",") if v.strip()]
    if not names:
        raise UserError(f"{option} {','.join(values)!r}: an empty list; leave the option out for its default")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{option}: {', '.join(twice)} given more than once")
    return names


def _check_output(option: str, path: str | None, inputs: list[str]) -> None:
    """A report file may replace an earlier one, never a file the run reads (the model, --data)."""
    if path is None:
        return
    p = Path(path)
    if p.parent.exists() and not p.parent.is_dir():
        raise UserError(f"{option} {path}: {p.parent} is not a folder")
    check_output_files([p], inputs, overwrite=True, option=option)


KEEP_MARK = ".graphopt-compare-keep"  # in a --keep folder compare made: its files may be replaced


def _check_keep(keep_dir: str | None, inputs: list[str]) -> bool:
    """--keep takes a missing or empty folder, or one an earlier compare kept (its mark file
    says so): compare replaces the files it builds there (export/, one folder per cell), so
    a folder of the user's own is refused. Returns whether the folder is new."""
    if keep_dir is None:
        return False
    keep = Path(keep_dir)
    real = Path(os.path.realpath(keep))
    for given in inputs:
        if real == Path(os.path.realpath(given)) or real in Path(os.path.realpath(given)).parents:
            raise UserError(f"--keep {keep_dir}: holds the input {given}; give a new folder")
    if not keep.exists():
        return True
    if not keep.is_dir():
        raise UserError(f"--keep {keep_dir}: exists and is not a folder")
    if any(keep.iterdir()) and not (keep / KEEP_MARK).is_file():
        raise UserError(f"--keep {keep_dir}: the folder holds files an earlier compare did not keep; "
                        "give a new or empty folder")
    return False


class RichProgress:
    """compare's progress on stderr: one bar per phase, the current cell beside it. Only on
    a terminal, and cleared if the run fails (its error is then the one line left)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("[dim]{task.fields[detail]}"), TimeElapsedColumn(),
                             console=(console := Console(stderr=True)), transient=False,
                             disable=not console.is_terminal)
        self._task = None
        self._bar.start()

    def phase(self, title: str, total: int) -> None:
        if self._task is not None:
            self._bar.update(self._task, detail="")
            t = self._bar.tasks[-1]
            if t.total:
                self._bar.update(self._task, completed=t.total)
        self._task = self._bar.add_task(title, total=total or None, detail="")

    def advance(self, detail: str = "") -> None:
        if self._task is None:
            return
        t = self._bar.tasks[-1]
        self._bar.update(self._task, detail=detail, advance=1 if t.total else 0)

    def done(self) -> None:
        self.phase("done", 1)
        self._bar.update(self._task, completed=1)
        self.close()

    def close(self, failed: bool = False) -> None:
        if failed:
            self._bar.live.transient = True
        self._bar.stop()


@click.command("compare")
@click.argument("models", nargs=-1, type=click.Path(path_type=str), metavar="MODEL...")
@click.option("--backends", default=None, metavar="LIST", help="Comma list of torch, ort, tvm [default: torch,ort].")
@click.option("--variants", default=None, metavar="LIST",
              help="Comma list of variants (see --list-variants) [default: fp32 and the ORT anchors].")
@click.option("--list-variants", is_flag=True, help="List the registered variants and exit.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Batch size of every shape.")
@click.option("--seq", "seqs", multiple=True, type=PositiveInts(), help="Sequence length(s) [default: 32]; repeatable.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
              help="Intra-op threads of every runtime [default: the physical cores].")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per cell and shape, at least.")
@click.option("--min-time", type=FiniteFloatRange(min=0), default=1.0, show_default=True,
              help="Seconds of timed runs per cell and shape, at least.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs per cell before timing.")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="A text file: perplexity of every variant on it (decoders with a tokenizer.json).")
@click.option("--data-tokens", type=click.IntRange(min=2), default=4096, show_default=True, help="Score at most this many tokens of --data.")
@click.option("--reference", type=click.Path(path_type=str), default=None,
              help="The PyTorch model accuracy is measured against [default: MODEL, or the artifacts' source].")
@click.option("--keep", "keep_dir", type=click.Path(path_type=str), default=None,
              help="Keep the artifacts built for the variants in this folder (to rerun or time them yourself): "
                   "a new or empty folder, or one an earlier compare kept.")
@click.option("--generate", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also time greedy generation of N new tokens after a prompt of the largest --seq: time to "
                   "first token and decode tokens/s (decoders; builds each variant again with its KV cache).")
@click.option("--no-memory", is_flag=True,
              help="Skip peak memory (it loads each cell again in a fresh process, one at a time).")
@click.option("--json", "json_file", type=click.Path(path_type=str), default=None, help="Write the report (every sample) as JSON.")
@click.option("--html", "html_file", type=click.Path(path_type=str), default=None,
              help="Write the report as one self-contained HTML page (opens offline).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def compare(models, backends, variants, list_variants, batch, seqs, threads, runs, min_time, warmup, data, data_tokens,
            reference, keep_dir, generate, no_memory, json_file, html_file, quiet):
    """Time and check MODEL on every backend x variant: p50/p90/p99 latency, throughput,
    memory, size, build time, and accuracy against eager fp32 PyTorch.

    MODEL is anything `graphopt optimize` takes (it is exported once and every variant is
    built from the export), or several artifact folders `graphopt optimize` wrote. Every cell
    runs on the same inputs with the same thread count, interleaved round by round. A cell
    that fails shows its error; the others still report.

    \b
    Examples:
      graphopt compare examples/default --seq 32,128 --html report.html
      graphopt compare examples/default --variants fp32,ort-plain --threads 1 --json report.json
      graphopt optimize examples/default -o out/int8 --quantize int8 --no-kv-cache
      graphopt compare out/int8 --reference examples/default   # artifact folders (no KV cache)
      graphopt compare hf-model/ --backends torch,ort,tvm --data val.txt
      graphopt compare examples/default --variants fp32,int8,int4,prune-mlp --generate 64
    """
    from graphopt.compare import variants as V

    if list_variants:
        for name, spec in V.VARIANTS.items():
            flags = ", ".join(x for x in ("default" if spec.default else "", "anchor" if spec.anchor else "") if x)
            click.echo(f"{name}  [{', '.join(spec.backends)}]{'  (' + flags + ')' if flags else ''}")
            click.echo(f"    {spec.summary}")
        return
    if not models:
        raise UserError("give a MODEL (anything `graphopt optimize` takes) or artifact folders; see --help")
    backends, variants = _split(backends, "--backends"), _split(variants, "--variants")
    seqs = _lengths([n for lengths in seqs for n in lengths]) or None
    inputs = [p for p in (*models, data, reference) if p]
    _check_output("--json", json_file, inputs)
    _check_output("--html", html_file, inputs)
    if json_file and html_file and Path(json_file).resolve() == Path(html_file).resolve():
        raise UserError(f"--json and --html both name {json_file}: give each its own file")
    new_keep = _check_keep(keep_dir, inputs)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads must not spin
    from graphopt.compare.html import render_html, report_json
    from graphopt.compare.run import compare as run_compare
    from graphopt.compare.table import render
    from graphopt.compare.timing import TimingSettings
    from graphopt.fileutil import atomic_path

    if keep_dir is not None:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
        (Path(keep_dir) / KEEP_MARK).write_text("graphopt compare keeps its artifacts here and may replace them\n")
    if quiet:
        from graphopt import progress as notes

        notes.quiet()  # (the export's own progress too)
    progress = None if quiet else RichProgress()
    try:
        report = run_compare(list(models), backends=backends, variants=variants, batch=batch, seqs=seqs,
                             threads=threads,
                             timing=TimingSettings(warmup=warmup, min_runs=runs, min_time=min_time),
                             data=data, data_tokens=data_tokens, reference=reference, workdir=keep_dir,
                             progress=progress, measure_memory=not no_memory, generate=generate)
    except BaseException:
        if progress is not None:
            progress.close(failed=True)
        if new_keep:  # a failed run leaves no folder behind that was not there
            shutil.rmtree(keep_dir, ignore_errors=True)
        raise
    if progress is not None:
        progress.close()
    from graphopt import progress as notes

    notes.flush()  # what the run noted (the export's time) goes above the report, not after it
    render(report)
    for path, text in ((json_file, report_json(report) + "\n" if json_file else None),
                       (html_file, render_html(report) if html_file else None)):
        if path is None:
            continue
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        click.echo(f"wrote {path}")
