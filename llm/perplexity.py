"""Perplexity of a Decoder on a text, as llama.cpp's ``llama-perplexity`` defines it,
and the KL divergence / top-1 agreement of its next-token distributions against a
base decoder (llama.cpp's ``--kl-divergence``).

The text is tokenized with the model's special tokens (BOS when the tokenizer adds
one) and cut into non-overlapping windows of ``ctx`` tokens, ``len // ctx`` of them
(llama.cpp asks for at least two: ``2 * ctx`` tokens).  Each window is a fresh
sequence from position 0, its first token replaced by BOS when the tokenizer adds
BOS; the first half of the window is context only: the logits at positions
``ctx // 2 .. ctx - 2`` are scored against the next token, ``ctx - 1 - ctx // 2``
predictions per window.  With the negative log-likelihoods nll_i of all scored
predictions (N of them)::

    PPL = exp(mean nll)  +/-  PPL * sqrt((mean nll^2 - mean^2) / (N - 1))

(the standard error of the mean NLL, propagated through exp), which is what
llama.cpp prints as "Final estimate: PPL = ... +/- ...".

``stride=S`` is llama.cpp's ``--ppl-stride``: windows of ``ctx`` tokens starting
every S tokens, each scoring its last S predictions (positions ctx-S-1 .. ctx-2);
as llama.cpp's effective behaviour, the windows are the text's tokens as they are
(no BOS put in front).  llama.cpp's ``-c C --ppl-stride S`` evaluates windows of
``C + S // 2`` tokens: pass ``ctx=C + S // 2`` to compare.

Each window runs through the compiled model in chunks: the unscored first half as
a prefill (``Decoder.prefill``, which returns one row of logits per chunk), the
rest by chunk modules returning every row's logits (``build_decoder(...,
all_logits=True)``), never token by token.  The log-softmax is taken in float64.

KL divergence (``base=``): at every scored position, KL(P_base || P) = sum_v
p_base(v) (log p_base(v) - log p(v)) over the whole vocabulary (llama.cpp drops
the terms with log p_base <= -16 from its 16-bit stored base log-probabilities;
here nothing is dropped), and whether the two argmax tokens agree; each reported
as its mean with the standard error llama.cpp prints.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .decoder import Decoder, as_f32

LICENSES = "/usr/share/common-licenses"


def offline_text(name: str = "GPL-3") -> str:
    """The path of an English text every Debian-like system has offline: the
    license ``name`` of the base-files package (GPL-3: about 35 KB, some 8000
    tokens for SmolLM2).  FileNotFoundError, saying so, when it is absent."""
    path = os.path.join(LICENSES, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is absent: it comes with Debian's base-files package; give another "
                                "English text file")
    return path


@dataclass
class PerplexityResult:
    """The figures of ``perplexity``; the KL fields are None without a base."""
    ppl: float
    ppl_err: float
    nll: float              # mean negative log-likelihood (nats)
    count: int              # scored predictions
    windows: int
    tokens: int             # tokens of the whole text
    ctx: int
    stride: int | None = None
    kld: float | None = None
    kld_err: float | None = None
    top1: float | None = None       # fraction of positions whose argmax tokens agree
    top1_err: float | None = None
    base_ppl: float | None = None
    base_ppl_err: float | None = None

    def __str__(self) -> str:
        mode = f"stride {self.stride}" if self.stride else "non-overlapping"
        lines = [f"{self.tokens} tokens, {self.windows} windows of {self.ctx} ({mode}), {self.count} scored",
                 f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_err:.5f}"]
        if self.kld is not None:
            lines += [f"PPL(base)     : {self.base_ppl:.4f} +/- {self.base_ppl_err:.5f}",
                      f"Mean KLD      : {self.kld:.6f} +/- {self.kld_err:.6f}",
                      f"Same top p    : {100 * self.top1:.3f} +/- {100 * self.top1_err:.3f} %"]
        return "\n".join(lines)


def mean_and_error(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / (count - 1)) from the sums of x and x^2."""
    m = total / count
    var = total2 / count - m * m
    return m, (math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0)


