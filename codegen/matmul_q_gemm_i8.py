"""``matmul_q {activations=int8}`` as a GEMM for many rows of x (x86 with AVX2):
the prefill shape of a GGUF decoder loaded with llama.cpp's q8 activations
(``sqk.llm.load(..., activations="int8", act_group=32)``), where the register
tiles of ``emit_i8act`` decode every chunk of weights again for each tile of
two rows.

Scope: i4 weights (no integer zero points: GGUF's Q4_0, Q4_1 minimums, Q4_K
two-level scales), weight group 32, activation group 32 (or 0), K a multiple
of 32, dynamic activation scales, f32 x: one segment of 32 rows of k per
weight and activation group.  Everything else stays with ``emit_i8act``.

It reads the int8-activation packed layout (``pack_i8act``: the step module's
constants are shared): per quad of 32 columns and chunk j of 8 rows of k, four
slabs of 8 columns x 4 bytes, byte t of column c holding the codes (q + 8) of
k = 8j + t (low nibble) and 8j + 4 + t (high).

Per call: the rows of x are quantized once per chunk of rows into the stack
(d = max|x| / 127 per 32 values, xq = round-half-even(x / d): ``quantize_rows_i8``,
eight lanes at a time; the sum of the codes per segment beside them).  Work
items are quads; per item and segment the quad's 32 x 32 codes are unpacked
once into a 1 KiB stack panel (u8, low and high nibbles apart), then every
tile of two rows x four slabs runs vpmaddubsw (codes unsigned x xq signed:
each pair at most 2 x 15 x 127) over the 8 quads of k of the segment, summed
in i16 (at most 8 x 3810 = 30480: exact), one vpmaddwd to i32, and the fold
in the reference's order (``matmul_q_i8act``): dot = sum (q + 8) xq (minus
8 sum xq without minimums), y = y + (d * scale) * dot, then with minimums
y = y + (d * minimum) * sum xq, every step one f32 rounding, so the result
equals the reference bit for bit.  y lives in a stack tile [rows][32] across
the segments.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from .kernel import F32, I32, Kernel, fconst, gep, i64, loop, splat
from .matmul import Access, _stack_array, cdiv
from .matmul_q import SLAB, QUAD, XQ_STACK, i8_segments
from .matmul_q_rows import uses_rows

GEMM_I8_MIN_ROWS = 10   # rows of x from which the GEMM takes over (as the f32 GEMM's threshold)
SEG = 32
MR = 2                  # rows per register tile (x 4 slabs: 8 i16 accumulators, 4 panel vectors, 2 broadcasts)
MAX_RCH = 128           # rows of x quantized per chunk at most (the y tile: 16 KiB)


def takes_gemm_i8(node: Node, target) -> bool:
    """Whether matmul_q ``node`` (activations=int8) runs as this GEMM on ``target``."""
    if uses_rows(target) or "avx2" not in set(target.enabled_features):
        return False
    x, q = node.inputs[0].type, node.inputs[1].type
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    int_zeros = zeros is not None and zeros.type.dtype not in dt.FLOATS and len(node.inputs) <= 4
    K = q.shape[0]
    return (node.attrs.get("activations") == "int8" and q.dtype is dt.i4 and x.dtype is dt.f32
            and not int_zeros and not node.attrs.get("act_scale") and K > 0 and K % SEG == 0
            and node.attrs["group"] == SEG and i8_segments(node) == (SEG, SEG, SEG)
            and math.prod(x.shape[:-1]) >= GEMM_I8_MIN_ROWS and q.shape[1] > 0)


def emit_gemm_i8(k: Kernel, node: Node):
    """The kernel (module docstring); returns (work items, items per thread at least)."""
    x_t = node.inputs[0].type
    K, N = node.inputs[1].type.shape
    rows = math.prod(x_t.shape[:-1])
    G = K // SEG
    nq = cdiv(N, SLAB * QUAD)                  # quads holding columns
    supers = len(node.inputs) > 4
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    mins = zeros is not None                    # float minimums or two-level (checked by takes_gemm_i8)
    nsuper = node.inputs[4].type.shape[0] if supers else 0
    per_super = node.attrs.get("super_group", 0) // SEG if supers else 0
    b = k.b
    I8, I16 = ir.IntType(8), ir.IntType(16)
    v32i8, v16i16, v8i32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
    fvec = ir.VectorType(F32, 8)
    maddubs = k.intrinsic("llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    maddwd = k.intrinsic("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    roundeven = k.intrinsic("llvm.roundeven.v8f32", fvec, [fvec])
    fabs = k.intrinsic("llvm.fabs.v8f32", fvec, [fvec])
    ones = ir.Constant(v16i16, [1] * 16)
    lo_mask = ir.Constant(v32i8, [0x0F] * 32)
    four = ir.Constant(v32i8, [4] * 32)
    X = Access(k, k.args[0], dt.f32, 8)
    W = k.args[1]
    S = Access(k, k.args[2], node.inputs[2].type.dtype, 8)
    MINS = Access(k, k.args[3], zeros.type.dtype, 8) if mins else None
    SUP = Access(k, k.args[4], node.inputs[4].type.dtype, 8) if supers else None
    Y = Access(k, k.args[-1], dt.f32, 8)

    rch = max(MR, min(rows, MAX_RCH, XQ_STACK // K))
    rch -= rch % MR if rch < rows else 0
    xq = _stack_array(k, cdiv(rch * K, 4), "xq")         # i8 codes [rch][K]
    dq = _stack_array(k, rch * G, "dq")                  # d per (row, segment)
    qs = _stack_array(k, rch * G, "qs")                  # i32 sum of the codes per (row, segment)
    panel = _stack_array(k, 8 * QUAD * 8, "panel")       # [octet j][half][slab] <32 x u8>: 1 KiB
    YT = Access(k, _stack_array(k, rch * SLAB * QUAD, "ytile"), dt.f32, 8)
    zf, zi = fconst(fvec, 0.0), ir.Constant(v8i32, [0] * 8)

    def quantize(r0, nr):
        """Rows [r0, r0 + nr) of x: codes into xq, d into dq, code sums into qs."""
        with loop(b, 0, nr, name="qr") as rl:
            with loop(b, 0, G, name="qg") as g:
                xb = b.add(b.mul(b.add(r0, rl), i64(K)), b.mul(g, i64(SEG)))
                xs = [X.load(b.add(xb, i64(8 * v))) for v in range(SEG // 8)]
                m, nf = zf, zf
                for v in xs:   # max |x| (exact in any order) and sum x * 0: NaN iff some x is not finite
                    a = b.call(fabs, [v])
                    m = b.select(b.fcmp_ordered(">", a, m), a, m)
                    nf = b.fadd(nf, b.fmul(v, zf))
                amax, bad = ir.Constant(F32, 0.0), ir.Constant(F32, 0.0)
                for j in range(8):
                    e = b.extract_element(m, ir.Constant(I32, j))
                    amax = b.select(b.fcmp_ordered(">", e, amax), e, amax)
                    bad = b.fadd(bad, b.extract_element(nf, ir.Constant(I32, j)))
                d = b.fdiv(amax, ir.Constant(F32, 127.0))
                d = b.select(b.fcmp_unordered("uno", bad, bad), ir.Constant(F32, float("nan")), d)
                pos = splat(b, b.fcmp_ordered(">", d, ir.Constant(F32, 0.0)), 8)
                dv = splat(b, d, 8)
                row = b.add(b.mul(rl, i64(G)), g)
                total = zi
                for v, xv in enumerate(xs):
                    c = b.select(pos, b.fptosi(b.call(roundeven, [b.fdiv(xv, dv)]), v8i32), zi)
                    total = b.add(total, c)
                    p = gep(b, xq, I8, b.add(b.mul(row, i64(SEG)), i64(8 * v)))
                    b.store(b.trunc(c, ir.VectorType(I8, 8)), p, align=1)
                s = b.extract_element(total, ir.Constant(I32, 0))
                for j in range(1, 8):
                    s = b.add(s, b.extract_element(total, ir.Constant(I32, j)))
                b.store(d, gep(b, dq, F32, row))
                b.store(s, gep(b, qs, I32, row))

    def scales(quad, g, slab):
        """(scale, minimum or None) <8 x f32> of a slab of the quad in group g."""
        col = b.add(b.mul(b.add(b.mul(quad, i64(G)), g), i64(SLAB * QUAD)), i64(slab * SLAB))
        if supers:
            sl = b.add(b.mul(quad, i64(QUAD)), i64(slab))
            sup = b.add(b.mul(sl, i64(nsuper * 2 * SLAB)), b.mul(b.udiv(g, i64(per_super)), i64(2 * SLAB)))
            return (b.fmul(SUP.load(sup), b.uitofp(S.load(col), fvec)),
                    b.fmul(SUP.load(b.add(sup, i64(SLAB))), b.uitofp(MINS.load(col), fvec)))
        return S.load(col), MINS.load(col) if mins else None

    def tile(r0l, mr, quad, g, coefs):
        """Rows r0l .. r0l + mr - 1 (chunk-local) x the quad's 4 slabs, segment g: y tile += ..."""
        acc = [ir.Constant(v16i16, [0] * 16)] * (mr * QUAD)
        for t in range(8):                                 # quads of k: octet t // 2, half t % 2
            ws = [b.load(gep(b, panel, v32i8, i64((t * QUAD) + s)), typ=v32i8, align=32) for s in range(QUAD)]
            for r in range(mr):
                p = gep(b, xq, I8, b.add(b.mul(b.add(b.mul(b.add(r0l, i64(r)), i64(G)), g), i64(SEG)),
                                         i64(8 * (t // 2) + 4 * (t % 2))))
                xv = b.bitcast(splat(b, b.load(p, typ=I32, align=1), 8), v32i8)
                for s in range(QUAD):
                    acc[r * QUAD + s] = b.add(acc[r * QUAD + s], b.call(maddubs, [ws[s], xv]))
        for r in range(mr):
            row = b.add(b.mul(b.add(r0l, i64(r)), i64(G)), g)
            d = splat(b, b.load(gep(b, dq, F32, row), typ=F32), 8)
            sq = b.load(gep(b, qs, I32, row), typ=I32)
            for s in range(QUAD):
                dot = b.call(maddwd, [acc[r * QUAD + s], ones])
                if not mins:
                    dot = b.sub(dot, splat(b, b.shl(sq, ir.Constant(I32, 3)), 8))
                yi = b.add(b.mul(b.add(r0l, i64(r)), i64(SLAB * QUAD)), i64(s * SLAB))
                sc, mn = coefs[s]
                y = b.fadd(YT.load(yi), b.fmul(b.fmul(d, sc), b.sitofp(dot, fvec)))
                if mn is not None:
                    y = b.fadd(y, b.fmul(b.fmul(d, mn), splat(b, b.sitofp(sq, F32), 8)))
                YT.store(y, yi)

    def item(quad, r0, nr_static, nr):
        """Quad ``quad`` against the chunk's nr rows (nr_static: its Python value when known)."""
        with loop(b, 0, nr_static * SLAB * QUAD, 8, name="yz") as i:
            YT.store(zf, i)
        qbase = b.mul(quad, i64(G * 4 * 128))           # 4 octets of 128 bytes per segment
        with loop(b, 0, G, name="seg") as g:
            for j in range(4):                              # unpack the segment's codes
                for s in range(QUAD):
                    off = b.add(b.add(qbase, b.mul(g, i64(512))), i64(j * 128 + s * 32))
                    w8 = b.load(gep(b, W, I8, off), typ=v32i8, align=1)
                    b.store(b.and_(w8, lo_mask), gep(b, panel, v32i8, i64((2 * j) * QUAD + s)), align=32)
                    b.store(b.lshr(w8, four), gep(b, panel, v32i8, i64((2 * j + 1) * QUAD + s)), align=32)
            coefs = [scales(quad, g, s) for s in range(QUAD)]
            full = nr_static - nr_static % MR
            if full:
                with loop(b, 0, full, MR, name="mt") as t:
                    tile(t, MR, quad, g, coefs)
            for r in range(full, nr_static):
                tile(i64(r), 1, quad, g, coefs)
        # y tile -> y (the last quad masked past N)
        cols_last = N - (nq - 1) * SLAB * QUAD

        def store(ncols):
            with loop(b, 0, nr, name="ys") as m:
                yrow = b.add(b.mul(b.add(r0, m), i64(N)), b.mul(quad, i64(SLAB * QUAD)))
                for s in range(cdiv(ncols, SLAB)):
                    v = YT.load(b.add(b.mul(m, i64(SLAB * QUAD)), i64(s * SLAB)))
                    Y.store(v, b.add(yrow, i64(s * SLAB)), min(SLAB, ncols - s * SLAB))

        if cols_last != SLAB * QUAD:
            with b.if_else(b.icmp_signed("==", quad, i64(nq - 1))) as (last, other):
                with last:
                    store(cols_last)
                with other:
                    store(SLAB * QUAD)
        else:
            store(SLAB * QUAD)

    def chunk(r0, nr):
        quantize(r0, i64(nr))
        with loop(b, k.begin, k.end, name="item") as quad:
            item(quad, r0, nr, i64(nr))

    nfull = rows // rch
    if nfull:
        with loop(b, 0, nfull, name="rc") as c:
            chunk(b.mul(c, i64(rch)), rch)
    if rows % rch:
        chunk(i64(nfull * rch), rows % rch)
    k.finish()
    return nq, 1
