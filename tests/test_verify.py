"""The verifier and the builder: each malformed graph is refused with a
message that names the node and the problem."""
from __future__ import annotations

import re

import numpy as np
import pytest

import sqk
from sqk.ir import OPS, GraphBuilder, IRError, VerifyError, verify
from sqk.ir.graph import Graph, Node, TensorType, Value


def val(name, dtype, shape):
    return Value(name, TensorType(dtype, shape))


def node(op, inputs, outputs, **attrs):
    """A node built directly (no inference, no checks), attributes normalized."""
    return Node(op, tuple(inputs), tuple(outputs), OPS[op].normalize_attrs(attrs))


def const(name, array, dtype=None):
    arr = np.asarray(array)
    return Node("const", (), (val(name, dtype or sqk.ir.dtypes.dtype(arr.dtype), arr.shape),), {"value": arr})


def graph(inputs, nodes, outputs=None):
    return Graph("g", inputs, nodes, outputs if outputs is not None else [nodes[-1].outputs[0]])


def verify_error(g) -> str:
    with pytest.raises(VerifyError) as e:
        verify(g)
    return str(e.value)


def test_a_good_graph_verifies_and_is_returned():
    x = val("x", "f32", (2, 3))
    g = graph([x], [node("neg", [x], [val("y", "f32", (2, 3))])])
    assert verify(g) is g


# --- op errors, named by node -----------------------------------------------------------------

X = val("x", "f32", (2, 3))
I8 = val("i", "i8", (3,))


@pytest.mark.parametrize("nodes, where, problem", [
    ([const("w", np.ones((4, 5), np.float32)), node("matmul", [X, "w"], [val("y", "f32", (2, 5))])],
     "node 1 (%y = matmul)", "matmul inner dimensions differ: (2, 3) @ (4, 5) (K=3 vs 4)"),
    ([const("w", np.ones(3, np.float32)), node("matmul", [X, "w"], [val("y", "f32", (2,))])],
     "node 1 (%y = matmul)", "matmul needs rank >= 2 operands, got (2, 3) and (3,)"),
    ([const("b", np.ones(4, np.float32)), node("add", [X, "b"], [val("y", "f32", (2, 3))])],
     "node 1 (%y = add)", "shapes (2, 3) and (4,) do not broadcast"),
    ([const("b", np.ones(3, np.float16)), node("mul", [X, "b"], [val("y", "f32", (2, 3))])],
     "node 1 (%y = mul)", "inputs must share one dtype, got f32, f16"),
    ([node("softmax", [X], [val("y", "f32", (2, 3))], axis=2)],
     "node 0 (%y = softmax)", "axis 2 is out of range for rank 2"),
    ([node("reduce_sum", [X], [val("y", "f32", (2,))], axes=(-3,))],
     "node 0 (%y = reduce_sum)", "axis -3 is out of range for rank 2"),
    ([node("reduce_sum", [X], [val("y", "f32", ())], axes=(1, -1))],
     "node 0 (%y = reduce_sum)", "repeated axis in (1, -1)"),
    ([node("concat", [X, X], [val("y", "f32", (4, 3))], axis=-3)],
     "node 0 (%y = concat)", "axis -3 is out of range for rank 2"),
    ([node("reshape", [X], [val("y", "f32", (4, 2))], shape=(4, 2))],
     "node 0 (%y = reshape)", "cannot reshape (2, 3) (6 elements) to (4, 2)"),
    ([node("reshape", [X], [val("y", "f32", (6,))], shape=(-1, -1))],
     "node 0 (%y = reshape)", "bad reshape target (-1, -1)"),
    ([node("reshape", [X], [val("y", "f32", (6,))], shape=(4, -1))],
     "node 0 (%y = reshape)", "cannot reshape (2, 3) to (4, -1)"),
    ([node("transpose", [X], [val("y", "f32", (2, 2))], perm=(0, 0))],
     "node 0 (%y = transpose)", "perm (0, 0) is not a permutation of 2 dims"),
    ([node("transpose", [X], [val("y", "f32", (3, 2))], perm=(1, 0, 2))],
     "node 0 (%y = transpose)", "perm (1, 0, 2) is not a permutation of 2 dims"),
    ([node("exp", [val("i", "i32", (3,))], [val("y", "i32", (3,))])],
     "node 0 (%y = exp)", "input has dtype i32; expected one of f32, f16"),
    ([node("div", [I8, I8], [val("y", "i8", (3,))])],
     "node 0 (%y = div)", "input has dtype i8; expected one of f32, f16"),
    ([node("gelu", [X], [val("y", "f32", (2, 3))], approximate="fast")],
     "node 0 (%y = gelu)", 'approximate must be "none" or "tanh", got \'fast\''),
    ([node("gather", [X, val("i", "f32", (2,))], [val("y", "f32", (2, 3))])],
     "node 0 (%y = gather)", "ids has dtype f32; expected one of i64, i32"),
    ([node("slice", [X], [val("y", "f32", (2, 3))], starts=(0,), ends=(1,), steps=(0,))],
     "node 0 (%y = slice)", "slice: step 0"),
])
def test_op_errors_name_the_node(nodes, where, problem):
    """``nodes`` may name inputs by a string: the output of an earlier node."""
    defined = {"x": X}
    fixed = []
    for n in nodes:
        ins = tuple(defined[v] if isinstance(v, str) else v for v in n.inputs)
        fixed.append(Node(n.op, ins, n.outputs, n.attrs))
        defined.update({v.name: v for v in n.outputs})
    produced = {o for n in fixed for o in n.outputs}
    inputs = list(dict.fromkeys([X] + [v for n in fixed for v in n.inputs if v not in produced]))
    msg = verify_error(graph(inputs, fixed))
    assert msg.startswith(where + ": "), msg
    assert problem in msg, msg


