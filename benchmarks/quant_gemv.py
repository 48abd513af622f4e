"""Quantized GEMV: sqk's matmul_q (int4 g32, int8 per channel) against numpy
fp32, onnxruntime's MatMulNBits, and the machine's read bandwidth.

* GEMV (M=1) over a stack of 4096 x 4096 weight matrices > 500 MiB packed (the
  shared cache serves up to ~30-150 MiB here, so smaller sets measure cache):
  64 matrices int4 (g32, f16 scales), 32 int8 (per-channel f32 scales),
  8 fp32.  sqk compiles ONE graph with a matmul_q per matrix, all on the same
  x, so one call streams every weight byte once; GB/s counts weight bytes
  (packed q + scales) per second.
* onnxruntime MatMulNBits (bits 4, block 32, the same int4 values), one model
  with 64 nodes, accuracy_level 0 (f32 activations) and 4 (int8 activations).
* sqk matmul_q {activations=int8} over the int4 and the int8 stacks (x
  quantized per row and group at run time, integer dot products with AVX2
  vpmaddubsw/vpmaddwd, i8 weights through vpabsb/vpsignb): other numerics than
  the f32 mode's, checked against the op's own reference (ir.ops.matmul_q_i8act).
* Read probe: sqk's reduce_sum over axis 1 of a [16, N] f32 input > 500 MiB.
* Small-batch GEMM (M = 4, 16) on 16 int4 / 8 int8 matrices (128 MiB, still
  4x the L3): compute decides there, and compiling four more 64-node graphs
  would double the run time.
"""
from __future__ import annotations

import time

import numpy as np
import sqk
from sqk.ir.ops import matmul_q_i8act

from . import Table, median, numpy_blas, timeit

K = N = 4096
GROUP = 32
RUNS = 7
MiB = 1 << 20
COUNTS = {"i4": 64, "i8": 32}        # matrices of the GEMV stacks (512 MiB each)
GEMM_COUNTS = {"i4": 16, "i8": 8}    # matrices of the small-batch GEMM stacks (128 MiB)
F32_COUNT = 8


