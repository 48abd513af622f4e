"""The machine's limits, measured through sqk itself: read bandwidth and peak FLOP/s.

* ``read_bandwidth``: row sums (``reduce_sum`` compiled by sqk) over a buffer
  larger than the last-level cache (default 512 MiB; this VM's caches serve
  up to ~30-150 MiB), so every byte comes from DRAM: the read rate a
  memory-bound kernel can hope for.  ``benchmarks/gemm_gemv.py`` uses the same
  model (``sum_model``).
* ``peak_flops``: a dedicated kernel (not a matmul) of independent vector FMA
  chains in registers, run by the sqk runtime on every thread: the arithmetic
  rate a compute-bound kernel can hope for on this target's vector width.

Both return a ``Probe`` (value, unit, what was measured) and take the median
of ``runs`` timed runs after one warm-up run.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

MiB = 1 << 20
ROW = 2048          # f32 elements per row summed by the read probe (8 KiB)
FMA_CHAINS = 12     # independent accumulators: enough to cover FMA latency x ports
FMA_ITERS = 1 << 15  # FMA steps per chain per work item
FMA_ITEMS = 256     # work items split over the threads


@dataclass(frozen=True)
class Probe:
    value: float        # GB/s or GFLOP/s
    unit: str
    what: str           # how it was measured, for the printed report

    def __str__(self) -> str:
        return f"{self.value:.1f} {self.unit} ({self.what})"


def sum_model(shape, threads=None):
    """A compiled model summing ``x[shape]`` (f32) along its last axis."""
    from ..ir.builder import GraphBuilder
    from ..compiler.driver import compile

    g = GraphBuilder("sum")
    x = g.input("x", shape)
    return compile(g.output(g.reduce_sum(x, axes=(len(shape) - 1,))), threads=threads)


def _median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: page faults, thread pool start, caches of code
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(mib: int = 512, threads=None, runs: int = 5) -> Probe:
    """Read bandwidth (GB/s) of sqk's reduce_sum over ``mib`` MiB of f32."""
    rows = max(1, mib * MiB // (ROW * 4))
    buf = np.ones((rows, ROW), np.float32)  # ones: every page touched before timing
    m = sum_model(buf.shape, threads)
    got = m(x=buf)
    if not np.all(got == ROW):
        raise AssertionError("read probe: reduce_sum returned wrong sums")
    t = _median_seconds(lambda: m(x=buf), runs)
    return Probe(buf.nbytes / t / 1e9, "GB/s", f"reduce_sum over {buf.nbytes // MiB} MiB f32, median of {runs}")


def _fma_library(target):
    """Shared library whose ``sqk_model`` runs FMA_ITEMS items of FMA chains;
    returns (path, flops per run)."""
    from llvmlite import ir

    from ..codegen.emit import link, object_code
    from ..codegen.kernel import F32, Kernel, call_intrinsic, fconst, fold_loop, hsum, loop, splat
    from ..codegen.lower import BUF_OUTPUT, Step, _program_table
    from ..ir.graph import Graph, TensorType, Value

    lanes = target.lanes(32)
    module = ir.Module(name="fma_probe")
    module.triple = target.triple
    module.data_layout = str(target.machine.target_data)
    k = Kernel(module, "k0_fma", 1, target)
    vt = ir.VectorType(F32, lanes) if lanes > 1 else F32
    b = k.b
    with loop(b, k.begin, k.end) as item:
        # Values converge to 1 (x <- 0.5 x + 0.5): no overflow, no denormals,
        # and nothing LLVM may fold without fast-math.  The start depends on
        # the item so the chains cannot be hoisted out of the item loop.
        tiny = b.fmul(b.sitofp(item, F32), ir.Constant(F32, 2.0 ** -30))
        tiny = splat(b, tiny, lanes) if lanes > 1 else tiny
        inits = [b.fadd(fconst(vt, 1.0 + j / 64), tiny) for j in range(FMA_CHAINS)]
        half = fconst(vt, 0.5)
        accs = fold_loop(b, 0, FMA_ITERS, inits,
                         lambda i, vals: [call_intrinsic(k, "fma", v, half, half) for v in vals], name="f")
        total = accs[0]
        for v in accs[1:]:
            total = b.fadd(total, v)
        s = hsum(k, total) if lanes > 1 else total
        b.store(s, b.gep(k.args[0], [item], inbounds=True, source_etype=F32))
    k.finish()
    out = Value("y", TensorType("f32", (FMA_ITEMS,)))
    graph = Graph("fma_probe", [], [], [out])
    _program_table(module, graph, [(BUF_OUTPUT, 0, out.type.nbytes)], [Step("k0_fma", (0,), FMA_ITEMS, 1)],
                   0, 0, target)
    flops = 2 * FMA_CHAINS * lanes * FMA_ITERS * FMA_ITEMS
    return link(object_code(str(module), target), target), flops


def peak_flops(threads=None, runs: int = 5) -> Probe:
    """Peak f32 GFLOP/s of this host: vector FMA chains on every thread."""
    from ..codegen.target import get_target
    from ..runtime.ffi import load_runtime, program_from_library

    target = get_target("host")
    path, flops = _fma_library(target)
    ffi, lib = load_runtime()
    so = program_from_library(path)
    ctx = ffi.gc(lib.sqk_context_new(int(threads or 0)), lib.sqk_context_free)
    if ctx == ffi.NULL:
        raise RuntimeError("could not start the runtime's thread pool")
    out = np.zeros(FMA_ITEMS, np.float32)
    outs = ffi.new("void *[]", [ffi.from_buffer(out, require_writable=True)])
    ins = ffi.new("void *[]", [ffi.NULL])
    consts = ffi.new("char[]", 64)

    def run():
        rc = lib.sqk_run(ctx, so.program, ins, outs, consts, 64)
        if rc != 0:
            raise RuntimeError(f"FMA probe failed: {ffi.string(lib.sqk_error_string(rc)).decode()}")

    t = _median_seconds(run, runs)
    if not np.allclose(out, FMA_CHAINS * target.lanes(32), rtol=1e-3):
        raise AssertionError("FMA probe: unexpected result")
    lanes = target.lanes(32)
    return Probe(flops / t / 1e9, "GFLOP/s", f"{FMA_CHAINS} chains of {lanes}-lane f32 FMA per thread, "
                                             f"{lib.sqk_context_threads(ctx)} threads, median of {runs}")


__all__ = ["Probe", "sum_model", "read_bandwidth", "peak_flops"]
