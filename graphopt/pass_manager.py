"""Passes, their registry, pipelines and the `PassManager`.

A pass is a dataclass whose fields are its options, registered under a verb-first
kebab-case name:

    @register_pass("fold-constants", aliases=("fold",))
    @dataclass
    class FoldConstants(Pass):
        \"\"\"Before/After IR in the docstring.\"\"\"
        max_size: int = 1024          # option `max-size` in a pipeline string
        def run(self, graph, ctx) -> PassResult: ...

Pipelines are text (`"dce,cse,fold-constants{max-size=1024}"`) or a TOML recipe, and print
back as they were written. The manager runs each pass on a copy of the graph, verifies the
result (unless told not to), times it, keeps its statistics, and in check-numerics mode
compares every surviving value before and after the pass on sample inputs: a pass that
raises, breaks an invariant or changes results leaves the caller's graph as it was and is
named in the error.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
import types
import typing
from typing import Any, Callable, ClassVar

import numpy as np

from graphopt.dtypes import TOLERANCES, DType
from graphopt.errors import GraphoptError, UserError
from graphopt.plugins import load_entry_points
from graphopt.ir import CANONICAL_OPSET, Graph, Node
from graphopt.interpreter import run as interpret
from graphopt.sample_inputs import sample_inputs
from graphopt.verify import verify

# --------------------------------------------------------------------------------------
# Passes


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A site a rewrite almost took: its root op matched, then a constraint failed at `node`
    (whose op is `op`) for `reason`. Every pass reports near misses in this one shape."""

    rule: str
    node: str
    op: str
    reason: str


@dataclasses.dataclass
class PassResult:
    changed: bool = False
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)
    details: list[dict] = dataclasses.field(default_factory=list)  # anything else a pass wants reported

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.stats[key] = self.stats.get(key, 0) + n
            self.changed = True

    def near_miss(self, rule: str, at: Node, reason: str) -> None:
        """Record a site where `rule`'s root matched but a later constraint failed at `at`."""
        self.near_misses.append(NearMiss(rule, at.name, at.op, str(reason)))


@dataclasses.dataclass
class PassContext:
    """What a pass may know beyond the graph: target hints, and a place for notes."""

    target: str = "cpu"
    hints: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


# What a pass that needs calibration data says when it has none: the command line's option
# and the Python API's hint (a list of feed dicts, as graphopt.calibration makes them).
CALIBRATION_HINT = ("give --calibration FILE (text, .jsonl of texts or .npz of inputs; from Python "
                    "graphopt.optimize(..., calibration=FILE), or a PassManager's "
                    "PassContext(hints={'calibration': [feeds, ...]}))")


