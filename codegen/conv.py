"""Convolution and pooling over NCHW tensors: conv2d (direct, im2col-free; the
pointwise ones through the GEMM), maxpool2d, avgpool2d and global_avgpool.

A work item is one output row: (n, block of output channels, oh) for conv2d,
(n, c, oh) for the pools.  Shapes are static, so the width axis is planned
at compile time (``plan_tiles``): the row is cut into tiles of a few vectors
(LLVM vector types), and for every tile, vector and kernel column the
in-bounds lanes are known.  Interior tiles read whole vectors and run as one
loop; border tiles are straight-line code reading only their in-bounds
lanes (padding lanes get the reduction's identity from a constant select);
the last vector of a row is shifted back to end at the row's end.  Nothing
is checked per element at run time, and nothing outside the input row is
ever read.  With stride_w > 1 a vector is one contiguous load of the span
it covers and a shuffle.  The kernel rows depend on oh, known only at run
time: the in-bounds ones are a range computed once per row.

conv2d keeps a tile of accumulators in registers: CB output channels x U
vectors of the output width; each input vector loaded serves the CB
channels, each weight broadcast the U vectors.  This is the direct path.  A
pointwise conv2d (1x1, stride 1, no pads, groups 1: ``is_pointwise``) is the
product w[C_out, C_in] @ x[n][C_in, H*W] in NCHW as it is stored, and runs as
codegen/matmul.py's GEMM (``_emit_conv_gemm``: x packed per K block like any
run-time b; bias and the fused activation in the matmul's epilogue).  riscv64
has its own: output rows in scalar loops that LLVM vectorizes length-agnostically
(``_emit_conv_rows``, ``_emit_pool_rows``; global_avgpool is scalar loops there anyway).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node, TensorType, Value
from .elementwise import MIN_PARALLEL_WORK
from .kernel import (F32, I1, I32, Kernel, call_intrinsic, fconst, gep, hsum, i64, load_elem, load_vec, loop,
                     lltype, splat, store_elem, vtype, widen)
from .lower import emitter
from .matmul import Access, _stack_array, emit_matmul, imin

# Accumulator vectors a conv2d tile keeps in registers (16 vector registers on AVX2).
ACC_BUDGET = 8


# --- static planning of one spatial axis ----------------------------------------------

@dataclass(frozen=True)
class Axis:
    """One spatial axis of a sliding window: input position of output o and
    tap t is ``o*stride + t*dilation - pad``."""
    size: int       # input extent
    taps: int       # kernel extent
    stride: int
    dilation: int
    pad: int        # leading pad
    pad_end: int    # trailing pad
    out: int        # output extent

    def valid(self, o: int) -> range:
        """Taps of output o that land inside the input (a contiguous range)."""
        return self.taps_within(o, 0, self.size)

    def taps_within(self, o: int, lo: int, hi: int) -> range:
        """Taps t of output o with lo <= position < hi."""
        start = o * self.stride - self.pad
        first = max(0, -((start - lo) // self.dilation))          # ceil((lo - start) / d)
        last = min(self.taps, (hi - 1 - start) // self.dilation + 1) if hi - 1 >= start else 0
        return range(first, max(first, last))

    def inside_count(self, o: int) -> int:
        """Taps of output o within the explicitly padded input (not the ceil_mode overhang)."""
        return len(self.taps_within(o, -self.pad, self.size + self.pad_end))


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Vec:
    """One vector of a tile: ``offset`` columns from the tile start;
    ``runs[t]`` the lane range [a, e) whose input column for tap t is in
    bounds (None: no lane); ``store`` how many lanes (a prefix) to write;
    ``extra`` per-lane constants of the caller (the avgpool divisor)."""
    offset: int
    runs: tuple
    store: int
    extra: tuple = ()


@dataclass(frozen=True)
class Group:
    """``count`` consecutive tiles from column ``start`` that share their
    vectors' plan (None for a vector past the end of the row)."""
    start: int
    count: int
    vecs: tuple


