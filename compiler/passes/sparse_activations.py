"""The ``sparse_activations`` pass: a GEMV whose input comes out of a ReLU
skips the weight rows of the zero activations at run time.

    sparse_activations{max_rows=4, min_bytes=65536}

A ``matmul(a, W)`` becomes ``matmul_sparse_input(a, W)`` (ir/ops.py;
codegen/sparse_input.py) when
- a is made by ``relu`` (or by a ``fused`` node whose result is a relu's):
  its zeros are exact and, in ReLU-family FFNs, typically most entries;
- W is a constant 2-D f32/f16 weight stored dense (no ``sparse`` format);
- a has at most ``max_rows`` rows (all leading dims): decoding; the kernel
  reads the union of the rows' nonzero columns, which fills up as rows grow;
- W is at least ``min_bytes``: smaller weights sit in cache, where skipping
  rows saves little.
The zeros are only known at run time: at 0% zeros the kernel reads every
row as the dense GEMV does (benchmarks/llm_decode.py measures both).  Run it
before ``fuse``, so the relu is still its own node (after fuse it is found
as a fused node's result too).  Report: one row per matmul weight considered.
"""
from __future__ import annotations

import math

from ...ir.graph import Graph, Node
from . import Context, Pass, register
from .report import LayerReport


class SparseActivationsReport(LayerReport):
    """Rows: layer (weight name), shape, rows (of a), status ("sparse input" or "dense: why")."""

    pass_name = "sparse_activations"

    def format(self) -> str:
        head = f"{'layer':<20}{'shape':>14}{'rows':>6}  status"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r['layer']:<20}{'x'.join(map(str, r['shape'])):>14}{r['rows']:>6}  {r['status']}")
        lines.append(f"{sum(r['status'] == 'sparse input' for r in self)} of {len(self)} relu-fed matmuls "
                     f"skip zero activations")
        return "\n".join(lines)


def _is_relu(node: Node | None) -> bool:
    if node is None:
        return False
    if node.op == "relu":
        return True
    if node.op == "fused":
        body = node.attrs["body"]
        last = body.producers().get(body.outputs[0])
        return last is not None and last.op == "relu"
    return False


@register
class SparseActivations(Pass):
    """matmul fed by relu -> matmul_sparse_input (see the module docstring)."""

    name = "sparse_activations"
    max_rows: int = 4
    min_bytes: int = 64 << 10

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        prod = graph.producers()
        consts = {n.output for n in graph.nodes if n.op == "const"}
        report = SparseActivationsReport()
        nodes = []
        for n in graph.nodes:
            if n.op != "matmul" or not _is_relu(prod.get(n.inputs[0])):
                nodes.append(n)
                continue
            a, w = n.inputs
            rows = math.prod(a.shape[:-1])
            row = {"layer": w.name, "shape": w.shape, "rows": rows}
            why = ("the weight is not a constant" if w not in consts else
                   "the weight is not 2-D" if w.type.rank != 2 else
                   f"stored {n.attrs.get('sparse')}" if n.attrs.get("sparse", "dense") != "dense" else
                   f"{rows} rows > max_rows={self.max_rows}" if rows > self.max_rows else
                   f"small (< {self.min_bytes} bytes)" if w.type.nbytes < self.min_bytes else None)
            if why:
                report.append(dict(row, status="dense: " + why))
                nodes.append(n)
                continue
            report.append(dict(row, status="sparse input"))
            nodes.append(Node("matmul_sparse_input", n.inputs, n.outputs, {}))
        if ctx is not None:
            ctx.add_report(self, report)
        return graph.with_nodes(nodes) if any(r["status"] == "sparse input" for r in report) else graph
