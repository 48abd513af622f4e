"""Winograd F(2x2, 3x3) convolution (compiler/passes/winograd.py, ir/ops.py
winograd_input / winograd_output, codegen/conv_winograd.py) against the
direct conv2d reference.

Tolerance: winograd reorders the sums (B^T d B, the 16 products' dot products,
A^T m A) and rounds the transformed filters to f32, so it is not bit-equal to
the direct convolution; with unit-scale inputs and filters scaled by
1/sqrt(9 C_in) the error measured stays below 1e-6 of the output's largest
magnitude; the tests allow 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.compiler.passes.winograd import Winograd
from sqk.ir.graph import IRError
from sqk.ir.ops import OPS, winograd_filter
from harness import host_avx2

TOL = 1e-5
ALL = "fold_constants,winograd{min_channels=1,min_tiles=1},dce,fuse"   # every eligible conv2d
DIRECT = "fold_constants,select_format{formats=csr|bsr|nm},dce,fuse"


def _conv(x_shape, c_out, pads=(1, 1, 1, 1), bias=True, relu=False, seed=0):
    rng = np.random.default_rng(seed)
    c_in = x_shape[1]
    w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
    bv = rng.standard_normal(c_out).astype(np.float32) if bias else None
    g = sqk.GraphBuilder("c")
    x = g.input("x", x_shape)
    y = g.conv2d(x, g.const(w, name="w"), *([g.const(bv, name="b")] if bias else []), pads=pads)
    if relu:
        y = g.relu(y)
    xv = rng.standard_normal(x_shape).astype(np.float32)
    ref = OPS["conv2d"].reference(xv, w, bv, strides=(1, 1), pads=pads, dilations=(1, 1), groups=1)[0]
    return g.output(y), xv, np.maximum(ref, 0) if relu else ref


def _ops(m) -> list[str]:
    out = []
    for n in m.ir.nodes:
        out += [b.op for b in n.attrs["body"].nodes] if n.op == "fused" else [n.op]
    return out


def _check(m, x, ref):
    got = m(x=x)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / max(1e-30, np.abs(ref).max())
    assert err < TOL, f"relative error {err:.2e}"


CASES = {   # x shape, C_out, pads
    "even": ((1, 16, 8, 8), 16, (1, 1, 1, 1)),
    "odd_hw_channels": ((1, 17, 7, 9), 19, (1, 1, 1, 1)),
    "batch2_asym_pads": ((2, 20, 9, 5), 24, (2, 1, 0, 2)),
    "no_pads": ((1, 9, 6, 11), 13, (0, 0, 0, 0)),
    "pads_beyond_input": ((1, 3, 3, 3), 4, (4, 5, 4, 5)),
    "one_row": ((1, 5, 1, 10), 3, (1, 1, 1, 1)),
    "wide": ((1, 8, 3, 70), 9, (1, 1, 1, 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("relu", [False, True])
def test_winograd_matches_conv2d(case, relu):
    shape, c_out, pads = CASES[case]
    g, x, ref = _conv(shape, c_out, pads, relu=relu)
    m = sqk.compile(g, pipeline=ALL)
    ops = _ops(m)
    assert "winograd_input" in ops and "conv2d" not in ops
    if relu:   # the activation fuses into the output transform
        assert any(n.op == "fused" and n.attrs["body"].nodes[0].op == "winograd_output" for n in m.ir.nodes)
    _check(m, x, ref)


def test_reference_ops_compose_to_conv2d():
    rng = np.random.default_rng(1)
    for shape, c_out, pads in CASES.values():
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.standard_normal((c_out, shape[1], 3, 3)).astype(np.float32)
        ref = OPS["conv2d"].reference(x, w, None, strides=(1, 1), pads=pads, dilations=(1, 1), groups=1)[0]
        v = OPS["winograd_input"].reference(x, pads=pads)[0]
        y = OPS["winograd_output"].reference(v @ winograd_filter(w), None, shape=ref.shape)[0]
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_default_pipeline_rule_two_threads_avx2(monkeypatch):
    """The default pipeline takes winograd for a resnet-sized layer (2 threads, AVX2
    only) and keeps small-channel layers direct; formats without winograd keep it direct."""
    host_avx2(monkeypatch)
    g, x, ref = _conv((1, 32, 14, 13), 40, relu=True)
    m = sqk.compile(g, threads=2)
    assert "winograd_input" in _ops(m)
    _check(m, x, ref)
    assert "conv2d" in _ops(sqk.compile(g, pipeline=DIRECT))
    small, xs, refs = _conv((1, 3, 14, 14), 8)
    ms = sqk.compile(small)
    assert "conv2d" in _ops(ms)
    _check(ms, xs, refs)


def test_rule_leaves_other_convolutions():
    g = sqk.GraphBuilder("c")
    x = g.input("x", (1, 16, 12, 12))
    w = g.const(np.ones((16, 16, 3, 3), np.float32), name="w")
    wd = g.const(np.ones((16, 1, 3, 3), np.float32), name="wd")
    ys = [g.conv2d(x, w, strides=(2, 2)), g.conv2d(x, w, dilations=(2, 2)), g.conv2d(x, wd, groups=16),
          g.conv2d(x, g.input("wr", (16, 16, 3, 3)))]
    out = Winograd(min_channels=1, min_tiles=1).run(g.output(*ys))
    assert [n.op for n in out.nodes if n.op != "const"] == ["conv2d"] * 4


def test_bad_winograd_output_shape():
    g = sqk.GraphBuilder("c")
    with pytest.raises(IRError, match=r"m \(16, 6, 3\) must be \(16, 4, 3\)"):
        g.winograd_output(g.input("m", (16, 6, 3)), shape=(1, 3, 4, 4))


def test_winograd_ops_riscv64():
    """The transforms' kernels lowered for riscv64 (the pass keeps conv2d direct there; a
    graph holding the ops still runs), under several VLENs."""
    from harness import compile_for
    g, x, ref = _conv((1, 17, 7, 9), 19, relu=True)
    m = compile_for(Winograd(min_channels=1, min_tiles=1).run(g), "riscv64", pipeline="dce,fuse")
    assert "winograd_input" in _ops(m)
    _check(m, x, ref)
