"""The ``winograd`` pass: 3x3 stride-1 convolutions as winograd F(2x2, 3x3).

    winograd{min_channels=16, min_tiles=8}

A conv2d with a constant f32 filter [C_out, C_in, 3, 3], strides and
dilations 1, groups 1, becomes

    v = winograd_input(x)            [16, tiles, C_in]   B^T d B per 4x4 input tile
    m = matmul(v, u)                 [16, tiles, C_out]  u = G w G^T, a constant
    y = winograd_output(m, bias)     [N, C_out, OH, OW]  A^T m A per tile, + bias

(ir/ops.py).  The 16 GEMMs do 16 multiply-adds per C_in x C_out pair and 2x2
outputs where the direct kernel does 36: 2.25x fewer; u is packed at compile
time like any constant b (codegen/matmul.py), and a following activation
fuses into winograd_output as it did into the conv2d.

Numerics: the transforms reorder the sums (and u is rounded to f32), so the
result differs from the direct convolution by f32 rounding: on the tested
shapes within 1e-5 of the output's largest magnitude for unit-scale data
(tests/test_winograd.py), a few times the direct kernel's own difference
from the numpy reference.

The rule (measured on Zen 3, AVX2, resnet18's layers, 1 thread: the GEMMs
alone took 0.35-0.5 of the direct kernel's time at 64-512 channels): both
channel counts at least ``min_channels`` (fewer channels: the transforms'
memory traffic is not repaid) and at least ``min_tiles`` tiles (the GEMMs
need rows: fewer take the few-row kernel).  riscv64 keeps the direct
kernel (not measured there).
"""
from __future__ import annotations

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, TensorType, Value
from ...ir.ops import winograd_filter, winograd_tiles
from . import Context, Pass, option, register
from .quantize import _fresh


def winograd_eligible(node: Node, consts: dict) -> bool:
    """A conv2d winograd F(2x2, 3x3) computes: f32, constant 3x3 filter, strides and
    dilations 1, groups 1."""
    a = node.attrs
    return (node.op == "conv2d" and node.inputs[1] in consts and node.inputs[0].dtype is dt.f32
            and node.inputs[1].shape[2:] == (3, 3) and tuple(a["strides"]) == (1, 1)
            and tuple(a["dilations"]) == (1, 1) and a["groups"] == 1)


@register
class Winograd(Pass):
    """3x3 stride-1 conv2d layers as winograd F(2x2, 3x3) (see the module docstring)."""

    name = "winograd"
    min_channels: int = option(16, "C_in and C_out at least this")
    min_tiles: int = option(8, "2x2 output tiles (all images) at least this")

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        return rewrite_convs(graph, ctx, lambda n, consts: winograd_eligible(n, consts) and self._pays(n), _rewrite)

    def _pays(self, node: Node) -> bool:
        n, c_out, oh, ow = node.output.shape
        c_in = node.inputs[0].shape[1]
        th, tw = winograd_tiles(oh, ow)
        return min(c_in, c_out) >= self.min_channels and n * th * tw >= self.min_tiles


def rewrite_convs(graph: Graph, ctx: Context | None, takes, rewrite) -> Graph:
    """``graph`` with each node ``takes(node, consts)`` accepts replaced by
    ``rewrite(node, its constant weight, taken names)``; riscv64 keeps its direct
    convolution kernels (the winograd and im2col passes share this walk)."""
    target = getattr(ctx, "target", None)
    if target is not None and getattr(target, "name", "") == "riscv64":
        return graph
    consts = {n.output: n.attrs["value"] for n in graph.nodes if n.op == "const"}
    taken = {v.name for v in graph.values()}
    nodes, changed = [], False
    for node in graph.nodes:
        if not takes(node, consts):
            nodes.append(node)
            continue
        nodes.extend(rewrite(node, consts[node.inputs[1]], taken))
        changed = True
    return graph.with_nodes(nodes) if changed else graph


def _rewrite(node: Node, w, taken: set) -> list[Node]:
    """The nodes standing for conv2d ``node`` (its output value kept)."""
    x, wv = node.inputs[:2]
    y = node.output
    n, c_out, oh, ow = y.shape
    th, tw = winograd_tiles(oh, ow)
    tiles = n * th * tw
    u = winograd_filter(w)
    u.setflags(write=False)
    uv = Value(_fresh(f"{wv.name}_winograd", taken), TensorType(dt.f32, u.shape))
    v = Value(_fresh(f"{y.name}_wgin", taken), TensorType(dt.f32, (16, tiles, x.shape[1])))
    m = Value(_fresh(f"{y.name}_wgmm", taken), TensorType(dt.f32, (16, tiles, c_out)))
    return [Node("const", (), (uv,), {"value": u}),
            Node("winograd_input", (x,), (v,), {"pads": tuple(node.attrs["pads"])}),
            Node("matmul", (v, uv), (m,), {"sparse": "dense"}),
            Node("winograd_output", (m, *node.inputs[2:]), (y,), {"shape": tuple(y.shape)})]
