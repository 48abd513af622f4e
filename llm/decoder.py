"""A Llama-style decoder, step by step, with the KV cache kept in the runtime.

``build_decoder(cfg, weights)`` makes the graph of one decoding step::

    token i64[1], pos i64[1], k_cache.L / v_cache.L f32[Hkv, S, D] (L < layers)
    x = embed[token]
    per layer: h = rmsnorm(x); q, k, v = h @ wq, h @ wk, h @ wv; rope(q), rope(k) at pos;
               o, k_cache.L', v_cache.L' = attention_decode(q, k, v, k_cache.L, v_cache.L, pos)
               x += o @ wo;  x += swiglu(rmsnorm(x) @ w1, rmsnorm(x) @ w3) @ w2
               with lookup_experts = E > 0 (Mixture of Lookup Experts, MoLE):
               x += softmax(rmsnorm(x) @ mole_router) @ concat_e(relu(e0 @ mole_up.e) @ mole_down.e)
               where e0 = embed[token]: the experts see only the token's embedding, so the
               ``fold_lookup_experts`` pass can turn them into one lookup table per layer
    logits = rmsnorm(x) @ lm_head           -> outputs: logits, then every updated cache

``build_decoder(cfg, weights, tokens=T)`` is the same network over a chunk of
T prompt tokens at pos..pos+T-1 (GEMMs with M = T, attention_decode writing T
rows with causal attention inside the chunk), returning the last token's
logits only.

``Decoder`` compiles the step once with the caches as state
(``compile(state=...)``): the Module owns them, each call passes only the
token and the position, and attention_decode writes the new K/V rows straight
into the Module's arrays (on the host; riscv64 round-trips them through the
runner's files).  ``Decoder.prefill`` compiles a module per chunk length when
first needed, each sharing those state arrays (``Module.share_state``).
``reference_logits`` is an independent numpy model of the same network: full
causal attention over the whole prefix, recomputed from scratch.

Reached as ``sqk.llm`` (the package llm/; ``sqk.compiler.llm`` still imports it);
examples/llama_decode.py runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.builder import GraphBuilder
from ..ir.graph import Graph


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 128
    max_seq: int = 32          # KV cache length S
    theta: float = 10000.0
    eps: float = 1e-5
    lookup_experts: int = 0    # MoLE experts per layer (0: none)
    lookup_ffn: int = 0        # their FFN width


def random_weights(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """f32 weights, N(0, 1/fan_in) matrices and norm scales near 1."""
    rng = np.random.default_rng(seed)
    h, qd, kvd = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def mat(k, n):  # drawn in f32: no float64 temporaries for large models
        m = rng.standard_normal((k, n), dtype=np.float32)
        m *= np.float32(1 / np.sqrt(k))
        return m

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    w = {"embed": rng.standard_normal((cfg.vocab, h), dtype=np.float32)}
    for i in range(cfg.layers):
        w.update({f"attn_norm.{i}": norm(h), f"wq.{i}": mat(h, qd), f"wk.{i}": mat(h, kvd), f"wv.{i}": mat(h, kvd),
                  f"wo.{i}": mat(qd, h), f"ffn_norm.{i}": norm(h), f"w1.{i}": mat(h, cfg.ffn),
                  f"w3.{i}": mat(h, cfg.ffn), f"w2.{i}": mat(cfg.ffn, h)})
        for e in range(cfg.lookup_experts):
            w[f"mole_up.{i}.{e}"], w[f"mole_down.{i}.{e}"] = mat(h, cfg.lookup_ffn), mat(cfg.lookup_ffn, h)
        if cfg.lookup_experts:
            w[f"mole_router.{i}"] = mat(h, cfg.lookup_experts)
    w["final_norm"], w["lm_head"] = norm(h), mat(h, cfg.vocab)
    return w


def state_names(cfg: LlamaConfig) -> list[str]:
    return [f"{kv}_cache.{i}" for i in range(cfg.layers) for kv in ("k", "v")]


def build_decoder(cfg: LlamaConfig, weights: dict[str, np.ndarray], tokens: int = 1, kv_dtype: str = "f32") -> Graph:
    """The graph of one decoding step (module docstring), or with ``tokens=T > 1``
    of a prefill chunk: token i64[T] at positions pos..pos+T-1 (pos the start),
    every projection a GEMM with M = T, attention_decode over the chunk writing
    its T cache rows, and the logits [1, vocab] of one token only, the row
    ``last`` (i64[1], an input: a chunk padded past the prompt's end returns
    the logits of its last real token).
    ``kv_dtype``: the caches' dtype, "f32" or "f16" (rounded on write, widened
    on read; the math stays f32)."""
    if tokens < 1:
        raise ValueError(f"build_decoder needs tokens >= 1, got {tokens}")
    if tokens > cfg.max_seq:
        raise ValueError(f"a chunk of {tokens} tokens does not fit in the KV cache of length {cfg.max_seq}")
    if kv_dtype not in ("f32", "f16"):
        raise ValueError(f'kv_dtype must be "f32" or "f16", got {kv_dtype!r}')
    b = GraphBuilder("llama_decode" if tokens == 1 else f"llama_prefill{tokens}")
    c = {name: b.const(a, "f32", name=name.replace(".", "_")) for name, a in weights.items()}
    token, pos = b.input("token", (tokens,), "i64"), b.input("pos", (1,), "i64")
    cache = (cfg.kv_heads, cfg.max_seq, cfg.head_dim)
    caches = {n: b.input(n, cache, kv_dtype) for n in state_names(cfg)}
    hq, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim
    lead = () if tokens == 1 else (tokens,)   # one token: q[Hq, D]; a chunk: q[T, Hq, D]

    def rope(v, heads):
        r = b.rope(b.reshape(v, shape=(tokens, heads, d)), pos, theta=cfg.theta)
        return b.reshape(r, shape=(heads, d)) if tokens == 1 else r

    x = emb = b.gather(c["embed"], token)                               # [T, H]
    new_caches = []
    for i in range(cfg.layers):
        h = b.rmsnorm(x, c[f"attn_norm.{i}"], eps=cfg.eps)
        q = rope(b.matmul(h, c[f"wq.{i}"]), hq)
        k = rope(b.matmul(h, c[f"wk.{i}"]), hkv)
        v = b.reshape(b.matmul(h, c[f"wv.{i}"]), shape=lead + (hkv, d))
        o, kc, vc = b.attention_decode(q, k, v, caches[f"k_cache.{i}"], caches[f"v_cache.{i}"], pos)
        new_caches += [kc, vc]
        x = b.add(x, b.matmul(b.reshape(o, shape=(tokens, hq * d)), c[f"wo.{i}"]))
        h = b.rmsnorm(x, c[f"ffn_norm.{i}"], eps=cfg.eps)
        ff = b.swiglu(b.matmul(h, c[f"w1.{i}"]), b.matmul(h, c[f"w3.{i}"]))
        x = b.add(x, b.matmul(ff, c[f"w2.{i}"]))
        if cfg.lookup_experts:   # routed on the hidden state, experts fed by the embedding
            experts = [b.matmul(b.relu(b.matmul(emb, c[f"mole_up.{i}.{e}"])), c[f"mole_down.{i}.{e}"])
                       for e in range(cfg.lookup_experts)]
            route = b.softmax(b.matmul(h, c[f"mole_router.{i}"]))                  # [T, E]
            if tokens == 1:
                x = b.add(x, b.matmul(route, b.concat(*experts, axis=0)))         # [1, E] @ [E, H]
            else:                                                   # per row: sum_e route[:, e] * expert_e
                for e, ex in enumerate(experts):
                    x = b.add(x, b.mul(b.slice(route, starts=(e,), ends=(e + 1,), axes=(1,)), ex))
    if tokens > 1:
        x = b.gather(x, b.input("last", (1,), "i64"))
    logits = b.matmul(b.rmsnorm(x, c["final_norm"], eps=cfg.eps), c["lm_head"], name="logits")
    return b.output(logits, *new_caches)


def reference_logits(cfg: LlamaConfig, weights: dict[str, np.ndarray], tokens) -> np.ndarray:
    """Logits [T, vocab] of every prefix of ``tokens`` (positions 0..T-1): plain
    numpy, causal attention over the whole sequence at once, no cache."""
    w = weights
    t = len(tokens)
    hq, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim

    def rms(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(cfg.eps)) * s

    inv = (cfg.theta ** (-np.arange(d // 2) * 2.0 / d)).astype(np.float32)
    ang = np.arange(t, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]       # [T, 1, D/2]

    def rope(x):  # [T, heads, D], rotate-half
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = w["embed"][np.asarray(tokens)]
    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    for i in range(cfg.layers):
        h = rms(x, w[f"attn_norm.{i}"])
        q = rope((h @ w[f"wq.{i}"]).reshape(t, hq, d))
        k = np.repeat(rope((h @ w[f"wk.{i}"]).reshape(t, hkv, d)), hq // hkv, axis=1)
        v = np.repeat((h @ w[f"wv.{i}"]).reshape(t, hkv, d), hq // hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(d)) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(t, hq * d)
        x = x + o @ w[f"wo.{i}"]
        h = rms(x, w[f"ffn_norm.{i}"])
        g = h @ w[f"w1.{i}"]
        x = x + (g / (1 + np.exp(-g)) * (h @ w[f"w3.{i}"])) @ w[f"w2.{i}"]
        if cfg.lookup_experts:
            e0 = w["embed"][np.asarray(tokens)]
            r = h @ w[f"mole_router.{i}"]
            r = np.exp(r - r.max(-1, keepdims=True))
            r /= r.sum(-1, keepdims=True)
            for e in range(cfg.lookup_experts):
                x = x + r[:, e:e + 1] * (np.maximum(e0 @ w[f"mole_up.{i}.{e}"], 0) @ w[f"mole_down.{i}.{e}"])
    return (rms(x, w["final_norm"]) @ w["lm_head"]).astype(np.float32)


class Decoder:
    """A compiled decoder: ``prefill(ids)`` runs a prompt in chunks of
    ``prefill_chunk`` tokens, one compiled call each, ``step(token)`` one token
    at a time; both return the logits [vocab] of the next token and advance
    the position.  The chunk's Module is compiled when first needed and shares
    the step Module's KV caches (``module.state``; ``kv_dtype="f16"`` stores
    them in f16) and, when the packed weights are the same bytes, its
    constants file.

    A prompt's last, shorter piece of r tokens is padded to a whole chunk
    (token 0 at the positions after it; the chunk returns row r-1's logits)
    rather than given a module of its own: one compiled chunk length, however
    long the prompts.  The padding writes cache rows past the prompt's end,
    which nothing reads before they are written again: a position's row is
    rewritten by the call that processes the real token there, and attention
    reads only rows up to its own tokens.  Padding costs up to a chunk of
    computation per prefill, so a piece shorter than ``prefill_chunk // 8``
    tokens, or one whose padded chunk would run past the cache's end, runs
    token by token instead."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, np.ndarray] | None = None, target: str = "host",
                 seed: int = 0, kv_dtype: str = "f32", prefill_chunk: int = 64, **compile_options):
        from ..compiler.driver import compile

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cfg = cfg
        self.weights = weights if weights is not None else random_weights(cfg, seed)
        self.kv_dtype = kv_dtype
        self.prefill_chunk = min(prefill_chunk, cfg.max_seq)
        self.target, self.compile_options = target, compile_options
        self.graph = build_decoder(cfg, self.weights, kv_dtype=kv_dtype)
        self.module = compile(self.graph, target=target, state=state_names(cfg), **compile_options)
        self.chunk_modules: dict[int, object] = {}   # chunk length -> Module
        self.pos = 0

    def reset(self) -> None:
        """Start a new sequence: zero the caches, position 0."""
        self.module.reset_state()
        self.pos = 0

    def chunk_module(self, tokens: int):
        """The Module of a ``tokens``-long chunk, tokens > 1 (compiled on first
        use; inputs token, pos, last), its state the step module's arrays."""
        if tokens < 2:
            raise ValueError(f"a prefill chunk has at least 2 tokens, got {tokens}: step() runs one")
        m = self.chunk_modules.get(tokens)
        if m is None:
            from ..compiler.driver import compile

            g = build_decoder(self.cfg, self.weights, tokens=tokens, kv_dtype=self.kv_dtype)
            m = compile(g, target=self.target, state=state_names(self.cfg), **self.compile_options)
            m.share_state(self.module)
            for other in [self.module, *self.chunk_modules.values()]:   # one mapping per weight layout
                if m.share_constants(other):
                    break
            self.chunk_modules[tokens] = m
        return m

    def step(self, token: int) -> np.ndarray:
        if not 0 <= int(token) < self.cfg.vocab:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.cfg.vocab})")
        if self.pos >= self.cfg.max_seq:
            raise ValueError(f"position {self.pos} is beyond the KV cache length {self.cfg.max_seq}: "
                             "reset() to start a new sequence")
        logits = self.module(token=np.array([token], np.int64), pos=np.array([self.pos], np.int64))
        self.pos += 1
        return logits[0]

    def prefill(self, ids) -> np.ndarray:
        """Run the tokens ``ids`` from the current position in chunks of
        ``prefill_chunk`` (the last one padded, or token by token: class
        docstring); returns the logits [vocab] of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not ids.size:
            raise ValueError("prefill needs at least one token")
        bad = ids[(ids < 0) | (ids >= self.cfg.vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.vocab})")
        if self.pos + ids.size > self.cfg.max_seq:
            raise ValueError(f"{ids.size} tokens from position {self.pos} go beyond the KV cache length "
                             f"{self.cfg.max_seq}: reset() to start a new sequence")
        c = self.prefill_chunk
        for i in range(0, ids.size, c):
            piece = ids[i:i + c]
            r = piece.size
            if c < 2 or r < max(2, c // 8) or self.pos + c > self.cfg.max_seq:
                for tok in piece:
                    logits = self.step(int(tok))
                continue
            token = np.zeros(c, np.int64)
            token[:r] = piece
            logits = self.chunk_module(c)(token=token, pos=np.array([self.pos], np.int64),
                                          last=np.array([r - 1], np.int64))[0]
            self.pos += r
        return logits

    def generate(self, prompt, n: int) -> list[int]:
        """Prefill ``prompt`` (token ids), then decode ``n`` tokens greedily (argmax)."""
        if not len(prompt):
            raise ValueError("generate needs a prompt of at least one token")
        logits = self.prefill(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            if len(out) < n:
                logits = self.step(out[-1])
        return out
