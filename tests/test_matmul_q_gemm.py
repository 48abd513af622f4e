"""matmul_q's GEMM for many rows of x (codegen/matmul_q_gemm.py: a dequantized
panel of w on the stack, the fp32 micro-kernel over it) against the reference
interpreter within f32 rounding: row counts around the micro-tile, the row
chunk and the item split; N past the vector width and the 64-column block; K
with short last groups and K blocks; every weight scheme and GGUF type."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import assert_close, check, host_without, rand
from hypothesis import given, settings
from hypothesis import strategies as st
from sqk.codegen import matmul_q_gemm
from sqk.codegen.target import get_target
from sqk.ir import blocks
from test_matmul_q import qgraph
from test_matmul_q_gguf import gguf_graph, random_blocks


def test_takes_gemm():
    """Many rows of float x on x86 take the GEMM; one row, int8 activations and
    riscv64 do not."""
    host = get_target("host")

    g, _ = qgraph((64,), 64, 8, "i4", 32)
    n = next(n for n in g.nodes if n.op == "matmul_q")
    assert matmul_q_gemm.takes_gemm(n, host)
    assert not matmul_q_gemm.takes_gemm(n, get_target("riscv64"))
    g1, _ = qgraph((1,), 64, 8, "i4", 32)
    assert not matmul_q_gemm.takes_gemm(next(n for n in g1.nodes if n.op == "matmul_q"), host)
    b = sqk.GraphBuilder("i8act")
    g8 = b.output(b.matmul_q(b.input("x", (64, 64)), b.const(np.ones((64, 8), np.int8), "i4"),
                             b.const(np.ones((2, 8), np.float32)), group=32, activations="int8"))
    assert not matmul_q_gemm.takes_gemm(next(n for n in g8.nodes if n.op == "matmul_q"), host)


# (M, K, N, q dtype, group, zeros, scales dtype, x dtype)
CASES = [
    (9, 64, 8, "i4", 32, False, "f32", "f32"),          # below the threshold (the GEMV tiles)
    (10, 64, 8, "i4", 32, False, "f32", "f32"),         # the threshold, one column vector
    (11, 100, 70, "i4", 32, True, "f16", "f32"),        # short last group, odd N, zeros
    (31, 96, 131, "i8", 96, False, "f32", "f32"),       # per-channel, N % 64 != 0, M not a tile multiple
    (64, 576, 192, "i4", 32, False, "f16", "f32"),      # a SmolLM2 k projection: K blocks of 256
    (97, 200, 65, "i8", 64, True, "f32", "f32"),        # short last group and K block, zeros
    (130, 300, 33, "i4", 32, False, "f16", "f16"),      # f16 x: two row chunks, a short one
    (257, 70, 129, "i8", 70, True, "f32", "f32"),       # group = K, three row chunks
    (600, 40, 5, "i4", 7, True, "f32", "f32"),          # group 7, many chunks, 5 columns
    (19, 700, 17, "i4", 300, False, "f32", "f32"),      # group > KC (a divisor of it: 150)
    (12, 530, 24, "i8", 521, False, "f32", "f32"),      # a prime group > KC: the panel takes the whole group
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}-M{c[0]}-K{c[1]}-N{c[2]}-g{c[4]}")
def test_gemm(case):
    M, K, N, qdt, group, zeros, sdt, xdt = case
    g, inputs = qgraph((M,), K, N, qdt, group, zeros, sdt, xdt, seed=M + K)
    check(g, inputs)


def test_gemm_empty_k():
    """K = 0: y is zeros (no K block)."""
    for qdt in ("i4", "i8"):
        g, inputs = qgraph((12,), 0, 70, qdt, 32)
        out = check(g, inputs)(**inputs)
        assert out.shape == (12, 70) and not out.any()
    b = sqk.GraphBuilder("q6_k_empty")
    x = b.input("x", (25, 0))
    g = b.output(blocks.Weight(b, "Q6_K", np.zeros((7, 0), np.uint8), (7, 0), name="w").matmul(x))
    out = check(g, {"x": np.zeros((25, 0), np.float32)})(x=np.zeros((25, 0), np.float32))
    assert out.shape == (25, 7) and not out.any()


def test_gemm_batched_x_and_threads():
    """Leading dims of x fold into rows; two threads split the items."""
    g, inputs = qgraph((3, 7), 96, 200, "i4", 32, zeros=True, seed=5)
    check(g, inputs, threads=2)


def test_gemm_without_avx2(monkeypatch):
    """An x86 host without AVX2 (narrower vectors: another micro-tile)."""
    host_without(monkeypatch, lambda f: f[1:].startswith(("avx2", "avx512")))
    g, inputs = qgraph((37,), 100, 70, "i4", 32, zeros=True, seed=6)
    check(g, inputs)


@pytest.mark.parametrize("name", blocks.QUANTIZED)
@pytest.mark.parametrize("M, N, nb", [(10, 67, 1), (64, 130, 2), (75, 33, 3)], ids=str)
def test_gemm_gguf(name, M, N, nb):
    """Every GGUF type (Q6_K runs matmul_ggml), against numpy's dequantize-then-matmul."""
    K = nb * blocks.TYPES[name].block
    g, inputs, w = gguf_graph(name, M, N, K, seed=M)
    m = check(g, inputs)
    assert_close(m(**inputs), (inputs["x"].astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32),
                 what="against numpy dequantize-then-matmul")


