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

Gemma 3 (``LlamaConfig`` act / qk_norm / post_norms / embed_scale / query_scale /
window_layers / theta_local): x = embed[token] * embed_scale; q and k each
RMSNorm-ed per head before rope; the attention's and the FFN's outputs
RMSNorm-ed before their residual adds; gelu_tanh(gate) * up for swiglu;
window layers attend to the last sliding_window positions (attention_decode
{window}) with their own rope base.

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
    sliding_window: int = 0    # attention window: the window_layers' (Gemma 3), else Mistral's, which max_seq
    #                            may not exceed (0: none)
    arch: str = "llama"
    # Gemma 3 (arch "gemma3"; all off for the others)
    act: str = "silu"          # the gated FFN's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False      # RMSNorm of each head of q and k before rope (weights q_norm.L, k_norm.L [D])
    post_norms: bool = False   # RMSNorm of the attention's and the FFN's output before its residual add
    #                            (weights post_attn_norm.L, post_ffn_norm.L [H])
    embed_scale: float = 0.0   # x = embed[token] * embed_scale (0: none; Gemma: sqrt(hidden) in f32)
    query_scale: float = 0.0   # the attention scores' scale (0: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-0.5)
    window_layers: tuple = ()  # layers attending to the last sliding_window positions only (local layers)
    theta_local: float = 0.0   # rope base of the window_layers (0: theta)


def layer_theta(cfg: LlamaConfig, i: int) -> float:
    """Layer i's rope base: theta_local for a window layer (when set), else theta."""
    return cfg.theta_local if cfg.theta_local and i in cfg.window_layers else cfg.theta


def layer_window(cfg: LlamaConfig, i: int) -> int:
    """Layer i's attention window (attention_decode {window}): 0 = the whole prefix."""
    return cfg.sliding_window if i in cfg.window_layers else 0


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
        if cfg.qk_norm:
            w[f"q_norm.{i}"], w[f"k_norm.{i}"] = norm(cfg.head_dim), norm(cfg.head_dim)
        if cfg.post_norms:
            w[f"post_attn_norm.{i}"], w[f"post_ffn_norm.{i}"] = norm(h), norm(h)
        for e in range(cfg.lookup_experts):
            w[f"mole_up.{i}.{e}"], w[f"mole_down.{i}.{e}"] = mat(h, cfg.lookup_ffn), mat(cfg.lookup_ffn, h)
        if cfg.lookup_experts:
            w[f"mole_router.{i}"] = mat(h, cfg.lookup_experts)
    w["final_norm"], w["lm_head"] = norm(h), mat(h, cfg.vocab)
    return w


KV_DTYPES = ("f32", "f16", "i8")


def state_names(cfg: LlamaConfig, kv_dtype: str = "f32") -> list[str]:
    """The decoder's state inputs: each layer's K and V caches, and with an
    int8 cache their per-row scales (k_scale.L, v_scale.L f32[Hkv, S])."""
    kinds = ("cache", "scale") if kv_dtype == "i8" else ("cache",)
    return [f"{kv}_{c}.{i}" for i in range(cfg.layers) for c in kinds for kv in ("k", "v")]


