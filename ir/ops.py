"""Every IR op, defined once: inputs, attribute schema, type inference and
numpy reference semantics.

The printer, parser, verifier, builder, reference interpreter and the
parametrized tests all iterate over ``OPS``; codegen registers one emitter
per op (or per family).  Float16 math is defined as: widen to f32, compute,
round to f16 — the same thing the generated code does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import dtypes as dt
from .dtypes import DType
from .graph import INT64_MAX, INT64_MIN, Graph, IRError, TensorType
from .sparsity import parse_format

REQUIRED = object()
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dtype", "array", "graph")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED

    def normalize(self, name: str, value: Any) -> Any:
        """Coerce ``value`` to the canonical Python form of this kind."""
        try:
            if self.kind == "int":
                if isinstance(value, bool) or int(value) != value or not INT64_MIN <= int(value) <= INT64_MAX:
                    raise ValueError
                return int(value)
            if self.kind == "float":
                return float(value)
            if self.kind == "bool":
                if value not in (True, False, 0, 1):
                    raise ValueError
                return bool(value)
            if self.kind == "str":
                if not isinstance(value, str):
                    raise ValueError
                return value
            if self.kind == "ints":
                vals = tuple(value)
                if any(isinstance(v, bool) or int(v) != v or not INT64_MIN <= int(v) <= INT64_MAX for v in vals):
                    raise ValueError
                return tuple(int(v) for v in vals)
            if self.kind == "floats":
                return tuple(float(v) for v in value)
            if self.kind == "dtype":
                return dt.dtype(value)
            if self.kind == "array":
                return np.asarray(value)
            if self.kind == "graph":
                if not isinstance(value, Graph):
                    raise ValueError
                return value
        except (TypeError, ValueError, OverflowError):   # OverflowError: int(inf)
            pass
        big = [v for v in (value if isinstance(value, (tuple, list)) else (value,))
               if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX]
        raise IRError(f"attribute {name!r} must be {self.kind}, got {value!r}"
                      + (f" ({big[0]} is beyond int64)" if big else ""))


@dataclass(frozen=True)
class OpDef:
    """An op: name, inputs (min..max, names for messages), attributes,
    ``infer(types, **attrs) -> [TensorType]`` and
    ``reference(*arrays, **attrs) -> [ndarray]``."""

    name: str
    inputs: tuple[str, ...]          # input names; a trailing "*" marks variadic
    optional: int                    # how many trailing inputs may be left out
    attrs: dict[str, Attr]
    infer: Callable[..., list[TensorType]]
    reference: Callable[..., list[np.ndarray]]
    doc: str = ""
    # output index -> input index: the compiled kernel may update that input in
    # place and return it as the output (the memory planner decides; see
    # compiler/memory.py).  The reference semantics stay functional.
    aliases: dict[int, int] = None
    kind: str = ""                   # the op's family (KINDS), read by passes instead of lists of names

    def __post_init__(self):
        if self.aliases is None:
            object.__setattr__(self, "aliases", {})

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].endswith("*")

    def check_arity(self, n: int) -> None:
        lo = len(self.inputs) - self.optional
        if self.variadic:
            if n < 1:
                raise IRError(f"{self.name} takes at least 1 input, got {n}")
        elif not lo <= n <= len(self.inputs):
            want = str(lo) if lo == len(self.inputs) else f"{lo} to {len(self.inputs)}"
            raise IRError(f"{self.name} takes {want} inputs ({', '.join(self.inputs)}), got {n}")

    def normalize_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"{self.name} has no attribute {', '.join(sorted(unknown))}; "
                          f"attributes: {', '.join(self.attrs) or 'none'}")
        out = {}
        for k, a in self.attrs.items():
            if k in attrs and attrs[k] is not None:
                out[k] = a.normalize(k, attrs[k])
            elif a.default is REQUIRED:
                raise IRError(f"{self.name} needs attribute {k!r}")
            else:
                out[k] = a.default
        return out


OPS: dict[str, OpDef] = {}

# Op families (an op class's ``KIND``).  Passes ask the family, never a list of op names:
# fusion and memory planning read "elementwise", so a new op of that family fuses with
# no change to them.
KINDS = {
    # y[i] = f(x[i], ...) of the inputs broadcast (numpy rules) to y's shape, computed in
    # the input dtype (f16 through f32): fusion composes these into one loop or into a
    # matmul / conv2d epilogue, so codegen has a per-element function of each, for every
    # dtype the op takes (codegen/elementwise.py; tests/test_layering.py checks it).
    "elementwise": "arithmetic per element with broadcasting",
    "predicate": "comparisons, logic and selection per element (bool results or conditions)",
    "movement": "elements moved or copied, no arithmetic (reshape, transpose, slice, ...)",
    "index": "elements read at indices given at run time",
    "reduction": "reduction over axes",
    "normalization": "a reduction along an axis applied back to it (softmax, norms)",
    "contraction": "matrix products (dense, quantized, sparse)",
    "window": "sliding-window ops over images (convolution, pooling)",
    "composite": "a kernel of its own for a block of several steps (rope, attention, MoE, fused, ...)",
    "source": "no inputs: a constant",
}


def defop(name: str, inputs: str, attrs: dict[str, Attr] | None = None, optional: int = 0):
    """Register a class with ``infer`` and ``reference`` functions (and ``KIND``, its
    family in KINDS; ``ALIASES`` when outputs may update inputs in place) as op ``name``."""

    def wrap(cls):
        kind = getattr(cls, "KIND", "")
        if kind not in KINDS:
            raise TypeError(f"op {name}: KIND must be one of {', '.join(KINDS)}, got {kind!r}")
        OPS[name] = OpDef(name, tuple(inputs.split()), optional, attrs or {},
                          cls.infer, cls.reference, (cls.__doc__ or "").strip(), getattr(cls, "ALIASES", {}), kind)
        return cls

    return wrap


# --- helpers -----------------------------------------------------------------

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError(msg)


def _dtypes(t: TensorType, allowed, what: str = "input") -> None:
    _need(t.dtype in allowed, f"{what} has dtype {t.dtype}; expected one of "
          f"{', '.join(map(str, allowed))}")


def _same_dtype(types) -> DType:
    ds = {t.dtype for t in types}
    _need(len(ds) == 1, "inputs must share one dtype, got " + ", ".join(str(t.dtype) for t in types))
    return types[0].dtype


def _axis(axis: int, rank: int) -> int:
    _need(-rank <= axis < rank if rank else axis in (0, -1),
          f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """numpy broadcasting of static shapes, with an IRError naming them."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise IRError("shapes " + " and ".join(str(tuple(s)) for s in shapes)
                      + " do not broadcast") from None


def _in_f32(fn):
    """Compute a float op in f32 and round back (f16 semantics)."""
    def run(x, *rest):
        return fn(x.astype(np.float32), *[r.astype(np.float32) for r in rest]).astype(x.dtype)
    return run


_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf(x: np.ndarray) -> np.ndarray:
    return _erf(x.astype(np.float64)).astype(np.float32)


def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        c = np.float32(math.sqrt(2 / math.pi))
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    return np.float32(0.5) * x * (np.float32(1) + erf(x / np.float32(math.sqrt(2))))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


# --- elementwise families ------------------------------------------------------
# name -> (allowed dtypes, f32 numpy function).  Codegen has a matching table.

UNARY: dict[str, tuple[tuple[DType, ...], Callable]] = {
    "neg": (dt.FLOATS + (dt.i64, dt.i32, dt.i8), np.negative),
    "exp": (dt.FLOATS, np.exp),
    "log": (dt.FLOATS, np.log),
    "sqrt": (dt.FLOATS, np.sqrt),
    "rsqrt": (dt.FLOATS, lambda x: np.float32(1) / np.sqrt(x)),
    "tanh": (dt.FLOATS, np.tanh),
    "erf": (dt.FLOATS, erf),
    "relu": (dt.NUMERIC, lambda x: np.maximum(x, x.dtype.type(0))),
    "sigmoid": (dt.FLOATS, sigmoid),
    "silu": (dt.FLOATS, lambda x: x * sigmoid(x)),
}
BINARY: dict[str, tuple[tuple[DType, ...], Callable]] = {
    "add": (dt.NUMERIC, np.add),
    "sub": (dt.NUMERIC, np.subtract),
    "mul": (dt.NUMERIC, np.multiply),
    "div": (dt.FLOATS, np.divide),
    "pow": (dt.FLOATS, np.power),
    "max": (dt.NUMERIC, np.maximum),
    "min": (dt.NUMERIC, np.minimum),
}


def _def_unary(name, allowed, fn):
    class Unary:
        __doc__ = f"elementwise {name}"
        KIND = "elementwise"

        @staticmethod
        def infer(x):
            _dtypes(x, allowed)
            return [x]

        @staticmethod
        def reference(x):
            return [_in_f32(fn)(x) if x.dtype == np.float16 else fn(x)]

    defop(name, "x")(Unary)


def _def_binary(name, allowed, fn):
    class Binary:
        __doc__ = f"elementwise {name} with numpy broadcasting"
        KIND = "elementwise"

        @staticmethod
        def infer(a, b):
            d = _same_dtype([a, b])
            _dtypes(a, allowed)
            return [TensorType(d, broadcast_shapes(a.shape, b.shape))]

        @staticmethod
        def reference(a, b):
            if a.dtype == np.float16:
                return [_in_f32(fn)(a, b)]
            with np.errstate(over="ignore"):
                return [fn(a, b).astype(a.dtype)]

    defop(name, "a b")(Binary)


for _n, (_allowed, _fn) in UNARY.items():
    _def_unary(_n, _allowed, _fn)
for _n, (_allowed, _fn) in BINARY.items():
    _def_binary(_n, _allowed, _fn)


# --- comparisons, logic, selection -----------------------------------------------------
# name -> (allowed dtypes, numpy function); the result is bool.  Codegen has a matching table.

COMPARE: dict[str, tuple[tuple[DType, ...], Callable]] = {
    "equal": (dt.NUMERIC + (dt.bool_,), np.equal),
    "less": (dt.NUMERIC, np.less),
    "greater": (dt.NUMERIC, np.greater),
}


def _def_compare(name, allowed, fn):
    class Compare:
        __doc__ = f"elementwise {name} with numpy broadcasting; bool result (NaN compares false)"
        KIND = "predicate"

        @staticmethod
        def infer(a, b):
            _same_dtype([a, b])
            _dtypes(a, allowed)
            return [TensorType(dt.bool_, broadcast_shapes(a.shape, b.shape))]

        @staticmethod
        def reference(a, b):
            return [np.asarray(fn(a, b))]  # f16 compares exactly as f32

    defop(name, "a b")(Compare)


for _n, (_allowed, _fn) in COMPARE.items():
    _def_compare(_n, _allowed, _fn)


@defop("logical_and", "a b")
class LogicalAnd:
    """a and b of bools with numpy broadcasting."""

    KIND = "predicate"

    @staticmethod
    def infer(a, b):
        _dtypes(a, (dt.bool_,), "a"), _dtypes(b, (dt.bool_,), "b")
        return [TensorType(dt.bool_, broadcast_shapes(a.shape, b.shape))]

    @staticmethod
    def reference(a, b):
        return [np.logical_and(a, b)]


@defop("logical_not", "x")
class LogicalNot:
    """not x, of bools."""

    KIND = "predicate"

    @staticmethod
    def infer(x):
        _dtypes(x, (dt.bool_,))
        return [x]

    @staticmethod
    def reference(x):
        return [np.logical_not(x)]


