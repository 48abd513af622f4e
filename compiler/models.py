"""Built-in example models (used by ``sqk demo``, the examples and the tests)."""
from __future__ import annotations

import numpy as np

from ..ir.builder import GraphBuilder
from ..ir.graph import Graph


def transformer_mlp(hidden: int = 768, ffn: int = 3072, tokens: int = 1, seed: int = 0) -> Graph:
    """The MLP half of a transformer block: x + W2·gelu(W1·layernorm(x) + b1) + b2."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("transformer_mlp")
    x = b.input("x", (tokens, hidden))
    ln = b.layernorm(x, b.const(1 + 0.1 * rng.standard_normal(hidden, np.float32), "f32", name="ln_scale"),
                     b.const(0.1 * rng.standard_normal(hidden, np.float32), "f32", name="ln_bias"))
    w1 = b.const(rng.standard_normal((hidden, ffn), np.float32) / np.sqrt(hidden), "f32", name="w1")
    b1 = b.const(0.02 * rng.standard_normal(ffn, np.float32), "f32", name="b1")
    w2 = b.const(rng.standard_normal((ffn, hidden), np.float32) / np.sqrt(ffn), "f32", name="w2")
    b2 = b.const(0.02 * rng.standard_normal(hidden, np.float32), "f32", name="b2")
    h = b.gelu(b.add(b.matmul(ln, w1), b1))
    return b.output(b.add(x, b.add(b.matmul(h, w2), b2)))


def small_cnn(channels=(16, 32), image: int = 32, classes: int = 10, batch: int = 1, seed: int = 0) -> Graph:
    """conv3x3-relu-maxpool blocks, global average pool, a linear classifier, softmax."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("small_cnn")
    x = b.input("image", (batch, 3, image, image))
    c_in = 3
    for i, c in enumerate(channels):
        w = b.const(rng.standard_normal((c, c_in, 3, 3), np.float32) * np.sqrt(2 / (9 * c_in)), "f32", name=f"conv{i}_w")
        bias = b.const(0.01 * rng.standard_normal(c, np.float32), "f32", name=f"conv{i}_b")
        x = b.maxpool2d(b.relu(b.conv2d(x, w, bias, pads=(1, 1, 1, 1))), kernel=(2, 2), strides=(2, 2))
        c_in = c
    feat = b.reshape(b.global_avgpool(x), shape=(batch, c_in))
    w = b.const(rng.standard_normal((c_in, classes), np.float32) / np.sqrt(c_in), "f32", name="fc_w")
    return b.output(b.softmax(b.add(b.matmul(feat, w), b.const(np.zeros(classes, np.float32), "f32", name="fc_b"))))


MODELS = {"transformer_mlp": transformer_mlp, "small_cnn": small_cnn}
