"""The IR ops added for ONNX import, on every target: log, pow, the comparisons
(equal, less, greater -> bool), logical_and, logical_not, isnan, where,
expand and gather_elements, each against its numpy reference in ir/ops.py.

Ops are batched into one multi-output graph per target (a compile, link and
qemu run each); every output is named for its op and dtype, so a failure
says which.
"""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.ir import dtypes as dt
from sqk.ir.ops import COMPARE
from harness import check, compile_for, rand, target_param

SHAPE = (3, 1, 37)   # odd inner size (vector tail), a size-1 dim


def _with_specials(x):
    """Plant NaN, -0.0, 0 and equal pairs at the front of a float array (infinities
    are in test_specials_exact: an inf output would make the tolerance infinite)."""
    flat = x.reshape(-1)
    sp = np.array([np.nan, -0.0, 0.0, 1.0, 1.0], x.dtype)
    flat[:sp.size] = sp
    return x


def _all_ops_graph():
    rng = np.random.default_rng(7)
    b = sqk.GraphBuilder("onnx_ops")
    outs, inputs = [], {}

    def inp(name, shape, dtype, data):
        v = b.input(name, shape, dtype)
        inputs[name] = data
        return v

    for dtype in ("f32", "f16"):
        x = inp(f"x_{dtype}", SHAPE, dtype, _with_specials(rand(SHAPE, dtype, rng)))
        y = inp(f"y_{dtype}", (37,), dtype, _with_specials(rand((37,), dtype, rng)))
        pos = inp(f"pos_{dtype}", SHAPE, dtype, rand(SHAPE, dtype, rng, low=0.05, high=4))
        e = inp(f"e_{dtype}", (3, 1, 1), dtype, np.array([2, -1.5, 0.5], dt.dtype(dtype).np_dtype).reshape(3, 1, 1))
        outs += [b.log(pos, name=f"log_{dtype}"), b.pow(pos, e, name=f"pow_{dtype}"),
                 b.pow(inp(f"neg_{dtype}", (37,), dtype, rand((37,), dtype, rng, low=-4, high=-0.25)), e,
                       name=f"pow_neg_base_{dtype}"), b.isnan(x, name=f"isnan_{dtype}")]
        outs += [b.op(op, x, y, name=f"{op}_{dtype}") for op in COMPARE]
        c = b.less(x, y)
        outs += [b.where(c, x, y, name=f"where_{dtype}"), b.expand(y, shape=(2, 1, 1), name=f"expand_{dtype}")]
    for dtype in ("i64", "i32", "i8", "u8"):
        x = inp(f"x_{dtype}", SHAPE, dtype, rand(SHAPE, dtype, rng, low=-3, high=3))
        y = inp(f"y_{dtype}", (1, 37), dtype, rand((1, 37), dtype, rng, low=-3, high=3))
        outs += [b.op(op, x, y, name=f"{op}_{dtype}") for op in COMPARE]
        outs += [b.where(b.greater(x, y), x, y, name=f"where_{dtype}")]
    p = inp("p", (4, 5), "bool", rng.integers(0, 2, (4, 5)).astype(bool))
    q = inp("q", (5,), "bool", rng.integers(0, 2, (5,)).astype(bool))
    outs += [b.logical_and(p, q, name="and"), b.logical_not(p, name="not"), b.equal(p, q, name="equal_bool"),
             b.where(q, p, b.logical_not(p), name="where_bool"), b.expand(q, shape=(3, 1, 5), name="expand_bool")]
    # gather_elements: every axis, negative ids, i32 ids, ids smaller than x off the axis
    t = inp("t", (3, 4, 5), "f32", rand((3, 4, 5), "f32", rng))
    for axis in (0, 1, 2, -1):
        n = t.shape[axis]
        ishape = (2, 3, 4)
        ids = rng.integers(-n, n, ishape)
        tag = f"{axis % 3}{'_neg' if axis < 0 else ''}"
        outs.append(b.gather_elements(t, inp(f"ids{tag}", ishape, "i64", ids), axis=axis,
                                      name=f"gather_elements_{tag}"))
    h = inp("h", (6, 2), "f16", rand((6, 2), "f16", rng))
    outs.append(b.gather_elements(h, inp("hid", (6, 2), "i32", rng.integers(-6, 6, (6, 2)).astype(np.int32)),
                                  axis=0, name="gather_elements_f16_i32"))
    return b.output(*outs), inputs


