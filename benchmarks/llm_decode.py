"""LLM decoding: tokens/s of a Llama-style decoder against the bandwidth roofline,
a Mixture-of-Lookup-Experts model before and after ``fold_lookup_experts``,
and a ReLU FFN with ~90% zero activations, sparse-input GEMV vs dense.

* Llama-style model (``LLAMA``: 8 layers, hidden 2048, 16 query / 4 KV heads,
  FFN 5632, vocabulary 32000; random weights, ~1.97 GB in f32, above the L3)
  compiled with ``sqk.llm.Decoder`` (the KV caches are Module state) as
  fp32, int8 (quantize="int8"), int4 g32 (quantize="int4", group=32) and
  int4 g32 + 2:4 (sparsify="2:4", quantize="int4"), and int4 g32 with int8
  dynamic activations (activations="int8": other numerics, integer dot
  products; the f32-activation int4 GEMV is bound by its int->float
  conversions, codegen/matmul_q.py, not by memory).  tokens/s is the median
  step time of ``STEPS`` decoding steps after a short prompt.  Weight bytes
  per token: the packed constants (every weight once; of the embedding only
  the gathered row).  Roofline: the read probe's GB/s (sqk reduce_sum over
  512 MiB, ``compiler.probe.read_bandwidth``, measured before every model)
  divided by those bytes.  fp32 logits are checked against the numpy model
  (``reference_logits``); the quantized ones are compared with fp32's.
  onnxruntime is not run here: building the same decoder (GQA attention with
  a KV cache, MatMulNBits) as an ONNX graph is not done (benchmarks/quant_gemv.py
  compares the GEMVs with MatMulNBits).
* MoLE (``MOLE``): a smaller decoder (vocabulary 8192, hidden 512, 4 layers,
  4 lookup experts of FFN 1024 per layer, fed by the token embedding, routed
  on the hidden state), compiled without and with ``fold_lookup_experts``;
  bytes per token from the pass's report and the whole model's, tokens/s.
  Its weights (~130 MB) are not above what this VM's caches can serve.
* ReLU FFN: ``FFN_LAYERS`` layers of x += relu(rmsnorm(x) @ W1 + b) @ W2,
  W1 [4096, 11008], W2 [11008, 4096] f32 (720 MiB), b = -1.28 so ~90% of the
  activations are zero; dense vs the ``sparse_activations`` pass (W2 as
  matmul_sparse_input); per-kernel times from Module.profile.
"""
from __future__ import annotations

import gc
import statistics
import time

import numpy as np
import sqk
from sqk.llm import Decoder, LlamaConfig, random_weights, reference_logits
from sqk.compiler.probe import read_bandwidth
from sqk.ir.reference import run_reference

from . import Table, load_average

LLAMA = LlamaConfig(vocab=32000, hidden=2048, layers=8, heads=16, kv_heads=4, head_dim=128, ffn=5632, max_seq=128)
MOLE = LlamaConfig(vocab=8192, hidden=512, layers=4, heads=8, kv_heads=2, head_dim=64, ffn=1408, max_seq=64,
                   lookup_experts=4, lookup_ffn=1024)
VARIANTS = [("fp32", {}), ("int8", dict(quantize="int8")), ("int4 g32", dict(quantize="int4", group=32)),
            ("int4 g32 + 2:4", dict(sparsify="2:4", quantize="int4", group=32)),
            ("int4 g32, int8 act.", dict(quantize="int4", group=32, activations="int8"))]
PROMPT = [1, 17, 423]
STEPS = 12
FFN_K, FFN_F, FFN_LAYERS, FFN_BIAS = 4096, 11008, 2, -1.2816   # P(N(0,1) > 1.2816) = 10%
MiB = 1 << 20


def weight_bytes(m) -> int:
    """Bytes of constants one step reads: the packed constants, minus every
    table only gathered from, plus one row of it."""
    users = m.ir.users()
    total = m.manifest["constants"]["bytes"]
    for n in m.ir.nodes:
        if n.op == "const" and users.get(n.output) and all(u.op == "gather" for u in users[n.output]):
            v = n.output
            total -= v.type.nbytes - v.type.nbytes // max(1, v.shape[0])
    return total


def step_times(dec: Decoder, steps: int = STEPS) -> list[float]:
    dec.reset()
    for t in PROMPT:
        dec.step(t)
    times, tok = [], PROMPT[-1]
    for i in range(steps):
        t0 = time.perf_counter()
        logits = dec.step(tok)
        times.append(time.perf_counter() - t0)
        tok = int(np.argmax(logits))
    return times


def rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


