"""graphopt compare: the report's structure, accuracy measured against eager PyTorch (not
against another variant), failing cells reported beside working ones, interleaved timing,
the CLI's outputs, and the HTML page rendered in a real headless browser."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.cli import cli
from graphopt.compare import variants as V
from graphopt.compare.html import embedded_report, render_html
from graphopt.compare.run import compare
from graphopt.compare.timing import TimingSettings, time_interleaved

QUICK = TimingSettings(warmup=1, min_runs=3, min_time=0.0)
OFFSET = 0.25


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama (random weights) saved as a Hugging Face folder."""
    from graphopt.testing import tiny_hf_model

    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("compare") / "tiny-llama"
    tiny_hf_model("llama").model.save_pretrained(folder)
    words = TEXT.split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder.parent / "text.txt").write_text(TEXT)
    return folder


# A text of fewer distinct words than the tiny model's 128-token vocabulary, for --data.
TEXT = " ".join(f"w{(i * 7) % 50} w{(i * 3) % 40}" for i in range(300))


def _shifted(shift: float = 0.0, scale: float = 1.0):
    """A test variant: ORT on the export with its logits changed by a known amount."""
    def build(ctx, backend):
        base = ctx.ort_runner(ctx.export_onnx(), 0.0)
        return V.Runner(lambda feeds: base.run(feeds) * scale + shift, base.size_bytes, "test", 0.0)
    return build


def _nan_at_first(ctx, backend):
    base = ctx.ort_runner(ctx.export_onnx(), 0.0)

    def run(feeds):
        out = base.run(feeds).copy()
        out[-1, 0, 0] = np.nan  # an unpadded position, and one perplexity scores
        return out
    return V.Runner(run, base.size_bytes, "test", 0.0)


def _fails_at_build(ctx, backend):
    raise RuntimeError("deliberate build failure")


def _fails_at_seq8(ctx, backend):
    base = ctx.ort_runner(ctx.export_onnx(), 0.0)

    def run(feeds):
        if feeds["input_ids"].shape[1] == 8:
            raise ValueError("deliberate failure at seq 8")
        return base.run(feeds)
    return V.Runner(run, base.size_bytes, "test", 0.0)


@pytest.fixture(scope="module")
def test_variants():
    names = {"shift": _shifted(OFFSET), "shift2": _shifted(2 * OFFSET), "negated": _shifted(scale=-1.0),
             "broken": _fails_at_build, "broken-at-8": _fails_at_seq8, "nan": _nan_at_first}
    for name, build in names.items():
        V.register_variant(name, backends=("ort",), summary=f"test variant {name}", default=False)(build)
    yield list(names)
    for name in names:
        V.unregister_variant(name)


@pytest.fixture(scope="module")
def report(hf_folder, test_variants):
    return compare([str(hf_folder)], backends=["torch", "ort"], variants=["fp32", "ort-plain"] + test_variants,
                   batch=2, seqs=[8, 16], threads=1, timing=QUICK, measure_bandwidth=False,
                   data=str(hf_folder.parent / "text.txt"), data_tokens=256)


def _cell(report, cid):
    return next(c for c in report["cells"] if c["id"] == cid)


def test_report_structure(report):
    assert report["format"] == "graphopt-compare" and report["format_version"] == 1
    ids = [c["id"] for c in report["cells"]]
    assert ids[0] == "torch/fp32"  # the reference comes first
    assert set(ids) == {"torch/fp32", "ort/fp32", "ort/ort-plain", "ort/shift", "ort/shift2", "ort/negated",
                        "ort/broken", "ort/broken-at-8", "ort/nan"}
    assert report["baseline"] == "ort/ort-plain"
    assert report["reference"] == {"what": "eager fp32 PyTorch", "id": "torch/fp32"}
    assert report["model"]["kind"] == "decoder"
    assert report["settings"]["threads"] == 1 and report["settings"]["seqs"] == [8, 16]
    m = report["machine"]
    assert m["cpu"] and m["logical_cores"] >= 1 and isinstance(m["isa"], list)
    assert {"python", "numpy", "onnxruntime", "torch"} <= set(report["versions"])
    for c in report["cells"]:
        if c["status"] != "ok":
            continue
        assert [(r["batch"], r["seq"]) for r in c["results"]] == [(2, 8), (2, 16)]
        assert c["size_bytes"] > 0
        for r in c["results"]:
            if "error" in r:
                continue
            s = r["samples_ms"]
            assert len(s) == r["runs"] >= QUICK.min_runs
            assert r["p50_ms"] == pytest.approx(float(np.percentile(s, 50)), rel=1e-9)
            assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["tokens_per_s"] == pytest.approx(2 * r["seq"] / r["p50_ms"] * 1e3)
    assert _cell(report, "ort/fp32")["build_seconds"] > 0
    json.dumps(report, allow_nan=False)  # JSON-ready as it is


