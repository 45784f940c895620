"""`graphopt finetune`: LoRA (merged for export), distillation, resume and torchrun.

The shipped model learns a new text with LoRA; the merged checkpoint equals base + adapter;
a pruned tiny model distilled from its unpruned parent moves toward it; a killed run resumes
to the same curve; two gloo processes see the batch one process sees.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from graphopt.train import load_model
from graphopt.train.data import load_split
from graphopt.train.finetune import FinetuneConfig, distillation_kl, finetune
from graphopt.train.lora import add_lora, load_adapter, parse_targets
from graphopt.train.prune import prune_checkpoint
from graphopt.train.trainer import evaluate_tokens

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "examples" / "default"


def _metrics(run: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _new_text(folder: Path, write_corpus) -> Path:
    """One text file the shipped model has never seen (generated code-like documents)."""
    corpus = write_corpus(folder / "corpus", n_docs=40, seed=11)
    path = folder / "new.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted(corpus.rglob("mod_*.py"))))
    return path


def _tiny_options(**over) -> dict:
    options = dict(batch_size=4, max_steps=12, lr=3e-3, eval_interval=6, eval_tokens=1024,
                   checkpoint_interval=4, log_interval=1000, seed=3, threads=1)
    return options | over


@pytest.fixture(scope="module")
def pruned_tiny(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "ck"
    prune_checkpoint(tiny_run, out, heads_ratio=0.5, mlp_ratio=0.5)
    return out


def test_lora_on_the_shipped_model_learns_a_new_text_and_merges_exactly(tmp_path, corpus_writer):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = FinetuneConfig(checkpoint=str(DEFAULT), data=str(_new_text(tmp_path, corpus_writer)), out=str(run), lora_rank=8,
                         max_steps=24, batch_size=2, lr=5e-3, eval_interval=24, eval_tokens=2048,
                         checkpoint_interval=24, log_interval=1000, threads=2, val_tokens=256)
    folder = finetune(cfg)
    val = load_split(run / "data", "val")[:2049]
    base, _ = load_model(DEFAULT)
    merged, _ = load_model(folder)  # a plain checkpoint: the config and weight names of the base
    before, n = evaluate_tokens(base, val, 256)
    after, _ = evaluate_tokens(merged, val, 256)
    assert after / n < before / n - 0.1, (before / n, after / n)

    adapted, _ = load_model(DEFAULT)
    add_lora(adapted, parse_targets("all", "llama"), rank=8, alpha=16.0)
    load_adapter(adapted, load_file(str(folder / "adapter.safetensors")), "adapter")
    ids = torch.from_numpy(np.asarray(val[:200], dtype=np.int64)).view(2, 100)
    with torch.no_grad():
        want, got, old = adapted.eval()(ids), merged(ids), base(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - old).abs().max() > 1e-2  # the adapter did change the model
    saved = json.loads((folder / "config.json").read_text())
    assert saved["finetune"]["lora_targets"] == ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]


def test_distillation_moves_a_pruned_student_toward_its_teacher(tiny_run, pruned_tiny, corpus, tmp_path):
    run = tmp_path / "run"
    finetune(FinetuneConfig(checkpoint=str(pruned_tiny), data=str(corpus), out=str(run),
                            distill_from=str(tiny_run), **_tiny_options(max_steps=30, eval_interval=30)))
    val = load_split(run / "data", "val")
    ids = torch.from_numpy(np.asarray(val[:32 * 8 + 1], dtype=np.int64))[:-1].view(8, 32)
    teacher, _ = load_model(tiny_run)
    student_before, _ = load_model(pruned_tiny)
    student_after, _ = load_model(run)
    with torch.no_grad():
        t = teacher(ids).flatten(0, 1)
        kl_before = distillation_kl(student_before(ids).flatten(0, 1), t, 2.0).item()
        kl_after = distillation_kl(student_after(ids).flatten(0, 1), t, 2.0).item()
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)
    m = _metrics(run)
    first, last = (np.mean([m[s][k] for s in steps for k in ("kl",)]) for steps in (range(1, 6), range(26, 31)))
    assert last < first
    assert all({"lm_loss", "kl", "loss"} <= set(r) for r in m.values())


def test_a_killed_finetune_resumes_to_the_same_run(tiny_run, pruned_tiny, corpus, tmp_path):
    """LoRA and distillation together: the resumed run rebuilds base + adapter + optimizer
    state and reproduces the uninterrupted run's losses and final weights."""
    common = dict(checkpoint=str(pruned_tiny), data=str(corpus), distill_from=str(tiny_run), lora_rank=4,
                  **_tiny_options())
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finetune(FinetuneConfig(out=str(whole), **common))
    finetune(FinetuneConfig(out=str(killed), **common), stop_after=6)  # as if killed after step 6
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    finetune(FinetuneConfig(out=str(killed), **common))
    a, b = _metrics(whole), _metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
    for name in ("model.safetensors", "adapter.safetensors"):
        from safetensors.torch import load_file

        x, y = (load_file(str(run / "checkpoints" / "step_0000012" / name)) for run in (whole, killed))
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def pruned_default(tmp_path_factory) -> Path:
    """The shipped model with half its KV groups and a quarter of its MLP channels removed."""
    out = tmp_path_factory.mktemp("pruned_default") / "ck"
    prune_checkpoint(DEFAULT, out, heads_ratio=0.5, mlp_ratio=0.25, val_tokens=256)
    return out


