"""matmul_q kernels (i8 / i4 group-quantized weights, f32 / f16 activations,
or int8 activations quantized at run time) against the reference interpreter:
dequantized paths agree within f32 rounding (sums run in a different order
than numpy's); the int8 mode's integer dot products are exact."""
from __future__ import annotations

import re

import numpy as np
import pytest
import sqk
from harness import assert_close, check, compile_for, host_isa, host_without, rand, target_param
from hypothesis import given, settings
from hypothesis import strategies as st
from sqk.codegen.lower import pack_constants

RANGE = {"i4": (-8, 7), "i8": (-128, 127)}


def qgraph(shape, K, N, qdt, group, zeros=False, sdt="f32", xdt="f32", seed=0):
    """x[shape + (K,)] @ matmul_q(q[K, N]) with random q, scales and zeros."""
    rng = np.random.default_rng(seed)
    lo, hi = RANGE[qdt]
    G = -(-K // group)
    b = sqk.GraphBuilder("mq")
    x = b.input("x", tuple(shape) + (K,), xdt)
    args = [x, b.const(rng.integers(lo, hi + 1, (K, N)).astype(np.int8), qdt),
            b.const(rng.uniform(0.005, 0.05, (G, N)).astype(np.float32 if sdt == "f32" else np.float16), sdt)]
    if zeros:
        args.append(b.const(rng.integers(lo, hi + 1, (G, N)).astype(np.int8), qdt))
    g = b.output(b.matmul_q(*args, group=group))
    return g, {"x": rand(tuple(shape) + (K,), xdt, rng)}


CASES = [  # (x shape without K, K, N, q dtype, group, zeros, scales dtype, x dtype)
    ((1,), 128, 64, "i4", 32, False, "f32", "f32"),
    ((1,), 100, 70, "i4", 32, True, "f16", "f32"),      # short last group, odd N
    ((1,), 96, 131, "i8", 96, False, "f32", "f32"),     # per-channel, N % 64 != 0
    ((3,), 200, 65, "i8", 64, True, "f32", "f32"),      # short last group, zeros
    ((16,), 256, 130, "i4", 128, False, "f16", "f16"),  # f16 x and scales
    ((2, 3), 70, 33, "i4", 32, True, "f32", "f32"),     # batched x
    ((16,), 64, 1, "i8", 32, False, "f32", "f16"),      # one column
]


@target_param
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}-M{c[0]}-K{c[1]}-N{c[2]}-g{c[4]}")
def test_matmul_q(target, case):
    shape, K, N, qdt, group, zeros, sdt, xdt = case
    g, inputs = qgraph(shape, K, N, qdt, group, zeros, sdt, xdt)
    check(g, inputs, target)


@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("qdt", ["i4", "i8"])
def test_rows_and_chunks(qdt, M):
    """Row counts around the 16-row work item (a short last chunk)."""
    g, inputs = qgraph((M,), 96, 80, qdt, 32, zeros=qdt == "i4")
    check(g, inputs)


@pytest.mark.parametrize("target", ["riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("M, N, qdt, zeros", [(5, 1100, "i4", True), (1, 513, "i4", False), (4, 1025, "i8", True),
                                              (9, 1, "i4", True)])
