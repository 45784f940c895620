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
            import warnings

            warnings.warn(f"graphopt: could not load {what} plugin {ep.name!r}: {e}")
