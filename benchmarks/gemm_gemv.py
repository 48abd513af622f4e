"""fp32 GEMM and GEMV (M=1) of sqk against numpy, and the machine's read bandwidth.

* GEMM: square n x n x n products, GFLOP/s (2 n^3 per call), median of runs.
* GEMV: x[1, K] @ W[K, N] over a stack of weight matrices larger than 500 MiB
  (the shared cache serves up to roughly 30-150 MiB on this VM), one matrix
  after the other, so every weight byte comes from DRAM: GB/s of weight bytes.
  sqk runs one compiled model (the weight is a graph input) over every matrix.
* Read-bandwidth probe: row sums over the same >500 MiB buffer, compiled by sqk
  as ``reduce_sum`` (numpy's ``np.add.reduce`` beside it): the machine's read
  limit as far as a plain reduction reaches it.  The model is
  ``sqk.compiler.probe.sum_model``, the one ``sqk bench`` measures its roofline with.
"""
from __future__ import annotations

import numpy as np

import sqk
from sqk.codegen.lower import UnsupportedOp
from sqk.compiler.probe import sum_model  # the read probe's model, shared with `sqk bench`

from . import Table, median, numpy_blas, timeit

GEMM_SIZES = (512, 1024, 2048)
GEMV_SHAPE = (2048, 2048)   # K, N of each weight matrix
GEMV_COUNT = 40             # matrices: 40 x 16 MiB = 640 MiB
RUNS = 7                    # timed runs per contender; the median is reported
MiB = 1 << 20


def gemm_model(m, k, n, threads):
    g = sqk.GraphBuilder(f"gemm{m}x{k}x{n}")
    a = g.input("a", (m, k))
    b = g.input("b", (k, n))
    return sqk.compile(g.output(g.matmul(a, b)), threads=threads)


def _check(got, want, what, tol=1e-4):
    """Refuse to time a wrong answer."""
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    if err > tol:
        raise AssertionError(f"{what}: sqk differs from numpy (relative error {err:.2e})")


def run(threads: int) -> Table:
    blas = numpy_blas(threads)
    rng = np.random.default_rng(0)
    t = Table("fp32 GEMM / GEMV: sqk vs numpy", ["benchmark", "shape", "sqk", "numpy", "sqk/numpy", "unit"])

    for n in GEMM_SIZES:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        m = gemm_model(n, n, n, threads)
        _check(m(a=a, b=b), a @ b, f"GEMM {n}")
        inner = max(1, int(5e9 / n ** 3))  # a run of >= ~50 ms
        ts = timeit({"sqk": lambda: m(a=a, b=b), "numpy": lambda: a @ b}, RUNS, inner)
        flops = 2.0 * n ** 3
        s, p = flops / median(ts["sqk"]) / 1e9, flops / median(ts["numpy"]) / 1e9
        t.add("GEMM", f"{n}x{n}x{n}", s, p, f"{s / p:.2f}", "GFLOP/s")

    k, n = GEMV_SHAPE
    w = np.empty((GEMV_COUNT, k, n), np.float32)
    for i in range(GEMV_COUNT):  # filled per matrix: no 640 MiB float64 temporary
        w[i] = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal((1, k), dtype=np.float32)
    m = gemm_model(1, k, n, threads)
    _check(m(a=x, b=w[3]), x @ w[3], "GEMV")

    def sweep(fn):
        return lambda: [fn(w[i]) for i in range(GEMV_COUNT)]

    ts = timeit({"sqk": sweep(lambda wi: m(a=x, b=wi)), "numpy": sweep(lambda wi: x @ wi)}, RUNS)
    s, p = w.nbytes / median(ts["sqk"]) / 1e9, w.nbytes / median(ts["numpy"]) / 1e9
    t.add("GEMV (M=1)", f"{GEMV_COUNT} x [{k},{n}] = {w.nbytes // MiB} MiB", s, p, f"{s / p:.2f}",
          "GB/s weights")

    # The probe sums each row of the same set: a reduction that splits over threads.
    rows = w.reshape(-1, n)
    try:
        ms = sum_model(rows.shape, threads)
        _check(ms(x=rows), rows.sum(axis=1), "sum", tol=1e-3)
        probe = {"sqk": lambda: ms(x=rows), "numpy": lambda: np.add.reduce(rows, axis=1)}
        label = "read probe: row sums"
    except UnsupportedOp:
        probe = {"numpy": lambda: np.add.reduce(rows, axis=1)}
        label = "read probe: np.add.reduce"
    ts = timeit(probe, RUNS)
    bw = {name: rows.nbytes / median(v) / 1e9 for name, v in ts.items()}
    t.add(label, f"{rows.nbytes // MiB} MiB", bw.get("sqk", float("nan")), bw["numpy"],
          f"{bw['sqk'] / bw['numpy']:.2f}" if "sqk" in bw else "-", "GB/s")

    t.notes += [f"sqk: {threads} threads; {blas}",
                "median of interleaved runs (sqk, numpy, sqk, ...); GEMV streams the 640 MiB set "
                "once per run, one matrix after the other, from DRAM"]
    return t
