"""What ONNX Runtime can run, asked of ONNX Runtime itself.

A lowering rule may emit an op only where the target has a kernel for it, for the element
type at hand. For `cpu` the answer comes from the installed runtime's kernel registry
(`get_all_opkernel_def`), so a rule never emits a kernel that this ORT build lacks. For
`cuda` it comes from the registry too when `onnxruntime-gpu` is installed, and otherwise
from `CUDA_KERNELS` below (what the ORT CUDA provider registers; kept by hand, so that the
cuda lowering can be built and unit-tested on a machine without a GPU).

Which inputs and attributes an op has (they grew across ORT releases: GroupQueryAttention's
`attention_bias` and `causal`, for example) is read from the installed ORT's schemas.
"""
from __future__ import annotations

import functools

from graphopt.dtypes import DType

MS_DOMAIN = "com.microsoft"

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

F32, F16, BF16, F64 = DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64

# (domain, op) -> element types of the CUDA provider's kernels, from ORT's CUDA registrations
# (contrib_ops/cuda/cuda_contrib_kernels.cc and providers/cuda/cuda_execution_provider.cc).
CUDA_KERNELS: dict[tuple[str, str], frozenset[DType]] = {
    (MS_DOMAIN, "MultiHeadAttention"): frozenset({F32, F16}),
    (MS_DOMAIN, "GroupQueryAttention"): frozenset({F16, BF16}),
    (MS_DOMAIN, "SkipLayerNormalization"): frozenset({F32, F16}),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): frozenset({F32, F16}),
    ("", "SimplifiedLayerNormalization"): frozenset({F32, F16, F64, BF16}),
    (MS_DOMAIN, "RotaryEmbedding"): frozenset({F32, F16, BF16}),
    (MS_DOMAIN, "FastGelu"): frozenset({F32, F16, BF16}),
    (MS_DOMAIN, "BiasGelu"): frozenset({F32, F16, BF16}),
    (MS_DOMAIN, "Gelu"): frozenset({F32, F16, BF16}),
    (MS_DOMAIN, "FusedMatMul"): frozenset({F32, F16, BF16}),
    (MS_DOMAIN, "QuickGelu"): frozenset({F32, F16, BF16}),
}


@functools.lru_cache(maxsize=None)
def _registered() -> dict[tuple[str, str, str], frozenset[DType]]:
    """(provider, domain, op) -> element types of the type constraint of its main input."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    found: dict[tuple[str, str, str], set[DType]] = {}
    for k in C.get_all_opkernel_def():
        domain = "" if k.domain == "ai.onnx" else k.domain
        constraints = dict(k.type_constraints)
        # The element type of the data inputs: "T", or "T1" for ops that number their types.
        types = constraints.get("T", constraints.get("T1", ()))
        dtypes = found.setdefault((k.provider, domain, k.op_name), set())
        for t in types:
            if t.startswith("tensor(") and t != "tensor(string)":
                try:
                    dtypes.add(DType.from_short(_ORT_TYPE_SHORT.get(t[7:-1], t[7:-1])))
                except ValueError:
                    pass  # float8, int4 and the like: no graphopt type
    return {key: frozenset(v) for key, v in found.items()}


_ORT_TYPE_SHORT = {"float": "f32", "float16": "f16", "bfloat16": "bf16", "double": "f64", "bool": "bool",
                   "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8",
                   "uint16": "u16", "uint32": "u32", "uint64": "u64"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def has_kernel(target: str, domain: str, op: str, dtype: DType) -> bool:
    """True when `target` runs `domain.op` on tensors of `dtype`: the provider registers a
    kernel for it and the op's schema admits the type (the CPU provider registers float64
    SkipLayerNormalization kernels that the schema then refuses to load)."""
    if not schema_allows(domain, op, dtype):
        return False
    provider = _PROVIDERS[target]
    if target == "cpu" or provider in available_providers():
        return dtype in _registered().get((provider, domain, op), frozenset())
    return dtype in CUDA_KERNELS.get((domain, op), frozenset())


def schema_allows(domain: str, op: str, dtype: DType) -> bool:
    """True when the schema's main type constraint ("T", else "T1") admits `dtype`."""
    s = _schema(domain, op)
    if s is None:
        return False
    constraints = {t.type_param_str: list(t.allowed_type_strs) for t in s.type_constraints}
    allowed = constraints.get("T", constraints.get("T1"))
    if allowed is None:
        return True
    shorts = {_ORT_TYPE_SHORT.get(t[7:-1]) for t in allowed if t.startswith("tensor(")}
    return dtype.short in shorts


@functools.lru_cache(maxsize=None)
def _schema(domain: str, op: str):
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    best = None
    for s in C.get_all_operator_schema():
        if s.name == op and ("" if s.domain == "ai.onnx" else s.domain) == domain:
            if best is None or s.since_version > best.since_version:
                best = s
    return best


def schema_inputs(domain: str, op: str) -> list[str]:
    """The input names of the installed ORT's newest schema for `domain.op` ([] if none)."""
    s = _schema(domain, op)
    return [] if s is None else [i.name for i in s.inputs]


def schema_has_attr(domain: str, op: str, attr: str) -> bool:
    s = _schema(domain, op)
    return s is not None and attr in s.attributes
