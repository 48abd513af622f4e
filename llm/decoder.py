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

``Decoder`` compiles it once with the caches as state (``compile(state=...)``):
the Module owns them, each call passes only the token and the position, and
attention_decode writes the new K/V rows straight into the Module's arrays (on
the host; riscv64 round-trips them through the runner's files).
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
    """Shape and numerics of a Llama-family decoder (Llama 2/3, Mistral,
    SmolLM, TinyLlama, Qwen2: what ``compiler/frontends/hf.py`` and ``gguf.py``
    read from a checkpoint).  The defaults are a tiny random test model."""
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
    # what real checkpoints add
    qkv_bias: bool = False     # q/k/v projections with biases bq/bk/bv (Qwen2)
    tie_embeddings: bool = False   # the lm_head is the embedding table (weights: "lm_head" only)
    rope_style: str = "half"   # "interleaved": GGUF llama weights, whose Q/K rows llama.cpp permuted
    rope_scaling: tuple = ()   # ("llama3", factor, low_freq_factor, high_freq_factor, original_context)
    #                            or ("freq_factors", f_0, ..., f_{D/2-1}) (GGUF rope_freqs)
    bos_id: int | None = None
    eos_ids: tuple = ()        # token ids that end generation
    context_length: int = 0    # the model's trained context (max_position_embeddings); 0: unknown
    sliding_window: int = 0    # Mistral's attention window (0: none); max_seq may not exceed it
    arch: str = "llama"


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray | None:
    """The rope inverse frequencies f32[head_dim/2] when the config changes
    them (Llama 3 rope scaling), else None (the rope op's theta ** (-2i/D)).

    Llama 3, as transformers computes it (f32): wavelength 2 pi / f; bands
    longer than original / low_freq_factor are divided by ``factor``, shorter
    than original / high_freq_factor kept, and those between blended with
    s = (original / wavelength - low) / (high - low): (1 - s) f / factor + s f.
    GGUF frequency factors: theta ** (-2i/D) / f_i (f32)."""
    if not cfg.rope_scaling:
        return None
    d = cfg.head_dim
    f32 = np.float32
    if cfg.rope_scaling[0] == "freq_factors":   # GGUF's rope_freqs: divisors of the plain frequencies
        from ..ir.ops import rope_inv_freq
        return (rope_inv_freq(d, cfg.theta) / np.asarray(cfg.rope_scaling[1:], f32)).astype(f32)
    kind, factor, low, high, orig = cfg.rope_scaling
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (only llama3)")
    inv = f32(1.0) / (f32(cfg.theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(f32) / f32(d)))
    wavelen = f32(2 * np.pi) / inv
    low_wl, high_wl = f32(orig / low), f32(orig / high)
    scaled = np.where(wavelen > low_wl, inv / f32(factor), inv).astype(f32)
    smooth = ((f32(orig) / wavelen - f32(low)) / (f32(high) - f32(low))).astype(f32)
    blended = ((f32(1) - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, blended, scaled).astype(f32)


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


@dataclass(frozen=True)
class QuantWeight:
    """A pre-quantized [K, N] weight as matmul_q's inputs, kept as the file
    stores it (GGUF blocks): w[k, n] = (q[k, n] - zeros[k // group, n]) *
    scales[k // group, n]; ``q_dtype`` "i8" or "i4" (q holds the values)."""
    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None
    group: int = 32
    q_dtype: str = "i8"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        from ..ir.ops import dequantize_weight
        return dequantize_weight(self.q, self.scales, self.zeros, self.group)


def as_f32(w) -> np.ndarray:
    """A weight as f32 values (a QuantWeight dequantized)."""
    return w.dequantize() if isinstance(w, QuantWeight) else np.asarray(w, np.float32)


def embedding_table(weights) -> np.ndarray:
    """The [vocab, hidden] f32 embedding: "embed", or the tied lm_head's transpose."""
    return as_f32(weights["embed"]) if "embed" in weights else as_f32(weights["lm_head"]).T


def build_decoder(cfg: LlamaConfig, weights, tokens: int = 1, kv_dtype: str = "f32") -> Graph:
    """The graph of one decoding step (module docstring), or with ``tokens=T > 1``
    of a prefill chunk: token i64[T] at positions pos..pos+T-1 (pos the start),
    every projection a GEMM with M = T, attention_decode over the chunk writing
    its T cache rows, and the logits [1, vocab] of the last token only.
    ``kv_dtype``: the caches' dtype, "f32" or "f16" (rounded on write, widened
    on read; the math stays f32).

    ``weights`` maps names to arrays (f32, or anything numpy converts to it) or
    QuantWeight (a matmul_q); biases "bq.L", "bk.L", "bv.L" with
    ``cfg.qkv_bias``.  Without "embed" the lm_head [hidden, vocab] is also the
    embedding table (tied): the gather reads columns of that one constant,
    which the decode graph's artifact stores once (its GEMV reads b as
    stored; a GEMM of a prefill chunk reads it packed, a layout of its own)."""
    if tokens < 1:
        raise ValueError(f"build_decoder needs tokens >= 1, got {tokens}")
    if tokens > cfg.max_seq:
        raise ValueError(f"a chunk of {tokens} tokens does not fit in the KV cache of length {cfg.max_seq}")
    if kv_dtype not in ("f32", "f16"):
        raise ValueError(f'kv_dtype must be "f32" or "f16", got {kv_dtype!r}')
    b = GraphBuilder("llama_decode" if tokens == 1 else f"llama_prefill{tokens}")
    consts = {}

    def const(name, dtype="f32", arr=None):
        key = (name, dtype)
        if key not in consts:
            consts[key] = b.const(weights[name] if arr is None else arr, dtype, name=name.replace(".", "_"))
        return consts[key]

    def linear(x, name):
        w = weights[name]
        if not isinstance(w, QuantWeight):
            return b.matmul(x, const(name))
        ins = [const(name, w.q_dtype, w.q), const(name + ".scales", None, w.scales)]
        if w.zeros is not None:
            ins.append(const(name + ".zeros", None if w.zeros.dtype.kind == "f" else w.q_dtype, w.zeros))
        return b.matmul_q(x, *ins, group=w.group)

    token, pos = b.input("token", (tokens,), "i64"), b.input("pos", (1,), "i64")
    cache = (cfg.kv_heads, cfg.max_seq, cfg.head_dim)
    caches = {n: b.input(n, cache, kv_dtype) for n in state_names(cfg)}
    hq, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim
    lead = () if tokens == 1 else (tokens,)   # one token: q[Hq, D]; a chunk: q[T, Hq, D]
    inv = rope_frequencies(cfg)
    inv_c = [] if inv is None else [b.const(inv, "f32", name="rope_inv_freq")]

    def rope(v, heads):
        r = b.rope(b.reshape(v, shape=(tokens, heads, d)), pos, *inv_c, theta=cfg.theta, style=cfg.rope_style)
        return b.reshape(r, shape=(heads, d)) if tokens == 1 else r

    def proj(h, i, kind):
        y = linear(h, f"w{kind}.{i}")
        return b.add(y, const(f"b{kind}.{i}")) if cfg.qkv_bias else y

    x = emb = embed(b, cfg, weights, const, token)                      # [T, H]
    new_caches = []
    for i in range(cfg.layers):
        h = b.rmsnorm(x, const(f"attn_norm.{i}"), eps=cfg.eps)
        q = rope(proj(h, i, "q"), hq)
        k = rope(proj(h, i, "k"), hkv)
        v = b.reshape(proj(h, i, "v"), shape=lead + (hkv, d))
        o, kc, vc = b.attention_decode(q, k, v, caches[f"k_cache.{i}"], caches[f"v_cache.{i}"], pos)
        new_caches += [kc, vc]
        x = b.add(x, linear(b.reshape(o, shape=(tokens, hq * d)), f"wo.{i}"))
        h = b.rmsnorm(x, const(f"ffn_norm.{i}"), eps=cfg.eps)
        ff = b.swiglu(linear(h, f"w1.{i}"), linear(h, f"w3.{i}"))
        x = b.add(x, linear(ff, f"w2.{i}"))
        if cfg.lookup_experts:   # routed on the hidden state, experts fed by the embedding
            experts = [b.matmul(b.relu(b.matmul(emb, const(f"mole_up.{i}.{e}"))), const(f"mole_down.{i}.{e}"))
                       for e in range(cfg.lookup_experts)]
            route = b.softmax(b.matmul(h, const(f"mole_router.{i}")))                  # [T, E]
            if tokens == 1:
                x = b.add(x, b.matmul(route, b.concat(*experts, axis=0)))         # [1, E] @ [E, H]
            else:                                                                 # per row: sum_e route[:, e] * expert_e
                for e, ex in enumerate(experts):
                    x = b.add(x, b.mul(b.slice(route, starts=(e,), ends=(e + 1,), axes=(1,)), ex))
    if tokens > 1:
        x = b.slice(x, starts=(tokens - 1,), ends=(tokens,), axes=(0,))
    logits = linear(b.rmsnorm(x, const("final_norm"), eps=cfg.eps), "lm_head")
    return b.output(logits, *new_caches)


def embed(b: GraphBuilder, cfg: LlamaConfig, weights, const, token):
    """x [T, H] of the ``token`` ids [T]: rows of "embed" [V, H], or (tied)
    columns of the lm_head [H, V]; of a QuantWeight lm_head (i8, groups
    dividing H) the columns' q and scales are gathered and multiplied here,
    so the one quantized table serves both."""
    if "embed" in weights:
        return b.gather(const("embed"), token)
    t, h = token.type.shape[0], cfg.hidden

    def rows(cols):  # [H, T] -> [T, H]
        return b.reshape(cols, shape=(1, h)) if t == 1 else b.transpose(cols, perm=(1, 0))

    w = weights["lm_head"]
    if not isinstance(w, QuantWeight):
        return rows(b.gather(const("lm_head"), token, axis=1))
    if w.q_dtype != "i8" or h % w.group or (w.zeros is not None and w.zeros.dtype.kind == "f"):
        raise ValueError(f"a tied {w.q_dtype} lm_head with group {w.group} cannot serve as the embedding: "
                         "give the weights an \"embed\" table")

    def f32(v):
        return v if v.dtype.name == "f32" else b.cast(v, to="f32")

    g = h // w.group
    q = b.reshape(f32(b.gather(const("lm_head", "i8", w.q), token, axis=1)), shape=(g, w.group, t))
    sc = b.reshape(f32(b.gather(const("lm_head.scales", None, w.scales), token, axis=1)), shape=(g, 1, t))
    if w.zeros is not None:
        z = f32(b.gather(const("lm_head.zeros", w.q_dtype, w.zeros), token, axis=1))
        q = b.sub(q, b.reshape(z, shape=(g, 1, t)))
    return rows(b.reshape(b.mul(q, sc), shape=(h, t)))


def reference_logits(cfg: LlamaConfig, weights: dict, tokens) -> np.ndarray:
    """Logits [T, vocab] of every prefix of ``tokens`` (positions 0..T-1): plain
    numpy, causal attention over the whole sequence at once, no cache;
    QuantWeight matrices dequantized in numpy."""
    w = weights
    t = len(tokens)
    hq, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim

    def rms(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(cfg.eps)) * as_f32(s)

    def lin(x, name):
        return x @ as_f32(w[name])

    def proj(x, i, kind):
        y = lin(x, f"w{kind}.{i}")
        return y + as_f32(w[f"b{kind}.{i}"]) if cfg.qkv_bias else y

    inv = rope_frequencies(cfg)
    inv = (cfg.theta ** (-np.arange(d // 2) * 2.0 / d)).astype(np.float32) if inv is None else inv
    ang = np.arange(t, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]       # [T, 1, D/2]
    i1, i2 = (np.arange(d // 2), np.arange(d // 2) + d // 2) if cfg.rope_style == "half" else \
        (np.arange(0, d, 2), np.arange(1, d, 2))

    def rope(x):  # [T, heads, D]: pairs (i1, i2) rotated
        y = np.empty_like(x)
        x1, x2 = x[..., i1], x[..., i2]
        y[..., i1], y[..., i2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return y

    table = embedding_table(w)
    x = table[np.asarray(tokens)]
    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    for i in range(cfg.layers):
        h = rms(x, w[f"attn_norm.{i}"])
        q = rope(proj(h, i, "q").reshape(t, hq, d))
        k = np.repeat(rope(proj(h, i, "k").reshape(t, hkv, d)), hq // hkv, axis=1)
        v = np.repeat(proj(h, i, "v").reshape(t, hkv, d), hq // hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(d)) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(t, hq * d)
        x = x + lin(o, f"wo.{i}")
        h = rms(x, w[f"ffn_norm.{i}"])
        g = lin(h, f"w1.{i}")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, f"w3.{i}"), f"w2.{i}")
        if cfg.lookup_experts:
            e0 = table[np.asarray(tokens)]
            r = h @ w[f"mole_router.{i}"]
            r = np.exp(r - r.max(-1, keepdims=True))
            r /= r.sum(-1, keepdims=True)
            for e in range(cfg.lookup_experts):
                x = x + r[:, e:e + 1] * (np.maximum(e0 @ w[f"mole_up.{i}.{e}"], 0) @ w[f"mole_down.{i}.{e}"])
    return lin(rms(x, w["final_norm"]), "lm_head").astype(np.float32)


def chunk_sizes(n: int, chunk: int) -> list[int]:
    """How ``prefill`` splits n prompt tokens: chunks of ``chunk`` tokens, then
    the rest as decreasing powers of two (45 with chunk 32: 32, 8, 4, 1), so at
    most log2(chunk) + 2 distinct lengths, each compiled once, ever arise; no
    token is padded or computed twice."""
    out = [chunk] * (n // chunk)
    rest = n % chunk
    while rest:
        out.append(1 << (rest.bit_length() - 1))
        rest -= out[-1]
    return out


class Decoder:
    """A compiled decoder: ``prefill(ids)`` runs a prompt in chunks of up to
    ``prefill_chunk`` tokens per call (one Module per chunk length, compiled
    when first needed), ``step(token)`` one token at a time; both return the
    logits [vocab] of the next token and advance the position.  All the
    modules share one set of KV caches (``module.state``, the step module's;
    ``kv_dtype="f16"`` stores them in f16).  ``generate`` and ``chat`` decode
    text with a ``tokenizer`` (llm/tokenizer.py).  ``sqk.llm.load`` makes one
    from a model's files."""

    def __init__(self, cfg: LlamaConfig, weights=None, target: str = "host", seed: int = 0,
                 kv_dtype: str = "f32", prefill_chunk: int = 64, tokenizer=None, **compile_options):
        from ..compiler.driver import compile

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.weights = weights if weights is not None else random_weights(cfg, seed)
        self.kv_dtype = kv_dtype
        self.prefill_chunk = min(prefill_chunk, cfg.max_seq)
        self.target, self.compile_options = target, compile_options
        self.graph = build_decoder(cfg, self.weights, kv_dtype=kv_dtype)
        self.module = compile(self.graph, target=target, state=state_names(cfg), **compile_options)
        self.chunk_modules: dict[int, object] = {1: self.module}   # chunk length -> Module
        self.pos = 0

    @property
    def config(self) -> LlamaConfig:
        return self.cfg

    def reset(self) -> None:
        """Start a new sequence: zero the caches, position 0."""
        self.module.reset_state()
        self.pos = 0

    def chunk_module(self, tokens: int):
        """The Module of a ``tokens``-long chunk (compiled on first use), its
        state the step module's arrays."""
        m = self.chunk_modules.get(tokens)
        if m is None:
            from ..compiler.driver import compile

            g = build_decoder(self.cfg, self.weights, tokens=tokens, kv_dtype=self.kv_dtype)
            m = compile(g, target=self.target, state=state_names(self.cfg), **self.compile_options)
            m.share_state(self.module)
            any(m.share_constants(o) for o in self.chunk_modules.values())  # one mapping per weight layout
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
        """Run the tokens ``ids`` from the current position, in chunks
        (``chunk_sizes``) of one compiled call each; returns the logits [vocab]
        of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not ids.size:
            raise ValueError("prefill needs at least one token")
        bad = ids[(ids < 0) | (ids >= self.cfg.vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.vocab})")
        if self.pos + ids.size > self.cfg.max_seq:
            raise ValueError(f"{ids.size} tokens from position {self.pos} go beyond the KV cache length "
                             f"{self.cfg.max_seq}: reset() to start a new sequence")
        start = 0
        for t in chunk_sizes(ids.size, self.prefill_chunk):
            logits = self.chunk_module(t)(token=ids[start:start + t], pos=np.array([self.pos], np.int64))
            self.pos += t
            start += t
        return logits[0]

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop=None, stream=None) -> list[int]:
        """Continue the sequence in the cache with ``prompt`` (text, encoded by
        the tokenizer with its special tokens, or token ids; prefilled in
        chunks), then decode up to ``max_new_tokens`` tokens (llm/sampling.py:
        greedy at temperature 0, else sampled with ``top_k`` / ``top_p`` from a
        generator seeded by ``seed``).  Stops before a token of ``stop``
        (default: the config's EOS ids; that token is not returned) or when the
        cache is full.  ``stream(token_id, text_piece)`` is called for each new
        token (the piece is "" without a tokenizer).  Returns the new tokens;
        reset() starts a new sequence."""
        ids = self._encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        stop = set(self.cfg.eos_ids if stop is None else ([stop] if isinstance(stop, int) else stop))
        from .sampling import Rng, sample

        rng = Rng(seed) if temperature > 0 else None
        logits = self.prefill(ids)
        out: list[int] = []
        pieces = self.tokenizer.stream() if stream is not None and self.tokenizer is not None else None
        while len(out) < max_new_tokens:
            tok = sample(logits, temperature, top_k, top_p, rng)
            if tok in stop:
                break
            out.append(tok)
            if stream is not None:
                stream(tok, pieces.step(tok) if pieces is not None else "")
            if len(out) == max_new_tokens or self.pos >= self.cfg.max_seq:
                break
            logits = self.step(tok)
        return out

    def chat(self, messages, **generate_kwargs) -> str:
        """The reply to ``messages`` ([{"role": ..., "content": ...}]) with the
        tokenizer's chat template, from a fresh sequence; ``generate_kwargs``
        as for generate (max_new_tokens, temperature, ...)."""
        tok = self._need_tokenizer()
        self.reset()
        return tok.decode(self.generate(tok.encode_chat(messages), **generate_kwargs))

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this Decoder has no tokenizer: give token ids, or load a model whose files have one")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text)