@dataclass(frozen=True)
class Tiles:
    """The output width cut into tiles of ``unroll`` vectors of ``lanes``
    columns.  Each group becomes one loop (or one straight-line tile): the
    interior is one loop, each border a few straight-line tiles."""
    ax: Axis
    lanes: int
    unroll: int
    groups: tuple

    @property
    def width(self) -> int:
        return self.lanes * self.unroll

    def room(self, g: Group, v: Vec, t: int) -> int:
        """Input columns that may be read past the last lane's, for tap t, in
        every tile of the group (reads never leave the input row)."""
        last = g.start + (g.count - 1) * self.width + v.offset + self.lanes - 1
        return self.ax.size - 1 - (last * self.ax.stride - self.ax.pad + t * self.ax.dilation)

    def column(self, g: Group, v: Vec, t: int) -> int:
        """Input column of lane 0 for tap t in the group's first tile."""
        return (g.start + v.offset) * self.ax.stride - self.ax.pad + t * self.ax.dilation

    def window(self, g: Group, v: Vec, t: int) -> tuple[int, int, list[int]]:
        """What vector v reads for tap t: (first element relative to lane 0's
        position, element count, element of each lane).  A whole vector reads
        its span (with stride > 1 a whole lanes*stride block when the row has
        room); a partial one the span of a whole vector shifted inside the row
        (its column is static: such tiles do not loop), or, in a row narrower
        than that span, just the run's elements."""
        n, s = self.lanes, self.ax.stride
        a, e = v.runs[t]
        if n == 1:
            return 0, 1, [0]
        if (a, e) == (0, n):
            span = n * s if s > 1 and self.room(g, v, t) >= s - 1 else (n - 1) * s + 1
            return 0, span, [i * s for i in range(n)]
        assert g.count == 1
        col = self.column(g, v, t)
        span = (n - 1) * s + 1
        if self.ax.size >= span:
            start = min(col + a * s, self.ax.size - span)
        else:
            start, span = col + a * s, (e - a - 1) * s + 1
        return start - col, span, [col + i * s - start if a <= i < e else 0 for i in range(n)]


def plan_tiles(ax: Axis, lanes: int, unroll: int, extra=None) -> Tiles:
    """Tile ``ax.out`` columns.  The last vector of a row is shifted back to
    end at the row's end when the row has a full vector (it recomputes a few
    columns, bit for bit, instead of storing a partial vector); otherwise
    only its real lanes are stored."""
    width = lanes * unroll
    overlap = ax.out >= lanes
    groups: list[Group] = []
    for start in range(0, ax.out, width):
        vecs = []
        for j in range(unroll):
            v0 = start + j * lanes
            if v0 >= ax.out:
                vecs.append(None)
                continue
            if overlap and v0 + lanes > ax.out:
                v0 = ax.out - lanes
            cols = [v0 + i for i in range(lanes)]
            valid = [ax.valid(o) if o < ax.out else range(0) for o in cols]
            runs = []
            for t in range(ax.taps):
                on = [i for i, v in enumerate(valid) if t in v]  # contiguous
                runs.append((on[0], on[-1] + 1) if on else None)
            ext = tuple(extra(o) if o < ax.out else 0 for o in cols) if extra else ()
            vecs.append(Vec(v0 - start, tuple(runs), sum(o < ax.out for o in cols), ext))
        vecs = tuple(vecs)
        # only tiles without partial vectors loop: partial reads need static columns
        whole = all(v is None or all(r in (None, (0, lanes)) for r in v.runs) for v in vecs)
        if groups and whole and groups[-1].vecs == vecs:
            groups[-1] = Group(groups[-1].start, groups[-1].count + 1, vecs)
        else:
            groups.append(Group(start, 1, vecs))
    return Tiles(ax, lanes, unroll, tuple(groups))


def for_tiles(b: ir.IRBuilder, tiles: Tiles, body) -> None:
    """Emit ``body(ow0, group)`` for every tile (ow0 an i64 value)."""
    for g in tiles.groups:
        if g.count == 1:
            body(i64(g.start), g)
        else:
            with loop(b, g.start, g.start + g.count * tiles.width, tiles.width, name="ow") as ow0:
                body(ow0, g)


def vector_lanes(k: Kernel, out_width: int) -> int:
    """Lanes for rows of ``out_width`` columns: the target's f32 vector, or
    less for narrow rows (a power of two at least the width)."""
    return min(k.target.lanes(32), pow2_at_least(out_width))


def tap_range(b: ir.IRBuilder, start, ax: Axis, lo: int, hi: int):
    """Run-time [first, last) of the taps t in [0, taps) with lo <= start + t*d < hi
    (``start`` = o*stride - pad as an i64 value; last < first means none).
    Constants when every output has all its taps in range (no padding)."""
    if all(ax.taps_within(o, lo, hi) == range(ax.taps) for o in range(ax.out)):
        return i64(0), i64(ax.taps)
    d = ax.dilation
    a = b.sub(i64(lo), start)
    first = b.select(b.icmp_signed(">", a, i64(0)), b.sdiv(b.add(a, i64(d - 1)), i64(d)), i64(0))
    c = b.sub(i64(hi - 1), start)
    last = b.add(b.sdiv(c, i64(d)), i64(1))
    last = b.select(b.icmp_signed("<", last, i64(ax.taps)), last, i64(ax.taps))
    last = b.select(b.icmp_signed("<", c, i64(0)), i64(0), last)
    return first, last


