"""Data parallelism: 2 gloo processes with batch B all-reduce to the gradients of 1 process
with batch 2B. Gradients are compared, not weights after an AdamW step (its sign-like first
update would magnify rounding differences)."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import torch.multiprocessing as mp

from graphopt.train.models import build_model, config_from_dict
from graphopt.train.trainer import forward_backward, get_batch

MODEL = dict(arch="llama", vocab_size=64, max_seq_len=16, dim=32, num_layers=2, num_heads=4,
             num_kv_heads=2, mlp_hidden=48)
BATCH, MICRO_STEPS, STEP, SEED = 3, 2, 11, 5


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)


def _grads(model, world_size: int, rank: int, batch: int) -> torch.Tensor:
    batches = [get_batch(_tokens(), 16, batch, SEED, STEP, m, rank, world_size) for m in range(MICRO_STEPS)]
    forward_backward(model, batches, bf16=False, device_type="cpu")
    params = model.module.parameters() if hasattr(model, "module") else model.parameters()
    return torch.cat([p.grad.flatten() for p in params])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(config_from_dict(MODEL)))
    np.save(os.path.join(out_dir, f"grads_{rank}.npy"), _grads(model, 2, rank, BATCH).numpy())
    torch.distributed.barrier()  # both ranks done with every collective before the group goes
    torch.distributed.destroy_process_group()
    # The gradients are on disk. Leave without the interpreter's teardown: gloo's threads being
    # destroyed at exit aborted a worker about once in seven runs ("terminate called without an
    # active exception", SIGABRT) after its work was done.
    os._exit(0)


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path, free_port):
    mp.spawn(_worker, args=(free_port, str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (np.load(tmp_path / f"grads_{r}.npy") for r in (0, 1))
    torch.manual_seed(0)
    single = _grads(build_model(config_from_dict(MODEL)), 1, 0, 2 * BATCH).numpy()
    assert np.abs(single).max() > 1e-3  # a real gradient, not zeros
    np.testing.assert_array_equal(g0, g1)  # all-reduce left both ranks the same gradient
    np.testing.assert_allclose(g0, single, rtol=1e-4, atol=1e-6)


def test_graphopt_train_under_torchrun_matches_single_process(corpus, tmp_path, free_port):
    """End to end: `torchrun --nproc-per-node 2 -m graphopt train` with batch B against
    `graphopt train` with batch 2B: identical data and init, so step 1 has the same loss."""
    common = ["--data", str(corpus), "--vocab-size", "384", "--seq-len", "32", "--dim", "32",
              "--layers", "2", "--heads", "4", "--kv-heads", "2", "--mlp-hidden", "64",
              "--max-steps", "3", "--eval-interval", "3", "--checkpoint-interval", "3",
              "--eval-tokens", "1024", "--threads", "1", "--preset", "tiny"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port), "-m", "graphopt", "train", *common,
                        "--batch-size", "4", "--out", str(ddp_out)], check=True, env=env, capture_output=True,
                       text=True)
    assert r.stdout.count("checkpoint: ") == 1, r.stdout  # said by rank 0, not once per rank
    subprocess.run([sys.executable, "-m", "graphopt", "train", *common, "--batch-size", "8",
                    "--out", str(single_out)], check=True, env=env, capture_output=True)
    ddp, single = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                   for out in (ddp_out, single_out))
    assert [r["step"] for r in ddp] == [1, 2, 3]
    assert abs(ddp[0]["loss"] - single[0]["loss"]) < 1e-5
    assert abs(ddp[-1]["val_loss"] - single[-1]["val_loss"]) < 1e-2
