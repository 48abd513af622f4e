"""The ``fused`` op: one kernel for a whole sub-graph (made by the ``fuse`` pass).

The four shapes of body (``"map"``, ``"matmul"``, ``"conv2d"``, ``"attention"``)
are defined with the op, in ir/fusion.py (:func:`body_kind`), which the pass
reads too: this module emits every one of them.

* ``"map"``: one ``emit_map`` loop loads each body input once per element
  through its broadcast view and composes the nodes' per-vector ScalarFns:
  intermediates stay in registers.
* ``"matmul"``: the matmul kernel applies the elementwise nodes to each output
  tile before its store (the ``epilogue`` hook of codegen/matmul.py), reading
  the other inputs at (batch item, row, column) of the result.
* ``"conv2d"``: the unary nodes applied to each output vector before its store
  (the ``epilogue`` hook of codegen/conv.py).
* ``"attention"``: one work item per query row keeps its scores on the stack.

A constant input of a "matmul" or "conv2d" body is stored as its anchor's
packer lays it out (``pack_fused``: a GEMM's constant b in column panels,
codegen/matmul.py); the anchor's emitter sees the same constants
(``Kernel.consts``: the body's first inputs are the anchor's) and reads it so.

Semantics are the unfused ones exactly: an f16 intermediate is rounded to f16
where the unfused graph would have stored it.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.fusion import ANCHORS, ATTENTION_MAX_T, body_kind, epilogue_strides, is_elementwise  # noqa: F401
from ..ir.graph import Graph, Node
from ..ir.ops import BINARY, UNARY
from .elementwise import (
    ScalarFn,
    View,
    binary_fn,
    broadcast_view,
    cast_fn,
    contiguous_strides,
    emit_map,
    f_gelu,
    unary_fn,
)
from .kernel import F16, F32, Kernel, i64, splat, vtype
from .lower import PACKERS, UnsupportedOp, emitter, kernel_key, packer
from .matmul import Access, Geometry, emit_matmul


def scalar_fn(n: Node) -> ScalarFn | None:
    """The per-vector function of an elementwise node (ir.fusion.is_elementwise),
    or None for another node.  Every op of KIND "elementwise" has one, for each
    dtype it takes: a missing one is a KeyError here, not a silent non-fusion."""
    if not is_elementwise(n):
        return None
    d = n.inputs[0].dtype
    if n.op in UNARY:
        return unary_fn(n.op, d)
    if n.op in BINARY:
        return binary_fn(n.op, d)
    if n.op == "gelu":
        approximate = n.attrs["approximate"]
        return lambda k, v, lanes: f_gelu(k, v[0], lanes, approximate)
    if n.op == "cast":
        return cast_fn(d, n.attrs["to"])
    raise KeyError(f"codegen has no per-element function of the elementwise op {n.op}")


# --- evaluation of the body's elementwise nodes -------------------------------------------

def _round(b, x, d: dt.DType, n: int):
    """Round an f32 value to d's precision (f16: the unfused graph stores it)."""
    if d is not dt.f16:
        return x
    return b.fpext(b.fptrunc(x, vtype(F16, n)), vtype(F32, n))


def evaluate(k: Kernel, nodes, env: dict, n: int):
    """Run ``nodes`` on compute-type values (``env``: value -> LLVM value, updated)."""
    for node in nodes:
        env[node.output] = _round(k.b, scalar_fn(node)(k, [env[v] for v in node.inputs], n), node.output.dtype, n)
    return env


# --- packer and emitter ------------------------------------------------------------------------

@packer("fused", inputs=())
def pack_fused(node: Node, index: int, value, target=None) -> bytes | None:
    """A constant input of a matmul or conv2d body as the anchor's packer lays it
    out (the body's first inputs are the anchor's, in order); None otherwise."""
    body = node.attrs["body"]
    anchor = body.nodes[0] if body.nodes else None
    if anchor is None or index >= len(anchor.inputs) or body_kind(body) not in ("matmul", "conv2d"):
        return None
    fn = PACKERS.get(kernel_key(anchor))
    return fn(anchor, index, value, target) if fn else None



