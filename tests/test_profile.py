"""Profiling: the runtime's per-step timer, static kernel costs, Module.profile
and ``sqk bench``."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.compiler.cli import main
from sqk.compiler.cost import node_cost
from sqk.codegen.lower import pack_constants

from conftest import require_riscv
from harness import rand


def small_model():
    """layernorm -> matmul -> gelu -> add: four kernels of different kinds."""
    rng = np.random.default_rng(1)
    b = sqk.GraphBuilder("small")
    x = b.input("x", (4, 32))
    ln = b.layernorm(x, b.const(np.ones(32, np.float32), name="s"), b.const(np.zeros(32, np.float32), name="o"))
    w = b.const(rng.standard_normal((32, 48)).astype(np.float32), name="w")
    y = b.add(b.gelu(b.matmul(ln, w)), b.const(np.ones(48, np.float32), name="bias"))
    return b.output(y)


@pytest.fixture(scope="module")
def compiled():
    g = small_model()
    return g, sqk.compile(g, threads=2, pipeline="fold_constants,dce"), {"x": rand((4, 32))}   # a kernel per op


def _counters(m):
    ffi, lib, _, prog, _, ctx = m._native
    sp = ffi.new("sqk_step_profile *")
    out = []
    for i in range(prog.n_steps):
        assert lib.sqk_profile(ctx, i, sp) == 0
        out.append((sp.calls, sp.ns))
    return out


def test_timer_off_by_default_and_results_unchanged(compiled):
    g, m, inputs = compiled
    before = m(**inputs)
    assert all(c == (0, 0) for c in _counters(m))  # ran, but nothing was timed
    p = m.profile(runs=3, **inputs)
    assert len(p) == len(m.manifest["kernels"])
    after = m(**inputs)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after, sqk.reference(g, **inputs), rtol=1e-4, atol=1e-4)
    # profile() turned the timer off again: a plain call adds nothing
    snapshot = _counters(m)
    m(**inputs)
    assert _counters(m) == snapshot


def test_every_step_timed_once_per_run(compiled):
    _, m, inputs = compiled
    runs = 7
    p = m.profile(runs=runs, warmup=2, **inputs)
    assert [r.kernel for r in p] == [k["name"] for k in m.manifest["kernels"]]
    assert [r.op for r in p] == ["layernorm", "matmul", "gelu", "add"]
    for r in p:
        assert r.calls == runs and r.ms > 0
        assert r.gbps > 0 and r.gflops > 0
    assert p.runs == runs and p.threads == 2 and p.target == "host"
    assert 0 < p.total_ms <= p.wall_ms * 1.5
    assert "k1_matmul" in p.format()
    # the counters themselves: calls == runs, time > 0, and turning on zeroes them
    assert all(c == runs and ns > 0 for c, ns in _counters(m))
    ffi, lib, _, _, _, ctx = m._native
    assert lib.sqk_set_profile(ctx, 1) == 0
    assert all(c == (0, 0) for c in _counters(m))
    m(**inputs)
    assert all(c == 1 and ns > 0 for c, ns in _counters(m))
    assert lib.sqk_set_profile(ctx, 0) == 0
    with pytest.raises(ValueError):
        m.profile(runs=0, **inputs)


def test_profile_api_errors():
    from sqk.runtime.ffi import load_runtime

    ffi, lib = load_runtime()
    ctx = ffi.gc(lib.sqk_context_new(1), lib.sqk_context_free)
    sp = ffi.new("sqk_step_profile *")
    assert lib.sqk_profile(ctx, -1, sp) == 5  # SQK_ERR_ARGS
    assert lib.sqk_profile(ctx, 0, ffi.NULL) == 5
    assert lib.sqk_set_profile(ffi.NULL, 1) == 5
    assert lib.sqk_profile(ctx, 1000, sp) == 0 and (sp.calls, sp.ns) == (0, 0)  # never timed


def _node(g, op):
    return next(n for n in g.nodes if n.op == op)


def test_matmul_and_conv_costs():
    b = sqk.GraphBuilder("c")
    a = b.input("a", (2, 3, 5))
    w = b.input("w", (5, 7))
    x = b.input("x", (2, 6, 9, 10))
    k = b.input("k", (4, 3, 3, 2))  # groups=2: 3 input channels per group
    y = b.matmul(a, w)
    z = b.conv2d(x, k, strides=(2, 1), pads=(1, 0, 1, 0), groups=2)
    g = b.output(y, z)
    mb, mf = node_cost(_node(g, "matmul"))
    assert mf == 2 * (2 * 3) * 7 * 5
    assert mb == (2 * 3 * 5 + 5 * 7 + 2 * 3 * 7) * 4
    n, oc, oh, ow = _node(g, "conv2d").output.shape
    assert (oh, ow) == ((9 + 2 - 3) // 2 + 1, 10 - 2 + 1)
    cb, cf = node_cost(_node(g, "conv2d"))
    assert cf == 2 * n * oc * oh * ow * (6 // 2) * 3 * 2
    assert cb == (2 * 6 * 9 * 10 + 4 * 3 * 3 * 2 + n * oc * oh * ow) * 4


def test_costs_in_manifest_use_packed_sizes():
    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("q")
    x = b.input("x", (3, 64))
    q = b.const(rng.integers(-8, 8, (64, 16)).astype(np.int8), "i4", name="q")
    s = b.const(rng.random((2, 16)).astype(np.float32) + 0.5, name="s")
    y = b.matmul_q(x, q, s, group=32)
    g = b.output(y, x)  # x is also an output: a copy kernel
    m = sqk.compile(g)
    ks = m.manifest["kernels"]
    assert [k["name"].split("_", 1)[1] for k in ks] == ["matmul_q", "copy"]
    assert ks[0]["flops"] == 2 * 3 * 16 * 64
    # q and s at the sizes the kernel's packer stores (blocked, padded), not their logical sizes
    packed = {v.name: len(d) for v, d in pack_constants(g).items()}
    assert set(packed) == {"q", "s"} and packed["q"] != 64 * 16
    assert ks[0]["bytes"] == 3 * 64 * 4 + packed["q"] + packed["s"] + 3 * 16 * 4
    assert ks[1] == dict(ks[1], bytes=2 * 3 * 64 * 4, flops=0)


def test_sparse_matmul_counts_nonzeros():
    rng = np.random.default_rng(0)
    wv = rng.standard_normal((32, 8)).astype(np.float32)
    wv[rng.random(wv.shape) < 0.75] = 0
    b = sqk.GraphBuilder("s")
    x = b.input("x", (5, 32))
    w = b.const(wv, name="w")
    g = b.output(b.matmul(x, w, sparse="csr"))
    node = _node(g, "matmul")
    consts = {n.output: n.attrs["value"] for n in g.nodes if n.op == "const"}
    _, flops = node_cost(node, consts=consts)
    assert flops == 2 * 5 * int(np.count_nonzero(wv)) and flops < 2 * 5 * 32 * 8
    packed = {w: 123}  # a stored (packed) size replaces the dense one
    assert node_cost(node, packed, consts)[0] == (5 * 32 + 5 * 8) * 4 + 123


def test_elementwise_reduce_softmax_costs():
    b = sqk.GraphBuilder("e")
    x = b.input("x", (4, 6))
    r = b.reduce_sum(x, axes=(1,))
    sm = b.softmax(x)
    t = b.transpose(x, perm=(1, 0))
    e = b.add(x, x)
    g = b.output(r, sm, t, e)
    assert node_cost(_node(g, "reduce_sum")) == ((24 + 4) * 4, 24)
    assert node_cost(_node(g, "softmax")) == (48 * 4, 5 * 24)
    assert node_cost(_node(g, "transpose")) == (48 * 4, 0)
    assert node_cost(_node(g, "add")) == (48 * 4, 24)  # x read once


def test_sqk_bench_prints_rows_and_roofline(compiled, tmp_path, capsys):
    _, m, _ = compiled
    path = str(tmp_path / "small.sqk")
    m.save(path)
    assert main(["bench", path, "--runs", "3", "--probe-mib", "16", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 threads" in out and "machine:" in out
    assert "GFLOP/s" in out and "FMA" in out and "read bandwidth:" in out and "16 MiB" in out
    header = next(line for line in out.splitlines() if line.startswith("kernel"))
    for col in ("ms", "MB", "MFLOP", "GB/s", "roof ms", "% roof"):
        assert col in header
    rows = [line.split() for line in out.splitlines() if line.startswith("k") and "_" in line.split()[0]]
    assert [r[0] for r in rows] == [k["name"] for k in m.manifest["kernels"]]
    for r in rows:
        assert r[2] == "3" and float(r[-1]) > 0  # calls, % roof
    assert any(line.startswith("total") for line in out.splitlines())
    assert main(["bench", path, "--runs", "0"]) == 1


def test_riscv_profile_through_runner():
    require_riscv()
    g = small_model()
    m = sqk.compile(g, target="riscv64")
    inputs = {"x": rand((4, 32))}
    p = m.profile(runs=2, **inputs)
    assert [r.kernel for r in p] == [k["name"] for k in m.manifest["kernels"]]
    assert all(r.calls == 2 and r.ms > 0 for r in p) and p.target == "riscv64"
    np.testing.assert_allclose(m(**inputs), sqk.reference(g, **inputs), rtol=1e-4, atol=1e-4)


def test_fused_kernel_costs_sum_their_body():
    from sqk.compiler.models import transformer_mlp
    g = transformer_mlp(hidden=64, ffn=128)
    plain = sqk.compile(g, pipeline="fold_constants,dce").manifest["kernels"]
    fused = sqk.compile(g, pipeline="fold_constants,fuse,dce").manifest["kernels"]
    assert any(k["name"].endswith("_fused") for k in fused) and len(fused) < len(plain)
    # the same arithmetic, fewer bytes: intermediates no longer go through memory
    assert sum(k["flops"] for k in fused) == sum(k["flops"] for k in plain)
    assert sum(k["bytes"] for k in fused) < sum(k["bytes"] for k in plain)