@pytest.mark.parametrize("change, problem", [
    (dict(groups=3), "conv2d: groups=3 must divide C_in=4 and C_out=6"),
    (dict(groups=4), "conv2d: groups=4 must divide C_in=4 and C_out=6"),
    (dict(groups=1), "conv2d: w.shape[1]=2 must be C_in/groups = 4"),
    (dict(groups=0), "conv2d: groups=0 must divide"),
    (dict(strides=(0, 1)), "strides and dilations must be >= 1"),
    (dict(pads=(1, 1)), "pads must have 4 ints, got (1, 1)"),
])
def test_conv2d_errors(change, problem):
    x = val("x", "f32", (1, 4, 5, 5))
    w = const("w", np.ones((6, 2, 3, 3), np.float32))
    attrs = {"groups": 2, **change}
    g = graph([x], [w, node("conv2d", [x, w.outputs[0]], [val("y", "f32", (1, 6, 3, 3))], **attrs)])
    msg = verify_error(g)
    assert msg.startswith("node 1 (%y = conv2d): "), msg
    assert problem in msg, msg


def test_conv2d_bias_shape():
    x = val("x", "f32", (1, 4, 5, 5))
    w = const("w", np.ones((6, 2, 3, 3), np.float32))
    bias = const("bias", np.ones(4, np.float32))
    g = graph([x], [w, bias, node("conv2d", [x, w.outputs[0], bias.outputs[0]], [val("y", "f32", (1, 6, 3, 3))],
                                  groups=2)])
    assert "node 2 (%y = conv2d): conv2d: bias shape (4,) must be (6,)" in verify_error(g)


def test_result_type_that_contradicts_inference_names_both_types():
    msg = verify_error(graph([X], [node("neg", [X], [val("y", "f32", (3, 2))])]))
    assert msg == "node 0 (%y = neg): result %y has type f32[3,2], but the op gives f32[2,3]"
    msg = verify_error(graph([X], [node("reduce_sum", [X], [val("s", "f16", ())])]))
    assert msg == "node 0 (%s = reduce_sum): result %s has type f16[], but the op gives f32[]"