def weights(qdt: str, count: int, rng):
    """Per matrix: (q int8 values, scales, group) of the format."""
    lo, hi = (-8, 7) if qdt == "i4" else (-128, 127)
    group = GROUP if qdt == "i4" else K
    sdt = np.float16 if qdt == "i4" else np.float32
    return [(rng.integers(lo, hi + 1, (K, N), dtype=np.int8),
             rng.uniform(0.001, 0.01, (-(-K // group), N)).astype(sdt), group) for _ in range(count)]


def weight_bytes(qdt: str, mats) -> int:
    return sum(q.size * (4 if qdt == "i4" else 8) // 8 + s.nbytes for q, s, _ in mats)


def sqk_model(qdt: str, mats, m: int, threads: int, i8act: bool = False):
    """One graph: every matrix applied to the same x[m, K]; returns (module,
    compile seconds).  ``i8act``: int8 dynamic activations (activations=int8)."""
    b = sqk.GraphBuilder(f"q{qdt}_m{m}")
    x = b.input("x", (m, K))
    sdt = "f16" if mats[0][1].dtype == np.float16 else "f32"
    act = "int8" if i8act else "none"
    outs = [b.matmul_q(x, b.const(q, qdt), b.const(s, sdt), group=g, activations=act) for q, s, g in mats]
    t = time.perf_counter()
    mod = sqk.compile(b.output(*outs), threads=threads)
    return mod, time.perf_counter() - t


def ort_session(mats, level: int, threads: int):
    """A MatMulNBits model (com.microsoft, bits 4, block 32) over the int4 matrices:
    B[n, k_block, 16] bytes of q + 8 (two k per byte, low nibble first), f32 scales."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, (q, s, group) in enumerate(mats):
        u = (q.astype(np.int16) + 8).astype(np.uint8).T.reshape(N, K // group, group // 2, 2)
        packed = (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)
        inits += [numpy_helper.from_array(packed, f"B{i}"),
                  numpy_helper.from_array(s.astype(np.float32).T.reshape(-1).copy(), f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"S{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=group, accuracy_level=level))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]))
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _check(got, mats, x, what, tol):
    """Refuse to time a wrong answer: first and last outputs against dequantized numpy."""
    for i in (0, len(mats) - 1):
        q, s, group = mats[i]
        w = sqk.ir.ops.dequantize_weight(q, s, None, group)
        want = x @ w
        err = float(np.max(np.abs(got[i] - want)) / max(1e-30, float(np.max(np.abs(want)))))
        if err > tol:
            raise AssertionError(f"{what}: output {i} differs from numpy (relative error {err:.2e})")


def _i8act(qdt, mats, threads, x):
    """int4 / int8 weights + int8 dynamic activations, checked against the op's reference."""
    mod, _ = sqk_model(qdt, mats, 1, threads, i8act=True)
    got = mod(x=x)
    for i in (0, len(mats) - 1):
        q, s, group = mats[i]
        want = matmul_q_i8act(x, q, s, None, group)
        if np.max(np.abs(got[i] - want)) > 1e-4 * np.max(np.abs(want)):
            raise AssertionError(f"sqk {qdt} w + i8 dynamic activations differs from its reference")
    return mod


def _call(fn, **kw):
    return lambda: fn(**kw)


def run(threads: int) -> Table:
    blas = numpy_blas(threads)
    rng = np.random.default_rng(0)
    t = Table(f"Quantized GEMV, 4096x4096 matrices, {threads} threads",
              ["contender", "weights", "ms", "GB/s", "vs probe", "vs ORT best"])
    rows, notes, probe_times = [], [], []

    # read-bandwidth probe: sqk reduce_sum over axis 1 of [16, 8Mi] f32 (512 MiB),
    # timed interleaved with every GEMV contender (a, b, a, b, ...)
    buf = rng.standard_normal((16, 8 * MiB), dtype=np.float32)
    pb = sqk.GraphBuilder("probe")
    probe = sqk.compile(pb.output(pb.reduce_sum(pb.input("x", buf.shape), axes=(1,))), threads=threads)
    _check_probe = np.max(np.abs(probe(x=buf) - buf.sum(axis=1, dtype=np.float64))) / buf.shape[1]
    assert _check_probe < 1e-3, "sqk reduce_sum differs from numpy"
    x1 = rng.standard_normal((1, K), dtype=np.float32)
    ort_bw = 0.0
    for qdt in ("i4", "i8"):
        mats = weights(qdt, COUNTS[qdt], rng)
        nbytes = weight_bytes(qdt, mats)
        mod, secs = sqk_model(qdt, mats, 1, threads)
        notes.append(f"sqk {qdt}: compiling the {len(mats)}-node graph took {secs:.1f} s (packing q, LLVM, writing and hashing the constants)")
        _check(mod(x=x1), mats, x1, f"sqk {qdt}", 1e-4)
        fns = {"probe": _call(probe, x=buf), f"sqk {qdt}": _call(mod, x=x1)}
        fns[f"sqk {qdt} w + i8 dynamic activations"] = _call(_i8act(qdt, mats, threads, x1), x=x1)
        if qdt == "i4":
            for level in (0, 4):
                sess = ort_session(mats, level, threads)
                _check(sess.run(None, {"x": x1}), mats, x1, f"ORT level {level}", 3e-2 if level else 1e-3)
                fns[f"ORT MatMulNBits level {level}"] = _call(sess.run, output_names=None, input_feed={"x": x1})
        label = {"i4": "int4 g32, f16 scales", "i8": "int8 per channel"}[qdt]
        for name, v in timeit(fns, RUNS).items():
            if name == "probe":
                probe_times += v
                continue
            rows.append((f"{name} GEMV ({label})", nbytes, median(v)))
            if name.startswith("ORT"):
                ort_bw = max(ort_bw, nbytes / median(v) / 1e9)
        mod = mats = fns = None  # free the stack before the next one

    w = rng.standard_normal((F32_COUNT, K, N), dtype=np.float32)
    ts = timeit({"probe": _call(probe, x=buf), "numpy": lambda: [x1 @ w[i] for i in range(F32_COUNT)]}, RUNS)
    probe_times += ts["probe"]
    rows.append((f"numpy f32 GEMV ({F32_COUNT} matrices)", w.nbytes, median(ts["numpy"])))
    probe_bytes, w, buf = buf.nbytes, None, None

    for qdt in ("i4", "i8"):
        mats = weights(qdt, GEMM_COUNTS[qdt], rng)
        for m in (4, 16):
            mod, _ = sqk_model(qdt, mats, m, threads)
            xm = rng.standard_normal((m, K), dtype=np.float32)
            _check([o[0:1] for o in mod(x=xm)], mats, xm[0:1], f"sqk {qdt} M={m}", 1e-4)
            ts = timeit({"sqk": _call(mod, x=xm)}, RUNS)
            rows.append((f"sqk {qdt} GEMM M={m}", weight_bytes(qdt, mats), median(ts["sqk"])))

    probe_bw = probe_bytes / median(probe_times) / 1e9
    rows.insert(0, ("read probe: sqk reduce_sum", probe_bytes, median(probe_times)))
    for name, nbytes, secs in rows:
        bw = nbytes / secs / 1e9
        t.add(name, f"{nbytes / MiB:.0f} MiB", f"{secs * 1e3:.1f}", bw, f"{bw / probe_bw:.2f}",
              f"{bw / ort_bw:.2f}")
    t.notes += [(f"GB/s: weight bytes (packed q + scales; f32 for numpy) per second, median of {RUNS} runs; "
                 f"the probe's median over all {len(probe_times)} of its runs, interleaved with the GEMVs; "
                 f"ORT best = {ort_bw:.1f} GB/s"),
                "GEMM M=4/16 rows: 16 int4 / 8 int8 matrices (144 / 128 MiB)", blas, *notes,
                ("targets (issue 3): sqk int4 GEMV >= 0.85 x probe and >= 1.3 x ORT best; "
                 "sqk int8 GEMV >= 0.85 x probe")]
    return t