def test_peak_memory_comes_from_a_fresh_process_per_cell(report):
    for cid in ("torch/fp32", "ort/fp32", "ort/ort-plain"):
        mem = _cell(report, cid)["memory"]
        assert "fresh process" in mem["how"]
        assert mem["peak_bytes"] == mem["runtime_bytes"] + mem["model_and_run_bytes"]
        # the loaded weights are resident: what loading added is at least the weights' size
        assert mem["model_and_run_bytes"] >= 0.9 * _cell(report, "torch/fp32")["size_bytes"]
    # a runner made in this process only (the test variants) cannot be loaded elsewhere: said so
    assert "cannot be loaded" in _cell(report, "ort/shift")["memory"]["error"]
    assert _cell(report, "ort/broken")["memory"] is None


def test_accuracy_is_measured_against_pytorch(report):
    for r in _cell(report, "torch/fp32")["results"]:
        assert r["accuracy"]["max_abs_err"] == 0.0 and r["accuracy"]["top1_agreement"] == 1.0
    for r in _cell(report, "ort/fp32")["results"]:
        assert r["accuracy"]["max_abs_err"] < 1e-4 and r["accuracy"]["top1_agreement"] == 1.0
    # Offsets of 0.25 and 0.5: each shows its own distance from PyTorch (0.5, not the 0.25
    # between the two variants), and shifting every logit keeps the argmax.
    for name, want in (("ort/shift", OFFSET), ("ort/shift2", 2 * OFFSET)):
        for r in _cell(report, name)["results"]:
            assert r["accuracy"]["max_abs_err"] == pytest.approx(want, abs=1e-4)
            assert r["accuracy"]["top1_agreement"] == 1.0
    for r in _cell(report, "ort/negated")["results"]:
        assert r["accuracy"]["top1_agreement"] < 0.2
        assert r["accuracy"]["max_abs_err"] == pytest.approx(2 * r["accuracy"]["ref_max_abs"], rel=0.5)


