"""MetaSchedule tuning kept on disk (graphopt.backends.tvm.tuning): buckets and their bindings,
the bucket dispatcher against the untuned build, a tuning run that a second run finds done,
each record timed against its kernel's default schedule and built only where it won, tuned
builds keeping the pre-packed weights with the reference interpreter's results, the budget,
SIGTERM keeping finished records, and `graphopt optimize --tune-minutes` writing what it tuned
into the manifest. The tiny MLP keeps tuning to seconds of work per kernel."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.testing import assert_close, require_installed

require_installed("tvm", "apache-tvm")

import graphopt  # noqa: E402
from graphopt.backends.tvm import build, runtime, tuning  # noqa: E402
from graphopt.cli import cli  # noqa: E402
from graphopt.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.onnx"  # x: [batch, 16] -> [batch, 8]
TRIALS = 2  # per kernel: enough to give every kernel a record


@pytest.fixture(scope="module")
def mlp():
    return graphopt.optimize(str(EXAMPLE), None, backend="tvm").graph


@pytest.fixture(scope="module")
def spec():
    return build.cpu_target_spec()


@pytest.fixture(scope="module")
def tuned_db(mlp, spec, tmp_path_factory):
    """A database in which every kernel of the MLP at 1x1 has its TRIALS records, and both runs' summaries."""
    root = tmp_path_factory.mktemp("tuning-db")
    buckets = tuning.parse_shapes("1x1")
    first, _ = tuning.tune(mlp, spec, buckets, 10.0, root, trials_per_kernel=TRIALS)
    second, record = tuning.tune(mlp, spec, buckets, 10.0, root, trials_per_kernel=TRIALS)
    return root, first, second, record


def _x(batch: int) -> dict:
    return {"x": np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)}


def test_shapes_parse_and_bind_the_graphs_symbols(mlp):
    assert tuning.parse_shapes("1x128, 4x128,1x1+128,1x128") == [
        tuning.Bucket(1, 128), tuning.Bucket(4, 128), tuning.Bucket(1, 1, 128)]
    assert tuning.Bucket(1, 1, 128).label == "1x1+128"
    for bad in ("1x", "0x4", "1x1+", "axb", "1x2x3", "1x²"):
        with pytest.raises(UserError, match="expected BATCHxSEQ"):
            tuning.parse_shapes(bad)
    for big in ("99999999999999999999x1", "1x1048576+1"):  # was an internal error in TVM, after the export
        with pytest.raises(UserError, match=f"'{re.escape(big)}': a size past 1,048,576"):
            tuning.parse_shapes(big)
    # A KV-cache graph's attention mask is [batch, "past_seq + seq"]; other exporters' spellings too.
    assert tuning._eval_dim("past_seq + seq", {"batch": 1, "seq": 1, "past_seq": 128}, "mask") == 129
    assert tuning._eval_dim("sequence_length", {"batch": 1, "seq": 7, "past_seq": 0}, "ids") == 7
    with pytest.raises(UserError, match="'heads'"):
        tuning._eval_dim("heads", {"batch": 1, "seq": 1, "past_seq": 0}, "x")
    from graphopt.backends.tvm.lowering import lower_graph, prepare

    g = prepare(mlp)
    mod, _ = lower_graph(g)
    assert tuning.bindings(g, tuning.Bucket(4, 128)) == {"batch": 4}
    from tvm import relax

    assert {v.name for v in relax.analysis.defined_symbolic_vars(mod["main"])} == {"batch"}


def test_the_dispatcher_gives_the_untuned_results_in_and_out_of_its_buckets(mlp, tmp_path):
    """Buckets with an empty database: every kernel from the default schedules, the same numbers."""
    plain = runtime.compile_graph(mlp)
    record = build.Tuned(tmp_path, {"1x1": {"batch": 1}, "4x4": {"batch": 4}})
    with build.tuned(record):
        bucketed = runtime.compile_graph(mlp)
    assert record.kernels["from_database"] == []
    for batch in (1, 4, 3):  # two buckets and a shape of neither (the symbolic main)
        a, b = bucketed.run(_x(batch)), plain.run(_x(batch))
        for name in a:
            assert_close(a[name], b[name])