def top_kernels(prof, module, n: int = 4) -> str:
    """The ops that take the most time, summed over their kernels: op ms (GB/s).
    Bytes per kernel: the manifest's, else ``compiler.cost.node_cost`` of the
    IR node in the same order (logical, not packed, sizes)."""
    from sqk.compiler.cost import node_cost

    consts = {v.output: v.attrs["value"] for v in module.ir.nodes if v.op == "const"}
    nodes = [v for v in module.ir.nodes if v.op != "const"]
    by_op: dict[str, list[float]] = {}
    for i, r in enumerate(prof):
        nbytes = r.bytes
        if nbytes is None and i < len(nodes) and r.kernel.endswith("_" + nodes[i].op):
            nbytes = node_cost(nodes[i], None, consts)[0]
        t = by_op.setdefault(r.op, [0.0, 0.0])
        t[0] += r.ms
        t[1] += nbytes or 0
    top = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:n]
    return ", ".join(f"{op} {ms:.1f} ms ({b / ms / 1e6:.1f} GB/s)" for op, (ms, b) in top)


def llama_rows(threads: int, t: Table, notes: list[str]):
    t0 = time.perf_counter()
    w = random_weights(LLAMA, 0)
    notes.append(f"Llama weights: {sum(a.nbytes for a in w.values()) / 2**30:.2f} GiB f32, drawn in "
                 f"{time.perf_counter() - t0:.1f} s")
    ref = reference_logits(LLAMA, w, PROMPT[:2])
    base = None
    for name, opts in VARIANTS:
        probe = read_bandwidth(512, threads=threads)
        try:
            t0 = time.perf_counter()
            dec = Decoder(LLAMA, w, threads=threads, **opts)
            secs = time.perf_counter() - t0
        except (ValueError, sqk.ir.graph.IRError) as e:
            t.add(f"llama {name}", "n/a", "", "", "", "", f"{probe.value:.1f}", "", str(e).splitlines()[0][:60])
            continue
        dec.reset()
        first = np.stack([dec.step(tok) for tok in PROMPT[:2]])
        if name == "fp32":
            err = rel(first, ref)
            if err > 1e-3:
                raise AssertionError(f"sqk fp32 decoder differs from the numpy model ({err:.1e})")
            base, check = first, f"vs numpy {err:.1e}"
        else:
            check = f"vs fp32 {rel(first, base):.1e}" if base is not None else ""
        times = step_times(dec)
        nbytes = weight_bytes(dec.module)
        sec = statistics.median(times)
        roof = probe.value * 1e9 / nbytes
        t.add(f"llama {name}", f"{nbytes / MiB:.0f} MiB", f"{1 / sec:.2f}", f"{nbytes / sec / 1e9:.1f}",
              f"{roof:.2f}", f"{(1 / sec) / roof:.2f}", f"{probe.value:.1f}", f"{secs:.0f}", check)
        if name.startswith("int4"):
            prof = dec.module.profile(runs=3, token=np.array([5]), pos=np.array([len(PROMPT) + STEPS]))
            notes.append(f"profile {name}: {prof.total_ms:.1f} ms in kernels per step; top: {top_kernels(prof, dec.module)}")
        dec = None
        gc.collect()
    w = None
    gc.collect()


def mole_rows(threads: int, t: Table, notes: list[str]):
    w = random_weights(MOLE, 1)
    ref = None
    for name, pipeline in (("MoLE unfolded", None), ("MoLE folded", "fold_constants,fold_lookup_experts,select_format,dce,fuse")):
        t0 = time.perf_counter()
        dec = Decoder(MOLE, w, threads=threads, **({"pipeline": pipeline} if pipeline else {}))
        secs = time.perf_counter() - t0
        dec.reset()
        first = np.stack([dec.step(tok) for tok in PROMPT[:2]])
        ref = first if ref is None else ref
        err = rel(first, ref)
        if err > 1e-4:
            raise AssertionError(f"{name}: logits differ from the unfolded model's ({err:.1e})")
        sec = statistics.median(step_times(dec))
        nbytes = weight_bytes(dec.module)
        sub = ""
        rep = dec.module.report if pipeline else None
        if rep is not None and getattr(rep, "pass_name", None) != "fold_lookup_experts":
            rep = rep.get("fold_lookup_experts")   # a CompileReport of several passes
        if rep:
            r = rep.row("embed")
            sub = f"folded region {r['bytes_before'] / MiB:.1f} MiB -> {r['bytes_after'] / 1024:.1f} KiB per token"
            notes.append(f"MoLE lookup tables: {r['table_bytes'] / MiB:.0f} MiB ({r['nodes']} nodes folded, "
                         f"values {', '.join(r['values'][:3])}...)")
        t.add(name, f"{nbytes / MiB:.1f} MiB", f"{1 / sec:.1f}", f"{nbytes / sec / 1e9:.1f}", "", "", "",
              f"{secs:.0f}", sub or f"max rel diff {err:.1e}")
        dec = None
        gc.collect()


