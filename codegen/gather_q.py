"""gather_q(ids, q, scales[, zeros]) {group}: rows of a matmul_q weight's table
(the embedding lookup of a tied embedding / lm_head), read from the constants
in matmul_q's own packed layout, so both readers share one stored copy.

The packer is matmul_q's (``pack_matmul_q`` sees the same operands at the same
input indices), so the bytes are equal and ``unshare_packed_constants`` keeps
one constant.  A work item is one id: column n = id of q, decoded element by
element along K (a row of the table is a few KiB: the lookup is not where the
time goes):

* host (codegen/matmul_q.py): column n sits in block n // 64, column vector
  cv = (n % 64) // 8, lane n % 8; field e of the lane's word(s) holds q + 2^(bits-1)
  below the top field, q in two's complement in it; scales, zeros (+ off_e) and
  minimums blocked [N/64][groups][64], supers [N/64][super-blocks][2][64];
* riscv64 (codegen/matmul_q_rows.py): block n // 512, byte j of a block row (i8)
  or the low / high nibble of byte j / j - h (i4); scales, minimums, supers
  plain, zeros i8.

Each weight is then (q - zero) * scale, or (q + 8) * scale + minimum: the
reference's arithmetic, so the rows equal ``dequantize_weight`` bit for bit.
An id outside [-N, N) returns SQK_ERR_INDEX.
"""
from __future__ import annotations

from llvmlite import ir

from ..ir import dtypes as dt
from .gather import SQK_ERR_INDEX
from .kernel import F32, I8, I32, I64, Kernel, gep, i64, lltype, loop
from .lower import emitter, packer
from .matmul import Access
from .matmul_q import NB, VL, QLayout, pack_matmul_q
from .matmul_q_rows import BW, RowLayout, uses_rows

packer("gather_q", inputs=(1, 2, 3, 4))(pack_matmul_q)


