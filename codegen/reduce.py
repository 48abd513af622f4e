"""Reductions (reduce_sum, reduce_mean, reduce_max) and the row-normalizing
ops built on them (softmax, layernorm, rmsnorm).

Every kernel views its input as ``[kept..., reduced..., inner]`` after
dropping size-1 dims and merging neighbours of the same kind:

* ``inner == 1`` (reduction over trailing dims, the common case: last-axis
  softmax/norms, row sums): a work item is one output element; its reduced
  elements end in a contiguous run, reduced with LLVM vectors into ``U``
  independent accumulators (hiding the add latency), then horizontally.
* ``inner > 1`` (a middle axis): a work item is (kept index, chunk of the
  inner dim); vectors run across the inner dim, ``U`` adjacent vectors at a
  time, each accumulating down the reduced dims with a stride.
* Anything else (e.g. axes (0, 2) of a 4-D tensor) is the same code with the
  extra reduced dims as nested strided loops around it.

Work is split over output elements only: there is no scratch buffer for
partial results, so a full reduction of one large tensor to a scalar runs on
one thread (reduce a [threads*k, n] view over axis 1 to use them all).
f16 is widened to f32 on load and rounded once on store; integer sums wrap
in the input dtype, as numpy's sum cast back to that dtype does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from ..ir import dtypes as dt
from .elementwise import MIN_PARALLEL_WORK, f_exp
from .kernel import (F32, PTR, Kernel, call_intrinsic, compute_type, fconst, hmax, hsum, i64, iconst,
                     llvm_name, load_elem, loop, splat, store_elem, vtype)
from .lower import emitter

U = 4                   # independent accumulators (vectors in flight) per loop
INNER_CHUNK = 512       # inner-dim elements per work item (a multiple of U * lanes)
EXP_COST = 4            # an exp costs about this many loads: fewer rows make a thread worth it


# --- combiners ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Combiner:
    """An associative reduction (``sum`` or ``max``) in the compute type of ``dtype``."""
    kind: str
    dtype: dt.DType

    def init(self, ty):
        if self.kind == "sum":
            return fconst(ty, 0.0) if self.dtype.is_float else iconst(ty, 0)
        if self.dtype.is_float:
            return fconst(ty, float("-inf"))
        info = np.iinfo(self.dtype.np_dtype)
        return iconst(ty, int(info.min))  # u8: 0; llvmlite wants the value in range

    def __call__(self, k: Kernel, a, x):
        if self.kind == "sum":
            return k.b.fadd(a, x) if self.dtype.is_float else k.b.add(a, x)
        if self.dtype.is_float:
            return call_intrinsic(k, "maximum", a, x)  # NaN-propagating, like numpy
        return call_intrinsic(k, "smax" if self.dtype.is_signed else "umax", a, x)

    def horizontal(self, k: Kernel, v):
        """Reduce a vector's lanes to one scalar."""
        if not isinstance(v.type, ir.VectorType):
            return v
        if self.dtype.is_float:
            return hsum(k, v) if self.kind == "sum" else hmax(k, v)
        op = "add" if self.kind == "sum" else ("smax" if self.dtype.is_signed else "umax")
        fn = k.intrinsic(f"llvm.vector.reduce.{op}.{llvm_name(v.type)}", v.type.element, [v.type])
        return k.b.call(fn, [v])


def entry_alloca(k: Kernel, ty):
    """A stack slot in the entry block, so LLVM promotes it to registers.
    Its pointer is opaque (llvmlite would print a typed one): read it with ``get``."""
    entry = k.body.entry_basic_block
    if k.b.block is entry:  # a second builder would leave k.b's insertion point stale
        slot = k.b.alloca(ty)
    else:
        eb = ir.IRBuilder(entry)
        eb.position_at_start(entry)
        slot = eb.alloca(ty)
    slot.type = PTR
    return slot


def get(b, slot):
    return b.load(slot, typ=slot.allocated_type)


