"""Built-in example models (used by ``sqk demo``, the examples and the tests)."""
from __future__ import annotations

import numpy as np

from ..ir.builder import GraphBuilder
from ..ir.graph import Graph


def transformer_mlp(hidden: int = 768, ffn: int = 3072, tokens: int = 1, seed: int = 0) -> Graph:
    """The MLP half of a transformer block: x + W2·gelu(W1·layernorm(x) + b1) + b2."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("transformer_mlp")
    return b.output(_mlp(b, b.input("x", (tokens, hidden)), rng, hidden, ffn))


def _layernorm(b: GraphBuilder, x, rng, hidden: int, prefix: str):
    return b.layernorm(x, b.const(1 + 0.1 * rng.standard_normal(hidden, np.float32), "f32", name=prefix + "_scale"),
                       b.const(0.1 * rng.standard_normal(hidden, np.float32), "f32", name=prefix + "_bias"))


def _linear(b: GraphBuilder, rng, k: int, n: int, w: str, bias: str):
    """Constants W [k, n] ~ N(0, 1/k) and a small bias [n] of a linear layer."""
    wv = b.const(rng.standard_normal((k, n), np.float32) / np.sqrt(k), "f32", name=w)
    bv = b.const(0.02 * rng.standard_normal(n, np.float32), "f32", name=bias)
    return wv, bv


def _mlp(b: GraphBuilder, x, rng, hidden: int, ffn: int, ln: str = "ln"):
    """x + W2·gelu(W1·layernorm(x) + b1) + b2 (constants drawn from ``rng`` in this order)."""
    h = _layernorm(b, x, rng, hidden, ln)
    w1, b1 = _linear(b, rng, hidden, ffn, "w1", "b1")
    w2, b2 = _linear(b, rng, ffn, hidden, "w2", "b2")
    h = b.gelu(b.add(b.matmul(h, w1), b1))
    return b.add(x, b.add(b.matmul(h, w2), b2))


def transformer_block(hidden: int = 768, heads: int = 12, ffn: int = 3072, tokens: int = 4, seed: int = 0) -> Graph:
    """A pre-layernorm transformer block over ``tokens`` positions: causal
    multi-head self-attention with a residual, then the MLP half
    (:func:`transformer_mlp`'s structure)::

        a = layernorm(x);  q, k, v = a·Wq + bq, a·Wk + bk, a·Wv + bv
        per head: p = softmax(q·kᵀ / sqrt(d) + mask)   (mask: -1e9 above the diagonal)
        h = x + concat_heads(p·v)·Wo + bo
        y = h + W2·gelu(W1·layernorm(h) + b1) + b2
    """
    if hidden % heads:
        raise ValueError(f"transformer_block: hidden={hidden} is not a multiple of heads={heads}")
    d = hidden // heads
    rng = np.random.default_rng(seed)
    b = GraphBuilder("transformer_block")
    x = b.input("x", (tokens, hidden))
    a = _layernorm(b, x, rng, hidden, "ln1")

    def project(name, perm):
        w, bias = _linear(b, rng, hidden, hidden, "w" + name, "b" + name)
        y = b.add(b.matmul(a, w), bias)
        return b.transpose(b.reshape(y, shape=(tokens, heads, d)), perm=perm)

    q = project("q", (1, 0, 2))          # [heads, tokens, d]
    kt = project("k", (1, 2, 0))         # [heads, d, tokens]: k transposed
    v = project("v", (1, 0, 2))          # [heads, tokens, d]
    scale = b.const(np.float32(1 / np.sqrt(d)), "f32", name="attn_scale")
    mask = b.const(np.triu(np.full((tokens, tokens), -1e9, np.float32), 1), "f32", name="causal_mask")
    p = b.softmax(b.add(b.mul(b.matmul(q, kt), scale), mask), axis=-1)
    o = b.reshape(b.transpose(b.matmul(p, v), perm=(1, 0, 2)), shape=(tokens, hidden))
    wo, bo = _linear(b, rng, hidden, hidden, "wo", "bo")
    h = b.add(x, b.add(b.matmul(o, wo), bo))
    return b.output(_mlp(b, h, rng, hidden, ffn, ln="ln2"))


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


MODELS = {"transformer_mlp": transformer_mlp, "transformer_block": transformer_block, "small_cnn": small_cnn}
