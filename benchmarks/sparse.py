"""Sparse GEMV (M = 1): sqk's csr / bsr / nm2:4 kernels against numpy dense,
sqk dense and scipy.sparse CSR, over a weight set whose DENSE f32 size is
640 MiB (40 layers of [2048, 2048], above what this VM's cache serves).

* Weights: standard normal, pruned by magnitude per sparsity (50/75/90/95%):
  unstructured for csr and scipy; blockwise (1x8 blocks, by max |w|) for bsr;
  2 of every aligned 4 rows per column for nm2:4 (50% only).  int8 rows:
  the same pruned weights quantized per channel (matmul_q i8, group = K).
* sqk sparse: ONE graph per contender whose 40 nodes share x: one call
  streams every packed byte once.  sqk dense and numpy: one model (W a graph
  input) / ``x @ W`` called on each dense layer in turn, like the gemm
  benchmark's GEMV.  scipy: ``csr_matrix(W.T) @ x`` per layer (f32 data,
  int32 indices).
* GB/s: bytes actually moved per second: sqk's packed constants (values,
  indices, column pointers; + scales), numpy/sqk dense the f32 weights,
  scipy its data + indices + indptr.
* Read probe: sqk reduce_sum over the dense 640 MiB, timed with the dense contenders.
Every result is checked against numpy (first and last layer) before it is timed.
"""
from __future__ import annotations

import time

import numpy as np

import sqk
from sqk.codegen.lower import UnsupportedOp
from sqk.compiler import DEFAULT_PIPELINE

from . import Table, median, numpy_blas, timeit
from .gemm_gemv import gemm_model, sum_model

K = N = 2048
LAYERS = 40                  # 40 x 16 MiB = 640 MiB dense f32
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
BSR = "bsr1x8"               # a block row is 8 adjacent outputs: broadcast x[k], no gather
RUNS = 7
MiB = 1 << 20


