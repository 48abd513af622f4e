"""Numeric tests of the elementwise kernels (codegen/elementwise.py): every
unary and binary op on every dtype it allows, numpy broadcasting, NaN/inf,
cast between every pair of IO dtypes, and the row-chunked threaded path.

Ops are batched into multi-output graphs (on the host one per dtype or case,
on RISC-V one per target: each costs a compile + link + qemu run), so every op
runs on every target; each output is named for its op so a failure says which.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import sqk
from sqk.codegen.elementwise import CHUNK
from sqk.ir import dtypes as dt
from sqk.ir.ops import BINARY, UNARY
from harness import TARGETS, check, compile_for, rand, target_param

DTYPES = ["f32", "f16", "i64", "i32", "i8", "u8"]
RISCV = [t for t in TARGETS if t != "host"]
# Odd sizes (not a multiple of any vector width) and a size-1 dim.
SHAPE = (3, 1, 37)


def tag(shape) -> str:
    """A shape as a value name: (3, 1) -> s3x1, () -> s."""
    return "s" + "x".join(map(str, shape))


def int_data(shape, dtype, rng):
    """Integers over the dtype's whole range (so add/mul wrap and u8 uses its top half),
    with the extremes, 0 and -1 planted at the front."""
    info = np.iinfo(dt.dtype(dtype).np_dtype)
    x = rng.integers(info.min, info.max, size=shape, dtype=info.dtype, endpoint=True)
    special = np.array([info.min, info.max, 0, info.max // 2 + 1, 1] + ([-1] if info.min < 0 else []), info.dtype)
    flat = x.reshape(-1)
    flat[:min(flat.size, special.size)] = special[:flat.size]
    return x


def data(shape, dtype, rng, positive=False):
    if dt.dtype(dtype).is_float:
        return rand(shape, dtype, rng, low=0.05 if positive else -4, high=4)
    return int_data(shape, dtype, rng)


# --- unary and binary ----------------------------------------------------------------
# Host: one graph per dtype; RISC-V: one graph with every dtype (a compile + link + qemu
# run each), so a failure there is still named by its output.

def _unary_graph(dtypes):
    rng = np.random.default_rng(1)
    b = sqk.GraphBuilder("unary")
    outs, inputs = [], {}
    for dtype in dtypes:
        d = dt.dtype(dtype)
        x = b.input(f"x_{dtype}", SHAPE, dtype)
        inputs[x.name] = data(SHAPE, dtype, rng)
        for op, (allowed, _) in UNARY.items():
            if d not in allowed:
                continue
            v = x
            if op in ("sqrt", "rsqrt"):  # keep them off NaN so the comparison checks digits
                v = b.input(f"{op}_{dtype}_in", SHAPE, dtype)
                inputs[v.name] = data(SHAPE, dtype, rng, positive=True)
            outs.append(b.op(op, v, name=f"{op}_{dtype}"))
        if d.is_float:
            outs += [b.gelu(x, name=f"gelu_{dtype}"), b.gelu(x, approximate="tanh", name=f"gelu_tanh_{dtype}")]
    return b.output(*outs), inputs


def _binary_graph(dtypes):
    """Same-shape, row-broadcast and column-broadcast operands of every binary op."""
    rng = np.random.default_rng(2)
    M, N = 5, 19
    b = sqk.GraphBuilder("binary")
    outs, inputs = [], {}
    for dtype in dtypes:
        d = dt.dtype(dtype)
        shapes = {"x": (M, N), "y": (M, N), "row": (N,), "col": (M, 1)}
        v = {k: b.input(f"{k}_{dtype}", s, dtype) for k, s in shapes.items()}
        for k, s in shapes.items():
            inputs[v[k].name] = data(s, dtype, rng)
            if d.is_float and k != "x":  # div: keep denominators away from 0
                inputs[v[k].name] = away_from_zero(inputs[v[k].name])
        for op, (allowed, _) in BINARY.items():
            if d in allowed:
                outs += [b.op(op, v["x"], v["y"], name=f"{op}_{dtype}"),
                         b.op(op, v["row"], v["x"], name=f"{op}_row_{dtype}"),
                         b.op(op, v["x"], v["col"], name=f"{op}_col_{dtype}")]
    return b.output(*outs), inputs


def away_from_zero(x):
    return (np.where(x < 0, -1, 1) * (np.abs(x) + 0.25)).astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unary_host(dtype):
    check(*_unary_graph([dtype]), "host")


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_host(dtype):
    check(*_binary_graph([dtype]), "host")


@pytest.mark.parametrize("target", RISCV)
def test_unary_binary_riscv(target):
    check(*_unary_graph(DTYPES), target)
    check(*_binary_graph(DTYPES), target)


def test_integer_wraparound_exact():
    """Spot values, so the wrap-around semantics are pinned independently of the reference."""
    b = sqk.GraphBuilder("wrap")
    a8, b8 = b.input("a8", (3,), "i8"), b.input("b8", (3,), "i8")
    u, v = b.input("u", (3,), "u8"), b.input("v", (3,), "u8")
    g = b.output(b.add(a8, b8), b.mul(a8, b8), b.max(u, v), b.min(u, v), b.neg(a8))
    m = compile_for(g, "host")
    add, mul, mx, mn, neg = m(a8=np.array([127, -128, 100], np.int8), b8=np.array([1, -1, 3], np.int8),
                             u=np.array([200, 1, 128], np.uint8), v=np.array([100, 255, 127], np.uint8))
    np.testing.assert_array_equal(add, np.array([-128, 127, 103], np.int8))
    np.testing.assert_array_equal(mul, np.array([127, -128, 44], np.int8))  # 300 mod 256 = 44
    np.testing.assert_array_equal(mx, np.array([200, 255, 128], np.uint8))
    np.testing.assert_array_equal(mn, np.array([100, 1, 127], np.uint8))
    np.testing.assert_array_equal(neg, np.array([-127, -128, -100], np.int8))


# --- broadcasting ------------------------------------------------------------------------

BROADCAST_CASES = [
    ((3, 1, 5), (4, 1)),
    ((), (7, 9)),
    ((7, 9), ()),
    ((1,), (7, 9)),
    ((2, 1, 3, 1), (1, 4, 1, 5)),
    ((5, 1, 1, 7), (3, 1, 7)),
    ((1, 6, 1, 1), (2, 1, 3, 1)),
    ((13,), (11, 13)),        # row broadcast
    ((11, 1), (11, 13)),      # column broadcast
    ((1, 1), (1,)),           # everything size 1
    ((0, 3), (1, 3)),         # empty result
]


def _broadcast_graph(cases, name):
    """Per case: f32 sub both ways round (operand order matters), f16 mul, i32 max, u8 min."""
    b = sqk.GraphBuilder(name)
    rng = np.random.default_rng(3)
    outs, inputs = [], {}
    for i, (sa, sb) in enumerate(cases):
        for dtype, ops in (("f32", ("sub",)), ("f16", ("mul",)), ("i32", ("max", "sub")), ("u8", ("min",))):
            a, c = b.input(f"a{i}_{dtype}", sa, dtype), b.input(f"b{i}_{dtype}", sb, dtype)
            inputs[a.name], inputs[c.name] = data(sa, dtype, rng), data(sb, dtype, rng)
            for op in ops:
                outs.append(b.op(op, a, c, name=f"{op}_{dtype}_{tag(sa)}_{tag(sb)}"))
                outs.append(b.op(op, c, a, name=f"{op}_{dtype}_{tag(sb)}_{tag(sa)}"))
    return b.output(*outs), inputs


@pytest.mark.parametrize("shapes", BROADCAST_CASES, ids=str)
def test_broadcast_host(shapes):
    check(*_broadcast_graph([shapes], "bcast"), "host")


@pytest.mark.parametrize("target", RISCV)
def test_broadcast_riscv(target):
    check(*_broadcast_graph(BROADCAST_CASES, "bcast_all"), target)


@settings(max_examples=25, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=0, max_side=6),
       op=st.sampled_from(sorted(BINARY)), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_broadcast_random(shapes, op, dtype, seed):
    d = dt.dtype(dtype)
    if d not in BINARY[op][0]:
        dtype, d = "f32", dt.f32
    (sa, sb), _ = shapes
    rng = np.random.default_rng(seed)
    b = sqk.GraphBuilder("bcast_random")
    g = b.output(b.op(op, b.input("a", sa, dtype), b.input("b", sb, dtype), name=op))
    bv = data(sb, dtype, rng)
    if op == "div":
        bv = away_from_zero(bv)
    check(g, {"a": data(sa, dtype, rng), "b": bv}, "host")


# --- edge shapes -------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_edge_shapes(target):
    """Rank 0, all-ones, a single element, empty tensors and a vector tail of every length."""
    shapes = [(), (1,), (1, 1, 1), (0, 5), (2, 0, 3), (17,), (1, 23, 1)] + [(n,) for n in range(1, 10)]
    b = sqk.GraphBuilder("edges")
    rng = np.random.default_rng(4)
    outs, inputs = [], {}
    for i, s in enumerate(shapes):
        x = b.input(f"x{i}", s, "f32")
        h = b.input(f"h{i}", s, "f16")
        inputs[x.name], inputs[h.name] = data(s, "f32", rng), data(s, "f16", rng)
        outs += [b.mul(x, x, name=f"mul_{tag(s)}"), b.sigmoid(h, name=f"sigmoid_f16_{tag(s)}")]
    check(b.output(*outs), inputs, target)


# --- NaN and inf ----------------------------------------------------------------------------

@target_param
def test_nan_inf_propagation(target):
    """max/min/relu follow numpy: NaN wins over anything, inf compares as usual.
    Compared exactly (assert_close would scale its tolerance by inf)."""
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -2.5], np.float32)
    a = np.repeat(specials, specials.size)            # every pair of specials ...
    c = np.tile(specials, specials.size)
    a = np.concatenate([a, np.linspace(-3, 3, 12, dtype=np.float32)])  # ... plus a vector-width tail
    c = np.concatenate([c, np.full(12, np.nan, np.float32)])
    b = sqk.GraphBuilder("nan")
    x, y = b.input("x", a.shape, "f32"), b.input("y", c.shape, "f32")
    g = b.output(b.max(x, y), b.min(x, y), b.relu(x), b.add(x, y))
    outs = compile_for(g, target)(x=a, y=c)
    with np.errstate(invalid="ignore"):
        refs = (np.maximum(a, c), np.minimum(a, c), np.maximum(a, np.float32(0)), a + c)
    for name, o, r in zip(("max", "min", "relu", "add"), outs, refs):
        np.testing.assert_array_equal(o, r, err_msg=f"{name} on {target}")
    n = specials.size  # the pairs with a NaN on either side, and no others, give NaN
    assert np.isnan(outs[0][:n * n]).sum() == np.isnan(outs[1][:n * n]).sum() == 2 * n - 1


# --- cast --------------------------------------------------------------------------------

def _range(src: dt.DType, dst: dt.DType) -> tuple[float, float]:
    """Values of ``src`` that ``dst`` can hold (after truncation toward zero)."""
    def span(d):
        if d is dt.bool_:
            return (0, 1)
        if d.is_float:  # f32: past 2**24, so int -> f32 rounds
            return (-60000.0, 60000.0) if d is dt.f16 else (-2e7, 2e7)
        info = np.iinfo(d.np_dtype)
        return (int(info.min), int(info.max))  # exact: float(i64 max) is out of range
    if dst is dt.bool_:  # x != 0 is defined for any value
        return span(src)
    (lo1, hi1), (lo2, hi2) = span(src), span(dst)
    lo, hi = max(lo1, lo2), min(hi1, hi2)
    if src.is_float and dst.is_int:
        # truncation toward zero keeps (lo - 1, hi + 1) in range; 0.9 stays below the next
        # integer even after rounding to f16 (spacing 0.125 below 256)
        lo, hi = (lo - 0.9 if lo < 0 else -0.9), hi + 0.9
    return lo, hi


def cast_data(src: dt.DType, dst: dt.DType, shape, rng):
    if src is dt.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    lo, hi = _range(src, dst)
    if src.is_float:
        x = rng.uniform(lo, hi, size=shape)
        # small magnitudes with fractions (truncation, x != 0), and f32 -> f16 round-to-even ties
        x.reshape(-1)[:12] = [0.0, -0.0, 0.5, -0.5, 0.9, -0.9, 1.0, -1.0,
                              1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0][:x.size]
        return np.clip(x, lo, hi).astype(src.np_dtype)
    x = rng.integers(int(lo), int(hi), size=shape, endpoint=True)
    x.reshape(-1)[:3] = [0, int(lo), int(hi)]
    if dst.is_float:  # ints that round when converted (ties to even)
        x.reshape(-1)[3:5] = [int(min(hi, 2049)), int(max(lo, -16777217))]
    return x.astype(src.np_dtype)


def _cast_graph(srcs):
    rng = np.random.default_rng(5)
    shape = (5, 13)
    b = sqk.GraphBuilder("cast")
    outs, inputs = [], {}
    for s in map(dt.dtype, srcs):
        for d in dt.IO:
            x = b.input(f"x_{s.name}_{d.name}", shape, s)
            inputs[x.name] = cast_data(s, d, shape, rng)
            outs.append(b.cast(x, to=d, name=f"{s.name}_to_{d.name}"))
    return b.output(*outs), inputs


@pytest.mark.parametrize("src", [d.name for d in dt.IO])
def test_cast_host(src):
    """Cast ``src`` to every IO dtype, exactly (float->int truncates, ->bool is x != 0)."""
    check(*_cast_graph([src]), "host", rtol=0)


@pytest.mark.parametrize("target", RISCV)
def test_cast_riscv(target):
    check(*_cast_graph([d.name for d in dt.IO]), target, rtol=0)


@target_param
def test_f16_conversions_exhaustive(target):
    """Every f16 bit pattern to f32, and f32 to f16 (every f16 value, the midpoints between
    neighbours, random bit patterns), bit for bit; NaNs need only stay NaN."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    wide = h[np.isfinite(h)].astype(np.float64)
    wide.sort()
    f = np.concatenate([h.astype(np.float32), ((wide[:-1] + wide[1:]) / 2).astype(np.float32),
                        np.random.default_rng(7).integers(0, 1 << 32, 20000, dtype=np.uint64)
                        .astype(np.uint32).view(np.float32)])
    b = sqk.GraphBuilder("f16_exhaustive")
    g = b.output(b.cast(b.input("h", h.shape, "f16"), to="f32"), b.cast(b.input("f", f.shape, "f32"), to="f16"))
    widened, narrowed = compile_for(g, target)(h=h, f=f)
    with np.errstate(over="ignore"):
        refs = (h.astype(np.float32), f.astype(np.float16))
    for name, o, r in (("f16->f32", widened, refs[0]), ("f32->f16", narrowed, refs[1])):
        bits = o.dtype.str.replace("f", "u")
        bad = (o.view(bits) != r.view(bits)) & ~(np.isnan(o) & np.isnan(r))
        assert not bad.any(), f"{name} on {target}: {o[bad][:5]} != {r[bad][:5]}"


