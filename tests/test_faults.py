"""Faults and bad input: every user mistake the CLI can reach is one line on stderr and exit
code 2 with nothing written; a bug of ours is exit code 1 with a --debug hint; `-o` never
replaces what the user owns; a SIGKILL during `graphopt optimize` leaves the old artifact or
the new one, never a mix.

The table `CASES` holds one row per bad input: the command line (with {B} = the folder of
bad inputs, {W} = an empty workspace, {EX} = the example model, {DEF} = the shipped
checkpoint) and a fragment the one
error line must contain.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import cli
from graphopt.pass_manager import Pass, register_pass

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.onnx"
DEFAULT = ROOT / "examples" / "default"


def _external_model(location: str, offset: str = "0") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", "64")):
        e = w.external_data.add()
        e.key, e.value = k, v
    return helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w]),
        opset_imports=[helper.make_opsetid("", 20)])


def _gather_model() -> onnx.ModelProto:
    emb = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "emb")
    return helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])], [emb]),
        opset_imports=[helper.make_opsetid("", 20)])


def _safetensors_with_header(path: Path, header: bytes) -> None:
    header += b" " * ((-len(header)) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs, one of each kind a user can hand graphopt."""
    b = tmp_path_factory.mktemp("bad")
    data = EXAMPLE.read_bytes()
    (b / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (b / "garbage.onnx").write_bytes(b"\x00\xffnot a model at all" * 10)
    (b / "empty.onnx").write_bytes(b"")
    (b / "escape.onnx").write_bytes(_external_model("../../etc/passwd").SerializeToString())
    (b / "absolute.onnx").write_bytes(_external_model("/etc/passwd").SerializeToString())
    (b / "w.bin").write_bytes(bytes(64))
    (b / "badoffset.onnx").write_bytes(_external_model("w.bin", offset="sixty").SerializeToString())
    (b / "gather.onnx").write_bytes(_gather_model().SerializeToString())
    shutil.copy(EXAMPLE, b / "tiny.onnx")
    assert CliRunner().invoke(cli, ["convert", str(EXAMPLE), "-o", str(b / "ok.gir")]).exit_code == 0
    text = (b / "ok.gir").read_text()
    (b / "renamed.gir").write_text(text)  # names ok.weights.safetensors
    (b / "folder.onnx").mkdir()
    (b / "arrayhead.gir").write_text(text.replace("ok.weights.safetensors", "arrayhead.weights.safetensors"))
    _safetensors_with_header(b / "arrayhead.weights.safetensors", b"[1, 2, 3]")
    (b / "cut.gir").write_text(text.replace("ok.weights.safetensors", "cut.weights.safetensors"))
    (b / "cut.weights.safetensors").write_bytes((b / "ok.weights.safetensors").read_bytes()[:100])
    (b / "garbage.gir").write_text("graph @g(%x: f32[2]) -> (f32[2]) {\n  %y = Relu(\n")
    (b / "binary.gir").write_bytes(b"\xff\xfe\x00\x01" * 8)
    (b / "model.pt2").write_bytes(b"PK\x03\x04")
    (b / "notes.txt").write_text("hello\n")
    # Hugging Face folders with a broken config, and a state dict with a JSON-array header.
    for name, content in (("hf_badjson", "{not json"), ("hf_array", "[1, 2]")):
        (b / name).mkdir()
        (b / name / "config.json").write_text(content)
    from graphopt.testing import tiny_hf_model

    tiny_hf_model("gpt2").model.save_pretrained(b / "hf_cut")
    shutil.copytree(b / "hf_cut", b / "hf_types")
    weights = b / "hf_cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    config = json.loads((b / "hf_types" / "config.json").read_text())
    (b / "hf_types" / "config.json").write_text(json.dumps({**config, "n_layer": "two"}))
    (b / "hf_sd").mkdir()
    (b / "hf_sd" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _safetensors_with_header(b / "hf_sd" / "model.safetensors", b"[1, 2]")
    # Training checkpoints: truncated weights, a config whose model is not an object, a run
    # folder whose `latest` points outside.
    shutil.copytree(DEFAULT, b / "ckpt_cut", ignore=shutil.ignore_patterns("model.safetensors", "val.txt"))
    (b / "ckpt_cut" / "model.safetensors").write_bytes((DEFAULT / "model.safetensors").read_bytes()[:4096])
    shutil.copytree(DEFAULT, b / "ckpt_badtok", ignore=shutil.ignore_patterns("val.txt"))
    # a checkpoint that names no training corpus (as `graphopt prune` writes one): no default calibration
    shutil.copytree(DEFAULT, b / "pruned_ckpt", ignore=shutil.ignore_patterns("val.txt"))
    config = json.loads((DEFAULT / "config.json").read_text())
    (b / "pruned_ckpt" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "train"}))
    (b / "ckpt_badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (b / "hf_llama").mkdir()  # a Hugging Face folder's config (prune and finetune take graphopt.train checkpoints)
    (b / "hf_llama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (b / "ckpt_badmodel").mkdir()
    (b / "ckpt_badmodel" / "config.json").write_text(json.dumps({"format": "graphopt.train.checkpoint/1", "model": [1]}))
    (b / "run_escape" / "checkpoints").mkdir(parents=True)
    (b / "run_escape" / "checkpoints" / "latest").write_text("../../../etc\n")
    # Folders that are not artifacts or are hostile ones.
    (b / "foreign").mkdir()
    (b / "foreign" / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    r = CliRunner().invoke(cli, ["optimize", str(EXAMPLE), "-o", str(b / "art"), "-q"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((b / "art" / "manifest.json").read_text())
    negative = {**manifest["signature"], "inputs": [{**manifest["signature"]["inputs"][0], "shape": ["batch", -3]}]}
    for name, change in (("art_abs", {"model": "/etc/passwd"}), ("art_up", {"files": ["../tiny.onnx"]}),
                         ("art_nosig", {"signature": "none"}), ("art_negdim", {"signature": negative})):
        shutil.copytree(b / "art", b / name)
        (b / name / "manifest.json").write_text(json.dumps({**manifest, **change}))
    shutil.copytree(b / "art", b / "art_badreport")
    (b / "art_badreport" / "report.json").write_text("[1, 2]")
    shutil.copytree(b / "art", b / "art_cut")
    (b / "art_cut" / "model.onnx").write_bytes((b / "art" / "model.onnx").read_bytes()[:300])
    # Sample inputs files.
    np.save(b / "x.npy", np.ones((2, 16), np.float32))
    np.savez(b / "in.npz", x=np.ones((2, 16), np.float32))
    (b / "cut.npz").write_bytes((b / "in.npz").read_bytes()[:40])
    np.savez(b / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    (b / "passes_string.toml").write_text('passes = "dce,cse"\n')
    np.savez(b / "wrongname.npz", y=np.ones((2, 16), np.float32))
    np.savez(b / "wrongdtype.npz", x=np.ones((2, 16), np.float64))
    np.savez(b / "empty.npz", x=np.ones((0, 16), np.float32))
    np.savez(b / "nan.npz", x=np.full((2, 16), np.nan, np.float32))
    np.savez(b / "ids_high.npz", input_ids=np.array([[1, 2, 10]], np.int64))
    np.savez(b / "ids_negative.npz", input_ids=np.array([[1, -3]], np.int64))
    (b / "bad.toml").write_text("[[passes]\nname = ")
    (b / "bad.jsonl").write_text('{"text": "def f(): pass"}\nnot json\n')
    (b / "latin1.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    (b / "user_folder").mkdir()
    (b / "user_folder" / "thesis.tex").write_text("years of work\n")
    (b / "a_file").write_text("not a folder\n")
    return b


CASES = {
    # inspect: every format, truncated, corrupt, hostile
    "onnx-truncated": ("inspect {B}/truncated.onnx", "truncated"),
    "onnx-garbage": ("inspect {B}/garbage.onnx", "not a valid ONNX model"),
    "onnx-empty": ("inspect {B}/empty.onnx", "empty.onnx"),
    "onnx-external-escapes": ("inspect {B}/escape.onnx", "points outside the model's folder"),
    "onnx-external-absolute": ("inspect {B}/absolute.onnx", "must be relative"),
    "onnx-external-offset": ("inspect {B}/badoffset.onnx", "is not an integer"),
    "gir-weights-array-header": ("inspect {B}/arrayhead.gir", "the header is a JSON list"),
    "gir-weights-truncated": ("inspect {B}/cut.gir", "cut.weights.safetensors"),
    "gir-syntax": ("inspect {B}/garbage.gir", "garbage.gir:"),
    "gir-binary": ("inspect {B}/binary.gir", "not a text file"),
    "pt2-refused": ("inspect {B}/model.pt2", "exported programs (.pt2) are not loaded"),
    "unknown-format": ("inspect {B}/notes.txt", "unknown model format"),
    "missing-file": ("inspect {B}/nope.onnx", "no such file"),
    "hf-config-not-json": ("inspect {B}/hf_badjson", "not a readable JSON config"),
    "hf-config-array": ("inspect {B}/hf_array", "not a JSON object"),
    "hf-weights-truncated": ("inspect {B}/hf_cut", "cannot load GPT2LMHeadModel weights"),
    "hf-config-wrong-type": ("inspect {B}/hf_types", "Field 'n_layer' expected int, got str"),
    "state-dict-array-header": ("inspect {B}/hf_sd/model.safetensors", "not a readable safetensors file"),
    "checkpoint-truncated-weights": ("inspect {B}/ckpt_cut", "not a readable safetensors file"),
    "checkpoint-model-not-object": ("inspect {B}/ckpt_badmodel", "no 'model' section"),
    "run-latest-escapes": ("inspect {B}/run_escape", "not a checkpoint folder inside"),
    "foreign-manifest": ("inspect {B}/foreign", "not a model folder"),
    "artifact-absolute-path": ("inspect {B}/art_abs", "artifact paths must be relative"),
    "artifact-path-up": ("inspect {B}/art_up", "artifact paths must be relative"),
    "artifact-no-signature": ("inspect {B}/art_nosig", "no valid signature"),
    "artifact-negative-dim": ("inspect {B}/art_negdim", "sizes: whole numbers >= 0 or symbol names"),
    "artifact-truncated-model": ("inspect {B}/art_cut", "art_cut/model.onnx: not a valid ONNX model"),
    # artifacts given to eval, generate and compare
    "eval-data-not-utf8": ("eval {DEF} --data {B}/latin1.txt", "--data {B}/latin1.txt: not UTF-8 text"),
    "eval-artifact-bad-report": ("eval {B}/art_badreport", "art_badreport/report.json: not a readable report"),
    "eval-artifact-truncated": ("eval {B}/art_cut", "art_cut/model.onnx: not a valid ONNX model"),
    "eval-artifact-no-tokenizer": ("eval {B}/art", "no tokenizer.json in the artifact"),
    "eval-artifact-hostile-path": ("eval {B}/art_up", "artifact paths must be relative"),
    "generate-artifact-not-a-decoder": ("generate {B}/art --prompt x", "not a generation-ready artifact"),
    "generate-artifact-truncated": ("generate {B}/art_cut --prompt x", "not a valid ONNX model"),
    "generate-artifact-hostile-path": ("generate {B}/art_abs --prompt x", "artifact paths must be relative"),
    "compare-artifact-negative-dim": ("compare {B}/art_negdim -q", "sizes: whole numbers >= 0"),
    "compare-artifact-bad-report": ("compare {B}/art_badreport -q", "its report.json names no model"),
    "compare-artifact-hostile-path": ("compare {B}/art_up -q", "artifact paths must be relative"),
    # convert
    "convert-truncated": ("convert {B}/truncated.onnx -o {W}/out.gir", "truncated"),
    "convert-unknown-output": ("convert {EX} -o {W}/out.txt", "unknown output format"),
    "convert-missing-o": ("convert {EX}", "Missing option '-o'"),
    "convert-o-exists": ("convert {EX} -o {B}/ok.gir", "ok.gir: exists; give a new name, or --overwrite"),
    "convert-o-is-the-input": ("convert {B}/ok.gir -o {B}/ok.gir --overwrite", "is the input"),
    "convert-o-replaces-input-weights": ("convert {B}/renamed.gir -o {B}/ok.gir --overwrite",
                                         "ok.weights.safetensors beside it, which is part of the input"),
    "convert-o-folder": ("convert {EX} -o {B}/folder.onnx", "is a folder"),
    "convert-o-cwd": ("convert {EX} -o .", "unknown output format"),
    # optimize: inputs files
    "inputs-npy": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/x.npy", "single array (.npy)"),
    "inputs-without-check": ("optimize {EX} -o {W}/out -q --inputs {B}/in.npz", "add --check-numerics"),
    "inputs-truncated": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/cut.npz", "not a readable .npz"),
    "inputs-pickled": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/pickled.npz", "not a readable .npz"),
    # numpy's "This file contains pickled (object) data ... allow_pickle" for a text file
    "inputs-text": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/notes.txt",
                    "notes.txt: not an .npz file (np.savez writes one"),
    "inputs-wrong-name": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/wrongname.npz", "unknown input 'y'"),
    "inputs-wrong-dtype": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/wrongdtype.npz", "dtype float64"),
    "inputs-empty": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/empty.npz", "input 'x' is empty"),
    "inputs-nan": ("optimize {EX} -o {W}/out -q --check-numerics --inputs {B}/nan.npz", "holds NaN or infinity"),
    "pass-option-type": ("optimize {EX} -o {W}/out -q --passes fold-constants{{max-size=big}}",
                         "option 'max-size' needs an integer, got 'big'"),
    "pass-option-range": ("optimize {EX} -o {W}/out -q --passes prune-mlp{{ratio=nan}}", "ratio must be in [0, 1)"),
    "pass-option-negative": ("optimize {EX} -o {W}/out -q --passes fold-constants{{max-size=-5}}",
                             "fold-constants: max-size must be 0 or more, not -5"),
    "pass-option-zero-rounds": ("optimize {EX} -o {W}/out -q --passes simplify-shapes{{max-rounds=0}}",
                                "simplify-shapes: max-rounds must be 1 or more, not 0"),
    "ids-out-of-vocab": ("optimize {B}/gather.onnx -o {W}/out -q --check-numerics --inputs {B}/ids_high.npz",
                         "holds id 10, outside [0, 10)"),
    "ids-negative": ("optimize {B}/gather.onnx -o {W}/out -q --check-numerics --inputs {B}/ids_negative.npz",
                     "holds id -3"),
    # optimize: -o that would destroy something
    "o-user-folder": ("optimize {EX} -o {B}/user_folder -q", "is not a graphopt artifact"),
    "o-user-folder-in-artifact": ("optimize {EX} -o {W}/art_plus -q", "also holds notes.md"),
    "o-is-a-file": ("optimize {EX} -o {B}/a_file -q", "exists and is not a folder"),
    "o-models-folder": ("optimize {B}/tiny.onnx -o {B} -q", "holds the input"),
    "o-models-folder-overwrite": ("optimize {B}/tiny.onnx -o {B} -q --overwrite", "holds the input"),
    "o-parent-of-model": ("optimize {B}/ckpt_cut -o {B}/.. -q --overwrite", "holds the input"),
    "o-cwd": ("optimize {EX} -o . -q --overwrite", "is the current folder"),
    # optimize: options
    "recipe-not-toml": ("optimize {EX} -o {W}/out -q --recipe {B}/bad.toml", "not a valid TOML recipe"),
    "recipe-a-folder": ("optimize {EX} -o {W}/out -q --recipe {B}", "is a folder; give the recipe's .toml file"),
    "recipe-passes-string": ("optimize {EX} -o {W}/out -q --recipe {B}/passes_string.toml",
                             "'passes' is a list of [[passes]] tables; a pipeline string such as 'dce,cse' goes "
                             "under 'pipeline'"),
    "pipeline-unclosed": ("optimize {EX} -o {W}/out -q --passes fold-constants{{max-size=1",
                          "at the end: '{{' at character 15 is not closed"),
    "unknown-pass": ("optimize {EX} -o {W}/out -q --passes dce,nonsense", "unknown pass 'nonsense'"),
    "bad-target": ("optimize {EX} -o {W}/out -q --target tpu", "Invalid value for '--target'"),
    "unknown-option": ("optimize {EX} -o {W}/out --bogus", "No such option"),
    "missing-model": ("optimize -o {W}/out", "Missing argument 'MODEL'"),
    "unknown-command": ("optimise {EX}", "No such command 'optimise'"),
    # prune / finetune: the validation text and the calibration text (issue 15)
    "eval-a-hugging-face-folder": ("eval {B}/hf_llama", "a Hugging Face folder; eval scores graphopt.train "
                                   "checkpoints and artifacts: graphopt optimize {B}/hf_llama -o OUT --logits all"),
    "prune-a-hugging-face-folder": ("prune {B}/hf_llama --mlp-ratio 0.25 --out {W}/pruned",
                                    "a Hugging Face folder: graphopt optimize MODEL --prune"),
    "finetune-distill-from-hugging-face": ("finetune {DEF} --distill-from {B}/hf_llama --out {W}/run",
                                           "--distill-from {B}/hf_llama: {B}/hf_llama/config.json: not a graphopt"
                                           ".train checkpoint config (no 'model' section); a Hugging Face folder "
                                           "(the teacher must be"),
    "prune-val-missing": ("prune {DEF} --mlp-ratio 0.25 --out {W}/pruned --val {W}/nope.txt",
                          "--val {W}/nope.txt: no such file"),
    "finetune-val-missing": ("finetune {DEF} --lora-rank 2 --out {W}/run --val {W}/nope.txt",
                             "--val {W}/nope.txt: no such file"),
    "prune-calibration-missing": ("prune {DEF} --mlp-ratio 0.25 --importance wanda --calibration {W}/nope.txt "
                                  "--out {W}/pruned", "--calibration {W}/nope.txt: no such file"),
    "prune-calibration-not-wanda": ("prune {DEF} --mlp-ratio 0.25 --calibration {B}/latin1.txt --out {W}/pruned",
                                    "only --importance wanda reads calibration text"),
    "prune-calibration-not-utf8": ("prune {DEF} --mlp-ratio 0.25 --importance wanda --calibration {B}/latin1.txt "
                                   "--out {W}/pruned", "not a UTF-8 text file"),
    "prune-calibration-jsonl": ("prune {DEF} --mlp-ratio 0.25 --importance wanda --calibration {B}/bad.jsonl "
                                "--out {W}/pruned", "graphopt prune reads one plain text file (not .jsonl)"),
    "prune-wanda-no-default-calibration": ("prune {B}/pruned_ckpt --mlp-ratio 0.25 --importance wanda --out {W}/pruned",
                                           "was not trained on the default corpus"),
    # generate: sampling options are checked where they are parsed
    "generate-top-p-above-1": ("generate {DEF} --prompt x --top-p 1.5", "'--top-p': 1.5 is not in the range 0<x<=1"),
    "generate-top-p-zero": ("generate {DEF} --prompt x --top-p 0", "'--top-p': 0.0 is not in the range"),
    "generate-temperature-negative": ("generate {DEF} --prompt x --temperature -1", "'--temperature': -1.0 is not"),
    "generate-temperature-nan": ("generate {DEF} --prompt x --temperature nan", "nan is not a finite number"),
    "generate-top-k-negative": ("generate {DEF} --prompt x --top-k -2", "'--top-k': -2 is not in the range"),
    "generate-max-new-tokens-zero": ("generate {DEF} --prompt x --max-new-tokens 0", "'--max-new-tokens': 0 is not"),
    "generate-seed-negative": ("generate {DEF} --prompt x --seed -1", "'--seed': -1 is not in the range"),
    "generate-seed-not-int": ("generate {DEF} --prompt x --seed one", "'one' is not a valid integer"),
    "generate-threads-too-many": ("generate {DEF} --prompt x --threads 100000", "100000 is not in the range 1<=x<=256"),
    "compare-threads-too-many": ("compare {EX} --threads 300", "300 is not in the range 1<=x<=256"),
    "generate-threads-zero": ("generate {DEF} --prompt x --threads 0", "'--threads': 0 is not in the range"),
    # compare: options checked where they are parsed, and no report written over what it reads
    "compare-batch-zero": ("compare {EX} --batch 0", "'--batch': 0 is not in the range x>=1"),
    "compare-seq-zero": ("compare {EX} --seq 32,0", "'32,0': every number must be positive"),
    "compare-seq-not-int": ("compare {EX} --seq 8,x", "expected whole numbers separated by commas"),
    "compare-threads-zero": ("compare {EX} --threads 0", "'--threads': 0 is not in the range 1<=x<=256"),
    "compare-runs-zero": ("compare {EX} --runs 0", "'--runs': 0 is not in the range x>=1"),
    "compare-min-time-nan": ("compare {EX} --min-time nan", "nan is not a finite number"),
    "compare-warmup-negative": ("compare {EX} --warmup -1", "'--warmup': -1 is not in the range x>=0"),
    "compare-data-tokens-one": ("compare {EX} --data-tokens 1", "'--data-tokens': 1 is not in the range x>=2"),
    "compare-unknown-variant": ("compare {EX} --variants fp32,fp64", "unknown variant 'fp64'"),
    "compare-unknown-backend": ("compare {EX} --backends ort,npu", "unknown backend 'npu'"),
    "compare-data-missing": ("compare {EX} --data {W}/nope.txt", "no such text file"),
    "compare-json-is-the-model": ("compare {B}/tiny.onnx --json {B}/tiny.onnx", "--json {B}/tiny.onnx: is the input"),
    "compare-html-in-the-model": ("compare {B}/ckpt_cut --html {B}/ckpt_cut/config.json",
                                  "is part of the input {B}/ckpt_cut"),
    "compare-new-json-in-the-model": ("compare {B}/ckpt_cut --json {B}/ckpt_cut/new_report.json",
                                      "is part of the input {B}/ckpt_cut"),  # a new file too (it was written)
    "compare-json-is-the-data": ("compare {EX} --data {B}/notes.txt --json {B}/notes.txt", "is the input"),
    "compare-no-model": ("compare", "give a MODEL"),
    "compare-no-cell": ("compare {EX} --variants ort-plain --backends torch", "no cell to measure (ort-plain: exists on"),
    "compare-json-is-the-html": ("compare {EX} --json {W}/r.json --html {W}/r.json", "--json and --html both name"),
    "compare-keep-user-folder": ("compare {EX} --keep {B}/user_folder", "holds files an earlier compare did not keep"),
    "compare-keep-models-folder": ("compare {B}/tiny.onnx --keep {B}", "--keep {B}: holds the input"),
    "compare-keep-missing-fails-later": ("compare {EX} --keep {W}/kept --data {W}/nope.txt", "no such text file"),
    # optimize: quantization and accuracy options
    "quantize-unknown": ("optimize {EX} -o {W}/out -q --quantize int3", "--quantize 'int3': expected int8, int4"),
    "quantize-block": ("optimize {EX} -o {W}/out -q --quantize int4:7", "the block size must be"),
    "quantize-block-empty": ("optimize {EX} -o {W}/out -q --quantize int4:", "the block size must be"),
    "quantize-block-not-ascii": ("optimize {EX} -o {W}/out -q --quantize int4:\u0666\u0664", "the block size must be"),
    "quantize-twice": ("optimize {EX} -o {W}/out -q --quantize int4 --quantize int8",
                       "'--quantize': given 2 times (int4, int8): give it once"),
    "accuracy-budget-twice": ("optimize {DEF} -o {W}/out -q --quantize int4 --accuracy-budget perplexity=+1% "
                              "--accuracy-budget top1=0.9", "'--accuracy-budget': given 2 times"),
    "passes-malformed": ("optimize {EX} -o {W}/out -q --passes ,", "--passes: malformed pipeline"),
    "kv-layout-not-a-decoder": ("optimize {EX} -o {W}/out -q --kv-layout static",
                                "--kv-layout applies to decoders"),
    "max-positions-negative": ("optimize {EX} -o {W}/out -q --passes rewrite-kv-cache{{max-positions=-1}}",
                               "max-positions -1: give at least 5 positions"),
    "quant-method-alone": ("optimize {EX} -o {W}/out -q --quant-method gptq", "goes with --quantize"),
    "quant-method-unknown": ("optimize {EX} -o {W}/out -q --quantize int4 --quant-method awq2",
                             "'awq2' is not one of"),
    "calibration-without-gptq": ("optimize {EX} -o {W}/out -q --quantize int4 --calibration {B}/in.npz",
                                 "pruning with importance=wanda only"),
    "inspect-artifact-ir": ("inspect {B}/art --ir", "an artifact folder, lowered for its backend"),
    "calibration-missing": ("optimize {EX} -o {W}/out -q --quantize int4 --quant-method gptq --calibration {W}/no.txt",
                            "--calibration {W}/no.txt: no such file"),
    "calibration-truncated": ("optimize {EX} -o {W}/out -q --quantize int4 --quant-method gptq "
                              "--calibration {B}/cut.npz", "--calibration {B}/cut.npz: not a readable .npz"),
    "calibration-wrong-input": ("optimize {EX} -o {W}/out -q --quantize int4 --quant-method gptq "
                                "--calibration {B}/wrongname.npz", "no array for input 'x'"),
    "calibration-text-for-a-non-lm": ("optimize {EX} -o {W}/out -q --quantize int4 --quant-method gptq "
                                      "--calibration {B}/notes.txt", "text feeds a model whose inputs are token ids"),
    "calibration-jsonl-not-json": ("optimize {DEF} -o {W}/out -q --quantize int4 --quant-method gptq "
                                   "--calibration {B}/bad.jsonl", "--calibration {B}/bad.jsonl: line 2 is not JSON"),
    "calibration-not-utf8": ("optimize {DEF} -o {W}/out -q --quantize int4 --quant-method gptq "
                             "--calibration {B}/latin1.txt", "not a UTF-8 text file"),
    "calibration-is-the-output": ("optimize {EX} -o {B}/user_folder -q --overwrite --quantize int4 --quant-method gptq "
                                  "--calibration {B}/user_folder/thesis.tex", "holds the input"),
    "budget-unknown-metric": ("optimize {EX} -o {W}/out -q --quantize int8 --accuracy-budget speed=2",
                              "expected perplexity=+2%, top1=0.99 or cosine=0.995"),
    "budget-perplexity-not-percent": ("optimize {EX} -o {W}/out -q --quantize int8 --accuracy-budget perplexity=2",
                                      "perplexity takes +N%"),
    "budget-top1-nan": ("optimize {EX} -o {W}/out -q --quantize int8 --accuracy-budget top1=nan",
                        "top1 takes a fraction in [0, 1]"),
    "budget-without-quantize": ("optimize {EX} -o {W}/out -q --accuracy-budget top1=0.9", "give --quantize"),
    "accuracy-data-without-budget": ("optimize {EX} -o {W}/out -q --accuracy-data {B}/notes.txt",
                                     "goes with --accuracy-budget"),
    "accuracy-data-missing": ("optimize {EX} -o {W}/out -q --quantize int8 --accuracy-budget top1=0.9 "
                              "--accuracy-data {W}/no.txt", "--accuracy-data {W}/no.txt: no such file"),
    "accuracy-data-jsonl-not-json": ("optimize {DEF} -o {W}/out -q --quantize int8 --accuracy-budget top1=0.9 "
                                     "--accuracy-data {B}/bad.jsonl", "--accuracy-data {B}/bad.jsonl: line 2 is not JSON"),
    "logits-unknown": ("optimize {EX} -o {W}/out -q --logits first", "'first' is not one of 'last', 'all'"),
    "logits-not-a-decoder": ("optimize {EX} -o {W}/out -q --logits all", "applies to decoders"),
    # found after the export (no -q: its progress must not stay on stderr)
    "tokenizer-corrupt": ("optimize {B}/ckpt_badtok -o {W}/out", "ckpt_badtok/tokenizer.json: not a valid tokenizer.json"),
    "optimize-an-artifact": ("optimize {B}/art -o {W}/out -q", "is an artifact graphopt optimize wrote"),
    "compare-data-tokenizer-corrupt": ("compare {B}/ckpt_badtok -q --data {B}/notes.txt",
                                       "ckpt_badtok/tokenizer.json: not a valid tokenizer.json"),
    "bad-backend-option": ("optimize {EX} -o {W}/out -q --backend-option novalue", "expected KEY=VALUE"),
    # tuning (tvm): checked before the model loads, nothing tuned or written
    "tune-minutes-negative": ("optimize {EX} -o {W}/out -q --backend tvm --tune-minutes -1",
                              "--tune-minutes -1.0: expected a positive number of minutes"),
    "tune-minutes-without-tvm": ("optimize {EX} -o {W}/out -q --tune-minutes 1", "add --backend tvm"),
    "tune-db-unwritable": ("optimize {EX} -o {W}/out -q --backend tvm --tune-minutes 1 --tune-db {B}/a_file",
                           "--tune-db {B}/a_file: cannot write the tuning database there"),
    "tune-shapes-bad": ("optimize {EX} -o {W}/out -q --backend tvm --tune-minutes 1 --tune-shapes 1x",
                        "--tune-shapes '1x': expected BATCHxSEQ"),
    "tune-shapes-without-minutes": ("optimize {EX} -o {W}/out -q --backend tvm --tune-shapes 1x1",
                                    "--tune-shapes goes with --tune-minutes"),
}


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


def _assert_one_line(result, fragment: str, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad, tmp_path, monkeypatch):
    args, fragment = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    if case == "o-user-folder-in-artifact":
        shutil.copytree(bad / "art", work / "art_plus")
        (work / "art_plus" / "notes.md").write_text("my notes\n")
    (work / "keep.txt").write_text("the user's file\n")
    monkeypatch.chdir(work)
    argv = [a.format(B=bad, W=work, EX=EXAMPLE, DEF=DEFAULT) for a in args.split()]
    before = _tree(bad, work)
    result = CliRunner().invoke(cli, argv)
    line = _assert_one_line(result, fragment.format(B=bad, W=work, EX=EXAMPLE, DEF=DEFAULT))
    assert line.startswith("error: ")
    assert _tree(bad, work) == before  # nothing written, nothing changed, no scratch left


def test_a_mistake_found_after_a_pytorch_export_is_still_one_line(tmp_path, monkeypatch):
    """Without -q the export and the passes report progress; a mistake found only after the
    export (token ids outside the vocabulary) leaves nothing of it on stderr but the error,
    and a run that succeeds prints what it did."""
    from graphopt.testing import VOCAB, tiny_hf_model

    hf = tmp_path / "hf"
    tiny_hf_model("gpt2").model.save_pretrained(hf)
    ids = np.array([[1, 2, VOCAB + 5]], np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    np.savez(tmp_path / "no_mask.npz", input_ids=ids[:, :2])  # ids in range: the missing mask is the mistake
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    for inputs, fragment in (("ids.npz", f"holds id {VOCAB + 5}, outside [0, {VOCAB})"),
                             ("no_mask.npz", "--inputs: missing input 'attention_mask'")):
        r = CliRunner().invoke(cli, ["optimize", str(hf), "-o", "out", "--passes", "dce", "--check-numerics",
                                     "--inputs", inputs])
        _assert_one_line(r, fragment)
        assert _tree(tmp_path) == before
    r = CliRunner().invoke(cli, ["optimize", str(hf), "-o", "out", "--passes", "dce"])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0].startswith("exported hf (") and "graphopt: writing out" in r.stderr


def test_missing_extra_names_the_install_command(bad, tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a base install
    line = _assert_one_line(CliRunner().invoke(cli, ["inspect", str(hf)]), "pip install 'graphopt[hf]'")
    assert "needs transformers" in line
    monkeypatch.setitem(sys.modules, "torch", None)
    _assert_one_line(CliRunner().invoke(cli, ["inspect", str(bad / "ckpt_cut")]), "pip install 'graphopt[torch]'")


@register_pass("test-fault-raise")
class _Raises(Pass):
    """Deliberately broken: raises (a bug in a pass)."""

    def run(self, graph, ctx):
        raise RuntimeError("boom in the pass")


def test_internal_error_is_exit_1_with_a_debug_hint_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    argv = ["optimize", str(EXAMPLE), "-o", str(tmp_path / "out"), "-q", "--passes", "test-fault-raise"]
    monkeypatch.delenv("GRAPHOPT_DEBUG", raising=False)
    line = _assert_one_line(CliRunner().invoke(cli, argv), "pass 'test-fault-raise' raised RuntimeError", code=1)
    assert line.startswith("internal error: ") and "--debug" in line and "GRAPHOPT_DEBUG=1" in line
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("GRAPHOPT_DEBUG", env)
        r = CliRunner().invoke(cli, extra + argv)
        assert r.exit_code == 1
        assert "Traceback" in r.stderr and "boom in the pass" in r.stderr
        monkeypatch.delenv("GRAPHOPT_DEBUG", raising=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- -o safety


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_o_accepts_missing_empty_and_artifact_folders_and_overwrite_replaces_only_when_done(tmp_path):
    invoke = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])
    assert invoke("optimize", EXAMPLE, "-o", tmp_path / "new", "-q").exit_code == 0
    (tmp_path / "empty").mkdir()
    assert invoke("optimize", EXAMPLE, "-o", tmp_path / "empty", "-q").exit_code == 0
    assert (tmp_path / "empty" / "manifest.json").is_file()
    old = _snapshot(tmp_path / "new")
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "new", "-q", "--passes", "dce")  # an artifact: replaced
    assert r.exit_code == 0 and _snapshot(tmp_path / "new")["model.onnx"] != old["model.onnx"]
    user = tmp_path / "project"
    user.mkdir()
    (user / "main.py").write_text("print('mine')\n")
    # --overwrite: a failure before the artifact is complete leaves the user's folder alone ...
    r = invoke("optimize", EXAMPLE, "-o", user, "-q", "--overwrite", "--passes", "test-fault-raise")
    assert r.exit_code == 1 and _snapshot(user) == {"main.py": b"print('mine')\n"}
    # ... and success replaces it whole, with no scratch folder left beside it.
    assert invoke("optimize", EXAMPLE, "-o", user, "-q", "--overwrite").exit_code == 0
    assert sorted(_snapshot(user)) == ["manifest.json", "model.onnx", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new", "project"]


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    from graphopt.fileutil import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new, half written")
            raise RuntimeError("killed")
    assert _snapshot(out) == {"a": b"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
        inode = tmp.stat().st_ino
    assert _snapshot(out) == {"b": b"new"} and out.stat().st_ino == inode  # the new folder, moved whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # private while written, then published with the mode any new folder gets (umask 022: 755)
    # (and its files as any new file: 644, also a file made private as safetensors and mkstemp make them)
    from graphopt.fileutil import atomic_path

    old_mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "fresh") as tmp:
            assert tmp.stat().st_mode & 0o777 == 0o700
            (tmp / "weights").write_bytes(b"w")
            (tmp / "weights").chmod(0o600)
            (tmp / "model.so").write_bytes(b"elf")
            (tmp / "model.so").chmod(0o700)
        with atomic_path(tmp_path / "report.json") as f:
            f.write_text("{}")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "fresh" / "weights").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "fresh" / "model.so").stat().st_mode & 0o777 == 0o755  # a library keeps its x
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    # a folder that existed keeps its permissions (a private one became world-readable 755)
    (tmp_path / "private").mkdir(mode=0o700)
    with atomic_dir(tmp_path / "private") as tmp:
        (tmp / "a").write_text("new")
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700 and _snapshot(tmp_path / "private") == {"a": b"new"}
    # and a shared folder keeps its group and its setgid bit, which its new files inherit
    shared = tmp_path / "shared"
    shared.mkdir()
    gid = 4242 if os.geteuid() == 0 else next((g for g in os.getgroups() if g != shared.stat().st_gid), None)
    if gid is not None:
        os.chown(shared, -1, gid)
    shared.chmod(0o2775)
    want_gid = shared.stat().st_gid
    with atomic_dir(shared) as tmp:
        (tmp / "a").write_text("new")
    assert shared.stat().st_mode & 0o7777 == 0o2775 and shared.stat().st_gid == want_gid
    assert (shared / "a").stat().st_gid == want_gid
    # a user outside the folder's group cannot give it the group: their own, and no setgid bit
    # that would hand their group on as the folder's
    import unittest.mock

    with unittest.mock.patch("os.chown", side_effect=PermissionError("not a member")):
        with atomic_dir(shared) as tmp:
            (tmp / "b").write_text("new")
    assert shared.stat().st_mode & 0o7777 == 0o775 and _snapshot(shared) == {"b": b"new"}


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """A read-only parent was reported by the scratch folder's name (.new.7561.45f04336.tmp);
    a read-only -o folder was replaced anyway. (Checked through os.access and a refused mkdir:
    the tests run as root, whom permissions do not stop.)"""
    from graphopt.errors import UserError
    from graphopt.fileutil import atomic_dir, check_output_dir

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: not (mode & os.W_OK and Path(p).name == "ro"))
    with pytest.raises(UserError, match=r"^-o .*ro: the folder is not writable"):
        check_output_dir(tmp_path / "ro")
    # a new folder under it: said before any work (it was said after the export and the passes)
    with pytest.raises(UserError, match=r"^-o .*ro/a/out: cannot be written: .*ro is not writable$"):
        check_output_dir(tmp_path / "ro" / "a" / "out")
    real_mkdir = Path.mkdir

    def refused(self, *a, **k):
        if self.name.endswith(".tmp"):
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(UserError, match=rf"^{tmp_path}/new: cannot write it: its folder {tmp_path} is not writable$"):
        with atomic_dir(tmp_path / "new"):
            pass


# ------------------------------------------------------------------------- SIGKILL


def _artifact_state(out: Path, old: dict, new_model: bytes) -> str:
    """'old' or 'new'; fails on anything else (a mix, a partial folder, a missing one)."""
    files = _snapshot(out)
    if files == old:
        return "old"
    assert sorted(files) == ["manifest.json", "model.onnx", "report.json"], sorted(files)
    assert files["model.onnx"] == new_model
    manifest = json.loads(files["manifest.json"])
    json.loads(files["report.json"])
    assert manifest["files"] == ["model.onnx"]
    return "new"


def test_sigkill_during_optimize_leaves_the_old_artifact_or_the_new_one(tmp_path):
    import random

    invoke = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert invoke("optimize", EXAMPLE, "-o", out, "-q", "--passes", "dce").exit_code == 0
    assert invoke("optimize", EXAMPLE, "-o", ref, "-q").exit_code == 0
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    old, new_model = _snapshot(out), (ref / "model.onnx").read_bytes()
    cmd = [sys.executable, "-m", "graphopt", "optimize", str(EXAMPLE), "-o", str(out), "-q"]
    def scratch_exists():
        return any(q.name.startswith(".out.") for q in tmp_path.iterdir())

    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not scratch_exists() and p.poll() is None:
        time.sleep(0.001)
    t_write = time.monotonic()
    assert p.wait() == 0
    full, window = time.monotonic() - t0, time.monotonic() - t_write
    assert _artifact_state(out, old, new_model) == "new"
    rng = random.Random(11)
    seen = set()
    # Kills at random times, and kills while the artifact is being written (from the moment
    # its scratch folder appears beside -o, plus a random few milliseconds).
    plans = [("time", rng.uniform(0.3, 1.0))] + [("writing", rng.uniform(0, 1.2) * window) for _ in range(3)]
    for when, delay in plans:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if when == "time":
            time.sleep(full * delay)
        else:
            deadline = time.monotonic() + 10 * full + 30
            while not scratch_exists() and p.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen.add(_artifact_state(out, old, new_model))
        # a killed run may leave its scratch folder (a dot-name beside -o), never a changed -o
        assert {q.name for q in tmp_path.iterdir() if not q.name.startswith(".")} == {"out", "ref", "pristine"}
    # the next run starts clean from whichever state the kill left, and sweeps the killed runs' scratch
    subprocess.run(cmd, check=True, capture_output=True)
    assert _artifact_state(out, old, new_model) == "new"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out", "pristine", "ref"]
    assert seen <= {"old", "new"}


@pytest.mark.parametrize("change, fragment", [
    ({"model": "/tmp/evil.so"}, "artifact paths must be relative"),
    ({"weights": "../../weights.safetensors"}, "artifact paths must be relative"),
    ({"model": "link.so"}, "resolves outside the artifact folder"),
    ({"files": "model.so"}, "files must be a list"),
    ({"format_version": "1"}, "format_version must be an integer"),
    ({"format": "something-else"}, "not a graphopt manifest"),
])
def test_load_checks_manifest_paths_before_any_backend_runs_code(tmp_path, change, fragment):
    """A TVM artifact's library is native code that loading runs: a manifest that names a
    file outside its folder is refused before the backend is even imported."""
    import graphopt
    from graphopt.errors import UserError

    art = tmp_path / "art"
    art.mkdir()
    (tmp_path / "evil.so").write_bytes(b"\x7fELF")
    (art / "link.so").symlink_to(tmp_path / "evil.so")
    manifest = {"format": "graphopt-artifact", "format_version": 1, "backend": "tvm", "target": "cpu",
                "model": "model.so", "weights": "weights.safetensors", "files": ["model.so", "weights.safetensors"],
                "signature": {"inputs": [{"name": "x", "dtype": "f32", "shape": ["batch", 16]}],
                              "outputs": [{"name": "y", "dtype": "f32", "shape": ["batch", 8]}]}}
    (art / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(UserError, match=fragment):
        graphopt.load(art)


@pytest.mark.parametrize("change, fragment", [
    ({"kv_layout": "weird"}, "kv_layout 'weird' is not one of BNSH, BSNH, static, paged"),
    ({"eos_token_id": "x"}, "eos_token_id 'x' is not a token id"),
    ({"eos_token_id": [1, True]}, "eos_token_id \\[1, True\\] is not a token id"),
    ({"max_positions": 128}, "max_positions 128 is not the static cache's 64 positions"),
    ({"tokenizer": "../tokenizer.json"}, "artifact paths must be relative"),
    ({"logits": "some"}, "logits 'some' is not last or all"),
    ({"prompt_prefix_ids": ["a"]}, "prompt_prefix_ids \\['a'\\] is not a list of token ids"),
    ({"past_present_share_buffer": "no"}, "past_present_share_buffer 'no' must be true or false"),
    ({"past_present_share_buffer": True}, "true only with kv_layout BNSH"),
])
def test_a_hand_edited_generation_section_is_refused_when_loaded(tmp_path, change, fragment):
    """Before, an EOS id of "x" failed after the prompt was printed, an unknown layout was
    taken, and a static artifact's changed max_positions was an internal error in ORT."""
    from graphopt.errors import UserError
    from graphopt.manifest import read_manifest

    cache = {"name": "past_key_values.0.key", "dtype": "f32", "shape": ["batch", 2, 64, 8]}
    manifest = {"format": "graphopt-artifact", "format_version": 1, "backend": "onnxruntime",
                "signature": {"inputs": [{"name": "input_ids", "dtype": "i64", "shape": ["batch", "seq"]}, cache],
                              "outputs": [{"name": "logits", "dtype": "f32", "shape": ["batch", 1, 512]}]},
                "generation": {"kv_layout": "static", "logits": "last", "num_layers": 1, "max_positions": 64,
                               "tokenizer": "tokenizer.json", "eos_token_id": [0, 3], "prompt_prefix_ids": [0]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path)["generation"]["max_positions"] == 64
    manifest["generation"].update(change)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"manifest.json: generation.*{fragment}"):
        read_manifest(tmp_path)


def test_missing_torch_for_a_state_dict_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    monkeypatch.setitem(sys.modules, "torch", None)
    _assert_one_line(CliRunner().invoke(cli, ["inspect", str(tmp_path / "pytorch_model.bin")]),
                     "needs torch, which is not installed: pip install 'graphopt[hf]'")


def test_bare_graphopt_shows_the_help():
    r = CliRunner().invoke(cli, [])
    assert "Usage: " in r.output and "Commands:" in r.output and "error:" not in r.output


def test_sigterm_during_optimize_removes_the_scratch_folder(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "graphopt", "optimize", str(EXAMPLE), "-o", str(out), "-q"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(q.name.startswith(".out.") for q in tmp_path.iterdir()) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    p.wait()
    if p.returncode == 0:  # it finished first: then the artifact is whole
        assert (out / "manifest.json").is_file()
    else:
        assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in p.stderr.read()
        assert not out.exists()
    assert [q.name for q in tmp_path.iterdir()] in ([], ["out"])


def _mutations(data: bytes, rng, n: int):
    """Truncations, flipped bytes and inserted bytes of `data`, n of each kind."""
    for _ in range(n):
        yield data[: rng.randrange(len(data))]
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b)
        pos = rng.randrange(len(data))
        yield data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 20))) + data[pos:]


def test_corrupted_files_load_or_fail_in_one_line(tmp_path):
    """Seeded fuzzing of each file format `inspect` reads: every mutation either still loads
    or is a one-line exit-2 error -- never an internal error (this found names that are not
    UTF-8, data that does not fit its dims, and bad string literals in .gir)."""
    import random

    rng = random.Random(2024)
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(EXAMPLE), "-o", str(tmp_path / "ok.gir")]).exit_code == 0
    gir = (tmp_path / "ok.gir").read_text()
    weights = (tmp_path / "ok.weights.safetensors").read_bytes()
    text_mutations = []
    for _ in range(40):
        t = list(gir)
        for _ in range(rng.randint(1, 4)):
            t[rng.randrange(len(t))] = rng.choice('(){}[]%@:,=0123456789abcxyz" \n\x01')
        text_mutations.append("".join(t).encode())
    cases = [("m.onnx", b, None) for b in _mutations(EXAMPLE.read_bytes(), rng, 40)]
    cases += [("m.gir", t, weights) for t in text_mutations]
    cases += [("m.gir", gir.encode(), w) for w in _mutations(weights, rng, 20)]
    failures = []
    for name, content, w in cases:
        path = tmp_path / name
        path.write_bytes(content.replace(b"ok.weights", b"m.weights") if name.endswith(".gir") else content)
        if w is not None:
            (tmp_path / "m.weights.safetensors").write_bytes(w)
        r = runner.invoke(cli, ["inspect", str(path)])
        if r.exit_code not in (0, 2) or (r.exit_code == 2 and len(r.stderr.strip().splitlines()) != 1):
            failures.append((name, r.exit_code, r.stderr[-200:]))
    np.savez(tmp_path / "in.npz", x=np.ones((2, 16), np.float32))
    for content in _mutations((tmp_path / "in.npz").read_bytes(), rng, 15):
        (tmp_path / "m.npz").write_bytes(content)
        r = runner.invoke(cli, ["optimize", str(EXAMPLE), "-o", str(tmp_path / "out"), "-q", "--passes", "dce",
                                "--check-numerics", "--inputs", str(tmp_path / "m.npz")])
        if r.exit_code not in (0, 2) or (r.exit_code == 2 and len(r.stderr.strip().splitlines()) != 1):
            failures.append(("m.npz", r.exit_code, r.stderr[-200:]))
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert not failures, failures[:3]


