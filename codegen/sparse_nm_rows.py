"""N:M sparse ``matmul`` / ``matmul_q`` on riscv64 (with or without V): the
packed weight in a row layout that scalar loops read column by column, so
LLVM's loop vectorizer makes the column loops vector-length agnostic (an
indexed load of x per slot, ``vsetvli`` strip-mining) and rv64gc runs them
scalar.  Same slots as the other N:M kernels (codegen/sparse_nm.py: per
column and run of M rows, its nonzeros in row order, then value 0 at
position 0); same numerics (f32 sums in run order, integer values scaled
per column, or per group for group-wise i4).

Row layout (``pack_nm_rows``): columns in blocks of BW = 512 columns (the last one
narrower, w columns, padded to a multiple of 8 with zero columns), block
after block, each block run after run and slot after slot:

* values: per (run, slot) a row of the block's wp columns (w padded) in the
  value dtype (f32, f16, i8); i4: wp/2 bytes, byte j holding column j in the
  low nibble and column j + wp/2 in the high one (two's complement);
* positions (after the values, at a multiple of 64 bytes): per (run, slot)
  wp * pb / 8 bytes of pb-bit fields (pb = 2 bits for M <= 4, else 4): byte j
  holds column j + f * wp/F in field f (F = 8 / pb fields).

A loop runs over a segment of columns that share their position field and
i4 half, so every column is decoded with constant shifts.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from .kernel import F32, I8, I64, Kernel, fconst, gep, i64, last_chunk, lltype, loop
from .matmul import Access, _stack_array, cdiv, fma
from .matmul_q_rows import BW, RT, load_q

MIN_PARALLEL_BYTES = 1 << 17


class RowsNM:
    """Sizes of the row layout of one node (L: its sparse_nm.NMLayout)."""

    def __init__(self, L):
        self.L = L
        self.nblk = cdiv(L.N, BW)
        self.last = L.N - (self.nblk - 1) * BW if L.N else 0
        self.F = 8 // L.pb

    @staticmethod
    def padded(w: int) -> int:
        return cdiv(w, 8) * 8

    def vrow(self, w: int) -> int:
        """Value bytes of one (run, slot) row of a block of w columns."""
        wp = self.padded(w)
        return wp // 2 if self.L.vdt is dt.i4 else wp * self.L.vdt.bits // 8

    def prow(self, w: int) -> int:
        return self.padded(w) // self.F

    def pos_off(self) -> int:
        L = self.L
        vbytes = (self.nblk - 1) * L.R * L.n * self.vrow(BW) + L.R * L.n * self.vrow(self.last) if self.nblk else 0
        return cdiv(vbytes, 64) * 64

    def segments(self, w: int) -> list[tuple[int, int, int, int]]:
        """(first, last, position field, i4 half) column ranges of a block of w columns."""
        wp = self.padded(w)
        h, h2 = wp // self.F, wp // 2
        cuts = sorted({0, wp, h2, *(f * h for f in range(self.F))})
        return [(a, e, a // h, a // h2 if self.L.vdt is dt.i4 else 0) for a, e in zip(cuts, cuts[1:]) if a < e]


def pack_nm_rows(L, vals: np.ndarray, pos: np.ndarray) -> bytes:
    """The row layout from the slots ([runs, N slots, columns] values and positions)."""
    Rw = RowsNM(L)
    vparts, pparts = [], []
    for blk in range(Rw.nblk):
        c0 = blk * BW
        w = min(BW, L.N - c0)
        wp = Rw.padded(w)
        v = np.zeros((L.R, L.n, wp), vals.dtype)
        p = np.zeros((L.R, L.n, wp), np.uint8)
        v[..., :w], p[..., :w] = vals[..., c0:c0 + w], pos[..., c0:c0 + w]
        if L.vdt is dt.i4:
            u = v.astype(np.int8).view(np.uint8)
            vparts.append(((u[..., :wp // 2] & 0xF) | (u[..., wp // 2:] << 4)).astype(np.uint8).tobytes())
        else:
            vparts.append(v.astype({"f32": "<f4", "f16": "<f2", "i8": "i1"}[L.vdt.name]).tobytes())
        f = p.reshape(L.R, L.n, Rw.F, wp // Rw.F).astype(np.uint8)
        pparts.append(sum((f[:, :, i] << (L.pb * i)) for i in range(Rw.F)).astype(np.uint8).tobytes())
    vb = b"".join(vparts)
    return vb + b"\0" * (Rw.pos_off() - len(vb)) + b"".join(pparts)


def emit_nm_rows(k: Kernel, node, L):
    Rw = RowsNM(L)
    x_t, y_t = node.inputs[0].type, node.outputs[0].type
    K, N, m, n = L.K, L.N, L.m, L.n
    rows = math.prod(x_t.shape[:-1])
    if rows * N == 0:
        k.finish()
        return 0, 1
    b = k.b
    X = Access(k, k.args[0], x_t.dtype, 1)
    W = k.args[1]
    Y = Access(k, k.args[-1], y_t.dtype, 1)
    S = Access(k, k.args[2], node.inputs[2].type.dtype, 1) if L.quant else None
    vty = lltype(L.vdt)
    ntiles = cdiv(rows, RT)
    yacc = [Access(k, _stack_array(k, BW, f"yacc{r}"), dt.f32, 1) for r in range(RT)]
    gacc = [Access(k, _stack_array(k, BW, f"gacc{r}"), dt.f32, 1) for r in range(RT)] if L.group else None
    mask = ir.Constant(I8, (1 << L.pb) - 1)

    def value(vbase, c, j, half):
        """Column c (j within its segment's bytes) of a value row, as f32."""
        if L.vdt is dt.i4:
            return b.sitofp(load_q(b, W, b.add(vbase, j), True, half), F32)
        v = b.load(gep(b, gep(b, W, I8, vbase), vty, c), typ=vty)   # vbase: bytes
        return b.sitofp(v, F32) if L.vdt is dt.i8 else b.fpext(v, F32) if L.vdt is dt.f16 else v

    def runs(blk, w, xrows, accs, run0, nruns):
        """accs[r][:w] += the slots of runs run0 .. run0+nruns (an i64, an int) against x rows xrows."""
        wp, vrow, prow = Rw.padded(w), Rw.vrow(w), Rw.prow(w)
        vblk = b.mul(blk, i64(L.R * n * Rw.vrow(BW)))
        pblk = b.add(i64(Rw.pos_off()), b.mul(blk, i64(L.R * n * Rw.prow(BW))))
        h, h2 = wp // Rw.F, wp // 2
        with loop(b, run0, b.add(run0, i64(nruns)), name="run") as run:
            k0 = b.mul(run, i64(m))
            for s in range(n):
                rec = b.add(b.mul(run, i64(n)), i64(s))
                vbase, pbase = b.add(vblk, b.mul(rec, i64(vrow))), b.add(pblk, b.mul(rec, i64(prow)))
                for first, last, f, half in Rw.segments(w):
                    if first >= min(last, w):   # padding columns only
                        continue
                    with loop(b, first, min(last, w), name="c") as c:
                        pbyte = b.load(gep(b, W, I8, b.add(pbase, b.sub(c, i64(f * h)))), typ=I8)
                        p = b.and_(b.lshr(pbyte, ir.Constant(I8, L.pb * f)) if f else pbyte, mask)
                        at = b.add(k0, b.zext(p, I64))
                        v = value(vbase, c, b.sub(c, i64(half * h2)), half)
                        for r, xr in enumerate(xrows):
                            accs[r].store(fma(k, v, X.scalar(b.add(xr, at)), accs[r].scalar(c)), c)

    def tile(blk, w, m0, rt):
        xrows = [b.mul(b.add(m0, i64(r)), i64(K)) for r in range(rt)]
        col0 = b.mul(blk, i64(BW))

        def zero(accs):
            with loop(b, 0, w, name="z") as c:
                for r in range(rt):
                    accs[r].store(fconst(F32, 0.0), c)
        zero(yacc)
        if L.group is None:
            runs(blk, w, xrows, yacc, i64(0), L.R)
        else:   # i4 group-wise: each group's sums scaled into yacc
            gr = L.group // m
            ng = cdiv(K, L.group)

            def one_group(g, nr):
                zero(gacc)
                runs(blk, w, xrows, gacc, b.mul(g, i64(gr)), nr)
                with loop(b, 0, w, name="gs") as c:
                    s = S.scalar(b.add(b.mul(g, i64(N)), b.add(col0, c)))
                    for r in range(rt):
                        yacc[r].store(fma(k, s, gacc[r].scalar(c), yacc[r].scalar(c)), c)
            full = K // L.group
            with loop(b, 0, full, name="grp") as g:
                one_group(g, gr)
            if ng > full:
                one_group(i64(full), L.R - full * gr)
        per_channel = L.quant and L.group is None and K > 0
        for r in range(rt):
            yrow = b.add(b.mul(b.add(m0, i64(r)), i64(N)), col0)
            with loop(b, 0, w, name="st") as c:
                v = yacc[r].scalar(c)
                if per_channel:
                    v = b.fmul(v, S.scalar(b.add(col0, c)))
                Y.store(v, b.add(yrow, c))

    with loop(b, k.begin, k.end, name="item") as item:
        blk, ti = b.udiv(item, i64(ntiles)), b.urem(item, i64(ntiles))
        m0 = b.mul(ti, i64(RT))
        last_chunk(b, ti, ntiles, rows % RT or RT, RT, lambda rt: last_chunk(
            b, blk, Rw.nblk, Rw.last, BW, lambda w: tile(blk, w, m0, rt), lone="plain"))
    k.finish()
    item_bytes = L.R * n * (Rw.vrow(BW) + Rw.prow(BW))
    return Rw.nblk * ntiles, max(1, cdiv(MIN_PARALLEL_BYTES, max(1, item_bytes)))
