"""Targets and the Relax -> machine code pipeline.

CPU: `{"kind": "llvm", "mcpu": <this machine's CPU>, "num-cores": N}` (TVM 0.27 rejects
`"llvm -mcpu=..."` strings). `tvm.compile` alone does not fuse, so the pipeline is the
"zero" pipeline (legalize, fold constants, fuse), then schedules -- dlight's CPU rules for
GEMV and reductions and graphopt's own CPU rules (`schedules.py`) -- then TVM's default
build.

CUDA: `{"kind": "cuda", "arch": "sm_XX"}` with an LLVM host; dlight's GPU rules (Matmul,
GEMV, Reduction, GeneralReduction, Fallback) schedule every kernel. The CUDA source goes
through NVRTC (`cuda-bindings`) when it is installed, else through `nvcc`.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import shutil

from graphopt.errors import UserError
from graphopt.backends.tvm import schedules, tuning

DEFAULT_CUDA_ARCH = "sm_80"  # when no GPU is here to ask (cross-compiling)


def system_cpu() -> str:
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def cpu_target_spec(num_cores: int | None = None) -> dict:
    return {"kind": "llvm", "mcpu": system_cpu(), "num-cores": int(num_cores or os.cpu_count() or 1)}


def cuda_target_spec(arch: str | None = None) -> dict:
    import tvm

    if arch is None:
        dev = tvm.cuda(0)
        arch = f"sm_{dev.compute_version.replace('.', '')}" if dev.exist else DEFAULT_CUDA_ARCH
    return {"kind": "cuda", "arch": arch, "host": cpu_target_spec()}


def target_spec(target: str, options: dict) -> dict:
    if target == "cpu":
        return cpu_target_spec(options.get("num_cores"))
    return cuda_target_spec(options.get("cuda_arch"))


def cuda_compiler() -> str | None:
    """How TVM will compile CUDA source here: "nvrtc", "nvcc", or None (neither)."""
    try:
        import cuda.bindings.nvrtc  # noqa: F401

        return "nvrtc"
    except ImportError:
        pass
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "nvcc"
    return None


@contextlib.contextmanager
def _cuda_compile_mode(mode: str):
    # TVM's CUDA callback reads the compiler from this variable at build time.
    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old


_tuned: contextvars.ContextVar = contextvars.ContextVar("graphopt_tvm_tuned", default=None)


@contextlib.contextmanager
def tuned(record: "tuning.Tuned"):
    """Builds inside this block (CPU) apply the tuning database of `record`: its buckets get
    their own static copy of `main` whose kernels come from the database where it has them
    (see graphopt.backends.tvm.tuning); `record.kernels` then says which did."""
    token = _tuned.set(record)
    try:
        yield record
    finally:
        _tuned.reset(token)


def optimize_module(mod, target):
    """Relax-level passes and schedules for `target`; returns the module ready to build."""
    from tvm import relax
    from tvm.s_tir import dlight as dl

    record = _tuned.get()
    with target:
        if record is not None and target.kind.name == "llvm":
            mod = tuning.with_buckets(mod, record.buckets)
            with tuning.open_database(record.folder):  # the zero pipeline applies the current database
                mod = relax.get_pipeline("zero")(mod)
            record.kernels = tuning.kernel_sources(mod)
        else:
            mod = relax.get_pipeline("zero")(mod)
        if target.kind.name == "cuda":
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        else:
            mod = dl.ApplyDefaultSchedule(*schedules.cpu_rules())(mod)
    return mod


def build(mod, spec: dict):
    """Compile a lowered Relax module for the target `spec`; returns the VM executable."""
    import tvm

    target = tvm.target.Target(spec)
    mod = optimize_module(mod, target)
    if target.kind.name == "cuda":
        mode = cuda_compiler()
        if mode is None:
            raise UserError("the cuda target needs nvcc (the CUDA toolkit) or NVRTC (pip install cuda-bindings)")
        with _cuda_compile_mode(mode):
            return tvm.compile(mod, target=target)
    return tvm.compile(mod, target=target)
