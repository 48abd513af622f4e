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
QMAX_SYM = {8: 127, 4: 7}   # symmetric codes are [-QMAX_SYM, QMAX_SYM]


def quantize_weight(w: np.ndarray, bits: int = 8, group: int | None = None, scheme: str = "sym",
                    scale_dtype: str = "f32", name: str = "weight"):
    """Quantize a 2-D float weight ``w[K, N]`` along K.

    Returns ``(q, scales, zeros)``: q int8 [K, N] (values in the int4 range
    for bits=4), scales [G, N] of ``scale_dtype`` ("f32" or "f16"), zeros int8
    [G, N] for scheme="asym" else None, where G = ceil(K / group) and
    ``group=None`` means one group spanning K.  ``name`` names the constant
    in error messages.
    """
    w, group = _check(w, bits, group, scheme, scale_dtype, name)
    k, n = w.shape
    groups = -(-k // group)
    blocks = _blocks(w, group)
    scales, zeros = fit_groups(blocks, bits, scheme, scale_dtype, name)
    q = group_codes(blocks, scales, zeros, bits)
    q = q.reshape(groups * group, n)[:k].astype(np.int8)
    return q, scales, None if zeros is None else zeros.astype(np.int8)


def _check(w, bits, group, scheme, scale_dtype, name):
    """Validated ``(w as f32 [K, N], group)`` (quantize_weight's argument checks)."""
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
    return w, int(group)


def _blocks(w: np.ndarray, group: int) -> np.ndarray:
    """``w`` [K, N] as [G, group, N], zero padded (zeros change no max|w|, nor min or max with 0)."""
    k, n = w.shape
    groups = -(-k // group)
    padded = np.zeros((groups * group, n), w.dtype)
    padded[:k] = w
    return padded.reshape(groups, group, n)


def fit_groups(blocks: np.ndarray, bits: int, scheme: str, scale_dtype: str, name: str = "weight"):
    """Round-to-nearest parameters of weight groups ``blocks`` [G, g, N]:
    (scales [G, N] of the storage dtype, zeros [G, N] float or None for sym),
    by the conventions of the module docstring."""
    qmin, qmax = BITS[bits]
    sdt = SCALE_DTYPES[scale_dtype]
    if scheme == "sym":
        amax = np.abs(blocks).max(axis=1)
        return _store_scale(amax / blocks.dtype.type(QMAX_SYM[bits]), sdt, name), None
    lo = np.minimum(blocks.min(axis=1), blocks.dtype.type(0))
    hi = np.maximum(blocks.max(axis=1), blocks.dtype.type(0))
    scales = _store_scale((hi - lo) / blocks.dtype.type(qmax - qmin), sdt, name)
    return scales, np.clip(np.float32(qmin) - np.rint(lo / scales), qmin, qmax)


CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4   # GPTQ's Quantizer(mse=True): grid, maxshrink, norm


def fit_groups_mse(blocks: np.ndarray, bits: int, scheme: str, scale_dtype: str, name: str = "weight"):
    """:func:`fit_groups` with the range clipped by the published GPTQ
    quantizer's MSE search (``Quantizer.find_params(mse=True)``): the range
    [lo, hi] shrunk to p [lo, hi] for p = 1, 0.99, ..., 0.21, keeping per group
    and column the p of least sum |w - dequant(w)|^2.4 (p = 1, the plain
    range, first: the search never does worse than it)."""
    qmin, qmax = BITS[bits]
    sdt = SCALE_DTYPES[scale_dtype]
    best = best_s = best_z = None
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        f = np.float32(1 - i / CLIP_GRID)
        if scheme == "sym":
            s, z = _store_scale(np.abs(blocks).max(axis=1) * f / np.float32(QMAX_SYM[bits]), sdt, name), None
        else:
            lo = np.minimum(blocks.min(axis=1), np.float32(0)) * f
            s = _store_scale((np.maximum(blocks.max(axis=1), np.float32(0)) * f - lo) / np.float32(qmax - qmin),
                             sdt, name)
            z = np.clip(np.float32(qmin) - np.rint(lo / s), qmin, qmax)
        c = group_codes(blocks, s, z, bits)
        deq = (c if z is None else c - z[:, None, :]) * s.astype(np.float32)[:, None, :]
        err = (np.abs(blocks - deq) ** CLIP_NORM).sum(axis=1)
        if best is None:
            best, best_s, best_z = err, s, z
            continue
        better = err < best
        best, best_s = np.where(better, err, best), np.where(better, s, best_s)
        if z is not None:
            best_z = np.where(better, z, best_z)
    return best_s.astype(sdt), best_z


def group_codes(blocks: np.ndarray, scales: np.ndarray, zeros, bits: int) -> np.ndarray:
    """Codes (float) of ``blocks`` [G, g, N] with per-group ``scales`` and
    ``zeros`` [G, N] (None: symmetric): round-half-even, clipped to the range."""
    if zeros is None:
        return np.clip(np.rint(blocks / scales[:, None, :]), -QMAX_SYM[bits], QMAX_SYM[bits])
    qmin, qmax = BITS[bits]
    return np.clip(np.rint(blocks / scales[:, None, :]) + zeros[:, None, :], qmin, qmax)


# --- calibration-aware weight quantization (GPTQ, AWQ, imatrix) ---------------------------------
#
# All three produce the same (q, scales, zeros) as quantize_weight, so matmul_q and its kernels do
# not change; they only choose codes and scales better for the layer's calibration inputs.

IMATRIX_STEPS = np.arange(-9, 10)   # llama.cpp make_qx_quants: iscale = (nmax + 0.1 * is) / max, is in [-9, 9]
CLIPS = ("minmax", "mse")           # how GPTQ fits a group's range
GPTQ_BLOCK = 128                    # columns per lazy batch update (the GPTQ paper's B)
AWQ_GRID = 20                       # alpha in {0, 1/20, ..., 19/20} (llm-awq's n_grid)
AWQ_ROWS = 1024                     # calibration rows AWQ's search evaluates, at most (an even stride)


def imatrix_quantize(w: np.ndarray, importance: np.ndarray, bits: int = 4, group: int | None = None,
                     scheme: str = "sym", scale_dtype: str = "f32", name: str = "weight"):
    """Importance-weighted round-to-nearest (llama.cpp's imatrix idea):
    ``importance`` [K] (mean x^2 of the layer's input channels) weighs each
    row k of ``w`` [K, N]; every group's scale (and zero point) is the one
    minimizing sum_k importance_k (w - dequant(w))^2 among candidates around
    the max-based scale: max / (qmax + 0.1 is) for is in [-9, 9] (is = 0 is
    round-to-nearest's scale, so the weighted error never exceeds RTN's) and,
    for each, the weighted least-squares scale of its codes (as llama.cpp's
    make_qx_quants).  Returns (q, scales, zeros) as :func:`quantize_weight`."""
    w, group = _check(w, bits, group, scheme, scale_dtype, name)
    k, n = w.shape
    imp = np.asarray(importance, np.float64).reshape(-1)
    if imp.shape != (k,) or not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"quantize {name}: importance must be {k} finite non-negative values, got "
                         f"{imp.dtype}{list(imp.shape)}")
    imp = imp + 1e-12 * max(imp.max(initial=0.0), 1e-30)   # unseen channels still count (a little)
    blocks = _blocks(w, group)
    wimp = _blocks(imp[:, None].astype(np.float32), group).astype(np.float64)   # [G, g, 1], zero padded
    sdt = SCALE_DTYPES[scale_dtype]
    qmin, qmax = BITS[bits]
    b64 = blocks.astype(np.float64)
    if scheme == "sym":
        span, nmax = np.abs(blocks).max(axis=1), QMAX_SYM[bits]
    else:
        lo = np.minimum(blocks.min(axis=1), np.float32(0))
        span, nmax = np.maximum(blocks.max(axis=1), np.float32(0)) - lo, qmax - qmin
    best_err = best_s = best_z = None

    def consider(s):
        nonlocal best_err, best_s, best_z
        with np.errstate(over="ignore", invalid="ignore"):
            s = s.astype(sdt)
        s = np.where(np.isfinite(s) & (s > 0), s, sdt(1)).astype(sdt)
        z = None if scheme == "sym" else np.clip(np.float32(qmin) - np.rint(lo / s), qmin, qmax)
        q = group_codes(blocks, s, z, bits)
        c = q if z is None else q - z[:, None, :]
        err = (wimp * np.square(b64 - c * s.astype(np.float64)[:, None, :])).sum(axis=1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            if z is not None:
                best_z = np.where(better, z, best_z)
        return c

    for step in IMATRIX_STEPS[np.argsort(np.abs(IMATRIX_STEPS), kind="stable")]:   # is = 0 (RTN) first
        c = consider((span / np.float32(nmax + 0.1 * step)).astype(np.float32))
        num, den = (wimp * c * b64).sum(axis=1), (wimp * c * c).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            consider(np.where(den > 0, num / den, 0.0))     # least-squares scale of these codes
    s = _store_scale(best_s.astype(np.float32), sdt, name)
    q = group_codes(blocks, s, best_z, bits).reshape(-1, n)[:k].astype(np.int8)
    return q, s, None if best_z is None else best_z.astype(np.int8)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int = 4, group: int | None = None,
                  scheme: str = "sym", scale_dtype: str = "f32", damp: float = 0.01, act_order: bool = False,
                  block: int = GPTQ_BLOCK, name: str = "weight", clip: str = "minmax"):
    """GPTQ (Frantar et al. 2022) of ``w`` [K, N] for a layer whose inputs
    have Hessian ``hessian`` [K, K] (2 X^T X / rows): rows k of w (the
    paper's columns) are quantized one by one, each one's error spread over
    the rows not yet quantized through the Cholesky factor of H^-1, in lazy
    batches of ``block`` rows.

    - Dampening: ``damp`` * mean(diag H) added to diag H; rows with a zero
      diagonal (inputs always 0) are zeroed.
    - Groups: a group's scale and zero point are fitted (by round-to-nearest's
      rule, :func:`fit_groups`) when the group's first row is reached, on the
      group's weights as the earlier rows' errors left them.  The batches
      are aligned to groups, so that copy is up to date (the published code
      fits on the weight matrix outside the current batch, which misses the
      batch's own updates when a group starts mid-batch).
    - ``act_order``: rows in order of descending diag(H).  With groups, the
      storage needs contiguous groups (matmul_q's row k // group), so the
      scales are the published "static groups" variant: fitted once on the
      original weights, each row quantized with its own group's scale.

    - ``clip="mse"``: each group's range by :func:`fit_groups_mse` (the
      published quantizer's ``mse=True`` shrink search) instead of its max.

    Weights that are exactly zero (pruned by an earlier sparsify) stay zero:
    their codes are the zero point, and the solver compensates for them as
    for any other rounding, so the sparsity pattern survives.

    Returns (q, scales, zeros) as :func:`quantize_weight`."""
    w, group = _check(w, bits, group, scheme, scale_dtype, name)
    if clip not in CLIPS:
        raise ValueError(f"quantize {name}: clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    fit = fit_groups_mse if clip == "mse" else fit_groups
    k, n = w.shape
    h = np.array(hessian, np.float64)
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise ValueError(f"quantize {name}: hessian must be a finite [{k}, {k}] matrix, got {list(h.shape)}")
    if not 0 <= damp:
        raise ValueError(f"quantize {name}: damp must be >= 0, got {damp}")
    W = w.astype(np.float64).T.copy()             # [N, K]: the paper's orientation, columns = input channels
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = -(-k // group)
    scales = np.empty((groups, n), SCALE_DTYPES[scale_dtype])
    zeros = None if scheme == "sym" else np.empty((groups, n), np.float64)
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        s0, z0 = fit(_blocks(W.T.astype(np.float32), group), bits, scheme, scale_dtype, name)
        scales[:] = s0
        if zeros is not None:
            zeros[:] = z0
        W, h = W[:, perm], h[np.ix_(perm, perm)]
    else:
        perm = np.arange(k)
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T   # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:
        raise ValueError(f"quantize {name}: the calibration Hessian is not positive definite even with "
                         f"damp={damp}; raise damp") from None
    if not np.isfinite(hinv).all():
        raise ValueError(f"quantize {name}: the calibration Hessian is too ill-conditioned (damp={damp}); raise damp")
    pinned = W == 0      # zeros stay zeros (a pruned weight: sparsify ran first), their error compensated
    q_out = np.empty((n, k))
    step = block if act_order else -(-block // group) * group    # batches aligned to groups
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].copy()
        err1 = np.zeros((n, i2 - i1))
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % group == 0:
                s, z = fit(W1[:, i:i + group].T[None].astype(np.float32), bits, scheme, scale_dtype, name)
                scales[col // group] = s[0]
                if zeros is not None:
                    zeros[col // group] = z[0]
            g = perm[col] // group
            s64 = scales[g].astype(np.float64)
            z = None if zeros is None else zeros[g]
            q = group_codes(W1[None, None, :, i], scales[g][None], None if z is None else z[None], bits)[0, 0]
            q = np.where(pinned[:, col], 0.0 if z is None else z, q)   # a pruned weight stays exactly zero
            q_out[:, perm[col]] = q
            deq = (q if z is None else q - z) * s64
            e = (W1[:, i] - deq) / hinv[col, col]
            W1[:, i:] -= np.outer(e, hinv[col, col:i2])
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_out.T.astype(np.int8), scales, None if zeros is None else zeros.astype(np.int8)


def awq_scales(ws: list, x: np.ndarray, mean_abs: np.ndarray, bits: int = 4, group: int | None = None,
               scheme: str = "sym", scale_dtype: str = "f32", grid: int = AWQ_GRID):
    """AWQ's per-input-channel scale search (Lin et al. 2023, llm-awq
    ``auto_scale``) for the layers ``ws`` (each [K, N]) that read the same
    input: for alpha in {0, 1/grid, ..., (grid-1)/grid}, s = mean|x|^alpha
    (clamped at 1e-4, normalized by sqrt(max s * min s)); the error is the
    mean squared difference of x @ w against (x * (1/s)) @ dequant(quant(s * w))
    summed over the layers, on the rows ``x`` (at most AWQ_ROWS of them, an
    even stride).  alpha = 0 is round-to-nearest.  Returns (s [K] f32, the
    best alpha, its error, round-to-nearest's error)."""
    x = np.asarray(x, np.float32).reshape(-1, ws[0].shape[0])
    if x.shape[0] > AWQ_ROWS:
        x = x[:: -(-x.shape[0] // AWQ_ROWS)]
    refs = [x @ np.asarray(w, np.float32) for w in ws]
    a = np.asarray(mean_abs, np.float64)
    best = None
    rtn_err = None
    for r in range(grid):
        alpha = r / grid
        s = np.maximum(a ** alpha, 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        inv = (np.float32(1) / s).astype(np.float32)
        xs = x * inv
        err = 0.0
        for w, ref in zip(ws, refs):
            q, sc, z = quantize_weight(np.asarray(w, np.float32) * s[:, None], bits, group, scheme, scale_dtype)
            err += float(np.mean(np.square(ref - xs @ dequantize(q, sc, z, group or w.shape[0]))))
        if r == 0:
            rtn_err = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best + (rtn_err,)


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
