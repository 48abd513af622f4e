"""ONNX import (compiler/frontends/onnx.py): errors before any compile work,
input shapes, folding of shape subgraphs, quantized weights to matmul_q,
Conv+BatchNormalization folding, and the ``sqk compile model.onnx`` command.
Numbers are checked against onnx's own reference evaluator."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import sqk  # noqa: E402
from sqk.compiler.cli import main  # noqa: E402
from sqk.compiler.frontends.onnx import OnnxImportError, from_onnx  # noqa: E402
from sqk.compiler.onnx_nbits import to_matmul_nbits  # noqa: E402

RNG = np.random.default_rng(0)


def model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    g = h.make_graph(nodes, "m", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset), *extra_opsets])


def vi(name, shape, t=T.FLOAT):
    return h.make_tensor_value_info(name, t, shape)


def ops_of(g):
    return [n.op for n in g.nodes if n.op != "const"]


def agree(m, feeds, rtol=2e-5, atol=1e-5, **kw):
    """Import, compile for the host, compare every output with onnx's ReferenceEvaluator."""
    g = from_onnx(m, **kw)
    mod = sqk.compile(g)
    outs = mod(**{v.name: feeds[n] for v, n in zip(g.inputs, feeds)})
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = ReferenceEvaluator(m).run(None, feeds)
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape
        np.testing.assert_allclose(o, r, rtol=rtol, atol=atol)
    return g


# --- errors --------------------------------------------------------------------------------

def test_unsupported_ops_listed_once():
    m = model([h.make_node("Add", ["x", "x"], ["a"], name="add0"),
               h.make_node("Hardmax", ["a"], ["b"], name="hm"),
               h.make_node("Foo", ["b"], ["c"], name="foo", domain="my.custom"),
               h.make_node("Relu", ["c"], ["y"], name="r")],
              [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets=[h.make_opsetid("my.custom", 3)])
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    msg = str(e.value)
    assert "Hardmax (node 'hm', opset 17)" in msg and "my.custom::Foo (node 'foo', opset 3)" in msg
    assert "Add" not in msg and "Relu" not in msg


def test_unsupported_features_listed_once():
    """Attribute-level gaps (found while converting) are collected too; nodes after them are skipped."""
    m = model([h.make_node("Resize", ["x", "", "sc"], ["r"], name="up", mode="linear"),
               h.make_node("Relu", ["r"], ["r2"], name="after"),
               h.make_node("MaxPool", ["v"], ["p"], name="pool3d", kernel_shape=[2, 2, 2]),
               h.make_node("Reshape", ["x", "shape"], ["y"], name="dyn")],
              [vi("x", [1, 1, 2, 2]), vi("v", [1, 1, 2, 2, 2]), vi("shape", [2], T.INT64)],
              [vi("r2", [1, 1, 4, 4]), vi("p", [1, 1, 1, 1, 1]), vi("y", [2, 2])],
              [nh.from_array(np.array([1, 1, 2, 2], np.float32), "sc")], opset=19)
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3, lines
    assert "Resize node 'up' (opset 19): mode='linear'" in lines[0]
    assert "MaxPool node 'pool3d' (opset 19): 3-D pooling" in lines[1]
    assert "Reshape node 'dyn' (opset 19): the target shape must be known at import time" in lines[2]
    # the shape input bound to a value makes the Reshape importable
    dyn = model([m.graph.node[3]], [vi("x", [1, 1, 2, 2]), vi("shape", [2], T.INT64)], [vi("y", [2, 2])])
    g = from_onnx(dyn, input_values={"shape": np.array([2, 2])})
    assert [v.name for v in g.inputs] == ["x"] and ops_of(g) == ["reshape"]


def test_old_opset_with_changed_definition():
    m = model([h.make_node("Relu", ["x"], ["r"], name="relu"), h.make_node("Not", ["b"], ["y"], name="not")],
              [vi("x", [2]), vi("b", [2], T.BOOL)], [vi("r", [2]), vi("y", [2], T.BOOL)], opset=6)
    with pytest.raises(OnnxImportError, match="Relu \\(node 'relu', opset 6: its definition there predates"):
        from_onnx(m)


def test_malformed_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xff\xff")
    with pytest.raises(OnnxImportError, match="malformed or truncated|invalid ONNX model"):
        from_onnx(str(bad))
    m = model([h.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [1, 64])], [vi("y", [1, 64])],
              [nh.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "w")])
    data = m.SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(OnnxImportError, match="malformed or truncated|invalid ONNX model"):
        from_onnx(str(cut))
    with pytest.raises(OnnxImportError, match="no such file"):
        from_onnx(str(tmp_path / "nope.onnx"))


