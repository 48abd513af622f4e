"""``matmul_q`` with float activations on riscv64 (with or without V): the
weights in a row layout that scalar loops read element by element, so LLVM's
loop vectorizer makes the column loops vector-length agnostic (``vsetvli``
strip-mining, whatever VLEN the core has) and rv64gc runs the same loops
scalar.  Numerics as the other matmul_q kernels: f32 accumulation per group,
the group's scale (and zero point) applied once per group and column.

Row layout (``pack_rows``, chosen by the packer for riscv64 targets): columns
are cut into blocks of BW = 512 (the last one narrower, w columns), q stored
block after block, each block row after row ([blocks][K][row bytes]), so a
work item (one block) streams one contiguous run:

* i8: a block row is its w values of q (two's complement);
* i4: a block row is h = ceil(w / 2) bytes, byte j holding column j in the
  low nibble and column j + h in the high nibble (two's complement; 0 past w):
  both halves decode with shifts and land in contiguous accumulators.

Scales and minimums (float zeros) stay plain ([groups][N], their dtype), and
so do two-level scales' u8 sub-scales and sub-minimums and their supers
([super-blocks][N][2]); zero points are stored as one i8 per element ([groups][N]).

Kernel: work items are (block, tile of up to RT rows of x), block major.  Per
group, for U rows of q at a time, the column loop adds x[r, k] * q[k, j] into
f32 group sums on the stack for the RT rows (each weight decoded once for the
tile); then y[r, j] += scale * (sum - zero * sum_k x[r, k]), or with
minimums y[r, j] += scale * (sum + 8 * sum_k x[r, k]) + minimum * sum_k x[r, k].

activations=int8 (``i8act_blocks``): the caller quantizes x (codegen/matmul_q.py,
the reference's rounding); the column loops add xq * q exactly in i32 (RVV:
vwmul / vwmacc from i16), and per group y += f32(d * scale) * f32(sum - zero *
sum(xq)), unfused: bit for bit the reference.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from ..ir.ops import i8act_segments
from .kernel import F32, I8, I32, I64, Kernel, fconst, fold_loop, gep, i64, last_chunk, loop
from .matmul import Access, _stack_array, cdiv, fma

BW = 512         # columns per block
RT = 4           # rows of x per tile (share each decoded weight)
U = 4            # rows of q per pass of the column loop (group sums loaded and stored once per U)
MIN_PARALLEL_BYTES = 1 << 17


def uses_rows(target) -> bool:
    """Whether a dense matmul_q is read in the row layout on ``target``."""
    return target is not None and target.name == "riscv64"


def load_q(b, ptr, index, i4: bool, hi: bool = False):
    """The i8 q at byte ``index`` of ``ptr``; i4: the byte's low nibble (hi: its high
    one), sign-extended by shifts."""
    v = b.load(gep(b, ptr, I8, index), typ=I8)
    return b.ashr(v if hi else b.shl(v, ir.Constant(I8, 4)), ir.Constant(I8, 4)) if i4 else v


class RowLayout:
    """Sizes of the row layout of one matmul_q node."""

    def __init__(self, node: Node):
        q = node.inputs[1].type
        self.K, self.N = q.shape
        self.bits = 4 if q.dtype is dt.i4 else 8
        self.nblk = cdiv(self.N, BW)
        self.last = self.N - (self.nblk - 1) * BW   # columns of the last block

    def row_bytes(self, w: int) -> int:
        return w if self.bits == 8 else cdiv(w, 2)


def pack_rows(node: Node, index: int, a: np.ndarray) -> bytes | None:
    """q (input 1) in the row layout, zero points (input 3) as i8; scales and
    minimums (float zeros) plain."""
    if index == 2 or index == 4 or node.inputs[index].type.dtype in (dt.f32, dt.f16, dt.u8):
        return None
    q = np.asarray(a).astype(np.int8)
    if index == 3:
        return q.tobytes()
    L = RowLayout(node)
    out = []
    for blk in range(L.nblk):
        cols = q[:, blk * BW:blk * BW + BW]
        if L.bits == 4:
            h = L.row_bytes(cols.shape[1])
            hi = np.zeros((L.K, h), np.int8)
            hi[:, :cols.shape[1] - h] = cols[:, h:]
            cols = (cols[:, :h].view(np.uint8) & 0xF) | (hi.view(np.uint8) << 4)
        out.append(np.ascontiguousarray(cols).tobytes())
    return b"".join(out)


def emit_rows(k: Kernel, node: Node):
    """The tile loop: work item = (column block of BW, tile of up to RT rows of x); the
    last tile and the last block are the short ones (static code per size, ``last_chunk``)."""
    L = RowLayout(node)
    rows = math.prod(node.inputs[0].type.shape[:-1])
    if rows * L.N == 0:
        k.finish()
        return 0, 1
    code = RowsCode(k, node, L)
    b = k.b
    ntiles = cdiv(rows, RT)
    with loop(b, k.begin, k.end, name="item") as item:
        blk, ti = b.udiv(item, i64(ntiles)), b.urem(item, i64(ntiles))
        m0 = b.mul(ti, i64(RT))
        last_chunk(b, ti, ntiles, rows % RT or RT, RT, lambda rt: last_chunk(
            b, blk, L.nblk, L.last, BW, lambda w: code.tile(blk, w, m0, rt), lone="plain"))
    k.finish()
    item_bytes = L.K * L.row_bytes(BW)
    return L.nblk * ntiles, max(1, -(-MIN_PARALLEL_BYTES // max(1, item_bytes)))


class RowsCode:
    """The code of one float-activation row-layout kernel: a tile's row prologue
    (``tile``), its groups (``one_group``: the U-row passes of the column loop into
    the group sums, ``group_pass``), and the group's fold into the row sums (``fold``)."""

    def __init__(self, k: Kernel, node: Node, L: RowLayout):
        self.k, self.b, self.L = k, k.b, L
        x_t, y_t = node.inputs[0].type, node.outputs[0].type
        self.group = node.attrs["group"]
        self.X = Access(k, k.args[0], x_t.dtype, 1)
        self.W = k.args[1]
        self.S = Access(k, k.args[2], node.inputs[2].type.dtype, 1)
        self.Y = Access(k, k.args[-1], y_t.dtype, 1)
        zeros = node.inputs[3] if len(node.inputs) > 3 else None
        self.supers = supers = len(node.inputs) > 4    # two-level: u8 scales and zeros times supers [S][N][2]
        self.per_super = node.attrs.get("super_group", 0) // self.group
        # float zeros (or two-level): minimums, q + 8 the code
        self.has_mins = has_mins = zeros is not None and (zeros.type.dtype in dt.FLOATS or supers)
        self.has_zeros = zeros is not None
        self.MINS = Access(k, k.args[3], zeros.type.dtype, 1) if has_mins else None
        self.SUP = Access(k, k.args[4], node.inputs[4].type.dtype, 1) if supers else None
        self.gsum = Access(k, _stack_array(k, RT * BW, "gsum"), dt.f32, 1)
        self.yacc = Access(k, _stack_array(k, RT * BW, "yacc"), dt.f32, 1)
        self.zero = fconst(F32, 0.0)

    def decode(self, wrow, j, hi: bool):
        """Column j (hi: j + h) of a block row, as f32."""
        b = self.b
        return b.sitofp(load_q(b, self.W, b.add(wrow, j), self.L.bits == 4, hi), F32)

    def group_pass(self, wblk, w, xrow, rt, k0, nk):
        """gsum[r, :w] += sum over rows k0 .. k0+nk of x[r, k] * q[k, :w]."""
        b, L, X, gsum = self.b, self.L, self.X, self.gsum
        rb = L.row_bytes(w)
        xs = [[X.scalar(b.add(xrow[r], b.add(k0, i64(u)))) for u in range(nk)] for r in range(rt)]
        wrows = [b.add(wblk, b.mul(b.add(k0, i64(u)), i64(rb))) for u in range(nk)]
        halves = [(False, 0, rb)] if L.bits == 8 else [(False, 0, rb), (True, rb, w - rb)]
        for hi, off, width in halves:
            if width <= 0:
                continue
            with loop(b, 0, width, name="j") as j:
                ws = [self.decode(wrows[u], j, hi) for u in range(nk)]
                for r in range(rt):
                    at = b.add(j, i64(r * BW + off))
                    s = gsum.scalar(at)
                    for u in range(nk):
                        s = fma(self.k, xs[r][u], ws[u], s)
                    gsum.store(s, at)

    def one_group(self, ctx, g, k0, glen):
        """Group g (rows [k0, k0+glen) of q): its sums, then its fold into yacc."""
        b, X = self.b, self.X
        wblk, col0, xrow, w, rt = ctx
        with loop(b, 0, rt * BW, name="gz") as i:
            self.gsum.store(self.zero, i)
        with loop(b, 0, glen - glen % U, U, name="kk") as kk:
            self.group_pass(wblk, w, xrow, rt, b.add(k0, kk), U)
        for u in range(glen - glen % U, glen):
            self.group_pass(wblk, w, xrow, rt, b.add(k0, i64(u)), 1)

        def xs(r):   # sum of the group's x in row r (the zero points' term)
            return fold_loop(b, 0, glen, [self.zero],
                             lambda i, a: [b.fadd(a[0], X.scalar(b.add(xrow[r], b.add(k0, i))))], name="xs")[0]
        xsum = [xs(r) for r in range(rt)] if self.has_zeros else None
        self.fold(ctx, g, xsum)

    def fold(self, ctx, g, xsum):
        """yacc[r, :w] += scale * (gsum - zero * xsum) (+ minimum * xsum) for group g."""
        k, b, L = self.k, self.b, self.L
        has_mins, has_zeros, supers = self.has_mins, self.has_zeros, self.supers
        wblk, col0, xrow, w, rt = ctx
        with loop(b, 0, w, name="c") as j:
            col = b.add(b.add(b.mul(g, i64(L.N)), col0), j)
            s = self.S.scalar(col)
            mn = self.MINS.scalar(col) if has_mins else None
            if supers:   # scale = d * sub-scale, minimum = dmin * sub-minimum (exact products)
                sup = b.mul(b.add(b.mul(b.udiv(g, i64(self.per_super)), i64(L.N)), b.add(col0, j)), i64(2))
                s = b.fmul(self.SUP.scalar(sup), b.uitofp(s, F32))
                mn = b.fmul(self.SUP.scalar(b.add(sup, i64(1))), b.uitofp(mn, F32))
            for r in range(rt):
                t = self.gsum.scalar(b.add(j, i64(r * BW)))
                if has_mins:   # (q + 8) * scale + minimum
                    t = fma(k, fconst(F32, 8.0), xsum[r], t)
                elif has_zeros:
                    z = b.sitofp(b.load(gep(b, k.args[3], I8, col), typ=I8), F32)
                    t = b.fsub(t, b.fmul(z, xsum[r]))
                at = b.add(j, i64(r * BW))
                y = fma(k, s, t, self.yacc.scalar(at))
                self.yacc.store(fma(k, mn, xsum[r], y) if has_mins else y, at)

    def tile(self, blk, w, m0, rt):
        """Rows [m0, m0+rt) of x against column block blk (w columns): the row prologue
        (yacc zeroed, row offsets), the groups, the rows stored."""
        b, L, yacc = self.b, self.L, self.yacc
        K, N, group = L.K, L.N, self.group
        wblk = b.mul(blk, i64(K * L.row_bytes(BW)))
        col0 = b.mul(blk, i64(BW))
        xrow = [b.mul(b.add(m0, i64(r)), i64(K)) for r in range(rt)]
        with loop(b, 0, rt * BW, name="z") as i:
            yacc.store(self.zero, i)
        ctx = (wblk, col0, xrow, w, rt)
        full = K // group
        with loop(b, 0, full, name="g") as g:
            self.one_group(ctx, g, b.mul(g, i64(group)), group)
        if K % group:
            self.one_group(ctx, i64(full), i64(full * group), K % group)
        for r in range(rt):
            yrow = b.add(b.mul(b.add(m0, i64(r)), i64(N)), col0)
            with loop(b, 0, w, name="st") as j:
                self.Y.store(yacc.scalar(b.add(j, i64(r * BW))), b.add(yrow, j))