def test_wrong_arity_and_result_count():
    msg = verify_error(graph([X], [node("add", [X], [val("y", "f32", (2, 3))])]))
    assert msg == "node 0 (%y = add): add takes 2 inputs (a, b), got 1"
    msg = verify_error(graph([X], [node("neg", [X], [val("y", "f32", (2, 3)), val("z", "f32", (2, 3))])]))
    assert msg == "node 0 (%y, %z = neg): op gives 1 results, node has 2"


def test_unknown_op_and_unnormalized_attributes():
    assert verify_error(graph([X], [Node("frobnicate", (X,), (val("y", "f32", (2, 3)),), {})])) \
        == "node 0 (%y = frobnicate): unknown op 'frobnicate'"
    raw = Node("softmax", (X,), (val("y", "f32", (2, 3)),), {"axis": 1})  # complete and normalized
    assert verify(graph([X], [raw])) is not None
    raw = Node("softmax", (X,), (val("y", "f32", (2, 3)),), {})  # a default left out
    assert "node 0 (%y = softmax): attributes {} are not normalized" in verify_error(graph([X], [raw]))
    raw = Node("softmax", (X,), (val("y", "f32", (2, 3)),), {"axis": 1, "dim": 0})
    assert "node 0 (%y = softmax): softmax has no attribute dim" in verify_error(graph([X], [raw]))


# --- constants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, type_, problem", [
    (np.ones(3, np.float64), ("f32", (3,)), "data float64[3] does not match type f32[3]"),
    (np.ones((3, 1), np.float32), ("f32", (3,)), "data float32[3, 1] does not match type f32[3]"),
    (np.ones(3, np.int8), ("u8", (3,)), "data int8[3] does not match type u8[3]"),
    ([1.0, 2.0, 3.0], ("f32", (3,)), "data <class 'list'>[] does not match type f32[3]"),
    (np.array([0, 8, -1], np.int8), ("i4", (3,)), "data does not match type i4[3]: i4 values must lie in [-8, 7]"),
    (np.array([-9], np.int8), ("i4", (1,)), "i4 values must lie in [-8, 7]"),
])
def test_const_data_must_match_its_type(data, type_, problem):
    c = Node("const", (), (val("c", *type_),), {"value": data})
    msg = verify_error(graph([X], [c, node("neg", [X], [val("y", "f32", (2, 3))])]))
    assert msg.startswith("node 0 (%c = const): "), msg
    assert problem in msg, msg


def test_i4_constants_in_range_verify():
    c = Node("const", (), (val("c", "i4", (16,)),), {"value": np.arange(-8, 8, dtype=np.int8)})
    r = node("reshape", [c.outputs[0]], [val("r", "i4", (4, 4))], shape=(4, 4))
    assert verify(graph([X], [c, r, node("neg", [X], [val("y", "f32", (2, 3))])]))


def test_i4_constant_checked_again_once_writable():
    """A read-only constant is range-checked once (verify runs after every pass);
    one made writable again is checked again."""
    data = np.arange(-8, 8, dtype=np.int8)
    data.setflags(write=False)
    c = Node("const", (), (val("c", "i4", (16,)),), {"value": data})
    g = graph([X], [c, node("neg", [X], [val("y", "f32", (2, 3))])])
    assert verify(g) and verify(g)
    data.setflags(write=True)
    data[0] = 9
    assert "i4 values must lie in [-8, 7]" in verify_error(g)


# --- SSA form and the graph's interface -----------------------------------------------------------

def test_undefined_input():
    z = val("z", "f32", (2, 3))
    msg = verify_error(graph([X], [node("add", [X, z], [val("y", "f32", (2, 3))])]))
    assert msg == "node 0 (%y = add): input %z is not defined before use"


