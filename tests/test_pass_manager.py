"""Pass registry, pipelines and recipes, the manager's verify/rollback/check-numerics, plugins."""
from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Literal, Optional

import numpy as np
import pytest

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import Graph, TensorType
from graphopt.pass_manager import (
    Pass, PassContext, PassError, PassManager, PassResult, all_passes, get_pass_info, load_recipe, parse_pipeline,
    print_pipeline, register_pass,
)
from graphopt.testing import random_graph
from graphopt.text import print_graph


@pytest.mark.parametrize("text", [
    "dce,cse,fold-constants{max-size=1024}",
    "fold{max-size=7},eliminate-dead-code",
    "simplify-shapes",
])
def test_pipeline_text_prints_back_identically(text):
    assert print_pipeline(parse_pipeline(text)) == text


def test_pipeline_options_are_typed():
    (e,) = parse_pipeline("fold-constants{max-size=12}")
    p = e.instantiate()
    assert p.max_size == 12 and isinstance(p.max_size, int)


@pytest.mark.parametrize("text, message", [
    ("dce,frobnicate", "unknown pass 'frobnicate'"),
    ("dec", "did you mean 'dce'"),
    ("dce,,cse", "malformed pipeline"),
    ("dce,", "trailing comma"),
    ("fold-constants{max-size}", "is not key=value"),
    ("fold-constants{max-size=big}", "needs an integer, got 'big'"),
    ("fold-constants{maxsize=3}", "has no option 'maxsize'"),
    ("fold-constants{max-size=3", "malformed pipeline"),
    ("fold-constants{max-size=3,max-size=4}", r"option 'max-size' given twice \(max-size=3 and max-size=4\)"),
    ("", "empty pipeline"),
])
def test_bad_pipelines_are_one_line_errors(text, message):
    with pytest.raises(UserError, match=message) as e:
        parse_pipeline(text)
    assert "\n" not in str(e.value)


def test_recipes(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('pipeline = "dce,cse"\n')
    assert print_pipeline(load_recipe(r)) == "dce,cse"
    r.write_text('[[passes]]\nname = "fold-constants"\nmax-size = 64\n\n[[passes]]\nname = "dce"\n')
    assert print_pipeline(load_recipe(r)) == "fold-constants{max-size=64},dce"
    r.write_text('[[passes]]\nname = "fold-constants"\nmax-sise = 64\n')
    with pytest.raises(UserError, match="r.toml: pass 'fold-constants' has no option 'max-sise'"):
        load_recipe(r)
    r.write_text('pipeline = "dce"\nfoo = 1\n')
    with pytest.raises(UserError, match="unknown recipe key 'foo'"):
        load_recipe(r)
    r.write_text('pipeline = [1, 2\n')
    with pytest.raises(UserError, match="not a valid TOML recipe"):
        load_recipe(r)


def test_catalogue_lists_cleanup_passes_with_aliases():
    names = {p.name: p for p in all_passes()}
    for n in ("eliminate-dead-code", "eliminate-common-subexpressions", "fold-constants", "remove-identities",
              "simplify-chains", "simplify-shapes"):
        assert n in names and names[n].summary
    assert get_pass_info("dce").name == "eliminate-dead-code"


# ---- passes registered by a test -------------------------------------------------------

@register_pass("test-negate-relu")
class NegateRelu(Pass):
    """A deliberately wrong pass: turns Relu into Neg."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        for n in graph.nodes:
            if n.op_type == "Relu":
                n.op_type = "Neg"
                res.count("broken")
        return res


@register_pass("test-skip-output-add")
class SkipOutputAdd(Pass):
    """A deliberately wrong pass: points the graph's output at the Add's first input (its
    name, not the output's), removing the Add."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        for n in list(graph.nodes):
            if n.op_type == "Add" and n.outputs[0] in graph.outputs:
                n.outputs[0].replace_all_uses_with(n.inputs[0])
                graph.remove_node(n)
                res.count("dropped")
        return res


@register_pass("test-raise")
class Raise(Pass):
    """Mutates the graph, then raises."""

    def run(self, graph, ctx):
        graph.nodes.clear()
        raise RuntimeError("boom")


@register_pass("test-break-ssa")
class BreakSSA(Pass):
    """Leaves a stale use list."""

    def run(self, graph, ctx):
        n = graph.nodes[-1]
        n._inputs[0] = graph.inputs[0]
        return PassResult(changed=True)


@register_pass("test-needs-typed")
@dataclasses.dataclass
class NeedsTyped(Pass):
    """Declares a precondition."""
    preconditions = ("typed",)

    def run(self, graph, ctx):
        return PassResult()


def relu_graph():
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 4)))
    b = Builder(g)
    h = b.Relu(b.Mul(x, x))
    g.outputs = [b.Add(h, x)]
    return g


