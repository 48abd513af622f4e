"""int8 convolution: conv_input_q + conv2d_q (ir/ops.py, codegen/conv_q.py)
bit for bit against the numpy reference, and the quantize pass making them
from a float CNN (compiler/passes/quantize_conv.py), whose top-1 agrees with
the float model's."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.ir.graph import IRError
from sqk.ir.ops import OPS
from sqk.ir.reference import run_reference
from harness import host_avx2, host_without

# x shape, C_out, kernel, strides, pads, dilations, bias
CASES = {
    "3x3": ((1, 8, 10, 20), 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    "odd_channels": ((1, 5, 7, 9), 6, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    "stride2_batch2": ((2, 13, 9, 33), 12, 3, (2, 2), (1, 1, 1, 1), (1, 1), True),
    "pointwise_no_bias": ((1, 16, 5, 5), 7, 1, (1, 1), (0, 0, 0, 0), (1, 1), False),
    "dilated_asym_pads": ((1, 3, 11, 13), 5, 3, (1, 1), (2, 1, 0, 3), (2, 2), True),
    "narrow_row": ((1, 4, 6, 3), 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    "seven_columns": ((1, 9, 7, 7), 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), True),
    "stride3_7x7": ((1, 3, 23, 29), 4, 7, (3, 2), (3, 3, 3, 3), (1, 1), True),
}


def _graph(case, seed=0, unsigned=False):
    shape, co, k, strides, pads, dil, bias = CASES[case]
    rng = np.random.default_rng(seed)
    c4 = -(-shape[1] // 4)
    q = rng.integers(-128, 128, (co, c4, k, k, 4)).astype(np.int8)   # -128 too: the sign trick's edge
    sc = (rng.random(co) * 0.01 + 0.001).astype(np.float32)
    bv = rng.standard_normal(co).astype(np.float32)
    d = 0.05
    g = sqk.GraphBuilder("q")
    x = g.input("x", shape)
    xq = g.conv_input_q(x, act_scale=d, pads=pads, unsigned=unsigned)
    y = g.conv2d_q(xq, g.const(q, name="q"), g.const(sc, name="s"), *([g.const(bv, name="b")] if bias else []),
                   strides=strides, dilations=dil, act_scale=d, unsigned=unsigned)
    xv = (rng.standard_normal(shape) * 3).astype(np.float32)
    xv.flat[:3] = np.nan, np.inf, -np.inf      # NaN -> 0, +-inf saturate
    return g.output(g.relu(y), xq), xv


def _reference(g, x) -> list:
    want = run_reference(g, {"x": x})
    return list(want.values()) if isinstance(want, dict) else list(want)


def _exact(m, g, x):
    got = m(x=x)
    for a, b in zip(got, _reference(g, x)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("unsigned", [False, True])
def test_conv_q_bit_exact(case, unsigned):
    g, x = _graph(case, unsigned=unsigned)
    m = sqk.compile(g)
    assert any(n.op == "fused" and n.attrs["body"].nodes[0].op == "conv2d_q" for n in m.ir.nodes)  # relu fused
    _exact(m, g, x)


@pytest.mark.parametrize("host", ["avx2", "no_avx2"])
def test_conv_q_hosts_two_threads(monkeypatch, host):
    """The AVX2 kernel (vpmaddubsw) and the generic one (i32 products) on 2 threads."""
    if host == "avx2":
        host_avx2(monkeypatch)
    else:
        host_without(monkeypatch, lambda f: f[1:].startswith(("avx2", "avx512")))
    for case, unsigned in (("3x3", False), ("stride2_batch2", True)):
        g, x = _graph(case, seed=1, unsigned=unsigned)
        _exact(sqk.compile(g, threads=2), g, x)


def test_unsigned_reads_negative_codes_as_zero():
    """conv2d_q {unsigned} fed signed codes (not conv_input_q {unsigned}'s) still matches
    its reference: negative codes count as 0."""
    g = sqk.GraphBuilder("q")
    xq = g.input("xq", (1, 2, 5, 12, 4), "i8")
    q = np.random.default_rng(3).integers(-128, 128, (4, 2, 3, 3, 4)).astype(np.int8)
    g = g.output(g.conv2d_q(xq, g.const(q, name="q"), g.const(np.ones(4, np.float32), name="s"), act_scale=1.0,
                            unsigned=True))
    x = np.random.default_rng(4).integers(-128, 128, (1, 2, 5, 12, 4)).astype(np.int8)
    want = OPS["conv2d_q"].reference(np.maximum(x, 0), q, np.ones(4, np.float32), strides=(1, 1),
                                     dilations=(1, 1), act_scale=1.0)[0]
    assert np.array_equal(sqk.compile(g)(xq=x), want)


def test_conv_q_shape_errors():
    g = sqk.GraphBuilder("q")
    xq = g.input("xq", (1, 2, 6, 6, 4), "i8")
    with pytest.raises(IRError, match="xq has 2 channel quads, q 3"):
        g.conv2d_q(xq, g.input("q", (4, 3, 3, 3, 4), "i8"), g.input("s", (4,)), act_scale=0.1)
    with pytest.raises(IRError, match="act_scale"):
        g.conv_input_q(g.input("x", (1, 3, 4, 4)), act_scale=0.0)


def _cnn(rng):
    g = sqk.GraphBuilder("net")
    x = g.input("x", (1, 3, 16, 16))

    def w(*s):
        return g.const((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32))

    h = g.relu(g.conv2d(x, w(16, 3, 3, 3), w(16), pads=(1, 1, 1, 1)))
    h = g.relu(g.conv2d(h, w(32, 16, 3, 3), w(32), pads=(1, 1, 1, 1), strides=(2, 2)))
    h = g.relu(g.add(h, g.conv2d(h, w(32, 32, 1, 1))))
    h = g.conv2d(h, w(32, 1, 3, 3), pads=(1, 1, 1, 1), groups=32)       # depthwise: stays float
    return g.output(g.matmul(g.reshape(g.global_avgpool(h), shape=(1, 32)), w(32, 10)))


def test_quantize_pass_makes_int8_convs_top1_agrees():
    rng = np.random.default_rng(0)
    graph = _cnn(rng)
    cal = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    f = sqk.compile(graph)
    q = sqk.compile(graph, pipeline="fold_constants,quantize{weights=int8,activations=int8,calibration=minmax},"
                                    "select_format,dce,fuse", calibration_data=cal)
    ops = [n.op for n in q.ir.nodes]
    assert ops.count("conv_input_q") == 3 and "conv2d" in ops and "matmul_q" in ops
    # the image is signed; the convolutions after a relu take unsigned codes
    assert [n.attrs["unsigned"] for n in q.ir.nodes if n.op == "conv_input_q"] == [False, True, True]
    rows = {r["layer"]: r for r in q.report}
    assert sum(r["status"] == "quantized" for r in rows.values()) == 4
    assert all(r["cosine"] > 0.999 for r in rows.values())
    xs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(300)]
    agree = np.mean([np.argmax(f(x=x)) == np.argmax(q(x=x)) for x in xs])
    assert agree >= 0.95, agree
    x = xs[0]
    assert np.array_equal(q(x=x), _reference(q.ir, x)[0])   # the graph's semantics


def test_max_error_keeps_a_conv_float():
    rng = np.random.default_rng(0)
    graph = _cnn(rng)
    cal = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    q = sqk.compile(graph, pipeline="fold_constants,quantize{weights=int8,activations=int8,calibration=minmax,"
                                    "max_error=0.001},select_format,dce,fuse", calibration_data=cal)
    assert "conv_input_q" not in [n.op for n in q.ir.nodes]
    assert all(r["status"].startswith("kept f32") for r in q.report)


def test_dynamic_activations_keep_convs_float():
    graph = _cnn(np.random.default_rng(0))
    q = sqk.compile(graph, quantize="int8", activations="int8")
    assert "conv_input_q" not in [n.op for n in q.ir.nodes]


@pytest.mark.parametrize("target", ["riscv64", "riscv64-scalar"])
def test_conv_q_riscv64(target):
    """The generic kernels (i32 products) on riscv64, bit for bit (several VLENs)."""
    from harness import compile_for
    g, x = _graph("stride2_batch2", seed=2, unsigned=False)
    m = compile_for(g, target)
    for a, b in zip(m(x=x), _reference(g, x)):
        assert np.array_equal(a, b)
