"""Generation-ready across decoder families the issues do not name: a small random config of
each, saved as a Hugging Face folder and taken through `graphopt.optimize` (the frontend a
user's checkpoint goes through), then greedy decoding at batch 3 with left padding on ORT and
TVM; every step's logits must match PyTorch recomputing each row's own unpadded sequence.

GPT-2, Llama, Qwen2 and the shipped model are tested in depth in test_kvcache.py (every
layout, the cache contents); so are the families that needed something of their own there
(GPT-NeoX, Qwen3 and Phi-2 with 4-D attention, OPT's positions from the mask, sliding
windows, Gemma 2's softcap). Here: that the rest fuse and rewrite at all, and right.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import graphopt
from graphopt.errors import UserError
from graphopt.generation import Generator

VOCAB = 128
ATOL = 1e-4
PROMPTS = [[5, 17, 13, 99, 42, 7], [11, 9], [64, 21, 30, 8]]  # left-padded to 6
# hidden 64, 4 query heads of 16 (ORT's rotary in GroupQueryAttention needs a multiple of 16)
COMMON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
              max_position_embeddings=64, vocab_size=VOCAB)
GQA = dict(COMMON, num_key_value_heads=2)

FAMILIES = {
    "mistral": ("MistralForCausalLM", dict(GQA, sliding_window=None)),
    "phi3": ("Phi3ForCausalLM", dict(GQA, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "gemma": ("GemmaForCausalLM", dict(GQA, head_dim=16)),
    "gemma3": ("Gemma3ForCausalLM", dict(GQA, head_dim=16, sliding_window=5)),  # local + global layers
    "olmo": ("OlmoForCausalLM", GQA),
    "olmo2": ("Olmo2ForCausalLM", GQA),  # norms on Q and K
    "granite": ("GraniteForCausalLM", GQA),  # scaled embeddings, residuals and logits
    "starcoder2": ("Starcoder2ForCausalLM", GQA),
    "cohere": ("CohereForCausalLM", GQA),  # parallel attention and MLP, interleaved rotary
    "glm": ("GlmForCausalLM", dict(GQA, head_dim=16, pad_token_id=0)),  # interleaved rotary on half of each head
    "stablelm": ("StableLmForCausalLM", GQA),  # partial rotary
    "gptj": ("GPTJForCausalLM", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, rotary_dim=8,
                                     vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)),
    "codegen": ("CodeGenForCausalLM", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, n_ctx=64,
                                           rotary_dim=8, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)),
    "falcon": ("FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                         vocab_size=VOCAB, new_decoder_architecture=False, multi_query=True)),
    "biogpt": ("BioGptForCausalLM", COMMON),
    # Where(causal, scores, lowest) rather than an added mask; local layers (a window of 4) between global ones
    "gpt_neo": ("GPTNeoForCausalLM", dict(hidden_size=64, num_heads=4, num_layers=2, vocab_size=VOCAB,
                                          max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                          window_size=4, bos_token_id=0, eos_token_id=0)),
    # mixtures of experts, exported dense (frontends/huggingface.py): a TopK router
    "mixtral": ("MixtralForCausalLM", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    # one expert a token: the MoE's sum over its one choice has no reduction loop left (TVM's GEMV rule asserted)
    "mixtral_top1": ("MixtralForCausalLM", dict(GQA, num_local_experts=4, num_experts_per_tok=1)),
    # a shared expert beside the routed ones, top-k weights not renormalized
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=64)),
    "olmoe": ("OlmoeForCausalLM", dict(GQA, num_experts=4, num_experts_per_tok=2)),  # norms on Q and K too
    # its own experts module (w1, v1, w2 stacked by rows; a loop over the experts hit), clamped Q/K/V,
    # top-k weights normalized by their L1 norm
    "dbrx": ("DbrxForCausalLM", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                                     attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                                     ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2))),
    # a GELU gate: not graphopt.MoE's SwiGLU, so every expert on every token (the routed weights zero elsewhere)
    "dbrx_gelu": ("DbrxForCausalLM", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                                          attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                                          ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2,
                                                          ffn_act_fn={"name": "gelu"}))),
    # sparsemixer routing: a [tokens, 1] -inf fill and a scatter into [tokens, experts], sized by the tokens
    "phimoe": ("PhimoeForCausalLM", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    # multi-head latent attention; a group-limited router whose scatter target the exporter sized
    # by the attention mask's shape (re-sized by input_ids for the cache)
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(COMMON, num_key_value_heads=4, moe_intermediate_size=32,
                                                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    # attention sinks (a per-head logit in every softmax), sliding-window layers between full ones, YaRN
    # rotary, a router that softmaxes its top-k logits, biased experts with a clamped SwiGLU (exported dense)
    "gpt_oss": ("GptOssForCausalLM", dict(GQA, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                          intermediate_size=64, sliding_window=4,
                                          layer_types=["sliding_attention", "full_attention"],
                                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                           "beta_slow": 1.0, "rope_theta": 150000.0,
                                                           "original_max_position_embeddings": 16})),
    # its rotary is complex-valued (torch.polar, view_as_complex): exported as the same rotation in
    # real numbers (frontends/huggingface.py _real_rotary); multi-head latent attention, a dense first layer
    "deepseek_v2": ("DeepseekV2ForCausalLM", dict(COMMON, num_key_value_heads=4, moe_intermediate_size=32,
                                                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    # Llama 4 (text): complex rotary (as DeepSeek-V2's), a NoPE layer with attention temperature tuning,
    # a weightless norm on Q and K, MoE layers between dense ones; its chunked attention's chunk is the
    # context here (a narrower chunk is refused: REFUSED)
    "llama4": ("Llama4ForCausalLM", dict(GQA, head_dim=16, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
                                          num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                          no_rope_layers=[1, 1, 1, 0], pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2, attention_chunk_size=64)),
    # ALiBi: a bias of slope[h] * key position added to the scores, found by probing the mask and
    # rebuilt per step from the mask with the past (passes/kvcache/rewrite.py _alibi_slopes). BLOOM
    # computes attention with the heads merged into the batch (bmm) and its positions from the mask;
    # MPT masks with Where(hidden, lowest, scores) after its bias; Falcon's ALiBi variant is fused as-is
    "bloom": ("BloomForCausalLM", dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=VOCAB)),
    "mpt": ("MptForCausalLM", dict(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64)),
    "falcon_alibi": ("FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                               vocab_size=VOCAB, alibi=True, new_decoder_architecture=False,
                                               multi_query=True, parallel_attn=True, bias=False)),
    # sinusoidal positions; the bmm form with the softmax on [batch * heads, seq, seq] after a clamp at the lowest
    "xglm": ("XGLMForCausalLM", dict(d_model=64, attention_heads=4, num_layers=2, ffn_dim=128, vocab_size=VOCAB,
                                     max_position_embeddings=64)),
    # Qwen3's MoE (Q/K norms, top-k weights renormalized); Granite's MoE (its residual, embedding and
    # logit multipliers); dots.llm1 (a dense first layer, a shared expert beside the routed ones)
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True)),
    "granitemoe": ("GraniteMoeForCausalLM", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "dots1": ("Dots1ForCausalLM", dict(GQA, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                       topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1,
                                       n_shared_experts=1)),
    # SmolLM3: no rotary on every fourth layer (here the second); StarCoder 1 / SantaCoder: one key/value
    # head (multi-query) in a fused c_attn; Helium: its RMSNorm's epsilon (1e-8) dropped by the export;
    # Nemotron: LayerNorm1P, partial rotary, ReLU^2; OLMo 3: sliding-window layers and Q/K norms;
    # Apertus: the xIELU activation, Q/K norms; BitNet: norms inside attention and the MLP, ReLU^2
    "smollm3": ("SmolLM3ForCausalLM", dict(GQA, no_rope_layers=[1, 0], pad_token_id=0)),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, vocab_size=VOCAB,
                                                  multi_query=True)),
    "helium": ("HeliumForCausalLM", dict(GQA, head_dim=16)),
    "nemotron": ("NemotronForCausalLM", dict(GQA, head_dim=16, partial_rotary_factor=0.5)),
    "olmo3": ("Olmo3ForCausalLM", dict(GQA, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "apertus": ("ApertusForCausalLM", dict(GQA)),
    "bitnet": ("BitNetForCausalLM", dict(GQA)),
    # its own experts module (not transformers' experts interface): exported as traced
    "jetmoe": ("JetMoeForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                                         num_local_experts=4, num_experts_per_tok=2, kv_channels=16,
                                         intermediate_size=64, max_position_embeddings=64)),
}
# what a family does not do on a backend yet: the one-line error it gets instead
# its router sorts (TopK with k the axis' length: a full sort on TVM), then splits the tokens by the counts
# it routed to each expert: sizes known only from the data
NOT_ON = {("jetmoe", "tvm"): "(Split): split must be a constant"}

_folders: dict = {}


def hf_folder(family: str, tmp_path_factory, spec: tuple | None = None):
    """(the family's Hugging Face folder, the PyTorch model), built once per session; `spec`:
    (class name, config) of a family in neither table."""
    if family not in _folders:
        import torch
        import transformers as tf

        cls_name, config = spec or (FAMILIES[family] if family in FAMILIES else REFUSED[family])
        cls = getattr(tf, cls_name)
        torch.manual_seed(0)
        model = cls(cls.config_class(**config)).eval()
        folder = tmp_path_factory.mktemp(family) / "hf"
        model.save_pretrained(folder)
        _folders[family] = (folder, model)
    return _folders[family]


def decode_against_pytorch(artifact, model, steps: int = 6) -> float:
    """Greedy `steps` tokens of PROMPTS through the artifact's Generator; every step's last
    logits of every row against PyTorch on that row alone. Returns the largest difference."""
    import torch

    gen = Generator.for_artifact(artifact)
    seen = []
    run = gen.run

    def recording(feeds):
        out = run(feeds)
        seen.append(np.array(np.asarray(out["logits"])[:, -1]))
        return out
    gen.run = recording
    tokens = gen.generate(PROMPTS, steps, eos_token_id=-1).tokens
    assert len(seen) == steps and all(len(t) == steps for t in tokens)
    worst = 0.0
    for step, logits in enumerate(seen):
        for row, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                want = model(input_ids=torch.tensor([prompt + tokens[row][:step]]), use_cache=False).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[row], want, rtol=0, atol=ATOL, err_msg=f"step {step}, row {row}")
            worst = max(worst, float(np.abs(logits[row] - want).max()))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_generation_ready_and_decodes_as_pytorch(family, backend, tmp_path, tmp_path_factory):
    if backend == "tvm":
        pytest.importorskip("tvm")
    folder, model = hf_folder(family, tmp_path_factory)
    if (family, backend) in NOT_ON:
        with pytest.raises(UserError, match=re.escape(NOT_ON[family, backend])):
            graphopt.optimize(folder, tmp_path / "out", backend=backend)
        return
    result = graphopt.optimize(folder, tmp_path / "out", backend=backend)
    assert result.report["generation"]["ready"], result.report["generation"]
    # the Hugging Face config beside an ORT artifact: Optimum's ORTModelForCausalLM loads the
    # folder by it (checked by hand with optimum-onnx 0.1.0, which needs transformers < 4.58)
    config = tmp_path / "out" / "config.json"
    assert config.is_file() == (backend == "onnxruntime")
    if config.is_file():
        assert config.read_bytes() == (folder / "config.json").read_bytes()
    decode_against_pytorch(graphopt.load(tmp_path / "out"), model)


REFUSED = {
    # a chunked attention narrower than the context: past a chunk its masks are not causal. Its chunk
    # (80) is past the masks' default probe (64), so only the chunk as a hint the masks are probed past
    # (as a sliding window's) sees that; without it the rewrite took the masks for causal ones
    "llama4_chunked": ("Llama4ForCausalLM", dict(GQA, head_dim=16, intermediate_size=64, intermediate_size_mlp=128,
                                                 num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1,
                                                 interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0],
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                 max_position_embeddings=256, attention_chunk_size=80)),
    # its causal mask multiplies the scores (w * b - 1e4 * (1 - b)): not an attention graphopt fuses yet
    "openai_gpt": ("OpenAIGPTLMHeadModel", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, vocab_size=VOCAB)),
}
REASONS = {"openai_gpt": "attention is not fused: Softmax node",
           "llama4_chunked": "is neither causal nor causal within a sliding window"}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_with_the_reason_and_the_artifact_recomputes_the_sequence(family, tmp_path, tmp_path_factory):
    import torch

    folder, model = hf_folder(family, tmp_path_factory)
    result = graphopt.optimize(folder, tmp_path / "out")
    gen = result.report["generation"]
    assert not gen["ready"] and REASONS[family] in gen["reason"]
    artifact = graphopt.load(tmp_path / "out")
    ids = np.array([[0, 0, 5, 17, 13] + [7] * 17, [11, 9, 64, 21, 30] + [7] * 17], np.int64)  # past 16
    mask = np.array([[0, 0] + [1] * 20, [1] * 22], np.int64)
    got = artifact.run({"input_ids": ids, "attention_mask": mask})["logits"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=ATOL)  # the unpadded row
    np.testing.assert_allclose(got[0, 2:], want[0, 2:], rtol=0, atol=ATOL)  # the real positions
    # generate says why (it said "optimize again without --no-kv-cache or --passes", which no one gave)
    assert REASONS[family] in artifact.manifest["not_generation_ready"]
    with pytest.raises(UserError, match="not a generation-ready artifact: optimize could not add the KV cache "
                                        f"\\(.*{REASONS[family]}"):
        artifact.generate([[5, 17]], max_new_tokens=2)
    if family == "openai_gpt":  # a cache asked for by name is not a silent fallback: nothing written
        with pytest.raises(UserError, match=f"--kv-layout static: .*{REASONS[family]}"):
            graphopt.optimize(folder, tmp_path / "static", kv_layout="static")
        assert not (tmp_path / "static").exists()


@pytest.mark.slow
def test_gpt_oss_experts_run_sparse_with_their_biases_and_clamp(tmp_path, tmp_path_factory):
    """GPT-OSS's experts (transposed, gate and up interleaved, biased, a clamped SwiGLU) export as
    one graphopt.MoE a layer, not dense: ORT runs com.microsoft.MoE with both biases and the clamp,
    and int4 com.microsoft.QMoE with them (the family test above checks the logits)."""
    import onnx

    folder, model = hf_folder("gpt_oss", tmp_path_factory)
    layers = model.config.num_hidden_layers
    for quantize, kernel in ((None, "MoE"), ("int4", "QMoE")):
        graphopt.optimize(folder, tmp_path / kernel, quantize=quantize)
        nodes = [n for n in onnx.load(str(tmp_path / kernel / "model.onnx"), load_external_data=False).graph.node
                 if n.op_type == kernel]
        assert len(nodes) == layers
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs["swiglu_limit"] == pytest.approx(model.config.swiglu_limit)
        assert attrs["activation_alpha"] == pytest.approx(1.702) and attrs["activation_beta"] == 1.0
        fc1_bias, fc2_bias = (nodes[0].input[i] for i in ((3, 5) if kernel == "MoE" else (4, 7)))
        assert fc1_bias and fc2_bias


@pytest.mark.slow
def test_dbrx_experts_run_sparse(tmp_path, tmp_path_factory):
    """DBRX's own experts module exports as one graphopt.MoE a layer (com.microsoft.MoE; QMoE in
    int4), its w1/v1/w2 rows restacked as the op's gate+up and down; the family test above checks
    the logits, which a dense export would pass too."""
    import onnx

    folder, model = hf_folder("dbrx", tmp_path_factory)
    for quantize, kernel in ((None, "MoE"), ("int4", "QMoE")):
        result = graphopt.optimize(folder, tmp_path / kernel, quantize=quantize)
        ops = [n.op_type for n in onnx.load(str(tmp_path / kernel / "model.onnx"), load_external_data=False).graph.node]
        assert ops.count(kernel) == model.config.n_layers, ops
    # the report's bytes count the experts' weights (they were left out: 0.13 MB of the model's 0.92 MB)
    q = result.report["quantization"]
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    assert q["float_weight_bytes"] > experts and q["quantized_weight_bytes"] < q["float_weight_bytes"] / 4


@pytest.mark.slow
def test_a_mixture_of_experts_runs_sparse_on_ort_and_quantizes_every_expert(tmp_path, tmp_path_factory):
    """SwiGLU experts export as one graphopt.MoE a layer, which ORT runs as com.microsoft.MoE
    (only the chosen experts; the family test above checks its logits); int4 (RTN) makes it a
    graphopt.QuantMoE, com.microsoft.QMoE, greedy tokens as the int4 model's reference graph.
    GPTQ decomposes it: each expert's projections (stacked [experts, out, in] in the
    checkpoint) become weights of their own, all quantized (sliced at run time, they were
    neither folded nor quantized)."""
    import onnx

    folder, _ = hf_folder("mixtral", tmp_path_factory)
    layers, experts = 2, 4

    def ops(out):
        return [n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    graphopt.optimize(folder, tmp_path / "fp32")
    fp32 = ops(tmp_path / "fp32")
    assert fp32.count("MoE") == layers and fp32.count("MatMul") == layers * 3 + 1  # QKV, O, router; LM head
    # int4 (fp32 arithmetic on the dequantized weights, so that the two are comparable)
    exact = {"quant_accuracy_level": "0"}
    rtn = graphopt.optimize(folder, tmp_path / "int4", quantize="int4", backend_options=exact)
    assert rtn.report["generation"]["ready"]
    int4 = ops(tmp_path / "int4")
    assert int4.count("QMoE") == layers and int4.count("MatMulNBits") == layers * 3 + 1 and "MatMul" not in int4
    # against the same int4 model on TVM, where QuantMoE runs the chosen experts' panels
    # (quant_panels.moe_gemv_source): every greedy step's logits, row by row
    pytest.importorskip("tvm")
    graphopt.optimize(folder, tmp_path / "int4_tvm", quantize="int4", backend="tvm", backend_options=exact)
    ort_steps, tvm_steps = (greedy_logits(graphopt.load(tmp_path / name)) for name in ("int4", "int4_tvm"))
    np.testing.assert_allclose(ort_steps, tvm_steps, rtol=0, atol=ATOL)
    calib = tmp_path / "calib.npz"
    ids = np.random.default_rng(0).integers(1, VOCAB, (4, 12))
    np.savez(calib, input_ids=ids, attention_mask=np.ones_like(ids))
    result = graphopt.optimize(folder, tmp_path / "gptq", quantize="int4", quant_method="gptq", calibration=calib)
    assert result.report["generation"]["ready"]
    gptq = ops(tmp_path / "gptq")
    # per layer: Q/K/V (merged), O, the router, each expert's gate+up and down; the LM head
    assert gptq.count("MatMulNBits") == layers * (3 + 2 * experts) + 1
    assert "MatMul" not in gptq and "Transpose" not in gptq and "QMoE" not in gptq
    # the report counts the stacked expert weights as replaced (not kept beside their int4 slices)
    q = result.report["quantization"]
    expert_bytes = layers * experts * 3 * 128 * 64 * 4  # gate, up, down: [128, 64] each, f32
    assert q["float_weight_bytes"] >= expert_bytes and q["quantized_weight_bytes"] < q["float_weight_bytes"] / 4


@pytest.mark.slow
def test_compare_anchors_load_a_mixture_of_experts_export(tmp_path_factory):
    """The anchors run the export in plain ORT, which does not know graphopt.MoE: it is
    decomposed for them (the ort-plain cell failed to load)."""
    from graphopt.compare.run import compare
    from graphopt.compare.timing import TimingSettings

    folder, _ = hf_folder("mixtral", tmp_path_factory)
    r = compare([str(folder)], backends=["torch", "ort"], variants=["fp32", "ort-plain"], seqs=[8], threads=1,
                timing=TimingSettings(warmup=1, min_runs=3, min_time=0.0), measure_bandwidth=False,
                measure_memory=False)
    cells = {c["id"]: c for c in r["cells"]}
    for cid in ("ort/fp32", "ort/ort-plain"):
        assert cells[cid]["results"][0]["accuracy"]["max_abs_err"] < ATOL, cells[cid]


def greedy_logits(artifact, steps: int = 5) -> np.ndarray:
    """[steps, rows, vocab]: the last logits of every greedy step of PROMPTS."""
    gen = Generator.for_artifact(artifact)
    seen, run = [], gen.run

    def recording(feeds):
        out = run(feeds)
        seen.append(np.array(np.asarray(out["logits"])[:, -1]))
        return out
    gen.run = recording
    gen.generate(PROMPTS, steps, eos_token_id=-1)
    return np.stack(seen)


# LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): other rotary frequencies once the longest
# position passes the original context (16 here), for every position
LONGROPE = ("Phi3ForCausalLM", dict(GQA, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                    original_max_position_embeddings=16,
                                    rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                  "long_factor": [4.0] * 8}))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_longrope_recomputes_the_cache_where_the_long_factors_begin(backend, tmp_path, tmp_path_factory):
    """The artifact reads the short table's rows up to 16 positions and the long one's after
    (rewrite-kv-cache finds the switch), and the Generator recomputes the cache once where the
    sequence passes 16, as transformers' generate does (its cached keys were rotated by the
    short factors): every step's logits, across the switch, as transformers' own greedy
    generation of the left-padded batch."""
    import torch

    if backend == "tvm":
        pytest.importorskip("tvm")
    folder, model = hf_folder("phi3_longrope", tmp_path_factory, LONGROPE)
    graphopt.optimize(folder, tmp_path / "out", backend=backend)
    artifact = graphopt.load(tmp_path / "out")
    assert artifact.manifest["generation"]["recompute_cache_at"] == 16
    gen = Generator.for_artifact(artifact)
    seen, logits, run = [], [], gen.run

    def recording(feeds):
        seen.append(feeds["input_ids"].shape[1])
        out = run(feeds)
        logits.append(np.array(np.asarray(out["logits"])[:, -1]))
        return out
    gen.run = recording
    steps = 14  # the longest prompt (6) + 13 tokens: the cache is recomputed at the 11th step
    tokens = gen.generate(PROMPTS, steps, eos_token_id=-1).tokens
    assert seen == [6] + [1] * 10 + [17] + [1] * 2  # one prefill over the 17 positions, where they pass 16
    ids = np.zeros((3, 6), np.int64)
    mask = np.zeros((3, 6), np.int64)
    for r, p in enumerate(PROMPTS):
        ids[r, 6 - len(p):], mask[r, 6 - len(p):] = p, 1
    with torch.no_grad():
        want = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert want.sequences[:, 6:].tolist() == tokens
    for step, (got, w) in enumerate(zip(logits, want.logits)):
        np.testing.assert_allclose(got, w.numpy(), rtol=0, atol=ATOL, err_msg=f"step {step}")


@pytest.mark.slow
def test_gpt2_reorder_and_upcast_attn_is_generation_ready_and_decodes_as_pytorch(tmp_path):
    """Its scores are a baddbmm (heads merged into the batch, plus beta times zeros): the Softmax
    stayed unfused and the model was not generation-ready (tests/test_fusion_baddbmm.py: the rules)."""
    import torch
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                     reorder_and_upcast_attn=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    result = graphopt.optimize(tmp_path / "hf", tmp_path / "out")
    assert result.report["generation"]["ready"], result.report["generation"]
    stats = [(e["name"], e["stats"]) for e in result.report["passes"]
             if e.get("name") in ("remove-identities", "fuse-attention")]
    assert stats[0][0] == "remove-identities" and stats[0][1].get("add-zeros") == 1  # the cleanup before fusion
    assert ("fuse-attention", {"attention": 1}) in stats
    decode_against_pytorch(graphopt.load(tmp_path / "out"), model)
