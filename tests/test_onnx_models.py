"""Real architectures through ONNX import: a BERT-style encoder (6 layers,
hidden 384, 12 heads, FFN 1536, sequence 128) and a Llama-style decoder
(RMSNorm, rotary embeddings, grouped-query attention 8/2 heads, SwiGLU;
2 layers, hidden 256, sequence 32, a plain forward without KV cache), built
by ``transformers`` from a config with random weights, exported by torch's
TorchScript ONNX exporter (benchmarks/onnx_models.py), imported with
``sqk.from_onnx`` and compiled for the host.

fp32 outputs must match onnxruntime's within 1e-4 relative (max |error| over
max |output|); int8 weights (``quantize="int8"``, per-channel) must keep the
cosine to onnxruntime's fp32 output at or above INT8_COSINE.

torch, transformers and onnxruntime are optional peers, not dependencies of
sqk: without them the tests skip.  Exports are cached under $SQK_CACHE_DIR
(default ~/.cache/sqk)/onnx-models, keyed by versions and config, so reruns
skip the export (~5 s); the compiles (~15-40 s on 2 busy cores) remain.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402

import sqk  # noqa: E402
from sqk.benchmarks.onnx_models import (BERT_CONFIG, FUSED, LLAMA_CONFIG, LLAMA_SEQ, bert_inputs,  # noqa: E402
                                        cosine, export_bert, export_llama, ort_session)

_MISSING = [p for p in ("torch", "transformers", "onnxruntime") if importlib.util.find_spec(p) is None]
needs_peers = pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} not installed (optional peers "
                                                         f"for exporting and checking real models: pip install "
                                                         f"torch transformers onnxruntime)")

FP32_RTOL = 1e-4
# int8 per-channel weights, f32 activations: measured 0.99999 (BERT) and 0.9999 (Llama logits) on these
# random-weight models; onnxruntime's own quantize_dynamic reaches 0.99993 on the BERT.
INT8_COSINE = 0.999


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def bert():
    path = export_bert()
    return path, sqk.from_onnx(path), ort_session(path, 2)


@pytest.fixture(scope="module")
def llama():
    path = export_llama()
    return path, sqk.from_onnx(path), ort_session(path, 2)


@needs_peers
def test_bert_graph_is_static_and_lean(bert):
    """The shape subgraphs fold away (position and token-type embeddings
    become constants), the inputs keep their names, the weight matmuls have
    constant weights and LayerNormalization stays one op."""
    _, g, _ = bert
    assert [v.name for v in g.inputs] == ["input_ids", "attention_mask"]
    assert [tuple(v.shape) for v in g.outputs] == [(1, 128, BERT_CONFIG["hidden_size"]),
                                                    (1, BERT_CONFIG["hidden_size"])]
    consts = {v for n in g.nodes if n.op == "const" for v in n.outputs}
    mm = [n for n in g.nodes if n.op == "matmul"]
    weighted = [n for n in mm if n.inputs[1] in consts]
    assert len(weighted) == 6 * 6 + 1  # q, k, v, out, up, down per layer + the pooler
    assert len(mm) - len(weighted) == 2 * 6  # scores and context per layer
    assert sum(n.op == "layernorm" for n in g.nodes) == 13
    # the exporter's q and k scaling (Mul by a scalar after the head transposes) folds into
    # their weights and biases: the muls left are GELU's; the additive mask, which the export
    # rebuilds in every layer, is made once (common subexpressions), plus a NaN guard per layer
    assert sum(n.op == "mul" for n in g.nodes) == 2 * 6
    assert sum(n.op == "where" for n in g.nodes) == 1 + 6
    # the word-embedding lookup, the mask's broadcast and the pooler's first token: each
    # reads a constant table or constant indices (nothing is left of the shape arithmetic)
    gathers = [n for n in g.nodes if n.op == "gather"]
    assert len(gathers) == 3 and all(n.inputs[0] in consts or n.inputs[1] in consts for n in gathers)


@needs_peers
@pytest.mark.parametrize("pad", [0, 28])
def test_bert_fp32_matches_onnxruntime(bert, pad, bert_fp32):
    _, _, sess = bert
    feeds = bert_inputs(pad=pad)
    want = sess.run(None, feeds)
    got = bert_fp32(**feeds)
    for w, o in zip(want, got):
        assert o.shape == w.shape
        assert rel_err(o, w) < FP32_RTOL


@pytest.fixture(scope="module")
def bert_fp32(bert):
    return sqk.compile(bert[1], pipeline=FUSED, threads=2)


@needs_peers
def test_bert_int8_cosine(bert):
    _, g, sess = bert
    feeds = bert_inputs(pad=16)
    m = sqk.compile(g, quantize="int8", threads=2)
    assert sum(n.op == "matmul_q" for n in m.ir.nodes) == 37
    want = sess.run(None, feeds)
    got = m(**feeds)
    assert cosine(got[0], want[0]) >= INT8_COSINE
    assert cosine(got[1], want[1]) >= INT8_COSINE


@needs_peers
def test_llama_graph(llama):
    """Rotary tables fold to constants (Sin/Cos of import-time positions);
    grouped-query attention's K/V repetition is data movement; each RMSNorm
    (Pow, ReduceMean, Add, Sqrt, Div, Mul, Cast, Mul by the weight) imports
    as one rmsnorm op."""
    _, g, _ = llama
    assert [v.name for v in g.inputs] == ["input_ids"]
    assert [tuple(v.shape) for v in g.outputs] == [(1, LLAMA_SEQ, LLAMA_CONFIG["vocab_size"])]
    consts = {v for n in g.nodes if n.op == "const" for v in n.outputs}
    weighted = [n for n in g.nodes if n.op == "matmul" and n.inputs[1] in consts]
    assert len(weighted) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert sum(n.op == "rmsnorm" for n in g.nodes) == 2 * 2 + 1  # the exporter's Pow ... Mul chains
    assert not any(n.op in ("sqrt", "reduce_mean", "div") for n in g.nodes)


@needs_peers
def test_llama_fp32_matches_onnxruntime(llama):
    _, g, sess = llama
    ids = np.random.default_rng(2).integers(0, LLAMA_CONFIG["vocab_size"], (1, LLAMA_SEQ)).astype(np.int64)
    want = sess.run(None, {"input_ids": ids})[0]
    for pipeline in (None, FUSED):
        got = sqk.compile(g, pipeline=pipeline, threads=2)(input_ids=ids)
        assert got.shape == want.shape
        assert rel_err(got, want) < FP32_RTOL, pipeline


@needs_peers
def test_llama_int8_cosine(llama):
    _, g, sess = llama
    ids = np.random.default_rng(3).integers(0, LLAMA_CONFIG["vocab_size"], (1, LLAMA_SEQ)).astype(np.int64)
    want = sess.run(None, {"input_ids": ids})[0]
    m = sqk.compile(g, quantize="int8", threads=2)
    assert sum(n.op == "matmul_q" for n in m.ir.nodes) == 15
    assert cosine(m(input_ids=ids), want) >= INT8_COSINE


@needs_peers
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                    reason="onnxscript not installed (torch's dynamo exporter needs it: pip install onnxscript)")
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_dynamo_export_fp32(kind):
    """torch's default (dynamo) exporter writes other patterns (opset 18+, Gelu,
    GatherND for the mask, Reciprocal in RMSNorm): the same fp32 bound holds."""
    if kind == "bert":
        path, feeds = export_bert(exporter="dynamo"), bert_inputs(pad=28)
    else:
        path = export_llama(exporter="dynamo")
        feeds = {"input_ids": np.random.default_rng(4).integers(0, LLAMA_CONFIG["vocab_size"], (1, LLAMA_SEQ))}
    g = sqk.from_onnx(path)
    if kind == "llama":
        assert sum(n.op == "rmsnorm" for n in g.nodes) == 5
    want = ort_session(path, 2).run(None, feeds)
    got = sqk.compile(g, pipeline=FUSED, threads=2)(**feeds)
    got = got if isinstance(got, (list, tuple)) else [got]
    for w, o in zip(want, got):
        assert o.shape == w.shape
        assert rel_err(o, w) < FP32_RTOL


def _gather_nd_model(batch_dims, const_indices):
    data = h.make_tensor_value_info("data", T.FLOAT, [2, 3, 4, 5])
    ind = np.array([[[1, -1], [0, 2]], [[1, 0], [-2, 3]]], np.int64) if batch_dims else \
        np.array([[[1, -1, 0], [0, 2, 3]], [[1, 0, 1], [-2, 1, -4]]], np.int64)
    inputs = [data] + ([] if const_indices else [h.make_tensor_value_info("ind", T.INT64, list(ind.shape))])
    inits = [nh.from_array(ind, "ind")] if const_indices else []
    node = h.make_node("GatherND", ["data", "ind"], ["y"], batch_dims=batch_dims)
    g = h.make_graph([node], "gnd", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), ind


@pytest.mark.parametrize("batch_dims", [0, 1])
@pytest.mark.parametrize("const_indices", [True, False])
def test_gather_nd(batch_dims, const_indices):
    """GatherND as one gather over flattened axes, with negative indices; the
    linear indices fold to a constant when the indices are constant."""
    from onnx.reference import ReferenceEvaluator

    model, ind = _gather_nd_model(batch_dims, const_indices)
    g = sqk.from_onnx(model)
    if const_indices:
        assert [n.op for n in g.nodes if n.op not in ("const", "reshape")] == ["gather"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    feeds = {"data": x} if const_indices else {"data": x, "ind": ind}
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_array_equal(sqk.compile(g)(**feeds), want)


def _rms_model(x_readers=False, weight=True):
    """x * 1/sqrt(mean(x^2) + eps) * w as torch exports it; ``x_readers`` adds a
    second reader of the mean (the pattern must not fuse then)."""
    d = 8
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Pow", ["x", "two"], ["p"]),
             h.make_node("ReduceMean", ["p"], ["m"], axes=[-1], keepdims=1),
             h.make_node("Constant", [], ["eps"], value=nh.from_array(np.array(1e-6, np.float32))),
             h.make_node("Add", ["m", "eps"], ["a"]), h.make_node("Sqrt", ["a"], ["s"]),
             h.make_node("Div", ["one", "s"], ["inv"]), h.make_node("Mul", ["x", "inv"], ["n"]),
             h.make_node("Cast", ["n"], ["c"], to=T.FLOAT)]
    nodes.append(h.make_node("Mul", ["w", "c"], ["y"]) if weight else h.make_node("Identity", ["c"], ["y"]))
    outs = [h.make_tensor_value_info("y", T.FLOAT, None)]
    if x_readers:
        outs.append(h.make_tensor_value_info("m", T.FLOAT, None))
    inits = [nh.from_array(np.array(2.0, np.float32), "two"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(rng.standard_normal(d).astype(np.float32), "w")]
    g = h.make_graph(nodes, "rms", [h.make_tensor_value_info("x", T.FLOAT, [2, 3, d])], outs, initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("x_readers,weight", [(False, True), (False, False), (True, True)])
def test_rmsnorm_pattern(x_readers, weight):
    """The exporters' RMSNorm chain imports as one rmsnorm op (with or without
    the weight Mul) and only when its intermediates have no other reader."""
    from onnx.reference import ReferenceEvaluator

    model = _rms_model(x_readers, weight)
    g = sqk.from_onnx(model)
    ops = [n.op for n in g.nodes if n.op != "const"]
    assert (ops.count("rmsnorm") == 1) == (not x_readers)
    if not x_readers:
        assert ops == ["rmsnorm"] if weight else ops in (["rmsnorm"], ["rmsnorm", "reshape"])
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})
    got = sqk.compile(g)(x=x)
    got = got if isinstance(got, (list, tuple)) else [got]
    for w, o in zip(want, got):
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-6)