class Accumulators:
    """``U`` vector accumulators and one scalar accumulator for one reduction
    over a contiguous run (see ``blocks``); kept in allocas so they can be
    carried across nested loops."""

    def __init__(self, k: Kernel, comb: Combiner, lanes: int):
        self.k, self.comb, self.lanes = k, comb, lanes
        ct = compute_type(comb.dtype)
        self.vec = [entry_alloca(k, vtype(ct, lanes)) for _ in range(U)]
        self.scalar = entry_alloca(k, ct)

    def reset(self):
        for slot in self.vec + [self.scalar]:
            self.k.b.store(self.comb.init(slot.allocated_type), slot)

    def add(self, w: int, c: int, values):
        """Fold ``values`` (one per group, as ``blocks`` calls back with) in."""
        slots = [self.scalar] if w == 1 and c == 1 else self.vec[:c]
        for slot, v in zip(slots, values):
            self.k.b.store(self.comb(self.k, get(self.k.b, slot), v), slot)

    def result(self):
        k, b = self.k, self.k.b
        vs = [get(b, s) for s in self.vec]
        while len(vs) > 1:  # tree: shorter dependency chain
            vs = [self.comb(k, vs[i], vs[i + 1]) if i + 1 < len(vs) else vs[i] for i in range(0, len(vs), 2)]
        return self.comb(k, self.comb.horizontal(k, vs[0]), get(b, self.scalar))


# --- loops -------------------------------------------------------------------------------

def _val(x):
    return i64(x) if isinstance(x, int) else x


def _round_down(b, start, stop, step):
    """``start`` plus the largest multiple of ``step`` that fits in ``stop - start``."""
    if isinstance(start, int) and isinstance(stop, int):
        return start + (stop - start) // step * step
    n = b.sdiv(b.sub(_val(stop), _val(start)), i64(step))
    return b.add(_val(start), b.mul(n, i64(step)))


def _maybe_loop(b, start, stop, step, body, name):
    if isinstance(start, int) and isinstance(stop, int) and start >= stop:
        return
    with loop(b, start, stop, step, name=name) as j:
        body(j)


def blocks(k: Kernel, start, stop, lanes: int, body):
    """Cover indices [start, stop) with ``body(j, w, c)``: c groups of w
    elements at j, j+w, ... — U vectors at a time, then single vectors, then
    scalars (w = 1)."""
    b = k.b
    if lanes == 1:   # scalar code (riscv64): one plain loop, for LLVM to vectorize and unroll
        _maybe_loop(b, start, stop, 1, lambda j: body(j, 1, 1), "tail")
        return
    s1 = _round_down(b, start, stop, U * lanes)
    _maybe_loop(b, start, s1, U * lanes, lambda j: body(j, lanes, U), "blk")
    s2 = s1
    if lanes > 1:
        s2 = _round_down(b, s1, stop, lanes)
        _maybe_loop(b, s1, s2, lanes, lambda j: body(j, lanes, 1), "vec")
    _maybe_loop(b, s2, stop, 1, lambda j: body(j, 1, 1), "tail")


def groups_at(b, j, w, c):
    """Start indices of the c groups of w elements at j."""
    return [j if u == 0 else b.add(j, i64(u * w)) for u in range(c)]


def nested(b, dims, base, body, name="r"):
    """Loop over the multi-index of ``dims`` [(size, stride)]; calls body(offset)."""
    if not dims:
        body(base)
        return
    (size, stride), rest = dims[0], dims[1:]
    with loop(b, 0, size, name=name) as r:
        nested(b, rest, b.add(base, b.mul(r, i64(stride))), body, name + "r")


def decompose(b, index, dims):
    """Element offset of flat ``index`` over ``dims`` [(size, stride)] (C order)."""
    off, rem = i64(0), index
    for d, (size, stride) in reversed(list(enumerate(dims))):
        idx = b.urem(rem, i64(size)) if d else rem
        rem = b.udiv(rem, i64(size)) if d else rem
        off = b.add(off, b.mul(idx, i64(stride)))
    return off


