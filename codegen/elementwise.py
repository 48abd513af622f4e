"""The strided map emitter and everything built on it: unary and binary ops
with numpy broadcasting, gelu, cast, and the data-movement ops (reshape,
transpose, slice, concat), which are maps whose input views are strided.

A map walks an iteration shape; each operand is a *view* (element offset and
per-dim strides, 0 for broadcast dims).  Dims are coalesced first, so most
maps become rows of one contiguous inner loop: vectorized with LLVM vector
types when every inner stride is 0 or 1, scalar otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from llvmlite import ir

from ..ir import dtypes as dt
from ..ir.fusion import broadcast_strides
from ..ir.graph import Node, TensorType
from ..ir.ops import slice_ranges
from .kernel import (I16, Kernel, call_intrinsic, compute_type, fconst, gep, i64, iconst,
                     load_elem, load_vec, lltype, loop, splat, store_elem, store_vec, vtype)
from . import vmath
from .lower import emitter

# Work per thread below which splitting does not pay for the wake-up (elements).
MIN_PARALLEL_WORK = 1 << 15
# Inner rows longer than this are split into chunks, so one long row still spreads over threads.
CHUNK = 1 << 13


@dataclass
class View:
    arg: int                 # kernel argument index
    dtype: dt.DType
    offset: int              # in elements
    strides: list[int]       # per iteration dim, in elements


def contiguous_strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def broadcast_view(arg: int, t: TensorType, out_shape) -> View:
    """View of ``t`` broadcast (numpy rules) to ``out_shape``."""
    return View(arg, t.dtype, 0, broadcast_strides(t, out_shape))


def coalesce(shape, views):
    """Drop size-1 dims and merge dims that are contiguous in every view."""
    dims = [i for i, d in enumerate(shape) if d != 1]
    shape2 = [shape[i] for i in dims]
    strides = [[v.strides[i] for i in dims] for v in views]
    i = len(shape2) - 2
    while i >= 0:
        if all(s[i] == s[i + 1] * shape2[i + 1] for s in strides):
            shape2[i] *= shape2[i + 1]
            del shape2[i + 1]
            for s in strides:
                s[i] = s[i + 1]
                del s[i + 1]
        i -= 1
    return shape2 or [1], [s or [0] for s in strides]


ScalarFn = Callable[[Kernel, list, int], object]  # (kernel, compute-type values, lanes) -> value


def emit_map(k: Kernel, shape, out: View, ins: list[View], fn: ScalarFn, vector_ok: bool = True,
             raw: bool = False):
    """Emit ``out[idx] = fn(ins[idx]...)`` over ``shape``; returns (range, grain).

    ``fn`` sees compute-type values (f16 widened to f32), or with ``raw`` the storage
    bits (f16 as i16): data movement copies bits exactly, without converting."""
    load, store = (_load_raw, _store_raw) if raw else (load_elem, store_elem)
    shape, strides = coalesce(list(shape), [out] + ins)
    total = math.prod(shape)
    if total == 0:
        k.finish()
        return 0, 1
    inner = shape[-1]
    outer = shape[:-1]
    rows = math.prod(outer)
    chunk = inner if inner <= 2 * CHUNK else CHUNK
    nchunks = -(-inner // chunk)
    b = k.b
    lanes = k.target.lanes(max(32, max(v.dtype.bits for v in [out] + ins)))
    inner_st = [s[-1] for s in strides]
    vectorize = vector_ok and lanes > 1 and inner_st[0] == 1 and all(s in (0, 1) for s in inner_st[1:])
    with loop(b, k.begin, k.end, name="item") as item:
        row = b.sdiv(item, i64(nchunks)) if nchunks > 1 else item
        j0 = b.mul(b.srem(item, i64(nchunks)), i64(chunk)) if nchunks > 1 else i64(0)
        j1 = b.select(b.icmp_signed("<", b.add(j0, i64(chunk)), i64(inner)), b.add(j0, i64(chunk)),
                      i64(inner)) if nchunks > 1 else i64(inner)
        # base offset of each view for this row: decompose row over the outer dims
        bases = [i64(v.offset) for v in [out] + ins]
        rem = row
        for d in reversed(range(len(outer))):
            idx = b.srem(rem, i64(outer[d])) if d else rem
            rem = b.sdiv(rem, i64(outer[d])) if d else rem
            bases = [b.add(base, b.mul(idx, i64(s[d]))) if s[d] else base for base, s in zip(bases, strides)]
        def body(j, n):
            vals = []
            for v, base, st in zip(ins, bases[1:], inner_st[1:]):
                if st == 0:
                    x = load(b, k.args[v.arg], v.dtype, base)
                    vals.append(splat(b, x, n) if n > 1 else x)
                else:
                    idx = b.add(base, b.mul(j, i64(st)) if st != 1 else j)
                    vals.append(load(b, k.args[v.arg], v.dtype, idx, n))
            res = fn(k, vals, n)
            idx = b.add(bases[0], b.mul(j, i64(inner_st[0])) if inner_st[0] != 1 else j)
            store(b, res, k.args[out.arg], out.dtype, idx, n)

        tail_start = j0
        if vectorize:
            nvec = b.sdiv(b.sub(j1, j0), i64(lanes))
            with loop(b, 0, nvec, name="v") as v:
                body(b.add(j0, b.mul(v, i64(lanes))), lanes)
            tail_start = b.add(j0, b.mul(nvec, i64(lanes)))
        with loop(b, tail_start, j1, name="j") as j:
            body(j, 1)
    k.finish()
    work = inner if nchunks == 1 else chunk
    return rows * nchunks, max(1, MIN_PARALLEL_WORK // max(1, work))


def _raw_type(d: dt.DType):
    return I16 if d is dt.f16 else lltype(d)


def _load_raw(b, ptr, d: dt.DType, index, n=1):
    ty = _raw_type(d)
    return b.load(gep(b, ptr, ty, index), typ=ty) if n == 1 else load_vec(b, ptr, ty, index, n)


def _store_raw(b, value, ptr, d: dt.DType, index, n=1):
    ty = _raw_type(d)
    if n == 1:
        b.store(value, gep(b, ptr, ty, index))
    else:
        store_vec(b, value, ptr, ty, index)


# --- scalar math, written once for scalars and vectors --------------------------------

def f_exp(k, x, n):
    return vmath.exp(k, x)


def f_sigmoid(k, x, n):
    b = k.b
    one = fconst(x.type, 1.0)
    return b.fdiv(one, b.fadd(one, f_exp(k, b.fneg(x), n)))


def f_erf(k, x, n):
    return vmath.erf(k, x)


def f_tanh(k, x, n):
    return vmath.tanh(k, x)


def f_gelu(k, x, n, approximate="none"):
    b = k.b
    c = lambda v: fconst(x.type, v)  # noqa: E731
    if approximate == "tanh":
        inner = b.fmul(c(math.sqrt(2 / math.pi)), b.fadd(x, b.fmul(b.fmul(b.fmul(c(0.044715), x), x), x)))
        return b.fmul(b.fmul(c(0.5), x), b.fadd(c(1.0), f_tanh(k, inner, n)))
    # constants rounded to f32 first, as the reference computes in f32
    return b.fmul(b.fmul(c(0.5), x), b.fadd(c(1.0), f_erf(k, b.fdiv(x, c(float(F32_SQRT2))), n)))


F32_SQRT2 = float(__import__("numpy").float32(math.sqrt(2)))


def _int_minmax(k, a, b_, d, want_max):
    pred = (">" if want_max else "<")
    cmp = k.b.icmp_signed(pred, a, b_) if d.is_signed else k.b.icmp_unsigned(pred, a, b_)
    return k.b.select(cmp, a, b_)


def unary_fn(op: str, d: dt.DType) -> ScalarFn:
    b_ = lambda k: k.b  # noqa: E731
    if op == "neg":
        return (lambda k, v, n: b_(k).fneg(v[0])) if d.is_float else \
               (lambda k, v, n: b_(k).sub(iconst(v[0].type, 0), v[0]))
    if op == "relu":
        if d.is_float:
            return lambda k, v, n: call_intrinsic(k, "maximum", v[0], fconst(v[0].type, 0.0))
        if not d.is_signed:
            return lambda k, v, n: v[0]
        return lambda k, v, n: _int_minmax(k, v[0], iconst(v[0].type, 0), d, True)
    return {
        "exp": lambda k, v, n: f_exp(k, v[0], n),
        "log": lambda k, v, n: call_intrinsic(k, "log", v[0]),  # libm logf per lane
        "sqrt": lambda k, v, n: call_intrinsic(k, "sqrt", v[0]),
        "rsqrt": lambda k, v, n: k.b.fdiv(fconst(v[0].type, 1.0), call_intrinsic(k, "sqrt", v[0])),
        "tanh": lambda k, v, n: f_tanh(k, v[0], n),
        "erf": lambda k, v, n: f_erf(k, v[0], n),
        "sigmoid": lambda k, v, n: f_sigmoid(k, v[0], n),
        "silu": lambda k, v, n: k.b.fmul(v[0], f_sigmoid(k, v[0], n)),
    }[op]


def binary_fn(op: str, d: dt.DType) -> ScalarFn:
    if d.is_float:
        return {
            "add": lambda k, v, n: k.b.fadd(v[0], v[1]),
            "sub": lambda k, v, n: k.b.fsub(v[0], v[1]),
            "mul": lambda k, v, n: k.b.fmul(v[0], v[1]),
            "div": lambda k, v, n: k.b.fdiv(v[0], v[1]),
            "pow": lambda k, v, n: call_intrinsic(k, "pow", v[0], v[1]),  # libm powf per lane
            "max": lambda k, v, n: call_intrinsic(k, "maximum", v[0], v[1]),
            "min": lambda k, v, n: call_intrinsic(k, "minimum", v[0], v[1]),
        }[op]
    return {
        "add": lambda k, v, n: k.b.add(v[0], v[1]),
        "sub": lambda k, v, n: k.b.sub(v[0], v[1]),
        "mul": lambda k, v, n: k.b.mul(v[0], v[1]),
        "max": lambda k, v, n: _int_minmax(k, v[0], v[1], d, True),
        "min": lambda k, v, n: _int_minmax(k, v[0], v[1], d, False),
    }[op]


def cast_fn(src: dt.DType, dst: dt.DType) -> ScalarFn:
    """Convert compute-type values (f16 is already widened to f32 on load)."""
    def fn(k, v, n):
        x, b = v[0], k.b
        to = vtype(compute_type(dst), n)
        if dst is dt.bool_:
            nz = b.fcmp_unordered("!=", x, fconst(x.type, 0.0)) if src.is_float else b.icmp_unsigned("!=", x, iconst(x.type, 0))
            return b.zext(nz, to)
        if src.is_float and dst.is_float:
            return x  # f32 <-> f16 rounding happens on store
        if src.is_float:
            if k.target.name == "riscv64" and k.target.has_vector:
                return int_fptoi_sat(k, x, to, dst.is_signed, n)
            name = f"llvm.fpto{'s' if dst.is_signed else 'u'}i.sat"
            return call_sat(k, name, x, to)
        if dst.is_float:
            return b.sitofp(x, to) if src.is_signed else b.uitofp(x, to)
        sw, dw = x.type.element.width if n > 1 else x.type.width, to.element.width if n > 1 else to.width
        if dw < sw:
            return b.trunc(x, to)
        if dw > sw:
            return b.sext(x, to) if src.is_signed else b.zext(x, to)
        return x
    return fn


def int_fptoi_sat(k, x, to, signed: bool, n: int):
    """``llvm.fpto[su]i.sat`` (truncate toward zero, clamp, NaN -> 0) of f32 with integer
    ops only.  RVV lowers float->int conversion to ``vfcvt.rtz.*``, and every ``.rtz``
    vector conversion aborts qemu 7.2 (decode_save_opc assertion), the qemu-user the
    riscv64 runner uses: this avoids the instruction; on hardware it is just as exact."""
    b = k.b
    w = to.element.width if n > 1 else to.width
    cw = 64 if w > 32 else 32                       # width the magnitude is built in
    it = vtype(ir.IntType(cw), n)
    c = lambda v: iconst(it, v)  # noqa: E731
    bits32 = b.bitcast(x, vtype(ir.IntType(32), n))
    bits = b.zext(bits32, it) if cw == 64 else bits32
    e = b.sub(b.and_(b.lshr(bits, c(23)), c(0xFF)), c(127))          # unbiased exponent
    mant = b.or_(b.and_(bits, c(0x7FFFFF)), c(0x800000))               # 1.m * 2^23

    def shift_amount(v):  # clamp to [0, cw-1]: larger shifts are poison in LLVM
        v = b.select(b.icmp_signed("<", v, c(0)), c(0), v)
        return b.select(b.icmp_signed(">", v, c(cw - 1)), c(cw - 1), v)

    mag = b.select(b.icmp_signed(">", e, c(23)), b.shl(mant, shift_amount(b.sub(e, c(23)))),
                   b.lshr(mant, shift_amount(b.sub(c(23), e))))       # |x| truncated (0 if e < 0)
    neg = b.icmp_signed("<", bits32, iconst(bits32.type, 0))
    if signed:
        val = b.select(neg, b.sub(c(0), mag), mag)
        sat = b.select(neg, c(-(1 << (w - 1))), c((1 << (w - 1)) - 1))
        res = b.select(b.icmp_signed(">=", e, c(w - 1)), sat, val)
    else:
        res = b.select(b.icmp_signed(">=", e, c(w)), c((1 << w) - 1 if w < cw else -1), mag)
        res = b.select(neg, c(0), res)
    res = b.select(b.fcmp_unordered("uno", x, x), c(0), res)
    return b.trunc(res, to) if w < cw else res


def call_sat(k, name, x, to):
    from .kernel import llvm_name
    fn = k.intrinsic(f"{name}.{llvm_name(to)}.{llvm_name(x.type)}", to, [x.type])
    return k.b.call(fn, [x])


# --- emitters ------------------------------------------------------------------------

def _elementwise(k: Kernel, n: Node, fn: ScalarFn):
    out_t = n.outputs[0].type
    ins = [broadcast_view(i, v.type, out_t.shape) for i, v in enumerate(n.inputs)]
    out = View(len(n.inputs), out_t.dtype, 0, contiguous_strides(out_t.shape))
    return emit_map(k, out_t.shape, out, ins, fn)


@emitter("neg", "exp", "log", "sqrt", "rsqrt", "tanh", "erf", "relu", "sigmoid", "silu")
def emit_unary(k, n):
    return _elementwise(k, n, unary_fn(n.op, n.inputs[0].dtype))


@emitter("add", "sub", "mul", "div", "pow", "max", "min")
def emit_binary(k, n):
    return _elementwise(k, n, binary_fn(n.op, n.inputs[0].dtype))


_FCMP = {"equal": "==", "less": "<", "greater": ">"}


def compare_fn(op: str, d: dt.DType) -> ScalarFn:
    """The bool (i8 0/1) result of comparing compute-type values; ordered for
    floats, so NaN compares false."""
    def fn(k, v, n):
        b, pred = k.b, _FCMP[op]
        if d.is_float:
            c = b.fcmp_ordered(pred, v[0], v[1])
        elif d.is_signed:
            c = b.icmp_signed(pred, v[0], v[1])
        else:  # u8, bool
            c = b.icmp_unsigned(pred, v[0], v[1])
        return b.zext(c, vtype(ir.IntType(8), n))
    return fn


@emitter("equal", "less", "greater")
def emit_compare(k, n):
    return _elementwise(k, n, compare_fn(n.op, n.inputs[0].dtype))


@emitter("logical_and")
def emit_logical_and(k, n):
    return _elementwise(k, n, lambda k_, v, lanes: k_.b.and_(v[0], v[1]))


@emitter("logical_not")
def emit_logical_not(k, n):
    return _elementwise(k, n, lambda k_, v, lanes: k_.b.xor(v[0], iconst(v[0].type, 1)))


@emitter("isnan")
def emit_isnan(k, n):
    return _elementwise(k, n, lambda k_, v, lanes: k_.b.zext(k_.b.fcmp_unordered("uno", v[0], v[0]),
                                                              vtype(ir.IntType(8), lanes)))


@emitter("where")
def emit_where(k, n):
    """Selects storage bits (raw), so values, NaN payloads and -0.0 copy exactly."""
    out_t = n.outputs[0].type
    ins = [broadcast_view(i, v.type, out_t.shape) for i, v in enumerate(n.inputs)]
    out = View(3, out_t.dtype, 0, contiguous_strides(out_t.shape))
    sel = lambda k_, v, lanes: k_.b.select(k_.b.icmp_unsigned("!=", v[0], iconst(v[0].type, 0)), v[1], v[2])  # noqa: E731
    return emit_map(k, out_t.shape, out, ins, sel, raw=True)


@emitter("expand")
def emit_expand(k, n):
    out_t = n.outputs[0].type
    return emit_map(k, out_t.shape, View(1, out_t.dtype, 0, contiguous_strides(out_t.shape)),
                    [broadcast_view(0, n.inputs[0].type, out_t.shape)], _identity, raw=True)


@emitter("gelu")
def emit_gelu(k, n):
    return _elementwise(k, n, lambda k_, v, lanes: f_gelu(k_, v[0], lanes, n.attrs["approximate"]))


@emitter("cast")
def emit_cast(k, n):
    return _elementwise(k, n, cast_fn(n.inputs[0].dtype, n.attrs["to"]))


def _identity(k, v, n):
    return v[0]


def emit_copy(k: Kernel, t: TensorType):
    st = contiguous_strides(t.shape)
    return emit_map(k, t.shape, View(1, t.dtype, 0, st), [View(0, t.dtype, 0, st)], _identity, raw=True)


@emitter("reshape")
def emit_reshape(k, n):
    return emit_copy(k, n.outputs[0].type)


@emitter("transpose")
def emit_transpose(k, n):
    x, y = n.inputs[0].type, n.outputs[0].type
    perm = n.attrs["perm"] or tuple(reversed(range(x.rank)))
    st = contiguous_strides(x.shape)
    return emit_map(k, y.shape, View(1, y.dtype, 0, contiguous_strides(y.shape)),
                    [View(0, x.dtype, 0, [st[p] for p in perm])], _identity, raw=True)


@emitter("slice")
def emit_slice(k, n):
    x, y = n.inputs[0].type, n.outputs[0].type
    rs = slice_ranges(x.shape, **n.attrs)
    st = contiguous_strides(x.shape)
    offset = sum(r[0] * s for r, s in zip(rs, st)) if y.size else 0
    return emit_map(k, y.shape, View(1, y.dtype, 0, contiguous_strides(y.shape)),
                    [View(0, x.dtype, offset, [r[2] * s for r, s in zip(rs, st)])], _identity, raw=True)


@emitter("concat")
def emit_concat(k, n):
    """One map per input, each writing its slab of the output; the range is the
    concatenation of the maps' ranges."""
    y = n.outputs[0].type
    axis = n.attrs["axis"] % y.rank
    out_st = contiguous_strides(y.shape)
    b = k.b
    total, pos, grain = 0, 0, 1
    parts = []
    for i, v in enumerate(n.inputs):
        parts.append((i, v.type, pos))
        pos += v.type.shape[axis]
    # Each part is a sub-kernel over its own range; dispatch by item index.
    subs = []
    for i, t, start in parts:
        sub = Kernel(k.module, f"{k.name}.part{i}", len(k.args), k.target, exported=False)
        rng, g = emit_map(sub, t.shape, View(len(n.inputs), y.dtype, start * out_st[axis], out_st),
                          [View(i, t.dtype, 0, contiguous_strides(t.shape))], _identity, raw=True)
        subs.append((sub, total, rng))
        total += rng
        grain = max(grain, g)
    for sub, lo, rng in subs:
        if rng == 0:
            continue
        b0 = b.select(b.icmp_signed(">", k.begin, i64(lo)), k.begin, i64(lo))
        e0 = b.select(b.icmp_signed("<", k.end, i64(lo + rng)), k.end, i64(lo + rng))
        with b.if_then(b.icmp_signed("<", b0, e0)):
            b.call(sub.body, list(k.args) + [b.sub(b0, i64(lo)), b.sub(e0, i64(lo))])
    k.finish()
    return total, grain


