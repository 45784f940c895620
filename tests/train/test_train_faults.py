"""Faults and bad input for `graphopt train`, `eval` and `generate`: one line, exit code 2,
nothing written; and a run killed (SIGKILL) at random points leaves complete checkpoints
only, and resumes to exactly the loss curve of an uninterrupted run."""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt.cli import cli


DEFAULT = Path(__file__).resolve().parents[2] / "examples" / "default"

# name -> (config file content or None, extra args, fragment of the one error line)
CASES = {
    "config-not-json": ('{"max_steps": 3', [], "not valid JSON"),
    "config-array": ("[1, 2]", [], "expected a JSON object"),
    "config-string-int": ({"batch_size": "8"}, [], "batch_size must be an integer, not '8'"),
    "config-bool-int": ({"max_steps": True}, [], "max_steps must be an integer, not True"),
    "config-float-steps": ({"max_steps": 1.5}, [], "max_steps must be an integer"),
    "config-string-bool": ({"bf16": "yes"}, [], "bf16 must be true or false"),
    "config-negative-lr": ({"lr": -1}, [], "lr=-1 must be > 0.0"),
    "config-eval-tokens-0": ({"eval_tokens": 0}, [], "eval_tokens=0 must be >= 1"),
    "config-beta-1": ({"beta2": 1.0}, [], "beta2=1.0 must be >= 0.0 and < 1.0"),
    "config-device": ({"device": "tpu"}, [], "device must be one of auto, cpu, cuda"),
    "config-unknown-option": ({"learning_rate": 1.0}, [], "unknown training option(s) learning_rate"),
    # a hint where one is near: a misspelling, a model option at the top level
    "config-misspelled-option": ({"max_step": 2}, [], "unknown training option(s) max_step (max_step: did you mean "
                                                       "max_steps?)"),
    "config-model-option-at-top": ({"dim": 32}, [], 'dim: model options go under "model"'),
    # the file named, not "training config"
    "config-vocab-below-tokenizer": ({"model": {"vocab_size": 100}}, [], "run.json: vocab_size=100 is smaller"),
    "config-unknown-preset": ({"preset": "huge"}, [], "unknown preset 'huge'"),
    "config-model-not-object": ({"model": [1, 2]}, [], "model must be a preset name or an object"),
    "config-model-bad-field": ({"model": {"dim": "wide"}}, [], "dim='wide'"),
    "config-preset-and-flag": ({"preset": "tiny", "batch_size": 0}, ["--preset", "small"], "batch_size=0 must be >= 1"),
    "flag-eval-tokens-0": (None, ["--eval-tokens", "0"], "Invalid value for '--eval-tokens'"),
    "flag-batch-size-0": (None, ["--batch-size", "0"], "Invalid value for '--batch-size'"),
    "flag-lr-0": (None, ["--lr", "0"], "Invalid value for '--lr'"),
    "flag-threads-negative": (None, ["--threads", "-1"], "Invalid value for '--threads'"),
    "flag-not-a-number": (None, ["--max-steps", "many"], "'many' is not a valid integer"),
    "vocab-below-tokenizer": (None, ["--vocab-size", "100"], "vocab_size=100 is smaller than the byte-level"),
    "data-missing": (None, ["--data", "{W}/nope"], "not a directory"),
    "data-without-text": (None, ["--data", "{W}/empty_data"], "no text files"),
    "out-user-folder": (None, ["--out", "{W}/thesis"], "is not a graphopt training run"),
    "out-is-a-file": (None, ["--out", "{W}/keep.txt"], "exists and is not a folder"),
    "unknown-flag": (None, ["--epochs", "3"], "No such option '--epochs'"),
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (0, 0)
            for p in sorted(root.rglob("*"))}


def _assert_one_line(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_bad_input_is_one_line_exit_2_and_writes_nothing(case, corpus, tmp_path, monkeypatch):
    content, extra, fragment = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine\n")
    (work / "empty_data").mkdir()
    (work / "empty_data" / "photo.png").write_bytes(b"\x89PNG")
    (work / "thesis").mkdir()
    (work / "thesis" / "chapter1.tex").write_text("years of work\n")
    monkeypatch.chdir(work)
    args = ["train", "--data", str(corpus), "--out", str(work / "run"), "--preset", "tiny", "--max-steps", "2"]
    if content is not None:
        (work / "run.json").write_text(content if isinstance(content, str) else json.dumps(content))
        args = ["train", "--config", str(work / "run.json"), "--data", str(corpus), "--out", str(work / "run")]
    args += [a.format(W=work) for a in extra]
    before = _tree(work)
    _assert_one_line(CliRunner().invoke(cli, args), fragment)
    assert _tree(work) == before and not (work / "run").exists()


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory) -> Path:
    b = tmp_path_factory.mktemp("broken_ckpts")
    ignore = shutil.ignore_patterns("model.safetensors", "val.txt")
    shutil.copytree(DEFAULT, b / "cut", ignore=ignore)
    (b / "cut" / "model.safetensors").write_bytes((DEFAULT / "model.safetensors").read_bytes()[:4096])
    shutil.copytree(DEFAULT, b / "badconfig", ignore=ignore)
    (b / "badconfig" / "config.json").write_text('{"model": {"dim": ')
    (b / "escape" / "checkpoints").mkdir(parents=True)
    (b / "escape" / "checkpoints" / "latest").write_text("../../../etc\n")
    (b / "empty.txt").write_text("")
    return b


