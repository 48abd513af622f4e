"""matmul_q {activations=int8}'s GEMM for many rows of x (codegen/matmul_q_gemm_i8.py:
GGUF's 4-bit schemes with llama.cpp's q8 activations, act_group 32) against the
reference interpreter (ir.ops.matmul_q_i8act) BIT FOR BIT: row counts around the
threshold, the register tile and the row chunks; N past the quad of 32 columns
and the 64-column block; Q4_0 / Q4_1 / Q4_K operands (f16 and f32 scales);
NaN, inf and all-zero activation groups; batch dims; two threads; and the
cases it leaves to emit_i8act (fewer rows, no AVX2, K not a multiple of 32,
other groups, zero points, i8 weights, static scales), which stay exact too."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import host_without
from sqk.codegen import matmul_q_gemm_i8
from sqk.codegen.target import get_target


def graph(scheme: str, M: int, K: int, N: int, lead=(), seed=0, group=32, act_group=32, **kw):
    """x [*lead, M, K] @ one matmul_q {activations=int8} of ``scheme`` (q40, q41, q4k,
    q40-f32: f32 scales, zeros: i4 zero points, i8: i8 weights); inputs too."""
    rng = np.random.default_rng(seed)
    G = -(-K // group)
    b = sqk.GraphBuilder("gi8")
    x = b.input("x", lead + (M, K))
    i8 = scheme == "i8"
    ops = [b.const(rng.integers(-128 if i8 else -8, 128 if i8 else 8, (K, N)).astype(np.int8), "i8" if i8 else "i4")]
    attrs = {"group": group}
    if scheme == "q4k":
        sg = 256 if K % 256 == 0 else 64
        ops += [b.const(rng.integers(0, 64, (G, N)).astype(np.uint8), "u8"),
                b.const(rng.integers(0, 64, (G, N)).astype(np.uint8), "u8"),
                b.const(rng.uniform(-0.01, 0.01, (-(-K // sg), N, 2)).astype(np.float16), "f16")]
        attrs["super_group"] = sg
    else:
        sdt = np.float32 if scheme == "q40-f32" else np.float16
        ops.append(b.const(rng.uniform(0.01, 0.1, (G, N)).astype(sdt), "f32" if sdt is np.float32 else "f16"))
        if scheme == "q41":
            ops.append(b.const(rng.uniform(-1, 1, (G, N)).astype(np.float16), "f16"))
        elif scheme == "zeros":
            ops.append(b.const(rng.integers(-8, 8, (G, N)).astype(np.int8), "i4"))
    g = b.output(b.matmul_q(x, *ops, activations="int8", act_group=act_group, **attrs, **kw))
    xs = rng.standard_normal(lead + (M, K)).astype(np.float32) * rng.uniform(0.1, 10, lead + (M, 1)).astype(np.float32)
    return g, {"x": xs}


def node_of(g):
    return next(n for n in g.nodes if n.op == "matmul_q")


def exact(g, inputs, **kw):
    got = sqk.compile(g, pipeline="", **kw)(**inputs)
    want = sqk.reference(g, **inputs)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True) and \
        got[~np.isnan(got)].tobytes() == want[~np.isnan(want)].tobytes(), np.nanmax(np.abs(got - want))


def test_takes_gemm_i8():
    host = get_target("host")
    if "avx2" not in set(host.enabled_features):
        pytest.skip("the int8 GEMM is for AVX2 hosts")
    for scheme in ("q40", "q41", "q4k", "q40-f32"):
        assert matmul_q_gemm_i8.takes_gemm_i8(node_of(graph(scheme, 10, 64, 8)[0]), host), scheme
    assert matmul_q_gemm_i8.takes_gemm_i8(node_of(graph("q40", 16, 64, 8, act_group=0)[0]), host)
    for g in (graph("q40", 9, 64, 8)[0],                       # below the threshold
              graph("q40", 16, 80, 8)[0],                      # K not a multiple of 32
              graph("q40", 16, 128, 8, group=64)[0],           # weight group 64
              graph("q40", 16, 128, 8, act_group=64)[0],       # activation group 64
              graph("zeros", 16, 64, 8)[0],                    # integer zero points
              graph("i8", 16, 64, 8)[0],                       # i8 weights
              graph("q40", 16, 64, 8, act_scale=0.05)[0]):     # a static scale
        assert not matmul_q_gemm_i8.takes_gemm_i8(node_of(g), host)
    assert not matmul_q_gemm_i8.takes_gemm_i8(node_of(graph("q40", 16, 64, 8)[0]), get_target("riscv64"))


# (scheme, M, K, N): N past a quad (32) and a block (64), row chunks of up to 128 rows
# (fewer for long K: 65536 / K rows), a 1-row tail tile
CASES = [
    ("q40", 10, 32, 8), ("q40", 11, 64, 33), ("q40", 64, 576, 192), ("q40", 130, 576, 96),
    ("q41", 13, 96, 67), ("q41", 64, 576, 100), ("q41", 257, 128, 129), ("q41", 45, 2048, 40),
    ("q4k", 17, 256, 31), ("q4k", 64, 512, 65), ("q4k", 600, 256, 5), ("q40-f32", 33, 160, 64),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-M{c[1]}-K{c[2]}-N{c[3]}")
def test_gemm_i8_bit_exact(case):
    scheme, M, K, N = case
    g, inputs = graph(scheme, M, K, N, seed=M + K + N)
    exact(g, inputs)


def test_gemm_i8_special_rows_batch_threads():
    """NaN / inf / all-zero groups, batch dims folded into rows, two threads."""
    g, inputs = graph("q41", 23, 192, 70, lead=(2,), seed=3)
    x = inputs["x"]
    x[0, 1, 5] = np.nan          # a NaN: its group's d is NaN, the row's outputs NaN
    x[1, 4, 40] = np.inf         # an inf: the same (dynamic scales)
    x[0, 7, 32:64] = 0           # an all-zero group: d = 0, codes 0
    x[1, 9, :] = 0               # an all-zero row
    for threads in (1, 2):
        exact(g, inputs, threads=threads)
    assert np.isnan(sqk.compile(g, pipeline="")(**inputs)[0, 1]).all()


@pytest.mark.parametrize("scheme, M, K, kw", [("q40", 9, 64, {}), ("q40", 16, 80, {}), ("zeros", 16, 64, {}),
                                               ("i8", 20, 96, {}), ("q40", 16, 64, {"act_scale": 0.05}),
                                               ("q40", 16, 128, {"act_group": 64})])
def test_fallback_cases_exact(scheme, M, K, kw):
    g, inputs = graph(scheme, M, K, 37, seed=K, **kw)
    exact(g, inputs)


def test_gemm_i8_without_avx2(monkeypatch):
    """x86 without AVX2: emit_i8act's portable path, the same numbers."""
    host = host_without(monkeypatch, lambda f: f.startswith(("+avx2", "+avx512", "+avxvnni", "+fma")))
    g, inputs = graph("q4k", 20, 256, 40, seed=1)
    assert not matmul_q_gemm_i8.takes_gemm_i8(node_of(g), host)
    exact(g, inputs)
