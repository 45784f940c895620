"""CPU schedules applied without tuning.

Untuned TVM kernels run single-threaded in loop-nest order (a matmul's reduction innermost,
reading B down a column): 25-250x slower than PyTorch. dlight's CPU rules cover GEMV and
reductions (softmax, norms) only, so two rules of our own come first:

- `Matmul`: a block `C[..., i, j] += A[..., i, k] * B[..., k, j]` (with fused prologue and
  epilogue ops) gets a tile of 4 rows by two vectors of columns (8 zmm accumulators with
  AVX-512; a pre-packed weight's panel, 4 vectors where it divides N on AVX-512, sets the
  width instead: 16 accumulators) with the reduction outside the tile. The parallel loop runs over column panels;
  inside it, B's panel (K x width) is copied once into contiguous memory and every row tile
  of A streams past it. A row or column count the tile does not divide (a symbolic `seq`)
  is padded with `pad_einsum`, so the multiply-add loop carries no bounds check (A's padded
  rows are copied once a call; the tile writes the rows that exist straight to the output).
  One row (a GEMV) gets no copy and a wider panel (8 vectors). A constant weight comes pre-packed in
  panels (`Lowerer.weight_matmul`: `C[..., i, p, j] += A[..., i, k] * W[p, k, j]`): the
  panel axis p is the parallel loop (each panel's row tiles in two halves where the cores
  do not divide the panel count), read in place, never copied. Its rows are symbolic
  (a decode step's one row, a prompt's many: one kernel serves both), so the kernel holds two
  schedules and chooses at run time: from 4 rows, tiles of 4 (the last one padded); below,
  one row at a time with nothing padded, so a decode step's row costs one row, not four
  (`_dispatch_rows`). Prologues run as parallel
  loops of their own; elementwise epilogues are computed by the tile's write-back.
- `Parallel`: any other function's outermost spatial loops run in parallel and its
  innermost loop is vectorized; below `SERIAL_BELOW` output elements (a decode step's
  rotary, SiLU, lookups: a few hundred) they run on the calling thread, chosen at run time
  where the size is symbolic (`_serial_below`): waking the pool and meeting at its barrier
  costs more than such a kernel's work, and on a loaded machine the barrier waits for a
  core that another process holds.

They are heuristics, not tuning: MetaSchedule (part 2) does better per shape, at minutes
per kernel.
"""
from __future__ import annotations

import re
from unittest import mock


TILE_ROWS = 4  # a matmul tile: rows x (vectors of columns), accumulated in registers
TILE_VECTORS = 2
GEMV_VECTORS = 8  # a GEMV (one row) reads 8 vectors of each row of B at a time: 512 contiguous bytes
# Output elements below which an injective kernel runs serially: at 2 threads a parallel
# launch costs ~0.7 us more than a serial one on an idle machine, about the time a vectorized
# elementwise loop takes for 2-4 K elements; a decode step's are a few hundred.
SERIAL_BELOW = 4096


def _vector_lanes(target, bits: int = 32) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 4)


def _extent(sch, loop):
    from tvm.s_tir.dlight.base import get_extent

    return get_extent(sch, loop)


def _divides(tile: int, extent) -> bool:
    """Whether `tile` divides `extent`, a number or a symbolic expression (`seq * 4`: the
    rows of grouped-query attention's scores, whatever `seq` is)."""
    if isinstance(extent, int):
        return extent % tile == 0
    from tvm import sym, tirx

    return sym.Analyzer().can_prove_equal(tirx.floormod(extent, tile), 0)


def _read_names(block) -> list[str]:
    return [r.source.name for r in block.reads]


def _reads_each_buffer_once(block) -> bool:
    body = str(block.body)
    return all(body.count(f"{r.source.name}[") == 1 for r in block.reads)


def _vectorize_innermost(sch, block, lanes: int) -> None:
    """Vectorize a block's innermost loop in vectors of `lanes` when its extent allows."""
    last = sch.get_loops(block)[-1]
    extent = _extent(sch, last)
    if isinstance(extent, int) and extent % lanes == 0:
        sch.vectorize(sch.split(last, [None, lanes])[1] if extent > lanes else last)


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


class _RowDispatch:
    """What dlight takes from a rule (in a list): `.mod["main"]`, the scheduled function."""

    def __init__(self, func):
        import tvm

        self.mod = tvm.IRModule({"main": func})


