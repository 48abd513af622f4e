"""N:M structured-sparse ``matmul`` / ``matmul_q`` (``sparse="nmN:M"``,
ir/sparsity.py): y = x[..., R, K] @ W[K, N] for a constant W in which every
aligned run of M rows k of each column holds at most N nonzeros.  Values are
f32 / f16 (``matmul``, the dtype of x) or i8 / i4 (``matmul_q``: i8 with
per-channel scales, i4 with per-channel or group-wise scales, the group a
multiple of M); f32 accumulation, f16 x widened, y rounded once.

Packed layout (``pack_nm``; the IR keeps the logical values).  Columns are cut
into blocks of NB = CB * VL = 32 (CB = 4 column vectors of VL = 8 columns,
zero-padded past N); run r holds rows [r*M, r*M + M) (the last run is short
when M does not divide K).  Per column and run exactly N slots are kept: the
nonzeros in row order, then padding slots of value 0 at position 0 (always a
row inside K, so no read past x).  One constant holds two sections:

* values: [N/NB][runs][CB][N slots][VL] in the value dtype (f32, f16, i8), so
  one vector load gives the VL columns of a column vector for one slot of one
  run; i4: slots in pairs, [N/NB][runs][CB][ceil(N/2)][VL] bytes, byte
  (pair j, lane l) = (q[2j+1] << 4) | (q[2j] + 8) (a last odd slot: q as a
  byte), so that after vpmovsxbd q[2j+1] = v >> 4 (arithmetic) and
  q[2j] = (v & 15) - 8, exactly, without per-lane shifts;
* positions (at the next multiple of 64 bytes): per [block][run][cv], N
  "planes", plane s holding the position (row within the run) of slot s of
  the VL columns, lane l at bits [pb*l, pb*l + pb), pb = 2 bits for M <= 4
  (a 16-bit plane; 2:4 is one 32-bit word per column vector and run, 1 bit
  per weight) and 4 bits for M <= 16 (a 32-bit plane).

Each work item (a column block, a chunk of up to MCH rows of x) streams one
contiguous range of each section: every item reads the same bytes.  Per run
and row, the run's x values are a small table and each lane selects its own:

* x86 (AVX2): M <= 4: the table x[k0..k0+3] broadcast to both 128-bit halves,
  ``vpermilps`` with the broadcast plane word shifted right per lane (it reads
  the low 2 bits of each lane: no masking); M <= 8: ``vpermps``; M <= 16: two
  ``vpermps`` and a blend on bit 3.
* riscv64 (with or without V): a row layout of its own and scalar loops that
  LLVM vectorizes length-agnostically (codegen/sparse_nm_rows.py).

Per VL stored values (4 * VL dense weights) the 2:4 GEMV loop is one value
load (i8: vpmovsxbd + vcvtdq2ps; i4: half a vpmovsxbd, vpsrad or vpand +
vpsubd, vcvtdq2ps), half a plane broadcast, one vpsrlvd, one vpermilps and
one FMA: per run of a block (128 dense weights) 33 instructions for f32, 48
for i8, 56 for i4; llvm-mca (Zen 3) puts the i8 loop at ~22 cycles per 80
bytes; measured with one thread and the weights in L3, ~15 GB/s (i8) and
~8 GB/s (i4).  So little work per byte keeps few loads in flight: the
integer and f16 loops prefetch PREFETCH_BYTES ahead in software (i8 2:4 from
DRAM, one thread: 10 -> 14 GB/s).  (Hosts without AVX2 take a masked gather
of x[k0 + pos] instead.)

Register tiles: one row of x takes the whole block (4 column vectors x 2
accumulator sets on x86; 2 column vectors per pass on the gather path);
several rows go ROWS_TILE at a
time over one column vector, re-reading segments of SEG_RUNS runs from L1.
Integer values are scaled per column at the end (per channel) or per group
into the f32 row sums on the stack (i4 group-wise).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import IRError, Node
from ..ir.sparsity import NM_COLUMNS, holds, parse_format
from .kernel import (F16, F32, I1, I8, I16, I32, PTR, Kernel, elem_bytes, fconst, fold_loop, gep, i64, last_chunk, loop,
                     splat)
from .lower import emitter, packer
from .matmul import Access, _stack_array, fma
from .matmul_q_rows import uses_rows
from .sparse_nm_rows import emit_nm_rows, pack_nm_rows

VL = 8            # columns per column vector (riscv64 reads another layout: sparse_nm_rows.py)
NB = NM_COLUMNS   # columns per block (work item)
CB = NB // VL     # column vectors per block
MCH = 16          # rows of x per work item at most
ROWS_TILE = 3     # rows of x sharing each weight vector (x86: 2 sets x 3 rows + 3 tables + 4 temporaries)
GATHER_CV = 2     # column vectors per pass of one row on the gather path (hosts without AVX2)
SEG_RUNS = 32     # runs per segment when several row tiles re-read it (from L1)
PREFETCH_BYTES = 2048   # software prefetch distance in the value stream (the positions: as many runs)
PREFETCH_MAX_RUN = 128  # ... for value bytes per run of a block up to this (not f32 2:4: 256)
MIN_PARALLEL_BYTES = 1 << 17   # fewest packed bytes worth waking another thread for

_VEC_BYTES = {"f32": 4 * VL, "f16": 2 * VL, "i8": VL}   # per slot of VL columns (i4: VL per pair of slots)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class NMLayout:
    """Sizes of the packed layout of one matmul / matmul_q node."""

    def __init__(self, node: Node):
        self.fmt = parse_format(node.attrs["sparse"])
        self.n, self.m = self.fmt.n, self.fmt.m
        w = node.inputs[1].type
        self.K, self.N = w.shape
        self.vdt = w.dtype
        self.R = cdiv(self.K, self.m)                 # runs
        self.pb = 2 if self.m <= 4 else 4             # bits per position code
        self.nblk = cdiv(self.N, NB)
        self.val_rec = cdiv(self.n, 2) * VL if self.vdt is dt.i4 else self.n * _VEC_BYTES[self.vdt.name]
        self.pos_rec = self.n * self.pb                      # position bytes per (run, cv)
        self.val_blk = self.R * CB * self.val_rec
        self.pos_blk = self.R * CB * self.pos_rec
        self.pos_off = cdiv(self.nblk * self.val_blk, 64) * 64
        self.nbytes = self.pos_off + self.nblk * self.pos_blk
        self.quant = node.op == "matmul_q"
        group = node.attrs.get("group", self.K) if self.quant else self.K
        # i4 with groups shorter than K: scales per group, folded in per group.
        self.group = group if self.quant and group < self.K else None
        if self.group is not None and self.group % self.m:
            raise IRError(f"{node.op} {node.output.name!r} sparse={self.fmt}: group-wise scales need the group "
                          f"({self.group}) to be a multiple of M={self.m} (a run must not straddle two groups)")


def nm_slots(L: NMLayout, w: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, positions), each [runs, N slots, width] (columns past w's zero): slot s
    of a run holds its s-th nonzero in row order; the rest value 0 at position 0."""
    m, n, R = L.m, L.n, L.R
    wp = np.zeros((R * m, width), w.dtype)
    wp[:L.K, :L.N] = w
    wr = wp.reshape(R, m, width)
    pos = np.zeros((R, n, width), np.uint8)
    vals = np.zeros((R, n, width), w.dtype)
    seen = np.zeros((R, width), np.int8)   # nonzeros met so far in each run
    for i in range(m):
        row = wr[:, i, :]
        nzi = row != 0
        for s in range(n):
            hit = nzi & (seen == s)
            np.copyto(pos[:, s], i, where=hit)
            np.copyto(vals[:, s], row, where=hit)
        seen += nzi
    return vals, pos


