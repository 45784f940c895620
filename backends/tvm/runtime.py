"""The backend protocol for TVM: `check_target`, `save` (lower, build, write the artifact)
and `Executable` (load it and run it on numpy inputs)."""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from graphopt.errors import UserError
from graphopt.manifest import artifact_file
from graphopt.ir import Graph, signature
from graphopt.weights_file import read_tensors, write_tensors

from graphopt.backends.tvm import quant_panels, rules_core, rules_graphopt, rules_quant, rules_shapes  # noqa: F401  (register the rules)
from graphopt.backends.tvm.build import build, cuda_compiler, system_cpu, target_spec
from graphopt.backends.tvm.lowering import lower_graph, prepare

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
        if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
            raise UserError("this apache-tvm was built without CUDA code generation; the cuda target needs one with it")
        if cuda_compiler() is None:
            raise UserError("the cuda target needs nvcc (the CUDA toolkit) or NVRTC (pip install cuda-bindings)")


# Backend options (`--backend-option KEY=VALUE`): name -> (what it takes, check).
OPTIONS = {
    "cuda_arch": ("a CUDA architecture such as sm_90 (default: this machine's GPU, else sm_80)",
                  lambda v: v if re.fullmatch(r"sm_\d+[a-z]?", str(v)) else None),
    "num_cores": ("the CPU cores the target records (default: all of them)",
                  lambda v: int(v) if str(v).isdigit() and int(v) > 0 else None),
    "quant_accuracy_level": ("auto (default: 4-bit weights times X rounded to int8, as MatMulNBits' level 4, where "
                             "the CPU has AVX-512 VNNI), 4 (the same), or 0 (fp32 arithmetic)",
                             lambda v: str(v) if str(v) in ("auto", "0", "4") else None),
}


def check_options(options: dict | None) -> dict:
    """The backend options (`--backend-option KEY=VALUE`) as checked values, or a UserError."""
    out = {}
    for name, value in (options or {}).items():
        if name not in OPTIONS:
            raise UserError(f"unknown tvm backend option {name!r} (known: {', '.join(OPTIONS)})")
        checked = OPTIONS[name][1](value)
        if checked is None:
            raise UserError(f"tvm backend option {name}={value!r}: expected {OPTIONS[name][0]}")
        out[name] = checked
    return out


def lowering_flags(target: str, options: dict) -> dict:
    """How a build for `target` lowers (`lower_graph`'s flags): on a CPU the weights pre-packed
    in panels with the hand-written CPU kernels, and int8 activations for 4-bit weights where
    the CPU has VNNI, tuned or not (tuning extracts its kernels from the same lowering)."""
    pack = target == "cpu"
    int8 = pack and options.get("quant_accuracy_level", "auto") != "0" and quant_panels.vnni_available()
    return {"pack_weights": pack, "int8_activations": int8}


def matmulnbits_level(target: str, options: dict | None, bits: int | None) -> str:
    """The MatMulNBits accuracy_level nearest the arithmetic a build runs (the accuracy guard,
    which measures on ORT, measures at it): 4-bit weights times X rounded to int8 per block
    where `lowering_flags` takes int8 activations ("4"), float compute otherwise ("0")."""
    return "4" if bits == 4 and lowering_flags(target, dict(options or {}))["int8_activations"] else "0"


def _build(graph: Graph, target: str, options: dict | None):
    """Lower and build: (TVM executable, weight names, weight arrays, manifest fields)."""
    check_target(target)
    options = check_options(options)
    t0 = time.perf_counter()
    flags = lowering_flags(target, options)
    g = prepare(graph, flags["pack_weights"])
    mod, params = lower_graph(g, **flags)
    t1 = time.perf_counter()
    spec = target_spec(target, options)
    executable = build(mod, spec)
    t2 = time.perf_counter()
    param_names = [name for name, _ in params]
    weights = [np.ascontiguousarray(a) for _, a in params]
    fields = {"tvm_target": spec, "params": param_names, "lower_seconds": round(t1 - t0, 3),
              "compile_seconds": round(t2 - t1, 3)}  # no tuning runs yet: no tuning time is reported
    if any(n.op_type in ("QuantLinear", "QuantMoE") for n in g.nodes):  # the arithmetic the quantized layers were lowered to
        int8 = any(gv.name_hint.startswith("quantize_rows") for gv in mod.get_global_vars())
        fields["quant_accuracy_level"] = 4 if int8 else 0
    return executable, param_names, weights, fields


def save(graph: Graph, outdir: Path, target: str, options: dict | None = None) -> dict:
    """Lower `graph` to Relax, build it for `target`, write the library and the weights into
    `outdir`; returns the manifest fields (the TVM target with its mcpu or arch, parameter
    order, lowering and compile times). Options: `num_cores`, `cuda_arch` (default: this
    machine's GPU, else sm_80)."""
    executable, names, weights, fields = _build(graph, target, options)
    outdir = Path(outdir)
    executable.export_library(str(outdir / LIBRARY))
    write_tensors(outdir / WEIGHTS, dict(zip(names, weights)))
    return {"files": [LIBRARY, WEIGHTS], "model": LIBRARY, "weights": WEIGHTS, **fields}


