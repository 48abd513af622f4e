"""Numeric tests of the data-movement kernels (codegen/elementwise.py): reshape,
transpose, slice and concat as strided maps, and the copies the lowering adds
for outputs that alias an input, a constant or another output.

Expected values come straight from numpy indexing (not the reference
interpreter) and are compared bit for bit: moving data must not change a
single bit, NaN payloads and -0.0 included.  Cases are batched into
multi-output graphs: per op and dtype on the host, everything in one graph
per RISC-V target (a compile + link + qemu run each); outputs are named for
their case so a failure says which one.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import sqk
from sqk.codegen.elementwise import CHUNK
from harness import TARGETS, compile_for, rand

DTYPES = ["f32", "f16", "i8", "bool"]
BIG = 1 << 62  # ONNX-style "to the end" bound: must be clamped, never used as an offset
BITS = {"f32": [0x7F800001, 0xFFC00123, 0x80000000, 0x00000001, 0x7F800000],   # sNaN, -qNaN, -0, subnormal, inf
        "f16": [0x7C01, 0xFE05, 0x8000, 0x0001, 0xFC00]}


def assert_bits_equal(out, want, what):
    assert out.dtype == want.dtype and out.shape == want.shape, \
        f"{what}: got {out.dtype}{out.shape}, want {want.dtype}{want.shape}"
    if out.dtype.kind == "f":
        out, want = out.view(f"u{out.itemsize}"), want.view(f"u{want.itemsize}")
    np.testing.assert_array_equal(out, want, err_msg=what)


class Cases:
    """Inputs and named outputs with their expected arrays, accumulated into one builder."""

    def __init__(self, name):
        self.b = sqk.GraphBuilder(name)
        self.inputs, self.outs, self.want = {}, [], []
        self.rng = np.random.default_rng(0)

    def input(self, shape, dtype, plant=True):
        x = rand(shape, dtype, self.rng)
        if plant and dtype in BITS and x.size:  # plant bit patterns a float round trip could alter
            flat = x.reshape(-1).view(f"u{x.itemsize}")
            flat[:len(BITS[dtype])] = BITS[dtype][:flat.size]
        v = self.b.input(f"x{len(self.inputs)}", shape, dtype)
        self.inputs[v.name] = x
        return v

    def out(self, value, want):
        self.outs.append(value)
        self.want.append(np.ascontiguousarray(want))

    def check(self, target, **kw):
        g = self.b.output(*self.outs)
        outs = compile_for(g, target, **kw)(**self.inputs)
        if len(self.outs) == 1:
            outs = (outs,)
        for v, o, w in zip(g.outputs, outs, self.want):
            assert_bits_equal(o, w, f"{g.name}: {v.name} on {target}")


def tag(*parts) -> str:
    """A value name from shapes and numbers: (3, -1) -> 3xm1."""
    return "_".join("x".join(str(v).replace("-", "m") for v in p) if isinstance(p, tuple) else
                    str(p).replace("-", "m") for p in parts)


# --- the cases -------------------------------------------------------------------------------

RESHAPES = [((2, 3, 5), [(5, 6), (-1,), (30, 1, 1), (1, 2, 1, 15), (6, -1), (3, 2, 5)]),
            ((), [(1, 1), (-1,)]),
            ((1, 7), [(7,), (7, 1, 1)]),
            ((0, 4), [(4, 0), (2, 0, 2)])]


def add_reshapes(c: Cases, dtype):
    for src, dsts in RESHAPES:
        x = c.input(src, dtype)
        for d in dsts:
            c.out(c.b.reshape(x, shape=d, name=tag("reshape", dtype, src, d)), c.inputs[x.name].reshape(d))


def add_transposes(c: Cases, dtype):
    perms = {(2, 3, 5): list(itertools.permutations(range(3))),
             (2, 3, 4, 9): [(0, 1, 2, 3), (0, 2, 1, 3), (3, 1, 0, 2), (1, 0, 3, 2), (2, 3, 0, 1), (0, 1, 3, 2)],
             (1, 4, 1, 3): [(1, 3, 0, 2), (2, 0, 3, 1)]}
    for shape, ps in perms.items():
        x = c.input(shape, dtype)
        a = c.inputs[x.name]
        for p in ps + [()]:  # () = reversed dims
            c.out(c.b.transpose(x, perm=p, name=tag("transpose", dtype, shape, p or "default")),
                  np.transpose(a, p or None))


SLICES = [  # shape, starts, ends, axes, steps
    ((7, 9), (-3,), (100,), (1,), ()),                       # clamp past the end
    ((7, 9), (-5, -7), (-1, -2), (), ()),                    # negative starts and ends
    ((7, 9), (1, 0), (7, 9), (), (2, 3)),                    # steps > 1
    ((7, 9), (-1,), (-BIG,), (0,), (-1,)),                   # full reverse of one axis
    ((7, 9), (-1, -1), (-BIG, -BIG), (), (-1, -1)),          # reverse both (coalesces to one stride -1)
    ((7, 9), (5, 8), (0, 1), (), (-2, -3)),                  # negative steps > 1, stopping before 0
    ((7, 9), (BIG, -BIG), (-BIG, BIG), (), (-2, 4)),         # huge bounds both ways
    ((7, 9), (3,), (3,), (0,), ()),                          # empty
    ((7, 9), (5,), (2,), (1,), ()),                          # empty: start after end
    ((7, 9), (0,), (5,), (1,), (-1,)),                       # empty with a negative step
    ((2, 5, 6, 3), (1, -4, 0), (2, BIG, -1), (0, 1, 3), (1, 2, 1)),  # several axes
    ((2, 5, 6, 3), (-1, 4), (-BIG, 0), (-1, 1), (-1, -3)),   # negative axes and steps
    ((1, 7, 1), (6,), (-BIG,), (1,), (-2,)),                 # size-1 dims around a reversed axis
    ((4, 37), (1, 3), (3, 37), (), ()),                      # contiguous rows at an offset
    ((0, 5), (1,), (4,), (1,), ()),                          # empty input
]
EMPTY_SLICES = (7, 8, 9, 14)


def numpy_slice(a, starts, ends, axes, steps):
    """ONNX Slice by plain Python slicing (its clamping is Python's)."""
    idx = [slice(None)] * a.ndim
    for s, e, ax, st in zip(starts, ends, axes or range(len(starts)), steps or (1,) * len(starts)):
        idx[ax] = slice(s, e, st)
    return a[tuple(idx)]


def add_slices(c: Cases, dtype):
    xs = {}
    for i, (shape, starts, ends, axes, steps) in enumerate(SLICES):
        if shape not in xs:
            xs[shape] = c.input(shape, dtype)
        x = xs[shape]
        c.out(c.b.slice(x, starts=starts, ends=ends, axes=axes, steps=steps, name=f"slice{i}_{dtype}"),
              numpy_slice(c.inputs[x.name], starts, ends, axes, steps))


def add_concats(c: Cases, dtype):
    base = (2, 3, 5)
    for axis in range(3):
        def along(n):
            return tuple(n if i == axis else d for i, d in enumerate(base))
        a, m, e, z = (c.input(along(n), dtype) for n in (2, 3, 1, 0))
        for name, parts, ax in [("two", (a, m), axis), ("three", (a, m, e), axis - 3),  # negative axis
                                ("empty_mid", (a, z, e), axis), ("empty_first", (z, a), axis),
                                ("same_twice", (a, a), axis)]:
            c.out(c.b.concat(*parts, axis=ax, name=f"concat_{name}_ax{axis}_{dtype}"),
                  np.concatenate([c.inputs[p.name] for p in parts], axis=ax))
    v1, v2, z1, z2 = c.input((7,), dtype), c.input((13,), dtype), c.input((0, 4), dtype), c.input((0, 4), dtype)
    for name, parts in [("1d", (v1, v2, v1)), ("single", (v1,)), ("all_empty", (z1, z2))]:
        c.out(c.b.concat(*parts, axis=0, name=f"concat_{name}_{dtype}"),
              np.concatenate([c.inputs[p.name] for p in parts]))


ADDERS = {"reshape": add_reshapes, "transpose": add_transposes, "slice": add_slices, "concat": add_concats}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(ADDERS))
def test_movement_host(op, dtype):
    c = Cases(f"{op}_{dtype}")
    ADDERS[op](c, dtype)
    c.check("host")