@packer("matmul:nm", "matmul_q:nm", inputs=(1,))
def pack_nm(node: Node, index: int, a: np.ndarray, target=None) -> bytes | None:
    """The packed weight (layout in the module docstring); other inputs (x,
    scales) stay plain.  Raises IRError when the weight is not N:M."""
    if index != 1:
        return None
    L = NMLayout(node)
    w = np.asarray(a)
    why = holds(L.fmt, w) if w.size else None   # (nm_counts cannot reshape an [K, 0] weight)
    if why is not None:
        raise IRError(f"{node.op} {node.output.name!r}: {why}")
    if uses_rows(target):
        return pack_nm_rows(L, *nm_slots(L, w, L.N))
    n, R, Np = L.n, L.R, L.nblk * NB
    vals, pos = nm_slots(L, w, Np)

    def blocked(v):  # [R, n, Np] -> [nblk, R, CB, n, VL]
        return v.reshape(R, n, L.nblk, CB, VL).transpose(2, 0, 3, 1, 4)

    lane = np.arange(VL)
    if L.vdt is dt.i4:
        q = blocked(vals).astype(np.int16)                       # [nblk, R, CB, n, VL]
        pairs = [(q[..., 2 * j + 1, :] << 4) | (q[..., 2 * j, :] + 8) if 2 * j + 1 < n else q[..., 2 * j, :]
                 for j in range(cdiv(n, 2))]
        vbytes = np.ascontiguousarray(np.stack(pairs, axis=-2) & 0xFF).astype(np.uint8).tobytes()
    else:
        npd = {"f32": "<f4", "f16": "<f2", "i8": "i1"}[L.vdt.name]
        vbytes = np.ascontiguousarray(blocked(vals)).astype(npd).tobytes()
    planes = (blocked(pos).astype(np.int64) << (L.pb * lane)).sum(axis=-1)   # [nblk, R, CB, n]
    pbytes = planes.astype("<u2" if L.pb == 2 else "<u4").tobytes()
    out = vbytes + b"\0" * (L.pos_off - len(vbytes)) + pbytes
    assert len(out) == L.nbytes
    return out