@pytest.mark.parametrize("args, fragment", [
    (["eval", "{B}/missing"], "checkpoint folder not found"),
    (["eval", "{B}/cut"], "not a readable safetensors file"),
    (["eval", "{B}/badconfig"], "cannot read checkpoint config"),
    (["eval", "{B}/escape"], "not a checkpoint folder inside"),
    (["eval", str(DEFAULT), "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["eval", str(DEFAULT), "--max-tokens", "-5"], "Invalid value for '--max-tokens'"),
    (["eval", str(DEFAULT), "--data", "{B}/empty.txt"], "empty.txt: too little text to score"),
    (["generate", "{B}/cut", "--prompt", "def "], "not a readable safetensors file"),
    (["generate", str(DEFAULT), "--prompt", "x", "--max-new-tokens", "0"], "'--max-new-tokens': 0 is not"),
    (["generate", str(DEFAULT)], "Missing option '--prompt'"),
])
def test_eval_and_generate_bad_input_is_one_line(args, fragment, broken_checkpoints):
    before = _tree(broken_checkpoints)
    _assert_one_line(CliRunner().invoke(cli, [a.format(B=broken_checkpoints) for a in args]), fragment)
    assert _tree(broken_checkpoints) == before


@pytest.fixture(scope="module")
def small_run(corpus, tmp_path_factory, make_config) -> Path:
    from graphopt.train.trainer import train

    out = tmp_path_factory.mktemp("small_run") / "run"
    train(make_config(corpus, out, max_steps=4, warmup_steps=1, checkpoint_interval=2, eval_interval=4))
    return out


def _break_optimizer(run: Path) -> None:
    (run / "checkpoints" / "step_0000004" / "optimizer.pt").write_bytes(b"garbage")


def _delete_latest(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "step_0000004")


def _corrupt_meta(run: Path) -> None:
    (run / "data" / "meta.json").write_text("{x")


def _corrupt_metrics_middle(run: Path) -> None:
    (run / "metrics.jsonl").write_text('{"step": 1}\njunk\n{"step": 3}\n')


def _other_model(run: Path) -> None:
    pass  # the resume is given another --dim


@pytest.mark.parametrize("damage, extra, fragment", [
    (_break_optimizer, [], "not a readable optimizer state"),
    (_delete_latest, [], "which is not a complete checkpoint"),
    (_corrupt_meta, [], "meta.json: not valid JSON"),
    (_corrupt_metrics_middle, [], "line 2 is not a metrics record"),
    (_other_model, ["--dim", "64"], "model config differs from this run's"),
])
def test_resuming_a_damaged_run_is_one_line(small_run, tmp_path, damage, extra, fragment, corpus):
    run = shutil.copytree(small_run, tmp_path / "run")
    damage(run)
    before = _tree(run)
    args = ["train", "--data", str(corpus), "--out", str(run), "--max-steps", "6", "--batch-size", "8",
            "--vocab-size", "384", "--seq-len", "32", "--dim", "32", "--layers", "2", "--heads", "4",
            "--kv-heads", "2", "--mlp-hidden", "64", "--preset", "tiny", *extra]
    _assert_one_line(CliRunner().invoke(cli, args), fragment)
    assert _tree(run) == before


def test_resume_drops_and_reports_a_torn_metrics_line(corpus, tmp_path, capsys, make_config):
    from graphopt.train.trainer import read_metrics, train

    run = tmp_path / "run"
    train(make_config(corpus, run, max_steps=12, checkpoint_interval=4, eval_interval=12), stop_after=6)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 4.1')  # the kill cut this line short
    capsys.readouterr()
    train(make_config(corpus, run, max_steps=12, checkpoint_interval=4, eval_interval=12))
    assert "dropped a partial last line" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(Exception, match="line 2 is not a metrics record"):
        read_metrics(run / "metrics.jsonl")


def test_save_checkpoint_keeps_the_old_one_until_the_new_one_is_complete(tmp_path, monkeypatch, make_config):
    import torch

    from graphopt.train import checkpoint as ckpt
    from graphopt.train.models import build_model, config_from_dict

    tiny = make_config(tmp_path, tmp_path).model
    model = build_model(config_from_dict(dict(tiny)))
    tok = tmp_path / "tokenizer.json"
    shutil.copy(DEFAULT / "tokenizer.json", tok)
    folder = tmp_path / "checkpoints" / "step_0000010"
    config = {"model": dict(tiny), "step": 10}
    ckpt.save_checkpoint(folder, model, config, tok)
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while writing the optimizer state

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, model, config, tok, training_state={"step": 10})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old
    assert sorted(p.name for p in folder.parent.iterdir()) == ["step_0000010"]  # no scratch left
    monkeypatch.undo()
    ckpt.save_checkpoint(folder, model, config, tok, training_state={"step": 10})
    assert (folder / "model.safetensors").read_bytes() != old["model.safetensors"]
    assert (folder / "optimizer.pt").is_file()


# ---------------------------------------------------------------------------- SIGKILL

STEPS = 16


def test_sigkill_during_train_leaves_whole_checkpoints_and_resumes_to_the_same_curve(corpus, tmp_path, make_config,
                                                                                     check_run_folder):
    from graphopt.train import load_model
    from graphopt.train.trainer import read_metrics, train

    over = dict(max_steps=STEPS, checkpoint_interval=2, eval_interval=8, eval_tokens=512)
    straight = tmp_path / "straight"
    train(make_config(corpus, straight, **over))
    run = tmp_path / "run"
    cfg = dataclasses.asdict(make_config(corpus, run, **over))
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    run.mkdir()
    shutil.copytree(straight / "data", run / "data")  # prepared already: the subprocesses only train
    cmd = [sys.executable, "-m", "graphopt", "train", "--config", str(tmp_path / "run.json")]
    rng = random.Random(5)
    # Kill after a random number of logged steps, or while a checkpoint is being written.
    plans = [("saving", rng.uniform(0, 0.02)), ("steps", rng.randint(STEPS // 2, STEPS - 1))]
    for when, arg in plans:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            if when == "steps" and (run / "metrics.jsonl").exists() and \
                    len((run / "metrics.jsonl").read_text().splitlines()) >= arg:
                break
            if when == "saving" and (run / "checkpoints").exists() and \
                    any(q.name.startswith(".step_") for q in (run / "checkpoints").iterdir()):
                time.sleep(arg)
                break
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
        check_run_folder(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # as if the last kill had torn a line
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dropped a partial last line" in r.stdout
    check_run_folder(run)
    a = {m["step"]: m for m in read_metrics(straight / "metrics.jsonl")}
    b = {m["step"]: m for m in read_metrics(run / "metrics.jsonl")}
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
    assert abs(a[STEPS]["val_loss"] - b[STEPS]["val_loss"]) <= 1e-6
    wa, wb = load_model(straight)[0].state_dict(), load_model(run)[0].state_dict()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("command", [["generate", "--prompt", "def f(x):"], ["eval"]])
def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(small_run, tmp_path, command):
    ckpt = shutil.copytree(small_run / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    shutil.copy(DEFAULT / "tokenizer.json", ckpt / "tokenizer.json")  # 4096 tokens; the model has 384
    r = CliRunner().invoke(cli, [command[0], str(ckpt), *command[1:]])
    _assert_one_line(r, "vocab_size=384")


def test_any_mistyped_config_is_a_user_error():
    """Seeded fuzzing of the config schema: every combination of wrong types and values is a
    `UserError` (one line at the CLI), never a TypeError or a crash later in training."""
    from graphopt.errors import UserError
    from graphopt.train.options import SCHEMA
    from graphopt.train.trainer import PRESETS, TrainConfig

    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 0.5, -0.5, float("nan"), float("inf"), "", "x", "cpu", [], [1], {},
              {"dim": 3}, {"arch": 5}, {"vocab_size": "a"}, {"num_heads": 0}, {"arch": "gpt", "num_kv_heads": 2}]
    refused = 0
    for _ in range(2000):
        d = {rng.choice(list(SCHEMA)): rng.choice(values) for _ in range(rng.randint(1, 3))}
        if isinstance(d.get("model"), dict):
            d["model"] = {**PRESETS["tiny"], **d["model"]}
        try:
            TrainConfig.from_dict(d, "run.json").validate()
        except UserError as e:
            refused += 1
            assert "\n" not in str(e)
    assert refused > 1000  # most random combinations are wrong, and each was caught as such
