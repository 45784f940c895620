"""The graphopt IR: `Graph`, `Node`, `Value`, `TensorType` and typed attributes.

A graph is plain SSA dataflow. Every `Value` is defined exactly once -- by a node output,
a graph input or an initializer (a weight) -- and keeps an ordered use list. Only the
methods here change wiring (`Node.set_input`, `Value.replace_all_uses_with`,
`Graph.insert_before`, `Graph.remove_node`, ...), so both sides of a use list always agree
and `verify()` can check that they do.

Types and attributes are immutable. A dimension is an `int`, a symbol (`"batch"`), or
`None` when nothing is known about it; `TensorType.shape` is `None` when even the rank is
unknown.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import re
from typing import Iterator, Sequence, Union

import numpy as np

from graphopt.dtypes import DType
from graphopt.errors import GraphoptError

Dim = Union[int, str, None]

CANONICAL_OPSET = 20
"""The one ONNX opset that core ops follow. Both of PyTorch's exporters emit it (torch 2.13);
models at other opsets are converted to it on import with `onnx.version_converter`."""

GRAPHOPT_DOMAIN = "graphopt"
GRAPHOPT_OPSET = 1


# --------------------------------------------------------------------------------------
# Types


@dataclasses.dataclass(frozen=True)
class TensorType:
    """A tensor type: element type and shape. `shape=None` means the rank is unknown."""

    dtype: DType
    shape: tuple[Dim, ...] | None

    def __post_init__(self):
        if self.shape is not None:
            shape = tuple(self.shape)
            for d in shape:
                if not (d is None or isinstance(d, str) or (isinstance(d, (int, np.integer)) and not isinstance(d, bool))):
                    raise TypeError(f"bad dimension {d!r} in shape {shape}")
            object.__setattr__(self, "shape", tuple(int(d) if isinstance(d, (int, np.integer)) else d for d in shape))

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> int | None:
        if not self.is_static:
            return None
        return int(np.prod(self.shape, dtype=np.int64))

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, None if shape is None else tuple(shape))

    def __str__(self) -> str:
        if self.shape is None:
            return f"{self.dtype.short}[*]"
        return f"{self.dtype.short}[{', '.join(_fmt_dim(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(DType.from_numpy(array.dtype), tuple(array.shape))


def _fmt_dim(d: Dim) -> str:
    if d is None:
        return "?"
    if isinstance(d, str) and not _SYMBOL.match(d):
        return json.dumps(d)  # symbols such as "2*seq" are quoted so the text form parses
    return str(d)


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------------------
# Attributes


class AttrKind(enum.Enum):
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    TENSOR = "tensor"
    INTS = "ints"
    FLOATS = "floats"
    STRINGS = "strings"

    @property
    def is_list(self) -> bool:
        return self in (AttrKind.INTS, AttrKind.FLOATS, AttrKind.STRINGS)


@dataclasses.dataclass(frozen=True, eq=False)
class Attr:
    """A typed attribute value. An int stays an int; an empty list keeps its element kind."""

    kind: AttrKind
    value: object

    def __post_init__(self):
        k, v = self.kind, self.value
        if k is AttrKind.INT:
            object.__setattr__(self, "value", int(v))
        elif k is AttrKind.FLOAT:
            object.__setattr__(self, "value", float(np.float32(v)))
        elif k is AttrKind.STRING:
            if not isinstance(v, str):
                raise TypeError(f"string attribute needs str, got {type(v).__name__}")
        elif k is AttrKind.TENSOR:
            if not isinstance(v, np.ndarray):
                raise TypeError("tensor attribute needs a numpy array")
            DType.from_numpy(v.dtype)
            if v.flags.writeable:  # read-only as an initializer's: `Graph.copy` shares it with the original
                v = v.view()
                v.flags.writeable = False
                object.__setattr__(self, "value", v)
        elif k is AttrKind.INTS:
            object.__setattr__(self, "value", tuple(int(x) for x in v))
        elif k is AttrKind.FLOATS:
            object.__setattr__(self, "value", tuple(float(np.float32(x)) for x in v))
        elif k is AttrKind.STRINGS:
            object.__setattr__(self, "value", tuple(str(x) for x in v))

    @staticmethod
    def int(v) -> "Attr":
        return Attr(AttrKind.INT, v)

    @staticmethod
    def float(v) -> "Attr":
        return Attr(AttrKind.FLOAT, v)

    @staticmethod
    def string(v) -> "Attr":
        return Attr(AttrKind.STRING, v)

    @staticmethod
    def tensor(v) -> "Attr":
        return Attr(AttrKind.TENSOR, np.asarray(v))

    @staticmethod
    def ints(v) -> "Attr":
        return Attr(AttrKind.INTS, v)

    @staticmethod
    def floats(v) -> "Attr":
        return Attr(AttrKind.FLOATS, v)

    @staticmethod
    def strings(v) -> "Attr":
        return Attr(AttrKind.STRINGS, v)

    @staticmethod
    def infer(v) -> "Attr":
        """An attribute from a plain Python value (bool/int -> INT, float -> FLOAT, ...).
        An empty list is ambiguous: build it with `Attr.ints([])` and friends instead."""
        if isinstance(v, Attr):
            return v
        if isinstance(v, (bool, int, np.integer)):
            return Attr.int(v)
        if isinstance(v, (float, np.floating)):
            return Attr.float(v)
        if isinstance(v, str):
            return Attr.string(v)
        if isinstance(v, np.ndarray):
            return Attr.tensor(v)
        if isinstance(v, (list, tuple)):
            if not v:
                raise TypeError("the element type of an empty list attribute is ambiguous: use Attr.ints([]) etc.")
            if all(isinstance(x, (bool, int, np.integer)) for x in v):
                return Attr.ints(v)
            if all(isinstance(x, (int, float, np.integer, np.floating)) for x in v):
                return Attr.floats(v)
            if all(isinstance(x, str) for x in v):
                return Attr.strings(v)
        raise TypeError(f"cannot make an attribute from {v!r}")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Attr) or other.kind is not self.kind:
            return False
        if self.kind is AttrKind.TENSOR:
            a, b = self.value, other.value
            return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        if self.kind is AttrKind.FLOAT:
            return self.value == other.value or (np.isnan(self.value) and np.isnan(other.value))
        if self.kind is AttrKind.FLOATS:
            return len(self.value) == len(other.value) and all(
                x == y or (np.isnan(x) and np.isnan(y)) for x, y in zip(self.value, other.value))
        return self.value == other.value

    def __hash__(self):
        if self.kind is AttrKind.TENSOR:
            return hash((self.kind, self.value.dtype.str, self.value.shape, self.value.tobytes()))
        return hash((self.kind, self.value))

    def __repr__(self) -> str:
        return f"Attr.{self.kind.value}({self.value!r})"


# --------------------------------------------------------------------------------------
# Values and nodes


@dataclasses.dataclass(frozen=True)
class NodeMeta:
    """Typed node metadata: where a node came from and which pass made it."""

    doc_string: str = ""
    metadata_props: tuple[tuple[str, str], ...] = ()
    created_by: str = ""


class Value:
    """An SSA value. Defined by one node output, a graph input or an initializer."""

    __slots__ = ("name", "type", "_producer", "_index", "_uses", "const_value", "graph", "__weakref__")

    def __init__(self, name: str, type: TensorType | None = None):
        self.name = name
        self.type = type
        self._producer: Node | None = None
        self._index: int = 0
        self._uses: list[tuple[Node, int]] = []
        self.const_value: np.ndarray | None = None  # set for initializers
        self.graph: Graph | None = None

    def producer(self) -> Node | None:
        return self._producer

    @property
    def index(self) -> int:
        """Which output of its producer this value is."""
        return self._index

    def uses(self) -> list[tuple[Node, int]]:
        """(node, input index) pairs, in the order they were made."""
        return list(self._uses)

    def consumers(self) -> list[Node]:
        seen: dict[int, Node] = {}
        for n, _ in self._uses:
            seen.setdefault(id(n), n)
        return list(seen.values())

    @property
    def is_initializer(self) -> bool:
        return self.const_value is not None

    @property
    def is_graph_input(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.inputs)

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.outputs)

    def replace_all_uses_with(self, other: "Value") -> None:
        """Point every use of this value (node inputs and graph outputs) at `other`."""
        if other is self:
            return
        for node, i in list(self._uses):
            node.set_input(i, other)
        if self.graph is not None:
            g = self.graph
            g.outputs = [other if v is self else v for v in g.outputs]

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {self.type})"


class Node:
    """One operation: `domain.op_type(inputs) {attrs} -> outputs`."""

    __slots__ = ("op_type", "domain", "_inputs", "_outputs", "attrs", "name", "meta", "graph", "__weakref__")

    def __init__(self, op_type: str, inputs: Sequence[Value | None], outputs: Sequence[Value | None],
                 attrs: dict[str, Attr] | None = None, domain: str = "", name: str = "",
                 meta: NodeMeta | None = None):
        self.op_type = op_type
        self.domain = "" if domain == "ai.onnx" else domain
        self._inputs: list[Value | None] = []
        self._outputs: list[Value | None] = []
        self.attrs: dict[str, Attr] = {}
        for k, a in (attrs or {}).items():
            self.attrs[k] = Attr.infer(a)
        self.name = name
        self.meta = meta or NodeMeta()
        self.graph: Graph | None = None
        for v in inputs:
            self._inputs.append(v)
            if v is not None:
                v._uses.append((self, len(self._inputs) - 1))
        for i, v in enumerate(outputs):
            if v is not None:
                if v._producer is not None:
                    raise ValueError(f"value {v.name!r} already has a producer")
                v._producer, v._index = self, i
            self._outputs.append(v)

    @property
    def op(self) -> str:
        """`op_type` qualified by its domain: `MatMul`, `graphopt.Attention`."""
        return f"{self.domain}.{self.op_type}" if self.domain else self.op_type

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value | None, ...]:
        return tuple(self._outputs)

    def set_input(self, i: int, value: Value | None) -> None:
        old = self._inputs[i]
        if old is value:
            return
        if old is not None:
            old._uses.remove((self, i))
        self._inputs[i] = value
        if value is not None:
            value._uses.append((self, i))

    def append_input(self, value: Value | None) -> None:
        self._inputs.append(None)
        self.set_input(len(self._inputs) - 1, value)

    def attr(self, name: str, default=None):
        """The plain Python value of an attribute, or `default`."""
        a = self.attrs.get(name)
        return default if a is None else a.value

    def _detach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.remove((self, i))
        self._inputs = [None] * len(self._inputs)

    def __repr__(self) -> str:
        ins = ", ".join("_" if v is None else v.name for v in self._inputs)
        outs = ", ".join("_" if v is None else v.name for v in self._outputs)
        return f"Node({self.op}: {outs} = ({ins}) name={self.name!r})"


# --------------------------------------------------------------------------------------
# Graph


@dataclasses.dataclass
class GraphMetadata:
    """Where a graph came from and what has been done to it."""

    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    ir_version: int = 0
    doc_string: str = ""
    graph_doc_string: str = ""
    source: str = ""
    source_opset: int = 0
    exporter: str = ""  # how a frontend produced the graph ("torch.onnx dynamo", ...)
    export_seconds: float = 0.0
    metadata_props: dict[str, str] = dataclasses.field(default_factory=dict)
    passes: list[str] = dataclasses.field(default_factory=list)


class Graph:
    """A dataflow graph in SSA form with nodes kept in topological order."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.initializers: dict[str, Value] = {}
        self.opset: dict[str, int] = {"": CANONICAL_OPSET}
        self.metadata = GraphMetadata()
        self._names: set[str] = set()
        # Names of removed values are never handed out again by fresh_name: check-numerics
        # matches values before and after a pass by name.
        self._retired: set[str] = set()
        self._counter = itertools.count()

    # -- names ---------------------------------------------------------------------

    def fresh_name(self, hint: str = "v") -> str:
        """A value or node name not yet used in this graph."""
        if hint and hint not in self._names and hint not in self._retired:
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names and name not in self._retired:
                return name

    def _claim(self, value: Value) -> Value:
        if not value.name or value.name in self._names or value.name in self._retired:
            value.name = self.fresh_name(value.name or "v")
        self._names.add(value.name)
        value.graph = self
        return value

    def rename_value(self, value: Value, name: str) -> None:
        if name == value.name:
            return
        if name in self._names:
            raise ValueError(f"value name {name!r} is already used")
        if value.is_initializer:
            del self.initializers[value.name]
            self.initializers[name] = value
        self._names.discard(value.name)
        self._retired.add(value.name)
        self._retired.discard(name)
        value.name = name
        self._names.add(name)

    # -- building ------------------------------------------------------------------

    def add_input(self, name: str, type: TensorType) -> Value:
        v = self._claim(Value(name, type))
        if v.name != name:
            raise ValueError(f"graph input name {name!r} is already used")
        self.inputs.append(v)
        return v

    def add_initializer(self, name: str, array: np.ndarray) -> Value:
        """A constant. The graph keeps a read-only view of `array`, not a copy: a pass makes a
        new array rather than changing one in place (an in-place change would reach the
        caller's array, and the snapshot a failed pass is rolled back to). The caller's own
        later changes to `array` do show in the graph; pass a copy to keep them apart."""
        v = Value(name, TensorType.of(array))
        self._claim(v)
        if isinstance(array, np.ndarray) and array.flags.writeable:
            array = array.view()
            array.flags.writeable = False
        v.const_value = array
        self.initializers[v.name] = v
        return v

    def make_node(self, op_type: str, inputs: Sequence[Value | None], *, domain: str = "",
                  attrs: dict | None = None, output_types: Sequence[TensorType | None] | None = None,
                  num_outputs: int | None = None, output_names: Sequence[str] | None = None,
                  name: str | None = None, meta: NodeMeta | None = None) -> Node:
        """Create a node (not yet placed in `nodes`) with the given output count, names or
        types; outputs without a given type are untyped. The IR knows no op: to have the
        op registry count the outputs and infer their types, use `graphopt.builder`."""
        if output_names is not None:
            n_out = len(output_names)
        elif output_types is not None:
            n_out = len(output_types)
        elif num_outputs is not None:
            n_out = num_outputs
        else:
            raise ValueError(f"make_node({op_type!r}): give num_outputs, output_names or output_types "
                             "(graphopt.builder.make_node asks the op registry)")
        outs = []
        for i in range(n_out):
            hint = output_names[i] if output_names is not None else f"{op_type.lower()}"
            v = self._claim(Value(hint, output_types[i] if output_types is not None else None))
            if output_names is not None and v.name != output_names[i]:
                raise ValueError(f"value name {output_names[i]!r} is already used")
            outs.append(v)
        node = Node(op_type, inputs, outs, attrs, domain=domain,
                    name=name if name else self.fresh_node_name(op_type), meta=meta)
        node.graph = self
        return node

    def fresh_node_name(self, op_type: str) -> str:
        return f"{op_type}_{next(self._counter)}"

    def append(self, node: Node) -> Node:
        self._own(node)
        self.nodes.append(node)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        self._own(node)
        self.nodes.insert(self._position(anchor), node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        self._own(node)
        self.nodes.insert(self._position(anchor) + 1, node)
        return node

    def _own(self, node: Node) -> None:
        node.graph = self
        for v in node.outputs:
            if v is not None and v.graph is not self:
                self._claim(v)

    def _position(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise ValueError(f"node {node.name!r} is not in graph {self.name!r}")

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are no longer used."""
        for v in node.outputs:
            if v is not None and (v._uses or v.is_graph_output):
                raise ValueError(f"cannot remove node {node.name!r}: its output {v.name!r} is still used")
        node._detach_inputs()
        self.nodes.pop(self._position(node))
        for v in node.outputs:
            if v is not None:
                self._names.discard(v.name)
                self._retired.add(v.name)
        node.graph = None

    def remove_initializer(self, name: str) -> None:
        v = self.initializers[name]
        if v._uses or v.is_graph_output or v.is_graph_input:
            raise ValueError(f"cannot remove initializer {name!r}: it is still used")
        del self.initializers[name]
        self._names.discard(name)
        self._retired.add(name)

    # -- reading -------------------------------------------------------------------

    def values(self) -> Iterator[Value]:
        """Every value: inputs, initializers, then node outputs in order."""
        seen: set[int] = set()
        for v in itertools.chain(self.inputs, self.initializers.values()):
            if id(v) not in seen:
                seen.add(id(v))
                yield v
        for n in self.nodes:
            for v in n.outputs:
                if v is not None:
                    yield v

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.const_value for k, v in self.initializers.items()}

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes, {len(self.initializers)} initializers)"

    # -- copying -------------------------------------------------------------------

    def copy(self) -> "Graph":
        """A structural copy; weight arrays are shared (they are never mutated in place)."""
        g = Graph(self.name)
        g._retired = set(self._retired)
        g._counter = itertools.count(next(self._counter))
        g.opset = dict(self.opset)
        g.metadata = dataclasses.replace(self.metadata, metadata_props=dict(self.metadata.metadata_props),
                                         passes=list(self.metadata.passes))
        vmap: dict[int, Value] = {}

        def clone(v: Value) -> Value:
            nv = Value(v.name, v.type)
            nv.const_value = v.const_value
            g._names.add(nv.name)
            nv.graph = g
            vmap[id(v)] = nv
            return nv

        for v in self.inputs:
            g.inputs.append(clone(v))
        for name, v in self.initializers.items():
            g.initializers[name] = vmap[id(v)] if id(v) in vmap else clone(v)

        def mapped(v: Value, i: int, node: Node | None = None) -> Value:
            if id(v) not in vmap:  # only a graph that was not verified (a pass run with verify off)
                where = (f"node {node.name!r} ({node.op}) input {i} ({v.name!r}) is not defined before the node"
                         if node is not None else f"graph output {i} ({v.name!r}) is not defined")
                raise GraphoptError(f"graph {self.name!r} is invalid: {where} (a cycle, or a value of another graph)")
            return vmap[id(v)]

        for n in self.nodes:
            outs = [None if v is None else clone(v) for v in n.outputs]
            ins = [None if v is None else mapped(v, i, n) for i, v in enumerate(n.inputs)]
            nn = Node(n.op_type, ins, outs, dict(n.attrs), domain=n.domain, name=n.name, meta=n.meta)
            nn.graph = g
            g.nodes.append(nn)
        g.outputs = [mapped(v, i) for i, v in enumerate(self.outputs)]
        return g


def topological_sort(graph: Graph) -> None:
    """Reorder `graph.nodes` topologically, keeping the existing order where it is valid.
    Raises ValueError on a cycle."""
    indeg: dict[int, int] = {}
    for n in graph.nodes:
        indeg[id(n)] = sum(1 for v in n.inputs if v is not None and v.producer() is not None)
    ready = [n for n in graph.nodes if indeg[id(n)] == 0]
    order_index = {id(n): i for i, n in enumerate(graph.nodes)}
    import heapq
    heap = [(order_index[id(n)], id(n), n) for n in ready]
    heapq.heapify(heap)
    out: list[Node] = []
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for v in n.outputs:
            if v is None:
                continue
            for user, _ in v._uses:
                indeg[id(user)] -= 1
                if indeg[id(user)] == 0:
                    heapq.heappush(heap, (order_index[id(user)], id(user), user))
    if len(out) != len(graph.nodes):
        raise ValueError("the graph has a cycle")
    graph.nodes = out


def constant_value(v: Value) -> np.ndarray | None:
    """The array behind `v` when it is an initializer or the output of a Constant node."""
    if v.const_value is not None:
        return np.asarray(v.const_value)
    p = v.producer()
    if p is not None and p.op_type == "Constant" and p.domain == "" and "value" in p.attrs:
        return p.attrs["value"].value
    return None


def more_precise_type(old: TensorType | None, new: TensorType) -> TensorType | None:
    """`old` with its unknowns filled in from `new`, or None if that adds nothing or they
    disagree."""
    if old is None:
        return new
    if old.dtype is not new.dtype or new.shape is None:
        return None
    if old.shape is None:
        return new
    if len(old.shape) != len(new.shape):
        return None
    merged, gained = [], False
    for a, b in zip(old.shape, new.shape):
        if a is None and b is not None:
            merged.append(b)
            gained = True
        elif isinstance(a, int) and isinstance(b, int) and a != b:
            return None
        elif isinstance(a, str) and isinstance(b, int):
            merged.append(b)
            gained = True
        elif isinstance(a, str) and a.startswith("unk__") and isinstance(b, str) and not b.startswith("unk__"):
            merged.append(b)  # ONNX names the dims it cannot relate "unk__N": a real symbol knows more
            gained = True
        else:
            merged.append(a)
    return TensorType(old.dtype, tuple(merged)) if gained else None


def signature(graph: Graph) -> dict:
    """The graph's inputs (weights excluded) and outputs: name, dtype and shape with symbolic dims, as JSON.
    An input that indexes the rows of a constant table (token ids into an embedding) also
    gives `index_limit`, the rows it may pick: [0, index_limit)."""
    def entry(v):
        e = {"name": v.name, "dtype": v.type.dtype.short,
             "shape": None if v.type.shape is None else list(v.type.shape)}
        limit = index_limit(v)
        if limit is not None:
            e["index_limit"] = limit
        return e
    return {"inputs": [entry(v) for v in graph.inputs if not v.is_initializer],
            "outputs": [entry(v) for v in graph.outputs]}


# Ops that gather rows of their first input (a table) at the indices of their second.
_ROW_GATHERS = {("", "Gather"), (GRAPHOPT_DOMAIN, "QuantGather")}


def index_limit(v: Value) -> int | None:
    """The fewest rows among the constant tables `v` indexes directly (a Gather along axis 0, or
    QuantGather), or None when it indexes none. A backend may clamp an index past a table's
    rows where ONNX says it is an error, so the limit is checked before any backend runs."""
    rows = []
    for node, i in v.uses():
        if (node.domain, node.op_type) not in _ROW_GATHERS or i != 1 or not node.inputs[0].is_initializer:
            continue
        axis = node.attrs["axis"].value if "axis" in node.attrs else 0
        shape = node.inputs[0].type.shape
        if axis == 0 and shape and isinstance(shape[0], int):
            rows.append(shape[0])
    return min(rows) if rows else None
