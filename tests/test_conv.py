"""Numeric tests of codegen/conv.py (conv2d, maxpool2d, avgpool2d,
global_avgpool) against the numpy reference, and of its static width plan.

Host runs every case of the tables (one compile each); the RISC-V targets
run them all batched into multi-output graphs (one compile and one qemu run
per graph), each output named for its case so a failure says which.  Widths are chosen to reach every kind of tile: rows
narrower than a vector, borders, looped interiors, strided spans, and rows
whose width is not a multiple of the vector width.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import sqk
from sqk.codegen.conv import Axis, column_runs, plan_tiles
from sqk.ir.graph import IRError
from sqk.ir.ops import _pool_out
from harness import check, rand, target_param

# name: (x shape, w shape, bias, dtype, attrs)
CONV_CASES = {
    "1x1": ((1, 8, 5, 13), (6, 8, 1, 1), True, "f32", {}),
    "1x1_wide": ((1, 3, 2, 70), (5, 3, 1, 1), False, "f32", {}),
    "3x3_pad1": ((1, 3, 12, 21), (8, 3, 3, 3), True, "f32", dict(pads=(1, 1, 1, 1))),
    "3x3_pad1_wide": ((1, 2, 4, 75), (4, 2, 3, 3), True, "f32", dict(pads=(1, 1, 1, 1))),
    "3x3_no_pad": ((1, 4, 9, 10), (3, 4, 3, 3), True, "f32", {}),
    "5x5_stride2": ((1, 4, 15, 19), (5, 4, 5, 5), True, "f32", dict(strides=(2, 2), pads=(2, 2, 2, 2))),
    "3x3_stride2_wide": ((1, 3, 7, 69), (4, 3, 3, 3), True, "f32", dict(strides=(2, 2), pads=(1, 1, 1, 1))),
    "stride3_dil2": ((1, 2, 14, 40), (3, 2, 3, 3), True, "f32", dict(strides=(3, 3), dilations=(2, 2), pads=(1, 2, 3, 1))),
    "dilation2": ((1, 3, 13, 20), (4, 3, 3, 3), False, "f32", dict(dilations=(2, 2), pads=(2, 2, 2, 2))),
    "asym_pads": ((1, 3, 9, 14), (4, 3, 3, 2), True, "f32", dict(pads=(0, 2, 1, 3))),
    "rect_kernel": ((1, 2, 8, 30), (3, 2, 1, 7), True, "f32", dict(pads=(0, 3, 0, 3))),
    "pads_beyond_input": ((1, 2, 3, 3), (4, 2, 3, 3), True, "f32", dict(pads=(4, 5, 4, 5))),
    "kernel_wider_than_input": ((1, 2, 4, 3), (3, 2, 3, 5), True, "f32", dict(pads=(1, 2, 1, 2))),
    "groups2": ((1, 6, 10, 11), (8, 3, 3, 3), True, "f32", dict(groups=2, pads=(1, 1, 1, 1))),
    "groups3_odd_channels": ((1, 6, 6, 9), (15, 2, 3, 3), True, "f32", dict(groups=3, pads=(1, 1, 1, 1))),
    "depthwise": ((1, 8, 12, 17), (8, 1, 3, 3), True, "f32", dict(groups=8, pads=(1, 1, 1, 1))),
    "depthwise_x2_stride2": ((1, 4, 11, 23), (8, 1, 3, 3), False, "f32", dict(groups=4, strides=(2, 2), pads=(1, 1, 1, 1))),
    "no_bias": ((1, 5, 7, 12), (7, 5, 3, 3), False, "f32", dict(pads=(1, 1, 1, 1))),
    "batch2": ((2, 3, 7, 9), (5, 3, 3, 3), True, "f32", dict(pads=(1, 1, 1, 1))),
    "single_pixel": ((1, 5, 1, 1), (7, 5, 3, 3), True, "f32", dict(pads=(1, 1, 1, 1))),
    "single_pixel_1x1": ((2, 5, 1, 1), (3, 5, 1, 1), False, "f32", {}),
    "many_channels_narrow": ((1, 32, 4, 4), (24, 32, 3, 3), True, "f32", dict(pads=(1, 1, 1, 1))),
    "f16_3x3": ((1, 4, 10, 18), (6, 4, 3, 3), True, "f16", dict(pads=(1, 1, 1, 1))),
    "f16_depthwise_stride2": ((1, 6, 9, 21), (6, 1, 3, 3), True, "f16", dict(groups=6, strides=(2, 2), pads=(1, 1, 1, 1))),
    "f16_5x5_asym": ((2, 3, 8, 13), (4, 3, 5, 5), False, "f16", dict(pads=(2, 1, 0, 3))),
    "empty_batch": ((0, 3, 5, 5), (4, 3, 3, 3), True, "f32", dict(pads=(1, 1, 1, 1))),
    # pointwise (1x1, stride 1, no pads, groups 1) runs as the GEMM: K blocks, N not a
    # multiple of the micro-tile, few output channels (the GEMV path), batch, f16
    "1x1_gemm_k_blocks": ((1, 300, 7, 7), (37, 300, 1, 1), True, "f32", {}),
    "1x1_gemm_batch2_f16": ((2, 20, 5, 9), (13, 20, 1, 1), True, "f16", {}),
    "1x1_gemm_few_out": ((1, 16, 6, 6), (3, 16, 1, 1), True, "f32", {}),
    "1x1_gemm_dilated": ((1, 5, 4, 6), (9, 5, 1, 1), False, "f32", dict(dilations=(2, 3))),
    "1x1_stride2": ((1, 6, 9, 13), (7, 6, 1, 1), True, "f32", dict(strides=(2, 2))),
    "1x1_pad1": ((1, 6, 3, 5), (7, 6, 1, 1), True, "f32", dict(pads=(1, 0, 1, 1))),
    "1x1_groups2": ((1, 6, 5, 11), (8, 3, 1, 1), True, "f32", dict(groups=2)),
    "1x1_empty_batch": ((0, 3, 4, 4), (2, 3, 1, 1), True, "f32", {}),
}
RISCV_CONV = tuple(CONV_CASES)   # riscv64 has kernels of its own (row loops): every case

# name: (op, x shape, dtype, attrs)
POOL_CASES = {
    "max_2x2_s2": ("maxpool2d", (1, 3, 8, 8), "f32", dict(kernel=(2, 2), strides=(2, 2))),
    "max_2x2_s2_odd": ("maxpool2d", (2, 3, 9, 35), "f32", dict(kernel=(2, 2), strides=(2, 2))),
    "max_3x3_s2_p1": ("maxpool2d", (1, 4, 11, 13), "f32", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),
    "max_3x3_s1_p1_wide": ("maxpool2d", (1, 2, 5, 70), "f32", dict(kernel=(3, 3), pads=(1, 1, 1, 1))),
    "max_ceil": ("maxpool2d", (1, 3, 10, 10), "f32", dict(kernel=(3, 3), strides=(2, 2), ceil_mode=True)),
    "max_dilated": ("maxpool2d", (1, 3, 10, 12), "f32",
                    dict(kernel=(2, 3), strides=(1, 2), dilations=(2, 3), pads=(1, 0, 1, 2))),
    "max_all_padding_window": ("maxpool2d", (1, 1, 2, 2), "f32", dict(kernel=(2, 2), dilations=(3, 3), pads=(1, 1, 1, 1))),
    "max_f16": ("maxpool2d", (1, 3, 9, 17), "f16", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),
    "avg_2x2_s2": ("avgpool2d", (1, 3, 8, 8), "f32", dict(kernel=(2, 2), strides=(2, 2))),
    "avg_3x3_s2_p1": ("avgpool2d", (1, 4, 11, 13), "f32", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),
    "avg_3x3_s2_p1_incl": ("avgpool2d", (1, 4, 11, 13), "f32",
                           dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), count_include_pad=True)),
    "avg_ceil": ("avgpool2d", (1, 3, 10, 10), "f32", dict(kernel=(3, 3), strides=(2, 2), ceil_mode=True)),
    "avg_ceil_asym_incl": ("avgpool2d", (1, 3, 10, 39), "f32",
                           dict(kernel=(3, 3), strides=(2, 2), pads=(1, 0, 1, 1), ceil_mode=True, count_include_pad=True)),
    "avg_ceil_asym_excl": ("avgpool2d", (1, 3, 10, 39), "f32",
                           dict(kernel=(3, 3), strides=(2, 2), pads=(1, 0, 1, 1), ceil_mode=True)),
    "avg_f16_incl": ("avgpool2d", (1, 2, 20, 37), "f16",
                     dict(kernel=(3, 2), pads=(1, 1, 2, 0), ceil_mode=True, count_include_pad=True)),
    "gap": ("global_avgpool", (2, 5, 7, 7), "f32", {}),
    "gap_large_plane": ("global_avgpool", (1, 3, 33, 35), "f32", {}),
    "gap_single_pixel": ("global_avgpool", (1, 4, 1, 1), "f32", {}),
    "gap_f16": ("global_avgpool", (1, 6, 9, 11), "f16", {}),
}
RISCV_POOL = tuple(POOL_CASES)


def add_conv(b, name, x_shape, w_shape, bias, dtype, attrs):
    """Append a conv2d case with x, w (and bias) as graph inputs; returns (output, inputs)."""
    rng = np.random.default_rng(len(name))
    ins = {f"{name}_x": rand(x_shape, dtype, rng), f"{name}_w": rand(w_shape, dtype, rng)}
    if bias:
        ins[f"{name}_b"] = rand((w_shape[0],), dtype, rng)
    vals = [b.input(k, v.shape, dtype) for k, v in ins.items()]
    return b.conv2d(*vals, name=name, **attrs), ins


def add_pool(b, name, op, x_shape, dtype, attrs):
    x = rand(x_shape, dtype, np.random.default_rng(len(name)))
    return getattr(b, op)(b.input(f"{name}_x", x_shape, dtype), name=name, **attrs), {f"{name}_x": x}


# --- the tables on the host -------------------------------------------------------------

@pytest.mark.parametrize("name", CONV_CASES)
def test_conv(name):
    b = sqk.GraphBuilder(name)
    y, ins = add_conv(b, name, *CONV_CASES[name])
    check(b.output(y), ins, "host")


@pytest.mark.parametrize("name", POOL_CASES)
def test_pool(name):
    b = sqk.GraphBuilder(name)
    y, ins = add_pool(b, name, *POOL_CASES[name])
    check(b.output(y), ins, "host")


# --- every target: a few cases per graph ---------------------------------------------------

@target_param
@pytest.mark.parametrize("kind", ["convs", "pools"])
def test_cases_on_every_target(target, kind):
    """A few cases per target, as the outputs of one graph (one compile, one qemu run)."""
    add, names, cases = (add_conv, RISCV_CONV, CONV_CASES) if kind == "convs" else (add_pool, RISCV_POOL, POOL_CASES)
    b = sqk.GraphBuilder(kind)
    outs, ins = [], {}
    for name in names:
        y, i = add(b, name, *cases[name])
        outs.append(y)
        ins.update(i)
    check(b.output(*outs), ins, target)


@target_param
def test_small_cnn(target):
    """conv -> relu -> maxpool -> conv stride 2 -> avgpool -> conv 1x1 -> global_avgpool,
    with constant weights and intermediates in the arena."""
    rng = np.random.default_rng(7)
    b = sqk.GraphBuilder("cnn")
    x = b.input("x", (1, 3, 32, 32))
    h = b.relu(b.conv2d(x, b.const(rand((16, 3, 3, 3), rng=rng) * 0.3), b.const(rand((16,), rng=rng)),
                        pads=(1, 1, 1, 1)))
    h = b.maxpool2d(h, kernel=(2, 2), strides=(2, 2))
    h = b.relu(b.conv2d(h, b.const(rand((32, 16, 3, 3), rng=rng) * 0.1), strides=(2, 2), pads=(1, 1, 1, 1)))
    h = b.avgpool2d(h, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1))
    h = b.conv2d(h, b.const(rand((10, 32, 1, 1), rng=rng) * 0.2), b.const(rand((10,), rng=rng)))
    g = b.output(b.global_avgpool(h))
    check(g, {"x": rand((1, 3, 32, 32), rng=rng)}, target)


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_pointwise_fused(act):
    """A pointwise conv2d with constant weights and bias and a fused activation (the
    GEMM path's epilogue: bias per output channel, then the activation)."""
    from sqk.codegen.conv import is_pointwise

    rng = np.random.default_rng(3)
    b = sqk.GraphBuilder("pw")
    x = b.input("x", (2, 24, 6, 11))
    y = b.conv2d(x, b.const(rand((40, 24, 1, 1), rng=rng)), b.const(rand((40,), rng=rng)))
    g = b.output(getattr(b, act)(y))
    assert is_pointwise(next(n for n in g.nodes if n.op == "conv2d"))
    m = check(g, {"x": rand((2, 24, 6, 11), rng=rng)}, "host")
    assert any(r.op == "fused" for r in m.profile(runs=1, x=rand((2, 24, 6, 11), rng=rng)))


def test_maxpool_propagates_nan():
    """numpy's max propagates NaN; so must the kernel (a plain maxps would drop it)."""
    b = sqk.GraphBuilder("nan")
    g = b.output(b.maxpool2d(b.input("x", (1, 1, 4, 20)), kernel=(2, 2), strides=(2, 2)))
    x = rand((1, 1, 4, 20))
    x[0, 0, 1, 5] = np.nan
    x[0, 0, 2, 13] = np.nan
    m = check(g, {"x": x}, "host")
    assert np.isnan(m(x=x)).sum() == 2


# --- random parameters (host) --------------------------------------------------------------

@st.composite
def conv_params(draw):
    groups = draw(st.integers(1, 3))
    cig, cog = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    h = draw(st.integers(max(1, dilations[0] * (kh - 1) + 1 - pads[0] - pads[2]), 10))
    w = draw(st.integers(max(1, dilations[1] * (kw - 1) + 1 - pads[1] - pads[3]), 40))
    n = draw(st.integers(1, 2))
    return ((n, groups * cig, h, w), (groups * cog, cig, kh, kw), draw(st.booleans()),
            draw(st.sampled_from(["f32", "f16"])),
            dict(strides=strides, dilations=dilations, pads=pads, groups=groups))


@settings(max_examples=15, deadline=None)
@given(conv_params())
def test_conv_random(case):
    b = sqk.GraphBuilder("conv_random")
    y, ins = add_conv(b, "conv", *case)
    check(b.output(y), ins, "host")


@st.composite
def pool_params(draw):
    op = draw(st.sampled_from(["maxpool2d", "avgpool2d"]))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pads = tuple(draw(st.integers(0, kernel[i % 2] - 1)) for i in range(4))
    attrs = dict(kernel=kernel, strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), pads=pads,
                 ceil_mode=draw(st.booleans()))
    if op == "maxpool2d":
        attrs["dilations"] = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    else:
        attrs["count_include_pad"] = draw(st.booleans())
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 10)), draw(st.integers(1, 40)))
    return op, shape, draw(st.sampled_from(["f32", "f16"])), attrs