class Pass:
    """Base class of every pass. Subclasses are dataclasses; their fields are options."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    preconditions: ClassVar[tuple[str, ...]] = ()
    # Passes that must run before this one when a pipeline holds both ("a|b": either); the
    # PassManager refuses a pipeline in the wrong order, and notes one that lacks them.
    requires: ClassVar[tuple[str, ...]] = ()
    # "fusion" passes are summarized by `--explain-fusions` (sites fused, near misses).
    category: ClassVar[str] = ""
    # A pass that changes results by design (quantization): check-numerics records how far
    # its outputs moved instead of failing, and compares the passes after it to its result.
    approximate: ClassVar[bool] = False
    # A pass that changes the graph's interface by design (rewrite-kv-cache names the first
    # output `logits` and adds the cache inputs); every other pass keeps the inputs (names,
    # types, ranks) and the outputs, position by position, by name.
    changes_outputs: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


class PassError(UserError):
    """A pass failed: it raised, broke an invariant, a precondition, or the numerics."""


class PreconditionError(PassError):
    pass


class PassCrash(PassError, GraphoptError):
    """A pass raised or left an invalid graph: a bug in the pass (ours or a plugin's), not
    a user mistake; the CLI reports it as an internal error (exit 1, --debug for the traceback)."""


# Preconditions are named checks: graph -> None (holds) or a reason (does not).
PRECONDITIONS: dict[str, Callable[[Graph], str | None]] = {}


def precondition(name: str):
    def deco(fn: Callable[[Graph], str | None]):
        PRECONDITIONS[name] = fn
        return fn
    return deco


@precondition("canonical-opset")
def _canonical_opset(graph: Graph) -> str | None:
    v = graph.opset.get("", CANONICAL_OPSET)
    return None if v == CANONICAL_OPSET else f"the graph is at opset {v}, not the canonical {CANONICAL_OPSET}"


@precondition("typed")
def _typed(graph: Graph) -> str | None:
    for v in graph.values():
        if v.type is None:
            return f"value {v.name!r} has no type"
    return None


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    cls: type
    aliases: tuple[str, ...]
    summary: str
    source: str  # "graphopt" or the module / entry point that registered it


_PASSES: dict[str, PassInfo] = {}
_ALIASES: dict[str, str] = {}
_loaded = False   # the catalogues of `graphopt.passes` loaded, all of them
_loading = False  # ... being loaded now (their passes register without loading them again)


def register_pass(name: str, *, aliases: tuple[str, ...] = ()):
    """Class decorator registering a pass under `name` (verb-first kebab-case). A pass from
    outside graphopt loads the built-in catalogue first, so a name or alias a built-in pass
    holds is refused here rather than replacing it (or breaking the catalogue's load later)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise ValueError(f"pass name {name!r} must be kebab-case, verb first (e.g. 'fold-constants')")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"pass {name!r}: {getattr(cls, '__name__', cls)!r} is not a subclass of graphopt.Pass")
        unknown = [p for p in getattr(cls, "preconditions", ()) if p not in PRECONDITIONS]
        if unknown:
            raise ValueError(f"pass {name!r}: unknown precondition {unknown[0]!r} "
                             f"(known: {', '.join(sorted(PRECONDITIONS)) or 'none'})")
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(cls)
        module = cls.__module__ or ""
        source = "graphopt" if module.startswith("graphopt.") else module
        if source != "graphopt":
            _load_passes()
        for what, n in [("pass", name)] + [("pass alias", a) for a in aliases]:
            if n in _PASSES or n in _ALIASES:
                owner = _PASSES[_ALIASES.get(n, n)]
                by = "a built-in pass" if owner.source == "graphopt" else f"a pass from {owner.source}"
                held = "" if owner.name == n else f" (an alias of {owner.name!r})"
                raise ValueError(f"{what} {n!r} is already registered{held}, by {by}; choose another name")
        cls.name = name
        cls.aliases = tuple(aliases)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        _PASSES[name] = PassInfo(name, cls, tuple(aliases), summary, source)
        for a in aliases:
            _ALIASES[a] = name
        return cls
    return deco


def _load_passes() -> None:
    """Load the pass catalogues of the entry point group `graphopt.passes`: graphopt's own
    (`graphopt = graphopt.passes` in its pyproject.toml) and those of installed plugins, each
    a module or callable that registers passes. The pass manager imports no pass itself."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        load_entry_points("graphopt.passes", "pass")
        _loaded = True  # only once it succeeded: a failed load is not taken for a whole catalogue
    finally:
        _loading = False


def all_passes() -> list[PassInfo]:
    _load_passes()
    return [_PASSES[k] for k in sorted(_PASSES)]


def get_pass_info(name: str) -> PassInfo:
    _load_passes()
    name = _ALIASES.get(name, name)
    if name not in _PASSES:
        import difflib

        close = difflib.get_close_matches(name, list(_PASSES) + list(_ALIASES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; `graphopt passes` lists them"
        raise UserError(f"unknown pass {name!r}{hint}")
    return _PASSES[name]


def options_of(cls) -> dict[str, dataclasses.Field]:
    """A pass's options by their pipeline spelling (`max_size` -> `max-size`)."""
    return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def required_options(cls) -> list[str]:
    """The options a pass has no default for (a field without one): a pipeline must give them."""
    return [k for k, f in options_of(cls).items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


# --------------------------------------------------------------------------------------
# Pipelines


@dataclasses.dataclass
class PipelineEntry:
    name: str                       # as written (an alias stays an alias)
    options: dict[str, str]         # as written, in order

    def __str__(self) -> str:
        if not self.options:
            return self.name
        # a value with a comma, or empty where `k=` would not parse back, is quoted: `mode=""`
        return self.name + "{" + ",".join(
            f'{k}="{v}"' if "," in v or (not v and not _takes_empty(self.name, k)) else f"{k}={v}"
            for k, v in self.options.items()) + "}"

    def instantiate(self) -> Pass:
        info = get_pass_info(self.name)
        fields = options_of(info.cls)
        kwargs = {}
        hints = typing.get_type_hints(info.cls)
        for key, raw in self.options.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise UserError(f"pass {info.name!r} has no option {key!r} (options: {known})")
            f = fields[key]
            kwargs[f.name] = _convert_option(info.name, key, raw, hints.get(f.name, str))
        missing = [k for k in required_options(info.cls) if fields[k].name not in kwargs]
        if missing:
            raise UserError(f"pass {info.name!r} needs option {missing[0]!r} ({info.name}{{{missing[0]}=...}})")
        return info.cls(**kwargs)


def _convert_option(pass_name: str, key: str, raw, typ) -> Any:
    if isinstance(raw, str):
        text = raw
    else:
        text = str(raw).lower() if isinstance(raw, bool) else str(raw)
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]  # Optional[T]: "none" or a T
        if text.lower() in ("none", ""):
            return None
        if len(rest) == 1:
            return _convert_option(pass_name, key, raw, rest[0])
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise UserError(f"pass {pass_name!r}: option {key!r} is one of {', '.join(map(str, args))}, not {text!r}")
    if origin in (list, tuple) and args:  # a list on the command line is ';'-separated (TOML lists are joined so)
        items = [t.strip() for t in text.split(";") if t.strip()]
        return origin(_convert_option(pass_name, key, item, args[0]) for item in items)
    try:
        if typ is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        return text
    except ValueError:
        tname = {bool: "true or false", int: "an integer", float: "a number"}.get(typ, getattr(typ, "__name__", str(typ)))
        raise UserError(f"pass {pass_name!r}: option {key!r} needs {tname}, got {text!r}") from None


_ENTRY = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(,|$)")


def _takes_empty(pass_name: str, option: str) -> bool:
    """Whether `option=` (empty) is a value of that pass's option: a string option whose default
    is empty, as `graphopt passes` prints it (`exclude=`)."""
    try:
        field = options_of(get_pass_info(pass_name).cls).get(option)
    except UserError:  # an unknown pass: named by its own error below
        return False
    return field is not None and field.default == ""


def _split_options(opts: str) -> list[str]:
    """`a=1,b="x,y"` -> ['a=1', 'b="x,y"']: a comma inside quotes belongs to the value."""
    items, start, quoted = [], 0, False
    for i, c in enumerate(opts):
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            items.append(opts[start:i])
            start = i + 1
    return items + [opts[start:]]


def parse_pipeline(text: str) -> list[PipelineEntry]:
    """`"dce,cse,fold-constants{max-size=1024}"` -> entries. Names are checked, options too."""
    entries: list[PipelineEntry] = []
    pos = 0
    text = text.strip()
    if not text:
        raise UserError("empty pipeline")
    while pos < len(text):
        m = _ENTRY.match(text, pos)
        if m is None or m.end() == pos:
            # where it goes wrong: an options brace left open is at the end, not at its entry's start
            opened = text.find("{", pos)
            comma = text.find(",", pos)
            unclosed = opened != -1 and "}" not in text[opened:] and (comma == -1 or comma > opened)
            where = f"the end: '{{' at character {opened + 1} is not closed" if unclosed else f"character {pos + 1}"
            raise UserError(f"malformed pipeline {text!r} at {where}: expected name or name{{option=value,...}}")
        name, opts = m.group(1), m.group(2)
        options: dict[str, str] = {}
        if opts is not None and opts.strip():
            for item in _split_options(opts):
                k, eq, v = item.partition("=")
                quoted = len(v.strip()) >= 2 and v.strip()[0] == v.strip()[-1] == '"'
                v = v.strip()[1:-1] if quoted else v
                if '"' in v:
                    raise UserError(f"malformed pipeline {text!r}: option {item.strip()!r}: a quote goes around "
                                    'the whole value (k="a,b")')
                if not eq or not k.strip():
                    raise UserError(f"malformed pipeline {text!r}: option {item.strip()!r} is not key=value")
                if not v.strip() and not quoted and not _takes_empty(name, k.strip()):
                    raise UserError(f"pass {name!r}: option {k.strip()!r} has no value (an empty one is written "
                                    f'{k.strip()}="")')
                if k.strip() in options:
                    raise UserError(f"pass {name!r}: option {k.strip()!r} given twice "
                                    f"({k.strip()}={options[k.strip()]} and {k.strip()}={v.strip()}); give it once")
                options[k.strip()] = v.strip()
        entry = PipelineEntry(name, options)
        entry.instantiate()  # checks the name and the options now, not halfway through a run
        entries.append(entry)
        pos = m.end()
        if m.group(3) == "," and pos >= len(text):
            raise UserError(f"malformed pipeline {text!r}: trailing comma")
    return entries


def print_pipeline(entries: list[PipelineEntry]) -> str:
    return ",".join(str(e) for e in entries)


def load_recipe(path) -> list[PipelineEntry]:
    """A TOML recipe: either `pipeline = "dce,cse"` or a list of tables

        [[passes]]
        name = "fold-constants"
        max-size = 1024
    """
    import tomllib
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("is a folder; give the recipe's .toml file" if path.is_dir() else
                                       "no such recipe file"))
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid TOML recipe: {e}") from None
    unknown = set(data) - {"pipeline", "passes", "description"}
    if unknown:
        raise UserError(f"{path}: unknown recipe key {sorted(unknown)[0]!r} (expected 'pipeline' or 'passes')")
    try:
        if "pipeline" in data:
            if "passes" in data:
                raise UserError(f"{path}: give either 'pipeline' or 'passes', not both")
            if not isinstance(data["pipeline"], str):
                raise UserError(f"{path}: 'pipeline' must be a string such as \"dce,cse\"")
            return parse_pipeline(data["pipeline"])
        entries = []
        if isinstance(data.get("passes"), str):  # the pipeline's text under the other key
            raise UserError(f"{path}: 'passes' is a list of [[passes]] tables; a pipeline string such as "
                            f"{data['passes']!r} goes under 'pipeline'")
        for i, table in enumerate(data.get("passes", [])):
            if not isinstance(table, dict) or "name" not in table:
                raise UserError(f"{path}: passes[{i}] needs a 'name'")
            opts = {k: (str(v).lower() if isinstance(v, bool) else ";".join(map(str, v)) if isinstance(v, list)
                        else str(v)) for k, v in table.items() if k != "name"}
            for k, v in opts.items():  # the pipeline text in report.json must parse back
                bad = next((c for c in '"{}' if c in v), None)
                if bad:
                    raise UserError(f"{path}: passes[{i}] ({table['name']}): option {k!r} = {v!r} holds {bad!r}, "
                                    "which a pipeline cannot write")
            e = PipelineEntry(str(table["name"]), opts)
            e.instantiate()
            entries.append(e)
        if not entries:
            raise UserError(f"{path}: the recipe lists no passes")
        return entries
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


# --------------------------------------------------------------------------------------
# The manager


@dataclasses.dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float
    changed: bool
    stats: dict[str, int]
    nodes_before: int
    nodes_after: int
    max_abs_diff: float | None = None
    category: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. a requirement not met
    details: list[dict] = dataclasses.field(default_factory=list)  # near misses first (NearMiss fields)

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(x):
    """`x` as JSON takes it: a numpy value or array a plugin put in its stats or details as
    the Python number or list it holds, anything else unknown as its text."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return _jsonable(x.tolist())
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def unmet_requirements(cls: type[Pass], history: list[str]) -> list[str]:
    """The entries of `cls.requires` that no pass in `history` (pipeline entries as printed,
    options included) satisfies."""
    ran = set()
    for entry in history:
        name = entry.split("{", 1)[0].strip()
        ran.add(_ALIASES.get(name, name))
    return [req for req in cls.requires if not any(_ALIASES.get(r, r) in ran for r in req.split("|"))]


def check_order(entries: list[PipelineEntry]) -> None:
    """A pipeline that lists a pass after one that requires it is refused before any work
    (requirements met by an earlier run on the graph are checked when the pass runs)."""
    infos = [get_pass_info(e.name) for e in entries]
    for i, info in enumerate(infos):
        before = {x.name for x in infos[:i]}
        later = {x.name for x in infos[i + 1:]}
        for req in info.cls.requires:
            options = {_ALIASES.get(r, r) for r in req.split("|")}
            if not before & options and later & options:
                raise UserError(f"pipeline: {info.name!r} needs {' or '.join(repr(o) for o in sorted(options))} "
                                "before it, but the pipeline runs it after")


class PassManager:
    def __init__(self, pipeline: list[PipelineEntry] | str, *, verify: bool = True,
                 check_numerics: bool = False, sample_inputs: dict[str, np.ndarray] | None = None,
                 ctx: PassContext | None = None, progress: Callable[[str], None] | None = None):
        self.entries = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        check_order(self.entries)
        self.verify = verify
        self.check_numerics = check_numerics
        self.sample_inputs = sample_inputs
        self.ctx = ctx or PassContext()
        self.records: list[PassRecord] = []
        self.progress = progress or (lambda msg: None)

    @property
    def pipeline_text(self) -> str:
        return print_pipeline(self.entries)

    def run(self, graph: Graph) -> Graph:
        """Run the pipeline; returns the optimized graph (the input graph is not modified)."""
        current = graph
        reference = None
        if self.check_numerics:
            feeds = self.sample_inputs if self.sample_inputs is not None else sample_inputs(graph)
            try:
                reference = interpret(graph, feeds, keep_all=True)
            except RuntimeError as e:  # before any pass: the given inputs (or the model), not a pass
                if self.sample_inputs is None:
                    raise  # inputs graphopt made: its own failure
                raise UserError(f"check-numerics: the model does not run on the sample inputs, before any "
                                f"pass ran: {e}; give inputs it runs on (--inputs FILE.npz)") from None
        for entry in self.entries:
            p = entry.instantiate()
            # A requirement that neither this pipeline nor the graph's history meets is not an
            # error (an imported opset-23 Attention or a norm the exporter kept fused meets it
            # too), but the record says so: a pass that finds nothing to do should say why.
            notes = [f"{p.name!r} usually runs after {' or '.join(repr(r) for r in req.split('|'))}, "
                     "which neither this pipeline nor the graph's history ran"
                     + ("" if any(r in _PASSES or r in _ALIASES for r in req.split("|"))
                        else " (no pass of that name is registered: a typo in its requires?)")
                     for req in unmet_requirements(type(p), current.metadata.passes)]
            for note in notes:
                self.progress(f"note: {note}")
            for pre in p.preconditions:
                reason = PRECONDITIONS[pre](current)
                if reason is not None:
                    raise PreconditionError(f"pass {p.name!r}: precondition {pre!r} does not hold: {reason}")
            work = current.copy()
            self.progress(f"running {entry}")
            t0 = time.perf_counter()
            try:
                result = p.run(work, self.ctx)
            except UserError:
                raise
            except Exception as e:
                raise PassCrash(f"pass {p.name!r} raised {type(e).__name__}: {e}; the graph is left as it was") from e
            seconds = time.perf_counter() - t0
            if isinstance(result, Graph):  # DESIGN's `run(graph, ctx) -> graph`: the graph it made (or was given)
                if result is not work and result.metadata == type(result.metadata)():
                    result.metadata = copy.deepcopy(work.metadata)  # a graph built anew: where it came from, kept
                work, result = result, PassResult(changed=True)
            elif result is None:
                result = PassResult(changed=True)
            elif not isinstance(result, PassResult):
                raise PassCrash(f"pass {p.name!r} returned {type(result).__name__}; run() returns a PassResult, "
                                "the graph, or None")
            if self.verify:
                try:
                    verify(work)
                except GraphoptError as e:
                    raise PassCrash(f"pass {p.name!r} left an invalid graph: {e}") from e
            if not p.changes_outputs:
                _check_inputs_kept(p.name, current, work)
                _check_outputs_kept(p.name, current, work)
            record = PassRecord(p.name, dataclasses.asdict(p), seconds, result.changed, dict(result.stats),
                                len(current.nodes), len(work.nodes), category=p.category, notes=notes,
                                details=[dataclasses.asdict(nm) for nm in result.near_misses] + list(result.details))
            if reference is not None:
                try:
                    after = interpret(work, feeds, keep_all=True)
                except RuntimeError as e:  # it ran before the pass: the graph the pass left is at fault
                    raise PassCrash(f"pass {p.name!r} left a graph the reference interpreter cannot run: {e}") from e
                if p.approximate:
                    record.max_abs_diff = _output_diff(work, reference, after)
                else:
                    record.max_abs_diff = _compare(p.name, work, reference, after)
                reference = after
            work.metadata.passes.append(str(entry))
            self.records.append(record)
            current = work
        return current


def _check_inputs_kept(pass_name: str, before: Graph, after: Graph) -> None:
    """A pass keeps the graph's inputs: their names, element types and ranks (feeds that ran
    the model before must run it after)."""
    old = [(v.name, v.type.dtype if v.type else None, v.type.rank if v.type else None)
           for v in before.inputs if not v.is_initializer]
    new = [(v.name, v.type.dtype if v.type else None, v.type.rank if v.type else None)
           for v in after.inputs if not v.is_initializer]
    if old != new:
        gone = next((o for o, n in zip(old + [None] * len(new), new + [None] * len(old)) if o != n), None)
        what = f"graph input {gone[0]!r}" if gone else "the graph inputs"
        raise PassCrash(f"pass {pass_name!r} changed {what} (a pass keeps the inputs' names, types and ranks; "
                        "one that changes them declares changes_outputs)")


def _check_outputs_kept(pass_name: str, before: Graph, after: Graph) -> None:
    """A pass keeps the graph's outputs, position by position, under their names (it may add
    more): an output pointed at another value under that value's name would be compared with
    itself, and the artifact's outputs would change names."""
    old, new = [v.name for v in before.outputs], [v.name for v in after.outputs]
    if len(new) < len(old):
        raise PassCrash(f"pass {pass_name!r} dropped graph output {old[len(new)]!r}")
    for i, (o, n) in enumerate(zip(old, new)):
        if o != n:
            raise PassCrash(f"pass {pass_name!r} renamed graph output {i} from {o!r} to {n!r}; a pass that "
                            "replaces an output's producer must give the new value the output's name")