def grain_for(work_per_item: int) -> int:
    return max(1, MIN_PARALLEL_WORK // max(1, work_per_item))


def inner_chunking(inner: int) -> tuple[int, int]:
    """(chunk, number of chunks) splitting the inner dim into work items."""
    chunk = inner if inner <= 2 * INNER_CHUNK else INNER_CHUNK
    return chunk, -(-inner // chunk)


def item_range(b, item, inner: int, chunk: int, nchunks: int):
    """(row, j0, j1) of a work item over rows × inner chunks."""
    if nchunks == 1:
        return item, 0, inner
    row = b.udiv(item, i64(nchunks))
    j0 = b.mul(b.urem(item, i64(nchunks)), i64(chunk))
    end = b.add(j0, i64(chunk))
    return row, j0, b.select(b.icmp_signed("<", end, i64(inner)), end, i64(inner))


# --- reduce_sum / reduce_mean / reduce_max ------------------------------------------------------

def reduce_layout(shape, axes):
    """Split a reduction into (kept dims, reduced dims, inner) with element
    strides: size-1 dims dropped, neighbours of the same kind merged; inner is
    the trailing kept dim (1 when the reduction is trailing)."""
    merged = []  # [size, reduced]
    for i, d in enumerate(shape):
        if d == 1:
            continue
        red = i in axes
        if merged and merged[-1][1] == red:
            merged[-1][0] *= d
        else:
            merged.append([d, red])
    strides, acc = [], 1
    for size, _ in reversed(merged):
        strides.append(acc)
        acc *= size
    strides.reverse()
    inner = 1
    if merged and not merged[-1][1]:
        inner = merged[-1][0]
        merged, strides = merged[:-1], strides[:-1]
    kept = [(s, st) for (s, red), st in zip(merged, strides) if not red]
    reduced = [(s, st) for (s, red), st in zip(merged, strides) if red]
    if inner == 1 and not reduced:
        reduced = [(1, 1)]  # nothing left to reduce: a run of one element
    return kept, reduced, inner


@emitter("reduce_sum", "reduce_mean", "reduce_max")
def emit_reduce(k: Kernel, n):
    x, y = n.inputs[0].type, n.outputs[0].type
    d = x.dtype
    axes = {a % x.rank for a in n.attrs["axes"]} if n.attrs["axes"] else set(range(x.rank))
    kept, reduced, inner = reduce_layout(x.shape, axes)
    if y.size == 0:
        k.finish()
        return 0, 1
    comb = Combiner("max" if n.op == "reduce_max" else "sum", d)
    count = math.prod(s for s, _ in reduced)
    lanes = k.target.lanes(max(32, d.bits))
    b, src, dst = k.b, k.args[0], k.args[1]

    def finalize(v, w):
        if n.op != "reduce_mean":
            return v
        return b.fdiv(v, fconst(vtype(F32, w), float(count)))

    nkept = math.prod(s for s, _ in kept)
    if inner == 1:
        # trailing reduction: the last reduced dim is a contiguous run
        run = reduced[-1][0]
        accs = Accumulators(k, comb, lanes)
        with loop(b, k.begin, k.end, name="item") as item:
            accs.reset()

            def row(off):
                blocks(k, 0, run, lanes, lambda j, w, c: accs.add(w, c, [
                    load_elem(b, src, d, b.add(off, jj), w) for jj in groups_at(b, j, w, c)]))

            nested(b, reduced[:-1], decompose(b, item, kept), row)
            store_elem(b, finalize(accs.result(), 1), dst, d, item)
        k.finish()
        return nkept, grain_for(count)

    # a middle axis: vectors across the inner dim, accumulating down the reduced dims
    chunk, nchunks = inner_chunking(inner)
    slots = {}

    def column(base, obase, j, w, c):
        ty = vtype(compute_type(d), w)
        if (w, c) not in slots:
            slots[w, c] = [entry_alloca(k, ty) for _ in range(c)]
        accs = slots[w, c]
        for a in accs:
            b.store(comb.init(ty), a)

        def step(off):
            for a, jj in zip(accs, groups_at(b, b.add(off, j), w, c)):
                b.store(comb(k, get(b, a), load_elem(b, src, d, jj, w)), a)

        nested(b, reduced, base, step)
        for a, jj in zip(accs, groups_at(b, b.add(obase, j), w, c)):
            store_elem(b, finalize(get(b, a), w), dst, d, jj, w)

    with loop(b, k.begin, k.end, name="item") as item:
        row, j0, j1 = item_range(b, item, inner, chunk, nchunks)
        base, obase = decompose(b, row, kept), b.mul(row, i64(inner))
        blocks(k, j0, j1, lanes, lambda j, w, c: column(base, obase, j, w, c))
    k.finish()
    return nkept * nchunks, grain_for(count * chunk)


# --- softmax ---------------------------------------------------------------------------------

@emitter("softmax")
def emit_softmax(k: Kernel, n):
    """exp(x - max) / sum(exp(x - max)) along one axis.  f32 keeps exp(x - max)
    in the output between passes; f16 recomputes it (rounding it to f16 and
    dividing later would round twice)."""
    x = n.inputs[0].type
    d = x.dtype
    if x.size == 0:
        k.finish()
        return 0, 1
    a = n.attrs["axis"] % x.rank
    outer, size, inner = math.prod(x.shape[:a]), x.shape[a], math.prod(x.shape[a + 1:])
    lanes = k.target.lanes(32)
    b, src, dst = k.b, k.args[0], k.args[1]
    keep_e = d is dt.f32

    def exp_shifted(idx, m, w):
        return f_exp(k, b.fsub(load_elem(b, src, d, idx, w), m), w)

    if inner == 1:
        amax, asum = Accumulators(k, Combiner("max", d), lanes), Accumulators(k, Combiner("sum", d), lanes)
        with loop(b, k.begin, k.end, name="row") as row:
            base = b.mul(row, i64(size))
            amax.reset()
            blocks(k, 0, size, lanes, lambda j, w, c: amax.add(w, c, [
                load_elem(b, src, d, b.add(base, jj), w) for jj in groups_at(b, j, w, c)]))
            m = amax.result()
            asum.reset()

            def exp_pass(j, w, c):
                es = []
                for jj in groups_at(b, b.add(base, j), w, c):
                    e = exp_shifted(jj, splat(b, m, w) if w > 1 else m, w)
                    if keep_e:
                        store_elem(b, e, dst, d, jj, w)
                    es.append(e)
                asum.add(w, c, es)

            blocks(k, 0, size, lanes, exp_pass)
            inv = b.fdiv(fconst(F32, 1.0), asum.result())

            def scale_pass(j, w, c):
                mv, iv = (splat(b, m, w), splat(b, inv, w)) if w > 1 else (m, inv)
                for jj in groups_at(b, b.add(base, j), w, c):
                    e = load_elem(b, dst, d, jj, w) if keep_e else exp_shifted(jj, mv, w)
                    store_elem(b, b.fmul(e, iv), dst, d, jj, w)

            blocks(k, 0, size, lanes, scale_pass)
        k.finish()
        return outer, grain_for(size * EXP_COST)

    chunk, nchunks = inner_chunking(inner)
    dims = [(size, inner)]
    slots = {}
    cmax, csum = Combiner("max", d), Combiner("sum", d)

    def column(base, j, w, c):
        ty = vtype(F32, w)
        if (w, c) not in slots:
            slots[w, c] = ([entry_alloca(k, ty) for _ in range(c)], [entry_alloca(k, ty) for _ in range(c)])
        ms, ss = slots[w, c]
        for mslot, sslot in zip(ms, ss):
            b.store(cmax.init(ty), mslot)
            b.store(csum.init(ty), sslot)

        def max_step(off):
            for mslot, jj in zip(ms, groups_at(b, b.add(off, j), w, c)):
                b.store(cmax(k, get(b, mslot), load_elem(b, src, d, jj, w)), mslot)

        def exp_step(off):
            for mslot, sslot, jj in zip(ms, ss, groups_at(b, b.add(off, j), w, c)):
                e = exp_shifted(jj, get(b, mslot), w)
                if keep_e:
                    store_elem(b, e, dst, d, jj, w)
                b.store(b.fadd(get(b, sslot), e), sslot)

        nested(b, dims, base, max_step)
        nested(b, dims, base, exp_step)
        invs = [b.fdiv(fconst(ty, 1.0), get(b, s)) for s in ss]
        mv = [get(b, s) for s in ms]

        def scale_step(off):
            for m, inv, jj in zip(mv, invs, groups_at(b, b.add(off, j), w, c)):
                e = load_elem(b, dst, d, jj, w) if keep_e else exp_shifted(jj, m, w)
                store_elem(b, b.fmul(e, inv), dst, d, jj, w)

        nested(b, dims, base, scale_step)

    with loop(b, k.begin, k.end, name="item") as item:
        row, j0, j1 = item_range(b, item, inner, chunk, nchunks)
        base = b.mul(row, i64(size * inner))
        blocks(k, j0, j1, lanes, lambda j, w, c: column(base, j, w, c))
    k.finish()
    return outer * nchunks, grain_for(size * chunk * EXP_COST)


# --- layernorm / rmsnorm -----------------------------------------------------------------------

@emitter("layernorm", "rmsnorm")
def emit_norm(k: Kernel, n):
    """Rows of the dims from ``axis`` on, one row per work item.
    layernorm: mean, then the variance around it (two passes: stable), then
    (x - mean) * rstd * scale + bias.  rmsnorm: mean of squares, then
    x * rstd * scale."""
    x = n.inputs[0].type
    d = x.dtype
    if x.size == 0:
        k.finish()
        return 0, 1
    a = n.attrs["axis"] % x.rank
    rows, size = math.prod(x.shape[:a]), math.prod(x.shape[a:])
    lanes = k.target.lanes(32)
    b = k.b
    src, scale = k.args[0], k.args[1]
    bias = k.args[2] if n.op == "layernorm" and len(n.inputs) == 3 else None
    dst = k.args[len(n.inputs)]
    eps = float(np.float32(n.attrs["eps"]))
    acc = Accumulators(k, Combiner("sum", d), lanes)

    def sv(v, w):
        return splat(b, v, w) if w > 1 else v

    def row_sum(base, f):
        acc.reset()
        blocks(k, 0, size, lanes, lambda j, w, c: acc.add(w, c, [
            f(b.add(base, jj), w) for jj in groups_at(b, j, w, c)]))
        return acc.result()

    with loop(b, k.begin, k.end, name="row") as row:
        base = b.mul(row, i64(size))
        nf = fconst(F32, float(size))
        if n.op == "layernorm":
            mean = b.fdiv(row_sum(base, lambda idx, w: load_elem(b, src, d, idx, w)), nf)

            def sq_dev(idx, w):
                t = b.fsub(load_elem(b, src, d, idx, w), sv(mean, w))
                return b.fmul(t, t)

            var = b.fdiv(row_sum(base, sq_dev), nf)
        else:
            def square(idx, w):
                v = load_elem(b, src, d, idx, w)
                return b.fmul(v, v)

            mean, var = None, b.fdiv(row_sum(base, square), nf)
        rstd = b.fdiv(fconst(F32, 1.0), call_intrinsic(k, "sqrt", b.fadd(var, fconst(F32, eps))))

        def out_pass(j, w, c):
            for jj in groups_at(b, j, w, c):
                idx = b.add(base, jj)
                v = load_elem(b, src, d, idx, w)
                if mean is not None:
                    v = b.fsub(v, sv(mean, w))
                v = b.fmul(b.fmul(v, sv(rstd, w)), load_elem(b, scale, d, jj, w))
                if bias is not None:
                    v = b.fadd(v, load_elem(b, bias, d, jj, w))
                store_elem(b, v, dst, d, idx, w)

        blocks(k, 0, size, lanes, out_pass)
    k.finish()
    return rows, grain_for(size * 3)
