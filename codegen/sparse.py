"""Sparse matmul kernels: ``matmul(x, W) {sparse=csr|bsrRxC}`` and
``matmul_q(x, q, scales) {sparse=csr|bsrRxC}`` (i8, or i4 with one group:
per-channel scales), W a 2-D constant [K, N]; every leading dim of x folds
into M rows.  Results are those of the dense op up to f32 rounding (f32
accumulation; f16 and int8 values widened in registers; matmul_q applies its
per-column scale once per output).

Packed layout (``pack_sparse``; the IR keeps the logical dense values).  A
format is R x C blocks (R rows along K, C columns along N; csr is 1 x 1):
the weight is cut into KB = ceil(K/R) block rows and NB = ceil(N/C) column
blocks (edge blocks zero-padded), and every column block stores its nonzero
blocks (any element nonzero; for matmul_q: q != 0) in ascending block row.
One blob, three arrays, each starting at a multiple of 64 bytes:

* ``ptr``  i32 [NB + 1] (i64 when there are 2^31 entries or more): entries of
  column block j are ``ptr[j] .. ptr[j+1]``;
* ``idx``  u16 [E] block row kb of each entry (i32 when KB > 65536): the
  bytes moved are what counts (f32 + u16 at 90% sparsity is 0.6 bytes per
  dense weight);
* ``val``  [E][R][C] values in the weight's own dtype (f32, f16, or i8 for
  matmul_q), block-row-major: row r of a block is C adjacent output columns.

csr pads every column to a multiple of P = 8 entries (value 0, index 0), so
the M = 1 kernel reads whole groups of 8 without a tail: <= 7 entries per
column (1.7% of the bytes at 90% sparsity of K = 2048).  The layout does not
depend on the target.

Kernels.  Work items are chunks of consecutive column blocks with (nearly)
equal packed bytes, cut at compile time from the constant's values
(``k.consts``) and emitted as a constant array of column-block bounds; the
runtime gives each thread a contiguous run of items, so threads stream equal
bytes.  x is first copied (f32, rows padded with zeros to KB*R) into a
per-call stack scratch, so no block reads past K and f16 x is widened once:

* M = 1, csr: a group of 8 entries is one gather of x, one vector load of
  values and one FMA; 4 independent accumulators, one horizontal sum per
  column.  The gather (``GATHER``): on x86, 8 index loads into integer
  registers and 8 loads into the lanes (faster on Zen 3 than vgatherdps);
  scalar code on rv64gc; RVV: see the riscv64 item below.
* M = 1, bsr: a block is one FMA of R*C lanes: x[kb*R : kb*R+R] loaded
  contiguously and repeated C times against the block's values (no gather);
  the R partial sums of each column are added at the end of the column block.
* M > 1: x is transposed into the scratch as [group][KB*R][MBP] (row groups
  of up to MB_MAX rows, MBP lanes), and a block multiplies each of its R*C
  values (broadcast) with a contiguous vector of MBP rows of x.  When every
  group fits SCRATCH_BYTES, a work item is a chunk that runs every row group
  in turn (its bytes come from DRAM once, then from cache); otherwise items
  are (row group, chunk), chunk fastest, and a thread refills the scratch
  when its row group changes (the weights stream once per group).
* When even one row of x would not fit SCRATCH_BYTES (K > 128 Ki), the M > 1
  code runs one row at a time reading x directly (correct, not fast).
* riscv64 with V: every row of x runs the M = 1 kernels, written there as
  scalar loops over a column's entries whose sums may be reassociated, which
  LLVM vectorizes length-agnostically (csr: an indexed load of x and a vector
  FMA per strip of entries; bsr RxC: a segment load of the blocks' values, R
  indexed loads, R*C FMAs); their rounding then depends on VLEN.

Measured (Zen 3, 2 cores shared with other work; benchmarks/sparse.py): one
thread streams the csr f32 M = 1 kernel from DRAM at ~9.7 GB/s of packed
bytes (~2 G entries/s; 3.1 G/s in cache) against a 15.6 GB/s read probe:
per entry it is compute-bound (the emulated gather: ~25 uops per 8), which
is what the bsr 1xC blocks remove (one broadcast and one FMA per C values).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import Node
from ..ir.sparsity import CSR_PAD, parse_format
from .kernel import (F32, I1, I16, I32, I64, I8, PTR, Kernel, fconst, fold_loop, gep, hsum, i64, lltype, llvm_name,
                     loop, splat, vtype)
from .lower import UnsupportedOp, emitter, packer
from .matmul import Access, _stack_array, cdiv, fma

P = CSR_PAD                  # csr: entries per column padded to a multiple of P (one gather)
CHUNK_BYTES = 1 << 15        # packed bytes per work item (about)
COLUMN_COST = 32             # per column block, in bytes-equivalent (loop and store overhead)
MIN_PARALLEL_BYTES = 1 << 17  # fewest packed bytes worth waking another thread for
SCRATCH_BYTES = 1 << 19      # x scratch on the stack at most (threads have 8 MiB stacks)
MB_MAX = {1: 16, 4: 8, 8: 8}  # rows of x per row group, by C (accumulators fit 16 registers)
# M = 1 csr, how 8 entries read x: "auto" (x86: "scalar"; other vector hosts: "masked"), "scalar"
# (8 index loads into integer registers, 8 loads into lanes), "x86" (vgatherdps),
# "masked" (llvm.masked.gather; on Zen 3 LLVM scalarizes it through vector
# index arithmetic: 30 instructions per 8).  Measured on Zen 3, one thread, 90%:
# in cache (CPU time, 2 x 2048^2) scalar 3.1 G entries/s, masked 2.2, x86 2.0;
# from DRAM (2048 x 40960) scalar 9.7 ms, masked 10.1, x86 11.1.  Also tried,
# no gain from DRAM: u16 indices read four per 64-bit load (llvm-mca: 9% fewer
# cycles in cache, measured 0-10% slower from DRAM); software prefetch 512 or
# 2048 bytes ahead in both streams (within noise).
GATHER = "auto"


def _align64(n: int) -> int:
    return -(-n // 64) * 64


class Layout:
    """Sizes of one sparse node and its packed layout (``w``: the weight's values)."""

    def __init__(self, node: Node, w: np.ndarray):
        fmt = parse_format(node.attrs["sparse"])
        self.quant = node.op == "matmul_q"
        x_t, w_t = node.inputs[0].type, node.inputs[1].type
        self.K, self.N = w_t.shape
        self.M = math.prod(x_t.shape[:-1])
        self.xdtype, self.vdtype = x_t.dtype, w_t.dtype
        if self.quant:
            q = w_t.dtype
            if q is dt.i4 and node.attrs["group"] < self.K:
                raise UnsupportedOp(f"matmul_q with sparse={fmt} and i4 weights needs per-channel scales "
                                    f"(group >= K={self.K}), got group={node.attrs['group']}")
            self.vdtype = dt.i8  # i4 values arrive as int8 numpy values, stored as i8
            self.sdtype = node.inputs[2].type.dtype
        self.csr = fmt.kind == "csr"
        self.R, self.C = (fmt.r, fmt.c) if fmt.kind == "bsr" else (1, 1)
        self.KB, self.NB = cdiv(self.K, self.R), cdiv(self.N, self.C)
        self.Kpad = self.KB * self.R
        self.w = np.asarray(w)
        self.itype = I16 if self.KB <= 65536 else I32
        self.inp = np.dtype("<u2") if self.itype is I16 else np.dtype("<i4")
        self.vnp = {dt.f32: np.dtype("<f4"), dt.f16: np.dtype("<f2"), dt.i8: np.dtype("i1")}[self.vdtype]
        self.vty = lltype(self.vdtype)
        self.counts = self._counts()
        if self.csr:
            self.counts = -(-self.counts // P) * P
        self.ptr = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)
        self.E = int(self.ptr[-1])
        self.ptype = I32 if self.E < (1 << 31) else I64
        self.entry_bytes = self.R * self.C * self.vnp.itemsize + self.inp.itemsize
        self.idx_off = _align64(4 * (self.NB + 1) if self.ptype is I32 else 8 * (self.NB + 1))
        self.val_off = _align64(self.idx_off + self.E * self.inp.itemsize)
        self.nbytes = self.val_off + self.E * self.R * self.C * self.vnp.itemsize

    def _block_mask(self) -> np.ndarray:
        """bsr: [KB, NB] which blocks hold a nonzero."""
        nz = self.w != 0
        if self.Kpad != self.K or self.N % self.C:
            pad = np.zeros((self.Kpad, self.NB * self.C), bool)
            pad[:self.K, :self.N] = nz
            nz = pad
        return nz.reshape(self.KB, self.R, self.NB, self.C).any(axis=(1, 3))

    def _counts(self) -> np.ndarray:
        if self.csr:
            return np.count_nonzero(self.w, axis=0).astype(np.int64)
        return np.count_nonzero(self._block_mask(), axis=0).astype(np.int64)

    def blob(self) -> bytes:
        """The packed bytes (module docstring)."""
        R, C, K, N = self.R, self.C, self.K, self.N
        if self.csr:  # the transposed weight's nonzeros come out sorted by column, then row
            wt = np.ascontiguousarray(self.w.T)
            mask = wt != 0
            raw = np.count_nonzero(mask, axis=1).astype(np.int64)
            kb_idx = np.broadcast_to(np.arange(K, dtype=self.inp), wt.shape)[mask]
            v = wt[mask]
        else:
            bm = np.ascontiguousarray(self._block_mask().T)   # [NB, KB]
            raw = np.count_nonzero(bm, axis=1).astype(np.int64)
            j_idx, kb_idx = np.nonzero(bm)
        # entry e of column block j goes to slot ptr[j] + (e - first entry of j); padded slots stay zero
        shift = self.ptr[:-1] - np.concatenate([[0], np.cumsum(raw)])[:-1]
        pos = np.arange(int(raw.sum()), dtype=np.int64) + np.repeat(shift, raw)
        idx = np.zeros(self.E, self.inp)
        idx[pos] = kb_idx
        vals = np.zeros((self.E, R, C), self.vnp)
        if self.csr:
            vals[pos, 0, 0] = v
        elif len(pos):
            wp = self.w
            if self.Kpad != K or N % C:
                wp = np.zeros((self.Kpad, self.NB * C), self.w.dtype)
                wp[:K, :N] = self.w
            vals[pos] = wp.reshape(self.KB, R, self.NB, C)[kb_idx, :, j_idx, :]
        out = bytearray(self.nbytes)
        ptr = self.ptr.astype("<i4" if self.ptype is I32 else "<i8").tobytes()
        out[:len(ptr)] = ptr
        out[self.idx_off:self.idx_off + idx.nbytes] = idx.tobytes()
        out[self.val_off:] = vals.tobytes()
        return bytes(out)

    def chunks(self) -> list[int]:
        """Column-block bounds of the work items: near-equal packed bytes each."""
        cost = self.counts * self.entry_bytes + COLUMN_COST
        total = int(cost.sum())
        n = max(1, min(self.NB, cdiv(total, CHUNK_BYTES)))
        cum = np.concatenate([[0], np.cumsum(cost)])
        bounds = np.searchsorted(cum, np.arange(n + 1) * (total / n), side="left")
        bounds[0], bounds[-1] = 0, self.NB
        return sorted({int(x) for x in bounds})


@packer("matmul:csr", "matmul:bsr", "matmul_q:csr", "matmul_q:bsr", inputs=(1,))
def pack_sparse(node: Node, index: int, a, target=None) -> bytes | None:
    """The weight (input 1) as the sparse kernel reads it; other inputs stay plain."""
    if index != 1:
        return None
    return Layout(node, a).blob()


@emitter("matmul:csr", "matmul:bsr", "matmul_q:csr", "matmul_q:bsr")
def emit_sparse(k: Kernel, node: Node):
    L = Layout(node, k.consts[1])
    if L.M * L.N == 0:
        k.finish()
        return 0, 1
    E = _Emit(k, L)
    return E.run()


class _Emit:
    def __init__(self, k: Kernel, L: Layout):
        self.k, self.L, self.b = k, L, k.b
        self.lanes = k.target.lanes(32)
        # riscv64 with V: the M = 1 kernels are scalar loops whose sums may be reassociated,
        # which LLVM vectorizes length-agnostically (the sums' rounding then depends on VLEN)
        self.vla = k.target.name == "riscv64" and k.target.has_vector
        blob = k.args[1]
        b = self.b
        self.ptr_base = blob
        self.idx_base = gep(b, blob, I8, i64(L.idx_off))
        self.val_base = gep(b, blob, I8, i64(L.val_off))
        self.X = Access(k, k.args[0], L.xdtype, 1)
        self.Y = Access(k, k.args[-1], L.xdtype, 1)
        self.S = Access(k, k.args[2], L.sdtype, 1) if L.quant else None

    # --- plumbing -------------------------------------------------------------------

    def xbase(self, g):
        """Where row group g's x starts in the scratch."""
        return self.b.mul(g, i64(self.L.Kpad * self.MBP)) if self.inner else i64(0)

    def fmadd(self, x, y, acc):
        """x*y + acc (f32 scalars), which LLVM may reassociate across a loop's iterations."""
        fn = self.k.intrinsic("llvm.fmuladd.f32", F32, [F32] * 3)
        return self.b.call(fn, [x, y, acc], fastmath=("reassoc", "contract"))

    def ptr_at(self, j):
        b, ty = self.b, self.L.ptype
        v = b.load(gep(b, self.ptr_base, ty, j), typ=ty)
        return v if ty is I64 else b.sext(v, I64)

    def idx_at(self, e):
        b, ty = self.b, self.L.itype
        return b.zext(b.load(gep(b, self.idx_base, ty, e), typ=ty), I64)

    def vals_at(self, e, n):
        """n values from entry offset e (in values), widened to f32 (a vector for n > 1)."""
        b, ty = self.b, self.L.vty
        p = gep(b, self.val_base, ty, e)
        v = b.load(p, typ=vtype(ty, n), align=self.L.vnp.itemsize)
        ft = vtype(F32, n)
        if self.L.vdtype is dt.i8:
            return b.sitofp(v, ft)
        return b.fpext(v, ft) if self.L.vdtype is dt.f16 else v

    def bcast(self, v, n):
        return splat(self.b, v, n) if n > 1 else v

    def store(self, value, row, col):
        """y[row, col] = value (times the column's scale for matmul_q)."""
        b = self.b
        if self.S is not None:
            value = b.fmul(value, self.S.scalar(col))
        self.Y.store(value, b.add(b.mul(row, i64(self.L.N)), col))

    def column_guard(self, j, c):
        """A context: its body runs only when column j*C + c exists (the last
        column block is padded); no branch where it always exists."""
        L, b = self.L, self.b
        if L.N % L.C == 0 or c < L.N % L.C:
            return _Always()
        return b.if_then(b.icmp_signed("<", b.add(b.mul(j, i64(L.C)), i64(c)), i64(L.N)))

    def entries(self, p0, p1, nacc, unroll, init, step):
        """fold over entries [p0, p1): ``unroll`` independent accumulator sets
        of ``nacc`` values (main loop), then single entries into set 0 (tail);
        returns the sets summed.  ``step(e, accs) -> accs``; entry units are
        ``self.unit`` entries per step (csr groups: P)."""
        b, u = self.b, self.unit
        span = u * unroll
        n = b.sub(p1, p0)
        main = b.add(p0, b.mul(b.sdiv(n, i64(span)), i64(span))) if unroll > 1 else p1

        def body(e, accs):
            out = []
            for s in range(unroll):
                out += step(b.add(e, i64(s * u)), accs[s * nacc:(s + 1) * nacc])
            return out

        accs = fold_loop(b, p0, main, [init] * (nacc * unroll), body, step=span, name="e")
        if unroll > 1:
            tail = fold_loop(b, main, p1, accs[:nacc], lambda e, a: step(e, a), step=u, name="et")
            accs = list(tail) + list(accs[nacc:])
        out = []
        for i in range(nacc):
            v = accs[i]
            for s in range(1, unroll):
                v = b.fadd(v, accs[s * nacc + i])
            out.append(v)
        return out

    # --- x scratch ------------------------------------------------------------------

    def fill(self, g, base):
        """scratch[k*MBP + m] = x[g*RG + m, k] (f32), zero past K.  Rows past M
        (last group) repeat row M-1: lanes are independent and never stored.
        One loop over k building a vector of MBP rows: separate loops per row
        made LLVM's unroller and SLP vectorizer take seconds for M = 16."""
        L, b, MBP, RG = self.L, self.b, self.MBP, self.RG
        vt = vtype(F32, MBP)
        zero = fconst(vt, 0.0)
        srcs = []
        for m in range(min(RG, MBP)):
            row = b.add(b.mul(g, i64(RG)), i64(m))
            if L.M % RG:
                row = b.select(b.icmp_signed("<", row, i64(L.M)), row, i64(L.M - 1))
            srcs.append(b.mul(row, i64(L.K)))
        with loop(b, 0, L.K, name="xc") as kk:
            v = zero
            for m, src in enumerate(srcs):
                xm = self.X.scalar(b.add(src, kk))
                v = b.insert_element(v, xm, i64(m)) if MBP > 1 else xm
            b.store(v, gep(b, self.xs, F32, b.add(base, b.mul(kk, i64(MBP)))), align=4)
        if L.Kpad > L.K:
            with loop(b, L.K, L.Kpad, name="xp") as kk:
                b.store(zero, gep(b, self.xs, F32, b.add(base, b.mul(kk, i64(MBP)))), align=4)

    # --- kernels --------------------------------------------------------------------

    def run(self):
        L, k, b = self.L, self.k, self.b
        chunks = self.chunks = L.chunks()
        nch = len(chunks) - 1
        cap = SCRATCH_BYTES // max(1, 4 * L.Kpad)
        self.direct = cap < 1
        if (L.M == 1 or self.vla) and not self.direct:   # riscv64 with V: row after row
            self.RG = self.MBP = 1
            body = self.gemv_csr if L.csr else self.gemv_bsr
        elif self.direct:
            self.RG = self.MBP = 1
            body = self.panel
        else:
            # MBP a power of two: <12 x float> rows (48-byte stride) measured 10x slower than 16
            cap = 1 << (min(cap, MB_MAX[L.C]).bit_length() - 1)
            self.RG = cdiv(L.M, cdiv(L.M, cap))
            self.MBP = 1 << (self.RG - 1).bit_length()
            body = self.panel
        self.groups = cdiv(L.M, self.RG)
        plane = L.Kpad * self.MBP
        # Every row group's x fits the scratch: items are chunks only, and each
        # item runs all row groups over its chunk (its bytes stay in cache).
        self.inner = not self.direct and self.groups > 1 and 4 * plane * self.groups <= SCRATCH_BYTES
        if not self.direct:
            self.xs = _stack_array(k, max(1, plane * (self.groups if self.inner else 1)), "xs")
        self.unit = P if (L.csr and L.M == 1 and not self.direct) else 1
        tab_ty = ir.ArrayType(I32, nch + 1)
        tab = ir.GlobalVariable(k.module, tab_ty, f"{k.name}.chunks")
        tab.global_constant, tab.linkage = True, "private"
        tab.initializer = ir.Constant(tab_ty, [ir.Constant(I32, c) for c in chunks])

        def chunk(c, g):
            j0 = b.sext(b.load(gep(b, tab, I32, c), typ=I32), I64)
            j1 = b.sext(b.load(gep(b, tab, I32, b.add(c, i64(1))), typ=I32), I64)
            with loop(b, j0, j1, name="j") as j:
                body(g, j)

        if self.inner:
            with b.if_then(b.icmp_signed("<", k.begin, k.end)):
                with loop(b, 0, self.groups, name="fg") as g:
                    self.fill(g, b.mul(g, i64(plane)))
            with loop(b, k.begin, k.end, name="item") as item:
                with loop(b, 0, self.groups, name="g") as g:
                    chunk(item, g)
        else:
            with loop(b, k.begin, k.end, name="item") as item:
                g = b.udiv(item, i64(nch))
                c = b.urem(item, i64(nch))
                if not self.direct:
                    with b.if_then(b.or_(b.icmp_signed("==", item, k.begin), b.icmp_signed("==", c, i64(0)))):
                        self.fill(g, i64(0))
                chunk(c, g)
        k.finish()
        per_item = max(1, L.nbytes // nch)
        items = nch if self.inner else self.groups * nch
        return items, max(1, cdiv(MIN_PARALLEL_BYTES, per_item * self.MBP * (self.groups if self.inner else 1)))

    def gemv_csr(self, g, j):
        """M = 1, csr: y[j] = sum over groups of 8 entries of val * gather(x, idx)."""
        L, b, k = self.L, self.b, self.k
        vt = ir.VectorType(F32, P)
        ivt = ir.VectorType(L.itype, P)
        ptrs_t = ir.VectorType(PTR, P)
        gather = k.intrinsic(f"llvm.masked.gather.{llvm_name(vt)}.v{P}p0", vt,
                             [ptrs_t, I32, ir.VectorType(I1, P), vt])
        mask = ir.Constant(ir.VectorType(I1, P), [1] * P)
        XS = Access(k, self.xs, dt.f32, 1)

        x86 = "+avx2" in k.target.features.split(",")
        mode = GATHER if GATHER != "auto" else "scalar" if x86 or self.lanes == 1 else "masked"
        mode = "scalar" if self.lanes == 1 or (mode == "x86" and not x86) else mode
        if mode == "x86":
            v8i32 = ir.VectorType(I32, P)
            gather = k.intrinsic("llvm.x86.avx2.gather.d.ps.256", vt, [vt, PTR, v8i32, vt, I8])
            all_ones = b.bitcast(ir.Constant(v8i32, [-1] * P), vt)

        def step(e, accs):
            if mode == "scalar":
                # index loads straight into integer registers, x loads into vector lanes
                xv = ir.Constant(vt, ir.Undefined)
                for t in range(P):
                    xv = b.insert_element(xv, XS.scalar(self.idx_at(b.add(e, i64(t)))), i64(t))
            elif mode == "x86":
                iv = b.load(gep(b, self.idx_base, L.itype, e), typ=ivt, align=L.inp.itemsize)
                iv = b.zext(iv, v8i32) if L.itype is I16 else iv
                xv = b.call(gather, [ir.Constant(vt, 0.0), self.xs, iv, all_ones, ir.Constant(I8, 4)])
            else:
                iv = b.zext(b.load(gep(b, self.idx_base, L.itype, e), typ=ivt, align=L.inp.itemsize),
                            ir.VectorType(I64, P))
                ptrs = b.gep(self.xs, [iv], inbounds=True, source_etype=F32)
                ptrs.type = ptrs_t  # llvmlite types a vector GEP as a scalar pointer
                xv = b.call(gather, [ptrs, ir.Constant(I32, 4), mask, ir.Constant(vt, ir.Undefined)])
            return [fma(k, self.vals_at(e, P), xv, accs[0])]

        p0, p1 = self.ptr_at(j), self.ptr_at(b.add(j, i64(1)))
        if self.vla:
            # one reassociable multiply-add per entry: LLVM vectorizes the loop length-
            # agnostically (indexed loads of x, vector FMAs, one reduction per column)
            xb = self.xbase(g)
            acc = fold_loop(b, p0, p1, [ir.Constant(F32, 0.0)], lambda e, a: [
                self.fmadd(self.vals_at(e, 1), XS.scalar(b.add(xb, self.idx_at(e))), a[0])], name="e")[0]
            self.store(acc, g, j)
            return
        acc = self.entries(p0, p1, 1, 4 if self.lanes > 1 else 1, fconst(vt, 0.0), step)[0]
        self.store(hsum(k, acc), i64(0), j)

    def gemv_bsr(self, g, j):
        """M = 1, bsr: per block, x[kb*R : kb*R+R] repeated C times times the R*C values."""
        L, b, k = self.L, self.b, self.k
        R, C = L.R, L.C
        T = R * C
        vt = vtype(F32, T)
        XS = Access(k, self.xs, dt.f32, 1)

        def step(e, accs):
            k0 = b.mul(self.idx_at(e), i64(R))
            if R == 1:
                xv = self.bcast(XS.scalar(k0), T)
            else:
                xr = b.load(gep(b, self.xs, F32, k0), typ=ir.VectorType(F32, R), align=4)
                if C > 1:
                    xr = b.shuffle_vector(xr, ir.Constant(xr.type, ir.Undefined),
                                          ir.Constant(ir.VectorType(I32, T), [r for r in range(R) for _ in range(C)]))
                xv = xr
            return [fma(k, self.vals_at(b.mul(e, i64(T)), T), xv, accs[0])]

        p0, p1 = self.ptr_at(j), self.ptr_at(b.add(j, i64(1)))
        if self.vla:
            # T reassociable scalar sums over the entries: LLVM vectorizes the loop length-
            # agnostically (a segment load of the blocks' values, a gather of x per row)
            xb = self.xbase(g)

            def sums(e, accs):
                k0 = b.add(xb, b.mul(self.idx_at(e), i64(R)))
                xr = [XS.scalar(b.add(k0, i64(r)) if r else k0) for r in range(R)]
                return [self.fmadd(self.vals_at(b.add(b.mul(e, i64(T)), i64(i)), 1), xr[i // C], a)
                        for i, a in enumerate(accs)]
            accs = fold_loop(b, p0, p1, [ir.Constant(F32, 0.0)] * T, sums, name="e")
            outs = [functools.reduce(b.fadd, accs[c::C]) for c in range(C)]
            for c, v in enumerate(outs):
                with self.column_guard(j, c):
                    self.store(v, g, b.add(b.mul(j, i64(C)), i64(c)))
            return
        unroll = max(1, min(4, 8 // max(1, cdiv(T, self.lanes)))) if self.lanes > 1 else 1
        acc = self.entries(p0, p1, 1, unroll, fconst(vt, 0.0), step)[0]
        if C == 1:
            outs = [hsum(k, acc) if T > 1 else acc]
        else:
            und = ir.Constant(vt, ir.Undefined)
            part = [b.shuffle_vector(acc, und, ir.Constant(ir.VectorType(I32, C), [r * C + c for c in range(C)]))
                    for r in range(R)]
            tot = part[0]
            for p_ in part[1:]:
                tot = b.fadd(tot, p_)
            outs = [b.extract_element(tot, i64(c)) for c in range(C)]
        for c, v in enumerate(outs):
            with self.column_guard(j, c):
                self.store(v, i64(0), b.add(b.mul(j, i64(C)), i64(c)))

    def panel(self, g, j):
        """M > 1 (or direct): per entry and value (r, c), acc[c] += val * x[rows, kb*R + r]
        with x[rows, k] a vector of MBP rows from the scratch (or one row of x)."""
        L, b, k = self.L, self.b, self.k
        R, C, MBP, RG = L.R, L.C, self.MBP, self.RG
        vt = vtype(F32, MBP)
        T = R * C
        if self.direct:
            row = g
            xbase = b.mul(row, i64(L.K))

            def xload(kk, r):
                if L.K % R == 0 or r < L.K % R:
                    return self.X.scalar(b.add(xbase, kk))
                inside = b.icmp_signed("<", kk, i64(L.K))
                safe = b.select(inside, kk, i64(L.K - 1))
                return b.select(inside, self.X.scalar(b.add(xbase, safe)), fconst(F32, 0.0))
        else:
            base = b.mul(g, i64(L.Kpad * MBP)) if self.inner else i64(0)

            def xload(kk, r):
                return b.load(gep(b, self.xs, F32, b.add(base, b.mul(kk, i64(MBP)))), typ=vt, align=4)

        def step(e, accs):
            k0 = b.mul(self.idx_at(e), i64(R))
            vals = self.vals_at(b.mul(e, i64(T)), T)
            out = list(accs)
            for r in range(R):
                xv = xload(b.add(k0, i64(r)) if r else k0, r)
                for c in range(C):
                    v = b.extract_element(vals, i64(r * C + c)) if T > 1 else vals
                    out[c] = fma(k, self.bcast(v, MBP), xv, out[c])
            return out

        p0, p1 = self.ptr_at(j), self.ptr_at(b.add(j, i64(1)))
        nvec = C * cdiv(MBP, self.lanes)
        unroll = max(1, min(4, 8 // nvec)) if self.lanes > 1 else 1
        accs = self.entries(p0, p1, C, unroll, fconst(vt, 0.0), step)
        for m in range(RG):
            row = b.add(b.mul(g, i64(RG)), i64(m))
            guard = _Always() if L.M % RG == 0 else b.if_then(b.icmp_signed("<", row, i64(L.M)))
            with guard:
                for c in range(C):
                    v = b.extract_element(accs[c], i64(m)) if MBP > 1 else accs[c]
                    with self.column_guard(j, c):
                        self.store(v, row, b.add(b.mul(j, i64(C)), i64(c)))


class _Always:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


__all__ = ["Layout", "pack_sparse", "emit_sparse"]
