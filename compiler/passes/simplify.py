"""fold_constants and dce."""
from __future__ import annotations

import numpy as np

from ...ir.graph import Graph, Node
from ...ir.ops import OPS
from . import Context, Pass, register

# Folding may not create constants larger than this (bytes): a broadcast of a
# small constant to a huge shape is cheaper to compute than to store and load.
FOLD_LIMIT = 64 << 20


@register
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants with the reference semantics."""

    name = "fold_constants"
    limit: int = FOLD_LIMIT

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        consts = {n.output: n.attrs["value"] for n in graph.nodes if n.op == "const"}
        nodes = []
        for n in graph.nodes:
            if n.op != "const" and n.inputs and all(v in consts for v in n.inputs) \
                    and sum(v.type.nbytes for v in n.outputs) <= self.limit:
                try:
                    with np.errstate(all="ignore"):
                        vals = OPS[n.op].reference(*[consts[v] for v in n.inputs], **n.attrs)
                except (IndexError, ValueError):
                    nodes.append(n)  # leave it to fail at run time with the runtime's error
                    continue
                for v, a in zip(n.outputs, vals):
                    a = np.array(a, dtype=v.dtype.np_dtype, order="C")  # keeps 0-d shapes
                    a.setflags(write=False)
                    consts[v] = a
                    nodes.append(Node("const", (), (v,), {"value": a}))
            else:
                nodes.append(n)
        return graph.with_nodes(nodes)


@register
class DeadCodeElimination(Pass):
    """Drop nodes none of whose results reach an output."""

    name = "dce"

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        live = set(graph.outputs)
        keep = []
        for n in reversed(graph.nodes):
            if any(v in live for v in n.outputs):
                keep.append(n)
                live.update(n.inputs)
        return graph.with_nodes(reversed(keep))
