"""int8 convolution (ir/ops.py ``conv_input_q``, ``conv2d_q``).

conv_input_q quantizes x once into a zero-padded layout of channel quads
[N, C4, HP, WP, 4] i8 (one padded row per work item: the row is zeroed, then
its interior written from 8 columns of 4 channel planes at a time, the four
<8 x i8> codes interleaved into one 32-byte store).  So conv2d_q never checks
a border: every tap of every output is inside xq.

conv2d_q keeps, per work item (n, block of CB output channels, oh), a tile of
CB x U vectors of 8 i32 accumulators (8 output columns each) in registers:
U = 4 vectors of a row (fewer in narrow rows) and CB = 8 / U channels.
Per channel quad and kernel row and column, a vector is the 8 columns' quads,
32 contiguous bytes at stride 1 (a longer span and a shuffle of its 32-bit
quads at stride > 1), and a weight is one 32-bit quad broadcast.  AVX2 multiplies them with
vpmaddubsw on |q| (unsigned: -128 is 128) and x with q's sign (vpsignb;
|xq| <= 127 never wraps), a pair summing to at most 2*128*127 = 32512, below
the i16 saturation, then
vpmaddwd by ones into the i32 lanes: exact (the sign trick of
codegen/matmul_q.py).  With ``unsigned`` codes (x after a relu) vpmaddubsw
takes x as it is, negative codes raised to 0 (vpmaxsb, once per vector of
x; pairs at most 2*127*128 = 32512): no vpabsb, no vpsignb.  Other targets
sign-extend to i32, multiply and add each lane's four products: exact too.  The last vector of a row is shifted
back to end at the row's end (it recomputes a few columns); rows narrower
than 8 columns store only theirs.  Then y = f32(acc) * (d * scale[co]) +
bias[co], and a fused activation (``epilogue``), before the store.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from ..ir.ops import QUAD
from .conv import decompose, entry_alloca, store_prefix
from .elementwise import MIN_PARALLEL_WORK
from .kernel import F32, I32, Kernel, call_intrinsic, fconst, gep, i64, load_elem, loop, splat, vtype
from .lower import emitter

I8, I16 = ir.IntType(8), ir.IntType(16)
VL = 8            # output columns per vector (i32 lanes)
UNROLL = 4        # vectors per tile at most
ACCS = 8          # accumulator vectors per tile: CB channels x U vectors (16 registers on AVX2)


def _quantize(k: Kernel, v, d: float, n: int, lowest: float):
    """int8 codes of the f32 vector v (n lanes): clip(roundeven(v / d), lowest, 127), NaN -> 0
    (ir.ops.quantize_act)."""
    b = k.b
    vt = v.type
    q = call_intrinsic(k, "roundeven", b.fdiv(v, fconst(vt, d)))
    q = call_intrinsic(k, "minnum", call_intrinsic(k, "maxnum", q, fconst(vt, lowest)), fconst(vt, 127.0))
    q = b.select(b.fcmp_unordered("uno", v, v), fconst(vt, 0.0), q)
    # q is an integer in [-127, 127]: q + 1.5 * 2^23 holds it in its low mantissa bits
    # (no float->int conversion: riscv64's vfcvt.rtz aborts the qemu the tests run under)
    it = ir.VectorType(I32, n)
    bits = b.bitcast(b.fadd(q, fconst(vt, 12582912.0)), it)
    return b.trunc(b.sub(bits, ir.Constant(it, [ir.Constant(I32, 0x4B400000)] * n)), ir.VectorType(I8, n))


@emitter("conv_input_q")
def emit_conv_input_q(k: Kernel, node: Node):
    b = k.b
    n, c, h, w = node.inputs[0].type.shape
    _, c4, hp, wp, _ = node.outputs[0].type.shape
    pt, pl = node.attrs["pads"][:2]
    d = float(np.float32(node.attrs["act_scale"]))
    items = n * c4 * hp
    if items == 0 or wp == 0:
        k.finish()
        return 0, 1
    x_ptr, out_ptr = k.args
    memset = k.intrinsic("llvm.memset.p0.i64", ir.VoidType(), [out_ptr.type, I8, ir.IntType(64), ir.IntType(1)])
    with loop(b, k.begin, k.end, name="item") as item:
        nn, cq, r = decompose(b, item, [n, c4, hp])
        row = b.mul(item, i64(wp * QUAD))
        b.call(memset, [gep(b, out_ptr, I8, row), ir.Constant(I8, 0), i64(wp * QUAD), ir.Constant(ir.IntType(1), 0)])
        hi = b.sub(r, i64(pt))
        inside = b.and_(b.icmp_signed(">=", hi, i64(0)), b.icmp_signed("<", hi, i64(h)))
        if w:
            with b.if_then(inside):
                chans = [b.add(b.mul(cq, i64(QUAD)), i64(j)) for j in range(QUAD)]
                valid = [b.icmp_signed("<", ch, i64(c)) for ch in chans]
                src = [b.mul(b.add(b.mul(b.add(b.mul(nn, i64(c)), b.select(ok, ch, i64(c - 1))), i64(h)), hi),
                             i64(w)) for ch, ok in zip(chans, valid)]

                def columns(w0, m: int):
                    """Columns w0 .. w0 + m of the row: four channels' codes interleaved."""
                    qs = []
                    for j in range(QUAD):
                        v = load_elem(b, x_ptr, dt.f32, b.add(src[j], w0), m)
                        if m == 1:
                            v = b.insert_element(ir.Constant(ir.VectorType(F32, 1), ir.Undefined), v, i64(0))
                        q = _quantize(k, v, d, m, 0.0 if node.attrs["unsigned"] else -127.0)
                        qs.append(b.select(valid[j], q, ir.Constant(q.type, None)))
                        # a channel past C keeps 0 (the clamped load read a real channel)
                    cat = b.shuffle_vector(b.shuffle_vector(qs[0], qs[1], ir.Constant(ir.VectorType(I32, 2 * m),
                                                                                         list(range(2 * m)))),
                                           b.shuffle_vector(qs[2], qs[3], ir.Constant(ir.VectorType(I32, 2 * m),
                                                                                      list(range(2 * m)))),
                                           ir.Constant(ir.VectorType(I32, 4 * m), list(range(4 * m))))
                    order = [j * m + l for l in range(m) for j in range(QUAD)]
                    out = b.shuffle_vector(cat, ir.Constant(cat.type, ir.Undefined),
                                           ir.Constant(ir.VectorType(I32, 4 * m), order))
                    at = b.add(row, b.mul(b.add(w0, i64(pl)), i64(QUAD)))
                    b.store(out, gep(b, out_ptr, I8, at), align=1)

                full = w - w % VL
                if full:
                    with loop(b, 0, full, VL, name="w") as w0:
                        columns(w0, VL)
                if w % VL:
                    columns(i64(full), w % VL)
    k.finish()
    return items, max(1, MIN_PARALLEL_WORK // max(1, wp * QUAD))


@emitter("conv2d_q")
def emit_conv2d_q(k: Kernel, node: Node, epilogue=None):
    """``epilogue(value, n)``, if given, maps each f32 vector of output columns to the
    values stored (a fused activation, as conv2d's)."""
    b = k.b
    xq, q = node.inputs[0].type, node.inputs[1].type
    n, c4, hp, wp, _ = xq.shape
    co, _, kh_n, kw_n, _ = q.shape
    _, _, oh, ow = node.outputs[0].type.shape
    sh, sw = node.attrs["strides"]
    dh, dw = node.attrs["dilations"]
    d = float(np.float32(node.attrs["act_scale"]))
    # a tile of U vectors of a row (4 x 8 columns measured 10-25% faster than 2 x 8 at 14-56
    # columns, on Zen 3), and as many output channels as the accumulators allow
    unroll = min(UNROLL, -(-ow // VL))
    cb = max(c for c in range(1, ACCS // unroll + 1) if co % c == 0)
    items = n * (co // cb) * oh
    if items == 0 or ow == 0:
        k.finish()
        return 0, 1
    x_ptr, q_ptr, s_ptr = k.args[:3]
    bias_ptr = k.args[3] if len(node.inputs) == 4 else None
    out_ptr = k.args[-1]
    avx2 = "avx2" in set(k.target.enabled_features)
    unsigned = node.attrs["unsigned"]   # xq's bytes as u8: vpmaddubsw takes them as they are
    v32i8, v16i16, v8i32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
    fvec = vtype(F32, VL)
    if avx2:
        maddubs = k.intrinsic("llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
        maddwd = k.intrinsic("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
        vsign = k.intrinsic("llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])
        vabs = k.intrinsic("llvm.abs.v32i8", v32i8, [v32i8, ir.IntType(1)])
        ones = ir.Constant(v16i16, [1] * 16)
    lanes = min(VL, ow)

    def load_x(at, nl: int):
        """The quads of nl output columns (32 bytes, lanes past nl zero) from byte ``at``:
        one quad is one i32 word, so stride > 1 is a load of the span and a word shuffle."""
        span = (nl - 1) * sw + 1
        raw = b.load(gep(b, x_ptr, I8, at), typ=ir.VectorType(I32, span), align=1)
        pick = [l * sw if l < nl else span for l in range(VL)]
        if nl != VL or sw != 1:
            raw = b.shuffle_vector(raw, ir.Constant(raw.type, None), ir.Constant(ir.VectorType(I32, VL), pick))
        return b.bitcast(raw, v32i8)

    def dot(acc, xv, wv, wa):
        """acc + per i32 lane the sum of its four byte products xv * wv (wa = |wv|)."""
        if avx2 and unsigned:
            return b.add(acc, b.call(maddwd, [b.call(maddubs, [xv, wv]), ones]))
        if avx2:
            return b.add(acc, b.call(maddwd, [b.call(maddubs, [wa, b.call(vsign, [xv, wv])]), ones]))
        p = b.mul(b.sext(xv, ir.VectorType(I32, 32)), b.sext(wv, ir.VectorType(I32, 32)))
        for t in range(QUAD):
            part = b.shuffle_vector(p, ir.Constant(p.type, None), ir.Constant(v8i32, [QUAD * l + t for l in range(VL)]))
            acc = b.add(acc, part)
        return acc

    with loop(b, k.begin, k.end, name="item") as item:
        nn, blk, ohh = decompose(b, item, [n, co // cb, oh])
        co0 = b.mul(blk, i64(cb))
        steps = [b.fmul(fconst(F32, d), load_elem(b, s_ptr, dt.f32, b.add(co0, i64(c)))) for c in range(cb)]
        biases = [load_elem(b, bias_ptr, dt.f32, b.add(co0, i64(c))) if bias_ptr is not None else None
                  for c in range(cb)]
        x_n = b.mul(nn, i64(c4))   # first channel quad plane of image nn
        ih0 = b.mul(ohh, i64(sh))

        def tile(starts):
            """Vectors at output columns ``starts`` ((i64 column, valid lanes) each)."""
            accs = {(c, u): entry_alloca(b, v8i32) for c in range(cb) for u in range(len(starts))}
            for a in accs.values():
                b.store(ir.Constant(v8i32, None), a)
            with loop(b, 0, c4, name="cq") as cq:
                with loop(b, 0, kh_n, name="kh") as kh:
                    # the first pixel of row ih of (n, cq), in pixels
                    xrow = b.add(b.mul(b.add(x_n, cq), i64(hp * wp)), b.mul(b.add(ih0, b.mul(kh, i64(dh))), i64(wp)))
                    wrow = b.mul(b.add(b.mul(cq, i64(kh_n)), kh), i64(kw_n))
                    acc = {key: b.load(a) for key, a in accs.items()}
                    for kw in range(kw_n):
                        xs = []
                        for col, nl in starts:
                            at = b.mul(b.add(xrow, b.add(b.mul(col, i64(sw)), i64(kw * dw))), i64(QUAD))
                            xv = load_x(at, nl)
                            xs.append(call_intrinsic(k, "smax", xv, ir.Constant(v32i8, None)) if unsigned else xv)
                        for c in range(cb):
                            wat = b.mul(b.add(b.mul(b.add(co0, i64(c)), i64(c4 * kh_n * kw_n)), b.add(wrow, i64(kw))),
                                        i64(QUAD))
                            word = b.load(gep(b, q_ptr, I8, wat), typ=I32, align=1)
                            wv = b.bitcast(splat(b, word, VL), v32i8)
                            wa = b.call(vabs, [wv, ir.Constant(ir.IntType(1), 0)]) if avx2 and not unsigned else None
                            for u, xv in enumerate(xs):
                                acc[c, u] = dot(acc[c, u], xv, wv, wa)
                    for key, a in accs.items():
                        b.store(acc[key], a)
            for (c, u), a in accs.items():
                col, nl = starts[u]
                y = b.fmul(b.sitofp(b.load(a), fvec), splat(b, steps[c], VL))
                if biases[c] is not None:
                    y = b.fadd(y, splat(b, biases[c], VL))
                if epilogue:
                    y = epilogue(y, VL)
                o = b.add(b.mul(b.add(b.mul(b.add(b.mul(nn, i64(co)), b.add(co0, i64(c))), i64(oh)), ohh), i64(ow)),
                          col)
                store_prefix(b, y, out_ptr, dt.f32, o, VL, nl)

        width = VL * unroll
        full = ow // width * width
        if full:
            with loop(b, 0, full, width, name="ow") as ow0:
                tile([(b.add(ow0, i64(u * VL)), VL) for u in range(unroll)])
        rest = []
        for col in range(full, ow, VL):
            rest.append((i64(min(col, ow - VL)), VL) if ow >= VL else (i64(col), lanes))
        if rest:
            tile(rest)
    k.finish()
    work = cb * ow * c4 * QUAD * kh_n * kw_n
    return items, max(1, MIN_PARALLEL_WORK // max(1, work))
