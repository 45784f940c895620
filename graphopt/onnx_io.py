"""ONNX import and export without loss.

Import (`load_onnx`, `from_onnx_model`):
- models at another opset are converted to `CANONICAL_OPSET` with `onnx.version_converter`,
  after the fused ops of newer opsets (Attention, RMSNormalization, RotaryEmbedding) are
  mapped onto graphopt ops;
- local functions are inlined (`onnx.inliner`); control flow (graph attributes), sparse
  tensors, non-tensor types and unsupported element types are refused with an error that
  names the node or tensor -- never dropped;
- external-data weights are memory-mapped, not read; a path that leaves the model's folder
  is refused. Empty optional inputs/outputs survive as `None`.

Export (`to_onnx_model`, `save_onnx`) writes weights either inline or into one external data
file, streaming tensor by tensor, so models over the 2 GB protobuf limit round-trip.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import (
    CANONICAL_OPSET, GRAPHOPT_DOMAIN, GRAPHOPT_OPSET, Attr, Graph, GraphMetadata, Node,
    NodeMeta, TensorType, Value,
)
from graphopt.onnx_proto import (  # noqa: F401  (OnnxImportError and the converters are part of this module's API)
    OnnxImportError, array_to_proto, attr_to_proto, node_to_proto, tensor_type_from_proto, type_to_proto,
    write_array,
)
from graphopt.registry import UnknownOpError, get_op, infer_types

# Above this many bytes of weights, `save_onnx` writes external data by default.
EXTERNAL_DATA_THRESHOLD = 1 << 30
PROTOBUF_LIMIT = (1 << 31) - (1 << 20)  # a serialized protobuf message must stay under 2 GiB

# Fused ops of newer ONNX opsets that graphopt holds as its own ops:
# onnx op -> (graphopt op, {onnx attr: graphopt attr}); attributes not listed are refused
# unless they have their default value.
_NEWER_FUSED_OPS = {
    "Attention": ("Attention", {"q_num_heads": "num_heads", "kv_num_heads": "kv_num_heads",
                                "is_causal": "causal", "scale": "scale", "softcap": "softcap"}),
    "RMSNormalization": ("RMSNorm", {"axis": "axis", "epsilon": "epsilon"}),
    "RotaryEmbedding": ("RotaryEmbedding", {"interleaved": "interleaved", "num_heads": "num_heads",
                                            "rotary_embedding_dim": "rotary_embedding_dim"}),
}
# Attributes accepted only at these values (graphopt computes softmax and norms in float32).
_IGNORABLE_DEFAULTS = {"qk_matmul_output_mode": 0, "stash_type": 1, "softmax_precision": 1}


# --------------------------------------------------------------------------------------
# Tensors


def _array_from_proto(t: TensorProto, base_dir: Path | None, what: str) -> np.ndarray:
    try:
        dtype = DType.from_onnx(t.data_type)
    except ValueError as e:
        raise OnnxImportError(f"{what}: {e}") from None
    if t.data_location == TensorProto.EXTERNAL:
        return _map_external(t, base_dir, dtype, what)
    if t.segment.begin or t.segment.end:
        raise OnnxImportError(f"{what}: segmented tensors are not supported")
    try:
        array = onnx.numpy_helper.to_array(t)
    except ValueError as e:  # the data does not fit the dims (a corrupt or hand-edited file)
        raise OnnxImportError(f"{what}: its data does not match its shape {list(t.dims)} ({e})") from None
    return array.astype(dtype.np_dtype, copy=False)


def _map_external(t: TensorProto, base_dir: Path | None, dtype: DType, what: str) -> np.ndarray:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if base_dir is None:
        raise OnnxImportError(f"{what}: external data {location!r} but the model was not loaded from a file")
    if not location or os.path.isabs(location):
        raise OnnxImportError(f"{what}: external data path {location!r} must be relative to the model's folder")
    base = base_dir.resolve()
    path = (base / location).resolve()
    if base != path and base not in path.parents:
        raise OnnxImportError(f"{what}: external data path {location!r} points outside the model's folder")
    if not path.is_file():
        raise OnnxImportError(f"{what}: external data file {str(path)!r} does not exist")
    shape = tuple(int(d) for d in t.dims)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", nbytes))
    except ValueError:
        raise OnnxImportError(f"{what}: external data offset {info.get('offset')!r} / length "
                              f"{info.get('length')!r} is not an integer") from None
    if offset < 0 or any(d < 0 for d in shape):
        raise OnnxImportError(f"{what}: external data has a negative offset or dimension")
    if length != nbytes:
        raise OnnxImportError(f"{what}: external data length {length} does not match its shape {list(shape)}")
    size = path.stat().st_size
    if offset + nbytes > size:
        raise OnnxImportError(f"{what}: external data file {location!r} is too short ({size} bytes, needs {offset + nbytes})")
    if nbytes == 0 or len(shape) == 0:
        with open(path, "rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(nbytes), dtype=dtype.np_dtype).reshape(shape).copy()
    return np.memmap(path, dtype=dtype.np_dtype, mode="r", offset=offset, shape=shape)


# --------------------------------------------------------------------------------------
# Attributes and nodes


def attr_from_proto(a: AttributeProto, what: str) -> Attr:
    T = AttributeProto
    if a.ref_attr_name:
        raise OnnxImportError(f"{what}: attribute {a.name!r} refers to a function attribute")
    if a.type == T.INT:
        return Attr.int(a.i)
    if a.type == T.FLOAT:
        return Attr.float(a.f)
    if a.type == T.STRING:
        return Attr.string(a.s.decode("utf-8"))
    if a.type == T.TENSOR:
        return Attr.tensor(_array_from_proto(a.t, None, f"{what}, attribute {a.name!r}"))
    if a.type == T.INTS:
        return Attr.ints(list(a.ints))
    if a.type == T.FLOATS:
        return Attr.floats(list(a.floats))
    if a.type == T.STRINGS:
        return Attr.strings([s.decode("utf-8") for s in a.strings])
    if a.type in (T.GRAPH, T.GRAPHS):
        raise OnnxImportError(f"{what}: attribute {a.name!r} holds a subgraph; control flow is not supported by graphopt")
    kind = T.AttributeType.Name(a.type)
    raise OnnxImportError(f"{what}: attribute {a.name!r} of type {kind} is not supported by graphopt")


# --------------------------------------------------------------------------------------
# Import


def _check_text_fields(model: onnx.ModelProto, path: Path) -> None:
    """protobuf hands back `bytes` for a string field that is not UTF-8 (a corrupt file)."""
    g = model.graph
    names = [n for node in g.node for n in (node.op_type, node.domain, node.name, *node.input, *node.output)]
    names += [v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer)]
    names += [o.domain for o in model.opset_import]
    for name in names:
        if not isinstance(name, str):
            raise OnnxImportError(f"{path}: the name {name!r} is not UTF-8 text (a corrupt file)")


def load_onnx(path: str | os.PathLike) -> Graph:
    """Read an `.onnx` file (with its external data) into a graphopt `Graph`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a valid ONNX model (truncated or corrupt file: {str(e).splitlines()[0][:120]})") from None
    _check_text_fields(model, path)
    try:
        return from_onnx_model(model, base_dir=path.parent, source=str(path))
    except OnnxImportError as e:
        raise OnnxImportError(f"{path}: {e}") from None