@emitter("matmul:nm", "matmul_q:nm")
def emit_nm(k: Kernel, node: Node):
    """The tile loop: work item = (column block, chunk of up to MCH rows of x); the last
    chunk and the last block are the short ones (static code per size, ``last_chunk``)."""
    L = NMLayout(node)
    if uses_rows(k.target):
        return emit_nm_rows(k, node, L)
    rows = math.prod(node.inputs[0].type.shape[:-1])  # W is shared: every leading dim folds into rows
    if rows * L.N == 0:
        k.finish()
        return 0, 1
    code = NMCode(k, node, L)
    b = k.b
    mchunks = cdiv(rows, MCH)
    with loop(b, k.begin, k.end, name="item") as item:
        blk = b.udiv(item, i64(mchunks))
        mc = b.urem(item, i64(mchunks))
        m_first = b.mul(mc, i64(MCH))
        last_chunk(b, mc, mchunks, rows % MCH or MCH, MCH, lambda r: last_chunk(
            b, blk, L.nblk, L.N % NB or NB, NB, lambda ncols: code.chunk(blk, m_first, r, ncols)))
    k.finish()
    item_bytes = L.val_blk + L.pos_blk
    return L.nblk * mchunks, max(1, cdiv(MIN_PARALLEL_BYTES, max(1, item_bytes)))