def test_perplexity_on_data(report, hf_folder):
    """The reference perplexity, recomputed here from the transformers model directly, and
    each cell's: the same for fp32 and for logits shifted by a constant (softmax ignores it),
    not for negated logits (near-uniform with random weights, so only a little different)."""
    import torch
    import transformers

    p = report["perplexity"]
    assert p["tokens"] == 256 and p["window"] == 16
    from tokenizers import Tokenizer

    ids = np.asarray(Tokenizer.from_file(str(hf_folder / "tokenizer.json")).encode(TEXT).ids[:256]).reshape(16, 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids), attention_mask=torch.ones(16, 16, dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.from_numpy(ids[:, 1:]).reshape(-1))
    assert p["reference"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    for cid in ("torch/fp32", "ort/fp32", "ort/ort-plain", "ort/shift"):
        assert _cell(report, cid)["perplexity"]["perplexity"] == pytest.approx(p["reference"], rel=1e-4)
    assert _cell(report, "ort/negated")["perplexity"]["perplexity"] != pytest.approx(p["reference"], rel=5e-3)
    assert "non-finite" in _cell(report, "ort/nan")["perplexity"]["error"]


def test_nonfinite_outputs_are_counted_not_written_as_nan(report):
    for r in _cell(report, "ort/nan")["results"]:
        assert r["accuracy"]["nonfinite"] == 1 and r["accuracy"]["max_abs_err"] < 1e-4
    json.dumps(report, allow_nan=False)


def test_an_onnx_file_is_measured_against_ort_without_optimizations():
    """No PyTorch model behind an .onnx file: the torch column is skipped (and says why) and
    accuracy is against the export run by ORT with its optimizations off."""
    model = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"
    r = compare([str(model)], variants=["fp32", "ort-plain"], batch=3, seqs=[1], threads=1, timing=QUICK,
                measure_bandwidth=False)
    assert [c["id"] for c in r["cells"]] == ["ort/fp32", "ort/ort-plain"]
    assert r["skipped"] == [{"variant": "fp32", "backend": "torch", "reason": "no PyTorch model for this source"}]
    assert r["reference"] == {"what": "ONNX Runtime on the export, ORT_DISABLE_ALL", "id": None}
    assert r["model"]["kind"] == "encoder"
    for c in r["cells"]:
        acc = c["results"][0]["accuracy"]
        assert acc["max_abs_err"] < 1e-5 and acc["pooled_cosine"] > 0.99999


def test_a_pruning_variant_that_prunes_nothing_is_an_error_cell_not_the_float_model():
    """tiny_mlp has no attention for prune-heads: its cell says nothing was pruned rather than
    timing the unpruned model under the variant's name (prune-mlp does prune it)."""
    model = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"
    r = compare([str(model)], backends=["ort"], variants=["prune-heads", "prune-mlp"], batch=1, seqs=[1],
                threads=1, timing=QUICK, measure_bandwidth=False)
    cell = _cell(r, "ort/prune-heads")
    assert cell["status"] == "error" and "prune-heads: nothing pruned (no heads: no attention block" in cell["error"]
    assert _cell(r, "ort/prune-mlp")["status"] == "ok"


def test_a_bert_reference_gets_the_segment_ids_the_export_takes(tmp_path):
    """BERT's export takes token_type_ids (a sentence pair); PyTorch must get the same ones,
    or every column is off by the segment embedding."""
    import torch
    import transformers as tf

    cfg = tf.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    tf.BertModel(cfg).eval().save_pretrained(tmp_path / "bert")
    r = compare([str(tmp_path / "bert")], backends=["torch", "ort"], variants=["fp32", "ort-plain"], seqs=[8],
                threads=1, timing=QUICK, measure_bandwidth=False, measure_memory=False)
    for cid in ("ort/fp32", "ort/ort-plain"):
        acc = _cell(r, cid)["results"][0]["accuracy"]
        assert acc["max_abs_err"] < 1e-4 and acc["pooled_cosine"] > 0.99999


def test_accuracy_against_pytorch_without_a_torch_column(hf_folder, test_variants):
    r = compare([str(hf_folder)], backends=["ort"], variants=["shift2"], batch=1, seqs=[8], threads=1,
                timing=QUICK, measure_bandwidth=False)
    assert [c["id"] for c in r["cells"]] == ["ort/shift2"]
    assert r["reference"]["what"] == "eager fp32 PyTorch"
    assert r["cells"][0]["results"][0]["accuracy"]["max_abs_err"] == pytest.approx(2 * OFFSET, abs=1e-4)


def test_a_failing_variant_shows_its_error_while_the_others_report(report):
    broken = _cell(report, "ort/broken")
    assert broken["status"] == "error" and "RuntimeError: deliberate build failure" in broken["error"]
    at8 = _cell(report, "ort/broken-at-8")
    assert at8["status"] == "ok"
    assert "deliberate failure at seq 8" in at8["results"][0]["error"] and "p50_ms" not in at8["results"][0]
    assert "p50_ms" in at8["results"][1] and at8["results"][1]["accuracy"]["max_abs_err"] < 1e-4
    assert all("p50_ms" in r for r in _cell(report, "ort/fp32")["results"])


def test_a_long_error_is_cut_in_the_table_and_whole_in_the_json(report):
    """A runtime's own message (onnxruntime-genai's, hundreds of characters) made the failed
    cell's column, and the whole table, that wide; the table cuts it, the JSON keeps it."""
    import copy
    import io

    from rich.console import Console

    from graphopt.compare.table import render

    long = copy.deepcopy(report)
    cell = _cell(long, "ort/broken")
    cell["error"] = "InvalidArgument: " + "x" * 400 + " END"
    out = io.StringIO()
    render(long, Console(file=out, width=400, color_system=None))
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "ort/broken " in line)
    assert "failed: InvalidArgument: xxx" in row and " END" not in row and "…" in row
    assert len(row) < 400  # before: the 421-character message alone
    assert _cell(report, "ort/broken")["error"].startswith("RuntimeError")  # the report itself untouched


def test_interleaving_cancels_drift(monkeypatch):
    """Two identical cells on a machine that slows down steadily: interleaved rounds give them
    the same median (timed one after the other, the second would look ~50% slower)."""
    import graphopt.compare.timing as T

    clock = {"now": 0.0, "calls": 0}

    def work():
        clock["calls"] += 1
        clock["now"] += 1e-3 * (1 + clock["calls"] / 200)  # 1 ms, drifting up by 0.5 % per call

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock["now"]

    monkeypatch.setattr(T, "time", FakeTime)
    samples, errors = time_interleaved({"a": work, "b": work}, TimingSettings(warmup=1, min_runs=100, min_time=0,
                                                                              block_time=0.005))
    assert not errors and len(samples["a"]) >= 100 and len(samples["b"]) >= 100
    assert np.median(samples["b"]) / np.median(samples["a"]) == pytest.approx(1.0, abs=0.03)


def test_timing_drops_a_cell_that_fails_midway():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("out of memory")

    samples, errors = time_interleaved({"ok": lambda: None, "flaky": flaky}, QUICK)
    assert errors == {"flaky": "RuntimeError: out of memory"} and len(samples["ok"]) >= QUICK.min_runs