def text_tokens(decoder: Decoder, text) -> tuple[list[int], bool]:
    """(token ids, add_bos): a str through the decoder's tokenizer with its
    special tokens (add_bos: the tokenizer puts BOS in front); token ids as given
    (add_bos False)."""
    if not isinstance(text, str):
        ids = [int(t) for t in np.asarray(text, dtype=np.int64).reshape(-1)]
        return ids, False
    tok = decoder.tokenizer
    if tok is None:
        raise ValueError("this Decoder has no tokenizer: give token ids, or load a model whose files have one")
    ids = list(tok.encode(text, add_special=True))
    plain = tok.encode(text, add_special=False)
    add_bos = tok.bos_id is not None and len(ids) > len(plain) and ids[0] == tok.bos_id
    if len(ids) > len(plain) + add_bos:        # an appended EOS: llama.cpp refuses such vocabularies
        raise ValueError("the tokenizer appends special tokens at the end of a text (EOS): perplexity, as "
                         "llama.cpp's, needs one that adds BOS at most")
    return ids, add_bos


def window_logits(decoder: Decoder, window, first: int) -> np.ndarray:
    """The logits [len(window) - first, vocab] of positions first..end of the
    token sequence ``window`` run from position 0 (the caches reset): tokens
    before ``first`` as a prefill, the rest in all-logits chunks.  The last
    chunk, when shorter, starts earlier instead (overlapping the one before:
    its cache rows are written again with the same values).  A decoder with a
    ``logits_cache`` dict keeps each window's logits there (a base decoder
    compared against many others: benchmarks/quant_accuracy.py)."""
    cache = getattr(decoder, "logits_cache", None)
    if cache is not None and (tuple(window), first) in cache:
        return cache[tuple(window), first]
    n = len(window)
    ids = np.asarray(window, dtype=np.int64)
    decoder.reset()
    if first:
        decoder.prefill(ids[:first])
    c = min(decoder.prefill_chunk, n - first)     # >= 2: windows() leaves two rows at least
    out = np.empty((n - first, decoder.cfg.vocab), np.float32)
    m = decoder.chunk_module(c, all_logits=True)
    for s in range(first, n, c):
        s0 = min(s, n - c)
        logits = m(token=ids[s0:s0 + c], pos=np.array([s0], np.int64))   # [c, vocab]: the one output
        out[s - first:s0 + c - first] = logits[s - s0:]
    decoder.pos = n
    if cache is not None:
        cache[tuple(window), first] = out
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