def ffn_graph(w1s, w2s):
    b = sqk.GraphBuilder("relu_ffn")
    x = b.input("x", (1, FFN_K))
    ones = b.const(np.ones(FFN_K, np.float32), name="norm")
    bias = b.const(np.full(FFN_F, FFN_BIAS, np.float32), name="bias")
    for i, (w1, w2) in enumerate(zip(w1s, w2s)):
        h = b.relu(b.add(b.matmul(b.rmsnorm(x, ones), b.const(w1, name=f"up{i}")), bias))
        x = b.add(x, b.matmul(h, b.const(w2, name=f"down{i}")))
    return b.output(x)


def ffn_rows(threads: int, t: Table, notes: list[str]):
    rng = np.random.default_rng(2)
    w1s, w2s = [], []
    for _ in range(FFN_LAYERS):
        w1 = rng.standard_normal((FFN_K, FFN_F), dtype=np.float32)
        w1 *= np.float32(1 / np.sqrt(FFN_K))
        w2 = rng.standard_normal((FFN_F, FFN_K), dtype=np.float32)
        w2 *= np.float32(1 / np.sqrt(FFN_F))
        w1s.append(w1)
        w2s.append(w2)
    g = ffn_graph(w1s, w2s)
    x = rng.standard_normal((1, FFN_K), dtype=np.float32)
    env = run_reference(g, {"x": x}, keep_all=True)
    zeros = [float(np.mean(a == 0)) for v, a in env.items() if v.shape == (1, FFN_F) and (a >= 0).all()]
    want = env[g.outputs[0]]
    nbytes = sum(a.nbytes for a in w1s + w2s)
    # no fuse: the down projections stay kernels of their own, every second matmul in order
    mods = {}
    for name, pipeline in (("dense", "fold_constants,dce"), ("sparse input", "fold_constants,sparse_activations,dce")):
        mods[name] = sqk.compile(g, threads=threads, pipeline=pipeline)
        err = rel(mods[name](x=x), want)
        if err > 1e-4:
            raise AssertionError(f"relu FFN {name} differs from the reference ({err:.1e})")
    runs: dict[str, list] = {name: [] for name in mods}
    for _ in range(5):      # alternate the two, so a noisy neighbour slows both alike
        for name, m in mods.items():
            prof = m.profile(runs=2, x=x)
            dn = sum(r.ms for r in [r for r in prof if r.op in ("matmul", "matmul_sparse_input")][1::2])
            runs[name].append((prof.total_ms, dn))
    down = {}
    for name, v in runs.items():
        total, dn = statistics.median(a for a, _ in v), statistics.median(b for _, b in v)
        down[name] = (total, dn)
        t.add(f"ReLU FFN {name}", f"{nbytes / MiB:.0f} MiB", f"{1e3 / total:.1f}", f"{nbytes / total / 1e6:.1f}",
              "", "", "", "", f"down proj {dn:.1f} ms")
    mods = None
    gc.collect()
    (dt_, dd), (st_, sd) = down["dense"], down["sparse input"]
    notes.append(f"ReLU FFN: {FFN_LAYERS} layers of [{FFN_K}, {FFN_F}] up + down f32, activations "
                 f"{100 * statistics.mean(zeros):.0f}% zeros; sparse-input down projections {dd / sd:.1f}x faster "
                 f"than dense ({dd:.1f} -> {sd:.1f} ms), the whole FFN {dt_ / st_:.2f}x (GB/s column: dense "
                 f"weight bytes / time, i.e. effective)")


def run(threads: int) -> Table:
    t = Table(f"LLM decoding, {threads} threads",
              ["model", "weights/token", "tokens/s", "GB/s", "roofline tok/s", "vs roofline", "probe GB/s",
               "compile s", "check"])
    notes = [f"load average at start: {load_average()}"]
    t0 = time.perf_counter()
    llama_rows(threads, t, notes)
    mole_rows(threads, t, notes)
    ffn_rows(threads, t, notes)
    notes += [f"tokens/s: median of {STEPS} decoding steps after a {len(PROMPT)}-token prompt; GB/s = weight "
              "bytes per token x tokens/s; roofline = probe GB/s / weight bytes per token",
              "onnxruntime: not run (no ONNX export of this decoder; see benchmarks/quant_gemv.py for "
              "MatMulNBits GEMVs)", "target (issue 7): int4 decode >= 0.75 x roofline",
              f"load average at end: {load_average()}; total {time.perf_counter() - t0:.0f} s"]
    t.notes += notes
    return t
