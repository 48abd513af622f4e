"""Sparse matmul kernels (codegen/sparse.py): ``matmul {sparse=csr|bsrRxC}`` on
f32 / f16 weights and ``matmul_q {sparse=...}`` on i8 (per-channel) weights,
against the reference interpreter (which ignores ``sparse``).

Weights are pruned by magnitude here (blockwise for bsr), with some all-zero
and some fully dense columns; the error bound is f32 rounding relative to
|x| @ |W| (the kernels sum in another order than numpy), plus one f16 step
for f16 outputs."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import compile_for, target_param
from hypothesis import given, settings
from hypothesis import strategies as st
from sqk.codegen import sparse
from sqk.codegen.lower import UnsupportedOp, pack_constants
from sqk.compiler.pipeline import PipelineError

FORMATS = ["csr", "bsr1x4", "bsr1x8", "bsr4x1", "bsr8x1", "bsr4x4"]
KINDS = ["f32", "f16", "q8"]   # matmul f32, matmul f16, matmul_q i8 (f32 x)


def block_of(fmt: str) -> tuple[int, int]:
    if fmt == "csr":
        return 1, 1
    r, c = fmt[3:].split("x")
    return int(r), int(c)


def pruned(K, N, sparsity, block, rng, lo=0.1):
    """f32 [K, N], entries of magnitude >= lo, with the smallest-magnitude blocks
    (by max |w|; edge blocks padded) zeroed up to ``sparsity`` of the blocks;
    column 0 then all zero and column N-1 fully dense (when N > 2)."""
    r, c = block
    w = (rng.uniform(lo, 1.0, (K, N)) * rng.choice([-1.0, 1.0], (K, N))).astype(np.float32)
    kb, nb = -(-K // r), -(-N // c)
    pad = np.zeros((kb * r, nb * c), np.float32)
    pad[:K, :N] = np.abs(w)
    mag = pad.reshape(kb, r, nb, c).max(axis=(1, 3))
    drop = int(round(sparsity * mag.size))
    keep = np.ones(mag.size, bool)
    keep[np.argsort(mag, axis=None, kind="stable")[:drop]] = False
    keep = np.repeat(np.repeat(keep.reshape(kb, nb), r, axis=0), c, axis=1)[:K, :N]
    w = np.where(keep, w, np.float32(0))
    if N > 2 and 0 < sparsity < 1:
        w[:, 0] = 0
        w[:, -1] = rng.uniform(lo, 1.0, K).astype(np.float32)
    return w


def add_node(b, x, w, kind, fmt, rng):
    """One sparse node on x for the weight w; returns (output, dense f32 weight).
    q8: matmul_q with i8 per-channel weights, f32 scales; q8h: f16 scales (and f16 x)."""
    if kind.startswith("q8"):
        sdt = np.float16 if kind == "q8h" else np.float32
        scale = np.abs(w).max(axis=0, initial=0) / 127
        scale = np.where(scale > 0, scale, 1).astype(sdt)
        q = np.clip(np.round(w / scale.astype(np.float32)), -127, 127).astype(np.int8)
        y = b.matmul_q(x, b.const(q, "i8"), b.const(scale[None, :]), group=max(1, w.shape[0]), sparse=fmt)
        return y, q.astype(np.float32) * scale.astype(np.float32)
    w = w.astype(np.float16 if kind == "f16" else np.float32)
    return b.matmul(x, b.const(w), sparse=fmt), w.astype(np.float32)


def assert_sparse_close(out, ref, x, w, what):
    """|out - ref| <= tol * (|x| @ |w|) (+ one f16 step of |ref| for f16)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    tol = 1e-5 * bound
    if out.dtype == np.float16:
        tol = 2e-3 * bound + 1e-3 * np.abs(ref.astype(np.float64))
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    bad = err > tol + 1e-30
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} outputs off, worst {err.max():.3g}"