def test_a_second_run_on_the_same_shapes_finds_every_record_and_tunes_nothing(tuned_db, mlp):
    root, first, second, record = tuned_db
    assert first["stopped"] == "finished", first
    assert first["kernels"] > 0 and first["trials"] >= first["kernels"] * TRIALS
    assert first["kernels_tuned_now"] == first["kernels"]
    assert second["kernels_already_tuned"] == second["kernels"] == first["kernels"]
    assert second["trials"] == 0 and second["kernels_tuned_now"] == 0 and second["stopped"] == "nothing to tune"
    assert second["records"] == first["records"] >= first["kernels"] * TRIALS
    # Every kernel's best record was timed against its default schedule, once: the second run
    # found them settled (the same verdicts, the same times).
    kept = build.read_kept(record.folder)
    assert len(kept) == first["kernels"]
    for verdict in kept.values():
        assert verdict["default_s"] > 0 and verdict["tuned_s"] > 0, verdict
        faster = verdict["tuned_s"] <= build.KEEP_MARGIN * verdict["default_s"]
        assert verdict["keep"] == ("tuned" if faster else "default"), verdict
    assert first["kernels_kept_tuned"] == second["kernels_kept_tuned"] == sum(v["keep"] == "tuned" for v in kept.values())
    # The build takes the kept records for the bucket's kernels (the others: the default
    # schedules) and keeps the pre-packed weights, with the reference interpreter's results.
    with build.tuned(record):
        tuned = runtime.compile_graph(mlp)
    assert len(record.kernels["from_database"]) == first["kernels_kept_tuned"]
    # The bucket is dispatched only when one of its records won: else it runs as untuned.
    assert record.buckets == (first["buckets"] if first["kernels_kept_tuned"] else {})
    assert second["buckets_dispatched"] == sorted(record.buckets)
    _check_packed_and_exact(tuned, mlp)


def _check_packed_and_exact(compiled, graph):
    """`compiled` (a tuned build) has the untuned CPU build's pre-packed weights and gives the
    reference interpreter's results, in its bucket (batch 1) and out of it (batch 3)."""
    from graphopt.interpreter import run

    assert compiled.fields["params"] == runtime.compile_graph(graph).fields["params"]
    assert any(":panels" in name for name in compiled.fields["params"]), compiled.fields["params"]
    for batch in (1, 3):
        want, got = run(graph, _x(batch)), compiled.run(_x(batch))
        for name in want:
            assert_close(got[name], want[name])


def test_a_record_is_built_only_where_it_beat_the_default_schedule(tuned_db, mlp, tmp_path):
    """The verdicts in KEPT decide: all "default" builds no record, all "tuned" builds every
    kernel of the bucket from the database; both keep the packed weights and the exact results."""
    import shutil

    root, first, _, record = tuned_db
    folder = tmp_path / "db"
    shutil.copytree(record.folder, folder)
    kept = build.read_kept(folder)
    for keep, built in (("default", 0), ("tuned", first["kernels"])):
        (folder / build.KEPT).write_text(json.dumps({k: {**v, "keep": keep} for k, v in kept.items()}))
        copy = build.Tuned(folder, first["buckets"])
        with build.tuned(copy):
            compiled = runtime.compile_graph(mlp)
        assert len(copy.kernels["from_database"]) == built, (keep, copy.kernels)
        assert copy.kernels["default_schedules"] > 0  # the symbolic main's kernels, at least
        _check_packed_and_exact(compiled, mlp)


def test_a_caller_that_did_not_tune_dispatches_only_the_shapes_where_a_record_won(tuned_db, mlp, tmp_path):
    """`only_winning` (graphopt compare's tuned cell): with every verdict "default" no bucket is
    dispatched (the build is the untuned one); with every verdict "tuned", every bucket is."""
    import shutil

    _, first, _, record = tuned_db
    folder = tmp_path / "db"
    shutil.copytree(record.folder, folder)
    kept = build.read_kept(folder)
    for keep, dispatched in (("default", []), ("tuned", sorted(first["buckets"]))):
        (folder / build.KEPT).write_text(json.dumps({k: {**v, "keep": keep} for k, v in kept.items()}))
        copy = build.Tuned(folder, first["buckets"], only_winning=True)
        with build.tuned(copy):
            compiled = runtime.compile_graph(mlp)
        assert copy.dispatched == dispatched, (keep, copy.dispatched)
        assert bool(copy.kernels["from_database"]) == (keep == "tuned"), copy.kernels
        _check_packed_and_exact(compiled, mlp)


