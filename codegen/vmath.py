"""Vector math: exp, tanh and erf of f32 as straight-line polynomial code.

Each function takes an f32 scalar or an LLVM ``<n x float>`` and emits the same
instructions for both (constants are splatted by ``fconst``), with no calls, so
LLVM vectorizes them at full width; libm would be called once per lane.

Accuracy (max error in ulps of the correctly rounded result over dense sweeps, host
and riscv64 alike; tests/test_vmath.py asserts <= 2): exp 0.99 on [-100, 100]
(subnormal results within 1 unit), tanh 1.26 and erf 0.98 on [-10, 10].  Special
values (+-inf, NaN, -0.0, subnormal inputs) give the C99 results.

No float->int conversion instruction is used (integers come from the bits of
``x + 1.5*2^23``): RVV lowers such conversions to ``vfcvt.rtz.*``, which aborts
the qemu 7.2 the riscv64 runner uses (see ``int_fptoi_sat`` in elementwise.py).
"""
from __future__ import annotations

from llvmlite import ir

from .kernel import F32, I32, call_intrinsic, fconst, iconst

LOG2E = 1.44269504088896341
# ln2 split Cody-Waite style: LN2_HI has 9 significant bits, so n * LN2_HI is exact for |n| < 2^15.
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
# Cephes expf: exp(r) ~ 1 + r + r^2 * P(r) on |r| <= ln2/2.
EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Inputs beyond these give +inf / 0 after rounding; clamping keeps n in [-150, 129].
EXP_HI, EXP_LO = 89.0, -104.0
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds a |v| < 2^22 to an integer in the low mantissa bits

# Cephes tanhf: tanh(x) ~ x + x^3 * P(x^2) on |x| < 0.625.
TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)
TANH_SMALL = 0.625
TANH_SAT = 10.0  # tanh(x) rounds to 1 in f32 from x ~ 9.01 on

# erf after N. Juffa's erff: x + x * P(x^2) for |x| <= ERF_SPLIT, else 1 - e^(Q(|x|)), Q ~ log erfc.
ERF_SPLIT = 0.927734375
ERF_P = (-5.96761703e-4, 4.99119423e-3, -2.67681349e-2, 1.12819925e-1, -3.76125336e-1, 1.28379166e-1)
ERF_Q_HI = (-1.72853470e-5, 3.83197126e-4)     # Q = ((HI(t) s + LO(t)) t + C0) t + C1) t + C2) t - t
ERF_Q_LO = (-3.88396438e-3, 2.42546219e-2)
ERF_Q_C = (-1.06777877e-1, -6.34846687e-1, -1.28717512e-1)
ERF_CLAMP = 4.0  # erf(4) rounds to 1 in f32

def _ity(x):
    """The i32 type with x's shape."""
    return ir.VectorType(I32, x.type.count) if isinstance(x.type, ir.VectorType) else I32


def _horner(b, x, coeffs):
    """coeffs[0] * x^(m-1) + ... + coeffs[-1] (unfused: same results with and without FMA)."""
    acc = fconst(x.type, coeffs[0])
    for c in coeffs[1:]:
        acc = b.fadd(b.fmul(acc, x), fconst(x.type, c))
    return acc


def _clamp(b, x, lo, hi):
    """min(max(x, lo), hi) that passes NaN through (ordered compares are false for NaN)."""
    x = b.select(b.fcmp_ordered("<", x, fconst(x.type, lo)), fconst(x.type, lo), x)
    return b.select(b.fcmp_ordered(">", x, fconst(x.type, hi)), fconst(x.type, hi), x)


def _pow2(b, n):
    """2^n as f32 from an i32 n in [-126, 127], by building the exponent bits."""
    bits = b.shl(b.add(n, iconst(n.type, 127)), iconst(n.type, 23))
    return b.bitcast(bits, F32 if n.type == I32 else ir.VectorType(F32, n.type.count))


