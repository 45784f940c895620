"""Peak memory of a cell, measured in a fresh process.

In the process that times every cell, memory one cell frees is reused by the next and the
runtimes' arenas are shared, so no number read there belongs to one cell. Here each cell is
loaded again in a child process of its own (`python -m graphopt.compare.memory SPEC FEEDS`):
it imports the cell's runtime and reads the feeds, notes its peak resident set (VmHWM), then
loads the cell, runs it once on the largest shape's feeds, and notes the peak again.

    peak_bytes            the child's peak resident set: interpreter, runtime, model and one run
    model_and_run_bytes   what loading the cell and one run added to the peak of a process
                          that had only imported its runtime (weights, arenas, activations)

A spec (`Runner.memory_spec`) is {"kind": "ort", "path", "settings"}, {"kind": "artifact",
"path", "threads"} or {"kind": "torch", "source", "threads"}.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

HOW = ("a fresh process per cell: peak resident set (VmHWM) after loading the cell and running it once at the "
       "largest shape; model_and_run_bytes is that peak minus the peak after only importing the cell's runtime")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(spec: dict, feeds_path: Path, timeout: float = 600.0) -> dict:
    """Run the child for `spec` on the feeds saved at `feeds_path` (np.savez); its record,
    or {"error": ...} where it failed."""
    spec_path = Path(str(feeds_path) + ".spec.json")
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run([sys.executable, "-m", "graphopt.compare.memory", str(spec_path), str(feeds_path)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    except subprocess.TimeoutExpired:
        return {"error": f"the measuring process ran past {timeout:g} s"}
    finally:
        spec_path.unlink(missing_ok=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": f"the measuring process failed: {err[-1][:300] if err else proc.returncode}"}
    record = json.loads(lines[-1])
    record["how"] = HOW
    return record


def _load(spec: dict):
    """Import the runtime (the part counted as the baseline) and return a loader of the cell."""
    kind = spec["kind"]
    if kind == "ort":
        from graphopt.compare.variants import ort_session_from

        def load():
            sess = ort_session_from(Path(spec["path"]), spec["settings"])
            return lambda feeds: sess.run(None, feeds)
        return load
    if kind == "torch":
        import torch

        from graphopt.compare.reference import load_reference

        torch.set_num_threads(int(spec["threads"]))
        return lambda: load_reference(spec["source"])
    if kind == "artifact":
        from graphopt.artifact import load as load_artifact
        from graphopt.manifest import read_manifest

        if read_manifest(spec["path"]).get("backend") == "tvm":
            import tvm  # noqa: F401 - the runtime is part of the baseline

        return lambda: load_artifact(spec["path"], threads=spec.get("threads")).run
    raise ValueError(f"unknown memory spec kind {kind!r}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    with np.load(argv[1]) as data:
        feeds = {k: data[k] for k in data.files}
    load = _load(spec)
    before = peak_rss_bytes()
    run = load()
    run(feeds)
    after = peak_rss_bytes()
    print(json.dumps({"peak_bytes": after, "runtime_bytes": before, "model_and_run_bytes": max(0, after - before)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