def test_riscv_row_layout_blocks(target, M, N, qdt, zeros):
    """riscv64's row layout (codegen/matmul_q_rows.py): several 512-column blocks and a
    narrow last one (odd for i4: its high nibbles half empty), row tiles of 4 and a
    part tile."""
    g, inputs = qgraph((M,), 72, N, qdt, 32, zeros)
    check(g, inputs, target)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_groups_extreme_values(group):
    """Every q at its extremes (the fields' offset encoding at both ends)."""
    K, N = 256, 64
    b = sqk.GraphBuilder("ext")
    x = b.input("x", (1, K))
    q = np.where(np.arange(K * N).reshape(K, N) % 3 == 0, -8, 7).astype(np.int8)
    z = np.full((K // group, N), -8, np.int8)
    g = b.output(b.matmul_q(x, b.const(q, "i4"), b.const(np.ones((K // group, N), np.float32), "f32"),
                            b.const(z, "i4"), group=group))
    check(g, {"x": rand((1, K))})


@pytest.mark.parametrize("shape,K,N", [((0,), 32, 8), ((2,), 0, 5), ((2,), 5, 0)])
def test_empty(shape, K, N):
    for qdt in ("i4", "i8"):
        g, inputs = qgraph(shape, K, N, qdt, 32, zeros=qdt == "i8")
        check(g, inputs)


def test_threads():
    g, inputs = qgraph((2,), 512, 1000, "i4", 32, seed=3)
    m = sqk.compile(g, threads=2)
    assert_close(m(**inputs), sqk.reference(g, **inputs))
    assert [k["range"] for k in m.manifest["kernels"]] == [16]  # 16 column blocks of 64


def test_packed_constant_has_one_reader():
    b = sqk.GraphBuilder("shared")
    x = b.input("x", (1, 32))
    q = b.const(np.ones((32, 8), np.int8), "i8")
    s = b.const(np.ones((1, 8), np.float32), "f32")
    g = b.output(b.matmul_q(x, q, s, group=32), q)
    with pytest.raises(ValueError, match="kernel-specific layout"):
        pack_constants(g)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 17), k=st.integers(1, 150), n=st.integers(1, 140), qdt=st.sampled_from(["i4", "i8"]),
       group=st.sampled_from([1, 7, 32, 64, 0]), zeros=st.booleans(), sdt=st.sampled_from(["f32", "f16"]))
def test_random_shapes(m, k, n, qdt, group, zeros, sdt):
    g, inputs = qgraph((m,), k, n, qdt, group or k, zeros, sdt, seed=m * 1000 + k)
    check(g, inputs)


# --- activations=int8 (dynamic per-row, per-group int8 x) ---------------------------------------

def i8graph(shape, K, N, group, xdt="f32", sdt="f16", seed=0, qdt="i4"):
    """x[shape + (K,)] @ matmul_q(q[K, N] i4 or i8, activations=int8); x with an all-zero first row."""
    rng = np.random.default_rng(seed)
    G = -(-K // group)
    lo, hi = RANGE[qdt]
    b = sqk.GraphBuilder("i8act")
    x = b.input("x", tuple(shape) + (K,), xdt)
    q = b.const(rng.integers(lo, hi + 1, (K, N)).astype(np.int8), qdt)
    s = b.const(rng.uniform(0.01, 0.1, (G, N)).astype(np.float32 if sdt == "f32" else np.float16), sdt)
    g = b.output(b.matmul_q(x, q, s, group=group, activations="int8"))
    xv = rand(tuple(shape) + (K,), xdt, rng)
    if xv.size:
        xv.reshape(-1, K)[0] = 0  # an all-zero row: step 0, no division by it
    return g, {"x": xv}


I8_CASES = [  # (x shape without K, K, N, group, x dtype, scales dtype)
    ((1,), 128, 64, 32, "f32", "f16"),
    ((3,), 100, 70, 32, "f32", "f32"),     # K not divisible by group, odd N
    ((16,), 256, 130, 128, "f32", "f16"),
    ((2, 3), 70, 33, 7, "f16", "f32"),     # group not a multiple of 8, batched f16 x
    ((1,), 64, 1, 64, "f32", "f16"),       # per-channel, one column
    ((4,), 20, 16, 64, "f32", "f32"),      # group larger than K
]


@target_param
@pytest.mark.parametrize("case", I8_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-g{c[3]}-{c[4]}")
def test_int8_activations(target, case):
    """The kernel against the op's reference (ir.ops.matmul_q_i8act): the integer
    dot products are exact, so only the f32 rounding of the group multiply-adds differs."""
    shape, K, N, group, xdt, sdt = case
    g, inputs = i8graph(shape, K, N, group, xdt, sdt)
    check(g, inputs, target)


def test_int8_activations_semantics():
    """The reference is its own numerics: activation rounding shows against the
    f32 mode, and the all-zero row gives exactly 0; plus a hand-checked group."""
    g, inputs = i8graph((3,), 96, 40, 32)
    want = sqk.reference(g, **inputs)
    assert not np.any(want[0]) and np.any(want[1])
    node = g.nodes[-1]
    f32 = sqk.ir.ops.OPS["matmul_q"].reference(inputs["x"], *(n.attrs["value"] for n in g.nodes[:2]),
                                                group=32)[0]
    assert not np.allclose(want, f32, rtol=1e-5, atol=1e-5) and np.allclose(want, f32, rtol=0.05, atol=0.05)
    assert node.attrs["activations"] == "int8"
    # by hand: x = [127, -50, 2.5, 0.5] has d = 1, xq = [127, -50, 2, 0] (ties to even);
    # scale 0.5: y = 0.5 * (127 - 100 + 6 + 0); the second row has d = 0
    x = np.array([[127, -50, 2.5, 0.5], [0, 0, 0, 0]], np.float32)
    y = sqk.ir.ops.matmul_q_i8act(x, np.array([[1], [2], [3], [4]], np.int8), np.full((1, 1), 0.5, np.float32),
                                  None, 4)
    assert y.tolist() == [[16.5], [0.0]]


@host_isa
@pytest.mark.parametrize("M", [1, 3, 16, 20])
def test_int8_activations_rows_and_chunks(host_isa, M):
    """Row counts and K large enough that x is quantized in several row chunks
    (at most 64 KiB of int8 x on the stack per chunk)."""
    g, inputs = i8graph((M,), 4096 if M == 20 else 96, 80, 32, seed=M)
    check(g, inputs)


@pytest.mark.parametrize("shape,K,N", [((0,), 32, 8), ((2,), 0, 5), ((2,), 5, 0)])
def test_int8_activations_empty(shape, K, N):
    check(*i8graph(shape, K, N, 32))


@host_isa
@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 17), k=st.integers(1, 150), n=st.integers(1, 140), group=st.sampled_from([1, 5, 8, 32, 0]),
       xdt=st.sampled_from(["f32", "f16"]))
def test_int8_activations_random_shapes(host_isa, m, k, n, group, xdt):
    check(*i8graph((m,), k, n, group or k, xdt, seed=m * 1000 + k))


@host_isa
def test_int8_activations_threads(host_isa):
    g, inputs = i8graph((2,), 512, 1000, 32, seed=3)
    m = sqk.compile(g, threads=2)
    assert_close(m(**inputs), sqk.reference(g, **inputs))
    assert [k["range"] for k in m.manifest["kernels"]] == [16]


I8W_CASES = [  # i8 weights: (x shape without K, K, N, group, x dtype, scales dtype)
    ((1,), 128, 64, 32, "f32", "f32"),
    ((3,), 100, 70, 32, "f32", "f16"),     # K not divisible by group, odd N
    ((16,), 256, 130, 256, "f32", "f32"),  # per-channel (group = K)
    ((3,), 90, 20, 90, "f16", "f32"),      # per-channel, K not a multiple of 8, f16 x
    ((2, 3), 70, 33, 7, "f32", "f16"),     # group not a multiple of 8, batched x
]


@target_param
@pytest.mark.parametrize("case", I8W_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-g{c[3]}-{c[4]}")
def test_int8_activations_i8_weights(target, case):
    """i8 weights (the full [-128, 127]) x int8 activations, exact integer dots."""
    shape, K, N, group, xdt, sdt = case
    check(*i8graph(shape, K, N, group, xdt, sdt, qdt="i8"), target)


@host_isa
@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 17), k=st.integers(1, 150), n=st.integers(1, 140), group=st.sampled_from([1, 5, 8, 32, 0]))
def test_int8_activations_i8_weights_random_shapes(host_isa, m, k, n, group):
    check(*i8graph((m,), k, n, group or k, seed=m * 1000 + k, qdt="i8"))


def extreme_i8(K):
    """Per-channel i8 weights at their extremes against rows x = +-127 (d = 1,
    xq = x), x = -127 and x = +-1 (d = 1/127): columns q = 127 sign(x), -128,
    127, then random q; dots up to 128 * 127 * K in magnitude.  Returns the
    graph, x and the exact dots of the rows with d = 1."""
    rng = np.random.default_rng(K)
    sx = np.where(rng.random(K) < 0.5, -1, 1)
    q = rng.integers(-128, 128, (K, 8))
    q[:, 0], q[:, 1], q[:, 2] = 127 * sx, -128, 127
    q = q.astype(np.int8)
    x = np.stack([127 * sx, np.full(K, -127), sx]).astype(np.float32)
    b = sqk.GraphBuilder("ext8")
    xi = b.input("x", (3, K))
    g = b.output(b.matmul_q(xi, b.const(q, "i8"), b.const(np.ones((1, 8), np.float32), "f32"),
                            group=K, activations="int8"))
    return g, x, x[:2].astype(np.int64) @ q.astype(np.int64)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_int8_activations_i8_exact_k16384(target):
    """K = 16384 in one group: the i32 sums reach 128 * 127 * 16384 = 2^21 * 127
    without overflow or i16 saturation; one group means one rounding of the exact
    integer (times the f32 step), so the result equals the reference bit for bit."""
    g, x, dot = extreme_i8(16384)
    assert abs(dot).max() == 128 * 127 * 16384 and dot[0, 0] == 127 * 127 * 16384
    got = compile_for(g, target)(x=x)
    np.testing.assert_array_equal(got[:2], dot.astype(np.float32))  # d = 1, scale 1: y is the integer dot
    np.testing.assert_array_equal(got, sqk.reference(g, x=x))


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_int8_activations_i8_group_beyond_i32(target):
    """A group so long (140000 rows) that 128 * 127 * K overflows i32: the
    kernel sums spans of it in i64 (``i32_span``)."""
    g, x, dot = extreme_i8(140000)
    assert abs(dot).max() > 2**31
    got = compile_for(g, target)(x=x)
    np.testing.assert_array_equal(got[:2], dot.astype(np.float32))
    np.testing.assert_array_equal(got, sqk.reference(g, x=x))


def int8_graph(shape, K, N, group, qdt="i4", zeros=False, act_scale=0.0, xdt="f32", sdt="f32", seed=0):
    """x[shape + (K,)] @ matmul_q(q[K, N], activations=int8) with zero points or
    not, dynamic (act_scale 0) or static; x uniform in [-3, 3) with +-6e4 and +-inf
    entries (a static scale of ~0.02 saturates a good part of it) and an
    all-zero first row."""
    rng = np.random.default_rng(seed)
    G = -(-K // group)
    lo, hi = RANGE[qdt]
    b = sqk.GraphBuilder("i8z")
    x = b.input("x", tuple(shape) + (K,), xdt)
    args = [x, b.const(rng.integers(lo, hi + 1, (K, N)).astype(np.int8), qdt),
            b.const(rng.uniform(0.01, 0.1, (G, N)).astype(np.float32 if sdt == "f32" else np.float16), sdt)]
    if zeros:
        args.append(b.const(rng.integers(lo, hi + 1, (G, N)).astype(np.int8), qdt))
    g = b.output(b.matmul_q(*args, group=group, activations="int8", act_scale=act_scale))
    xv = rand(tuple(shape) + (K,), xdt, rng)
    if xv.size:
        flat = xv.reshape(-1, K)
        flat[0] = 0
        if act_scale and flat.shape[0] > 1:  # saturating extremes (dynamic mode: no inf, it would be the step)
            flat[1, ::7] = np.array([6e4, -np.inf, np.inf, -6e4])[np.arange(len(flat[1, ::7])) % 4]
    return g, {"x": xv}


EXACT_CASES = [  # (x shape without K, K, N, group, q dtype, zeros, act_scale, x dtype, scales dtype)
    ((3,), 100, 70, 32, "i4", False, 0.0234, "f32", "f16"),     # short last group, odd N, static
    ((3,), 100, 70, 32, "i4", True, 0.0, "f32", "f32"),         # zero points, dynamic
    ((2, 3), 70, 33, 7, "i8", True, 0.02, "f16", "f32"),        # zero points, static, group not a multiple of 8
    ((5,), 131, 65, 131, "i8", False, 0.0, "f32", "f16"),       # per-channel: one group
    ((4,), 200, 130, 64, "i8", False, 1e-3, "f32", "f32"),      # nearly everything saturates
    ((2,), 96, 17, 16, "i4", True, 0.05, "f32", "f32"),         # many groups: f32 outer sum of 6
]


@target_param
@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: f"{c[4]}-K{c[1]}-N{c[2]}-g{c[3]}-z{int(c[5])}-s{c[6]}")
def test_int8_activations_bit_exact(target, case):
    """int8 activations, dynamic or static, with or without zero points: the
    kernels equal the reference bit for bit on every target (exact integer
    dots, and the same f32 multiply then add per group, in group order)."""
    shape, K, N, group, qdt, zeros, act_scale, xdt, sdt = case
    g, inputs = int8_graph(shape, K, N, group, qdt, zeros, act_scale, xdt, sdt)
    got, want = compile_for(g, target)(**inputs), sqk.reference(g, **inputs)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), np.abs(got - want).max()


@host_isa
@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 150), n=st.integers(1, 140), group=st.sampled_from([1, 5, 8, 32, 0]),
       qdt=st.sampled_from(["i4", "i8"]), zeros=st.booleans(), act_scale=st.sampled_from([0.0, 0.003, 0.07]))