@settings(max_examples=10, deadline=None)
@given(pool_params())
def test_pool_random(case):
    b = sqk.GraphBuilder("pool_random")
    try:
        y, ins = add_pool(b, "pool", *case)
    except IRError:  # window larger than the padded input
        assume(False)
    check(b.output(y), ins, "host")


# --- the static width plan ----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 40), taps=st.integers(1, 6), stride=st.integers(1, 3), dilation=st.integers(1, 3),
       pad=st.integers(0, 6), pad_end=st.integers(0, 6), ceil_mode=st.booleans(),
       lanes=st.sampled_from([1, 2, 4, 8, 16]), unroll=st.integers(1, 4))
def test_plan_tiles(size, taps, stride, dilation, pad, pad_end, ceil_mode, lanes, unroll):
    """Every output column is stored; a lane reads tap t exactly when that
    tap is in bounds for its column; every read stays inside the input row."""
    try:
        out = _pool_out(size, taps, stride, pad, pad_end, dilation, ceil_mode)
    except IRError:
        assume(False)
    ax = Axis(size, taps, stride, dilation, pad, pad_end, out)
    tiles = plan_tiles(ax, lanes, unroll)
    stored = set()
    for g in tiles.groups:
        for k in range(g.count):
            tile = g.start + k * tiles.width
            for v in g.vecs:
                if v is None:
                    assert tile + tiles.width > out or out == 0
                    continue
                cols = [tile + v.offset + i for i in range(lanes)]
                stored.update(c for c in cols[:v.store])
                assert all(0 <= c < out for c in cols[:v.store])
                for t in range(taps):
                    run = v.runs[t] or (0, 0)
                    for i, c in enumerate(cols):
                        inside = c < out and t in ax.valid(c)
                        assert inside == (run[0] <= i < run[1]), (g, v, t, i)
                    if v.runs[t]:
                        rel, span, lane_pos = tiles.window(g, v, t)
                        lane0 = cols[0] * stride - pad + t * dilation  # input column of lane 0
                        assert 0 <= lane0 + rel and lane0 + rel + span <= size, (g, v, t)
                        for i in range(*run):  # each in-bounds lane reads its own element
                            assert lane0 + rel + lane_pos[i] == lane0 + i * stride
    assert stored == set(range(out))


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 40), taps=st.integers(1, 6), stride=st.integers(1, 3), dilation=st.integers(1, 3),
       pad=st.integers(0, 6), pad_end=st.integers(0, 6))
