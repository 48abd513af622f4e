"""Static cost of each kernel: bytes it moves and floating-point operations it does.

Computed at compile time from shapes (and, for sparse weights, from the
constant's values); stored per kernel in the artifact manifest, where
``Module.profile`` and ``sqk bench`` divide them by measured time.

Bytes: every distinct input read once plus every output written once, a
constant at the size it is stored in the constants blob (packed: int4 at half
a byte, a sparse weight as its packed nonzeros and indices).  Caches are
ignored: a weight re-read per output tile counts once, which is the traffic a
roofline needs.  ``gather`` and ``slice`` count the elements they read, not
their whole source.

FLOPs, the useful arithmetic of the op as written (a kernel that pads or
recomputes does more):

* matmul, matmul_q, matmul_ggml: 2*M*N*K (M all rows, batch dims folded in); with a
  non-dense ``sparse`` format 2*M*nnz, nnz the weight constant's nonzeros
  (for N:M without a constant value: K*N*n/m).  int8-activation matmul_q
  counts its integer multiply-adds the same way.
* conv2d: 2*N*OC*OH*OW*(IC/groups)*KH*KW (the bias add is not counted); conv2d_q the
  same in integer multiply-adds (input channels padded to quads); winograd_input 32 adds
  per tile and channel, winograd_output 24 per tile and output channel.
* elementwise (unary, binary, gelu, cast, ...): 1 per output element.
* reductions (reduce_*): 1 per input element; global_avgpool likewise.
* maxpool2d / avgpool2d: KH*KW per output element.
* softmax: 5 per element (max, subtract, exp, sum, divide); layernorm: 8
  (mean, subtract, square, sum, normalize, scale, bias); rmsnorm: 5.
  exp/erf count as one operation, like every elementwise function.
* data movement and indexing (ops of KIND "movement" or "index": reshape,
  transpose, concat, slice, expand, gather, gather_elements; output copies): 0.
* fused (a ``body`` sub-graph run as one kernel): the sum of its body nodes'
  FLOPs; its bytes are the fused node's own inputs and outputs (the
  intermediates stay in registers: that is the point of fusing).
* an op not listed here (a new or fused op): 1 per output element.
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS
from ..ir.sparsity import parse_format

_PER_ELEMENT = {"softmax": 5, "layernorm": 8, "rmsnorm": 5}


def _size(v: Value) -> int:
    return int(np.prod(v.shape, dtype=np.int64))


def _nbytes(v: Value, stored_bytes) -> int:
    return int((stored_bytes or {}).get(v, v.type.nbytes))


def _rows(v: Value) -> int:
    """All rows of a [..., M, N] tensor: M times every batch dim."""
    return _size(v) // v.shape[-1] if v.shape and v.shape[-1] else 0


def _matmul_flops(node: Node, consts) -> int:
    out = node.outputs[0]
    w = node.inputs[1]
    k = w.shape[-2]
    fmt = parse_format(node.attrs.get("sparse", "dense"))
    if fmt.dense:
        return 2 * _size(out) * k
    value = (consts or {}).get(w)
    if value is not None:
        nnz = int(np.count_nonzero(value))
    elif fmt.kind == "nm":
        nnz = w.shape[-2] * w.shape[-1] * fmt.n // fmt.m
    else:  # no values to count: the dense bound
        nnz = w.shape[-2] * w.shape[-1]
    return 2 * _rows(out) * nnz


def node_cost(node: Node, stored_bytes: dict | None = None, consts: dict | None = None) -> tuple[int, int]:
    """``(bytes moved, flops)`` of the kernel that runs ``node`` (see the module
    docstring for what is counted).  ``stored_bytes`` maps a constant Value to
    its stored size when that differs from its type's (packed constants);
    ``consts`` maps a constant Value to its array (sparse weights count their
    nonzeros)."""
    ins = [v for v in dict.fromkeys(node.inputs) if v is not None]  # a value read twice moves once
    outs = list(node.outputs)
    out_bytes = sum(_nbytes(v, stored_bytes) for v in outs)
    op, out = node.op, outs[0] if outs else None
    if op == "gather":  # the ids, and one table row per output row
        in_bytes = _nbytes(node.inputs[1], stored_bytes) + out.type.nbytes
    elif op in ("gather_q", "gather_ggml"):  # the ids, and (at most) the f32 output's bytes of codes and scales
        in_bytes = _nbytes(node.inputs[0], stored_bytes) + out.type.nbytes
    elif op == "slice":
        in_bytes = out.type.nbytes
    else:
        in_bytes = sum(_nbytes(v, stored_bytes) for v in ins)

    if op in ("matmul", "matmul_q"):
        flops = _matmul_flops(node, consts)
    elif op == "matmul_ggml":   # blocks [N, row bytes]: K from x
        flops = 2 * _size(out) * node.inputs[0].shape[-1]
    elif op == "conv2d":
        _, cig, kh, kw = node.inputs[1].shape
        flops = 2 * _size(out) * cig * kh * kw
    elif op == "conv2d_q":   # q [C_out, C4, KH, KW, 4]: integer multiply-adds, padded channels included
        _, c4, kh, kw, quad = node.inputs[1].shape
        flops = 2 * _size(out) * c4 * quad * kh * kw
    elif op == "winograd_output":   # the 24 adds of A^T m A per 2x2 outputs (the GEMM is its own matmul)
        flops = 16 * node.inputs[0].shape[1] * node.inputs[0].shape[2] * 3 // 2
    elif op == "winograd_input":    # the 32 adds of B^T d B per tile and channel
        flops = 2 * _size(out)
    elif op in ("maxpool2d", "avgpool2d"):
        kh, kw = node.attrs["kernel"]
        flops = _size(out) * kh * kw
    elif OPS[op].kind == "reduction" or op == "global_avgpool":
        flops = _size(node.inputs[0])
    elif op in _PER_ELEMENT:
        flops = _PER_ELEMENT[op] * _size(out)
    elif OPS[op].kind in ("movement", "index"):
        flops = 0
    elif op == "fused":
        body = node.attrs["body"]
        inner = {bv: consts[v] for bv, v in zip(body.inputs, node.inputs) if consts and v in consts}
        flops = sum(node_cost(n, None, inner)[1] for n in body.nodes)
    else:  # elementwise, and any op this table does not know
        flops = sum(_size(v) for v in outs)
    return in_bytes + out_bytes, flops


def kernel_costs(graph: Graph, steps, buffers: dict, stored_bytes: dict | None = None,
                 in_place_outputs=frozenset()) -> list:
    """``(bytes, flops)`` of each step that ``codegen.lower.lower`` made of
    ``graph``: one per node that is neither a const nor a view (a reshape in
    its input's buffer, ``codegen.lower.is_view``), in order, then an output copy for each
    graph output that is not in its own output buffer (``buffers`` is the
    memory plan's value -> (kind, index) map) nor in ``in_place_outputs``, as
    ``lower`` does.  Steps are
    matched by name (``k<i>_<op>``); if lowering made other kernels than that,
    every entry is None rather than a cost attributed to the wrong kernel."""
    from ..codegen.lower import BUF_OUTPUT, is_view

    consts = {n.output: n.attrs["value"] for n in graph.nodes if n.op == "const"}
    plan = [(n.op, node_cost(n, stored_bytes, consts)) for n in graph.nodes
            if n.op != "const" and not is_view(n, buffers)]
    seen = set()
    for j, v in enumerate(graph.outputs):
        if (buffers[v] != (BUF_OUTPUT, j) or v in seen) and v not in in_place_outputs:
            plan.append(("copy", (_nbytes(v, stored_bytes) + v.type.nbytes, 0)))
        seen.add(v)
    if len(plan) != len(steps) or any(not s.name.endswith("_" + op) for s, (op, _) in zip(steps, plan)):
        return [None] * len(steps)
    return [cost for _, cost in plan]


__all__ = ["node_cost", "kernel_costs"]
