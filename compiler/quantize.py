"""Weight quantization math: f32 [K, N] weights -> (q, scales, zeros) for ``matmul_q``.

The meaning is ``ir.ops.dequantize_weight``: rows k of group ``k // group``
share one scale (and zero point) per output column n,

    w[k, n] ~= (q[k, n] - zeros[k // group, n]) * scales[k // group, n]

Conventions (the same for every caller, so results are reproducible bit for bit):

- int8: q in [-127, 127] symmetric (scale = max|w| / 127; -128 is never used,
  so negating a weight negates its code), or [-128, 127] asymmetric.
  ``group=None`` is per output channel: one group spanning K.
- int4: q in [-8, 7].  Symmetric uses scale = max|w| / 7 and codes [-7, 7]:
  the largest magnitude is exact and nothing is clipped.  (llama.cpp's q4_0
  instead maps the signed extreme to -8, gaining 1/8 resolution but clipping
  the opposite side at +7; we prefer no clipping and sign symmetry.)
  Asymmetric uses all 16 codes, as int8 asymmetric uses all 256.
- Asymmetric: the range [lo, hi] always includes 0 (lo = min(w, 0),
  hi = max(w, 0)), so 0.0 is exactly representable and the zero point
  ``z = qmin - round(lo / scale)`` lies in [qmin, qmax].
- Rounding is round-half-to-even (``np.rint``) everywhere, computed in f32
  with the *stored* scale (after rounding it to f16 when scale_dtype="f16"),
  so dequantization uses exactly the scale the codes were computed with.
- A group whose scale is 0 (all zeros, or too small for an f16 scale) gets
  scale 1 and codes equal to its zero point: never a division by zero.
- A group that does not divide K leaves a shorter last group (matmul_q's
  semantics); the padding used to compute it never influences a scale.
- NaN or Inf weights raise ValueError naming the constant.

i4 codes are returned unpacked, one int8 per value (the IR's storage; codegen
packs two per byte: element 2i in the low nibble, 2i+1 in the high one).
"""
from __future__ import annotations

import numpy as np

BITS = {8: (-128, 127), 4: (-8, 7)}
SCHEMES = ("sym", "asym")
SCALE_DTYPES = {"f32": np.float32, "f16": np.float16}


def quantize_weight(w: np.ndarray, bits: int = 8, group: int | None = None, scheme: str = "sym",
                    scale_dtype: str = "f32", name: str = "weight"):
    """Quantize a 2-D float weight ``w[K, N]`` along K.

    Returns ``(q, scales, zeros)``: q int8 [K, N] (values in the int4 range
    for bits=4), scales [G, N] of ``scale_dtype`` ("f32" or "f16"), zeros int8
    [G, N] for scheme="asym" else None, where G = ceil(K / group) and
    ``group=None`` means one group spanning K.  ``name`` names the constant
    in error messages.
    """
    if bits not in BITS:
        raise ValueError(f"quantize {name}: bits must be 8 or 4, got {bits!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"quantize {name}: scheme must be 'sym' or 'asym', got {scheme!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"quantize {name}: scale_dtype must be 'f32' or 'f16', got {scale_dtype!r}")
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind != "f":
        raise ValueError(f"quantize {name}: expected a 2-D float weight, got {w.dtype}{list(w.shape)}")
    k, n = w.shape
    if group is None:
        group = max(k, 1)
    if not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"quantize {name}: group must be a positive integer, got {group!r}")
    w = w.astype(np.float32)
    bad = ~np.isfinite(w)
    if bad.any():
        kk, nn = np.argwhere(bad)[0]
        raise ValueError(f"quantize: constant {name} has {int(bad.sum())} non-finite weight(s) "
                         f"(first: {w[kk, nn]} at [{kk}, {nn}]); cannot quantize NaN/Inf")

    groups = -(-k // group)
    padded = np.zeros((groups * group, n), np.float32)  # zero padding: changes no max|w|, min or max with 0
    padded[:k] = w
    blocks = padded.reshape(groups, group, n)
    qmin, qmax = BITS[bits]
    sdt = SCALE_DTYPES[scale_dtype]
    if scheme == "sym":
        qmax_sym = 7 if bits == 4 else 127
        amax = np.abs(blocks).max(axis=1)
        scales = _store_scale(amax / np.float32(qmax_sym), sdt, name)
        zeros = None
        q = np.clip(np.rint(blocks / scales[:, None, :]), -qmax_sym, qmax_sym)
    else:
        lo = np.minimum(blocks.min(axis=1), np.float32(0))
        hi = np.maximum(blocks.max(axis=1), np.float32(0))
        scales = _store_scale((hi - lo) / np.float32(qmax - qmin), sdt, name)
        zeros = np.clip(np.float32(qmin) - np.rint(lo / scales), qmin, qmax)
        q = np.clip(np.rint(blocks / scales[:, None, :]) + zeros[:, None, :], qmin, qmax)
        zeros = zeros.astype(np.int8)
    q = q.reshape(groups * group, n)[:k].astype(np.int8)
    return q, scales, zeros


def _store_scale(s: np.ndarray, sdt, name: str) -> np.ndarray:
    """Round scales to their storage dtype; zero scales become 1 (see module doc)."""
    with np.errstate(over="ignore"):
        stored = s.astype(sdt)
    if not np.isfinite(stored).all():
        raise ValueError(f"quantize: constant {name} has weights too large for f16 scales "
                         f"(max scale {float(s.max()):.6g} > 65504); use scale_dtype=f32")
    return np.where(stored == 0, sdt(1), stored).astype(sdt)


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int) -> np.ndarray:
    """f32 weights of (q, scales, zeros): matmul_q's meaning (ir.ops.dequantize_weight)."""
    from ..ir.ops import dequantize_weight

    return dequantize_weight(q, scales, zeros, group)