# --------------------------------------------------------------------------------------
# graphopt's own variants (quantized, pruned) and --generate

GRAPHOPT_VARIANTS = ["int8", "int4", "int8-dynamic", "prune-heads", "prune-mlp"]
NEW_TOKENS = 6


def _fails_in_optimize(ctx, backend):
    raise RuntimeError("deliberate build failure")


@pytest.fixture(scope="module")
def gen_report(hf_folder, tmp_path_factory):
    keep = tmp_path_factory.mktemp("gen-keep")
    V.register_variant("gen-broken", backends=("ort",), summary="test: optimize fails", default=False,
                       optimize_kwargs={"passes": "no-such-pass"})(_fails_in_optimize)
    try:
        r = compare([str(hf_folder)], backends=["torch", "ort"],
                    variants=["fp32", *GRAPHOPT_VARIANTS, "ort-plain", "gen-broken"], batch=2, seqs=[8],
                    threads=1, timing=QUICK, measure_bandwidth=False, measure_memory=False, generate=NEW_TOKENS,
                    generate_rounds=2, workdir=str(keep))
    finally:
        V.unregister_variant("gen-broken")
    return r, keep


def _hf_logits(hf_folder, feeds):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()


def test_graphopt_variants_are_measured_against_pytorch(gen_report, hf_folder):
    """Every quantized and pruned column: its artifact (kept), run here on compare's feeds, and
    the transformers model run here directly; the report's error is exactly their distance."""
    import graphopt
    from graphopt.compare.run import _make_feeds
    from graphopt.onnx_io import load_onnx

    report, keep = gen_report
    feeds = _make_feeds(load_onnx(keep / "export" / "model.onnx"), None, {"batch": 2, "seq": 8})
    want = _hf_logits(hf_folder, feeds)
    real = feeds["attention_mask"].astype(bool)
    for v in GRAPHOPT_VARIANTS:
        cell = _cell(report, f"ort/{v}")
        assert cell["status"] == "ok", (v, cell["error"])
        got = graphopt.load(keep / f"{v}-ort").run(feeds)["logits"]
        err = float(np.abs(got[real].astype(np.float64) - want[real]).max())
        assert cell["results"][0]["accuracy"]["max_abs_err"] == pytest.approx(err, rel=1e-3, abs=1e-5), v
        assert err > 1e-4, v  # each one really changes the model (it is not the fp32 artifact)
    fp32 = _cell(report, "ort/fp32")["size_bytes"]
    size = {v: _cell(report, f"ort/{v}")["size_bytes"] for v in GRAPHOPT_VARIANTS}
    assert size["int4"] < size["int8"] < fp32 and size["prune-mlp"] < fp32 and size["prune-heads"] < fp32


def test_generate_times_every_graphopt_cell_and_torch_with_the_same_loop(gen_report, hf_folder):
    import torch
    import transformers

    report, _ = gen_report
    g = report["generation"]
    assert (g["new_tokens"], g["prompt_tokens"], g["batch"], g["rounds"]) == (NEW_TOKENS, 8, 2, 2)
    assert g["reference"] == "torch/fp32" and "ort/ort-plain" in g["not_generated"]
    assert "generation" not in _cell(report, "ort/ort-plain")
    for cid in ["torch/fp32", "ort/fp32"] + [f"ort/{v}" for v in GRAPHOPT_VARIANTS]:
        c = _cell(report, cid)["generation"]
        assert "error" not in c, (cid, c)
        assert len(c["samples"]["ttft_ms"]) == 2 and c["ttft_ms"] == pytest.approx(np.median(c["samples"]["ttft_ms"]))
        assert c["decode_tokens_per_s"] > 0 and all(len(t) == NEW_TOKENS for t in c["tokens"])
    # torch's own loop is right: the same greedy tokens as transformers' generate
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
    ids = torch.tensor(_prompts(report, hf_folder))
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                            min_new_tokens=NEW_TOKENS, pad_token_id=0)[:, ids.shape[1]:].tolist()
    assert _cell(report, "torch/fp32")["generation"]["tokens"] == hf
    # the fp32 artifact with its KV cache decodes the same tokens as PyTorch
    assert _cell(report, "ort/fp32")["generation"]["same_tokens"] == NEW_TOKENS
    broken = _cell(report, "ort/gen-broken")
    assert broken["status"] == "error" and "deliberate" in broken["error"]
    assert "no-such-pass" in broken["generation"]["error"]