def i8act_blocks(k: Kernel, node: Node, xq, dq, qsum, KP: int, GP: int, span: int):
    """matmul_q {activations=int8} in the row layout: given the stack buffers the
    caller's quantization fills (xq: i8 codes [rows][KP], segments GP apart; dq: d
    per row and activation group; qsum: sum(xq) per row and segment; segments as
    ``ir.ops.i8act_segments``), returns ``blocks(r0, nr)``, which emits every
    column block of this call's range against rows r0 .. r0+nr-1, and the number of
    work items (blocks).  Per segment the sums of xq * q are exact in i32 (spans of at
    most ``span`` rows, summed in i64 when a segment is longer); then, as the reference,
    y += f32(d * scale) * f32(sum - zero * sum(xq)), unfused, segment by segment."""
    code = I8RowsCode(k, node, xq, dq, qsum, KP, GP, span)
    return code.blocks, code.L.nblk


class I8RowsCode:
    """The code of the int8-activation row-layout kernel (``i8act_blocks``): the
    block loop (``blocks``: tiles of RT rows, then single rows), a tile's row
    prologue (``tile``), a segment's exact sums (``group_dot`` over ``span_pass``)
    and their fold into the row sums (``fold``)."""

    def __init__(self, k: Kernel, node: Node, xq, dq, qsum, KP: int, GP: int, span: int):
        self.k, self.b, self.xq, self.dq, self.qsum, self.KP, self.GP, self.span = k, k.b, xq, dq, qsum, KP, GP, span
        self.L = L = RowLayout(node)
        K = L.K
        self.seg, self.gw, self.ga = seg, gw, ga = i8act_segments(K, node.attrs["group"],
                                                                  node.attrs.get("act_group", 0))
        self.group = group = seg   # the loops below run per segment
        self.G, self.GA = cdiv(K, seg), cdiv(K, ga)
        self.S = Access(k, k.args[2], node.inputs[2].type.dtype, 1)
        self.Y = Access(k, k.args[-1], node.outputs[0].type.dtype, 1)
        zeros = node.inputs[3] if len(node.inputs) > 3 else None
        self.supers = supers = len(node.inputs) > 4   # two-level: u8 sub-scales and sub-minimums times supers [S][N][2]
        self.per_super = node.attrs.get("super_group", 0) // node.attrs["group"]
        # minimums: the code is q + 8
        self.mins = mins = zeros is not None and (zeros.type.dtype in dt.FLOATS or supers)
        self.MINS = Access(k, k.args[3], zeros.type.dtype, 1) if mins else None
        self.SUP = Access(k, k.args[4], node.inputs[4].type.dtype, 1) if supers else None
        self.has_zeros = zeros is not None and not mins
        self.wide = wide = group > span
        self.iacc = _stack_array(k, RT * BW, "iacc")
        self.lacc = _stack_array(k, 2 * RT * BW, "lacc") if wide else None
        self.yacc = Access(k, _stack_array(k, RT * BW, "yacc"), dt.f32, 1)

    def at(self, ptr, ty, i):
        return gep(self.b, ptr, ty, i)

    def decode(self, wrow, j, hi: bool):
        b = self.b
        return b.sext(load_q(b, self.k.args[1], b.add(wrow, j), self.L.bits == 4, hi), I32)

    def span_pass(self, wblk, w, rls, xbase, k0, nk):
        """iacc[r, :w] += sum over rows k0 .. k0+nk of xq[r, k] * q[k, :w] (i32)."""
        b, L, at, iacc = self.b, self.L, self.at, self.iacc
        rb = L.row_bytes(w)
        xs = [[b.sext(b.load(at(self.xq, I8, b.add(xbase[t], b.add(k0, i64(u)))), typ=I8), I32) for u in range(nk)]
              for t in range(len(rls))]
        wrows = [b.add(wblk, b.mul(b.add(k0, i64(u)), i64(rb))) for u in range(nk)]
        for hi, off, width in ([(False, 0, rb)] if L.bits == 8 else [(False, 0, rb), (True, rb, w - rb)]):
            if width <= 0:
                continue
            with loop(b, 0, width, name="j") as j:
                ws = [self.decode(wrows[u], j, hi) for u in range(nk)]
                for t in range(len(rls)):
                    p = at(iacc, I32, b.add(j, i64(t * BW + off)))
                    s = b.load(p, typ=I32)
                    for u in range(nk):
                        s = b.add(s, b.mul(xs[t][u], ws[u]))
                    b.store(s, p)

    def group_dot(self, wblk, w, rls, xbase, g, k0, glen):
        """The group's exact sums into iacc (i32) or lacc (i64, a long group)."""
        b, at, iacc, lacc, span = self.b, self.at, self.iacc, self.lacc, self.span

        def zero(ptr, ty):
            with loop(b, 0, len(rls) * BW, name="z") as i:
                b.store(ir.Constant(ty, 0), at(ptr, ty, i))
        if self.wide:
            zero(lacc, I64)
        for s0 in range(0, glen, span):
            n = min(span, glen - s0)
            zero(iacc, I32)
            base = b.add(k0, i64(s0))
            with loop(b, 0, n - n % U, U, name="kk") as kk:
                self.span_pass(wblk, w, rls, xbase, b.add(base, kk), U)
            for u in range(n - n % U, n):
                self.span_pass(wblk, w, rls, xbase, b.add(base, i64(u)), 1)
            if self.wide:
                with loop(b, 0, len(rls) * BW, name="w") as i:
                    p = at(lacc, I64, i)
                    b.store(b.add(b.load(p, typ=I64), b.sext(b.load(at(iacc, I32, i), typ=I32), I64)), p)

    def one_group(self, ctx, g, glen):
        """Segment g (glen rows of q): its exact sums, then their fold into yacc."""
        b, seg, gw, ga = self.b, self.seg, self.gw, self.ga
        wblk, col0, w, rls = ctx
        # xq of row k: xbase + k
        xbase = [b.add(b.mul(r, i64(self.KP)), b.mul(g, i64(self.GP - self.group))) for r in rls]
        k0 = b.mul(g, i64(self.group))
        self.group_dot(wblk, w, rls, xbase, g, k0, glen)
        wg = g if seg == gw else b.udiv(b.mul(g, i64(seg)), i64(gw))   # the segment's weight group
        ag = g if seg == ga else b.udiv(b.mul(g, i64(seg)), i64(ga))   # and activation group
        self.fold(ctx, g, wg, ag)

    def fold(self, ctx, g, wg, ag):
        """yacc[r, :w] += f32(d * scale) * f32(dot - zero * sum(xq)) (+ (d * minimum) * sum(xq)),
        unfused, for segment g (weight group wg, activation group ag)."""
        b, at, N, mins, wide = self.b, self.at, self.L.N, self.mins, self.wide
        wblk, col0, w, rls = ctx
        ty = I64 if wide else I32
        with loop(b, 0, w, name="c") as j:
            col = b.add(b.add(b.mul(wg, i64(N)), col0), j)
            s = self.S.scalar(col)
            mn = self.MINS.scalar(col) if mins else None
            if self.supers:   # scale = d * sub-scale, minimum = dmin * sub-minimum (exact products)
                sup = b.mul(b.add(b.mul(b.udiv(wg, i64(self.per_super)), i64(N)), b.add(col0, j)), i64(2))
                s = b.fmul(self.SUP.scalar(sup), b.uitofp(s, F32))
                mn = b.fmul(self.SUP.scalar(b.add(sup, i64(1))), b.uitofp(mn, F32))
            z = b.sext(b.load(gep(b, self.k.args[3], I8, col), typ=I8), ty) if self.has_zeros else None
            for t, r in enumerate(rls):
                rg = b.add(b.mul(r, i64(self.G)), g)
                dot = b.load(at(self.lacc if wide else self.iacc, ty, b.add(j, i64(t * BW))), typ=ty)
                xs = b.load(at(self.qsum, I32, rg), typ=I32)
                if z is not None:   # i32 arithmetic wraps: exact whenever the final value fits
                    dot = b.sub(dot, b.mul(z, b.sext(xs, ty)))
                if mins:            # sum xq * (q + 8)
                    dot = b.add(dot, b.shl(b.sext(xs, ty), ir.Constant(ty, 3)))
                dv = b.load(at(self.dq, F32, b.add(b.mul(r, i64(self.GA)), ag)), typ=F32)
                sc = b.fmul(dv, s)
                a = b.add(j, i64(t * BW))
                y = b.fadd(self.yacc.scalar(a), b.fmul(sc, b.sitofp(dot, F32)))
                if mins:            # + (d * minimum) * sum(xq), unfused as the reference
                    y = b.fadd(y, b.fmul(b.fmul(dv, mn), b.sitofp(xs, F32)))
                self.yacc.store(y, a)

    def tile(self, blk, w, r0, rl, rt):
        """Rows r0+rl .. r0+rl+rt-1 against column block blk (w columns): the row
        prologue (yacc zeroed), the segments, the rows stored."""
        b, L, group = self.b, self.L, self.group
        K, N = L.K, L.N
        rls = [b.add(rl, i64(t)) for t in range(rt)]
        wblk = b.mul(blk, i64(K * L.row_bytes(BW)))
        col0 = b.mul(blk, i64(BW))
        with loop(b, 0, rt * BW, name="yz") as i:
            self.yacc.store(fconst(F32, 0.0), i)
        ctx = (wblk, col0, w, rls)
        full = K // group
        with loop(b, 0, full, name="g") as g:
            self.one_group(ctx, g, group)
        if K % group:
            self.one_group(ctx, i64(full), K % group)
        for t, r in enumerate(rls):
            yrow = b.add(b.mul(b.add(r0, r), i64(N)), col0)
            with loop(b, 0, w, name="st") as j:
                self.Y.store(self.yacc.scalar(b.add(j, i64(t * BW))), b.add(yrow, j))

    def blocks(self, r0, nr):
        """Every column block of this call's range against rows r0 .. r0+nr-1."""
        b, k, L = self.b, self.k, self.L

        def rows(blk, w):
            full = b.sub(nr, b.urem(nr, i64(RT)))
            with loop(b, 0, full, RT, name="rt") as rl:
                self.tile(blk, w, r0, rl, RT)
            with loop(b, full, nr, name="r1") as rl:
                self.tile(blk, w, r0, rl, 1)

        with loop(b, k.begin, k.end, name="item") as blk:
            last_chunk(b, blk, L.nblk, L.last, BW, lambda w: rows(blk, w), lone="plain")