def _compare(pass_name: str, graph: Graph, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    """Compare every value that survived the pass, in the new graph's order. Raise on the
    first one that diverged beyond tolerance, naming it; return the max abs diff of outputs."""
    order = [v.name for v in graph.inputs] + [v.name for n in graph.nodes for v in n.outputs if v is not None]
    order += [v.name for v in graph.outputs]
    seen = set()
    for name in order:
        if name in seen or name not in before or name not in after:
            continue
        seen.add(name)
        reason = _differs(before[name], after[name])
        if reason:
            raise PassError(f"pass {pass_name!r} changed the results: value {name!r} {reason}")
    return _output_diff(graph, before, after)


def _output_diff(graph: Graph, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    """The largest absolute difference of the graph's float outputs."""
    worst = 0.0
    for v in graph.outputs:
        a, b = before.get(v.name), after.get(v.name)
        if a is None or b is None:
            continue
        if a.dtype.kind == "f" and a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def _differs(a: np.ndarray, b: np.ndarray) -> str | None:
    if a.shape != b.shape:
        return f"has shape {list(b.shape)} after the pass, {list(a.shape)} before"
    if a.dtype != b.dtype:
        return f"has dtype {b.dtype} after the pass, {a.dtype} before"
    if a.dtype.kind == "f":
        rtol, atol = TOLERANCES[DType.from_numpy(a.dtype)]
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ok = np.isclose(b64, a64, rtol=rtol, atol=atol, equal_nan=True)
        if not ok.all():
            diff = np.abs(a64 - b64)
            diff[np.isnan(diff)] = np.inf
            return f"differs by up to {float(diff.max()):.3g} (tolerance rtol={rtol}, atol={atol})"
        return None
    if not np.array_equal(a, b):
        return "has different values after the pass"
    return None