def load_lanes(b: ir.IRBuilder, ptr, d: dt.DType, index, tiles: Tiles, g: Group, v: Vec, t: int,
               fill: float):
    """Vector ``v`` of the input for tap t, widened to f32 (a scalar when
    lanes == 1): lane i in v.runs[t] = [a, e) holds x[index + i*stride],
    the other lanes ``fill``.  ``index`` is lane 0's position in x (perhaps
    out of bounds); what is read is ``tiles.window``, inside the row."""
    n = tiles.lanes
    a, e = v.runs[t]
    ty = lltype(d)
    rel, span, lane_pos = tiles.window(g, v, t)
    at = b.add(index, i64(rel)) if rel else index
    if span == n and lane_pos == list(range(n)):
        x = load_elem(b, ptr, d, at, n)
    else:
        x = load_vec(b, ptr, ty, at, span) if span > 1 else b.insert_element(
            ir.Constant(ir.VectorType(ty, 1), ir.Undefined), b.load(gep(b, ptr, ty, at), typ=ty), i64(0))
        x = b.shuffle_vector(x, ir.Constant(x.type, ir.Undefined), ir.Constant(ir.VectorType(I32, n), lane_pos))
        x = widen(b, x, d, n)
    if (a, e) == (0, n):
        return x
    mask = ir.Constant(ir.VectorType(I1, n), [a <= i < e for i in range(n)])
    return b.select(mask, x, fconst(x.type, fill))


def store_prefix(b: ir.IRBuilder, value, ptr, d: dt.DType, index, n: int, m: int) -> None:
    """Store the first m of the n lanes of an f32 vector (rounded to d)."""
    if m == n:
        store_elem(b, value, ptr, d, index, n)
    elif m == 1:
        store_elem(b, b.extract_element(value, i64(0)), ptr, d, index)
    else:
        part = b.shuffle_vector(value, ir.Constant(value.type, ir.Undefined),
                                ir.Constant(ir.VectorType(I32, m), list(range(m))))
        store_elem(b, part, ptr, d, index, m)


def entry_alloca(b: ir.IRBuilder, ty):
    """A stack slot in the entry block (where SROA promotes it to registers)."""
    with b.goto_entry_block():
        return b.alloca(ty)


def decompose(b: ir.IRBuilder, item, dims: list[int]):
    """Split a flat row-major index over ``dims`` into i64 indices."""
    out = []
    for d in reversed(dims[1:]):
        out.append(b.urem(item, i64(d)))
        item = b.udiv(item, i64(d))
    out.append(item)
    return out[::-1]


def _axes(x_shape, kernel, strides, pads, dilations, out_hw):
    h, w = x_shape[2:]
    return (Axis(h, kernel[0], strides[0], dilations[0], pads[0], pads[2], out_hw[0]),
            Axis(w, kernel[1], strides[1], dilations[1], pads[1], pads[3], out_hw[1]))


