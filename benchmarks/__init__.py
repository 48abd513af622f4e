"""Side-by-side benchmarks: sqk's kernels, their peers and the machine's limits.

Run on demand (they are not tests): ``python -m benchmarks`` runs every one,
``python -m benchmarks gemm`` one of them.  Each benchmark is a module with a
``run(threads) -> Table`` function, registered in ``BENCHMARKS`` below.
This file holds what they share: timing, machine description, the table.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import time

# name -> (module, one-line description); modules import lazily.
BENCHMARKS = {
    "gemm": ("benchmarks.gemm_gemv", "fp32 GEMM and GEMV (M=1) vs numpy, with a read-bandwidth probe"),
    "quant": ("benchmarks.quant_gemv", "int4/int8 matmul_q GEMV and small GEMM vs onnxruntime MatMulNBits, "
                                       "numpy fp32 and a read probe"),
    "dense": ("benchmarks.dense", "fp32 GEMM 256-2048, small-M GEMM, conv2d 3x3 and depthwise vs numpy and "
                                  "onnxruntime, 1 vs 2 threads"),
    "sparse": ("benchmarks.sparse", "sparse GEMV (csr, bsr, nm2:4; f32 and int8) at 50-95% sparsity vs numpy "
                                    "dense and scipy CSR on 640 MiB of dense weights"),
    "onnx": ("benchmarks.onnx_models", "BERT-style encoder (random) and the real all-MiniLM-L6-v2: sqk fp32 / int8 vs "
                                       "onnxruntime fp32 and quantize_dynamic int8 (needs torch, transformers)"),
    "llm": ("benchmarks.llm_decode", "Llama-style decode tokens/s (fp32, int8, int4 g32, int4 + 2:4) vs the read "
                                     "roofline; MoLE before/after fold_lookup_experts; sparse-input ReLU FFN"),
    "riscv": ("benchmarks.riscv_emulated", "RVV vs scalar rv64gc builds of GEMV f32/int8/int4 under qemu "
                                           "(emulated, coarse)"),
    "llm-real": ("benchmarks.llm_real", "real GGUF models (SmolLM2-135M f32/q8_0/q4_0/q4_1, a random 1.1B Llama "
                                        "q4_0/q8_0): prefill and decode tok/s vs llama.cpp's llama-bench"),
    "cnn": ("benchmarks.cnn", "resnet18 and mobilenet_v2 (random weights) at 224x224: sqk fp32 / int8 vs "
                              "onnxruntime fp32 and quantize_static int8, top-1 agreement (needs torch)"),
    "llm-depth": ("benchmarks.llm_depth", "llm-real's depth rows only: SmolLM2 q4_0 tg64 after 64 and 4096 tokens, "
                                          "sqk with f16 / f32 / int8 KV caches vs llama-bench -d"),
    "llm-1b": ("benchmarks.llm_1b", "llm-real's random 1.1B Llama rows only (q4_0, q8_0; sqk f32 and int8 "
                                    "activations): prefill and memory-bound decode vs llama-bench and the read probe"),
    "quant-accuracy": ("benchmarks.quant_accuracy", "SmolLM2-135M perplexity, KL and top-1 vs fp32: sqk int8 / int4 "
                                                    "RTN, imatrix, GPTQ, AWQ / int8 act / 2:4 pruning vs llama.cpp "
                                                    "q8_0, q4_0, q4_K_M"),
}
# Run only when named: llm-real builds llama.cpp and writes GiB of model files on first use (llm-depth
# and llm-1b use the same); cnn exports two CNNs with torch and compiles four models; quant-accuracy takes half
# an hour or more.
ON_DEMAND = {"llm-real", "llm-depth", "llm-1b", "cnn", "quant-accuracy"}


def timeit(fns: dict, runs: int, inner: int = 1, warmup: int = 1, settle: float = 0.3) -> dict[str, list[float]]:
    """Seconds per call of each function (a run times ``inner`` calls back to
    back), runs interleaved (a, b, a, b, ...) so that a noisy neighbour slows
    every contender alike.  Each run waits
    ``settle`` seconds first: OpenBLAS's threads keep spinning for ~0.1 s after
    a call (its THREAD_TIMEOUT), and would otherwise steal a core from whatever
    runs next (measured: sqk's GEMV at half speed right after numpy's).  Then
    one untimed call wakes the contender's threads: after the pause this VM's
    idle vCPU takes long enough to wake that a 2-thread call of a few ms timed
    cold measured barely faster than 1 thread (conv2d 64->64 56x56: 1.08x cold,
    2.0x warm).  The figures are steady-state throughput."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            time.sleep(settle)
            fn()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t) / inner)
    return times


def median(xs):
    return statistics.median(xs)


def machine() -> str:
    """``lscpu`` model name and core count (falls back to platform)."""
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    model = info.get("Model name") or platform.processor() or platform.machine()
    cores = info.get("CPU(s)") or str(os.cpu_count())
    l3 = info.get("L3 cache")
    return f"{model}, {cores} cores" + (f", L3 {l3}" if l3 else "")


def _openblas():
    """The OpenBLAS library numpy loaded (via /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for p in sorted(paths):
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


def _symbol(lib, *suffixes):
    """A function of lib by one of several names (scipy-openblas prefixes and suffixes them)."""
    for prefix in ("scipy_", ""):
        for name in suffixes:
            for suffix in ("64_", "_64_", ""):
                fn = getattr(lib, prefix + name + suffix, None) if lib is not None else None
                if fn is not None:
                    return fn
    return None


def numpy_blas(threads: int | None = None) -> str:
    """Describe numpy's BLAS; with ``threads``, first set its thread count."""
    import numpy as np

    cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
    blas = cfg.get("Build Dependencies", {}).get("blas", {}) if isinstance(cfg, dict) else {}
    name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    lib = _openblas()
    if threads is not None:
        setter = _symbol(lib, "openblas_set_num_threads")
        if setter is not None:
            setter(ctypes.c_int(threads))
    getter = _symbol(lib, "openblas_get_num_threads")
    core = _symbol(lib, "openblas_get_corename")
    n = getter() if getter is not None else "?"
    if core is not None:
        core.restype = ctypes.c_char_p
        name += f" ({core().decode()} kernels)"
    return f"numpy {np.__version__}, {name}, {n} threads"


class Table:
    """Rows of cells, printed as aligned text or markdown."""

    def __init__(self, title: str, columns: list[str], notes: list[str] | None = None):
        self.title, self.columns, self.rows, self.notes = title, columns, [], list(notes or [])

    def add(self, *cells):
        self.rows.append([c if isinstance(c, str) else f"{c:.1f}" if isinstance(c, float) else str(c)
                          for c in cells])

    def text(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns] + self.rows) for i in range(len(self.columns))]
        line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        out = [self.title, line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in self.rows] + [""] + self.notes
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows] + [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)


def load_average() -> str:
    """The 1-minute load average: well above 0 means other processes shared the cores."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def header(command: str) -> list[str]:
    return [f"date: {datetime.date.today().isoformat()}", f"machine: {machine()}", f"command: {command}",
            f"load average before the run: {load_average()}"]
