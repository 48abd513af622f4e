"""Choosing the next token from logits: greedy, top-k, top-p (nucleus), temperature.

Every step is specified exactly, in IEEE double arithmetic without fused multiply-adds, so that
a C implementation draws the same token from the same seed, bit for bit: runtime/sqk_sample.c is
that twin (``sqk_sample``, for the runner's generate mode), held against this module on the host
and on riscv64 by tests/test_sampling.py. ``sample(logits, temperature, top_k, top_p, rng)``:

1. Validation. ``logits`` is 1-D, float, non-empty, no NaN and no +inf (-inf masks a token);
   at least one finite entry. ``temperature`` finite >= 0; ``top_k`` None or an int >= 1;
   ``top_p`` None or 0 < p <= 1. Each logit ``l[i]`` is read as a double (exact for f16/f32).
2. ``temperature == 0``: the argmax, ties to the lowest id; ``rng`` is not touched.
3. Candidates, in order. Without top_k and top_p: every id, ascending. Otherwise the ids sorted by
   logit descending, ties by id ascending; with top_k, the first ``min(top_k, n)`` of that order.
4. Weights: ``m`` = the largest logit; for each candidate in order ``x = (l - m) / temperature``
   (double subtract, double divide) and ``w = exp_det(x)`` (below; x <= 0, so 0 <= w <= 1).
5. ``c[j]`` = running sum of the weights in candidate order, left to right (``c[j] = c[j-1] + w[j]``).
   top-p: keep the first ``K`` candidates, ``K`` = 1 + the first j with ``c[j] >= top_p * c[n-1]``
   (so exactly the smallest prefix whose probability reaches p); without top_p, K = n.
6. Draw: ``u = rng.random()`` (one 64-bit draw, below), ``r = u * c[K-1]``; the token is the first
   candidate j < K with ``c[j] > r``, or candidate K-1 if rounding leaves none. Exactly one draw is
   consumed per call at temperature > 0, whatever k, p and the logits are.

``exp_det(x)`` (0 if x < -700): ``k = rint(x * INV_LN2)`` (round half to even),
``r = (x - k * LN2_HI) - k * LN2_LO``, ``p = 1 + r*(C1 + r*(C2 + ... + r*C13))`` (Horner from C13
inwards, each step one multiply then one add; ``C_n = 1.0 / n!``, one correctly rounded division),
``w = ldexp(p, k)``; the constants are below (with their exact hex spellings). Compile the C side
with ``-ffp-contract=off`` so no multiply-add is fused.

The generator is SplitMix64 (Steele, Lea, Flood 2014): state ``s`` (uint64) starts at the seed mod
2**64; each draw does ``s += 0x9E3779B97F4A7C15; z = s; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
z = (z ^ z>>27) * 0x94D049BB133111EB; z ^= z>>31`` (all mod 2**64) and ``random()`` is
``(z >> 11) * 2**-53`` in [0, 1).
"""
from __future__ import annotations

import math
import secrets

import numpy as np

_MASK = (1 << 64) - 1

# exp_det's constants (fdlibm's split of ln 2: k * LN2_HI is exact for |k| < 2**11)
INV_LN2 = 1.4426950408889634          # 0x1.71547652b82fep+0
LN2_HI = 6.93147180369123816490e-01   # 0x1.62e42fee00000p-1
LN2_LO = 1.90821492927058770002e-10   # 0x1.a39ef35793c76p-33
EXP_COEFFS = tuple(1.0 / math.factorial(n) for n in range(1, 14))   # C1 .. C13, 1/n! rounded
EXP_CUTOFF = -700.0


class Rng:
    """SplitMix64: the seeded generator of ``sample`` (see the module docstring).

    ``state`` is the 64-bit state after the last draw; ``Rng(seed)`` and the C runner's
    generator started from the same seed yield the same ``next_u64()`` sequence."""

    __slots__ = ("state",)

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = secrets.randbits(64)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"Rng seed must be an int, got {type(seed).__name__}")
        self.state = int(seed) & _MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """A double in [0, 1) from the top 53 bits of one draw."""
        return (self.next_u64() >> 11) * 2.0 ** -53

    def __repr__(self) -> str:
        return f"Rng(state=0x{self.state:016x})"


def exp_det(x: np.ndarray) -> np.ndarray:
    """exp(x) for x <= 0 in double, from +, *, rint and ldexp only, so C reproduces every bit.

    Relative error below 1e-15; 0 for x < -700 (and for -inf)."""
    x = np.asarray(x, np.float64)
    live = x >= EXP_CUTOFF
    xs = np.where(live, x, 0.0)
    k = np.rint(xs * INV_LN2)
    r = (xs - k * LN2_HI) - k * LN2_LO
    p = np.full_like(r, EXP_COEFFS[-1])
    for c in EXP_COEFFS[-2::-1]:
        p = p * r + c
    p = p * r + 1.0
    return np.where(live, np.ldexp(p, k.astype(np.int32)), 0.0)


