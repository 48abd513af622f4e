"""llm/sampling.py: greedy, top-k, top-p and temperature sampling, the exact candidate sets, the
seeded SplitMix64 stream, frequencies within statistical bounds, bit-exact agreement with a plain
Python transcription of the documented algorithm (what the C runner reimplements), and errors."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from sqk.llm.sampling import EXP_COEFFS, INV_LN2, LN2_HI, LN2_LO, Rng, candidates, distribution, exp_det, sample


# --- the generator and exp_det -----------------------------------------------------------------

def test_splitmix64_reference_values():
    # published SplitMix64 outputs (Steele et al.; the same sequence Vigna's splitmix64.c gives)
    r = Rng(1234567)
    assert [r.next_u64() for _ in range(5)] == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                               4593380528125082431, 16408922859458223821]
    r = Rng(0)
    assert r.next_u64() == 0xE220A8397B1DCDAF
    r = Rng(2 ** 64 + 5)                                          # seeds are taken mod 2**64
    assert r.next_u64() == Rng(5).next_u64()
    u = [Rng(s).random() for s in range(1000)]
    assert all(0.0 <= x < 1.0 for x in u) and 0.45 < float(np.mean(u)) < 0.55


def test_exp_det_accuracy_and_edges():
    x = -np.random.default_rng(0).random(200_000) * 700
    x[:100] = -np.random.default_rng(1).random(100) * 1e-6
    rel = np.abs(exp_det(x) - np.exp(x)) / np.exp(x)
    assert rel.max() < 1e-15
    e = exp_det(np.array([0.0, -0.0, -700.0, -700.0000001, -1e300, -np.inf]))
    assert e[0] == 1.0 and e[1] == 1.0 and e[2] > 0 and list(e[3:]) == [0.0, 0.0, 0.0]


# --- the algorithm, transcribed in plain Python floats: what a C implementation does -----------

def _exp_spec(x: float) -> float:
    if x < -700.0:
        return 0.0
    k = round(x * INV_LN2)                     # Python rounds half to even, as rint
    r = (x - k * LN2_HI) - k * LN2_LO
    p = EXP_COEFFS[-1]
    for c in EXP_COEFFS[-2::-1]:
        p = p * r + c
    return math.ldexp(p * r + 1.0, k)


def _sample_spec(logits, temperature, top_k, top_p, rng: Rng) -> int:
    l = [float(v) for v in logits]
    if temperature == 0:
        return max(range(len(l)), key=lambda i: (l[i], -i))
    if top_k is None and top_p is None:
        ids = list(range(len(l)))
    else:
        ids = sorted(range(len(l)), key=lambda i: (-l[i], i))[: top_k or len(l)]
    m = max(l)
    cum, c = [], 0.0
    for i in ids:
        c = c + _exp_spec((l[i] - m) / temperature)
        cum.append(c)
    keep = len(ids)
    if top_p is not None:
        keep = next(j for j, cj in enumerate(cum) if cj >= top_p * cum[-1]) + 1
    r = rng.random() * cum[keep - 1]
    j = next((j for j in range(keep) if cum[j] > r), keep - 1)
    return ids[j]


def test_sample_matches_the_documented_algorithm_bit_for_bit():
    g = np.random.default_rng(7)
    for case in range(200):
        n = int(g.integers(1, 40))
        l = (g.standard_normal(n) * g.choice([0.1, 1.0, 5.0, 40.0])).astype(np.float32)
        if case % 5 == 0:
            l = np.round(l)                                   # many ties
        if case % 7 == 0 and n > 2:
            l[g.integers(0, n, 2)] = -np.inf                  # masked tokens
        t = float(g.choice([0.0, 0.3, 0.7, 1.0, 1.5, 10.0]))
        k = None if g.random() < 0.4 else int(g.integers(1, n + 3))
        p = None if g.random() < 0.4 else float(g.choice([0.05, 0.5, 0.9, 0.95, 1.0]))
        seed = int(g.integers(0, 2 ** 63))
        a, b = Rng(seed), Rng(seed)
        for _ in range(5):
            assert sample(l, t, k, p, a) == _sample_spec(l, t, k, p, b), (case, l, t, k, p, seed)
        assert a.state == b.state


def test_golden_draws():
    """Pinned ids: the C sampler of the RISC-V runner must draw these for this input and seed."""
    l = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 3.0, 0.0, 2.5], np.float32)
    rng = Rng(42)
    assert [sample(l, 0.8, 5, 0.9, rng) for _ in range(12)] == [7, 3, 3, 3, 3, 7, 3, 7, 3, 5, 3, 5]
    rng = Rng(42)
    assert [sample(l, 1.0, None, None, rng) for _ in range(12)] == [5, 2, 3, 3, 0, 7, 3, 6, 3, 5, 3, 5]


# --- greedy, candidate sets ----------------------------------------------------------------------

def test_greedy_is_argmax_lowest_id_and_leaves_rng_alone():
    l = np.array([0.5, 3.0, -1.0, 3.0, 2.9], np.float32)
    rng = Rng(3)
    assert sample(l, rng=rng) == 1 and sample(l, 0.0, top_k=2, top_p=0.1, rng=rng) == 1
    assert rng.state == Rng(3).state
    assert sample(np.array([-np.inf, -np.inf, -5.0])) == 2
    assert sample(l.astype(np.float16)) == 1 and sample(l.astype(np.float64)) == 1
    # top_k=1 at any temperature is greedy too, and still consumes exactly one draw
    assert sample(l, 5.0, top_k=1, rng=rng) == 1 and rng.state != Rng(3).state


def test_top_k_set_is_exact_with_ties_to_lower_ids():
    l = np.array([1.0, 5.0, 3.0, 5.0, 3.0, 3.0, -2.0, 4.0], np.float64)
    assert list(candidates(l, 1)) == [1]
    assert list(candidates(l, 3)) == [1, 3, 7]
    assert list(candidates(l, 4)) == [1, 3, 7, 2]              # tie at the boundary: the lowest id of 2, 4, 5
    assert list(candidates(l, 5)) == [1, 3, 7, 2, 4]
    assert list(candidates(l, 8)) == list(candidates(l, 100)) == [1, 3, 7, 2, 4, 5, 0, 6]
    assert list(candidates(l)) == list(range(8))
    rng = Rng(11)
    seen = {sample(l, 50.0, top_k=4, rng=rng) for _ in range(400)}
    assert seen == {1, 3, 7, 2}                                 # high temperature: every kept id shows up


def test_top_p_set_is_the_smallest_prefix_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    l = np.log(probs)
    for p, expect in [(0.01, [1]), (0.49, [1]), (0.51, [1, 3]), (0.79, [1, 3]), (0.81, [1, 3, 2]),
                      (0.94, [1, 3, 2]), (0.96, [1, 3, 2, 0]), (1.0, [1, 3, 2, 0])]:
        ids, cum = distribution(l, 1.0, top_p=p)
        assert list(ids) == expect, p
        np.testing.assert_allclose(cum / cum[-1], np.cumsum(probs[expect]) / probs[expect].sum(), rtol=1e-12)
    # top-k first, then top-p over the renormalised survivors
    ids, _ = distribution(l, 1.0, top_k=2, top_p=0.6)          # 0.5/0.8 = 0.625 >= 0.6
    assert list(ids) == [1]
    ids, _ = distribution(l, 1.0, top_k=2, top_p=0.65)
    assert list(ids) == [1, 3]
    rng = Rng(5)
    assert {sample(l, 1.0, top_p=0.79, rng=rng) for _ in range(300)} == {1, 3}


def test_masked_tokens_are_never_drawn():
    l = np.zeros(50, np.float32)
    l[::2] = -np.inf
    rng = Rng(9)
    draws = [sample(l, 1.0, rng=rng) for _ in range(500)]
    assert all(d % 2 == 1 for d in draws) and len(set(draws)) > 20


# --- statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.5, None, None), (2.0, 4, None),
                                                     (1.0, None, 0.9), (0.7, 5, 0.8)])
def test_frequencies_follow_the_distribution(temperature, top_k, top_p):
    l = np.array([1.2, -0.3, 0.8, 2.0, 0.0, -1.5, 1.9, 0.4], np.float32)
    ids, cum = distribution(l, temperature, top_k, top_p)
    p = np.zeros(l.size)
    p[ids] = np.diff(np.concatenate([[0.0], cum])) / cum[-1]
    # the same distribution from first principles (softmax of the kept logits at temperature)
    z = np.exp((l[ids].astype(np.float64) - l.max()) / temperature)
    np.testing.assert_allclose(p[ids], z / z.sum(), rtol=1e-12)
    n, rng = 4000, Rng(1234)
    counts = np.bincount([sample(l, temperature, top_k, top_p, rng) for _ in range(n)], minlength=l.size)
    assert set(np.flatnonzero(counts)) <= set(ids.tolist())
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1), (counts, n * p)


def test_seeded_determinism():
    l = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    a = [sample(l, 0.9, 50, 0.95, r) for r in [Rng(77)] for _ in range(30)]
    b = [sample(l, 0.9, 50, 0.95, r) for r in [Rng(77)] for _ in range(30)]
    c = [sample(l, 0.9, 50, 0.95, r) for r in [Rng(78)] for _ in range(30)]
    assert a == b and a != c
    assert sample(l, 0.9, rng=123) == sample(l, 0.9, rng=Rng(123))       # an int seeds a fresh Rng
    assert len({sample(l, 5.0) for _ in range(20)}) > 1                  # rng=None: a random seed


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("logits,kwargs,match", [
    (np.zeros((2, 3), np.float32), {}, "1-D"),
    (np.zeros(0, np.float32), {}, "non-empty"),
    (np.arange(4), {}, "floating"),
    (np.array([0.0, np.nan]), {}, "NaN"),
    (np.array([0.0, np.inf]), {}, r"\+inf"),
    (np.array([-np.inf, -np.inf]), {}, "-inf"),
    (np.zeros(3), {"temperature": -0.1}, "temperature"),
    (np.zeros(3), {"temperature": float("nan")}, "temperature"),
    (np.zeros(3), {"temperature": True}, "temperature"),
    (np.zeros(3), {"temperature": 1.0, "top_k": 0}, "top_k"),
    (np.zeros(3), {"temperature": 1.0, "top_k": 2.0}, "top_k"),
    (np.zeros(3), {"temperature": 1.0, "top_k": True}, "top_k"),
    (np.zeros(3), {"temperature": 1.0, "top_p": 0.0}, "top_p"),
    (np.zeros(3), {"temperature": 1.0, "top_p": 1.5}, "top_p"),
    (np.zeros(3), {"temperature": 1.0, "top_p": float("nan")}, "top_p"),
])
def test_bad_arguments(logits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(logits, **kwargs)


def test_bad_rng():
    with pytest.raises(TypeError, match="rng"):
        sample(np.zeros(3), 1.0, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        sample(np.zeros(3), 0.0, rng="seed")
    with pytest.raises(TypeError, match="seed"):
        Rng(1.5)
    with pytest.raises(ValueError, match="temperature 0"):
        distribution(np.zeros(3), 0.0)


# --- the C twin (runtime/sqk_sample.c): same draws on the host and on riscv64 -----------------------

_HARNESS = r"""
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "sqk_sample.h"
/* stdin: cases, then per case int64 n, top_k, draws, seed; double temperature, top_p; float logits[n];
   then int64 m and m doubles x. stdout: per case the drawn ids and the generator state; then the
   bits of sqk_exp_det(x) for each x (where an FMA would show first). */