def tiles(r: int):
    """(first row, rows) of the row tiles of r rows, near-equal sizes."""
    t = cdiv(r, ROWS_TILE)
    sizes = [r // t + (i < r % t) for i in range(t)]
    return [(sum(sizes[:i]), s) for i, s in enumerate(sizes)]


class NMCode:
    """The code of one x86 (AVX2 / AVX-512) or gather-path N:M kernel: the per-run
    micro-kernels (x table, lane selects, position planes, value decode, prefetch) and,
    over them, a chunk's tiles: ``chunk`` -> ``group_runs`` -> ``segment`` -> ``run_tile``."""

    def __init__(self, k: Kernel, node: Node, L: NMLayout):
        self.k, self.L, self.b = k, L, k.b
        x_t, y_t = node.inputs[0].type, node.outputs[0].type
        self.xd = xd = x_t.dtype
        self.W = k.args[1]
        self.Y = Access(k, k.args[-1], y_t.dtype, VL)
        self.S = Access(k, k.args[2], node.inputs[2].type.dtype, VL) if L.quant else None
        self.YACC = Access(k, _stack_array(k, MCH * NB, "yacc"), dt.f32, VL)
        self.fvec, self.ivec = fvec, ivec = ir.VectorType(F32, VL), ir.VectorType(I32, VL)
        self.zero = fconst(fvec, 0.0)
        self.wzero = fconst(ir.VectorType(F32, 2 * VL), 0.0)
        self.lo8, self.hi8 = (ir.Constant(ivec, list(range(h, h + VL))) for h in (0, VL))
        self.x86 = x86 = "avx2" in k.target.enabled_features
        self.xll = xll = F16 if xd is dt.f16 else F32
        # AVX-512, M <= 4, N even: slots s, s+1 of a column vector (adjacent in both
        # sections) go as one 16-lane vector, lanes 8..15 holding slot s+1: half the
        # instructions per byte (i8 2:4 GEMV from DRAM, one thread: 6.6 -> 5.9 ms per 80 MiB).
        self.wide = wide = x86 and "avx512f" in k.target.enabled_features and L.m <= 4 and L.n % 2 == 0
        self.wvec, self.wivec = wvec, wivec = ir.VectorType(F32, 2 * VL), ir.VectorType(I32, 2 * VL)
        if x86:
            self.permil = (k.intrinsic("llvm.x86.avx512.vpermilvar.ps.512", wvec, [wvec, wivec]) if wide
                           else k.intrinsic("llvm.x86.avx.vpermilvar.ps.256", fvec, [fvec, ivec]))
            self.permps = k.intrinsic("llvm.x86.avx2.permps", fvec, [fvec, ivec])
        else:
            self.xv = xv = ir.VectorType(xll, VL)
            self.gather = k.intrinsic(f"llvm.masked.gather.v{VL}{'f16' if xd is dt.f16 else 'f32'}.v{VL}p0", xv,
                                      [ir.VectorType(PTR, VL), I32, ir.VectorType(I1, VL), xv])
            self.all_on = ir.Constant(ir.VectorType(I1, VL), [1] * VL)
        self.pmask = ir.Constant(ivec, [(1 << L.pb) - 1] * VL)
        self.shifts = {(pb, off): ir.Constant(ivec, [pb * lane + off for lane in range(VL)])
                       for pb in (2, 4) for off in (0, 16)}
        self.wshift = ir.Constant(wivec, [2 * lane for lane in range(VL)] + [16 + 2 * lane for lane in range(VL)])
        self.wi4 = [ir.Constant(wivec, [a] * VL + [c] * VL) for a, c in ((0, 4), (15, -1), (8, 0))]
        self.prefetch_fn = k.intrinsic("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
        self.ahead = max(2, cdiv(PREFETCH_BYTES, CB * L.val_rec))   # runs
        # Dense decode (few bytes per instruction: f16, i8, i4) keeps too few loads in
        # flight for the hardware prefetcher alone (i8 2:4, one thread: 10 -> 14 GB/s);
        # f32 runs at the read probe's speed without.
        self.use_prefetch = PREFETCH_BYTES > 0 and CB * L.val_rec <= PREFETCH_MAX_RUN

    # --- per-run micro-kernels ------------------------------------------------------

    def xtable(self, xo, valid):
        """Run's x values x[xo : xo + valid] as f32 vectors of VL for the lane
        selects (zeros past ``valid``): [<8 x f32>] (M <= 8) or two (M <= 16)."""
        b, xd, m = self.b, self.xd, self.L.m
        v = b.load(gep(b, self.k.args[0], self.xll, xo), typ=ir.VectorType(self.xll, valid), align=xd.bits // 8)
        if xd is dt.f16:
            v = b.fpext(v, ir.VectorType(F32, valid))
        size = 4 if m <= 4 else 8 if m <= 8 else 16
        pad = ir.Constant(ir.VectorType(F32, valid), [ir.Constant(F32, 0.0)] * valid)
        idx = [i if i < valid else valid for i in range(size)]   # element `valid` is a zero of ``pad``
        if size == 4:
            idx = idx * (4 if self.wide else 2)   # the table in every 128-bit lane
        t = b.shuffle_vector(v, pad, ir.Constant(ir.VectorType(I32, len(idx)), idx))
        if size <= 8:
            return [t]
        return [b.shuffle_vector(t, t, ir.Constant(self.ivec, list(range(h, h + VL)))) for h in (0, VL)]

    def select_x(self, tab, ctrl):
        """Per lane, x[k0 + position]: ``tab`` is xtable() (x86) or the run's x index."""
        b, ivec, m, xd = self.b, self.ivec, self.L.m, self.xd
        if self.x86:
            if m <= 4:
                return b.call(self.permil, [tab[0], ctrl])
            if m <= 8:
                return b.call(self.permps, [tab[0], ctrl])
            lo, hi = b.call(self.permps, [tab[0], ctrl]), b.call(self.permps, [tab[1], ctrl])
            high = b.icmp_unsigned("!=", b.and_(ctrl, ir.Constant(ivec, [8] * VL)), ir.Constant(ivec, [0] * VL))
            return b.select(high, hi, lo)
        # scalar base + small i32 offsets: RVV indexes with 32-bit offsets (vluxei32)
        off = b.shl(b.and_(ctrl, self.pmask), ir.Constant(ivec, [{32: 2, 16: 1}[xd.bits]] * VL))  # bytes
        ptrs = b.gep(gep(b, self.k.args[0], self.xll, tab), [off], inbounds=True, source_etype=I8)
        ptrs.type = ir.VectorType(PTR, VL)  # llvmlite types a vector GEP as a scalar ptr
        v = b.call(self.gather, [ptrs, ir.Constant(I32, xd.bits // 8), self.all_on, ir.Constant(self.xv, None)])
        return b.fpext(v, self.fvec) if xd is dt.f16 else v

    def position_ctrl(self, prec, s, words):
        """<8 x i32> whose low bits are slot s's positions (lane l: column l);
        wide: <16 x i32> of slots s, s + 1 (s even; their planes are one word)."""
        b, L, W = self.b, self.L, self.W
        if self.wide:
            wd = b.load(gep(b, W, I8, b.add(prec, i64(2 * s))), typ=I32, align=4)
            return b.lshr(splat(b, wd, 2 * VL), self.wshift)
        if L.pb == 4:
            off, key, ty = 4 * s, s, I32
        elif s % 2 or s + 1 < L.n:
            off, key, ty = 4 * (s // 2), s // 2, I32
        else:  # the last plane of an odd N: 16 bits
            off, key, ty = 2 * s, s // 2, I16
        if key not in words:
            wd = b.load(gep(b, W, I8, b.add(prec, i64(off))), typ=ty, align=4 if L.pos_rec % 4 == 0 else 2)
            words[key] = splat(b, wd if ty is I32 else b.zext(wd, I32), VL)
        return b.lshr(words[key], self.shifts[(L.pb, 16 * (s % 2) if L.pb == 2 else 0)])

    def value(self, vrec, s, pairs):
        """Slot s of VL columns as f32 (integers exactly: |q| <= 128); ``pairs``
        caches the i4 bytes of a pair of slots, sign-extended.  Wide: slots s, s + 1."""
        b, W, ivec, fvec, name = self.b, self.W, self.ivec, self.fvec, self.L.vdt.name
        if self.wide:
            wvec, wivec, wi4 = self.wvec, self.wivec, self.wi4
            if name == "i4":   # lanes 0..7: (v & 15) - 8, lanes 8..15: v >> 4
                v = b.sext(b.load(gep(b, W, I8, b.add(vrec, i64(s // 2 * VL))), typ=ir.VectorType(I8, VL),
                                  align=1), ivec)
                v = b.shuffle_vector(v, v, ir.Constant(wivec, list(range(VL)) * 2))
                return b.sitofp(b.sub(b.and_(b.ashr(v, wi4[0]), wi4[1]), wi4[2]), wvec)
            p = gep(b, W, I8, b.add(vrec, i64(s * _VEC_BYTES[name])))
            ty = {"f32": F32, "f16": F16, "i8": I8}[name]
            v = b.load(p, typ=ir.VectorType(ty, 2 * VL), align=elem_bytes(ty))
            return v if name == "f32" else b.fpext(v, wvec) if name == "f16" else b.sitofp(b.sext(v, wivec), wvec)
        if name == "i4":
            j = s // 2
            if j not in pairs:
                p = gep(b, W, I8, b.add(vrec, i64(j * VL)))
                pairs[j] = b.sext(b.load(p, typ=ir.VectorType(I8, VL), align=1), ivec)
            v = pairs[j]
            if s % 2:
                v = b.ashr(v, ir.Constant(ivec, [4] * VL))
            elif s + 1 < self.L.n:
                v = b.sub(b.and_(v, ir.Constant(ivec, [15] * VL)), ir.Constant(ivec, [8] * VL))
            return b.sitofp(v, fvec)
        p = gep(b, W, I8, b.add(vrec, i64(s * _VEC_BYTES[name])))
        if name == "f32":
            return b.load(p, typ=fvec, align=4)
        if name == "f16":
            return b.fpext(b.load(p, typ=ir.VectorType(F16, VL), align=2), fvec)
        if name == "i8":
            return b.sitofp(b.sext(b.load(p, typ=ir.VectorType(I8, VL), align=1), ivec), fvec)
        raise AssertionError(name)

    def prefetch(self, vblk, pblk, run):
        """Software prefetch ``ahead`` runs ahead in both streams, one per 64-byte line
        of a run's values and one for its positions (repeats of a line are cheap)."""
        b, L = self.b, self.L
        for base, per in ((vblk, CB * L.val_rec), (pblk, CB * L.pos_rec)):
            for off in range(0, per, 64) if per >= 64 else (0,):
                p = gep(b, self.W, I8, b.add(base, b.add(b.mul(run, i64(per)), i64(self.ahead * per + off))))
                b.call(self.prefetch_fn, [p, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])

    # --- the tiles of a chunk: register tiles over a segment of runs, into yacc -----

    def run_tile(self, ctx, t0, tr, cvs, sets, valid):
        """The loop step over one run for rows [t0, t0 + tr) of the chunk and column
        vectors ``cvs``: ``sets`` accumulator sets of tr * len(cvs) vectors each."""
        b, L = self.b, self.L
        vblk, pblk, xrow = ctx[0], ctx[1], ctx[2]
        nacc = tr * len(cvs)
        slots = range(0, L.n, 2) if self.wide else range(L.n)   # wide: a pair of slots per vector

        def step(run, accs):
            out = list(accs)
            if self.use_prefetch and t0 == 0 and cvs[0] == 0:   # the pass first touching the run
                self.prefetch(vblk, pblk, run)
            k0 = b.mul(run, i64(L.m))
            xo = [b.add(xrow[t0 + t], k0) for t in range(tr)]
            tabs = [self.xtable(o, valid) for o in xo] if self.x86 else xo
            for ci, cv in enumerate(cvs):
                rc = b.add(b.mul(run, i64(CB)), i64(cv))
                vrec = b.add(vblk, b.mul(rc, i64(L.val_rec)))
                prec = b.add(pblk, b.mul(rc, i64(L.pos_rec)))
                words, pairs = {}, {}
                for si, s in enumerate(slots):
                    v = self.value(vrec, s, pairs)
                    c = self.position_ctrl(prec, s, words)
                    for t in range(tr):
                        i = (si % sets) * nacc + ci * tr + t
                        out[i] = fma(self.k, self.select_x(tabs[t], c), v, out[i])
            return out
        return step

    def segment(self, ctx, run0, nruns, valid, gscale):
        """Runs [run0, run0 + nruns) (``valid`` rows of x in each: m, or the
        short last run's) of the block into yacc; ``gscale`` (a group index) scales them."""
        b, L, YACC = self.b, self.L, self.YACC
        vblk, pblk, xrow, r, ncv, col0, ncols = ctx
        for t0, tr in tiles(r):
            per = (ncv if self.x86 else GATHER_CV) if tr == 1 else 1   # column vectors per pass
            passes = [list(range(c, min(ncv, c + per))) for c in range(0, ncv, per)]
            for cvs in passes:
                nacc = tr * len(cvs)
                # accumulator sets so that FMA latency never waits (x86: 16 registers hold 8);
                # the gather path keeps one (RVV at VLEN 128 takes two registers per vector)
                # (i4: one, its decode constants take the registers; an FMA chain gets one FMA per
                # ~9 cycles of decode anyway)
                nslots = len(range(0, L.n, 2) if self.wide else range(L.n))
                sets = max(1, min(nslots, 8 // nacc)) if self.x86 and (self.wide or L.vdt is not dt.i4) else 1
                accs = fold_loop(b, run0, b.add(run0, i64(nruns)), [self.wzero if self.wide else self.zero] *
                                 (nacc * sets), self.run_tile(ctx, t0, tr, cvs, sets, valid), name="run")
                if self.wide:   # lanes 8..15 hold the same columns as 0..7
                    accs = [b.fadd(b.shuffle_vector(a, a, self.lo8), b.shuffle_vector(a, a, self.hi8)) for a in accs]
                accs = [functools.reduce(b.fadd, accs[i::nacc]) for i in range(nacc)]
                for ci, cv in enumerate(cvs):
                    sc = None
                    if gscale is not None:
                        sc = self.S.load(b.add(b.mul(gscale, i64(L.N)), b.add(col0, i64(cv * VL))),
                                         min(VL, ncols - cv * VL))
                    for t in range(tr):
                        pos = i64((t0 + t) * NB + cv * VL)
                        a = accs[ci * tr + t]
                        YACC.store(b.fadd(YACC.load(pos), a) if sc is None else fma(self.k, sc, a, YACC.load(pos)),
                                   pos)

    def group_runs(self, ctx, gidx, run0, gr, short, r):
        """A group's gr runs from run0 (the last one short when ``short``)."""
        b, m = self.b, self.L.m
        full = gr - int(short)
        if full:
            seg = full if r == 1 and (self.x86 or ctx[4] <= GATHER_CV) else SEG_RUNS   # one pass: no re-reads
            nseg, rem = divmod(full, seg)
            if nseg == 1:
                self.segment(ctx, run0, seg, m, gidx)
            elif nseg:
                with loop(b, 0, nseg, name="seg") as si:
                    self.segment(ctx, b.add(run0, b.mul(si, i64(seg))), seg, m, gidx)
            if rem:
                self.segment(ctx, b.add(run0, i64(nseg * seg)), rem, m, gidx)
        if short:
            self.segment(ctx, b.add(run0, i64(full)), 1, self.L.K % m, gidx)

    def chunk(self, blk, m_first, r, ncols):
        """Rows [m_first, m_first + r) of x against column block blk (ncols valid columns):
        the row prologue (yacc zeroed, row offsets), the groups of runs, the epilogue
        (per-channel scales, the rows stored)."""
        b, L, YACC = self.b, self.L, self.YACC
        K, N, m = L.K, L.N, L.m
        ncv = cdiv(ncols, VL)
        for c in range(0, r * NB, VL):
            YACC.store(self.zero, i64(c))
        col0 = b.mul(blk, i64(NB))
        ctx = (b.mul(blk, i64(L.val_blk)), b.add(i64(L.pos_off), b.mul(blk, i64(L.pos_blk))),
               [b.mul(b.add(m_first, i64(i)), i64(K)) for i in range(r)], r, ncv, col0, ncols)
        if L.group is None:
            self.group_runs(ctx, None, i64(0), L.R, K % m != 0, r)
        else:
            gr = L.group // m
            full = K // L.group
            with loop(b, 0, full, name="grp") as g:
                self.group_runs(ctx, g, b.mul(g, i64(gr)), gr, False, r)
            if K % L.group:
                self.group_runs(ctx, i64(full), i64(full * gr), cdiv(K % L.group, m), K % m != 0, r)
        per_channel = L.quant and L.group is None and K > 0   # K = 0: no scales (zero groups)
        for i in range(r):
            yrow = b.add(b.mul(b.add(m_first, i64(i)), i64(N)), col0)
            for cv in range(ncv):
                valid = min(VL, ncols - cv * VL)
                v = YACC.load(i64(i * NB + cv * VL))
                if per_channel:
                    v = b.fmul(v, self.S.load(b.add(col0, i64(cv * VL)), valid))
                self.Y.store(v, b.add(yrow, i64(cv * VL)), valid)
