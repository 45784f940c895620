"""genai_config.json can describe a model only when every layer has the same key/value heads,
head size and query heads: a model pruned per layer gets none (and the manifest says why)."""
from __future__ import annotations

from graphopt.dtypes import DType
from graphopt.genai import _hidden_size, genai_unsupported
from graphopt.ir import Graph, TensorType


def _manifest(kv_heads: list[int], head: int = 32) -> dict:
    inputs = [{"name": "input_ids", "shape": ["batch", "seq"]}]
    for i, n in enumerate(kv_heads):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "shape": ["batch", n, "past_seq", head]})
    return {"signature": {"inputs": inputs, "outputs": []}}


def _graph_with_attention(query_heads: list[int]) -> Graph:
    g = Graph("g")
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", "seq", 64)))
    for n in query_heads:
        node = g.append(g.make_node("Attention", [x, x, x], domain="graphopt", attrs={"num_heads": n},
                                    output_types=[TensorType(DType.FLOAT32, ("batch", "seq", 64))]))
        x = node.outputs[0]
    g.outputs = [x]
    return g


def test_uniform_layers_are_described():
    assert genai_unsupported(_graph_with_attention([6, 6]), _manifest([2, 2])) is None


def test_layers_that_differ_get_no_config():
    assert "differ" in genai_unsupported(_graph_with_attention([6, 6]), _manifest([2, 1]))
    assert "differ" in genai_unsupported(_graph_with_attention([6, 3]), _manifest([2, 2]))


def test_hidden_size_comes_from_the_config():
    assert _hidden_size({"hidden_size": 512}) == 512
    assert _hidden_size({"model": {"dim": 192}}) == 192
    assert _hidden_size(None) is None and _hidden_size({"n_embd": 768}) is None


def test_genai_type_follows_the_cache_inputs_not_the_family():
    """graphopt writes a key and a value cache per layer: genai's DecoderOnly pipeline feeds them;
    its "gpt2" type (GPT-2, graphopt.train's "gpt") expects one combined past_%d and failed."""
    from graphopt.genai import genai_type

    inputs = {e["name"]: e for e in _manifest([2, 2])["signature"]["inputs"]}
    assert [genai_type(arch, inputs) for arch in ("gpt2", "gpt", "qwen2", "bloom")] == ["llama", "llama", "qwen2",
                                                                                         "llama"]


def test_a_growing_cache_is_shared_in_genai_only_where_its_full_context_is_small():
    """genai preallocates a shared cache for the whole context before the first token: a
    GroupQueryAttention cache of 2 layers x 2 x 2 heads x 32 x 4 bytes = 1 KiB a position is
    shared up to 1 GiB (1,048,576 positions), grows beyond; never without the manifest's flag."""
    from graphopt.genai import GENAI_SHARED_CACHE_LIMIT, _share_growing

    sig = _manifest([2, 2])["signature"]
    for entry in sig["inputs"][1:]:
        entry["dtype"] = "f32"
    sig["inputs"].insert(1, {"name": "attention_mask", "dtype": "i64", "shape": ["batch", "past_seq + seq"]})
    per_position = 2 * 2 * 2 * 32 * 4
    gen = {"num_layers": 2, "past_present_share_buffer": True}
    assert _share_growing({**gen, "max_positions": GENAI_SHARED_CACHE_LIMIT // per_position}, sig)
    assert not _share_growing({**gen, "max_positions": GENAI_SHARED_CACHE_LIMIT // per_position + 1}, sig)
    assert not _share_growing({**gen, "past_present_share_buffer": False, "max_positions": 64}, sig)
