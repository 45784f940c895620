"""The textual form of the IR: `print_graph` and `parse_graph`, which round-trip.

    opset {"": 20, "graphopt": 1}
    weights "model.safetensors"
    graph @block(%x: f32[batch, seq, 256]) -> (f32[batch, seq, 256]) {
      weights {
        @wq: f32[256, 256]
      }
      %q = MatMul(%x, @wq) : f32[batch, seq, 256] loc("/attn/q_proj/MatMul")
      %a = graphopt.RMSNorm(%q, @s) {epsilon=1e-05} : f32[batch, seq, 256] loc("norm")
      return %a
    }

- `%name` is a value, `@name` an initializer (its data lives in the weights file); names that
  are not plain identifiers are quoted: `%"onnx::MatMul_12"`. `_` is an absent optional
  input or output.
- Attributes: `3` (int), `3.0` / `1e-05` (float), `"s"`, `[1, 2]`, `[1.0]`, `["a"]`, typed
  empty lists `ints[]`, `floats[]`, `strings[]`, tensors `dense<f32[2]>[1.0, 2.0]`, or, for
  large ones, `dense<f32[4096]>@"key"` with the data in the weights file.
- `loc("...")` is the node's name. Per-node debug info (ONNX doc strings and metadata
  properties) is not part of the text form.
- Header lines before `graph`: `opset {json}`, `metadata {json}`, `weights "file"`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.dtypes import DType
from graphopt.errors import ParseError
from graphopt.ir import (CANONICAL_OPSET, GRAPHOPT_DOMAIN, GRAPHOPT_OPSET, Attr, AttrKind, Graph, GraphMetadata, Node,
                         TensorType, Value)
from graphopt.weights_file import write_tensors, read_tensors

INLINE_TENSOR_LIMIT = 64  # elements; larger tensor attributes go to the weights file

_IDENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*\Z")


def _name(sigil: str, name: str) -> str:
    return sigil + name if _IDENT.match(name) and name != "_" else sigil + json.dumps(name)


def _fmt_float(x: float, dtype: DType = DType.FLOAT32) -> str:
    if dtype is DType.FLOAT64:
        s = repr(float(x))
    else:
        s = str(dtype.np_dtype.type(x))
    if not any(c in s for c in ".eEn"):  # 'inf', 'nan' contain 'n'
        s += ".0"
    return s


def _fmt_type(t: TensorType | None) -> str:
    return "?" if t is None else str(t)


def tensor_attr_key(node: Node, attr: str) -> str:
    return f"{node.name}::{attr}"


def _fmt_attr(node: Node, key: str, a: Attr, external: dict[str, np.ndarray] | None) -> str:
    k, v = a.kind, a.value
    if k is AttrKind.INT:
        return str(v)
    if k is AttrKind.FLOAT:
        return _fmt_float(v)
    if k is AttrKind.STRING:
        return json.dumps(v)
    if k is AttrKind.INTS:
        return "[" + ", ".join(map(str, v)) + "]" if v else "ints[]"
    if k is AttrKind.FLOATS:
        return "[" + ", ".join(_fmt_float(x) for x in v) + "]" if v else "floats[]"
    if k is AttrKind.STRINGS:
        return "[" + ", ".join(json.dumps(x) for x in v) + "]" if v else "strings[]"
    dtype = DType.from_numpy(v.dtype)
    head = f"dense<{TensorType(dtype, v.shape)}>"
    if v.size > INLINE_TENSOR_LIMIT and external is not None:
        # ONNX allows two nodes of one name, and an initializer may be named "k::value": a key
        # already taken gets a number, or one tensor would overwrite the other in the weights file
        base = ekey = tensor_attr_key(node, key)
        weights = node.graph.initializers if node.graph is not None else {}
        n = 2
        while ekey in external or ekey in weights:
            ekey, n = f"{base}#{n}", n + 1
        external[ekey] = v
        return f"{head}@{json.dumps(ekey)}"
    flat = v.reshape(-1)
    if dtype.is_float:
        items = [_fmt_float(x, dtype) for x in flat]
    elif dtype is DType.BOOL:
        items = ["true" if x else "false" for x in flat]
    else:
        items = [str(int(x)) for x in flat]
    return f"{head}[{', '.join(items)}]"


def print_graph(graph: Graph, *, weights_file: str | None = None,
                external: dict[str, np.ndarray] | None = None, header: bool = True) -> str:
    """The graph as text. Tensor attributes over `INLINE_TENSOR_LIMIT` elements are put in
    `external` (when given) and referenced by key."""
    out: list[str] = []
    if header:
        out.append("opset " + json.dumps(dict(sorted(graph.opset.items()))))
        md = _metadata_json(graph.metadata)
        if md:
            out.append("metadata " + json.dumps(md, sort_keys=True))
        if weights_file is not None:
            out.append("weights " + json.dumps(weights_file))
    params = []
    for v in graph.inputs:
        params.append(f"{_name('@' if v.is_initializer else '%', v.name)}: {_fmt_type(v.type)}")
    results = ", ".join(_fmt_type(v.type) for v in graph.outputs)
    out.append(f"graph {_name('@', graph.name)}({', '.join(params)}) -> ({results}) {{")
    inits = [v for v in graph.initializers.values() if not v.is_graph_input]
    if inits:
        out.append("  weights {")
        for v in inits:
            out.append(f"    {_name('@', v.name)}: {_fmt_type(v.type)}")
        out.append("  }")
    for n in graph.nodes:
        outs = ", ".join("_" if v is None else _name("%", v.name) for v in n.outputs)
        ins = ", ".join("_" if v is None else _name("@" if v.is_initializer else "%", v.name) for v in n.inputs)
        line = f"  {outs} = {n.op}({ins})"
        if n.attrs:
            line += " {" + ", ".join(f"{k}={_fmt_attr(n, k, n.attrs[k], external)}" for k in sorted(n.attrs)) + "}"
        types = ", ".join(_fmt_type(v.type) for v in n.outputs if v is not None)
        if types:
            line += f" : {types}"
        if n.name:
            line += f" loc({json.dumps(n.name)})"
        out.append(line)
    out.append("  return " + ", ".join(_name("@" if v.is_initializer else "%", v.name) for v in graph.outputs))
    out.append("}")
    return "\n".join(out) + "\n"


def _metadata_json(md: GraphMetadata) -> dict:
    d = {}
    for k, default in (("producer_name", ""), ("producer_version", ""), ("domain", ""), ("model_version", 0),
                       ("ir_version", 0), ("doc_string", ""), ("graph_doc_string", ""), ("source", ""),
                       ("source_opset", 0), ("exporter", ""), ("export_seconds", 0.0)):
        val = getattr(md, k)
        if val != default:
            d[k] = val
    if md.metadata_props:
        d["metadata_props"] = dict(md.metadata_props)
    if md.passes:
        d["passes"] = list(md.passes)
    return d


# --------------------------------------------------------------------------------------
# Parsing

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+|\#[^\n]*)
  | (?P<nl>\n)
  | (?P<sname>[%@]"(?:[^"\\]|\\.)*")
  | (?P<name>[%@][A-Za-z0-9_][A-Za-z0-9_.]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>[-+]?(?:(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|inf|nan)(?![A-Za-z0-9_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<arrow>->)
  | (?P<punct>[()\[\]{},:=<>*?])
""", re.VERBOSE)


