"""GGUF files (llama.cpp's format) -> (LlamaConfig, weights, tokenizer) for ``sqk.llm``.

Read with the ``gguf`` package's GGUFReader, which memory-maps the file.
Architectures "llama" (Llama, Mistral, SmolLM2, TinyLlama: llama.cpp writes
them all as "llama"), "qwen2" (q/k/v biases) and "gemma3" (Gemma 3's text
model, as llama.cpp's graph runs it: the embedding scaled by sqrt(hidden),
per-head RMSNorm of q and k, post-attention and post-FFN norms, GeGLU with
gelu-tanh, query scale 1/sqrt(head_dim) (27B: 1/sqrt(hidden / heads)),
local layers -- every layer but each ``attention.sliding_window_pattern``-th
(6), or the pattern's array -- attending to the last ``attention.sliding_window``
positions with rope base ``rope.freq_base_swa`` (10000); the norm weights
are stored as 1 + w by the converter, what sqk's rmsnorm multiplies by);
the metadata ``{arch}.block_count``, ``.embedding_length``, ... give the config.

Tensors: F32 / F16 / BF16 are floats (F32 stays a view of the file; GGUF
matrices are stored [N rows = output features, K], so sqk's [K, N] matrix
is a transposed view).  Q8_0, Q4_0, Q4_1 and Q4_K matrices become
``matmul_q`` weights (``QuantWeight.from_blocks``: ``ir.blocks.to_matmul_q``):
the file's codes and scales as they are, never dequantized and requantized;
Q6_K and Q5_0 matrices are ``matmul_ggml`` on the file's blocks (6.5625 and
5.5 bits per weight, as stored).
``token_embd`` is the embedding; without an ``output`` tensor it is also the
lm_head (tied): one table, which the embedding reads with ``gather`` (float
types, column by column) or ``gather_q`` / ``gather_ggml`` (quantized: rows
of the weight from its packed constants), so it is stored once.  An untied
quantized ``token_embd`` is dequantized to f32 (the gather reads one row per
token; gather_q would need the matmul_q packing of a table no matmul reads).

Q/K row order: llama.cpp's converter permutes the rows of attn_q and attn_k
of "llama" models so that each head's rotary pairs are adjacent (2i, 2i+1)
instead of Hugging Face's (i, i + D/2).  sqk does not reorder the rows: it
runs the rope op with ``style="interleaved"`` on them, which rotates exactly
those pairs with the same frequencies.  q and k are permuted alike within a
head, so q . k -- all attention uses of them -- is unchanged (up to the order
of the float sum); v and the output projection are not permuted.  "qwen2"
is converted without the permutation: style "half".

Llama 3 files carry ``rope_freqs.weight`` (llama.cpp's frequency factors):
the rope frequencies are then theta ** (-2i/D) / factor_i, as llama.cpp
computes them.  Other rope scaling types are refused.
"""
from __future__ import annotations

import os
import struct
import sys
from collections.abc import Mapping

import numpy as np

from ...ir.blocks import QUANTIZED, block_type, dequantize
from ...ir.graph import IRError
from ...llm.decoder import LlamaConfig, QuantWeight
from ...llm.errors import LLMLoadError
from . import hf

ARCHS = ("llama", "qwen2", "gemma3")
VECTORS = ("attn_norm", "ffn_norm", "final_norm", "bq", "bk", "bv", "q_norm", "k_norm", "post_attn_norm",
           "post_ffn_norm")
FLOATS = ("F32", "F16", "BF16")


