"""The fused CPU attention kernel (backends/tvm/schedules_attention.py) against the reference
interpreter: one artifact per configuration (symbolic batch, seq and past), run at odd
lengths (seq 1, 7, 33, 128; past 0, 5, 128), batch 3 with left-padded masks, grouped-query
attention with 1, 3 and 4 query heads per key/value head, causal or masked, and the masks
the exporters write (-inf, or the lowest finite float as the shipped model's). The kernel
itself is checked to be what the CPU build runs (with the cache append: one kernel for both
concatenations and transposes), and not what the CUDA build runs."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.testing import require_installed

require_installed("tvm", "apache-tvm")

import graphopt.backends.tvm as tvm_backend  # noqa: E402
from graphopt.backends.tvm.lowering import lower_graph, prepare  # noqa: E402
from graphopt.interpreter import run as run_reference  # noqa: E402
from graphopt.testing import assert_close, one_node_graph  # noqa: E402

HEAD = 8
KV_HEADS = 2
SHAPES = [(1, 1, 0), (1, 1, 5), (1, 1, 128), (3, 7, 0), (3, 7, 5), (3, 33, 5), (1, 128, 0), (3, 1, 128),
          (2, 128, 128)]  # (batch, seq, past)


def _graph(group: int, causal: bool, mask: str):
    """Attention over 3-D q/k/v and a BNSH past; `mask`: "none", "float [batch, 1, seq,
    total]" (the exporters' additive mask) or "bool [batch, 1, 1, total]" (padding only)."""
    rng = np.random.default_rng(0)
    nq = KV_HEADS * group
    total = "past + seq"
    inputs = [("q", rng.random((1, 1, nq * HEAD), np.float32), ("batch", "seq", None), False),
              ("k", rng.random((1, 1, KV_HEADS * HEAD), np.float32), ("batch", "seq", None), False),
              ("v", rng.random((1, 1, KV_HEADS * HEAD), np.float32), ("batch", "seq", None), False)]
    if mask == "float":
        inputs.append(("mask", np.zeros((1, 1, 1, 1), np.float32), ("batch", None, "seq", total), False))
    elif mask == "bool":
        inputs.append(("mask", np.ones((1, 1, 1, 1), bool), ("batch", None, None, total), False))
    else:
        inputs.append(None)
    inputs += [(f"past_{kv}", np.zeros((1, KV_HEADS, 1, HEAD), np.float32), ("batch", None, "past", None), False)
               for kv in ("k", "v")]
    attrs = {"num_heads": nq, "kv_num_heads": KV_HEADS, "causal": int(causal)}
    return one_node_graph("Attention", inputs, attrs, n_out=3)


def _feeds(group: int, batch: int, seq: int, past: int, mask: str, masked_value: float, seed: int):
    rng = np.random.default_rng(seed)
    nq, total = KV_HEADS * group, past + seq
    feeds = {"q": rng.standard_normal((batch, seq, nq * HEAD), np.float32),
             "k": rng.standard_normal((batch, seq, KV_HEADS * HEAD), np.float32),
             "v": rng.standard_normal((batch, seq, KV_HEADS * HEAD), np.float32),
             "past_k": rng.standard_normal((batch, KV_HEADS, past, HEAD), np.float32),
             "past_v": rng.standard_normal((batch, KV_HEADS, past, HEAD), np.float32)}
    # left padding: row r has 2 r padded positions (row 2 of a one-token prefill sees nothing)
    visible = np.arange(total)[None, :] >= 2 * np.arange(batch)[:, None]  # [batch, total]
    if mask == "float":
        causal = np.arange(total)[None, :] <= np.arange(seq)[:, None] + past  # [seq, total]
        keep = visible[:, None, None, :] & causal[None, None]
        feeds["mask"] = np.where(keep, 0.0, masked_value).astype(np.float32)
    elif mask == "bool":
        feeds["mask"] = visible[:, None, None, :]
    return feeds


@pytest.mark.parametrize("group,causal,mask,masked_value", [
    (1, False, "float", -np.inf),
    (3, False, "float", float(np.finfo(np.float32).min)),  # the shipped model's mask
    (4, True, "bool", -np.inf),
    (3, True, "none", -np.inf),
])
def test_fused_attention_matches_the_reference(group, causal, mask, masked_value):
    g = _graph(group, causal, mask)
    artifact = tvm_backend.compile_graph(g)
    for i, (batch, seq, past) in enumerate(SHAPES):
        feeds = _feeds(group, batch, seq, past, mask, masked_value, seed=i)
        want = run_reference(g, feeds)
        got = artifact.run(feeds)
        for name, expected in want.items():
            assert_close(got[name], expected, rtol=1e-5, atol=1e-6, what=f"{name} at {batch}x{seq}+{past}")


def _lowered(pack_weights: bool) -> tuple[set[str], str]:
    """The functions of the lowered module, and its text."""
    mod, _ = lower_graph(prepare(_graph(3, False, "float")), pack_weights=pack_weights)
    return {gv.name_hint for gv in mod.get_global_vars()}, mod.script()


def test_the_cpu_build_runs_the_fused_kernels_and_cuda_keeps_the_relax_form():
    funcs, text = _lowered(pack_weights=True)  # what the cpu target lowers (runtime.compile_graph)
    assert {"fused_attention", "kv_append"} <= funcs, sorted(funcs)
    assert not any(op in text for op in ("softmax", "matmul", "concat", "permute_dims")), text
    funcs, text = _lowered(pack_weights=False)  # cuda
    assert not {"fused_attention", "kv_append"} & funcs and "R.nn.softmax" in text, sorted(funcs)


def test_a_mask_of_another_length_is_refused_at_run_time():
    artifact = tvm_backend.compile_graph(_graph(3, False, "float"))
    feeds = _feeds(3, 1, 4, 5, "float", -np.inf, seed=0)
    feeds["mask"] = np.zeros((1, 1, 4, 10), np.float32)  # past + seq is 9
    with pytest.raises(Exception, match="neither 1 nor past \\+ seq"):
        artifact.run(feeds)


def test_silu_with_the_polynomial_exp_matches_the_reference():
    """The CPU build's SiLU (x * sigmoid(x), the fused kernels' `exp`) over the whole float
    range that matters: far tails, around 0, and the clamp of the exponent at +-88."""
    x = np.concatenate([np.linspace(-120, 120, 481), np.linspace(-1, 1, 63)]).astype(np.float32)[None]
    g = one_node_graph("Linear", [("x", x, None, False), ("w", np.eye(x.shape[1], dtype=np.float32), None, True)],
                       {"activation": "silu"})
    want = run_reference(g, {"x": x})
    got = tvm_backend.compile_graph(g).run({"x": x})
    for name, expected in want.items():
        assert_close(got[name], expected, rtol=1e-5, atol=1e-6, what=name)
