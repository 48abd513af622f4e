"""The IR text form: print -> parse gives the same graph, parse -> print gives
the same text, for every op, every dtype and every attribute kind; parse
errors carry the line and column of the fault."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings, strategies as st

import sqk
from sqk.ir import OPS, Attr, GraphBuilder, IRError, OpDef, ParseError, VerifyError
from sqk.ir import dtypes as dt
from sqk.ir.graph import TensorType

from harness import rand


def roundtrip(g, **kw):
    """Assert print -> parse -> equal graph and parse -> print -> same text; returns the parsed graph."""
    s = g.to_text(**kw)
    g2 = sqk.parse_ir(s, g.constants)
    assert g2 == g, s
    assert g2.to_text(**kw) == s
    # the canonical form with everything inline needs no side table
    g3 = sqk.parse_ir(g.to_text(inline_limit=None))
    assert g3 == g
    return g2


def same_outputs(g, g2, inputs):
    outs, outs2 = sqk.reference(g, **inputs), sqk.reference(g2, **inputs)
    if not isinstance(outs, tuple):
        outs, outs2 = (outs,), (outs2,)
    for a, b in zip(outs, outs2):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


# --- one small graph per op ----------------------------------------------------------------
# Each builder gets a GraphBuilder and returns the graph's outputs.  Non-default
# attributes wherever the op has them, so every attribute is printed and parsed.

def _unary(op):
    return lambda b: [getattr(b, op)(b.input("x", (2, 3), "f32"))]


def _binary(op, dtype="f32"):
    return lambda b: [getattr(b, op)(b.input("a", (2, 3), dtype), b.input("b", (3,), dtype))]


def _conv(b):
    x = b.input("x", (1, 4, 5, 5))
    w = b.const(rand((6, 2, 3, 3)), name="w")
    bias = b.const(rand((6,)), name="bias")
    return [b.conv2d(x, w, bias, strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2), groups=2)]


def _add_gelu_body():
    b = GraphBuilder("add_gelu")
    return b.output(b.gelu(b.add(b.input("a", (2, 3)), b.input("b", (3,))), approximate="tanh"))


OP_CASES = {
    "const": lambda b: [b.const(np.arange(6, dtype=np.float32).reshape(2, 3))],
    **{op: _unary(op) for op in ("neg", "exp", "sqrt", "rsqrt", "tanh", "erf", "relu", "sigmoid", "silu")},
    **{op: _binary(op) for op in ("add", "sub", "mul", "div", "max", "min")},
    "gelu": lambda b: [b.gelu(b.input("x", (4,)), approximate="tanh")],
    "matmul": lambda b: [b.matmul(b.input("x", (2, 1, 3, 4)), b.const(rand((5, 4, 2)), name="w"))],
    "matmul_q": lambda b: [b.matmul_q(b.input("x", (2, 5)), b.const(np.arange(-8, 7).reshape(5, 3) % 16 - 8, "i4"),
                                      b.const(rand((2, 3), "f16")), b.const(np.ones((2, 3)), "i4"), group=4,
                                      activations="int8")],
    "gather_q": lambda b: [b.gather_q(b.const(np.array([2, -1, 0])), b.const(np.arange(15).reshape(5, 3) % 16 - 8,
                                                                             "i4"),
                                      b.const(rand((2, 3), "f16")), b.const(rand((2, 3))), group=4)],
    "gather_ggml": lambda b: [b.gather_ggml(b.const(np.array([1, -2])), b.const(np.arange(630).reshape(3, 210) % 7,
                                                                               "u8"), type="Q6_K")],
    "matmul_ggml": lambda b: [b.matmul_ggml(b.input("x", (2, 256)), b.const(np.arange(420).reshape(2, 210) % 7,
                                                                             "u8"), type="Q6_K")],
    "softmax": lambda b: [b.softmax(b.input("x", (2, 3, 4)), axis=-2)],
    "layernorm": lambda b: [b.layernorm(b.input("x", (2, 3, 4)), b.const(rand((3, 4))), b.const(rand((3, 4))),
                                        axis=1, eps=1e-3)],
    "rmsnorm": lambda b: [b.rmsnorm(b.input("x", (2, 4), "f16"), b.const(rand((4,), "f16")), eps=0.1 + 0.2)],
    "reduce_sum": lambda b: [b.reduce_sum(b.input("x", (2, 3, 4), "i32"), axes=(0, -1), keepdims=True)],
    "reduce_mean": lambda b: [b.reduce_mean(b.input("x", (2, 3, 4)), axes=(1,))],
    "reduce_max": lambda b: [b.reduce_max(b.input("x", (2, 3), "u8"))],
    "reshape": lambda b: [b.reshape(b.input("x", (2, 3, 4)), shape=(4, -1))],
    "transpose": lambda b: [b.transpose(b.input("x", (2, 3, 4), "bool"), perm=(1, 2, 0))],
    "concat": lambda b: [b.concat(b.input("x", (2, 3)), b.input("y", (2, 1)), b.input("z", (2, 0)), axis=1)],
    "slice": lambda b: [b.slice(b.input("x", (5, 6)), starts=(-1, 1), ends=(0, 100), axes=(0, 1), steps=(-2, 3))],
    "gather": lambda b: [b.gather(b.input("table", (5, 3)), b.const(np.array([[0, -1], [4, 2]], np.int64)), axis=0)],
    "cast": lambda b: [b.cast(b.input("x", (3,)), to="f16"), b.cast(b.input("y", (3,), "i8"), to="bool")],
    "conv2d": _conv,
    "maxpool2d": lambda b: [b.maxpool2d(b.input("x", (1, 2, 7, 6)), kernel=(3, 2), strides=(2, 2), pads=(1, 1, 1, 0),
                                        ceil_mode=True, dilations=(1, 2))],
    "avgpool2d": lambda b: [b.avgpool2d(b.input("x", (1, 2, 6, 6)), kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1),
                                        count_include_pad=True)],
    "global_avgpool": lambda b: [b.global_avgpool(b.input("x", (2, 3, 4, 5)))],
    "conv_input_q": lambda b: [b.conv_input_q(b.input("x", (1, 5, 4, 3)), act_scale=0.25, pads=(1, 0, 2, 1))],
    "conv2d_q": lambda b: [b.conv2d_q(b.input("xq", (1, 2, 6, 6, 4), "i8"), b.input("q", (3, 2, 3, 3, 4), "i8"),
                                      b.const(rand((3,)), name="s"), b.const(rand((3,)), name="bias"),
                                      strides=(2, 1), dilations=(1, 2), act_scale=0.5)],
    "im2col": lambda b: [b.im2col(b.input("x", (1, 2, 7, 6)), kernel=(3, 2), strides=(2, 1), pads=(1, 0, 1, 1),
                                  dilations=(1, 2))],
    "winograd_input": lambda b: [b.winograd_input(b.input("x", (1, 2, 5, 6)), pads=(1, 0, 2, 1))],
    "winograd_output": lambda b: [b.winograd_output(b.input("m", (16, 6, 3)), b.const(rand((3,)), name="bias"),
                                                    shape=(1, 3, 5, 4))],
    "fused": lambda b: [b.fused(b.input("x", (2, 3)), b.const(rand((3,)), name="bias"), body=_add_gelu_body())],
    # ops added for ONNX import
    "log": _unary("log"),
    "pow": _binary("pow"),
    **{op: _binary(op, "i32") for op in ("equal", "less", "greater")},
    "logical_and": _binary("logical_and", "bool"),
    "logical_not": lambda b: [b.logical_not(b.input("x", (2, 3), "bool"))],
    "isnan": _unary("isnan"),
    "where": lambda b: [b.where(b.input("c", (2, 1), "bool"), b.input("x", (2, 3)), b.input("y", (3,)))],
    "expand": lambda b: [b.expand(b.input("x", (3, 1)), shape=(2, 1, 4))],
    "gather_elements": lambda b: [b.gather_elements(b.input("x", (3, 4)),
                                                    b.const(np.array([[0, -1], [2, 1]]), name="ids"), axis=1)],
    "rope": lambda b: [b.rope(b.input("x", (1, 2, 4)), b.input("p", (1,), "i64"), theta=500.0, style="interleaved")],
    "swiglu": lambda b: [b.swiglu(b.input("gt", (2, 3)), b.input("up", (2, 3)))],
    "topk": lambda b: list(b.topk(b.input("x", (2, 5)), k=2)),
    "attention_decode": lambda b: list(b.attention_decode(
        b.input("q", (4, 2)), b.input("kn", (2, 2)), b.input("vn", (2, 2)), b.input("kc", (2, 3, 2)),
        b.input("vc", (2, 3, 2)), b.const(np.array([1]), name="pos"))),
    "attention_merge": lambda b: [b.attention_merge(b.attention_decode(
        b.input("q", (4, 2)), b.input("kn", (2, 2)), b.input("vn", (2, 2)), b.input("kc", (2, 3, 2), "i8"),
        b.input("vc", (2, 3, 2), "i8"), b.const(np.array([1]), name="pos"), b.input("ks", (2, 3)),
        b.input("vs", (2, 3)), splits=2)[0], dtype="f32")],
    "moe": lambda b: [b.moe(b.input("x", (1, 2)), b.input("rw", (2, 3)), b.input("w1", (3, 2, 4)),
                            b.input("w3", (3, 2, 4)), b.input("w2", (3, 4, 2)), k=2)],
    "matmul_sparse_input": lambda b: [b.matmul_sparse_input(b.input("a", (2, 3)), b.input("w", (3, 4)))],
}


def test_op_table_covers_every_registered_op():
    missing = sorted(set(OPS) - set(OP_CASES))
    assert not missing, f"ops without a text round-trip case in tests/test_ir_text.py: {missing}"
    assert not set(OP_CASES) - set(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_roundtrips(op):
    b = GraphBuilder(f"t_{op}")
    g = b.output(*OP_CASES[op](b))
    assert any(n.op == op for n in g.nodes)
    s = str(g)
    assert re.search(rf"= {op}[ (]", s), s
    g2 = roundtrip(g)
    # the parsed graph means the same thing
    inputs = {v.name: rand(v.shape, v.dtype.name) for v in g.inputs}
    same_outputs(g, g2, inputs)


def test_every_non_default_attribute_is_printed():
    """Each case above sets its attributes away from the defaults, so each appears in the text."""
    for op, build in OP_CASES.items():
        b = GraphBuilder()
        g = b.output(*build(b))
        for n in g.nodes:
            if n.op == op and n.op != "const":
                for k, a in OPS[op].attrs.items():
                    if n.attrs[k] != a.default:
                        assert f"{k}=" in str(g), (op, k)


# --- attributes of every kind ---------------------------------------------------------------

@pytest.fixture
def test_ops(monkeypatch):
    """Two ops that exist only in these tests: one with an attribute of every
    kind, one with two results."""
    kinds = {"i": Attr("int", 0), "f": Attr("float", 0.0), "b": Attr("bool", False), "s": Attr("str", ""),
             "ii": Attr("ints", ()), "ff": Attr("floats", ()), "d": Attr("dtype", dt.f32), "req": Attr("int")}
    monkeypatch.setitem(OPS, "t_attrs", OpDef("t_attrs", ("x",), 0, kinds, lambda x, **a: [x],
                                              lambda x, **a: [x]))

    def split_infer(x):
        return [TensorType(x.dtype, (x.shape[0] - 1,)), TensorType(x.dtype, (1,))]

    monkeypatch.setitem(OPS, "t_split", OpDef("t_split", ("x",), 0, {}, split_infer,
                                              lambda x: [x[:-1].copy(), x[-1:].copy()]))


@pytest.mark.parametrize("attrs", [
    dict(req=0),
    dict(req=-3, i=2**40, f=1e-300, b=True, s="tanh", ii=(1, -1, 0), ff=(0.5, -1e20), d="i4"),
    dict(req=1, f=float("inf"), ff=(float("-inf"), 0.1 + 0.2, -0.0)),
    dict(req=1, f=-0.0, d="bool", s='quote " back \\ newline \n tab \t unicode é ∑ #not a comment'),
    dict(req=1, s="true", ii=(), ff=()),
])
def test_attribute_kinds_roundtrip(test_ops, attrs):
    b = GraphBuilder()
    g = b.output(b.op("t_attrs", b.input("x", (2,)), **attrs))
    g2 = roundtrip(g)
    got = g2.nodes[0].attrs
    for k, v in attrs.items():
        want = OPS["t_attrs"].attrs[k].normalize(k, v)
        assert got[k] == want and type(got[k]) is type(want), (k, got[k], want)
        if isinstance(want, float):
            assert math.copysign(1, got[k]) == math.copysign(1, want)  # -0.0 survives
    assert type(got["f"]) is float and type(got["b"]) is bool and got["d"] in dt.ALL


def test_nan_float_attribute(test_ops):
    b = GraphBuilder()
    g = b.output(b.op("t_attrs", b.input("x", (2,)), req=0, f=float("nan")))
    g2 = sqk.parse_ir(str(g))
    assert math.isnan(g2.nodes[0].attrs["f"]) and str(g2) == str(g)


def test_multi_result_node(test_ops):
    b = GraphBuilder("split")
    head, tail = b.op("t_split", b.input("x", (5,)))
    g = b.output(b.neg(tail), head)
    s = str(g)
    assert "%0, %1 = t_split(%x) : f32[4], f32[1]" in s
    assert ") -> (f32[1], f32[4]) {" in s
    roundtrip(g)


# --- every dtype, with awkward values ------------------------------------------------------

F16_SPECIAL = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 2.0 ** -24, -(2.0 ** -24), 2.0 ** -14 - 2.0 ** -24,
                        6.1e-5, 65504.0, -65504.0, 0.1, 1 / 3, 1.0009765625], np.float16)
F32_SPECIAL = np.array([np.inf, -np.inf, np.nan, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38,
                        0.1, 1 / 3, 16777217.0, 1e20], np.float32)
VALUES = {
    "f32": F32_SPECIAL,
    "f16": F16_SPECIAL,
    "i64": np.array([-2 ** 63, 2 ** 63 - 1, 0, -1, 10 ** 15], np.int64),
    "i32": np.array([-2 ** 31, 2 ** 31 - 1, 0, -7], np.int32),
    "i8": np.array([-128, 127, 0, -1], np.int8),
    "u8": np.array([0, 255, 128, 7], np.uint8),
    "bool": np.array([True, False, False, True, True], np.bool_),
    "i4": np.arange(-8, 8, dtype=np.int8),
}


def test_values_table_covers_every_dtype():
    assert set(VALUES) == set(dt.BY_NAME) == {d.name for d in dt.ALL}


def bits(a: np.ndarray) -> bytes:
    return a.tobytes()


@pytest.mark.parametrize("inline_limit", [None, 2])  # inline literals, and @name references
@pytest.mark.parametrize("name", sorted(VALUES))
def test_dtype_constants_roundtrip_exactly(name, inline_limit):
    d = dt.BY_NAME[name]
    vals = VALUES[name]
    b = GraphBuilder(f"c_{name}")
    c = b.const(vals, dtype=name, name="c")
    r = b.reshape(c, shape=(1, -1))
    if d in dt.IO:
        x = b.input("x", (3, 2), name)
        outs = [c, b.transpose(x), r]
    else:  # an i4 value cannot leave the graph: keep it internal
        outs = [b.input("x", (2,))]
    g = b.output(*outs)
    s = g.to_text(inline_limit)
    assert ("@c " in s) == (inline_limit is not None)
    g2 = roundtrip(g, inline_limit=inline_limit)
    got = g2.nodes[0].attrs["value"]
    assert got.dtype == d.np_dtype and got.shape == vals.shape
    if d.is_float:
        nan = np.isnan(vals)
        assert np.array_equal(np.isnan(got), nan)
        assert bits(got[~nan]) == bits(vals[~nan])  # bit-exact, -0.0 and subnormals included
    else:
        assert bits(got) == bits(vals.astype(d.np_dtype))


def test_float_literals_parse_to_the_nearest_value():
    text = """graph @g() -> (f16[5], f32[3]) {
  %a = const [1e-8, 65519.9, -inf, nan, 0.1] : f16[5]
  %b = const [-0.0, 1, 0.1] : f32[3]
  return %a, %b
}
"""
    g = sqk.parse_ir(text)
    a, c = (n.attrs["value"] for n in g.nodes)
    assert bits(a[:3]) == bits(np.array([0.0, 65504, -np.inf], np.float16)) and np.isnan(a[3])
    assert a[4] == np.float16(0.1)
    assert np.signbit(c[0]) and c[1] == 1.0 and c[2] == np.float32(0.1)
    assert "%b = const [-0.0, 1.0, 0.1] : f32[3]" in str(g)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1, 1, 1)])
def test_scalar_and_empty_constants(shape):
    b = GraphBuilder()
    c = b.const(np.full(shape, 2.5, np.float32))
    g = b.output(b.add(c, b.input("x", shape)))
    assert "[]" in str(g) or "[2.5]" in str(g)
    roundtrip(g)


# --- graphs ---------------------------------------------------------------------------------

def test_multi_output_graph():
    b = GraphBuilder("multi")
    x = b.input("x", (2, 3))
    y = b.input("ids", (4,), "i64")
    e = b.exp(x)
    g = b.output(e, y, x, e)  # outputs may repeat and may be inputs
    s = str(g)
    assert ") -> (f32[2,3], i64[4], f32[2,3], f32[2,3]) {" in s
    assert "  return %0, %ids, %x, %0\n" in s
    g2 = roundtrip(g)
    assert len(g2.outputs) == 4 and g2.outputs[0] is g2.outputs[3] and g2.outputs[2] is g2.inputs[0]


def test_graph_without_inputs():
    b = GraphBuilder("noin")
    g = b.output(b.neg(b.const(np.ones(3, np.float32))))
    assert str(g).startswith("graph @noin() -> f32[3] {")
    roundtrip(g)


def test_canonical_text_is_stable():
    text = """graph @mlp(%x: f32[1,4]) -> f32[1,3] {
  %b = const [0.5, -1.0, 2.0] : f32[3]
  %w = const @w : f32[4,3]
  %0 = matmul(%x, %w) : f32[1,3]
  %1 = add(%0, %b) : f32[1,3]
  %2 = gelu(%1) {approximate="tanh"} : f32[1,3]
  %3 = reduce_sum(%2) {axes=[0], keepdims=true} : f32[1,3]
  return %3
}
"""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    g = sqk.parse_ir(text, {"w": w})
    assert str(g.to_text(inline_limit=4)) == text
    assert sqk.parse_ir(text, {"w": w}) == g


def test_comments_blank_lines_and_line_breaks_are_ignored():
    text = """# a comment
