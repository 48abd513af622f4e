"""Numeric tests of the reduction kernels (codegen/reduce.py): reduce_sum,
reduce_mean and reduce_max over every axis set, softmax along each axis,
layernorm and rmsnorm, on every target.

Cases are batched into multi-output graphs (one compile per target), each
output named for what it computes so a failure says which one.  The kernel
has three shapes of loop (trailing contiguous run, vectors across a middle
axis, nested strided loops around either); the cases below reach all three,
with sizes that are not multiples of any vector width.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sqk
from sqk.ir import dtypes as dt
from harness import check, rand, target_param

REDUCE_OPS = ("reduce_sum", "reduce_mean", "reduce_max")


def int_data(shape, dtype, rng):
    """Integers over the dtype's whole range, so sums wrap."""
    info = np.iinfo(dt.dtype(dtype).np_dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=info.dtype, endpoint=True)


def data(shape, dtype, rng):
    return rand(shape, dtype, rng) if dt.dtype(dtype).is_float else int_data(shape, dtype, rng)


def axes_name(axes):
    return "_".join(map(str, axes)) or "all"


# --- reductions ------------------------------------------------------------------------

@target_param
def test_reduce_every_axis_set(target):
    """Every axis combination of a 3-D and a 4-D tensor, each op, keepdims both ways."""
    b = sqk.GraphBuilder("reduce_axes")
    shapes = {"x3": (3, 4, 5), "x4": (2, 3, 4, 9)}
    outs = []
    for xname, shape in shapes.items():
        x = b.input(xname, shape)
        for r in range(len(shape) + 1):
            for axes in itertools.combinations(range(len(shape)), r):
                for op in REDUCE_OPS:
                    kd = (r + len(op)) % 2 == 0  # vary keepdims across ops and axis sets
                    outs.append(b.op(op, x, axes=axes, keepdims=kd, name=f"{op}_{xname}_{axes_name(axes)}_kd{int(kd)}"))
    # negative axes, and () meaning all
    x = b.inputs[0]
    outs.append(b.reduce_sum(x, axes=(-1, -3), name="sum_neg_axes"))
    rng = np.random.default_rng(0)
    check(b.output(*outs), {n: rand(s, rng=rng) for n, s in shapes.items()}, target)


@target_param
def test_reduce_odd_sizes(target):
    """Row counts and lengths of 1, 7, 33 and ~1000: vector loops with tails,
    single rows, single elements, and a middle axis with a tail of inner lanes."""
    b = sqk.GraphBuilder("reduce_odd")
    shapes = {"a": (1, 1), "b": (7, 33), "c": (33, 1000), "d": (1000, 7), "e": (3, 1023, 37), "f": (2, 5, 1100)}
    outs = []
    for name, shape in shapes.items():
        x = b.input(name, shape)
        for axes in {(len(shape) - 1,), (0,), tuple(range(len(shape)))}:
            for op in REDUCE_OPS:
                outs.append(b.op(op, x, axes=axes, name=f"{op}_{name}_{axes_name(axes)}"))
    rng = np.random.default_rng(1)
    check(b.output(*outs), {n: rand(s, rng=rng) for n, s in shapes.items()}, target)


INT_FLOAT_DTYPES = ["f16", "i64", "i32", "i8", "u8"]


@target_param
def test_reduce_dtypes(target):
    """f16 (computed in f32, rounded once) and integers (exact; sums wrap in the
    input dtype as numpy's sum cast back does) over trailing, middle, all and
    split axis sets."""
    b = sqk.GraphBuilder("reduce_dtypes")
    shape = (3, 37, 2, 19)
    rng = np.random.default_rng(2)
    inputs, outs = {}, []
    for d in INT_FLOAT_DTYPES:
        x = b.input(f"x_{d}", shape, d)
        inputs[f"x_{d}"] = data(shape, d, rng)
        for axes in [(3,), (1,), (0, 2), (1, 3), ()]:
            ops = REDUCE_OPS if d == "f16" else ("reduce_sum", "reduce_max")
            for op in ops:
                outs.append(b.op(op, x, axes=axes, name=f"{op}_{d}_{axes_name(axes)}"))
    check(b.output(*outs), inputs, target)


