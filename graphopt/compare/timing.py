"""Latency measurement: every cell of a shape timed on the same feeds, interleaved.

Each round visits every cell (the starting cell rotates from round to round); at each visit
the cell first runs untimed (once, and for at least `switch_time`) -- the switch from another
runtime, whose idle threads may still be spinning and whose data filled the caches, lands
there -- and then a block of timed runs. Rounds go on until every cell has
at least `min_runs` timed runs and `min_time` seconds of them, so load that drifts during the
measurement hits every cell alike and the ratios between cells stay honest.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass
class TimingSettings:
    warmup: int = 3            # untimed runs per cell before the first round
    min_runs: int = 20         # timed runs per cell, at least
    min_time: float = 1.0      # seconds of timed runs per cell, at least
    block_time: float = 0.05   # a visit's timed runs last about this long
    switch_time: float = 0.01  # untimed runs at each visit last at least this long (and are one run at least)
    max_time: float = 120.0    # stop after this many seconds of timed runs per cell, whatever else


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "runs": int(a.size)}


def time_interleaved(fns: dict[str, Callable[[], object]], settings: TimingSettings,
                     on_round: Callable[[int, dict], None] | None = None) -> tuple[dict[str, list[float]], dict]:
    """Timed samples (ms) per cell and the errors of cells that failed while timed (a cell
    that raises is dropped from later rounds; the others go on)."""
    errors: dict[str, str] = {}
    estimate: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(1, settings.warmup)):
                t = time.perf_counter()
                fn()
                estimate[name] = time.perf_counter() - t
        except Exception as e:  # a cell that cannot run is reported, not fatal
            errors[name] = describe(e)
    live = [n for n in fns if n not in errors]
    block = {n: max(1, min(settings.min_runs, int(settings.block_time / max(estimate[n], 1e-6)))) for n in live}
    samples: dict[str, list[float]] = {n: [] for n in live}
    spent = {n: 0.0 for n in live}
    rnd = 0
    while live:
        order = live[rnd % len(live):] + live[:rnd % len(live)]
        for name in order:
            fn = fns[name]
            try:
                t_switch = time.perf_counter()
                fn()  # the switch: untimed, until the previous cell's idle threads have gone to sleep
                while time.perf_counter() - t_switch < settings.switch_time:
                    fn()
                for _ in range(block[name]):
                    t = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t
                    samples[name].append(dt * 1e3)
                    spent[name] += dt
            except Exception as e:
                errors[name] = describe(e)
        live = [n for n in live if n not in errors and not _done(samples[n], spent[n], settings)]
        rnd += 1
        if on_round is not None:
            on_round(rnd, {n: len(s) for n, s in samples.items()})
    return {n: s for n, s in samples.items() if n not in errors}, errors


def _done(samples: list[float], spent: float, s: TimingSettings) -> bool:
    return (len(samples) >= s.min_runs and spent >= s.min_time) or spent >= s.max_time


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