def test_column_runs(size, taps, stride, dilation, pad, pad_end):
    """riscv64's row loops visit every in-bounds (output column, tap) exactly once."""
    out = (size + pad + pad_end - dilation * (taps - 1) - 1) // stride + 1
    assume(out > 0)
    ax = Axis(size, taps, stride, dilation, pad, pad_end, out)
    seen = [(o, t) for first, last, ts in column_runs(ax, range(taps)) for o in range(first, last) for t in ts]
    assert sorted(seen) == sorted((o, t) for o in range(out) for t in ax.valid(o))


@pytest.mark.parametrize("target", ["riscv64", "riscv64-scalar"])
def test_riscv_rows_in_column_chunks(target, monkeypatch):
    """riscv64's row loops keep at most ROW_CHUNK output columns on the stack: wider rows
    go chunk by chunk (an odd chunk of 37 here, so runs and borders straddle chunks)."""
    import sqk.codegen.conv as conv

    monkeypatch.setattr(conv, "ROW_CHUNK", 37)
    names = ["3x3_pad1_wide", "3x3_stride2_wide", "stride3_dil2", "rect_kernel", "1x1_wide"]
    pools = ["max_3x3_s1_p1_wide", "avg_ceil_asym_incl", "avg_f16_incl"]
    b = sqk.GraphBuilder("chunks")
    outs, ins = [], {}
    for name in names:
        y, i = add_conv(b, name, *CONV_CASES[name])
        outs.append(b.relu(y))   # a fused epilogue too
        ins.update(i)
    for name in pools:
        y, i = add_pool(b, name, *POOL_CASES[name])
        outs.append(y)
        ins.update(i)
    check(b.output(*outs), ins, target)
