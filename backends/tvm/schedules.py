"""CPU schedules applied without tuning.

Untuned TVM kernels run single-threaded in loop-nest order; dlight's CPU rules cover GEMV
and reductions only.
"""
from __future__ import annotations


def cpu_rules() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.cpu.GEMV(), dl.cpu.Reduction()]
