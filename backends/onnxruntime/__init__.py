"""The ONNX Runtime backend: lower the IR to an ONNX model and run it with ORT.

Lowering today: every graphopt-domain op is replaced by its decomposition into core ops
(the ORT contrib-op lowerings come with the fusion work). Targets: `cpu`
(CPUExecutionProvider) and `cuda` (CUDAExecutionProvider, from `onnxruntime-gpu`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph

NAME = "onnxruntime"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def lower(graph: Graph, target: str) -> Graph:
    """A copy of `graph` with only ops ORT can run on `target`."""
    from graphopt.registry import decompose_graphopt_ops

    g = graph.copy()
    decompose_graphopt_ops(g)
    g.opset.pop(GRAPHOPT_DOMAIN, None)
    return g


def check_target(target: str) -> None:
    import onnxruntime as ort

    if target not in PROVIDERS:
        raise UserError(f"unknown target {target!r} for onnxruntime (expected cpu or cuda)")
    if PROVIDERS[target] not in ort.get_available_providers():
        raise UserError(f"target {target!r} needs {PROVIDERS[target]}, which this onnxruntime "
                        f"({ort.__version__}) does not have; for cuda install onnxruntime-gpu "
                        "in place of onnxruntime")


def save(graph: Graph, outdir: Path, target: str, options: dict | None = None) -> dict:
    """Write `model.onnx` (+ external data when large) into outdir; returns manifest fields."""
    from graphopt.onnx_io import save_onnx

    lowered = lower(graph, target)
    files = save_onnx(lowered, outdir / "model.onnx")
    return {"files": [f.name for f in files], "model": "model.onnx"}


class Executable:
    """An ONNX Runtime session over a saved artifact folder."""

    def __init__(self, outdir: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        target = manifest.get("target", "cpu")
        check_target(target)
        model_path = Path(outdir) / manifest.get("model", "model.onnx")
        if not model_path.is_file():
            raise UserError(f"{outdir}: the manifest names {model_path.name!r}, which is missing")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), so, providers=[PROVIDERS[target]])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
