"""``matmul_q``: x[..., M, K] @ dequantize(q, scales, zeros)[K, N] with i8 or i4
weights, f32 (or f16, widened) activations, f32 accumulation, the weights
dequantized in registers only.

Packed layout (``pack_matmul_q``; the IR keeps the logical values).  Columns
are cut into blocks of NB = 64; a block is eight column vectors of VL = 8
columns (column ``8*cv + lane``).  For every row k the block's weights are
32-bit words of VL lanes, ``FIELDS`` = 32 / bits fields per word:

* i4: one 8-lane word per row (32 bytes), nibble ``e`` of lane ``l`` holds
  column ``8*e + l``;
* i8: two words per row (64 bytes), byte ``e`` of word ``w`` holds column
  vector ``4*w + e``.

q is stored block after block, each block row after row ([N/NB][K][words]),
so a work item (one column block) streams one contiguous run of bytes.  The
top field of a word holds q in two's complement; the lower fields hold
``q + OFF`` (OFF = 2^(bits-1), i.e. q with its sign bit flipped: unsigned).
Then ``sitofp(word & (mask << bits*e))`` is exactly ``(q + off_e) * 2^(bits*e)``
(one AND and one conversion per VL weights, no shifts or shuffles), and the
kernel subtracts ``off_e * sum(x)`` per group and scales by ``2^-(bits*e)``.
Scales are stored [N/NB][groups][NB] in their own dtype; zero points, when
present, as ``zeros + off_e`` in [N/NB][groups][NB] (i8 for i4 weights, i16
for i8); float minimums (GGUF's Q4_1) like the scales; two-level scales
(GGUF's Q4_K: u8 sub-scales and sub-minimums like the scales, supers as
[N/NB][super-blocks][2][NB]).  Padding columns (N not a multiple of NB) hold
q = 0, scale 0.

Kernel: work items are (column block, chunk of up to MCH rows of x), block
major, so two threads stream disjoint weight bytes.  Per group of K rows a
register tile of partial sums ``acc[m, cv] = sum_k x[m, k] * (q + off)[k, cv]``
is accumulated, then folded once per group into f32 row sums on the stack:
``y[m, cv] += scale * (acc * 2^-(bits*e) - (zero + off_e) * sum_k x[m, k])``
(the sums of x computed once per group and row, vectorized); with minimums
the code is q + 8, so the offset term is ``(off_e - 8) * sum_k x`` (nothing
in the lower fields) and ``minimum * sum_k x`` is added.  A tile is up
to ROWS_TILE rows x a few column vectors (it fits 16 vector registers with
the masks), the block's words re-read from L1 per pass; rows of a tile share
each converted weight vector.  (GEMV with all eight column vectors in one
pass spills and measured 15% slower.)  Per 8 weights the inner loop is one
AND, one int->float conversion and one FMA per row: llvm-mca puts the GEMV
loop at ~1.3 cycles per 8 weights on Zen 3 (the four FP pipes full), which
caps two cores near 14 GB/s of int4: below DRAM speed.  The int8-activation
mode at the end of this file (``activations=int8``, other numerics) is the
way past that.

riscv64 (with or without V) reads a row layout instead, with kernels of
scalar loops that LLVM vectorizes length-agnostically (codegen/matmul_q_rows.py,
both activation modes): the packers see the target.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import IRError, Node
from ..ir.ops import i8act_segments
from .kernel import F32, I8, I16, I32, Kernel, fconst, gep, hsum, i64, last_chunk, loop, splat
from .lower import emitter, packer
from .matmul import Access, _stack_array, fma, fold_loop
from .matmul_q_rows import BW, RowLayout, emit_rows, i8act_blocks, pack_rows, uses_rows

NB = 64          # columns per block
VL = 8           # columns per column vector (lanes of the i32 words)
NCV = NB // VL   # column vectors per block
MCH = 16         # rows of x per work item at most
# Register tiles: M = 1 takes PASS_CV column vectors per pass (x K_CHAINS
# accumulator sets); M > 1 up to ROWS_TILE rows x TILE_CV column vectors,
# which fit 16 vector registers with the masks and broadcasts of x (measured
# on Zen 3 against 3x4, 2x4, 6x2 and 8x1).
ROWS_TILE = 4
PASS_CV = 4
TILE_CV = 2
K_CHAINS = 2     # rows of q in flight per step (separate accumulators) for small tiles
# Fewest weight bytes worth waking another thread for.
MIN_PARALLEL_BYTES = 1 << 17


class QLayout:
    """Sizes of the packed layout of one matmul_q node."""

    def __init__(self, node: Node):
        q, s = (v.type for v in node.inputs[1:3])
        self.group = node.attrs["group"]
        self.K, self.N = q.shape
        self.bits = 4 if q.dtype is dt.i4 else 8
        self.fields = 32 // self.bits              # fields per 32-bit word
        self.words = NCV // self.fields            # words (of VL lanes) per row of a block
        self.groups = s.shape[0]
        self.nblk = -(-self.N // NB)
        zeros = node.inputs[3] if len(node.inputs) > 3 else None
        self.has_supers = len(node.inputs) > 4            # two-level: u8 scales and zeros times supers
        self.nsuper = node.inputs[4].type.shape[0] if self.has_supers else 0
        self.per_super = node.attrs.get("super_group", 0) // self.group   # groups per super-block
        # float zeros (or two-level): minimums, the code being q + 8
        self.has_mins = zeros is not None and (zeros.type.dtype in dt.FLOATS or self.has_supers)
        self.has_zeros = zeros is not None and not self.has_mins
        self.zero_np = np.int8 if self.bits == 4 else np.int16

    def field(self, cv: int) -> tuple[int, int]:
        """(word, field) holding column vector cv."""
        return cv // self.fields, cv % self.fields

    def offset(self, e: int) -> int:
        """What field e adds to q: 2^(bits-1) below the top field, 0 in it."""
        return 0 if e == self.fields - 1 else 1 << (self.bits - 1)

    def blocked(self, a: np.ndarray) -> np.ndarray:
        """[R, N] -> [nblk, R, NB], padding columns with zeros."""
        r = a.shape[0]
        out = np.zeros((r, self.nblk * NB), a.dtype)
        out[:, :self.N] = a
        return np.ascontiguousarray(out.reshape(r, self.nblk, NB).transpose(1, 0, 2))


@packer("matmul_q", inputs=(1, 2, 3, 4))
def pack_matmul_q(node: Node, index: int, a: np.ndarray, target=None) -> bytes | None:
    """Bytes of input ``index`` (q, scales, zeros or supers) as the kernel reads
    them (layout in the module docstring; activations=int8: ``pack_i8act``)."""
    if uses_rows(target):
        return pack_rows(node, index, a)
    if node.attrs.get("activations", "none") == "int8":
        return pack_i8act(node, index, a, target)
    L = QLayout(node)
    if index == 0:
        return None
    if index == 4:   # supers [S, N, 2] -> [N/NB][S][2][NB]
        a = np.asarray(a)
        flat = np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(2 * a.shape[0], a.shape[1])
        return L.blocked(flat).astype(a.dtype.newbyteorder("<")).tobytes()
    if index == 2 or (index == 3 and L.has_mins):
        return L.blocked(np.asarray(a)).astype(np.asarray(a).dtype.newbyteorder("<")).tobytes()
    cv_off = np.array([L.offset(L.field(cv)[1]) for cv in range(NCV)], np.int32).repeat(VL)  # per column of a block
    if index == 3:
        z = L.blocked(np.asarray(a).astype(np.int32))  # [nblk, G, NB]
        return (z + cv_off).astype(np.dtype(L.zero_np).newbyteorder("<")).tobytes()
    # uint8 arithmetic throughout (the stacks benchmarked are 512 MiB): the
    # field values are q + off_e modulo 2^bits (two's complement wraps right).
    q = np.asarray(a).astype(np.int8, copy=False)
    if L.N % NB:
        q = np.concatenate([q, np.zeros((L.K, L.nblk * NB - L.N), np.int8)], axis=1)
    u = q.view(np.uint8) + np.tile(cv_off.astype(np.uint8), L.nblk)
    if L.bits == 4:
        u &= 0xF
        u = u.reshape(L.K, L.nblk, 4, 2, VL)             # [k, blk, byte of word, nibble, lane]
        u = u[:, :, :, 0] | (u[:, :, :, 1] << 4)           # [k, blk, byte, lane]
        return np.ascontiguousarray(u.transpose(1, 0, 3, 2)).tobytes()   # [blk, k, lane, byte]
    u = u.reshape(L.K, L.nblk, L.words, L.fields, VL)      # [k, blk, word, byte, lane]
    return np.ascontiguousarray(u.transpose(1, 0, 2, 4, 3)).tobytes()   # [blk, k, word, lane, byte]


def group_scales(b, L: QLayout, S, MINS, SUP, sblk, g, cv: int, blk=None):
    """(index, scale, minimum or None) of column vector ``cv`` of group ``g`` in
    the block whose scales start at ``sblk`` (``blk`` its number, derived when
    not given): two-level scales and minimums multiplied out (exact products)."""
    fvec = ir.VectorType(F32, VL)
    col = b.add(sblk, b.add(b.mul(g, i64(NB)), i64(cv * VL)))
    if L.has_supers:   # scale = d * sub-scale, minimum = dmin * sub-minimum
        if blk is None:
            blk = b.udiv(sblk, i64(L.groups * NB))
        sup = b.add(b.mul(blk, i64(L.nsuper * 2 * NB)),
                    b.add(b.mul(b.udiv(g, i64(L.per_super)), i64(2 * NB)), i64(cv * VL)))
        return (col, b.fmul(SUP.load(sup), b.uitofp(S.load(col), fvec)),
                b.fmul(SUP.load(b.add(sup, i64(NB))), b.uitofp(MINS.load(col), fvec)))
    return col, S.load(col), MINS.load(col) if L.has_mins else None


@emitter("matmul_q")
def emit_matmul_q(k: Kernel, node: Node):
    """The kernel choice (int8 activations, the riscv64 row layout, the prefill GEMM), else
    the tile loop: work item = (column block, chunk of up to MCH rows of x); the last chunk
    is the short one (static code per size, ``last_chunk``)."""
    if node.attrs.get("activations", "none") == "int8":
        from .matmul_q_gemm_i8 import emit_gemm_i8, takes_gemm_i8   # (it imports this module's layout)
        if takes_gemm_i8(node, k.target):
            return emit_gemm_i8(k, node)
        return emit_i8act(k, node)
    if uses_rows(k.target):
        return emit_rows(k, node)
    from .matmul_q_gemm import emit_gemm, takes_gemm   # (it imports this module's layout)
    if takes_gemm(node, k.target):
        return emit_gemm(k, node)
    L = QLayout(node)
    rows = math.prod(node.inputs[0].type.shape[:-1])  # q is shared: every batch dim folds into rows
    if rows * L.N == 0:
        k.finish()
        return 0, 1
    code = QCode(k, node, L)
    b = k.b
    mchunks = -(-rows // MCH)
    with loop(b, k.begin, k.end, name="item") as item:
        blk = b.udiv(item, i64(mchunks))
        mc = b.urem(item, i64(mchunks))
        m_first = b.mul(mc, i64(MCH))
        last_chunk(b, mc, mchunks, rows % MCH or MCH, MCH, lambda r: code.chunk(blk, m_first, r))
    k.finish()
    item_bytes = L.K * NB * L.bits // 8
    return L.nblk * mchunks, max(1, -(-MIN_PARALLEL_BYTES // max(1, item_bytes)))


def tiles(r: int):
    """(first row, rows, column-vector passes) of the register tiles of r rows."""
    n = -(-r // ROWS_TILE)
    sizes = [r // n + (i < r % n) for i in range(n)]
    per = PASS_CV if r == 1 else TILE_CV
    passes = [list(range(p, p + per)) for p in range(0, NCV, per)]
    return [(sum(sizes[:i]), s, passes) for i, s in enumerate(sizes)]


class QCode:
    """The code of one float-activation x86 matmul_q kernel: a chunk's row prologue
    and stores (``chunk``), per group the sums of x (``group_sum``) and the register
    tiles (``group_body``), each tile's k loop (``tile_sums``) and its fold of the
    group's scales, zero points or minimums into yacc (``tile_fold``)."""

    def __init__(self, k: Kernel, node: Node, L: QLayout):
        self.k, self.b, self.L = k, k.b, L
        x_t, y_t = node.inputs[0].type, node.outputs[0].type
        self.X = Access(k, k.args[0], x_t.dtype, 1)
        self.W = k.args[1]
        self.S = Access(k, k.args[2], node.inputs[2].type.dtype, VL)
        self.MINS = Access(k, k.args[3], node.inputs[3].type.dtype, VL) if L.has_mins else None
        self.SUP = Access(k, k.args[4], node.inputs[4].type.dtype, VL) if L.has_supers else None
        self.zty = ir.VectorType(ir.IntType(L.bits * 2), VL)  # zero points: i8 / i16
        self.Y = Access(k, k.args[-1], y_t.dtype, VL)
        self.YACC = Access(k, _stack_array(k, MCH * NB, "yacc"), dt.f32, VL)
        self.wvec = ir.VectorType(I32, VL)
        self.fvec = fvec = ir.VectorType(F32, VL)
        self.zero = fconst(fvec, 0.0)
        self.row_words = L.words * VL  # i32 per row of a block
        self.XV = Access(k, k.args[0], x_t.dtype, VL)

    def group_sum(self, start, n):
        """sum(x[start:start+n]) (f32), VL lanes at a time: computed once per
        group and row, not in the weight loops (a scalar add chain there costs
        its latency on every step)."""
        b = self.b
        v = fold_loop(b, 0, n - n % VL, [self.zero], lambda i, a: [b.fadd(a[0], self.XV.load(b.add(start, i)))],
                      step=VL, name="xs")[0]
        total = hsum(self.k, v)
        for i in range(n - n % VL, n):
            total = b.fadd(total, self.X.scalar(b.add(start, i64(i))))
        return total

    def group_body(self, wblk, sblk, xrow, k0, g, glen, r):
        """Fold rows [k0, k0+glen) (group g) of the block into yacc for r rows of x
        (zero points sit at the same index as scales)."""
        xs = [self.group_sum(self.b.add(xrow[m], k0), glen) for m in range(r)]
        for m0, mr, passes in tiles(r):
            for cvs in passes:
                vals = self.tile_sums(wblk, xrow, k0, glen, m0, mr, cvs)
                self.tile_fold(vals, sblk, xs, g, m0, mr, cvs)

    def tile_sums(self, wblk, xrow, k0, glen, m0, mr, cvs):
        """Rows [m0, m0+mr) x column vectors cvs of one group: the k loop in registers;
        returns the tile's sums of x * (q + off), per column vector and row."""
        k, b, L = self.k, self.b, self.L
        wvec, fvec = self.wvec, self.fvec
        nw = sorted({L.field(cv)[0] for cv in cvs})
        nacc = len(cvs) * mr
        # Independent accumulator sets for consecutive rows k, so that
        # FMA latency (4 cycles) never waits: ``chains`` x nacc >= 8.
        chains = max(1, min(K_CHAINS, 8 // nacc))

        def step(kk, vals, nk=chains):
            out = list(vals)
            for c in range(nk):
                kr = b.add(k0, b.add(kk, i64(c)))
                wp = b.add(wblk, b.mul(kr, i64(self.row_words)))
                words = {w: b.load(gep(b, self.W, I32, b.add(wp, i64(w * VL))), typ=wvec, align=4) for w in nw}
                xb = [splat(b, self.X.scalar(b.add(xrow[m0 + m], kr)), VL) for m in range(mr)]
                i = c * nacc
                for cv in cvs:
                    w, e = L.field(cv)
                    m = (((1 << L.bits) - 1) << (L.bits * e)) - (1 << 32 if e == L.fields - 1 else 0)
                    f = b.sitofp(b.and_(words[w], ir.Constant(wvec, [m] * VL)), fvec)
                    for t in range(mr):
                        out[i] = fma(k, xb[t], f, out[i])
                        i += 1
            return out

        vals = fold_loop(b, 0, glen - glen % chains, [self.zero] * (nacc * chains), step, step=chains,
                         name="kk")
        if glen % chains:  # the group's last rows, into the first set
            rest = glen - glen % chains
            vals = fold_loop(b, rest, glen, vals, lambda kk, v: step(kk, v, 1), name="kr")
        return [functools.reduce(b.fadd, vals[i::nacc]) for i in range(nacc)]

    def tile_fold(self, vals, sblk, xs, g, m0, mr, cvs):
        """The tile's sums scaled into yacc: scale * (sum * 2^-(bits*e) - (zero + off_e) * sum(x))
        (+ minimum * sum(x))."""
        k, b, L, YACC = self.k, self.b, self.L, self.YACC
        fvec, zty = self.fvec, self.zty
        xsum = [splat(b, xs[m0 + t], VL) for t in range(mr)]
        neg = [b.fneg(v) for v in xsum]
        i = 0
        for cv in cvs:
            e = L.field(cv)[1]
            col, s, mins = group_scales(b, L, self.S, self.MINS, self.SUP, sblk, g, cv)
            sp = b.fmul(s, fconst(fvec, 2.0 ** -(L.bits * e)))  # exact: a power of two
            if L.has_zeros:
                z = b.load(gep(b, k.args[3], zty.element, col), typ=zty, align=L.bits // 4)
                soff = b.fmul(s, b.sitofp(b.sext(z, self.wvec), fvec))
            else:   # minimums: the code is q + 8, so field e's offset is off_e - 8
                off = L.offset(e) - (8 if L.has_mins else 0)
                soff = b.fmul(s, fconst(fvec, float(off))) if off else None
            for t in range(mr):
                pos = i64((m0 + t) * NB + cv * VL)
                y = fma(k, sp, vals[i], YACC.load(pos))
                if soff is not None:
                    y = fma(k, soff, neg[t], y)
                if mins is not None:   # + minimum * sum of the group's x
                    y = fma(k, mins, xsum[t], y)
                YACC.store(y, pos)
                i += 1

    def chunk(self, blk, m_first, r):
        """Rows [m_first, m_first + r) of x against column block blk: the row prologue
        (yacc zeroed, row offsets), the groups, the rows stored (the last block's
        valid columns only)."""
        b, L, YACC = self.b, self.L, self.YACC
        K, N, group = L.K, L.N, L.group
        for c in range(0, r * NB, VL):
            YACC.store(self.zero, i64(c))
        wblk = b.mul(blk, i64(K * self.row_words))
        sblk = b.mul(blk, i64(L.groups * NB))
        xrow = [b.mul(b.add(m_first, i64(m)), i64(K)) for m in range(r)]
        full = K // group
        with loop(b, 0, full, name="g") as g:
            self.group_body(wblk, sblk, xrow, b.mul(g, i64(group)), g, group, r)
        if K % group:
            self.group_body(wblk, sblk, xrow, i64(full * group), i64(full), K % group, r)
        col0 = b.mul(blk, i64(NB))

        def store(ncols):
            for m in range(r):
                yrow = b.add(b.mul(b.add(m_first, i64(m)), i64(N)), col0)
                for cv in range(-(-ncols // VL)):
                    v = YACC.load(i64(m * NB + cv * VL))
                    self.Y.store(v, b.add(yrow, i64(cv * VL)), min(VL, ncols - cv * VL))

        last_chunk(b, blk, L.nblk, N % NB or NB, NB, store, lone="both")


# --- activations=int8 ---------------------------------------------------------------
#
# Each row of x is quantized at run time per group of K (``ir.ops.matmul_q_i8act``
# is the semantics): d = max|x| / 127, xq = roundeven(x / d) in i8 — or, with a
# static ``act_scale``, d = act_scale (a compile-time constant) and xq clamped to
# [-127, 127]; then y = sum_g d[g] * scale[g] * sum_k xq * (q - z), the inner
# sums exact in integers (i32 per group; i64 across spans of a group too long
# for i32, see ``i32_span``), zero points applied once per group as
# z * sum_k xq.  The outer sum is one f32 multiply and one f32 add per group,
# unfused, in group order: bit for bit the reference.  On AVX2 the integer dot
# products are vpmaddubsw + vpmaddwd (64 i4 weights per ~8 vector instructions
# against ~24 on the f32 path), or with VNNI (AVX-512 VNNI + VL, AVX-VNNI)
# vpdpbusd (64 i4 weights per ~4); hosts without AVX2 plain i32 vector
# multiply-adds on the same layout.  riscv64 reads the row layout instead
# (matmul_q_rows.i8act_blocks), quantizing x with the code below.
#
# ``act_group`` (one step d per that many values of a row, not per weight group):
# the integer sums run per *segment*, where both a weight group and an activation
# group hold (``ir.ops.i8act_segments``: one is a multiple of the other), and the
# layout's "groups" below are segments; scales and zero points are read at the
# segment's weight group, d at its activation group.
#
# Slab layout (``pack_i8act``): q as [N/64 blocks * 2 quads][K'/8][4 slabs][8
# rows of k], where K' pads every group to GP = group rounded up to 8 rows (so a
# chunk of 8 rows never straddles two groups; padding rows hold q = 0 and meet
# xq = 0).  A slab is 8 columns; the 4 slabs of a quad (the QUAD slabs a
# register tile reads together) interleave chunk by chunk, so a tile streams one
# contiguous range instead of four (int4 + int8 activations GEMV from DRAM: one
# thread 16-20 -> 22-25 GB/s, two 24-26 -> 28-38 GB/s).  A chunk of a slab is
# 32 bytes (i4) or 64 bytes (i8), read as <8 x i32> words with column c in lane c:
#
# * i4: byte 4c+t holds column c's q+8 for k = 8j+t (low nibble) and 8j+4+t
#   (high nibble);
# * i8: word h (h = 0, 1), byte 4c+t holds column c's q (two's complement) for
#   k = 8j+4h+t.  vpmaddubsw multiplies unsigned by signed bytes, so it takes
#   |q| (vpabsb: -128 gives 0x80 = 128 unsigned, right) against xq with q's
#   sign (vpsignb; |xq| <= 127 never wraps): pairs reach 2*128*127 = 32512,
#   below the i16 saturation.  With VNNI it is simpler: x is stored as u8
#   codes xq + 128 and vpdpbusd takes q as it is (signed), no vpabsb/vpsignb;
#   after the i8 data the packer stores 128 * sum_k q per slab, group and
#   column ([slabs][groups][8] i32, modulo 2^32; only for VNNI hosts,
#   ``u8_activations``) and the kernel subtracts it
#   per group: everything wraps modulo 2^32 and the final sum fits i32, so
#   it is exact (groups longer than ``i32_span`` keep the vpsignb form, their
#   i64 sums being per span).
#
# Scales as [quads][groups][4 slabs][8] (a quad's scales of a group in one run: one
# stream beside the weights', not four), zero points the same in i8 (i4: z + 8, the
# offset the nibbles carry), float minimums the same in their dtype (the nibbles'
# q + 8 being the code, nothing is subtracted; (d * minimum) * sum(xq) is added
# per group), two-level scales' u8 sub-scales and sub-minimums the same and
# their supers as [slabs][super-blocks][2][8].  Columns padded to a multiple of 64.
#
# Kernel: per column block, register tiles of up to ROWS_I8_* rows x QUAD
# slabs (32 columns): each chunk's weight words are loaded and decoded
# (nibbles split, or |q|) once for all rows of the tile, xq broadcast per
# row; the group fold and the stores stay per row.

SLAB = 8            # columns per slab
QUAD = 4            # slabs whose accumulators share each broadcast of xq
# Rows of x per register tile (x86): each chunk of weights is loaded and decoded once for
# them; tile x QUAD <8 x i32> accumulators plus operands fit 32 vector registers (AVX-512,
# its VL forms reach ymm16-31) or, with 2 rows, 16 (AVX2).  Elsewhere one row.
ROWS_I8_AVX512 = 4
ROWS_I8_AVX2 = 2
PREFETCH_I8 = 1024  # software prefetch distance in the weight stream (bytes; 0: none), AVX2 hosts
I16_CHUNKS = 4      # chunks of 8 rows of i4 whose vpmaddubsw pairs are summed in i16 (AVX2, no VNNI)
XQ_STACK = 1 << 16  # bytes of quantized x on the stack per row chunk
MAX_KP = 1 << 18    # padded K at most: one row of int8 x always sits on the stack


def i8_segments(node: Node) -> tuple[int, int, int]:
    """(segment, weight group, activation group) lengths (``ir.ops.i8act_segments``)."""
    return i8act_segments(node.inputs[1].type.shape[0], node.attrs["group"], node.attrs.get("act_group", 0))


def i8_geometry(node: Node) -> tuple[int, int, int, int]:
    """(K, N, segments, GP): GP = rows per segment in the slab layout (a multiple of 8)."""
    K, N = node.inputs[1].type.shape
    seg = i8_segments(node)[0]
    return K, N, -(-K // seg), -(-seg // 8) * 8


def i32_span(bits: int, zeros: bool = False) -> int:
    """Most rows of k whose integer dot sum surely fits i32, a multiple of 8:
    per row |xq| <= 127 against |q + 8| <= 15 (i4, the offset encoding; also
    bounds |q - z|) or |q| <= 128 (i8; |q - z| <= 255 with zero points, so
    that the exact sum_k xq * (q - z) fits too: i32 arithmetic wraps, so its
    intermediates may overflow when the final value fits).  ~2^17 rows for i8:
    per-channel K = 16384 is far inside."""
    per_row = 127 * (15 if bits == 4 else 255 if zeros else 128)
    return (2**31 - 1) // per_row // 8 * 8


def u8_activations(node: Node, target) -> bool:
    """Whether the int8-activation kernel takes x as u8 codes (xq + 128) against
    signed i8 q: on VNNI hosts, groups within one i32 span.  Only that kernel
    reads the 128 * sum_k q the packer then appends (32 bits per group and
    column: at group 32, one bit per weight, so other hosts do without)."""
    feats = set(target.enabled_features) if target is not None else set()
    vnni = "avx2" in feats and ("avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats)
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    has_zeros = zeros is not None and zeros.type.dtype not in dt.FLOATS
    return vnni and node.inputs[1].type.dtype is dt.i8 and i8_geometry(node)[3] <= i32_span(8, has_zeros)


def pack_i8act(node: Node, index: int, a: np.ndarray, target=None) -> bytes | None:
    """Packed q, scales and zero points of matmul_q {activations=int8} (layout above)."""
    K, N, G, GP = i8_geometry(node)
    seg = i8_segments(node)[0]
    nslab = -(-N // NB) * (NB // SLAB)
    i4 = node.inputs[1].type.dtype is dt.i4
    supers = len(node.inputs) > 4
    if index == 4:   # supers [S, N, 2] -> [slabs][S][2][8]
        a = np.asarray(a)
        flat = np.zeros((2 * a.shape[0], nslab * SLAB), a.dtype)
        flat[:, :N] = a.transpose(0, 2, 1).reshape(2 * a.shape[0], N)
        return np.ascontiguousarray(flat.reshape(-1, nslab, SLAB).transpose(1, 0, 2)).astype(
            a.dtype.newbyteorder("<")).tobytes()
    if index in (2, 3):
        a = np.asarray(a)
        if index == 3 and a.dtype.kind != "f" and not supers:  # i8 zero points; i4 as z + 8, as the nibbles
            a = (a.astype(np.int16) + (8 if i4 else 0)).astype(np.int8)
        s = np.zeros((a.shape[0], nslab * SLAB), a.dtype)
        s[:, :N] = a   # [quad][group][slab of the quad][column]: a quad's values of a group side by side
        return np.ascontiguousarray(s.reshape(a.shape[0], nslab // QUAD, QUAD, SLAB).transpose(1, 0, 2, 3)).astype(
            s.dtype.newbyteorder("<")).tobytes()
    if index != 1:
        return None
    u = np.full((G * GP, nslab * SLAB), 8 if i4 else 0, np.uint8)   # q = 0 in padding rows and columns
    rows = (np.arange(K) // seg) * GP + np.arange(K) % seg
    qb = np.asarray(a).astype(np.int8, copy=False).view(np.uint8)
    if not i4:
        u[rows, :N] = qb
        u = u.reshape(G * GP // 8, 2, 4, nslab // QUAD, QUAD, SLAB)   # [k // 8, h, t, quad, slab, c]
        data = np.ascontiguousarray(u.transpose(3, 0, 4, 1, 5, 2)).tobytes()  # [quad, k // 8, slab, h, c, t]
        # then 128 * sum_k q per segment and column, modulo 2^32 (the VNNI kernel's u8 x offset)
        cs = np.zeros((G, nslab * SLAB), np.int64)
        if G:
            cs[:, :N] = np.add.reduceat(np.asarray(a).astype(np.int8, copy=False), np.arange(G) * seg, axis=0,
                                        dtype=np.int64) * 128
        cs = (cs & 0xFFFFFFFF).astype("<u4").reshape(G, nslab, SLAB).transpose(1, 0, 2)   # [slab, g, c]
        return data + np.ascontiguousarray(cs).tobytes() if u8_activations(node, target) else data
    u[rows, :N] = (qb + np.uint8(8)) & 0xF
    u = u.reshape(G * GP // 8, 2, 4, nslab // QUAD, QUAD, SLAB)   # [j, half, t, quad, slab, c]
    byte = u[:, 0] | (u[:, 1] << 4)                               # [j, t, quad, slab, c]
    return np.ascontiguousarray(byte.transpose(2, 0, 3, 4, 1)).tobytes()  # [quad, j, slab, c, t]


def emit_i8act(k: Kernel, node: Node):
    """matmul_q {activations=int8}, the tile loop: per chunk of rows of x, its row
    prologue (the rows quantized on the stack: dynamic per row and group, or with the
    static ``act_scale``), then every column block of this call's range against them
    (x86: ``I8ActCode.blocks``; riscv64: the row layout's, matmul_q_rows.i8act_blocks)."""
    K, N, G, GP = i8_geometry(node)   # G segments, GP rows apart in xq and the slabs
    rows = math.prod(node.inputs[0].type.shape[:-1])
    KP = G * GP
    if KP > MAX_KP:
        raise IRError(f"matmul_q activations=int8: K={K} (padded {KP}) exceeds {MAX_KP}, the row of quantized "
                      f"x kept on the stack")
    if rows * N == 0:
        k.finish()
        return 0, 1
    code = I8ActCode(k, node, rows)
    b = k.b
    if uses_rows(k.target):   # riscv64: the row layout (matmul_q_rows.py), vectorized by LLVM
        blocks, nblk = i8act_blocks(k, node, code.xq, code.dq, code.qsum, KP, GP, i32_span(code.bits, code.has_zeros))
        item_bytes = K * RowLayout(node).row_bytes(BW)
    else:
        blocks, nblk = code.blocks, code.nblk
        item_bytes = KP * NB * code.bits // 8
    rch = code.rch
    with loop(b, 0, -(-rows // rch), name="rchunk") as c:
        r0 = b.mul(c, i64(rch))
        nr = b.sub(i64(rows), r0)
        nr = b.select(b.icmp_signed("<", nr, i64(rch)), nr, i64(rch))
        code.quantize(r0, nr)
        blocks(r0, nr)
    k.finish()
    return nblk, max(1, -(-MIN_PARALLEL_BYTES // max(1, item_bytes)))


class I8ActCode:
    """The code of one int8-activation kernel: the quantization of a chunk of rows
    into the stack buffers (``quantize`` -> ``quant_act``, ``group_amax``) and, on x86,
    the block loop (``blocks``) over register tiles (``tile_pass``): per group the
    exact integer sums (``group_dots`` over the micro-kernels ``w_ops``, ``x_ops``,
    ``dot8``) and their fold into the f32 row sums (``group_fold``)."""

    def __init__(self, k: Kernel, node: Node, rows: int):
        self.k, self.b = k, k.b
        x_t, y_t = node.inputs[0].type, node.outputs[0].type
        self.K, self.N, self.G, self.GP = K, N, G, GP = i8_geometry(node)
        self.seg, self.gw, self.ga = seg, gw, ga = i8_segments(node)
        # weight groups, activation groups per row
        self.GW, self.GA = -(-K // gw) if K else 0, -(-K // ga) if K else 0
        zeros = node.inputs[3] if len(node.inputs) > 3 else None
        self.supers = supers = len(node.inputs) > 4   # two-level: u8 sub-scales and sub-minimums times supers
        # minimums (float, or two-level): the nibbles' q + 8 is the code
        self.mins = mins = zeros is not None and (zeros.type.dtype in dt.FLOATS or supers)
        self.has_zeros = has_zeros = zeros is not None and not mins
        self.act_scale = float(np.float32(node.attrs.get("act_scale", 0.0)))  # the reference's f32 step; 0: dynamic
        self.bits = bits = 4 if node.inputs[1].type.dtype is dt.i4 else 8
        self.KP = KP = G * GP
        self.v32i8, self.v16i16, self.v8i32 = v32i8, v16i16, v8i32 = (ir.VectorType(I8, 32), ir.VectorType(I16, 16),
                                                                      ir.VectorType(I32, 8))
        self.v8i8 = ir.VectorType(I8, 8)
        self.fvec = ir.VectorType(F32, VL)
        self.feats = feats = set(k.target.enabled_features)
        self.avx2 = avx2 = "avx2" in feats
        # VNNI (AVX-512 VNNI with VL, or AVX-VNNI): vpdpbusd adds the four u8 x s8 products of each
        # i32 lane to it, exactly (no i16 step): it replaces vpmaddubsw + vpmaddwd + vpaddd
        self.vnni = vnni = avx2 and ("avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats)
        # spans of chunks of 8 rows whose sums fit i32 (one span unless a group exceeds i32_span)
        span = i32_span(bits, has_zeros) // 8
        self.spans = [(c, min(GP // 8, c + span)) for c in range(0, GP // 8, span)] or [(0, 0)]
        # i8 weights on VNNI: x stored as u8 (xq + 128) against signed q, the packer's 128 * sum q
        # subtracted per group (one span: that correction is per group, not per span)
        self.xu = u8_activations(node, k.target)   # = vnni and bits == 8 and len(spans) == 1
        # rows per register tile
        self.rt = rt = (ROWS_I8_AVX512 if "avx512f" in feats else ROWS_I8_AVX2) if avx2 else 1
        self.roundeven = k.intrinsic("llvm.roundeven.f32", F32, [F32])
        self.X, self.W = Access(k, k.args[0], x_t.dtype, 1), k.args[1]
        self.S = Access(k, k.args[2], node.inputs[2].type.dtype, VL)
        self.MINS = Access(k, k.args[3], zeros.type.dtype, VL) if mins else None
        self.SUP = Access(k, k.args[4], node.inputs[4].type.dtype, VL) if supers else None
        self.nsuper = node.inputs[4].type.shape[0] if supers else 0
        self.per_super = node.attrs.get("super_group", 0) // max(1, node.attrs["group"])
        self.Y = Access(k, k.args[-1], y_t.dtype, VL)
        self.rch = rch = max(1, min(rows, XQ_STACK // max(KP, 1)))   # rows quantized per chunk
        if rch < rows and rch >= rt:
            self.rch = rch = rch - rch % rt   # full register tiles in every chunk but the last
        self.xq = _stack_array(k, -(-rch * KP // 4), "xq")
        self.dq = _stack_array(k, rch * self.GA, "dq")      # d per (row, activation group)
        self.qsum = _stack_array(k, rch * G, "qsum")   # sum(xq) per (row, segment), i32 (|sum| <= 127 * MAX_KP)
        self.zero_f = ir.Constant(F32, 0.0)
        self.zero_i = ir.Constant(I32, 0)
        self.fmin = k.intrinsic("llvm.minnum.f32", F32, [F32, F32])
        self.fmax = k.intrinsic("llvm.maxnum.f32", F32, [F32, F32])
        self.XV = Access(k, k.args[0], x_t.dtype, VL)
        if avx2:
            self.maddubs = k.intrinsic("llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
            self.maddwd = k.intrinsic("llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
            self.ones = ir.Constant(v16i16, [1] * 16)
            self.lo_mask = ir.Constant(v32i8, [0x0F] * 32)
            self.four = ir.Constant(v32i8, [4] * 32)
            self.vabs = k.intrinsic("llvm.abs.v32i8", v32i8, [v32i8, ir.IntType(1)])
            self.vsign = k.intrinsic("llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])
        if vnni:
            self.dpbusd = k.intrinsic("llvm.x86.avx512.vpdpbusd.256", v8i32, [v8i32, v8i32, v8i32])
        self.nib = ir.Constant(v8i32, [0x0F] * 8)
        # software prefetch: measured on AVX2 (Zen 3: one thread 13.9 -> 17.7 GB/s of int4 from DRAM);
        # AVX-512 hosts keep the hardware prefetcher alone (85% of the probe measured on Zen 4 without)
        self.prefetch_fn = (k.intrinsic("llvm.prefetch.p0", ir.VoidType(), [self.W.type, I32, I32, I32])
                            if avx2 and PREFETCH_I8 and "avx512f" not in feats else None)
        self.words = bits // 4          # <8 x i32> words per chunk of 8 rows of a slab
        self.no_poison = ir.Constant(ir.IntType(1), 0)
        self.nblk = nblk = -(-N // NB)
        self.nslab = nblk * (NB // SLAB)
        self.chunk_bytes = 32 * self.words
        self.i64v = ir.VectorType(ir.IntType(64), 8)

    def w_group(self, g):   # the weight group of segment g
        b = self.b
        return g if self.seg == self.gw else b.udiv(b.mul(g, i64(self.seg)), i64(self.gw))

    def a_group(self, g):   # the activation group of segment g
        b = self.b
        return g if self.seg == self.ga else b.udiv(b.mul(g, i64(self.seg)), i64(self.ga))

    # --- the row prologue: a chunk of rows of x quantized into xq, dq, qsum ---------

    def group_amax(self, xbase, glen):
        """max |x[xbase : xbase+glen]| VL lanes at a time (the scalar compare-select
        chain costs its latency per element; LLVM does not reorder it), or NaN when
        the group holds a NaN or +-inf (``quantize_rows_i8``): beside the maximum
        (NaN ignored: exact in any order), a sum of x * 0, which is 0 unless some x
        is not finite, then NaN for good."""
        k, b, fvec, zero_f = self.k, self.b, self.fvec, self.zero_f
        nv = glen - glen % VL
        zv = fconst(fvec, 0.0)

        def vmax(i, a):
            x = self.XV.load(b.add(xbase, i))
            v = b.call(k.intrinsic("llvm.fabs.v8f32", fvec, [fvec]), [x])
            return [b.select(b.fcmp_ordered(">", v, a[0]), v, a[0]), b.fadd(a[1], b.fmul(x, zv))]

        m, nf = zero_f, zero_f
        if nv:
            acc, nfv = fold_loop(b, 0, nv, [zv, zv], vmax, step=VL, name="amaxv")
            for j in range(VL):
                e = b.extract_element(acc, ir.Constant(I32, j))
                m = b.select(b.fcmp_ordered(">", e, m), e, m)
                nf = b.fadd(nf, b.extract_element(nfv, ir.Constant(I32, j)))
        for i in range(nv, glen):
            x = self.X.scalar(b.add(xbase, i64(i)))
            m = call_fabs_max(k, m, x)
            nf = b.fadd(nf, b.fmul(x, zero_f))
        return b.select(b.fcmp_unordered("uno", nf, nf), ir.Constant(F32, float("nan")), m)

    def act_step(self, xbase, alen):
        """(d, code) of an activation group: its step and the code of a value v = x / d."""
        b, roundeven, zero_f, zero_i = self.b, self.roundeven, self.zero_f, self.zero_i
        if self.act_scale:   # static: a constant step, saturating at +-127 (NaN: the group's d is NaN, below)
            d = ir.Constant(F32, self.act_scale)

            def code(v):
                # clamped before rounding (the same, the bounds being integers): fptosi(roundeven)
                # then becomes one round-to-nearest conversion on RVV, not roundeven's expansion
                # and a vfcvt.rtz (which qemu 7.2 mistranslates in some sequences: an assertion)
                v = b.call(self.fmax, [b.call(self.fmin, [v, ir.Constant(F32, 127.0)]), ir.Constant(F32, -127.0)])
                return b.fptosi(b.call(roundeven, [v]), I32)
        else:           # dynamic: d = max|x| / 127, so |x / d| <= 127 already (d NaN: xq = 0)
            amax = self.group_amax(xbase, alen)
            d = b.fdiv(amax, ir.Constant(F32, 127.0))
            pos = b.fcmp_ordered(">", d, zero_f)

            def code(v):
                return b.select(pos, b.fptosi(b.call(roundeven, [v]), I32), zero_i)
        return d, code

    def quant_act(self, xbase, rl, a, alen):
        """Quantize activation group a (x[xbase : xbase+alen]) of row-local row rl:
        its step d into dq, its segments' codes into xq (each zero padded to GP) and
        their sums into qsum."""
        b, seg, GP, xq, zero_i, act_scale = self.b, self.seg, self.GP, self.xq, self.zero_i, self.act_scale
        d, code = self.act_step(xbase, alen)
        j0 = b.mul(a, i64(self.ga // seg))   # its first segment (ga == K: a = 0)

        def quant_seg(js, slen, nan):
            """Segment j0 + js (x[xbase + js * seg ...], slen values); returns the NaN flag."""
            xs = b.add(xbase, b.mul(js, i64(seg)))
            j = b.add(j0, js)
            qbase = b.add(b.mul(rl, i64(self.KP)), b.mul(j, i64(GP)))

            def quant(i, acc):
                xv = self.X.scalar(b.add(xs, i))
                qi = code(b.fdiv(xv, d))
                qs = b.add(qi, ir.Constant(I32, 128)) if self.xu else qi   # xu: u8 codes (padding 0 meets q = 0)
                b.store(b.trunc(qs, I8), gep(b, xq, I8, b.add(qbase, i)))
                nan = [b.or_(acc[1], b.zext(b.fcmp_unordered("uno", xv, xv), I32))] if act_scale else []
                return [b.add(acc[0], qi), *nan]

            sm, *nan = fold_loop(b, 0, slen, [zero_i] + nan, quant, name="quant")
            for i in range(slen, GP):
                b.store(ir.Constant(I8, 0), gep(b, xq, I8, b.add(qbase, i64(i))))
            b.store(sm, gep(b, self.qsum, I32, b.add(b.mul(rl, i64(self.G)), j)))
            return nan

        nan = [zero_i] if act_scale else []
        if alen // seg:
            nan = fold_loop(b, 0, alen // seg, nan, lambda js, f: quant_seg(js, seg, f), name="qs")
        if alen % seg:
            nan = quant_seg(i64(alen // seg), alen % seg, nan)
        if nan:         # static: a NaN in the group makes its d NaN (its codes then never count)
            d = b.select(b.icmp_unsigned("!=", nan[0], zero_i), ir.Constant(F32, float("nan")), d)
        b.store(d, gep(b, self.dq, F32, b.add(b.mul(rl, i64(self.GA)), a)))

    def quantize(self, r0, nr):
        """Rows [r0, r0+nr) of x into the stack buffers (row-local indices)."""
        b, K, ga = self.b, self.K, self.ga
        with loop(b, 0, nr, name="qr") as rl:
            xrow = b.mul(b.add(r0, rl), i64(K))
            full = K // ga
            with loop(b, 0, full, name="qg") as a:
                self.quant_act(b.add(xrow, b.mul(a, i64(ga))), rl, a, ga)
            if K % ga:
                self.quant_act(b.add(xrow, i64(full * ga)), rl, i64(full), K % ga)

    # --- x86 micro-kernels: one chunk (8 rows of k) of a slab -------------------------

    def dp(self, acc, u, s):
        """acc + per lane sum of 4 products u (unsigned bytes) * s (signed bytes) (VNNI)."""
        b, v8i32 = self.b, self.v8i32
        return b.call(self.dpbusd, [acc, b.bitcast(u, v8i32), b.bitcast(s, v8i32)])

    def xq_splat(self, xo, t, n):
        """xq[xo + t : xo + t + n] broadcast: n = 4 as <32 x i8>, n = 1 as <8 x i32>."""
        b = self.b
        p = gep(b, self.xq, I8, b.add(xo, i64(t)))
        if n == 4:
            return b.bitcast(splat(b, b.load(p, typ=I32, align=1), 8), self.v32i8)
        return splat(b, b.sext(b.load(p, typ=I8), I32), 8)

    def w_ops(self, ws):
        """The weight operands of one chunk (8 rows of k) of a slab, from its <8 x i32>
        words: computed once per register tile, shared by its rows."""
        b, bits, v32i8, v8i32 = self.b, self.bits, self.v32i8, self.v8i32
        if self.avx2 and bits == 4:
            w8 = b.bitcast(ws[0], v32i8)
            return [b.and_(w8, self.lo_mask), b.lshr(w8, self.four)]          # q + 8 of k = 8j+t, 8j+4+t
        if self.xu:
            return [b.bitcast(w, v32i8) for w in ws]                  # signed q against u8 x
        if self.avx2:  # |q| unsigned (-128 gives 0x80 = 128, right), x takes q's sign
            return [(b.call(self.vabs, [b.bitcast(w, v32i8), self.no_poison]), b.bitcast(w, v32i8)) for w in ws]
        out = []
        for t in range(8):
            if bits == 4:  # k = 8j + t: byte t % 4, nibble t // 4
                sh = 8 * (t % 4) + 4 * (t // 4)
                out.append(b.and_(b.lshr(ws[0], ir.Constant(v8i32, [sh] * 8)), self.nib) if sh
                           else b.and_(ws[0], self.nib))
            else:          # k = 8j + 4h + t: word h, byte t, sign-extended
                w = ws[t // 4]
                sh = 24 - 8 * (t % 4)
                u = b.shl(w, ir.Constant(v8i32, [sh] * 8)) if sh else w
                out.append(b.ashr(u, ir.Constant(v8i32, [24] * 8)))
        return out

    def x_ops(self, xo):
        """The x operands of one row for the chunk at xq[xo]: k = 8j..8j+3 and 8j+4..8j+7
        as broadcast bytes (x86), or each of the 8 broadcast as i32."""
        if self.avx2:
            return [self.xq_splat(xo, 0, 4), self.xq_splat(xo, 4, 4)]
        return [self.xq_splat(xo, t, 1) for t in range(8)]

    def dot8(self, wo, xo, acc):
        """acc + per column (lane) sum over the chunk's 8 rows k of (q + 8) * xq (i4),
        q * xq (i8) or q * (xq + 128) (xu)."""
        b, bits, avx2, vnni, dp = self.b, self.bits, self.avx2, self.vnni, self.dp
        if vnni and bits == 4:
            return dp(dp(acc, wo[0], xo[0]), wo[1], xo[1])
        if self.xu:
            for w8, x in zip(wo, xo):
                acc = dp(acc, x, w8)
            return acc
        if vnni:
            for (uq, w8), x in zip(wo, xo):
                acc = dp(acc, uq, b.call(self.vsign, [x, w8]))
            return acc
        if avx2 and bits == 4:
            p = b.add(b.call(self.maddubs, [wo[0], xo[0]]), b.call(self.maddubs, [wo[1], xo[1]]))
            return b.add(acc, b.call(self.maddwd, [p, self.ones]))
        if avx2:  # no i16 sum of the two halves: 2 * 32512 would saturate
            for (uq, w8), x in zip(wo, xo):
                acc = b.add(acc, b.call(self.maddwd, [b.call(self.maddubs, [uq, b.call(self.vsign, [x, w8])]),
                                                      self.ones]))
            return acc
        for u, x in zip(wo, xo):
            acc = b.add(acc, b.mul(u, x))
        return acc

    # --- x86 tiles: the block loop, register tiles of rows x QUAD slabs -------------

    def group_dots(self, tile, g):
        """The exact integer sums of segment g for the tile: one list of QUAD * rows
        <8 x i32> per span of chunks (several only for a segment longer than i32_span)."""
        b, W, KP, GP, QC = self.b, self.W, self.KP, self.GP, QUAD * self.chunk_bytes
        item, s0, slabs, quad, rls = tile
        nr = len(rls)
        prefetch_fn, v8i32 = self.prefetch_fn, self.v8i32

        def kstep(j, acc):
            kk = b.add(b.mul(g, i64(GP // 8)), j)  # chunk of 8 rows of k
            if prefetch_fn:
                prefetch(kk)
            xs = [self.x_ops(b.add(b.mul(r, i64(KP)), b.mul(kk, i64(8)))) for r in rls]
            out = list(acc)
            for j2 in range(QUAD):   # the quad's slabs, chunk kk of each side by side
                off = b.add(quad, b.add(b.mul(kk, i64(QC)), i64(j2 * self.chunk_bytes)))
                wo = self.w_ops([b.load(gep(b, W, I8, b.add(off, i64(32 * h))), typ=v8i32, align=1)
                                 for h in range(self.words)])
                for t in range(nr):
                    out[t * QUAD + j2] = self.dot8(wo, xs[t], out[t * QUAD + j2])
            return out

        def prefetch(kk):
            """The weight lines PREFETCH_I8 bytes past chunk row kk of the quad."""
            base = b.add(quad, b.add(b.mul(kk, i64(QC)), i64(PREFETCH_I8)))
            for ln in range(0, QC, 64):
                b.call(prefetch_fn, [gep(b, W, I8, b.add(base, i64(ln))), ir.Constant(I32, 0),
                                     ir.Constant(I32, 3), ir.Constant(I32, 1)])

        def kstep16(j, acc):
            """I16_CHUNKS chunks from j: i4 on AVX2 without VNNI, one row: the
            vpmaddubsw pairs summed in i16 (|sum| <= 4 * I16_CHUNKS * 15 * 127 = 30480,
            exact) and widened by one vpmaddwd per slab, not one per chunk."""
            p16 = [None] * QUAD
            for c in range(I16_CHUNKS):
                kk = b.add(b.mul(g, i64(GP // 8)), b.add(j, i64(c)))
                if prefetch_fn:
                    prefetch(kk)
                xo = self.x_ops(b.add(b.mul(rls[0], i64(KP)), b.mul(kk, i64(8))))
                for j2 in range(QUAD):
                    off = b.add(quad, b.add(b.mul(kk, i64(QC)), i64(j2 * self.chunk_bytes)))
                    wo = self.w_ops([b.load(gep(b, W, I8, off), typ=v8i32, align=1)])
                    p = b.add(b.call(self.maddubs, [wo[0], xo[0]]), b.call(self.maddubs, [wo[1], xo[1]]))
                    p16[j2] = p if p16[j2] is None else b.add(p16[j2], p)
            return [b.add(a, b.call(self.maddwd, [p, self.ones])) for a, p in zip(acc, p16)]

        def span_sums(c0, c1):
            if not i16 or c1 - c0 < I16_CHUNKS:
                return fold_loop(b, c0, c1, zacc, kstep, name="ks")
            mid = c1 - (c1 - c0) % I16_CHUNKS
            acc = fold_loop(b, c0, mid, zacc, kstep16, step=I16_CHUNKS, name="ks16")
            return fold_loop(b, mid, c1, acc, kstep, name="ks") if mid < c1 else acc

        zacc = [ir.Constant(v8i32, [0] * 8)] * (QUAD * nr)
        i16 = self.avx2 and self.bits == 4 and not self.vnni and nr == 1
        return [span_sums(c0, c1) for c0, c1 in self.spans]

    def group_fold(self, tile, g, yacc, parts):
        """yacc + (d * scale) * f32(sum - offsets) (+ (d * minimum) * sum(xq)) for segment
        g, unfused, as the reference: the offsets are what the encoding adds, (z + off) *
        sum(xq), and with u8 activations the packer's 128 * sum(q)."""
        b, W, fvec, v8i32, i64v = self.b, self.W, self.fvec, self.v8i32, self.i64v
        G, bits, has_zeros, mins, xu = self.G, self.bits, self.has_zeros, self.mins, self.xu
        item, s0, slabs, quad, rls = tile
        S, MINS, SUP = self.S, self.MINS, self.SUP
        wide = len(parts) > 1   # a group longer than i32_span rows: spans summed in i64
        wg = self.w_group(g)
        qd = b.add(b.mul(item, i64(NB // SLAB // QUAD)), i64(s0 // QUAD))
        col0 = b.add(b.mul(qd, i64(self.GW * QUAD * SLAB)), b.mul(wg, i64(QUAD * SLAB)))
        cols = [b.add(col0, i64(j2 * SLAB)) for j2 in range(QUAD)]   # per weight group, the quad's side by side
        svals = [S.load(col) for col in cols]
        zvs = [b.load(gep(b, self.k.args[3], I8, col), typ=self.v8i8, align=1) for col in cols] if has_zeros else None
        mvals = [MINS.load(col) for col in cols] if mins else None
        if self.supers:   # scale = d * sub-scale, minimum = dmin * sub-minimum (exact products)
            sups = [b.add(b.mul(sl, i64(self.nsuper * 2 * SLAB)),
                          b.mul(b.udiv(wg, i64(self.per_super)), i64(2 * SLAB))) for sl in slabs]
            svals = [b.fmul(SUP.load(p), b.uitofp(v, fvec)) for p, v in zip(sups, svals)]
            mvals = [b.fmul(SUP.load(b.add(p, i64(SLAB))), b.uitofp(v, fvec)) for p, v in zip(sups, mvals)]
        # xu: sum_k (xq + 128) q = sum_k xq q + 128 sum_k q, modulo 2^32 like the final sum
        corr = [b.load(gep(b, W, I8, b.add(i64(self.nslab * self.KP * 8),
                                            b.mul(b.add(b.mul(sl, i64(G * SLAB)), b.mul(g, i64(SLAB))), i64(4)))),
                       typ=v8i32, align=1) for sl in slabs] if xu else None   # per segment
        out = list(yacc)
        ag = self.a_group(g)
        for t, r in enumerate(rls):
            rg = b.add(b.mul(r, i64(G)), g)
            dv = splat(b, b.load(gep(b, self.dq, F32, b.add(b.mul(r, i64(self.GA)), ag)), typ=F32), VL)
            xsum = splat(b, b.load(gep(b, self.qsum, I32, rg), typ=I32), VL) if bits == 4 or has_zeros else None
            for j2 in range(QUAD):
                i = t * QUAD + j2
                sc = b.fmul(dv, svals[j2])
                # what the encoding adds to sum_k xq * (q - z): (z + off) * sum(xq), off = 8 for i4
                if has_zeros:
                    off = (b.mul(b.sext(xsum, i64v), b.sext(zvs[j2], i64v)) if wide
                           else b.mul(xsum, b.sext(zvs[j2], v8i32)))
                elif bits == 4 and not mins:
                    off = b.shl(xsum, ir.Constant(v8i32, [3] * 8))
                    off = b.sext(off, i64v) if wide else off
                else:
                    off = None
                dot = functools.reduce(b.add, [b.sext(p[i], i64v) for p in parts]) if wide else parts[0][i]
                if xu:
                    dot = b.sub(dot, corr[j2])
                if off is not None:
                    dot = b.sub(dot, off)
                dot = b.sitofp(dot, fvec)  # exact integer, rounded once to f32
                # product and sum each rounded to f32, unfused: the reference's order of operations
                out[i] = b.fadd(yacc[i], b.fmul(sc, dot))
                if mins:   # + (d * minimum) * sum(xq), unfused as the reference
                    out[i] = b.fadd(out[i], b.fmul(b.fmul(dv, mvals[j2]), b.sitofp(xsum, fvec)))
        return out

    def tile_pass(self, item, r0, rl, nr, s0, ncols):
        """Rows r0+rl .. r0+rl+nr-1 of x (a register tile) against slabs s0..s0+QUAD of
        block ``item`` (``ncols`` valid columns): each chunk of weights is loaded and
        decoded once for the nr rows."""
        b, chunk_bytes = self.b, self.chunk_bytes
        slabs = [b.add(b.mul(item, i64(NB // SLAB)), i64(s0 + j)) for j in range(QUAD)]
        quad = b.add(b.mul(item, i64(NB // SLAB * self.KP // 8 * chunk_bytes)), i64(s0 * self.KP // 8 * chunk_bytes))
        rls = [b.add(rl, i64(t)) for t in range(nr)]
        tile = (item, s0, slabs, quad, rls)

        def group_step(g, yacc):
            return self.group_fold(tile, g, yacc, self.group_dots(tile, g))

        yacc = fold_loop(b, 0, self.G, [fconst(self.fvec, 0.0)] * (QUAD * nr), group_step, name="gq")
        for t, r in enumerate(rls):
            yrow = b.add(b.mul(b.add(r0, r), i64(self.N)), b.mul(item, i64(NB)))
            for j2 in range(QUAD):
                col = (s0 + j2) * SLAB
                n = min(SLAB, ncols - col)
                if n > 0:
                    self.Y.store(yacc[t * QUAD + j2], b.add(yrow, i64(col)), n)

    def blocks(self, r0, nr):
        """Every column block of this call's range against rows r0 .. r0+nr-1."""
        b, k = self.b, self.k

        def body(item, ncols):
            # tiles of rt rows, then at most one of rt/2, rt/4 ... 1 rows for the rest
            start, size = i64(0), self.rt
            while size:
                stop = b.sub(nr, b.urem(nr, i64(size))) if size > 1 else nr
                with loop(b, start, stop, step=size, name=f"row{size}") as rl:
                    for s0 in range(0, NB // SLAB, QUAD):
                        self.tile_pass(item, r0, rl, size, s0, ncols)
                start, size = stop, size // 2

        with loop(b, k.begin, k.end, name="item") as item:
            last_chunk(b, item, self.nblk, self.N % NB or NB, NB, lambda ncols: body(item, ncols), lone="both")


def call_fabs_max(k: Kernel, acc, v):
    """max(acc, |v|), NaN v ignored. A compare and select, not llvm.maxnum: LLVM 22's loop
    vectorizer asserts (cost models disagree) on a maxnum reduction of widened f16."""
    b = k.b
    a = b.call(k.intrinsic("llvm.fabs.f32", F32, [F32]), [v])
    return b.select(b.fcmp_ordered(">", a, acc), a, acc)