def test_integer_sum_wraps():
    """The wrap is really exercised: these sums overflow their dtype."""
    rng = np.random.default_rng(3)
    b = sqk.GraphBuilder("wrap")
    x8, x32 = b.input("x8", (4, 300), "u8"), b.input("x32", (4, 300), "i32")
    g = b.output(b.reduce_sum(x8, axes=(1,)), b.reduce_sum(x32, axes=(0, 1)))
    ins = {"x8": int_data((4, 300), "u8", rng), "x32": int_data((4, 300), "i32", rng)}
    assert (ins["x8"].sum(axis=1) > 255).all()
    assert abs(int(ins["x32"].astype(np.int64).sum())) > 2 ** 31
    check(g, ins, "host")


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), data_=st.data())
def test_reduce_random_shapes(shape, data_):
    shape = tuple(shape)
    axes = tuple(data_.draw(st.sets(st.integers(0, len(shape) - 1)), label="axes"))
    keepdims = data_.draw(st.booleans(), label="keepdims")
    d = data_.draw(st.sampled_from(["f32", "f16", "i32", "i8"]), label="dtype")
    b = sqk.GraphBuilder("reduce_random")
    x = b.input("x", shape, d)
    ops = REDUCE_OPS if dt.dtype(d).is_float else ("reduce_sum", "reduce_max")
    g = b.output(*[b.op(op, x, axes=axes, keepdims=keepdims, name=op) for op in ops])
    check(g, {"x": data(shape, d, np.random.default_rng(4))}, "host")


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_reduce_degenerate():
    """Zero-size inputs (a sum over an empty axis is 0, a mean NaN, as numpy; an
    empty output runs nothing), a rank-0 input and reductions over size-1 axes."""
    b = sqk.GraphBuilder("reduce_degenerate")
    x, y, z = b.input("x", (3, 0, 4)), b.input("y", (0, 5)), b.input("z", (4, 0))
    s, o = b.input("s", ()), b.input("o", (3, 1, 5))
    g = b.output(b.reduce_sum(x, axes=(1,), name="sum_empty_middle"), b.reduce_mean(x, axes=(1,), name="mean_empty_middle"),
                 b.reduce_max(y, axes=(1,), name="max_empty_out"), b.reduce_sum(y, axes=(), name="sum_all_empty"),
                 b.reduce_mean(z, axes=(1,), name="mean_empty_rows"), b.reduce_sum(s, name="sum_scalar"),
                 b.reduce_max(o, axes=(1,), name="max_size1_axis"), b.reduce_mean(o, axes=(1,), keepdims=True, name="mean_size1"))
    ins = {"x": np.zeros((3, 0, 4), np.float32), "y": np.zeros((0, 5), np.float32), "z": np.zeros((4, 0), np.float32),
           "s": np.array(2.5, np.float32), "o": rand((3, 1, 5))}
    with np.errstate(invalid="ignore", divide="ignore"):
        check(g, ins, "host")


def test_reduce_nan_propagates():
    x = rand((4, 40))
    x[1, 17] = np.nan
    x[2, 39] = np.nan
    b = sqk.GraphBuilder("reduce_nan")
    xi = b.input("x", x.shape)
    g = b.output(b.reduce_max(xi, axes=(1,), name="max_rows"), b.reduce_max(xi, axes=(0,), name="max_cols"),
                 b.reduce_sum(xi, axes=(1,), name="sum_rows"))
    check(g, {"x": x}, "host")


def test_reduce_threaded():
    """Ranges large enough to split over threads: the benchmark's bandwidth probe
    shape (sum over axis 1 of [threads*8, n]), a middle axis split into inner
    chunks, and the generic nested case."""
    rng = np.random.default_rng(5)
    b = sqk.GraphBuilder("reduce_threads")
    x, y = b.input("x", (16, 40000)), b.input("y", (3, 64, 3000))
    g = b.output(b.reduce_sum(x, axes=(1,), name="rows"), b.reduce_max(y, axes=(1,), name="middle"),
                 b.reduce_mean(y, axes=(0, 2), name="nested"))
    m = check(g, {"x": rand((16, 40000), rng=rng), "y": rand((3, 64, 3000), rng=rng)}, "host", threads=2)
    ranges = {k["name"]: k for k in m.manifest["kernels"]}
    assert all(k["range"] > k["grain"] for k in ranges.values()), ranges  # really split


# --- softmax, layernorm, rmsnorm --------------------------------------------------------------