def from_onnx_model(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None, source: str = "") -> Graph:
    base_dir = None if base_dir is None else Path(base_dir)
    g = model.graph
    if not model.opset_import:
        raise OnnxImportError("the model declares no opset (truncated or not an ONNX model)")
    if not g.output:
        raise OnnxImportError("the model's graph has no outputs (truncated or not an ONNX model)")
    if len(g.sparse_initializer):
        raise OnnxImportError(f"sparse initializer {g.sparse_initializer[0].values.name!r} is not supported by graphopt")
    if model.functions:
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(model)
        g = model.graph
    for n in g.node:
        for a in n.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise OnnxImportError(f"node {n.name or n.op_type!r} ({n.op_type}) holds a subgraph; "
                                      "control flow (If/Loop/Scan) is not supported by graphopt")
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    source_opset = opsets.get("", 0)
    for n in g.node:
        dom = "" if n.domain == "ai.onnx" else n.domain
        if dom not in ("", GRAPHOPT_DOMAIN):
            raise OnnxImportError(f"node {n.name or n.op_type!r} uses op {n.domain}.{n.op_type}: "
                                  f"domain {n.domain!r} is not supported by graphopt")
    for t in g.initializer:  # before the opset converter, which asserts on element types it refuses
        try:
            DType.from_onnx(t.data_type)
        except ValueError as e:
            raise OnnxImportError(f"initializer {t.name!r}: {e}") from None
    import onnx.defs  # (a local name here: `import onnx.inliner` above binds it)

    newest = onnx.defs.onnx_opset_version()
    if source_opset > newest:
        raise OnnxImportError(f"opset {source_opset} is newer than the installed onnx {onnx.__version__} knows "
                              f"(up to {newest}); export the model at opset {CANONICAL_OPSET}")
    model = _map_newer_fused_ops(model)
    if source_opset and source_opset != CANONICAL_OPSET:
        model = _convert_opset(model, source_opset)
    graph_ir = _build_graph(model, base_dir)
    graph_ir.metadata.source = source
    graph_ir.metadata.source_opset = source_opset
    return graph_ir


