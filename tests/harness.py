"""Numeric test harness: compile a graph for a target, run it, compare with
the numpy reference interpreter with a tolerance that reflects the dtype."""
from __future__ import annotations

import os

import numpy as np
import pytest

import sqk
from conftest import require_riscv

# host, riscv64 with RVV (vlen 256) and riscv64 without V: every numeric test runs on each.
TARGETS = ["host", "riscv64", "riscv64-scalar"]


def avx512_or_vnni(feature: str) -> bool:
    """The x86 features kernels branch on beyond AVX2 (512-bit vectors and
    register tiles, vpdpbusd): an LLVM "+name" feature."""
    return feature.startswith(("+avx512", "+avxvnni"))


def _host_masks_something() -> bool:
    from sqk.codegen.target import host_target
    return os.environ.get("SQK_TEST_HOST_AVX2") == "1" or \
        any(avx512_or_vnni(f) for f in host_target().features.split(",") if f.startswith("+"))


# On a host with AVX-512 or VNNI, every "host" test of target_param (and of host_isa) runs twice: as
# the CPU is, and with those features switched off (marker host_avx2, applied by conftest), so the
# AVX2 kernels that any x86-64 the README supports runs are exercised everywhere.  On an AVX2-only
# host the two are one (SQK_TEST_HOST_AVX2=1 keeps the second run anyway, to test the mechanism).
AVX2_PARAMS = [pytest.param("host", id="host-avx2", marks=pytest.mark.host_avx2)] if _host_masks_something() else []
target_param = pytest.mark.parametrize("target", ["host", *AVX2_PARAMS, "riscv64", "riscv64-scalar"])
# for host-only tests whose kernels depend on the CPU's features: a "host_isa" argument, "host"
host_isa = pytest.mark.parametrize("host_isa", ["host", *AVX2_PARAMS])


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
        # the scale of the finite values only: an inf in ref would make atol inf and let
        # every finite element pass (assert_allclose matches inf and nan positions itself)
        scale = max(1.0, float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)))
        np.testing.assert_allclose(out.astype(np.float64), r, rtol=tol, atol=tol * scale, err_msg=what,
                                   equal_nan=True)


# The qemu configurations every riscv64 (RVV) module runs under (SQK_TEST_EXTRA_VLEN adds
# more, e.g. 1024).  Kernels are vector-length agnostic: a float reduction the vectorizer
# reassociates (sparse dot products) sums in an order that depends on VLEN, so float
# outputs must agree within the dtype's tolerance (integer ones exactly); agnostic tails
# and masks filled with 1s expose code that leans on them.
ALL_1S = "rvv_ta_all_1s=on,rvv_ma_all_1s=on"
RVV_CONFIGS = [(256, ALL_1S), (128, ""), (512, ALL_1S)] + \
    [(int(v), "") for v in os.environ.get("SQK_TEST_EXTRA_VLEN", "").split(",") if v]


class RVVModule:
    """A riscv64 Module whose every call runs under each of RVV_CONFIGS."""

    def __init__(self, module):
        self._m = module

    def __getattr__(self, name):
        return getattr(self._m, name)

    def __call__(self, **inputs):
        results = []
        for vlen, opts in RVV_CONFIGS:
            self._m.vlen, self._m.qemu_options = vlen, opts
            out = self._m(**inputs)
            results.append(out if isinstance(out, tuple) else (out,))
        for (vlen, opts), res in zip(RVV_CONFIGS[1:], results[1:]):
            for i, (a, b) in enumerate(zip(results[0], res)):
                if a.tobytes() != b.tobytes():
                    assert_close(b, a, what=f"output {i}, vlen={vlen} ({opts}) against vlen={RVV_CONFIGS[0][0]} "
                                        f"({RVV_CONFIGS[0][1]})")
        return results[0] if len(results[0]) > 1 else results[0][0]


def host_without(monkeypatch, off):
    """The host target with every feature ``off(f)`` accepts (a "+name" string)
    switched off, installed as sqk's "host" for the test; returns it."""
    import dataclasses

    import sqk.codegen.target as T

    get_target = T.get_target
    host = get_target("host")
    feats = ",".join("-" + f[1:] if off(f) else f for f in host.features.split(","))
    t = dataclasses.replace(host, features=feats, vector_bits=T.x86_vector_bits(feats))
    monkeypatch.setattr(T, "get_target", lambda name, **kw: t if name == "host" else get_target(name, **kw))
    return t


def host_avx2(monkeypatch):
    """The host with AVX-512 and VNNI switched off (see AVX2_PARAMS)."""
    return host_without(monkeypatch, avx512_or_vnni)


def compile_for(g, target: str, **kw):
    """sqk.compile, skipping (or failing in CI) without the RISC-V toolchain;
    riscv64 modules run under every RVV_CONFIGS configuration."""
    if target.startswith("riscv64"):
        require_riscv()
    m = sqk.compile(g, target=target, **kw)
    return RVVModule(m) if target == "riscv64" else m


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
