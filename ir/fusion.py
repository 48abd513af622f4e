"""What a ``fused`` node may hold: the four shapes of body one kernel computes.

The ``fuse`` pass makes only these bodies and codegen (codegen/fused.py)
emits every one of them; both read :func:`body_kind`, so the pass needs
nothing of codegen.  The shapes:

* ``"map"``: elementwise ops only (ops of KIND "elementwise": unary, binary
  with broadcasting, gelu, cast), every node's result of the body's output
  shape.
* ``"matmul"``: a dense f32/f16 matmul, then elementwise nodes of its
  result's shape and dtype (bias add, activation, residual add, scale, mask
  ...) applied to each output tile before its store.  The other inputs of
  the epilogue are read at (batch item, row, column) of the result: a view
  must step by a fixed stride along the (folded) rows, and the batch dims
  must not be folded into rows unless the view is linear over them
  (:func:`epilogue_strides`).
* ``"conv2d"``: conv2d (or winograd_output, its output transform, or the int8
  conv2d_q) then unary elementwise nodes (relu ...).
* ``"attention"``: matmul(q, kt), an elementwise epilogue (scale, mask),
  softmax over the last axis, matmul with v: f32, at most ATTENTION_MAX_T
  keys (one work item per query row keeps its scores on the stack).
"""
from __future__ import annotations

from . import dtypes as dt
from .graph import Graph, Node, TensorType
from .ops import OPS

ANCHORS = ("matmul", "conv2d", "winograd_output", "conv2d_q")
# Keys per query row the attention kernel holds (scores on the stack): short sequences.
ATTENTION_MAX_T = 256


def is_elementwise(n: Node) -> bool:
    """``n`` is one node a map or an epilogue can compose (KIND "elementwise")."""
    return OPS[n.op].kind == "elementwise" and len(n.outputs) == 1 and bool(n.inputs)


def broadcast_strides(t: TensorType, out_shape) -> list[int]:
    """Per dim of ``out_shape``, the element stride of a C-ordered ``t``
    broadcast (numpy rules) to it: 0 along broadcast dims."""
    pad = len(out_shape) - t.rank
    st, acc = [], 1
    for d in reversed(t.shape):
        st.append(acc)
        acc *= d
    st.reverse()
    return [0] * pad + [0 if d == 1 and o != 1 else s for d, s, o in zip(t.shape, st, out_shape[pad:])]


def batch_strides(shape, out_batch, matrix_size: int) -> tuple[int, ...]:
    """Per output batch dim of a matmul, the element stride of an operand whose
    batch dims are ``shape`` and matrices ``matrix_size`` elements (0 where it
    broadcasts)."""
    pad = len(out_batch) - len(shape)
    strides, acc = [], matrix_size
    for d in reversed(range(len(shape))):
        strides.append(0 if shape[d] == 1 else acc)
        acc *= shape[d]
    return tuple([0] * pad + strides[::-1])


def folds_batch(out_batch, a_strides, b_strides) -> bool:
    """The matmul kernel computes [batch*M, K] @ [K, N] in one problem: b is
    shared by every batch item and a is not broadcast."""
    return bool(out_batch) and not any(b_strides) and all(a_strides[i] for i, d in enumerate(out_batch) if d != 1)