def prune(w, s, block=1):
    """w with the fraction s of smallest magnitudes zeroed (per 1 x block
    block, by its max |w|); one threshold for every layer (the layers are
    iid), taken from a sample of layer 0."""
    def mag(a):
        return np.abs(a).reshape(K, N // block, block).max(axis=-1, keepdims=True)

    thr = np.float32(np.quantile(mag(w[0]).reshape(-1)[::7], s))
    out = np.empty_like(w)
    for i in range(len(w)):
        keep = np.broadcast_to(mag(w[i]) >= thr, (K, N // block, block)).reshape(K, N)
        out[i] = np.where(keep, w[i], np.float32(0))
    return out


def prune_nm(w, n=2, m=4):
    """Keep the n largest |w| of every aligned run of m rows of each column."""
    out = np.empty_like(w)
    for i in range(len(w)):
        r = w[i].reshape(K // m, m, N)
        rank = np.argsort(np.argsort(-np.abs(r), axis=1, kind="stable"), axis=1)
        out[i] = np.where(rank < n, r, 0).reshape(K, N)
    return out


def quantize(w):
    """Per-channel int8 of each layer: (q, scales [1, N], dequantized f32)."""
    s = np.abs(w).max(axis=0, keepdims=True) / 127
    s = np.where(s > 0, s, 1).astype(np.float32)
    q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
    return q, s, q.astype(np.float32) * s


def sqk_sparse(layers, fmt, threads, q=None, scales=None):
    """One graph: every layer applied to the same x[1, K] with sparse=fmt.
    Returns (module, compile seconds, packed bytes) or None when sqk has no kernel."""
    b = sqk.GraphBuilder(f"sparse_{fmt.replace(':', '_')}")
    x = b.input("x", (1, K))
    if q is None:
        outs = [b.matmul(x, b.const(w), sparse=fmt) for w in layers]
    else:
        outs = [b.matmul_q(x, b.const(qi, "i8"), b.const(si, "f32"), group=K, sparse=fmt)
                for qi, si in zip(q, scales)]
    t = time.perf_counter()
    # dense: without select_format, which would otherwise store a sparse enough weight sparse
    pipeline = DEFAULT_PIPELINE.replace("select_format,", "") if fmt == "dense" else None
    try:
        mod = sqk.compile(b.output(*outs), threads=threads, pipeline=pipeline)
    except UnsupportedOp:
        return None
    return mod, time.perf_counter() - t, mod.manifest["constants"]["bytes"]


def picked(layers, quant=None) -> str:
    """The format select_format (default options) chooses for layer 0 of the
    model of all ``layers`` read at one row of x (f32, or int8 per channel
    when ``quant`` = (q layers, scale layers)): the pass sees the whole model,
    whose size decides between its DRAM and in-cache cost models."""
    from sqk.compiler.passes.select_format import SelectFormat

    b = sqk.GraphBuilder("pick")
    x = b.input("x", (1, K))
    if quant is None:
        outs = [b.matmul(x, b.const(w)) for w in layers]
    else:
        outs = [b.matmul_q(x, b.const(q, "i8"), b.const(sc, "f32"), group=K) for q, sc in zip(*quant)]
    g = SelectFormat().run(b.output(*outs))
    return next(n.attrs["sparse"] for n in g.nodes if n.op in ("matmul", "matmul_q"))


def _check(got, want_layers, x, what, tol=1e-4):
    """Refuse to time a wrong answer: ``got[i]`` (outputs by layer) for the first and last layer."""
    for i in (0, len(want_layers) - 1):
        want = x @ want_layers[i]
        err = float(np.max(np.abs(got[i] - want)) / max(1e-30, float(np.max(np.abs(want)))))
        if err > tol:
            raise AssertionError(f"{what}: layer {i} differs from numpy (relative error {err:.2e})")


def run(threads: int) -> Table:
    import scipy.sparse as sp

    blas = numpy_blas(threads)
    rng = np.random.default_rng(0)
    w = np.empty((LAYERS, K, N), np.float32)
    for i in range(LAYERS):
        w[i] = rng.standard_normal((K, N), dtype=np.float32)
    x = rng.standard_normal((1, K), dtype=np.float32)
    xt = np.ascontiguousarray(x.T)
    dense_mb = w.nbytes // MiB
    t = Table(f"Sparse GEMV, x[1,{K}] @ {LAYERS} x [{K},{N}] (dense f32 {dense_mb} MiB), {threads} threads",
              ["contender", "sparsity", "ms", "vs numpy dense", "GB/s moved"])
    notes = []

    def layers_fn(fn):
        return lambda: [fn(w[i]) for i in range(LAYERS)]

    # dense contenders and the read probe (sparsity-independent), interleaved
    dm = gemm_model(1, K, N, threads)
    _check({i: dm(a=x, b=w[i]) for i in (0, LAYERS - 1)}, w, x, "sqk dense")
    rows_ = w.reshape(-1, N)
    probe = sum_model(rows_.shape, threads)
    ts = ts_dense = timeit({"probe": lambda: probe(x=rows_), "sqk dense": layers_fn(lambda wi: dm(a=x, b=wi)),
                            "numpy dense": layers_fn(lambda wi: x @ wi)}, RUNS)
    numpy_ms = median(ts["numpy dense"])
    t.add("read probe: sqk reduce_sum", "-", f"{median(ts['probe']) * 1e3:.1f}", "-",
          w.nbytes / median(ts["probe"]) / 1e9)
    for name in ("numpy dense", "sqk dense"):
        t.add(f"{name} f32", "0%", f"{median(ts[name]) * 1e3:.1f}", f"{numpy_ms / median(ts[name]):.2f}",
              w.nbytes / median(ts[name]) / 1e9)

    picks = {}   # (sparsity, dtype, pattern) -> select_format's choice
    for s in SPARSITIES:
        fns, moved = {}, {}
        ws = prune(w, s)
        actual = 1 - np.count_nonzero(ws[0]) / ws[0].size
        contenders = [("sqk csr f32", ws, "csr", None)]
        wb = prune(w, s, block=8)
        contenders.append((f"sqk {BSR} f32 (block-pruned)", wb, BSR, None))
        if s == 0.5:
            contenders.append(("sqk nm2:4 f32 (2:4-pruned)", prune_nm(w), "nm2:4", None))
        q, sc, wq = zip(*(quantize(ws[i]) for i in range(LAYERS)))
        contenders.append(("sqk csr i8", wq, "csr", (q, sc)))
        contenders.append(("sqk dense i8", wq, "dense", (q, sc)))
        if s == 0.5:
            qn, scn, wqn = zip(*(quantize(wl) for wl in prune_nm(w)))
            contenders.append(("sqk nm2:4 i8 (2:4-pruned)", wqn, "nm2:4", (qn, scn)))
        for name, layers, fmt, quant in contenders:
            kind, pattern = name.split()[2], name[name.index("(") + 1:-1] if "(" in name else "unstructured"
            if (s, kind, pattern) not in picks:
                picks[s, kind, pattern] = picked(layers, quant)
            built = sqk_sparse(layers, fmt, threads, *(quant or ()))
            if built is None:
                t.add(name, f"{s:.0%}", "n/a", "n/a", "n/a")
                continue
            mod, secs, nbytes = built
            notes.append(f"{name} at {s:.0%}: compiled in {secs:.1f} s, {nbytes / MiB:.1f} MiB packed")
            _check(mod(x=x), layers, x, f"{name} at {s:.0%}")
            fns[name], moved[name] = (lambda m: lambda: m(x=x))(mod), nbytes
        csrs = [sp.csr_matrix(ws[i].T) for i in range(LAYERS)]
        _check({i: (csrs[i] @ xt).T for i in (0, LAYERS - 1)}, ws, x, "scipy")
        fns["scipy csr f32"] = lambda: [c @ xt for c in csrs]
        moved["scipy csr f32"] = sum(c.data.nbytes + c.indices.nbytes + c.indptr.nbytes for c in csrs)
        fns["numpy dense f32"] = layers_fn(lambda wi: x @ wi)
        ts = timeit(fns, RUNS)
        ref = median(ts["numpy dense f32"])
        for name, v in ts.items():
            if name == "numpy dense f32":
                continue
            t.add(name, f"{s:.0%} ({actual:.1%})" if "csr" in name else f"{s:.0%}", f"{median(v) * 1e3:.2f}",
                  f"{ref / median(v):.2f}", moved[name] / median(v) / 1e9)
        t.add("  numpy dense f32 (same run)", f"{s:.0%}", f"{ref * 1e3:.1f}", "1.00", w.nbytes / ref / 1e9)
        times = {name: median(v) for name, v in ts.items()}
        times["sqk dense f32"] = median(ts_dense["sqk dense"]) * ref / numpy_ms   # scaled to this group
        for (s_, kind, pattern), fmt in picks.items():
            if s_ != s:
                continue
            pattern_name = "" if pattern == "unstructured" else f" ({pattern})"
            mine = next((n for n in times if n.startswith(f"sqk {fmt} {kind}") and n.endswith(pattern_name)),
                        None) if fmt != "dense" else f"sqk dense {kind}"
            dense_t = times.get(f"sqk dense {kind}")
            notes.append(f"select_format at {s:.0%}, {kind} {pattern}: picks {fmt}"
                         + (f" ({dense_t / times[mine]:.2f}x the speed of sqk dense {kind})"
                            if mine in times and dense_t else ""))
        mod = fns = csrs = ws = wb = q = None

    t.notes += [f"sqk: {threads} threads; {blas}",
                f"median of {RUNS} interleaved runs; 'vs numpy dense' divides by numpy's median in the same "
                "interleaved group (the sparsity's rows, or the first group for the dense rows)",
                "GB/s: bytes moved (sqk: packed constants incl. indices, pointers and scales; numpy/sqk "
                "dense: f32 weights; scipy: data + indices + indptr) per second",
                "targets (issue text): at 90%, sqk csr >= 4x numpy dense and >= 3x scipy csr; 2:4 f32 >= 1.6x and "
                "2:4 int8 >= 5x numpy dense; select_format never more than 5% slower than dense",
                "select_format: the format the pass (default options) picks for layer 0 of each contender's "
                "weights, and that format's measured speed relative to sqk dense of the same dtype (dense f32 "
                "from the first group, scaled by numpy's time in this group)", *notes]
    return t