def _external_saved(tmp_path):
    """(ext.onnx, w): a MatMul model whose weight w is stored in w.bin beside it."""
    w = RNG.standard_normal((32, 16)).astype(np.float32)
    m = model([h.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 32])], [vi("y", [2, 16])],
              [nh.from_array(w, "w")])
    path = str(tmp_path / "ext.onnx")
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    return path, w


def test_missing_external_data(tmp_path):
    path, w = _external_saved(tmp_path)
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    g = from_onnx(path)  # loads fine with its data beside it
    np.testing.assert_allclose(sqk.compile(g)(x=x), x @ w, rtol=1e-5, atol=1e-5)
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(OnnxImportError, match="'w.bin' .*truncated"):
        from_onnx(path)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(OnnxImportError, match="'w.bin' .*missing"):
        from_onnx(path)


def _external_model(tmp_path, **fields):
    """ext.onnx whose tensor w is stored in w.bin, its external_data entries then set to ``fields``."""
    path, _ = _external_saved(tmp_path)
    m = onnx.load(path, load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key in fields:
            e.value = fields.pop(e.key)
    m.graph.initializer[0].external_data.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in fields.items())
    onnx.save_model(m, path)
    return path


@pytest.mark.parametrize("location", ["/etc/passwd", "/no/such/file", "../w.bin", "sub/../../w.bin", "a/../w.bin",
                                      "", "C:w.bin", "\\\\host\\share"])
def test_external_data_outside_the_model_directory_is_refused(tmp_path, location):
    """Checked before anything is read or even looked up: the same message whether
    the file exists or not, and nothing about its size."""
    path = _external_model(tmp_path, location=location)
    with pytest.raises(OnnxImportError) as e:
        from_onnx(path)
    assert str(e.value) == (f"{path}: tensor 'w': external data location {location!r} is not a relative path "
                            f"inside the model's directory")


def test_external_data_symlink_out_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 4096)
    (tmp_path / "m").mkdir()
    path = _external_model(tmp_path / "m", location="link.bin")
    os.symlink(outside / "w.bin", tmp_path / "m" / "link.bin")
    with pytest.raises(OnnxImportError, match="location 'link.bin' leads outside the model's directory"):
        from_onnx(path)


@pytest.mark.parametrize("key, value", [("offset", "abc"), ("offset", "-4"), ("length", "1e3"), ("length", "")])
def test_external_data_offset_and_length_must_be_integers(tmp_path, key, value):
    path = _external_model(tmp_path, **{key: value})
    with pytest.raises(OnnxImportError, match=f"tensor 'w': external data {key} {value!r} is not a non-negative "
                                              f"integer"):
        from_onnx(path)


def test_input_shapes():
    m = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", ["batch", 8])], [vi("y", ["batch", 8])])
    assert from_onnx(m, {"batch": 3}).inputs[0].shape == (3, 8)
    assert from_onnx(m, {"x": (5, 8)}).inputs[0].shape == (5, 8)
    with pytest.raises(OnnxImportError, match="need sizes.*'x' dim 0 \\('batch'\\)"):
        from_onnx(m)
    with pytest.raises(OnnxImportError, match="conflicts with the model's dim 1 = 8"):
        from_onnx(m, {"x": (5, 9)})
    with pytest.raises(OnnxImportError, match="rank 3"):
        from_onnx(m, {"x": (1, 5, 8)})
    with pytest.raises(OnnxImportError, match="conflicts with batch=2"):
        from_onnx(m, {"x": (5, 8), "batch": 2})
    with pytest.raises(OnnxImportError, match="neither a model input"):
        from_onnx(m, {"seq": 4, "batch": 1})
    assert isinstance(OnnxImportError("x"), ValueError)
    bare = model([h.make_node("Relu", ["x"], ["y"])], [vi("x", None)], [vi("y", None)])
    with pytest.raises(OnnxImportError, match="'x' \\(no shape in the model"):
        from_onnx(bare)
    assert from_onnx(bare, {"x": (2, 2)}).outputs[0].shape == (2, 2)
    assert not bare.graph.input[0].type.tensor_type.HasField("shape")  # the caller's model is left as it was


