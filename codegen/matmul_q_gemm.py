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
MC FMAs per 8 weights in the micro-kernel (the GEMV tiles decode every weight again
for each few rows): at M = 64 on SmolLM2's shapes, leaving it out changed the
time by less than the noise (~2%), and the kernel ran at ~77 GFLOP/s on one Zen 3
core (CPU time), the FMA peak at the 2.45 GHz base clock.  Results are the
reference's products of x and the exact w summed in f32 (k in order), so within
f32 rounding of it.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from .kernel import F32, I32, Kernel, fconst, fold_loop, gep, i64, loop, splat
from .matmul import Access, _stack_array, cdiv, fma, tile_shape
from .matmul_q import NB, NCV, VL, QLayout, group_scales
from .matmul_q_rows import uses_rows

# Rows of x from which matmul_q takes this GEMM rather than the GEMV tiles (Zen 3,
# AVX2, SmolLM2's shapes, one thread: the tiles win at 8 rows, the GEMM from ~10).
GEMM_MIN_ROWS = 10
KC = 256          # rows of w per panel at most: 256 x 64 f32 = 64 KiB (L2), a 16-column sub-panel 16 KiB (L1)
MC = 128          # rows of x per work item (about: a multiple of MR), the f32 partial-sum tile ~32 KiB
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
    g = max(1, min(group, K))
    if g <= KC:
        kc = g * (KC // g)
    else:   # a long group: a divisor of it (not too short), else the whole group
        kc = next((d for d in range(KC, 31, -1) if g % d == 0), g)
    kc = max(1, min(kc, K))   # (K = 0: no K block at all)
    return dict(lanes=lanes, MR=MR, NR=NR, NRL=NR * lanes, mc=mc, kc=kc, seg=min(g, kc))


def emit_gemm(k: Kernel, node: Node):
    """matmul_q's kernel (module docstring); returns (work items, items per thread at least)."""
    L = QLayout(node)
    K, N, group = L.K, L.N, L.group
    rows = math.prod(node.inputs[0].type.shape[:-1])
    if rows * N == 0:
        k.finish()
        return 0, 1
    p = gemm_geometry(k.target, rows, K, group, L.nblk)
    seg = p["seg"]
    b = k.b
    W = k.args[1]
    S = Access(k, k.args[2], node.inputs[2].type.dtype, VL)
    MINS = Access(k, k.args[3], node.inputs[3].type.dtype, VL) if L.has_mins else None
    SUP = Access(k, k.args[4], node.inputs[4].type.dtype, VL) if L.has_supers else None
    zty = ir.VectorType(ir.IntType(L.bits * 2), VL)  # zero points (+ off_e): i8 / i16
    wvec, fvec = ir.VectorType(I32, VL), ir.VectorType(F32, VL)
    row_words = L.words * VL   # i32 per row of a block

    def dequant(PANEL, blk, k0, kc):
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
                col, sc, mins = group_scales(b, L, S, MINS, SUP, sblk, g, cv, blk)
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

    return gemm_panels(k, node, rows, K, N, L.nblk, p, dequant)


def gemm_panels(k: Kernel, node: Node, rows: int, K: int, N: int, nblk: int, p: dict, dequant):
    """The GEMM over dequantized panels: x is the kernel's first argument [rows, K],
    y its last [rows, N]; ``dequant(panel, blk, k0, kc)`` writes rows k0 .. k0+kc-1
    (kc an i64 <= p["kc"]) of the 64 columns of block blk into the panel (an f32
    Access, [kc][64]).  Returns (work items, items per thread at least)."""
    x_t, y_t = node.inputs[0].type, node.outputs[0].type
    lanes, MR, NRL, mc, kc_max = (p[n] for n in ("lanes", "MR", "NRL", "mc", "kc"))
    mchunks = cdiv(rows, mc)
    b = k.b
    X = Access(k, k.args[0], x_t.dtype, 1)
    Y = Access(k, k.args[-1], y_t.dtype, lanes)
    PANEL = Access(k, _stack_array(k, kc_max * NB, "wpanel"), dt.f32, VL)
    PV = Access(k, PANEL.ptr, dt.f32, lanes)
    ACC = Access(k, _stack_array(k, mc * NB, "ytile"), dt.f32, lanes)
    zero = fconst(ir.VectorType(F32, lanes), 0.0)

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
            dequant(PANEL, blk, k0, kc)
            for sp in range(subs):
                full = r - r % MR
                if full:
                    with loop(b, 0, full, MR, name="mt") as t:
                        xrows = [b.mul(b.add(m_first, b.add(t, i64(i))), i64(K)) for i in range(MR)]
                        micro(xrows, t, MR, sp * NRL, k0, kc)
                if r % MR:
                    xrows = [b.mul(b.add(m_first, i64(full + i)), i64(K)) for i in range(r % MR)]
                    micro(xrows, i64(full), r % MR, sp * NRL, k0, kc)
        with loop(b, 0, r, name="st") as m:   # ytile -> y, masked past N
            yrow = b.add(b.mul(b.add(m_first, m), i64(N)), b.mul(blk, i64(NB)))
            for v in range(cdiv(ncols, lanes)):
                Y.store(ACC.load(b.add(b.mul(m, i64(NB)), i64(v * lanes))), b.add(yrow, i64(v * lanes)),
                        min(lanes, ncols - v * lanes))

    def by_cols(blk, m_first, r):
        if N % NB:
            with b.if_else(b.icmp_signed("==", blk, i64(nblk - 1))) as (tail, body):
                with tail:
                    chunk(blk, m_first, r, N % NB)
                with body:
                    if nblk > 1:
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
    return nblk * mchunks, 1


# --- matmul_ggml (Q6_K / Q5_0 blocks) -----------------------------------------------------------

GGML_MIN_ROWS = 20   # the same for matmul_ggml: its decode (Q6_K) costs more per weight (measured: even at ~16 rows;
#                      Q5_0 not measured apart)


def takes_ggml_gemm(node: Node, target) -> bool:
    """Whether matmul_ggml ``node`` runs as the GEMM on ``target`` (x86, enough rows)."""
    return not uses_rows(target) and math.prod(node.inputs[0].type.shape[:-1]) >= GGML_MIN_ROWS


def transpose8(b, vs):
    """The 8 x 8 transpose of eight <8 x f32> rows (unpack, shuffle, lane-permute: as
    AVX does it; plain shufflevectors, so any target legalizes them)."""
    def sh(x, y, mask):
        return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, 8), mask))

    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    t = [sh(vs[i], vs[i + 1], m) for i in range(0, 8, 2) for m in (lo, hi)]   # t0..t7
    a, c = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    s = [sh(t[i], t[i + 2], m) for i in (0, 1, 4, 5) for m in (a, c)]       # s0..s7
    first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return [sh(s[i], s[i + 4], first) for i in range(4)] + [sh(s[i], s[i + 4], second) for i in range(4)]


