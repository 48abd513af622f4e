"""Hugging Face checkpoints -> (LlamaConfig, weights) for ``sqk.llm``.

A model directory holds ``config.json``, the weights as ``model.safetensors``
or shards named by ``model.safetensors.index.json``, and optionally
``generation_config.json`` (EOS ids) and the tokenizer files (read by
llm/tokenizer.py).  Architectures: LlamaForCausalLM (Llama 2/3 with
``rope_scaling`` llama3, SmolLM/SmolLM2, TinyLlama), MistralForCausalLM,
Qwen2ForCausalLM (q/k/v biases) and Gemma3ForCausalLM (Gemma 3's text model:
GeGLU with gelu-tanh, q/k norms per head, sandwich norms, the embedding
scaled by sqrt(hidden), sliding-window layers with their own rope base; its
RMSNorm weights w are stored as the offset of the scale 1 + w, which is what
sqk's weights hold, as llama.cpp's converter writes them).  Both spellings of
the rope settings are read: ``rope_theta`` + ``rope_scaling`` and
transformers 5's ``rope_parameters`` (per layer type for Gemma 3).

Safetensors are read here, from the documented layout (8-byte little-endian
header length, JSON header, then the data): every tensor is a view of one
read-only ``np.memmap`` per file, so the weights are not copied into RAM by
reading.  F32 tensors stay views (HF Linear weights are [out, in]: the
[in, out] matrix sqk's matmul reads is a transposed view); F16 and BF16 are
converted to f32 when a weight is looked up (``HFWeights``), one tensor at a
time (bf16 -> f32 is exact; sqk's matmul computes in f32).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

from ...llm.decoder import LlamaConfig
from ...llm.errors import LLMLoadError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Gemma3ForCausalLM": "gemma3"}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3"}
GEMMA_NORMS = ("attn_norm", "ffn_norm", "final_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def read_safetensors(path: str) -> dict[str, tuple[np.ndarray, str]]:
    """{name: (memory-mapped array, safetensors dtype)} of one file; BF16
    tensors come as their raw uint16 bits."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LLMLoadError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise LLMLoadError(f"{path}: truncated safetensors file: the header claims {n} bytes, the file has "
                               f"{size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LLMLoadError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    base = 8 + n
    mm = np.memmap(path, np.uint8, "r") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LLMLoadError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if kind not in SAFETENSORS_DTYPES:
            raise LLMLoadError(f"{path}: tensor {name!r} has dtype {kind}; sqk reads F32, F16 and BF16")
        d = SAFETENSORS_DTYPES[kind]
        if hi - lo != math.prod(shape) * d.itemsize or lo < 0:
            raise LLMLoadError(f"{path}: tensor {name!r} spans bytes [{lo}, {hi}), not the "
                               f"{math.prod(shape) * d.itemsize} bytes of {kind}{list(shape)}")
        if base + hi > size:
            raise LLMLoadError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + hi}, "
                               f"the file has {size}")
        out[name] = (mm[base + lo:base + hi].view(d).reshape(shape), kind)
    return out


def to_f32(a: np.ndarray, kind: str) -> np.ndarray:
    """f32 values of a safetensors array (a view when it is F32 already)."""
    if kind == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a if kind == "F32" else a.astype(np.float32)


class HFWeights(Mapping):
    """sqk weight names -> f32 arrays, converted on lookup from the memory-
    mapped checkpoint tensors ([out, in] Linear weights as transposed views)."""

    def __init__(self, tensors: dict[str, tuple[np.ndarray, str]], names: dict[str, tuple[str, bool]],
                 shifted: tuple = ()):
        self._tensors, self._names = tensors, names     # names: {sqk name: (hf name, transpose)}
        self._shifted = shifted    # kinds of weights stored as w for the scale 1 + w (Gemma's norms)

    def __getitem__(self, name):
        hf, transpose = self._names[name]
        a = to_f32(*self._tensors[hf])
        if name.split(".")[0] in self._shifted:
            a = np.float32(1) + a     # f32, as Gemma3RMSNorm's 1.0 + weight.float()
        return a.T if transpose else a

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def dtypes(self) -> set[str]:
        return {self._tensors[hf][1] for hf, _ in self._names.values()}


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LLMLoadError(f"{path}: missing ({what})") from None
    except ValueError as e:
        raise LLMLoadError(f"{path}: not valid JSON ({e})") from None


