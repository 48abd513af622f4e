"""Numeric test harness: compile a graph for a target, run it, compare with
the numpy reference interpreter with a tolerance that reflects the dtype."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from conftest import require_riscv

# host, riscv64 with RVV (vlen 256) and riscv64 without V: every numeric test runs on each.
TARGETS = ["host", "riscv64", "riscv64-scalar"]
target_param = pytest.mark.parametrize("target", TARGETS)


def tolerance(dtype: np.dtype) -> float:
    """Relative tolerance (scaled by the output's magnitude); 0 = exact."""
    return {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}.get(np.dtype(dtype), 0.0)


def assert_close(out: np.ndarray, ref: np.ndarray, rtol: float | None = None, what: str = "output"):
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype}, reference {ref.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {out.shape}, reference {ref.shape}"
    tol = tolerance(ref.dtype) if rtol is None else rtol
    if tol == 0:
        np.testing.assert_array_equal(out, ref, err_msg=what)
    else:
        r = ref.astype(np.float64)
        scale = max(1.0, float(np.nanmax(np.abs(r), initial=0.0)) if r.size else 1.0)
        np.testing.assert_allclose(out.astype(np.float64), r, rtol=tol, atol=tol * scale, err_msg=what,
                                   equal_nan=True)


def compile_for(g, target: str, **kw):
    if target.startswith("riscv64"):
        require_riscv()
    return sqk.compile(g, target=target, **kw)


def check(g, inputs: dict, target: str = "host", rtol: float | None = None, **kw):
    """Compile ``g`` for ``target``, run on ``inputs``, compare every output with
    the reference (failures name the output value).  Returns the module."""
    m = compile_for(g, target, **kw)
    outs = m(**inputs)
    refs = sqk.reference(g, **inputs)
    if len(g.outputs) == 1:
        outs, refs = (outs,), (refs,)
    for v, o, r in zip(g.outputs, outs, refs):
        assert_close(o, r, rtol, what=f"{g.name}: {v.name} on {target}")
    return m


def rand(shape, dtype="f32", rng=None, low=-3, high=3):
    """Random test data of an sqk dtype name."""
    rng = rng or np.random.default_rng(0)
    d = sqk.ir.dtypes.dtype(dtype)
    if d.is_float:
        return rng.uniform(low, high, size=shape).astype(d.np_dtype)
    if d.name == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    info = np.iinfo(d.np_dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100) + 1, size=shape).astype(d.np_dtype)
