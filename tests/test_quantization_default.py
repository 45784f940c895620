"""Quantization of the shipped model, examples/default, measured: perplexity of its ORT
artifact on the first 8,192 tokens of its validation text, fp32 against int8 and int4.

Budgets (the issue's): int8 within 0.5 % of fp32; int4 block 32 within 3 %, GPTQ and AWQ
better than RTN. GPTQ and AWQ calibrate on the training corpus (graphopt.calibration), never
on val.txt.
benchmarks/quant_accuracy.py measures the whole validation text.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from graphopt.accuracy import perplexity  # noqa: E402
from graphopt.pass_manager import PassContext, PassManager  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "examples" / "default"
TOKENS = 8192


@pytest.fixture(scope="module")
def default_model():
    """(the fused fp32 graph, validation token ids): exported once for the module."""
    import graphopt
    from graphopt.train.data import encode_documents, read_val_text
    from graphopt.train.tokenizer import load_tokenizer

    graph = graphopt.optimize(str(MODEL), None, kv_cache=False).graph  # full-sequence logits, to score
    ids = encode_documents(load_tokenizer(MODEL / "tokenizer.json"), read_val_text(MODEL / "val.txt"))
    return graph, ids[:TOKENS + 1]


def ort_perplexity(graph, ids, tmp_path: Path, name: str) -> float:
    import onnxruntime as ort

    import graphopt.backends.onnxruntime as ort_backend
    from graphopt.onnx_io import save_onnx

    save_onnx(ort_backend.lower(graph, "cpu"), tmp_path / f"{name}.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
    return perplexity(lambda x: sess.run(["logits"], {"input_ids": x})[0], ids, 256).perplexity


def test_int8_and_int4_perplexity_within_budget(default_model, tmp_path):
    from graphopt.calibration import load_calibration

    import torch

    from graphopt.train import load_model
    from graphopt.train.trainer import evaluate_tokens

    graph, ids = default_model
    fp32 = ort_perplexity(graph, ids, tmp_path, "fp32")
    with torch.inference_mode():  # the fp32 artifact scores what the checkpoint scores
        nll, count = evaluate_tokens(load_model(MODEL)[0], ids, 256)
    assert count == TOKENS and abs(fp32 / np.exp(nll / count) - 1) < 1e-4
    ppl = {}
    for name, pipeline in (("int8", "quantize-weights{bits=8,block-size=128}"),
                           ("int4-rtn", "quantize-weights{bits=4,block-size=32}"),
                           ("int4-gptq", "quantize-weights{bits=4,block-size=32,method=gptq}"),
                           ("int4-awq", "quantize-weights{bits=4,block-size=32,method=awq}")):
        ctx = PassContext()
        if name in ("int4-gptq", "int4-awq"):
            ctx.hints["calibration"] = load_calibration(None, MODEL, graph, samples=16)
        pm = PassManager(pipeline, ctx=ctx)
        quantized = pm.run(graph)
        assert sum(n.op_type == "QuantLinear" for n in quantized.nodes) == 25  # 6 x (qkv, o, gate-up, down) + head
        ppl[name] = ort_perplexity(quantized, ids, tmp_path, name)
    rel = {k: v / fp32 - 1 for k, v in ppl.items()}
    assert abs(rel["int8"]) < 0.005, rel
    assert 0 < rel["int4-rtn"] < 0.03, rel
    assert rel["int4-gptq"] < rel["int4-rtn"], rel
    assert rel["int4-awq"] < rel["int4-rtn"], rel  # measured: +0.90 % against RTN's +1.40 % (GPTQ +1.17 %)


def test_int8_static_perplexity_within_budget(default_model, tmp_path):
    """QDQ int8 weights and activations, ranges from the training corpus (percentile): within
    0.5 % of fp32 (measured +0.13 %; minmax +0.85 %, entropy +11 %, docs/quantization.md)."""
    from graphopt.calibration import load_calibration

    graph, ids = default_model
    fp32 = ort_perplexity(graph, ids, tmp_path, "fp32")
    ctx = PassContext(hints={"calibration": load_calibration(None, MODEL, graph, samples=16)})
    quantized = PassManager("quantize-static{calibration=percentile}", ctx=ctx).run(graph)
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.nodes) == 25  # an X per layer: 6 x (qkv, o, gate-up, down) + head
    rel = ort_perplexity(quantized, ids, tmp_path, "int8-static") / fp32 - 1
    assert 0 < rel < 0.005, rel


def test_eval_takes_an_artifact_folder(default_model, tmp_path):
    """`graphopt eval OUT` scores an artifact as `graphopt eval CHECKPOINT` scores the checkpoint."""
    import json

    from click.testing import CliRunner

    import graphopt
    from graphopt.cli import cli

    graph, _ = default_model
    graphopt.optimize(graph, tmp_path / "fp32", passes="eliminate-dead-code")
    graphopt.optimize(graph, tmp_path / "int8", passes="quantize-weights{bits=8,block-size=128}")
    scores = {}
    for name, target in (("checkpoint", MODEL), ("fp32", tmp_path / "fp32"), ("int8", tmp_path / "int8")):
        r = CliRunner().invoke(cli, ["eval", str(target), "--max-tokens", "2048", "--json"])
        assert r.exit_code == 0, r.output
        scores[name] = json.loads(r.output.strip().splitlines()[-1])
    assert scores["fp32"]["tokens"] == scores["checkpoint"]["tokens"] == 2048
    assert abs(scores["fp32"]["perplexity"] / scores["checkpoint"]["perplexity"] - 1) < 1e-4
    assert scores["int8"]["perplexity"] != scores["fp32"]["perplexity"]
    assert abs(scores["int8"]["perplexity"] / scores["fp32"]["perplexity"] - 1) < 0.005