def _map_newer_fused_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    if not any(n.domain in ("", "ai.onnx") and n.op_type in _NEWER_FUSED_OPS for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in _NEWER_FUSED_OPS:
            continue
        new_op, renames = _NEWER_FUSED_OPS[n.op_type]
        attrs = []
        for a in n.attribute:
            if a.name in renames:
                b = AttributeProto()
                b.CopyFrom(a)
                b.name = renames[a.name]
                attrs.append(b)
            elif a.name in _IGNORABLE_DEFAULTS and onnx.helper.get_attribute_value(a) == _IGNORABLE_DEFAULTS[a.name]:
                continue
            else:
                raise OnnxImportError(f"node {n.name or n.op_type!r} ({n.op_type}): attribute {a.name!r} "
                                      f"is not supported by graphopt.{new_op}")
        if n.op_type == "Attention" and len(n.output) > 3 and n.output[3]:
            raise OnnxImportError(f"node {n.name or n.op_type!r} (Attention): the qk_matmul output is not supported")
        if n.op_type == "Attention" and len(n.input) > 6 and n.input[6]:
            raise OnnxImportError(f"node {n.name or n.op_type!r} (Attention): nonpad_kv_seqlen is not supported")
        del n.attribute[:]
        n.attribute.extend(attrs)
        n.op_type, n.domain = new_op, GRAPHOPT_DOMAIN
        if n.op_type == "Attention":
            del n.output[3:]
    if not any(o.domain == GRAPHOPT_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(GRAPHOPT_DOMAIN, GRAPHOPT_OPSET))
    return model


def _convert_opset(model: onnx.ModelProto, source_opset: int) -> onnx.ModelProto:
    import onnx.version_converter

    # The converter rewrites default-domain nodes only; graphopt nodes pass through as they are.
    try:
        return onnx.version_converter.convert_version(model, CANONICAL_OPSET)
    except Exception as e:
        text = str(e).strip()
        # the converter's C++ assertions: "/project/onnx/...h:96: fn: Assertion `...` failed: what"
        text = text.split("failed: ", 1)[1] if "Assertion `" in text and "failed: " in text else text
        raise OnnxImportError(f"cannot convert from opset {source_opset} to graphopt's opset "
                              f"{CANONICAL_OPSET}: {text.splitlines()[0][:200]}") from None


def _build_graph(model: onnx.ModelProto, base_dir: Path | None) -> Graph:
    import onnx.shape_inference

    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        types_src = inferred.graph
    except Exception:
        types_src = g
    types: dict[str, onnx.TypeProto] = {}
    for vi in list(types_src.value_info) + list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.WhichOneof("value") is not None:
            types[vi.name] = vi.type

    graph = Graph(g.name or "main")
    graph.opset = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    graph.opset[""] = CANONICAL_OPSET
    graph.metadata = GraphMetadata(
        producer_name=model.producer_name, producer_version=model.producer_version,
        domain=model.domain, model_version=model.model_version, ir_version=model.ir_version,
        doc_string=model.doc_string, graph_doc_string=g.doc_string,
        metadata_props={p.key: p.value for p in model.metadata_props},
    )
    values: dict[str, Value] = {}

    def typed(name: str, what: str) -> TensorType | None:
        tp = types.get(name)
        return None if tp is None else tensor_type_from_proto(tp, what)

    for init in g.initializer:
        if init.name in values:
            raise OnnxImportError(f"initializer {init.name!r} is defined twice")
        arr = _array_from_proto(init, base_dir, f"initializer {init.name!r}")
        values[init.name] = graph.add_initializer(init.name, arr)
    for inp in g.input:
        if inp.name in values:  # an initializer that is also an input (overridable default)
            v = values[inp.name]
            declared = tensor_type_from_proto(inp.type, f"graph input {inp.name!r}")
            if declared is not None:
                v.type = declared
            graph.inputs.append(v)
            continue
        t = tensor_type_from_proto(inp.type, f"graph input {inp.name!r}")
        if t is None:
            raise OnnxImportError(f"graph input {inp.name!r} has no element type")
        values[inp.name] = graph.add_input(inp.name, t)

    for i, n in enumerate(g.node):
        nname = n.name or f"{n.op_type}_{i}"
        what = f"node {nname!r} ({n.op_type})"
        ins = []
        for name in n.input:
            if name == "":
                ins.append(None)
            elif name not in values:
                raise OnnxImportError(f"{what} uses value {name!r}, which is never defined before it")
            else:
                ins.append(values[name])
        attrs = {a.name: attr_from_proto(a, what) for a in n.attribute}
        outs: list[Value | None] = []
        for name in n.output:
            if name == "":
                outs.append(None)
                continue
            if name in values:
                raise OnnxImportError(f"{what} redefines value {name!r}")
            v = Value(name, typed(name, f"value {name!r}"))
            values[name] = v
            outs.append(v)
        node = Node(n.op_type, ins, outs, attrs, domain=n.domain, name=nname,
                    meta=NodeMeta(doc_string=n.doc_string,
                                  metadata_props=tuple((p.key, p.value) for p in n.metadata_props)))
        graph.append(node)
        try:
            get_op(node.domain, node.op_type)
        except UnknownOpError:
            raise OnnxImportError(f"{what}: op {node.op} is not known at opset {CANONICAL_OPSET}") from None
        if any(v is not None and (v.type is None or v.type.shape is None) for v in outs):
            try:
                inferred_types = infer_types(node)
            except UserError:
                inferred_types = [None] * len(outs)
            for v, t in zip(outs, inferred_types):
                if v is not None and t is not None and (v.type is None or v.type.shape is None):
                    v.type = t
    for out in g.output:
        if out.name not in values:
            raise OnnxImportError(f"graph output {out.name!r} is never defined")
        v = values[out.name]
        declared = tensor_type_from_proto(out.type, f"graph output {out.name!r}")
        if declared is not None and (v.type is None or (v.type.shape is None and declared.shape is not None)):
            v.type = declared
        graph.outputs.append(v)
    return graph


# --------------------------------------------------------------------------------------
# Export


def to_onnx_model(graph: Graph, *, external: dict[str, tuple[str, int, int]] | None = None) -> onnx.ModelProto:
    """The graph as an `onnx.ModelProto`. With `external` (name -> (location, offset, length)),
    those initializers are written as external-data references instead of inline bytes."""
    m = onnx.ModelProto()
    md = graph.metadata
    m.ir_version = min(max(md.ir_version, 9), onnx.IR_VERSION)
    m.producer_name = md.producer_name or "graphopt"
    m.producer_version = md.producer_version
    m.domain = md.domain
    m.model_version = md.model_version
    m.doc_string = md.doc_string
    for k, v in md.metadata_props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    used_domains = {n.domain for n in graph.nodes}
    for dom, ver in sorted(graph.opset.items()):
        if dom == "" or dom in used_domains:
            m.opset_import.append(onnx.helper.make_opsetid(dom, ver))
    for dom in sorted(used_domains - set(graph.opset)):
        m.opset_import.append(onnx.helper.make_opsetid(dom, GRAPHOPT_OPSET if dom == GRAPHOPT_DOMAIN else 1))
    g = m.graph
    g.name = graph.name
    g.doc_string = md.graph_doc_string

    def vi(v: Value) -> onnx.ValueInfoProto:
        p = onnx.ValueInfoProto()
        p.name = v.name
        if v.type is not None:
            p.type.CopyFrom(type_to_proto(v.type))
        return p

    for v in graph.inputs:
        g.input.append(vi(v))
    for v in graph.outputs:
        g.output.append(vi(v))
    for name, v in graph.initializers.items():
        if external is not None and name in external:
            loc, off, length = external[name]
            t = TensorProto()
            t.name = name
            t.data_type = v.type.dtype.onnx_type
            t.dims.extend(v.const_value.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, val in (("location", loc), ("offset", str(off)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, val
            g.initializer.append(t)
        else:
            g.initializer.append(array_to_proto(np.asarray(v.const_value), name))
    for n in graph.nodes:
        g.node.append(node_to_proto(n))
        for v in n.outputs:
            if v is not None and v.type is not None and not v.is_graph_output:
                g.value_info.append(vi(v))
    return m


def save_onnx(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
              size_threshold: int = 1024) -> list[Path]:
    """Write `graph` to `path`. Weights of `size_threshold` bytes or more go to
    `<name>.onnx.data` beside it when `external_data` is true (by default: when the weights
    total more than 1 GiB). Returns the files written."""
    path = Path(path)
    total = sum(v.const_value.nbytes for v in graph.initializers.values())
    if external_data is None:
        external_data = total > EXTERNAL_DATA_THRESHOLD
    if not external_data and total >= PROTOBUF_LIMIT:
        raise UserError(f"{path}: the weights total {total / 2**30:.2f} GiB; an ONNX file over 2 GiB "
                        "needs external data (use external_data=True / --external-data)")
    written = [path]
    external = None
    if external_data:
        data_name = path.name + ".data"
        external = {}
        offset = 0
        with open(path.parent / data_name, "wb") as f:
            for name, v in graph.initializers.items():
                arr = v.const_value
                if arr.nbytes < size_threshold:
                    continue
                align = 4096 if arr.nbytes >= (1 << 20) else 64
                pad = (-offset) % align
                if pad:
                    f.write(b"\0" * pad)
                    offset += pad
                write_array(f, arr)
                external[name] = (data_name, offset, arr.nbytes)
                offset += arr.nbytes
        written.append(path.parent / data_name)
    model = to_onnx_model(graph, external=external)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return written