@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_a_damaged_artifact_manifest_is_named_beside_the_lowered_models_error(command, tmp_path, monkeypatch):
    """A folder with ORT's own ops in model.onnx and a manifest.json that is not JSON: the
    one line says the manifest is damaged, not only that com.microsoft is unsupported."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "art"
    folder.mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, folder / "model.onnx")
    (folder / "manifest.json").write_text('{"format": ')
    argv = [command, str(folder)] + (["-o", str(tmp_path / "out"), "-q"] if command == "optimize" else [])
    line = _assert_one_line(CliRunner().invoke(cli, argv), "manifest.json is not valid JSON")
    assert "com.microsoft" in line and not (tmp_path / "out").exists()


def test_reports_are_strict_json_when_a_metric_diverges():
    """A diverged metric (NaN loss, an overflowing perplexity) is null in report.json, never a
    bare NaN/Infinity that jq or JavaScript cannot parse."""
    from graphopt.accuracy import Perplexity
    from graphopt.fileutil import json_text

    assert Perplexity(nll=800.0, tokens=1).perplexity == float("inf")  # math.exp would raise OverflowError
    assert np.isnan(Perplexity(nll=float("nan"), tokens=1).perplexity)  # a NaN loss is not an overflow
    text = json_text({"perplexity": float("inf"), "loss": float("nan"), "rows": [np.float32(1.5), (2, -np.inf)]})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"perplexity": None, "loss": None, "rows": [1.5, [2, None]]}


def test_a_folder_another_live_process_is_writing_is_refused(tmp_path):
    """Two optimizes into one -o both said "wrote out/"; the later silently replaced the other's
    artifact. The writer is known by the lock it holds on its scratch folder: a scratch folder
    whose pid is now another process's (a killed run's, the pid reused) is swept as a dead one."""
    import subprocess

    from graphopt.errors import UserError
    from graphopt.fileutil import atomic_dir

    live = tmp_path / ".out.0.0123abcd.tmp"  # renamed after its holder's pid below
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(live)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        named = live.rename(tmp_path / f".out.{holder.pid}.0123abcd.tmp")
        with pytest.raises(UserError, match=rf"out: another process \(pid {holder.pid}\) is writing it now"):
            with atomic_dir(tmp_path / "out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # its writer is gone (or the pid is another process's: os.getppid() is alive): swept, and written
    named.rename(tmp_path / f".out.{os.getppid()}.0123abcd.tmp")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
