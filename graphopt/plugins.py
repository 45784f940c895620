"""Catalogues found through entry points: graphopt's own ops and passes, and plugins'.

graphopt registers its own op catalogue (group `graphopt.ops`) and pass catalogue (group
`graphopt.passes`) in its pyproject.toml exactly as a third-party package would, so the op
registry and the pass manager import no op module and no pass: they load what is installed.
"""
from __future__ import annotations

from graphopt.errors import GraphoptError


def load_entry_points(group: str, what: str) -> None:
    """Shared by the pass and op catalogues: graphopt's own entry point must load (a broken
    install is an error that says how to repair it); a broken plugin only warns."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=group))
    if not any(ep.name == "graphopt" for ep in found):
        raise GraphoptError(f"graphopt's own {what} catalogue is not registered (entry point group {group!r}): "
                            "reinstall graphopt (pip install -e . in a checkout)")
    for ep in sorted(found, key=lambda ep: ep.name != "graphopt"):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as e:
            if ep.name == "graphopt":
                raise
            package = f" of package {ep.dist.name!r}" if getattr(ep, "dist", None) is not None else ""
            why = (str(e).strip().splitlines() or [""])[0]
            _warn(f"could not load graphopt {what} plugin {ep.name!r} ({ep.value}{package}): {type(e).__name__}: {why}")


def _warn(message: str) -> None:
    """A warning (filterable as any) printed as its one line: the default format would add
    graphopt's own source line, which says nothing about the plugin."""
    import warnings

    shown = warnings.formatwarning
    warnings.formatwarning = lambda msg, category, *rest, **kw: f"warning: {msg}\n"
    try:
        warnings.warn(message, stacklevel=2)
    finally:
        warnings.formatwarning = shown