def test_missing_onnx_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install onnx \(or, in the sqk checkout, pip install -e '\.\[onnx\]'\)"):
        sqk.from_onnx("model.onnx")


# --- import ---------------------------------------------------------------------------------

def test_shape_subgraph_folds_and_attention_block():
    """A BERT-style block with dynamic-shape plumbing (Shape -> Gather -> Unsqueeze ->
    Concat -> Reshape): it folds to constants, leaving only compute ops."""
    d, heads = 16, 2
    inits = [nh.from_array(RNG.standard_normal((d, d)).astype(np.float32) * 0.3, "wq"),
             nh.from_array(RNG.standard_normal(d).astype(np.float32), "ln_s"),
             nh.from_array(RNG.standard_normal(d).astype(np.float32), "ln_b"),
             nh.from_array(np.array(0, np.int64), "i0"), nh.from_array(np.array(1, np.int64), "i1"),
             nh.from_array(np.array([0], np.int64), "ax0"),
             nh.from_array(np.array([heads, d // heads], np.int64), "hd"),
             nh.from_array(np.array(np.sqrt(d // heads), np.float32), "scale")]
    nodes = [
        h.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], axis=-1, epsilon=1e-5),
        h.make_node("MatMul", ["ln", "wq"], ["q"]),
        h.make_node("Shape", ["q"], ["shp"]),
        h.make_node("Gather", ["shp", "i0"], ["b"], axis=0), h.make_node("Gather", ["shp", "i1"], ["s"], axis=0),
        h.make_node("Unsqueeze", ["b", "ax0"], ["bu"]), h.make_node("Unsqueeze", ["s", "ax0"], ["su"]),
        h.make_node("Concat", ["bu", "su", "hd"], ["newshape"], axis=0),
        h.make_node("Reshape", ["q", "newshape"], ["qh"]),
        h.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        h.make_node("Transpose", ["qh"], ["kt"], perm=[0, 2, 3, 1]),
        h.make_node("MatMul", ["qt", "kt"], ["att"]), h.make_node("Div", ["att", "scale"], ["atts"]),
        h.make_node("Where", ["mask", "atts", "neg"], ["attm"]),
        h.make_node("Softmax", ["attm"], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "qt"], ["ctx"]), h.make_node("Gelu", ["ctx"], ["y"]),
    ]
    inits.append(nh.from_array(np.array(-1e4, np.float32), "neg"))
    m = model(nodes, [vi("x", ["batch", "seq", d]), vi("mask", [1, 1, "seq", "seq"], T.BOOL)],
              [vi("y", ["batch", heads, "seq", d // heads])], inits, opset=20)
    x = RNG.standard_normal((2, 5, d)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))[None, None]
    g = agree(m, {"x": x, "mask": mask}, input_shapes={"batch": 2, "seq": 5})
    assert not {"gather", "concat"} & set(ops_of(g))


def test_matmul_nbits_to_matmul_q():
    k, n, group = 64, 24, 32
    q = RNG.integers(-8, 8, (k, n)).astype(np.int8)
    scales = (RNG.random((k // group, n)) * 0.1 + 0.01).astype(np.float32)
    zeros = RNG.integers(-8, 8, (k // group, n)).astype(np.int8)
    p = to_matmul_nbits(q, scales, zeros, group)
    node = h.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                       K=k, N=n, bits=4, block_size=group)
    m = model([node], [vi("x", [3, k])], [vi("y", [3, n])],
              [nh.from_array(p["B"], "B"), nh.from_array(p["scales"], "scales"),
               nh.from_array(p["zero_points"], "zp")], extra_opsets=[h.make_opsetid("com.microsoft", 1)])
    g = from_onnx(m)
    assert ops_of(g) == ["matmul_q"]
    x = RNG.standard_normal((3, k)).astype(np.float32)
    w = (q.astype(np.float32) - np.repeat(zeros, group, 0)) * np.repeat(scales, group, 0)
    np.testing.assert_allclose(sqk.compile(g)(x=x), x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", ["int8_per_column", "uint8_per_tensor", "int8_blocked", "quantize_dequantize"])
def test_dequantized_weight_to_matmul_q(qtype):
    k, n = 48, 20
    if qtype == "int8_per_column":
        wq = RNG.integers(-127, 128, (k, n)).astype(np.int8)
        scale, zp, attrs = (RNG.random(n) * 0.01 + 1e-3).astype(np.float32), None, {"axis": 1}
        opset = 19
    elif qtype == "uint8_per_tensor":
        wq = RNG.integers(0, 256, (k, n)).astype(np.uint8)
        scale, zp, attrs = np.array(0.02, np.float32), np.array(131, np.uint8), {}
        opset = 19
    elif qtype == "quantize_dequantize":  # QuantizeLinear of a constant float weight folds at import
        scale, zp, attrs = (RNG.random(n) * 0.01 + 1e-3).astype(np.float32), np.full(n, 3, np.int8), {"axis": 1}
        opset = 19
    else:
        wq = RNG.integers(-127, 128, (k, n)).astype(np.int8)
        scale = (RNG.random((k // 16, n)) * 0.01 + 1e-3).astype(np.float32)
        zp, attrs, opset = RNG.integers(-5, 5, (k // 16, n)).astype(np.int8), {"axis": 0, "block_size": 16}, 21
    inits = [nh.from_array(scale, "s")] + ([nh.from_array(zp, "zp")] if zp is not None else [])
    nodes = [h.make_node("DequantizeLinear", ["wq", "s"] + (["zp"] if zp is not None else []), ["w"], **attrs),
             h.make_node("MatMul", ["x", "w"], ["y"])]
    if qtype == "quantize_dequantize":
        inits.append(nh.from_array(RNG.standard_normal((k, n)).astype(np.float32) * 0.3, "wf"))
        nodes.insert(0, h.make_node("QuantizeLinear", ["wf", "s", "zp"], ["wq"], axis=1))
    else:
        inits.append(nh.from_array(wq, "wq"))
    m = model(nodes, [vi("x", [2, 3, k])], [vi("y", [2, 3, n])], inits, opset=opset)
    g = agree(m, {"x": RNG.standard_normal((2, 3, k)).astype(np.float32)}, rtol=1e-4, atol=1e-4)
    assert ops_of(g) == ["matmul_q"]


def test_conv_batchnorm_folds():
    c, co = 3, 4
    inits = [nh.from_array(RNG.standard_normal((co, c, 3, 3)).astype(np.float32), "w"),
             nh.from_array(RNG.standard_normal(co).astype(np.float32), "b"),
             nh.from_array(RNG.random(co).astype(np.float32) + 0.5, "g"),
             nh.from_array(RNG.standard_normal(co).astype(np.float32), "beta"),
             nh.from_array(RNG.standard_normal(co).astype(np.float32), "mean"),
             nh.from_array(RNG.random(co).astype(np.float32) + 0.5, "var")]
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             h.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
             h.make_node("HardSwish", ["bn"], ["y"])]
    m = model(nodes, [vi("x", [1, c, 9, 9])], [vi("y", [1, co, 5, 5])], inits)
    g = agree(m, {"x": RNG.standard_normal((1, c, 9, 9)).astype(np.float32)}, rtol=1e-4, atol=1e-4)
    assert ops_of(g)[0] == "conv2d" and "conv2d" not in ops_of(g)[1:] and ops_of(g).count("add") == 1


def test_pad_resize_and_slices():
    nodes = [h.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             h.make_node("Resize", ["p", "", "scales"], ["r"], mode="nearest"),
             h.make_node("Split", ["r", "split"], ["a", "b"], axis=3),
             h.make_node("Mul", ["a", "b"], ["y"])]
    inits = [nh.from_array(np.array([0, 0, 1, 2, 0, 0, 1, 2], np.int64), "pads"),
             nh.from_array(np.array([1, 1, 2, 1], np.float32), "scales"),
             nh.from_array(np.array([4, 4], np.int64), "split")]
    m = model(nodes, [vi("x", [1, 2, 3, 4])], [vi("y", [1, 2, 10, 4])], inits)
    agree(m, {"x": RNG.standard_normal((1, 2, 3, 4)).astype(np.float32)})


def test_cli_compiles_onnx(tmp_path, capsys):
    m = model([h.make_node("Gemm", ["x", "w"], ["g"], transB=1, alpha=0.5),
               h.make_node("Sigmoid", ["g"], ["y"])], [vi("x", ["n", 8])], [vi("y", ["n", 4])],
              [nh.from_array(RNG.standard_normal((4, 8)).astype(np.float32), "w")])
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    assert "w" in from_onnx(path, {"n": 2}).constants  # the transposed weight keeps its name
    out = str(tmp_path / "out.sqk")
    assert main(["compile", path, "-o", out, "--input-shape", "n=2", "--quiet"]) == 0
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(sqk.load(out)(x=x), ReferenceEvaluator(m).run(None, {"x": x})[0], rtol=1e-5,
                               atol=1e-6)
    assert main(["compile", path, "-o", out]) == 1
    assert "need sizes" in capsys.readouterr().err
    assert main(["compile", path, "-o", out, "--input-shape", "x=2x9"]) == 1
    assert "conflicts" in capsys.readouterr().err


def test_conv_and_pool_1d():
    """1-D Conv/MaxPool/AveragePool run as 2-D ops over an inserted unit dim."""
    inits = [nh.from_array(RNG.standard_normal((6, 2, 3)).astype(np.float32), "w"),
             nh.from_array(RNG.standard_normal(6).astype(np.float32), "b")]
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], auto_pad="SAME_UPPER", strides=[2], group=2),
             h.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2], pads=[1, 0], dilations=[2]),
             h.make_node("AveragePool", ["c"], ["a"], kernel_shape=[3], ceil_mode=1, strides=[2]),
             h.make_node("GlobalAveragePool", ["x"], ["g"])]
    m = model(nodes, [vi("x", [2, 4, 11])], [vi("p", None), vi("a", None), vi("g", None)], inits, opset=19)
    agree(m, {"x": RNG.standard_normal((2, 4, 11)).astype(np.float32)}, rtol=1e-5, atol=1e-5)


# --- fuzzing: mutated files and fields give OnnxImportError/IRError, nothing else -------------

def _fuzz_models():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    mlp = model([h.make_node("MatMul", ["x", "W1"], ["m1"]), h.make_node("Add", ["m1", "b1"], ["a1"]),
                 h.make_node("Relu", ["a1"], ["r1"]), h.make_node("Softmax", ["r1"], ["y"], axis=-1)],
                [vi("x", ["n", 16])], [vi("y", ["n", 12])],
                [nh.from_array(f(16, 12), "W1"), nh.from_array(f(12), "b1")])
    conv = model([h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
                  h.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2]),
                  h.make_node("Reshape", ["p", "shape"], ["r"]), h.make_node("Transpose", ["r"], ["y"], perm=[1, 0])],
                 [vi("x", [1, 3, 8, 8])], [vi("y", None)],
                 [nh.from_array(f(4, 3, 3, 3), "w"), nh.from_array(np.array([1, -1], np.int64), "shape")])
    gather = model([h.make_node("Gather", ["E", "ids"], ["e"], axis=0),
                    h.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=1),
                    h.make_node("Slice", ["m", "st", "en"], ["s"]), h.make_node("Cast", ["s"], ["y"], to=T.FLOAT16)],
                   [vi("ids", [2, 3], T.INT64)], [vi("y", None, T.FLOAT16)],
                   [nh.from_array(f(10, 6), "E"), nh.from_array(np.array([-1], np.int64), "axes"),
                    nh.from_array(np.array([0], np.int64), "st"), nh.from_array(np.array([2], np.int64), "en")],
                   opset=18)
    return [mlp, conv, gather]


FUZZ_MODELS = _fuzz_models()
FUZZ_INTS = [0, -1, 1, 2, 3, 7, -7, 100, 1 << 40, -(1 << 63), (1 << 63) - 1]


def mutate_bytes(data: bytes, rng) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        k, i = rng.random(), rng.randrange(len(b))
        if k < 0.5:
            b[i] = rng.randrange(256)
        elif k < 0.7:
            del b[i:i + rng.randint(1, 16)]
        elif k < 0.85:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def mutate_fields(m, rng):
    """A copy of ``m`` with 1-3 fields changed: attribute ints, input/output dims,
    initializer dims, dtype or data, op types, input names, the opset."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    for _ in range(rng.randint(1, 3)):
        k = rng.randrange(8)
        if k == 0:
            for a in rng.choice(g.node).attribute:
                if a.ints:
                    a.ints[rng.randrange(len(a.ints))] = rng.choice(FUZZ_INTS)
                elif a.type == onnx.AttributeProto.INT:
                    a.i = rng.choice(FUZZ_INTS)
        elif k == 1:
            for v in list(g.input) + list(g.output):
                if v.type.tensor_type.HasField("shape") and v.type.tensor_type.shape.dim:
                    d = rng.choice(v.type.tensor_type.shape.dim)
                    d.dim_value = rng.choice(FUZZ_INTS[1:])
                    if rng.random() < 0.3:
                        d.dim_param = "q"
        elif k == 2:
            t = rng.choice(g.initializer)
            if t.dims and rng.random() < 0.6:
                t.dims[rng.randrange(len(t.dims))] = rng.choice(FUZZ_INTS)
            else:
                t.data_type = rng.randrange(0, 25)
        elif k == 3:
            t = rng.choice(g.initializer)
            t.raw_data = t.raw_data[:rng.randrange(len(t.raw_data) + 1)]
        elif k == 4:
            rng.choice(g.node).op_type = rng.choice(["Relu", "MatMul", "Gather", "Reshape", "Foo", "Concat", "Expand",
                                                     "Pad", "Resize", "If", "Loop", "Split"])
        elif k == 5:
            n = rng.choice(g.node)
            n.input[rng.randrange(len(n.input))] = rng.choice(["x", "", "nope", "y", g.node[0].output[0]])
        elif k == 6:
            t = rng.choice(g.initializer)
            if t.raw_data:
                b = bytearray(t.raw_data)
                b[rng.randrange(len(b))] = rng.randrange(256)
                t.raw_data = bytes(b)
        else:
            m.opset_import[0].version = rng.choice([1, 5, 11, 13, 17, 18, 21, 23, 99, -1])
    return m


def imports_or_typed_error(tmp_path, rng):
    base = rng.choice(FUZZ_MODELS)
    if rng.random() < 0.5:
        arg = str(tmp_path / "m.onnx")
        with open(arg, "wb") as f:
            f.write(mutate_bytes(base.SerializeToString(), rng))
    else:
        arg = mutate_fields(base, rng)
    try:
        from_onnx(arg, input_shapes={"n": 2} if base is FUZZ_MODELS[0] else None)
    except (OnnxImportError, sqk.IRError):
        pass


def test_mutated_onnx_models(tmp_path):
    """600 mutations (bytes of the file, or fields) of three small models (about 2 s)."""
    import random
    rng = random.Random(0)
    for _ in range(600):
        imports_or_typed_error(tmp_path, rng)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_mutated_onnx_models_wide(tmp_path, seed):
    """-m slow: 10 x 2,000 mutations."""
    import random
    rng = random.Random(seed + 1)
    for _ in range(2000):
        imports_or_typed_error(tmp_path, rng)