def run_cases(target, fmt, kind, cases, K, N, seed=0):
    """One graph holding a node per (sparsity, M) case, each on its own x."""
    rng = np.random.default_rng(seed)
    xdt = "f16" if kind in ("f16", "q8h") else "f32"
    b = sqk.GraphBuilder("sp")
    outs, inputs, dense = [], {}, []
    for i, (sparsity, M) in enumerate(cases):
        shape = M if isinstance(M, tuple) else (M,)
        x = b.input(f"x{i}", shape + (K,), xdt)
        y, wd = add_node(b, x, pruned(K, N, sparsity, block_of(fmt), rng), kind, fmt, rng)
        outs.append(y)
        dense.append(wd)
        inputs[f"x{i}"] = rng.uniform(-2, 2, shape + (K,)).astype(np.float16 if xdt == "f16" else np.float32)
    g = b.output(*outs)
    m = compile_for(g, target)
    got, refs = m(**inputs), sqk.reference(g, **inputs)
    got, refs = (got, refs) if len(outs) > 1 else ((got,), (refs,))
    for i, (o, r) in enumerate(zip(got, refs)):
        xi = inputs[f"x{i}"].reshape(-1, K)
        assert_sparse_close(o.reshape(-1, N), r.reshape(-1, N), xi, dense[i],
                            f"{fmt} {kind} sparsity={cases[i][0]} M={cases[i][1]} K={K} N={N} on {target}")
    return m


