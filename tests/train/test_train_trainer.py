import json
import math

import numpy as np
import pytest
import torch

from graphopt.train import load_model
from graphopt.train.trainer import get_batch, lr_factor, train


def _metrics(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_training_lowers_validation_loss(tiny_run):
    metrics = _metrics(tiny_run)
    first, last = metrics[50]["val_loss"], metrics[150]["val_loss"]
    # An untrained model scores about ln(vocab) = 5.95; the corpus is highly regular.
    assert first < 5.0
    assert last < first - 0.3
    assert math.isclose(metrics[150]["val_ppl"], math.exp(last), rel_tol=1e-9)


def test_resume_reproduces_the_uninterrupted_loss_curve(corpus, tmp_path, make_config):
    straight = tmp_path / "straight"
    train(make_config(corpus, straight))
    resumed = tmp_path / "resumed"
    # "Killed" after step 27: the last checkpoint is step 20; steps 21-27 are redone.
    train(make_config(corpus, resumed), stop_after=27)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    train(make_config(corpus, resumed))
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, step
    assert abs(a[40]["val_loss"] - b[40]["val_loss"]) <= 1e-5
    # Stopped on purpose (--stop-at-step 25, which checkpoints there), then continued.
    stopped = tmp_path / "stopped"
    train(make_config(corpus, stopped), stop_at_step=25)
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step_0000025"
    train(make_config(corpus, stopped))
    assert abs(_metrics(stopped)[40]["val_loss"] - a[40]["val_loss"]) <= 1e-5
    wa, wb = load_model(straight)[0].state_dict(), load_model(resumed)[0].state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)


def test_a_resume_applies_the_settings_it_is_given_and_says_which_changed(corpus, tmp_path, make_config, capsys):
    """Resumed with another lr and weight decay: the steps after the resume follow them, as the
    checkpoint records (before, the restored optimizer and scheduler kept the run's own lr and
    weight decay while config.json recorded the new ones)."""
    run = tmp_path / "run"
    train(make_config(corpus, run, lr=2e-3, weight_decay=0.1), stop_at_step=20)
    capsys.readouterr()
    cfg = make_config(corpus, run, lr=5e-4, weight_decay=0.5)
    train(cfg)
    assert "resuming with lr=0.0005 (was 0.002), weight_decay=0.5 (was 0.1)" in capsys.readouterr().out
    metrics = _metrics(run)
    for step in (21, 30, 40):  # the lr a record shows is the one its step took
        assert math.isclose(metrics[step]["lr"], 5e-4 * lr_factor(step - 1, cfg), rel_tol=1e-6), step
    saved = json.loads((run / "checkpoints" / "step_0000040" / "config.json").read_text())["train"]
    assert (saved["lr"], saved["weight_decay"]) == (5e-4, 0.5)
    state = torch.load(run / "checkpoints" / "step_0000040" / "optimizer.pt", weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.5, 0.0]


def test_same_seed_same_run_other_seed_other_run(corpus, tmp_path, make_config):
    losses = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(make_config(corpus, tmp_path / name, seed=seed, max_steps=5, checkpoint_interval=5,
                                eval_interval=5))
        losses.append([r["loss"] for r in _metrics(tmp_path / name).values()])
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_lr_schedule_warms_up_then_decays_to_min(corpus, tmp_path, make_config):
    cfg = make_config(corpus, tmp_path, max_steps=100, warmup_steps=10).validate()
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(cfg.min_lr_ratio, abs=1e-3)


def test_global_batch_is_split_across_ranks():
    tokens = np.arange(1000, dtype=np.uint16)
    x_all, y_all = get_batch(tokens, 16, 4, seed=3, step=5, micro=0, rank=0, world_size=1)
    x_big, _ = get_batch(tokens, 16, 8, seed=3, step=5, micro=0, rank=0, world_size=1)
    x0, _ = get_batch(tokens, 16, 4, seed=3, step=5, micro=0, rank=0, world_size=2)
    x1, _ = get_batch(tokens, 16, 4, seed=3, step=5, micro=0, rank=1, world_size=2)
    torch.testing.assert_close(torch.cat([x0, x1]), x_big)
    torch.testing.assert_close(y_all[:, :-1], x_all[:, 1:])


def test_bf16_autocast_and_grad_accumulation_train(corpus, tmp_path, make_config):
    run = tmp_path / "bf16"
    train(make_config(corpus, run, max_steps=10, grad_accum=2, bf16=True, grad_checkpointing=True,
                            eval_interval=10, checkpoint_interval=10))
    metrics = _metrics(run)
    assert metrics[10]["loss"] < metrics[1]["loss"]
    assert math.isfinite(metrics[10]["val_loss"])


def test_evaluation_runs_without_gradients():
    """evaluate_tokens scores under no_grad (a validation pass must not build an autograd graph
    over its batches); perplexity_of past exp's range is inf."""
    from graphopt.train.trainer import evaluate_tokens, perplexity_of

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 16)

        def forward(self, ids):
            seen.append(torch.is_grad_enabled())
            return self.emb(ids)

    nll, count = evaluate_tokens(Probe(), np.arange(33) % 16, 8)
    assert seen and not any(seen) and count == 32 and nll > 0
    assert perplexity_of(800.0) == math.inf and perplexity_of(0.0) == 1.0