graph @g(%x: f32[2],
         %y: f32[2]) -> f32[2] {   # trailing comment

  %s = add(%x,
           %y) : f32[2]
  return %s
}"""
    g = sqk.parse_ir(text)
    assert str(g) == "graph @g(%x: f32[2], %y: f32[2]) -> f32[2] {\n  %s = add(%x, %y) : f32[2]\n  return %s\n}\n"


# --- large constants and the side table ---------------------------------------------------

def big_graph():
    b = GraphBuilder("big")
    x = b.input("x", (2, 32))
    w = b.const(rand((32, 8)), name="w")
    q = b.const(np.tile(np.arange(-8, 8, dtype=np.int8), 4), dtype="i4", name="q4")
    h = b.const(rand((20,), "f16"), name="h")
    small = b.const(np.array([1.0, 2.0], np.float16), name="small")
    b.reshape(q, shape=(8, 8))
    y = b.matmul(x, w)
    return b.output(y, b.add(h, b.reshape(b.cast(b.reduce_sum(y), to="f16"), shape=(1,))), small)


def test_large_constants_print_as_references():
    g = big_graph()
    s = str(g)
    assert "%w = const @w : f32[32,8]" in s
    assert "%q4 = const @q4 : i4[64]" in s
    assert "%small = const [1.0, 2.0] : f16[2]" in s
    assert set(g.constants) == {"w", "q4", "h", "small"}
    with pytest.raises(ParseError, match=r"line 2, column 14: constant @w is not in the side table"):
        sqk.parse_ir(s)
    roundtrip(g)
    # the parsed graph reads the side-table data
    g2 = sqk.parse_ir(s, g.constants)
    assert np.array_equal(g2.constants["w"], g.constants["w"])


def test_side_table_array_must_match_the_type():
    g = big_graph()
    consts = dict(g.constants, w=g.constants["w"].astype(np.float64))
    with pytest.raises(ParseError, match=r"line 2, column 14: constant %w: side-table array is float64\[32, 8\], "
                                         r"type says f32\[32,8\]"):
        sqk.parse_ir(str(g), consts)
    consts = dict(g.constants, q4=np.full(64, 9, np.int8))
    with pytest.raises(ParseError, match=r"i4 values must lie in \[-8, 7\]"):
        sqk.parse_ir(str(g), consts)


def test_save_and_load_ir(tmp_path):
    g = big_graph()
    path = tmp_path / "model.sqkir"
    sqk.save_ir(g, str(path))
    assert path.read_text() == str(g)
    with np.load(f"{path}.npz") as z:
        assert sorted(z.files) == ["h", "q4", "w"]  # only what the text references
    g2 = sqk.load_ir(str(path))
    assert g2 == g
    x = rand((2, 32))
    same_outputs(g, g2, {"x": x})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.sqkir", "model.sqkir.npz"]  # no temp files left


def test_save_ir_without_large_constants_writes_no_side_table(tmp_path):
    b = GraphBuilder()
    g = b.output(b.neg(b.input("x", (3,))))
    sqk.save_ir(g, str(tmp_path / "g.sqkir"))
    assert [p.name for p in tmp_path.iterdir()] == ["g.sqkir"]
    assert sqk.load_ir(str(tmp_path / "g.sqkir")) == g


@pytest.mark.parametrize("cname", ["file", "allow_pickle", "arr_0", "x.1"])
def test_save_ir_constant_names_that_clash_with_numpy(tmp_path, cname):
    """Regression: np.savez(f, **consts) broke on a constant named like one of its parameters."""
    b = GraphBuilder()
    c = b.const(rand((40,)), name=cname)
    g = b.output(b.add(b.input("x", (40,)), c))
    sqk.save_ir(g, str(tmp_path / "g.sqkir"))
    assert sqk.load_ir(str(tmp_path / "g.sqkir")) == g


def test_load_ir_without_its_side_table(tmp_path):
    g = big_graph()
    sqk.save_ir(g, str(tmp_path / "m.sqkir"))
    (tmp_path / "m.sqkir.npz").unlink()
    with pytest.raises(ParseError, match=r"constant @w is not in the side table.*\.npz"):
        sqk.load_ir(str(tmp_path / "m.sqkir"))



def test_load_ir_with_a_damaged_side_table(tmp_path):
    """A truncated .npz, or one holding a pickled object array: an IRError naming the file."""
    g = big_graph()
    path = str(tmp_path / "m.sqkir")
    sqk.save_ir(g, path)
    data = (tmp_path / "m.sqkir.npz").read_bytes()
    (tmp_path / "m.sqkir.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(IRError, match=r"m\.sqkir\.npz: cannot read the constants beside the IR"):
        sqk.load_ir(path)
    np.savez(tmp_path / "m.sqkir.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(IRError, match=r"m\.sqkir\.npz: cannot read the constants .*allow_pickle"):
        sqk.load_ir(path)

# --- structural equality ----------------------------------------------------------------------

def chain(names, input_name="x", gname="g", const=1.0):
    b = GraphBuilder(gname)
    x = b.input(input_name, (2,))
    c = b.const(np.array([const, 2.0], np.float32), name=names[0])
    y = b.mul(b.add(x, c, name=names[1]), c, name=names[2])
    return b.output(y)


def test_equality_ignores_value_names():
    a = chain(["c", "s", "p"])
    c = chain(["weights", "sum", "prod"])
    assert str(a) != str(c)
    assert a == c
    assert sqk.parse_ir(str(c)) == a


def test_equality_sees_structure_types_data_and_api_names():
    a = chain(["c", "s", "p"])
    assert a != chain(["c", "s", "p"], input_name="y")  # input names are the calling API
    assert a != chain(["c", "s", "p"], gname="h")
    assert a != chain(["c", "s", "p"], const=1.5)
    assert a != chain(["c", "s", "p"], const=np.nan)
    assert chain(["c", "s", "p"], const=np.nan) == chain(["k", "s", "p"], const=np.nan)  # NaN == NaN
    # -0.0 and 0.0 are different constants (1/x tells them apart)
    assert chain(["c", "s", "p"], const=-0.0) != chain(["c", "s", "p"], const=0.0)
    b = GraphBuilder("g")
    x = b.input("x", (2,))
    c = b.const(np.array([1.0, 2.0], np.float32), name="c")
    other = b.output(b.mul(b.add(c, x), c))  # operands swapped
    assert a != other
    assert (a == 3) is False


def test_equality_with_an_input_named_like_a_canonical_number():
    """Regression: with an input called "0" the canonical text confused it with node 0."""
    def g(reuse_input):
        b = GraphBuilder()
        x = b.input("0", (2,))
        n0 = b.neg(x)
        return b.output(b.add(x, x) if reuse_input else b.add(n0, n0))

    assert g(True) != g(False)
    assert g(True) == g(True)
    roundtrip(g(False))


# --- parse errors: line and column ------------------------------------------------------------

GOOD = """graph @g(%x: f32[2,3]) -> f32[2,3] {
  %0 = neg(%x) : f32[2,3]
  %1 = softmax(%0) {axis=1} : f32[2,3]
  return %1
}
"""


def test_good_text_parses():
    assert str(sqk.parse_ir(GOOD)) == GOOD


@pytest.mark.parametrize("old, new, line, col, message", [
    ("neg(", "negate(", 2, 8, "unknown op 'negate'"),
    ("%0 = neg(%x) : f32", "%0 = neg(%x) : f31", 2, 18, "unknown dtype 'f31'"),
    ("%x: f32[2,3]) ->", "%x: float[2,3]) ->", 1, 14, "unknown dtype 'float'"),
    ("neg(%x)", "neg(%y)", 2, 12, "use of undefined value %y"),
    ("return %1", "return %2", 4, 10, "use of undefined value %2"),
    ("%1 = softmax(%0)", "%0 = softmax(%0)", 3, 3, "value %0 is defined twice"),
    ("%0 = neg(%x)", "%x = neg(%x)", 2, 3, "value %x is defined twice"),
    ("neg(%x)", "neg(%x", 2, 15, "expected ',' or ')', found ':'"),
    ("{axis=1}", "{axis=1", 3, 28, "expected ',' or '}', found ':'"),
    ("f32[2,3]) ->", "f32[2,3 ->", 1, 22, "expected ',' or ']', found '->'"),
    ("axis=1", 'axis="one"', 3, 26, "softmax: attribute 'axis' must be int, got 'one'"),
    ("axis=1", "axis=1.5", 3, 26, "attribute 'axis' must be int, got 1.5"),
    ("axis=1", "axis=[1]", 3, 26, "attribute 'axis' must be int"),
    ("axis=1", "axes=1", 3, 21, "softmax has no attribute 'axes'; attributes: axis"),
    ("axis=1", "axis=1, axis=0", 3, 29, "attribute 'axis' is given twice"),
    ("axis=1", "axis=", 3, 26, "expected a value"),
    ("neg(%x)", "neg(%x, %x)", 2, 3, "neg takes 1 inputs (x), got 2"),
    ("neg(%x)", "neg()", 2, 3, "neg takes 1 inputs (x), got 0"),
    ("%0 = neg(%x) : f32[2,3]", "%0 = reshape(%x) : f32[2,3]", 2, 3, "reshape needs attribute 'shape'"),
    ("%0 = neg(%x)", "%0 = const @w", 2, 14, "constant @w is not in the side table"),
    ("%0 = neg(%x) : f32[2,3]", "%0 = const [1, 2] : f32[2,3]", 2, 14, "2 values for type f32[2,3] (6 elements)"),
    ("%0 = neg(%x) : f32[2,3]", "%0 = const [[1,2,3],[4,5,6]] : f32[2,3]", 2, 14, "inline constants are flat lists"),
    ("%0 = neg(%x) : f32[2,3]", "%0 = const 1.0 : f32[2,3]", 2, 14, "const needs @name or a [list]"),
    ("%0 = neg(%x) : f32[2,3]", "%0, %9 = neg(%x) : f32[2,3]", 2, 3, "2 results but 1 types"),
    ("-> f32[2,3]", "-> f16[2,3]", 1, 1, "return types f32[2,3] do not match the signature f16[2,3]"),
    ("-> f32[2,3]", "-> (f32[2,3], f32[2,3])", 1, 1, "do not match the signature f32[2,3], f32[2,3]"),
    ("f32[2,3]) ->", "f32[2,-3]) ->", 1, 20, "dimension must be a non-negative integer, got -3"),
    ("f32[2,3]) ->", "f32[2,1.5]) ->", 1, 20, "dimension must be a non-negative integer, got 1.5"),
    ("neg", "ne$g", 2, 10, "unexpected character '$'"),
    ("graph @g", "grph @g", 1, 1, "expected 'graph', found 'grph'"),
    ("graph @g", "graph g", 1, 7, "expected ref, found 'g'"),
    ("-> f32[2,3] {", "f32[2,3] {", 1, 24, "expected arrow, found 'f32'"),
    ("  return %1\n}\n", "  return %1\n}\njunk\n", 6, 1, "found 'junk'"),
    # no OverflowError, RecursionError or silent inf: limits named at the fault
    ("axis=1", "axis=inf", 3, 26, "attribute 'axis' must be int, got inf"),
    ("axis=1", 'axis="\\x"', 3, 26, 'bad string literal "\\x": Invalid \\escape'),
    ("axis=1", "axis=[1, 1e999]", 3, 30, "number 1e999 is beyond the float range (write inf for infinity)"),
    ("axis=1", "axis=99999999999999999999", 3, 26, "integer 99999999999999999999 is beyond int64"),
    ("axis=1", "axis=" + "[" * 2000, 3, 26 + 64, "lists and graphs nested more than 64 deep"),
    ("f32[2,3]) ->", "f32[2,9223372036854775808]) ->", 1, 14,
     "dimension 9223372036854775808 in shape (2, 9223372036854775808) is beyond int64"),
    ("f32[2,3]) ->", "f32[2,4611686018427387904]) ->", 1, 14,
     "f32[2,4611686018427387904] holds 9223372036854775808 elements (36893488147419103232 bytes), beyond int64"),
    ("f32[2,3]) ->", "f32[2,2305843009213693952]) ->", 1, 14,
     "4611686018427387904 elements (18446744073709551616 bytes), beyond int64"),
])
def test_parse_error_position(old, new, line, col, message):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    with pytest.raises(ParseError) as e:
        sqk.parse_ir(text)
    assert (e.value.line, e.value.col) == (line, col), str(e.value)
    assert str(e.value).startswith(f"line {line}, column {col}: "), str(e.value)
    assert message in str(e.value)
    assert isinstance(e.value, IRError)


@pytest.mark.parametrize("literal, dtype, message", [
    ("[1.5]", "i32[1]", "1.5 is not a value of dtype i32"),
    ("[2]", "bool[1]", "2 is not a value of dtype bool"),
    ("[true]", "f32[1]", "True is not a value of dtype f32"),
    ("[1]", "bool[1]", "1 is not a value of dtype bool"),
    ('["a"]', "f32[1]", "'a' is not a value of dtype f32"),
    ("[x]", "f32[1]", "'x' is not a value of dtype f32"),
    ("[300]", "i8[1]", "300 out of bounds for int8"),
    ("[-1]", "u8[1]", "-1 out of bounds for uint8"),
    ("[8]", "i4[1]", "i4 values must lie in [-8, 7]"),
    ("[-9]", "i4[1]", "i4 values must lie in [-8, 7]"),
    ("[1e308]", "f32[1]", "1e+308 is beyond the range of f32 (largest 3.4028235e+38; write inf for infinity)"),
    ("[1, -3.5e38]", "f32[2]", "-3.5e+38 is beyond the range of f32"),
    ("[70000.0]", "f16[1]", "70000.0 is beyond the range of f16 (largest 65504; write inf for infinity)"),
    ("[99999999999999999999]", "i64[1]", None),   # the literal itself: line 2, column 15
])
def test_bad_constant_values(literal, dtype, message):
    """No silent conversion of an inline literal to the declared dtype."""
    text = f"graph @g(%x: f32[1]) -> f32[1] {{\n  %c = const {literal} : {dtype}\n  return %x\n}}\n"
    with pytest.raises(ParseError) as e:
        sqk.parse_ir(text)
    if message is None:
        assert str(e.value) == "line 2, column 15: integer 99999999999999999999 is beyond int64"
        return
    assert str(e.value).startswith("line 2, column 14: constant %c: "), str(e.value)
    assert message in str(e.value)


def test_float_constants_at_the_edge_of_their_range():
    """inf written as inf is a value; the largest finite value, and spellings that
    round to it (not to inf), are too."""
    for lit, d, want in [("[inf, -inf, 3.4028235e+38]", "f32", [np.inf, -np.inf, np.finfo(np.float32).max]),
                         ("[65519.0, -inf]", "f16", [65504.0, -np.inf])]:
        g = sqk.parse_ir(f"graph @g() -> {d}[{len(want)}] {{\n  %c = const {lit} : {d}[{len(want)}]\n  return %c\n}}\n")
        np.testing.assert_array_equal(g.constants["c"], np.array(want, dt.BY_NAME[d].np_dtype))


def test_reproducers_of_overflow_and_recursion():
    """The issue's cases: transpose {perm=[1, 1e999]} and a 2,000-deep [ are
    ParseErrors; the builder refuses an infinite axis and sizes beyond int64."""
    text = "graph @g(%x: f32[2,3]) -> f32[3,2] {\n  %0 = transpose(%x) {perm=[1, 1e999]} : f32[3,2]\n  return %0\n}\n"
    with pytest.raises(ParseError, match="line 2, column 32: number 1e999 is beyond the float range"):
        sqk.parse_ir(text)
    with pytest.raises(ParseError, match="nested more than 64 deep"):
        sqk.parse_ir(text.replace("[1, 1e999]", "[" * 2000 + "]" * 2000))
    b = GraphBuilder("g")
    x = b.input("x", (2, 3))
    with pytest.raises(IRError, match="attribute 'axis' must be int, got inf"):
        b.softmax(x, axis=math.inf)
    with pytest.raises(IRError, match="attribute 'perm' must be ints, got .* beyond int64"):
        b.transpose(x, perm=(1, 1 << 64))
    with pytest.raises(IRError, match="dimension 9223372036854775808 in shape"):
        b.input("y", (1 << 63,))
    with pytest.raises(IRError, match=r"i4\[4294967296,4294967296,4294967296\] holds .* beyond int64"):
        TensorType(dt.i4, (1 << 32,) * 3)


@pytest.mark.parametrize("upto", ["", "graph", "graph @g(%x:", "graph @g(%x: f32[2,", "-> f32[2,3] {\n",
                                  "neg(%x)", "%1 = softmax(%0) {", "{axis=1} :", "return", "return %1\n"])
def test_truncated_text(upto):
    text = GOOD[:GOOD.index(upto) + len(upto)]
    with pytest.raises(ParseError, match="found end of input") as e:
        sqk.parse_ir(text)
    lines = text.split("\n")
    # the error points at the end of the text
    assert (e.value.line, e.value.col) == (len(lines), len(lines[-1]) + 1)


def test_type_that_contradicts_inference_is_a_verify_error():
    text = GOOD.replace("%0 = neg(%x) : f32[2,3]", "%0 = neg(%x) : f32[3,2]").replace(
        "%1 = softmax(%0) {axis=1} : f32[2,3]", "%1 = softmax(%x) {axis=1} : f32[2,3]")
    with pytest.raises(VerifyError) as e:
        sqk.parse_ir(text)
    msg = str(e.value)
    assert "node 0 (%0 = neg)" in msg and "f32[3,2]" in msg and "f32[2,3]" in msg
    text = GOOD.replace("%0 = neg(%x) : f32[2,3]", "%0 = neg(%x) : f16[2,3]")
    with pytest.raises(VerifyError, match=r"node 0 \(%0 = neg\): result %0 has type f16\[2,3\], but the op gives f32\[2,3\]"):
        sqk.parse_ir(text)


def test_model_input_of_dtype_i4_is_refused():
    with pytest.raises(VerifyError, match=r"graph input %x: dtype i4 cannot be a model input"):
        sqk.parse_ir(GOOD.replace("%x: f32[2,3]", "%x: i4[2,3]"))


# --- random graphs ------------------------------------------------------------------------------

FLOAT_POOL = [0.0, -0.0, 1.0, -1.5, 0.1, 1e-30, 3e38, np.inf, -np.inf, np.nan, 6e-8, 65504.0]


@st.composite
def constants(draw, shape, d):
    n = int(np.prod(shape, dtype=np.int64))
    if d.is_float:
        vals = draw(st.lists(st.one_of(st.sampled_from(FLOAT_POOL),
                                       st.floats(width=16 if d is dt.f16 else 32)), min_size=n, max_size=n))
    elif d is dt.bool_:
        vals = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    else:
        lo, hi = (-8, 7) if d is dt.i4 else (np.iinfo(d.np_dtype).min, np.iinfo(d.np_dtype).max)
        vals = draw(st.lists(st.integers(int(lo), int(hi)), min_size=n, max_size=n))
    with np.errstate(over="ignore"):
        return np.array(vals, dtype=np.float64 if d.is_float else object).astype(d.np_dtype).reshape(shape)


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@st.composite
def random_graphs(draw):
    b = GraphBuilder(draw(st.sampled_from(["g", "model.v2", "_x"])))
    pool = []
    for i in range(draw(st.integers(0, 2))):
        pool.append(b.input(f"in{i}", draw(shapes), draw(st.sampled_from(dt.FLOATS * 3 + dt.IO))))
    for _ in range(draw(st.integers(1, 2))):
        d = draw(st.sampled_from(dt.FLOATS * 2 + dt.ALL))
        shape = draw(shapes)
        pool.append(b.const(draw(constants(shape, d)), dtype=d.name))
    for _ in range(draw(st.integers(1, 10))):
        x = pool[-1] if draw(st.booleans()) else draw(st.sampled_from(pool))  # mostly chains
        ok = x.dtype in dt.NUMERIC
        fl = x.dtype in dt.FLOATS
        r = x.type.rank
        kinds = ["reshape", "transpose"] + ["unary", "binary", "reduce"] * ok + ["cast"] * (x.dtype in dt.IO) \
            + ["matmul"] * (fl and r >= 2) + ["softmax"] * (fl and r > 0) + ["slice", "concat"] * (r > 0)
        kind = draw(st.sampled_from(kinds))
        try:
            if kind == "unary":
                op = draw(st.sampled_from(["neg", "relu", "exp", "sqrt", "tanh", "erf", "sigmoid", "silu", "rsqrt"]
                                          if fl else ["relu", "neg"] if x.dtype is not dt.u8 else ["relu"]))
                y = getattr(b, op)(x)
            elif kind == "binary":
                # a second operand that broadcasts: drop leading dims and set some dims to 1
                k = draw(st.integers(0, x.type.rank))
                shape = tuple(1 if draw(st.booleans()) else s for s in x.shape[k:])
                other = b.const(draw(constants(shape, x.dtype)))
                a, c = (x, other) if draw(st.booleans()) else (other, x)
                y = getattr(b, draw(st.sampled_from(["add", "sub", "mul", "max", "min"] + (["div"] if fl else []))))(a, c)
            elif kind == "reshape":
                shape = draw(st.sampled_from([(-1,), (x.type.size,), (1, x.type.size, 1)]
                                             + ([(x.shape[0], -1)] if x.type.rank and x.shape[0] else [])))
                y = b.reshape(x, shape=shape)
            elif kind == "transpose":
                y = b.transpose(x, perm=tuple(draw(st.permutations(range(x.type.rank)))))
            elif kind == "reduce":
                axes = draw(st.lists(st.integers(-r, r - 1), max_size=r, unique_by=lambda a: a % r)) if r else []
                op = draw(st.sampled_from(["reduce_sum", "reduce_max"] + (["reduce_mean"] if fl else [])))
                if op == "reduce_max" and any(x.shape[a] == 0 for a in (axes or range(r))):
                    op = "reduce_sum"
                y = getattr(b, op)(x, axes=tuple(axes), keepdims=draw(st.booleans()))
            elif kind == "matmul":
                w = b.const(draw(constants((x.shape[-1], draw(st.integers(0, 3))), x.dtype)))
                y = b.matmul(x, w)
            elif kind == "cast":
                y = b.cast(x, to=draw(st.sampled_from(dt.IO)))
            elif kind == "softmax":
                y = b.softmax(x, axis=draw(st.integers(-x.type.rank, x.type.rank - 1)))
            elif kind == "slice":
                y = b.slice(x, starts=(draw(st.integers(-5, 5)),), ends=(draw(st.integers(-5, 5)),),
                            axes=(draw(st.integers(0, x.type.rank - 1)),), steps=(draw(st.sampled_from([1, 2, -1])),))
            else:
                y = b.concat(x, x, axis=draw(st.integers(-x.type.rank, x.type.rank - 1)))
        except IRError as e:  # the strategy only builds valid graphs
            raise AssertionError(f"strategy built an invalid {kind}: {e}")
        pool.append(y)
    outs = [v for v in pool if v.dtype in dt.IO] or [b.input("extra", (1,))]
    picks = draw(st.lists(st.sampled_from(outs), min_size=1, max_size=3))
    return b.output(*picks)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.sampled_from([0, 4, 16, None]))
def test_random_graphs_roundtrip(g, inline_limit):
    s = g.to_text(inline_limit)
    note(g.to_text(None))
    g2 = sqk.parse_ir(s, g.constants)
    assert g2 == g
    assert g2.to_text(inline_limit) == s
    assert str(sqk.parse_ir(str(g2), g2.constants)) == str(g)


# --- fuzzing: mutated texts of every op give a graph or an IRError, nothing else -------------

FUZZ_PIECES = ["[", "]", "{", "}", "(", ")", ",", ":", "=", "->", "%0", "%x", "@w", "graph", "graph @r() -> f32[1] {",
               "return", "inf", "-inf", "nan", "1e999", "-1", "0", "1.5", "9223372036854775808", "4611686018427387904",
               "99999999999999999999", '"s"', '"\\u0000"', '"\\x"', '"\\u12"', '"\\ud800"', "true", "f32", "i4",
               "bool", "i64[3]", "\n", " ", "#", "\\", "\x00", "é", "١"]


def _op_texts():
    texts = {}
    for op, build in sorted(OP_CASES.items()):
        b = GraphBuilder(f"t_{op}")
        texts[op] = b.output(*build(b)).to_text(inline_limit=None)
    return texts


OP_TEXTS = _op_texts()

edit = st.tuples(st.sampled_from(["delete", "insert", "replace", "copy", "value"]), st.integers(0, 1 << 16),
                 st.integers(0, 1 << 16), st.integers(1, 24), st.sampled_from(FUZZ_PIECES))


def mutate(text: str, edits) -> str:
    s = text
    for kind, i, j, n, piece in edits:
        i, j = i % (len(s) + 1), j % (len(s) + 1)
        if kind == "delete":
            s = s[:i] + s[i + n:]
        elif kind == "insert":
            s = s[:i] + piece + s[i:]
        elif kind == "replace":
            s = s[:i] + piece + s[i + 1:]
        elif kind == "value":   # an attribute's value (after "name=") becomes the piece
            at = [m.end() for m in re.finditer(r"\w=", s)]
            if at:
                a = at[i % len(at)]
                end = re.compile(r"[,}\n]").search(s, a)
                s = s[:a] + piece + s[end.start() if end else len(s):]
        else:
            s = s[:i] + s[j:j + n] + s[i:]
    return s


def parses_or_ir_error(text: str):
    """parse_ir gives a graph that prints and parses back, or an IRError
    (ParseError with a line and column), never another exception."""
    note(repr(text))
    try:
        g = sqk.parse_ir(text)
    except ParseError as e:
        assert e.line >= 1 and e.col >= 1 and str(e).startswith(f"line {e.line}, column {e.col}: ")
        return
    except IRError:
        return
    assert sqk.parse_ir(g.to_text(inline_limit=None)) == g


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(OP_TEXTS)), st.lists(edit, min_size=1, max_size=4))
def test_mutated_op_texts(op, edits):
    """About 300 mutations over every op's text (OP_CASES) in the default run."""
    parses_or_ir_error(mutate(OP_TEXTS[op], edits))


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OPS))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(edit, min_size=1, max_size=8))
def test_mutated_op_texts_wide(op, edits):
    """-m slow: 400 mutations of each op's text, up to 8 edits each."""
    parses_or_ir_error(mutate(OP_TEXTS[op], edits))
