"""The cnn benchmark's models (benchmarks/cnn.py: resnet18 and mobilenet_v2 in
plain torch, seeded random weights, BatchNorm in eval mode with random
statistics) export to ONNX, import and compile, and sqk's outputs match
onnxruntime's.  A small input (64x64) and 10 classes keep it short; the
benchmark itself runs 224x224 with 1000 classes.

torch and onnxruntime are optional peers: without them the test skips.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import sqk
from sqk.benchmarks import cnn
from sqk.benchmarks.onnx_models import cosine, ort_session

_MISSING = [p for p in ("torch", "transformers", "onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} not installed (optional peers)")

SIZE, CLASSES = 64, 10
INT8_COSINE = 0.99


@pytest.mark.parametrize("name", sorted(cnn.MODELS))
def test_cnn_exports_compile_and_match(name):
    path = cnn.export(name, SIZE, CLASSES)
    g = sqk.from_onnx(path)
    ops = {n.op for n in g.nodes}
    assert "conv2d" in ops and "batchnorm" not in ops   # every BatchNorm folded into its conv
    ort = ort_session(path, 2)
    x = cnn.images(1, SIZE)[0]
    want = ort.run(None, {"image": x})[0]
    assert want.shape == (1, CLASSES)
    got = sqk.compile(g, threads=2)(image=x)
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < 1e-4
    # the int8 path the benchmark times: the classifier quantized with int8 activations.
    # The logits are centred (cnn.center_logits), what is left of them is small against the
    # features' common part that sets the activation scale: measured 0.9981-0.9984 here
    q = sqk.compile(g, quantize="int8", activations="int8", threads=2)
    assert cosine(q(image=x), want) > INT8_COSINE