def test_use_before_definition():
    a, b = val("a", "f32", (2, 3)), val("b", "f32", (2, 3))
    msg = verify_error(graph([X], [node("neg", [a], [b]), node("neg", [X], [a])], [b]))
    assert msg == "node 0 (%b = neg): input %a is not defined before use"


def test_value_defined_twice():
    y1, y2 = val("y", "f32", (2, 3)), val("y", "f32", (2, 3))
    msg = verify_error(graph([X], [node("neg", [X], [y1]), node("exp", [y1], [y2])]))
    assert msg == "node 1 (%y = exp): value %y is defined twice"
    msg = verify_error(graph([X, val("x", "f32", (1,))], [node("neg", [X], [y1])]))
    assert msg == "graph @g input: value %x is defined twice"


def test_graph_input_of_dtype_i4():
    q = val("q", "i4", (4,))
    msg = verify_error(graph([q], [node("reshape", [q], [val("r", "i4", (2, 2))], shape=(2, 2))], [X]))
    assert msg == "graph input %q: dtype i4 cannot be a model input"


def test_graph_outputs():
    c = Node("const", (), (val("c", "i4", (2,)),), {"value": np.zeros(2, np.int8)})
    assert verify_error(graph([X], [c])) == "graph output %c: dtype i4 cannot be a model output"
    assert verify_error(graph([X], [], [val("nowhere", "f32", (1,))])) == "graph @g: output %nowhere is not defined"
    assert verify_error(graph([X], [], [])) == "graph @g has no outputs"


@pytest.mark.parametrize("gname, vname, problem", [
    ("my-model", "y", "graph name 'my-model' cannot be written in the IR text"),
    ("g", "in put", "node 0 (%in put = neg): value name 'in put' cannot be written in the IR text"),
    ("g", "", "value name '' cannot be written"),
])
def test_names_must_print(gname, vname, problem):
    g = Graph(gname, [X], [node("neg", [X], [val(vname, "f32", (2, 3))])], [])
    g.outputs = [g.nodes[0].outputs[0]]
    assert problem in verify_error(g)


def test_verified_graphs_print_and_parse_back():
    """What the verifier accepts, the parser reads back: names with '.' and digits."""
    x = val("x.0", "f32", (2, 3))
    g = Graph("model.v1", [x], [node("neg", [x], [val("1.y_", "f32", (2, 3))])], [])
    g.outputs = [g.nodes[0].outputs[0]]
    assert sqk.parse_ir(str(verify(g))) == g


# --- builder errors ---------------------------------------------------------------------------------

@pytest.fixture
def b():
    return GraphBuilder("b")


def test_builder_unknown_op(b):
    x = b.input("x", (3,))
    with pytest.raises(IRError, match=r"^unknown op 'frobnicate'$"):
        b.op("frobnicate", x)
    with pytest.raises(IRError, match="unknown op 'const'"):  # constants go through b.const
        b.op("const", x)
    with pytest.raises(AttributeError, match="GraphBuilder has no op or method 'frobnicate'"):
        b.frobnicate(x)