def compile_graph(graph: Graph, target: str = "cpu", options: dict | None = None) -> "Compiled":
    """Build `graph` in memory (no artifact folder): for tests and benchmarks."""
    executable, names, weights, fields = _build(graph, target, options)
    sig = signature(graph)
    return Compiled(executable, weights, fields["tvm_target"], [e["name"] for e in sig["inputs"]],
                    [e["name"] for e in sig["outputs"]], fields)


def _device_for(spec: dict, where: str):
    """The device a target runs on here; refuses another CPU or a missing/different GPU."""
    import tvm

    kind = spec.get("kind")
    if kind == "llvm":
        here = system_cpu()
        if spec.get("mcpu") != here:
            raise UserError(f"{where}: built for CPU {spec.get('mcpu')!r}, but this machine's is {here!r}; "
                            "rebuild it here with graphopt optimize --backend tvm")
        return tvm.cpu()
    if kind == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise UserError(f"{where}: built for cuda ({spec.get('arch')}), but this machine has no CUDA GPU")
        if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
            raise UserError(f"{where}: this apache-tvm runtime cannot load CUDA code (the PyPI wheels compile "
                            "for cuda but run only on the CPU); use a TVM built with CUDA")
        have = f"sm_{dev.compute_version.replace('.', '')}"
        if spec.get("arch") != have:
            raise UserError(f"{where}: built for {spec.get('arch')}, but this GPU is {have}; rebuild it here")
        return dev
    raise UserError(f"{where}: the manifest has no valid tvm_target")


_pool = threading.local()  # TVM's thread pool is per calling thread: the size set in each