def _dispatch_rows(cond, tiled, single):
    """One PrimFunc running `tiled`'s body where `cond` holds at run time, else `single`'s: two
    schedules of the same function, under one root block. Both allocate the same intermediate
    buffers, so `single` gets buffers of its own (`renew_defs`), its parameters matched to
    `tiled`'s."""
    import tvm
    from tvm import s_tir, tirx

    single = s_tir.renew_defs(single)
    matched = []
    for ours, theirs in zip(tiled.params, single.params):  # the parameters are buffers
        region = tirx.BufferRegion(ours, [tvm.ir.Range.from_min_extent(0, d) for d in ours.shape])
        matched.append(s_tir.MatchBufferRegion(theirs, region))
    rows = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "rows", single.body, match_buffers=matched))
    root = s_tir.SBlock([], [], [], "root", tirx.IfThenElse(cond, tiled.body, rows))
    return tiled.with_body(s_tir.SBlockRealize([], True, root))


def _is_buffer(param) -> bool:
    try:
        param.shape  # a Var of BufferType; a scalar Var has no shape
    except AttributeError:
        return False
    return True


def _serial_below(parallel, serial):
    """`parallel` (a schedule) where the function writes at least SERIAL_BELOW elements,
    else `serial`, the same schedule without its parallel loop: chosen here when the size is
    known, else at run time by one kernel holding both (`_dispatch_rows`)."""
    import functools
    import operator

    from tvm import sym, tirx

    func = parallel.mod["main"]
    if not all(_is_buffer(p) for p in func.params):  # a scalar argument too: keep it parallel
        return parallel
    elements = sym.Analyzer().simplify(functools.reduce(operator.mul, func.params[-1].shape, 1))
    if isinstance(elements, (int, tirx.IntImm)):
        return parallel if int(elements) >= SERIAL_BELOW else serial
    try:
        return [_RowDispatch(_dispatch_rows(elements >= SERIAL_BELOW, func, serial.mod["main"]))]
    except Exception:  # noqa: BLE001  (a shape TVM cannot prove equal to its copy's, e.g. a slice's max(...))
        return parallel


