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
from .graph import IRError, TensorType
from .sparsity import parse_format

REQUIRED = object()
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dtype", "array")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED

    def normalize(self, name: str, value: Any) -> Any:
        """Coerce ``value`` to the canonical Python form of this kind."""
        try:
            if self.kind == "int":
                if isinstance(value, bool) or int(value) != value:
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
                if any(isinstance(v, bool) or int(v) != v for v in vals):
                    raise ValueError
                return tuple(int(v) for v in vals)
            if self.kind == "floats":
                return tuple(float(v) for v in value)
            if self.kind == "dtype":
                return dt.dtype(value)
            if self.kind == "array":
                return np.asarray(value)
        except (TypeError, ValueError):
            pass
        raise IRError(f"attribute {name!r} must be {self.kind}, got {value!r}")


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


def defop(name: str, inputs: str, attrs: dict[str, Attr] | None = None, optional: int = 0):
    """Register a class with ``infer`` and ``reference`` functions as op ``name``."""

    def wrap(cls):
        OPS[name] = OpDef(name, tuple(inputs.split()), optional, attrs or {},
                          cls.infer, cls.reference, (cls.__doc__ or "").strip())
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
    "max": (dt.NUMERIC, np.maximum),
    "min": (dt.NUMERIC, np.minimum),
}


def _def_unary(name, allowed, fn):
    class Unary:
        __doc__ = f"elementwise {name}"

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


@defop("gelu", "x", {"approximate": Attr("str", "none")})
class Gelu:
    """GELU; approximate="none" (erf form) or "tanh"."""

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


def dequantize_weight(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int) -> np.ndarray:
    """f32 weights of a group-quantized [K, N] matrix: (q - zero) * scale, where
    rows k of group k // group share one scale (and zero point) per column."""
    idx = np.arange(q.shape[0]) // group
    w = q.astype(np.float32)
    if zeros is not None:
        w = w - zeros.astype(np.float32)[idx]
    return w * scales.astype(np.float32)[idx]


ACTIVATION_MODES = ("none", "int8")


def quantize_rows_i8(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic int8 quantization of x[R, K] (f32) per row and group of K (a
    shorter last group when group does not divide K): d = max|x_group| / 127 and
    xq = round-half-even(x / d) in [-127, 127], all in f32; a group with d = 0
    gets xq = 0.  Returns (xq int32 [R, K], d f32 [R, groups])."""
    r, k = x.shape
    groups = -(-k // group)
    xp = np.zeros((r, groups * group), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(r, groups, group)
    d = np.abs(xb).max(axis=2) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        xq = np.where(d[..., None] > 0, np.round(xb / d[..., None]), np.float32(0))
    return xq.astype(np.int32).reshape(r, groups * group)[:, :k], d.astype(np.float32)


def matmul_q_i8act(x: np.ndarray, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                   group: int) -> np.ndarray:
    """matmul_q {activations=int8} on x[R, K]: per row and group g,
    dot_g = sum_k xq * (q - zero) exactly (integers), and y = sum_g (d_g *
    scale_g) * dot_g accumulated in f32 over g in order.  Returns f32 [R, N]."""
    r, k = x.shape
    n = q.shape[1]
    groups = -(-k // group)
    xq, d = quantize_rows_i8(x.astype(np.float32), group)
    w = q.astype(np.int64)
    if zeros is not None:
        w = w - zeros.astype(np.int64)[np.arange(k) // group]
    y = np.zeros((r, n), np.float32)
    for g in range(groups):
        ks = slice(g * group, min(k, (g + 1) * group))
        dot = (xq[:, ks].astype(np.int64) @ w[ks]).astype(np.float32)
        coef = d[:, g:g + 1] * scales[g].astype(np.float32)[None, :]   # f32 products
        y = (y + coef * dot).astype(np.float32)
    return y


@defop("matmul_q", "x q scales zeros",
       {"group": Attr("int"), "activations": Attr("str", "none"), "sparse": Attr("str", "dense")}, optional=1)
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
    "none" (activation rounding), chosen explicitly.

    ``sparse`` (ir/sparsity.py): how the kernel stores q's nonzeros; a
    non-dense format needs symmetric weights (no zeros), activations="none",
    and for i8 per-channel scales (group >= K)."""

    @staticmethod
    def infer(x, q, scales, zeros=None, *, group, activations="none", sparse="dense"):
        _dtypes(x, dt.FLOATS, "x")
        _dtypes(q, (dt.i8, dt.i4), "q")
        _dtypes(scales, dt.FLOATS, "scales")
        _need(activations in ACTIVATION_MODES,
              f"matmul_q activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
        _need(x.rank >= 2 and q.rank == 2, f"matmul_q needs x of rank >= 2 and a 2-D q, got {x.shape} and {q.shape}")
        k, n = q.shape
        _need(x.shape[-1] == k, f"matmul_q inner dimensions differ: x {x.shape} @ q {q.shape}")
        _need(group >= 1, f"matmul_q group must be >= 1, got {group}")
        groups = -(-k // group)
        _need(scales.shape == (groups, n), f"matmul_q scales shape {scales.shape} must be ({groups}, {n}) "
              f"for K={k}, group={group}")
        if zeros is not None:
            _need(zeros.dtype == q.dtype and zeros.shape == scales.shape,
                  f"matmul_q zeros must be {q.dtype}{list(scales.shape)}, got {zeros}")
        _sparse_weight("matmul_q", sparse, q)
        if sparse != "dense":
            _need(zeros is None and activations == "none",
                  f"matmul_q with sparse={sparse} needs symmetric weights (no zeros) and activations=none")
            _need(q.dtype is dt.i4 or group >= k,
                  f"matmul_q with sparse={sparse} and i8 weights needs per-channel scales (group >= K={k}), "
                  f"got group={group}")
        return [TensorType(x.dtype, x.shape[:-1] + (n,))]

    @staticmethod
    def reference(x, q, scales, zeros=None, *, group, activations="none", sparse="dense"):
        if activations == "int8":
            k, n = q.shape
            y = matmul_q_i8act(x.reshape(int(np.prod(x.shape[:-1])), k), q, scales, zeros, group)
            return [y.reshape(x.shape[:-1] + (n,)).astype(x.dtype)]
        w = dequantize_weight(q, scales, zeros, group)
        return [np.matmul(x.astype(np.float32), w).astype(x.dtype)]


# --- normalizations -------------------------------------------------------------

@defop("softmax", "x", {"axis": Attr("int", -1)})
class Softmax:
    """softmax along one axis."""

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


@defop("cast", "x", {"to": Attr("dtype")})
class Cast:
    """Convert dtype (floats to ints truncate toward zero; to bool: x != 0)."""

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

    @staticmethod
    def infer(x):
        _dtypes(x, dt.FLOATS)
        _need(x.rank == 4 and x.shape[2] * x.shape[3] > 0, f"global_avgpool needs a non-empty 4-D NCHW input, got {x.shape}")
        return [TensorType(x.dtype, x.shape[:2] + (1, 1))]

    @staticmethod
    def reference(x):
        return [x.astype(np.float32).mean(axis=(2, 3), keepdims=True).astype(x.dtype)]
