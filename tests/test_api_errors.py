"""The Python API's refusals: a user's mistake in `graphopt.load`, `Artifact.run` and
`graphopt.from_torch` is one `UserError` line naming the argument, never a raw TypeError or
AttributeError from deep inside; and Ctrl-C during a PyTorch export ends as an interrupt."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import graphopt
from graphopt.errors import UserError
from graphopt.testing import one_node_graph


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and len(text) < 200, text
    return text


# ---- graphopt.Graph ----------------------------------------------------------------------

def test_the_ir_classes_are_package_attributes_imported_lazily():
    code = ("import sys, graphopt; assert 'graphopt.ir' not in sys.modules; "
            "from graphopt import ir; assert (graphopt.Graph, graphopt.Node, graphopt.Value, graphopt.TensorType) "
            "== (ir.Graph, ir.Node, ir.Value, ir.TensorType)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- graphopt.load and Artifact.run ------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    graph = one_node_graph("Relu", [("x", np.ones((2, 4), np.float32), ("batch", None), False)], domain="",
                           output_names=["y"])
    out = tmp_path_factory.mktemp("artifact") / "relu"
    graphopt.optimize(graph, out)
    return graphopt.load(out)


@pytest.mark.parametrize("path", [None, 123, b"out"])
def test_load_refuses_what_is_not_a_path(path):
    with pytest.raises(UserError) as e:
        graphopt.load(path)
    assert "load(path=...): expected the path of an artifact folder" in one_line(e)
    assert type(path).__name__ in str(e.value)


def test_load_of_a_name_too_long_for_the_file_system_is_a_short_user_error():
    with pytest.raises(UserError) as e:
        graphopt.load("x" * 5000)
    assert one_line(e).endswith("...: File name too long")


@pytest.mark.parametrize("feeds", [[np.ones((2, 4), np.float32)], None])
def test_run_refuses_feeds_that_are_not_a_dict(artifact, feeds):
    assert artifact.run({"x": np.ones((2, 4), np.float32)})["y"].shape == (2, 4)  # (the feeds it takes)
    with pytest.raises(UserError) as e:
        artifact.run(feeds)
    assert one_line(e) == f"run takes a dict of input name -> array (the inputs: x), got {type(feeds).__name__}"


# ---- graphopt.from_torch -----------------------------------------------------------------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def linear(torch):
    return torch.nn.Linear(4, 3).eval()


@pytest.mark.parametrize("example, error", [
    ("wrong shape", "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"),
    ("wrong dtype", "RuntimeError: mat1 and mat2 must have the same dtype"),
    ("too many", "TypeError: Linear.forward() takes 2 positional arguments but 3 were given"),
])
def test_from_torch_says_the_module_fails_on_its_example_inputs(torch, linear, example, error):
    examples = {"wrong shape": torch.randn(2, 5), "wrong dtype": torch.ones(2, 4, dtype=torch.int64),
                "too many": (torch.randn(2, 4), torch.randn(2, 4))}[example]
    with pytest.raises(UserError) as e:
        graphopt.from_torch(linear, examples, progress=False)
    assert one_line(e).startswith(f"Linear: the module fails on the example inputs: {error}")


@pytest.mark.parametrize("dynamic, message", [
    (["input"], "dynamic: expected a dict of input name -> {axis: dimension name}, such as {'x': {0: 'batch'}}, "
                "got list"),
    ({"input": "batch"}, "dynamic['input']: expected {axis: dimension name} with int axes, such as {0: 'batch'}"),
    ({"input": {"0": "batch"}}, "dynamic['input']: expected {axis: dimension name} with int axes"),
    ({"input": {0: "batch size"}}, "dynamic['input'][0]: dimension name 'batch size' is not an identifier"),
])
def test_from_torch_refuses_a_malformed_dynamic(torch, linear, dynamic, message):
    with pytest.raises(UserError) as e:
        graphopt.from_torch(linear, torch.randn(2, 4), dynamic=dynamic, progress=False)
    assert one_line(e).startswith(message)


@pytest.mark.parametrize("option, names, message", [
    ("input_names", ["a", "a"], "input_names gives 'a' more than once; each name must be different"),
    ("input_names", "ab", "input_names='ab': expected a list of names (one per input), such as ['ab']"),
    ("input_names", "x", "input_names='x': expected a list of names (one per input), such as ['x']"),
    ("input_names", [1, 2], "input_names: expected a list of names (strings), got list"),
    ("output_names", "y", "output_names='y': expected a list of names (one per output), such as ['y']"),
])
def test_from_torch_refuses_names_that_are_not_a_list_of_distinct_strings(torch, option, names, message):
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a - 2 * b

    with pytest.raises(UserError) as e:
        graphopt.from_torch(Two(), (torch.ones(2, 3), torch.ones(2, 3)), progress=False, **{option: names})
    assert one_line(e) == message


def _interrupted(interrupt: BaseException):
    """An ordinary exception raised while handling `interrupt`, as torch raised one when Ctrl-C
    left `torch._dynamo` half-imported (AttributeError: ... no attribute 'exc')."""
    try:
        try:
            raise interrupt
        except BaseException:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
    except AttributeError as e:
        error = RuntimeError("Failed to export the model with torch.export")
        error.__cause__ = e
        return error


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(143)], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_interrupt_during_export_is_raised_not_fallen_back_from(torch, linear, monkeypatch, interrupt, exporter):
    from graphopt.frontends import torch_export

    called = []

    def export(which):
        def run(*args, **kwargs):
            called.append(which)
            if which == exporter:
                raise _interrupted(interrupt)
            raise RuntimeError(f"{which} cannot export this")
        return run

    monkeypatch.setattr(torch_export, "_export_dynamo", export("dynamo"))
    monkeypatch.setattr(torch_export, "_export_torchscript", export("torchscript"))
    with pytest.raises(type(interrupt)) as e:
        graphopt.from_torch(linear, torch.randn(2, 4), progress=False)
    assert e.value is interrupt
    assert called == (["dynamo"] if exporter == "dynamo" else ["dynamo", "torchscript"])
