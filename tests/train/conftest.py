"""Shared fixtures: a small synthetic corpus, its prepared form, and one tiny trained run.

The corpus is generated from a fixed seed (not read from the machine) so every number the
tests compare is the same everywhere.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

TINY_MODEL = dict(arch="llama", vocab_size=384, max_seq_len=32, dim=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, mlp_hidden=64)

_NAMES = ["alpha", "beta", "gamma", "delta", "value", "count", "items", "total", "index", "name"]


def _document(rng: random.Random, i: int) -> str:
    lines = [f'"""Module {i}: helpers for {rng.choice(_NAMES)}."""', "", "import os", ""]
    for f in range(rng.randint(3, 6)):
        a, b = rng.sample(_NAMES, 2)
        lines += [f"def {a}_{b}_{f}({a}, {b}=None):",
                  f'    """Return the {a} of {b}."""',
                  f"    if {b} is None:",
                  f"        {b} = {rng.randint(0, 99)}",
                  f"    for {rng.choice('ijk')} in range(len({a})):",
                  f"        {b} += {a}[{rng.choice('ijk')}] * {rng.randint(1, 9)}",
                  f"    return {b}", ""]
    return "\n".join(lines) + "\n"


def write_corpus(folder: Path, n_docs: int = 160, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sub = folder / f"pkg{i % 4}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i:03d}.py").write_text(_document(rng, i))
    # Exact duplicate and noise the preparation must drop.
    (folder / "pkg0" / "copy_of_000.py").write_text((folder / "pkg0" / "mod_000.py").read_text())
    (folder / "pkg1" / "short.py").write_text("x = 1\n")
    (folder / "README.bin").write_bytes(b"\x00\x01binary")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_train_config(corpus: Path, out: Path, **over):
    from graphopt.train.trainer import TrainConfig

    options = dict(data=str(corpus), out=str(out), model=dict(TINY_MODEL), batch_size=8,
                   max_steps=40, lr=3e-3, warmup_steps=5, eval_interval=10, eval_tokens=2048,
                   checkpoint_interval=10, log_interval=1000, seed=7, threads=1)
    options.update(over)
    return TrainConfig(**options)


@pytest.fixture(scope="session")
def corpus_writer():
    """`corpus_writer(folder, n_docs, seed)`: writes a synthetic corpus (see write_corpus)."""
    return write_corpus


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def make_config():
    """`make_config(corpus, out, **overrides)`: a TrainConfig for the tiny test model."""
    return tiny_train_config


@pytest.fixture(scope="session")
def tiny_run(corpus, tmp_path_factory) -> Path:
    """A tiny model trained for 150 steps; returns the run folder."""
    from graphopt.train.trainer import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny_train_config(corpus, out, max_steps=150, eval_interval=50, checkpoint_interval=50))
    return out


def _check_run_folder(run: Path, extra_files: tuple[str, ...] = ()) -> None:
    """What a kill may leave in a run folder: complete checkpoints only (each with
    `extra_files` beside the usual ones), `latest` naming one of them, and metrics whose every
    line but the last is whole."""
    import json

    from graphopt.train import load_model

    ckpts = run / "checkpoints"
    if not ckpts.exists():
        return
    files = sorted(["config.json", "model.safetensors", "optimizer.pt", "tokenizer.json", "val.txt", *extra_files])
    for folder in ckpts.glob("step_*"):
        assert sorted(p.name for p in folder.iterdir()) == files, folder
        assert json.loads((folder / "config.json").read_text())["step"] == int(folder.name[5:])
    latest = ckpts / "latest"
    if latest.exists():
        load_model(ckpts / latest.read_text().strip())
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    for line in lines[:-1]:
        json.loads(line)


@pytest.fixture(scope="session")
def check_run_folder():
    """`check_run_folder(run, extra_files=())`: asserts what a kill may leave (see above)."""
    return _check_run_folder