def output_error(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """(relative L2, cosine) of ``out`` against ``ref``, computed in float64.
    Two zero outputs agree exactly (0, 1); a zero reference against a nonzero
    output gives (inf, 0)."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(out, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    if na == 0:
        return (0.0, 1.0) if nb == 0 else (float("inf"), 0.0)
    cos = 0.0 if nb == 0 else float(np.dot(a, b) / (na * nb))
    return float(diff / na), cos


def layer_error(x: np.ndarray, w: np.ndarray, q, scales, zeros, group: int) -> tuple[float, float]:
    """Error of one layer's output: ``x @ w`` against ``x @ dequantize(q, ...)``
    (x is [..., K]; float64 products, so only the quantization error shows)."""
    x2 = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    return output_error(x2 @ np.asarray(w, np.float64), x2 @ dequantize(q, scales, zeros, group).astype(np.float64))


def quantized_nbytes(k: int, n: int, bits: int, group: int, scale_dtype: str, zeros: bool) -> int:
    """Bytes of the packed codes, scales and zero points of a [K, N] weight."""
    groups = -(-k // group) if k else 0
    side = groups * n
    return (k * n * bits + 7) // 8 + side * np.dtype(SCALE_DTYPES[scale_dtype]).itemsize \
        + ((side * bits + 7) // 8 if zeros else 0)


# --- static int8 activation scales (calibration) ------------------------------------------------

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
MSE_SAMPLE = 1 << 18   # activations the mse search looks at, at most (an even stride through them)
MSE_STEPS = 128        # candidate clip thresholds per round of the mse search


def fake_quant_i8(x: np.ndarray, scale) -> np.ndarray:
    """x quantized to int8 with a static step and back: clip(round-half-even(x / s),
    -127, 127) * s in f32, s = f32(scale) (``ir.ops.quantize_rows_i8``'s static mode)."""
    s = np.float32(scale)
    with np.errstate(over="ignore"):
        return np.clip(np.round(np.asarray(x, np.float32) / s), -127, 127).astype(np.float32) * s


def activation_scale(x: np.ndarray, method: str = "minmax", percentile: float = 99.99, name: str = "layer") -> float:
    """A static per-tensor int8 scale (matmul_q's ``act_scale``) for the
    activations ``x`` a layer saw during calibration (any shape):

    - ``minmax``: max|x| / 127 (nothing saturates);
    - ``percentile``: the ``percentile``-th percentile of |x| / 127 (outliers
      beyond it saturate);
    - ``mse``: the clip threshold t in (0, max|x|] minimizing the mean squared
      error of x against ``fake_quant_i8(x, t / 127)``: a grid of MSE_STEPS
      thresholds, then a finer grid around the best (on at most MSE_SAMPLE
      values, taken at an even stride).

    The result is the shortest decimal that rounds to the f32 scale (so the IR
    prints ``act_scale=0.0123`` and kernels and reference use the same f32).
    All-zero activations get scale 1.0 (any step quantizes 0 exactly).
    Non-finite activations raise ValueError naming ``name``."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    a = np.abs(np.asarray(x, np.float32).ravel())
    if not np.isfinite(a).all():
        raise ValueError(f"calibration: layer {name} saw {int((~np.isfinite(a)).sum())} non-finite activation(s); "
                         f"cannot choose a static scale")
    amax = float(a.max(initial=0.0))
    if amax == 0:
        return 1.0
    if method == "minmax":
        t = amax
    elif method == "percentile":
        t = float(np.percentile(a, percentile)) or amax  # mostly zeros: fall back to the max
    else:
        t = _mse_threshold(a, amax)
    return _shortest_f32(np.float32(t) / np.float32(127))


def _mse_threshold(a: np.ndarray, amax: float) -> float:
    """The clip threshold minimizing the quantize-dequantize MSE of |x| = ``a``
    (the error is symmetric in the sign, so |x| suffices): MSE_STEPS thresholds
    geometrically spaced over (amax / 2^16, amax] (outliers can put the best
    one far below the max), then MSE_STEPS // 4 evenly between the best one's
    neighbours."""
    if a.size > MSE_SAMPLE:
        a = a[:: -(-a.size // MSE_SAMPLE)]
    a64 = a.astype(np.float64)

    def err(t):
        return float(np.mean((fake_quant_i8(a, np.float32(t) / np.float32(127)) - a64) ** 2))

    grid = amax * np.exp2(-16 * np.arange(MSE_STEPS)[::-1] / (MSE_STEPS - 1))   # ascending, ends at amax
    errs = [err(t) for t in grid]
    i = int(np.argmin(errs))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, MSE_STEPS - 1)], MSE_STEPS // 4 + 1)
    fine_errs = [err(t) for t in fine]
    j = int(np.argmin(fine_errs))
    return float(fine[j]) if fine_errs[j] < errs[i] else float(grid[i])


def _shortest_f32(s) -> float:
    """The shortest decimal (as a Python float) that rounds to the f32 ``s``; a
    scale too small for f32 becomes the smallest normal one."""
    s = np.float32(s)
    if not s > 0:
        s = np.finfo(np.float32).tiny
    return float(str(s))
