"""``sqk.llm.load``: a model's files -> a compiled Decoder with its tokenizer.

Formats (the readers are frontends, compiler/frontends/): a Hugging Face
model directory (``hf.load_hf``: config.json + safetensors) or a GGUF file
(``gguf.load_gguf``).

KV cache length: ``max_seq`` defaults to the model's context length, capped
so the cache takes at most ``KV_BUDGET`` bytes (256 MiB): per position it
holds K and V rows of every layer, 2 * layers * kv_heads * head_dim values
(4 bytes each in f32, 2 with ``kv_dtype="f16"``, 1 with "i8" plus a 4-byte
scale per row of a head).  SmolLM2-135M (30 layers,
3 KV heads of 64) needs 45 KiB per position, so its 8192-position context
is capped at 5825 (all 8192 with an f16 cache); a Llama-3-8B (32 layers, 8
KV heads of 128) at 1024.  A model that states no context gets 2048 at
most.  Give ``max_seq=`` to choose (a Mistral sliding window caps it too:
the window is not applied).
"""
from __future__ import annotations

import dataclasses
import os

from .decoder import Decoder, LlamaConfig
from .errors import LLMLoadError

KV_BUDGET = 256 << 20
# checkpoints are dense: without quantize/sparsify options, skip select_format's density scan of
# every weight (seconds per compile on a 135M model, and it picks dense for them anyway)
DENSE_PIPELINE = "fold_constants,dce,fuse"
KV_BYTES = {"f32": 4, "f16": 2, "i8": 1}


def kv_bytes_per_position(cfg: LlamaConfig, kv_dtype: str = "f32") -> int:
    """Bytes the KV cache takes per position: K and V of every layer (an int8
    cache also a 4-byte scale per row of a head)."""
    row = cfg.head_dim * KV_BYTES[kv_dtype] + (4 if kv_dtype == "i8" else 0)
    return 2 * cfg.layers * cfg.kv_heads * row


def choose_max_seq(cfg: LlamaConfig, max_seq: int | None, kv_dtype: str = "f32", where: str = "") -> int:
    """The KV cache length: ``max_seq``, or the context length within KV_BUDGET."""
    # Mistral's window is not applied (the cache may not exceed it); Gemma 3's local layers apply theirs
    limit = None if cfg.window_layers or cfg.arch == "gemma3" else cfg.sliding_window or None
    if max_seq is None:
        fit = max(1, KV_BUDGET // kv_bytes_per_position(cfg, kv_dtype))
        return min(cfg.context_length or 2048, fit, limit or fit)
    if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 1:
        raise ValueError(f"max_seq must be a positive int, got {max_seq!r}")
    if limit and max_seq > limit:
        raise LLMLoadError(f"{where}: max_seq={max_seq} exceeds the model's sliding attention window of {limit}, "
                           "which sqk does not apply")
    return max_seq


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load(path, *, target: str | None = None, max_seq: int | None = None, kv_dtype: str | None = None,
         threads: int | None = None, **compile_options) -> Decoder:
    """A Decoder for the model at ``path``: a Hugging Face model directory, a
    GGUF file, or an LLM artifact written by ``sqk compile`` (llm/artifact.py:
    loaded without the compiler; ``target``, ``max_seq`` and ``kv_dtype`` are
    its own, others are refused).  ``target``: "host" (default) or "riscv64";
    ``max_seq``: the KV cache length (module docstring); ``kv_dtype``: "f32"
    (default) or "f16"; ``compile_options`` go to ``sqk.compile`` (e.g.
    ``quantize="int8"``).  Unsupported or broken files raise LLMLoadError
    naming the file.

    ``activations="int8"`` (with ``act_group=32``: llama.cpp's numerics) on a
    GGUF file: the file's quantized blocks multiply int8-quantized
    activations (``Decoder(activations=, act_group=)``, build_decoder), one
    f32 scale per 32 values of a row, integer dot products; F32 / F16
    matrices stay float.  Not bit-equal to the default (f32 activations).
    With ``quantize=`` too the options also go to the quantize pass (sqk's
    own weights); on a model directory they are the quantize pass's only."""
    path = os.fspath(path)
    from .artifact import is_llm_artifact, load_llm

    if is_llm_artifact(path) or os.path.isdir(os.path.join(path, "decode")):   # the latter: a partial one
        return load_llm(path, target=target, max_seq=max_seq, kv_dtype=kv_dtype, threads=threads, **compile_options)
    target, kv_dtype = target or "host", kv_dtype or "f32"
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_BYTES)}, got {kv_dtype!r}")
    if os.path.isdir(path):
        from ..compiler.frontends.hf import load_hf

        cfg, weights = load_hf(path)
        tokenizer = None
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_hf_dir(path)
    elif os.path.isfile(path) and is_gguf(path):
        from ..compiler.frontends.gguf import load_gguf

        cfg, weights, tokenizer = load_gguf(path)
    elif not os.path.exists(path):
        raise LLMLoadError(f"{path}: no such file or directory")
    else:
        raise LLMLoadError(f"{path}: neither a model directory (config.json + safetensors) nor a GGUF file")
    cfg = dataclasses.replace(cfg, max_seq=choose_max_seq(cfg, max_seq, kv_dtype, path))
    if tokenizer is not None and not cfg.eos_ids and tokenizer.eos_ids:
        cfg = dataclasses.replace(cfg, eos_ids=tuple(tokenizer.eos_ids))
    numerics = {}
    if not os.path.isdir(path):   # GGUF: activations / act_group apply to the file's blocks
        numerics = {k: compile_options[k] for k in ("activations", "act_group") if compile_options.get(k) is not None}
        if compile_options.get("quantize") is None:
            for k in ("activations", "act_group"):   # no quantize pass to take them
                compile_options.pop(k, None)
    if not any(k in compile_options for k in ("pipeline", "quantize", "sparsify", "force", "formats")):
        compile_options["pipeline"] = DENSE_PIPELINE
    return Decoder(cfg, weights, target=target, threads=threads, tokenizer=tokenizer, kv_dtype=kv_dtype,
                   keep_ir=False, **numerics, **compile_options)