@emitter("fused")
def emit_fused(k: Kernel, node: Node):
    body = node.attrs["body"]
    kind = body_kind(body)
    if kind is None:
        raise UnsupportedOp(f"fused body @{body.name} ({', '.join(n.op for n in body.nodes)}) is not a "
                            f"kernel the fused emitter can make in one piece")
    if kind == "map":
        return _emit_map(k, body)
    if kind == "matmul":
        return _emit_matmul(k, body)
    if kind == "attention":
        return _emit_attention(k, body)
    return _emit_conv(k, body)


def _emit_map(k: Kernel, body: Graph):
    out = body.outputs[0]
    views = [broadcast_view(i, v.type, out.shape) for i, v in enumerate(body.inputs)]

    def fn(k_, vals, n):
        return evaluate(k_, body.nodes, dict(zip(body.inputs, vals)), n)[out]

    return emit_map(k, out.shape, View(len(body.inputs), out.dtype, 0, contiguous_strides(out.shape)), views, fn)


def _epilogue(k: Kernel, body: Graph, batch, y, nodes, result):
    """``epilogue(value, t, row, col, n, valid=None)``: ``result`` of the elementwise
    ``nodes`` at (batch item t, row, col .. col+n) of the matmul result ``y``
    (f32 ``value``), reading the other body inputs there (see _epilogue_strides)."""
    extra = [(i, v, epilogue_strides(batch, y.shape, v.type)) for i, v in enumerate(body.inputs)
             if any(v in n.inputs for n in nodes)]

    def epilogue(value, t, row, col, n, valid=None):
        b = k.b
        env = {y: _round(b, value, y.dtype, n)}
        for i, v, (bst, rst, cst) in extra:
            index = _batch_offset(b, batch, t, bst)
            if rst:
                index = b.add(index, b.mul(row, i64(rst)))
            if cst:
                env[v] = Access(k, k.args[i], v.dtype, n).load(b.add(index, col), valid)
            else:
                x = Access(k, k.args[i], v.dtype, 1).load(index)
                env[v] = splat(b, x, n) if n > 1 else x
        return evaluate(k, nodes, env, n)[result]

    return epilogue


def _emit_matmul(k: Kernel, body: Graph):
    mm = body.nodes[0]
    epilogue = _epilogue(k, body, Geometry(mm).out_batch, mm.output, body.nodes[1:], body.outputs[0])
    return emit_matmul(k, mm, epilogue=epilogue)


def _batch_offset(b: ir.IRBuilder, batch, t, strides):
    """Element offset of batch item ``t`` (an i64) over the dims ``batch`` in a
    view with per-batch-dim ``strides``."""
    off, rem = i64(0), t
    for d in reversed(range(len(batch))):
        size = batch[d]
        idx = b.urem(rem, i64(size)) if d else rem
        rem = b.udiv(rem, i64(size)) if d else rem
        if strides[d]:
            off = b.add(off, b.mul(idx, i64(strides[d])))
    return off


def _emit_conv(k: Kernel, body: Graph):
    from .conv import emit_conv2d
    from .conv_q import emit_conv2d_q
    from .conv_winograd import emit_winograd_output

    conv, rest = body.nodes[0], body.nodes[1:]

    def epilogue(value, n):
        return evaluate(k, rest, {conv.output: _round(k.b, value, conv.output.dtype, n)}, n)[body.outputs[0]]

    emit = {"winograd_output": emit_winograd_output, "conv2d_q": emit_conv2d_q}.get(conv.op, emit_conv2d)
    return emit(k, conv, epilogue=epilogue)


# --- attention ---------------------------------------------------------------------------------

