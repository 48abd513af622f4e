"""RISC-V under emulation: the run time of RVV (rv64gcv) against scalar (rv64gc)
builds of the same graphs, under qemu-user on this machine: dense GEMV (f32,
int8, int4, and int4 with int8 activations) and sparse M = 1 matmuls (csr, N:M
2:4, bsr1x8), all 1024 x 1024.  The one RVV artifact runs at VLEN 128, 256 and
512: its kernels are vector-length agnostic, so a wider VLEN takes fewer strips.

A coarse figure: qemu is not a board (it translates each vector instruction into
host code of its own, so the ratio says how much work the vector code saves
the emulator, not what a core would do).  Each model is timed as the median of
whole runner calls, minus the median call of a trivial model (qemu start-up,
.npy exchange), with one runtime thread.
"""
from __future__ import annotations

import numpy as np

import sqk
from sqk.compiler.quantize import quantize_weight

from . import Table, median, timeit

K = N = 1024
RUNS = 5


def models(rng):
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    out = {}
    b = sqk.GraphBuilder("gemv_f32")
    out["GEMV f32"] = b.output(b.matmul(b.input("x", (1, K)), b.const(w, name="w")))
    for label, bits, group in (("GEMV int8 (per channel)", 8, None), ("GEMV int4 (g32)", 4, 32)):
        q, s, z = quantize_weight(w, bits=bits, group=group)
        b = sqk.GraphBuilder(f"gemv_i{bits}")
        x = b.input("x", (1, K))
        out[label] = b.output(b.matmul_q(x, b.const(q, "i8" if bits == 8 else "i4"), b.const(s, "f32"),
                                         group=group or K))
    q, s, _ = quantize_weight(w, bits=4, group=32)
    b = sqk.GraphBuilder("gemv_i4_a8")
    out["GEMV int4 (g32), int8 activations"] = b.output(b.matmul_q(b.input("x", (1, K)), b.const(q, "i4"),
                                                                   b.const(s, "f32"), group=32, activations="int8"))
    # sparse M = 1 (codegen/sparse.py, sparse_nm.py): csr and bsr1x8 at 90% zeros, N:M 2:4 (50%)
    keep = np.argsort(rng.random((K // 4, 4, N)), axis=1) < 2
    for label, fmt, ws in (("SpMV CSR f32 (90% zeros)", "csr", w * (rng.random((K, N)) >= 0.9)),
                           ("SpMV N:M 2:4 f32", "nm2:4", (w.reshape(K // 4, 4, N) * keep).reshape(K, N)),
                           ("SpMV BSR 1x8 f32 (90% zero blocks)", "bsr1x8",
                            w * np.repeat(rng.random((K, N // 8)) >= 0.9, 8, axis=1))):
        b = sqk.GraphBuilder("spmv_" + fmt.replace(":", "_"))
        out[label] = b.output(b.matmul(b.input("x", (1, K)), b.const(ws.astype(np.float32), name="w"),
                                       sparse=fmt))
    b = sqk.GraphBuilder("empty")
    out["(start-up: a 1-element relu)"] = b.output(b.relu(b.input("x", (1, 1))))
    return out


VLENS = (128, 256, 512)


def run(threads: int) -> Table:
    rng = np.random.default_rng(0)
    graphs = models(rng)
    times = {}
    for label, g in graphs.items():
        x = rng.standard_normal(g.inputs[0].shape).astype(np.float32)
        rvv, scalar = (sqk.compile(g, target=t, threads=1) for t in ("riscv64", "riscv64-scalar"))
        ref = sqk.reference(g, x=x)

        def at(vlen):
            def call():
                rvv.vlen = vlen
                return rvv(x=x)
            return call
        calls = {f"v{v}": at(v) for v in VLENS}
        calls["scalar"] = lambda: scalar(x=x)
        for call in calls.values():
            np.testing.assert_allclose(call(), ref, rtol=1e-4, atol=1e-4)
        t = timeit(calls, runs=RUNS, settle=0.0)
        times[label] = {key: median(v) * 1e3 for key, v in t.items()}
    base = times.pop("(start-up: a 1-element relu)")
    table = Table(f"RISC-V, EMULATED under qemu-user ({K}x{N} weights, 1 runtime thread; ms per call "
                  f"minus start-up)", ["kernel", *(f"RVV vlen={v}" for v in VLENS), "rv64gc (scalar)",
                                       "scalar / RVV-256", "RVV 128 / 512"])
    for label, t in times.items():
        v = {key: t[key] - base[key] for key in t}
        table.add(label, *(f"{v[f'v{n}']:.2f}" for n in VLENS), f"{v['scalar']:.2f}",
                  f"{v['scalar'] / v['v256']:.1f}x" if v["v256"] > 0 else "-",
                  f"{v['v128'] / v['v512']:.1f}x" if v["v512"] > 0 else "-")
    table.notes += [f"start-up (qemu + runner + .npy exchange): {base['v256']:.1f} ms (RVV), "
                    f"{base['scalar']:.1f} ms (scalar), subtracted above",
                    "qemu -cpu rv64,v=true,vext_spec=v1.0,vlen=N for RVV (one artifact); rv64,v=false for scalar",
                    "emulated: qemu is not a board; read the ratios as coarse"]
    return table