def matmul_batch(node: Node) -> tuple[int, ...]:
    """The batch dims the matmul kernel of ``node`` walks: () when it folds them into rows."""
    a, b = (v.type for v in node.inputs)
    out_batch = tuple(node.outputs[0].shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if folds_batch(out_batch, batch_strides(a.shape[:-2], out_batch, m * k), batch_strides(b.shape[:-2], out_batch,
                                                                                              k * n)):
        return ()
    return out_batch


def body_kind(body: Graph) -> str | None:
    """"map", "matmul", "conv2d" or "attention" when one fused kernel computes
    ``body`` (the module docstring), else None."""
    if len(body.outputs) != 1 or not body.nodes or any(len(n.outputs) != 1 for n in body.nodes):
        return None
    first = body.nodes[0]
    if len(body.nodes) >= 3 and first.op == "matmul" and body.nodes[-2].op == "softmax":
        return "attention" if attention_ok(body) else None
    if first.op not in ANCHORS:
        shape = body.outputs[0].shape
        if all(is_elementwise(n) and n.output.shape == shape for n in body.nodes):
            return "map"
        return None
    # the anchor reads the body's first inputs in order; the rest is its epilogue
    if tuple(body.inputs[:len(first.inputs)]) != first.inputs or len(set(first.inputs)) != len(first.inputs):
        return None
    y = first.output
    rest = body.nodes[1:]
    if any(not is_elementwise(n) or n.output.type != y.type for n in rest):
        return None
    if first.op == "matmul":
        if first.attrs["sparse"] != "dense" or y.dtype not in dt.FLOATS:
            return None
        batch = matmul_batch(first)
        extra = [v for v in body.inputs if any(v in n.inputs for n in rest)]
        return "matmul" if all(epilogue_strides(batch, y.shape, v.type) is not None for v in extra) else None
    # conv2d: unary nodes on the running value only (no other inputs per element)
    if y.dtype in dt.FLOATS and all(len(n.inputs) == 1 and n.inputs[0] not in body.inputs for n in rest):
        return "conv2d"
    return None


def epilogue_strides(batch, out_shape, t: TensorType) -> tuple | None:
    """(per batch dim strides, row stride, column stride) in elements of a body
    input of type ``t`` read at (batch item, row, column) of a matmul result of
    ``out_shape``, whose kernel walks the batch dims ``batch`` (() when it
    folds them into rows: :func:`matmul_batch`), or None when folded rows do
    not step by one stride."""
    st = broadcast_strides(t, out_shape)
    if len(out_shape) < 2:
        return None
    if batch or len(out_shape) == 2:
        return tuple(st[:-2]), st[-2], st[-1]
    # the batch dims were folded into M: row r of the folded [M', N] must sit at r * stride
    dims = [(d, s) for d, s in zip(out_shape[:-1], st[:-1]) if d != 1]
    row = dims[-1][1] if dims else 0
    acc = row
    for d, s in reversed(dims):
        if s != acc:
            return None
        acc = s * d
    return (), row, st[-1]


def attention_ok(body: Graph) -> bool:
    """matmul(q, kt) -> elementwise epilogue -> softmax(last axis) -> matmul(., v) in
    f32, q, kt and v with the same batch dims, at most ATTENTION_MAX_T keys."""
    nodes = body.nodes
    mm1, rest, sm, mm2 = nodes[0], nodes[1:-2], nodes[-2], nodes[-1]
    if mm2.op != "matmul" or mm2.inputs[0] is not sm.output or len(body.outputs) != 1 or \
            body.outputs[0] is not mm2.output:
        return False
    q, kt = mm1.inputs
    v = mm2.inputs[1]
    if tuple(body.inputs[:2]) != (q, kt) or q is kt or v not in body.inputs:
        return False
    y = mm1.output
    batch = q.shape[:-2]
    if not (y.dtype is dt.f32 and q.type.rank == kt.type.rank == v.type.rank and kt.shape[:-2] == batch
            and v.shape[:-2] == batch and v.shape[-2] == kt.shape[-1] and 1 <= kt.shape[-1] <= ATTENTION_MAX_T
            and mm1.attrs["sparse"] == mm2.attrs["sparse"] == "dense"):
        return False
    if sm.attrs["axis"] % y.type.rank != y.type.rank - 1 or sm.inputs[0] is not (rest[-1].output if rest else y):
        return False
    if any(not is_elementwise(n) or n.output.type != y.type for n in rest):
        return False
    extra = [x for x in body.inputs if any(x in n.inputs for n in rest)]
    return all(epilogue_strides(batch, y.shape, x.type) is not None for x in extra)