def _kill_after_first_checkpoint(cmd: list[str], run: Path) -> int:
    """Starts `cmd`, SIGKILLs it as soon as `run` holds a checkpoint, and returns that
    checkpoint's step. Polls the folder (no fixed sleep), so a slow machine only waits longer."""
    latest = run / "checkpoints" / "latest"
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not latest.is_file() and p.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    return int(latest.read_text().strip()[len("step_"):])


@pytest.mark.parametrize("distill", [False, True], ids=["lora", "lora+distill"])
def test_sigkill_during_finetune_resumes_to_the_uninterrupted_run(distill, pruned_default, tmp_path, corpus_writer,
                                                                  check_run_folder):
    """`graphopt finetune` on the shipped model (LoRA; and LoRA with distillation, the pruned
    shipped model learning from the unpruned one), killed with SIGKILL once it has written a
    checkpoint, then resumed by the same command: the step counter continues from that
    checkpoint and the final merged weights and adapter equal an uninterrupted run's."""
    from safetensors.torch import load_file

    steps = 10
    student = pruned_default if distill else DEFAULT
    cmd = [sys.executable, "-m", "graphopt", "finetune", str(student), "--data", str(_new_text(tmp_path, corpus_writer)),
           "--lora-rank", "4", "--max-steps", str(steps), "--batch-size", "1", "--checkpoint-interval", "2",
           "--eval-interval", str(steps), "--eval-tokens", "256", "--log-interval", "1", "--seed", "5",
           "--val-tokens", "256", "--threads", "1", *(["--distill-from", str(DEFAULT)] if distill else [])]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(whole)], check=True, capture_output=True)

    at = _kill_after_first_checkpoint([*cmd, "--out", str(killed)], killed)
    assert 0 < at < steps
    check_run_folder(killed, ("adapter.safetensors",))
    r = subprocess.run([*cmd, "--out", str(killed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"at step {at}\n" in r.stdout and "step 1/" not in r.stdout  # continued, not restarted
    assert f"step {at + 1}/{steps} |" in r.stdout
    check_run_folder(killed, ("adapter.safetensors",))

    a, b = _metrics(whole), _metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
        if distill:
            assert abs(a[step]["kl"] - b[step]["kl"]) <= 1e-6, step
    assert abs(a[steps]["val_loss"] - b[steps]["val_loss"]) <= 1e-6
    last = f"step_{steps:07d}"
    assert json.loads((killed / "checkpoints" / last / "config.json").read_text())["step"] == steps
    for name in ("model.safetensors", "adapter.safetensors"):
        x, y = (load_file(str(run / "checkpoints" / last / name)) for run in (whole, killed))
        assert sorted(x) == sorted(y)
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    changed = load_file(str(whole / "checkpoints" / last / "adapter.safetensors"))
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in changed.items())  # it did train


def test_prune_and_finetune_record_perplexity_and_optimize_reports_it(tiny_run, corpus, tmp_path):
    """Issue 15's report: `graphopt prune` records the unpruned and pruned perplexity on the
    checkpoint's val.txt, `graphopt finetune` the recovered one, and `graphopt optimize` of
    the recovered run carries all three into report.json and its summary; each equals
    `graphopt eval`'s perplexity (train/evaluate.py) of that checkpoint on the same text."""
    from click.testing import CliRunner

    from graphopt.cli import cli
    from graphopt.train.checkpoint import resolve_checkpoint
    from graphopt.train.evaluate import evaluate_checkpoint

    val = resolve_checkpoint(tiny_run) / "val.txt"
    pruned, run = tmp_path / "pruned", tmp_path / "run"
    invoke = lambda *a: CliRunner().invoke(cli, [str(x) for x in a], catch_exceptions=False)
    r = invoke("prune", tiny_run, "--heads-ratio", "0.5", "--mlp-ratio", "0.5", "--out", pruned)
    assert r.exit_code == 0, r.output
    assert f"perplexity on {val} (" in r.output
    r = invoke("finetune", pruned, "--data", corpus, "--distill-from", tiny_run, "--max-steps", "30",
               "--batch-size", "4", "--lr", "3e-3", "--eval-interval", "30", "--eval-tokens", "512",
               "--checkpoint-interval", "30", "--seed", "3", "--threads", "1", "--out", run)
    assert r.exit_code == 0, r.output
    want = {name: evaluate_checkpoint(folder, data=val)[0].perplexity
            for name, folder in (("unpruned", tiny_run), ("pruned", pruned), ("recovered", run))}
    assert want["recovered"] < want["pruned"] and want["unpruned"] < want["pruned"]  # the three differ

    saved = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert saved["finetune"]["perplexity"]["before"] == pytest.approx(want["pruned"], rel=1e-9)
    r = invoke("optimize", run, "-o", tmp_path / "opt", "--no-kv-cache")
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "opt" / "report.json").read_text())["pruning"]
    assert got["checkpoint"]["heads_ratio"] == 0.5 and got["checkpoint"]["mlp_ratio"] == 0.5
    ppl = got["perplexity"]
    assert ppl["text"] == str(val) and ppl["tokens"] == evaluate_checkpoint(tiny_run, data=val)[0].tokens
    for name in ("unpruned", "pruned", "recovered"):
        assert ppl[name] == pytest.approx(want[name], rel=1e-9), name
    line = next(x for x in r.output.splitlines() if "perplexity:" in x)
    assert line.split("perplexity: ")[1].startswith(
        f"unpruned {want['unpruned']:.2f} -> pruned {want['pruned']:.2f} -> recovered {want['recovered']:.2f} (")