@pytest.mark.parametrize("target,dtypes", [("riscv64", DTYPES), ("riscv64-scalar", ["f32", "f16", "bool"])])
def test_movement_riscv(target, dtypes):
    c = Cases("moves")
    for dtype in dtypes:
        for add in ADDERS.values():
            add(c, dtype)
    c.check(target)


def test_case_tables_are_what_they_say():
    """The slice table really holds empty results and the rest are not (guards the test data)."""
    c = Cases("t")
    add_slices(c, "f32")
    assert [i for i, w in enumerate(c.want) if w.size == 0] == list(EMPTY_SLICES)
    assert all(v.type.shape == w.shape for v, w in zip(c.outs, c.want))


def test_reference_slices_like_numpy():
    """The reference interpreter agrees with plain slicing on every case (a negative step
    running to the start once came out empty there)."""
    c = Cases("ref")
    add_slices(c, "f32")
    refs = sqk.reference(c.b.output(*c.outs), **c.inputs)
    for i, (r, w) in enumerate(zip(refs, c.want)):
        assert_bits_equal(r, w, f"reference of slice{i}")


# --- threads over chunked rows and concat parts -------------------------------------------------

@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_movement_threads(target):
    """Two threads split each kernel's range anywhere: inside a chunked row, across concat parts."""
    n = 2 * CHUNK + 1237
    c = Cases("moves_threads")
    x, y = c.input((3, n), "f32"), c.input((3, n // 2), "f32")
    a, d = c.inputs[x.name], c.inputs[y.name]
    c.out(c.b.concat(x, y, x, axis=1, name="cat"), np.concatenate([a, d, a], axis=1))
    c.out(c.b.slice(x, starts=(-1,), ends=(-BIG,), axes=(1,), steps=(-1,), name="rev"), a[:, ::-1])
    c.out(c.b.transpose(x, name="t"), a.T)
    c.check(target, threads=2)


# --- outputs that alias inputs, constants or each other -------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_aliased_outputs(target):
    """The lowering copies an output that is an input, a constant or an earlier output."""
    c = Cases("aliases")
    x, m, z = c.input((5, 7), "f32"), c.input((4,), "bool"), c.input((2, 3), "f32", plant=False)
    a, zz = c.inputs[x.name], c.inputs[z.name]
    y = c.b.add(z, z, name="y")  # arithmetic may quiet NaNs: z has none
    const = rand((3, 4), "i32", c.rng)
    k = c.b.const(const, name="c")
    for v, w in [(x, a), (y, zz + zz), (y, zz + zz), (k, const), (m, c.inputs[m.name]), (x, a),
                 (c.b.neg(k, name="negc"), -const)]:  # folded to a second constant
        c.out(v, w)
    c.check(target)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_graph_of_only_a_constant(target):
    const = np.arange(11, dtype=np.int64) - 5
    b = sqk.GraphBuilder("only_const")
    out = compile_for(b.output(b.const(const, name="c")), target)()
    assert_bits_equal(out, const, f"constant output on {target}")