@pytest.mark.parametrize("call, problem", [
    (lambda b, x: b.softmax(x, axes=1), "softmax has no attribute axes; attributes: axis"),
    (lambda b, x: b.neg(x, axis=1), "neg has no attribute axis; attributes: none"),
    (lambda b, x: b.reshape(x), "reshape needs attribute 'shape'"),
    (lambda b, x: b.cast(x), "cast needs attribute 'to'"),
    (lambda b, x: b.concat(x, x), "concat needs attribute 'axis'"),
    (lambda b, x: b.slice(x, starts=(0,)), "slice needs attribute 'ends'"),
    (lambda b, x: b.softmax(x, axis="last"), "attribute 'axis' must be int, got 'last'"),
    (lambda b, x: b.softmax(x, axis=True), "attribute 'axis' must be int, got True"),
    (lambda b, x: b.reduce_sum(x, keepdims=2), "attribute 'keepdims' must be bool, got 2"),
    (lambda b, x: b.reshape(x, shape=(1.5, 4)), "attribute 'shape' must be ints, got (1.5, 4)"),
    (lambda b, x: b.reshape(x, shape=6), "attribute 'shape' must be ints, got 6"),
    (lambda b, x: b.cast(x, to="f64"), "attribute 'to' must be dtype, got 'f64'"),
    (lambda b, x: b.gelu(x, approximate=1), "attribute 'approximate' must be str, got 1"),
    (lambda b, x: b.layernorm(x, x, eps="small"), "attribute 'eps' must be float, got 'small'"),
    (lambda b, x: b.add(x), "add takes 2 inputs (a, b), got 1"),
    (lambda b, x: b.layernorm(x), "layernorm takes 2 to 3 inputs (x, scale, bias), got 1"),
    (lambda b, x: b.concat(axis=0), "concat takes at least 1 input, got 0"),
    (lambda b, x: b.neg(np.ones(6, np.float32)), "neg: inputs must be values of this builder, got ndarray"),
    (lambda b, x: b.exp(b.input("i", (6,), "i32")), "exp: input has dtype i32; expected one of f32, f16"),
    (lambda b, x: b.matmul(x, x), "matmul: matmul inner dimensions differ: (2, 3) @ (2, 3) (K=3 vs 2)"),
    (lambda b, x: b.add(x, b.const(np.ones(4, np.float32))), "add: shapes (2, 3) and (4,) do not broadcast"),
    (lambda b, x: b.transpose(x, perm=(2, 0)), "transpose: perm (2, 0) is not a permutation of 2 dims"),
])
def test_builder_op_errors(b, call, problem):
    x = b.input("x", (2, 3))
    n = len(b.nodes)
    with pytest.raises(IRError) as e:
        call(b, x)
    assert problem in str(e.value)
    assert all(nd.op == "const" for nd in b.nodes[n:])  # a refused op adds no node


def test_builder_input_errors(b):
    b.input("x", (2,))
    with pytest.raises(IRError, match="name 'x' is already used"):
        b.input("x", (3,))
    with pytest.raises(IRError, match="input 'q': dtype i4 cannot be a model input"):
        b.input("q", (4,), "i4")
    with pytest.raises(TypeError, match="unknown dtype 'f64'"):
        b.input("y", (4,), "f64")
    with pytest.raises(IRError, match=r"negative dimension in shape \(-1,\)"):
        b.input("z", (-1,))
    with pytest.raises(IRError, match="value name 'my input' cannot be written in the IR text"):
        b.input("my input", (1,))
    with pytest.raises(IRError, match="graph name 'a/b' cannot be written in the IR text"):
        GraphBuilder("a/b")
    with pytest.raises(IRError, match="value name 'w:0' cannot be written"):
        b.const(np.ones(2, np.float32), name="w:0")


def test_builder_const_errors(b):
    with pytest.raises(IRError, match=r"const %w: i4 values must lie in \[-8, 7\]"):
        b.const(np.array([1, 8]), dtype="i4", name="w")
    c = b.const(np.array([-8, 7]), dtype="i4")
    assert c.dtype.name == "i4" and c.type.nbytes == 1


def test_builder_names_are_unique(b):
    x = b.input("x", (2,))
    y = b.neg(x, name="x")  # taken: renamed, never shadowed
    z = b.neg(y, name="x")
    assert (y.name, z.name) == ("x_1", "x_2")
    g = b.output(z)
    assert sqk.parse_ir(str(g)) == g


def test_builder_output_errors(b):
    with pytest.raises(IRError, match="output\\(\\) needs at least one value"):
        b.output()
    other = GraphBuilder("other")
    foreign = other.neg(other.input("y", (2,)))
    x = b.input("x", (2,))
    with pytest.raises(VerifyError, match=re.escape("node 0 (%0 = add): input %0 is not defined before use")):
        b.output(b.add(x, foreign))