def test_tvm_is_a_backend_of_graphopt_variants_with_generation_and_memory(hf_folder):
    """TVM (untuned) cells: accuracy against PyTorch, peak memory from a fresh process, and
    generation-ready builds that decode PyTorch's greedy tokens."""
    pytest.importorskip("tvm")
    r = compare([str(hf_folder)], backends=["torch", "tvm"], variants=["fp32", "int8"], seqs=[8], threads=1,
                timing=QUICK, measure_bandwidth=False, generate=3, generate_rounds=1)
    assert [c["id"] for c in r["cells"]] == ["torch/fp32", "tvm/fp32", "tvm/int8"]
    fp32, int8 = _cell(r, "tvm/fp32"), _cell(r, "tvm/int8")
    assert fp32["results"][0]["accuracy"]["max_abs_err"] < 1e-4
    assert 1e-5 < int8["results"][0]["accuracy"]["max_abs_err"] < 0.1  # int8 weights: changed, a little
    for c in (fp32, int8):
        assert c["memory"]["model_and_run_bytes"] > 0 and c["memory"]["peak_bytes"] > c["memory"]["runtime_bytes"]
    assert fp32["generation"]["same_tokens"] == 3 and fp32["generation"]["decode_tokens_per_s"] > 0


def _prompts(report, hf_folder):
    """The prompts compare generated from: every row of the largest shape's token ids."""
    from graphopt.compare.run import _make_feeds
    from graphopt.models import load_graph

    feeds = _make_feeds(load_graph(str(hf_folder)), None, {"batch": 2, "seq": 8})
    return feeds["input_ids"].tolist()


# --------------------------------------------------------------------------------------
# The command line


def test_cli_writes_json_and_html_with_the_same_numbers(hf_folder, tmp_path):
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    res = CliRunner().invoke(cli, ["compare", str(hf_folder), "--variants", "fp32,ort-plain", "--seq", "8",
                                   "--threads", "1", "--runs", "3", "--min-time", "0", "--warmup", "1",
                                   "--json", str(out_json), "--html", str(out_html)])  # with progress
    assert res.exit_code == 0, res.output
    assert "ort/ort-plain" in res.output and "torch/fp32" in res.output
    data = json.loads(out_json.read_text())
    assert embedded_report(out_html.read_text()) == data
    assert [c["id"] for c in data["cells"]] == ["torch/fp32", "ort/fp32", "ort/ort-plain"]
    html = out_html.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


def test_html_embeds_any_text_safely(report):
    """An error message is user-controlled text: "</script>" in it must not end the data block."""
    import copy

    r = copy.deepcopy(report)
    _cell(r, "ort/broken")["error"] = "RuntimeError: </script><script>alert(1)</script> & <b>"
    html = render_html(r)
    assert html.count("</script>") == 2  # the page's own two script blocks
    assert embedded_report(html) == json.loads(json.dumps(r))