@emitter("gather_q")
def emit_gather_q(k: Kernel, node):
    ids_t = node.inputs[0].type
    K, N = node.inputs[1].type.shape
    group = node.attrs["group"]
    if ids_t.size * K == 0:
        k.finish()
        return 0, 1
    b = k.b
    idp, W, out = k.args[0], k.args[1], k.args[-1]
    S = Access(k, k.args[2], node.inputs[2].type.dtype, 1)
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    supers = len(node.inputs) > 4          # two-level: u8 scales and zeros times supers
    mins = zeros is not None and (zeros.type.dtype in dt.FLOATS or supers)
    Z = Access(k, k.args[3], zeros.type.dtype, 1) if mins else None
    SUP = Access(k, k.args[4], node.inputs[4].type.dtype, 1) if supers else None
    per_super = max(1, node.attrs.get("super_group", 0) // group)
    nsuper = node.inputs[4].type.shape[0] if supers else 0
    i4 = node.inputs[1].type.dtype is dt.i4
    half = 8 if i4 else 128
    fail = k.fail(SQK_ERR_INDEX)
    k.index_error = (f"gather_q: every id in %{node.inputs[0].name} must lie in [{-N}, {N}), the columns of "
                     f"%{node.inputs[1].name} (e.g. the vocabulary)")
    rows = uses_rows(k.target)
    groups = node.inputs[2].type.shape[0]

    def column(n):
        """Column n's (byte of q at k = 0, bytes from one k to the next, right shift
        of its field in the byte, whether it is the host word's top field (None on
        the row layout), index of its scale in group 0, index step per group,
        index of its supers in super-block 0, step per super-block, step from
        d to dmin)."""
        if rows:
            L = RowLayout(node)
            blk, j = b.udiv(n, i64(BW)), b.urem(n, i64(BW))
            w = b.select(b.icmp_signed("==", blk, i64(L.nblk - 1)), i64(L.last), i64(BW))
            rb = b.add(b.lshr(w, i64(1)), b.and_(w, i64(1))) if i4 else w      # row bytes of the block
            base = b.mul(blk, i64(K * L.row_bytes(BW)))
            if i4:
                hi = b.icmp_signed(">=", j, rb)
                byte = b.select(hi, b.sub(j, rb), j)
                shift = b.select(hi, i64(4), i64(0))
            else:
                byte, shift = j, i64(0)
            return b.add(base, byte), rb, shift, None, n, i64(N), b.mul(n, i64(2)), 2 * N, 1
        L = QLayout(node)
        blk, c = b.udiv(n, i64(NB)), b.urem(n, i64(NB))
        cv, lane = b.udiv(c, i64(VL)), b.urem(c, i64(VL))
        word, e = b.udiv(cv, i64(L.fields)), b.urem(cv, i64(L.fields))
        row = L.words * VL * 4                                                # bytes per row of a block
        base = b.add(b.mul(blk, i64(K * row)), b.add(b.mul(word, i64(VL * 4)), b.mul(lane, i64(4))))
        if i4:   # nibble e of the little-endian word: byte e // 2, shift 4 * (e % 2)
            base, shift = b.add(base, b.lshr(e, i64(1))), b.mul(b.and_(e, i64(1)), i64(4))
        else:
            base, shift = b.add(base, e), i64(0)
        top = b.icmp_signed("==", e, i64(L.fields - 1))
        return (base, i64(row), shift, top, b.add(b.mul(blk, i64(groups * NB)), c), i64(NB),
                b.add(b.mul(blk, i64(nsuper * 2 * NB)), c), 2 * NB, NB)

    with loop(b, k.begin, k.end, name="item") as item:
        idx = b.load(gep(b, idp, lltype(ids_t.dtype), item), typ=lltype(ids_t.dtype))
        if ids_t.dtype is not dt.i64:
            idx = b.sext(idx, I64)
        idx = b.select(b.icmp_signed("<", idx, i64(0)), b.add(idx, i64(N)), idx)
        ok = b.append_basic_block("in_range")
        b.cbranch(b.icmp_unsigned("<", idx, i64(N)), ok, fail)
        b.position_at_end(ok)
        base, stride, shift, top, s0, gstride, sup0, sstride, dmin = column(idx)
        shift8 = b.trunc(shift, I8)
        # host fields below the top hold q + half: flipping that bit gives q in two's complement
        flip = b.select(top, ir.Constant(I8, 0), ir.Constant(I8, half - 256 if half == 128 else half)) \
            if top is not None else None
        if zeros is not None and not mins:
            zty = lltype(dt.i8) if rows or i4 else ir.IntType(16)
            zoff = b.select(top, ir.Constant(I32, 0), ir.Constant(I32, half)) if top is not None else None
        with loop(b, 0, K, name="k") as kk:
            v = b.lshr(b.load(gep(b, W, I8, b.add(base, b.mul(kk, stride))), typ=I8), shift8)
            if flip is not None:
                v = b.xor(v, flip)
            if i4:   # sign-extend the nibble
                v = b.ashr(b.shl(v, ir.Constant(I8, 4)), ir.Constant(I8, 4))
            q = b.sext(v, I32)
            g = b.udiv(kk, i64(group))
            col = b.add(s0, b.mul(g, gstride))
            s = S.scalar(col)
            mn = Z.scalar(col) if mins else None
            if supers:   # scale = d * sub-scale, minimum = dmin * sub-minimum (exact products)
                sup = b.add(sup0, b.mul(b.udiv(g, i64(per_super)), i64(sstride)))
                s = b.fmul(SUP.scalar(sup), b.uitofp(s, F32))
                mn = b.fmul(SUP.scalar(b.add(sup, i64(dmin))), b.uitofp(mn, F32))
            if mins:   # (q + 8) * scale + minimum: the product exact, one rounding
                w = b.fadd(b.fmul(b.sitofp(b.add(q, ir.Constant(I32, 8)), F32), s), mn)
            else:
                if zeros is not None:   # host: stored as zero + off_e
                    z = b.sext(b.load(gep(b, k.args[3], zty, col), typ=zty), I32)
                    q = b.sub(q, b.sub(z, zoff) if zoff is not None else z)
                w = b.fmul(b.sitofp(q, F32), s)
            b.store(w, gep(b, out, F32, b.add(b.mul(item, i64(K)), kk)))
    k.finish()
    return ids_t.size, max(1, 4096 // max(1, K))
