"""``sqk bench OUT.sqk``: per-kernel time of a compiled artifact against the
machine's roofline, measured in the same run.

Each kernel's roofline time is max(bytes / read bandwidth, FLOPs / peak
FLOP/s), with its bytes and FLOPs from the manifest (compiler/cost.py) and
both limits from compiler/probe.py; "% roof" is roofline time / measured
time (100% = at the machine's limit).  Inputs are random normal floats;
integer inputs are zeros (always valid indices for gather), bools random.
"""
from __future__ import annotations

import os
import platform

import numpy as np

from .probe import peak_flops, read_bandwidth


def machine() -> str:
    """CPU model (from /proc/cpuinfo) and the number of online CPUs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "uarch", "Model"):
                    model = val.strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def random_inputs(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays of the manifest's input shapes and dtypes (see the module docstring)."""
    from ..ir import dtypes

    np_dtype = {d.name: d.np_dtype for d in dtypes.IO}
    rng = np.random.default_rng(seed)
    out = {}
    for t in manifest["inputs"]:
        dt, shape = np.dtype(np_dtype[t["dtype"]]), tuple(t["shape"])
        if dt.kind == "f":
            out[t["name"]] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            out[t["name"]] = rng.random(shape) < 0.5
        else:
            out[t["name"]] = np.zeros(shape, dt)
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def bench(path: str, runs: int = 20, threads: int | None = None, probe_mib: int = 512,
          probe_runs: int = 5) -> str:
    """Profile the artifact at ``path`` and return the report (text)."""
    from ..runtime.module import load

    m = load(path, threads=threads)
    inputs = random_inputs(m.manifest)
    prof = m.profile(runs=runs, **inputs)
    host = m.target == "host"
    lines = [f"sqk bench {path}: model {m.manifest['name']}, target {m.target}, {prof.threads} threads, "
             f"median of {prof.runs} runs",
             f"machine: {machine()}"]
    peak = bw = None
    if host:
        peak = peak_flops(threads=prof.threads, runs=probe_runs)
        bw = read_bandwidth(probe_mib, threads=prof.threads, runs=probe_runs)
        lines += [f"peak FLOP/s: {peak.value:.1f} GFLOP/s  (dedicated vector FMA loop, not a matmul: {peak.what})",
                  f"read bandwidth: {bw.value:.2f} GB/s  ({bw.what})",
                  f"ridge point: {peak.value / bw.value:.1f} FLOP/byte (above: compute-bound)"]
    else:
        lines.append("no roofline: riscv64 runs under qemu-user (emulated times, host limits do not apply)")
    lines.append("")

    cols = f"{'kernel':<24}{'op':<12}{'calls':>6}{'ms':>10}{'MB':>9}{'MFLOP':>10}{'GB/s':>8}{'GFLOP/s':>9}"
    if host:
        cols += f"{'FLOP/B':>8}{'bound':>8}{'roof ms':>10}{'% roof':>8}"
    lines += [cols, "-" * len(cols)]
    roof_total = 0.0
    for r in prof:
        line = (f"{r.kernel:<24}{r.op:<12}{r.calls:>6}{r.ms:>10.4f}"
                f"{_fmt(None if r.bytes is None else r.bytes / 1e6, '.3f'):>9}"
                f"{_fmt(None if r.flops is None else r.flops / 1e6, '.3f'):>10}"
                f"{_fmt(r.gbps, '.2f'):>8}{_fmt(r.gflops, '.2f'):>9}")
        if host:
            if r.bytes is None or r.flops is None:
                line += f"{'-':>8}{'-':>8}{'-':>10}{'-':>8}"
            else:
                t_mem, t_flop = r.bytes / (bw.value * 1e9), r.flops / (peak.value * 1e9)
                roof_ms = max(t_mem, t_flop) * 1e3
                roof_total += roof_ms
                intensity = r.flops / r.bytes if r.bytes else float("inf")
                line += (f"{intensity:>8.2f}{'memory' if t_mem >= t_flop else 'compute':>8}{roof_ms:>10.4f}"
                         f"{_fmt(100 * roof_ms / r.ms if r.ms > 0 else None, '.1f'):>8}")
        lines.append(line)
    lines.append("-" * len(cols))
    total_bytes = sum(r.bytes or 0 for r in prof)
    total_flops = sum(r.flops or 0 for r in prof)
    tot = (f"{'total':<24}{'':<12}{'':>6}{prof.total_ms:>10.4f}{total_bytes / 1e6:>9.3f}{total_flops / 1e6:>10.3f}"
           f"{_fmt(total_bytes / prof.total_ms / 1e6 if prof.total_ms else None, '.2f'):>8}"
           f"{_fmt(total_flops / prof.total_ms / 1e6 if prof.total_ms else None, '.2f'):>9}")
    if host:
        tot += (f"{'':>8}{'':>8}{roof_total:>10.4f}"
                f"{_fmt(100 * roof_total / prof.total_ms if prof.total_ms else None, '.1f'):>8}")
    lines.append(tot)
    if host and any(r.bytes and r.ms > 0 and r.bytes / (bw.value * 1e9) * 1e3 > r.ms for r in prof):
        lines.append("% roof above 100: that kernel's data came from cache; the bandwidth probe measures DRAM")
    lines += ["", f"per call from Python: {prof.wall_ms:.4f} ms (kernels + argument checks and output allocation"
                  + (")" if host else ", qemu start-up and file exchange, per run)"),
              "ms: median per call; bytes: inputs read + outputs written (constants at their packed size); "
              "FLOPs: see sqk/compiler/cost.py"]
    return "\n".join(lines)


__all__ = ["bench", "random_inputs", "machine"]