@defop("isnan", "x")
class IsNaN:
    """x != x of floats, as bool."""

    KIND = "predicate"

    @staticmethod
    def infer(x):
        _dtypes(x, dt.FLOATS)
        return [TensorType(dt.bool_, x.shape)]

    @staticmethod
    def reference(x):
        return [np.isnan(x)]


@defop("where", "cond a b")
class Where:
    """cond ? a : b elementwise, all three broadcast (numpy rules); values copied exactly."""

    KIND = "predicate"

    @staticmethod
    def infer(cond, a, b):
        _dtypes(cond, (dt.bool_,), "cond")
        d = _same_dtype([a, b])
        _need(d is not dt.i4, "where on i4 is not supported")
        return [TensorType(d, broadcast_shapes(cond.shape, a.shape, b.shape))]

    @staticmethod
    def reference(cond, a, b):
        return [np.where(cond, a, b)]


@defop("expand", "x", {"shape": Attr("ints")})
class Expand:
    """x broadcast (numpy rules, both ways) with ``shape``: the result has shape
    broadcast(x.shape, shape), so a 1 in ``shape`` keeps x's dim (ONNX Expand)."""

    KIND = "movement"

    @staticmethod
    def infer(x, shape):
        _need(x.dtype is not dt.i4, "expand of i4 is not supported")
        _need(all(d >= 0 for d in shape), f"expand: negative dim in {shape}")
        return [TensorType(x.dtype, broadcast_shapes(x.shape, shape))]

    @staticmethod
    def reference(x, shape):
        return [np.array(np.broadcast_to(x, broadcast_shapes(x.shape, shape)))]


@defop("gather_elements", "x ids", {"axis": Attr("int", 0)})
class GatherElements:
    """y[i0..] = x[i0.., ids[i0..], ..] with ids replacing the index on ``axis``
    (np.take_along_axis); y has ids' shape; ids count from the end when negative
    and must lie in [-n, n); every other dim of ids is at most x's."""

    KIND = "index"

    @staticmethod
    def infer(x, ids, axis):
        _dtypes(ids, (dt.i64, dt.i32), "ids")
        _need(x.dtype is not dt.i4, "gather_elements from an i4 tensor is not supported")
        _need(x.rank >= 1 and ids.rank == x.rank, f"gather_elements needs ids of x's rank >= 1, got {x.shape} "
              f"and {ids.shape}")
        a = _axis(axis, x.rank)
        _need(all(i <= d for j, (i, d) in enumerate(zip(ids.shape, x.shape)) if j != a),
              f"gather_elements: ids shape {ids.shape} exceeds x shape {x.shape} off axis {a}")
        _need(x.shape[a] > 0 or ids.size == 0, "gather_elements from an empty axis")
        return [TensorType(x.dtype, ids.shape)]

    @staticmethod
    def reference(x, ids, axis):
        a = axis % x.ndim
        n = x.shape[a]
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"gather_elements: ids must lie in [{-n}, {n - 1}], got {ids.min()}..{ids.max()}")
        idx = np.where(ids < 0, ids + n, ids).astype(np.int64)
        sub = x[tuple(slice(0, s) if j != a else slice(None) for j, s in enumerate(ids.shape))]
        return [np.take_along_axis(sub, idx, axis=a)]


@defop("gelu", "x", {"approximate": Attr("str", "none")})
class Gelu:
    """GELU; approximate="none" (erf form) or "tanh"."""

    KIND = "elementwise"

    @staticmethod
    def infer(x, approximate):
        _dtypes(x, dt.FLOATS)
        _need(approximate in ("none", "tanh"), f'approximate must be "none" or "tanh", got {approximate!r}')
        return [x]

    @staticmethod
    def reference(x, approximate):
        return [gelu(x.astype(np.float32), approximate).astype(x.dtype)]


@defop("const", "", {"value": Attr("array")})
class Const:
    """A constant tensor; its data lives in attrs["value"]."""

    KIND = "source"

    @staticmethod
    def infer(value):
        raise IRError("const nodes carry their own type")  # typed by the builder/parser

    @staticmethod
    def reference(value):
        return [value]


# --- linear algebra --------------------------------------------------------------

def _sparse_weight(op: str, sparse: str, w: TensorType) -> None:
    """A non-dense ``sparse`` format (ir/sparsity.py) needs a 2-D weight."""
    fmt = parse_format(sparse)
    _need(fmt.dense or w.rank == 2, f"{op} with sparse={sparse} needs a 2-D weight, got {w.shape}")


@defop("matmul", "a b", {"sparse": Attr("str", "dense")})
class MatMul:
    """a[..., M, K] @ b[..., K, N] with broadcasting of the batch dims.
    ``sparse`` (ir/sparsity.py) is how the kernel stores a constant 2-D b
    (dense, csr, bsrRxC, nmN:M); it does not change the result."""

    KIND = "contraction"

    @staticmethod
    def infer(a, b, sparse="dense"):
        d = _same_dtype([a, b])
        _dtypes(a, dt.FLOATS)
        _need(a.rank >= 2 and b.rank >= 2, f"matmul needs rank >= 2 operands, got {a.shape} and {b.shape}")
        _need(a.shape[-1] == b.shape[-2],
              f"matmul inner dimensions differ: {a.shape} @ {b.shape} (K={a.shape[-1]} vs {b.shape[-2]})")
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
        _sparse_weight("matmul", sparse, b)
        return [TensorType(d, batch + (a.shape[-2], b.shape[-1]))]

    @staticmethod
    def reference(a, b, sparse="dense"):
        if a.dtype == np.float16:
            return [np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)]
        return [np.matmul(a, b)]


def dequantize_weight(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int,
                      supers: np.ndarray | None = None, super_group: int = 0) -> np.ndarray:
    """f32 weights of a group-quantized [K, N] matrix, rows k of group k // group
    sharing one scale (and zero point or minimum) per column: (q - zero) * scale
    with integer zero points; (q + 8) * scale + minimum with float ``zeros``
    (minimums, i4 q), the product exact and the sum rounded once to f32, as
    GGUF's Q4_1.  Two-level (``supers`` [K / super_group, N, 2], GGUF's Q4_K):
    scale = supers[k // super_group, n, 0] * scales and minimum = supers[...,
    1] * zeros (u8 sub-scales and sub-minimums; exact f32 products), then as
    with float minimums."""
    idx = np.arange(q.shape[0]) // group
    w = q.astype(np.float32)
    if supers is not None:
        sidx = np.arange(q.shape[0]) // super_group
        sup = supers.astype(np.float32)[sidx]
        s = sup[..., 0] * scales.astype(np.float32)[idx]
        m = sup[..., 1] * zeros.astype(np.float32)[idx]
        return (w + np.float32(8)) * s + m
    if zeros is not None and zeros.dtype.kind == "f":
        return (w + np.float32(8)) * scales.astype(np.float32)[idx] + zeros.astype(np.float32)[idx]
    if zeros is not None:
        w = w - zeros.astype(np.float32)[idx]
    return w * scales.astype(np.float32)[idx]


ACTIVATION_MODES = ("none", "int8")
F32_MAX = float(np.finfo(np.float32).max)


