"""The fp32 GEMM path (codegen/matmul.py: packed panels of a and b, the register
micro-tile, K blocks, work items) against the numpy reference on the shapes that
reach its edges: M, N, K around multiples of the micro-tile (MR rows, NRL
columns), of the packed-b panel (PACK_NR), of the chunk a is packed by
(PACK_A_CHUNK) and of the K block, with a packed and read in place; b as an input, as a packed constant and as a
transposed view; batch; a fused epilogue after several K blocks; 1 and 2 threads;
the host's AVX2 tile and the AVX-512 tile (16-lane vectors, 6-row tiles),
which LLVM splits into AVX2 halves here, so its code runs on any x86-64."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sqk
import sqk.codegen.matmul as matmul
from harness import check, rand
from sqk.codegen.matmul import (
    GEMM_KC,
    MIN_ITEMS,
    PACK_A_CHUNK,
    PACK_NR,
    STREAM_MAX_M,
    _imbalance,
    cdiv,
    gemm_blocking,
)
from sqk.codegen.target import get_target

# (M, K, N): every M tail of 4- and 6-row tiles, N tails of 24- and 64-column
# tiles and 48-column panels, K tails of the 8-element packing chunk; all GEMM (M > 4).
EDGE_SHAPES = [(5, 1, 1), (5, 7, 23), (6, 8, 24), (7, 9, 25), (8, 15, 47), (9, 16, 48), (11, 17, 49),
               (12, 23, 63), (13, 24, 64), (23, 25, 65), (24, 31, 67), (25, 33, 8), (47, 40, 16),
               (48, 41, 17), (49, 63, 7), (67, 64, 67), (66, 65, 2), (63, 67, 33)]


def many_matmuls(shapes, const: bool, rng, dtype="f32", transposed=False):
    """One graph with a matmul per shape (one compile for all); its inputs."""
    g = sqk.GraphBuilder("gemm_edges")
    outs, inputs = [], {}
    for i, (m, k, n) in enumerate(shapes):
        inputs[f"a{i}"] = rand((m, k), dtype, rng)
        a = g.input(f"a{i}", (m, k), dtype)
        w = rand((n, k), dtype, rng).T if transposed else rand((k, n), dtype, rng)
        if const:
            b = g.const(w, dtype, name=f"w{i}")
        else:
            inputs[f"b{i}"] = np.ascontiguousarray(w)
            b = g.input(f"b{i}", (k, n), dtype)
        outs.append(g.matmul(a, b))
    return g.output(*outs), inputs


def wide_host(monkeypatch):
    """The host described with 512-bit vectors (AVX-512's tile shapes and lane counts)."""
    import sqk.codegen.target as T

    get_target = T.get_target
    wide = dataclasses.replace(get_target("host"), vector_bits=512)
    monkeypatch.setattr(T, "get_target", lambda name, **kw: wide if name == "host" else get_target(name, **kw))
    return wide


@pytest.fixture(params=["host", "wide"])
def isa(request, monkeypatch):
    if request.param == "wide":
        wide_host(monkeypatch)
    return request.param


@pytest.fixture(params=["pack_a", "a_in_place"])
def a_layout(request, monkeypatch):
    """Items pack their rows of a (whatever their width) or read a in place."""
    monkeypatch.setattr(matmul, "PACK_A_MIN_PANELS", 1 if request.param == "pack_a" else 1 << 30)
    return request.param


@pytest.mark.parametrize("const", [False, True], ids=["b_input", "b_packed"])
def test_edge_shapes(isa, a_layout, const):
    g, inputs = many_matmuls(EDGE_SHAPES, const, np.random.default_rng(1))
    check(g, inputs, threads=2)


def test_edge_shapes_transposed_view():
    """A constant b given as the transpose of an [N, K] array (a Linear weight) packs as its values."""
    g, inputs = many_matmuls(EDGE_SHAPES[::3], True, np.random.default_rng(2), transposed=True)
    check(g, inputs)


@pytest.mark.parametrize("const", [False, True], ids=["b_input", "b_packed"])
def test_long_k(isa, a_layout, const):
    """K over several K blocks, not a multiple of the block or the packing chunk;
    tails in M and N.  f32 sums of ~1000 products: tolerance grows with sqrt(K)."""
    k = 4 * GEMM_KC + PACK_A_CHUNK - 3
    g, inputs = many_matmuls([(37, k, 53), (8, k, PACK_NR + 1), (64, k, 576 % 67)], const, np.random.default_rng(3))
    check(g, inputs, rtol=2e-4, threads=2)


def test_f16_k_blocks(isa, a_layout):
    """f16 over several K blocks: the f32 partial-sum tile, rounded once."""
    k = 2 * GEMM_KC + 5
    g, inputs = many_matmuls([(13, k, 29), (6, k, 64)], False, np.random.default_rng(4), dtype="f16")
    check(g, inputs)


@pytest.mark.parametrize("const", [False, True], ids=["b_input", "b_packed"])
def test_batched(isa, const):
    """b with its own batch dims (one packed matrix each) and a broadcast over b's batch."""
    rng = np.random.default_rng(5)
    for a_shape, b_shape in (((3, 37, 45), (3, 45, 29)), ((2, 1, 9, 70), (1, 3, 70, 26))):
        g = sqk.GraphBuilder("gemm_batched")
        a = g.input("a", a_shape)
        w = rand(b_shape, "f32", rng)
        b = g.const(w, "f32", name="w") if const else g.input("b", b_shape)
        inputs = {"a": rand(a_shape, "f32", rng)} | ({} if const else {"b": w})
        check(g.output(g.matmul(a, b)), inputs, threads=2)


def test_epilogue_after_k_blocks(isa):
    """matmul + bias + gelu fused, the epilogue applied after the last of several K
    blocks (the partial sums added first), on tails in M and N."""
    rng = np.random.default_rng(6)
    m, k, n = 27, 2 * GEMM_KC + 11, 61
    g = sqk.GraphBuilder("gemm_epilogue")
    y = g.matmul(g.input("a", (m, k)), g.const(rand((k, n), "f32", rng), "f32", name="w"))
    y = g.gelu(g.add(y, g.input("bias", (n,))))
    mod = check(g.output(y), {"a": rand((m, k), "f32", rng), "bias": rand((n,), "f32", rng)}, rtol=2e-4, threads=2)
    assert [kk["name"].split("_", 1)[1] for kk in mod.manifest["kernels"]] == ["fused"]


@settings(max_examples=10, deadline=None)
@given(m=st.integers(STREAM_MAX_M + 1, 67), k=st.integers(1, 67), n=st.integers(1, 67), const=st.booleans(),
       threads=st.sampled_from([1, 2]))
def test_random_small(m, k, n, const, threads):
    g, inputs = many_matmuls([(m, k, n)], const, np.random.default_rng(m * 10000 + k * 100 + n))
    check(g, inputs, threads=threads)


@pytest.mark.parametrize("target", ["host", "wide"])
@pytest.mark.parametrize("mkn", [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (64, 576, 576),
                                 (64, 576, 192), (512, 576, 1536), (512, 1536, 576), (64, 576, 49152),
                                 (512, 2048, 5632), (200, 300, 170)])
def test_items_deal_evenly(target, mkn, monkeypatch):
    """Work items: whole micro-tiles, the product split in at least MIN_ITEMS
    items (when it is worth sharing), in a count two threads get equal shares of."""
    t = wide_host(monkeypatch) if target == "wide" else get_target("host")
    m, k, n = mkn
    p = gemm_blocking(t, m, k, n)
    items = cdiv(m, p["MC"]) * cdiv(n, p["NC"])
    assert p["MC"] % p["MR"] == 0 and p["NC"] % p["NRL"] == 0 and p["nkb"] * p["KC"] >= k
    assert items >= MIN_ITEMS and _imbalance(items) <= 1.05, (p, items)


def test_imbalance():
    assert _imbalance(8) == 1.0 and _imbalance(88) == 1.0
    assert _imbalance(9) == pytest.approx(6 / 4.5)
    assert _imbalance(1) == 2.0