def attention_splits(cfg: LlamaConfig) -> int:
    """Parts of the rows each KV head's decode attention is split into
    (attention_decode {splits}): 0 (none) for caches of fewer than 256
    positions, else about 16 work items over the KV heads (SmolLM2's 3 heads:
    6 parts), so two or more threads share even 1-3 heads."""
    return 0 if cfg.max_seq < 256 else min(16, -(-16 // cfg.kv_heads))


@dataclass(frozen=True)
class QuantWeight:
    """A pre-quantized [K, N] weight kept as the file stores it (GGUF blocks):
    the operands of ``op`` after x, as (array, sqk dtype) pairs, and its
    attributes.  ``op`` "matmul_q": q, scales and, when the scheme has them,
    zeros and supers (``ir.blocks.to_matmul_q``); "matmul_ggml": the file's
    blocks u8 [N, row bytes] (Q6_K, Q5_0 at their own 6.5625 / 5.5 bits per weight)."""
    operands: tuple
    attrs: dict
    op: str = "matmul_q"
    shape: tuple = ()          # (K, N)

    @classmethod
    def from_blocks(cls, ggml_type, raw, shape) -> "QuantWeight":
        """The weight [K, N] of a GGML matrix stored [N, K] (raw: uint8 rows):
        ``matmul_ggml`` on the blocks where a kernel reads them (Q6_K, Q5_0), else
        matmul_q operands (as ``ir.blocks.Weight`` chooses)."""
        from ..ir.blocks import GGML_BLOCKS, block_type, to_matmul_q
        n, k = shape
        name = block_type(ggml_type).name
        if name in GGML_BLOCKS:
            return cls(((np.asarray(raw).reshape(n, -1).view(np.uint8), "u8"),), {"type": name},
                       "matmul_ggml", (k, n))
        m = to_matmul_q(ggml_type, raw, shape)
        return cls(tuple(m["inputs"]), dict(m["attrs"]), "matmul_q", (k, n))

    def as_matmul_q(self) -> "QuantWeight":
        """The same weight as matmul_q operands: Q6_K's blocks (matmul_ggml)
        split by ``ir.blocks.to_matmul_q`` (the weights bit for bit; 10 bits
        per weight stored instead of 6.5625), others as they are."""
        if self.op == "matmul_q":
            return self
        from ..ir.blocks import to_matmul_q
        k, n = self.shape
        m = to_matmul_q(self.attrs["type"], self.operands[0][0], (n, k))
        return QuantWeight(tuple(m["inputs"]), dict(m["attrs"]), "matmul_q", (k, n))

    def dequantize(self) -> np.ndarray:
        if self.op == "matmul_ggml":
            from ..ir.blocks import dequantize
            k, n = self.shape
            return dequantize(self.attrs["type"], self.operands[0][0], (n, k)).T
        from ..ir.ops import dequantize_weight
        q, scales, zeros, supers = [a for a, _ in self.operands] + [None] * (4 - len(self.operands))
        return dequantize_weight(q, scales, zeros, self.attrs["group"], supers, self.attrs.get("super_group", 0))


def as_f32(w) -> np.ndarray:
    """A weight as f32 values (a QuantWeight dequantized)."""
    return w.dequantize() if isinstance(w, QuantWeight) else np.asarray(w, np.float32)


def embedding_table(weights) -> np.ndarray:
    """The [vocab, hidden] f32 embedding: "embed", or the tied lm_head's transpose."""
    return as_f32(weights["embed"]) if "embed" in weights else as_f32(weights["lm_head"]).T


ACTIVATIONS = ("none", "int8")


def check_activations(activations: str, act_group: int) -> None:
    """ValueError unless (activations, act_group) is a decoder's numerics:
    "none" with 0, or "int8" with act_group >= 0 (0: the weight group)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if isinstance(act_group, bool) or not isinstance(act_group, (int, np.integer)) or act_group < 0 or \
            (act_group and activations != "int8"):
        raise ValueError(f"act_group={act_group!r}: values per activation scale (e.g. 32) with activations=int8, "
                         "or 0 (one scale per row and weight group)")


def build_decoder(cfg: LlamaConfig, weights, tokens: int = 1, kv_dtype: str = "f32",
                  all_logits: bool = False, fuse: bool = True, attn_splits: int | None = None,
                  activations: str = "none", act_group: int = 0) -> Graph:
    """The graph of one decoding step (module docstring), or with ``tokens=T > 1``
    of a prefill chunk: token i64[T] at positions pos..pos+T-1 (pos the start),
    every projection a GEMM with M = T, attention_decode over the chunk writing
    its T cache rows, and the logits [1, vocab] of one token only, the row
    ``last`` (i64[1], an input: a chunk padded past the prompt's end returns
    the logits of its last real token).
    ``kv_dtype``: the caches' dtype, "f32" or "f16" (rounded on write, widened
    on read; the math stays f32), or "i8" (codes with one f32 scale per row of
    a head, state inputs k_scale.L / v_scale.L beside the caches; see
    attention_decode).  ``attn_splits``: a decode step's attention in that
    many parts of the sequence per KV head, merged (attention_merge; None:
    ``attention_splits(cfg)``, 0: unsplit).
    ``all_logits=True``: the logits [T, vocab] of every token of the chunk
    and no ``last`` input (what perplexity scores, llm/perplexity.py).

    ``weights`` maps names to arrays (f32, or anything numpy converts to it) or
    QuantWeight (a matmul_q); biases "bq.L", "bk.L", "bv.L" with
    ``cfg.qkv_bias``.  Without "embed" the lm_head [hidden, vocab] is also the
    embedding table (tied): the gather reads columns of that one constant,
    which the decode graph's artifact stores once (its GEMV reads b as
    stored; a GEMM of a prefill chunk reads it packed, a layout of its own).

    ``fuse=True``: q/k/v are one matmul over the three weights side by side
    (``fused_weight``; biases added to the joined row) and the gate and up
    projections (w1, w3) another, each split by slices: per layer two matmul
    kernels, and their synchronisation points, instead of five (the outputs
    are the same numbers: each column's dot product is unchanged).  Weights
    that cannot be joined stay separate.  ``fuse=False``: one matmul per
    weight, as the module docstring writes it.

    ``activations="int8"``: every QuantWeight matmul quantizes its input x to
    int8 (matmul_q {activations=int8, act_group}; Q6_K through its matmul_q
    operands, ``QuantWeight.as_matmul_q``), ``act_group=32`` as llama.cpp's
    q8 activation blocks; float weights stay float matmuls (as llama.cpp's
    F32 / F16 ones).  Not the default's numbers: activation rounding."""
    check_activations(activations, act_group)
    if tokens < 1:
        raise ValueError(f"build_decoder needs tokens >= 1, got {tokens}")
    if tokens > cfg.max_seq:
        raise ValueError(f"a chunk of {tokens} tokens does not fit in the KV cache of length {cfg.max_seq}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f'kv_dtype must be one of {", ".join(KV_DTYPES)}, got {kv_dtype!r}')
    splits = (attention_splits(cfg) if attn_splits is None else attn_splits) if tokens == 1 else 0
    b = GraphBuilder("llama_decode" if tokens == 1 else f"llama_prefill{tokens}")
    consts = {}

    def const(name, dtype="f32", arr=None):
        key = (name, dtype)
        if key not in consts:
            consts[key] = b.const(weights[name] if arr is None else arr, dtype, name=name.replace(".", "_"))
        return consts[key]

    def quant_operands(name, w):   # one constant per operand, shared by every reader
        return [const(name + suffix, d, a) for suffix, (a, d) in zip(("", ".scales", ".zeros", ".supers"), w.operands)]

    int8 = activations == "int8"

    def weight(name):   # with int8 activations a pre-quantized weight as matmul_q operands
        w = weights[name]
        return w.as_matmul_q() if int8 and isinstance(w, QuantWeight) else w

    def linear(x, name, fused=None):   # fused: a weight made here (fused_weight), not weights[name]
        w = weight(name) if fused is None else fused
        if not isinstance(w, QuantWeight):
            return b.matmul(x, const(name, arr=fused))
        if int8:
            return b.op(w.op, x, *quant_operands(name, w), activations="int8",
                        act_group=min(act_group, weight_shape(w)[0]), **w.attrs)
        return b.op(w.op, x, *quant_operands(name, w), **w.attrs)

    token, pos = b.input("token", (tokens,), "i64"), b.input("pos", (1,), "i64")
    cache = (cfg.kv_heads, cfg.max_seq, cfg.head_dim)
    caches = {n: b.input(n, cache if "_cache." in n else cache[:2], kv_dtype if "_cache." in n else "f32")
              for n in state_names(cfg, kv_dtype)}
    hq, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim
    lead = () if tokens == 1 else (tokens,)   # one token: q[Hq, D]; a chunk: q[T, Hq, D]
    inv = rope_frequencies(cfg)
    inv_c = [] if inv is None else [b.const(inv, "f32", name="rope_inv_freq")]

    def rope(v, kind, i):   # kind "q" or "k"
        heads = hq if kind == "q" else hkv
        v = b.reshape(v, shape=(tokens, heads, d))
        if cfg.qk_norm:   # per head: over D
            v = b.rmsnorm(v, const(f"{kind}_norm.{i}"), eps=cfg.eps)
        if kind == "q" and cfg.query_scale and cfg.query_scale != float(np.float32(1 / np.sqrt(d))):
            v = b.mul(v, b.const(np.float32(cfg.query_scale * np.sqrt(d)), "f32"))   # the kernel scales by 1/sqrt(D)
        r = b.rope(v, pos, *inv_c, theta=layer_theta(cfg, i), style=cfg.rope_style)
        return b.reshape(r, shape=(heads, d)) if tokens == 1 else r

    def post_norm(y, name):   # Gemma's sandwich norms
        return b.rmsnorm(y, const(name), eps=cfg.eps) if cfg.post_norms else y

    def act(gate, up):
        if cfg.act == "gelu_tanh":
            return b.mul(b.gelu(gate, approximate="tanh"), up)
        return b.swiglu(gate, up)

    def qkv(h, i):   # q/k/v of h: one GEMV over the concatenated weights (biases added before the split)
        names = [f"w{kind}.{i}" for kind in "qkv"]
        w = fused_weight([weight(n) for n in names]) if fuse else None
        if w is None:
            ys = [linear(h, n) for n in names]
            return [b.add(y, const(f"b{kind}.{i}")) for y, kind in zip(ys, "qkv")] if cfg.qkv_bias else ys
        y = linear(h, f"wqkv.{i}", w)
        if cfg.qkv_bias:
            y = b.add(y, const(f"bqkv.{i}", arr=np.concatenate([as_f32(weights[f"b{kind}.{i}"]) for kind in "qkv"])))
        return split_columns(y, [weight_shape(weights[n])[1] for n in names])

    def split_columns(y, widths):
        out, col = [], 0
        for n in widths:
            out.append(b.slice(y, starts=(col,), ends=(col + n,), axes=(1,)))
            col += n
        return out

    def gate_up(h, i):   # w1 (gate) and w3 (up) of h, one GEMV when they fuse
        names = [f"w1.{i}", f"w3.{i}"]
        w = fused_weight([weight(n) for n in names]) if fuse else None
        if w is None:
            return [linear(h, n) for n in names]
        return split_columns(linear(h, f"w13.{i}", w), [weight_shape(weights[n])[1] for n in names])

    table = weights if "embed" in weights else {"lm_head": weight("lm_head")}   # tied: one table's constants
    x = emb = embed(b, cfg, table, const, quant_operands, token)      # [T, H]
    if cfg.embed_scale:
        x = b.mul(x, b.const(np.float32(cfg.embed_scale), "f32"))
    new_caches = []
    for i in range(cfg.layers):
        h = b.rmsnorm(x, const(f"attn_norm.{i}"), eps=cfg.eps)
        q, k, v = qkv(h, i)
        q, k = rope(q, "q", i), rope(k, "k", i)
        v = b.reshape(v, shape=lead + (hkv, d))
        scales = [caches[f"k_scale.{i}"], caches[f"v_scale.{i}"]] if kv_dtype == "i8" else []
        window = layer_window(cfg, i)
        o, *kv = b.attention_decode(q, k, v, caches[f"k_cache.{i}"], caches[f"v_cache.{i}"], pos, *scales,
                                    splits=splits, **({"window": window} if window else {}))
        if splits:
            o = b.attention_merge(o, dtype="f32")
        new_caches += kv
        x = b.add(x, post_norm(linear(b.reshape(o, shape=(tokens, hq * d)), f"wo.{i}"), f"post_attn_norm.{i}"))
        h = b.rmsnorm(x, const(f"ffn_norm.{i}"), eps=cfg.eps)
        ff = act(*gate_up(h, i))
        x = b.add(x, post_norm(linear(ff, f"w2.{i}"), f"post_ffn_norm.{i}"))
        if cfg.lookup_experts:   # routed on the hidden state, experts fed by the embedding
            experts = [b.matmul(b.relu(b.matmul(emb, const(f"mole_up.{i}.{e}"))), const(f"mole_down.{i}.{e}"))
                       for e in range(cfg.lookup_experts)]
            route = b.softmax(b.matmul(h, const(f"mole_router.{i}")))                  # [T, E]
            if tokens == 1:
                x = b.add(x, b.matmul(route, b.concat(*experts, axis=0)))         # [1, E] @ [E, H]
            else:                                                   # per row: sum_e route[:, e] * expert_e
                for e, ex in enumerate(experts):
                    x = b.add(x, b.mul(b.slice(route, starts=(e,), ends=(e + 1,), axes=(1,)), ex))
    if tokens > 1 and not all_logits:
        x = b.gather(x, b.input("last", (1,), "i64"))
    logits = linear(b.rmsnorm(x, const("final_norm"), eps=cfg.eps), "lm_head")
    return b.output(logits, *new_caches)


def weight_shape(w) -> tuple:
    """(K, N) of a [K, N] weight: an array or a QuantWeight."""
    if isinstance(w, QuantWeight) and not w.shape:   # made by hand: matmul_q's q is [K, N]
        return tuple(w.operands[0][0].shape) if w.op == "matmul_q" else tuple(w.dequantize().shape)
    return tuple(w.shape)


def fused_weight(ws: list):
    """The weights ``ws`` (each [K, N_i]) side by side as one [K, sum N_i]
    weight, so one GEMV computes every x @ w_i (columns in order), or None
    when they cannot be one: different K, float beside quantized, or
    QuantWeights of different ops, attributes or operand dtypes (a GGUF file
    may store q/k/v in different block types).  Float weights become one f32
    array; QuantWeight operands are joined along N as stored, bit for bit
    (matmul_q's q, scales, zeros [.., N] and supers [.., N, 2] on axis 1,
    matmul_ggml's blocks [N, row bytes] on axis 0), so each column keeps its
    blocks and every output equals the unfused one."""
    k = {weight_shape(w)[0] for w in ws}
    if len(k) != 1:
        return None
    if not any(isinstance(w, QuantWeight) for w in ws):
        return np.concatenate([np.asarray(w, np.float32) for w in ws], axis=1)
    w0 = ws[0]
    if not all(isinstance(w, QuantWeight) and w.op == w0.op and w.attrs == w0.attrs
               and [d for _, d in w.operands] == [d for _, d in w0.operands] for w in ws):
        return None
    axis = 0 if w0.op == "matmul_ggml" else 1
    operands = tuple((np.concatenate([w.operands[j][0] for w in ws], axis=axis), d)
                     for j, (_, d) in enumerate(w0.operands))
    return QuantWeight(operands, dict(w0.attrs), w0.op, (k.pop(), sum(weight_shape(w)[1] for w in ws)))


def embed(b: GraphBuilder, cfg: LlamaConfig, weights, const, quant_operands, token):
    """x [T, H] of the ``token`` ids [T]: rows of "embed" [V, H], or (tied)
    columns of the lm_head [H, V]: of a float table by ``gather`` on axis 1,
    of a QuantWeight by ``gather_q`` / ``gather_ggml``, which read the
    lm_head's constants in their packed layout (the table is stored once)."""
    if "embed" in weights:
        return b.gather(const("embed"), token)
    w = weights["lm_head"]
    if isinstance(w, QuantWeight):      # matmul_q -> gather_q, matmul_ggml -> gather_ggml
        return b.op(w.op.replace("matmul", "gather"), token, *quant_operands("lm_head", w), **w.attrs)
    cols = b.gather(const("lm_head"), token, axis=1)                    # [H, T]
    return b.reshape(cols, shape=(1, cfg.hidden)) if token.type.shape[0] == 1 else b.transpose(cols, perm=(1, 0))


def int8_round_trip(x: np.ndarray, group: int) -> np.ndarray:
    """x [T, K] quantized to int8 per row and group of ``group`` values
    (``ir.ops.quantize_rows_i8``: d = max|x| / 127, round half to even) and
    back to f32 (d * xq): what matmul_q {activations=int8} multiplies."""
    from ..ir.ops import quantize_rows_i8

    x = np.asarray(x, np.float32)
    group = max(1, min(group, x.shape[-1]))
    xq, d = quantize_rows_i8(x, group)
    return (np.repeat(d, group, axis=1)[:, :x.shape[-1]] * xq).astype(np.float32)


def reference_logits(cfg: LlamaConfig, weights: dict, tokens, capture=None, activations: str = "none",
                     act_group: int = 0) -> np.ndarray:
    """Logits [T, vocab] of every prefix of ``tokens`` (positions 0..T-1): plain
    numpy, causal attention over the whole sequence at once, no cache;
    QuantWeight matrices dequantized in numpy.  ``capture(name, x)`` is called
    with each linear layer's weight name and its input x [T, K] (the same
    array object for the layers that read one input: q/k/v, w1/w3), which is
    how llm/calibrate.py collects calibration statistics.
    ``activations="int8"``: the input of each QuantWeight layer rounded as
    matmul_q {activations=int8, act_group} quantizes it (``int8_round_trip``;
    act_group 0: the weight's group), then multiplied in f32, as
    ``build_decoder(..., activations="int8")`` computes within f32 rounding."""
    check_activations(activations, act_group)
    w = weights
    t = len(tokens)
    hq, hkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim

    def rms(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(cfg.eps)) * as_f32(s)

    def post(y, name):
        return rms(y, w[name]) if cfg.post_norms else y

    def lin(x, name):
        if capture is not None:
            capture(name, x)
        if activations == "int8" and isinstance(w[name], QuantWeight):
            x = int8_round_trip(x, act_group or w[name].as_matmul_q().attrs["group"])
        return x @ as_f32(w[name])

    def proj(x, i, kind):
        y = lin(x, f"w{kind}.{i}")
        return y + as_f32(w[f"b{kind}.{i}"]) if cfg.qkv_bias else y

    inv0 = rope_frequencies(cfg)
    i1, i2 = (np.arange(d // 2), np.arange(d // 2) + d // 2) if cfg.rope_style == "half" else \
        (np.arange(0, d, 2), np.arange(1, d, 2))

    def rope(x, i):  # [T, heads, D]: pairs (i1, i2) rotated, at layer i's base
        inv = (layer_theta(cfg, i) ** (-np.arange(d // 2) * 2.0 / d)).astype(np.float32) if inv0 is None else inv0
        ang = np.arange(t, dtype=np.float32)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]       # [T, 1, D/2]
        y = np.empty_like(x)
        x1, x2 = x[..., i1], x[..., i2]
        y[..., i1], y[..., i2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return y

    def heads(x, i, kind, n):   # [T, n, D], per-head normed (qk_norm) and rotated
        x = proj(x, i, kind).reshape(t, n, d)
        return rope(rms(x, w[f"{kind}_norm.{i}"]) if cfg.qk_norm else x, i)

    table = embedding_table(w)
    x = table[np.asarray(tokens)]
    if cfg.embed_scale:
        x = x * np.float32(cfg.embed_scale)
    ii, jj = np.arange(t)[:, None], np.arange(t)[None, :]
    for i in range(cfg.layers):
        win = layer_window(cfg, i)   # query ii sees keys jj with ii - win < jj <= ii
        mask = np.where((jj > ii) | ((ii - jj >= win) if win else False), -np.inf, 0).astype(np.float32)
        h = rms(x, w[f"attn_norm.{i}"])
        q = heads(h, i, "q", hq)
        k = np.repeat(heads(h, i, "k", hkv), hq // hkv, axis=1)
        v = np.repeat(proj(h, i, "v").reshape(t, hkv, d), hq // hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k)
        s = (s * np.float32(cfg.query_scale) if cfg.query_scale else s / np.float32(np.sqrt(d))) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(t, hq * d)
        x = x + post(lin(o, f"wo.{i}"), f"post_attn_norm.{i}")
        h = rms(x, w[f"ffn_norm.{i}"])
        g = lin(h, f"w1.{i}")
        if cfg.act == "gelu_tanh":
            from ..ir.ops import gelu
            a = gelu(g.astype(np.float32), "tanh")
        else:
            a = g / (1 + np.exp(-g))
        x = x + post(lin(a * lin(h, f"w3.{i}"), f"w2.{i}"), f"post_ffn_norm.{i}")
        if cfg.lookup_experts:
            e0 = table[np.asarray(tokens)]
            r = lin(h, f"mole_router.{i}")
            r = np.exp(r - r.max(-1, keepdims=True))
            r /= r.sum(-1, keepdims=True)
            for e in range(cfg.lookup_experts):
                x = x + r[:, e:e + 1] * lin(np.maximum(lin(e0, f"mole_up.{i}.{e}"), 0), f"mole_down.{i}.{e}")
    return lin(rms(x, w["final_norm"]), "lm_head").astype(np.float32)


class Decoder:
    """A compiled decoder: ``prefill(ids)`` runs a prompt in chunks of
    ``prefill_chunk`` tokens, one compiled call each, ``step(token)`` one token
    at a time; both return the logits [vocab] of the next token and advance
    the position.  The chunk's Module is compiled when first needed and shares
    the step Module's KV caches (``module.state``; ``kv_dtype="f16"`` stores
    them in f16, "i8" as int8 codes with per-row scales) and, when the packed weights are the same bytes, its
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
    token by token instead.

    ``activations="int8", act_group=32``: the pre-quantized (GGUF) weights'
    matmuls quantize their inputs as llama.cpp does (build_decoder);
    ``numerics`` reports the two (an LLM artifact records them).

    ``generate`` and ``chat`` decode text with a ``tokenizer``
    (llm/tokenizer.py).  ``sqk.llm.load`` makes one from a model's files, with
    ``keep_ir=False``: the graphs, whose constants copy the weights, are dropped
    once compiled (``weights`` stays: a loader's mapping reads the
    memory-mapped file again when the chunk module is compiled)."""

    native_generate = True   # generate()'s decode loop in C: host sqk_llm_decode, riscv64 the runner (llm/native.py)
    generate_runner = None   # its executable: an LLM artifact's, or linked on first use

    def __init__(self, cfg: LlamaConfig, weights=None, target: str = "host", seed: int = 0,
                 kv_dtype: str = "f32", prefill_chunk: int = 64, tokenizer=None, keep_ir: bool = True,
                 calibration_text=None, calibration_ctx: int = 512, activations: str = "none",
                 act_group: int = 0, **compile_options):
        from ..compiler.driver import compile

        check_activations(activations, act_group)
        self.activations, self.act_group = activations, int(act_group)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.weights = weights if weights is not None else random_weights(cfg, seed)
        self.kv_dtype = kv_dtype
        self.prefill_chunk = min(prefill_chunk, cfg.max_seq)
        self.budget = None
        if calibration_text is not None or isinstance(compile_options.get("max_error"), str):
            from .calibrate import calibrated_decoder

            if calibrated_decoder(self, target, keep_ir, calibration_text, calibration_ctx, compile_options):
                return
        self.target, self.compile_options = target, compile_options
        self.graph = build_decoder(cfg, self.weights, kv_dtype=kv_dtype, **self.numerics)
        self.module = compile(self.graph, target=target, state=state_names(cfg, kv_dtype), **compile_options)
        self.chunk_modules: dict = {}   # chunk length (or (length, "all"): all_logits) -> Module
        self.keep_ir = keep_ir   # False: drop each compiled graph (its constants copy the weights)
        if not keep_ir:
            self.graph = self.module.ir = None
        self.pos = 0

    @classmethod
    def from_modules(cls, cfg: LlamaConfig, modules: dict, tokenizer=None, kv_dtype: str = "f32",
                     prefill_chunk: int = 1, activations: str = "none", act_group: int = 0) -> "Decoder":
        """A Decoder over modules compiled before ({1: the step, prefill_chunk:
        its chunk when >= 2}; an LLM artifact's, llm/artifact.py): no weights,
        no compiler."""
        self = cls.__new__(cls)
        self.cfg, self.tokenizer, self.weights, self.kv_dtype = cfg, tokenizer, None, kv_dtype
        self.prefill_chunk, self.keep_ir, self.budget = prefill_chunk, False, None
        self.activations, self.act_group = activations, act_group
        self.module, self.graph = modules[1], None
        self.target, self.compile_options = self.module.target, {}
        self.chunk_modules = {t: m for t, m in modules.items() if t != 1}
        for m in self.chunk_modules.values():
            m.share_state(self.module)
        self.pos = 0
        return self

    @property
    def numerics(self) -> dict:
        """``activations`` and ``act_group`` of the pre-quantized weights' matmuls (build_decoder)."""
        return {"activations": self.activations, "act_group": self.act_group}

    @property
    def config(self) -> LlamaConfig:
        return self.cfg

    def reset(self) -> None:
        """Start a new sequence: zero the caches, position 0."""
        self.module.reset_state()
        self.pos = 0

    def chunk_module(self, tokens: int, all_logits: bool = False):
        """The Module of a ``tokens``-long chunk, tokens > 1 (compiled on first
        use; inputs token, pos, last), its state the step module's arrays.
        ``all_logits``: the chunk returning every row's logits (no ``last``)."""
        if tokens < 2:
            raise ValueError(f"a prefill chunk has at least 2 tokens, got {tokens}: step() runs one")
        key = (tokens, "all") if all_logits else tokens
        m = self.chunk_modules.get(key)
        if m is None and self.weights is None:
            raise ValueError(f"this Decoder has no module for chunks of {tokens} tokens{' (all logits)' * all_logits} "
                             f"and no weights to compile one (it has {sorted(self.chunk_modules, key=str)})")
        if m is None:
            from ..compiler.driver import compile

            g = build_decoder(self.cfg, self.weights, tokens=tokens, kv_dtype=self.kv_dtype, all_logits=all_logits,
                              **self.numerics)
            m = compile(g, target=self.target, state=state_names(self.cfg, self.kv_dtype), **self.compile_options)
            m.share_state(self.module)
            if not self.keep_ir:
                m.ir = None
            for other in [self.module, *self.chunk_modules.values()]:   # one mapping per weight layout
                if m.share_constants(other):
                    break
            self.chunk_modules[key] = m
        return m

    def step(self, token: int) -> np.ndarray:
        if not 0 <= int(token) < self.cfg.vocab:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.cfg.vocab})")
        if self.pos >= self.cfg.max_seq:
            raise ValueError(f"position {self.pos} is beyond the KV cache length {self.cfg.max_seq}: "
                             "reset() to start a new sequence")
        if self.target == "host":   # the step's run bound once (llm/native.py): one runtime call
            from .native import bound_step

            logits = bound_step(self).run(int(token), self.pos)
        else:
            logits = self.module(token=np.array([token], np.int64), pos=np.array([self.pos], np.int64))[0]
        self.pos += 1
        return logits

    def prefill(self, ids) -> np.ndarray:
        """Run the tokens ``ids`` from the current position in chunks of
        ``prefill_chunk`` (the last one padded, or token by token: class
        docstring); returns the logits [vocab] of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.check_prompt(ids)
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

    def check_prompt(self, ids: np.ndarray) -> None:
        """ValueError unless ``ids`` (int64 [n]) are n >= 1 vocabulary ids that fit in the cache from pos."""
        if not ids.size:
            raise ValueError("prefill needs at least one token")
        bad = ids[(ids < 0) | (ids >= self.cfg.vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.vocab})")
        if self.pos + ids.size > self.cfg.max_seq:
            raise ValueError(f"{ids.size} tokens from position {self.pos} go beyond the KV cache length "
                             f"{self.cfg.max_seq}: reset() to start a new sequence")

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
        reset() starts a new sequence.  Host: the prompt is prefilled from
        Python, then the decode loop runs in C (llm/native.py ``decode_host``:
        the same tokens as the Python loop, ``stream`` called in groups of a few
        tokens).  riscv64, from position 0: the whole generation runs in one
        runner process (llm/native.py).  ``native_generate = False``: the
        Python loop, one ``step`` call per token (riscv64: one runner process
        per chunk and token)."""
        ids = self._encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        stop = set(self.cfg.eos_ids if stop is None else ([stop] if isinstance(stop, int) else stop))
        if self.target != "host" and self.pos == 0 and self.native_generate:
            from .native import generate_native

            return generate_native(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stop, stream)
        from .sampling import Rng, sample

        logits = self.prefill(ids)
        if self.target == "host" and self.native_generate:
            from .native import decode_host

            return decode_host(self, logits, max_new_tokens, temperature, top_k, top_p, seed, stop, stream)
        rng = Rng(seed) if temperature > 0 else None
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
