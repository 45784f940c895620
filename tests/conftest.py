"""Shared fixtures. Models are exported once per session (exports take seconds each)."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI runs property-based tests derandomized and without deadlines (no flaky timing failures).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

from graphopt.testing import ARCHS, EXPORTERS  # noqa: F401


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


_cache: dict = {}


@pytest.fixture(scope="session")
def exported(export_dir):
    """exported(arch, exporter) -> (module, path to .onnx), built once per session."""
    from graphopt.testing import export_onnx, tiny_hf_model

    def get(arch: str, exporter: str):
        key = (arch, exporter)
        if key not in _cache:
            module = tiny_hf_model(arch)
            path = export_onnx(module, export_dir / f"{arch}_{exporter}.onnx", dynamo=exporter == "dynamo")
            _cache[key] = (module, path)
        return _cache[key]

    return get