def conv_item(b: ir.IRBuilder, item, p, cb: int):
    """Where work item ``item`` (n, block of cb output channels, oh) of conv plan p
    starts: (co0, x offset of its group's first input channel, w offset of channel
    co0, out offset of (n, co0, oh), ih0 = oh*stride - pad, and the in-bounds kernel
    rows [kh_lo, kh_hi))."""
    ah, aw = p.ah, p.aw
    n, blk, oh = decompose(b, item, [p.n, p.c_out // cb, ah.out])
    co0 = b.mul(blk, i64(cb))
    g = b.udiv(co0, i64(p.cog))
    x_base = b.mul(b.add(b.mul(n, i64(p.c_in)), b.mul(g, i64(p.cig))), i64(ah.size * aw.size))
    w_base = b.mul(co0, i64(p.cig * ah.taps * aw.taps))
    o_base = b.add(b.mul(b.add(b.mul(n, i64(p.c_out)), co0), i64(ah.out * aw.out)), b.mul(oh, i64(aw.out)))
    ih0 = b.sub(b.mul(oh, i64(ah.stride)), i64(ah.pad))
    return (co0, x_base, w_base, o_base, ih0, *tap_range(b, ih0, ah, 0, ah.size))


def pool_columns(aw: Axis, include_pad: bool):
    """avgpool's divisor per output column: in-bounds taps, or taps within the explicit pads."""
    return aw.inside_count if include_pad else lambda o: len(aw.valid(o))


def pool_item(b: ir.IRBuilder, item, planes: int, ah: Axis, aw: Axis, avg: bool, include_pad: bool):
    """Where pooling work item ``item`` (plane, oh) starts: (x offset of the plane, out
    offset of the row, ih0, in-bounds kernel rows [kh_lo, kh_hi), and for avg the rows
    counted in the divisor as f32 (they depend on oh, known at run time), else None)."""
    plane, oh = decompose(b, item, [planes, ah.out])
    ih0 = b.sub(b.mul(oh, i64(ah.stride)), i64(ah.pad))
    kh_lo, kh_hi = tap_range(b, ih0, ah, 0, ah.size)
    x_base = b.mul(plane, i64(ah.size * aw.size))
    o_base = b.add(b.mul(plane, i64(ah.out * aw.out)), b.mul(oh, i64(aw.out)))
    n_rows = None
    if avg:   # divisor = rows counted x columns counted
        lo, hi = tap_range(b, ih0, ah, -ah.pad, ah.size + ah.pad_end) if include_pad else (kh_lo, kh_hi)
        n_rows = b.sub(hi, lo)
        n_rows = b.sitofp(b.select(b.icmp_signed("<", n_rows, i64(0)), i64(0), n_rows), F32)
    return x_base, o_base, ih0, kh_lo, kh_hi, n_rows


# --- conv2d -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvPlan:
    """Static description of a conv2d node and of the direct path's tiling."""
    dtype: dt.DType
    n: int
    c_in: int
    c_out: int
    groups: int
    ah: Axis
    aw: Axis
    has_bias: bool
    cb: int       # output channels per work item (divides C_out / groups)
    tiles: Tiles

    @property
    def cig(self) -> int:
        return self.c_in // self.groups

    @property
    def cog(self) -> int:
        return self.c_out // self.groups


def conv_plan(node: Node, lanes: int) -> ConvPlan:
    """Shapes of ``node`` and the register tile for rows of ``lanes``-wide vectors."""
    x, w = node.inputs[0].type, node.inputs[1].type
    out = node.outputs[0].type
    a = node.attrs
    ah, aw = _axes(x.shape, w.shape[2:], a["strides"], a["pads"], a["dilations"], out.shape[2:])
    groups = a["groups"]
    cog = out.shape[1] // groups
    vectors = -(-aw.out // lanes)  # vectors per row
    # Few vectors per row: spend the accumulators on channels instead.
    cb_max = max(4, ACC_BUDGET // max(1, vectors))
    cb = max(c for c in range(1, cb_max + 1) if cog % c == 0) if cog else 1
    unroll = max(1, min(ACC_BUDGET // cb, vectors))
    return ConvPlan(x.dtype, x.shape[0], x.shape[1], out.shape[1], groups, ah, aw, len(node.inputs) == 3,
                    cb, plan_tiles(aw, lanes, unroll))


@emitter("conv2d")
def emit_conv2d(k: Kernel, node: Node, epilogue=None):
    """out[n, co, oh, ow] = bias[co] + sum over (ci, kh, kw) of x * w, f32 accumulation.
    ``epilogue(value, n)``, if given, maps each f32 vector of n output lanes to the
    values stored (codegen/fused.py: an activation applied before the store)."""
    out_w = node.outputs[0].type.shape[3]
    if k.target.name == "riscv64":
        return _emit_conv_rows(k, conv_plan(node, 1), epilogue)
    if is_pointwise(node):
        return _emit_conv_gemm(k, node, epilogue)
    return _emit_conv_direct(k, conv_plan(node, vector_lanes(k, out_w)), epilogue)


def is_pointwise(node: Node) -> bool:
    """A 1x1 convolution that reads every input pixel once, in place: groups 1,
    strides 1, no padding.  It is the product w[C_out, C_in] @ x[n][C_in, H*W]."""
    a, w = node.attrs, node.inputs[1].type
    return (a["groups"] == 1 and w.shape[2:] == (1, 1) and tuple(a["strides"]) == (1, 1)
            and not any(a["pads"]))


class _Operands:
    """``k`` seen by the matmul emitter with other arguments and constants
    (everything else is k's own: builder, target, work range, module)."""

    def __init__(self, k: Kernel, args: list, consts: list):
        self._k, self.args, self.consts = k, args, consts

    def __getattr__(self, name):
        return getattr(self._k, name)


def _emit_conv_gemm(k: Kernel, node: Node, epilogue=None):
    """A pointwise conv2d (``is_pointwise``) as codegen/matmul.py's GEMM: batch item n
    is y[n] = w[C_out, C_in] @ x[n][C_in, H*W], NCHW being that product's row-major
    layout.  w (a, plain storage) is read in place, x (b) packed per K block as any
    run-time b; bias[row] and the fused activation run in the matmul's epilogue."""
    x, w = node.inputs[0].type, node.inputs[1].type
    out = node.outputs[0].type
    n, c_in, h, wd = x.shape
    c_out = out.shape[1]
    mm = Node("matmul", (Value("w", TensorType(w.dtype, (c_out, c_in))),
                         Value("x", TensorType(x.dtype, (n, c_in, h * wd)))),
              (Value("y", TensorType(out.dtype, (n, c_out, h * wd))),))
    bias = Access(k, k.args[2], node.inputs[2].dtype, 1) if len(node.inputs) == 3 else None

    def gemm_epilogue(value, t, row, col, lanes, valid=None):
        if bias is not None:
            bv = bias.load(row)
            value = k.b.fadd(value, splat(k.b, bv, lanes) if lanes > 1 else bv)
        return epilogue(value, lanes) if epilogue else value

    consts = list(k.consts) + [None] * 2
    view = _Operands(k, [k.args[1], k.args[0], k.args[-1]], [consts[1], None])   # x is never packed
    return emit_matmul(view, mm, gemm_epilogue if bias is not None or epilogue else None)


def _emit_conv_direct(k: Kernel, p: ConvPlan, epilogue=None):
    b = k.b
    ah, aw, d, lanes = p.ah, p.aw, p.dtype, p.tiles.lanes
    x_ptr, w_ptr = k.args[0], k.args[1]
    bias_ptr = k.args[2] if p.has_bias else None
    out_ptr = k.args[-1]
    kk = ah.taps * aw.taps
    w_co_stride = p.cig * kk                # between output channels in w
    x_c_stride = ah.size * aw.size          # between input channels in x
    o_c_stride = ah.out * aw.out            # between output channels in out
    items = p.n * (p.c_out // p.cb) * ah.out
    if items == 0 or aw.out == 0:
        k.finish()
        return 0, 1
    vt = vtype(F32, lanes)

    with loop(b, k.begin, k.end, name="item") as item:
        co0, x_base, w_base, o_base, ih0, kh_lo, kh_hi = conv_item(b, item, p, p.cb)
        init = []
        for c in range(p.cb):
            v = load_elem(b, bias_ptr, d, b.add(co0, i64(c))) if bias_ptr is not None else fconst(F32, 0.0)
            init.append(splat(b, v, lanes) if lanes > 1 else v)

        def tile(ow0, grp: Group):
            live = {j: v for j, v in enumerate(grp.vecs) if v is not None}
            taps = [t for t in range(aw.taps) if any(v.runs[t] for v in live.values())]
            accs = {(c, j): entry_alloca(b, vt) for c in range(p.cb) for j in live}
            for (c, j), a in accs.items():
                b.store(init[c], a)
            if taps:
                # channel outer, kernel row inner: the rows read together lie in one
                # channel plane (a stride of H*W per channel would cost a TLB miss each)
                x_tile = b.add(x_base, b.sub(b.mul(ow0, i64(aw.stride)), i64(aw.pad)))
                with loop(b, 0, p.cig, name="ci") as ci:
                    x_ci = b.add(x_tile, b.mul(ci, i64(x_c_stride)))
                    w_ci = b.add(w_base, b.mul(ci, i64(kk)))
                    with loop(b, kh_lo, kh_hi, name="kh") as kh:
                        ih = b.add(ih0, b.mul(kh, i64(ah.dilation)))
                        # input column of (ow0, kw=0) in row ih of channel ci
                        x_row = b.add(x_ci, b.mul(ih, i64(aw.size)))
                        w_row = b.add(w_ci, b.mul(kh, i64(aw.taps)))
                        acc = {key: b.load(a) for key, a in accs.items()}
                        for t in taps:
                            xs = {j: load_lanes(b, x_ptr, d, b.add(x_row, i64(t * aw.dilation + v.offset * aw.stride)),
                                                p.tiles, grp, v, t, 0.0)
                                  for j, v in live.items() if v.runs[t]}
                            for c in range(p.cb):
                                wv = load_elem(b, w_ptr, d, b.add(w_row, i64(c * w_co_stride + t)))
                                wv = splat(b, wv, lanes) if lanes > 1 else wv
                                for j, xv in xs.items():
                                    acc[c, j] = call_intrinsic(k, "fmuladd", xv, wv, acc[c, j])
                        for key, a in accs.items():
                            b.store(acc[key], a)
            for (c, j), a in accs.items():
                idx = b.add(b.add(o_base, i64(c * o_c_stride + live[j].offset)), ow0)
                value = b.load(a)
                store_prefix(b, epilogue(value, lanes) if epilogue else value, out_ptr, d, idx, lanes, live[j].store)

        for_tiles(b, p.tiles, tile)
    k.finish()
    work = p.cb * aw.out * max(1, p.cig * kk)
    return items, max(1, MIN_PARALLEL_WORK // work)


# --- riscv64: output rows in scalar loops ------------------------------------------------
#
# On riscv64 conv2d and the pools accumulate whole output rows in stack arrays, tap by
# tap, in scalar loops over the output columns; LLVM vectorizes those loops length-
# agnostically (vsetvli strip-mining; strided loads for stride > 1), so the kernels use
# whatever VLEN the core has.  The in-bounds columns of each tap are a static range: one
# loop over the columns every tap covers takes all taps at once, then short loops take
# each tap's columns at the borders.  No reassociation: results do not depend on VLEN.

def tap_columns(aw: Axis, t: int) -> tuple[int, int]:
    """[first, last) output columns whose tap t lands inside the row."""
    off = t * aw.dilation - aw.pad
    first = max(0, -(off // aw.stride)) if off < 0 else 0          # ceil(-off / stride)
    last = min(aw.out, (aw.size - 1 - off) // aw.stride + 1) if aw.size - 1 >= off else 0
    return first, max(first, last)


def column_runs(aw: Axis, taps) -> list[tuple[int, int, list[int]]]:
    """(first, last, taps) loops covering every in-bounds (column, tap) once: the
    columns all ``taps`` share, then each tap's columns on either side."""
    cols = {t: tap_columns(aw, t) for t in taps}
    lo, hi = max((c[0] for c in cols.values()), default=0), min((c[1] for c in cols.values()), default=0)
    if lo >= hi:
        return [(a, e, [t]) for t, (a, e) in cols.items() if a < e]
    runs = [(lo, hi, list(taps))]
    for t, (a, e) in cols.items():
        runs += [(a, lo, [t])] if a < lo else []
        runs += [(hi, e, [t])] if hi < e else []
    return runs


ROW_CHUNK = 4096   # output columns a row loop keeps on the stack at once (16 KiB per row)


def _row_arrays(k: Kernel, n: int, width: int, name: str):
    return [Access(k, _stack_array(k, min(width, ROW_CHUNK), f"{name}{i}"), dt.f32, 1) for i in range(n)]


def _column_chunks(b: ir.IRBuilder, width: int, body):
    """body(c0, c1) for column chunks [c0, c1) of at most ROW_CHUNK (i64 values): one
    chunk (constants) for rows that fit, else a loop, so wide rows do not overflow
    the stack."""
    if width <= ROW_CHUNK:
        body(i64(0), i64(width))
        return
    with loop(b, 0, width, ROW_CHUNK, name="chunk") as c0:
        body(c0, imin(b, b.add(c0, i64(ROW_CHUNK)), width))


def _clamp_run(b: ir.IRBuilder, first: int, last: int, c0, c1):
    """The run [first, last) within the chunk [c0, c1)."""
    return b.select(b.icmp_signed(">", c0, i64(first)), c0, i64(first)), imin(b, c1, last)


def _emit_conv_rows(k: Kernel, p: ConvPlan, epilogue=None):
    b = k.b
    ah, aw, d = p.ah, p.aw, p.dtype
    x_ptr, w_ptr = k.args[0], k.args[1]
    bias_ptr = k.args[2] if p.has_bias else None
    out_ptr = k.args[-1]
    kk = ah.taps * aw.taps
    cb = max(c for c in range(1, 5) if p.cog % c == 0) if p.cog else 1   # channels sharing each x load
    items = p.n * (p.c_out // cb) * ah.out
    if items == 0 or aw.out == 0:
        k.finish()
        return 0, 1
    rows = _row_arrays(k, cb, aw.out, "orow")
    runs = column_runs(aw, range(aw.taps))
    with loop(b, k.begin, k.end, name="item") as item:
        co0, x_base, w_base, o_base, ih0, kh_lo, kh_hi = conv_item(b, item, p, cb)
        init = [load_elem(b, bias_ptr, d, b.add(co0, i64(c))) if bias_ptr is not None else fconst(F32, 0.0)
                for c in range(cb)]

        def chunk(c0, c1):   # output columns [c0, c1), at rows[c][ow - c0]
            with loop(b, c0, c1, name="ow0") as ow:
                for c in range(cb):
                    rows[c].store(init[c], b.sub(ow, c0))
            with loop(b, 0, p.cig, name="ci") as ci:
                with loop(b, kh_lo, kh_hi, name="kh") as kh:
                    ih = b.add(ih0, b.mul(kh, i64(ah.dilation)))
                    x_row = b.add(b.add(x_base, b.mul(ci, i64(ah.size * aw.size))), b.mul(ih, i64(aw.size)))
                    w_row = b.add(w_base, b.add(b.mul(ci, i64(kk)), b.mul(kh, i64(aw.taps))))
                    ws = {(c, t): load_elem(b, w_ptr, d, b.add(w_row, i64(c * p.cig * kk + t)))
                          for c in range(cb) for t in range(aw.taps)}
                    for first, last, taps in runs:
                        with loop(b, *_clamp_run(b, first, last, c0, c1), name="ow") as ow:
                            x_at = b.add(x_row, b.mul(ow, i64(aw.stride)))
                            xs = [load_elem(b, x_ptr, d, b.add(x_at, i64(t * aw.dilation - aw.pad))) for t in taps]
                            at = b.sub(ow, c0)
                            for c in range(cb):
                                acc = rows[c].scalar(at)
                                for t, xv in zip(taps, xs):
                                    acc = call_intrinsic(k, "fmuladd", xv, ws[c, t], acc)
                                rows[c].store(acc, at)
            with loop(b, c0, c1, name="ows") as ow:
                for c in range(cb):
                    value = rows[c].scalar(b.sub(ow, c0))
                    store_elem(b, epilogue(value, 1) if epilogue else value, out_ptr, d,
                               b.add(o_base, b.add(i64(c * ah.out * aw.out), ow)))

        _column_chunks(b, aw.out, chunk)
    k.finish()
    work = cb * aw.out * max(1, p.cig * kk)
    return items, max(1, MIN_PARALLEL_WORK // work)


def _emit_pool_rows(k: Kernel, node: Node, kind: str, ah: Axis, aw: Axis, include_pad: bool):
    b = k.b
    x, d = node.inputs[0].type, node.inputs[0].type.dtype
    planes = x.shape[0] * x.shape[1]
    is_max = kind == "max"
    x_ptr, out_ptr = k.args
    (row,) = _row_arrays(k, 1, aw.out, "prow")
    runs = column_runs(aw, range(aw.taps))
    if not is_max:   # columns counted per output column (static), as an f32 table
        count = pool_columns(aw, include_pad)
        tab_ty = ir.ArrayType(F32, aw.out)
        tab = ir.GlobalVariable(k.module, tab_ty, f"{k.name}.cols")
        tab.global_constant, tab.linkage = True, "private"
        tab.initializer = ir.Constant(tab_ty, [ir.Constant(F32, float(count(o))) for o in range(aw.out)])
    with loop(b, k.begin, k.end, name="item") as item:
        x_base, o_base, ih0, kh_lo, kh_hi, n_rows = pool_item(b, item, planes, ah, aw, not is_max, include_pad)

        def chunk(c0, c1):   # output columns [c0, c1), at row[ow - c0]
            with loop(b, c0, c1, name="ow0") as ow:
                row.store(fconst(F32, -math.inf if is_max else 0.0), b.sub(ow, c0))
            with loop(b, kh_lo, kh_hi, name="kh") as kh:
                x_row = b.add(x_base, b.mul(b.add(ih0, b.mul(kh, i64(ah.dilation))), i64(aw.size)))
                for first, last, taps in runs:
                    with loop(b, *_clamp_run(b, first, last, c0, c1), name="ow") as ow:
                        x_at = b.add(x_row, b.mul(ow, i64(aw.stride)))
                        acc = row.scalar(b.sub(ow, c0))
                        for t in taps:
                            xv = load_elem(b, x_ptr, d, b.add(x_at, i64(t * aw.dilation - aw.pad)))
                            # maximum propagates NaN, as numpy's max does
                            acc = call_intrinsic(k, "maximum", acc, xv) if is_max else b.fadd(acc, xv)
                        row.store(acc, b.sub(ow, c0))
            with loop(b, c0, c1, name="ows") as ow:
                val = row.scalar(b.sub(ow, c0))
                if not is_max:
                    val = b.fdiv(val, b.fmul(n_rows, b.load(gep(b, tab, F32, ow), typ=F32)))
                store_elem(b, val, out_ptr, d, b.add(o_base, ow))

        _column_chunks(b, aw.out, chunk)
    k.finish()
    return planes * ah.out, max(1, MIN_PARALLEL_WORK // (aw.out * ah.taps * aw.taps))


# --- pooling ------------------------------------------------------------------------------

POOL_UNROLL = 4  # independent accumulator vectors per pooling tile


def _emit_pool(k: Kernel, node: Node, kind: str):
    """maxpool2d (kind "max") or avgpool2d ("avg"): one work item per output row."""
    b = k.b
    x, out = node.inputs[0].type, node.outputs[0].type
    a = node.attrs
    ah, aw = _axes(x.shape, a["kernel"], a["strides"], a["pads"], a.get("dilations", (1, 1)), out.shape[2:])
    d = x.dtype
    planes = x.shape[0] * x.shape[1]
    items = planes * ah.out
    if items == 0 or aw.out == 0:
        k.finish()
        return 0, 1
    is_max = kind == "max"
    include_pad = not is_max and a["count_include_pad"]
    if k.target.name == "riscv64":
        return _emit_pool_rows(k, node, kind, ah, aw, include_pad)
    lanes = vector_lanes(k, aw.out)
    cols = None if is_max else pool_columns(aw, include_pad)
    tiles = plan_tiles(aw, lanes, max(1, min(POOL_UNROLL, -(-aw.out // lanes))), cols)
    fill = -math.inf if is_max else 0.0
    vt = vtype(F32, lanes)
    x_ptr, out_ptr = k.args
    with loop(b, k.begin, k.end, name="item") as item:
        x_base, o_base, ih0, kh_lo, kh_hi, n_rows = pool_item(b, item, planes, ah, aw, not is_max, include_pad)
        if not is_max and lanes > 1:
            n_rows = splat(b, n_rows, lanes)

        def tile(ow0, grp: Group):
            live = {j: v for j, v in enumerate(grp.vecs) if v is not None}
            taps = [t for t in range(aw.taps) if any(v.runs[t] for v in live.values())]
            accs = {j: entry_alloca(b, vt) for j in live}
            for acc in accs.values():
                b.store(fconst(vt, fill), acc)
            if taps:
                with loop(b, kh_lo, kh_hi, name="kh") as kh:
                    ih = b.add(ih0, b.mul(kh, i64(ah.dilation)))
                    x_row = b.add(b.add(x_base, b.mul(ih, i64(aw.size))),
                                  b.sub(b.mul(ow0, i64(aw.stride)), i64(aw.pad)))
                    vals = {j: b.load(acc) for j, acc in accs.items()}
                    for t in taps:
                        for j, v in live.items():
                            if not v.runs[t]:
                                continue
                            xv = load_lanes(b, x_ptr, d, b.add(x_row, i64(t * aw.dilation + v.offset * aw.stride)),
                                            tiles, grp, v, t, fill)
                            # maximum propagates NaN, as numpy's max does
                            vals[j] = call_intrinsic(k, "maximum", vals[j], xv) if is_max else b.fadd(vals[j], xv)
                    for j, acc in accs.items():
                        b.store(vals[j], acc)
            for j, acc in accs.items():
                val = b.load(acc)
                if not is_max:
                    cols = live[j].extra
                    val = b.fdiv(val, b.fmul(n_rows, ir.Constant(vt, [float(i) for i in cols]) if lanes > 1
                                             else fconst(F32, float(cols[0]))))
                store_prefix(b, val, out_ptr, d, b.add(o_base, b.add(ow0, i64(live[j].offset))), lanes, live[j].store)

        for_tiles(b, tiles, tile)
    k.finish()
    work = aw.out * ah.taps * aw.taps
    return items, max(1, MIN_PARALLEL_WORK // work)


@emitter("maxpool2d")
def emit_maxpool2d(k: Kernel, node: Node):
    """Max over the in-bounds taps of each window (padding never wins; no taps: -inf)."""
    return _emit_pool(k, node, "max")


@emitter("avgpool2d")
def emit_avgpool2d(k: Kernel, node: Node):
    """Sum of the in-bounds taps / the reference's count (explicit pads counted
    with count_include_pad, the ceil_mode overhang never)."""
    return _emit_pool(k, node, "avg")


@emitter("global_avgpool")
def emit_global_avgpool(k: Kernel, node: Node):
    """Mean of each (n, c) plane: one work item per plane; the sum runs over
    POOL_UNROLL vector accumulators, then single vectors, then scalars."""
    b = k.b
    x = node.inputs[0].type
    d = x.dtype
    planes, size = x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]
    if planes == 0:
        k.finish()
        return 0, 1
    lanes = k.target.lanes(32)
    u = POOL_UNROLL
    x_ptr, out_ptr = k.args
    vt = vtype(F32, lanes)
    with loop(b, k.begin, k.end, name="plane") as plane:
        base = b.mul(plane, i64(size))
        accs = [entry_alloca(b, vt) for _ in range(u)]
        for acc in accs:
            b.store(fconst(vt, 0.0), acc)
        total = entry_alloca(b, F32)
        b.store(fconst(F32, 0.0), total)
        pos = 0
        for width, nacc in ((lanes * u, u), (lanes, 1)):
            count = (size - pos) // width
            if count:
                with loop(b, pos, pos + count * width, width, name="hw") as i:
                    for j in range(nacc):
                        xv = load_elem(b, x_ptr, d, b.add(base, b.add(i, i64(j * lanes))), lanes)
                        b.store(b.fadd(b.load(accs[j]), xv), accs[j])
            pos += count * width
        if pos < size:
            with loop(b, pos, size, name="tail") as i:
                b.store(b.fadd(b.load(total), load_elem(b, x_ptr, d, b.add(base, i))), total)
        vsum = b.load(accs[0])
        for acc in accs[1:]:
            vsum = b.fadd(vsum, b.load(acc))
        s = b.fadd(b.load(total), hsum(k, vsum) if lanes > 1 else vsum)
        store_elem(b, b.fdiv(s, fconst(F32, float(size))), out_ptr, d, plane)
    k.finish()
    return planes, max(1, MIN_PARALLEL_WORK // size)
