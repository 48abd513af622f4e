"""Accuracy of codegen/vmath.py (exp, tanh, erf and what is built on them: sigmoid,
gelu) over dense sweeps and special values, in ulps against float64 truth."""
import math

import numpy as np
import pytest

import sqk
from harness import assert_close, compile_for, rand, check, target_param

F32 = np.float32
SPECIALS = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.2e-38, -1.2e-38,
                     88.72, 88.73, -87.3, -103.9, -104.0, 89.0, 1e30, -1e30, 0.6249, 0.625, 9.0, 0.9277,
                     0.92774, 3.92, 4.0], F32)
# Max error in ulps of the correctly rounded result (measured: exp 0.99, tanh 1.26, erf 0.98).
MAX_ULP = {"exp": 2.0, "tanh": 2.0, "erf": 2.0}
_erf64 = np.vectorize(math.erf, otypes=[np.float64])
TRUTH = {"exp": np.exp, "tanh": np.tanh, "erf": _erf64}


def sweep(lo, hi, n):
    tiny = np.logspace(-45, -1, n // 20).astype(F32)
    return np.concatenate([np.linspace(lo, hi, n, dtype=F32), tiny, -tiny, SPECIALS])


def ulp_errors(out: np.ndarray, x: np.ndarray, op: str):
    """Error of ``out`` in ulps of the f32-rounded truth, for finite nonzero truths;
    asserts non-finite and zero results match exactly (sign of zero included)."""
    with np.errstate(over="ignore"):
        t64 = TRUTH[op](x.astype(np.float64))
        t32 = t64.astype(F32)
    special = ~np.isfinite(t32) | (t32 == 0) | np.isnan(x)
    for xi, o, t in zip(x[special], out[special], t32[special]):
        assert (np.isnan(o) and np.isnan(t)) or (o == t and np.signbit(o) == np.signbit(t)), \
            f"{op}({xi!r}) = {o!r}, expected {t!r}"
    fin = ~special
    err = np.abs(out[fin].astype(np.float64) - t64[fin]) / np.spacing(np.abs(t32[fin])).astype(np.float64)
    return err, x[fin]


@target_param
def test_sweep(target):
    n = 200_001
    xe, xt = sweep(-100, 100, n), sweep(-10, 10, n)
    b = sqk.GraphBuilder("vmath")
    e_in, t_in = b.input("xe", xe.shape, "f32"), b.input("xt", xt.shape, "f32")
    g = b.output(b.exp(e_in), b.tanh(t_in), b.erf(t_in), b.exp(t_in), b.sigmoid(t_in), b.gelu(t_in),
                 b.gelu(t_in, approximate="tanh"), b.silu(t_in))
    m = compile_for(g, target)
    outs = m(xe=xe, xt=xt)
    with np.errstate(over="ignore"):
        refs = sqk.reference(g, xe=xe, xt=xt)
    # exp over [-100, 100]: the harness tolerance (scaled by the max, inf here) says nothing; use ulps
    for op, out, x in [("exp", outs[0], xe), ("tanh", outs[1], xt), ("erf", outs[2], xt), ("exp", outs[3], xt)]:
        err, xf = ulp_errors(out, x, op)
        assert err.max() <= MAX_ULP[op], f"{op} on {target}: {err.max():.2f} ulp at x={xf[err.argmax()]!r}"
    # sigmoid, gelu, silu against the reference interpreter: harness tolerance for finite
    # inputs (an inf output would make its max-scaled tolerance infinite), exact for +-inf, NaN
    fin = np.isfinite(xt)
    for i in range(4, len(outs)):
        assert_close(outs[i][fin], refs[i][fin], what=f"output {i} on {target}")
        np.testing.assert_array_equal(outs[i][~fin], refs[i][~fin], err_msg=f"output {i} on {target}")


def test_exp_subnormal_and_overflow_boundaries():
    """Around the bounds of 2^n: the smallest subnormal, the last normal, overflow."""
    x = np.concatenate([np.linspace(lo, hi, 20_001, dtype=F32)
                        for lo, hi in [(-104.5, -86.5), (87.5, 89.5)]])
    b = sqk.GraphBuilder("exp_edges")
    g = b.output(b.exp(b.input("x", x.shape, "f32")))
    with np.errstate(over="ignore"):
        truth = np.exp(x.astype(np.float64))
        t32 = truth.astype(F32)
    out = compile_for(g, "host")(x=x)
    # every result (subnormal ones included) is within 1 unit of the f32 grid around the truth
    spacing = np.spacing(np.abs(t32)).astype(np.float64)
    fin = np.isfinite(t32)
    assert np.all(np.abs(out[fin] - truth[fin]) <= spacing[fin])
    assert np.all(np.isinf(out[~fin]))


@target_param
@pytest.mark.parametrize("op", ["exp", "tanh", "erf", "gelu"])
def test_f16(target, op):
    b = sqk.GraphBuilder(op)
    x = rand((3, 37), "f16", low=-6, high=6)
    g = b.output(getattr(b, op)(b.input("x", x.shape, "f16")))
    check(g, {"x": x}, target)
