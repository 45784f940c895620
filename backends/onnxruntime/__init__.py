"""The ONNX Runtime backend: lower the IR to an ONNX model and run it with ORT.

Lowering (`lower`) turns graphopt ops into ORT kernels where the target has one that runs
the site (GroupQueryAttention / MultiHeadAttention, SkipLayerNormalization,
SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization, RotaryEmbedding, BiasGelu,
FastGelu, FusedMatMul) and into their decompositions (core ops, opset 20) everywhere else;
the rules live in `attention.py` and `rules.py`, the driver in `lowering.py`, the kernel
registry queries in `kernels.py`. docs/ort_lowering.md has the table and the measurements.
Targets: `cpu` (CPUExecutionProvider) and `cuda` (CUDAExecutionProvider, from
`onnxruntime-gpu`, which replaces the `onnxruntime` package).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.errors import UserError
from graphopt.manifest import artifact_file
from graphopt.ir import Graph

from graphopt.backends.onnxruntime import attention, moe, quant, rules  # noqa: F401  (register the rules)
from graphopt.backends.onnxruntime.accuracy_level import choose_accuracy_level, quant_shapes
from graphopt.backends.onnxruntime.kernels import MS_DOMAIN
from graphopt.backends.onnxruntime.lowering import LoweringReport, lower_graph
from graphopt.onnx_io import save_onnx

NAME = "onnxruntime"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def lower(graph: Graph, target: str, report: LoweringReport | None = None, options: dict | None = None) -> Graph:
    """A copy of `graph` with only ops ORT can run on `target` (`report`, when given,
    records the kernels emitted and why any op was decomposed instead). `options` force a
    choice the lowering otherwise makes itself (`LOWERING_OPTIONS`)."""
    if target not in PROVIDERS:
        raise UserError(f"unknown target {target!r} for onnxruntime (expected cpu or cuda)")
    options = check_options(options)
    if target == "cpu" and options.get("quant_accuracy_level", "auto") == "auto":
        choice = choose_accuracy_level(graph)  # None without QuantLinear layers
        if choice is not None:
            options["quant_accuracy_level"] = str(choice["level"])
    return lower_graph(graph.copy(), target, report, options)


# Lowering choices a caller may force (docs/ort_lowering.md says what "auto" picks and why).
LOWERING_OPTIONS = {
    "attention_kernel": ("auto", "gqa", "mha", "onnx", "decompose"),
    "skip_norm": ("auto", "fused", "split"),
    "quant_accuracy_level": ("auto", "0", "1", "2", "3", "4"),
}


def matmulnbits_level(target: str, options: dict | None, bits: int | None) -> str:
    """The MatMulNBits accuracy_level whose arithmetic an artifact built with `options` runs (the
    accuracy guard measures at it): the user's on a CPU, or "auto" (chosen by timing at build);
    the CUDA kernels compute in float ("0")."""
    return str((options or {}).get("quant_accuracy_level", "auto")) if target == "cpu" else "0"


def check_options(options: dict | None) -> dict:
    """The backend options (`--backend-option KEY=VALUE`) as checked values, or a UserError."""
    options = {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in (options or {}).items()}
    for name, value in options.items():
        if name not in LOWERING_OPTIONS:
            raise UserError(f"unknown onnxruntime backend option {name!r} (known: {', '.join(LOWERING_OPTIONS)})")
        if value not in LOWERING_OPTIONS[name]:
            raise UserError(f"{name} must be one of {', '.join(LOWERING_OPTIONS[name])}, not {value!r}")
    return options


def check_target(target: str) -> None:
    import onnxruntime as ort

    if target not in PROVIDERS:
        raise UserError(f"unknown target {target!r} for onnxruntime (expected cpu or cuda)")
    if PROVIDERS[target] not in ort.get_available_providers():
        raise UserError(f"target {target!r} needs {PROVIDERS[target]}, which this onnxruntime "
                        f"({ort.__version__}) does not have; for cuda install onnxruntime-gpu "
                        "in place of onnxruntime")


def save(graph: Graph, outdir: Path, target: str, options: dict | None = None) -> dict:
    """Write `model.onnx` (+ external data when large) into outdir; returns manifest fields."""
    report = LoweringReport()
    lowered = lower(graph, target, report, options)
    files = save_onnx(lowered, outdir / "model.onnx")
    fields = {"files": [f.name for f in files], "model": "model.onnx", "lowering": report.to_json(),
              "nodes": len(lowered.nodes)}
    forced = (options or {}).get("quant_accuracy_level", "auto")
    if target == "cpu" and forced == "auto":
        choice = choose_accuracy_level(graph)  # what lower() used (cached)
        if choice is not None:
            fields["quant_accuracy_level"] = choice
    elif target == "cpu" and (shapes := quant_shapes(graph)):  # the level the user (or the accuracy guard) gave
        fields["quant_accuracy_level"] = {
            "level": int(forced), "layers": int(sum(shapes.values())),
            "rule": "given: --backend-option quant_accuracy_level, or the level --accuracy-budget measured at"}
    session = session_options_for(lowered, target)
    if session:
        fields["ort_session"] = session
    if target == "cpu" and shares_cache_buffer(lowered):
        fields["past_present_share_buffer"] = True
    return fields


def shares_cache_buffer(lowered: Graph) -> bool:
    """Whether every present of a growing cache is GroupQueryAttention's own output over the
    past of its name: then a caller may bind both to one buffer of more positions than the
    sequence needs, and the kernel writes each step's key and value into it in place
    (`past_present_share_buffer`, as onnxruntime-genai drives its builder's models), where a
    growing drive copies the whole past into a new present every step. The graph is the same
    either way; only the caller's buffers differ. The kernel must be the past's only reader: a
    graph that reads the past's length elsewhere (a converted export's total sequence length,
    taken from the past's shape) would count the buffer's positions as filled ones."""
    presents = [v for v in lowered.outputs if v.name.startswith("present.")]
    for v in presents:
        node = v.producer()
        if node is None or node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN or v.index not in (1, 2):
            return False
        past = node.inputs[2 + v.index] if len(node.inputs) > 2 + v.index else None
        if past is None or not past.is_graph_input or past.name != "past_key_values." + v.name.removeprefix("present."):
            return False
        if any(user is not node for user, _ in past.uses()) or past.is_graph_output:
            return False
    return bool(presents)


def session_options_for(lowered: Graph, target: str) -> dict:
    """Session settings the artifact needs. ORT's SkipLayerNormFusion would fuse a split
    SkipNorm whose sum nothing else reads (Add + LayerNormalization) back into the CPU
    SkipLayerNormalization kernel that the split avoids."""
    if target == "cpu" and any(n.op_type == "LayerNormalization" for n in lowered.nodes):
        return {"disabled_optimizers": ["SkipLayerNormFusion"]}
    return {}


class Executable:
    """An ONNX Runtime session over a saved artifact folder."""

    def __init__(self, outdir: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        target = manifest.get("target", "cpu")
        check_target(target)
        model_path = artifact_file(outdir, manifest.get("model", "model.onnx"), f"{outdir}: the manifest")
        if not model_path.is_file():
            raise UserError(f"{outdir}: the manifest names {model_path.name!r}, which is missing")
        _check_external_data(model_path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        disabled = manifest.get("ort_session", {}).get("disabled_optimizers", [])
        self.session = ort.InferenceSession(str(model_path), so, providers=[PROVIDERS[target]],
                                            disabled_optimizers=disabled or None)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def bound_runner(self, output_shapes: dict[str, tuple[list, np.dtype]],
                     input_shapes: dict[str, list] | None = None,
                     aliases: dict[str, str] | None = None) -> "BoundRunner":
        """A `run` for a generation loop that keeps the cache in ORT's buffers (IO binding);
        `aliases` {output: input}: outputs written into the buffer fed as that input."""
        return BoundRunner(self.session, output_shapes, input_shapes, aliases)


class BoundRunner:
    """`run(feeds) -> outputs` over IO binding, for a decode loop. The presents stay in the
    OrtValues ORT wrote them to and are bound, as they are, as the next step's past (feeding
    them back is then no copy out to numpy and in again); the outputs whose shape the
    signature fixes once batch and seq are known (the last-token logits; a static cache) are
    written into a buffer allocated once per shape, and so is an output shaped as an input is
    (the same symbols: a paged pool, whose block count only the feed says). A static cache's
    present is so the very buffer fed back as the next past: GroupQueryAttention then shares
    it (writes the new positions in place, copies nothing), as a paged pool's ScatterND does.
    An output array is valid until the next call.

    One binding serves every call: an input fed the very object it was fed last time (a
    static cache's buffer) and the output buffers of the feeds' shapes stay bound until the
    shapes change, so a static decode step rebinds only input_ids and attention_mask and, its
    outputs all in buffers of ours, fetches no OrtValue (the Python around a Llama-style step:
    74 -> 24 us).

    `aliases` {output: input} bind an output to the very buffer fed as that input (a growing
    cache's present to its past, where GroupQueryAttention computes it: the caller feeds a
    buffer of every position the request will need, and the kernel writes each step into it
    in place); the output returned is that buffer."""

    def __init__(self, session, output_shapes: dict[str, tuple[list, np.dtype]],
                 input_shapes: dict[str, list] | None = None, aliases: dict[str, str] | None = None):
        self.session = session
        self.output_shapes = output_shapes  # output name -> (signature shape (ints and symbols), dtype)
        self.aliases = dict(aliases or {})  # output -> the input whose buffer it is written into
        self._alias_bound: dict[str, object] = {}  # output -> the input value it is bound to
        # output name -> the input whose feed gives its symbolic shape (a paged pool's)
        self._shaped_like = {out: name for out, (shape, _) in output_shapes.items()
                             if out not in self.aliases and shape is not None and any(isinstance(d, str) for d in shape)
                             for name, s in (input_shapes or {}).items() if s == shape}
        self._buffers: dict[tuple, np.ndarray] = {}  # (output, *shape) -> its buffer
        self._plans: dict[tuple, tuple[dict, list]] = {}  # feeds' shapes -> (output buffers, ORT-allocated outputs)
        self._current = None  # the plan whose buffers are bound
        self._binding = session.io_binding()
        self._bound: dict[str, object] = {}  # name -> what is bound (kept alive: ORT reads its memory)
        # the outputs in the order they were first bound: the order of binding.get_outputs()
        # (rebinding a name replaces its value in place)
        self._output_order: list[str] = []
        # input_ids' own dimension names (an exporter's "batch_size", "sequence_length")
        ids_shape = (input_shapes or {}).get("input_ids") or []
        self._ids_dims = [d for d in ids_shape if isinstance(d, str)] if len(ids_shape) == 2 else []

    def run(self, feeds: dict) -> dict:
        import onnxruntime as ort

        binding = self._binding
        for name, value in feeds.items():
            if self._bound.get(name) is value:
                continue
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                value = np.ascontiguousarray(value)
                binding.bind_cpu_input(name, value)
            self._bound[name] = value
        plan = self._plan(feeds, ort)
        if plan is not self._current:  # another shape: its buffers bound once, until the shape changes
            for name, buf in plan[0].items():
                binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                self._first_bound(name)
            self._current = plan
        buffers, allocated = plan
        for name in allocated:  # ORT allocates it (a growing cache): a new value every call
            binding.bind_output(name, "cpu")
            self._first_bound(name)
        for name, source in self.aliases.items():  # written in place into what is fed as `source`
            value = self._bound.get(source)
            if value is None or value is not feeds.get(source, value):
                # a copy (np.ascontiguousarray) or nothing: the step would land where the caller never looks
                raise UserError(f"{source}: a shared cache is fed as one C-contiguous buffer of every position "
                                "the request needs (Generator.empty_cache(batch, positions=N)); "
                                + ("it is missing" if value is None else "this one is not contiguous"))
            if self._alias_bound.get(name) is not value:
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_output(name, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
                self._alias_bound[name] = value
                self._first_bound(name)
        self.session.run_with_iobinding(binding)
        if self.aliases:
            buffers = {**buffers, **{name: self._bound[source] for name, source in self.aliases.items()}}
        if not allocated:  # every output in a buffer of ours: no OrtValue to fetch
            return buffers if self.aliases else dict(buffers)
        # by the order of binding, not of the signature: an output ORT allocates may have been
        # bound after the buffers (a converted export's logits, whose batch is "batch_size")
        out = dict(zip(self._output_order, binding.get_outputs()))
        out.update(buffers)
        return {name: out[name] for name in self.output_shapes}

    def _first_bound(self, name: str) -> None:
        if name not in self._output_order:
            self._output_order.append(name)

    def _plan(self, feeds: dict, ort) -> tuple[dict, list]:
        """({output: its buffer}, [outputs ORT allocates]) for these feeds' shapes: a buffer
        allocated once per shape for an output whose shape the feeds fix (the last-token
        logits, a static cache, a paged pool)."""
        ids = feeds["input_ids"]
        dims = {"batch": ids.shape[0], "seq": ids.shape[1], **dict(zip(self._ids_dims, ids.shape))}
        like = {}
        for name, source in self._shaped_like.items():
            fed = feeds[source]
            like[name] = tuple(fed.shape() if isinstance(fed, ort.OrtValue) else fed.shape)
        key = (dims["batch"], dims["seq"], tuple(sorted(like.items())))
        plan = self._plans.get(key)
        if plan is None:
            buffers, allocated = {}, []
            for name, (shape, dtype) in self.output_shapes.items():
                if name in self.aliases:
                    continue
                concrete = list(like[name]) if name in like else [dims.get(d, d) for d in shape]
                if all(isinstance(d, int) for d in concrete):  # one buffer per output and shape, for every plan
                    buffers[name] = self._buffers.setdefault((name, *concrete), np.zeros(concrete, dtype))
                else:
                    allocated.append(name)
            plan = self._plans[key] = (buffers, allocated)
        return plan


def _check_external_data(model_path: Path) -> None:
    """The weights an artifact's model.onnx names must lie inside the artifact folder."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError on a truncated file
        raise UserError(f"{model_path}: not a valid ONNX model ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            artifact_file(model_path.parent, location, f"{model_path}: initializer {t.name!r} external data")


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
