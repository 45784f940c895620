"""`optimize --prune`: the pruning passes it adds to the pipeline, and what the artifact's
report.json and manifest.json say was removed.

`--prune heads=0.25,mlp=0.5,importance=wanda,scope=global,min-keep=2` becomes
`prune-heads{ratio=0.25,importance=wanda,scope=global,min-keep=2},prune-mlp{ratio=0.5,...}`,
run after the default recipe's fusions (the forms those passes prune) and before the KV-cache
rewrite and quantization. The summary reads the pruning passes' records: parameters removed,
block FLOPs before and after (passes/pruning/flops.py), and, for the mask passes, that they
only zero weights.

A graphopt training checkpoint pruned by `graphopt prune` (and recovered by `graphopt
finetune`) carries its own record in config.json: what went, and the validation perplexity
unpruned, pruned and after recovery. `checkpoint_pruning` reads it, and the report shows it
under "pruning" beside what the passes removed.
"""
from __future__ import annotations

import json
from pathlib import Path

from graphopt.errors import UserError
from graphopt.frontends.training import is_run_folder, is_training_config

STRUCTURED = {"heads": "prune-heads", "mlp": "prune-mlp"}
SHARED = ("importance", "scope", "min-keep")
PRUNE_PASSES = ("prune-heads", "prune-mlp", "prune-magnitude", "prune-nm")


def prune_pipeline(spec: str) -> str:
    """`--prune heads=0.25,mlp=0.5[,importance=wanda][,scope=global][,min-keep=N]` as pipeline text."""
    ratios: dict[str, str] = {}
    shared: dict[str, str] = {}
    for item in spec.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise UserError(f"--prune {spec!r}: expected KEY=VALUE items, e.g. heads=0.25,mlp=0.5")
        if key in ratios or key in shared:
            raise UserError(f"--prune {spec!r}: {key} given twice; give it once")
        if key in STRUCTURED:
            ratios[key] = value
        elif key in SHARED:
            shared[key] = value
        else:
            raise UserError(f"--prune {spec!r}: unknown key {key!r} (expected heads, mlp, "
                            f"{', '.join(SHARED)})")
    if not ratios:
        raise UserError(f"--prune {spec!r}: say what to prune: heads=RATIO and/or mlp=RATIO")
    options = "".join(f",{k}={v}" for k, v in shared.items())
    return ",".join(f"{STRUCTURED[k]}{{ratio={v}{options}}}" for k, v in ratios.items())


def checkpoint_pruning(model) -> dict:
    """What a graphopt training checkpoint (or run folder) `model` says `graphopt prune` and
    `graphopt finetune` did to it: {"checkpoint": the pruning, "perplexity": {text, tokens,
    unpruned, pruned[, recovered]}}; {} for any other model."""
    if model is None or not Path(model).is_dir():
        return {}
    folder = Path(model)
    if is_run_folder(folder):
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text(errors="replace").strip()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # the frontend has loaded this folder; a config it could not read never gets here
    if not isinstance(config, dict) or not is_training_config(config) or not isinstance(config.get("pruned"), dict):
        return {}
    pruned = config["pruned"]
    out: dict = {"checkpoint": {k: v for k, v in pruned.items() if k not in ("kept", "perplexity")}}
    measured = pruned.get("perplexity") or {}
    recovery = ((config.get("finetune") or {}).get("perplexity")) or {}
    if "unpruned" in measured:
        out["perplexity"] = {k: measured[k] for k in ("text", "tokens", "unpruned", "pruned")}
        if "after" in recovery and all(recovery.get(k) == measured.get(k) for k in ("sha256", "max_tokens")):
            out["perplexity"]["recovered"] = recovery["after"]
        elif "after" in recovery:  # recovery measured on another text: its own before and after
            out["perplexity"]["recovery"] = {k: recovery[k] for k in ("text", "tokens", "before", "after")}
    elif "after" in recovery:
        out["perplexity"] = {"text": recovery["text"], "tokens": recovery["tokens"], "pruned": recovery["before"],
                             "recovered": recovery["after"]}
    elif "skipped" in measured:
        out["perplexity"] = {"skipped": measured["skipped"]}
    return out


def pruning_summary(records, parameters_before: int, spec: str | None, calibration=None, feeds=None,
                    model=None) -> dict:
    """The report's "pruning" entry (empty when no pruning pass ran and `model` is not a
    pruned training checkpoint); `calibration` (the file) and `feeds` (its feed dicts) are
    recorded when a pass scored on data."""
    runs = [r for r in records if r.name in PRUNE_PASSES]
    from_checkpoint = checkpoint_pruning(model)
    if not runs:
        return {"pruning": from_checkpoint} if from_checkpoint else {}
    out: dict = {"spec": spec, "passes": [], "parameters_before": parameters_before, **from_checkpoint}
    if feeds and any(r.options.get("importance") == "wanda" for r in runs):
        out["calibration"] = {"file": None if calibration is None else str(calibration), "batches": len(feeds),
                              "sequences": int(sum(len(next(iter(f.values()))) for f in feeds))}
    flops = [f for r in runs for d in r.details for f in [d.get("block_flops")] if f]
    for r in runs:
        entry = {"pass": r.name, "options": r.options,
                 **{k.replace("-", "_"): v for k, v in r.stats.items()}}
        entry.update({"speed": d["speed"] for d in r.details if "speed" in d})
        entry.update({"sites": d["sites_found"] for d in r.details if "sites_found" in d})
        entry.update({k: d[k] for d in r.details if "units" in d for k in ("units", "global_removes")})
        skipped = sorted({d["reason"] for d in r.details if d.get("reason")})
        if skipped:  # the sites the pass could not prune, and why (a per-head mask: ALiBi's)
            entry["skipped"] = skipped
        out["passes"].append(entry)
    out["parameters_removed"] = sum(r.stats.get("parameters", 0) for r in runs)
    if flops:
        before, after = flops[0]["before"], flops[-1]["after"]
        out["block_flops"] = {"seq_len": flops[0]["seq_len"], "before": before, "after": after,
                              "removed_fraction": round(1 - after / before, 4) if before else 0.0,
                              "counted": "matmuls by a weight (not the LM head) and attention over the "
                                         "whole sequence, per sequence of seq_len tokens"}
    return {"pruning": out}