def use_cpu_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool of the calling thread: `threads` workers (default, and at
    most: the cores this process may run on), sharing those cores; returns the size.

    Left alone, TVM sizes its pool at half of `hardware_concurrency()` on x86 ("ignore
    hyper-threading") unless TVM_NUM_THREADS or OMP_NUM_THREADS is set: ONE thread on a
    2-core machine, whatever the schedules mark parallel. Its default affinity mode also pins
    the calling thread to core 0, and every thread started from it afterwards (an ONNX
    Runtime session's pool included) inherits that mask. Given the cores explicitly
    (`config_threadpool` mode -3, "share all cores"), TVM resizes the pool to them and pins
    nothing beyond the process's own mask."""
    if hasattr(_pool, "size") and _pool.requested == threads:
        return _pool.size
    import tvm

    requested = threads
    threads = threads or int(os.environ.get("TVM_NUM_THREADS") or 0)  # TVM's own override, if a user set it
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    size = min(int(threads or len(cores)), len(cores))
    tvm.get_global_func("runtime.config_threadpool")(-3, size, [str(c) for c in cores])
    _pool.requested, _pool.size = requested, size
    return size


_ALIGN = 64  # bytes: TVM's kernels assume buffers aligned to this (runtime::kAllocAlignment)


def to_tensor(array: np.ndarray, device):
    """`array` copied into a TVM tensor on `device`. On a CPU the copy is made by numpy into a
    64-byte-aligned buffer that TVM then wraps through DLPack: about 1.5 us for a 32 KB cache,
    where `tvm.runtime.tensor` (allocate through the FFI, then `copyfrom`) takes about 16 us,
    and a decode step of the shipped model feeds 14 arrays (0.2 ms of a 0.5 ms step). A copy,
    never the caller's memory: a static cache is written in place (rules_cache)."""
    return _aligned_copy(array, device)[0]


def _aligned_copy(array: np.ndarray, device):
    """(a TVM tensor holding a copy of `array`, on a CPU its numpy view, else None)."""
    import tvm

    array = np.asarray(array)
    if device.dlpack_device_type() != 1 or array.nbytes == 0:  # not the CPU, or nothing to align
        return tvm.runtime.tensor(np.ascontiguousarray(array), device=device), None
    raw = np.empty(array.nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    aligned = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    aligned[...] = array
    return tvm.runtime.from_dlpack(aligned), aligned


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    lo_a, lo_b = a.__array_interface__["data"][0], b.__array_interface__["data"][0]
    return lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


def to_numpy(tensor) -> np.ndarray:
    """A TVM output as numpy: on a CPU the tensor's own memory (the VM allocates each output
    afresh and the array keeps it alive), not a copy; elsewhere `.numpy()`."""
    return np.from_dlpack(tensor) if tensor.device.dlpack_device_type() == 1 else tensor.numpy()


class Compiled:
    """A Relax VM with its weights on the device: `run(feeds)` -> outputs by name. On a CPU
    it runs on `threads` threads (default: every core this process may use)."""

    def __init__(self, module, weights: list, spec: dict, input_names: list[str], output_names: list[str],
                 fields: dict | None = None, where: str = "model", threads: int | None = None):
        import tvm
        from tvm import relax

        self.device = _device_for(spec, where)
        self.threads, self.on_cpu = threads, spec.get("kind") == "llvm"
        self.fields = fields or {}
        self.vm = relax.VirtualMachine(module, self.device)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(w), device=self.device) for w in weights]
        self.input_names, self.output_names = input_names, output_names
        self._staging = threading.local()  # per thread: input name -> (shape, dtype, array, tensor)
        self._written_in_place: set[str] = set()  # inputs an output aliases (a static cache)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. On a CPU each feed is copied into an aligned buffer. An input fed
        the same shape and dtype as on the last call is copied into that call's buffer again
        rather than a new one (a step repeated at one shape: -0.08 ms of the shipped model's
        0.6 ms decode step, the copies land in memory already in cache), unless an output
        aliases it (an input the graph writes in place, found on the call that made the buffer):
        such a buffer belongs to the output returned, and that input gets a new one every call."""
        if not self.on_cpu:
            ins = [to_tensor(feeds[n], self.device) for n in self.input_names]
            return {name: to_numpy(out) for name, out in zip(self.output_names, self.vm["main"](*ins, *self.params))}
        use_cpu_threads(self.threads)
        staged = getattr(self._staging, "buffers", None)
        if staged is None:
            staged = self._staging.buffers = {}
        ins, made = [], []
        for name in self.input_names:
            array = np.asarray(feeds[name])
            entry = staged.get(name)
            if entry is not None and entry[2] is not None and entry[0] == array.shape and entry[1] == array.dtype:
                entry[2][...] = array
                ins.append(entry[3])
                continue
            tensor, copy = _aligned_copy(array, self.device)
            ins.append(tensor)
            if name in self._written_in_place or copy is None:
                continue
            if entry is not None and entry[0] == array.shape and entry[1] == array.dtype:
                staged[name] = (array.shape, array.dtype, copy, tensor)  # the shape again: keep this buffer
                made.append(name)
            else:
                staged[name] = (array.shape, array.dtype, None, None)  # a new shape: buffer it if it repeats
        outs = {name: to_numpy(out) for name, out in zip(self.output_names, self.vm["main"](*ins, *self.params))}
        for name in made:
            if any(_overlaps(staged[name][2], out) for out in outs.values()):
                self._written_in_place.add(name)
                del staged[name]
        return outs

    def bound_runner(self, output_shapes: dict | None = None, input_shapes: dict | None = None) -> "BoundRunner":
        """`run` for a decode loop (see BoundRunner); `output_shapes` and `input_shapes` are
        the artifact protocol's arguments (ORT's runner needs them), unused here."""
        return BoundRunner(self)


class BoundRunner:
    """`run(feeds) -> outputs` for a decode loop: the presents come back as TVM tensors on
    the device, and a TVM tensor fed back (as the next step's past) goes in as it is, so the
    cache never makes a round trip through numpy. A static cache's present is the very
    tensor fed as its past (written in place, rules_cache): every step reuses one buffer.
    Other outputs (the logits) are numpy arrays."""

    def __init__(self, compiled: Compiled):
        self.compiled = compiled

    def run(self, feeds: dict) -> dict:
        import tvm

        c = self.compiled
        ins = [v if isinstance(v, tvm.runtime.Tensor) else to_tensor(v, c.device)
               for v in (feeds[n] for n in c.input_names)]
        outs = c.vm["main"](*ins, *c.params)
        return {name: out if name.startswith("present.") else to_numpy(out) for name, out in zip(c.output_names, outs)}


class Executable(Compiled):
    """An artifact folder loaded: the library, then the weights onto the device. Refuses
    (one line) an artifact built for another CPU than this one, or a cuda artifact where
    there is no GPU of the architecture it was built for."""

    def __init__(self, outdir: Path, manifest: dict, threads: int | None = None):
        tvm = _import_tvm()

        outdir = Path(outdir)
        spec = manifest.get("tvm_target") or {}
        _device_for(spec, str(outdir))  # refuse before loading anything
        # The library is native code that loading runs: only from inside the artifact folder.
        lib_path = artifact_file(outdir, manifest.get("model", LIBRARY), f"{outdir}: the manifest's model")
        weights_path = artifact_file(outdir, manifest.get("weights", WEIGHTS), f"{outdir}: the manifest's weights")
        for p in (lib_path, weights_path):
            if not p.is_file():
                raise UserError(f"{outdir}: the manifest names {p.name!r}, which is missing")
        stored = read_tensors(weights_path)
        names = manifest.get("params", [])
        missing = [n for n in names if n not in stored]
        if missing:
            raise UserError(f"{weights_path}: weight {missing[0]!r} is missing")
        sig = manifest["signature"]
        super().__init__(tvm.runtime.load_module(str(lib_path)), [stored[n] for n in names], spec,
                         [e["name"] for e in sig["inputs"]], [e["name"] for e in sig["outputs"]], where=str(outdir),
                         threads=threads)


def versions() -> dict[str, str]:
    tvm = _import_tvm()
    import tvm_ffi

    return {"apache-tvm": tvm.__version__, "apache-tvm-ffi": getattr(tvm_ffi, "__version__", "?")}
