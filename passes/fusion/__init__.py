"""Fusion passes: decomposed subgraphs that exporters emit -> graphopt's fused ops."""
from graphopt.passes.fusion import activations, attention, linear, norms  # noqa: F401