def exp(k, x):
    """e^x of f32 (scalar or vector).  x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite),
    e^r by the Cephes polynomial, then scaled by 2^n in two exact-range steps so
    subnormal results round once and large n overflows to +inf."""
    b = k.b
    c = lambda v: fconst(x.type, v)  # noqa: E731
    xc = _clamp(b, x, EXP_LO, EXP_HI)
    # n = rint(x * log2e): the magic add rounds to nearest; n is read from the low bits.
    t = b.fadd(b.fmul(xc, c(LOG2E)), c(ROUND_MAGIC))
    fn = b.fsub(t, c(ROUND_MAGIC))
    ity = _ity(x)
    n = b.sub(b.bitcast(t, ity), b.bitcast(c(ROUND_MAGIC), ity))  # NaN: garbage n, but r is NaN
    r = b.fsub(b.fsub(xc, b.fmul(fn, c(LN2_HI))), b.fmul(fn, c(LN2_LO)))
    r2 = b.fmul(r, r)
    p = b.fadd(b.fadd(b.fmul(_horner(b, r, EXP_P), r2), r), c(1.0))
    n1 = b.ashr(n, iconst(ity, 1))
    n2 = b.sub(n, n1)
    return b.fmul(b.fmul(p, _pow2(b, n1)), _pow2(b, n2))


def tanh(k, x):
    """tanh of f32 (scalar or vector): x + x^3 P(x^2) for |x| < 0.625 (keeps relative
    accuracy near 0), 1 - 2 / (e^(2|x|) + 1) above, saturating at |x| = 10; the sign
    is copied from x (so tanh(-0) = -0)."""
    b = k.b
    c = lambda v: fconst(x.type, v)  # noqa: E731
    ax = call_intrinsic(k, "fabs", x)
    z = b.fmul(ax, ax)
    small = b.fadd(b.fmul(b.fmul(_horner(b, z, TANH_P), z), ax), ax)
    e = exp(k, b.fmul(c(2.0), _clamp(b, ax, 0.0, TANH_SAT)))
    big = b.fsub(c(1.0), b.fdiv(c(2.0), b.fadd(e, c(1.0))))
    y = b.select(b.fcmp_ordered("<", ax, c(TANH_SMALL)), small, big)  # NaN takes `big`, stays NaN
    return call_intrinsic(k, "copysign", y, x)


def erf(k, x):
    """erf of f32 (scalar or vector), after N. Juffa's erff: an odd polynomial below
    |x| = 0.9277, 1 - e^(Q(|x|)) above with Q a polynomial fit of log(erfc), |x|
    clamped to 4.  Multiply-adds use ``llvm.fmuladd`` (fused where the target has FMA;
    either way within 2 ulp).  NaN propagates, erf(-0) = -0."""
    b = k.b
    c = lambda v: fconst(x.type, v)  # noqa: E731
    fma = lambda p, q, r: call_intrinsic(k, "fmuladd", p, q, r)  # noqa: E731
    s = b.fmul(x, x)
    r = c(ERF_P[0])
    for coef in ERF_P[1:]:
        r = fma(r, s, c(coef))
    small = fma(r, x, x)
    t = _clamp(b, call_intrinsic(k, "fabs", x), 0.0, ERF_CLAMP)
    ts = b.fmul(t, t)
    q = fma(fma(c(ERF_Q_HI[0]), t, c(ERF_Q_HI[1])), ts, fma(c(ERF_Q_LO[0]), t, c(ERF_Q_LO[1])))
    for coef in ERF_Q_C:
        q = fma(q, t, c(coef))
    q = fma(q, t, b.fneg(t))
    big = call_intrinsic(k, "copysign", b.fsub(c(1.0), exp(k, q)), x)
    # NaN compares false and takes `small`, which propagates it
    return b.select(b.fcmp_ordered(">", call_intrinsic(k, "fabs", x), c(ERF_SPLIT)), big, small)