int main(void) {
    int64_t cases;
    if (fread(&cases, 8, 1, stdin) != 1) return 2;
    for (int64_t c = 0; c < cases; c++) {
        int64_t h[4];
        double f[2];
        if (fread(h, 8, 4, stdin) != 4 || fread(f, 8, 2, stdin) != 2) return 2;
        float *l = malloc(h[0] * sizeof(float));
        int64_t *ids = malloc(h[0] * sizeof(int64_t));
        double *cum = malloc(h[0] * sizeof(double));
        if (fread(l, 4, h[0], stdin) != (size_t)h[0]) return 2;
        sqk_rng rng = {(uint64_t)h[3]};
        for (int64_t d = 0; d < h[2]; d++)
            printf("%" PRId64 " ", sqk_sample(l, h[0], f[0], h[1], f[1], &rng, ids, cum));
        printf("%" PRIu64 "\n", rng.state);
        free(l), free(ids), free(cum);
    }
    int64_t m;
    if (fread(&m, 8, 1, stdin) != 1) return 2;
    for (int64_t i = 0; i < m; i++) {
        double x, e;
        uint64_t bits;
        if (fread(&x, 8, 1, stdin) != 1) return 2;
        e = sqk_exp_det(x);
        memcpy(&bits, &e, 8);
        printf("%016" PRIx64 "%c", bits, i + 1 < m ? ' ' : '\n');
    }
    return 0;
}
"""


def _c_cases():
    g = np.random.default_rng(21)
    cases = []
    for case in range(150):
        n = int(g.integers(1, 300)) if case % 10 else 49152
        l = (g.standard_normal(n) * g.choice([0.1, 1.0, 5.0, 40.0])).astype(np.float32)
        if case % 5 == 0:
            l = np.round(l)
        if case % 7 == 0 and n > 2:
            l[g.integers(0, n, 2)] = -np.inf
        t = float(g.choice([0.0, 0.3, 0.7, 1.0, 1.5, 10.0]))
        k = None if g.random() < 0.4 else int(g.integers(1, n + 3))
        p = None if g.random() < 0.4 else float(g.choice([0.05, 0.5, 0.9, 0.95, 1.0]))
        cases.append((l, t, k, p, int(g.integers(0, 2 ** 63)), 4))
    bad = [(np.array([0.0, np.nan], np.float32), 1.0, None, None, 1, 1),
           (np.array([-np.inf, -np.inf], np.float32), 1.0, None, None, 1, 1),
           (np.array([0.0, np.inf], np.float32), 0.0, None, None, 1, 1)]
    return cases, bad


_EXP_X = -np.random.default_rng(3).random(20000) * 710


def _c_input(cases) -> bytes:
    out = [np.int64(len(cases)).tobytes()]
    for l, t, k, p, seed, draws in cases:
        out += [np.array([l.size, k or 0, draws, seed], np.int64).tobytes(),
                np.array([t, p or 0.0], np.float64).tobytes(), l.astype(np.float32).tobytes()]
    out += [np.int64(_EXP_X.size).tobytes(), _EXP_X.tobytes()]
    return b"".join(out)


def _python_lines(cases) -> list[str]:
    lines = []
    for l, t, k, p, seed, draws in cases:
        rng = Rng(seed)
        lines.append(" ".join(str(sample(l, t, k, p, rng)) for _ in range(draws)) + f" {rng.state}")
    return lines


def _run_c(cmd, cases, bad) -> list[str]:
    import subprocess
    r = subprocess.run(cmd, input=_c_input(cases + bad), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert lines[len(cases):-1] == [f"-1 {Rng(1).state}"] * len(bad)          # bad input: -1, rng untouched
    c_exp = np.array([int(h, 16) for h in lines[-1].split()], np.uint64)
    py_exp = exp_det(_EXP_X).view(np.uint64)
    assert np.array_equal(c_exp, py_exp), f"exp_det differs in {np.count_nonzero(c_exp != py_exp)} of {py_exp.size}"
    return lines[: len(cases)]


def _build(cc: list[str], tmp_path) -> str:
    import subprocess
    from sqk.runtime.ffi import RUNTIME_DIR
    (tmp_path / "harness.c").write_text(_HARNESS)
    exe = str(tmp_path / "sample_harness")
    r = subprocess.run([*cc, "-O2", "-I", RUNTIME_DIR, "-o", exe, str(tmp_path / "harness.c"),
                        f"{RUNTIME_DIR}/sqk_sample.c", "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def test_c_sampler_matches_python_on_the_host(tmp_path):
    import shutil
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    cases, bad = _c_cases()
    exe = _build([cc, "-march=native"], tmp_path)           # FMA available where the CPU has it
    assert _run_c([exe], cases, bad) == _python_lines(cases)


def test_c_sampler_matches_python_on_riscv64(tmp_path, riscv_tools):
    cases, bad = _c_cases()
    exe = _build([riscv_tools["gcc"], "-static", "-march=rv64gc", "-mabi=lp64d"], tmp_path)
    assert _run_c([riscv_tools["qemu"], exe], cases, bad) == _python_lines(cases)


def test_full_sort_equals_a_stable_argsort():
    from sqk.llm.sampling import _sorted_ids
    g = np.random.default_rng(4)
    for l in [g.standard_normal(5000).astype(np.float32), np.round(g.standard_normal(3000) * 3).astype(np.float32),
              np.array([0.0, -0.0, -np.inf, 1.0, -0.0, 0.0, -np.inf, -1.0, 3.4e38, -3.4e38, 1e-45, -1e-45]),
              g.standard_normal(100)]:                       # float64 values: the argsort fallback
        l = np.asarray(l, np.float64)
        assert np.array_equal(_sorted_ids(l), np.argsort(-l, kind="stable"))