class _Tok:
    __slots__ = ("kind", "text", "line", "col")

    def __init__(self, kind, text, line, col):
        self.kind, self.text, self.line, self.col = kind, text, line, col

    def __repr__(self):
        return f"{self.kind}:{self.text!r}@{self.line}"


class _Parser:
    def __init__(self, text: str, filename: str, load_external: Callable[[str], np.ndarray] | None,
                 line_offset: int = 0):
        self.filename = filename
        self.load_external = load_external
        self.toks: list[_Tok] = []
        pos, line, line_start = 0, 1 + line_offset, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                self.fail_at(line, pos - line_start + 1, f"unexpected character {text[pos]!r}")
            kind = m.lastgroup
            if kind == "nl":
                line, line_start = line + 1, m.end()
            elif kind != "ws":
                self.toks.append(_Tok(kind, m.group(), line, pos - line_start + 1))
            pos = m.end()
        self.toks.append(_Tok("eof", "", line, 1))
        self.i = 0

    def fail_at(self, line, col, msg):
        raise ParseError(f"{self.filename}:{line}:{col}: {msg}")

    def fail(self, msg, tok=None):
        tok = tok or self.peek()
        self.fail_at(tok.line, tok.col, msg + (f" (found {tok.text!r})" if tok.text else " (found end of input)"))

    def peek(self, k=0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return t

    def accept(self, text) -> bool:
        if self.peek().text == text and self.peek().kind in ("punct", "arrow", "ident"):
            self.next()
            return True
        return False

    def expect(self, text) -> _Tok:
        if not self.accept(text):
            self.fail(f"expected {text!r}")
        return self.toks[self.i - 1]

    def value_name(self, sigils="%@") -> tuple[str, str]:
        t = self.next()
        if t.kind not in ("name", "sname") or t.text[0] not in sigils:
            self.fail(f"expected a value name starting with {' or '.join(sigils)}", t)
        body = t.text[1:]
        return t.text[0], (self.json_string(t, body) if t.kind == "sname" else body)

    def string(self) -> str:
        t = self.next()
        if t.kind != "string":
            self.fail("expected a string", t)
        return self.json_string(t, t.text)

    def json_string(self, tok, text: str) -> str:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            self.fail_at(tok.line, tok.col, f"bad string literal {text!r}: {e.msg}")

    def integer(self) -> int:
        t = self.next()
        if t.kind != "number" or not re.fullmatch(r"[-+]?\d+", t.text):
            self.fail("expected an integer", t)
        return int(t.text)

    # -- types -------------------------------------------------------------------

    def tensor_type(self) -> TensorType | None:
        if self.accept("?"):
            return None
        t = self.next()
        if t.kind != "ident":
            self.fail("expected a type such as f32[batch, 16]", t)
        try:
            dtype = DType.from_short(t.text)
        except ValueError:
            self.fail(f"unknown element type {t.text!r}", t)
        self.expect("[")
        if self.accept("*"):
            self.expect("]")
            return TensorType(dtype, None)
        dims: list = []
        if not self.accept("]"):
            while True:
                d = self.peek()
                if d.text == "?":
                    self.next()
                    dims.append(None)
                elif d.kind == "number":
                    dims.append(self.integer())
                elif d.kind == "ident":
                    dims.append(self.next().text)
                elif d.kind == "string":
                    dims.append(self.string())
                else:
                    self.fail("expected a dimension (an integer, a symbol or ?)")
                if self.accept("]"):
                    break
                self.expect(",")
        return TensorType(dtype, tuple(dims))

    # -- attributes --------------------------------------------------------------

    def number_token(self) -> _Tok:
        t = self.next()
        if t.kind != "number":
            self.fail("expected a number", t)
        return t

    def attr_value(self) -> Attr:
        t = self.peek()
        if t.kind == "number":
            self.next()
            if re.fullmatch(r"[-+]?\d+", t.text):
                return Attr.int(self.int64(t))
            self.check_finite([t.text], DType.FLOAT32, t)
            return Attr.float(float(t.text))
        if t.kind == "string":
            return Attr.string(self.string())
        if t.kind == "ident" and t.text in ("ints", "floats", "strings"):
            self.next()
            self.expect("[")
            self.expect("]")
            return Attr(AttrKind(t.text), ())
        if t.kind == "ident" and t.text == "dense":
            return Attr.tensor(self.dense())
        if t.text == "[":
            self.next()
            items: list[_Tok] = []
            if not self.accept("]"):
                while True:
                    items.append(self.next())
                    if self.accept("]"):
                        break
                    self.expect(",")
            kinds = {x.kind for x in items}
            if kinds == {"string"}:
                return Attr.strings([self.json_string(x, x.text) for x in items])
            if kinds == {"number"}:
                if all(re.fullmatch(r"[-+]?\d+", x.text) for x in items):
                    return Attr.ints([self.int64(x) for x in items])
                if all(not re.fullmatch(r"[-+]?\d+", x.text) for x in items):
                    for x in items:
                        self.check_finite([x.text], DType.FLOAT32, x)
                    return Attr.floats([float(x.text) for x in items])
                self.fail("a list attribute mixes ints and floats (write every float with a '.')", t)
            self.fail("a list attribute holds ints, floats or strings", t)
        self.fail("expected an attribute value")

    def int64(self, t: _Tok) -> int:
        """An integer attribute: ONNX holds them as int64."""
        v = int(t.text)
        if not -2**63 <= v < 2**63:
            self.fail_at(t.line, t.col, f"{t.text} is outside the int64 range of an attribute")
        return v

    def check_finite(self, items: list[str], dtype: DType, t: _Tok) -> None:
        """A finite literal the type cannot hold is refused rather than read as infinity
        (write `inf` for infinity); one that rounds to the type's largest value is kept."""
        with np.errstate(over="ignore"):
            wide = np.array([float(x) for x in items], dtype=np.float64)
            narrow = wide.astype(dtype.np_dtype).astype(np.float64)
        bad = np.isfinite(wide) & ~np.isfinite(narrow)
        if bad.any():
            x = items[int(np.argmax(bad))]
            self.fail_at(t.line, t.col, f"{x} is outside {dtype.short}'s range "
                                        f"(largest {float(np.finfo(dtype.np_dtype).max):g}; write inf for infinity)")

    def dense(self) -> np.ndarray:
        self.expect("dense")
        self.expect("<")
        tt = self.tensor_type()
        self.expect(">")
        if tt is None or not tt.is_static:
            self.fail("a dense tensor needs a static shape")
        t = self.peek()
        if t.kind in ("sname", "name"):
            sig, key = self.value_name("@")
            if self.load_external is None:
                self.fail_at(t.line, t.col, f"tensor {key!r} lives in a weights file, but none was given")
            try:
                arr = self.load_external(key)
            except KeyError:
                self.fail_at(t.line, t.col, f"tensor {key!r} is not in the weights file")
            if arr.dtype != tt.dtype.np_dtype or tuple(arr.shape) != tt.shape:
                self.fail_at(t.line, t.col, f"tensor {key!r} in the weights file is {TensorType.of(arr)}, expected {tt}")
            return np.asarray(arr)
        self.expect("[")
        items: list[str] = []
        if not self.accept("]"):
            while True:
                x = self.next()
                if x.kind == "number" or x.text in ("true", "false"):
                    items.append(x.text)
                else:
                    self.fail("expected a number", x)
                if self.accept("]"):
                    break
                self.expect(",")
        if len(items) != tt.numel:
            self.fail_at(t.line, t.col, f"dense tensor of type {tt} needs {tt.numel} values, got {len(items)}")
        if tt.dtype is DType.BOOL:
            if any(x not in ("true", "false", "0", "1") for x in items):
                self.fail_at(t.line, t.col, f"a {tt} holds true, false, 0 or 1")
            vals = np.array([x in ("true", "1") for x in items], dtype=np.bool_)
        elif tt.dtype.is_float:
            self.check_finite(items, tt.dtype, t)
            vals = np.array([float(x) for x in items], dtype=np.float64).astype(tt.dtype.np_dtype)
        else:
            if not all(re.fullmatch(r"[-+]?\d+", x) for x in items):
                self.fail_at(t.line, t.col, f"a {tt} holds integers")
            info = np.iinfo(tt.dtype.np_dtype)
            bad = next((x for x in items if not info.min <= int(x) <= info.max), None)
            if bad is not None:
                self.fail_at(t.line, t.col, f"{bad} is outside {tt.dtype.short}'s range [{info.min}, {info.max}]")
            vals = np.array([int(x) for x in items], dtype=tt.dtype.np_dtype)
        return vals.reshape(tt.shape)

    # -- graph -------------------------------------------------------------------

    def graph(self, weights: Callable[[str], np.ndarray] | None) -> Graph:
        self.expect("graph")
        _, gname = self.value_name("@")
        g = Graph(gname)
        env: dict[str, Value] = {}
        pending_inputs: list[tuple[str, str, TensorType | None, _Tok]] = []
        self.expect("(")
        if not self.accept(")"):
            while True:
                tok = self.peek()
                sig, name = self.value_name()
                self.expect(":")
                pending_inputs.append((sig, name, self.tensor_type(), tok))
                if self.accept(")"):
                    break
                self.expect(",")
        self.expect("->")
        self.expect("(")
        result_types: list[TensorType | None] = []
        if not self.accept(")"):
            while True:
                result_types.append(self.tensor_type())
                if self.accept(")"):
                    break
                self.expect(",")
        self.expect("{")

        def define_initializer(name: str, t: TensorType | None, tok: _Tok) -> Value:
            if name in env:
                self.fail_at(tok.line, tok.col, f"@{name} is defined twice")
            if weights is None:
                self.fail_at(tok.line, tok.col, f"@{name} needs a weights file, but none was given")
            try:
                arr = weights(name)
            except KeyError:
                self.fail_at(tok.line, tok.col, f"weight {name!r} is not in the weights file")
            if t is not None and (arr.dtype != t.dtype.np_dtype or tuple(arr.shape) != t.shape):
                self.fail_at(tok.line, tok.col, f"weight {name!r} in the weights file is {TensorType.of(arr)}, declared {t}")
            v = g.add_initializer(name, arr)
            env[name] = v
            return v

        for sig, name, t, tok in pending_inputs:
            if name in env:
                self.fail_at(tok.line, tok.col, f"graph input {name!r} is declared twice")
            if sig == "@":
                v = define_initializer(name, t, tok)
                if t is not None:
                    v.type = t
                g.inputs.append(v)
            else:
                if t is None:
                    self.fail_at(tok.line, tok.col, f"graph input %{name} needs a type")
                env[name] = g.add_input(name, t)

        if self.accept("weights"):
            self.expect("{")
            while not self.accept("}"):
                tok = self.peek()
                _, name = self.value_name("@")
                self.expect(":")
                define_initializer(name, self.tensor_type(), tok)

        while True:
            ret = self.peek()
            if self.accept("return"):
                outs, toks = [], []
                if self.peek().text != "}":
                    while True:
                        tok = self.peek()
                        _, name = self.value_name()
                        if name not in env:
                            self.fail_at(tok.line, tok.col, f"returned value {name!r} is not defined")
                        outs.append(env[name])
                        toks.append(tok)
                        if not self.accept(","):
                            break
                self.expect("}")
                if not outs:
                    self.fail_at(ret.line, ret.col, "the graph returns nothing: a graph needs at least one result")
                seen: set[str] = set()
                for v, tok in zip(outs, toks):
                    if v.name in seen:
                        self.fail_at(tok.line, tok.col, f"{v.name!r} is returned twice: each result is its own value "
                                                        f"(return an Identity of it for a second result)")
                    seen.add(v.name)
                if len(outs) != len(result_types):
                    self.fail(f"the graph declares {len(result_types)} results but returns {len(outs)}")
                for v, t, tok in zip(outs, result_types, toks):
                    if t is not None and v.type is not None and not _compatible(v.type, t):
                        self.fail_at(tok.line, tok.col, f"returned value {v.name!r} is {v.type} where it is defined, "
                                                        f"but the graph's header declares {t}")
                    if t is not None:
                        v.type = t
                g.outputs = outs
                break
            self.node(g, env)
        if self.peek().kind != "eof":
            self.fail("unexpected text after the graph")
        return g

    def node(self, g: Graph, env: dict[str, Value]) -> None:
        start = self.peek()
        out_names: list[str | None] = []
        out_toks: list[_Tok] = []
        while True:
            tok = self.peek()
            if tok.kind == "ident" and tok.text == "_":
                self.next()
                out_names.append(None)
            else:
                sig, name = self.value_name("%")
                out_names.append(name)
            out_toks.append(tok)
            if not self.accept(","):
                break
        self.expect("=")
        op = self.next()
        if op.kind != "ident":
            self.fail("expected an op name", op)
        domain, _, op_type = op.text.rpartition(".")
        self.expect("(")
        ins: list[Value | None] = []
        if not self.accept(")"):
            while True:
                tok = self.peek()
                if tok.kind == "ident" and tok.text == "_":
                    self.next()
                    ins.append(None)
                else:
                    sig, name = self.value_name()
                    if name not in env:
                        self.fail_at(tok.line, tok.col, f"{sig}{name} is used before it is defined")
                    if (sig == "@") != env[name].is_initializer:
                        self.fail_at(tok.line, tok.col, f"{sig}{name}: use @ for weights and % for other values")
                    ins.append(env[name])
                if self.accept(")"):
                    break
                self.expect(",")
        attrs: dict[str, Attr] = {}
        if self.accept("{"):
            if not self.accept("}"):
                while True:
                    k = self.next()
                    if k.kind != "ident":
                        self.fail("expected an attribute name", k)
                    self.expect("=")
                    if k.text in attrs:
                        self.fail_at(k.line, k.col, f"attribute {k.text!r} is given twice")
                    attrs[k.text] = self.attr_value()
                    if self.accept("}"):
                        break
                    self.expect(",")
        types: list[TensorType | None] = []
        if self.accept(":"):
            while True:
                types.append(self.tensor_type())
                if not self.accept(","):
                    break
        present = [n for n in out_names if n is not None]
        if types and len(types) != len(present):
            self.fail_at(start.line, start.col, f"{len(present)} results but {len(types)} types")
        name = ""
        if self.accept("loc"):
            self.expect("(")
            name = self.string()
            self.expect(")")
        outs: list[Value | None] = []
        it = iter(types)
        for n, tok in zip(out_names, out_toks):
            if n is None:
                outs.append(None)
                continue
            if n in env:
                self.fail_at(tok.line, tok.col, f"%{n} is defined twice")
            v = Value(n, next(it) if types else None)
            env[n] = v
            outs.append(v)
        node = Node(op_type, ins, outs, attrs, domain=domain, name=name or g.fresh_node_name(op_type))
        g.append(node)


def same_graph(a: Graph, b: Graph) -> bool:
    """Whether two graphs are one program: the same text (nodes, names, types, attributes, the
    metadata it prints), every tensor attribute and weight bit for bit. DESIGN's `parse(print(g))`
    is equal to `g` in this sense (a Graph object has identity, not equality)."""
    if print_graph(a) != print_graph(b) or a.initializers.keys() != b.initializers.keys():
        return False
    for name, v in a.initializers.items():
        x, y = v.const_value, b.initializers[name].const_value
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return all(m.attrs == n.attrs for m, n in zip(a.nodes, b.nodes))  # (Attr's equality is bitwise for tensors)


def _compatible(a, b) -> bool:
    """Two types that may describe one value: the same dtype and rank, no two different sizes (a
    symbol or an unknown dim may be any size)."""
    if a.dtype != b.dtype:
        return False
    if a.shape is None or b.shape is None:
        return True
    return len(a.shape) == len(b.shape) and all(
        x == y or not isinstance(x, int) or not isinstance(y, int) for x, y in zip(a.shape, b.shape))


def parse_graph(text: str, *, filename: str = "<string>",
                weights: Callable[[str], np.ndarray] | dict | None = None) -> Graph:
    """Parse the text form. `weights` maps an initializer name (or a tensor-attribute key)
    to its array: a dict, a callable, or None when the text names no weights."""
    if isinstance(weights, dict):
        wdict = weights
        weights = wdict.__getitem__
    lines = text.split("\n")
    opset = None
    metadata: dict = {}
    weights_file = None
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if not s or s.startswith("#"):
            i += 1
            continue
        head, _, rest = s.partition(" ")
        if head in ("opset", "metadata"):
            try:
                obj = json.loads(rest)
            except json.JSONDecodeError as e:
                raise ParseError(f"{filename}:{i + 1}: bad {head} line: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ParseError(f"{filename}:{i + 1}: the {head} line needs a JSON object")
            if head == "opset":
                opset = obj
            else:
                metadata = obj
            i += 1
        elif head == "weights" and not rest.startswith("{"):
            try:
                weights_file = json.loads(rest)
            except json.JSONDecodeError:
                weights_file = None
            if not isinstance(weights_file, str):
                raise ParseError(f"{filename}:{i + 1}: the weights line needs a quoted file name")
            i += 1
        else:
            break
    p = _Parser("\n".join(lines[i:]), filename, weights, line_offset=i)
    g = p.graph(weights)
    if opset is not None:
        try:
            g.opset = {str(k): int(v) for k, v in opset.items()}
        except (TypeError, ValueError):
            raise ParseError(f"{filename}: the opset line maps domains to integer versions") from None
        # the IR is at one opset (ONNX files are converted on import): another one would be
        # written to ONNX as it stands and refused by the runtimes
        for domain, want in (("", CANONICAL_OPSET), (GRAPHOPT_DOMAIN, GRAPHOPT_OPSET)):
            if domain in g.opset and g.opset[domain] != want:
                raise ParseError(f"{filename}: opset {domain or 'ai.onnx'} {g.opset[domain]}: graphopt's text IR is at "
                                 f"{want}; convert a model at another opset through ONNX (graphopt convert "
                                 "model.onnx -o model.gir converts it)")
    md = GraphMetadata()
    for k, v in metadata.items():
        if not hasattr(md, k):
            raise ParseError(f"{filename}: unknown metadata field {k!r}")
        default = getattr(md, k)
        if not (isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))) \
                or isinstance(v, bool) != isinstance(default, bool) \
                or (k == "metadata_props" and not all(isinstance(x, str) for x in (*v, *v.values()))) \
                or (k == "passes" and not all(isinstance(x, str) for x in v)):
            raise ParseError(f"{filename}: metadata field {k!r} has the wrong type ({v!r})")
        try:
            setattr(md, k, dict(v) if k == "metadata_props" else list(v) if k == "passes" else v)
        except (TypeError, ValueError):
            raise ParseError(f"{filename}: metadata field {k!r} has the wrong type") from None
    g.metadata = md
    g._weights_file = weights_file  # type: ignore[attr-defined]
    return g


