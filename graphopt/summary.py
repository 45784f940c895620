"""What `graphopt inspect` reports about a graph: op histogram, parameters, signature."""
from __future__ import annotations

import re

import collections

from graphopt.errors import UserError
from graphopt.manifest import artifact_file, read_manifest
from graphopt.ir import Graph


def _values_per_byte(graph: Graph) -> dict[str, int]:
    """Initializers that hold packed values (the u8 inputs of an op with `bits` below 8: a
    packed weight or its zero points), with how many values a byte holds."""
    packed = {}
    for n in graph.nodes:
        bits = n.attr("bits")
        if not isinstance(bits, int) or not 0 < bits < 8 or 8 % bits:
            continue
        for v in n.inputs:
            if v is not None and v.name in graph.initializers and v.type.dtype.short == "u8":
                packed[v.name] = 8 // bits
    return packed


def summarize(graph: Graph) -> dict:
    """`parameters.count` counts values: a byte of a packed 4-bit weight holds two."""
    ops = collections.Counter(n.op for n in graph.nodes)
    by_dtype: dict[str, dict[str, int]] = {}
    packed = _values_per_byte(graph)
    for v in graph.initializers.values():
        a = v.const_value
        d = by_dtype.setdefault(v.type.dtype.short, {"count": 0, "bytes": 0, "tensors": 0})
        d["count"] += int(a.size) * packed.get(v.name, 1)
        d["bytes"] += int(a.nbytes)
        d["tensors"] += 1
    md = graph.metadata
    return {
        "graph": graph.name,
        "source": md.source,
        "producer": f"{md.producer_name} {md.producer_version}".strip(),
        "opset": dict(sorted(graph.opset.items())),
        "source_opset": md.source_opset,
        "nodes": len(graph.nodes),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": {
            "count": sum(d["count"] for d in by_dtype.values()),
            "bytes": sum(d["bytes"] for d in by_dtype.values()),
            "tensors": len(graph.initializers),
            "by_dtype": by_dtype,
        },
        "inputs": [{"name": v.name, "type": str(v.type)} for v in graph.inputs],
        "outputs": [{"name": v.name, "type": str(v.type)} for v in graph.outputs],
    }


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary(s: dict) -> str:
    p = s["parameters"]
    lines = [
        f"model      {s['source'] or s['graph']}",
        f"producer   {s['producer'] or '-'}",
        "opset      " + ", ".join(f"{k or 'ai.onnx'} {v}" for k, v in s["opset"].items())
        + (f" (imported from opset {s['source_opset']})" if s["source_opset"] and s["source_opset"] != s["opset"].get("") else ""),
        f"parameters {p['count']:,} in {p['tensors']} tensors, {_human_bytes(p['bytes'])}"
        + ("" if not p["by_dtype"] else " (" + ", ".join(f"{k}: {v['count']:,}" for k, v in p["by_dtype"].items()) + ")"),
        "inputs",
        *[f"  {x['name']}: {x['type']}" for x in s["inputs"]],
        "outputs",
        *[f"  {x['name']}: {x['type']}" for x in s["outputs"]],
        f"ops        {s['nodes']} nodes",
    ]
    width = max((len(k) for k in s["ops"]), default=0)
    lines += [f"  {k:<{width}}  {v:>5}" for k, v in s["ops"].items()]
    return "\n".join(lines)


def summarize_artifact(folder) -> dict:
    """An optimized artifact folder: its manifest, and for ONNX Runtime artifacts the op
    histogram of the lowered model (which holds backend kernels the IR does not import)."""
    from pathlib import Path

    folder = Path(folder)
    manifest = read_manifest(folder)
    def typ(e):
        shape = "*" if e["shape"] is None else ", ".join("?" if d is None else str(d) for d in e["shape"])
        return f"{e['dtype']}[{shape}]"

    out = {"artifact": str(folder), "backend": manifest.get("backend"), "target": manifest.get("target"),
           "inputs": [{"name": e["name"], "type": typ(e)} for e in manifest["signature"]["inputs"]],
           "outputs": [{"name": e["name"], "type": typ(e)} for e in manifest["signature"]["outputs"]],
           "versions": manifest.get("versions", {})}
    model = artifact_file(folder, manifest.get("model", "model.onnx"), f"{folder}/manifest.json: model")
    if model.suffix == ".onnx" and model.is_file():
        import onnx

        try:
            m = onnx.load(str(model), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError on a truncated or corrupt file
            raise UserError(f"{model}: not a valid ONNX model ({type(e).__name__})") from None
        ops = collections.Counter((n.domain + "." if n.domain else "") + n.op_type for n in m.graph.node)
        out["nodes"] = len(m.graph.node)
        out["ops"] = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def _per_layer(values: list[dict]) -> list[str]:
    """Signature lines, with per-layer values of one type (past_key_values.3.key, ...) on one
    line: `past_key_values.{0..5}.key: f32[...]` (--json lists every one)."""
    groups: dict[tuple, list[int]] = {}
    order: list = []
    for x in values:
        m = _LAYER_INDEX.fullmatch(x["name"])
        key = (m.group(1), m.group(3), x["type"]) if m else (x["name"], None, x["type"])
        if key not in groups:
            order.append(key)
            groups[key] = []
        if m:
            groups[key].append(int(m.group(2)))
    lines = []
    for key in order:
        prefix, suffix, typ = key
        idx = groups[key]
        if suffix is None:
            lines.append(f"  {prefix}: {typ}")
        elif len(idx) == 1:
            lines.append(f"  {prefix}.{idx[0]}.{suffix}: {typ}")
        else:
            lines.append(f"  {prefix}.{{{min(idx)}..{max(idx)}}}.{suffix}: {typ}  ({len(idx)} layers)")
    return lines


_LAYER_INDEX = re.compile(r"(.+)\.(\d+)\.([^.]+)")


def format_artifact(s: dict) -> str:
    lines = [f"artifact   {s['artifact']}", f"backend    {s['backend']} ({s['target']})", "inputs",
             *_per_layer(s["inputs"]), "outputs", *_per_layer(s["outputs"])]
    if "ops" in s:
        lines.append(f"ops        {s['nodes']} nodes")
        width = max((len(k) for k in s["ops"]), default=0)
        lines += [f"  {k:<{width}}  {v:>5}" for k, v in s["ops"].items()]
    return "\n".join(lines)