def test_int8_activations_bit_exact_random_shapes(host_isa, m, k, n, group, qdt, zeros, act_scale):
    g, inputs = int8_graph((m,), k, n, group or k, qdt, zeros, act_scale, seed=m * 1000 + k)
    np.testing.assert_array_equal(sqk.compile(g)(**inputs), sqk.reference(g, **inputs))


def test_int8_activations_static_semantics():
    """By hand: step 0.5 maps x = [1, -0.5, 0.25, 300] to xq = [2, -1, 0, 127]
    (0.5 rounds to even 0, 600 saturates); q = [1, 2, 3, 4], scale 0.5:
    y = 0.5 * 0.5 * (2 - 2 + 0 + 508) = 127.  With zero point 1: q - z =
    [0, 1, 2, 3], y = 0.25 * (0 - 1 + 0 + 381) = 95.  The dynamic mode of the
    same row differs (step 300 / 127)."""
    x = np.array([[1, -0.5, 0.25, 300]], np.float32)
    q, s = np.array([[1], [2], [3], [4]], np.int8), np.full((1, 1), 0.5, np.float32)
    assert sqk.ir.ops.matmul_q_i8act(x, q, s, None, 4, 0.5).tolist() == [[127.0]]
    assert sqk.ir.ops.matmul_q_i8act(x, q, s, np.ones((1, 1), np.int8), 4, 0.5).tolist() == [[95.0]]
    assert sqk.ir.ops.matmul_q_i8act(x, q, s, None, 4).tolist() != [[127.0]]
    xq, d = sqk.ir.ops.quantize_rows_i8(np.array([[np.inf, -np.inf, -1e30, 63.75]], np.float32), 2, 0.5)
    assert xq.tolist() == [[127, -127, -127, 127]] and d.tolist() == [[0.5, 0.5]]