def config_from_hf(c: dict, where: str, generation: dict | None = None) -> LlamaConfig:
    """LlamaConfig of a config.json dict (``where`` names it in errors);
    ``generation`` is generation_config.json's, whose eos_token_id wins."""
    archs = c.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None) or \
        (MODEL_TYPES.get(c.get("model_type")) if not archs else None)
    if arch is None:
        raise LLMLoadError(f"{where}: architecture {', '.join(archs) or c.get('model_type')!s} is not supported; "
                           f"sqk loads {', '.join(ARCHITECTURES)}")

    def need(key):
        if key not in c:
            raise LLMLoadError(f"{where}: {key} is missing")
        return c[key]

    act = c.get("hidden_activation", c.get("hidden_act")) if arch == "gemma3" else c.get("hidden_act", "silu")
    if arch == "gemma3" and act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise LLMLoadError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    if arch != "gemma3" and act != "silu":
        raise LLMLoadError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (silu only)")
    if c.get("mlp_bias") or (arch != "qwen2" and c.get("attention_bias")):
        raise LLMLoadError(f"{where}: biases on the MLP or the attention output projection are not supported")
    rope = dict(c.get("rope_parameters") or {})
    gemma = {}
    if arch == "gemma3":
        gemma, rope = gemma3_fields(c, rope, where, need)
    scaling = c.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    params = {**scaling, **rope}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise LLMLoadError(f"{where}: partial_rotary_factor is not supported")
    if kind == "default":
        rope_scaling = ()
    elif kind == "llama3":
        rope_scaling = ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                        float(params["high_freq_factor"]),
                        float(params.get("original_max_position_embeddings") or need("max_position_embeddings")))
    else:
        raise LLMLoadError(f"{where}: rope scaling {kind!r} is not supported (llama3 only)")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    eos = (generation or {}).get("eos_token_id", c.get("eos_token_id"))
    eos = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    bos = (generation or {}).get("bos_token_id", c.get("bos_token_id"))
    return LlamaConfig(
        vocab=int(need("vocab_size")), hidden=hidden, layers=int(need("num_hidden_layers")), heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=int(c.get("head_dim") or hidden // heads),
        ffn=int(need("intermediate_size")), theta=theta, eps=float(c.get("rms_norm_eps", 1e-6)),
        qkv_bias=arch == "qwen2",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), rope_scaling=rope_scaling,
        bos_id=None if bos is None else int(bos), eos_ids=eos,
        context_length=int(c.get("max_position_embeddings") or 0), arch=arch,
        max_seq=max(1, int(c.get("max_position_embeddings") or 2048)),
        sliding_window=int(c["sliding_window"]) if c.get("sliding_window") and
        (arch in ("mistral", "gemma3") or c.get("use_sliding_window")) else 0, **gemma)


