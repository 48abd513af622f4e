"""Kernels of LLM decoding: rope, swiglu, topk, attention_decode, moe.

Decode-time shapes are small along the batch (one token) and long along the
feature dims, so each kernel's work item is a token row (rope, topk, moe) or
a KV head (attention_decode; with a prefill chunk of T tokens, a KV head x
query row), and the inner loops over D / F / H are written
as vector blocks (``reduce.blocks``) or left for LLVM to vectorize.
Scratch (scores, accumulators) lives in fixed-size stack arrays sized from
the static shapes.

attention_decode reads and writes its caches through the *output* cache
pointers: when the memory planner aliased them to the inputs (a state input
updated in place) the pointers are equal and nothing is copied; otherwise the
kernel first copies its head's slice of the input cache.  Those four pointer
arguments are therefore not ``noalias``.

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
from .kernel import (F32, I1, I8, I64, PTR, Kernel, call_intrinsic, fconst, gep, i64, load_elem, load_vec,
                     lltype, loop, narrow, splat, store_elem, store_vec, widen)
from .lower import emitter
from .reduce import Accumulators, Combiner, blocks, entry_alloca, get, groups_at


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

class Attention:
    """What the attention_decode kernels share: shapes, dtypes, the scratch of
    one work item's online softmax (G*(D+2) floats on the stack) and the loop
    that folds a run of K/V rows into it."""

    def __init__(self, k: Kernel, n):
        q, kc = n.inputs[0].type, n.inputs[3].type
        self.k, self.b = k, k.b
        self.d, self.dc = q.dtype, kc.dtype                   # activations, caches
        self.hkv, self.s, self.dd = kc.shape
        self.hq = q.shape[-2]
        self.grp = self.hq // self.hkv
        self.lanes = k.target.lanes(32)
        self.scale = float(np.float32(1.0 / math.sqrt(self.dd)))
        self.acc = stack_array(k, F32, self.grp * self.dd)
        self.mx, self.tot = stack_array(k, F32, self.grp), stack_array(k, F32, self.grp)
        self.dot = Accumulators(k, Combiner("sum", dt.f32), self.lanes)

    def f32_at(self, arr, i):
        return gep(self.b, arr, F32, i)

    def start(self):
        """Empty the softmax state of the group's heads."""
        fill(self.k, self.grp, self.mx, float("-inf"))
        fill(self.k, self.grp, self.tot, 0.0)
        fill(self.k, self.grp * self.dd, self.acc, 0.0)

    def rows(self, t0, t1, kp, vp, src: dt.DType, row_base, q_base, qp, rounded: bool = False):
        """Fold rows t0..t1-1 of K/V (``row_base(t)``: element offset of row t in
        kp/vp, of dtype src) into the softmax of the group's heads (``q_base(g)``:
        offset of head g's query in qp), each row read once for the whole group.
        ``rounded``: the rows are not in the cache yet and are rounded to its
        dtype as they would be stored there."""
        k, b, d, dd = self.k, self.b, self.d, self.dd
        rnd = (lambda v, w: widen(b, narrow(b, v, self.dc, w), self.dc, w)) if rounded else None  # noqa: E731

        def load(ptr, dtype, idx, w):
            v = load_elem(b, ptr, dtype, idx, w)
            return rnd(v, w) if rnd else v

        with loop(b, t0, t1, name="t") as t:
            rb = row_base(t)
            with loop(b, 0, self.grp, name="g") as gi:
                qb = q_base(gi)
                self.dot.reset()
                blocks(k, 0, dd, self.lanes, lambda j, w, c: self.dot.add(w, c, [
                    b.fmul(load_elem(b, qp, d, b.add(qb, jj), w), load(kp, src, b.add(rb, jj), w))
                    for jj in groups_at(b, j, w, c)]))
                sc = b.fmul(self.dot.result(), fconst(F32, self.scale))
                accg = self.f32_at(self.acc, b.mul(gi, i64(dd)))
                m_old = b.load(self.f32_at(self.mx, gi), typ=F32)
                with b.if_then(b.fcmp_ordered(">", sc, m_old)):  # a new max: rescale what is summed so far
                    r = f_exp(k, b.fsub(m_old, sc), 1)
                    scale_array(k, dd, accg, r)
                    b.store(b.fmul(b.load(self.f32_at(self.tot, gi), typ=F32), r), self.f32_at(self.tot, gi))
                    b.store(sc, self.f32_at(self.mx, gi))
                e = f_exp(k, b.fsub(sc, b.load(self.f32_at(self.mx, gi), typ=F32)), 1)
                b.store(b.fadd(b.load(self.f32_at(self.tot, gi), typ=F32), e), self.f32_at(self.tot, gi))
                axpy(k, dd, accg, e, vp, src, rb, rnd)

    def finish(self, outp, out_base):
        """out[out_base(g) : +D] = acc_g / sum_g for the group's heads."""
        b, dd = self.b, self.dd
        with loop(b, 0, self.grp, name="g") as gi:
            inv = b.fdiv(fconst(F32, 1.0), b.load(self.f32_at(self.tot, gi), typ=F32))
            ob = out_base(gi)
            with loop(b, 0, dd, name="j") as j:
                v = b.load(self.f32_at(self.acc, b.add(b.mul(gi, i64(dd)), j)), typ=F32)
                store_elem(b, b.fmul(v, inv), outp, self.d, b.add(ob, j))

    def store_rows(self, dst, dst_off, src, src_off, n: int):
        """Copy n elements of a new K/V row (byte offsets) into a cache, rounded
        to the cache's dtype (a memcpy when the dtypes agree)."""
        if self.dc is self.d:
            memcpy(self.k, dst, dst_off, src, src_off, n * self.d.bits // 8)
            return
        b = self.b
        de, ce = b.udiv(src_off, i64(self.d.bits // 8)), b.udiv(dst_off, i64(self.dc.bits // 8))
        with loop(b, 0, n, name="j") as j:
            store_elem(b, load_elem(b, src, self.d, b.add(de, j)), dst, self.dc, b.add(ce, j))


@emitter("attention_decode")
def emit_attention_decode(k: Kernel, n):
    """q[Hq, D] (one token): one work item per KV head: check pos, copy the
    head's cache slice when the caches are not updated in place, write the new
    row, then one pass over rows 0..pos with an online softmax (running max m,
    sum l, accumulator acc[D] rescaled by exp(m_old - m_new) when the max
    grows) for all Hq/Hkv query heads of the group at once: each K and V row
    is read from memory once and reused from L1 by the group's heads.
    q[T, Hq, D] (a prefill chunk): ``emit_attention_chunk``."""
    if n.inputs[0].type.rank == 3:
        return emit_attention_chunk(k, n)
    pos_t = n.inputs[5].type
    for i in (3, 4, 6 + 1, 6 + 2):  # the caches, in and out: maybe one buffer
        k.body.args[i].attributes.discard("noalias")
    b = k.b
    qp, knp, vnp, kci, vci, pp, outp, kco, vco = k.args
    at = Attention(k, n)
    hkv, s, dd, grp = at.hkv, at.s, at.dd, at.grp
    es, ce = at.d.bits // 8, at.dc.bits // 8
    fail = k.fail(SQK_ERR_INDEX)
    k.index_error = (f"attention_decode: the position %{n.inputs[5].name} must lie in [0, {s}), "
                     f"the KV cache length {s}")
    p = load_index(b, pp, pos_t.dtype, i64(0))
    ok = b.append_basic_block("pos_ok")
    b.cbranch(b.icmp_unsigned("<", p, i64(s)), ok, fail)  # unsigned: a negative pos fails too
    b.position_at_end(ok)
    slice_bytes = s * dd * ce

    with loop(b, k.begin, k.end, name="h") as h:
        head_off = b.mul(h, i64(slice_bytes))
        for src, dst in ((kci, kco), (vci, vco)):
            with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(src, I64), b.ptrtoint(dst, I64))):
                memcpy(k, dst, head_off, src, head_off, slice_bytes)
        row_off = b.mul(b.add(b.mul(h, i64(s)), p), i64(dd * ce))
        at.store_rows(kco, row_off, knp, b.mul(h, i64(dd * es)), dd)
        at.store_rows(vco, row_off, vnp, b.mul(h, i64(dd * es)), dd)
        cache_base = b.mul(h, i64(s * dd))
        at.start()
        at.rows(0, b.add(p, i64(1)), kco, vco, at.dc, lambda t: b.add(cache_base, b.mul(t, i64(dd))),
                lambda gi: b.mul(b.add(b.mul(h, i64(grp)), gi), i64(dd)), qp)
        at.finish(outp, lambda gi: b.mul(b.add(b.mul(h, i64(grp)), gi), i64(dd)))
    k.finish()
    return hkv, 1


def emit_attention_chunk(k: Kernel, n):
    """A chunk of T tokens at pos..pos+T-1: one work item per (KV head h, query
    row i), h major, each for the group's Hq/Hkv query heads.  Items run
    concurrently, so none reads what another writes: item (h, i) writes only
    its own new row pos+i, reads rows < pos from the *input* cache (unchanged
    by this kernel, in place or not) and rows pos..pos+i from k_new/v_new
    (rounded to the cache's dtype, as stored); item (h, 0) copies the rows
    outside the chunk when the caches are not updated in place."""
    q_t, pos_t = n.inputs[0].type, n.inputs[5].type
    for i in (3, 4, 6 + 1, 6 + 2):
        k.body.args[i].attributes.discard("noalias")
    b = k.b
    qp, knp, vnp, kci, vci, pp, outp, kco, vco = k.args
    at = Attention(k, n)
    hkv, s, dd, grp, hq = at.hkv, at.s, at.dd, at.grp, at.hq
    tn = q_t.shape[0]
    es, ce = at.d.bits // 8, at.dc.bits // 8
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
    slice_bytes = s * dd * ce
    differ = lambda x, y: b.icmp_unsigned("!=", b.ptrtoint(x, I64), b.ptrtoint(y, I64))  # noqa: E731

    with loop(b, k.begin, k.end, name="item") as item:
        h, i = b.udiv(item, i64(tn)), b.urem(item, i64(tn))
        head_off = b.mul(h, i64(slice_bytes))
        with b.if_then(b.icmp_unsigned("==", i, i64(0))):
            for src, dst in ((kci, kco), (vci, vco)):
                with b.if_then(differ(src, dst)):
                    memcpy(k, dst, head_off, src, head_off, b.mul(p, i64(dd * ce)))
                    after = b.mul(b.add(p, i64(tn)), i64(dd * ce))
                    memcpy(k, dst, b.add(head_off, after), src, b.add(head_off, after),
                           b.sub(i64(slice_bytes), after))
        new_row = b.add(b.mul(i, i64(hkv)), h)                          # k_new[i, h]
        row_off = b.mul(b.add(b.mul(h, i64(s)), b.add(p, i)), i64(dd * ce))
        at.store_rows(kco, row_off, knp, b.mul(new_row, i64(dd * es)), dd)
        at.store_rows(vco, row_off, vnp, b.mul(new_row, i64(dd * es)), dd)
        q_base = lambda gi: b.mul(b.add(b.mul(i, i64(hq)), b.add(b.mul(h, i64(grp)), gi)), i64(dd))  # noqa: E731
        cache_base = b.mul(h, i64(s * dd))
        at.start()
        at.rows(0, p, kci, vci, at.dc, lambda t: b.add(cache_base, b.mul(t, i64(dd))), q_base, qp)
        at.rows(0, b.add(i, i64(1)), knp, vnp, at.d, lambda t: b.mul(b.add(b.mul(t, i64(hkv)), h), i64(dd)),
                q_base, qp, rounded=at.dc is dt.f16 and at.d is not dt.f16)
        at.finish(outp, q_base)
    k.finish()
    return hkv * tn, 1


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
