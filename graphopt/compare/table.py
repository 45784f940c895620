"""The terminal table of a compare report (rich)."""
from __future__ import annotations


MIN_WIDTH = 150


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def fmt_err(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.1e}"


def ratio(report: dict, cell: dict, i: int) -> float | None:
    """How many times faster than the baseline cell at shape i (baseline p50 / cell p50)."""
    base = next((c for c in report["cells"] if c["id"] == report.get("baseline")), None)
    try:
        return base["results"][i]["p50_ms"] / cell["results"][i]["p50_ms"]
    except (TypeError, KeyError, IndexError, ZeroDivisionError):
        return None


def worst_accuracy(cell: dict) -> dict:
    """Over the shapes: the largest max abs error, the lowest top-1 agreement / cosine."""
    accs = [r["accuracy"] for r in cell["results"] if "accuracy" in r]
    out: dict = {}
    if accs:
        out["max_abs_err"] = max(a["max_abs_err"] for a in accs)
        out["nonfinite"] = sum(a.get("nonfinite", 0) for a in accs)
        for key in ("top1_agreement", "pooled_cosine"):
            vals = [a[key] for a in accs if key in a]
            if vals:
                out[key] = min(vals)
    return out


ERROR_WIDTH = 80  # a failed cell's error in the terminal table; the JSON keeps it whole


def short_error(error: str) -> str:
    """An error cut to ERROR_WIDTH characters for a table cell (a runtime's own message can
    run to hundreds, which made the column, and so the table, that wide)."""
    return error if len(error) <= ERROR_WIDTH else error[:ERROR_WIDTH - 1] + "…"


def gen_columns(cell: dict, gen: dict) -> list[str]:
    """Time to first token and decode tokens/s (with how many greedy tokens match torch's)."""
    g = cell.get("generation")
    if g is None:
        return ["-", "-"]
    if "error" in g:
        return [f"[red]failed: {short_error(g['error'])}[/]", "-"]
    rate = "-" if g["decode_tokens_per_s"] is None else f"{g['decode_tokens_per_s']:.0f}"
    same = "" if g["same_tokens"] is None or g["same_tokens"] == gen["new_tokens"] else \
        f" [yellow]({g['same_tokens']}/{gen['new_tokens']} same)[/]"
    return [f"{g['ttft_ms']:.1f}", rate + same]


def render(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
    decoder = report["model"]["kind"] == "decoder"
    s = report["settings"]
    title = (f"graphopt compare: {report['model']['source'] or ', '.join(report['model']['arguments'])}  "
             f"(threads {s['threads']}; ratio = {report['baseline']} p50 / p50, higher is faster)")
    measured = any(c.get("memory") for c in report["cells"])  # --no-memory: the column is all "-"
    memory = ("; peak memory: a fresh process per cell, loaded and run once (the JSON also has what the cell "
              "added over its runtime)") if measured else "; peak memory: not measured (--no-memory)"
    t = Table(title=title, title_justify="left", show_lines=False, caption="p90/p99 at the largest shape; "
              "accuracy: the worst over the shapes" + memory, caption_justify="left")
    t.add_column("backend/variant", no_wrap=True)
    shapes = [(r["batch"], r["seq"]) for r in report["cells"][0]["results"]] if report["cells"] else []
    for b, q in shapes:
        t.add_column(f"{b}x{q} p50 ms", justify="right", no_wrap=True)
    t.add_column("p90/p99", justify="right", no_wrap=True)
    t.add_column("max|Δ|", justify="right", no_wrap=True)
    t.add_column("top-1" if decoder else "cosine", justify="right")
    if report.get("perplexity"):
        t.add_column("ppl", justify="right")
    gen = report.get("generation")
    if gen:
        t.add_column("TTFT ms", justify="right", no_wrap=True)
        t.add_column("decode tok/s", justify="right", no_wrap=True)
    t.add_column("size", justify="right")
    t.add_column("build", justify="right")
    t.add_column("peak mem", justify="right", no_wrap=True)
    for c in report["cells"]:
        name = c["id"] + (" [dim](anchor)[/]" if c["anchor"] else "")
        if c["status"] == "error":
            row = [name, f"[red]failed: {short_error(c['error'])}[/]"] + ["-"] * (len(t.columns) - 2)
            t.add_row(*row)
            continue
        row = [name]
        for i, r in enumerate(c["results"]):
            if "p50_ms" in r:
                k = ratio(report, c, i)
                row.append(f"{r['p50_ms']:.2f}" + (f" {k:.2f}x" if k else ""))
            else:
                row.append(f"[red]{r.get('error', 'no result')}[/]")
        last = c["results"][-1] if c["results"] else {}
        row.append(f"{last['p90_ms']:.1f}/{last['p99_ms']:.1f}" if "p90_ms" in last else "-")
        acc = worst_accuracy(c)
        row.append(fmt_err(acc.get("max_abs_err")) + (f" [red]+{acc['nonfinite']} NaN/inf[/]" if acc.get("nonfinite") else ""))
        key = "top1_agreement" if decoder else "pooled_cosine"
        row.append("-" if key not in acc else f"{acc[key] * 100:.1f}%" if decoder else f"{acc[key]:.6f}")
        if report.get("perplexity"):
            p = c.get("perplexity") or {}
            row.append(f"{p['perplexity']:.3f}" if "perplexity" in p else p.get("error", "-"))
        if gen:
            row += gen_columns(c, gen)
        row.append(fmt_bytes(c["size_bytes"]))
        row.append(("-" if c["build_seconds"] is None else f"{c['build_seconds']:.1f} s")
                   + (f" + {c['tuning_seconds'] / 60:.1f} min tuning" if c.get("tuning_seconds") else ""))
        mem = c.get("memory") or {}
        row.append("[red]failed[/]" if "error" in mem else fmt_bytes(mem.get("peak_bytes")))
        t.add_row(*row)
    # A narrower console would cut numbers short ("12.3…"): lines wrap instead.
    need = max(MIN_WIDTH, Console(width=1000).measure(t).maximum)
    if console.width < need:
        console = Console(width=need)
    console.print(t)
    m = report["machine"]
    bw = m.get("memory_bandwidth", {}).get("read_gb_s")
    console.print(f"[dim]{m['cpu']}, {m['logical_cores']} cores ({', '.join(m['isa'][-4:]) or 'no ISA flags'}), "
                  f"read bandwidth {bw} GB/s; accuracy vs {report['reference']['what']}; "
                  f"{', '.join(f'{k} {v}' for k, v in report['versions'].items())}[/]")
    if gen:
        same = (f"; (k/N same): greedy tokens equal to {gen['reference']}'s for the first k" if gen.get("reference")
                else "; no torch reference to compare tokens with")
        console.print(f"[dim]generation: {gen['batch']} x {gen['prompt_tokens']} prompt tokens, {gen['new_tokens']} new "
                      f"tokens, greedy; median of {gen['rounds']} rounds{same}[/]")
    if report.get("perplexity") and "reference" in report["perplexity"]:
        console.print(f"[dim]perplexity of {report['reference']['what']} on {report['perplexity']['data']}: "
                      f"{report['perplexity']['reference']:.3f} ({report['perplexity']['tokens']} tokens in "
                      f"windows of {report['perplexity']['window']}, each window's first token unscored)[/]")
