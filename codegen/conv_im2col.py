"""``im2col`` (ir/ops.py): a convolution's patches as the b of a GEMM, for the
strided layers the direct kernel serves worst (compiler/passes/im2col.py).

A work item is one (image, channel, kernel row i): it writes the KW rows
(c*KH + i)*KW + j of cols.  For each j the in-bounds output columns are a
static range; per output row the columns before and after it are zeros and
the inside is copied in vectors of 8 (stride 1: one load; stride s: the span
of the 8 columns and a shuffle), a shorter vector for the last few.  Rows of
the kernel outside x are zeros.
"""
from __future__ import annotations

from llvmlite import ir

from ..ir.graph import Node
from .conv import Axis, decompose
from .elementwise import MIN_PARALLEL_WORK
from .kernel import I32, Kernel, gep, i64, load_vec, loop, lltype
from .lower import emitter

VL = 8   # columns per vector


@emitter("im2col")
def emit_im2col(k: Kernel, node: Node):
    b = k.b
    x = node.inputs[0].type
    n, c, h, w = x.shape
    kh_n, kw_n = node.attrs["kernel"]
    sh, sw = node.attrs["strides"]
    dh, dw = node.attrs["dilations"]
    pt, pl, pb, pr = node.attrs["pads"]
    d = x.dtype
    ty = lltype(d)
    kk, ohw = node.outputs[0].type.shape[1:]
    oh = (h + pt + pb - dh * (kh_n - 1) - 1) // sh + 1
    ow = ohw // oh if oh else 0
    aw = Axis(w, kw_n, sw, dw, pl, pr, ow)
    items = n * c * kh_n
    if items == 0 or ohw == 0:
        k.finish()
        return 0, 1
    x_ptr, out_ptr = k.args
    esize = d.bits // 8
    memset = k.intrinsic("llvm.memset.p0.i64", ir.VoidType(), [out_ptr.type, ir.IntType(8), ir.IntType(64),
                                                                 ir.IntType(1)])

    def zero(at, count: int):
        if count > 0:
            b.call(memset, [gep(b, out_ptr, ty, at), ir.Constant(ir.IntType(8), 0), i64(count * esize),
                            ir.Constant(ir.IntType(1), 0)])

    def copy(src, dst, m: int):
        """m output columns from x[src], x[src + sw], ... to out[dst ..]."""
        if m == 1:
            b.store(b.load(gep(b, x_ptr, ty, src), typ=ty), gep(b, out_ptr, ty, dst), align=esize)
            return
        v = load_vec(b, x_ptr, ty, src, (m - 1) * sw + 1)
        if sw != 1:
            v = b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                 ir.Constant(ir.VectorType(I32, m), [q * sw for q in range(m)]))
        b.store(v, gep(b, out_ptr, ty, dst), align=esize)

    with loop(b, k.begin, k.end, name="item") as item:
        nn, cc, i = decompose(b, item, [n, c, kh_n])
        plane = b.mul(b.add(b.mul(nn, i64(c)), cc), i64(h * w))
        row0 = b.mul(b.add(b.mul(nn, i64(kk)), b.mul(b.add(b.mul(cc, i64(kh_n)), i), i64(kw_n))), i64(ohw))
        with loop(b, 0, oh, name="oh") as o:
            ih = b.add(b.mul(o, i64(sh)), b.sub(b.mul(i, i64(dh)), i64(pt)))
            inside = b.and_(b.icmp_signed(">=", ih, i64(0)), b.icmp_signed("<", ih, i64(h)))
            with b.if_else(inside) as (then, other):
                with then:
                    x_row = b.add(plane, b.mul(ih, i64(w)))
                    for j in range(kw_n):
                        dst = b.add(b.add(row0, i64(j * ohw)), b.mul(o, i64(ow)))
                        inb = [q for q in range(ow) if j in aw.valid(q)]   # a contiguous range
                        first, last = (inb[0], inb[-1] + 1) if inb else (0, 0)
                        zero(dst, first)
                        zero(b.add(dst, i64(last)), ow - last)
                        count = last - first
                        src0 = b.add(x_row, i64(first * sw + j * dw - pl))
                        full = count - count % VL
                        if full:
                            with loop(b, 0, full, VL, name="c") as q:
                                copy(b.add(src0, b.mul(q, i64(sw))), b.add(dst, b.add(q, i64(first))), VL)
                        if count % VL:
                            copy(b.add(src0, i64(full * sw)), b.add(dst, i64(first + full)), count % VL)
                with other:
                    for j in range(kw_n):
                        zero(b.add(b.add(row0, i64(j * ohw)), b.mul(o, i64(ow))), ow)
    k.finish()
    return items, max(1, MIN_PARALLEL_WORK // max(1, kw_n * ohw))