def emit_ggml_gemm(k: Kernel, node: Node):
    """matmul_ggml (x @ W.T, W as Q6_K or Q5_0 blocks [N, K / block * bytes]) as the
    GEMM: per column block and K block, the block's (up to) 64 rows of W are
    decoded (``matmul_ggml.FORMATS``: ggml's exact values) into a scratch
    [64][kc], then transposed 8 x 8 into the [kc][64] panel."""
    from .matmul_ggml import FORMATS

    x_t = node.inputs[0].type
    K, N = x_t.shape[-1], node.inputs[1].type.shape[0]
    qk, nbytes, decode = FORMATS[node.attrs["type"]]
    rows = math.prod(x_t.shape[:-1])
    if rows * N == 0:
        k.finish()
        return 0, 1
    nblk = cdiv(N, NB)
    p = gemm_geometry(k.target, rows, K, qk, nblk)   # K blocks of whole units (K is a multiple of qk)
    KCM = p["kc"]
    b = k.b
    W = k.args[1]
    row_bytes = K // qk * nbytes
    DEC = Access(k, _stack_array(k, NB * KCM, "wdec"), dt.f32, VL)

    def dequant(PANEL, blk, k0, kc):
        u0 = b.udiv(k0, i64(qk))
        nvalid = b.sub(i64(N), b.mul(blk, i64(NB)))
        nvalid = b.select(b.icmp_signed("<", nvalid, i64(NB)), nvalid, i64(NB))
        one = KCM == qk     # one unit per K block (Q6_K): no unit loop

        def unit(f, u):
            base = b.add(b.mul(b.add(b.mul(blk, i64(NB)), f), i64(row_bytes)),
                         b.mul(u0 if one else b.add(u0, u), i64(nbytes)))
            d0 = b.mul(f, i64(KCM)) if one else b.add(b.mul(f, i64(KCM)), b.mul(u, i64(qk)))
            decode(k, W, base, lambda off, w: DEC.store(w, b.add(d0, i64(off))))

        with loop(b, 0, nvalid, name="feat") as f:
            if one:
                unit(f, None)
            else:
                with loop(b, 0, b.udiv(kc, i64(qk)), name="unit") as u:
                    unit(f, u)
        # columns past N (the last block) hold stale values: their outputs are never stored
        with loop(b, 0, NB // 8, name="j8") as j8:
            with loop(b, 0, qk // 8 if one else b.udiv(kc, i64(8)), name="c8") as c:
                vs = [DEC.load(b.add(b.mul(b.add(b.mul(j8, i64(8)), i64(f)), i64(KCM)), b.mul(c, i64(8))))
                      for f in range(8)]
                for r, v in enumerate(transpose8(b, vs)):
                    PANEL.store(v, b.add(b.mul(b.add(b.mul(c, i64(8)), i64(r)), i64(NB)), b.mul(j8, i64(8))))

    return gemm_panels(k, node, rows, K, N, nblk, p, dequant)
