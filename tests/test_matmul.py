"""matmul vs the numpy reference: GEMM and GEMV (M <= STREAM_MAX_M) paths, every tail of
the micro-kernel (M, N not multiples of the tile, N below the vector width),
K blocking (K above one K block), batch broadcasting, f16, threads."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sqk
from harness import check, rand, target_param
from sqk.codegen.matmul import GEMM_KC, GEMV_SPAN, STREAM_MAX_M, gemm_blocking, tile_shape
from sqk.codegen.target import get_target


def matmul_graph(a_shape, b_shape, dtype="f32", b_const=None):
    g = sqk.GraphBuilder("matmul")
    a = g.input("a", a_shape, dtype)
    b = g.const(b_const, dtype, name="w") if b_const is not None else g.input("b", b_shape, dtype)
    return g.output(g.matmul(a, b))


def run(a_shape, b_shape, target="host", dtype="f32", rtol=None, seed=0, **kw):
    rng = np.random.default_rng(seed)
    inputs = {"a": rand(a_shape, dtype, rng), "b": rand(b_shape, dtype, rng)}
    return check(matmul_graph(a_shape, b_shape, dtype), inputs, target, rtol=rtol, **kw)


# (M, K, N): M <= STREAM_MAX_M takes the GEMV path, larger M the GEMM tiles;
# they cover full tiles and tails in M and N, N below one vector, N=1, K=1.
SHAPES_2D = [(1, 1, 1), (3, 5, 7), (1, 17, 33), (13, 31, 9), (64, 64, 64), (7, 1, 20), (2, 40, 1), (9, 6, 1)]


@target_param
@pytest.mark.parametrize("mkn", SHAPES_2D, ids=lambda s: "x".join(map(str, s)))
def test_2d(target, mkn):
    m, k, n = mkn
    run((m, k), (k, n), target)


@target_param
@pytest.mark.parametrize("a_shape,b_shape", [
    ((2, 3, 5, 6), (6, 7)),        # 2-D b shared by every batch item (folded into M)
    ((1, 4, 6), (4, 6, 9)),        # a broadcast over b's batch
    ((2, 1, 1, 8), (3, 8, 19)),    # GEMV per batch item, both operands broadcast
    ((3, 1, 7, 5), (1, 2, 5, 4)),  # 4-D, broadcast on different dims
], ids=["fold", "a_bcast", "gemv_bcast", "4d"])
def test_batched(target, a_shape, b_shape):
    run(a_shape, b_shape, target)


@target_param
@pytest.mark.parametrize("a_shape,b_shape", [((13, 31), (31, 9)), ((1, 70), (70, 45)), ((2, 3, 33), (33, 17))])
def test_f16(target, a_shape, b_shape):
    run(a_shape, b_shape, target, dtype="f16")


@target_param
def test_k_blocks(target):
    """K over several K blocks: partial sums go through y (f32) or an f32 tile
    (f16, rounded once: a per-block rounding would miss the 2e-3 tolerance)."""
    k = 2 * GEMM_KC + 3
    run((9, k), (k, 21), target, rtol=1e-4)  # f32 sums of ~500 products: rounding grows with sqrt(K)
    run((5, k), (k, 11), target, dtype="f16")


@pytest.mark.parametrize("m", [1, STREAM_MAX_M])
def test_gemv_long_rows(m):
    """GEMV over more columns than one accumulator span, with a K tail."""
    n = GEMV_SPAN * 2 + 40
    run((m, 21), (21, n), threads=2)


@pytest.mark.parametrize("shape", [((0, 4), (4, 5)), ((3, 4), (4, 0)), ((2, 0, 4), (4, 3)),
                                   ((1, 0), (0, 6)), ((9, 0), (0, 5))])
def test_empty(shape):
    """Empty M, N or batch gives an empty result; K == 0 gives zeros (GEMV and GEMM)."""
    run(*shape)


def test_const_weight():
    """b as a constant: read as stored, row-major [K, N]."""
    rng = np.random.default_rng(3)
    w = rand((37, 50), "f32", rng)
    for m in (1, 11):
        x = rand((m, 37), "f32", rng)
        check(matmul_graph((m, 37), None, b_const=w), {"a": x})


def test_large_threads():
    """A GEMM bigger than one item, split over two threads, with tails everywhere."""
    m = run((200, 300), (300, 170), rtol=1e-4, threads=2)  # K=300 f32: see test_k_blocks
    assert m.manifest["kernels"][0]["range"] > 2


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 40), n=st.integers(1, 40),
       batch=st.sampled_from([(), (2,), (1, 3), (2, 1)]), b_batched=st.booleans(),
       dtype=st.sampled_from(["f32", "f16"]))
def test_random_shapes(m, k, n, batch, b_batched, dtype):
    run(batch + (m, k), (batch if b_batched else ()) + (k, n), dtype=dtype, seed=m * 1000 + k * 10 + n)


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
def test_tile_fits_registers(target):
    """The micro-kernel's accumulators, b vectors and a broadcast fit the register file."""
    t = get_target(target)
    mr, nr = tile_shape(t)
    regs = 32 if t.lanes(32) == 1 or t.vector_bits >= 512 else 16
    assert mr * nr + nr + 1 <= regs and 1 <= mr <= 8
    p = gemm_blocking(t, 100, 1000, 100)
    assert p["MC"] % mr == 0 and p["NC"] % p["NRL"] == 0 and p["nkb"] * p["KC"] >= 1000