def quantize_rows_i8(x: np.ndarray, group: int, act_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Int8 quantization of x[R, K] (f32) per row and group of K (a shorter
    last group when group does not divide K).  Dynamic (act_scale = 0):
    d = max|x_group| / 127 and xq = round-half-even(x / d) in [-127, 127], all
    in f32; a group with d = 0 gets xq = 0.  Static (act_scale > 0): d =
    f32(act_scale) everywhere and xq = clip(round-half-even(x / d), -127, 127)
    (saturating; +-inf saturate too).  Non-finite values: a group that no
    finite step quantizes -- one holding a NaN, or (dynamic) a +-inf, whose
    step would be inf -- gets d = NaN and xq = 0, so every output of its row
    is NaN.  Returns (xq int32 [R, K], d f32 [R, groups])."""
    r, k = x.shape
    groups = -(-k // group)
    xp = np.zeros((r, groups * group), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(r, groups, group)
    bad = (np.isnan(xb) if act_scale > 0 else ~np.isfinite(xb)).any(axis=2)   # [R, groups]
    if act_scale > 0:
        s = np.float32(act_scale)
        with np.errstate(over="ignore", invalid="ignore"):
            xq = np.clip(np.round(xb / s), np.float32(-127), np.float32(127))
        d = np.full((r, groups), s, np.float32)
    else:
        with np.errstate(invalid="ignore"):
            d = np.abs(xb).max(axis=2) / np.float32(127)
        with np.errstate(invalid="ignore", divide="ignore"):
            xq = np.round(xb / d[..., None])
    d = np.where(bad, np.float32(np.nan), d).astype(np.float32)
    xq = np.where((d > 0)[..., None], xq, np.float32(0))
    return xq.astype(np.int32).reshape(r, groups * group)[:, :k], d


def i8act_segments(k: int, group: int, act_group: int = 0) -> tuple[int, int, int]:
    """(segment, weight group, activation group) lengths of matmul_q
    {activations=int8} over K = k, each clamped to K (a group >= K is one
    group spanning K); ``act_group`` 0 is the weight group.  The integer dot
    products run per segment, the intersection of a weight group and an
    activation group: one of the two groups must be a multiple of the other,
    unless it spans K.  Segment j covers rows [j * seg, min(K, (j + 1) * seg)),
    weight group j * seg // group, activation group j * seg // act_group."""
    kk = max(k, 1)
    gw = min(group, kk)
    ga = min(act_group or group, kk)
    seg = min(gw, ga)
    if (gw % seg and gw != kk) or (ga % seg and ga != kk):
        raise ValueError(f"matmul_q act_group={act_group} and group={group} (K={k}): one must be a multiple of "
                         f"the other (or span K), so that every activation scale meets one weight scale")
    return seg, gw, ga


def matmul_q_i8act(x: np.ndarray, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                   group: int, act_scale: float = 0.0, supers: np.ndarray | None = None,
                   super_group: int = 0, act_group: int = 0) -> np.ndarray:
    """matmul_q {activations=int8} on x[R, K]: x quantized by
    ``quantize_rows_i8`` per row and activation group (``act_group``; 0: the
    weight group) (dynamic, or static with ``act_scale`` > 0), then per row
    and segment j (``i8act_segments``: weight group g, activation group a),
    dot_j = sum_k xq * (q - zero) exactly (integers), and
    y = sum_j (d_a * scale_g) * dot_j accumulated in f32 over j in order, each
    product and sum rounded to f32 (no fused multiply-add).  With float
    ``zeros`` (minimums, i4 q): dot_j = sum_k xq * (q + 8), and after each
    segment's term y += (d_a * minimum_g) * sum_k xq, each step rounded to f32.
    Two-level (``supers``): scale_g and minimum_g are the exact products of
    ``dequantize_weight``, then as with float minimums.  Returns f32 [R, N]."""
    r, k = x.shape
    if supers is not None:   # scale = d * sub-scale, minimum = dmin * sub-minimum per group (exact)
        sup = supers.astype(np.float32)[np.arange(scales.shape[0]) * group // super_group]
        scales = sup[..., 0] * scales.astype(np.float32)
        zeros = sup[..., 1] * zeros.astype(np.float32)
    n = q.shape[1]
    seg, gw, ga = i8act_segments(k, group, act_group)
    xq, d = quantize_rows_i8(x.astype(np.float32), ga, act_scale)
    w = q.astype(np.int64)
    mins = zeros is not None and zeros.dtype.kind == "f"
    if mins:
        w = w + 8
    elif zeros is not None:
        w = w - zeros.astype(np.int64)[np.arange(k) // group]
    y = np.zeros((r, n), np.float32)
    for j in range(-(-k // seg)):
        g, a = j * seg // gw, j * seg // ga
        ks = slice(j * seg, min(k, (j + 1) * seg))
        dot = (xq[:, ks].astype(np.int64) @ w[ks]).astype(np.float32)
        coef = d[:, a:a + 1] * scales[g].astype(np.float32)[None, :]   # f32 products
        y = (y + coef * dot).astype(np.float32)
        if mins:
            mcoef = d[:, a:a + 1] * zeros[g].astype(np.float32)[None, :]
            xs = xq[:, ks].astype(np.int64).sum(axis=1).astype(np.float32)[:, None]
            y = (y + mcoef * xs).astype(np.float32)
    return y


@defop("matmul_q", "x q scales zeros supers",
       {"group": Attr("int"), "activations": Attr("str", "none"), "sparse": Attr("str", "dense"),
        "act_scale": Attr("float", 0.0), "super_group": Attr("int", 0), "act_group": Attr("int", 0)},
       optional=2)
class MatMulQ:
    """x[..., M, K] @ dequantize(q)[K, N] with weights quantized to i8 or i4:
    w[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n].  One
    group spanning K is per-output-channel quantization; a group that does
    not divide K leaves a shorter last group.  Kernels never materialize w.

    ``activations``: "none" (default): x in float, y = x @ w in f32 (f16 x
    widened, y rounded to x's dtype).  "int8": x is quantized dynamically at
    run time, per row of x (every leading dim folded into rows) and per weight
    group: d = max|x_group| / 127 (f32), xq = round-half-even(x / d) in
    [-127, 127] (a group with d = 0 contributes 0); then
    y = sum_groups (d * scale) * sum_k xq * (q - zero), the inner sums exact
    in integers, the outer in f32 (``matmul_q_i8act``).  Other numerics than
    "none" (activation rounding), chosen explicitly.  A row of x holding a NaN
    or +-inf gives a row of NaN outputs (its group's step d is NaN: no finite
    step quantizes it), where float matmul could give +-inf.

    ``act_scale`` (activations="int8" only): 0.0 (default) is the dynamic
    quantization above; > 0 is a static, calibrated per-tensor scale: d =
    f32(act_scale) for every row and group, xq = clip(round-half-even(x / d),
    -127, 127) (saturating, +-inf too), and y as above with that d (a NaN in a
    row still makes the row's outputs NaN).

    ``act_group`` (activations="int8" only): values of a row per activation
    scale; 0 (default) is the weight group (so one scale per row with
    per-channel weights), 32 is llama.cpp's q8 activations (with weight group
    32, ggml's q4_0 x q8_0 and q8_0 x q8_0 dot products), >= K one scale per
    row.  One of group and act_group must be a multiple of the other (or span
    K); the integer sums then run per segment where both scales are constant
    and the float combination follows in segment order (``matmul_q_i8act``,
    ``i8act_segments``).  A NaN (dynamic: or +-inf) makes its activation
    group's d NaN.

    ``sparse`` (ir/sparsity.py): how the kernel stores q's nonzeros; a
    non-dense format needs symmetric weights (no zeros), activations="none",
    and for i8 per-channel scales (group >= K).

    ``zeros`` in a float dtype (f32 / f16 [groups, N], i4 q only) are minimums
    instead of zero points, the "scale and minimum" form of GGUF's Q4_1 and
    Q4_K: w[k, n] = (q[k, n] + 8) * scales[g, n] + zeros[g, n], i.e. q holds
    the unsigned 4-bit code u as u - 8, and the product (exact) is summed with
    the minimum in one f32 rounding, as ggml's d * u + m.  Kernels
    add minimum * sum(x over the group) once per group and column: the
    integer-code loops are those of the other schemes.  With
    activations="int8", y += (d * minimum) * sum(xq) after each group's term
    (``matmul_q_i8act``).

    ``supers`` (f32 / f16 [ceil(K / super_group), N, 2]) make the scales
    two-level, as GGUF's K-quants' super-blocks: with i4 q, u8 ``scales`` and
    u8 ``zeros`` (sub-scales and sub-minimums per group), super-block
    s = k // super_group (a multiple of group) gives scale = supers[s, n, 0] *
    scales[g, n] and minimum = supers[s, n, 1] * zeros[g, n] (exact f32
    products), and w = (q + 8) * scale + minimum as above (and with
    int8 activations): Q4_K is (d, -dmin)
    over its 6-bit (sc, m), 4.625 bits per weight stored against the file's
    4.5 (the 6-bit fields take a byte each).  Kernels compute scale and
    minimum once per group and column.  ir/blocks.py maps GGUF's blocks onto
    these operands (``to_matmul_q``)."""

    KIND = "contraction"

    @staticmethod
    def infer(x, q, scales, zeros=None, supers=None, *, group, activations="none", sparse="dense", act_scale=0.0,
              super_group=0, act_group=0):
        _dtypes(x, dt.FLOATS, "x")
        _dtypes(q, (dt.i8, dt.i4), "q")
        _need(activations in ACTIVATION_MODES,
              f"matmul_q activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
        _need(act_scale == 0 or (activations == "int8" and 0 < act_scale <= F32_MAX and np.float32(act_scale) > 0),
              f"matmul_q act_scale={act_scale!r} must be 0 (dynamic) or, with activations=int8, a positive "
              f"finite f32 scale")
        _need(act_group == 0 or (activations == "int8" and act_group >= 1),
              f"matmul_q act_group={act_group} must be 0 (the weight group) or, with activations=int8, a "
              f"positive number of values per activation scale")
        if act_group and q.rank == 2:
            try:
                i8act_segments(q.shape[0], group, act_group)
            except ValueError as e:
                _need(False, str(e))
        if supers is not None:
            return MatMulQ.infer_two_level(x, q, scales, zeros, supers, group, activations, sparse, super_group)
        _need(super_group == 0, f"matmul_q super_group={super_group} needs supers (two-level scales)")
        _dtypes(scales, dt.FLOATS, "scales")
        _need(x.rank >= 2 and q.rank == 2, f"matmul_q needs x of rank >= 2 and a 2-D q, got {x.shape} and {q.shape}")
        k, n = q.shape
        _need(x.shape[-1] == k, f"matmul_q inner dimensions differ: x {x.shape} @ q {q.shape}")
        _need(group >= 1, f"matmul_q group must be >= 1, got {group}")
        groups = -(-k // group)
        _need(scales.shape == (groups, n), f"matmul_q scales shape {scales.shape} must be ({groups}, {n}) "
              f"for K={k}, group={group}")
        if zeros is not None and zeros.dtype in dt.FLOATS:
            _need(zeros.shape == scales.shape,
                  f"matmul_q minimums (float zeros) must be [{', '.join(map(str, scales.shape))}], got {zeros}")
            _need(q.dtype is dt.i4, f"matmul_q float minimums (zeros) need i4 weights, got {q.dtype}")
        elif zeros is not None:
            _need(zeros.dtype == q.dtype and zeros.shape == scales.shape,
                  f"matmul_q zeros must be {q.dtype}{list(scales.shape)} (or float minimums), got {zeros}")
        _sparse_weight("matmul_q", sparse, q)
        if sparse != "dense":
            _need(zeros is None and activations == "none",
                  f"matmul_q with sparse={sparse} needs symmetric weights (no zeros) and activations=none")
            _need(q.dtype is dt.i4 or group >= k,
                  f"matmul_q with sparse={sparse} and i8 weights needs per-channel scales (group >= K={k}), "
                  f"got group={group}")
        return [TensorType(x.dtype, x.shape[:-1] + (n,))]

    @staticmethod
    def infer_two_level(x, q, scales, zeros, supers, group, activations, sparse, super_group):
        _need(x.rank >= 2 and q.rank == 2, f"matmul_q needs x of rank >= 2 and a 2-D q, got {x.shape} and {q.shape}")
        k, n = q.shape
        _need(x.shape[-1] == k, f"matmul_q inner dimensions differ: x {x.shape} @ q {q.shape}")
        _need(q.dtype is dt.i4 and sparse == "dense",
              "matmul_q with supers (two-level scales) needs i4 weights and sparse=dense")
        _need(group >= 1 and super_group >= group and super_group % group == 0,
              f"matmul_q super_group={super_group} must be a multiple of group={group}")
        groups = -(-k // group)
        for name, t in (("scales", scales), ("zeros", zeros)):
            _need(t is not None and t.dtype is dt.u8 and t.shape == (groups, n),
                  f"matmul_q with supers needs u8 {name} [{groups}, {n}] (sub-scales and sub-minimums), got {t}")
        _dtypes(supers, dt.FLOATS, "supers")
        _need(supers.shape == (-(-k // super_group), n, 2),
              f"matmul_q supers shape {supers.shape} must be ({-(-k // super_group)}, {n}, 2) for K={k}, "
              f"super_group={super_group}")
        return [TensorType(x.dtype, x.shape[:-1] + (n,))]

    @staticmethod
    def reference(x, q, scales, zeros=None, supers=None, *, group, activations="none", sparse="dense",
                  act_scale=0.0, super_group=0, act_group=0):
        if activations == "int8":
            k, n = q.shape
            y = matmul_q_i8act(x.reshape(int(np.prod(x.shape[:-1])), k), q, scales, zeros, group, act_scale,
                               supers, super_group, act_group)
            return [y.reshape(x.shape[:-1] + (n,)).astype(x.dtype)]
        w = dequantize_weight(q, scales, zeros, group, supers, super_group)
        return [np.matmul(x.astype(np.float32), w).astype(x.dtype)]


# --- normalizations -------------------------------------------------------------

@defop("softmax", "x", {"axis": Attr("int", -1)})
class Softmax:
    """softmax along one axis."""

    KIND = "normalization"

    @staticmethod
    def infer(x, axis):
        _dtypes(x, dt.FLOATS)
        _axis(axis, x.rank)
        return [x]

    @staticmethod
    def reference(x, axis):
        y = x.astype(np.float32)
        e = np.exp(y - y.max(axis=axis, keepdims=True))
        return [(e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)]


@defop("layernorm", "x scale bias", {"axis": Attr("int", -1), "eps": Attr("float", 1e-5)}, optional=1)
class LayerNorm:
    """(x - mean) / sqrt(var + eps) * scale + bias over the dims from axis on."""

    KIND = "normalization"

    @staticmethod
    def infer(x, scale, bias=None, *, axis, eps):
        _dtypes(x, dt.FLOATS)
        a = _axis(axis, x.rank)
        for name, t in (("scale", scale), ("bias", bias)):
            if t is not None:
                _need(t.dtype == x.dtype, f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
                _need(t.shape == x.shape[a:], f"{name} shape {t.shape} must be x.shape[{a}:] = {x.shape[a:]}")
        return [x]

    @staticmethod
    def reference(x, scale, bias=None, *, axis, eps):
        y = x.astype(np.float32)
        axes = tuple(range(axis % x.ndim, x.ndim))
        mean = y.mean(axis=axes, keepdims=True)
        var = ((y - mean) ** 2).mean(axis=axes, keepdims=True)
        out = (y - mean) / np.sqrt(var + np.float32(eps)) * scale.astype(np.float32)
        if bias is not None:
            out = out + bias.astype(np.float32)
        return [out.astype(x.dtype)]


@defop("rmsnorm", "x scale", {"axis": Attr("int", -1), "eps": Attr("float", 1e-6)})
class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * scale over the dims from axis on."""

    KIND = "normalization"

    @staticmethod
    def infer(x, scale, *, axis, eps):
        return LayerNorm.infer(x, scale, None, axis=axis, eps=eps)

    @staticmethod
    def reference(x, scale, *, axis, eps):
        y = x.astype(np.float32)
        axes = tuple(range(axis % x.ndim, x.ndim))
        ms = (y * y).mean(axis=axes, keepdims=True)
        return [(y / np.sqrt(ms + np.float32(eps)) * scale.astype(np.float32)).astype(x.dtype)]


# --- reductions ---------------------------------------------------------------------

def _reduce_axes(rank: int, axes) -> tuple[int, ...]:
    if not axes:
        return tuple(range(rank))
    out = tuple(sorted({_axis(a, rank) for a in axes}))
    _need(len(out) == len(axes), f"repeated axis in {axes}")
    return out


def _def_reduce(name, fn, allowed):
    class Reduce:
        __doc__ = f"{name} over axes (all when empty)"
        KIND = "reduction"

        @staticmethod
        def infer(x, axes, keepdims):
            _dtypes(x, allowed)
            ax = _reduce_axes(x.rank, axes)
            if name == "reduce_max":
                _need(all(x.shape[a] > 0 for a in ax), "reduce_max over an empty axis")
            shape = tuple(1 if i in ax else d for i, d in enumerate(x.shape) if keepdims or i not in ax)
            return [TensorType(x.dtype, shape)]

        @staticmethod
        def reference(x, axes, keepdims):
            ax = _reduce_axes(x.ndim, axes)
            y = x.astype(np.float32) if x.dtype == np.float16 else x
            return [np.asarray(fn(y, axis=ax, keepdims=keepdims)).astype(x.dtype)]

    defop(name, "x", {"axes": Attr("ints", ()), "keepdims": Attr("bool", False)})(Reduce)


_def_reduce("reduce_sum", np.sum, dt.NUMERIC)
_def_reduce("reduce_mean", np.mean, dt.FLOATS)
_def_reduce("reduce_max", np.max, dt.NUMERIC)


# --- data movement ----------------------------------------------------------------------

@defop("reshape", "x", {"shape": Attr("ints")})
class Reshape:
    """Same elements, new static shape (one dim may be -1)."""

    KIND = "movement"

    @staticmethod
    def infer(x, shape):
        return [TensorType(x.dtype, resolve_shape(x.shape, shape))]

    @staticmethod
    def reference(x, shape):
        return [x.reshape(resolve_shape(x.shape, shape))]


def resolve_shape(src: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Resolve one -1 in a reshape target, checking the element count."""
    size = int(np.prod(src, dtype=np.int64))
    _need(shape.count(-1) <= 1 and all(d >= -1 for d in shape), f"bad reshape target {shape}")
    if -1 in shape:
        rest = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        _need(rest > 0 and size % rest == 0, f"cannot reshape {src} to {shape}")
        shape = tuple(size // rest if d == -1 else d for d in shape)
    _need(int(np.prod(shape, dtype=np.int64)) == size, f"cannot reshape {src} ({size} elements) to {shape}")
    return tuple(shape)


@defop("transpose", "x", {"perm": Attr("ints", ())})
class Transpose:
    """Permute dims (reverse them when perm is empty)."""

    KIND = "movement"

    @staticmethod
    def infer(x, perm):
        p = perm or tuple(reversed(range(x.rank)))
        _need(sorted(p) == list(range(x.rank)), f"perm {perm} is not a permutation of {x.rank} dims")
        return [TensorType(x.dtype, tuple(x.shape[i] for i in p))]

    @staticmethod
    def reference(x, perm):
        return [np.asarray(np.transpose(x, perm or None), order="C")]


@defop("concat", "xs*", {"axis": Attr("int")})
class Concat:
    """Join tensors along axis."""

    KIND = "movement"

    @staticmethod
    def infer(*xs, axis):
        d = _same_dtype(xs)
        r = xs[0].rank
        a = _axis(axis, r)
        for t in xs:
            _need(t.rank == r and t.shape[:a] + t.shape[a + 1:] == xs[0].shape[:a] + xs[0].shape[a + 1:],
                  f"concat along axis {axis}: shapes " + ", ".join(str(t.shape) for t in xs) + " differ off the axis")
        return [TensorType(d, xs[0].shape[:a] + (sum(t.shape[a] for t in xs),) + xs[0].shape[a + 1:])]

    @staticmethod
    def reference(*xs, axis):
        return [np.concatenate(xs, axis=axis)]


def slice_ranges(shape, starts, ends, axes, steps) -> list[tuple[int, int, int]]:
    """Per-dim (start, stop, step) after ONNX Slice clamping rules."""
    axes = axes or tuple(range(len(starts)))
    steps = steps or (1,) * len(starts)
    _need(len(starts) == len(ends) == len(axes) == len(steps),
          "slice: starts, ends, axes and steps must have the same length")
    out = [(0, d, 1) for d in shape]
    seen = set()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, len(shape))
        _need(a not in seen, f"slice: axis {a} repeated")
        seen.add(a)
        _need(st != 0, "slice: step 0")
        out[a] = slice(s, e, st).indices(shape[a])
    return out


@defop("slice", "x", {"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints", ()),
                      "steps": Attr("ints", ())})
class Slice:
    """x[start:end:step] on the given axes (ONNX Slice semantics, clamped)."""

    KIND = "movement"

    @staticmethod
    def infer(x, starts, ends, axes, steps):
        rs = slice_ranges(x.shape, starts, ends, axes, steps)
        return [TensorType(x.dtype, tuple(len(range(*r)) for r in rs))]

    @staticmethod
    def reference(x, starts, ends, axes, steps):
        rs = slice_ranges(x.shape, starts, ends, axes, steps)
        # a negative stop from slice.indices() means "before index 0", not "from the end"
        return [np.asarray(x[tuple(slice(a, b if b >= 0 else None, c) for a, b, c in rs)], order="C")]


@defop("gather", "table ids", {"axis": Attr("int", 0)})
class Gather:
    """table.take(ids, axis): embedding lookup; negative ids count from the end."""

    KIND = "index"

    @staticmethod
    def infer(table, ids, axis):
        _dtypes(ids, (dt.i64, dt.i32), "ids")
        _need(table.dtype is not dt.i4, "gather from an i4 table is not supported")
        _need(table.rank >= 1, "gather needs a table of rank >= 1")
        a = _axis(axis, table.rank)
        return [TensorType(table.dtype, table.shape[:a] + ids.shape + table.shape[a + 1:])]

    @staticmethod
    def reference(table, ids, axis):
        n = table.shape[axis]
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"gather: ids must lie in [{-n}, {n - 1}], got {ids.min()}..{ids.max()}")
        return [np.take(table, np.where(ids < 0, ids + n, ids), axis=axis)]


@defop("matmul_ggml", "x blocks", {"type": Attr("str")})
class MatMulGGML:
    """x[..., M, K] @ W.T with W[N, K] a GGML matrix kept as its file's blocks:
    ``blocks`` u8 [N, K / block * bytes], one row per output feature
    (ir/blocks.py has the layouts), dequantized in registers exactly as ggml
    does (W = ``ir.blocks.dequantize(type, blocks, (N, K))``), f32
    accumulation.  For the formats whose codes matmul_q cannot store at the
    file's size (``ir.blocks.GGML_BLOCKS``): type "Q6_K" (6-bit codes, 6.5625
    bits per weight stored, as the file) and "Q5_0" (5-bit codes, 5.5 bits);
    the others are matmul_q operands (``ir.blocks.to_matmul_q``)."""

    KIND = "contraction"

    @staticmethod
    def infer(x, blocks, type):
        from .blocks import GGML_BLOCKS, TYPES
        _dtypes(x, dt.FLOATS, "x")
        _need(type in GGML_BLOCKS, f"matmul_ggml type must be one of {', '.join(GGML_BLOCKS)} (other GGML "
              f"types are matmul_q weights: ir.blocks.to_matmul_q), got {type!r}")
        _need(blocks.dtype is dt.u8 and blocks.rank == 2, f"matmul_ggml blocks must be u8 [N, row bytes], got {blocks}")
        t = TYPES[type]
        k = x.shape[-1] if x.rank >= 2 else -1
        _need(x.rank >= 2 and k % t.block == 0 and blocks.shape[1] == k // t.block * t.nbytes,
              f"matmul_ggml {type}: x {x.shape} needs K a multiple of {t.block} and blocks of "
              f"K / {t.block} * {t.nbytes} bytes per row, got {blocks.shape}")
        return [TensorType(x.dtype, x.shape[:-1] + (blocks.shape[0],))]

    @staticmethod
    def reference(x, blocks, type):
        from .blocks import dequantize
        w = dequantize(type, blocks, (blocks.shape[0], x.shape[-1]))
        return [np.matmul(x.astype(np.float32), w.T).astype(x.dtype)]


@defop("gather_ggml", "ids blocks", {"type": Attr("str")})
class GatherGGML:
    """Rows ``ids`` of a GGML table W[N, K] kept as its file's blocks (type
    "Q6_K" or "Q5_0", as ``matmul_ggml``, reading the same packed constant: a tied Q6_K
    token_embd is stored once): f32 [*ids.shape, K], exactly
    ``ir.blocks.dequantize``'s values.  Negative ids count from the end."""

    KIND = "index"

    @staticmethod
    def infer(ids, blocks, type):
        from .blocks import GGML_BLOCKS, TYPES
        _dtypes(ids, (dt.i64, dt.i32), "ids")
        _need(type in GGML_BLOCKS, f"gather_ggml type must be one of {', '.join(GGML_BLOCKS)} (other GGML types: "
              f"gather_q), got {type!r}")
        t = TYPES[type]
        _need(blocks.dtype is dt.u8 and blocks.rank == 2 and blocks.shape[1] % t.nbytes == 0,
              f"gather_ggml blocks must be u8 [N, K / {t.block} * {t.nbytes}], got {blocks}")
        return [TensorType(dt.f32, ids.shape + (blocks.shape[1] // t.nbytes * t.block,))]

    @staticmethod
    def reference(ids, blocks, type):
        from .blocks import TYPES, dequantize
        n = blocks.shape[0]
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"gather_ggml: ids must lie in [{-n}, {n - 1}], got {ids.min()}..{ids.max()}")
        rows = blocks[np.where(ids < 0, ids + n, ids).reshape(-1)]
        k = blocks.shape[1] // TYPES[type].nbytes * TYPES[type].block
        return [dequantize(type, rows, (rows.shape[0], k)).reshape(ids.shape + (k,))]


@defop("gather_q", "ids q scales zeros supers", {"group": Attr("int"), "super_group": Attr("int", 0)}, optional=2)
class GatherQ:
    """Rows ``ids`` of the table W[N, K] = dequantize(q, scales, zeros, group).T,
    the weight of a matmul_q x @ W.T with the same q, scales and zeros
    (``dequantize_weight``: integer zero points or float minimums): f32
    [*ids.shape, K], every value exactly the dequantized weight.  It reads those
    constants in matmul_q's packed layout, so a tied embedding and lm_head
    (GGUF's token_embd serving both) are stored once.  Negative ids count from
    the end, as in gather."""

    KIND = "index"

    @staticmethod
    def infer(ids, q, scales, zeros=None, supers=None, *, group, super_group=0):
        _dtypes(ids, (dt.i64, dt.i32), "ids")
        x = TensorType(dt.f32, (1, q.shape[0]) if q.rank == 2 else (1,))
        MatMulQ.infer(x, q, scales, zeros, supers, group=group, super_group=super_group)   # the same weight operands
        return [TensorType(dt.f32, ids.shape + (q.shape[0],))]

    @staticmethod
    def reference(ids, q, scales, zeros=None, supers=None, *, group, super_group=0):
        n = q.shape[1]
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"gather_q: ids must lie in [{-n}, {n - 1}], got {ids.min()}..{ids.max()}")
        w = dequantize_weight(q, scales, zeros, group, supers, super_group)
        return [np.ascontiguousarray(w.T[np.where(ids < 0, ids + n, ids)])]


@defop("cast", "x", {"to": Attr("dtype")})
class Cast:
    """Convert dtype (floats to ints truncate toward zero; to bool: x != 0)."""

    KIND = "elementwise"

    @staticmethod
    def infer(x, to):
        _need(to in dt.IO and x.dtype in dt.IO, f"cast from {x.dtype} to {to} is not supported")
        return [TensorType(to, x.shape)]

    @staticmethod
    def reference(x, to):
        if to is dt.bool_:
            return [x != 0]
        with np.errstate(invalid="ignore"):
            return [x.astype(to.np_dtype)]


# --- convolution and pooling ------------------------------------------------------------

def _pool_out(size, k, s, pb, pe, d, ceil_mode=False):
    span = d * (k - 1) + 1
    num = size + pb + pe - span
    _need(num >= 0, f"window {span} larger than padded input {size + pb + pe}")
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + pb:  # last window must start inside input or left pad
        out -= 1
    return out


def _check2(name, v, n=2):
    _need(len(v) == n and all(isinstance(i, int) for i in v), f"{name} must have {n} ints, got {v}")


@defop("conv2d", "x w bias", {"strides": Attr("ints", (1, 1)), "pads": Attr("ints", (0, 0, 0, 0)),
                              "dilations": Attr("ints", (1, 1)), "groups": Attr("int", 1)}, optional=1)
class Conv2d:
    """NCHW convolution; w is [C_out, C_in/groups, KH, KW]; pads are
    (top, left, bottom, right)."""

    KIND = "window"

    @staticmethod
    def infer(x, w, bias=None, *, strides, pads, dilations, groups):
        d = _same_dtype([x, w] + ([bias] if bias else []))
        _dtypes(x, dt.FLOATS)
        _need(x.rank == 4 and w.rank == 4, f"conv2d needs 4-D x and w, got {x.shape} and {w.shape}")
        _check2("strides", strides), _check2("dilations", dilations), _check2("pads", pads, 4)
        _need(min(strides) >= 1 and min(dilations) >= 1 and min(pads) >= 0, "conv2d: strides and dilations must be >= 1, pads >= 0")
        n, c, h, wd = x.shape
        co, cig, kh, kw = w.shape
        _need(groups >= 1 and c % groups == 0 and co % groups == 0,
              f"conv2d: groups={groups} must divide C_in={c} and C_out={co}")
        _need(cig == c // groups, f"conv2d: w.shape[1]={cig} must be C_in/groups = {c // groups}")
        _need(kh >= 1 and kw >= 1, f"conv2d: kernel size {kh}x{kw} must be at least 1x1")
        if bias is not None:
            _need(bias.shape == (co,), f"conv2d: bias shape {bias.shape} must be ({co},)")
        oh = _pool_out(h, kh, strides[0], pads[0], pads[2], dilations[0])
        ow = _pool_out(wd, kw, strides[1], pads[1], pads[3], dilations[1])
        return [TensorType(d, (n, co, oh, ow))]

    @staticmethod
    def reference(x, w, bias=None, *, strides, pads, dilations, groups):
        f = x.dtype
        x, w = x.astype(np.float32), w.astype(np.float32)
        n, c, h, wd = x.shape
        co, cig, kh, kw = w.shape
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        oh = _pool_out(h, kh, strides[0], pads[0], pads[2], dilations[0])
        ow = _pool_out(wd, kw, strides[1], pads[1], pads[3], dilations[1])
        # patches[n, c, oh, ow, kh, kw]
        ih = (np.arange(oh) * strides[0])[:, None] + np.arange(kh) * dilations[0]
        iw = (np.arange(ow) * strides[1])[:, None] + np.arange(kw) * dilations[1]
        patches = xp[:, :, ih[:, None, :, None], iw[None, :, None, :]]
        patches = patches.reshape(n, groups, cig, oh, ow, kh, kw)
        wg = w.reshape(groups, co // groups, cig, kh, kw)
        out = np.einsum("ngcyxij,gocij->ngoyx", patches, wg, optimize=True).reshape(n, co, oh, ow)
        if bias is not None:
            out = out + bias.astype(np.float32)[None, :, None, None]
        return [out.astype(f)]


# Winograd F(2x2, 3x3) (Lavin & Gray): a 3x3, stride-1 conv2d is, per 4x4 input tile d
# (2x2 outputs), Y = A^T [(G g G^T) * (B^T d B)] A; the 16 products of a tile are
# 16 batched GEMMs over the channels (compiler/passes/winograd.py builds the graph:
# winograd_input -> matmul with the filters transformed at compile time -> winograd_output).
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def winograd_tiles(oh: int, ow: int) -> tuple[int, int]:
    """Tiles of 2x2 outputs covering an oh x ow output (the last row / column of
    tiles half outside when oh / ow is odd)."""
    return -(-oh // 2), -(-ow // 2)


def winograd_filter(w) -> np.ndarray:
    """u[e, ci, co] = (G w[co, ci] G^T)[e // 4, e % 4]: the transformed 3x3 filters,
    the b of winograd's 16 GEMMs (computed in f64, rounded once to f32)."""
    g = WINOGRAD_G.astype(np.float64)
    u = np.einsum("ak,oikl,bl->abio", g, np.asarray(w, np.float64), g)
    return u.reshape(16, *u.shape[2:]).astype(np.float32)


@defop("winograd_input", "x", {"pads": Attr("ints", (1, 1, 1, 1))})
class WinogradInput:
    """v[e, t, c] = (B^T d B)[e // 4, e % 4] with d the 4x4 input patch of tile t of
    winograd F(2x2, 3x3): rows 2*th - pads[0] .. +3, columns 2*tw - pads[1] .. +3
    of x[n, c] (zero outside x); t = (n, th, tw) row-major over the tiles of the
    3x3 stride-1 conv2d's output (``winograd_tiles``).  pads as conv2d's."""

    KIND = "window"

    @staticmethod
    def infer(x, *, pads):
        _dtypes(x, (dt.f32,))
        _need(x.rank == 4, f"winograd_input needs a 4-D NCHW x, got {x.shape}")
        _check2("pads", pads, 4)
        _need(min(pads) >= 0, f"winograd_input: pads {pads} must be >= 0")
        n, c, h, w = x.shape
        th, tw = winograd_tiles(_pool_out(h, 3, 1, pads[0], pads[2], 1), _pool_out(w, 3, 1, pads[1], pads[3], 1))
        return [TensorType(x.dtype, (16, n * th * tw, c))]

    @staticmethod
    def reference(x, *, pads):
        n, c, h, w = x.shape
        th, tw = winograd_tiles(h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2)
        xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2), np.float32)
        rows, cols = max(0, min(h, 2 * th + 2 - pads[0])), max(0, min(w, 2 * tw + 2 - pads[1]))
        xp[:, :, pads[0]:pads[0] + rows, pads[1]:pads[1] + cols] = x[:, :, :rows, :cols]
        ih = 2 * np.arange(th)[:, None] + np.arange(4)
        iw = 2 * np.arange(tw)[:, None] + np.arange(4)
        d = xp[:, :, ih[:, None, :, None], iw[None, :, None, :]]          # [n, c, th, tw, 4, 4]
        v = np.einsum("ai,nctwij,bj->abntwc", WINOGRAD_BT, d, WINOGRAD_BT)
        return [np.ascontiguousarray(v.reshape(16, n * th * tw, c), np.float32)]


@defop("winograd_output", "m bias", {"shape": Attr("ints")}, optional=1)
class WinogradOutput:
    """out[n, co, 2*th + i, 2*tw + j] = (A^T m[:, t, co] A)[i, j] + bias[co] for tile
    t = (n, th, tw) of winograd F(2x2, 3x3) (m[e, t, co], e = 4*row + column of the
    4x4 product), cropped to ``shape`` = (N, C_out, OH, OW): winograd_input's tiles."""

    KIND = "window"

    @staticmethod
    def infer(m, bias=None, *, shape):
        _dtypes(m, (dt.f32,))
        _need(len(shape) == 4 and min(shape) >= 1, f"winograd_output: shape {shape} must be 4 positive ints")
        n, co, oh, ow = shape
        th, tw = winograd_tiles(oh, ow)
        _need(m.shape == (16, n * th * tw, co), f"winograd_output: m {m.shape} must be (16, {n * th * tw}, {co}) "
              f"for the output {tuple(shape)}")
        if bias is not None:
            _need(bias.dtype == m.dtype and bias.shape == (co,), f"winograd_output: bias {bias} must be f32 ({co},)")
        return [TensorType(m.dtype, tuple(shape))]

    @staticmethod
    def reference(m, bias=None, *, shape):
        n, co, oh, ow = shape
        th, tw = winograd_tiles(oh, ow)
        y = np.einsum("ia,abntwc,jb->nctiwj", WINOGRAD_AT, m.astype(np.float32).reshape(4, 4, n, th, tw, co),
                      WINOGRAD_AT).reshape(n, co, 2 * th, 2 * tw)[:, :, :oh, :ow]
        if bias is not None:
            y = y + bias.astype(np.float32)[None, :, None, None]
        return [np.ascontiguousarray(y, np.float32)]


@defop("im2col", "x", {"kernel": Attr("ints"), "strides": Attr("ints", (1, 1)), "pads": Attr("ints", (0, 0, 0, 0)),
                       "dilations": Attr("ints", (1, 1))})
class Im2col:
    """x[N, C, H, W] -> cols[N, C*KH*KW, OH*OW]: cols[n, (c*KH + i)*KW + j, oh*OW + ow] =
    x[n, c, oh*sh + i*dh - pads[0], ow*sw + j*dw - pads[1]] (0 outside x), the patches of
    conv2d with these attributes, so that conv2d is w.reshape(C_out, C*KH*KW) @ cols."""

    KIND = "window"

    @staticmethod
    def infer(x, *, kernel, strides, pads, dilations):
        _dtypes(x, dt.FLOATS)
        _need(x.rank == 4, f"im2col needs a 4-D NCHW x, got {x.shape}")
        _check2("kernel", kernel), _check2("strides", strides), _check2("dilations", dilations)
        _check2("pads", pads, 4)
        _need(min(kernel) >= 1 and min(strides) >= 1 and min(dilations) >= 1 and min(pads) >= 0,
              "im2col: kernel, strides and dilations must be >= 1, pads >= 0")
        n, c, h, w = x.shape
        oh = _pool_out(h, kernel[0], strides[0], pads[0], pads[2], dilations[0])
        ow = _pool_out(w, kernel[1], strides[1], pads[1], pads[3], dilations[1])
        return [TensorType(x.dtype, (n, c * kernel[0] * kernel[1], oh * ow))]

    @staticmethod
    def reference(x, *, kernel, strides, pads, dilations):
        n, c, h, w = x.shape
        kh, kw = kernel
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        oh = _pool_out(h, kh, strides[0], pads[0], pads[2], dilations[0])
        ow = _pool_out(w, kw, strides[1], pads[1], pads[3], dilations[1])
        ih = (np.arange(oh) * strides[0])[:, None] + np.arange(kh) * dilations[0]
        iw = (np.arange(ow) * strides[1])[:, None] + np.arange(kw) * dilations[1]
        patches = xp[:, :, ih[:, None, :, None], iw[None, :, None, :]]          # n c oh ow kh kw
        return [np.ascontiguousarray(patches.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow))]


# int8 convolution: activations quantized once into a zero-padded layout of channel
# quads (conv_input_q), then integer dot products per output (conv2d_q).  The quad
# layout puts 4 channels of a pixel in one 32-bit word: x86's vpmaddubsw / vpmaddwd
# take them as one lane.
QUAD = 4


def quantize_act(x, act_scale: float, lowest: int = -127) -> np.ndarray:
    """int8 codes of f32 activations with one static scale d = f32(act_scale):
    clip(round-half-even(x / d), lowest, 127) (saturating, +-inf too), NaN -> 0."""
    q = np.rint(np.asarray(x, np.float32) / np.float32(act_scale))
    return np.where(np.isnan(q), 0, np.clip(q, lowest, 127)).astype(np.int8)


@defop("conv_input_q", "x", {"act_scale": Attr("float"), "pads": Attr("ints", (0, 0, 0, 0)),
                             "unsigned": Attr("bool", False)})
class ConvInputQ:
    """x[N, C, H, W] f32 -> xq[N, ceil(C/4), pads[0] + H + pads[2], pads[1] + W + pads[3], 4] i8:
    xq[n, c // 4, pads[0] + h, pads[1] + w, c % 4] = quantize_act(x[n, c, h, w], act_scale),
    0 in the padding and for the channels past C (what conv2d_q reads).  ``unsigned``:
    codes clipped to [0, 127] instead of [-127, 127] (the quantize pass sets it where x
    is never negative, after a relu: then the codes are the same)."""

    KIND = "window"

    @staticmethod
    def infer(x, *, act_scale, pads, unsigned=False):
        _dtypes(x, (dt.f32,))
        _need(x.rank == 4, f"conv_input_q needs a 4-D NCHW x, got {x.shape}")
        _check2("pads", pads, 4)
        _need(min(pads) >= 0, f"conv_input_q: pads {pads} must be >= 0")
        _need(0 < act_scale <= F32_MAX and np.float32(act_scale) > 0,
              f"conv_input_q: act_scale={act_scale!r} must be a positive finite f32 scale")
        n, c, h, w = x.shape
        return [TensorType(dt.i8, (n, -(-c // QUAD), pads[0] + h + pads[2], pads[1] + w + pads[3], QUAD))]

    @staticmethod
    def reference(x, *, act_scale, pads, unsigned=False):
        n, c, h, w = x.shape
        out = np.zeros((n, -(-c // QUAD) * QUAD, pads[0] + h + pads[2], pads[1] + w + pads[3]), np.int8)
        out[:, :c, pads[0]:pads[0] + h, pads[1]:pads[1] + w] = quantize_act(x, act_scale, 0 if unsigned else -127)
        return [np.ascontiguousarray(out.reshape(n, -1, QUAD, *out.shape[2:]).transpose(0, 1, 3, 4, 2))]


@defop("conv2d_q", "xq q scales bias", {"strides": Attr("ints", (1, 1)), "dilations": Attr("ints", (1, 1)),
                                        "act_scale": Attr("float"), "unsigned": Attr("bool", False)}, optional=1)
class Conv2dQ:
    """int8 conv2d (groups 1) over conv_input_q's padded quads: xq [N, C4, HP, WP, 4] i8,
    q [C_out, C4, KH, KW, 4] i8 (w[co, 4*c4 + j, kh, kw] = q[co, c4, kh, kw, j] *
    scales[co]; 0 past C_in), scales f32 [C_out]:
    acc[n, co, oh, ow] = sum over (c4, kh, kw, j) of xq[n, c4, oh*sh + kh*dh, ow*sw + kw*dw, j]
    * q[co, c4, kh, kw, j] (exact, i32), y = f32(acc) * (f32(act_scale) * scales[co]) + bias[co]
    in f32, each operation rounded once (in that order: the kernels match bit for bit).
    ``unsigned``: negative codes of xq read as 0 (conv_input_q {unsigned} makes none): x86
    then multiplies the codes (0 .. 127) by q directly, without vpsignb."""

    KIND = "window"

    @staticmethod
    def infer(xq, q, scales, bias=None, *, strides, dilations, act_scale, unsigned=False):
        _dtypes(xq, (dt.i8,), "xq")
        _dtypes(q, (dt.i8,), "q")
        _need(xq.rank == 5 and q.rank == 5 and xq.shape[4] == QUAD and q.shape[4] == QUAD,
              f"conv2d_q needs xq [N, C4, HP, WP, 4] and q [C_out, C4, KH, KW, 4], got {xq.shape} and {q.shape}")
        _check2("strides", strides), _check2("dilations", dilations)
        _need(min(strides) >= 1 and min(dilations) >= 1, "conv2d_q: strides and dilations must be >= 1")
        _need(xq.shape[1] == q.shape[1], f"conv2d_q: xq has {xq.shape[1]} channel quads, q {q.shape[1]}")
        co = q.shape[0]
        _need(scales.dtype == dt.f32 and scales.shape == (co,), f"conv2d_q: scales {scales} must be f32 ({co},)")
        if bias is not None:
            _need(bias.dtype == dt.f32 and bias.shape == (co,), f"conv2d_q: bias {bias} must be f32 ({co},)")
        _need(0 < act_scale <= F32_MAX and np.float32(act_scale) > 0,
              f"conv2d_q: act_scale={act_scale!r} must be a positive finite f32 scale")
        taps = q.shape[1] * QUAD * q.shape[2] * q.shape[3]
        _need(taps * 128 * 128 < 2 ** 31, f"conv2d_q: {taps} products per output could overflow the i32 sum")
        oh = _pool_out(xq.shape[2], q.shape[2], strides[0], 0, 0, dilations[0])
        ow = _pool_out(xq.shape[3], q.shape[3], strides[1], 0, 0, dilations[1])
        return [TensorType(dt.f32, (xq.shape[0], co, oh, ow))]

    @staticmethod
    def reference(xq, q, scales, bias=None, *, strides, dilations, act_scale, unsigned=False):
        n, c4, hp, wp, _ = xq.shape
        xq = np.maximum(xq, 0) if unsigned else xq
        co, _, kh, kw, _ = q.shape
        oh = (hp - dilations[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (wp - dilations[1] * (kw - 1) - 1) // strides[1] + 1
        ih = (np.arange(oh) * strides[0])[:, None] + np.arange(kh) * dilations[0]
        iw = (np.arange(ow) * strides[1])[:, None] + np.arange(kw) * dilations[1]
        # f64 sums are exact (integers below 2^31 < 2^53) and run through BLAS, unlike int64 einsum
        patches = xq.astype(np.float64)[:, :, ih[:, None, :, None], iw[None, :, None, :], :]  # n c4 oh ow kh kw j
        acc = np.einsum("ncyxijq,ocijq->noyx", patches, q.astype(np.float64), optimize=True).astype(np.int64)
        step = np.float32(act_scale) * scales.astype(np.float32)
        y = acc.astype(np.int32).astype(np.float32) * step[None, :, None, None]
        if bias is not None:
            y = y + bias.astype(np.float32)[None, :, None, None]
        return [y.astype(np.float32)]


_POOL_ATTRS = {"kernel": Attr("ints"), "strides": Attr("ints", (1, 1)), "pads": Attr("ints", (0, 0, 0, 0)),
               "ceil_mode": Attr("bool", False)}


def _pool_infer(x, kernel, strides, pads, ceil_mode, dilations=(1, 1)):
    _dtypes(x, dt.FLOATS)
    _need(x.rank == 4, f"pooling needs a 4-D NCHW input, got {x.shape}")
    _check2("kernel", kernel), _check2("strides", strides), _check2("pads", pads, 4)
    _need(min(kernel) >= 1 and min(strides) >= 1 and min(pads) >= 0, "pool: kernel and strides must be >= 1, pads >= 0")
    _need(pads[0] < kernel[0] and pads[1] < kernel[1] and pads[2] < kernel[0] and pads[3] < kernel[1],
          f"pool: pads {pads} must be smaller than the kernel {kernel}")
    n, c, h, w = x.shape
    return (n, c, _pool_out(h, kernel[0], strides[0], pads[0], pads[2], dilations[0], ceil_mode),
            _pool_out(w, kernel[1], strides[1], pads[1], pads[3], dilations[1], ceil_mode))


def _windows(x, kernel, strides, pads, ceil_mode, fill, dilations=(1, 1)):
    """[n, c, oh, ow, kh, kw] windows of x padded with ``fill`` (also past the
    end for ceil_mode), and the mask of real (unpadded) elements."""
    n, c, oh, ow = _pool_infer(TensorType(dt.dtype(x.dtype), x.shape), kernel, strides, pads, ceil_mode, dilations)
    h, w = x.shape[2:]
    ih = (np.arange(oh) * strides[0])[:, None] + np.arange(kernel[0]) * dilations[0]
    iw = (np.arange(ow) * strides[1])[:, None] + np.arange(kernel[1]) * dilations[1]
    eh = max(int(ih.max()) + 1 - (h + pads[0]), pads[2]) if oh else pads[2]
    ew = max(int(iw.max()) + 1 - (w + pads[1]), pads[3]) if ow else pads[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], eh), (pads[1], ew)), constant_values=fill)
    real = np.pad(np.ones((h, w), bool), ((pads[0], eh), (pads[1], ew)))
    inside = np.pad(np.ones((h + pads[0] + pads[2], w + pads[1] + pads[3]), bool),
                    ((0, eh - pads[2]), (0, ew - pads[3])))
    sel = (ih[:, None, :, None], iw[None, :, None, :])
    return xp[:, :, sel[0], sel[1]], real[sel], inside[sel]


@defop("maxpool2d", "x", dict(_POOL_ATTRS, dilations=Attr("ints", (1, 1))))
class MaxPool2d:
    """Max over windows (padding never wins)."""

    KIND = "window"

    @staticmethod
    def infer(x, kernel, strides, pads, ceil_mode, dilations):
        _check2("dilations", dilations)
        return [TensorType(x.dtype, _pool_infer(x, kernel, strides, pads, ceil_mode, dilations))]

    @staticmethod
    def reference(x, kernel, strides, pads, ceil_mode, dilations):
        win, _, _ = _windows(x.astype(np.float32), kernel, strides, pads, ceil_mode, -np.inf, dilations)
        return [win.max(axis=(4, 5)).astype(x.dtype)]


@defop("avgpool2d", "x", dict(_POOL_ATTRS, count_include_pad=Attr("bool", False)))
class AvgPool2d:
    """Mean over windows; count_include_pad counts explicit padding (never the
    extra ceil_mode overhang) in the divisor."""

    KIND = "window"

    @staticmethod
    def infer(x, kernel, strides, pads, ceil_mode, count_include_pad):
        return [TensorType(x.dtype, _pool_infer(x, kernel, strides, pads, ceil_mode))]

    @staticmethod
    def reference(x, kernel, strides, pads, ceil_mode, count_include_pad):
        win, real, inside = _windows(x.astype(np.float32), kernel, strides, pads, ceil_mode, 0.0)
        count = (inside if count_include_pad else real).sum(axis=(2, 3)).astype(np.float32)
        return [(win.sum(axis=(4, 5)) / count).astype(x.dtype)]


@defop("global_avgpool", "x")
class GlobalAvgPool:
    """Mean over H and W: [N, C, H, W] -> [N, C, 1, 1]."""

    KIND = "window"

    @staticmethod
    def infer(x):
        _dtypes(x, dt.FLOATS)
        _need(x.rank == 4 and x.shape[2] * x.shape[3] > 0, f"global_avgpool needs a non-empty 4-D NCHW input, got {x.shape}")
        return [TensorType(x.dtype, x.shape[:2] + (1, 1))]

    @staticmethod
    def reference(x):
        return [x.astype(np.float32).mean(axis=(2, 3), keepdims=True).astype(x.dtype)]


# --- LLM decoding -------------------------------------------------------------------------

def rope_positions(pos: np.ndarray, t: int) -> np.ndarray:
    """Position of each of ``t`` tokens: pos[i] for a pos of t entries, else
    pos + i (pos a start position of shape () or (1,))."""
    p = np.asarray(pos).astype(np.int64).reshape(-1)
    return p if p.size == t and t != 1 else p[0] + np.arange(t, dtype=np.int64)


def rope_inv_freq(d: int, theta: float) -> np.ndarray:
    """theta ** (-2i / d) for i < d/2, computed in f64 and rounded to f32."""
    return (float(theta) ** (-np.arange(d // 2, dtype=np.float64) * 2.0 / d)).astype(np.float32)


def rope_pairs(d: int, style: str) -> tuple[np.ndarray, np.ndarray]:
    """Element indices (first, second) of each rotated pair i < d/2."""
    i = np.arange(d // 2)
    return (i, i + d // 2) if style == "half" else (2 * i, 2 * i + 1)


@defop("rope", "x pos inv_freq", {"theta": Attr("float", 10000.0), "style": Attr("str", "half")}, optional=1)
class Rope:
    """Rotary position embedding of x[..., T, H, D] (or x[T, D]: one head) at
    integer positions: pos of shape () or (1,) is the start (token t is at
    pos + t), pos of shape (T,) gives each token's position (T > 1).  For pair
    i < D/2 with angle a = f32(p) * f32(theta ** (-2i/D)) (one f32 product):
    y1 = x1 cos a - x2 sin a, y2 = x2 cos a + x1 sin a, in f32.
    style="half" (Llama, HF rotate_half): the pair is (i, i + D/2);
    style="interleaved" (GPT-J): (2i, 2i + 1).  D must be even.
    ``inv_freq`` (optional, f32[D/2]) replaces theta ** (-2i/D) for frequencies
    a model computes otherwise (Llama 3's rope scaling); theta is then unused."""

    KIND = "composite"

    @staticmethod
    def infer(x, pos, inv_freq=None, *, theta, style):
        _dtypes(x, dt.FLOATS, "x")
        _dtypes(pos, (dt.i64, dt.i32), "pos")
        _need(style in ("half", "interleaved"), f'rope style must be "half" or "interleaved", got {style!r}')
        _need(x.rank >= 2, f"rope needs x of shape [..., T, H, D] or [T, D], got {x.shape}")
        _need(x.shape[-1] % 2 == 0, f"rope needs an even head dim D, got {x.shape[-1]}")
        _need(theta > 0, f"rope theta must be positive, got {theta}")
        t = x.shape[-2] if x.rank == 2 else x.shape[-3]
        _need(pos.shape in ((), (1,), (t,)), f"rope pos must have shape (), (1,) or (T,) = ({t},), got {pos.shape}")
        if inv_freq is not None:
            _need(inv_freq.dtype is dt.f32 and inv_freq.shape == (x.shape[-1] // 2,),
                  f"rope inv_freq must be f32[{x.shape[-1] // 2}] (D/2), got {inv_freq}")
        return [x]

    @staticmethod
    def reference(x, pos, inv_freq=None, *, theta, style):
        d = x.shape[-1]
        xs = x.reshape(x.shape[:-1] + (1, d)) if x.ndim == 2 else x  # [T, D] -> [T, 1, D]
        t = xs.shape[-3]
        inv = rope_inv_freq(d, theta) if inv_freq is None else np.asarray(inv_freq, np.float32)
        ang = rope_positions(pos, t).astype(np.float32)[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]   # [T, 1, D/2]
        i1, i2 = rope_pairs(d, style)
        y = xs.astype(np.float32)
        out = np.empty_like(y)
        x1, x2 = y[..., i1], y[..., i2]
        out[..., i1] = x1 * c - x2 * s
        out[..., i2] = x2 * c + x1 * s
        return [out.reshape(x.shape).astype(x.dtype)]


@defop("swiglu", "gate up")
class SwiGLU:
    """silu(gate) * up = gate * sigmoid(gate) * up elementwise (same shapes), in f32."""

    KIND = "composite"

    @staticmethod
    def infer(gate, up):
        d = _same_dtype([gate, up])
        _dtypes(gate, dt.FLOATS)
        _need(gate.shape == up.shape, f"swiglu: gate {gate.shape} and up {up.shape} must have one shape")
        return [TensorType(d, gate.shape)]

    @staticmethod
    def reference(gate, up):
        g = gate.astype(np.float32)
        return [(g * sigmoid(g) * up.astype(np.float32)).astype(gate.dtype)]


def topk_order(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row of x (last axis), largest
    first; equal values: lower index first; NaN ranks above every number."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).astype(np.float32)
    out = np.empty((rows.shape[0], k), np.int64)
    for r, row in enumerate(rows):
        nan = np.isnan(row)
        out[r] = np.lexsort((np.arange(n), -np.where(nan, 0, row), ~nan))[:k]
    return out.reshape(x.shape[:-1] + (k,))


@defop("topk", "x", {"k": Attr("int")})
class TopK:
    """(values, indices) of the k largest entries along the last axis, largest
    first; equal values keep the lower index first; NaN ranks above +inf (NaNs
    among themselves by index).  indices are i64; k <= the axis size."""

    KIND = "composite"

    @staticmethod
    def infer(x, k):
        _dtypes(x, dt.FLOATS, "x")
        _need(x.rank >= 1, "topk needs x of rank >= 1")
        _need(0 <= k <= x.shape[-1], f"topk: k={k} must lie in [0, {x.shape[-1]}] (the last axis of {x.shape})")
        shape = x.shape[:-1] + (k,)
        return [TensorType(x.dtype, shape), TensorType(dt.i64, shape)]

    @staticmethod
    def reference(x, k):
        idx = topk_order(x, k)
        return [np.take_along_axis(x, idx, axis=-1), idx]


def kv_quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 KV cache's rule for rows [..., D] (f32 values): one scale per
    row (a KV head at one position), ``quantize_rows_i8`` with group D: d =
    max|x| / 127, codes round-half-even(x / d) (f32 division), clamped to
    [-127, 127] (a subnormal d cannot push one past); d = 0 gives codes 0, a
    row with a NaN or +-inf gets d = NaN and codes 0.  Returns (codes i8
    [..., D], d f32 [...])."""
    lead, d = rows.shape[:-1], rows.shape[-1]
    xq, sc = quantize_rows_i8(rows.reshape(-1, d).astype(np.float32), d)
    return np.clip(xq, -127, 127).astype(np.int8).reshape(rows.shape), sc.reshape(lead)


def attention_spans(n: int, splits: int) -> list[tuple[int, int]]:
    """The rows [a, e) of each of ``splits`` parts of a query's n rows 0..n-1:
    length L = ceil(n / splits), part j = [j L, min(n, (j + 1) L)) (empty at
    the end when n < splits * L - L)."""
    ln = -(-n // splits)
    return [(min(n, j * ln), min(n, (j + 1) * ln)) for j in range(splits)]


@defop("attention_decode", "q k_new v_new k_cache v_cache pos k_scale v_scale",
       {"splits": Attr("int", 0), "window": Attr("int", 0)}, optional=2)
class AttentionDecode:
    """Causal attention of T new tokens over a KV cache: one decoding step
    (T = 1) or a prefill chunk.  q[Hq, D] (one token) or q[T, Hq, D];
    k_new, v_new [Hkv, D] or [T, Hkv, D] (as q); k_cache, v_cache [Hkv, S, D];
    pos i64 of shape () or (1,), the position of the first token.  Writes
    k_new/v_new at rows pos..pos+T-1 of the caches (results 1 and 2: the
    updated caches), then query head g of token i attends over rows
    0..pos+i of kv head g // (Hq/Hkv) (grouped-query attention, Llama's
    repeat_interleave order): out[i, g] = softmax(q[i, g] . k[t] / sqrt(D)) @ v[t],
    softmax stable (max subtracted), all in f32.  ``window`` = W >= 1: token
    i attends to the last W rows only, max(0, pos + i - W + 1)..pos + i
    (sliding-window attention, as llama.cpp's and transformers' masks: keys
    less than W positions back); 0: every row from 0.  The caches may have another
    float dtype than q, k_new, v_new (an f16 cache of f32 activations): the new
    rows are rounded to it on write and every row widened to f32 on read.

    An int8 cache (k_cache, v_cache i8) takes k_scale, v_scale f32[Hkv, S]:
    each new row (one KV head, one position) is quantized on write by
    ``kv_quantize`` (its own scale, stored at [h, pos]; results 3 and 4 are
    the updated scales), and read as code * scale: the score is
    f32(q . codes) * k_scale / sqrt(D) and out = sum_t (p_t * v_scale_t) * codes_t,
    up to f32 rounding of the sums.

    ``splits`` = N >= 1 (T = 1 only): result 0 is, instead of out, the
    partial softmax of each part of the rows (``attention_spans``):
    f32[Hq, N, D + 2] holding (m, l, acc[D]) with m the part's largest
    score, l = sum exp(s - m) and acc = sum exp(s - m) v (m = -inf, l = 0,
    acc = 0 for an empty part), which ``attention_merge`` combines: the N
    parts of a head run on different threads (flash-decoding); with a window
    the parts split its rows (``attention_spans`` of the window's length,
    offset by its first row).
    Rows outside [0, S) (pos < 0 or pos + T > S) are a run-time error.
    The compiled kernel updates the caches in place when the memory planner
    lets it (a state input, or an intermediate read last here; see
    compiler/memory.py) and copies them otherwise."""

    KIND = "composite"

    ALIASES = {1: 3, 2: 4, 3: 6, 4: 7}

    @staticmethod
    def infer(q, k_new, v_new, k_cache, v_cache, pos, k_scale=None, v_scale=None, *, splits, window):
        d = _same_dtype([q, k_new, v_new])
        _same_dtype([k_cache, v_cache])
        _dtypes(q, dt.FLOATS, "q")
        _dtypes(k_cache, dt.FLOATS + (dt.i8,), "k_cache")
        _dtypes(pos, (dt.i64, dt.i32), "pos")
        _need(pos.shape in ((), (1,)), f"attention_decode pos must have shape () or (1,), got {pos.shape}")
        _need(q.rank in (2, 3) and k_cache.rank == 3, f"attention_decode needs q[Hq, D] or q[T, Hq, D] and "
              f"k_cache[Hkv, S, D], got {q.shape} and {k_cache.shape}")
        hkv, s, dd = k_cache.shape
        hq = q.shape[-2]
        lead = q.shape[:-2]                    # () or (T,)
        _need(q.shape[-1] == dd and dd >= 1, f"attention_decode: q {q.shape} and k_cache {k_cache.shape} differ in D")
        _need(v_cache.shape == k_cache.shape, f"attention_decode: v_cache {v_cache.shape} != k_cache {k_cache.shape}")
        _need(k_new.shape == lead + (hkv, dd) and v_new.shape == lead + (hkv, dd),
              f"attention_decode: k_new {k_new.shape} and v_new {v_new.shape} must be {lead + (hkv, dd)}")
        _need(hkv >= 1 and s >= 1 and hq % hkv == 0,
              f"attention_decode: Hq={hq} must be a multiple of Hkv={hkv} (>= 1), and S={s} >= 1")
        _need(all(t <= s for t in lead), f"attention_decode: a chunk of {lead[0] if lead else 1} tokens does not "
              f"fit in the KV cache of length {s}")
        quant = k_cache.dtype is dt.i8
        _need(quant == (k_scale is not None and v_scale is not None),
              "attention_decode: an i8 cache takes k_scale and v_scale (f32[Hkv, S]), a float cache neither"
              f" (got {k_cache.dtype} caches and {sum(x is not None for x in (k_scale, v_scale))} scales)")
        if quant:
            for x, what in ((k_scale, "k_scale"), (v_scale, "v_scale")):
                _need(x.dtype is dt.f32 and x.shape == (hkv, s),
                      f"attention_decode: {what} must be f32[{hkv}, {s}] (Hkv, S), got {x}")
        _need(0 <= splits <= s and (splits == 0 or not lead),
              f"attention_decode: splits={splits} must lie in [0, S={s}], and be 0 for a chunk of tokens")
        _need(window >= 0, f"attention_decode: window={window} must be >= 0 (0: no window)")
        out = TensorType(dt.f32, (hq, splits, dd + 2)) if splits else TensorType(d, q.shape)
        return [out, k_cache, v_cache] + ([k_scale, v_scale] if quant else [])

    @staticmethod
    def reference(q, k_new, v_new, k_cache, v_cache, pos, k_scale=None, v_scale=None, *, splits, window):
        hkv, s, d = k_cache.shape
        t = 1 if q.ndim == 2 else q.shape[0]
        hq = q.shape[-2]
        p = int(np.asarray(pos).reshape(-1)[0])
        if t == 1 and not 0 <= p < s:
            raise IndexError(f"attention_decode: position {p} is outside the KV cache of length {s}")
        if not 0 <= p <= s - t:
            raise IndexError(f"attention_decode: positions {p}..{p + t - 1} are outside the KV cache of length {s}")
        kc, vc = k_cache.copy(), v_cache.copy()
        quant = k_cache.dtype == np.int8
        kn, vn = (x.reshape(t, hkv, d).transpose(1, 0, 2) for x in (k_new, v_new))
        if quant:
            ks, vs = k_scale.copy(), v_scale.copy()
            (kc[:, p:p + t], ks[:, p:p + t]), (vc[:, p:p + t], vs[:, p:p + t]) = kv_quantize(kn), kv_quantize(vn)
        else:
            kc[:, p:p + t], vc[:, p:p + t] = kn, vn          # rounded to the cache's dtype
            ks = vs = np.ones((hkv, s), np.float32)
        g = hq // hkv
        scale = np.float32(1.0 / math.sqrt(d))
        qs = q.reshape(t, hq, d).astype(np.float32)
        out = np.empty((t, hq, d), np.float32) if not splits else np.zeros((hq, splits, d + 2), np.float32)
        for i in range(t):
            for h in range(hq):
                kv, n = h // g, p + i + 1
                lo = max(0, n - window) if window else 0   # rows lo..n-1
                sc = ((kc[kv, lo:n].astype(np.float32) @ qs[i, h]) * ks[kv, lo:n]) * scale   # ks = 1: a float cache
                if splits:
                    for j, (a, e) in enumerate(attention_spans(n - lo, splits)):
                        if a == e:
                            out[h, j, 0] = -np.inf
                            continue
                        m = sc[a:e].max()
                        ex = np.exp(sc[a:e] - m)
                        out[h, j, 0], out[h, j, 1] = m, ex.sum()
                        out[h, j, 2:] = (ex * vs[kv, lo + a:lo + e]) @ vc[kv, lo + a:lo + e].astype(np.float32)
                    continue
                e = np.exp(sc - sc.max())
                out[i, h] = (e / e.sum() * vs[kv, lo:n]) @ vc[kv, lo:n].astype(np.float32)
        res = out if splits else out.reshape(q.shape).astype(q.dtype)
        return [res, kc, vc] + ([ks, vs] if quant else [])


@defop("attention_merge", "parts", {"dtype": Attr("str", "f32")})
class AttentionMerge:
    """out[Hq, D] of ``attention_decode {splits=N}``'s partial softmaxes
    parts[Hq, N, D + 2] = (m_j, l_j, acc_j): with M = max_j m_j,
    out = sum_j exp(m_j - M) acc_j / sum_j exp(m_j - M) l_j (empty parts, m =
    -inf, add nothing), in f32, stored as ``dtype`` (q's dtype)."""

    KIND = "composite"

    @staticmethod
    def infer(parts, *, dtype):
        _dtypes(parts, (dt.f32,), "parts")
        _need(parts.rank == 3 and parts.shape[1] >= 1 and parts.shape[2] >= 3,
              f"attention_merge needs parts[Hq, N, D + 2] (N >= 1, D >= 1), got {parts.shape}")
        _need(dtype in ("f32", "f16"), f'attention_merge dtype must be "f32" or "f16", got {dtype!r}')
        return [TensorType(dt.BY_NAME[dtype], (parts.shape[0], parts.shape[2] - 2))]

    @staticmethod
    def reference(parts, *, dtype):
        m, l, acc = parts[:, :, :1], parts[:, :, 1:2], parts[:, :, 2:]
        mx = m.max(axis=1, keepdims=True)
        w = np.exp(m - mx)                                       # [Hq, N, 1]; empty parts: 0
        out = (w * acc).sum(axis=1) / (w * l).sum(axis=1)
        return [out.astype(dt.BY_NAME[dtype].np_dtype)]


def moe_route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(expert ids [N, k], weights [N, k] f32) of router logits [N, E]: the top k
    (``topk_order``), weighted by the softmax over the chosen k logits, which
    equals softmax over all E renormalized over the chosen k."""
    ids = topk_order(logits, k)
    chosen = np.take_along_axis(logits.astype(np.float32), ids, axis=-1)
    e = np.exp(chosen - chosen[:, :1])
    return ids, (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@defop("moe", "x router_w w1 w3 w2", {"k": Attr("int")})
class MoE:
    """Mixture of SwiGLU experts.  x[N, H], router_w[H, E], w1/w3 [E, H, F],
    w2[E, F, H]: per row of x, logits = x @ router_w, the k experts of the
    largest logits (``moe_route``: ties to the lower id, weights softmax over
    the chosen k), y = sum_i w_i * (silu(x @ w1[e_i]) * (x @ w3[e_i])) @ w2[e_i],
    in f32.  The kernel reads only the chosen experts' weights (it branches on
    the ids at run time).  1 <= k <= E."""

    KIND = "composite"

    @staticmethod
    def infer(x, router_w, w1, w3, w2, k):
        _same_dtype([x, router_w, w1, w3, w2])
        _dtypes(x, dt.FLOATS, "x")
        _need(x.rank == 2 and router_w.rank == 2 and w1.rank == 3,
              f"moe needs x[N, H], router_w[H, E], w1[E, H, F], got {x.shape}, {router_w.shape}, {w1.shape}")
        n, h = x.shape
        e, f = router_w.shape[1], w1.shape[2]
        _need(router_w.shape[0] == h, f"moe: router_w {router_w.shape} must be ({h}, E)")
        _need(w1.shape == (e, h, f) and w3.shape == (e, h, f) and w2.shape == (e, f, h),
              f"moe: w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} must be ({e}, {h}, F), ({e}, {h}, F), ({e}, F, {h})")
        _need(1 <= k <= e, f"moe: k={k} must lie in [1, {e}] (the number of experts)")
        return [x]

    @staticmethod
    def reference(x, router_w, w1, w3, w2, k):
        xf = x.astype(np.float32)
        ids, wts = moe_route(xf @ router_w.astype(np.float32), k)
        y = np.zeros(xf.shape, np.float32)
        for r in range(x.shape[0]):
            for e, w in zip(ids[r], wts[r]):
                g = xf[r] @ w1[e].astype(np.float32)
                a = g * sigmoid(g) * (xf[r] @ w3[e].astype(np.float32))
                y[r] += w * (a @ w2[e].astype(np.float32))
        return [y.astype(x.dtype)]


def used_rows(a: np.ndarray) -> np.ndarray:
    """Rows k of b that ``matmul_sparse_input`` reads: a[..., k] != 0 in some row of a."""
    return (a.reshape(-1, a.shape[-1]) != 0).any(axis=0) if a.size else np.zeros(a.shape[-1], bool)


@defop("matmul_sparse_input", "a b")
class MatMulSparseInput:
    """a[..., M, K] @ b[K, N] (b 2-D) by a kernel that skips the rows of b whose
    entry of a is zero in every row of a: activation sparsity after ReLU (chosen
    by the ``sparse_activations`` pass).  Equal to matmul, except that a skipped
    row is never read: a non-finite b[k] there adds 0, not NaN."""

    KIND = "contraction"

    @staticmethod
    def infer(a, b):
        d = _same_dtype([a, b])
        _dtypes(a, dt.FLOATS)
        _need(a.rank >= 2 and b.rank == 2, f"matmul_sparse_input needs a[..., M, K] and a 2-D b, got {a.shape} "
                                           f"and {b.shape}")
        _need(a.shape[-1] == b.shape[0], f"matmul_sparse_input inner dimensions differ: {a.shape} @ {b.shape}")
        return [TensorType(d, a.shape[:-1] + (b.shape[1],))]

    @staticmethod
    def reference(a, b):
        bf = np.where(used_rows(a)[:, None], b.astype(np.float32), np.float32(0))
        return [np.matmul(a.astype(np.float32), bf).astype(a.dtype)]


# --- fusion -------------------------------------------------------------------------------

@defop("fused", "xs*", {"body": Attr("graph")})
class Fused:
    """One kernel computing the sub-graph ``body`` (made by the ``fuse`` pass):
    the inputs bind to body's inputs in order, the results are body's outputs.
    The body holds no constants (they stay inputs of the fused node), so the
    side table of the text form stays flat."""

    KIND = "composite"

    @staticmethod
    def infer(*xs, body):
        from .verify import verify  # verify imports this module

        _need(len(xs) == len(body.inputs),
              f"fused: {len(xs)} inputs for a body @{body.name} of {len(body.inputs)} inputs")
        for i, (t, v) in enumerate(zip(xs, body.inputs)):
            _need(t == v.type, f"fused: input {i} is {t}, body @{body.name} takes %{v.name}: {v.type}")
        _need(all(n.op != "const" for n in body.nodes),
              f"fused: body @{body.name} holds a constant; pass it as an input of the fused node")
        verify(body)
        return [v.type for v in body.outputs]

    @staticmethod
    def reference(*xs, body):
        from .reference import run_reference  # reference imports this module

        return run_reference(body, {v.name: x for v, x in zip(body.inputs, xs)})