def test_check_numerics_names_the_wrong_pass_and_first_diverging_value():
    g = relu_graph()
    relu_out = g.nodes[1].outputs[0].name
    before = print_graph(g)
    with pytest.raises(PassError, match=f"pass 'test-negate-relu' changed the results: value '{relu_out}'"):
        PassManager("dce,test-negate-relu,cse", check_numerics=True).run(g)
    assert print_graph(g) == before  # the caller's graph is untouched
    PassManager("dce,test-negate-relu", check_numerics=False).run(g)  # without the check it goes through


def test_a_pass_that_points_an_output_at_another_value_is_caught_with_or_without_numerics():
    """The output moved to an earlier value under that value's name: by name, the comparison saw
    that value equal to itself (max diff 0.0) and the artifact's output changed names."""
    from graphopt.pass_manager import PassCrash

    for numerics in (True, False):
        for checked in (True, False):  # with --no-verify too
            with pytest.raises(PassCrash, match="pass 'test-skip-output-add' renamed graph output 0 from "):
                PassManager("test-skip-output-add", check_numerics=numerics, verify=checked).run(relu_graph())


@register_pass("test-rename-input")
class RenameInput(Pass):
    """Renames the first graph input (feeds by the old name no longer run the artifact)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.rename_value(graph.inputs[0], graph.inputs[0].name + "_renamed")
        return PassResult(changed=True)


def test_a_pass_that_renames_an_input_is_caught_naming_the_pass():
    """Before: the artifact's input became x_renamed without a word (with --check-numerics the
    user was told their feed was unknown)."""
    from graphopt.pass_manager import PassCrash

    for numerics in (True, False):
        with pytest.raises(PassCrash, match="pass 'test-rename-input' changed graph input 'x'"):
            PassManager("test-rename-input", check_numerics=numerics).run(relu_graph())


def test_a_pass_that_raises_leaves_the_graph_as_it_was():
    g = relu_graph()
    before = print_graph(g)
    with pytest.raises(PassError, match="pass 'test-raise' raised RuntimeError: boom"):
        PassManager("test-raise").run(g)
    assert print_graph(g) == before


def test_verify_after_each_pass_names_the_pass():
    with pytest.raises(PassError, match="pass 'test-break-ssa' left an invalid graph"):
        PassManager("test-break-ssa").run(relu_graph())
    PassManager("test-break-ssa", verify=False).run(relu_graph())


def test_preconditions_are_checked_in_code():
    g = relu_graph()
    g.nodes[0].outputs[0].type = None
    with pytest.raises(PassError, match="precondition 'typed' does not hold"):
        PassManager("test-needs-typed", verify=False).run(g)


def test_records_time_stats_and_node_counts():
    g = random_graph(5, 10, cleanup_bait=True)
    pm = PassManager("dce,cse")
    out = pm.run(g)
    assert [r.name for r in pm.records] == ["eliminate-dead-code", "eliminate-common-subexpressions"]
    assert pm.records[0].nodes_before == len(g.nodes) and pm.records[-1].nodes_after == len(out.nodes)
    assert all(r.seconds >= 0 for r in pm.records) and pm.records[0].stats["nodes-removed"] >= 1
    assert out.metadata.passes == ["dce", "cse"]


def test_entry_point_plugins_appear_in_the_catalogue(tmp_path, monkeypatch):
    import graphopt.pass_manager as pm

    (tmp_path / "my_graphopt_plugin.py").write_text(textwrap.dedent('''
        from graphopt.pass_manager import Pass, PassResult, register_pass

        @register_pass("plugin-noop")
        class PluginNoop(Pass):
            """A pass from a third-party package."""
            def run(self, graph, ctx):
                return PassResult()
    '''))
    dist = tmp_path / "my_graphopt_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-graphopt-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nnoop = my_graphopt_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pm, "_loaded", False)
    names = {p.name: p for p in all_passes()}
    assert names["plugin-noop"].source == "my_graphopt_plugin"
    PassManager("plugin-noop").run(relu_graph())
    sys.modules.pop("my_graphopt_plugin", None)


def test_sample_inputs_are_valid_for_language_models(exported):
    from graphopt.onnx_io import load_onnx
    from graphopt.sample_inputs import sample_inputs
    from graphopt.testing import VOCAB

    g = load_onnx(exported("llama", "dynamo")[1])
    feeds = sample_inputs(g)
    assert feeds["input_ids"].shape == (2, 8) and feeds["input_ids"].max() < VOCAB
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1}


@pytest.mark.parametrize("total", ["past_seq + seq", "total", "past_sequence_length + 1"])
def test_sample_inputs_of_a_cached_decoder_cover_the_past_and_the_new_tokens(total):
    """The mask of a decoder with a KV cache spans past + new positions, whatever the exporter
    named its length (before, a name with "past" in it was bound to the past alone, and
    "total" to the new tokens: check-numerics failed inside the model, as an internal error)."""
    from graphopt.sample_inputs import sample_inputs

    g = Graph("cached")
    g.add_input("input_ids", TensorType(DType.INT64, ("batch", "seq")))
    g.add_input("attention_mask", TensorType(DType.INT64, ("batch", total)))
    for kind in ("key", "value"):
        g.add_input(f"past_key_values.0.{kind}", TensorType(DType.FLOAT32, ("batch", 2, "past_seq", 8)))
    feeds = sample_inputs(g, {"seq": 5, "past_seq": 3})
    assert feeds["attention_mask"].shape == (2, 8) and feeds["past_key_values.0.key"].shape == (2, 2, 3, 8)
    assert sample_inputs(g, {"seq": 5, total: 6})["attention_mask"].shape == (2, 6)  # a dim given is kept
    from graphopt.interpreter import check_feeds  # the interpreter checks the sum too

    check_feeds(g, feeds)
    with pytest.raises(UserError, match=r"'attention_mask' has shape \[2, 7\]: its dimension 1 is .* = 8 here"):
        check_feeds(g, dict(feeds, attention_mask=feeds["attention_mask"][:, 1:]))


def test_sample_inputs_of_a_static_cache_bind_the_mask_to_past_plus_new_tokens():
    """A static cache's buffer says nothing of the past's length: the mask's
    "past_seq + seq" is still the sum of its terms (before: 4, shorter than the 8 new tokens)."""
    from graphopt.sample_inputs import sample_inputs

    g = Graph("static")
    g.add_input("input_ids", TensorType(DType.INT64, ("batch", "seq")))
    g.add_input("attention_mask", TensorType(DType.INT64, ("batch", "past_seq + seq")))
    g.add_input("past_key_values.0.key", TensorType(DType.FLOAT32, ("batch", 2, 64, 8)))
    assert sample_inputs(g)["attention_mask"].shape == (2, 12)
    assert sample_inputs(g, {"past_seq": 1, "seq": 1})["attention_mask"].shape == (2, 2)


def test_a_feed_for_an_input_with_a_default_is_checked_and_used():
    from graphopt.interpreter import run

    g = Graph("default")
    x = g.add_input("x", TensorType(DType.FLOAT32, (2,)))
    w = g.add_initializer("w", np.ones(2, np.float32))
    g.inputs.append(w)  # an ONNX input with an initializer: an overridable default
    g.outputs = [Builder(g).Mul(x, w)]
    x0 = np.array([1.0, 2.0], np.float32)
    assert run(g, {"x": x0})[g.outputs[0].name].tolist() == [1.0, 2.0]
    assert run(g, {"x": x0, "w": np.full(2, 3.0, np.float32)})[g.outputs[0].name].tolist() == [3.0, 6.0]
    with pytest.raises(UserError, match=r"input 'w' has float64\[2\], expected f32\[2\]"):
        run(g, {"x": x0, "w": np.ones(2)})


def test_check_numerics_on_inputs_the_model_cannot_run_is_a_user_error_before_any_pass():
    g = Graph("reshaping")
    x = g.add_input("x", TensorType(DType.FLOAT32, ("n",)))
    b = Builder(g)
    g.outputs = [b.Reshape(x, b.const(np.array([2, 3], np.int64)))]
    PassManager("dce", check_numerics=True, sample_inputs={"x": np.zeros(6, np.float32)}).run(g)
    with pytest.raises(UserError, match=r"check-numerics: the model does not run on the sample inputs, before any "
                                        r"pass ran: node .*Reshape.*--inputs FILE.npz"):
        PassManager("dce", check_numerics=True, sample_inputs={"x": np.zeros(5, np.float32)}).run(g)


# ---- declared requirements ---------------------------------------------------------------

@register_pass("test-requires-a-typo")
class RequiresATypo(Pass):
    """Declares a requirement no pass has the name of."""

    requires = ("fuse-lineer",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


def test_a_requirement_naming_no_registered_pass_says_so():
    pm = PassManager("test-requires-a-typo")
    pm.run(relu_graph())
    assert pm.records[0].notes == ["'test-requires-a-typo' usually runs after 'fuse-lineer', which neither this "
                                   "pipeline nor the graph's history ran (no pass of that name is registered: "
                                   "a typo in its requires?)"]


def test_a_requirement_that_nothing_meets_is_noted():
    g = relu_graph()
    seen = []
    pm = PassManager("attention-to-3d", progress=seen.append)
    pm.run(g)
    assert pm.records[0].notes == ["'attention-to-3d' usually runs after 'fuse-attention', which neither this "
                                   "pipeline nor the graph's history ran"]
    assert any(m.startswith("note: 'attention-to-3d' usually runs after") for m in seen)
    # Met earlier in the pipeline, or by an earlier run recorded on the graph: no note.
    pm = PassManager("fuse-attention,eliminate-dead-code,attention-to-3d")
    out = pm.run(g)
    assert not any(r.notes for r in pm.records)
    pm = PassManager("attention-to-3d")
    pm.run(out)
    assert pm.records[0].notes == []
    pm = PassManager("fuse-skip-norm")
    pm.run(g)
    assert "'fuse-layer-norm' or 'fuse-rms-norm'" in pm.records[0].notes[0]


def test_a_pipeline_in_the_wrong_order_is_refused_before_any_work():
    with pytest.raises(UserError, match="'merge-projections' needs 'fuse-linear' before it, but the pipeline runs it after"):
        PassManager("merge-projections,fuse-linear")


def test_near_misses_have_one_shape_in_every_record():
    from graphopt.driver import fusion_summary
    from graphopt.pattern import NearMiss

    g = random_graph(3, 12)
    pm = PassManager("fuse-activations,fuse-layer-norm,fuse-rms-norm,fuse-linear,fuse-rotary,fuse-attention,"
                     "attention-to-3d,fuse-gated-mlp,merge-projections,fuse-skip-norm")
    pm.run(g)
    fields = {f.name for f in dataclasses.fields(NearMiss)}
    summary = fusion_summary(pm.records)
    assert set(summary) == {r.name for r in pm.records}  # every fusion pass is in the summary
    for entry in summary.values():
        assert all(set(nm) == fields for nm in entry["near_misses"])


@pytest.mark.parametrize("text, message", [
    ("quantize-weights{bits=3}", "quantize-weights: bits must be 4 or 8, not 3"),
    ("quantize-weights{method=foo}", "quantize-weights: method must be rtn, gptq or awq, not 'foo'"),
    ("quantize-weights{block-size=7}", "quantize-weights: block-size must be a power of two"),
    ("rewrite-kv-cache{layout=bogus}", "rewrite-kv-cache: unknown layout 'bogus'"),
    ("quantize-static{calibration=foo}", "quantize-static: calibration must be minmax, percentile or entropy"),
    ("quantize-static{percentile=200}", r"quantize-static: percentile must be in \(50, 100\]"),
    ("merge-projections{min-group=1}", "merge-projections: min-group 1: a merge needs at least 2 projections"),
    ("quantize-weights{damp=0}", r"quantize-weights: damp must be in \(0, 1\]"),
])
def test_bad_option_values_fail_when_the_pipeline_is_parsed(text, message):
    """Before any model is loaded or exported (they failed in run(), after the export; min-group 1
    crashed the pass)."""
    with pytest.raises(UserError, match=message):
        parse_pipeline(f"dce,{text}")


@register_pass("test-return-graph")
class ReturnGraph(Pass):
    """DESIGN's form: run(graph, ctx) -> graph; this one returns a new graph with Relu as Abs
    (equal on the Mul's non-negative output)."""

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        new = graph.copy()
        for n in new.nodes:
            if n.op_type == "Relu":
                n.op_type = "Abs"
        return new


@register_pass("test-rebuild")
class Rebuild(Pass):
    """Returns a graph made anew: no metadata of its own."""

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        from graphopt.ir import GraphMetadata

        new = graph.copy()
        new.metadata = GraphMetadata()
        return new


@register_pass("test-return-junk")
class ReturnJunk(Pass):
    """Returns what no pass returns."""

    def run(self, graph: Graph, ctx: PassContext):
        return 3


def test_a_pass_may_return_its_graph_and_nothing_else():
    g = relu_graph()
    out = PassManager("test-return-graph", check_numerics=True).run(g)
    assert [n.op_type for n in out.nodes] == ["Mul", "Abs", "Add"]
    g.metadata.metadata_props["graphopt.max_positions"] = "64"  # what a frontend recorded: kept
    out = PassManager("test-rebuild").run(g)
    assert out.metadata.metadata_props == {"graphopt.max_positions": "64"} and out.metadata.passes[-1] == "test-rebuild"
    from graphopt.pass_manager import PassCrash

    with pytest.raises(PassCrash, match="pass 'test-return-junk' returned int; run\\(\\) returns a PassResult"):
        PassManager("test-return-junk").run(g)


def test_plugin_mistakes_are_named_when_the_pass_registers_or_runs():
    """A class that is not a Pass, an unknown precondition: refused at registration, naming the
    pass (before: AttributeError or KeyError at run time). Typed options arrive typed; a numpy
    value in a pass's details reaches the report as a number (before: not JSON serializable)."""
    with pytest.raises(TypeError, match="pass 'test-not-a-pass': 'NotAPass' is not a subclass of graphopt.Pass"):
        @register_pass("test-not-a-pass")
        class NotAPass:
            pass
    with pytest.raises(ValueError, match="pass 'test-bad-precondition': unknown precondition 'no-such'"):
        @register_pass("test-bad-precondition")
        class BadPrecondition(Pass):
            preconditions = ("no-such",)

    @register_pass("test-typed-options")
    class Typed(Pass):
        """Takes typed options and reports a numpy value."""

        a: Optional[int] = None
        mode: Literal["x", "y"] = "x"
        sizes: list[int] = dataclasses.field(default_factory=list)

        def run(self, graph: Graph, ctx: PassContext) -> PassResult:
            return PassResult(changed=False, details=[{"a": self.a, "sizes": self.sizes, "mean": np.float32(0.5)}])

    p = parse_pipeline("test-typed-options{a=5,mode=y,sizes=1;2}")[0].instantiate()
    assert (p.a, p.mode, p.sizes) == (5, "y", [1, 2])
    assert parse_pipeline("test-typed-options{a=none}")[0].instantiate().a is None
    with pytest.raises(UserError, match="option 'mode' is one of x, y, not 'z'"):
        parse_pipeline("test-typed-options{mode=z}")
    pm = PassManager("test-typed-options{a=5,sizes=1;2}")
    pm.run(relu_graph())
    import json
    assert json.loads(json.dumps(pm.records[0].to_json()))["details"] == [{"a": 5, "sizes": [1, 2], "mean": 0.5}]
