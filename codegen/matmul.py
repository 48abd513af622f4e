"""Matrix multiplication: ``y[..., M, N] = a[..., M, K] @ b[..., K, N]``, batch
dims broadcast numpy-style, f32 and f16 (widened on load, accumulated in f32,
rounded once at the store).  ``b`` is read row-major [K, N] as it is stored.

Two shapes of kernel:

* GEMM (M > STREAM_MAX_M): a register-tiled micro-kernel (``micro_tile``)
  keeps an MR x (NR vectors) tile of y in vector registers and walks a K block
  with one broadcast of ``a`` per row and NR vector loads of ``b`` per step,
  fused multiply-adds in between (4 x 24 on AVX2, 6 x 64 on AVX-512).  Work
  items are (batch, N-block, M-block) tiles of y, M fastest, so a thread's
  consecutive items reuse the same columns of ``b`` from cache, in a count the
  runtime's chunks deal evenly to 2 threads.  Per item and K block (KC deep),
  the item's rows of ``a`` are packed first if at least PACK_A_MIN_PANELS
  column panels will read them (``pack_a_panel``: MR rows interleaved, a
  contiguous panel per MR rows, so the micro-kernel reads one stream and a
  power-of-two K cannot put every row in the same cache sets);
  then per column panel, KC rows of ``b`` are packed (f32, zero-padded past N)
  into a contiguous stack panel that stays in L1 while every row panel of the
  item runs over it.  Partial sums between K blocks live in y itself (f32) or
  in an f32 tile (f16, rounded once at the end); the micro-kernel starts from
  zero and adds them after its loop (their lines prefetched before it).  A
  constant ``b`` is packed at compile time instead (``pack_matmul_b``) and the
  micro-kernel reads it in place: no packing of b at run time.
* GEMV (M == 1, the memory-bound decode case, and M up to STREAM_MAX_M): each
  item is a block of columns, and a thread streams row segments of ``b`` (KB
  rows at a time) into f32 accumulator rows on its stack, so two threads read
  disjoint halves of every weight row at full DRAM speed.  It reads ``b`` as
  stored, constant or not: it streams whole rows, which the plain layout gives.

Packed constant ``b`` (GEMM path only: ``packs_b``): per matrix of b (each of
its own batch dims, in order), column panels of PACK_NR = 48 columns, each
panel all K rows of its columns contiguous, zero-padded past N:

    packed[batch, p, k, c] = b[batch, k, p*PACK_NR + c]  (0 where p*PACK_NR + c >= N)
    shape [*b.batch, ceil(N / PACK_NR), K, PACK_NR], b's dtype (f16 stays f16:
    the same bytes as plain storage plus the padding, widened on load)

so a K block of a panel is one contiguous KC x PACK_NR run, the stack panel's
layout.  PACK_NR is one every x86 micro-tile width divides
(``tile_shape(..., panel=PACK_NR)``): 48 columns are 3 vectors of 16 f32 on
AVX-512 (an 8x3 tile: one micro-tile per panel row), and on AVX2 (8 lanes,
4x3 tiles) the micro-tile reads a sub-panel of 24 columns with a row stride
of 48.

riscv64 (``streams``): every matmul takes the row-streaming kernel, in tiles
of STREAM_MAX_M rows of a (work items too), b read as stored.  Its column
loops are scalar code there, which LLVM's loop vectorizer turns into
vector-length-agnostic strips (``vsetvli``); the register-tiled micro-kernel
needs fixed-width vectors, so riscv64 packs nothing.  Without run-time
packing, few-row GEMMs (M up to a few dozen) run up to ~1.9x faster;
large square ones about as fast as with run-time packing (within 5%).

Shapes are static: tails in M and N are separate, fully specialized code
(masked vector loads/stores for the last partial vector of a row).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.fusion import batch_strides, folds_batch
from ..ir.graph import Node
from .kernel import (
    F32,
    I1,
    I32,
    I64,
    PTR,
    Kernel,
    call_intrinsic,
    fconst,
    fold_loop,
    gep,
    i64,
    lltype,
    llvm_name,
    loop,
    narrow,
    splat,
    vtype,
    widen,
)
from .lower import emitter, packer

# Fewest multiply-adds worth waking another thread for: compute-bound GEMM
# (~15 us of FMAs) and memory-bound GEMV (512 KiB of f32 weights).
MIN_PARALLEL_FMAS = 1 << 19
MIN_PARALLEL_GEMV = 1 << 17
# Work items a GEMM big enough to share is cut into at least (load balance).
MIN_ITEMS = 8
# GEMM: rows and columns of a work item's tile of y; K block (rows of b packed
# at a time: a KC x NRL f32 panel stays in L1 across the item's rows).
GEMM_MC = 192
GEMM_NC = 256
GEMM_KC = 256
GEMM_F16_TILE = (96, 128)  # f16: MC, NC at most (a 48 KiB f32 partial-sum tile on the stack)
# GEMV path for M up to this: a few rows of a still leave the product bound by
# reading b, which row streaming does best (measured against the GEMM path).
STREAM_MAX_M = 4
# GEMV: columns per work item (a multiple of the vector width; small, so odd N
# still splits evenly: a thread merges its adjacent items into long runs),
# columns the accumulator rows cover (f32 on the stack: 8 KiB), rows of b per pass.
GEMV_BLOCK = 64
GEMV_SPAN = 2048
GEMV_KB = 8
# Bytes of each row of b a thread's share should read at the least: shorter row
# segments stream badly (40 x [2048, 2048] from DRAM, 2 threads: 1 KiB segments
# 32.7 ms, 4 KiB 22.8 ms), so the runtime may not cut a GEMV finer than this
# (but always in two at the least).
GEMV_MIN_SEGMENT = 4096
# Packed constant b: columns per panel, 3 vectors of PACK_LANES f32 (one layout for
# every x86 host; riscv64 packs nothing: see the docstring).
PACK_LANES = 16
PACK_NR = 3 * PACK_LANES
# GEMM: the item's rows of a are packed when it has at least PACK_A_MIN_PANELS
# column panels (each reads them all); items of fewer read a in place (M = 64
# prefill shapes: items of 2-3 panels).  A row is loaded PACK_A_CHUNK elements
# at a time to be packed.
PACK_A_MIN_PANELS = 4
PACK_A_CHUNK = 8


# --- geometry -------------------------------------------------------------------------

class Geometry:
    """Sizes of one matmul, with the batch dims flattened: ``batch`` problems of
    [M, K] @ [K, N]; batch item t reads a at ``a_off(t)`` and b at ``b_off(t)``."""

    def __init__(self, node: Node, b_matrix: int | None = None):
        """``b_matrix``: elements per matrix of b as stored (packed), K*N if None."""
        a, b = (v.type for v in node.inputs)
        y = node.outputs[0].type
        self.dtype = y.dtype
        self.M, self.K, self.N = a.shape[-2], a.shape[-1], b.shape[-1]
        out_batch = tuple(y.shape[:-2])
        self.a_strides = batch_strides(a.shape[:-2], out_batch, self.M * self.K)
        self.b_strides = batch_strides(b.shape[:-2], out_batch, b_matrix or self.K * self.N)
        self.out_batch = out_batch
        # b shared by every batch item and a not broadcast: one [batch*M, K] @ [K, N]
        # (ir.fusion.matmul_batch: a fused epilogue is addressed the same way).
        if folds_batch(out_batch, self.a_strides, self.b_strides):
            self.M *= math.prod(out_batch)
            self.out_batch, self.a_strides, self.b_strides = (), (), ()
        self.batch = math.prod(self.out_batch)

    def offsets(self, b: ir.IRBuilder, t):
        """(a offset, b offset, y offset) in elements of batch item ``t`` (an i64)."""
        y_off = b.mul(t, i64(self.M * self.N))
        a_off, b_off, rem = i64(0), i64(0), t
        for d in reversed(range(len(self.out_batch))):
            size = self.out_batch[d]
            idx = b.urem(rem, i64(size)) if d else rem
            rem = b.udiv(rem, i64(size)) if d else rem
            if self.a_strides[d]:
                a_off = b.add(a_off, b.mul(idx, i64(self.a_strides[d])))
            if self.b_strides[d]:
                b_off = b.add(b_off, b.mul(idx, i64(self.b_strides[d])))
        return a_off, b_off, y_off


def tile_shape(target, lanes: int = 0, panel: int = 0) -> tuple[int, int]:
    """(MR rows, NR vectors) of the GEMM micro-kernel for ``target`` with
    ``lanes`` f32 per vector (the target's by default); with ``panel``, NR
    vectors must divide it (a packed b: the micro-tile stays in one panel).

    The tile takes MR*NR accumulators plus NR loaded vectors of b and one
    broadcast of a; all must fit the vector register file: 16 on AVX2, 32 on
    AVX-512.  Scalar code (lanes == 1) has 32 FP registers.  The most accumulators
    win, then the fewest loads per step (MR + NR): 4x3 on AVX2 (measured ~8% faster
    than 6x2), 6x4 on AVX-512."""
    lanes = lanes or target.lanes(32)
    if lanes == 1:
        assert not panel or panel % 4 == 0
        return 4, 4
    regs = 32 if target.vector_bits >= 512 else 16
    nrs = [nr for nr in (2, 3, 4) if not panel or panel % (nr * lanes) == 0] or [1]
    return max(((mr, nr) for nr in nrs for mr in range(1, 9) if mr * nr + nr + 1 <= regs),
               key=lambda t: (t[0] * t[1], -(t[0] + t[1])))


# --- small helpers --------------------------------------------------------------------

def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def imin(b, x, y):
    x = i64(x) if isinstance(x, int) else x
    y = i64(y) if isinstance(y, int) else y
    return b.select(b.icmp_signed("<", x, y), x, y)


def _mask(n: int, lanes: int):
    return ir.Constant(ir.VectorType(I1, lanes), [1] * n + [0] * (lanes - n))


class Access:
    """Loads and stores of one operand: ``n`` elements from ``index``, widened
    to f32 (f16 storage); fewer than ``lanes`` valid elements use a masked access."""

    def __init__(self, k: Kernel, ptr, d: dt.DType, lanes: int):
        self.k, self.ptr, self.d, self.lanes = k, ptr, d, lanes
        self.ty = lltype(d)

    def load(self, index, valid=None):
        b, n = self.k.b, self.lanes
        p = gep(b, self.ptr, self.ty, index)
        if n == 1:
            return widen(b, b.load(p, typ=self.ty), self.d)
        vt = ir.VectorType(self.ty, n)
        if valid is None or valid == n:
            v = b.load(p, typ=vt, align=self._align)
        else:
            fn = self.k.intrinsic(f"llvm.masked.load.{llvm_name(vt)}.p0", vt, [p.type, I32, ir.VectorType(I1, n), vt])
            v = b.call(fn, [p, ir.Constant(I32, self._align), _mask(valid, n), ir.Constant(vt, None)])
        return widen(b, v, self.d, n)

    def store(self, value, index, valid=None):
        b, n = self.k.b, self.lanes
        value = narrow(b, value, self.d, n)
        p = gep(b, self.ptr, self.ty, index)
        if n == 1 or valid is None or valid == n:
            b.store(value, p, align=self._align)
            return
        vt = value.type
        fn = self.k.intrinsic(f"llvm.masked.store.{llvm_name(vt)}.p0", ir.VoidType(),
                              [vt, p.type, I32, ir.VectorType(I1, n)])
        b.call(fn, [value, p, ir.Constant(I32, self._align), _mask(valid, n)])

    def scalar(self, index):
        b = self.k.b
        return widen(b, b.load(gep(b, self.ptr, self.ty, index), typ=self.ty), self.d)

    @property
    def _align(self):
        return self.d.bits // 8


def fma(k: Kernel, x, y, acc):
    """x*y + acc, fused where the target has it (llvm.fmuladd)."""
    return call_intrinsic(k, "fmuladd", x, y, acc)


# --- constant b packed at compile time ------------------------------------------------

def streams(M: int, target) -> bool:
    """Whether a matmul of M rows takes the row-streaming (GEMV) kernel: few rows,
    or any number on riscv64, where it runs in tiles of STREAM_MAX_M rows (its
    column loops are what LLVM vectorizes length-agnostically; the register-tiled
    micro-kernel needs fixed-width vectors)."""
    return M <= STREAM_MAX_M or (target is not None and target.name == "riscv64")


def packs_b(node: Node, target=None) -> bool:
    """Whether the kernel of ``node`` reads its b packed (``pack_matmul_b``) when
    b is a constant: the GEMM path, non-empty."""
    g = Geometry(node)
    return node.attrs.get("sparse", "dense") == "dense" and not streams(g.M, target) and g.batch * g.M * g.N * g.K > 0


def packed_b_matrix(K: int, N: int) -> int:
    """Elements per matrix of b packed: ceil(N / PACK_NR) panels of K x PACK_NR."""
    return cdiv(N, PACK_NR) * K * PACK_NR


@packer("matmul", inputs=())
def pack_matmul_b(node: Node, index: int, value, target=None) -> bytes | None:
    """A constant b of a GEMM in column panels (layout in the module docstring);
    a and the GEMV path read plain storage (None)."""
    if index != 1 or not packs_b(node, target):
        return None
    w = np.asarray(value, dtype=node.inputs[1].dtype.np_dtype)
    *batch, K, N = w.shape
    panels = cdiv(N, PACK_NR)
    padded = np.zeros((*batch, K, panels * PACK_NR), w.dtype)
    padded[..., :N] = w
    packed = np.swapaxes(padded.reshape(*batch, K, panels, PACK_NR), -3, -2)   # [..., panel, K, PACK_NR]
    return np.ascontiguousarray(packed).astype(w.dtype.newbyteorder("<")).tobytes()


# --- emitter --------------------------------------------------------------------------

@emitter("matmul")
def emit_matmul(k: Kernel, node: Node, epilogue=None):
    """a and b are the kernel's first two arguments, y its last.  ``epilogue(value,
    t, row, col, n, valid=None)``, if given, maps the f32 results y[t, row,
    col:col+n] (an n-lane vector, n == 1 a scalar; t the flattened batch item,
    row < Geometry.M; only the first ``valid`` lanes when it is not None) to
    the values stored, just before the store (codegen/fused.py)."""
    # a constant b is packed (the packer's predicate; k.consts: the constant inputs)
    packed = packs_b(node, k.target) and len(k.consts) > 1 and k.consts[1] is not None
    g = Geometry(node, packed_b_matrix(*node.inputs[1].shape[-2:]) if packed else None)
    if g.batch * g.M * g.N == 0:
        k.finish()
        return 0, 1
    if streams(g.M, k.target):
        return _gemv(k, g, epilogue)
    return _gemm(k, g, epilogue, packed)


def _grain(fmas_per_item: int, least: int) -> int:
    """Items per thread at the least: at least ``least`` multiply-adds."""
    return max(1, cdiv(least, max(1, fmas_per_item)))


# --- GEMM -----------------------------------------------------------------------------

def _stack_array(k: Kernel, n: int, name: str):
    """An f32 array of n elements on the stack, 64-byte aligned (allocated in the
    entry block, so it is one fixed frame slot)."""
    b = k.b
    with b.goto_block(k.body.entry_basic_block):
        if k.body.entry_basic_block.instructions:
            b.position_before(k.body.entry_basic_block.instructions[0])
        arr = b.alloca(ir.ArrayType(F32, max(1, n)), name=name)
    arr.align = 64
    arr.type = PTR  # llvmlite types allocas as typed pointers; the module uses opaque ones
    return arr


def _split(n: int, most: int, unit: int, parts: int = 0) -> int:
    """Block size (a multiple of unit) cutting n into max(parts, ceil(n/most))
    near-equal blocks, so the last block is not a sliver."""
    parts = max(parts, cdiv(n, most), 1)
    return unit * max(1, cdiv(cdiv(n, parts), unit))


def gemm_blocking(target, M: int, K: int, N: int, batch: int = 1, dtype=dt.f32, packed: bool = False) -> dict:
    """Tile sizes of the GEMM: micro-tile MR x NRL, item tile MC x NC, K blocks of KC;
    ``packed``: b is packed in panels of PACK_NR columns, which NRL divides.

    Item tiles are at most GEMM_MC x GEMM_NC (f16: the f32 partial-sum tile on
    the stack is capped), cut evenly; a product big enough to share gets at
    least MIN_ITEMS items, in a count the runtime deals evenly to 2 threads
    where the sizes allow (_balanced_parts)."""
    lanes = min(target.lanes(32), PACK_LANES) if packed else target.lanes(32)
    MR, NR = tile_shape(target, lanes, PACK_NR if packed else 0)
    NRL = NR * lanes
    most_m, most_n = (GEMM_MC, GEMM_NC) if dtype is dt.f32 else GEMM_F16_TILE
    mparts, nparts = cdiv(M, most_m), cdiv(N, most_n)
    want = min(MIN_ITEMS, cdiv(batch * M * N * K, MIN_PARALLEL_FMAS))
    if want > 1:
        mparts, nparts = _balanced_parts(M, N, batch, MR, NRL, most_m, most_n, want)
    nkb = max(1, cdiv(K, GEMM_KC))
    return dict(MR=MR, NR=NR, NRL=NRL, lanes=lanes, MC=_split(M, most_m, MR, mparts),
                NC=_split(N, most_n, NRL, nparts), nkb=nkb, KC=cdiv(K, nkb) if K else 0)


def _imbalance(items: int, threads: int = 2) -> float:
    """Most items a thread runs over the mean, when the runtime cuts ``items``
    into chunks of ceil(items / (4 * threads)) taken in turn: 9 items are chunks
    of 2, 2, 2, 2, 1 and one of 2 threads runs 6 (1.33); 8 items, 4 each (1.0)."""
    chunk = cdiv(items, 4 * threads)
    return cdiv(cdiv(items, chunk), threads) * chunk * threads / items


def _balanced_parts(M: int, N: int, batch: int, MR: int, NRL: int, most_m: int, most_n: int,
                    want: int) -> tuple[int, int]:
    """(M parts, N parts) of a shared GEMM: at least ``want`` items in all, in a
    count dealt evenly to 2 threads (_imbalance) if a cut within 8 more parts
    per side gives one; then the fewest items; then items near equal in size
    (the last row or column of them not 10% short); then the least packing (an
    item packs its rows of a and its columns of b); then the least padding."""
    def cut(parts, n, most, unit):
        size = _split(n, most, unit, parts)
        return cdiv(n, size), size

    m0, n0 = cdiv(M, most_m), cdiv(N, most_n)
    best = None
    for mp in range(m0, min(cdiv(M, MR), m0 + 8) + 1):
        mb, mc = cut(mp, M, most_m, MR)
        for np_ in range(n0, min(cdiv(N, NRL), n0 + 8) + 1):
            nb, nc = cut(np_, N, most_n, NRL)
            items = batch * mb * nb
            pad = mb * mc * nb * nc / (M * N) - 1
            key = (items < want, _imbalance(items) > 1.05, items, pad > 0.1, M * nb + N * mb, pad)
            if best is None or key < best[0]:
                best = key, mp, np_
    return best[1], best[2]


def micro_tile(k: Kernel, lanes: int, nv: int, kc, a_panel, b_panel, acc: list) -> list:
    """The GEMM micro-kernel: ``acc[r*nv + v] += sum_kk a(kk, r) * b(kk, v)`` over
    kk < kc (an int or an i64) for mr = len(acc) // nv rows and nv vectors of
    ``lanes`` f32 (scalars if lanes == 1), the accumulators held in registers
    through the loop; returns the new accumulators.

    ``a_panel`` = (Access, index of kk=0 and r=0, kk stride, r stride): a(kk, r)
    at index + kk*kk_stride + r*r_stride, a scalar load (pack_a_panel's layout
    is (f32 panel, index, MR, 1); a row-major a[M, K] read in place is (a,
    index of the tile's first element, 1, K)); ``b_panel`` = (Access,
    index of kk=0, row stride): vector v of row kk at index + kk*stride +
    v*lanes (whole vectors: zero-pad a partial one).  Per kk, nv loads of b and
    mr broadcasts of a feed mr*nv fused multiply-adds: the tile, the loaded
    vectors and a broadcast must fit the register file (tile_shape)."""
    b = k.b
    a_src, a_base, a_stride, r_stride = a_panel
    src, b_base, b_stride = b_panel
    mr = len(acc) // nv

    def step(kk, acc):
        row = b.add(b_base, b.mul(kk, i64(b_stride)))
        bv = [src.load(b.add(row, i64(v * lanes))) for v in range(nv)]
        arow = b.add(a_base, b.mul(kk, i64(a_stride)))
        out = []
        for r in range(mr):
            av = a_src.scalar(b.add(arow, i64(r * r_stride)))
            av = splat(b, av, lanes) if lanes > 1 else av
            out += [fma(k, av, bv[v], acc[r * nv + v]) for v in range(nv)]
        return out

    return fold_loop(b, 0, kc, acc, step)


def pack_a_panel(k: Kernel, a: Access, src, row_stride: int, mr: int, kc: int, a_panel) -> None:
    """Rows src, src + row_stride, ... (mr of them) of ``a``, kc elements each, into
    ``a_panel`` = (f32 pointer, index, stride) interleaved: element kk of row r at
    index + kk*stride + r, micro_tile's layout (stride MR; mr < MR leaves the
    rest of each group unwritten, and micro_tile reads mr rows).  ``a`` loads
    a.lanes (PACK_A_CHUNK) elements of a row at a time, widened to f32 and
    transposed in registers; kc is an int."""
    b = k.b
    ptr, index, stride = a_panel
    c = a.lanes
    rows = [b.add(src, i64(r * row_stride)) for r in range(mr)]
    kfull = kc - kc % c
    if kfull:
        with loop(b, 0, kfull, c, name="pa.k") as kk:
            vs = [a.load(b.add(rows[r], kk)) for r in range(mr)]
            out = b.add(index, b.mul(kk, i64(stride)))
            if mr == stride:   # one interleaving shuffle, one store
                cat = _concat(b, vs)
                order = ir.Constant(ir.VectorType(I32, mr * c), [r * c + q for q in range(c) for r in range(mr)])
                b.store(b.shuffle_vector(cat, ir.Constant(cat.type, ir.Undefined), order), gep(b, ptr, F32, out),
                        align=4)
            else:
                for q in range(c):
                    for r in range(mr):
                        b.store(b.extract_element(vs[r], i64(q)), gep(b, ptr, F32, b.add(out, i64(q * stride + r))))
    for q in range(kfull, kc):
        for r in range(mr):
            b.store(a.scalar(b.add(rows[r], i64(q))), gep(b, ptr, F32, b.add(index, i64(q * stride + r))), align=4)


def prefetch(k: Kernel, ptr, ty, index, write: bool = True):
    """Hint that ptr[index] (elements of ``ty``) is wanted in L1 soon."""
    fn = k.intrinsic("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
    k.b.call(fn, [gep(k.b, ptr, ty, index), ir.Constant(I32, int(write)), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _concat(b, vs: list):
    """One vector of the vectors ``vs`` (same type) end to end."""
    vs = list(vs)
    while len(vs) > 1:
        if len(vs) % 2:
            vs.append(ir.Constant(vs[0].type, ir.Undefined))
        n = vs[0].type.count
        mask = ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n)))
        vs = [b.shuffle_vector(vs[x], vs[x + 1], mask) for x in range(0, len(vs), 2)]
    return vs[0]


def _gemm(k: Kernel, g: Geometry, epilogue=None, packed: bool = False):
    """The tile loop: work item = (batch item, MC rows, NC columns), its K blocks
    (first, middle, last: ``GemmCode.kblock``).  ``packed``: b is a constant packed in
    column panels (pack_matmul_b), read in place; else each K block of a column panel
    is packed on the stack first."""
    b = k.b
    code = GemmCode(k, g, epilogue, packed)
    M, K, N, MC, NC, KC, nkb = g.M, g.K, g.N, code.MC, code.NC, code.KC, code.nkb
    mblocks, nblocks = cdiv(M, MC), cdiv(N, NC)
    with loop(b, k.begin, k.end, name="item") as item:
        mb = b.urem(item, i64(mblocks))
        t = b.udiv(item, i64(mblocks))
        nb = b.urem(t, i64(nblocks))
        i0, j0 = b.mul(mb, i64(MC)), b.mul(nb, i64(NC))
        bt = b.udiv(t, i64(nblocks))
        tile = ((bt, g.offsets(b, bt)), i0, imin(b, b.add(i0, i64(MC)), M),
                j0, imin(b, b.add(j0, i64(NC)), N))
        kc_last = K - (nkb - 1) * KC
        if nkb == 1:
            code.kblock(*tile, i64(0), K, True, True)
        else:
            code.kblock(*tile, i64(0), KC, True, False)
            with loop(b, KC, (nkb - 1) * KC, KC, name="kb") as k0:
                code.kblock(*tile, k0, KC, False, False)
            code.kblock(*tile, i64((nkb - 1) * KC), kc_last, False, True)
    k.finish()
    return g.batch * mblocks * nblocks, _grain(MC * NC * K, MIN_PARALLEL_FMAS)


class GemmCode:
    """The code of one GEMM kernel: a K block of an item tile (``kblock``: its rows of
    a packed into MR-row panels, ``pack_a_rows``; per column panel, ``panel``, b packed,
    ``pack``, then every row panel), and the register tile over one K block with its
    partial sums and epilogue (``micro``)."""

    def __init__(self, k: Kernel, g: Geometry, epilogue, packed: bool):
        self.k, self.b, self.g, self.epilogue, self.packed = k, k.b, g, epilogue, packed
        M, K, N = g.M, g.K, g.N
        p = gemm_blocking(k.target, M, K, N, g.batch, g.dtype, packed)
        self.MR, self.NRL, self.lanes, self.MC, self.NC, self.nkb, self.KC = MR, NRL, lanes, MC, NC, nkb, KC = [
            p[x] for x in ("MR", "NRL", "lanes", "MC", "NC", "nkb", "KC")]
        self.A, self.B, self.Y = (Access(k, q, g.dtype, lanes) for q in (k.args[0], k.args[1], k.args[-1]))
        self.BP = None if packed else Access(k, _stack_array(k, KC * NRL, "bpanel"), dt.f32, lanes)
        # The item's rows of a, packed per K block when an item has enough column panels
        # to pay for it (each reads them all); else the micro-kernel reads a in place.
        self.pack_a = pack_a = cdiv(NC, NRL) >= PACK_A_MIN_PANELS
        self.A8 = Access(k, k.args[0], g.dtype, PACK_A_CHUNK) if pack_a else None
        self.AP = _stack_array(k, cdiv(MC, MR) * MR * KC, "apanel") if pack_a else None
        # Partial sums between K blocks: y itself in f32; an f32 tile for f16 (rounded once).
        self.CT = Access(k, _stack_array(k, MC * NC, "ctile"), dt.f32, lanes) if nkb > 1 and g.dtype is not dt.f32 \
            else None
        self.zero = fconst(vtype(F32, lanes), 0.0)

    def pack(self, b_off, k0, kc, j, ncols):
        """bpanel[kk, 0:ncols] = b[k0+kk, j:j+ncols] in f32, kk < kc; the last
        partial vector is zero-padded."""
        b, lanes, NRL = self.b, self.lanes, self.NRL
        nv = cdiv(ncols, lanes)
        with loop(b, 0, kc, name="pk") as kk:
            src = b.add(b.add(b_off, b.mul(b.add(k0, kk), i64(self.g.N))), j)
            dst = b.mul(kk, i64(NRL))
            for v in range(nv):
                self.BP.store(self.B.load(b.add(src, i64(v * lanes)), min(lanes, ncols - v * lanes)),
                              b.add(dst, i64(v * lanes)))

    def micro(self, t, a_off, y_off, k0, kc, i, j, li, lj, mr, ncols, first, last, panel):
        """Tile y[i:i+mr, j:j+ncols] (li, lj: its place in the item tile), K block
        [k0, k0+kc), rows i.. of a from their packed panel (or in place), b[k0+kk,
        j:j+ncols] from ``panel`` = (access, index of kk=0, row stride),
        zero-padded to whole vectors.  Accumulators start at 0 in the ``first``
        block, else from the partial sums; the ``last`` block writes y, the
        others the partial sums."""
        k, b, lanes, CT, Y, epilogue = self.k, self.b, self.lanes, self.CT, self.Y, self.epilogue
        K, N = self.g.K, self.g.N
        nv = cdiv(ncols, lanes)
        valid = [min(lanes, ncols - v * lanes) for v in range(nv)]
        y_rows = [b.add(y_off, b.add(b.mul(b.add(i, i64(r)), i64(N)), j)) for r in range(mr)]
        if CT:
            p_rows, P = [b.add(b.mul(b.add(li, i64(r)), i64(self.NC)), lj) for r in range(mr)], CT
        else:
            p_rows, P = y_rows, Y
        if not first:  # the partial sums are added after the loop: fetch their lines meanwhile
            for r in range(mr):
                for c in sorted({*range(0, ncols, 16), ncols - 1}):   # 16 f32: a 64-byte line
                    prefetch(k, P.ptr, P.ty, b.add(p_rows[r], i64(c)))
        if self.pack_a:
            a_panel = (Access(k, self.AP, dt.f32, 1), b.mul(li, i64(self.KC)), self.MR, 1)
        else:
            a_panel = (self.A, b.add(a_off, b.add(b.mul(i, i64(K)), k0)), 1, K)
        acc = micro_tile(k, lanes, nv, kc, a_panel, panel, [self.zero] * (mr * nv))
        rows, out = (y_rows, Y) if last else (p_rows, P)
        for r in range(mr):
            for v in range(nv):
                value = acc[r * nv + v]
                if not first:
                    value = b.fadd(P.load(b.add(p_rows[r], i64(v * lanes)), valid[v]), value)
                if last and epilogue:
                    value = epilogue(value, t, b.add(i, i64(r)), b.add(j, i64(v * lanes)), lanes, valid[v])
                out.store(value, b.add(rows[r], i64(v * lanes)), valid[v])

    def panel(self, offs, i0, i1, j0, k0, kc, first, last, j, ncols):
        """Column panel j (ncols columns) of a K block: b's rows k0.. (packed on the
        stack, or in place), then every row panel of the item tile [i0:i1]."""
        b, M, K, MR = self.b, self.g.M, self.g.K, self.MR
        t, (a_off, b_off, y_off) = offs
        if self.packed:  # rows k0.. of the columns j.. in their PACK_NR-column panel
            first_col = b.add(b.mul(b.udiv(j, i64(PACK_NR)), i64(K * PACK_NR)), b.urem(j, i64(PACK_NR)))
            src = (self.B, b.add(b_off, b.add(first_col, b.mul(k0, i64(PACK_NR)))), PACK_NR)
        else:
            self.pack(b_off, k0, kc, j, ncols)
            src = (self.BP, i64(0), self.NRL)
        lj = b.sub(j, j0)
        with loop(b, i0, imin(b, i1, M - M % MR), MR, name="i") as i:
            self.micro(t, a_off, y_off, k0, kc, i, j, b.sub(i, i0), lj, MR, ncols, first, last, src)
        if M % MR:
            with b.if_then(b.icmp_signed("==", i1, i64(M))):
                i = i64(M - M % MR)
                self.micro(t, a_off, y_off, k0, kc, i, j, b.sub(i, i0), lj, M % MR, ncols, first, last, src)

    def pack_a_rows(self, a_off, i0, i1, full, k0, kc):
        """Rows i0..i1 of a (full: where the last short panel starts), columns k0..,
        into MR-row panels (a's strided rows would meet in the same cache sets:
        power-of-two K thrashes L1 and L2 otherwise)."""
        k, b, M, K, MR, KC = self.k, self.b, self.g.M, self.g.K, self.MR, self.KC
        tail = M % MR
        with loop(b, i0, full, MR, name="pa") as i:
            pack_a_panel(k, self.A8, b.add(a_off, b.add(b.mul(i, i64(K)), k0)), K, MR, kc,
                         (self.AP, b.mul(b.sub(i, i0), i64(KC)), MR))
        if tail:
            with b.if_then(b.icmp_signed("==", i1, i64(M))):
                i = i64(M - tail)
                pack_a_panel(k, self.A8, b.add(a_off, b.add(b.mul(i, i64(K)), k0)), K, tail, kc,
                             (self.AP, b.mul(b.sub(i, i0), i64(KC)), MR))

    def kblock(self, offs, i0, i1, j0, j1, k0, kc, first, last):
        """One K block of the item tile [i0:i1, j0:j1] of batch item t: per column
        panel, pack b, then every row panel."""
        b, M, N, MR, NRL = self.b, self.g.M, self.g.N, self.MR, self.NRL
        full = imin(b, i1, M - M % MR)   # (emitted also when a is not packed: the goldens pin it)
        if self.pack_a:
            self.pack_a_rows(offs[1][0], i0, i1, full, k0, kc)
        with loop(b, j0, imin(b, j1, N - N % NRL), NRL, name="j") as j:
            self.panel(offs, i0, i1, j0, k0, kc, first, last, j, NRL)
        if N % NRL:
            with b.if_then(b.icmp_signed("==", j1, i64(N))):
                self.panel(offs, i0, i1, j0, k0, kc, first, last, i64(N - N % NRL), N % NRL)


# --- GEMV (and few-row GEMM) ----------------------------------------------------------

def _gemv(k: Kernel, g: Geometry, epilogue=None):
    """y[m, n] = sum_k a[m, k] * b[k, n], streaming KB rows of b at a time through f32
    accumulator rows, one per row of a tile of a (STREAM_MAX_M rows at most: more
    rows, on riscv64, run tile after tile, tiles being work items too)."""
    b = k.b
    lanes = k.target.lanes(32)
    M, K, N = g.M, g.K, g.N
    MT = min(M, STREAM_MAX_M)
    mtiles = cdiv(M, MT)
    block = min(GEMV_BLOCK, cdiv(N, lanes) * lanes)
    nblk = cdiv(N, block)
    span_blocks = max(1, GEMV_SPAN // MT // block)
    span = span_blocks * block
    A, B, Y = (Access(k, p, g.dtype, lanes) for p in (k.args[0], k.args[1], k.args[-1]))
    Y1 = Access(k, k.args[-1], g.dtype, 1)
    # one array per row: distinct objects, so LLVM knows the rows' stores never meet
    # the other rows' loads, whatever the vector length (one array with rows span apart
    # limits a scalable vectorization to what fits span at the largest VLEN: none)
    accs = [_stack_array(k, span, f"acc{m}") for m in range(MT)]
    ACC, ACC1 = ([Access(k, a, dt.f32, n) for a in accs] for n in (lanes, 1))
    zero = fconst(vtype(F32, lanes), 0.0)

    def run(t, a_off, b_off, y_off, c0, c1, m0, M):
        """acc[m, 0:c1-c0] = a[m, :] @ b[:, c0:c1]; then y[m, c0:c1] = acc[m], for the M
        rows of a and y at the offsets given (rows m0 .. of the batch item)."""
        width = b.sub(c1, c0)
        vend = b.mul(b.udiv(width, i64(lanes)), i64(lanes))
        with loop(b, 0, span, lanes, name="z") as c:
            for m in range(M):
                ACC[m].store(zero, c)

        def rows(k0, kb):
            xs = [[A.scalar(b.add(a_off, b.add(k0, i64(m * K + t)))) for t in range(kb)] for m in range(M)]
            xv = [[splat(b, x, lanes) if lanes > 1 else x for x in row] for row in xs]
            base = [b.add(b_off, b.add(b.mul(b.add(k0, i64(t)), i64(N)), c0)) for t in range(kb)]

            def col(acc_access, x, load, c):
                w = [load(b.add(base[t], c)) for t in range(kb)]
                for m in range(M):
                    # two chains (even and odd rows of b) halve the FMA latency per column
                    s = [acc_access[m].load(c), None]
                    for t in range(kb):
                        s[t % 2] = b.fmul(x[m][t], w[t]) if s[t % 2] is None else fma(k, x[m][t], w[t], s[t % 2])
                    acc_access[m].store(s[0] if s[1] is None else b.fadd(s[0], s[1]), c)

            with loop(b, 0, vend, lanes, name="c") as c:
                col(ACC, xv, B.load, c)
            with loop(b, vend, width, name="ct") as c:  # only the last columns of b
                col(ACC1, xs, B.scalar, c)

        kfull = K - K % GEMV_KB
        with loop(b, 0, kfull, GEMV_KB, name="kb") as k0:
            rows(k0, GEMV_KB)
        if K % GEMV_KB:
            rows(i64(kfull), K % GEMV_KB)
        for m in range(M):
            out = b.add(y_off, b.add(c0, i64(m * N)))
            for lo, hi, step, acc_, y_, name in ((0, vend, lanes, ACC, Y, "o"), (vend, width, 1, ACC1, Y1, "ot")):
                with loop(b, lo, hi, step, name=name) as c:
                    value = acc_[m].load(c)
                    if epilogue:
                        value = epilogue(value, t, b.add(m0, i64(m)), b.add(c0, c), step)
                    y_.store(value, b.add(out, c))

    # Consecutive items of one batch item are adjacent columns: take runs of up
    # to span_blocks of them at once, so each row segment read is long.
    pre = b.block
    head = b.append_basic_block("run.head")
    body = b.append_basic_block("run.body")
    done = b.append_basic_block("run.done")
    b.branch(head)
    b.position_at_end(head)
    it = b.phi(I64, name="it")
    it.add_incoming(k.begin, pre)
    b.cbranch(b.icmp_signed("<", it, k.end), body, done)
    b.position_at_end(body)
    blk = b.urem(it, i64(nblk))
    tm = b.udiv(it, i64(nblk))
    t, mi = b.udiv(tm, i64(mtiles)), b.urem(tm, i64(mtiles))
    a_off, b_off, y_off = g.offsets(b, t)
    m0 = b.mul(mi, i64(MT))
    a_off, y_off = b.add(a_off, b.mul(m0, i64(K))), b.add(y_off, b.mul(m0, i64(N)))
    nrun = imin(b, imin(b, b.sub(k.end, it), b.sub(i64(nblk), blk)), span_blocks)
    c0 = b.mul(blk, i64(block))
    c1 = imin(b, b.mul(b.add(blk, nrun), i64(block)), N)
    if M % MT:   # the last tile's rows
        with b.if_else(b.icmp_signed("==", mi, i64(mtiles - 1))) as (tail, full):
            with tail:
                run(t, a_off, b_off, y_off, c0, c1, m0, M % MT)
            with full:
                run(t, a_off, b_off, y_off, c0, c1, m0, MT)
    else:
        run(t, a_off, b_off, y_off, c0, c1, m0, MT)
    it.add_incoming(b.add(it, nrun), b.block)
    b.branch(head)
    b.position_at_end(done)
    k.finish()
    least = cdiv(GEMV_MIN_SEGMENT, block * g.dtype.bits // 8)
    return g.batch * mtiles * nblk, max(min(least, cdiv(nblk, 2)), _grain(MT * block * K, MIN_PARALLEL_GEMV))