@target_param
def test_onnx_ops(target):
    check(*_all_ops_graph(), target)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_specials_exact(target):
    """NaN, +-inf and signed zeros through every new float op, compared bit for bit."""
    sp = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, 2.0, -2.0], np.float32)
    b = sqk.GraphBuilder("specials")
    x = b.input("x", (8, 1), "f32")
    y = b.input("y", (8,), "f32")
    g = b.output(b.log(y, name="log"), b.pow(x, y, name="pow"), b.isnan(y, name="isnan"),
                 *[b.op(op, x, y, name=op) for op in COMPARE], b.where(b.less(x, y), x, y, name="where"),
                 b.expand(y, shape=(2, 1), name="expand"))
    m = compile_for(g, target)
    inputs = {"x": sp.reshape(8, 1), "y": sp}
    for v, o, r in zip(g.outputs, m(**inputs), sqk.reference(g, **inputs)):
        assert o.dtype == r.dtype
        np.testing.assert_array_equal(o, r, err_msg=f"{v.name} on {target}")
        if o.dtype == np.float32:  # and the same zero signs (a NaN's sign carries no meaning)
            num = ~np.isnan(r)
            np.testing.assert_array_equal(np.signbit(o[num]), np.signbit(r[num]), err_msg=f"{v.name} sign on {target}")


@target_param
def test_edge_shapes(target):
    """Rank 0, empty tensors and broadcasting to an empty shape."""
    b = sqk.GraphBuilder("onnx_edges")
    s = b.input("s", (), "f32")
    z = b.input("z", (0, 3), "f32")
    w = b.input("w", (1, 3), "f32")
    ids = b.input("ids", (0, 3), "i64")
    g = b.output(b.pow(s, s, name="pow0"), b.less(z, w, name="less_empty"), b.expand(w, shape=(0, 1), name="ex0"),
                 b.where(b.less(z, w), z, w, name="where_empty"), b.gather_elements(w, ids, axis=0, name="ge0"),
                 b.log(s, name="log0"), b.isnan(z, name="isnan0"))
    check(g, {"s": np.float32(1.7), "z": np.zeros((0, 3), np.float32), "w": rand((1, 3)),
              "ids": np.zeros((0, 3), np.int64)}, target)


@pytest.mark.parametrize("target", ["host", "riscv64-scalar"])
def test_gather_elements_out_of_range(target):
    b = sqk.GraphBuilder("ge_oob")
    g = b.output(b.gather_elements(b.input("x", (2, 3)), b.input("i", (2, 3), "i64"), axis=1))
    m = compile_for(g, target)
    bad = np.array([[0, 1, 2], [3, 0, 0]], np.int64)
    with pytest.raises(Exception, match="(?i)index"):
        m(x=rand((2, 3)), i=bad)
    with pytest.raises(IndexError):
        sqk.reference(g, x=rand((2, 3)), i=bad)


def test_types():
    b = sqk.GraphBuilder("types")
    x = b.input("x", (2, 3), "f32")
    assert b.equal(x, x).dtype is dt.bool_
    assert b.expand(x, shape=(4, 1, 1)).shape == (4, 2, 3)
    with pytest.raises(sqk.IRError, match="dtype"):
        b.logical_and(x, x)
    with pytest.raises(sqk.IRError, match="dtype"):
        b.where(x, x, x)
    with pytest.raises(sqk.IRError, match="exceeds"):
        b.gather_elements(x, b.input("i", (3, 3), "i64"), axis=1)
    with pytest.raises(sqk.IRError, match="broadcast"):
        b.expand(x, shape=(4,))