def test_tuning_stops_when_the_budget_is_spent(mlp, spec, tmp_path):
    budget = 0.2
    summary, _ = tuning.tune(mlp, spec, tuning.parse_shapes("1x1"), budget, tmp_path)  # 64 trials a kernel: minutes
    assert summary["stopped"] == "budget", summary
    assert summary["trials"] < summary["kernels"] * tuning.TRIALS_PER_KERNEL
    # Checked before each round is built and after each is measured: past the budget by one
    # round at most (seconds for this MLP's kernels; without the builder's check, 2.1 min here).
    assert summary["minutes"] < budget + 0.75, summary


_TUNE_FOREVER = """
import sys, graphopt
from graphopt.backends.tvm import build, tuning
g = graphopt.optimize(sys.argv[1], None, backend="tvm").graph
tuning.TRIALS_PER_ROUND = 4  # records soon (every kernel's first round is built before any is measured), then 15 more rounds
tuning.tune(g, build.cpu_target_spec(), tuning.parse_shapes("1x1"), 60.0, sys.argv[2])
"""


def test_sigterm_while_tuning_keeps_the_finished_records(spec, tmp_path):
    folder = tuning.database_dir(tmp_path, spec, create=False)
    records = folder / build.DB_FILES[1]
    proc = subprocess.Popen([sys.executable, "-c", _TUNE_FOREVER, str(EXAMPLE), str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (records.is_file() and records.read_text().count("\n") >= 2):
            assert proc.poll() is None, "tuning ended before it was stopped"
            time.sleep(1)
        seen = records.read_text().count("\n")
        assert seen >= 2, "no records within 5 minutes"
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with records.open("a") as f:  # and a record cut short by a SIGKILL mid-write
        f.write('[0, [[["b0", "SampleCategorical"')
    db = build.open_database(folder)
    assert len(db) >= seen
    assert records.read_text().endswith("\n")


def test_optimize_tune_minutes_writes_what_it_tuned_into_the_manifest(tuned_db, tmp_path):
    root, first, _, _ = tuned_db
    out = tmp_path / "tuned"
    result = CliRunner().invoke(cli, ["optimize", str(EXAMPLE), "-o", str(out), "-q", "--backend", "tvm",
                                      "--tune-minutes", "0.5", "--tune-shapes", "1x1", "--tune-db", str(root)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["tuning"]
    assert t["database"] == str(tuning.database_dir(root, manifest["tvm_target"], create=False))
    assert t["buckets"] == {"1x1": {"batch": 1}}
    # The module fixture's records have TRIALS per kernel; the CLI asks for TRIALS_PER_KERNEL, so
    # it goes on tuning them within its budget (then times new best records against the default
    # schedules: allowed past the budget). The kernels whose record won come from the database.
    assert t["kernels"] == first["kernels"] and t["minutes"] < 0.5 + 1.5
    assert len(t["kernels_built"]["from_database"]) == t["kernels_kept_tuned"]
    report = json.loads((out / "report.json").read_text())
    assert report["backend_seconds"]["tuning"] == pytest.approx(60 * t["minutes"], abs=0.01)
    from graphopt.driver import format_report

    line = next(x for x in format_report(report).splitlines() if x.startswith("tuning "))
    assert line.startswith(f"tuning    {t['trials']} trials, {t['kernels_tuned_now']} kernels tuned now")
    assert ("nothing was tuned" in line) == (t["trials"] == 0 and t["stopped"] == "budget")
    plain = runtime.compile_graph(graphopt.optimize(str(EXAMPLE), None, backend="tvm").graph)
    art = graphopt.load(out)
    for batch in (1, 5):
        a, b = art.run(_x(batch)), plain.run(_x(batch))
        for name in a:
            assert_close(a[name], b[name])


def test_compare_adds_the_tuned_tvm_row_when_the_default_database_has_records(tuned_db, spec, tmp_path, monkeypatch):
    import shutil

    from graphopt.compare.run import compare
    from graphopt.compare.timing import TimingSettings

    root, first, _, _ = tuned_db
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quick = dict(timing=TimingSettings(warmup=1, min_runs=3, min_time=0.0), measure_bandwidth=False,
                 measure_memory=False, batch=1, seqs=[1])
    report = compare([str(EXAMPLE)], backends=["tvm"], variants=["fp32"], **quick)
    assert [c["id"] for c in report["cells"]] == ["tvm/fp32"]  # no database yet: no tuned row
    shutil.copytree(tuning.database_dir(root, spec, create=False), tuning.database_dir(None, spec, create=False))
    records = tuning.record_count(tuning.database_dir(None, spec, create=False))
    report = compare([str(EXAMPLE)], backends=["tvm"], variants=["fp32"], **quick)
    cells = {c["id"]: c for c in report["cells"]}
    tuned = cells[f"tvm (tuned, {records} records)"]
    assert tuned["status"] == "ok", tuned["error"]
    kept = build.read_kept(tuning.database_dir(None, spec, create=False))
    # batch 1 x seq 1 is the tuned bucket: its kernels whose record beat the default schedule
    assert tuned["settings"]["kernels_from_database"] == sum(v["keep"] == "tuned" for v in kept.values())
    # every run into the database counts (the fixture's two, and the CLI test's if it ran first)
    spent = tuning.tuning_minutes(tuning.database_dir(None, spec, create=False))
    assert spent >= first["minutes"] + tuned_db[2]["minutes"]
    assert tuned["tuning_seconds"] == pytest.approx(60 * spent, abs=0.1)
    assert tuned["build_seconds"] > 0 and cells["tvm/fp32"]["tuning_seconds"] is None


def test_the_dispatcher_on_a_kv_cache_decoder_matches_the_untuned_build(exported, tmp_path):
    """A generation-ready Llama (grouped-query attention, KV cache): its buckets bind batch, seq,
    past_seq and the mask's `past_seq + seq`; prefill and decode buckets and a shape of neither
    give the untuned build's results."""
    from tvm import relax

    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.models import load_graph

    _, path = exported("llama", "dynamo")
    graph = load_graph(path)
    graph.metadata.metadata_props["graphopt.max_positions"] = "64"  # as test_kvcache does: what a checkpoint records
    graph.rename_value(graph.outputs[0], "logits")
    g = graphopt.optimize(graph, None, backend="tvm").graph
    buckets = tuning.parse_shapes("1x8,1x1+8")
    static = {b.label: tuning.bindings(prepare(g), b) for b in buckets}
    assert static["1x1+8"] == {"batch": 1, "seq": 1, "past_seq": 8, "attention_mask_dim1": 9}
    mod, _ = lower_graph(prepare(g))
    assert set(static["1x8"]) == {v.name for v in relax.analysis.defined_symbolic_vars(mod["main"])}
    plain = runtime.compile_graph(g)
    with build.tuned(build.Tuned(tmp_path, static)):
        bucketed = runtime.compile_graph(g)
    rng = np.random.default_rng(0)
    inputs = [v for v in g.inputs if not v.is_initializer]
    for batch, seq, past in ((1, 8, 0), (1, 1, 8), (2, 3, 5)):
        dims = tuning.Bucket(batch, seq, past).dims()
        feeds = {}
        for v in inputs:
            shape = tuple(tuning._eval_dim(d, dims, v.name) for d in v.type.shape)
            feeds[v.name] = (rng.integers(0, 50, shape) if v.name == "input_ids" else np.ones(shape, np.int64)
                             if "mask" in v.name else rng.standard_normal(shape).astype(np.float32))
        a, b = bucketed.run(feeds), plain.run(feeds)
        for name in a:
            assert_close(a[name], b[name])


def test_tune_shapes_past_the_models_context_are_refused_before_tuning(mlp, spec, tmp_path):
    """A generation-ready decoder records its context (graphopt.max_positions): a bucket longer
    than that is refused before any tuning time is spent."""
    g = mlp.copy()
    g.metadata.metadata_props["graphopt.max_positions"] = "256"
    with pytest.raises(UserError, match=r"--tune-shapes 1x999: 999 positions, past the model's 256"):
        tuning.save_tuned(g, tmp_path / "out", "cpu", None, spec, 0.1, "1x16,1x999", tmp_path / "db", lambda m: None)
    with pytest.raises(UserError, match=r"--tune-shapes 1x1\+256: 257 positions"):
        tuning.save_tuned(g, tmp_path / "out", "cpu", None, spec, 0.1, "1x1+256", tmp_path / "db", lambda m: None)
    assert not (tmp_path / "db").exists()
    g.metadata.metadata_props["graphopt.max_positions"] = "64"  # the defaults (1x128, 4x128, 1x1+128) fit in
    assert [b.label for b in tuning.buckets_for(g, None)] == ["1x64", "4x64", "1x1+63"]
