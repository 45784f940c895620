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


def read_bandwidth(buffer_bytes: int | None = None, passes: int = 3, threads: int | None = None) -> dict:
    """Streaming read bandwidth (GB/s, best of `passes`) with `threads` threads (every usable
    core by default; one thread cannot draw what a runtime's threads do). Each thread sums its
    own float64 buffer with numpy (which releases the GIL), all started together; a pass reads
    `buffer_bytes` in all (twice the last-level cache, 256 MiB to 1 GiB, so the data comes from
    memory) in the wall time from the common start to the slowest thread's end."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or usable_cores()
    if buffer_bytes is None:
        l3 = _cache_bytes(3) or (32 << 20)
        buffer_bytes = int(min(max(2 * l3, 256 << 20), 1 << 30))
    per_thread = max(buffer_bytes // threads // 8 * 8, 8)
    buffers = [np.ones(per_thread // 8, dtype=np.float64) for _ in range(threads)]
    start = threading.Barrier(threads)

    def read(buf: np.ndarray) -> tuple[float, float]:
        start.wait()
        t = time.perf_counter()
        buf.sum()
        return t, time.perf_counter()

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, buffers))  # touch every page once before timing
        for _ in range(passes):
            spans = list(pool.map(read, buffers))
            best = min(best, max(end for _, end in spans) - min(begin for begin, _ in spans))
    total = per_thread * threads
    del buffers
    return {"read_gb_s": round(total / max(best, 1e-9) / 1e9, 2), "buffer_bytes": total, "threads": threads,
            "method": f"numpy float64 sum on {threads} thread(s) at once, each over its own "
                      f"{per_thread >> 20} MiB ({total >> 20} MiB in all), bytes / wall time to the slowest "
                      f"thread's end, best of {passes}"}


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