def gemma3_fields(c: dict, rope: dict, where: str, need) -> tuple[dict, dict]:
    """(LlamaConfig fields of a Gemma 3 text config, the global layers' rope
    parameters).  Local layers: ``layer_types`` "sliding_attention", else
    every layer but each ``sliding_window_pattern``-th (6); rope bases from
    ``rope_parameters`` per layer type, else ``rope_theta`` (1e6) and
    ``rope_local_base_freq`` (1e4)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(key):
            raise LLMLoadError(f"{where}: {key} is not supported")
    if c.get("use_bidirectional_attention"):
        raise LLMLoadError(f"{where}: use_bidirectional_attention is not supported (a decoder is causal)")
    layers = int(need("num_hidden_layers"))
    types = c.get("layer_types")
    if types is None:
        pattern = int(c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        raise LLMLoadError(f"{where}: layer_types {types!r} must name full_attention or sliding_attention for "
                           f"each of the {layers} layers")
    local = dict(rope.get("sliding_attention") or {})
    full = dict(rope.get("full_attention") or ({} if local else rope))
    for r in (local, full):
        if r.get("rope_type", "default") != "default":
            raise LLMLoadError(f"{where}: rope type {r['rope_type']!r} is not supported for Gemma 3 (default only)")
    full.setdefault("rope_theta", c.get("rope_theta", 1_000_000.0))
    theta_local = float(local.get("rope_theta", c.get("rope_local_base_freq", 10000.0)))
    hidden = int(need("hidden_size"))
    return dict(act="gelu_tanh", qk_norm=True, post_norms=True,
                embed_scale=float(np.float32(hidden ** 0.5)),
                query_scale=float(np.float32(float(c.get("query_pre_attn_scalar") or 256) ** -0.5)),
                window_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                theta_local=theta_local), full


def weight_names(cfg: LlamaConfig) -> dict[str, tuple[str, bool]]:
    """{sqk weight name: (HF tensor name, transpose)} of a Llama-family model."""
    names = {"final_norm": ("model.norm.weight", False)}
    if cfg.tie_embeddings:
        names["lm_head"] = ("model.embed_tokens.weight", True)      # [V, H] viewed as [H, V]
    else:
        names["embed"] = ("model.embed_tokens.weight", False)
        names["lm_head"] = ("lm_head.weight", True)
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        if cfg.post_norms:   # Gemma 3's names: post_attention_layernorm is the attention's post-norm
            names.update({f"attn_norm.{i}": (p + "input_layernorm.weight", False),
                          f"post_attn_norm.{i}": (p + "post_attention_layernorm.weight", False),
                          f"ffn_norm.{i}": (p + "pre_feedforward_layernorm.weight", False),
                          f"post_ffn_norm.{i}": (p + "post_feedforward_layernorm.weight", False)})
        else:
            names.update({f"attn_norm.{i}": (p + "input_layernorm.weight", False),
                          f"ffn_norm.{i}": (p + "post_attention_layernorm.weight", False)})
        if cfg.qk_norm:
            names.update({f"q_norm.{i}": (p + "self_attn.q_norm.weight", False),
                          f"k_norm.{i}": (p + "self_attn.k_norm.weight", False)})
        for ours, theirs in (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"), ("wv", "self_attn.v_proj"),
                             ("wo", "self_attn.o_proj"), ("w1", "mlp.gate_proj"), ("w3", "mlp.up_proj"),
                             ("w2", "mlp.down_proj")):
            names[f"{ours}.{i}"] = (p + theirs + ".weight", True)
        if cfg.qkv_bias:
            for kind in "qkv":
                names[f"b{kind}.{i}"] = (p + f"self_attn.{kind}_proj.bias", False)
    return names


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The [out, in] (or vector) shape of each HF tensor ``weight_names`` names."""
    h, qd, kvd, f, v = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn, cfg.vocab
    shapes = {"final_norm": (h,), "embed": (v, h), "lm_head": (v, h)}
    for i in range(cfg.layers):
        shapes.update({f"attn_norm.{i}": (h,), f"ffn_norm.{i}": (h,), f"wq.{i}": (qd, h), f"wk.{i}": (kvd, h),
                       f"wv.{i}": (kvd, h), f"wo.{i}": (h, qd), f"w1.{i}": (f, h), f"w3.{i}": (f, h),
                       f"w2.{i}": (h, f), f"bq.{i}": (qd,), f"bk.{i}": (kvd,), f"bv.{i}": (kvd,),
                       f"q_norm.{i}": (cfg.head_dim,), f"k_norm.{i}": (cfg.head_dim,),
                       f"post_attn_norm.{i}": (h,), f"post_ffn_norm.{i}": (h,)})
    return shapes


def safetensors_files(path: str) -> list[str]:
    """The weight files of a model directory: model.safetensors, or the shards
    its index names (each checked to exist)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json(index, "the shard index").get("weight_map", {}).values()))
        if not shards:
            raise LLMLoadError(f"{index}: the weight_map names no shard")
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise LLMLoadError(f"{os.path.join(path, missing[0])}: missing (a shard named in {index})")
        return [os.path.join(path, s) for s in shards]
    if os.path.exists(single):
        return [single]
    raise LLMLoadError(f"{path}: no model.safetensors or model.safetensors.index.json (the weights)")


def load_hf(path: str) -> tuple[LlamaConfig, HFWeights]:
    """(config, weights) of a Hugging Face model directory (module docstring);
    the weights are memory-mapped and checked against the config's shapes."""
    if not os.path.isdir(path):
        raise LLMLoadError(f"{path}: not a directory")
    cfg_path = os.path.join(path, "config.json")
    gen_path = os.path.join(path, "generation_config.json")
    generation = read_json(gen_path, "generation config") if os.path.exists(gen_path) else None
    cfg = config_from_hf(read_json(cfg_path, "the model's config.json"), cfg_path, generation)
    tensors, where = {}, {}
    for f in safetensors_files(path):
        for name, t in read_safetensors(f).items():
            tensors[name], where[name] = t, f
    names = weight_names(cfg)
    shapes = expected_shapes(cfg)
    for ours, (hf, _) in names.items():
        if hf not in tensors:
            raise LLMLoadError(f"{path}: tensor {hf!r} is missing from the safetensors files")
        if tuple(tensors[hf][0].shape) != shapes[ours]:
            raise LLMLoadError(f"{where[hf]}: tensor {hf!r} has shape {list(tensors[hf][0].shape)}, the config "
                               f"says {list(shapes[ours])}")
    return cfg, HFWeights(tensors, names, GEMMA_NORMS if cfg.arch == "gemma3" else ())