def test_cast_saturates_on_every_target():
    """Float -> int outside the range (numpy leaves that undefined): every target
    truncates toward zero, clamps to the dtype's range, and maps NaN to 0, alike."""
    special = [np.nan, np.inf, -np.inf, 1e30, -1e30, 2.0**63, -2.0**63, 2.0**64, 2.0**31, -2.0**31 - 512,
               300.0, -300.0, 255.5, 256.0, -0.5, -1.5, 127.9, 128.0, -128.9, -129.0, 2.0**-140, -0.0]
    x = np.array(special * 2, np.float32)       # twice: the vector loop and the scalar tail see them
    ints = [d for d in dt.IO if d.is_int]
    b = sqk.GraphBuilder("saturate")
    xv = b.input("x", x.shape, "f32")
    g = b.output(*[b.cast(xv, to=d, name=f"to_{d.name}") for d in ints])
    want = []
    for d in ints:
        info = np.iinfo(d.np_dtype)
        want.append(np.array([0 if np.isnan(v) else max(info.min, min(info.max, int(v) if np.isfinite(v) else
                              (info.max if v > 0 else info.min))) for v in x.astype(np.float64)], d.np_dtype))
    for target in TARGETS:
        for d, o, w in zip(ints, compile_for(g, target)(x=x), want):
            np.testing.assert_array_equal(o, w, err_msg=f"f32 -> {d} on {target}")


