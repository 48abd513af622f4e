"""matmul with a constant b: the GEMM path reads b packed at compile time in
column panels (codegen/matmul.py, pack_matmul_b), the GEMV path as stored.
Odd shapes (tails of every tile and panel), K and N over one block, f16,
batched a and b, and a fused epilogue, vs the numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import check, rand, target_param
from sqk.codegen.lower import pack_constants
from sqk.codegen.matmul import (
    GEMM_KC,
    GEMM_NC,
    PACK_NR,
    STREAM_MAX_M,
    cdiv,
    gemm_blocking,
    pack_matmul_b,
)
from sqk.codegen.target import get_target


def const_graph(a_shape, w, dtype="f32", bias=False):
    g = sqk.GraphBuilder("matmul_const")
    a = g.input("a", a_shape, dtype)
    y = g.matmul(a, g.const(w, dtype, name="w"))
    if bias:
        y = g.relu(g.add(y, g.input("bias", (w.shape[-1],), dtype)))
    return g.output(y)


def run(a_shape, b_shape, target="host", dtype="f32", bias=False, rtol=None, seed=0, **kw):
    rng = np.random.default_rng(seed)
    inputs = {"a": rand(a_shape, dtype, rng)}
    if bias:
        inputs["bias"] = rand((b_shape[-1],), dtype, rng)
    g = const_graph(a_shape, rand(b_shape, dtype, rng), dtype, bias)
    return check(g, inputs, target, rtol=rtol, **kw)


@target_param
@pytest.mark.parametrize("mkn", [(37, 53, 29), (5, 8, 1), (11, 3, PACK_NR + 1), (200, 300, 129)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(target, mkn):
    m, k, n = mkn
    run((m, k), (k, n), target, rtol=1e-4 if k > 64 else None, threads=2)


@target_param
def test_k_and_n_blocks(target):
    """K over several K blocks and N over several item tiles and panels."""
    k, n = 2 * GEMM_KC + 3, GEMM_NC + PACK_NR + 5
    run((9, k), (k, n), target, rtol=1e-4, threads=2)


@target_param
def test_f16(target):
    """f16 b stays f16 when packed (widened on load); K over one block: f32 partial sums."""
    run((13, 31), (31, 29), target, dtype="f16")
    k = GEMM_KC + 7
    run((7, k), (k, 40), target, dtype="f16")


@target_param
@pytest.mark.parametrize("a_shape,b_shape", [
    ((2, 3, 7, 20), (20, 27)),     # 2-D b shared by every batch item (folded into M)
    ((3, 9, 6), (3, 6, 26)),       # batched b: one packed matrix per batch item
    ((2, 1, 8, 5), (1, 3, 5, 30)),  # both broadcast
], ids=["fold", "batched_b", "bcast"])
def test_batched(target, a_shape, b_shape):
    run(a_shape, b_shape, target)


@target_param
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_fused_epilogue(target, dtype):
    """matmul + bias + relu fused: the fused node's constant b is packed too."""
    m = run((21, 45), (45, 50), target, dtype=dtype, bias=True)
    assert [k["name"].split("_", 1)[1] for k in m.manifest["kernels"]] == ["fused"]


def test_packed_only_gemm():
    """The GEMM path packs b (bytes grow by the panel padding), the GEMV path does not."""
    w = rand((33, 50), "f32")
    for m, packed in ((STREAM_MAX_M, False), (STREAM_MAX_M + 1, True)):
        g = const_graph((m, 33), w)
        data = pack_constants(g)
        assert bool(data) == packed
        if packed:
            (blob,) = data.values()
            assert len(blob) == cdiv(50, PACK_NR) * 33 * PACK_NR * 4


def test_pack_layout():
    """packed[p, k, c] = b[k, p*PACK_NR + c], zeros past N."""
    n = PACK_NR + 6
    g = const_graph((8, 5), np.arange(5 * n, dtype=np.float32).reshape(5, n))
    node = next(n for n in g.nodes if n.op == "matmul")
    w = next(n for n in g.nodes if n.op == "const").attrs["value"]
    p = np.frombuffer(pack_matmul_b(node, 1, w), "<f4").reshape(2, 5, PACK_NR)
    np.testing.assert_array_equal(p[0], w[:, :PACK_NR])
    np.testing.assert_array_equal(p[1, :, :6], w[:, PACK_NR:])
    assert not p[1, :, 6:].any()


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
def test_packed_tile_divides_panel(target):
    p = gemm_blocking(get_target(target), 100, 1000, 100, packed=True)
    assert PACK_NR % p["NRL"] == 0 and p["NC"] % p["NRL"] == 0


def test_fused_packs_like_anchor():
    """The fused node's constant b gets the anchor's bytes; an attention body's does not."""
    from sqk.compiler.dump import run_pipeline

    w = rand((40, 30), "f32")
    plain, fused = const_graph((9, 40), w), run_pipeline(const_graph((9, 40), w, bias=True))
    assert [n.op for n in fused.nodes if n.op != "const"] == ["fused"]
    assert list(pack_constants(fused).values()) == list(pack_constants(plain).values())


@target_param
def test_constant_read_in_two_layouts(target):
    """One constant as a GEMM b (packed), a GEMV b (plain) and a graph output:
    each reader gets its own copy, in its own layout."""
    rng = np.random.default_rng(5)
    w = rand((37, 29), "f32", rng)
    g = sqk.GraphBuilder("shared")
    wc = g.const(w, "f32", name="w")
    big = g.matmul(g.input("a", (STREAM_MAX_M + 3, 37)), wc)
    small = g.matmul(g.input("x", (1, 37)), wc)
    g = g.output(big, small, wc)
    check(g, {"a": rand((STREAM_MAX_M + 3, 37), "f32", rng), "x": rand((1, 37), "f32", rng)}, target)
    with pytest.raises(ValueError, match="give each reader its own constant"):
        pack_constants(g)   # without unshare_packed_constants, which compile applies