def windows(n_tokens: int, ctx: int, stride: int | None, add_bos: bool) -> tuple[list[int], int, bool]:
    """(window starts, first scored position, put BOS in front) as llama.cpp
    chooses them (module docstring); clear errors for a text too short."""
    if stride is None:
        if n_tokens < 2 * ctx:
            raise ValueError(f"the text has {n_tokens} tokens; perplexity at ctx {ctx} needs at least {2 * ctx} "
                             f"(two windows of {ctx}, as llama.cpp): give a longer text or a smaller ctx")
        return [i * ctx for i in range(n_tokens // ctx)], ctx // 2, add_bos
    if n_tokens <= ctx:
        raise ValueError(f"the text has {n_tokens} tokens; strided perplexity at ctx {ctx} needs more than {ctx}")
    n = (n_tokens - ctx + stride - 1) // stride
    return [i * stride for i in range(n)], ctx - stride - 1, False


def perplexity(decoder: Decoder, text, ctx: int = 512, stride: int | None = None, base: Decoder | None = None,
               chunks: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity of ``decoder`` on ``text`` (a str, tokenized by the decoder's
    tokenizer, or token ids) with windows of ``ctx`` tokens, as llama.cpp's
    llama-perplexity (module docstring); ``stride``: its --ppl-stride mode;
    ``chunks``: at most this many windows (llama.cpp's --chunks).  ``base``: a
    decoder to compare against at every scored position (mean KL divergence
    and top-1 agreement; e.g. ``fp32_decoder(decoder)``).  ``progress(i, n,
    ppl)`` is called after each window i (1..n) with the running perplexity, as
    llama.cpp prints "[i]ppl," per chunk.  Each window resets the decoders'
    sequences (their caches hold the last window afterwards)."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 3:
        raise ValueError(f"ctx must be an int >= 3 (a window scores ctx - 1 - ctx // 2 tokens), got {ctx!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride < ctx):
        raise ValueError(f"stride must be an int in [1, ctx - 1] = [1, {ctx - 1}], got {stride!r}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    for d, what in [(decoder, "the decoder"), (base, "the base decoder")]:
        if d is not None and ctx > d.cfg.max_seq:
            raise ValueError(f"ctx {ctx} exceeds the KV cache length {d.cfg.max_seq} of {what}: load it with "
                             f"max_seq >= {ctx}")
    if base is not None and base.cfg.vocab != decoder.cfg.vocab:
        raise ValueError(f"the base decoder's vocabulary ({base.cfg.vocab}) differs from the decoder's "
                         f"({decoder.cfg.vocab})")
    ids, add_bos = text_tokens(decoder, text)
    bad = [t for t in ids if not 0 <= t < decoder.cfg.vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {decoder.cfg.vocab})")
    starts, first, bos = windows(len(ids), ctx, stride, add_bos)
    starts = starts[:chunks] if chunks else starts
    bos_id = decoder.tokenizer.bos_id if bos else None
    s = dict.fromkeys(("nll", "nll2", "bnll", "bnll2", "kld", "kld2", "top"), 0.0)
    count = 0
    for i, start in enumerate(starts):
        window = ids[start:start + ctx]
        if bos_id is not None:
            window = [bos_id] + window[1:]
        target = np.asarray(window[first + 1:], np.int64)
        rows = np.arange(target.size)
        lp = log_softmax(window_logits(decoder, window, first)[:-1])
        nll = -lp[rows, target]
        s["nll"] += nll.sum()
        s["nll2"] += (nll * nll).sum()
        if base is not None:
            logits_b = window_logits(base, window, first)[:-1]
            lpb = log_softmax(logits_b)
            bnll = -lpb[rows, target]
            kld = (np.exp(lpb) * (lpb - lp)).sum(-1)
            s["bnll"] += bnll.sum()
            s["bnll2"] += (bnll * bnll).sum()
            s["kld"] += kld.sum()
            s["kld2"] += (kld * kld).sum()
            s["top"] += float((lp.argmax(-1) == logits_b.argmax(-1)).sum())
        count += target.size
        if progress is not None:
            progress(i + 1, len(starts), math.exp(s["nll"] / count))
    m, err = mean_and_error(s["nll"], s["nll2"], count)
    ppl = math.exp(m)
    r = PerplexityResult(ppl, ppl * err, m, count, len(starts), len(ids), ctx, stride)
    if base is not None:
        bm, berr = mean_and_error(s["bnll"], s["bnll2"], count)
        r.base_ppl, r.base_ppl_err = math.exp(bm), math.exp(bm) * berr
        r.kld, r.kld_err = mean_and_error(s["kld"], s["kld2"], count)
        r.top1 = s["top"] / count
        r.top1_err = math.sqrt(r.top1 * (1 - r.top1) / (count - 1))
    return r


def fp32_decoder(decoder: Decoder, **compile_options) -> Decoder:
    """The fp32 model of ``decoder``: its weights as f32 (pre-quantized file
    blocks dequantized), compiled without quantization, same config, tokenizer,
    cache dtype and target.  ``compile_options`` go to ``compile`` (the
    decoder's threads by default; e.g. ``quantize="int4"``: sqk's quantization
    of those f32 weights, to compare with the fp32 one)."""
    from .loader import DENSE_PIPELINE

    opts = {"threads": decoder.compile_options["threads"]} if "threads" in decoder.compile_options else {}
    opts.update(compile_options)
    if not any(k in opts for k in ("pipeline", "quantize", "sparsify", "force", "formats")):
        opts["pipeline"] = DENSE_PIPELINE
    weights = {k: as_f32(decoder.weights[k]) for k in decoder.weights}
    return Decoder(decoder.cfg, weights, target=decoder.target, kv_dtype=decoder.kv_dtype,
                   prefill_chunk=decoder.prefill_chunk, tokenizer=decoder.tokenizer, keep_ir=False, **opts)
