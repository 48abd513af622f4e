"""Kernels of LLM decoding: rope, swiglu, topk, attention_decode, attention_merge, moe.

Decode-time shapes are small along the batch (one token) and long along the
feature dims, so each kernel's work item is a token row (rope, topk, moe) or
a KV head (attention_decode; split along the sequence, a KV head x part of
its rows; with a prefill chunk of T tokens, a KV head x query row), and the
inner loops over D / F / H are written
as vector blocks (``reduce.blocks``) or left for LLVM to vectorize.
Scratch (scores, accumulators) lives in fixed-size stack arrays sized from
the static shapes.

attention_decode writes the new rows through the *output* cache pointers and
reads the older rows through the *input* ones: when the memory planner
aliased them (a state input updated in place) the pointers are equal and
nothing is copied; otherwise one work item per head copies the head's other
rows across, which no other item reads.  The cache pointer arguments (codes
and, for an int8 cache, scales) are therefore not ``noalias``.

moe reads only the weights of the experts its router picks: the expert ids
are run-time values that index the weight pointers (conditional execution,
not compute-and-mask).  One work item per token row: at batch 1 it runs on
one thread.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.ops import rope_inv_freq
from ..runtime.abi import ERR_INDEX as SQK_ERR_INDEX
from .elementwise import MIN_PARALLEL_WORK, _elementwise, f_exp, f_sigmoid
from .kernel import (F32, I1, I8, I32, I64, PTR, Kernel, call_intrinsic, fconst, fold_loop, gep, hsum, i64, load_elem,
                     load_vec, lltype, loop, narrow, splat, store_elem, store_vec, widen)
from .lower import emitter
from .reduce import blocks, entry_alloca, get, groups_at


def stack_array(k: Kernel, ty, n: int):
    """A pointer to ``n`` elements of ``ty`` on the stack (entry block)."""
    return entry_alloca(k, ir.ArrayType(ty, max(1, n)))


def load_index(b, ptr, d: dt.DType, index):
    """An i64 from an i64 or i32 buffer."""
    v = b.load(gep(b, ptr, lltype(d), index), typ=lltype(d))
    return v if d is dt.i64 else b.sext(v, I64)


def _sv(b, v, w):
    return splat(b, v, w) if w > 1 else v


def axpy(k: Kernel, n: int, acc, coef, src, d: dt.DType, src_base, convert=None):
    """acc[0:n] (f32 stack array) += coef * src[src_base : src_base + n] (dtype d),
    each loaded element passed through ``convert(value, width)`` when given."""
    b = k.b

    def body(j, w, c):
        cv = _sv(b, coef, w)
        for jj in groups_at(b, j, w, c):
            a = load_vec(b, acc, F32, jj, w) if w > 1 else b.load(gep(b, acc, F32, jj), typ=F32)
            x = load_elem(b, src, d, b.add(src_base, jj), w)
            v = b.fadd(a, b.fmul(cv, convert(x, w) if convert else x))
            store_vec(b, v, acc, F32, jj) if w > 1 else b.store(v, gep(b, acc, F32, jj))

    blocks(k, 0, n, k.target.lanes(32), body)


def fill(k: Kernel, n: int, arr, value: float):
    b = k.b
    zero = fconst(F32, value)

    def body(j, w, c):
        for jj in groups_at(b, j, w, c):
            store_vec(b, splat(b, zero, w), arr, F32, jj) if w > 1 else b.store(zero, gep(b, arr, F32, jj))

    blocks(k, 0, n, k.target.lanes(32), body)


def memcpy(k: Kernel, dst, dst_off, src, src_off, nbytes):
    """Copy nbytes between byte offsets (i64 values or ints) of two buffers."""
    fn = k.intrinsic("llvm.memcpy.p0.p0.i64", ir.VoidType(), [PTR, PTR, I64, I1])
    b = k.b
    off = lambda v: i64(v) if isinstance(v, int) else v  # noqa: E731
    b.call(fn, [b.gep(dst, [off(dst_off)], inbounds=True, source_etype=I8),
                b.gep(src, [off(src_off)], inbounds=True, source_etype=I8), off(nbytes), ir.Constant(I1, 0)])


# --- rope ----------------------------------------------------------------------------------

@emitter("rope")
def emit_rope(k: Kernel, n):
    """One work item per (leading index, token): its cos/sin row (D/2 libm
    calls) is computed once and applied to every head.  The frequencies are a
    constant global, or the optional inv_freq input when the node has one."""
    x, pos = n.inputs[0].type, n.inputs[1].type
    d = x.dtype
    dd = x.shape[-1]
    if x.rank == 2:
        lead, t, heads = 1, x.shape[0], 1
    else:
        lead, t, heads = math.prod(x.shape[:-3]), x.shape[-3], x.shape[-2]
    half = dd // 2
    if x.size == 0:
        k.finish()
        return 0, 1
    b = k.b
    src, pp, dst = k.args[0], k.args[1], k.args[-1]
    per_token = pos.shape == (t,) and t != 1
    if len(n.inputs) > 2:
        inv = k.args[2]
    else:
        inv = ir.GlobalVariable(k.module, ir.ArrayType(F32, max(1, half)), k.name + ".inv_freq")
        inv.global_constant, inv.linkage = True, "private"
        inv.initializer = ir.Constant(ir.ArrayType(F32, max(1, half)),
                                      [float(v) for v in rope_inv_freq(dd, n.attrs["theta"])] or [0.0])
    interleaved = n.attrs["style"] == "interleaved"
    cs, sn = stack_array(k, F32, half), stack_array(k, F32, half)
    with loop(b, k.begin, k.end, name="item") as item:
        tok = b.urem(item, i64(t)) if lead > 1 else item
        p = load_index(b, pp, pos.dtype, tok) if per_token else b.add(load_index(b, pp, pos.dtype, i64(0)), tok)
        pf = b.sitofp(p, F32)
        with loop(b, 0, half, name="i") as i:
            ang = b.fmul(pf, b.load(gep(b, inv, F32, i), typ=F32))
            b.store(call_intrinsic(k, "cos", ang), gep(b, cs, F32, i))
            b.store(call_intrinsic(k, "sin", ang), gep(b, sn, F32, i))
        with loop(b, 0, heads, name="h") as h:
            row = b.mul(b.add(b.mul(item, i64(heads)), h), i64(dd))
            with loop(b, 0, half, name="j") as j:
                c, s = b.load(gep(b, cs, F32, j), typ=F32), b.load(gep(b, sn, F32, j), typ=F32)
                if interleaved:
                    j1 = b.add(row, b.mul(j, i64(2)))
                    j2 = b.add(j1, i64(1))
                else:
                    j1 = b.add(row, j)
                    j2 = b.add(j1, i64(half))
                x1, x2 = load_elem(b, src, d, j1), load_elem(b, src, d, j2)
                store_elem(b, b.fsub(b.fmul(x1, c), b.fmul(x2, s)), dst, d, j1)
                store_elem(b, b.fadd(b.fmul(x2, c), b.fmul(x1, s)), dst, d, j2)
    k.finish()
    return lead * t, max(1, MIN_PARALLEL_WORK // max(1, heads * dd + 8 * half))


# --- swiglu ---------------------------------------------------------------------------------

def _swiglu(k, vals, n):
    g, u = vals
    return k.b.fmul(k.b.fmul(g, f_sigmoid(k, g, n)), u)


@emitter("swiglu")
def emit_swiglu(k: Kernel, n):
    return _elementwise(k, n, _swiglu)


# --- topk -----------------------------------------------------------------------------------

def better(b, a, c):
    """a ranks before c (both f32; c holds the earlier index): a > c, or a NaN and c not."""
    a_nan = b.fcmp_unordered("uno", a, a)
    c_nan = b.fcmp_unordered("uno", c, c)
    return b.or_(b.fcmp_ordered(">", a, c), b.and_(a_nan, b.not_(c_nan)))


def topk_row(k: Kernel, n: int, kk: int, value_at, vals, idxs):
    """Insert the n values ``value_at(j)`` (f32, j an i64) into the kk-long
    sorted lists ``vals``/``idxs`` (objects with get(p)/set(p, v)), scanning
    j in order so an equal value never passes an earlier one."""
    b = k.b
    if kk == 0 or n == 0:
        return
    with loop(b, 0, n, name="tk") as j:
        v = value_at(j)
        room = b.icmp_signed("<", j, i64(kk))
        # select, not or: while the list is filling, its last slot is uninitialized (undef on the stack)
        take = b.select(room, ir.Constant(I1, 1), better(b, v, vals.get(i64(kk - 1))))
        with b.if_then(take):
            start = b.select(room, j, i64(kk - 1))
            pre = b.block
            head, body, done = (b.append_basic_block(s) for s in ("ins.head", "ins.body", "ins.done"))
            b.branch(head)
            b.position_at_end(head)
            p = b.phi(I64)
            p.add_incoming(start, pre)
            pos = b.icmp_signed(">", p, i64(0))
            prev = b.select(pos, b.sub(p, i64(1)), i64(0))  # never reads index -1
            b.cbranch(b.and_(pos, better(b, v, vals.get(prev))), body, done)
            b.position_at_end(body)
            vals.set(p, vals.get(prev))
            idxs.set(p, idxs.get(prev))
            p.add_incoming(prev, b.block)
            b.branch(head)
            b.position_at_end(done)
            vals.set(p, v)
            idxs.set(p, j)


class Slots:
    """get/set of elements base + p of a buffer of dtype d (f32 compute values)."""

    def __init__(self, b, ptr, d: dt.DType, base=None):
        self.b, self.ptr, self.d, self.base = b, ptr, d, base

    def _at(self, p):
        return p if self.base is None else self.b.add(self.base, p)

    def get(self, p):
        if self.d is dt.i64:
            return self.b.load(gep(self.b, self.ptr, I64, self._at(p)), typ=I64)
        return load_elem(self.b, self.ptr, self.d, self._at(p))

    def set(self, p, v):
        if self.d is dt.i64:
            self.b.store(v, gep(self.b, self.ptr, I64, self._at(p)))
        else:
            store_elem(self.b, v, self.ptr, self.d, self._at(p))


@emitter("topk")
def emit_topk(k: Kernel, n):
    """One row per work item, insertion into the output row (kept sorted):
    O(n + k * insertions) per row."""
    x = n.inputs[0].type
    kk = n.attrs["k"]
    size = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if rows * kk == 0:
        k.finish()
        return 0, 1
    b = k.b
    src, vout, iout = k.args
    with loop(b, k.begin, k.end, name="row") as row:
        xb, ob = b.mul(row, i64(size)), b.mul(row, i64(kk))
        topk_row(k, size, kk, lambda j: load_elem(b, src, x.dtype, b.add(xb, j)),
                 Slots(b, vout, x.dtype, ob), Slots(b, iout, dt.i64, ob))
    k.finish()
    return rows, max(1, MIN_PARALLEL_WORK // max(1, size))


# --- attention_decode ----------------------------------------------------------------------------

BLOCK = 32   # K/V rows per block of the online softmax: one max and one rescale per block, not per row


def chunks_of(n: int, lanes: int) -> list[tuple[int, int]]:
    """(offset, width) pieces covering [0, n): vectors of ``lanes``, then scalars."""
    full = n // lanes * lanes if lanes > 1 else 0
    return [(o, lanes) for o in range(0, full, lanes)] + [(o, 1) for o in range(full, n)]


class Rows:
    """Where a run of K/V rows lives: pointers ``kp``/``vp`` of dtype ``src``,
    ``base(t)`` the element offset of row t; for int8 codes the f32 scale
    arrays ``ks``/``vs`` indexed by ``sidx(t)``; ``rounded``: f32/f16 rows not
    in the cache yet, rounded to its float dtype as stored there."""

    def __init__(self, kp, vp, src: dt.DType, base, ks=None, vs=None, sidx=None, rounded=None):
        self.kp, self.vp, self.src, self.base = kp, vp, src, base
        self.ks, self.vs, self.sidx, self.rounded = ks, vs, sidx, rounded

    def load(self, b, ptr, idx, w):
        """w elements at idx as f32 (a scalar when w = 1)."""
        if self.src is dt.i8:
            v = b.load(gep(b, ptr, I8, idx), typ=I8) if w == 1 else load_vec(b, ptr, I8, idx, w)
            return b.sitofp(v, F32 if w == 1 else ir.VectorType(F32, w))
        v = load_elem(b, ptr, self.src, idx, w)
        return widen(b, narrow(b, v, self.rounded, w), self.rounded, w) if self.rounded else v

    def scale(self, b, which, t):
        arr = self.ks if which == "k" else self.vs
        return None if arr is None else b.load(gep(b, arr, F32, self.sidx(t)), typ=F32)


class Attention:
    """What the attention_decode kernels share: shapes, dtypes, and one work
    item's online softmax over the Hq/Hkv query heads of a KV head (its
    scratch on the stack: the queries in f32, a block of scores, the running
    max m, sum l and accumulator acc[D] per head).  ``fold`` takes K/V rows a
    block of BLOCK at a time: the block's scores (each K row read once per
    head from L1), one max and rescale per head, exp, then acc += p * v with
    acc in registers; the D loop is unrolled in vectors of the target's
    width."""

    def __init__(self, k: Kernel, n):
        q, kc = n.inputs[0].type, n.inputs[3].type
        self.k, self.b = k, k.b
        self.d, self.dc = q.dtype, kc.dtype                   # activations, caches
        self.quant = self.dc is dt.i8
        self.hkv, self.s, self.dd = kc.shape
        self.hq = q.shape[-2]
        self.grp = self.hq // self.hkv
        self.lanes = k.target.lanes(32)
        self.pieces = chunks_of(self.dd, self.lanes)
        self.scale = float(np.float32(1.0 / math.sqrt(self.dd)))
        self.qs = stack_array(k, F32, self.grp * self.dd)
        self.acc = stack_array(k, F32, self.grp * self.dd)
        self.sc = stack_array(k, F32, self.grp * BLOCK)
        self.mx, self.tot = stack_array(k, F32, self.grp), stack_array(k, F32, self.grp)

    def f32_at(self, arr, i):
        return gep(self.b, arr, F32, i)

    def vload(self, arr, idx, w):
        b = self.b
        return b.load(self.f32_at(arr, idx), typ=F32) if w == 1 else load_vec(b, arr, F32, idx, w)

    def vstore(self, v, arr, idx, w):
        b = self.b
        b.store(v, self.f32_at(arr, idx)) if w == 1 else store_vec(b, v, arr, F32, idx)

    def start(self, qp, q_base):
        """Empty the softmax state; the group's queries (``q_base(g)``: offset of
        head g's query in qp) copied to f32."""
        b, dd = self.b, self.dd
        fill(self.k, self.grp, self.mx, float("-inf"))
        fill(self.k, self.grp, self.tot, 0.0)
        fill(self.k, self.grp * dd, self.acc, 0.0)
        with loop(b, 0, self.grp, name="g") as gi:
            qb, ob = q_base(gi), b.mul(gi, i64(dd))
            for off, w in self.pieces:
                self.vstore(load_elem(b, qp, self.d, b.add(qb, i64(off)), w), self.qs, b.add(ob, i64(off)), w)

    def fold(self, t0, t1, rows: Rows):
        """Fold rows t0..t1-1 (i64 values) of ``rows`` into the softmax."""
        k, b, dd, grp = self.k, self.b, self.dd, self.grp
        fma = lambda x, y, z: call_intrinsic(k, "fmuladd", x, y, z)  # noqa: E731
        with loop(b, t0, t1, BLOCK, name="blk") as t_blk:
            rest = b.sub(t1, t_blk)
            nb = b.select(b.icmp_signed("<", rest, i64(BLOCK)), rest, i64(BLOCK))
            # scores s[g, j] = (q_g . k_t) (* k_scale_t) / sqrt(D)
            with loop(b, 0, grp, name="g") as gi:
                qv = [self.vload(self.qs, b.add(b.mul(gi, i64(dd)), i64(off)), w) for off, w in self.pieces]
                with loop(b, 0, nb, name="j") as j:
                    t = b.add(t_blk, j)
                    rb = rows.base(t)
                    chains = [None] * 4      # vector chains (two: FMA latency), scalar chains
                    for c, ((off, w), qq) in enumerate(zip(self.pieces, qv)):
                        kv = rows.load(b, rows.kp, b.add(rb, i64(off)), w)
                        u = (c & 1) + (2 if w == 1 else 0)
                        chains[u] = b.fmul(qq, kv) if chains[u] is None else fma(qq, kv, chains[u])
                    vec = [v for v in chains[:2] if v is not None]
                    parts = [hsum(k, vec[0] if len(vec) == 1 else b.fadd(*vec))] if vec else []
                    parts += [v for v in chains[2:] if v is not None]
                    dot = parts[0] if len(parts) == 1 else b.fadd(parts[0], parts[1])
                    for extra in parts[2:]:
                        dot = b.fadd(dot, extra)
                    ks = rows.scale(b, "k", t)
                    if ks is not None:
                        dot = b.fmul(dot, ks)
                    b.store(b.fmul(dot, fconst(F32, self.scale)), self.f32_at(self.sc, b.add(b.mul(gi, i64(BLOCK)), j)))
            # per head: the block's max, one rescale, p = exp(s - m)
            with loop(b, 0, grp, name="g") as gi:
                sb = b.mul(gi, i64(BLOCK))
                m_old = b.load(self.f32_at(self.mx, gi), typ=F32)
                m_new = self.block_max(sb, nb, m_old)
                with b.if_then(b.fcmp_ordered(">", m_new, m_old)):   # a new max: rescale what is summed so far
                    r = f_exp(k, b.fsub(m_old, m_new), 1)
                    scale_array(k, dd, self.f32_at(self.acc, b.mul(gi, i64(dd))), r)
                    b.store(b.fmul(b.load(self.f32_at(self.tot, gi), typ=F32), r), self.f32_at(self.tot, gi))
                    b.store(m_new, self.f32_at(self.mx, gi))
                tot = self.block_exp(sb, nb, b.load(self.f32_at(self.mx, gi), typ=F32))
                b.store(b.fadd(b.load(self.f32_at(self.tot, gi), typ=F32), tot), self.f32_at(self.tot, gi))
            # acc_g += p_t * v_t, acc_g in registers across the block
            with loop(b, 0, grp, name="g") as gi:
                ab, sb = b.mul(gi, i64(dd)), b.mul(gi, i64(BLOCK))
                acc0 = [self.vload(self.acc, b.add(ab, i64(off)), w) for off, w in self.pieces]

                def axpy_row(j, accs):
                    pv = b.load(self.f32_at(self.sc, b.add(sb, j)), typ=F32)
                    t = b.add(t_blk, j)
                    vs = rows.scale(b, "v", t)
                    pv = pv if vs is None else b.fmul(pv, vs)
                    rb = rows.base(t)
                    return [fma(_sv(b, pv, w), rows.load(b, rows.vp, b.add(rb, i64(off)), w), a)
                            for (off, w), a in zip(self.pieces, accs)]

                accs = fold_loop(b, 0, nb, acc0, axpy_row, name="av")
                for (off, w), a in zip(self.pieces, accs):
                    self.vstore(a, self.acc, b.add(ab, i64(off)), w)

    def _lanes_in(self, nb, c, w):
        """(index vector c*w + 0..w-1 < nb) of a w-wide piece of the block."""
        b = self.b
        idx = ir.Constant(ir.VectorType(I64, w), [c * w + u for u in range(w)])
        return b.icmp_signed("<", idx, splat(b, nb, w))

    def block_max(self, sb, nb, m0):
        """max(m0, sc[sb + j] for j < nb), NaN scores skipped (vectors over the whole block, masked)."""
        b, w = self.b, self.lanes
        gt = lambda x, y: b.select(b.fcmp_ordered(">", x, y), x, y)  # noqa: E731
        if w == 1 or BLOCK % w:
            return fold_loop(b, 0, nb, [m0], lambda j, a: [gt(b.load(self.f32_at(self.sc, b.add(sb, j)), typ=F32),
                                                                  a[0])], name="mx")[0]
        ninf = splat(b, fconst(F32, float("-inf")), w)
        acc = ninf
        for c in range(BLOCK // w):
            v = load_vec(b, self.sc, F32, b.add(sb, i64(c * w)), w)
            acc = gt(b.select(self._lanes_in(nb, c, w), v, ninf), acc)
        m = m0
        for u in range(w):
            m = gt(b.extract_element(acc, i64(u)), m)
        return m

    def block_exp(self, sb, nb, m):
        """sc[sb + j] = exp(sc[sb + j] - m) for j < nb; returns their sum.  An
        exp below 2^-126 is flushed to 0: subnormal weights would slow every
        multiply-add of the V rows (x86 assists), and add < 1e-38 of the sum."""
        k, b, w = self.k, self.b, self.lanes

        def ex(x, n):
            return b.select(b.fcmp_ordered("<", x, _sv(b, fconst(F32, -87.0), n)), _sv(b, fconst(F32, 0.0), n),
                            f_exp(k, x, n))

        if w == 1 or BLOCK % w:
            def one(j, a):
                at = self.f32_at(self.sc, b.add(sb, j))
                e = ex(b.fsub(b.load(at, typ=F32), m), 1)
                b.store(e, at)
                return [b.fadd(a[0], e)]
            return fold_loop(b, 0, nb, [fconst(F32, 0.0)], one, name="ex")[0]
        zero, mv = splat(b, fconst(F32, 0.0), w), splat(b, m, w)
        acc = zero
        for c in range(BLOCK // w):
            at = b.add(sb, i64(c * w))
            e = b.select(self._lanes_in(nb, c, w), ex(b.fsub(load_vec(b, self.sc, F32, at, w), mv), w), zero)
            store_vec(b, e, self.sc, F32, at)
            acc = b.fadd(acc, e)
        return hsum(k, acc)

    def finish(self, outp, out_base):
        """out[out_base(g) : +D] = acc_g / sum_g for the group's heads."""
        b, dd = self.b, self.dd
        with loop(b, 0, self.grp, name="g") as gi:
            inv = b.fdiv(fconst(F32, 1.0), b.load(self.f32_at(self.tot, gi), typ=F32))
            ob = out_base(gi)
            with loop(b, 0, dd, name="j") as j:
                v = b.load(self.f32_at(self.acc, b.add(b.mul(gi, i64(dd)), j)), typ=F32)
                store_elem(b, b.fmul(v, inv), outp, self.d, b.add(ob, j))

    def partial(self, outp, out_base):
        """out[out_base(g) : +D+2] = (m_g, l_g, acc_g) (attention_decode {splits})."""
        b, dd = self.b, self.dd
        with loop(b, 0, self.grp, name="g") as gi:
            ob = out_base(gi)
            b.store(b.load(self.f32_at(self.mx, gi), typ=F32), self.f32_at(outp, ob))
            b.store(b.load(self.f32_at(self.tot, gi), typ=F32), self.f32_at(outp, b.add(ob, i64(1))))
            memcpy(self.k, outp, b.mul(b.add(ob, i64(2)), i64(4)), self.acc, b.mul(gi, i64(dd * 4)), i64(dd * 4))

    def store_row(self, dst, dst_at, src, src_at, scales=None, scale_at=None):
        """Write a new K/V row (element offsets ``src_at`` in src, of dtype d, and
        ``dst_at`` in the cache dst): rounded to a float cache's dtype, or
        quantized for an int8 cache (``quantize_row``, its scale at
        scales[scale_at])."""
        b, dd = self.b, self.dd
        if self.quant:
            quantize_row(self.k, dd, src, self.d, src_at, dst, dst_at, scales, scale_at)
        elif self.dc is self.d:
            es = self.d.bits // 8
            memcpy(self.k, dst, b.mul(dst_at, i64(es)), src, b.mul(src_at, i64(es)), dd * es)
        else:
            with loop(b, 0, dd, name="j") as j:
                store_elem(b, load_elem(b, src, self.d, b.add(src_at, j)), dst, self.dc, b.add(dst_at, j))


def quantize_row(k: Kernel, n: int, src, sd: dt.DType, src_at, dst, dst_at, scales, scale_at):
    """dst[dst_at : +n] (i8 codes), scales[scale_at] = ``ir.ops.kv_quantize`` of
    src[src_at : +n] (dtype sd): d = max|x| / 127 (NaN when a value is not
    finite), codes roundeven(x / d) clamped to [-127, 127], 0 unless d > 0."""
    b = k.b
    zero = fconst(F32, 0.0)

    def scan(j, acc):
        x = load_elem(b, src, sd, b.add(src_at, j))
        ax = call_intrinsic(k, "fabs", x)
        return [b.select(b.fcmp_ordered(">", ax, acc[0]), ax, acc[0]), b.fadd(acc[1], b.fmul(x, zero))]

    amax, z = fold_loop(b, 0, n, [zero, zero], scan, name="amax")   # z: NaN iff some x is NaN or +-inf
    d = b.fdiv(amax, fconst(F32, 127.0))
    d = b.select(b.fcmp_unordered("uno", z, z), fconst(F32, float("nan")), d)
    b.store(d, gep(b, scales, F32, scale_at))
    ok = b.fcmp_ordered(">", d, zero)
    with loop(b, 0, n, name="qj") as j:
        v = b.fdiv(load_elem(b, src, sd, b.add(src_at, j)), d)
        # clamped before rounding (the same, the bounds being integers): fptosi(roundeven) is then one
        # round-to-nearest conversion on RVV, not a vfcvt.rtz (which qemu 7.2 mistranslates: matmul_q.py)
        v = call_intrinsic(k, "minnum", call_intrinsic(k, "maxnum", v, fconst(F32, -127.0)), fconst(F32, 127.0))
        c = b.select(ok, b.trunc(b.fptosi(call_intrinsic(k, "roundeven", v), I32), I8), ir.Constant(I8, 0))
        b.store(c, gep(b, dst, I8, b.add(dst_at, j)))


def _cache_args(k: Kernel, n):
    """(q, k_new, v_new, caches in [k, v(, ks, vs)], pos, out, caches out) pointers;
    the cache pointers lose ``noalias``: in and out may be one buffer."""
    quant = len(n.inputs) == 8
    ni = len(n.inputs)
    cache_in = [3, 4] + ([6, 7] if quant else [])
    cache_out = [ni + 1, ni + 2] + ([ni + 3, ni + 4] if quant else [])
    for i in cache_in + cache_out:
        k.body.args[i].attributes.discard("noalias")
    a = k.args
    return a[0], a[1], a[2], [a[i] for i in cache_in], a[5], a[ni], [a[i] for i in cache_out]


def copy_other_rows(k: Kernel, at: Attention, h, p, tn, ins, outs):
    """When the caches are not updated in place: copy head h's rows outside
    p..p+tn-1 of every cache (codes and scales) from its input to its output."""
    b, s, dd = k.b, at.s, at.dd
    differ = lambda x, y: b.icmp_unsigned("!=", b.ptrtoint(x, I64), b.ptrtoint(y, I64))  # noqa: E731
    for idx, (src, dst) in enumerate(zip(ins, outs)):
        row = dd * (at.dc.bits // 8) if idx < 2 else 4       # bytes of one row: codes, or a scale
        head = b.mul(h, i64(s * row))
        with b.if_then(differ(src, dst)):
            memcpy(k, dst, head, src, head, b.mul(p, i64(row)))
            after = b.mul(b.add(p, i64(tn)), i64(row))
            memcpy(k, dst, b.add(head, after), src, b.add(head, after), b.sub(i64(s * row), after))


def cache_rows(at: Attention, b, kp, vp, h, scales=None):
    """Rows of head h of the caches kp/vp (and for int8 their scales)."""
    s, dd = at.s, at.dd
    hb, sb = b.mul(h, i64(s * dd)), b.mul(h, i64(s))
    if at.quant:
        return Rows(kp, vp, dt.i8, lambda t: b.add(hb, b.mul(t, i64(dd))), scales[0], scales[1],
                    lambda t: b.add(sb, t))
    return Rows(kp, vp, at.dc, lambda t: b.add(hb, b.mul(t, i64(dd))))


@emitter("attention_decode")
def emit_attention_decode(k: Kernel, n):
    """q[Hq, D] (one token): one work item per (KV head h, part j of the rows;
    one part unless ``splits``): check pos; item (h, 0) copies the head's
    other rows when the caches are not updated in place; the item whose part
    holds row pos writes the new row there; then the part's rows in blocks
    (``Attention.fold``) for the group's Hq/Hkv query heads at once: rows
    before pos from the *input* cache (the same bytes in place or not, never
    written by another item), row pos from the output.  One part: out; N
    parts: each (m, l, acc), merged by attention_merge.  ``window``: the rows
    from max(0, pos + 1 - window) only, split alike.
    q[T, Hq, D] (a prefill chunk): ``emit_attention_chunk``."""
    if n.inputs[0].type.rank == 3:
        return emit_attention_chunk(k, n)
    pos_t = n.inputs[5].type
    b = k.b
    qp, knp, vnp, ins, pp, outp, outs = _cache_args(k, n)
    at = Attention(k, n)
    hkv, s, dd, grp = at.hkv, at.s, at.dd, at.grp
    nsp = max(1, n.attrs["splits"])
    fail = k.fail(SQK_ERR_INDEX)
    k.index_error = (f"attention_decode: the position %{n.inputs[5].name} must lie in [0, {s}), "
                     f"the KV cache length {s}")
    p = load_index(b, pp, pos_t.dtype, i64(0))
    ok = b.append_basic_block("pos_ok")
    b.cbranch(b.icmp_unsigned("<", p, i64(s)), ok, fail)  # unsigned: a negative pos fails too
    b.position_at_end(ok)
    nrows = count = b.add(p, i64(1))
    window = n.attrs["window"]
    if window:   # rows first..p: the parts split the window's count rows, offset by first
        first = b.select(b.icmp_unsigned(">", nrows, i64(window)), b.sub(nrows, i64(window)), i64(0))
        count = b.sub(nrows, first)
    span = b.udiv(b.add(count, i64(nsp - 1)), i64(nsp))   # attention_spans: ceil(n / N) rows a part

    with loop(b, k.begin, k.end, name="item") as item:
        h, part = b.udiv(item, i64(nsp)), b.urem(item, i64(nsp))
        lo = b.mul(part, span)
        lo = b.select(b.icmp_unsigned("<", lo, count), lo, count)
        hi = b.add(lo, span)
        hi = b.select(b.icmp_unsigned("<", hi, count), hi, count)
        if window:
            lo, hi = b.add(lo, first), b.add(hi, first)
        with b.if_then(b.icmp_unsigned("==", part, i64(0))):
            copy_other_rows(k, at, h, p, 1, ins, outs)
        has_new = b.and_(b.icmp_unsigned("==", hi, nrows), b.icmp_unsigned("<", lo, hi))   # it holds row pos
        row = b.add(b.mul(h, i64(s)), p)
        with b.if_then(has_new):
            at.store_row(outs[0], b.mul(row, i64(dd)), knp, b.mul(h, i64(dd)), outs[2] if at.quant else None, row)
            at.store_row(outs[1], b.mul(row, i64(dd)), vnp, b.mul(h, i64(dd)), outs[3] if at.quant else None, row)
        q_base = lambda gi: b.mul(b.add(b.mul(h, i64(grp)), gi), i64(dd))  # noqa: E731
        at.start(qp, q_base)
        old_hi = b.select(has_new, p, hi)
        at.fold(lo, old_hi, cache_rows(at, b, ins[0], ins[1], h, ins[2:]))
        at.fold(old_hi, hi, cache_rows(at, b, outs[0], outs[1], h, outs[2:]))
        if n.attrs["splits"]:
            at.partial(outp, lambda gi: b.mul(b.add(b.mul(b.add(b.mul(h, i64(grp)), gi), i64(nsp)), part),
                                              i64(dd + 2)))
        else:
            at.finish(outp, q_base)
    k.finish()
    return hkv * nsp, 1


def emit_attention_chunk(k: Kernel, n):
    """A chunk of T tokens at pos..pos+T-1: one work item per (KV head h, query
    row i), h major, each for the group's Hq/Hkv query heads.  Items run
    concurrently, so none reads what another writes: item (h, i) writes only
    its own new row pos+i, reads rows < pos from the *input* cache (unchanged
    by this kernel, in place or not) and rows pos..pos+i from k_new/v_new
    (rounded to the cache's dtype as stored: for an int8 cache each item
    quantizes them into its stack, as ``quantize_row`` stores them); item
    (h, 0) copies the rows outside the chunk when the caches are not updated
    in place.  ``window``: row pos+i folds from max(0, pos + i + 1 - window)
    (cache rows, then the chunk's)."""
    q_t, pos_t = n.inputs[0].type, n.inputs[5].type
    b = k.b
    qp, knp, vnp, ins, pp, outp, outs = _cache_args(k, n)
    at = Attention(k, n)
    hkv, s, dd, grp, hq = at.hkv, at.s, at.dd, at.grp, at.hq
    tn = q_t.shape[0]
    if tn == 0:
        k.finish()
        return 0, 1
    fail = k.fail(SQK_ERR_INDEX)
    k.index_error = (f"attention_decode: a chunk of {tn} tokens from position %{n.inputs[5].name} must lie in "
                     f"the KV cache of length {s} (positions in [0, {s - tn}])")
    p = load_index(b, pp, pos_t.dtype, i64(0))
    ok = b.append_basic_block("pos_ok")
    b.cbranch(b.icmp_unsigned("<=", p, i64(s - tn)), ok, fail)  # unsigned: a negative pos fails too
    b.position_at_end(ok)
    if at.quant:   # the chunk's rows of one head, quantized: codes and scales
        kq, vq = stack_array(k, I8, tn * dd), stack_array(k, I8, tn * dd)
        kqs, vqs = stack_array(k, F32, tn), stack_array(k, F32, tn)

    with loop(b, k.begin, k.end, name="item") as item:
        h, i = b.udiv(item, i64(tn)), b.urem(item, i64(tn))
        with b.if_then(b.icmp_unsigned("==", i, i64(0))):
            copy_other_rows(k, at, h, p, tn, ins, outs)
        new_row = b.mul(b.add(b.mul(i, i64(hkv)), h), i64(dd))         # k_new[i, h]
        row = b.add(b.mul(h, i64(s)), b.add(p, i))
        at.store_row(outs[0], b.mul(row, i64(dd)), knp, new_row, outs[2] if at.quant else None, row)
        at.store_row(outs[1], b.mul(row, i64(dd)), vnp, new_row, outs[3] if at.quant else None, row)
        q_base = lambda gi: b.mul(b.add(b.mul(i, i64(hq)), b.add(b.mul(h, i64(grp)), gi)), i64(dd))  # noqa: E731
        at.start(qp, q_base)
        c0, n0 = i64(0), i64(0)    # the first row read from the cache, and from the chunk's new rows
        if n.attrs["window"]:      # row pos + i attends from pos + i + 1 - window
            first = b.sub(b.add(b.add(p, i), i64(1)), i64(n.attrs["window"]))   # may be negative
            c0 = b.select(b.icmp_signed(">", first, i64(0)), first, i64(0))
            c0 = b.select(b.icmp_signed("<", c0, p), c0, p)
            n0 = b.sub(first, p)
            n0 = b.select(b.icmp_signed(">", n0, i64(0)), n0, i64(0))
        at.fold(c0, p, cache_rows(at, b, ins[0], ins[1], h, ins[2:]))
        new_at = lambda t: b.mul(b.add(b.mul(t, i64(hkv)), h), i64(dd))  # noqa: E731
        if at.quant:
            with loop(b, 0, b.add(i, i64(1)), name="nq") as t:
                quantize_row(k, dd, knp, at.d, new_at(t), kq, b.mul(t, i64(dd)), kqs, t)
                quantize_row(k, dd, vnp, at.d, new_at(t), vq, b.mul(t, i64(dd)), vqs, t)
            new = Rows(kq, vq, dt.i8, lambda t: b.mul(t, i64(dd)), kqs, vqs, lambda t: t)
        else:
            new = Rows(knp, vnp, at.d, new_at, rounded=at.dc if at.dc is dt.f16 and at.d is not dt.f16 else None)
        at.fold(n0, b.add(i, i64(1)), new)
        at.finish(outp, q_base)
    k.finish()
    return hkv * tn, 1


@emitter("attention_merge")
def emit_attention_merge(k: Kernel, n):
    """One work item per query head: M = max_j m_j, then
    out = sum_j exp(m_j - M) acc_j / sum_j exp(m_j - M) l_j."""
    hq, nsp, w = n.inputs[0].type.shape
    dd = w - 2
    d = n.outputs[0].type.dtype
    b = k.b
    pp, outp = k.args
    acc = stack_array(k, F32, dd)
    with loop(b, k.begin, k.end, name="h") as h:
        base = b.mul(h, i64(nsp * w))
        m_at = lambda j: b.load(gep(b, pp, F32, b.add(base, b.mul(j, i64(w)))), typ=F32)  # noqa: E731
        mx = fold_loop(b, 0, nsp, [fconst(F32, float("-inf"))],
                       lambda j, a: [b.select(b.fcmp_ordered(">", m_at(j), a[0]), m_at(j), a[0])], name="m")[0]
        fill(k, dd, acc, 0.0)

        def part(j, a):
            pb = b.add(base, b.mul(j, i64(w)))
            e = f_exp(k, b.fsub(m_at(j), mx), 1)
            e = b.select(b.fcmp_ordered("==", m_at(j), fconst(F32, float("-inf"))), fconst(F32, 0.0), e)
            axpy(k, dd, acc, e, pp, dt.f32, b.add(pb, i64(2)))
            return [b.fadd(a[0], b.fmul(e, b.load(gep(b, pp, F32, b.add(pb, i64(1))), typ=F32)))]

        tot = fold_loop(b, 0, nsp, [fconst(F32, 0.0)], part, name="p")[0]
        inv = b.fdiv(fconst(F32, 1.0), tot)
        ob = b.mul(h, i64(dd))
        with loop(b, 0, dd, name="j") as j:
            store_elem(b, b.fmul(b.load(gep(b, acc, F32, j), typ=F32), inv), outp, d, b.add(ob, j))
    k.finish()
    return hq, 1


def scale_array(k: Kernel, n: int, arr, factor):
    """arr[0:n] (f32 stack array) *= factor."""
    b = k.b

    def body(j, w, c):
        fv = _sv(b, factor, w)
        for jj in groups_at(b, j, w, c):
            a = load_vec(b, arr, F32, jj, w) if w > 1 else b.load(gep(b, arr, F32, jj), typ=F32)
            v = b.fmul(a, fv)
            store_vec(b, v, arr, F32, jj) if w > 1 else b.store(v, gep(b, arr, F32, jj))

    blocks(k, 0, n, k.target.lanes(32), body)


# --- moe ------------------------------------------------------------------------------------------

@emitter("moe")
def emit_moe(k: Kernel, n):
    """Per token row: router logits (axpy over H), top-k by insertion, the
    softmax weights of the chosen logits, then for each chosen expert e only:
    g, u = x @ w1[e], x @ w3[e] (axpy over F), a = silu(g) * u, and
    acc += (w * a[f]) * w2[e][f] (axpy over H)."""
    x, rw, w1 = n.inputs[0].type, n.inputs[1].type, n.inputs[2].type
    d = x.dtype
    rows, hid = x.shape
    ne, ff = rw.shape[1], w1.shape[2]
    kk = n.attrs["k"]
    if rows == 0:
        k.finish()
        return 0, 1
    b = k.b
    xp, rwp, w1p, w3p, w2p, yp = k.args
    lanes = k.target.lanes(32)
    logits, vals, wts = stack_array(k, F32, ne), stack_array(k, F32, kk), stack_array(k, F32, kk)
    ids = stack_array(k, I64, kk)
    gs, us, acc = stack_array(k, F32, ff), stack_array(k, F32, ff), stack_array(k, F32, hid)
    sslot = entry_alloca(k, F32)
    with loop(b, k.begin, k.end, name="row") as row:
        xb = b.mul(row, i64(hid))
        fill(k, ne, logits, 0.0)
        with loop(b, 0, hid, name="h") as h:
            axpy(k, ne, logits, load_elem(b, xp, d, b.add(xb, h)), rwp, d, b.mul(h, i64(ne)))
        topk_row(k, ne, kk, lambda j: b.load(gep(b, logits, F32, j), typ=F32),
                 Slots(b, vals, dt.f32), Slots(b, ids, dt.i64))
        m = b.load(gep(b, vals, F32, i64(0)), typ=F32)
        b.store(fconst(F32, 0.0), sslot)
        with loop(b, 0, kk, name="i") as i:
            e = f_exp(k, b.fsub(b.load(gep(b, vals, F32, i), typ=F32), m), 1)
            b.store(e, gep(b, wts, F32, i))
            b.store(b.fadd(get(b, sslot), e), sslot)
        tot = get(b, sslot)
        with loop(b, 0, kk, name="i") as i:
            b.store(b.fdiv(b.load(gep(b, wts, F32, i), typ=F32), tot), gep(b, wts, F32, i))
        fill(k, hid, acc, 0.0)
        with loop(b, 0, kk, name="ex") as i:
            e = b.load(gep(b, ids, I64, i), typ=I64)
            wt = b.load(gep(b, wts, F32, i), typ=F32)
            fill(k, ff, gs, 0.0)
            fill(k, ff, us, 0.0)
            with loop(b, 0, hid, name="h") as h:
                xv = load_elem(b, xp, d, b.add(xb, h))
                base = b.mul(b.add(b.mul(e, i64(hid)), h), i64(ff))
                axpy(k, ff, gs, xv, w1p, d, base)
                axpy(k, ff, us, xv, w3p, d, base)

            def act(j, w, c):
                for jj in groups_at(b, j, w, c):
                    g = load_vec(b, gs, F32, jj, w) if w > 1 else b.load(gep(b, gs, F32, jj), typ=F32)
                    u = load_vec(b, us, F32, jj, w) if w > 1 else b.load(gep(b, us, F32, jj), typ=F32)
                    a = b.fmul(b.fmul(g, f_sigmoid(k, g, w)), u)
                    store_vec(b, a, gs, F32, jj) if w > 1 else b.store(a, gep(b, gs, F32, jj))

            blocks(k, 0, ff, lanes, act)
            with loop(b, 0, ff, name="f") as f:
                coef = b.fmul(wt, b.load(gep(b, gs, F32, f), typ=F32))
                axpy(k, hid, acc, coef, w2p, d, b.mul(b.add(b.mul(e, i64(ff)), f), i64(hid)))
        with loop(b, 0, hid, name="j") as j:
            store_elem(b, b.load(gep(b, acc, F32, j), typ=F32), yp, d, b.add(xb, j))
    k.finish()
    return rows, 1
