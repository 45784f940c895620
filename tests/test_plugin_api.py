"""The API a plugin writes against: ops and passes it registers, and what graphopt says when
one of them is wrong (the op's or pass's author's bug, named, never a raw traceback)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphopt.pass_manager as pm
import graphopt.registry as registry
from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.errors import GraphoptError, UserError
from graphopt.interpreter import run as interpret
from graphopt.ir import GRAPHOPT_DOMAIN, Attr, AttrKind, Graph, TensorType
from graphopt.lowering import DecompositionError, decompose_node
from graphopt.pass_manager import (
    Pass, PassCrash, PassManager, PassResult, load_recipe, parse_pipeline, print_pipeline, register_pass,
)
from graphopt.registry import AttrSpec, OpDef, register_op

F32 = DType.FLOAT32


def _same_type(node):
    return [node.inputs[0].type]


def _op(name, decompose=None, reference=lambda node, inputs: [inputs[0]]):
    return OpDef(GRAPHOPT_DOMAIN, name, attrs={"beta": AttrSpec(AttrKind.FLOAT, default=1.0)},
                 min_inputs=1, max_inputs=1, min_outputs=1, max_outputs=1,
                 infer=_same_type, reference=reference, decompose=decompose, doc="a test op")


@pytest.fixture
def ops():
    """Registers ops for one test (`ops(opdef)`) and unregisters them after."""
    added = []

    def add(opdef):
        register_op(opdef)
        added.append((opdef.domain, opdef.name))  # only once registered: a refused one is a built-in's
        return opdef
    yield add
    for key in added:
        registry._OPS.pop(key, None)
        registry._OP_SOURCES.pop(key, None)


@pytest.fixture
def passes():
    """Registers passes for one test (`passes(name, cls)`) and unregisters them after."""
    added = []

    def add(name, cls, **kw):
        cls = register_pass(name, **kw)(cls)
        added.append(name)  # only once registered: a refused one is a built-in's
        return cls
    yield add
    for name in added:
        info = pm._PASSES.pop(name, None)
        for a in info.aliases if info else ():
            pm._ALIASES.pop(a, None)


def one_op_graph(op: str) -> Graph:
    """x -> graphopt.<op> -> Relu -> output, all f32[batch, 4]."""
    g = Graph("one_op")
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    b = Builder(g)
    g.outputs = [b.Relu(b.op(op, x, domain=GRAPHOPT_DOMAIN))]
    return g


# ---- 1. a decomposition that computes another type than the op declares -----------------

def test_a_decomposition_of_another_shape_is_refused_naming_the_op_node_and_types(ops):
    ops(_op("TestBadShape", decompose=lambda b, node: [b.ReduceSum(node.inputs[0], keepdims=1)]))
    g = one_op_graph("TestBadShape")
    node = g.nodes[0]
    with pytest.raises(DecompositionError) as e:
        decompose_node(node)
    msg = str(e.value)
    assert "graphopt.TestBadShape" in msg and repr(node.name) in msg
    assert "f32[1, 1]" in msg and "f32[batch, 4]" in msg and "\n" not in msg
    assert isinstance(e.value, GraphoptError) and not isinstance(e.value, UserError)  # the op's bug: exit 1
    assert [n.op for n in g.nodes] == ["graphopt.TestBadShape", "Relu"]  # what it built is taken back


def test_an_ill_typed_decomposition_names_the_op_being_decomposed(ops):
    ops(_op("TestBadDtype", decompose=lambda b, node: [b.Mul(node.inputs[0], b.const(np.array(1.702)))]))
    g = one_op_graph("TestBadDtype")
    with pytest.raises(DecompositionError, match=r"decomposition of graphopt.TestBadDtype \(node '[^']+'\) "
                                                 r"builds an ill-typed node: node '[^']+' \(Mul\)"):
        decompose_node(g.nodes[0])


def test_a_decomposition_of_the_declared_type_is_adopted(ops):
    ops(_op("TestGoodDecomposition", decompose=lambda b, node: [b.Identity(node.inputs[0])]))
    g = one_op_graph("TestGoodDecomposition")
    decompose_node(g.nodes[0])
    assert [n.op for n in g.nodes] == ["Identity", "Relu"]


# ---- 2. domains a custom op may live in ---------------------------------------------------

@pytest.mark.parametrize("domain, name", [("acme", "Swish"), ("com.microsoft", "TestOp"), ("", "TestOp")])
def test_register_op_refuses_a_domain_other_than_graphopt(ops, domain, name):
    opdef = dataclasses.replace(_op(name), domain=domain)
    with pytest.raises(ValueError, match=f"op {opdef.qualified_name}: custom ops are registered in domain "
                                         "'graphopt'") as e:
        ops(opdef)
    assert "\n" not in str(e.value)
    assert (domain, name) not in registry._OPS


# ---- 3. a plugin's name that a built-in holds ---------------------------------------------

def test_a_builtin_name_is_refused_with_one_line_naming_it(ops, passes):
    class Clash(Pass):
        def run(self, graph, ctx):
            return PassResult()
    with pytest.raises(ValueError, match="pass 'fuse-skip-norm' is already registered, by a built-in pass"):
        passes("fuse-skip-norm", Clash)
    with pytest.raises(ValueError, match=r"pass alias 'fold' is already registered \(an alias of 'fold-constants'\)"):
        passes("test-clash-alias", Clash, aliases=("fold",))
    assert "test-clash-alias" not in pm._PASSES
    with pytest.raises(ValueError, match="op graphopt.RMSNorm is already registered, by a built-in op"):
        ops(_op("RMSNorm"))
    assert registry.get_op(GRAPHOPT_DOMAIN, "RMSNorm").doc != "a test op"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, where no catalogue is loaded yet."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_a_clash_before_the_catalogue_is_loaded_is_refused_and_the_builtins_stay():
    r = _python('''
        import graphopt, graphopt.pass_manager as pm, graphopt.registry as registry
        assert not pm._loaded and not registry._op_catalogues_loaded  # import graphopt stays fast
        from graphopt.pass_manager import Pass, register_pass
        from graphopt.registry import OpDef, register_op
        try:
            register_pass("fuse-skip-norm")(type("Clash", (Pass,), {"run": lambda s, g, c: None}))
        except ValueError as e:
            print(e)
        try:
            register_op(OpDef("graphopt", "RMSNorm", {}, 1, 1, 1, 1, infer=None, reference=None))
        except ValueError as e:
            print(e)
        assert pm.get_pass_info("fuse-skip-norm").source == "graphopt"
        assert pm.get_pass_info("fuse-skip-norm").cls.__name__ != "Clash"
        assert registry.get_op("graphopt", "RMSNorm").infer is not None
        assert pm._loaded and registry._op_catalogues_loaded
    ''')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "pass 'fuse-skip-norm' is already registered, by a built-in pass; choose another name",
        "op graphopt.RMSNorm is already registered, by a built-in op; choose another name"]


def test_a_catalogue_that_fails_to_load_is_not_taken_as_loaded(monkeypatch):
    def broken(group, what):
        raise GraphoptError("graphopt's own pass catalogue is not registered")
    monkeypatch.setattr(pm, "_loaded", False)
    monkeypatch.setattr(pm, "load_entry_points", broken)
    for _ in range(2):  # the second call tries again, and fails the same way
        with pytest.raises(GraphoptError, match="not registered"):
            pm._load_passes()
        assert pm._loaded is False


# ---- 4. an option without a default ---------------------------------------------------------

@dataclasses.dataclass
class ScaleOutput(Pass):
    """Needs an option."""
    factor: float
    mode: str = "a"

    def run(self, graph, ctx):
        return PassResult()


def test_a_missing_required_option_is_a_user_error_naming_it(passes):
    passes("test-scale-output", ScaleOutput)
    with pytest.raises(UserError, match=r"^pass 'test-scale-output' needs option 'factor'"):
        parse_pipeline("test-scale-output")
    (e,) = parse_pipeline("test-scale-output{factor=2}")
    assert e.instantiate().factor == 2.0


def test_passes_lists_a_required_option_as_required(passes):
    from click.testing import CliRunner

    from graphopt.cli import cli

    passes("test-scale-output", ScaleOutput)
    text = CliRunner().invoke(cli, ["passes"], catch_exceptions=False).output
    assert "test-scale-output{factor=<required>, mode=a}" in text and "MISSING" not in text
    rows = json.loads(CliRunner().invoke(cli, ["passes", "--json"], catch_exceptions=False).output)
    (row,) = [r for r in rows if r["name"] == "test-scale-output"]
    assert row["options"] == {"factor": None, "mode": "a"} and row["required"] == ["factor"]


# ---- 5. check-numerics and the reference kernels -------------------------------------------

def relu_graph() -> Graph:
    g = Graph("relu")
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    b = Builder(g)
    g.outputs = [b.Add(b.Relu(b.Mul(x, x)), x)]
    return g


class Dangle(Pass):
    """Points the first node at a value of another graph (verify would catch it)."""

    def run(self, graph, ctx):
        ghost = Graph("other").add_input("ghost", graph.inputs[0].type)
        graph.nodes[0].set_input(0, ghost)
        return PassResult(changed=True)


def test_check_numerics_names_the_pass_whose_graph_the_interpreter_cannot_run(passes):
    passes("test-dangle", Dangle)
    g = relu_graph()
    with pytest.raises(PassCrash, match=r"pass 'test-dangle' left a graph the reference interpreter cannot run: "
                                        r"node '[^']+' \(Mul\) input 0 \('ghost'\) is not defined"):
        PassManager("test-dangle", verify=False, check_numerics=True).run(g)


def test_a_kernel_returning_another_dtype_is_named_at_its_own_node(ops):
    ops(_op("TestF64Kernel", reference=lambda node, inputs: [inputs[0].astype(np.float64)]))
    g = one_op_graph("TestF64Kernel")
    with pytest.raises(RuntimeError, match=rf"node '{g.nodes[0].name}': the reference kernel of "
                                           r"graphopt.TestF64Kernel returned float64 for '[^']+', which is typed f32"):
        interpret(g, {"x": np.ones((2, 4), np.float32)})


# ---- 6. option values the printed pipeline must parse back ----------------------------------

def test_empty_and_comma_values_print_quoted_and_parse_back(passes, tmp_path):
    passes("test-scale-output", ScaleOutput)
    for text in ['test-scale-output{factor=2,mode=""}', 'test-scale-output{factor=2,mode="a,b"}']:
        entries = parse_pipeline(text)
        assert print_pipeline(entries) == text
        assert print_pipeline(parse_pipeline(print_pipeline(entries))) == text
    assert parse_pipeline('test-scale-output{factor=2,mode="a,b"}')[0].instantiate().mode == "a,b"
    r = tmp_path / "r.toml"
    r.write_text('[[passes]]\nname = "test-scale-output"\nfactor = 2\nmode = ""\n')
    text = print_pipeline(load_recipe(r))
    assert text == 'test-scale-output{factor=2,mode=""}' and print_pipeline(parse_pipeline(text)) == text
    r.write_text('[[passes]]\nname = "test-scale-output"\nfactor = 2\nmode = "a}"\n')
    with pytest.raises(UserError, match=r"option 'mode' = 'a}' holds '}', which a pipeline cannot write"):
        load_recipe(r)
    with pytest.raises(UserError, match=r"option 'mode' has no value \(an empty one is written mode=\"\"\)"):
        parse_pipeline("test-scale-output{factor=2,mode=}")
    assert print_pipeline(parse_pipeline("quantize-weights{exclude=}")) == "quantize-weights{exclude=}"


# ---- 7. a broken plugin -----------------------------------------------------------------------

def test_a_broken_plugin_warns_in_one_line_naming_it(tmp_path):
    (tmp_path / "broken_graphopt_plugin.py").write_text("raise ImportError('no module named acme_kernels')\n")
    dist = tmp_path / "broken_graphopt_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-graphopt-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nbroken = broken_graphopt_plugin\n")
    r = _python("import graphopt.pass_manager as pm; pm.all_passes()",
                PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        "warning: could not load graphopt pass plugin 'broken' (broken_graphopt_plugin of package "
        "'broken-graphopt-plugin'): ImportError: no module named acme_kernels"]


# ---- 8. a graph left invalid with verification off -------------------------------------------

def test_copying_a_graph_with_a_dangling_value_or_a_cycle_names_the_node_and_value():
    g = relu_graph()
    Dangle().run(g, None)
    with pytest.raises(GraphoptError, match=r"node '[^']+' \(Mul\) input 0 \('ghost'\) is not defined before the node"):
        g.copy()
    g = relu_graph()
    mul, relu = g.nodes[0], g.nodes[1]
    mul.set_input(1, relu.outputs[0])  # Mul reads the Relu that reads it
    with pytest.raises(GraphoptError, match=rf"node '{mul.name}' \(Mul\) input 1 \('{relu.outputs[0].name}'\) is not"):
        g.copy()
    with pytest.raises(RuntimeError, match=rf"node '{mul.name}' \(Mul\) input 1 .* is not defined before the node"):
        interpret(g, {"x": np.ones((2, 4), np.float32)})


# ---- tensor attributes are shared by Graph.copy ------------------------------------------------

def test_tensor_attributes_are_read_only_so_a_failed_pass_leaves_the_graph(passes):
    array = np.ones(4, np.float32)
    a = Attr.tensor(array)
    assert not a.value.flags.writeable and array.flags.writeable  # the caller's array stays theirs

    class MutateConstant(Pass):
        def run(self, graph, ctx):
            next(n for n in graph.nodes if n.op_type == "Constant").attrs["value"].value[0] = 5
            return PassResult(changed=True)
    passes("test-mutate-constant", MutateConstant)
    g = Graph("const")
    x = g.add_input("x", TensorType(F32, (4,)))
    b = Builder(g)
    g.outputs = [b.Add(x, b.Constant(value=a))]
    with pytest.raises(PassCrash, match="pass 'test-mutate-constant' raised ValueError"):
        PassManager("test-mutate-constant").run(g)
    assert g.nodes[0].attrs["value"].value.tolist() == [1, 1, 1, 1]
