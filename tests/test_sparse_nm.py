"""N:M structured-sparse matmul / matmul_q kernels (codegen/sparse_nm.py)
against the reference interpreter (which ignores ``sparse``): f32 rounding
tolerance; runs with fewer than N nonzeros, all-zero columns, short last runs
(M not dividing K), odd N, row counts around the 16-row work item, empty
shapes; a weight that is not N:M is refused, never truncated."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import check, host_without, rand, target_param
from hypothesis import given, settings
from hypothesis import strategies as st
from sqk.codegen.sparse_nm import CB, VL, NMLayout, pack_nm
from sqk.compiler.pipeline import PipelineError
from sqk.ir.graph import IRError
from sqk.ir.sparsity import holds, parse_format

PLAIN = "fold_constants,dce"   # no select_format: the kernels' own checks


def nm_values(K, N, n, m, rng, values, full=False):
    """values[K, N] with at most n nonzeros per aligned run of m rows (random
    counts 0..n unless ``full``), and column 1 (when present) all zero."""
    R = -(-K // m)
    counts = np.full((R, N), n) if full else rng.integers(0, n + 1, (R, N))
    keep = rng.random((R, m, N)).argsort(axis=1) < counts[:, None, :]
    w = np.where(keep.reshape(R * m, N)[:K], values, 0).astype(values.dtype)
    if N > 1:
        w[:, 1] = 0
    return w


def fgraph(shape, K, N, fmt, dtype="f32", seed=0, full=False):
    rng = np.random.default_rng(seed)
    n, m = parse_format(fmt).n, parse_format(fmt).m
    w = nm_values(K, N, n, m, rng, rand((K, N), dtype, rng), full)
    b = sqk.GraphBuilder("nm")
    x = b.input("x", tuple(shape) + (K,), dtype)
    g = b.output(b.matmul(x, b.const(w), sparse=fmt))
    return g, {"x": rand(tuple(shape) + (K,), dtype, rng)}


def qgraph(shape, K, N, fmt, qdt, group, sdt="f32", xdt="f32", seed=0):
    rng = np.random.default_rng(seed)
    n, m = parse_format(fmt).n, parse_format(fmt).m
    lo, hi = (-8, 7) if qdt == "i4" else (-128, 127)
    q = nm_values(K, N, n, m, rng, rng.integers(lo, hi + 1, (K, N)).astype(np.int8))
    s = rng.uniform(0.005, 0.05, (-(-K // group), N)).astype(np.float32 if sdt == "f32" else np.float16)
    b = sqk.GraphBuilder("nmq")
    x = b.input("x", tuple(shape) + (K,), xdt)
    g = b.output(b.matmul_q(x, b.const(q, qdt), b.const(s, sdt), group=group, sparse=fmt))
    return g, {"x": rand(tuple(shape) + (K,), xdt, rng)}


F_CASES = [  # (x shape without K, K, N, format, dtype)
    ((1,), 256, 64, "nm2:4", "f32"),
    ((1,), 70, 45, "nm2:4", "f32"),      # short last run, N not a multiple of 8 or of the block
    ((3,), 67, 77, "nm1:4", "f32"),
    ((16,), 64, 33, "nm4:8", "f32"),
    ((17,), 75, 40, "nm3:7", "f32"),     # a second 16-row work item of one row
    ((2, 3), 50, 20, "nm2:4", "f16"),    # leading dims fold into rows
    ((5,), 61, 70, "nm7:16", "f32"),     # M > 8: two tables
    ((2,), 31, 9, "nm1:2", "f32"),
    ((4,), 40, 35, "nm2:3", "f16"),
    ((1,), 5, 3, "nm5:13", "f32"),       # one short run
]


@pytest.mark.parametrize("case", F_CASES, ids=lambda c: f"{c[3]}-{c[4]}-M{c[0]}-K{c[1]}-N{c[2]}")
def test_matmul_nm(case):
    shape, K, N, fmt, dtype = case
    check(*fgraph(shape, K, N, fmt, dtype))


Q_CASES = [  # (x shape, K, N, format, q dtype, group, scales dtype, x dtype)
    ((1,), 128, 64, "nm2:4", "i8", 128, "f32", "f32"),
    ((3,), 70, 45, "nm2:4", "i8", 70, "f16", "f16"),
    ((17,), 66, 40, "nm4:8", "i8", 80, "f32", "f32"),   # group > K: per channel
    ((1,), 128, 64, "nm2:4", "i4", 32, "f32", "f32"),   # group-wise scales
    ((5,), 70, 45, "nm2:4", "i4", 16, "f16", "f32"),    # short last group and run
    ((16,), 64, 33, "nm1:4", "i4", 64, "f32", "f32"),   # per channel
    ((2,), 67, 20, "nm3:7", "i4", 28, "f32", "f32"),
]


@pytest.mark.parametrize("case", Q_CASES, ids=lambda c: f"{c[3]}-{c[4]}-g{c[5]}-M{c[0]}-K{c[1]}-N{c[2]}")
def test_matmul_q_nm(case):
    shape, K, N, fmt, qdt, group, sdt, xdt = case
    check(*qgraph(shape, K, N, fmt, qdt, group, sdt, xdt))


@target_param
@pytest.mark.parametrize("fmt", ["nm2:4", "nm3:7"])
def test_targets(target, fmt):
    """Every selection path: vpermilps / vpermps (host), gathers (riscv64 with and without V)."""
    check(*fgraph((3,), 70, 45, fmt, "f32"), target)
    check(*fgraph((1,), 33, 17, fmt, "f16", seed=1), target)


@target_param
def test_targets_quantized(target):
    check(*qgraph((2,), 70, 45, "nm2:4", "i8", 70), target)
    check(*qgraph((1,), 72, 40, "nm4:8", "i4", 24), target)


@pytest.mark.parametrize("target", ["riscv64", "riscv64-scalar"])
def test_riscv_row_layout(target):
    """riscv64's row layout (codegen/sparse_nm_rows.py): several 512-column blocks and a
    narrow last one, 2- and 4-bit positions, a short last run, i4 halves, row tiles of 4
    and a part tile, group-wise i4 scales."""
    check(*fgraph((5,), 37, 1100, "nm2:4", "f32", seed=2), target)
    check(*fgraph((1,), 30, 523, "nm3:7", "f16", seed=3), target)
    check(*qgraph((6,), 48, 1030, "nm2:4", "i4", 24, seed=4), target)
    check(*qgraph((1,), 40, 515, "nm1:8", "i8", 40, seed=5), target)


@pytest.mark.parametrize("shape,K,N", [((0,), 8, 8), ((2,), 0, 8), ((2,), 8, 0), ((3, 0), 12, 5)])
def test_empty(shape, K, N):
    check(*fgraph(shape, K, N, "nm2:4"))
    check(*qgraph(shape, K, N, "nm2:4", "i8", max(K, 1)))


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 20), K=st.integers(1, 90), N=st.integers(1, 70),
       nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (3, 5), (6, 16)]), seed=st.integers(0, 99))
def test_random_shapes(rows, K, N, nm, seed):
    check(*fgraph((rows,), K, N, f"nm{nm[0]}:{nm[1]}", seed=seed))


def test_dense_weight_refused():
    """A forced format that would drop values is an error naming the run and column."""
    w = np.zeros((8, 4), np.float32)
    w[4:7, 2] = 1.0   # three nonzeros in rows 4..7 of column 2
    b = sqk.GraphBuilder("bad")
    x = b.input("x", (1, 8))
    g = b.output(b.matmul(x, b.const(w), sparse="nm2:4"))
    why = holds(parse_format("nm2:4"), w)
    assert why is not None and "rows 4..7 of column 2 hold 3" in why
    # select_format refuses it first; without that pass, the kernel's packer does
    with pytest.raises(PipelineError, match="rows 4..7 of column 2 hold 3"):
        sqk.compile(g)
    with pytest.raises(IRError, match="rows 4..7 of column 2 hold 3"):
        sqk.compile(g, pipeline=PLAIN)
    b = sqk.GraphBuilder("badq")
    x = b.input("x", (2, 8))
    g = b.output(b.matmul_q(x, b.const(w.astype(np.int8), "i8"), b.const(np.ones((1, 4), np.float32)), group=8,
                            sparse="nm2:4"))
    with pytest.raises(PipelineError, match="rows 4..7 of column 2 hold 3"):
        sqk.compile(g)
    with pytest.raises(IRError, match="rows 4..7 of column 2 hold 3"):
        sqk.compile(g, pipeline=PLAIN)
    # the same weight is fine as nm3:4
    b = sqk.GraphBuilder("ok")
    x = b.input("x", (1, 8))
    check(b.output(b.matmul(x, b.const(w), sparse="nm3:4")), {"x": rand((1, 8))})


def test_group_not_multiple_of_m_refused():
    g, _ = qgraph((1,), 64, 16, "nm2:4", "i4", 30)
    with pytest.raises(PipelineError, match="multiple of M=4"):
        sqk.compile(g)
    with pytest.raises(IRError, match="multiple of M=4"):
        sqk.compile(g, pipeline=PLAIN)


@pytest.mark.parametrize("fmt,dtype", [("nm2:4", "f32"), ("nm3:7", "f16"), ("nm1:4", "i8"), ("nm4:8", "i4")])
def test_packed_layout(fmt, dtype):
    """Decode the packed bytes by the layout the module docstring documents
    and get the weight back: values, slot order, position planes."""
    K, N = 37, 45
    rng = np.random.default_rng(3)
    f = parse_format(fmt)
    vals = rand((K, N), dtype, rng) if dtype in ("f32", "f16") else \
        rng.integers(-8, 8, (K, N)).astype(np.int8)
    w = nm_values(K, N, f.n, f.m, rng, vals)
    b = sqk.GraphBuilder("lay")
    x = b.input("x", (1, K), "f16" if dtype == "f16" else "f32")
    if dtype in ("f32", "f16"):
        y = b.matmul(x, b.const(w), sparse=fmt)
    else:
        y = b.matmul_q(x, b.const(w, dtype), b.const(np.ones((1, N), np.float32)), group=K, sparse=fmt)
    node = b.output(y).nodes[-1]
    L = NMLayout(node)
    data = pack_nm(node, 1, w)
    assert len(data) == L.nbytes
    n, m, R, nblk, pb = f.n, f.m, L.R, L.nblk, L.pb
    if dtype == "i4":   # pairs of slots: byte = (q[2j+1] << 4) | (q[2j] + 8); a last odd slot: q
        by = np.frombuffer(data[:L.nblk * L.val_blk], "i1").reshape(nblk, R, CB, -(-n // 2), VL).astype(np.int64)
        v = np.zeros((nblk, R, CB, n, VL), np.int64)
        for s in range(n):
            j = by[..., s // 2, :]
            v[..., s, :] = j >> 4 if s % 2 else (j & 15) - 8 if s + 1 < n else j
    else:
        npd = {"f32": "<f4", "f16": "<f2", "i8": "i1"}[dtype]
        v = np.frombuffer(data[:L.nblk * L.val_blk], npd).reshape(nblk, R, CB, n, VL)
    planes = np.frombuffer(data[L.pos_off:], "<u2" if pb == 2 else "<u4").reshape(nblk, R, CB, n, 1)
    p = (planes.astype(np.int64) >> (pb * np.arange(VL))) & ((1 << pb) - 1)
    dense = np.zeros((R * m, nblk * CB * VL), np.float64)
    for blk, r, cv, s, lane in np.ndindex(v.shape):
        if v[blk, r, cv, s, lane] != 0:
            col = (blk * CB + cv) * VL + lane
            assert dense[r * m + p[blk, r, cv, s, lane], col] == 0, "two slots at one position"
            dense[r * m + p[blk, r, cv, s, lane], col] = v[blk, r, cv, s, lane]
    np.testing.assert_array_equal(dense[:K, :N], w.astype(np.float64))
    assert not dense[K:].any() and not dense[:, N:].any()
    assert (p[..., :] < m).all()


@pytest.mark.parametrize("mode", ["avx512", "avx2"])
def test_x86_paths(monkeypatch, mode):
    """x86 selects with vpermilps: with AVX-512 two slots of M <= 4, N even formats
    share one zmm (lanes 8..15: slot s + 1); the AVX2 build (AVX-512 switched
    off) keeps one slot per ymm.  Both against the reference."""
    import sqk.codegen.target as T
    from sqk.codegen.emit import assembly
    from sqk.compiler.dump import lowered_module

    host = T.get_target("host")
    feats = set(host.enabled_features)
    if "avx2" not in feats or mode == "avx512" and "avx512f" not in feats:
        pytest.skip(f"needs an x86 CPU with {mode.upper()} (the host here is not)")
    t = host if mode == "avx512" else host_without(monkeypatch, lambda f: f.startswith("+avx512"))
    cases = [fgraph((1,), 70, 45, "nm2:4", "f32"), fgraph((4,), 40, 35, "nm2:3", "f16"),
             qgraph((3,), 70, 45, "nm2:4", "i8", 70, "f16", "f16"), qgraph((5,), 70, 45, "nm2:4", "i4", 16, "f16")]
    for g, inputs in cases:
        asm = assembly(str(lowered_module(g, t)), t)
        assert ("vpermilps\t%zmm" in asm) == (mode == "avx512"), g
        check(g, inputs)