# (sparsity, rows of x): every sparsity at two row counts, M in {1, 3, 16, 17} and a batched x
HOST_CASES = [(0.0, 1), (0.0, 17), (0.5, 1), (0.5, 3), (0.9, 1), (0.9, 16), (0.9, (2, 3)), (1.0, 1), (1.0, 17)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_host(fmt, kind):
    run_cases("host", fmt, kind, HOST_CASES, K=37, N=29)


@pytest.mark.parametrize("fmt", ["csr", "bsr1x8", "bsr4x1"])
def test_host_f16_x_and_scales(fmt):
    """matmul_q with f16 x and f16 scales (y rounded to f16)."""
    run_cases("host", fmt, "q8h", [(0.5, 1), (0.9, 5)], K=45, N=23, seed=6)


def test_wide_indices():
    """K > 65536 block rows: i32 row indices; x still fits the scratch for one
    row (M = 1) but not for two (row groups of one, read in turn)."""
    rng = np.random.default_rng(7)
    K, N = 70001, 3
    w = np.zeros((K, N), np.float32)
    rows = rng.choice(K, 300, replace=False)
    w[rows, rng.integers(0, N, 300)] = rng.uniform(0.5, 1, 300)
    w[K - 1, 0] = 2.0
    for M in (1, 2):
        g = _graph(w, "csr", M)
        node = next(n for n in g.nodes if n.op == "matmul")
        assert sparse.Layout(node, w).inp == np.dtype("<i4")
        xv = rng.uniform(-1, 1, (M, K)).astype(np.float32)
        assert_sparse_close(compile_for(g, "host")(x=xv), sqk.reference(g, x=xv), xv, w, f"K={K} M={M}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_host_larger(fmt):
    """Many chunks (work items) and threads: K, N of a few hundred, odd."""
    run_cases("host", fmt, "f32", [(0.9, 1), (0.75, 5), (0.5, 17)], K=301, N=517, seed=1)
    g = _graph(pruned(301, 517, 0.5, block_of(fmt), np.random.default_rng(1)), fmt)
    node = next(n for n in g.nodes if n.op == "matmul")
    assert len(sparse.Layout(node, g.producers()[node.inputs[1]].attrs["value"]).chunks()) > 3


RISCV_CASES = [(0.5, 1), (0.9, 3), (1.0, 1)]


@target_param
@pytest.mark.parametrize("fmt,kind", [("csr", "f32"), ("csr", "q8"), ("bsr1x8", "f16"), ("bsr4x1", "f32"),
                                      ("bsr4x4", "q8h")])
def test_targets(target, fmt, kind):
    run_cases(target, fmt, kind, RISCV_CASES, K=21, N=11)


@pytest.mark.parametrize("fmt,kind", [("csr", "f32"), ("csr", "q8"), ("bsr1x8", "f32"), ("bsr4x4", "f16"),
                                      ("bsr8x1", "q8")])
def test_riscv_long_columns(fmt, kind):
    """Columns of many entries: riscv64's M = 1 loops run several strips at any VLEN."""
    run_cases("riscv64", fmt, kind, [(0.5, 1), (0.2, 1), (0.5, 6)], K=301, N=37, seed=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty(fmt):
    """K = 0 (y is zeros), N = 0, M = 0, and K = N = 1."""
    rng = np.random.default_rng(2)
    b = sqk.GraphBuilder("empty")
    shapes = [(3, 0, 5), (2, 4, 0), (0, 6, 3), (1, 1, 1), (4, 1, 1)]
    xs, outs = {}, []
    for i, (M, K, N) in enumerate(shapes):
        x = b.input(f"x{i}", (M, K))
        w = rng.uniform(0.5, 1, (K, N)).astype(np.float32)
        outs.append(b.matmul(x, b.const(w), sparse=fmt))
        xs[f"x{i}"] = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    g = b.output(*outs)
    got, refs = compile_for(g, "host")(**xs), sqk.reference(g, **xs)
    for (M, K, N), o, r in zip(shapes, got, refs):
        assert o.shape == (M, N)
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=0, err_msg=f"{fmt} M={M} K={K} N={N}")


@pytest.mark.parametrize("fmt", ["csr", "bsr4x4", "bsr8x1"])
@pytest.mark.parametrize("scratch", [64, 37 * 4 * 3])
def test_small_scratch(fmt, scratch, monkeypatch):
    """x too big for the stack scratch: row groups of fewer rows, or x read directly."""
    monkeypatch.setattr(sparse, "SCRATCH_BYTES", scratch)
    run_cases("host", fmt, "f32", [(0.5, 1), (0.9, 17)], K=37, N=29, seed=3)
    run_cases("host", fmt, "q8", [(0.5, 5)], K=37, N=29, seed=3)
    run_cases("host", fmt, "f16", [(0.5, 1), (0.9, 3)], K=37, N=29, seed=3)


def test_packed_bytes():
    """csr stores only the nonzeros (u16 indices, padded per column to 8) and
    the column pointers: 90% sparse f32 moves ~0.6 bytes per dense weight."""
    rng = np.random.default_rng(4)
    K, N = 512, 256
    w = pruned(K, N, 0.9, (1, 1), rng)
    (blob,) = pack_constants(_graph(w, "csr")).values()
    nnz = np.count_nonzero(w)
    assert nnz * 6 <= len(blob) <= (nnz + 7 * N) * 6 + 4 * (N + 1) + 128
    assert len(blob) < 0.7 * w.nbytes / 4


def _graph(w, fmt, M=1):
    b = sqk.GraphBuilder("g")
    return b.output(b.matmul(b.input("x", (M, w.shape[0])), b.const(w), sparse=fmt))


def test_i4_per_channel():
    """i4 weights with one group are stored like i8; grouped i4 is refused."""
    rng = np.random.default_rng(5)
    K, N = 40, 19
    q = rng.integers(-8, 8, (K, N)).astype(np.int8)
    q[rng.random((K, N)) < 0.7] = 0
    s = rng.uniform(0.01, 0.1, (1, N)).astype(np.float32)
    b = sqk.GraphBuilder("i4")
    x = b.input("x", (3, K))
    g = b.output(b.matmul_q(x, b.const(q, "i4"), b.const(s, "f32"), group=K, sparse="csr"))
    xv = rng.uniform(-1, 1, (3, K)).astype(np.float32)
    assert_sparse_close(compile_for(g, "host")(x=xv), sqk.reference(g, x=xv), xv, q * s, "i4 csr")
    b = sqk.GraphBuilder("i4g")
    x = b.input("x", (1, K))
    g = b.output(b.matmul_q(x, b.const(q, "i4"), b.const(np.ones((2, N), np.float32), "f32"), group=32,
                            sparse="csr"))
    # refused by the select_format pass, or (without it) by the kernel itself
    with pytest.raises((UnsupportedOp, PipelineError), match="per-channel"):
        sqk.compile(g)
    with pytest.raises(UnsupportedOp, match="per-channel"):
        pack_constants(g)


def test_weight_must_be_constant():
    b = sqk.GraphBuilder("nc")
    y = b.matmul(b.input("x", (1, 8)), b.input("w", (8, 4)), sparse="csr")
    with pytest.raises(UnsupportedOp, match="constant"):
        sqk.compile(b.output(y))


@settings(max_examples=10, deadline=None)
@given(fmt=st.sampled_from(FORMATS), M=st.integers(1, 20), K=st.integers(1, 70), N=st.integers(1, 40),
       sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.97, 1.0]), kind=st.sampled_from(KINDS))
def test_random_shapes(fmt, M, K, N, sparsity, kind):
    run_cases("host", fmt, kind, [(sparsity, M)], K=K, N=N, seed=M * 1000 + K * 10 + N)
