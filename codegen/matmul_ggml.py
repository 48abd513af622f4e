"""``matmul_ggml``: x @ W.T with W kept as its GGUF file's blocks (Q6_K, Q5_0), so
the artifact stores the file's bytes (the packer only reorders bytes within them).

Q5_0 block (22 bytes, 32 weights; ir/blocks.py): f16 d, u32 qh, qs[16]: weight
j's code is the low (j < 16) or high nibble of qs[j % 16] with bit j of qh
as its fifth bit, the weight (code - 16) * d, exact in f32.  Stored as the file
(no packing): the 16 bytes of nibbles become one <32 x i8> (low nibbles, then
high), each field of 8 codes is widened to <8 x i32> and or-ed with its 8 bits
of qh, spread over the lanes by a shift per lane.

Q6_K super-block (210 bytes, 256 weights; ir/blocks.py): ql[128] low nibbles,
qh[64] 2-bit high parts, sc[16] i8 scales, f16 d.  In half h < 2 of the
super-block, chunk i < 4 of 32 weights (weights 128h + 32i + l, l < 32) takes
its codes from the 32-byte runs ql[64h + 32(i % 2) + l] (low nibble for i < 2,
high for i >= 2) and qh[32h + l] (bits 2i, 2i + 1): code = lo | hi << 4, the
weight (code - 32) * (d * sc[(128h + 32i + l) / 16]), exact in f32 (at most
23 significant bits), the value ggml dequantizes.

Packed layout (``pack_matmul_ggml``): the same bytes, each 32-byte run of ql
and qh transposed as a 4 x 8 matrix, so that byte e of 32-bit lane j holds
l = 8e + j.  A chunk's 32 codes then decode with byte-vector shifts and masks
on one <32 x i8> (6 operations, q = code - 32 per byte), and field e of its
<8 x i32> words, sign-extended by two shifts, is the column of weights
l = 8e .. 8e + 7: contiguous in x, no widening shuffles.  Per 8 weights: two
shifts, a conversion, the multiply by d * sc (exact: ggml's weight) and one
FMA per row of x (llvm-mca: ~108 cycles per super-block on Zen 3; measured
about half the int4 GEMV's weights per second at M = 1, two thirds at M = 16,
for 6.5625 bits per weight against int4's 4.5).

Kernel: work items are (output feature n, tile of up to 4 rows of x), n major,
so the tiles of one n reuse its row of blocks from L1; <8 x f32> accumulators
(CHAINS in all, several per row for small tiles: FMA latency), summed
horizontally at the end.  Plain LLVM vectors: AVX2 and AVX-512 take them as
ymm, RVV with a known VLEN strip-mines them and rv64gc runs them scalar.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from .gather import SQK_ERR_INDEX, checked_id
from .kernel import F16, F32, I8, I32, Kernel, fconst, fold_loop, gep, hsum, i64, last_chunk, loop, splat
from .lower import emitter, packer
from .matmul import Access, cdiv, fma
from .matmul_q_rows import RT

QK = 256            # weights per Q6_K super-block
BLOCK = 210         # bytes per Q6_K super-block
VL = 8              # lanes of the words and accumulators
CHAINS = 4          # independent accumulators per tile (FMA latency), split over the tile's rows
MIN_PARALLEL_BYTES = 1 << 17


@packer("matmul_ggml", "gather_ggml", inputs=(1,))
def pack_matmul_ggml(node, index: int, a: np.ndarray, target=None) -> bytes | None:
    """Q6_K: the blocks with each 32-byte run of ql and qh transposed (module
    docstring); Q5_0: as stored."""
    if index != 1 or node.attrs["type"] != "Q6_K":
        return None
    n = a.shape[0]
    blk = np.array(a, np.uint8).reshape(n, -1, BLOCK)
    runs = blk[..., :192].reshape(n, -1, 6, 4, 8)                 # [n, sb, run, e, j]: byte 8e + j
    blk[..., :192] = runs.transpose(0, 1, 2, 4, 3).reshape(n, -1, 192)   # byte 4j + e
    return blk.tobytes()


def decode_super_block(k: Kernel, W, base, each):
    """Decode the (packed) Q6_K super-block at byte ``base`` of ``W``: calls
    ``each(offset, w)`` for its 32 fields in order, w an <8 x f32> of the
    weights offset .. offset + 7 of the super-block (exact: ggml's values)."""
    b = k.b
    v32i8, v8i32, fvec = ir.VectorType(I8, 32), ir.VectorType(I32, VL), ir.VectorType(F32, VL)

    def run(at):
        return b.load(gep(b, W, I8, b.add(base, i64(at))), typ=v32i8, align=1)

    def const8(v):
        return ir.Constant(v32i8, [v] * 32)

    d = b.fpext(b.load(gep(b, W, I8, b.add(base, i64(208))), typ=F16, align=1), F32)
    for h in range(2):
        ql = [run(64 * h + 32 * r) for r in range(2)]
        qh = run(128 + 32 * h)
        for i in range(4):
            lo = b.lshr(ql[i % 2], const8(4)) if i >= 2 else b.and_(ql[i % 2], const8(15))
            hi = b.and_(b.lshr(qh, const8(2 * i)) if i else qh, const8(3))
            # q = code - 32 in [-32, 32) per byte; field e sign-extended by two shifts
            words = b.bitcast(b.sub(b.or_(lo, b.shl(hi, const8(4))), const8(32)), v8i32)
            for half in range(2):   # the chunk's two groups of 16: fields 0, 1 and 2, 3
                g = 8 * h + 2 * i + half
                sc = b.load(gep(b, W, I8, b.add(base, i64(192 + g))), typ=I8)
                ds = splat(b, b.fmul(d, b.sitofp(sc, F32)), VL)
                for e in (2 * half, 2 * half + 1):
                    v = b.shl(words, ir.Constant(v8i32, [24 - 8 * e] * VL)) if e < 3 else words
                    q = b.sitofp(b.ashr(v, ir.Constant(v8i32, [24] * VL)), fvec)
                    each(128 * h + 32 * i + 8 * e, b.fmul(q, ds))             # (code - 32) * ds, exact


def decode_q5_0(k: Kernel, W, base, each):
    """Decode the Q5_0 block at byte ``base`` of ``W``: ``each(offset, w)`` for its
    4 fields, w an <8 x f32> of the weights offset .. offset + 7 (ggml's values)."""
    b = k.b
    v16i8, v8i32, fvec = ir.VectorType(I8, 16), ir.VectorType(I32, VL), ir.VectorType(F32, VL)
    d = splat(b, b.fpext(b.load(gep(b, W, I8, base), typ=F16, align=1), F32), VL)
    qh = splat(b, b.load(gep(b, W, I8, b.add(base, i64(2))), typ=I32, align=1), VL)
    qs = b.load(gep(b, W, I8, b.add(base, i64(6))), typ=v16i8, align=1)
    lo = b.and_(qs, ir.Constant(v16i8, [15] * 16))
    hi = b.lshr(qs, ir.Constant(v16i8, [4] * 16))
    for e in range(4):
        src, at = (lo, 8 * e) if e < 2 else (hi, 8 * e - 16)
        c = b.zext(b.shuffle_vector(src, src, ir.Constant(ir.VectorType(I32, VL), list(range(at, at + VL)))), v8i32)
        bit = b.and_(b.lshr(qh, ir.Constant(v8i32, [8 * e + j for j in range(VL)])), ir.Constant(v8i32, [1] * VL))
        code = b.or_(c, b.shl(bit, ir.Constant(v8i32, [4] * VL)))
        q = b.sitofp(b.sub(code, ir.Constant(v8i32, [16] * VL)), fvec)
        each(8 * e, b.fmul(q, d))                                         # (code - 16) * d, exact


# type -> (weights per decoded unit, its bytes, decoder)
FORMATS = {"Q6_K": (QK, BLOCK, decode_super_block), "Q5_0": (32, 22, decode_q5_0)}


@emitter("matmul_ggml")
def emit_matmul_ggml(k: Kernel, node):
    from .matmul_q_gemm import emit_ggml_gemm, takes_ggml_gemm   # (it imports this module)
    if takes_ggml_gemm(node, k.target):
        return emit_ggml_gemm(k, node)
    x_t, y_t = node.inputs[0].type, node.outputs[0].type
    K, N = x_t.shape[-1], node.inputs[1].type.shape[0]
    qk, nbytes, decode = FORMATS[node.attrs["type"]]
    rows = math.prod(x_t.shape[:-1])
    if rows * N == 0:
        k.finish()
        return 0, 1
    b = k.b
    X = Access(k, k.args[0], x_t.dtype, VL)
    Y = Access(k, k.args[-1], y_t.dtype, 1)
    row_bytes = K // qk * nbytes
    ntiles = cdiv(rows, RT)
    fvec = ir.VectorType(F32, VL)

    def tile(n, m0, rt):
        xrow = [b.mul(b.add(m0, i64(t)), i64(K)) for t in range(rt)]
        wrow = b.mul(n, i64(row_bytes))
        chains = max(1, CHAINS // rt)   # accumulators per row: field f adds into chain f % chains

        def super_block(sb, accs):
            out = list(accs)

            def each(off, w):
                c = off // 8 % chains
                k0 = b.add(b.mul(sb, i64(qk)), i64(off))
                for t in range(rt):
                    out[t * chains + c] = fma(k, X.load(b.add(xrow[t], k0)), w, out[t * chains + c])

            decode(k, k.args[1], b.add(wrow, b.mul(sb, i64(nbytes))), each)
            return out

        accs = fold_loop(b, 0, K // qk, [fconst(fvec, 0.0)] * (rt * chains), super_block, name="sb")
        for t in range(rt):
            acc = functools.reduce(b.fadd, accs[t * chains:(t + 1) * chains])
            Y.store(hsum(k, acc), b.add(b.mul(b.add(m0, i64(t)), i64(N)), n))

    with loop(b, k.begin, k.end, name="item") as item:
        n, ti = b.udiv(item, i64(ntiles)), b.urem(item, i64(ntiles))
        last_chunk(b, ti, ntiles, rows % RT or RT, RT, lambda rt: tile(n, b.mul(ti, i64(RT)), rt))
    k.finish()
    return N * ntiles, max(1, -(-MIN_PARALLEL_BYTES // max(1, row_bytes)))


@emitter("gather_ggml")
def emit_gather_ggml(k: Kernel, node):
    """Rows ``ids`` of the table, decoded from the same packed blocks (an id out
    of [-N, N) returns SQK_ERR_INDEX)."""
    ids_t, (N, rb) = node.inputs[0].type, node.inputs[1].type.shape
    qk, nbytes, decode = FORMATS[node.attrs["type"]]
    K = rb // nbytes * qk
    if ids_t.size * K == 0:
        k.finish()
        return 0, 1
    b = k.b
    idp, out = k.args[0], k.args[-1]
    O = Access(k, out, dt.f32, VL)
    fail = k.fail(SQK_ERR_INDEX)
    k.index_error = (f"gather_ggml: every id in %{node.inputs[0].name} must lie in [{-N}, {N}), the rows of "
                     f"%{node.inputs[1].name} (e.g. the vocabulary)")
    with loop(b, k.begin, k.end, name="item") as item:
        idx = checked_id(b, idp, ids_t.dtype, item, N, fail)
        with loop(b, 0, K // qk, name="sb") as sb:
            o0 = b.add(b.mul(item, i64(K)), b.mul(sb, i64(qk)))
            decode(k, k.args[1], b.add(b.mul(idx, i64(rb)), b.mul(sb, i64(nbytes))),
                   lambda off, w: O.store(w, b.add(o0, i64(off))))
    k.finish()
    return ids_t.size, max(1, 4096 // max(1, K))