def test_cli_artifact_folders(hf_folder, tmp_path):
    keep = tmp_path / "keep"
    res = CliRunner().invoke(cli, ["compare", str(hf_folder), "--variants", "fp32", "--backends", "ort", "--seq", "8",
                                   "--runs", "1", "--min-time", "0", "--keep", str(keep), "-q"])
    assert res.exit_code == 0, res.output
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(keep / "fp32-ort", a)  # the artifact --keep kept, as `graphopt optimize` writes it
    shutil.copytree(a, b)
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--seq", "8", "--threads", "1", "--runs", "3",
                                   "--min-time", "0", "--json", str(tmp_path / "r.json"), "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert [c["id"] for c in data["cells"]] == ["torch/fp32", "ort/a", "ort/b"]  # the source is found from report.json
    for c in data["cells"][1:]:
        assert c["results"][0]["accuracy"]["max_abs_err"] < 1e-4
    # the build column: optimize + lower + compile, the export left out (it counted the artifact's export)
    written = json.loads((a / "report.json").read_text())
    assert written["frontend"]["in_total_seconds"] is False  # compare built it from its own shared export
    assert data["cells"][1]["build_seconds"] == pytest.approx(written["total_seconds"], abs=1e-6)
    import graphopt

    graphopt.optimize(hf_folder, tmp_path / "c", kv_cache=False)  # built by optimize: its total counts the export
    written = json.loads((tmp_path / "c" / "report.json").read_text())
    assert written["frontend"]["in_total_seconds"] is True and written["frontend"]["seconds"] > 0
    res = CliRunner().invoke(cli, ["compare", str(tmp_path / "c"), "--seq", "8", "--threads", "1", "--runs", "1",
                                   "--min-time", "0", "--json", str(tmp_path / "r2.json"), "-q"])
    assert res.exit_code == 0, res.output
    cell = json.loads((tmp_path / "r2.json").read_text())["cells"][1]
    assert cell["build_seconds"] == pytest.approx(written["total_seconds"] - written["frontend"]["seconds"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "nowhere: no such file or folder"),
    (["{m}", "--backends", "torch,gpu"], "unknown backend 'gpu'"),
    (["{m}", "--variants", "fp64"], "unknown variant 'fp64'"),
    (["{m}", "--seq", "8,x"], "'--seq': expected whole numbers separated by commas"),
    (["{m}", "--generate", "0"], "'--generate': 0 is not in the range x>=1"),
    (["{m}", "--generate", "40"], "--generate 40 after a prompt of --seq 32 needs 71 positions; the model has 64"),
    (["{onnx}", "--generate", "4"], "--generate times decoding, which needs a decoder"),
    (["{m}", "--html", "{tmp}"], "is a folder"),
    (["{m}", "--data", "{tmp}/missing.txt"], "missing.txt: no such text file"),
    (["{onnx}", "--data", "{m}/config.json"], "needs the model's tokenizer.json"),
    (["{m}", "--data", "{m}"], "is a folder; give one text file"),
    (["{m}", "--data", "{m}/model.safetensors"], "model.safetensors: not a UTF-8 text file"),
    (["{m}", "--seq", "65"], "--seq 65 is longer than the model's context (64)"),
    # a name or a length twice ("two cells would have the same name"; two identical columns); none
    (["{m}", "--variants", "fp32,fp32"], "--variants: fp32 given more than once"),
    (["{m}", "--seq", "8,8"], "--seq: 8 given more than once"),
    (["{m}", "--variants", ""], "--variants '': an empty list; leave the option out for its default"),
    (["{m}", "--keep", "{tmp}/keep", "--variants", "fp32,fp32"], "given more than once"),  # before --keep is made
])
def test_cli_user_errors(hf_folder, tmp_path, args, message):
    onnx = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"
    args = [a.format(m=hf_folder, tmp=tmp_path, onnx=onnx) for a in args]
    res = CliRunner().invoke(cli, ["compare", *args, "-q"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # nothing written


# --------------------------------------------------------------------------------------
# The HTML page in a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium); .ci/run installs it")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")


@contextlib.contextmanager
def _rendered_page(report, tmp_path, messages: list, requests: list):
    """The report's HTML page open in headless Chromium, drawn; console errors and warnings
    and page errors go to `messages`, every URL the page asks for to `requests`."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    page_path = tmp_path / "report.html"
    page_path.write_text(render_html(report), encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-rendered='1']", timeout=10_000)
            yield page
        finally:
            browser.close()


def test_html_renders_in_headless_chromium(report, tmp_path):
    ok_cells = [c for c in report["cells"] if c["status"] == "ok"]
    messages, requests = [], []
    with _rendered_page(report, tmp_path, messages, requests) as page:
        charts = page.query_selector_all("svg.latency-chart")
        assert len(charts) == 2
        for svg in charts + page.query_selector_all("svg.scatter-chart"):
            box = svg.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50
        bars = page.query_selector_all("svg.latency-chart rect.bar")
        assert len(bars) == sum(1 for c in ok_cells for r in c["results"] if "p50_ms" in r)
        for bar in bars:
            assert bar.bounding_box()["width"] > 0
        # The page shows the JSON's numbers: every p50 label, from the embedded report.
        labels = {(l.get_attribute("data-cell"), l.evaluate("e => e.closest('svg').dataset.shape")): l.text_content()
                  for l in page.query_selector_all("text.p50-label")}
        for c in ok_cells:
            for r in c["results"]:
                if "p50_ms" in r:
                    assert labels[(c["id"], f"{r['batch']}x{r['seq']}")].startswith(f"{r['p50_ms']:.2f}")
        at_largest = [c for c in ok_cells if "p50_ms" in c["results"][-1]]
        assert len(page.query_selector_all("svg.scatter-chart circle.point")) == len(at_largest)
        row = page.query_selector("#accuracy tr[data-cell='ort/broken']").text_content()
        assert "deliberate build failure" in row
        shift = page.query_selector("#accuracy tr[data-cell='ort/shift'] td.max-abs-err").text_content()
        assert shift == "2.5e-1"
    assert messages == []
    assert all(u.startswith("file://") for u in requests), requests


def test_generation_renders_in_headless_chromium(gen_report, tmp_path):
    """The generation chart and table show the JSON's numbers; a failed cell shows its error."""
    report, _ = gen_report
    messages = []
    with _rendered_page(report, tmp_path, messages, []) as page:
        assert page.is_visible("#generation-section")
        ok = [c for c in report["cells"] if "generation" in c and "error" not in c["generation"]]
        bars = {b.get_attribute("data-cell"): b for b in page.query_selector_all("svg.generation-chart rect.bar")}
        assert set(bars) == {c["id"] for c in ok}
        for c in ok:
            assert bars[c["id"]].bounding_box()["width"] > 0
            row = f"#generation tr[data-cell='{c['id']}']"
            assert page.text_content(row + " td.ttft") == f"{c['generation']['ttft_ms']:.2f} ms"
            assert page.text_content(row + " td.decode-tps") == f"{c['generation']['decode_tokens_per_s']:.1f}"
        assert "no-such-pass" in page.text_content("#generation tr[data-cell='ort/gen-broken']")
    assert messages == []


def test_a_generation_ready_artifact_is_refused_with_the_way_out(tmp_path):
    # compare times full-sequence artifacts; a KV-cache artifact says how to make one.
    from graphopt.testing import tiny_hf_model

    folder = tmp_path / "hf"
    tiny_hf_model("llama").model.save_pretrained(folder)
    art = tmp_path / "art"
    r = CliRunner().invoke(cli, ["optimize", str(folder), "-o", str(art), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["compare", str(art), "--reference", str(folder), "-q"])
    assert r.exit_code == 2 and "--no-kv-cache" in r.output and len(r.output.strip().splitlines()) == 1


def _genai_llama_folder(folder: Path, **config) -> Path:
    """A Llama folder the model builder takes: head size 16 (its CPU attention's multiple) and
    a tokenizer (it saves one beside its model); random weights."""
    import torch
    import transformers as tf

    root = Path(__file__).resolve().parents[1]
    cfg = tf.LlamaConfig(**{**dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, max_position_embeddings=64, vocab_size=256), **config})
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    shutil.copyfile(root / "examples" / "default" / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    return folder


def test_the_ort_genai_anchor_agrees_with_pytorch_on_padded_rows(tmp_path):
    # batch 2: the first row is left-padded (graphopt.sample_inputs), which the builder's
    # GroupQueryAttention misreads unless the cell moves the padding to the right
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e '.[genai]')")
    folder = _genai_llama_folder(tmp_path / "llama")
    r = compare([str(folder)], backends=["ort"], variants=["ort-genai"], batch=2, seqs=[12], threads=1, timing=QUICK,
                measure_bandwidth=False, measure_memory=False)
    cell = _cell(r, "ort/ort-genai")
    assert cell.get("error") is None, cell.get("error")
    acc = cell["results"][0]["accuracy"]
    assert acc["max_abs_err"] < 1e-4 * max(1.0, acc["ref_max_abs"]) and acc["top1_agreement"] == 1.0


@pytest.mark.parametrize("config, message", [
    (dict(intermediate_size=256), "mlp.gate_proj is as wide as the vocabulary (256)"),
    (dict(hidden_size=32), "head size 8 is not a multiple of 16")])
def test_the_ort_genai_anchor_refuses_configs_the_builder_gets_wrong(tmp_path, config, message):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e '.[genai]')")
    folder = _genai_llama_folder(tmp_path / "llama", **config)
    r = compare([str(folder)], backends=["ort"], variants=["ort-genai"], seqs=[8], threads=1, timing=QUICK,
                measure_bandwidth=False, measure_memory=False)
    assert message in _cell(r, "ort/ort-genai")["error"]


@pytest.mark.parametrize("threads", [1, None])
def test_read_bandwidth_on_one_thread_and_on_every_core(threads):
    from graphopt.compare.machine import read_bandwidth, usable_cores

    r = read_bandwidth(16 << 20, passes=1, threads=threads)
    want = threads or usable_cores()
    assert r["threads"] == want and f"on {want} thread(s)" in r["method"]
    assert set(r) == {"read_gb_s", "buffer_bytes", "threads", "method"}
    assert r["buffer_bytes"] == (16 << 20) // want // 8 * 8 * want  # each thread its own share
    assert r["read_gb_s"] > 0  # no timing claims: the machine is shared


def test_bound_rounds_divides_each_round_by_that_rounds_bandwidth(monkeypatch):
    """The ratio to the bound is taken per round, against the higher of the bandwidth samples just
    before and just after it: a step of constant length, samples 10, 20, 40 GB/s, is 2x then 4x
    its bound (one reading for both rounds would give the same ratio twice; the reading before
    each round alone, 1x and 2x)."""
    import time

    from graphopt.compare import machine

    readings = iter([10.0, 20.0, 40.0])

    class FakeProbe:
        def __init__(self, *a, **k):
            pass

        def sample(self, passes: int = 3) -> float:
            return next(readings)

        def method(self, passes: int = 3) -> str:
            return "fake"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def step(seconds=0.004):  # busy-wait: a sleep may overshoot by more than the test allows
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    monkeypatch.setattr(machine, "ReadProbe", FakeProbe)
    r = machine.bound_rounds({"step": step, "untimed": lambda: None}, {"step": 40_000_000}, rounds=2, steps=3,
                             settle_s=0.0, warmup=0)  # 40 MB at 10 GB/s: 4 ms
    ratio = r["ratio_to_bound"]["step"]
    assert ratio["min"] == pytest.approx(2.0, rel=0.15) and ratio["max"] == pytest.approx(4.0, rel=0.15)
    assert ratio["median"] == pytest.approx(3.0, rel=0.15)
    assert r["read_gb_s_samples"] == [10.0, 20.0, 40.0] and r["read_gb_s"]["median"] == 20.0
    assert r["bound_ms_at_median_bandwidth"] == {"step": pytest.approx(40e6 / 20e9 * 1e3, abs=1e-3)}
    assert set(r["ratio_to_bound"]) == {"step"} and r["timing"]["untimed"]["runs"] == 6  # timed, no bound
    assert "2 rounds" in r["method"] and "fake" in r["method"]


def test_read_probe_samples_again_without_new_buffers():
    from graphopt.compare.machine import ReadProbe

    with ReadProbe(8 << 20, threads=2) as probe:
        buffers = list(probe.buffers)
        first, second = probe.sample(passes=1), probe.sample(passes=1)
        assert first > 0 and second > 0 and all(a is b for a, b in zip(buffers, probe.buffers))
    assert probe.buffers == []


def test_artifacts_of_different_models_are_refused(tmp_path):
    """Accuracy is measured against one model: an artifact optimized from another one is refused
    by name (it was compared with the first one's reference silently: top-1 0 %, no warning)."""
    import shutil

    import graphopt
    from graphopt.compare.run import compare
    from graphopt.errors import UserError

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"
    for name in ("a", "b"):
        shutil.copy(example, tmp_path / f"{name}.onnx")
        graphopt.optimize(tmp_path / f"{name}.onnx", tmp_path / f"out_{name}")
    with pytest.raises(UserError, match="out_b was optimized from .*b.onnx, not .*a.onnx: compare artifacts of one model"):
        compare([str(tmp_path / "out_a"), str(tmp_path / "out_b")])


def test_a_training_run_folder_is_its_latest_checkpoint_as_model_or_reference(tmp_path):
    """optimize names a run's checkpoint in report.json: compare ART --reference RUN is that
    model (before: refused, "optimized from RUN/checkpoints/step_7, not RUN"), --data reads
    the checkpoint's tokenizer, and once the run trained on, the artifact is no longer its model."""
    import graphopt

    default = Path(__file__).resolve().parents[1] / "examples" / "default"
    run = tmp_path / "run"
    shutil.copytree(default, run / "checkpoints" / "step_0000007")
    (run / "checkpoints" / "latest").write_text("step_0000007\n")
    graphopt.optimize(run, tmp_path / "art", kv_cache=False)
    r = compare([str(tmp_path / "art")], reference=str(run), seqs=[8], threads=1, timing=QUICK,
                measure_bandwidth=False, measure_memory=False, data=str(default / "val.txt"), data_tokens=64)
    art = next(c for c in r["cells"] if c["id"] != "torch/fp32")
    assert all(res["accuracy"]["max_abs_err"] < 1e-4 for res in art["results"]), art
    assert art["perplexity"]["perplexity"] == pytest.approx(r["perplexity"]["reference"], rel=1e-4)
    assert r["model"]["source"].endswith("step_0000007")
    shutil.copytree(default, run / "checkpoints" / "step_0000009")
    (run / "checkpoints" / "latest").write_text("step_0000009\n")
    with pytest.raises(Exception, match=r"optimized from .*step_0000007, not .*step_0000009"):
        compare([str(tmp_path / "art")], reference=str(run), seqs=[8], threads=1, timing=QUICK)


def test_the_table_caption_says_peak_memory_was_not_measured_under_no_memory(report):
    """--no-memory: the caption explained a peak-memory column that held only "-"."""
    import copy
    import io

    from rich.console import Console

    from graphopt.compare.table import render

    def caption(r):
        out = io.StringIO()
        render(r, Console(file=out, width=400, color_system=None))
        return out.getvalue()

    bare = copy.deepcopy(report)
    for c in bare["cells"]:
        c["memory"] = None
    assert "peak memory: not measured (--no-memory)" in caption(bare)
    if any(c.get("memory") for c in report["cells"]):
        assert "a fresh process per cell" in caption(report)