NONFINITE_CASES = [  # (x shape without K, K, N, group, q dtype, zeros, act_scale, x dtype)
    ((6,), 100, 70, 32, "i4", False, 0.0, "f32"),      # dynamic; a NaN or inf in the vector part and in the tail
    ((6,), 70, 33, 7, "i8", True, 0.0, "f16"),         # group not a multiple of 8, zero points, f16 x
    ((6,), 100, 70, 32, "i4", True, 0.0234, "f32"),    # static: NaN -> NaN row, +-inf saturate
    ((2, 3), 131, 65, 131, "i8", False, 0.02, "f16"),  # static, one group per row
]


@target_param
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=lambda c: f"{c[4]}-K{c[1]}-g{c[3]}-z{int(c[5])}-s{c[6]}-{c[7]}")
def test_int8_activations_non_finite(target, case):
    """NaN and +-inf in x (quantize_rows_i8's rule): a row holding a NaN gives NaN
    outputs, and so does one holding +-inf with dynamic scales (no finite step
    quantizes it); with a static scale +-inf saturate at +-127 like any large value.
    The kernels agree with the reference on every target: NaN where it is NaN, bit
    for bit elsewhere (rows 0 and 5 stay finite)."""
    shape, K, N, group, qdt, zeros, act_scale, xdt = case
    g, inputs = int8_graph(shape, K, N, group, qdt, zeros, act_scale, xdt, seed=K)
    x = inputs["x"].reshape(-1, K)
    x[0] = np.random.default_rng(1).uniform(-3, 3, K)
    x[1, 3], x[2, K - 1], x[3, 9], x[3, K // 2], x[4, 0] = np.nan, np.nan, np.inf, -np.inf, -np.inf
    want = sqk.reference(g, **inputs)
    w = want.reshape(-1, N)
    assert np.isnan(w[1:3]).all() and np.isfinite(w[[0, 5]]).all()
    assert np.isnan(w[3:5]).all() if not act_scale else np.isfinite(w[3:5]).all()
    got = compile_for(g, target)(**inputs)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert got[~np.isnan(got)].tobytes() == want[~np.isnan(want)].tobytes()


def test_int8_activations_static_text_round_trip():
    """act_scale prints as the shortest repr of the Python float and parses
    back to the same value (so to the same f32 step); the default 0.0 is
    left out."""
    for scale in (0.0123, float(np.float32(0.1)), 3e-38, 1.5):
        g, _ = int8_graph((2,), 8, 3, 8, act_scale=scale)
        text = g.to_text(inline_limit=None)
        assert f"act_scale={scale!r}" in text
        g2 = sqk.parse_ir(text)
        assert g2 == g and g2.nodes[-1].attrs["act_scale"] == scale
    assert "act_scale" not in int8_graph((2,), 8, 3, 8)[0].to_text()


@pytest.mark.parametrize("kw, message", [
    ({"activations": "int8", "act_scale": -0.5}, "act_scale=-0.5 must be 0 (dynamic) or, with activations=int8"),
    ({"activations": "int8", "act_scale": float("nan")}, "act_scale=nan must be 0"),
    ({"activations": "int8", "act_scale": 1e-50}, "a positive finite f32 scale"),   # 0 in f32
    ({"activations": "int8", "act_scale": 1e39}, "a positive finite f32 scale"),    # inf in f32
    ({"act_scale": 0.5}, "act_scale=0.5 must be 0 (dynamic) or, with activations=int8"),
])
def test_int8_activations_static_bad_scale(kw, message):
    b = sqk.GraphBuilder("bad")
    with pytest.raises(sqk.IRError, match=re.escape(message)):
        b.matmul_q(b.input("x", (1, 8)), b.const(np.ones((8, 2), np.int8), "i4"),
                   b.const(np.ones((1, 2), np.float32)), group=8, **kw)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_int8_activations_i8_zeros_group_beyond_i32(target):
    """i8 zero points with |q - z| = 255 over a 70000-row group: sum xq * (q - z)
    reaches 127 * 255 * 70000 > 2^31 (sum xq * q and z * sum xq each fit i32,
    their difference does not), so the kernel sums spans in i64
    (``i32_span`` counts 255 per row with zero points) and stays exact."""
    K = 70000
    rng = np.random.default_rng(7)
    q = np.stack([np.full(K, 127), rng.integers(-128, 128, K)], axis=1).astype(np.int8)
    z = np.array([[-128, 5]], np.int8)
    x = np.stack([np.full(K, 127), rng.uniform(-127, 127, K)]).astype(np.float32)
    b = sqk.GraphBuilder("ext8z")
    xi = b.input("x", (2, K))
    g = b.output(b.matmul_q(xi, b.const(q, "i8"), b.const(np.ones((1, 2), np.float32), "f32"), b.const(z, "i8"),
                            group=K, activations="int8", act_scale=1.0))
    dot = x.astype(np.int64)[:1] @ (q.astype(np.int64) - z.astype(np.int64))
    assert dot[0, 0] > 2**31
    got = compile_for(g, target)(x=x)
    np.testing.assert_array_equal(got, sqk.reference(g, x=x))
    assert got[0, 0] == np.float32(dot[0, 0])


def test_int8_activations_bad_mode():
    b = sqk.GraphBuilder("bad")
    with pytest.raises(sqk.IRError, match="activations must be one of none, int8"):
        b.matmul_q(b.input("x", (1, 8)), b.const(np.ones((8, 2), np.int8), "i4"),
                   b.const(np.ones((1, 2), np.float32)), group=8, activations="int4")


@pytest.mark.parametrize("mode", ["vnni", "avx2", "avx2-ymm"])
def test_int8_activations_dot_instructions(mode, monkeypatch):
    """On x86 the integer dots are vpdpbusd where the CPU has VNNI (AVX-512 VNNI
    + VL, or AVX-VNNI), else vpmaddubsw + vpmaddwd; both exact (checked on this
    CPU: the AVX2 build runs anywhere VNNI does, with VNNI switched off; avx2-ymm
    switches off all of AVX-512 too: 16 vector registers, tiles of 2 rows)."""
    import sqk.codegen.target as T
    from sqk.codegen.emit import assembly
    from sqk.compiler.dump import lowered_module

    vnni = mode == "vnni"
    host = T.get_target("host")
    feats = set(host.enabled_features)
    if "avx2" not in feats:
        pytest.skip("x86 with AVX2 only (the host here is not)")
    if vnni and not ("avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats):
        pytest.skip("this CPU has no VNNI")

    t = host if vnni else host_without(monkeypatch, lambda f: f in ("+avx512vnni", "+avxvnni") or
                                       mode == "avx2-ymm" and f.startswith(("+avx512", "+avxvnni")))
    g8, x8, _ = extreme_i8(4096)
    g4, inputs4 = i8graph((5,), 300, 70, 32, qdt="i4", seed=9)
    for g, inputs in ((g8, {"x": x8}), (g4, inputs4)):
        asm = assembly(str(lowered_module(g, t)), t)
        assert ("vpdpbusd" in asm) == vnni and ("vpmaddubsw" in asm) == (not vnni)
        got = sqk.compile(g)(**inputs)
        np.testing.assert_array_equal(got, sqk.reference(g, **inputs))


@host_isa
@pytest.mark.parametrize("M", [1, 3, 4, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("qdt,zeros", [("i4", False), ("i4", True), ("i8", False), ("i8", True)])
def test_int8_activations_register_tile_rows(host_isa, qdt, zeros, M):
    """Row counts around the register tile (4 rows with AVX-512, 2 with AVX2, then
    one tile each of the halves for the rest): bit for bit the reference."""
    g, inputs = int8_graph((M,), 200, 100, 64 if qdt == "i4" else 200, qdt, zeros, 0.0 if M % 2 else 0.03,
                           seed=M)
    got, want = sqk.compile(g)(**inputs), sqk.reference(g, **inputs)
    assert got.tobytes() == want.tobytes(), np.abs(got - want).max()


@host_isa
@pytest.mark.parametrize("qdt", ["i4", "i8"])
def test_int8_activations_row_chunks_of_tiles(host_isa, qdt):
    """K = 1500 per channel: 43 rows of int8 x fit the stack, chunks are cut to
    40 (whole tiles), the last chunk of 10 rows ends in part tiles."""
    g, inputs = int8_graph((50,), 1500, 70, 1500, qdt, zeros=qdt == "i8", seed=11)
    got, want = sqk.compile(g)(**inputs), sqk.reference(g, **inputs)
    assert got.tobytes() == want.tobytes(), np.abs(got - want).max()


def test_host_avx2_masks_a_wider_host(monkeypatch):
    """harness.host_avx2 (the host_avx2 runs) on an AVX-512 VNNI host: the features
    are off and the vector width is AVX2's, so kernels take their AVX2 paths."""
    import dataclasses

    import sqk.codegen.target as T
    from harness import host_avx2

    wide = dataclasses.replace(T.host_target(), features="+avx,+avx2,+fma,+avx512f,+avx512vl,+avx512vnni,+avxvnni",
                               vector_bits=512)
    monkeypatch.setattr(T, "host_target", lambda: wide)
    t = host_avx2(monkeypatch)
    assert t.enabled_features == ["avx", "avx2", "fma"] and t.vector_bits == 256
    assert T.get_target("host") is t and T.get_target("riscv64-scalar") == T.riscv64_target(vector=False)