def cpu_rules() -> list:
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Matmul(CPUScheduleRule):
        """Register-tiled, parallel matmul (see the module docstring)."""

        def apply(self, func, target, _tunable):
            from tvm import tirx

            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            scheduled = self.schedule(func, target, TILE_ROWS)
            if scheduled is None:
                return None
            sch, padded_rows = scheduled
            if padded_rows is None:
                return sch
            # A pre-packed weight's rows are symbolic (decode's one row, prefill's many): the
            # tile's padding would make one row cost TILE_ROWS. The kernel instead chooses at
            # run time: whole tiles (the remainder padded) from TILE_ROWS rows, else a row at a
            # time, with no padded copy in or out.
            if isinstance(padded_rows, int) and padded_rows >= TILE_ROWS:
                return sch
            single, _ = self.schedule(func, target, 1)
            if isinstance(padded_rows, int):  # a static 1 to 3 rows (a tuning bucket's decode step)
                return single
            try:
                return [_RowDispatch(_dispatch_rows(padded_rows >= TILE_ROWS, sch.mod["main"], single.mod["main"]))]
            except Exception:  # noqa: BLE001  (rows TVM cannot match to its copy's, e.g. OPT's flattened batch * seq)
                return sch  # whole tiles, one row padded to TILE_ROWS at a decode step

        def schedule(self, func, target, tile_rows: int):
            """(the schedule with tiles of `tile_rows` rows, the row count when it pads the rows
            of a pre-packed weight's matmul, else None), or None when the rule does not apply."""
            from tvm import s_tir
            from tvm.s_tir.dlight.analysis import normalize_prim_func

            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reductions = [b for b in infos if not b.is_injective()]
            if len(reductions) != 1 or not re.fullmatch(r"S+R", reductions[0].dom_kind() or ""):
                return None
            main = reductions[0]
            stmt = sch.get(main.block_rv)
            if len(stmt.reads) != 2 or len(main.dom_kind()) < 2:
                return None
            # B must be read along the output's last axis (B[..., k, j]): the tile then loads
            # contiguous vectors of B. Anything else (a sum, a norm, B[j, k]) is another rule's.
            j_var = stmt.iter_vars[-2].var
            if not any(r.region[-1].min.same_as(j_var) for r in stmt.reads):
                return None
            # Producers (K transposed, KV heads repeated, a cast) run as loops of their own:
            # inlined, a transpose would make the tile read B across rows.
            before = infos[: infos.index(main)]
            after = infos[infos.index(main) + 1:]
            lanes = _vector_lanes(target)
            for b in before:
                _parallelize(sch, b.block_rv, lanes)
            b_index = next(i for i, r in enumerate(stmt.reads) if r.region[-1].min.same_as(j_var))
            # A weight stored in column panels (`Lowerer.weight_matmul`): C[..., i, p, j] +=
            # A[..., i, k] * W[p, k, j], the panel p an output axis of its own, j its 32 columns.
            b_region = stmt.reads[b_index].region
            packed = (len(b_region) == 3 and len(stmt.iter_vars) >= 3
                      and b_region[0].min.same_as(stmt.iter_vars[-3].var))
            *spatial, j, k = sch.get_loops(main.block_rv)
            panel = spatial.pop() if packed else None
            n = _extent(sch, j)
            wide = (TILE_VECTORS if spatial else GEMV_VECTORS) * lanes
            width = n if packed else next((w for w in (wide, 2 * lanes, lanes) if isinstance(n, int) and n % w == 0), wide)
            # A row count or column count that the tile does not divide (a symbolic `seq`)
            # would put a bounds check on every multiply-add of the tile. Instead, the rows and
            # columns are padded (pad_einsum: A's tile rows copied with zeros past the end, the
            # result copied back), so the tile's inner loop has no condition at all.
            m = _extent(sch, spatial[-1]) if spatial else 1
            pad_rows = bool(spatial) and not _divides(tile_rows, m)
            pad_cols = not _divides(width, n)
            a_pad = b_pad = c_pad = None
            if pad_rows or pad_cols:
                sch.pad_einsum(main.block_rv, [1] * (len(spatial) - 1) + ([tile_rows if pad_rows else 1] if spatial else [])
                               + ([1] if packed else []) + [width if pad_cols else 1, 1])
                padded = sch.get(main.block_rv)
                for blk in sch.get_producers(main.block_rv):
                    written = sch.get(blk).writes[0].source
                    if written.same_as(padded.reads[b_index].source) and pad_cols:
                        b_pad = blk
                    elif written.same_as(padded.reads[1 - b_index].source) and pad_rows:
                        a_pad = blk
                # The copy-out of the padded result; none when TVM found nothing to pad.
                consumers = sch.get_consumers(main.block_rv)
                c_pad = consumers[0] if len(consumers) == 1 else None
                *spatial, j, k = sch.get_loops(main.block_rv)
                panel = spatial.pop() if packed else None
            jo, ji = (panel, j) if packed else sch.split(j, [None, width])
            # Rows: a GEMV (one row) has no row loop; otherwise tiles of TILE_ROWS rows. The row
            # tiles run innermost of the parallel loop, so one panel of B (K x width) stays in
            # cache while every row of A streams past it. Where the cores do not divide a
            # pre-packed weight's panel count (the shipped model's 3 and 5 panels on 2 cores),
            # each panel's row tiles are two parallel tasks, first and second half: no thread
            # is left a panel to do alone, and each half still reads its panel for many rows.
            halves = None
            if spatial:
                *outer, i = spatial
                io, ii = sch.split(i, [None, tile_rows])
                panels = _extent(sch, jo)
                if (packed and tile_rows > 1 and isinstance(panels, int)
                        and panels % int(target.attrs.get("num-cores", 1) or 1) != 0):
                    halves, io = sch.split(io, [2, None])
                    sch.reorder(*outer, jo, halves, io, k, ii, ji)
                else:
                    sch.reorder(*outer, jo, io, k, ii, ji)
                rows = [ii]
            else:
                sch.reorder(jo, k, ji)
                outer, io, rows = [], None, []
            # Accumulate the 4 x width tile in a local buffer, written back once per tile.
            local = sch.cache_write(main.block_rv, 0, "local")
            sch.reverse_compute_at(local, io if io is not None else jo)
            if c_pad is not None:  # the valid part of the tile, copied out (then the epilogue)
                sch.reverse_compute_at(c_pad, io if io is not None else jo)
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
            tasks = [*outer, jo] + ([halves] if halves is not None else [])
            tile = sch.fuse(*tasks) if len(tasks) > 1 else jo
            sch.parallel(tile)
            # B's panel for this tile column (K x width), copied once into contiguous memory:
            # read in place, its rows are a whole row of B apart (4 KiB for N = 1024), and every
            # one falls in the same L1 set and in another TLB page.
            if b_pad is not None:
                panel_copy = b_pad
            elif rows and not packed:
                panel_copy = sch.cache_read(main.block_rv, b_index, "global")
            else:  # a GEMV reads each element of B once, pre-packed panels are read in place
                panel_copy = None
            if panel_copy is not None:
                sch.compute_at(panel_copy, tile)
            for ii in rows:
                sch.unroll(ii)
            sch.vectorize(ji)
            init = sch.decompose_reduction(main.block_rv, k)
            if c_pad is not None:
                # The tile's write-back goes from its accumulators to the output rows that
                # exist (the epilogue on the way), not through a padded copy of the whole result
                # (a buffer as large as the output, written and read once more).
                sch.compute_inline(local)
                local = None
            for blk in (init, local, panel_copy, c_pad):
                if blk is not None:
                    _vectorize_innermost(sch, blk, lanes)
            if a_pad is not None:
                # A's rows padded (zeros past the end): a loop of its own, once a call. Computed
                # at the row tile, every column panel copied its tile's rows again (44 copies
                # of A for a 128 x 512 x 2816 product; the Llama-style 1 x 128 prefill ran
                # 1.07x the time that way, 1 thread).
                _parallelize(sch, a_pad, lanes)
            if not epilogue_inlined:  # what is left runs as parallel loops of its own
                for b in after[inlined:]:
                    _parallelize(sch, b.block_rv, lanes)
            return sch, (m if packed and pad_rows else None)

    class Parallel(CPUScheduleRule):
        """Outer spatial loops in parallel, the innermost loop vectorized."""

        def apply(self, func, target, _tunable):
            from tvm import tirx

            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            parallel = self.schedule(func, target, parallel=True)
            return None if parallel is None else _serial_below(parallel, self.schedule(func, target, parallel=False))

        def schedule(self, func, target, parallel: bool):
            from tvm import s_tir
            from tvm.s_tir.dlight.analysis import normalize_prim_func
            from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

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
            if parallel:
                sch.parallel(fused)
            return sch

    class Reduction(dl.cpu.Reduction):
        """dlight's CPU reduction rule (softmax, norms: rows in parallel, vectorized; serial
        below SERIAL_BELOW output elements, as `Parallel`), after
        inlining the small injective blocks that span fewer leading axes than the rest (a
        per-row mask `[seq, 1] == 0` before a masked softmax over `[batch, heads, seq, seq]`).
        dlight parallelizes only the leading axes that every block shares: with that mask
        block left in, only `batch`, so the whole softmax ran on one core."""

        def apply(self, func, target, tunable):
            from tvm import s_tir, tirx
            from tvm.s_tir.dlight.analysis import normalize_prim_func

            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None or len(infos) < 2:
                return None
            leading = [len(b.dom_kind()) - len(b.dom_kind().lstrip("S")) for b in infos]
            for info, n in zip(infos[:-1], leading[:-1]):
                if info.is_injective() and n < max(leading):
                    try:
                        sch.compute_inline(info.block_rv)
                    except Exception:  # noqa: BLE001  (not inlinable: dlight decides as before)
                        pass
            inlined = sch.mod["main"]
            parallel = super().apply(inlined, target, tunable)
            if not isinstance(parallel, s_tir.Schedule):
                return parallel
            # dlight marks its row loop parallel with no option to leave it serial: the same
            # rule, with that one schedule primitive made a no-op for the call.
            with mock.patch.object(s_tir.Schedule, "parallel", lambda _sch, _loop: None):
                serial = super().apply(inlined, target, tunable)
            return _serial_below(parallel, serial)

    class GEMV(dl.cpu.GEMV):
        """dlight's GEMV, declining (not failing) where its analysis asserts: a reduction whose
        loop a size-1 axis removed (a top-1 router's MoE sum over its one choice) is matched as a
        GEMV and then found to have no reduction loop; the rules after it take the kernel."""

        def apply(self, func, target, tunable):
            try:
                return super().apply(func, target, tunable)
            except AssertionError:
                return None

    return [Matmul(), GEMV(), Reduction(), Parallel()]
