"""matmul_q kernels (i8 / i4 group-quantized weights, f32 / f16 activations)
against the reference interpreter: dequantized paths agree within f32
rounding (sums run in a different order than numpy's)."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import assert_close, check, rand, target_param
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


@pytest.mark.parametrize("K,N,group", [(64, 64, 32), (256, 100, 32), (128, 130, 64)])
def test_int8_activation_prototype(K, N, group):
    """The int8-activation prototype against its own semantics (host AVX2 only)."""
    from sqk.codegen.matmul_q import i8act_prototype, reference_i8act
    from sqk.codegen.target import get_target

    if "avx2" not in get_target("host").enabled_features:
        pytest.skip("the prototype uses AVX2 intrinsics")
    rng = np.random.default_rng(K + N)
    q = rng.integers(-8, 8, (K, N)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, (K // group, N)).astype(np.float16)
    b = sqk.GraphBuilder("i8act")
    x = b.input("x", (2, K))
    g = b.output(b.matmul_q(x, b.const(q, "i4"), b.const(s, "f16"), group=group))
    with i8act_prototype():
        m = sqk.compile(g)
    xv = rand((2, K), rng=rng)
    xv[0, :group] = 0  # an all-zero group: step 0, no division by it
    assert_close(m(x=xv), reference_i8act(xv, q, s, group))
    # and it is a different semantics from matmul_q's: activation rounding shows
    assert not np.allclose(m(x=xv), sqk.reference(g, x=xv), rtol=1e-5, atol=1e-5)
