"""The machine record of a compare report: CPU model, cores, ISA flags, a measured read
bandwidth, and the versions of the libraries that did the work."""
from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata

import numpy as np

# ISA extensions that decide which kernels the runtimes pick (x86 and Arm names).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")
LIBRARIES = ("numpy", "onnx", "onnxruntime", "torch", "transformers", "apache-tvm", "rich")


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # psutil is optional
        return None


def _cache_bytes(level: int = 3) -> int | None:
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            with open(f"{base}/{entry}/level") as f:
                if int(f.read()) != level:
                    continue
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ReadProbe:
    """Streaming read bandwidth with `threads` threads (every usable core by default; one thread
    cannot draw what a runtime's threads do), ready to sample again and again: the buffers and
    threads are made once, so a sample between timing rounds costs a few passes over
    `buffer_bytes` and nothing else. Each thread takes the maximum of its own float64 buffer
    with numpy (which releases the GIL), all started together; a pass reads `buffer_bytes` in all
    (four times the last-level cache, 256 MiB to 2 GiB, so the data comes from memory, not the
    cache) in the wall time from the common start to the slowest thread's end. Use as a context
    manager.

    Why the maximum: a probe must read as fast as the memory lets one core read, or the "bound"
    it gives is no bound. numpy's float64 sum (pairwise, a chain of dependent adds) is limited by
    its arithmetic: 11.0 GB/s a core against 17.2-17.4 for the maximum over float64, float32,
    int32, int16 or uint8 alike (so the maximum is limited by the memory, not by the element
    width), on this project's 2-core machine, 1.2 GB buffers, idle; with the sum, ORT's own
    fp32 GPT-2 decode step read faster than "the bound" (0.74x)."""

    def __init__(self, buffer_bytes: int | None = None, threads: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = threads or usable_cores()
        if buffer_bytes is None:
            l3 = _cache_bytes(3) or (32 << 20)
            buffer_bytes = int(min(max(4 * l3, 256 << 20), 2 << 30))
        self.per_thread = max(buffer_bytes // self.threads // 8 * 8, 8)
        self.buffers = [np.ones(self.per_thread // 8, dtype=np.float64) for _ in range(self.threads)]
        self.pool = ThreadPoolExecutor(self.threads)
        self._start = threading.Barrier(self.threads)
        list(self.pool.map(np.max, self.buffers))  # touch every page once before timing

    def _read(self, buf: np.ndarray) -> tuple[float, float]:
        self._start.wait()
        t = time.perf_counter()
        buf.max()
        return t, time.perf_counter()

    def sample(self, passes: int = 3) -> float:
        """GB/s, the best of `passes` passes."""
        best = float("inf")
        for _ in range(passes):
            spans = list(self.pool.map(self._read, self.buffers))
            best = min(best, max(end for _, end in spans) - min(begin for begin, _ in spans))
        return round(self.per_thread * self.threads / max(best, 1e-9) / 1e9, 2)

    def method(self, passes: int = 3) -> str:
        total = self.per_thread * self.threads
        return (f"numpy float64 max on {self.threads} thread(s) at once, each over its own "
                f"{self.per_thread >> 20} MiB ({total >> 20} MiB in all), bytes / wall time to the slowest "
                f"thread's end, best of {passes}")

    def close(self) -> None:
        self.pool.shutdown()
        self.buffers = []

    def __enter__(self) -> "ReadProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_bandwidth(buffer_bytes: int | None = None, passes: int = 3, threads: int | None = None) -> dict:
    """One reading of ReadProbe's streaming read bandwidth (GB/s, best of `passes`)."""
    with ReadProbe(buffer_bytes, threads) as probe:
        gb_s = probe.sample(passes)
        return {"read_gb_s": gb_s, "buffer_bytes": probe.per_thread * probe.threads, "threads": probe.threads,
                "method": probe.method(passes)}


def bound_rounds(runs: dict, bytes_read: dict, *, rounds: int, steps: int, threads: int | None = None,
                 buffer_bytes: int | None = None, settle_s: float = 0.05, warmup: int = 2) -> dict:
    """Time `runs` (name -> zero-argument callable, one decode step) against the memory-bandwidth
    bound of the bytes each reads (`bytes_read`, name -> bytes; a name without one is timed
    only), with the bandwidth measured in the same minute: this machine's read bandwidth moves
    from minute to minute (33-65 GB/s within one idle hour here), so one reading taken before
    the timing can flatter or wrong a ratio. Each round: one bandwidth sample (ReadProbe,
    `threads` threads, from memory), then per run a pause of `settle_s` (an ORT session's
    spinning threads from the run before must not share the cores), `warmup` untimed steps and
    `steps` timed ones; one more sample closes the last round. Per round and run, ratio = the
    block's median step / (bytes / the higher of the samples just before and just after the
    round): the stricter bound, never one a slow reading flatters. The sample waits `settle_s`
    too: taken right after a run, an ORT session's spinning worker shared the cores with the
    probe and read 26.5 GB/s against 31.9 after 50 ms (median of 8, idle), a bound that
    flattered every ratio (a fp32 GPT-2 step came out at 0.79-0.95x "its bound"). Reported: the median ratio
    and its spread over the rounds, the step times over all rounds (p50, min), and the samples.
    On a loaded machine the probe and the steps get different shares of the memory, and the
    ratios mean little (a check run at load 4 spread 0.8-2.9): run it idle."""
    import statistics

    times: dict[str, list[float]] = {name: [] for name in runs}
    medians: dict[str, list[float]] = {name: [] for name in runs}
    samples = []
    with ReadProbe(buffer_bytes, threads) as probe:
        for fn in runs.values():
            fn()
        for _ in range(rounds):
            time.sleep(settle_s)  # as before each block: a spinning worker of the last run reads too
            samples.append(probe.sample())
            for name, fn in runs.items():
                time.sleep(settle_s)
                for _ in range(warmup):
                    fn()
                block = []
                for _ in range(steps):
                    t = time.perf_counter()
                    fn()
                    block.append(time.perf_counter() - t)
                times[name] += block
                medians[name].append(statistics.median(block))
        time.sleep(settle_s)
        samples.append(probe.sample())
        method = (f"{rounds} rounds; each: a {settle_s * 1e3:.0f} ms pause and one read-bandwidth sample "
                  f"({probe.method()}), then per variant a "
                  f"{settle_s * 1e3:.0f} ms pause, {warmup} untimed and {steps} timed steps; one more sample after "
                  "the last round; ratio to the bound = the block's median step / (bytes read / the higher of the "
                  "samples just before and just after its round), median over rounds")
    ratios = {name: [m / (bytes_read[name] / (max(samples[i], samples[i + 1]) * 1e9)) for i, m in enumerate(ms)]
              for name, ms in medians.items() if bytes_read.get(name)}

    def spread(v: list[float]) -> dict:
        q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
        return {"median": round(statistics.median(v), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
                "min": round(min(v), 3), "max": round(max(v), 3)}

    return {"method": method, "read_gb_s": spread(samples), "read_gb_s_samples": samples,
            "timing": {name: {"p50_ms": round(statistics.median(v) * 1e3, 3), "min_ms": round(min(v) * 1e3, 3),
                              "runs": len(v)} for name, v in times.items()},
            "bytes_read": {name: bytes_read[name] for name in ratios},
            "bound_ms_at_median_bandwidth": {name: round(bytes_read[name] / (statistics.median(samples) * 1e9) * 1e3, 3)
                                             for name in ratios},
            "ratio_to_bound": {name: spread(v) for name, v in ratios.items()}}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("graphopt",) + LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_record(*, measure_bandwidth: bool = True) -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    record = {
        "cpu": info.get("model name") or info.get("Model") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "usable_cores": usable_cores(),
        "l3_cache_bytes": _cache_bytes(3),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "os": f"{platform.system()} {platform.release()}",
    }
    if measure_bandwidth:
        record["memory_bandwidth"] = read_bandwidth()
    try:
        import psutil

        record["memory_bytes"] = psutil.virtual_memory().total
        record["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except Exception:
        pass
    return record