def test_gemm_non_finite_scales():
    """A NaN or inf scale makes the reference's w NaN / inf: the same outputs."""
    rng = np.random.default_rng(7)
    scales = rng.uniform(0.005, 0.05, (2, 16)).astype(np.float32)
    scales[0, 3], scales[1, 5] = np.nan, np.inf
    b = sqk.GraphBuilder("nonfinite")
    x = b.input("x", (20, 64))
    g = b.output(b.matmul_q(x, b.const(rng.integers(-8, 8, (64, 16)).astype(np.int8), "i4"), b.const(scales),
                            group=32))
    inputs = {"x": rand((20, 64), "f32", rng)}
    out = check(g, inputs)(**inputs)
    assert np.isnan(out[:, 3]).all() and not np.isfinite(out[:, 5]).any()


@settings(max_examples=10, deadline=None)
@given(m=st.integers(8, 140), k=st.integers(1, 300), n=st.integers(1, 140), qdt=st.sampled_from(["i4", "i8"]),
       group=st.sampled_from([1, 7, 32, 64, 0]), zeros=st.booleans(), sdt=st.sampled_from(["f32", "f16"]))
def test_gemm_random_shapes(m, k, n, qdt, group, zeros, sdt):
    g, inputs = qgraph((m,), k, n, qdt, group or k, zeros, sdt, seed=m * 1000 + k)
    check(g, inputs)


def ggml_graph(M, N, K, seed=0, x_dtype="f32"):
    """x[M, K] @ W.T with W random Q6_K blocks kept as they are (matmul_ggml)."""
    rng = np.random.default_rng(seed)
    raw = random_blocks("Q6_K", N, K, rng)
    b = sqk.GraphBuilder("q6_k")
    x = b.input("x", (M, K), x_dtype)
    g = b.output(blocks.Weight(b, "Q6_K", raw, (N, K), name="w").matmul(x))
    assert [n.op for n in g.nodes if n.op.startswith("matmul")] == ["matmul_ggml"]
    return g, {"x": rand((M, K), x_dtype, rng, -1, 1)}, blocks.dequantize("Q6_K", raw, (N, K))


def test_takes_ggml_gemm():
    """matmul_ggml (Q6_K) takes the GEMM from GGML_MIN_ROWS rows of x."""
    host = get_target("host")
    at = matmul_q_gemm.GGML_MIN_ROWS
    for M, want in ((at - 1, False), (at, True)):
        g, _, _ = ggml_graph(M, 8, 256)
        n = next(n for n in g.nodes if n.op == "matmul_ggml")
        assert matmul_q_gemm.takes_ggml_gemm(n, host) is want
        assert not matmul_q_gemm.takes_ggml_gemm(n, get_target("riscv64"))


@pytest.mark.parametrize("M, N, nb, xdt", [(20, 64, 1, "f32"), (33, 200, 2, "f16"), (150, 7, 1, "f32")])
def test_ggml_gemm(M, N, nb, xdt):
    """matmul_ggml's GEMM: one and several super-blocks, a whole, several and a partial
    column block, f16 x, more rows than a chunk."""
    g, inputs, w = ggml_graph(M, N, nb * 256, seed=M, x_dtype=xdt)
    m = check(g, inputs)
    assert_close(m(**inputs), (inputs["x"].astype(np.float64) @ w.T.astype(np.float64)).astype(inputs["x"].dtype),
                 what="against numpy dequantize-then-matmul")
