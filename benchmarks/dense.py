"""Dense fp32 kernels against numpy (OpenBLAS) and onnxruntime, and thread scaling.

* GEMM n x n x n at 256/512/1024/2048 and small-M products (M = 1, 4, 16;
  K = N = 4096, 64 MiB of weights: cache-resident at best, so GFLOP/s here
  are not DRAM figures), GFLOP/s, sqk vs numpy, at the benchmark's thread count.
* conv2d, batch 1: ResNet-style 3x3 layers (pad 1) and depthwise 3x3 layers,
  sqk vs onnxruntime's Conv (when installed) and numpy (im2col by
  ``sliding_window_view`` + one matmul), GFLOP/s (2 * MACs).
* Thread scaling: GEMM 1024 and the largest conv with 1 and with 2 threads
  (each contender's ratio of the two).
"""
from __future__ import annotations

import numpy as np

import sqk

from . import Table, median, numpy_blas, timeit

GEMM_SIZES = (256, 512, 1024, 2048)
SMALL_M = (1, 4, 16)
SMALL_KN = 4096
# (label, C_in, C_out, H=W, groups)
CONVS = (("resnet 3x3", 64, 64, 56, 1), ("resnet 3x3", 128, 128, 28, 1), ("resnet 3x3", 256, 256, 14, 1),
         ("depthwise 3x3", 144, 144, 56, 144), ("depthwise 3x3", 512, 512, 14, 512))
RUNS = 7


def _check(got, want, what, tol=1e-3):
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    if err > tol:
        raise AssertionError(f"{what}: sqk differs from the peer (relative error {err:.2e})")


def matmul_model(m, k, n, threads, w=None):
    """x[m, k] @ b[k, n]; b is a constant when ``w`` is given (the weight case)."""
    g = sqk.GraphBuilder(f"mm{m}x{k}x{n}")
    a = g.input("a", (m, k))
    b = g.const(w, "f32", name="w") if w is not None else g.input("b", (k, n))
    return sqk.compile(g.output(g.matmul(a, b)), threads=threads)


def conv_model(c_in, c_out, hw, groups, w, threads):
    g = sqk.GraphBuilder("conv")
    x = g.input("x", (1, c_in, hw, hw))
    y = g.conv2d(x, g.const(w, "f32", name="w"), pads=(1, 1, 1, 1), groups=groups)
    return sqk.compile(g.output(y), threads=threads)


def ort_conv(c_in, c_out, hw, groups, w, threads):
    """An onnxruntime session running one Conv, or None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups, kernel_shape=[3, 3])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, c_in, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, hw, hw])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def numpy_conv(x, w, groups):
    """3x3, pad 1, stride 1 convolution as im2col + matmul (per group)."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [n, c, h, w, 3, 3]
    cg, og = c // groups, w.shape[0] // groups
    cols = cols.reshape(n, groups, cg, h * wd, 9).transpose(0, 1, 3, 2, 4).reshape(n, groups, h * wd, cg * 9)
    wg = w.reshape(groups, og, cg * 9)
    return np.matmul(cols, wg.transpose(0, 2, 1)).transpose(0, 1, 3, 2).reshape(n, groups * og, h, wd)


def run(threads: int) -> Table:
    blas = numpy_blas(threads)
    rng = np.random.default_rng(0)
    t = Table("dense fp32: sqk vs numpy / onnxruntime (GFLOP/s)",
              ["benchmark", "shape", "sqk", "numpy", "ORT", "sqk/best peer"])

    def row(name, shape, fns, flops, ref_out=None):
        inner = max(1, int(0.05 * 50e9 / flops))  # ~50 ms per run at 50 GFLOP/s
        ts = timeit(fns, RUNS, inner)
        g = {k: flops / median(v) / 1e9 for k, v in ts.items()}
        peer = max(v for k, v in g.items() if k != "sqk")
        t.add(name, shape, g["sqk"], g.get("numpy", float("nan")), g.get("ORT", float("nan")),
              f"{g['sqk'] / peer:.2f}")
        return g

    for n in GEMM_SIZES:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        m = matmul_model(n, n, n, threads)
        _check(m(a=a, b=b), a @ b, f"GEMM {n}")
        row("GEMM", f"{n}^3", {"sqk": lambda: m(a=a, b=b), "numpy": lambda: a @ b}, 2.0 * n ** 3)

    w = rng.standard_normal((SMALL_KN, SMALL_KN), dtype=np.float32) / 64
    for mm in SMALL_M:
        x = rng.standard_normal((mm, SMALL_KN), dtype=np.float32)
        m = matmul_model(mm, SMALL_KN, SMALL_KN, threads, w)
        _check(m(a=x), x @ w, f"small-M {mm}")
        row("small-M GEMM", f"M={mm}, K=N={SMALL_KN}", {"sqk": lambda: m(a=x), "numpy": lambda: x @ w},
            2.0 * mm * SMALL_KN * SMALL_KN)

    conv_cases = []
    for label, ci, co, hw, groups in CONVS:
        wc = (rng.standard_normal((co, ci // groups, 3, 3)) * np.sqrt(2 / (9 * ci // groups))).astype(np.float32)
        x = rng.standard_normal((1, ci, hw, hw), dtype=np.float32)
        m = conv_model(ci, co, hw, groups, wc, threads)
        want = numpy_conv(x, wc, groups)
        _check(m(x=x), want, f"conv {label}")
        fns = {"sqk": lambda m=m, x=x: m(x=x), "numpy": lambda x=x, wc=wc, g=groups: numpy_conv(x, wc, g)}
        ort_fn = ort_conv(ci, co, hw, groups, wc, threads)
        if ort_fn is not None:
            _check(ort_fn(x), want, f"ORT conv {label}")
            fns["ORT"] = lambda f=ort_fn, x=x: f(x)
        flops = 2.0 * co * hw * hw * (ci // groups) * 9
        row(f"conv2d {label}", f"{ci}->{co}, {hw}x{hw}", fns, flops)
        conv_cases.append((label, ci, co, hw, groups, wc, x, flops))

    # Thread scaling: the same problems at 1 and 2 threads (numpy's BLAS set alike).
    scale = Table("thread scaling (GFLOP/s at 1 and 2 threads)",
                  ["benchmark", "contender", "1 thread", "2 threads", "speed-up"])
    n = 1024
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    label, ci, co, hw, groups, wc, x, cflops = conv_cases[0]
    res = {}
    for th in (1, 2):
        numpy_blas(th)
        m = matmul_model(n, n, n, th)
        mc = conv_model(ci, co, hw, groups, wc, th)
        ts = timeit({"sqk gemm": lambda: m(a=a, b=b), "numpy gemm": lambda: a @ b,
                     "sqk conv": lambda: mc(x=x)}, RUNS, 3)
        for k, v in ts.items():
            res[(k, th)] = (2.0 * n ** 3 if "gemm" in k else cflops) / median(v) / 1e9
    numpy_blas(threads)
    for k in ("sqk gemm", "numpy gemm", "sqk conv"):
        what = f"GEMM {n}^3" if "gemm" in k else f"conv2d {label} {ci}->{co} {hw}x{hw}"
        scale.add(what, k.split()[0], res[(k, 1)], res[(k, 2)], f"{res[(k, 2)] / res[(k, 1)]:.2f}x")
    t.notes += [f"sqk: {threads} threads; {blas}",
                f"small-M weights are constants of {SMALL_KN * SMALL_KN * 4 >> 20} MiB (cache-resident "
                "figures, not DRAM)",
                "median of interleaved runs; numpy conv = im2col (sliding_window_view) + matmul",
                "", scale.text()]
    return t
