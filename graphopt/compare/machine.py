"""The machine record of a compare report: CPU model, cores, ISA flags, a measured read
bandwidth, and the versions of the libraries that did the work."""
from __future__ import annotations

import os
import platform
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


def read_bandwidth(buffer_bytes: int | None = None, passes: int = 3) -> dict:
    """Streaming read bandwidth (GB/s, best of `passes`): numpy sums a float64 buffer of
    twice the last-level cache (256 MiB to 1 GiB), so the data comes from memory."""
    if buffer_bytes is None:
        l3 = _cache_bytes(3) or (32 << 20)
        buffer_bytes = int(min(max(2 * l3, 256 << 20), 1 << 30))
    buf = np.ones(buffer_bytes // 8, dtype=np.float64)
    buf.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    del buf
    return {"read_gb_s": round(buffer_bytes / best / 1e9, 2), "buffer_bytes": buffer_bytes,
            "method": f"numpy float64 sum over {buffer_bytes >> 20} MiB, best of {passes}"}


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
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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
