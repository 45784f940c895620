"""PyTorch module -> ONNX (torch.onnx, dynamo exporter) -> graphopt IR.

`from_torch` exports with `torch.onnx.export(dynamo=True)` at `CANONICAL_OPSET`, with the
dynamic dimensions named (`batch`, `seq`, ...), into a scratch folder, and imports the file
with `graphopt.onnx_io.load_onnx`. Only where the dynamo exporter fails does it fall back to
the TorchScript exporter, and it says so: one warning line on stderr and
`graph.metadata.exporter = "torchscript (dynamo failed: <reason>)"`.

Export can take tens of seconds, so it reports progress on stderr (never stdout, where JSON
output may go); torch's own chatter (prints, warnings, log lines) is silenced meanwhile.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from graphopt import progress
from graphopt.errors import UserError
from graphopt.ir import CANONICAL_OPSET, Graph

DYNAMO = "torch.onnx dynamo"
TORCHSCRIPT = "torchscript"

# A dynamic-dims spec per input: {axis: name} (or a torch.export.Dim for the value).
DynamicSpec = Mapping[str, Mapping[int, object]]


def from_torch(module, example_inputs, dynamic: DynamicSpec | None = None,
               input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
               *, name: str | None = None, progress: bool = True) -> Graph:
    """Export a PyTorch module into a graphopt `Graph`.

    example_inputs: a tensor, a tuple of tensors (positional arguments) or a dict of tensors
        (keyword arguments). They fix the input dtypes, ranks and static sizes.
    dynamic: which axes are dynamic, per input name: `{"input_ids": {0: "batch", 1: "seq"}}`.
        A value may also be a `torch.export.Dim` (to give a range). By default axis 0 of every
        input is `batch`, and axis 1 of a rank-2 integer input (token ids, masks) is `seq`;
        `{}` exports with static shapes. Axes with one name share one dimension.
    input_names: the graph's input names (default: the names of `forward`'s parameters).
    output_names: the graph's output names (default: `output`, or `output_0`, `output_1`, ...).
        Both are lists of distinct names: a bare string is refused, even for one input
        (`["x"]`, not `"x"`), rather than read as its letters.

    Records `graph.metadata.exporter` and `graph.metadata.export_seconds`. A module that fails
    on its example inputs, or a failed export, is a one-line `UserError` (for the export,
    naming both exporters' reasons).
    """
    import torch

    input_names, output_names = _check_names("input_names", input_names), _check_names("output_names", output_names)
    if isinstance(module, torch.export.ExportedProgram):
        return _from_exported_program(module, input_names, output_names, name=name, progress=progress)
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"from_torch needs a torch.nn.Module or ExportedProgram, got {type(module).__name__}")
    args, kwargs, names = _normalize_inputs(module, example_inputs, input_names)
    tensors = list(args) + list(kwargs.values())
    if dynamic is None:
        dynamic = _default_dynamic(names, tensors)
    _check_dynamic(dynamic)
    unknown = sorted(set(dynamic) - set(names))
    if unknown:
        raise UserError(f"dynamic names unknown input(s) {', '.join(unknown)}; the inputs are {', '.join(names)}")
    label = name or type(module).__name__
    was_training = module.training
    module.eval()  # export inference behaviour (dropout off, batch-norm statistics frozen)
    try:
        try:
            default = _default_output_names(module, args, kwargs)  # (one forward: how many outputs there are)
        except Exception as e:  # the user's module and examples disagree (shape, dtype, argument count)
            raise UserError(f"{label}: the module fails on the example inputs: {_reason(e)}") from None
        if output_names is None:
            output_names = default
        output_names = [str(n) for n in output_names]
        if len(output_names) != len(default):  # the exporters would name what they can and keep the rest
            raise UserError(f"{label}: {len(output_names)} output_names ({', '.join(output_names)}) for "
                            f"{len(default)} outputs: give one name per output, or leave output_names out")
        return export_module(module, args, kwargs, names, output_names, dynamic, label=label, progress=progress)
    finally:
        module.train(was_training)


def export_module(module, args: tuple, kwargs: dict, input_names: list[str], output_names: list[str],
                  dynamic: DynamicSpec, *, label: str, progress: bool = True, source: str = "") -> Graph:
    """Export with dynamo (falling back to TorchScript) and import into the IR. `dynamic`
    maps input names to `{axis: name or torch.export.Dim}`; every name must be an input."""
    tensors = list(args) + list(kwargs.values())
    _check_examples(input_names, tensors, dynamic)
    shapes = dict(zip(input_names, (t.dim() for t in tensors)))
    dynamic = {n: {int(a) % shapes[n]: d for a, d in axes.items()} for n, axes in dynamic.items() if n in shapes}
    work = Path(tempfile.mkdtemp(prefix="graphopt-export-"))
    try:
        onnx_path = work / "model.onnx"
        with _Progress(label, enabled=progress) as bar:
            start = time.perf_counter()
            exporter = DYNAMO
            try:
                with _quiet():
                    _export_dynamo(module, args, kwargs, input_names, output_names, dynamic, onnx_path)
            except Exception as dynamo_error:  # the dynamo exporter fails in many ways; all fall back
                _reraise_interrupt(dynamo_error)
                reason = _reason(dynamo_error)
                bar.warn(f"warning: the dynamo exporter failed on {label} ({reason}); "
                         "falling back to the TorchScript exporter")
                exporter = f"{TORCHSCRIPT} (dynamo failed: {reason})"
                _clear(work)
                try:
                    with _quiet(), _quiet_native_stdout(), warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        _export_torchscript(module, args, kwargs, input_names, output_names, dynamic, onnx_path)
                except Exception as ts_error:
                    _reraise_interrupt(ts_error)
                    raise UserError(f"{label}: export to ONNX failed: dynamo: {reason}; "
                                    f"torchscript: {_reason(ts_error)}") from None
                # The tracer runs the example once: a branch on the input's values is frozen as taken
                frozen = [w for w in caught if "to a Python boolean" in str(w.message)]
                if frozen:
                    where = f"{Path(frozen[0].filename).name}:{frozen[0].lineno}"
                    bar.warn(f"warning: {label} branches on its input values ({len(frozen)} place(s), first at "
                             f"{where}); the TorchScript export keeps only the branch the example inputs took, "
                             "so other inputs may give wrong results (make it exportable by dynamo: torch.where, "
                             "torch.cond)")
                    exporter += f"; {len(frozen)} data-dependent branch(es) frozen"
            seconds = time.perf_counter() - start
            bar.done(f"exported {label} in {seconds:.1f} s ({exporter.split(' (')[0]})")
        return _import(onnx_path, label=label, exporter=exporter, seconds=seconds, source=source)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Inputs and dynamic dimensions


def _normalize_inputs(module, example_inputs, input_names):
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        names = list(kwargs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
        names = _parameter_names(module, len(args))
    else:
        raise UserError(f"example_inputs must be a tensor, a tuple of tensors or a dict, "
                        f"got {type(example_inputs).__name__}")
    for n, t in zip(names, list(args) + list(kwargs.values())):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"example input {n!r} is a {type(t).__name__}; graphopt exports tensor inputs only")
    if input_names is not None:
        input_names = list(input_names)
        if len(input_names) != len(names):
            raise UserError(f"{len(input_names)} input_names for {len(names)} example inputs")
        names = input_names
    return args, kwargs, names


def _check_names(option: str, names) -> list[str] | None:
    """input_names / output_names as a list of distinct strings (None: the defaults)."""
    if names is None:
        return None
    if isinstance(names, str):  # list("ab") would be two inputs, a and b
        raise UserError(f"{option}={names!r}: expected a list of names (one per {option.split('_')[0]}), "
                        f"such as [{names!r}]")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{option}: expected a list of names (strings), got {type(names).__name__}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{option} gives {', '.join(map(repr, twice))} more than once; each name must be different")
    return list(names)


def _check_dynamic(dynamic) -> None:
    """`dynamic` as from_torch takes it: input name -> {axis: dimension name or torch.export.Dim}."""
    form = "a dict of input name -> {axis: dimension name}, such as {'x': {0: 'batch'}}"
    if not isinstance(dynamic, Mapping):
        raise UserError(f"dynamic: expected {form}, got {type(dynamic).__name__}")
    for n, axes in dynamic.items():
        if not isinstance(axes, Mapping) or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            raise UserError(f"dynamic[{n!r}]: expected {{axis: dimension name}} with int axes, such as {{0: 'batch'}}")
        for axis, d in axes.items():
            if isinstance(d, str) and not d.isidentifier():  # torch.export.Dim's rule (its name is a symbol)
                raise UserError(f"dynamic[{n!r}][{axis}]: dimension name {d!r} is not an identifier (letters, "
                                "digits and _), such as 'batch'")


def _parameter_names(module, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _default_dynamic(names: list[str], tensors: list) -> dict:
    dynamic = {}
    for n, t in zip(names, tensors):
        axes = {}
        if t.dim() >= 1:
            axes[0] = "batch"
        if t.dim() == 2 and not t.is_floating_point() and not t.is_complex():
            axes[1] = "seq"
        dynamic[n] = axes
    return dynamic


def _dim_name(d) -> str:
    return d if isinstance(d, str) else getattr(d, "__name__", str(d))


def _check_examples(names: list[str], tensors: list, dynamic: DynamicSpec) -> None:
    # torch.export specializes a size-0/1 example dimension to a constant, which would make
    # the "dynamic" dimension silently static: refuse it up front, naming the input.
    for n, t in zip(names, tensors):
        for axis, d in dynamic.get(n, {}).items():
            if not -t.dim() <= axis < t.dim():
                raise UserError(f"dynamic axis {axis} of input {n!r} is out of range for its shape {list(t.shape)}")
            if t.shape[axis] < 2:
                raise UserError(f"example input {n!r} has size {t.shape[axis]} on dynamic axis {axis} "
                                f"({_dim_name(d)!r}); give an example of size 2 or more there")
    # one name is one size: inputs whose examples differ there cannot share the dimension
    seen: dict[str, tuple[str, int]] = {}
    for n, t in zip(names, tensors):
        for axis, d in dynamic.get(n, {}).items():
            name, size = _dim_name(d), int(t.shape[axis])
            first = seen.setdefault(name, (n, size))
            if first[1] != size:
                raise UserError(f"dimension {name!r} is {first[1]} in example input {first[0]!r} but {size} in {n!r} "
                                f"(axis {axis}); give examples that agree, or name their dimensions apart with "
                                f"dynamic={{{n!r}: {{{axis}: 'other'}}}}")


def _dynamic_shapes(names: list[str], dynamic: DynamicSpec, n_args: int):
    """torch.export's form: a tuple (positional) plus a dict (keyword), with one shared
    `Dim` per dimension name."""
    import torch

    dims: dict[str, object] = {}

    def dim(d):
        if not isinstance(d, str):
            return d  # already a torch.export.Dim
        if d not in dims:
            dims[d] = torch.export.Dim(d, min=1)
        return dims[d]

    specs = [{a: dim(d) for a, d in dynamic.get(n, {}).items()} or None for n in names]
    return specs[:n_args], dict(zip(names[n_args:], specs[n_args:]))


def _default_output_names(module, args, kwargs) -> list[str]:
    import torch

    with torch.no_grad():
        out = module(*args, **kwargs)
    count = len(torch.utils._pytree.tree_leaves(out))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


# --------------------------------------------------------------------------------------
# The two exporters


# Custom torch ops that a frontend defines so that a block exports as one graphopt-domain node
# (graphopt.MoE): torch op -> the onnxscript function that makes the node (the dynamo exporter's
# `custom_translation_table`; for the TorchScript exporter the frontend registers a symbolic).
_TRANSLATIONS: dict = {}


def register_translation(torch_op, onnx_fn) -> None:
    _TRANSLATIONS[torch_op] = onnx_fn


def _export_dynamo(module, args, kwargs, input_names, output_names, dynamic, path: Path) -> None:
    import torch

    positional, keyword = _dynamic_shapes(input_names, dynamic, len(args))
    if keyword and positional:
        raise RuntimeError("mixing positional and keyword example inputs is not supported")
    dynamic_shapes = keyword if kwargs else tuple(positional)
    torch.onnx.export(module, args, str(path), kwargs=kwargs or None, dynamo=True, opset_version=CANONICAL_OPSET,
                      dynamic_shapes=dynamic_shapes if any(dynamic.values()) else None,
                      input_names=input_names, output_names=output_names, external_data=True,
                      verbose=False, report=False, optimize=True,
                      custom_translation_table=dict(_TRANSLATIONS) or None)


def _export_torchscript(module, args, kwargs, input_names, output_names, dynamic, path: Path) -> None:
    import torch

    if kwargs:  # the TorchScript exporter takes positional inputs in forward's order
        order = _parameter_names(module, 10_000)
        args = tuple(kwargs[n] for n in order if n in kwargs)
    axes = {n: {a: _dim_name(d) for a, d in dynamic.get(n, {}).items()} for n in input_names}
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=CANONICAL_OPSET,
                      input_names=input_names, output_names=output_names,
                      dynamic_axes={n: a for n, a in axes.items() if a} or None)


def _from_exported_program(program, input_names, output_names, *, name, progress) -> Graph:
    """An `ExportedProgram` already carries its dynamic shapes; only export and import it."""
    label = name or "exported program"
    work = Path(tempfile.mkdtemp(prefix="graphopt-export-"))
    try:
        with _Progress(label, enabled=progress) as bar:
            start = time.perf_counter()
            try:
                with _quiet():
                    import torch

                    # f by name: the second positional parameter is `args`, which a program does not take
                    torch.onnx.export(program, f=str(work / "model.onnx"), dynamo=True, opset_version=CANONICAL_OPSET,
                                      input_names=list(input_names) if input_names else None,
                                      output_names=list(output_names) if output_names else None,
                                      external_data=True, verbose=False)
            except Exception as e:
                _reraise_interrupt(e)
                raise UserError(f"{label}: export to ONNX failed: {_reason(e)}") from None
            seconds = time.perf_counter() - start
            bar.done(f"exported {label} in {seconds:.1f} s (dynamo)")
        return _import(work / "model.onnx", label=label, exporter=DYNAMO, seconds=seconds, source="")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import(onnx_path: Path, *, label: str, exporter: str, seconds: float, source: str) -> Graph:
    from graphopt.onnx_io import load_onnx

    graph = load_onnx(onnx_path)
    # External weights come back memory-mapped from the scratch folder, which the caller
    # deletes. On POSIX an unlinked file stays readable while it is mapped (and its pages
    # stay out of anonymous memory); elsewhere, copy the weights in before it goes.
    if os.name != "posix":
        import numpy as np

        for v in graph.initializers.values():
            if isinstance(v.const_value, np.memmap):
                v.const_value = np.array(v.const_value)
    graph.name = _identifier(label)
    graph.metadata.exporter = exporter
    graph.metadata.export_seconds = round(seconds, 3)
    graph.metadata.source = source or label
    return graph


def _identifier(text: str) -> str:
    ident = re.sub(r"\W+", "_", text).strip("_") or "model"
    return ident if not ident[0].isdigit() else f"m_{ident}"


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch.onnx's dynamo errors end in "## Exception summary" with the root cause first:
# "<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No ONNX function found for ..."
_SUMMARY_LINE = re.compile(r"<class '(?:[\w]+\.)*(\w+)'>: (.+)")


def _reraise_interrupt(e: BaseException) -> None:
    """Ctrl-C (KeyboardInterrupt) or the CLI's SIGTERM exit (SystemExit) that an exporter turned
    into an ordinary exception: raise it, rather than fall back or report an export failure. (An
    interrupt during torch's lazy `import torch._dynamo` left it half-imported; torch's own
    `except torch._dynamo.exc.UserError` then failed with AttributeError, the interrupt as its
    context, and the fallback exported a broken graph.)"""
    pending, seen = [e], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise e
        seen.add(id(e))
        pending += [e.__cause__, e.__context__]


def _reason(e: BaseException) -> str:
    """One line for an exporter's exception: the root cause of a dynamo conversion error (its
    exception summary's first line), else the first line that says something."""
    text = _ANSI.sub("", str(e))
    if "## Exception summary" in text:
        for line in text.split("## Exception summary", 1)[1].splitlines():
            m = _SUMMARY_LINE.match(line.strip())
            if m:
                return f"{m.group(1)}: {m.group(2)[:200]}"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ")):
            return f"{type(e).__name__}: {line[:200]}"
    return type(e).__name__


# --------------------------------------------------------------------------------------
# Quiet export, visible progress


@contextlib.contextmanager
def _quiet():
    """Silence torch/onnxscript/transformers while exporting: their prints (stdout), Python
    warnings and log records. Errors still propagate as exceptions."""
    noisy = [name for name in list(logging.root.manager.loggerDict)
             if name.split(".")[0] in ("torch", "onnxscript", "onnx_ir", "transformers")]
    levels = {name: logging.getLogger(name).level for name in noisy}
    try:
        for name in noisy:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _quiet_native_stdout():
    """File descriptor 1 to /dev/null: the TorchScript exporter's C++ log prints the whole
    Torch IR graph (hundreds of lines) when it fails, whatever `verbose` says (torch 2.13's
    setup_onnx_logging tests the function `_jit_is_onnx_log_enabled`, always true, not its
    result); the failure itself still comes as an exception."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (an embedding host): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class _Progress:
    """On a terminal, a spinner `exporting X to ONNX ...` with the elapsed time, cleared when
    the export ends; then the note `exported X in 12.3 s` (`graphopt.progress`: held while a
    command runs, so a failure later leaves only its own error line)."""

    def __init__(self, label: str, *, enabled: bool = True):
        self.label = label
        self.enabled = enabled
        self.stream = sys.stderr  # captured now: _quiet() redirects sys.stderr during export
        self._status = None

    def __enter__(self) -> "_Progress":
        if not self.enabled:
            return self
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console

            self._status = Console(file=self.stream).status(f"exporting {self.label} to ONNX ...")
            self._status.start()
        else:
            progress.status(f"exporting {self.label} to ONNX ...")
        return self

    def warn(self, line: str) -> None:
        # A fallback warning is a note whether progress is on or not.
        progress.note(line)

    def done(self, line: str) -> None:
        self._stop()
        if self.enabled:
            progress.note(line)

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __exit__(self, *exc) -> None:
        self._stop()
