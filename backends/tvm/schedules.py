"""CPU schedules applied without tuning.

Untuned TVM kernels run single-threaded in loop-nest order (a matmul's reduction innermost,
reading B down a column): 25-250x slower than PyTorch. dlight's CPU rules cover GEMV and
reductions (softmax, norms) only, so two rules of our own come first:

- `Matmul`: a block `C[..., i, j] += A[..., i, k] * B[..., k, j]` (with fused prologue and
  epilogue ops) gets a tile of 4 rows by two vectors of columns accumulated in a local
  buffer with the reduction outside the tile (B read along rows), tiles in parallel,
  prologues inlined and elementwise epilogues computed by the tile's write-back.
- `Parallel`: any other function's outermost spatial loops run in parallel and its
  innermost loop is vectorized.

They are heuristics, not tuning: MetaSchedule (part 2) does better per shape, at minutes
per kernel.
"""
from __future__ import annotations

import re


TILE_ROWS = 4  # a matmul tile: rows x (vectors of columns), accumulated in registers
TILE_VECTORS = 2


def _vector_lanes(target, bits: int = 32) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 4)


def _extent(sch, loop):
    from tvm.s_tir.dlight.base import get_extent

    return get_extent(sch, loop)


def _read_names(block) -> list[str]:
    return [r.source.name for r in block.reads]


def _reads_each_buffer_once(block) -> bool:
    body = str(block.body)
    return all(body.count(f"{r.source.name}[") == 1 for r in block.reads)


def _parallelize(sch, block, lanes: int) -> None:
    """Spatial loops of an injective block: the outer ones in parallel, the innermost one
    vectorized when its extent is a multiple of the vector width."""
    loops = sch.get_loops(block)
    if not loops:
        return
    last = loops[-1]
    extent = _extent(sch, last)
    if len(loops) > 1 and isinstance(extent, int) and extent % lanes == 0:
        _, vec = sch.split(last, [None, lanes])
        sch.vectorize(vec)
        loops = sch.get_loops(block)[:-1]
    else:
        loops = loops[:-1] or loops
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def cpu_rules() -> list:
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Matmul(CPUScheduleRule):
        """Register-tiled, parallel matmul (see the module docstring)."""

        def apply(self, func, target, _tunable):
            from tvm import s_tir, tirx
            from tvm.s_tir.dlight.analysis import normalize_prim_func

            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [b for b in infos if not b.is_injective()]
            if len(reductions) != 1 or not re.fullmatch(r"S+R", reductions[0].dom_kind() or ""):
                return None
            main = reductions[0]
            stmt = sch.get(main.block_rv)
            if len(stmt.reads) != 2 or len(main.dom_kind()) < 3:
                return None  # not A x B (a reduction of one input is a norm or a sum)
            # Producers (K transposed, KV heads repeated, a cast) run as loops of their own:
            # inlined, a transpose would make the tile read B across rows.
            before = infos[: infos.index(main)]
            after = infos[infos.index(main) + 1:]
            lanes = _vector_lanes(target)
            for b in before:
                _parallelize(sch, b.block_rv, lanes)
            *spatial, j, k = sch.get_loops(main.block_rv)
            n = _extent(sch, j)
            wide = TILE_VECTORS * lanes
            width = next((w for w in (wide, lanes) if isinstance(n, int) and n % w == 0), wide)
            *outer, i = spatial
            io, ii = sch.split(i, [None, TILE_ROWS])
            jo, ji = sch.split(j, [None, width])
            sch.reorder(*outer, io, jo, k, ii, ji)
            # Accumulate the 4 x width tile in a local buffer, written back once per tile.
            local = sch.cache_write(main.block_rv, 0, "local")
            sch.reverse_compute_at(local, jo)
            # The epilogue's leading chain (bias, residual, a one-input activation) is computed
            # by the write-back itself. Not past a value read twice (GELU's x * erf(x)): TVM
            # 0.27 then leaves a reference to a buffer that no longer exists.
            produced = stmt.writes[0].source.name
            inlined = 0
            for idx, b in enumerate(after):
                blk = sch.get(b.block_rv)
                readers = [x for x in after[idx:] if produced in _read_names(sch.get(x.block_rv))]
                if readers != [b] or not _reads_each_buffer_once(blk):
                    break
                try:
                    sch.reverse_compute_inline(b.block_rv)
                except Exception:  # noqa: BLE001
                    break
                produced, inlined = blk.writes[0].source.name, inlined + 1
            epilogue_inlined = inlined == len(after)
            tile = sch.fuse(*outer, io, jo)
            sch.parallel(tile)
            sch.unroll(ii)
            sch.vectorize(ji)
            init = sch.decompose_reduction(main.block_rv, k)
            for blk in (init, local):
                loops = sch.get_loops(blk)
                if isinstance(_extent(sch, loops[-1]), int) and _extent(sch, loops[-1]) == width:
                    sch.vectorize(loops[-1])
            if not epilogue_inlined:  # what is left runs as parallel loops of its own
                for b in after[inlined:]:
                    _parallelize(sch, b.block_rv, lanes)
            return sch

    class Parallel(CPUScheduleRule):
        """Outer spatial loops in parallel, the innermost loop vectorized."""

        def apply(self, func, target, _tunable):
            from tvm import s_tir, tirx
            from tvm.s_tir.dlight.analysis import normalize_prim_func
            from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            infos = try_inline_contiguous_spatial(sch, infos)
            if infos is None or len(infos) != 1:
                return None
            (info,) = infos
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            n_spatial = len(kinds) - len(kinds.lstrip("S"))
            if n_spatial == 0:
                return None
            lanes = _vector_lanes(target)
            if info.is_injective() and len(loops) >= 1:
                last = loops[-1]
                if isinstance(_extent(sch, last), int) and _extent(sch, last) % lanes == 0 and len(loops) > 1:
                    _, vec = sch.split(last, [None, lanes])
                    sch.vectorize(vec)
                    loops = sch.get_loops(info.block_rv)
                outer = loops[: max(1, min(n_spatial, len(loops) - 1))]
            else:
                outer = loops[:n_spatial]
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(fused)
            return sch

    return [Matmul(), dl.cpu.GEMV(), dl.cpu.Reduction(), Parallel()]
