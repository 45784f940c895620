"""The backend protocol for TVM: `check_target`, `save` (lower, build, write the artifact)
and `Executable` (load it and run it on numpy inputs)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph

NAME = "tvm"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"
_INSTALL = "pip install 'graphopt[tvm]'"


def _import_tvm():
    try:
        import tvm
    except ImportError:
        raise UserError(f"the tvm backend needs apache-tvm, which is not installed: {_INSTALL}") from None
    return tvm


def check_target(target: str) -> None:
    """A target this backend can build for: `cpu`, or `cuda` (built without a GPU too;
    loading a cuda artifact needs one, see `Executable`)."""
    if target not in ("cpu", "cuda"):
        raise UserError(f"unknown target {target!r} for tvm (expected cpu or cuda)")
    tvm = _import_tvm()
    if target == "cuda":
        from graphopt.backends.tvm.build import cuda_compiler

        if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
            raise UserError("this apache-tvm was built without CUDA code generation; the cuda target needs one with it")
        if cuda_compiler() is None:
            raise UserError("the cuda target needs nvcc (the CUDA toolkit) or NVRTC (pip install cuda-bindings)")


def save(graph: Graph, outdir: Path, target: str, options: dict | None = None) -> dict:
    """Lower `graph` to Relax, build it for `target`, write the library and the weights into
    `outdir`; returns the manifest fields (the TVM target with its mcpu or arch, parameter
    order, compile time). Options: `num_cores`, `cuda_arch` (default: this machine's)."""
    from graphopt.backends.tvm import load_rules
    from graphopt.backends.tvm.build import build, target_spec
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.weights_file import write_tensors

    check_target(target)
    load_rules()
    options = dict(options or {})
    t0 = time.perf_counter()
    g = prepare(graph)
    mod, param_names = lower_graph(g)
    t1 = time.perf_counter()
    spec = target_spec(target, options)
    executable = build(mod, spec)
    t2 = time.perf_counter()
    outdir = Path(outdir)
    executable.export_library(str(outdir / LIBRARY))
    write_tensors(outdir / WEIGHTS, {name: np.ascontiguousarray(g.initializers[name].const_value)
                                     for name in param_names})
    return {
        "files": [LIBRARY, WEIGHTS],
        "model": LIBRARY,
        "weights": WEIGHTS,
        "tvm_target": spec,
        "params": param_names,
        "lower_seconds": round(t1 - t0, 3),
        "compile_seconds": round(t2 - t1, 3),
        "tuning_seconds": 0.0,
    }


class Executable:
    """A Relax VM over a saved artifact folder. Refuses (one line) an artifact built for
    another CPU than this one, or a cuda artifact where there is no (suitable) GPU."""

    def __init__(self, outdir: Path, manifest: dict, threads: int | None = None):
        tvm = _import_tvm()
        from tvm import relax

        from graphopt.backends.tvm.build import system_cpu
        from graphopt.weights_file import read_tensors

        outdir = Path(outdir)
        spec = manifest.get("tvm_target") or {}
        kind = spec.get("kind")
        if kind == "llvm":
            here = system_cpu()
            if spec.get("mcpu") != here:
                raise UserError(f"{outdir}: built for CPU {spec.get('mcpu')!r}, but this machine's is {here!r}; "
                                "rebuild it here with graphopt optimize --backend tvm")
            self.device = tvm.cpu()
        elif kind == "cuda":
            self.device = tvm.cuda(0)
            if not self.device.exist:
                raise UserError(f"{outdir}: built for cuda ({spec.get('arch')}), but this machine has no CUDA GPU")
            have = f"sm_{self.device.compute_version.replace('.', '')}"
            if spec.get("arch") != have:
                raise UserError(f"{outdir}: built for {spec.get('arch')}, but this GPU is {have}; rebuild it here")
        else:
            raise UserError(f"{outdir}: the manifest has no valid tvm_target")
        lib_path = outdir / manifest.get("model", LIBRARY)
        weights_path = outdir / manifest.get("weights", WEIGHTS)
        for p in (lib_path, weights_path):
            if not p.is_file():
                raise UserError(f"{outdir}: the manifest names {p.name!r}, which is missing")
        if threads and kind == "llvm":
            # (affinity mode "big cores", n threads); 0 would mean all cores.
            tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.device)
        weights = read_tensors(weights_path)
        names = manifest.get("params", [])
        missing = [n for n in names if n not in weights]
        if missing:
            raise UserError(f"{weights_path}: weight {missing[0]!r} is missing")
        params = [tvm.runtime.tensor(np.ascontiguousarray(weights[n]), device=self.device) for n in names]
        del weights
        if params and self.vm.module.implements_function("main_transform_params"):
            # Weight-only work that lowering put in main (a transpose, a cast) runs once, here.
            params = list(self.vm["main_transform_params"](params))
        self.params = params
        self.output_names = [o["name"] for o in manifest["signature"]["outputs"]]
        self.input_names = [i["name"] for i in manifest["signature"]["inputs"]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        ins = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), device=self.device) for n in self.input_names]
        outs = self.vm["main"](*ins, *self.params)
        return {name: out.numpy() for name, out in zip(self.output_names, outs)}


def versions() -> dict[str, str]:
    tvm = _import_tvm()
    import tvm_ffi

    return {"apache-tvm": tvm.__version__, "apache-tvm-ffi": getattr(tvm_ffi, "__version__", "?")}