def _as_rng(rng) -> Rng:
    if isinstance(rng, Rng):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return Rng(rng)
    raise TypeError(f"rng must be a sqk.llm.sampling.Rng, an int seed or None, got {type(rng).__name__}")


def _check(logits, temperature, top_k, top_p) -> np.ndarray:
    l = np.asarray(logits)
    if l.ndim != 1 or l.size == 0:
        raise ValueError(f"sample: logits must be a non-empty 1-D array, got shape {l.shape}")
    if not np.issubdtype(l.dtype, np.floating):
        raise ValueError(f"sample: logits must be floating point, got {l.dtype}")
    l = l.astype(np.float64)
    if not np.isfinite(l).all():
        if np.isnan(l).any():
            raise ValueError(f"sample: logits contain NaN (first at id {int(np.flatnonzero(np.isnan(l))[0])})")
        if np.isposinf(l).any():
            raise ValueError(f"sample: logits contain +inf (first at id {int(np.flatnonzero(np.isposinf(l))[0])})")
        if np.isneginf(l).all():
            raise ValueError("sample: every logit is -inf: no token can be drawn")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"sample: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"sample: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"sample: top_p must be None or a number in (0, 1], got {top_p!r}")
    return l


def candidates(logits, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """The candidate ids of step 3 (before top-p), in their order. ``logits``: 1-D float64."""
    n = logits.size
    if top_k is None and top_p is None:
        return np.arange(n)
    if top_k is None or top_k >= n:
        return _sorted_ids(logits)
    # the k-th largest value; everything above it, then the lowest ids among those equal to it
    kth = np.partition(logits, n - top_k)[n - top_k]
    above = np.flatnonzero(logits > kth)
    ties = np.flatnonzero(logits == kth)[: top_k - above.size]
    ids = np.concatenate([above, ties])
    ids.sort()
    return ids[np.argsort(-logits[ids], kind="stable")]


def _sorted_ids(logits: np.ndarray) -> np.ndarray:
    """All ids by logit descending, ties by id: one sort of (logit, id) packed in a uint64 when the
    logits are f32 values (about 3x faster than a stable argsort over a 50k vocabulary)."""
    l32 = logits.astype(np.float32) + np.float32(0.0)         # -0.0 -> +0.0: equal logits, equal keys
    if logits.size >= 2 ** 32 or not np.array_equal(l32, logits):
        return np.argsort(-logits, kind="stable")
    bits = l32.view(np.uint32).astype(np.uint64)
    ascending = np.where(bits >> 31, bits ^ 0xFFFFFFFF, bits | 0x80000000)   # float order as integers
    keys = ((0xFFFFFFFF - ascending) << 32) | np.arange(logits.size, dtype=np.uint64)
    return (np.sort(keys) & 0xFFFFFFFF).astype(np.int64)


def distribution(logits, temperature: float, top_k: int | None = None,
                 top_p: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cumulative weights) that ``sample`` draws from at temperature > 0: steps 3-5.

    ``cum[-1]`` is the kept mass; ``cum / cum[-1]`` is the distribution over ``ids``."""
    l = _check(logits, temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("distribution: temperature 0 is greedy (argmax), not a distribution")
    return _distribution(l, float(temperature), top_k, top_p)


def _distribution(l: np.ndarray, temperature: float, top_k, top_p) -> tuple[np.ndarray, np.ndarray]:
    ids = candidates(l, top_k, top_p)
    w = exp_det((l[ids] - l.max()) / temperature)
    cum = np.cumsum(w)                      # sequential, left to right
    if top_p is not None:
        keep = int(np.searchsorted(cum, float(top_p) * cum[-1], side="left")) + 1
        keep = min(keep, ids.size)
        ids, cum = ids[:keep], cum[:keep]
    return ids, cum


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           rng: Rng | int | None = None) -> int:
    """The next token id from ``logits`` [vocab] (algorithm: the module docstring).

    temperature 0: argmax, ties to the lowest id. Otherwise top-k, then softmax at ``temperature``,
    then top-p, then one draw from ``rng``: an ``Rng`` (advanced by one draw: pass the same one
    at every step of a generation), an int seed (a fresh ``Rng(seed)``), or None (a random seed)."""
    l = _check(logits, temperature, top_k, top_p)
    gen = _as_rng(rng) if rng is not None or temperature > 0 else None   # a bad rng fails even when greedy
    if temperature == 0:
        return int(np.argmax(l))
    ids, cum = _distribution(l, float(temperature), top_k, top_p)
    r = gen.random() * cum[-1]
    j = min(int(np.searchsorted(cum, r, side="right")), ids.size - 1)
    return int(ids[j])
