"""gather(table, ids, axis): ``table.take(ids, axis)``, the embedding lookup.

The table is viewed as [outer, n, inner] around ``axis`` and the output as
[outer, ids.size, inner]; a work item copies one row of ``inner`` elements
with ``llvm.memcpy`` (LLVM turns short constant-size copies into loads and
stores).  An id outside [-n, n) makes the kernel return SQK_ERR_INDEX
instead of reading out of bounds.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.graph import IRError
from ..runtime.abi import ERR_INDEX as SQK_ERR_INDEX
from .elementwise import MIN_PARALLEL_WORK
from .kernel import I1, I8, I64, PTR, Kernel, gep, i64, lltype, loop
from .lower import emitter


def checked_id(b, idp, ids_dtype, i, rows: int, fail):
    """ids[i] as an i64 index in [0, rows): a negative id counts from the end; anything else
    branches to ``fail`` (SQK_ERR_INDEX).  The compare is unsigned: an id still negative after
    wrapping is huge, so one compare covers both ends."""
    idx = b.load(gep(b, idp, lltype(ids_dtype), i), typ=lltype(ids_dtype))
    if ids_dtype is not dt.i64:
        idx = b.sext(idx, I64)
    idx = b.select(b.icmp_signed("<", idx, i64(0)), b.add(idx, i64(rows)), idx)
    ok = b.append_basic_block("in_range")
    b.cbranch(b.icmp_unsigned("<", idx, i64(rows)), ok, fail)
    b.position_at_end(ok)
    return idx


@emitter("gather")
def emit_gather(k: Kernel, n):
    table, ids = n.inputs[0].type, n.inputs[1].type
    if table.rank == 0:
        raise IRError("gather: the table must have at least one dim")
    axis = n.attrs["axis"] % table.rank
    outer, rows, inner = math.prod(table.shape[:axis]), table.shape[axis], math.prod(table.shape[axis + 1:])
    nids = ids.size
    if outer * nids * inner == 0:
        k.finish()
        return 0, 1
    b = k.b
    src, idp, dst = k.args
    row_bytes = inner * table.dtype.bits // 8
    memcpy = k.intrinsic("llvm.memcpy.p0.p0.i64", ir.VoidType(), [PTR, PTR, I64, I1])
    fail = k.fail(SQK_ERR_INDEX)
    k.index_error = (f"gather: every id in %{n.inputs[1].name} must lie in [{-rows}, {rows}), the size of "
                     f"axis {axis} of the table %{n.inputs[0].name} (e.g. the vocabulary)")
    with loop(b, k.begin, k.end, name="item") as item:
        o, i = (b.udiv(item, i64(nids)), b.urem(item, i64(nids))) if outer > 1 else (i64(0), item)
        idx = checked_id(b, idp, ids.dtype, i, rows, fail)
        src_row = b.add(b.mul(o, i64(rows)), idx) if outer > 1 else idx
        b.call(memcpy, [b.gep(dst, [b.mul(item, i64(row_bytes))], inbounds=True, source_etype=I8),
                        b.gep(src, [b.mul(src_row, i64(row_bytes))], inbounds=True, source_etype=I8),
                        i64(row_bytes), ir.Constant(I1, 0)])
    k.finish()
    return outer * nids, max(1, 4 * MIN_PARALLEL_WORK // max(1, row_bytes))


@emitter("gather_elements")
def emit_gather_elements(k: Kernel, n):
    """One work item per row of ids' last dim: the x offset of the row's other
    dims is built once, then each id replaces the index on ``axis``.  Ids out of
    [-n, n) return SQK_ERR_INDEX."""
    x, ids = n.inputs[0].type, n.inputs[1].type
    r = x.rank
    axis = n.attrs["axis"] % r
    if ids.size == 0:
        k.finish()
        return 0, 1
    xst = [math.prod(x.shape[d + 1:]) for d in range(r)]
    outer, inner = ids.shape[:-1], ids.shape[-1]
    rows = math.prod(outer)
    ety = lltype(x.dtype)
    b = k.b
    src, idp, dst = k.args
    fail = k.fail(SQK_ERR_INDEX)
    with loop(b, k.begin, k.end, name="row") as row:
        base, rem = i64(0), row
        for d in reversed(range(r - 1)):
            idx = b.urem(rem, i64(outer[d])) if d else rem
            rem = b.udiv(rem, i64(outer[d])) if d else rem
            if d != axis:
                base = b.add(base, b.mul(idx, i64(xst[d])))
        with loop(b, 0, inner, name="j") as j:
            flat = b.add(b.mul(row, i64(inner)), j)
            idx = checked_id(b, idp, ids.dtype, flat, x.shape[axis], fail)
            off = b.add(base, b.mul(idx, i64(xst[axis])))
            if axis != r - 1:
                off = b.add(off, j)
            b.store(b.load(gep(b, src, ety, off), typ=ety), gep(b, dst, ety, flat))
    k.finish()
    return rows, max(1, MIN_PARALLEL_WORK // max(1, inner))
