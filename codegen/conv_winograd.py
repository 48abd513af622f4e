"""The transforms of winograd F(2x2, 3x3) (ir/ops.py ``winograd_input``,
``winograd_output``); the 16 GEMMs between them are plain batched matmuls
with the transformed filters as a constant b (packed at compile time), run
by codegen/matmul.py's GEMM.  compiler/passes/winograd.py builds the graph.

Both transforms take one row of tiles per work item.

* winograd_input: per tile, the 16 input positions (row and column clamped
  into x, a flag for the ones outside: they read as 0) are computed once;
  then per channel 16 loads, B^T d B in 32 adds, and 16 stores, each to the
  row v[e, t] whose channels are contiguous.
* winograd_output: per tile, vectors of output channels: 16 loads of
  m[e, t, co:co+lanes] (contiguous), A^T m A in 24 adds, bias and the fused
  activation (``epilogue``), and each lane stored to its NCHW place; the
  second row / column of a tile is stored only where it is inside the output
  (odd OH / OW).
"""
from __future__ import annotations

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from ..ir.ops import winograd_tiles
from .conv import decompose
from .elementwise import MIN_PARALLEL_WORK
from .kernel import F32, Kernel, fconst, i64, loop, splat
from .lower import emitter
from .matmul import Access


def _bt_d_b(b: ir.IRBuilder, d):
    """B^T d B of a 4x4 list of values (winograd F(2x2, 3x3)'s input transform)."""
    def bt(c):   # B^T applied to a column of four
        return [b.fsub(c[0], c[2]), b.fadd(c[1], c[2]), b.fsub(c[2], c[1]), b.fsub(c[1], c[3])]
    cols = list(zip(*[bt([d[i][j] for i in range(4)]) for j in range(4)]))   # cols[a][j] = (B^T d)[a][j]
    return [bt(list(row)) for row in cols]


def _at_m_a(b: ir.IRBuilder, m):
    """A^T m A of a 4x4 list of values (the output transform): 2x2."""
    def at(c):
        return [b.fadd(b.fadd(c[0], c[1]), c[2]), b.fsub(b.fsub(c[1], c[2]), c[3])]
    rows = list(zip(*[at([m[a][j] for a in range(4)]) for j in range(4)]))    # rows[i][j] = (A^T m)[i][j]
    return [at(list(r)) for r in rows]


def _clamped(b: ir.IRBuilder, pos, size: int):
    """(pos clamped into [0, size), whether pos was inside)."""
    inside = b.and_(b.icmp_signed(">=", pos, i64(0)), b.icmp_signed("<", pos, i64(size)))
    return b.select(inside, pos, i64(0)), inside


@emitter("winograd_input")
def emit_winograd_input(k: Kernel, node: Node):
    b = k.b
    n, c, h, w = node.inputs[0].type.shape
    T = node.outputs[0].type.shape[1]
    pt, pl = node.attrs["pads"][:2]
    th_n, tw_n = winograd_tiles(h + pt + node.attrs["pads"][2] - 2, w + pl + node.attrs["pads"][3] - 2)
    items = n * th_n
    if items * tw_n * c == 0:
        k.finish()
        return 0, 1
    X, V = Access(k, k.args[0], dt.f32, 1), Access(k, k.args[-1], dt.f32, 1)
    zero = fconst(F32, 0.0)
    with loop(b, k.begin, k.end, name="item") as item:
        nn, th = decompose(b, item, [n, th_n])
        x_n = b.mul(nn, i64(c * h * w))
        rows = [_clamped(b, b.add(b.mul(th, i64(2)), i64(i - pt)), h) for i in range(4)]
        with loop(b, 0, tw_n, name="tw") as tw:
            t = b.add(b.mul(item, i64(tw_n)), tw)
            cols = [_clamped(b, b.add(b.mul(tw, i64(2)), i64(j - pl)), w) for j in range(4)]
            at = [[b.add(x_n, b.add(b.mul(rows[i][0], i64(w)), cols[j][0])) for j in range(4)] for i in range(4)]
            inside = [[b.and_(rows[i][1], cols[j][1]) for j in range(4)] for i in range(4)]
            outs = [b.mul(b.add(i64(e * T), t), i64(c)) for e in range(16)]
            with loop(b, 0, c, name="ci") as ci:
                plane = b.mul(ci, i64(h * w))
                d = [[b.select(inside[i][j], X.load(b.add(at[i][j], plane)), zero) for j in range(4)]
                     for i in range(4)]
                v = _bt_d_b(b, d)
                for e in range(16):
                    V.store(v[e // 4][e % 4], b.add(outs[e], ci))
    k.finish()
    return items, max(1, MIN_PARALLEL_WORK // max(1, 16 * tw_n * c))


@emitter("winograd_output")
def emit_winograd_output(k: Kernel, node: Node, epilogue=None):
    """``epilogue(value, n)``, if given, maps each f32 vector of n output channels
    to the values stored (a fused activation, as conv2d's)."""
    b = k.b
    n, co, oh, ow = node.attrs["shape"]
    th_n, tw_n = winograd_tiles(oh, ow)
    T = n * th_n * tw_n
    items = n * th_n
    lanes = k.target.lanes(32)
    M = Access(k, k.args[0], dt.f32, lanes)
    bias = Access(k, k.args[1], dt.f32, lanes) if len(node.inputs) == 2 else None
    out = Access(k, k.args[-1], dt.f32, 1)

    def tile(nn, t, oh0, ow0, row2, col2: bool):
        """The 2x2 outputs of tile t at (oh0, ow0); the second row where row2 (an i1 or
        True), the second column if col2."""
        def channels(c0, nl: int):
            vals = [[M.load(b.add(b.mul(b.add(i64(e * T), t), i64(co)), c0), nl) for e in range(4 * a, 4 * a + 4)]
                    for a in range(4)]
            y = _at_m_a(b, vals)
            if bias is not None:
                bv = bias.load(c0, nl)
                y = [[b.fadd(v, bv) for v in r] for r in y]
            if epilogue:
                y = [[epilogue(v, lanes) for v in r] for r in y]
            base = b.add(b.mul(b.add(b.mul(nn, i64(co)), c0), i64(oh * ow)), b.add(b.mul(oh0, i64(ow)), ow0))

            def store_row(i):
                for j in range(2 if col2 else 1):
                    for lane in range(nl):
                        out.store(b.extract_element(y[i][j], i64(lane)) if lanes > 1 else y[i][j],
                                  b.add(base, i64(lane * oh * ow + i * ow + j)))
            store_row(0)
            if row2 is True:
                store_row(1)
            else:
                with b.if_then(row2):
                    store_row(1)

        full = co - co % lanes
        if full:
            with loop(b, 0, full, lanes, name="co") as c0:
                channels(c0, lanes)
        if co % lanes:
            channels(i64(full), co % lanes)

    if items and co:
        with loop(b, k.begin, k.end, name="item") as item:
            nn, th = decompose(b, item, [n, th_n])
            oh0 = b.mul(th, i64(2))
            row2 = True if oh % 2 == 0 else b.icmp_signed("<", b.add(oh0, i64(1)), i64(oh))
            t0 = b.mul(item, i64(tw_n))
            whole = tw_n - ow % 2
            if whole:
                with loop(b, 0, whole, name="tw") as tw:
                    tile(nn, b.add(t0, tw), oh0, b.mul(tw, i64(2)), row2, True)
            if ow % 2:
                tile(nn, b.add(t0, i64(tw_n - 1)), oh0, i64(ow - 1), row2, False)
    k.finish()
    return items, max(1, MIN_PARALLEL_WORK // max(1, 16 * tw_n * co))