def test_cast_ties_round_to_even():
    """f32 -> f16 rounds to nearest even (a reference-free spot check)."""
    v = np.array([1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0, 65520.0 - 1], np.float32)
    b = sqk.GraphBuilder("ties")
    g = b.output(b.cast(b.input("x", v.shape, "f32"), to="f16"))
    out = compile_for(g, "host")(x=v)
    np.testing.assert_array_equal(out, np.array([1.0, 1 + 2**-9, 2048.0, 2052.0, 65504.0], np.float16))


# --- the row-chunked, threaded path ----------------------------------------------------------

@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_big_chunked_threads(target):
    """Rows longer than 2*CHUNK are split into chunks over threads; the tail chunk is partial."""
    n = 100003
    assert n > 2 * CHUNK and n % CHUNK
    rng = np.random.default_rng(6)
    b = sqk.GraphBuilder("big")
    x, y = b.input("x", (3, n), "f32"), b.input("y", (3, n), "f32")
    col, row = b.input("col", (3, 1), "f32"), b.input("row", (n,), "f32")
    h = b.input("h", (3, n), "f16")
    g = b.output(b.add(x, y, name="add"), b.mul(x, col, name="mul_col"), b.sub(row, x, name="sub_row"),
                 b.relu(h, name="relu_f16"))
    inputs = {"x": rand((3, n), "f32", rng), "y": rand((3, n), "f32", rng), "col": rand((3, 1), "f32", rng),
              "row": rand((n,), "f32", rng), "h": rand((3, n), "f16", rng)}
    m = check(g, inputs, target, threads=2)
    assert m.threads == 2
