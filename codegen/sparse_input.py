"""Sparse-input GEMV: ``matmul_sparse_input(a[..., M, K], b[K, N])`` reads only
the rows of b whose entry of a is nonzero (activation sparsity: after ReLU,
most of a decoding step's FFN activations are exactly zero).

Row k of b is N contiguous values, so skipping it skips whole cache lines: at
90% zeros about a tenth of b is streamed.  Work items are spans of columns
(the GEMV's split: two threads read disjoint halves of every needed row).
Per item: clear f32 accumulator rows acc[m][span] on the stack (one array each); walk K in
chunks, first listing the chunk's used k (a[:, k] != 0 in some row of a: the
union over the M rows, one row of b serving them all; branch-free
compaction into a stack list), then adding the used rows GROUP at a time,
acc[m] += sum_t a[m, k_t] * b[k_t, span], so each pass over the
accumulators does GROUP rows' multiply-adds (as the dense GEMV does with its
KB rows); finally store the span of y.  The scan of a is repeated per item:
K compares against K x span multiply-adds when every row is used.  A NaN
in a counts as nonzero (it propagates, as in the dense product).
"""
from __future__ import annotations

import math

from ..ir import dtypes as dt
from .kernel import F32, I64, Kernel, fconst, gep, i64, load_elem, loop, splat, store_elem
from .llm import fill, stack_array
from .lower import emitter
from .matmul import cdiv, fma, imin
from .reduce import blocks, entry_alloca, get, groups_at

SPAN = 2048            # most columns of one item (an 8 KiB f32 accumulator row)
MIN_ITEMS = 4          # split N into at least this many spans when it is wide enough
ACC_FLOATS = 16384     # the accumulator rows' size on the stack, at most (64 KiB)
CHUNK = 1024           # entries of a scanned at a time for used rows (their indices: 8 KiB of stack)
GROUP = 8              # used rows of b added per pass over the accumulators (as the dense GEMV's KB)


def span_for(rows: int, n: int, lanes: int) -> int:
    """Columns per work item: at most SPAN and ACC_FLOATS // rows, a multiple
    of the vector width, cutting N into near-equal spans (at least MIN_ITEMS
    when N allows spans of 64 columns)."""
    most = max(lanes, min(SPAN, ACC_FLOATS // max(1, rows)) // lanes * lanes)
    parts = max(cdiv(n, most), min(MIN_ITEMS, max(1, n // 64)), 1)
    return min(most, lanes * cdiv(cdiv(n, parts), lanes))


@emitter("matmul_sparse_input")
def emit_matmul_sparse_input(k: Kernel, node):
    a, w = node.inputs[0].type, node.inputs[1].type
    d = a.dtype
    kk, n = w.shape
    rows = math.prod(a.shape[:-1])
    if rows * n == 0:
        k.finish()
        return 0, 1
    b = k.b
    ap, bp, yp = k.args
    lanes = k.target.lanes(32)
    span = span_for(rows, n, lanes)
    nblk = cdiv(n, span)
    tail = n - (nblk - 1) * span
    chunk = min(CHUNK, kk)
    # one accumulator row per row of a, each its own array: LLVM then knows a row's
    # stores never meet another row's loads (riscv64's scalable vectorization needs it)
    accs = [stack_array(k, F32, span) for _ in range(rows)]
    idx = stack_array(k, I64, chunk)
    count = entry_alloca(k, I64)
    zero = fconst(F32, 0.0)

    def update(ks, width: int, c0):
        """acc[m, 0:width] += sum_t a[m, ks[t]] * b[ks[t], c0:c0+width]: one pass
        over the accumulators for the len(ks) rows (two FMA chains)."""
        xs = [[load_elem(b, ap, d, b.add(kt, i64(m * kk))) for kt in ks] for m in range(rows)]
        base = [b.add(b.mul(kt, i64(n)), c0) for kt in ks]

        def body(j, wd, c):
            for jj in groups_at(b, j, wd, c):
                ws = [load_elem(b, bp, d, b.add(bt, jj), wd) for bt in base]
                for m in range(rows):
                    s = [load_elem(b, accs[m], dt.f32, jj, wd), None]
                    for t, wv in enumerate(ws):
                        xv = splat(b, xs[m][t], wd) if wd > 1 else xs[m][t]
                        s[t % 2] = b.fmul(xv, wv) if s[t % 2] is None else fma(k, xv, wv, s[t % 2])
                    store_elem(b, s[0] if s[1] is None else b.fadd(s[0], s[1]), accs[m], dt.f32, jj, wd)

        blocks(k, 0, width, lanes, body)

    def item(c0, width: int):
        for acc in accs:
            fill(k, width, acc, 0.0)
        with loop(b, 0, kk, chunk, name="chunk") as k0:
            # the used rows of this chunk of K, in order (branch-free compaction)
            b.store(i64(0), count)
            with loop(b, k0, imin(b, b.add(k0, i64(chunk)), kk), name="scan") as j:
                used = None
                for m in range(rows):
                    nz = b.fcmp_unordered("!=", load_elem(b, ap, d, b.add(j, i64(m * kk))), zero)
                    used = nz if used is None else b.or_(used, nz)
                c = get(b, count)
                b.store(j, gep(b, idx, I64, c))
                b.store(b.add(c, b.zext(used, I64)), count)
            cnt = get(b, count)
            full = b.mul(b.udiv(cnt, i64(GROUP)), i64(GROUP))
            with loop(b, 0, full, GROUP, name="grp") as g:
                update([b.load(gep(b, idx, I64, b.add(g, i64(t))), typ=I64) for t in range(GROUP)], width, c0)
            with loop(b, full, cnt, name="one") as g:
                update([b.load(gep(b, idx, I64, g), typ=I64)], width, c0)
        for r in range(rows):
            with loop(b, 0, width, name="st") as c:
                v = b.load(gep(b, accs[r], F32, c), typ=F32)
                store_elem(b, v, yp, d, b.add(b.add(c0, c), i64(r * n)))

    with loop(b, k.begin, k.end, name="item") as blk:
        c0 = b.mul(blk, i64(span))
        if tail == span:
            item(c0, span)
        else:
            with b.if_else(b.icmp_unsigned("<", blk, i64(nblk - 1))) as (full, last):
                with full:
                    item(c0, span)
                with last:
                    item(c0, tail)
    k.finish()
    return nblk, 1