@target_param
def test_softmax(target):
    """Along each axis (trailing rows, middle axis with an inner tail, first
    axis), rows of ~1000, f16, and inputs large enough that exp without the
    max shift would overflow."""
    b = sqk.GraphBuilder("softmax")
    rng = np.random.default_rng(6)
    inputs = {"x": rand((3, 4, 37), rng=rng), "r": rand((5, 1003), rng=rng), "h": rand((4, 3, 19), "f16", rng),
              "big": rand((2, 300), rng=rng, low=500, high=1000), "one": rand((6, 1), rng=rng)}
    xs = {n: b.input(n, a.shape, dt.dtype(a.dtype)) for n, a in inputs.items()}
    outs = [b.softmax(xs["x"], axis=a, name=f"x_axis{a}") for a in (0, 1, 2)]
    outs += [b.softmax(xs["h"], axis=a, name=f"f16_axis{a % 3}") for a in (0, 1, -1)]
    outs += [b.softmax(xs["r"], name="rows1003"), b.softmax(xs["big"], name="large_values"),
             b.softmax(xs["one"], name="length1"), b.softmax(xs["big"], axis=0, name="large_values_axis0")]
    g = b.output(*outs)
    check(g, inputs, target)
    out = sqk.reference(g, **inputs)
    assert all(np.isfinite(o).all() for o in out)


@target_param
def test_norms(target):
    """layernorm with and without bias, over the last dim and the last two
    (axis=-2); rmsnorm likewise; f32 rows of 768 and odd sizes, and f16."""
    b = sqk.GraphBuilder("norms")
    rng = np.random.default_rng(7)
    inputs = {"x": rand((4, 768), rng=rng, low=-2, high=5), "y": rand((3, 5, 33), rng=rng),
              "h": rand((2, 7, 9), "f16", rng),
              "s768": rand((768,), rng=rng), "b768": rand((768,), rng=rng),
              "s2": rand((5, 33), rng=rng), "b2": rand((5, 33), rng=rng), "s33": rand((33,), rng=rng),
              "sh": rand((9,), "f16", rng), "bh": rand((9,), "f16", rng), "sh2": rand((7, 9), "f16", rng)}
    v = {n: b.input(n, a.shape, dt.dtype(a.dtype)) for n, a in inputs.items()}
    outs = [
        b.layernorm(v["x"], v["s768"], v["b768"], name="ln_bias"),
        b.layernorm(v["x"], v["s768"], name="ln_nobias"),
        b.layernorm(v["y"], v["s2"], v["b2"], axis=-2, name="ln_axis_m2"),
        b.layernorm(v["y"], v["s33"], eps=1e-3, name="ln_eps"),
        b.layernorm(v["h"], v["sh"], v["bh"], name="ln_f16"),
        b.rmsnorm(v["x"], v["s768"], name="rms"),
        b.rmsnorm(v["y"], v["s2"], axis=1, name="rms_axis1"),
        b.rmsnorm(v["h"], v["sh2"], axis=-2, name="rms_f16_axis_m2"),
    ]
    check(b.output(*outs), inputs, target)


def test_row_ops_threaded():
    """Many rows, split over two threads."""
    rng = np.random.default_rng(8)
    b = sqk.GraphBuilder("rows_threads")
    x, s = b.input("x", (256, 1024)), b.input("s", (1024,))
    y = b.input("y", (4, 300, 256))
    g = b.output(b.softmax(x, name="softmax"), b.layernorm(x, s, s, name="ln"), b.rmsnorm(x, s, name="rms"),
                 b.softmax(y, axis=1, name="softmax_middle"))
    ins = {"x": rand((256, 1024), rng=rng), "s": rand((1024,), rng=rng), "y": rand((4, 300, 256), rng=rng)}
    m = check(g, ins, "host", threads=2)
    assert all(k["range"] > k["grain"] for k in m.manifest["kernels"])


@pytest.mark.parametrize("op", ["softmax", "layernorm", "rmsnorm"])
def test_row_ops_empty(op):
    b = sqk.GraphBuilder("rows_empty")
    x, s = b.input("x", (0, 8)), b.input("s", (8,))
    g = b.output(b.softmax(x) if op == "softmax" else b.op(op, x, s))
    check(g, {"x": np.zeros((0, 8), np.float32), "s": rand((8,))}, "host")