def weights_file_of(text: str) -> str | None:
    """The weights file a `.gir` text names in its header, if any."""
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith("graph "):
            return None
        if s.startswith("weights ") and not s[8:].lstrip().startswith("{"):
            try:
                name = json.loads(s[8:])
            except json.JSONDecodeError:
                return None
            return name if isinstance(name, str) else None
    return None


# --------------------------------------------------------------------------------------
# .gir files


def save_gir(graph: Graph, path: str | Path) -> list[Path]:
    """Write `path` (text) and `<stem>.weights.safetensors` beside it. Returns both paths."""
    path = Path(path)
    wname = path.stem + ".weights.safetensors"
    external: dict[str, np.ndarray] = {}
    text = print_graph(graph, weights_file=wname, external=external)
    tensors = {name: v.const_value for name, v in graph.initializers.items()}
    tensors.update(external)
    write_tensors(path.parent / wname, tensors)
    path.write_text(text)
    return [path, path.parent / wname]


def load_gir(path: str | Path) -> Graph:
    path = Path(path)
    if not path.exists():
        raise ParseError(f"{path}: no such file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ParseError(f"{path}: not a text file") from None
    wname = weights_file_of(text)
    weights = None
    if wname is not None:
        wpath = (path.parent / wname)
        if Path(wname).is_absolute() or path.parent.resolve() not in wpath.resolve().parents:
            raise ParseError(f"{path}: weights file {wname!r} must be beside the .gir file")
        if not wpath.exists():
            raise ParseError(f"{path}: weights file {str(wpath)!r} does not exist")
        weights = read_tensors(wpath)
    graph = parse_graph(text, filename=str(path), weights=weights)
    graph.metadata.source = str(path)
    return graph