def test_without_validation_text_perplexity_is_skipped_with_a_note(tiny_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from graphopt.cli import cli
    from graphopt.train.checkpoint import resolve_checkpoint

    bare = shutil.copytree(resolve_checkpoint(tiny_run), tmp_path / "bare", ignore=shutil.ignore_patterns("val.txt"))
    r = CliRunner().invoke(cli, ["prune", str(bare), "--mlp-ratio", "0.25", "--out", str(tmp_path / "pruned")])
    assert r.exit_code == 0, r.output
    note = f"{bare} has no val.txt; pass --val FILE to measure perplexity"
    assert f"perplexity: skipped ({note})" in r.output
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["pruned"]["perplexity"] == {"skipped": note}


def test_finetune_under_torchrun_matches_one_process(tiny_run, pruned_tiny, corpus, tmp_path, free_port):
    common = ["finetune", str(pruned_tiny), "--data", str(corpus), "--distill-from", str(tiny_run),
              "--lora-rank", "4", "--max-steps", "2", "--eval-interval", "2", "--checkpoint-interval", "2",
              "--eval-tokens", "1024", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port), "-m", "graphopt", *common, "--batch-size", "4", "--out", str(tmp_path / "ddp")],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "graphopt", *common, "--batch-size", "8", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    ddp, one = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert sorted(ddp) == [1, 2]
    for key in ("loss", "kl", "lm_loss"):
        assert abs(ddp[1][key] - one[1][key]) < 1e-5, key


@pytest.mark.parametrize("args, fragment", [
    (["--lora-rank", "4", "--lora-targets", "q,gate_proj"], "--lora-targets 'q,gate_proj': llama models take"),
    (["--lora-alpha", "8"], "--lora-alpha and --lora-targets need --lora-rank"),
    (["--distill-from", "{DEFAULT}"], "vocab_size 4096 differs from the student's 384"),
    (["--data", "{W}/nope"], "--data {W}/nope: not a directory or a file"),
    (["--val", "{W}/nope.txt"], "--val {W}/nope.txt: no such file"),
])
def test_finetune_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_run, tmp_path, args, fragment):
    args = [a.replace("{DEFAULT}", str(DEFAULT)).replace("{W}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "graphopt", "finetune", str(tiny_run), "--out", str(out), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert fragment.replace("{W}", str(tmp_path)) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_finetune_and_prune_help_have_examples():
    from click.testing import CliRunner

    from graphopt.cli import cli

    for command in ("finetune", "prune"):
        r = CliRunner().invoke(cli, [command, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output and f"graphopt {command} " in r.output


def test_lora_options_parse_with_their_types(tiny_run):
    from graphopt.train.options import click_type

    assert click_type("lora_alpha").convert("8.5", None, None) == 8.5  # a float option takes a float
    cfg = FinetuneConfig(checkpoint=str(tiny_run), lora_rank=2, lora_alpha=8.5).validate()
    assert cfg.model["vocab_size"] == 384 and cfg.warmup_steps == 10  # the checkpoint's model; 5 % of 200 steps