def reader_class():
    """GGUFReader with a faster ``_get``: the same arrays, sliced from a plain
    ndarray view of its memory map (np.memmap's per-slice bookkeeping made
    reading the 49152 vocabulary strings of SmolLM2 take 12 s), and string
    arrays' offsets read with struct (the same parts as GGUFReader's)."""
    from gguf import GGUFReader, GGUFValueType

    class Reader(GGUFReader):
        _itemsize: dict = {}

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:
                plain = self._plain = self.data.view(np.ndarray)
            size = self._itemsize.get(dtype) or self._itemsize.setdefault(dtype, np.dtype(dtype).itemsize)
            count = int(count)
            arr = plain[offset:offset + size * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            if order == "I" or (order == "<" and sys.byteorder == "little"):   # native already: no view
                return arr
            return arr.view(arr.dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            # an array of strings (the vocabulary): the parts GGUFReader makes, offsets read with struct
            if (GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I"
                    or sys.byteorder != "little"
                    or int(self._get(orig_offs, np.uint32)[0]) != GGUFValueType.STRING):
                return super()._get_field_parts(orig_offs, raw_type)
            self._get(orig_offs, np.uint8)   # makes self._plain
            plain, raw = self._plain, self._plain.data
            itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            parts, idxs, offs = [itype, alen], [], orig_offs + 12
            for _ in range(int(alen[0])):
                (n,) = struct.unpack_from("<Q", raw, offs)
                if offs + 8 + n > len(plain):
                    raise ValueError(f"GGUF string at byte {offs} runs past the end of the file")
                idxs.append(len(parts) + 1)
                parts += [plain[offs:offs + 8].view(np.uint64), plain[offs + 8:offs + 8 + n]]
                offs += 8 + n
            types = [GGUFValueType.ARRAY] + ([GGUFValueType.STRING] if int(alen[0]) else [])
            return offs - orig_offs, parts, idxs, types

    return Reader


def open_gguf(path: str):
    """A GGUFReader of ``path``, every tensor checked to lie inside the file."""
    try:
        GGUFReader = reader_class()
    except ImportError:
        raise LLMLoadError(f"{path}: reading GGUF files needs the gguf package (pip install 'sqk[llm]')") from None

    class Reader(GGUFReader):
        """The reader over a plain ndarray view of its memory map: the same bytes without
        np.memmap's bookkeeping on each of the ~10^6 slices that parse a vocabulary's
        strings (3.5x faster on SmolLM2's 49k tokens and merges)."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, v):
            self._data = v.view(np.ndarray) if isinstance(v, np.memmap) else v

    size = os.path.getsize(path)
    try:
        reader = Reader(path, "r")
    except Exception as e:   # the reader raises ValueError, IndexError, ... on a cut or garbled file
        raise LLMLoadError(f"{path}: truncated or malformed GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise LLMLoadError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte "
                               f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class GGUFWeights(Mapping):
    """sqk weight names -> f32 arrays or QuantWeight, made on lookup from the
    memory-mapped GGUF tensors."""

    def __init__(self, path: str, tensors: dict, names: dict[str, tuple[str, str]]):
        self.path, self._tensors, self._names = path, tensors, names   # names: {sqk name: (gguf name, how)}

    def __getitem__(self, name):
        gname, how = self._names[name]
        t = self._tensors[gname]
        kind = t.tensor_type.name
        n, k = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else (1, int(t.shape[0]))
        try:
            if how == "vector":
                return self._floats(t, kind).reshape(-1)
            if how in ("matrix", "table") and kind in QUANTIZED:
                return QuantWeight.from_blocks(kind, t.data, (n, k))
            if how in ("matrix", "table"):
                return self._floats(t, kind).reshape(n, k).T
            return self._floats(t, kind).reshape(n, k)            # "rows": the [V, H] embedding as stored
        except IRError as e:
            raise LLMLoadError(f"{self.path}: tensor {gname!r}: {e}") from None

    @staticmethod
    def _floats(t, kind):
        if kind == "F32":
            return t.data.view(np.float32)
        return dequantize(kind, t.data, tuple(int(s) for s in reversed(t.shape)))

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def config_from_gguf(reader, path: str, tensors: dict) -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch not in ARCHS:
        raise LLMLoadError(f"{path}: architecture {arch!r} is not supported; sqk loads {', '.join(ARCHS)}")

    def need(key):
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise LLMLoadError(f"{path}: metadata {arch}.{key} is missing")
        return v

    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise LLMLoadError(f"{path}: rope scaling {scaling!r} is not supported")
    if "token_embd.weight" not in tensors:
        raise LLMLoadError(f"{path}: tensor 'token_embd.weight' is missing")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(field(reader, f"{arch}.rope.dimension_count") or field(reader, f"{arch}.attention.key_length")
                   or hidden // heads)
    vocab = int(tensors["token_embd.weight"].shape[1])
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = ()
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        rope_scaling = ("freq_factors",) + tuple(float(v) for v in GGUFWeights._floats(t, t.tensor_type.name))
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    ctx = int(field(reader, f"{arch}.context_length", 0))
    kv_heads = field(reader, f"{arch}.attention.head_count_kv")
    layers = int(need("block_count"))
    gemma = gemma3_fields(reader, path, layers, hidden, heads, head_dim) if arch == "gemma3" else {}
    return LlamaConfig(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads,
        kv_heads=int(kv_heads if kv_heads is not None else heads), head_dim=head_dim,
        ffn=int(need("feed_forward_length")), theta=theta,
        eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias=arch == "qwen2", tie_embeddings="output.weight" not in tensors,
        rope_style="interleaved" if arch == "llama" else "half", rope_scaling=rope_scaling,
        bos_id=None if bos is None else int(bos), eos_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        context_length=ctx, max_seq=max(1, ctx or 2048), arch=arch, **gemma)


def gemma3_fields(reader, path: str, layers: int, hidden: int, heads: int, head_dim: int) -> dict:
    """LlamaConfig fields of a "gemma3" file (module docstring), as llama.cpp's
    llama_model_gemma3 reads them."""
    if field(reader, "gemma3.final_logit_softcapping"):
        raise LLMLoadError(f"{path}: gemma3.final_logit_softcapping is not supported")
    window = int(field(reader, "gemma3.attention.sliding_window", 0) or 0)
    pattern = field(reader, "gemma3.attention.sliding_window_pattern", 6)
    if window <= 0:
        local = ()
    elif isinstance(pattern, list):    # one flag per layer
        local = tuple(i for i, f in enumerate(pattern[:layers]) if f)
    else:                               # llama.cpp's set_swa_pattern(n): layer il is local when il % n < n - 1
        n = int(pattern)
        local = tuple(i for i in range(layers) if n == 0 or i % n < n - 1)
    scale = (hidden / heads) ** -0.5 if layers == 62 else head_dim ** -0.5    # llama.cpp: 27B's own scale
    return dict(act="gelu_tanh", qk_norm=True, post_norms=True,
                embed_scale=float(np.float32(np.sqrt(np.float32(hidden)))),
                query_scale=float(np.float32(scale)), window_layers=local, sliding_window=window,
                theta_local=float(field(reader, "gemma3.rope.freq_base_swa", 10000.0)))


def weight_names(cfg: LlamaConfig, tensors: dict) -> dict[str, tuple[str, str]]:
    """{sqk name: (GGUF tensor name, "matrix" | "table" | "vector" | "rows")}."""
    names = {"final_norm": ("output_norm.weight", "vector")}
    if cfg.tie_embeddings:
        names["lm_head"] = ("token_embd.weight", "table")     # a matrix the embedding reads too
    else:
        names["embed"] = ("token_embd.weight", "rows")
        names["lm_head"] = ("output.weight", "matrix")
    for i in range(cfg.layers):
        p = f"blk.{i}."
        names.update({f"attn_norm.{i}": (p + "attn_norm.weight", "vector"),
                      f"ffn_norm.{i}": (p + "ffn_norm.weight", "vector")})
        if cfg.qk_norm:
            names.update({f"q_norm.{i}": (p + "attn_q_norm.weight", "vector"),
                          f"k_norm.{i}": (p + "attn_k_norm.weight", "vector")})
        if cfg.post_norms:
            names.update({f"post_attn_norm.{i}": (p + "post_attention_norm.weight", "vector"),
                          f"post_ffn_norm.{i}": (p + "post_ffw_norm.weight", "vector")})
        for ours, theirs in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output"),
                             ("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")):
            names[f"{ours}.{i}"] = (p + theirs + ".weight", "matrix")
        if cfg.qkv_bias:
            for kind in "qkv":
                names[f"b{kind}.{i}"] = (p + f"attn_{kind}.bias", "vector")
    return names


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF shapes (ggml order: [K, N], K along a row) of the named tensors: the
    Hugging Face [out, in] shapes, innermost dimension first."""
    return {name: shape[::-1] for name, shape in hf.expected_shapes(cfg).items()}


def load_gguf(path: str, tokenizer: bool = True):
    """(config, weights, tokenizer or None) of a GGUF file (module docstring).
    The tokenizer comes from the file's metadata (llm/tokenizer.py), else from
    a tokenizer.json beside the file."""
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(reader, path, tensors)
    names = weight_names(cfg, tensors)
    shapes = expected_shapes(cfg)
    for gname, _ in names.values():         # the types first: an unsupported one is the news
        kind = tensors[gname].tensor_type.name if gname in tensors else "F32"
        try:
            block_type(kind)
        except IRError:
            raise LLMLoadError(f"{path}: tensor {gname!r} has type {kind}; sqk reads "
                               f"{', '.join(FLOATS + QUANTIZED)}") from None
    for ours, (gname, _) in names.items():
        t = tensors.get(gname)
        if t is None:
            raise LLMLoadError(f"{path}: tensor {gname!r} is missing")
        kind = t.tensor_type.name
        if kind in QUANTIZED and ours.split(".")[0] in VECTORS:
            raise LLMLoadError(f"{path}: tensor {gname!r} is a vector of type {kind}: expected F32, F16 or BF16")
        if tuple(int(s) for s in t.shape) != shapes[ours]:
            raise LLMLoadError(f"{path}: tensor {gname!r} has shape {[int(s) for s in t.shape]}, the metadata "
                               f"says {list(shapes[ours])}")
    tok = load_tokenizer(reader, path) if tokenizer else None
    return cfg, GGUFWeights(path, tensors, names), tok


def load_tokenizer(reader, path: str):
    """The GGUF's own tokenizer, else one from a tokenizer.json beside the file
    (None when there is neither)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.json")
    if field(reader, "tokenizer.ggml.model") is None and not os.path.exists(beside):
        return None
    from ...llm.tokenizer import Tokenizer

    try:
        return Tokenizer.from_gguf(reader)
    except ValueError as e:
        if os.path.exists(beside):
            return Tokenizer.from_hf_dir(os.path.dirname(beside))
        raise LLMLoadError(f"{path}: its tokenizer cannot be built ({e})") from None
