"""im2col (ir/ops.py, codegen/conv_im2col.py) and the im2col pass
(compiler/passes/im2col.py): strided convolutions as a GEMM.

The op moves elements: exact.  The convolution through it sums in the GEMM's
order, so it matches the direct reference within f32 rounding (1e-5 of the
output's largest magnitude here, unit-scale data)."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.compiler.passes.im2col import Im2col
from sqk.ir.ops import OPS
from harness import compile_for, host_avx2

CASES = {   # x shape, kernel, strides, pads, dilations
    "stem": ((1, 3, 30, 31), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
    "3x3_s2": ((2, 5, 9, 13), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "rect_dilated": ((1, 3, 10, 11), (3, 2), (3, 2), (0, 2, 1, 0), (2, 1)),
    "pads_beyond_input": ((1, 1, 3, 3), (3, 3), (1, 1), (4, 5, 4, 5), (1, 1)),
    "wide_stride3": ((1, 2, 5, 70), (1, 5), (1, 3), (0, 1, 0, 1), (1, 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_im2col_exact(case, dtype):
    shape, kernel, strides, pads, dil = CASES[case]
    g = sqk.GraphBuilder("i")
    g = g.output(g.im2col(g.input("x", shape, dtype), kernel=kernel, strides=strides, pads=pads, dilations=dil))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float16 if dtype == "f16" else np.float32)
    want = OPS["im2col"].reference(x, kernel=kernel, strides=strides, pads=pads, dilations=dil)[0]
    assert np.array_equal(sqk.compile(g)(x=x), want)


def test_im2col_riscv64():
    shape, kernel, strides, pads, dil = CASES["3x3_s2"]
    g = sqk.GraphBuilder("i")
    g = g.output(g.im2col(g.input("x", shape), kernel=kernel, strides=strides, pads=pads, dilations=dil))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = OPS["im2col"].reference(x, kernel=kernel, strides=strides, pads=pads, dilations=dil)[0]
    assert np.array_equal(compile_for(g, "riscv64")(x=x), want)


def _conv(shape, c_out, strides, pads, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((c_out, shape[1], 3, 3)) / np.sqrt(9 * shape[1])).astype(np.float32)
    bv = rng.standard_normal(c_out).astype(np.float32) if bias else None
    g = sqk.GraphBuilder("c")
    y = g.relu(g.conv2d(g.input("x", shape), g.const(w, name="w"), *([g.const(bv, name="b")] if bias else []),
                        strides=strides, pads=pads))
    x = rng.standard_normal(shape).astype(np.float32)
    ref = np.maximum(OPS["conv2d"].reference(x, w, bv, strides=strides, pads=pads, dilations=(1, 1), groups=1)[0], 0)
    return g.output(y), x, ref


@pytest.mark.parametrize("bias", [True, False])
def test_default_pipeline_takes_strided_layers(monkeypatch, bias):
    host_avx2(monkeypatch)
    g, x, ref = _conv((2, 16, 15, 17), 24, (2, 2), (1, 1, 1, 1), bias)
    m = sqk.compile(g, threads=2)
    assert "im2col" in [n.op for n in m.ir.nodes] and "conv2d" not in [n.op for n in m.ir.nodes]
    got = m(x=x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_rule():
    g, _, _ = _conv((1, 8, 15, 17), 24, (2, 2), (1, 1, 1, 1))          # few input channels: direct
    assert [n.op for n in Im2col().run(g).nodes if n.op != "const"] == ["conv2d", "relu"]
    g, _, _ = _conv((1, 16, 15, 17), 24, (1, 1), (1, 1, 1, 1))         # stride 1: winograd / direct
    assert "im2col" not in [n.op for n in Im2col().run(g).nodes]
    g, _, _ = _conv((1, 16, 15, 17), 24, (2, 2), (1, 1, 1, 1))
    m = sqk.compile(g, pipeline="fold_constants,select_format{formats=csr|bsr|nm|winograd},dce,fuse")
    assert "im2col" not in [n.op for n in m.ir.nodes]                   # formats without im2col