def pruning_manifest(records) -> dict:
    """The manifest's "pruning" entry: per structured pass and layer, the units removed (their
    indices in the unpruned layer), so a user can map the artifact back to the checkpoint."""
    passes = []
    for r in records:
        if r.name not in STRUCTURED.values():
            continue
        layers = []
        for d in r.details:
            if "keep" not in d:
                continue
            total = d.get("kv_heads", d.get("channels"))
            kept = set(d["keep"])
            layers.append({"node": d["node"], "units": total, "removed": [i for i in range(total) if i not in kept]})
        passes.append({"pass": r.name, "unit": "kv_head" if r.name == "prune-heads" else "channel",
                       "options": r.options, "layers": layers})
    return {"pruning": passes} if passes else {}


def format_pruning(report: dict) -> str | None:
    """The terminal summary's lines: what went (in the checkpoint, by the passes), the share of
    parameters and block FLOPs, and the checkpoint's perplexity before and after recovery."""
    p = report.get("pruning")
    if not p:
        return None
    lines = []
    c = p.get("checkpoint")
    if c:
        (p0, p1) = c["parameters"]
        lines.append(f"pruned    in the checkpoint (graphopt prune: heads {c['heads_ratio']}, mlp {c['mlp_ratio']}, "
                     f"{c['importance']}): {p0:,} -> {p1:,} parameters (-{1 - p1 / p0:.1%})")
    if p.get("passes"):
        lines.append(_format_passes(p))
    ppl = p.get("perplexity")
    if ppl and "skipped" in ppl:
        lines.append(f"          perplexity: skipped ({ppl['skipped']})")
    elif ppl:
        stages = [f"{name} {ppl[name]:.2f}" for name in ("unpruned", "pruned", "recovered") if name in ppl]
        lines.append(f"          perplexity: {' -> '.join(stages)} ({ppl['text']}, {ppl['tokens']:,} tokens)")
        r = ppl.get("recovery")
        if r:
            lines.append(f"          recovery: perplexity {r['before']:.2f} -> {r['after']:.2f} "
                         f"({r['text']}, {r['tokens']:,} tokens)")
    return "\n".join(lines)


def _removes_none_hint(entry: dict, unit: str) -> str:
    """Why a structured pass with sites removed nothing: min-keep keeps every unit, or the ratio
    rounds down to none per layer (scope=global may not) or over the whole model too."""
    o, units = entry["options"], entry.get("units")
    if o["ratio"] == 0:
        return ""
    if units is None:  # a report written before the unit counts were recorded
        return "; counted per layer: scope=global would count the ratio over the whole model" \
            if o["scope"] == "layer" else ""
    if o["min_keep"] >= max(units):
        have = "/".join(str(u) for u in units)
        if units == [1]:
            mqa = ", multi-query attention," if unit == "KV groups" else ""
            return f"; a layer has 1 {unit[:-1]}{mqa} and min-keep {o['min_keep']} keeps it"
        return f"; a layer has {have} {unit} and min-keep {o['min_keep']} keeps them all"
    if o["scope"] == "layer" and entry.get("global_removes"):
        return (f"; counted per layer: scope=global, counting the ratio over the whole model, "
                f"would remove {entry['global_removes']}")
    return ""


def _format_passes(p: dict) -> str:
    """One line for what the pruning passes removed."""
    parts = []
    for entry in p["passes"]:
        if entry["pass"] in STRUCTURED.values() and not entry.get("layers"):
            what = "heads" if entry["pass"] == "prune-heads" else "MLP channels"
            o = entry["options"]
            hint = _removes_none_hint(entry, "KV groups" if entry["pass"] == "prune-heads" else "channels")
            if entry.get("skipped"):
                parts.append(f"no {what}: every site was skipped ({'; '.join(entry['skipped'])})")
            elif entry.get("sites") == 0:  # the pass found no site at all
                block = "attention" if entry["pass"] == "prune-heads" else "MLP"
                parts.append(f"no {what}: no {block} block of a form the pass prunes was found")
            else:
                parts.append(f"no {what} (ratio {o['ratio']}, rounded down, with min-keep {o['min_keep']}, "
                             f"removes none{hint})")
        elif entry["pass"] == "prune-heads":
            parts.append(f"{entry.get('heads', 0)} heads ({entry.get('kv_heads', 0)} KV)")
        elif entry["pass"] == "prune-mlp":
            parts.append(f"{entry.get('channels', 0)} MLP channels")
        else:
            zeroed, total = entry.get("zeroed", 0), entry.get("entries", 0)
            parts.append(f"{entry['pass']} zeroed {zeroed}/{total} weights (mask only, no speed-up)")
    line = "pruned    " + ", ".join(parts)
    if p["parameters_removed"]:
        share = p["parameters_removed"] / p["parameters_before"] if p["parameters_before"] else 0.0
        line += f": {p['parameters_removed']:,} parameters ({share:.1%})"
    f = p.get("block_flops")
    if f:
        line += f", block FLOPs -{f['removed_fraction']:.1%} at seq {f['seq_len']}"
    return line