def _emit_attention(k: Kernel, body: Graph):
    """One work item per query row (batch item, m): scores[j] = q[m, :] . kt[:, j]
    (vectors over j), the epilogue, softmax, then out[m, :] = sum_j p[j] * v[j, :]
    (vectors over the columns of v)."""
    from .elementwise import f_exp
    from .kernel import call_intrinsic, fconst, fold_loop, loop
    from .matmul import MIN_PARALLEL_FMAS, _grain, _stack_array, cdiv, fma

    mm1, rest, sm, mm2 = body.nodes[0], body.nodes[1:-2], body.nodes[-2], body.nodes[-1]
    q, kt, v = mm1.inputs[0].type, mm1.inputs[1].type, mm2.inputs[1].type
    batch = q.shape[:-2]
    M, D, T, E = q.shape[-2], q.shape[-1], kt.shape[-1], v.shape[-1]
    items = math.prod(batch) * M
    if items * E == 0:
        k.finish()
        return 0, 1
    b = k.b
    lanes = k.target.lanes(32)
    Q1 = Access(k, k.args[0], dt.f32, 1)
    KT = Access(k, k.args[1], dt.f32, lanes)
    V = Access(k, k.args[body.inputs.index(mm2.inputs[1])], dt.f32, lanes)
    O = Access(k, k.args[-1], dt.f32, lanes)
    scores = _stack_array(k, cdiv(T, lanes) * lanes, "scores")
    S, S1 = Access(k, scores, dt.f32, lanes), Access(k, scores, dt.f32, 1)
    epilogue = _epilogue(k, body, batch, mm1.output, rest, sm.inputs[0])
    zero = fconst(vtype(F32, lanes), 0.0)

    def blocks(n, block):
        """block(j, valid) over [0, n) in vectors: a loop of whole ones, then the tail."""
        with loop(b, 0, n - n % lanes, lanes, name="blk") as j:
            block(j, None)
        if n % lanes:
            block(i64(n - n % lanes), n % lanes)

    with loop(b, k.begin, k.end, name="row") as item:
        bt, m = b.udiv(item, i64(M)), b.urem(item, i64(M))
        q_row, kt_off = b.mul(item, i64(D)), b.mul(bt, i64(D * T))
        v_off, o_row = b.mul(bt, i64(T * E)), b.mul(item, i64(E))

        def score(j, valid):
            def step(d, acc):
                x = Q1.load(b.add(q_row, d))
                kv = KT.load(b.add(kt_off, b.add(b.mul(d, i64(T)), j)), valid)
                return [fma(k, splat(b, x, lanes) if lanes > 1 else x, kv, acc[0])]
            acc = fold_loop(b, 0, D, [zero], step, name="d")[0]
            S.store(epilogue(acc, bt, m, j, lanes, valid), j)  # the array is padded to whole vectors

        blocks(T, score)
        mx = fold_loop(b, 1, T, [S1.load(i64(0))], lambda j, a: [call_intrinsic(k, "maximum", a[0], S1.load(j))],
                       name="mx")[0]

        def expo(j, a):
            e = f_exp(k, b.fsub(S1.load(j), mx), 1)
            S1.store(e, j)
            return [b.fadd(a[0], e)]

        inv = b.fdiv(fconst(F32, 1.0), fold_loop(b, 0, T, [fconst(F32, 0.0)], expo, name="ex")[0])

        def out(c, valid):
            def step(j, acc):
                p = b.fmul(S1.load(j), inv)
                vv = V.load(b.add(v_off, b.add(b.mul(j, i64(E)), c)), valid)
                return [fma(k, splat(b, p, lanes) if lanes > 1 else p, vv, acc[0])]
            O.store(fold_loop(b, 0, T, [zero], step, name="t")[0], b.add(o_row, c), valid)

        blocks(E, out)
    k.finish()
    return items, _grain(T * (D + E), MIN_PARALLEL_FMAS)
