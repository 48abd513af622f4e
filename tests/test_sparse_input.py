"""Activation sparsity: matmul_sparse_input (skips the weight rows of zero
activations) against the reference, and the sparse_activations pass."""
from __future__ import annotations

import numpy as np
import pytest
from harness import assert_close, check, compile_for, rand, target_param

import sqk


def _graph(shape_a, k, n, dtype="f32"):
    b = sqk.GraphBuilder("spin")
    return b.output(b.matmul_sparse_input(b.input("a", shape_a + (k,), dtype), b.input("w", (k, n), dtype)))


def _a(shape, zeros, dtype="f32", seed=0):
    r = np.random.default_rng(seed)
    a = rand(shape, dtype, r)
    a[r.random(shape) < zeros] = 0
    return a


@target_param
@pytest.mark.parametrize("rows,zeros", [((1,), 0.0), ((1,), 0.9), ((1,), 1.0), ((3,), 0.9), ((2, 2), 0.5)])
def test_sparse_input(target, rows, zeros):
    k, n = 45, 70                                    # n: a span tail that is not a multiple of the lanes
    check(_graph(rows, k, n), dict(a=_a(rows + (k,), zeros), w=rand((k, n))), target)


def test_sparse_input_wide_and_f16():
    # K past one scan chunk, N over several spans; then f16 storage
    check(_graph((1,), 2500, 4100), dict(a=_a((1, 2500), 0.9, seed=1), w=rand((2500, 4100))), "host")
    check(_graph((2,), 300, 33, "f16"), dict(a=_a((2, 300), 0.8, "f16"), w=rand((300, 33), "f16")), "host")


def test_equals_dense_matmul():
    a, w = _a((1, 200), 0.9, seed=3), rand((200, 96))
    g = _graph((1,), 200, 96)
    assert sqk.ir.text.parse_ir(g.to_text()) == g      # the op's text form reads back
    m = compile_for(g, "host")
    assert_close(m(a=a, w=w), (a @ w).astype(np.float32))


def test_skipped_rows_are_not_read():
    a, w = _a((2, 64), 0.7, seed=4), rand((64, 40))
    unused = ~(a != 0).any(axis=0)
    assert unused.any()
    poisoned = w.copy()
    poisoned[unused] = np.nan                        # rows no activation needs
    m = compile_for(_graph((2,), 64, 40), "host")
    assert_close(m(a=a, w=poisoned), (a @ w).astype(np.float32))
    a[1, np.flatnonzero(unused)[0]] = np.nan         # a NaN activation counts as nonzero
    assert np.isnan(m(a=a, w=w)[1]).all()


def _relu_ffn(rows=1, k=64, f=512, seed=0):
    r = np.random.default_rng(seed)
    b = sqk.GraphBuilder("relu_ffn")
    x = b.input("x", (rows, k))
    h = b.relu(b.add(b.matmul(x, b.const(rand((k, f), rng=r), name="w1")), b.const(rand((f,), rng=r), name="b1")))
    return b.output(b.matmul(h, b.const(rand((f, k), rng=r), name="w2")))


@pytest.mark.parametrize("pipeline", ["fold_constants,sparse_activations{min_bytes=0},dce,fuse",
                                      "fold_constants,fuse,sparse_activations{min_bytes=0},dce"])
def test_pass(pipeline):
    g = _relu_ffn()
    m = check(g, dict(x=rand((1, 64))), "host", pipeline=pipeline)
    assert [n.op for n in m.ir.nodes].count("matmul_sparse_input") == 1
    assert m.report.row("w2")["status"] == "sparse input"


def test_pass_keeps_dense():
    m = sqk.compile(_relu_ffn(rows=8), pipeline="sparse_activations{min_bytes=0}")
    assert "matmul_sparse_input" not in [n.op for n in m.ir.nodes]
    assert m.report.row("w2")["status"] == "dense: 8 rows > max_rows=4"
    m = sqk.compile(_relu_ffn(f=128), pipeline="sparse_activations")     # w2: 32 KiB
    assert m.report.row("w2")["status"].startswith("dense: small")
