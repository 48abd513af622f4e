"""The ``im2col`` pass: strided convolutions as a GEMM.

    im2col{min_channels=16}

A conv2d with groups 1, a constant filter w [C_out, C_in, KH, KW] (not 1x1),
a stride above 1 and at least ``min_channels`` input and output channels
becomes

    cols = im2col(x)                                 [N, C_in*KH*KW, OH*OW]
    y = reshape(w2 @ cols + bias[:, None])           w2 = w.reshape(C_out, C_in*KH*KW)

so codegen/matmul.py's GEMM runs it (w2 its a, read in place; the bias add
fuses into its epilogue; the reshape is a view).  The rule is measured (Zen 3,
AVX2, loaded, 1 thread): on resnet18's stride-2 3x3 layers (64->128 at 56x56,
128->256 at 28x28, 256->512 at 14x14, with bias and relu) im2col + GEMM took
0.54-0.64x the direct kernel's time; on the 7x7 stride-2 stem of 3 channels im2col + GEMM
was no faster (7.3 vs 6.9 ms), hence ``min_channels``.  Stride-1 layers are
winograd's or the direct kernel's.  Sums run in the GEMM's order: results
differ from the direct kernel by f32 rounding.
"""
from __future__ import annotations

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, TensorType, Value
from . import Context, Pass, option, register
from .quantize import _fresh
from .winograd import rewrite_convs


@register
class Im2col(Pass):
    """Strided conv2d layers as im2col + GEMM (see the module docstring)."""

    name = "im2col"
    min_channels: int = option(16, "C_in and C_out at least this")

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        return rewrite_convs(graph, ctx, self._takes, _rewrite)

    def _takes(self, n: Node, consts: dict) -> bool:
        if n.op != "conv2d" or n.attrs["groups"] != 1 or n.inputs[1] not in consts:
            return False
        co, ci, kh, kw = n.inputs[1].shape
        return (n.inputs[0].dtype in dt.FLOATS and kh * kw > 1 and max(n.attrs["strides"]) > 1
                and min(ci, co) >= self.min_channels)


def _rewrite(n: Node, w, taken: set) -> list[Node]:
    """The nodes standing for conv2d ``n`` (its output value kept)."""
    x, wv = n.inputs[:2]
    y = n.output
    nb, co, oh, ow = y.shape
    k = int(np.prod(w.shape[1:]))
    d = y.dtype
    a = n.attrs
    w2 = np.ascontiguousarray(np.asarray(w).reshape(co, k))
    w2.setflags(write=False)
    vw = Value(_fresh(f"{wv.name}_2d", taken), TensorType(wv.dtype, (co, k)))
    cols = Value(_fresh(f"{y.name}_cols", taken), TensorType(d, (nb, k, oh * ow)))
    mm = Value(_fresh(f"{y.name}_mm", taken), TensorType(d, (nb, co, oh * ow)))
    out = [Node("const", (), (vw,), {"value": w2}),
           Node("im2col", (x,), (cols,), {"kernel": tuple(w.shape[2:]), "strides": tuple(a["strides"]),
                                          "pads": tuple(a["pads"]), "dilations": tuple(a["dilations"])}),
           Node("matmul", (vw, cols), (mm,), {"sparse": "dense"})]
    if len(n.inputs) == 3:
        bias = n.inputs[2]
        b2 = Value(_fresh(f"{bias.name}_col", taken), TensorType(bias.dtype, (co, 1)))
        summed = Value(_fresh(f"{y.name}_biased", taken), mm.type)
        out += [Node("reshape", (bias,), (b2,), {"shape": (co, 1)}), Node("add", (mm, b2), (summed,), {})]
        mm = summed
    out.append(Node("reshape", (mm,), (y,), {"shape": tuple(y.shape)}))
    return out
