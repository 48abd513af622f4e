"""``matmul_q`` as a GEMM for many rows of x (float activations, x86 host): the
prompt-processing shape (M = a prefill chunk) where the GEMV-shaped register
tiles of codegen/matmul_q.py re-decode every weight for each few rows.

It reads the same packed bytes as the GEMV kernel (``pack_matmul_q``: one layout
for the step and the prefill modules, which share their constants).  Work items
are (column block of NB = 64, chunk of up to ``MC`` rows of x), block major.  Per
K block of up to KC rows, the item dequantizes its [KC, 64] slice of w into an
f32 panel on the stack (it stays in L1/L2), the exact values of the reference's
``dequantize_weight``:

* no zero points: ``w = (field * 2^-(bits*e) - off_e) * scale`` (the first step
  exact: a small integer; the product rounded once, as ``q * scale``);
* zero points: ``(field * 2^-(bits*e) - (zero + off_e)) * scale``, i.e. ``(q - z) * s``;
* minimums (Q4_1, Q4_K): ``fma(field * 2^-(bits*e) + 8 - off_e, scale, minimum)``,
  i.e. ``(q + 8) * s + m`` in one rounding (two-level scales: s and m the exact
  products of the supers and the u8 sub-scales / sub-minimums),

then runs the register-tiled micro-kernel of the fp32 GEMM (``tile_shape``: MR rows
x NR vectors of accumulators, one broadcast of x per row and NR panel loads per
step) over every row tile of the chunk, column sub-panel by sub-panel so that a
sub-panel stays in L1 across the row tiles.  Partial sums live in an f32 tile
[MC, 64] on the stack across K blocks; the last writes y (masked past N).

The dequantization costs ~5 vector operations per 8 weights once per item, against
MC/8 x 8 FMAs per 8 weights of the GEMM: with MC = 64 rows it is ~10% of the
work; the GEMV's per-group decode in registers is ~1 AND + 1 conversion per 8
weights per pass of a few rows instead.  Results are the reference's products of
x and the exact w summed in f32 (k in order), so within f32 rounding of it.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from .kernel import F32, I32, Kernel, fconst, fold_loop, gep, i64, loop, splat
from .matmul import Access, _stack_array, cdiv, fma, tile_shape
from .matmul_q import NB, NCV, VL, QLayout
from .matmul_q_rows import uses_rows

# Rows of x from which matmul_q takes this GEMM rather than the GEMV tiles
# (measured on Zen 3, AVX2: see takes_gemm).
GEMM_MIN_ROWS = 8
KC = 256          # rows of w per panel at most: 256 x 64 f32 = 64 KiB (L2), a 16-column sub-panel 16 KiB (L1)
MC = 128          # rows of x per work item at most (the f32 partial-sum tile: 32 KiB)
MIN_ITEMS = 8     # work items a GEMM is cut into at the least, when its rows allow (two threads balance)


def takes_gemm(node: Node, target) -> bool:
    """Whether matmul_q ``node`` runs as this GEMM on ``target``: float activations,
    x86 (riscv64 keeps its row kernels), at least GEMM_MIN_ROWS rows of x."""
    return (not uses_rows(target) and node.attrs.get("activations", "none") == "none"
            and math.prod(node.inputs[0].type.shape[:-1]) >= GEMM_MIN_ROWS)


def gemm_geometry(target, rows: int, K: int, group: int, nblk: int) -> dict:
    """MR x NR micro-tile, rows per item (mc, a multiple of MR unless it is all the
    rows), K block (kc: a multiple of the group, or a divisor of it, so that a
    panel's segments of one group never straddle two)."""
    lanes = target.lanes(32)
    MR, NR = tile_shape(target, lanes, panel=NB)
    chunks = cdiv(rows, MC)
    while nblk * chunks < MIN_ITEMS and cdiv(rows, chunks + 1) >= 4 * MR:
        chunks += 1
    mc = rows if chunks == 1 else MR * cdiv(cdiv(rows, chunks), MR)
    g = min(group, K)
    if g <= KC:
        kc = g * (KC // g)
    else:   # a long group: a divisor of it (not too short), else the whole group
        kc = next((d for d in range(KC, 31, -1) if g % d == 0), g)
    return dict(lanes=lanes, MR=MR, NR=NR, NRL=NR * lanes, mc=mc, kc=min(kc, K), seg=min(g, kc))


def emit_gemm(k: Kernel, node: Node):
    """The kernel (module docstring); returns (work items, items per thread at least)."""
    L = QLayout(node)
    x_t, y_t = node.inputs[0].type, node.outputs[0].type
    K, N, group = L.K, L.N, L.group
    rows = math.prod(x_t.shape[:-1])
    if rows * N == 0:
        k.finish()
        return 0, 1
    p = gemm_geometry(k.target, rows, K, group, L.nblk)
    lanes, MR, NRL, mc, kc_max, seg = (p[n] for n in ("lanes", "MR", "NRL", "mc", "kc", "seg"))
    mchunks = cdiv(rows, mc)
    b = k.b
    X = Access(k, k.args[0], x_t.dtype, 1)
    W = k.args[1]
    S = Access(k, k.args[2], node.inputs[2].type.dtype, VL)
    MINS = Access(k, k.args[3], node.inputs[3].type.dtype, VL) if L.has_mins else None
    SUP = Access(k, k.args[4], node.inputs[4].type.dtype, VL) if L.has_supers else None
    zty = ir.VectorType(ir.IntType(L.bits * 2), VL)  # zero points (+ off_e): i8 / i16
    Y = Access(k, k.args[-1], y_t.dtype, lanes)
    PANEL = Access(k, _stack_array(k, kc_max * NB, "wpanel"), dt.f32, VL)
    PV = Access(k, PANEL.ptr, dt.f32, lanes)
    ACC = Access(k, _stack_array(k, mc * NB, "ytile"), dt.f32, lanes)
    wvec, fvec = ir.VectorType(I32, VL), ir.VectorType(F32, VL)
    row_words = L.words * VL   # i32 per row of a block
    zero = fconst(ir.VectorType(F32, lanes), 0.0)

    def dequant(blk, k0, kc):
        """panel[kk, :] = w[k0 + kk, 64 blk : 64 blk + 64] (f32, exact), kk < kc."""
        wblk = b.mul(blk, i64(K * row_words))
        sblk = b.mul(blk, i64(L.groups * NB))
        nseg = b.udiv(b.add(kc, i64(seg - 1)), i64(seg))
        with loop(b, 0, nseg, name="dseg") as s:
            ks = b.add(k0, b.mul(s, i64(seg)))
            g = b.udiv(ks, i64(group))
            n = b.sub(b.add(k0, kc), ks)
            n = b.select(b.icmp_signed("<", n, i64(seg)), n, i64(seg))
            coef = []   # per column vector: (multiplier, addend, fused minimum)
            for cv in range(NCV):
                e = L.field(cv)[1]
                col = b.add(sblk, b.add(b.mul(g, i64(NB)), i64(cv * VL)))
                if L.has_supers:   # scale = d * sub-scale, minimum = dmin * sub-minimum (exact products)
                    sup = b.add(b.mul(blk, i64(L.nsuper * 2 * NB)),
                                b.add(b.mul(b.udiv(g, i64(L.per_super)), i64(2 * NB)), i64(cv * VL)))
                    sc = b.fmul(SUP.load(sup), b.uitofp(S.load(col), fvec))
                    mins = b.fmul(SUP.load(b.add(sup, i64(NB))), b.uitofp(MINS.load(col), fvec))
                else:
                    sc = S.load(col)
                    mins = MINS.load(col) if L.has_mins else None
                if L.has_zeros:   # stored as zero + off_e
                    z = b.load(gep(b, k.args[3], zty.element, col), typ=zty, align=L.bits // 4)
                    add = b.fneg(b.sitofp(b.sext(z, wvec), fvec))
                else:
                    add = fconst(fvec, float((8 if L.has_mins else 0) - L.offset(e)))
                coef.append((sc, add, mins))
            with loop(b, 0, n, name="drow") as r:
                kk = b.add(b.mul(s, i64(seg)), r)
                wp = b.add(wblk, b.mul(b.add(k0, kk), i64(row_words)))
                words = [b.load(gep(b, W, I32, b.add(wp, i64(w * VL))), typ=wvec, align=4) for w in range(L.words)]
                for cv in range(NCV):
                    w, e = L.field(cv)
                    m = (((1 << L.bits) - 1) << (L.bits * e)) - (1 << 32 if e == L.fields - 1 else 0)
                    f = b.sitofp(b.and_(words[w], ir.Constant(wvec, [m] * VL)), fvec)   # (q + off_e) 2^(bits e)
                    code = fma(k, f, fconst(fvec, 2.0 ** -(L.bits * e)), coef[cv][1])   # exact small integer
                    sc, _, mins = coef[cv]
                    v = fma(k, code, sc, mins) if mins is not None else b.fmul(code, sc)
                    PANEL.store(v, b.add(b.mul(kk, i64(NB)), i64(cv * VL)))

    def micro(xrows, lrow, mr, c0, k0, kc):
        """ytile[lrow : lrow + mr, c0 : c0 + NRL] += x[xrows, k0 : k0 + kc] @ panel[:kc, c0 : c0 + NRL]."""
        nv = NRL // lanes
        tix = [b.add(b.mul(b.add(lrow, i64(r)), i64(NB)), i64(c0 + v * lanes)) for r in range(mr) for v in range(nv)]
        xs = [b.add(xr, k0) for xr in xrows]

        def step(kk, acc):
            row = b.add(b.mul(kk, i64(NB)), i64(c0))
            wv = [PV.load(b.add(row, i64(v * lanes))) for v in range(nv)]
            out = []
            for r in range(mr):
                xv = X.scalar(b.add(xs[r], kk))
                xv = splat(b, xv, lanes) if lanes > 1 else xv
                out += [fma(k, xv, wv[v], acc[r * nv + v]) for v in range(nv)]
            return out

        acc = fold_loop(b, 0, kc, [ACC.load(i) for i in tix], step, name="mk")
        for i, v in zip(tix, acc):
            ACC.store(v, i)

    def chunk(blk, m_first, r, ncols):
        """Rows [m_first, m_first + r) of x against column block blk (ncols valid columns)."""
        with loop(b, 0, r * NB, lanes, name="z") as c:
            ACC.store(zero, c)
        subs = cdiv(ncols, NRL)   # column sub-panels holding valid columns
        nkb = cdiv(K, kc_max)
        with loop(b, 0, nkb, name="kb") as kb:
            k0 = b.mul(kb, i64(kc_max))
            kc = b.sub(i64(K), k0)
            kc = b.select(b.icmp_signed("<", kc, i64(kc_max)), kc, i64(kc_max))
            dequant(blk, k0, kc)
            for sp in range(subs):
                full = r - r % MR
                if full:
                    with loop(b, 0, full, MR, name="mt") as t:
                        xrows = [b.mul(b.add(m_first, b.add(t, i64(i))), i64(K)) for i in range(MR)]
                        micro(xrows, t, MR, sp * NRL, k0, kc)
                if r % MR:
                    xrows = [b.mul(b.add(m_first, i64(full + i)), i64(K)) for i in range(r % MR)]
                    micro(xrows, i64(full), r % MR, sp * NRL, k0, kc)
        col0 = b.mul(blk, i64(NB))
        for m in range(r) if r <= 8 else ():
            store_row(i64(m), m_first, col0, ncols)
        if r > 8:
            with loop(b, 0, r, name="st") as m:
                store_row(m, m_first, col0, ncols)

    def store_row(m, m_first, col0, ncols):
        yrow = b.add(b.mul(b.add(m_first, m), i64(N)), col0)
        for v in range(cdiv(ncols, lanes)):
            Y.store(ACC.load(b.add(b.mul(m, i64(NB)), i64(v * lanes))), b.add(yrow, i64(v * lanes)),
                    min(lanes, ncols - v * lanes))

    def by_cols(blk, m_first, r):
        if N % NB:
            with b.if_else(b.icmp_signed("==", blk, i64(L.nblk - 1))) as (tail, body):
                with tail:
                    chunk(blk, m_first, r, N % NB)
                with body:
                    if L.nblk > 1:
                        chunk(blk, m_first, r, NB)
        else:
            chunk(blk, m_first, r, NB)

    with loop(b, k.begin, k.end, name="item") as item:
        blk = b.udiv(item, i64(mchunks))
        mi = b.urem(item, i64(mchunks))
        m_first = b.mul(mi, i64(mc))
        if rows % mc:
            with b.if_else(b.icmp_signed("==", mi, i64(mchunks - 1))) as (tail, body):
                with tail:
                    by_cols(blk, m_first, rows % mc)
                with body:
                    by_cols(blk, m_first, mc)
        else:
            by_cols(blk, m_first, mc)
    k.finish()
    return L.nblk * mchunks, 1
