"""ONNX import: ``from_onnx(path_or_model, input_shapes=None) -> sqk.Graph``.

Every ONNX tensor becomes either a numpy array known at import time or a
graph Value.  Converters emit IR ops through ``_Importer.op``, which runs an
op whose inputs are all known through its numpy reference (ir/ops.py)
instead of emitting it: shape subgraphs (Shape -> Gather -> Concat ->
Reshape ...) and weight preprocessing fold to constants as they are read, and
ops that need a static operand (Reshape's shape, Slice's starts, Pad's pads)
read it from there.  Shapes are static: symbolic dims come from
``input_shapes``.

Before converting, the whole model is checked: every op it uses that has no
converter (type, node name, opset) is listed in one OnnxImportError.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict

import numpy as np

from ...ir import dtypes as dt
from ...ir.builder import GraphBuilder
from ...ir.graph import Graph, IRError, TensorType, Value
from ...ir.ops import OPS, resolve_shape
from ..onnx_nbits import from_matmul_nbits

# The opsets the importer is written and tested against; newer model opsets are
# accepted when every op they use resolves to a definition the importer knows.
OPSET_MIN, OPSET_MAX = 13, 21
# sqk is installed from its checkout (it is not on a package index): onnx alone, or the extra
INSTALL_HINT = "pip install onnx (or, in the sqk checkout, pip install -e '.[onnx]')"

# ONNX TensorProto element types the IR has.
_DTYPES = {1: dt.f32, 2: dt.u8, 3: dt.i8, 6: dt.i32, 7: dt.i64, 9: dt.bool_, 10: dt.f16}
_DTYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
                9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
                15: "COMPLEX128", 16: "BFLOAT16", 22: "INT4", 21: "UINT4"}


class OnnxImportError(ValueError):
    """A model that cannot be imported: unsupported ops or dtypes, a malformed
    or truncated file, missing external data, or conflicting input shapes."""


class _NotSupported(OnnxImportError):
    """A feature of one node the importer lacks (collected: one error lists them all)."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(f"ONNX import needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def from_onnx(model, input_shapes: dict | None = None, input_values: dict | None = None,
              name: str | None = None) -> Graph:
    """Import an ONNX model (a path or an ``onnx.ModelProto``) as a verified sqk.Graph.

    ``input_shapes`` fixes dims the model leaves symbolic: ``{input_name:
    shape}`` for a whole input and/or ``{dim_param: size}`` for a named
    symbolic dim (e.g. ``{"batch": 1, "seq": 128}``).  A given shape that
    conflicts with the model's fixed dims is an error.  ``input_values``
    binds graph inputs to arrays, which makes them constants (needed for
    inputs that ops read at import time: a Reshape's shape, Slice's starts,
    ...; ``static_inputs(model)`` lists them).  Graph inputs and outputs keep
    their ONNX names, with characters the IR cannot print replaced by ``_``.
    Raises OnnxImportError (a ValueError)."""
    onnx = _onnx()
    m = _load(model, onnx)
    imp = _Importer(m, input_shapes or {}, onnx, input_values or {})
    return imp.run(name)


# Operands an op reads at import time (shapes, axes, pads, quantization parameters).
STATIC_OPERANDS = {
    "Reshape": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "Expand": (1,), "Split": (1,),
    "Pad": (1, 2, 3), "Resize": (1, 2, 3), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
    "Range": (0, 1, 2), "ConstantOfShape": (0,), "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2),
    "MatMulNBits": (1, 2, 3, 4, 5), "Sin": (0,), "Cos": (0,), "MatMulInteger": (1, 3),
}


def static_inputs(model) -> list[str]:
    """Names of the graph inputs that some op reads at import time, directly or
    through any computation (a static operand needs all its sources known;
    Shape and Size read only their input's static shape): ``from_onnx`` needs
    their values (``input_values``)."""
    onnx = _onnx()
    m = _load(model, onnx) if not isinstance(model, onnx.ModelProto) else model
    inits = {t.name for t in m.graph.initializer}
    names = [v.name for v in m.graph.input if v.name not in inits]
    producer = {o: n for n in m.graph.node for o in n.output}
    need, seen = set(), set()
    stack = [n.input[k] for n in m.graph.node for k in STATIC_OPERANDS.get(n.op_type, ())
             if k < len(n.input) and n.input[k]]
    while stack:
        src = stack.pop()
        if src in seen:
            continue
        seen.add(src)
        p = producer.get(src)
        if p is None:
            need.add(src)
        elif p.op_type not in ("Shape", "Size"):
            stack.extend(i for i in p.input if i)
    return [x for x in names if x in need]


def _load(model, onnx):
    """The ModelProto with external data loaded, checked by onnx.checker."""
    if isinstance(model, onnx.ModelProto):
        m, base = model, None
    else:
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise OnnxImportError(f"{path}: no such file")
        try:
            m = onnx.load(path, load_external_data=False)
        except Exception as e:  # protobuf DecodeError and friends
            raise OnnxImportError(f"{path}: not a readable ONNX model (malformed or truncated file): "
                                  f"{type(e).__name__}: {e}") from None
        base = os.path.dirname(os.path.abspath(path))
        _load_external(m, base, path, onnx)
    if not m.HasField("graph"):
        raise OnnxImportError("the ONNX model has no graph (malformed or truncated file?)")
    _check_strings(m)
    # The checker insists on a shape field in graph input/output types; an output without one
    # is common and harmless (sqk infers shapes), an input without one needs input_shapes.
    bare = [v.type.tensor_type for v in list(m.graph.input) + list(m.graph.output)
            if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
    for t in bare:
        t.shape.SetInParent()
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise OnnxImportError(f"invalid ONNX model: {str(e).strip().splitlines()[0] if str(e).strip() else e}") \
            from None
    finally:
        for t in bare:
            t.ClearField("shape")
    return m


def _check_strings(msg, where="model"):
    """Every string field valid UTF-8: protobuf hands one that is not over as bytes,
    which no name or message downstream expects."""
    for f, v in msg.ListFields():
        many = getattr(f, "is_repeated", None)
        many = f.label == 3 if many is None else many   # protobuf < 5: LABEL_REPEATED
        if f.type == f.TYPE_MESSAGE:
            for i, sub in enumerate(v if many else [v]):
                _check_strings(sub, f"{where}.{f.name}[{i}]" if many else f"{where}.{f.name}")
        elif f.type == f.TYPE_STRING and any(isinstance(x, bytes) for x in (v if many else [v])):
            raise OnnxImportError(f"malformed ONNX model: {where}.{f.name} is not valid UTF-8")


def _external_tensors(m):
    """Every tensor stored outside the file: initializers and tensor attributes,
    in subgraphs (If/Loop bodies) too, as onnx's loader walks them."""
    found, graphs = [], [m.graph]
    while graphs:
        g = graphs.pop()
        found += list(g.initializer)
        for n in g.node:
            for a in n.attribute:
                found += ([a.t] if a.HasField("t") else []) + list(a.tensors)
                graphs += ([a.g] if a.HasField("g") else []) + list(a.graphs)
    return [t for t in found if t.data_location == 1]  # TensorProto.EXTERNAL


def _load_external(m, base, path, onnx):
    """Check each external reference before any file is touched: a plain relative
    location inside the model's directory (no absolute path, no '..', no symlink out;
    refused without saying whether such a file exists) and integer offset/length; then
    that each file is there and long enough; then onnx loads them."""
    tensors = _external_tensors(m)
    refs, problems = [], []
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        where = f"tensor {t.name!r}: external data"
        loc = info.get("location", "")
        parts = loc.replace("\\", "/").split("/")
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in parts or "\0" in loc \
                or re.match(r"[A-Za-z]:", loc):
            raise OnnxImportError(f"{path}: {where} location {loc!r} is not a relative path inside the model's "
                                  f"directory")
        nums = {}
        for key in ("offset", "length"):
            v = info.get(key, "0")
            if not re.fullmatch(r"\d+", v.strip()):
                raise OnnxImportError(f"{path}: {where} {key} {v!r} is not a non-negative integer")
            nums[key] = int(v)
        refs.append((t, loc, nums["offset"] + nums["length"]))
    real_base = os.path.realpath(base)
    for t, loc, _ in refs:
        if os.path.commonpath([real_base, os.path.realpath(os.path.join(base, loc))]) != real_base:
            raise OnnxImportError(f"{path}: tensor {t.name!r}: external data location {loc!r} leads outside the "
                                  f"model's directory")
    for t, loc, need in refs:
        full = os.path.join(base, loc)
        if not os.path.isfile(full):
            problems.append(f"{loc!r} (tensor {t.name!r}) is missing")
        elif need > os.path.getsize(full):
            problems.append(f"{loc!r} (tensor {t.name!r}) is truncated: {os.path.getsize(full)} bytes, needs {need}")
    if problems:
        raise OnnxImportError(f"{path}: external data: " + "; ".join(problems))
    if not tensors:
        return
    try:
        onnx.external_data_helper.load_external_data_for_model(m, base)
    except Exception as e:
        raise OnnxImportError(f"{path}: cannot load external data: {e}") from None


_NAME_BAD = re.compile(r"[^A-Za-z0-9_.]")


def _c(a, dtype=None) -> np.ndarray:
    """A C-contiguous copy (np.ascontiguousarray would make 0-d arrays 1-d)."""
    return np.array(a, dtype=dtype, order="C")


def _ir_name(name: str) -> str:
    if isinstance(name, bytes):   # protobuf hands a string field that is not UTF-8 over as bytes
        name = name.decode("utf-8", "replace")
    return _NAME_BAD.sub("_", name) or "v"


class _Skip:
    """Marks a node whose result another converter already produced (fusion)."""

    def __init__(self, value):
        self.value = value


class _Importer:
    def __init__(self, model, input_shapes: dict, onnx, input_values: dict):
        self.onnx = onnx
        self.input_values = dict(input_values)
        self.m = model
        self.g = model.graph
        self.opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
        self.opset = self.opsets.get("", 0)
        self.input_shapes = dict(input_shapes)
        self.env: dict[str, object] = {}          # ONNX name -> np.ndarray | Value
        self.consts: dict[int, tuple] = {}        # id(array) -> (array, Value): materialized constants
        self.deq: dict[int, tuple] = {}           # id(float weight) -> (q, scales, zeros, group)
        self.const_names: dict[int, str] = {}     # id(known array) -> the ONNX initializer it comes from
        self.keep: list = []                      # named folded arrays, kept alive so their ids stay unique
        self.fused: dict[int, _Skip] = {}         # id(node) -> its precomputed result
        self.cse: dict[tuple, object] = {}         # (op, input keys, attrs) -> the Value emitted
        self.consumers: dict[str, list] = defaultdict(list)
        self.producer: dict[str, object] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
            for o in n.output:
                self.producer[o] = n
        self.graph_outputs = {o.name for o in self.g.output}

    # --- checks ------------------------------------------------------------------
    def _since(self, op, domain):
        try:
            return self.onnx.defs.get_schema(op, self.opsets.get(domain, 1), domain).since_version
        except Exception:
            return None

    def _since_at(self, op, opset=OPSET_MIN):
        try:
            return self.onnx.defs.get_schema(op, opset, "").since_version
        except Exception:
            return None

    def check_supported(self):
        problems = []
        for n in self.g.node:
            dom = n.domain if n.domain != "ai.onnx" else ""
            conv = _CONVERTERS.get((dom, n.op_type))
            where = f"{dom}::" if dom else ""
            ver = self.opsets.get(dom, "?")
            if conv is None:
                problems.append(f"{where}{n.op_type} (node {n.name!r}, opset {ver})")
            elif not dom and self.opset < OPSET_MIN and self._since(n.op_type, "") != self._since_at(n.op_type):
                # an older opset is fine where the op's definition is still the one of opset 13
                problems.append(f"{n.op_type} (node {n.name!r}, opset {ver}: its definition there predates "
                                f"opset {OPSET_MIN}; the importer supports opsets {OPSET_MIN} to {OPSET_MAX})")
        for t in self.g.initializer:
            if t.data_type not in _DTYPES:
                problems.append(f"initializer {t.name!r} of dtype {_DTYPE_NAMES.get(t.data_type, t.data_type)}")
        inits = {t.name for t in self.g.initializer}
        for v in self.g.input:
            et = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else None
            if v.name not in inits and et not in _DTYPES:
                what = _DTYPE_NAMES.get(et, et) if et is not None else "a non-tensor type"
                problems.append(f"input {v.name!r} of dtype {what}")
        if problems:
            raise OnnxImportError("unsupported ONNX model; sqk cannot import:\n  " + "\n  ".join(problems))

    # --- inputs ------------------------------------------------------------------
    def _inputs(self):
        inits = {t.name for t in self.g.initializer}
        graph_inputs = [v for v in self.g.input if v.name not in inits]
        known = {v.name for v in graph_inputs}
        params = set()
        for v in graph_inputs:
            for d in v.type.tensor_type.shape.dim:
                if d.HasField("dim_param"):
                    params.add(d.dim_param)
        unknown = [k for k in self.input_shapes if k not in known and k not in params]
        if unknown:
            raise OnnxImportError(f"input_shapes names {', '.join(map(repr, unknown))}: neither a model input "
                                  f"({', '.join(sorted(known)) or 'none'}) nor a symbolic dim "
                                  f"({', '.join(sorted(params)) or 'none'})")
        for k, v in list(self.input_shapes.items()):
            if k in params and k not in known and not np.isscalar(v):  # a symbolic dim given as (n,)
                if len(tuple(v)) != 1:
                    raise OnnxImportError(f"input_shapes[{k!r}]: a symbolic dim takes one size, got {v!r}")
                self.input_shapes[k] = int(tuple(v)[0])
        missing = []
        bad = [k for k in self.input_values if k not in known]
        if bad:
            raise OnnxImportError(f"input_values names {', '.join(map(repr, bad))}: not model inputs "
                                  f"({', '.join(sorted(known)) or 'none'})")
        for v in graph_inputs:
            tt = v.type.tensor_type
            dims = list(tt.shape.dim) if tt.HasField("shape") else None
            if v.name in self.input_values:
                arr = np.asarray(self.input_values[v.name])
                if tt.elem_type in _DTYPES and arr.dtype != _DTYPES[tt.elem_type].np_dtype:
                    raise OnnxImportError(f"input_values[{v.name!r}]: dtype {arr.dtype}, the model declares "
                                          f"{_DTYPES[tt.elem_type]}")
                if dims is not None and (len(dims) != arr.ndim or any(
                        d.HasField("dim_value") and d.dim_value != s for d, s in zip(dims, arr.shape))):
                    raise OnnxImportError(f"input_values[{v.name!r}]: shape {arr.shape} conflicts with the model's "
                                          f"input shape")
                self.env[v.name] = _c(arr)
                continue
            given = self.input_shapes.get(v.name)
            if given is not None:
                given = tuple(int(s) for s in ([given] if np.isscalar(given) else given))
                if any(s < 0 for s in given):
                    raise OnnxImportError(f"input {v.name!r}: negative dim in input shape {given}")
                if dims is not None:
                    if len(dims) != len(given):
                        raise OnnxImportError(f"input {v.name!r}: given shape {given} has rank {len(given)}, the "
                                              f"model's input has rank {len(dims)}")
                    for i, (d, s) in enumerate(zip(dims, given)):
                        if d.HasField("dim_value") and d.dim_value != s:
                            raise OnnxImportError(f"input {v.name!r}: given shape {given} conflicts with the "
                                                  f"model's dim {i} = {d.dim_value}")
                        if d.HasField("dim_param") and d.dim_param in self.input_shapes \
                                and int(self.input_shapes[d.dim_param]) != s:
                            raise OnnxImportError(f"input {v.name!r}: given shape {given} conflicts with "
                                                  f"{d.dim_param}={self.input_shapes[d.dim_param]}")
                shape = given
            elif dims is None:
                missing.append(f"{v.name!r} (no shape in the model; give input_shapes={{{v.name!r}: ...}})")
                continue
            else:
                shape = []
                for i, d in enumerate(dims):
                    if d.HasField("dim_value"):
                        shape.append(d.dim_value)
                    elif d.HasField("dim_param") and d.dim_param in self.input_shapes:
                        s = int(self.input_shapes[d.dim_param])
                        if s < 0:
                            raise OnnxImportError(f"input_shapes {d.dim_param}={s}: negative")
                        shape.append(s)
                    else:
                        missing.append(f"{v.name!r} dim {i}" + (f" ({d.dim_param!r})" if d.dim_param else ""))
                        shape.append(0)
            name = _ir_name(v.name)
            k = 1
            while name in self.b._names:
                name, k = f"{_ir_name(v.name)}_{k}", k + 1
            self.env[v.name] = self.b.input(name, tuple(shape), _DTYPES[tt.elem_type])
        if missing:
            raise OnnxImportError("symbolic input dims need sizes (input_shapes={name: shape} or "
                                  "{dim_param: size}): " + ", ".join(missing))

    # --- the import ----------------------------------------------------------------
    def run(self, name):
        self.check_supported()
        self.b = GraphBuilder(_ir_name(name or self.g.name or "onnx"))
        for t in self.g.initializer:
            self.env[t.name] = self.tensor(t)
            self.const_names[id(self.env[t.name])] = t.name  # weights keep their names (quantize skip=...)
        self._inputs()
        # Nodes using a feature the importer lacks are collected, not fatal at once: their
        # results are poisoned, nodes reading poisoned values are skipped, and one error
        # lists them all at the end.
        lacking, poisoned = [], set()
        for n in self.g.node:
            label = f"{n.op_type} node {n.name!r}" if n.name else f"{n.op_type} node (output {n.output[0]!r})"
            if id(n) in self.fused:
                f = self.fused[id(n)]
                self.env[n.output[0]] = f.value if isinstance(f, _Skip) else self.env[f.name]
                continue
            if any(i in poisoned for i in n.input):
                poisoned.update(n.output)
                continue
            ins = []
            for i in n.input:
                if not i:
                    ins.append(None)
                elif i not in self.env:
                    raise OnnxImportError(f"{label}: input {i!r} is not defined before use")
                else:
                    ins.append(self.env[i])
            attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in n.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            dom = n.domain if n.domain != "ai.onnx" else ""
            try:
                outs = _CONVERTERS[(dom, n.op_type)](self, n, ins, attrs)
            except _NotSupported as e:
                lacking.append(f"{label} (opset {self.opsets.get(dom, '?')}): {e}")
                poisoned.update(n.output)
                continue
            except OnnxImportError as e:
                raise OnnxImportError(f"{label}: {e}") from None
            except (IRError, ValueError, IndexError, TypeError) as e:
                raise OnnxImportError(f"{label}: {e}") from None
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for k, o in enumerate(n.output):
                if not o:
                    continue
                if k >= len(outs) or outs[k] is None:
                    if self.consumers.get(o) or o in self.graph_outputs:
                        lacking.append(f"{label} (opset {self.opsets.get(dom, '?')}): output {k} ({o!r}) is "
                                       f"not supported")
                        poisoned.add(o)
                    continue
                self.env[o] = outs[k]
        if lacking:
            raise OnnxImportError("unsupported ONNX model; sqk cannot import:\n  " + "\n  ".join(lacking))
        return self._outputs()

    def _outputs(self):
        outs, seen = [], set(self.env[v.name] for v in self.g.input if v.name in self.env
                             and isinstance(self.env[v.name], Value))
        for o in self.g.output:
            if o.name not in self.env:
                raise OnnxImportError(f"graph output {o.name!r} is not computed by any node")
            v = self.env[o.name]
            want = o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else 0
            if want and want in _DTYPES and _DTYPES[want] is not self.dtype(v):
                raise OnnxImportError(f"graph output {o.name!r}: the import computes {self.dtype(v)}, the model "
                                      f"declares {_DTYPES[want]}")
            if isinstance(v, np.ndarray):
                v = self.b.const(v, name=_ir_name(o.name))
            elif v in seen:
                v = self.b.reshape(v, shape=v.shape, name=_ir_name(o.name))  # a copy
            else:
                v.name = self.b._fresh(_ir_name(o.name)) if v.name != _ir_name(o.name) else v.name
            seen.add(v)
            outs.append(v)
        if not outs:
            raise OnnxImportError("the model has no outputs")
        return self.b.output(*outs)

    # --- helpers ------------------------------------------------------------------
    def tensor(self, t) -> np.ndarray:
        if t.data_type not in _DTYPES:
            raise OnnxImportError(f"tensor {t.name!r} has dtype {_DTYPE_NAMES.get(t.data_type, t.data_type)}, "
                                  f"which sqk does not have")
        try:
            a = self.onnx.numpy_helper.to_array(t)
        except Exception as e:
            raise OnnxImportError(f"tensor {t.name!r}: cannot read its data ({e})") from None
        return _c(a, _DTYPES[t.data_type].np_dtype)

    @staticmethod
    def dtype(x) -> dt.DType:
        return x.dtype if isinstance(x, Value) else dt.dtype(x.dtype)

    def value(self, x) -> Value:
        """x as a graph Value (known arrays become const nodes, once each)."""
        if isinstance(x, Value):
            return x
        hit = self.consts.get(id(x))
        if hit is None:
            hit = (x, self.b.const(x, name=_ir_name(self.const_names.get(id(x), "onnx_const"))))
            self.consts[id(x)] = hit
        return hit[1]

    def op(self, name: str, *ins, **attrs):
        """Emit IR op ``name``, or run its reference when every input is known."""
        if ins and all(isinstance(x, np.ndarray) for x in ins):
            opdef = OPS[name]
            attrs = opdef.normalize_attrs(attrs)
            try:
                types = opdef.infer(*[TensorType(dt.dtype(a.dtype), a.shape) for a in ins], **attrs)
            except IRError as e:
                raise IRError(f"{name}: {e}") from None
            with np.errstate(all="ignore"):
                res = opdef.reference(*ins, **attrs)
            out = [_c(r, t.dtype.np_dtype) for r, t in zip(res, types)]
            named = [self.const_names[id(x)] for x in ins if id(x) in self.const_names]
            if named and len(out) == 1:  # a transposed or cast weight keeps its weight's name
                self.const_names[id(out[0])] = named[0]
                self.keep.append(out[0])
            return out[0] if len(out) == 1 else out
        # Common subexpressions: exporters repeat work per layer (BERT's additive mask
        # is rebuilt by every layer); an op already emitted with the same inputs (small
        # constants compared by value) and attributes is reused.
        key = (name, tuple(self._cse_key(x) for x in ins), repr(sorted(attrs.items())))
        hit = self.cse.get(key)
        if hit is None:
            hit = self.cse[key] = self.b.op(name, *[self.value(x) for x in ins], **attrs)
        return hit

    def _cse_key(self, x):
        if isinstance(x, np.ndarray):
            if x.size <= 16:
                return ("c", x.dtype.str, x.shape, x.tobytes())
            self.keep.append(x)  # alive, so its id stays unique
            return ("a", id(x))
        return ("v", id(x))

    @staticmethod
    def static(x, what: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise _NotSupported(f"{what} must be known at import time (a constant or computed from "
                                f"shapes), but depends on the model's inputs")
        return x

    def known(self, name: str):
        """The known array of ONNX tensor ``name``, also when a Constant node later in
        the node list makes it (look-ahead for pattern imports); None otherwise."""
        v = self.env.get(name)
        if v is None and name in self.producer and self.producer[name].op_type == "Constant":
            c = self.producer[name]
            v = _constant(self, c, [], {x.name: self.onnx.helper.get_attribute_value(x) for x in c.attribute})
        return v if isinstance(v, np.ndarray) else None

    def ints(self, x, what: str) -> list[int]:
        return [int(v) for v in self.static(x, what).reshape(-1)]

    def scalar(self, v, like) -> np.ndarray:
        return np.asarray(v, dtype=self.dtype(like).np_dtype)

    def reshape(self, x, shape):
        shape = tuple(int(s) for s in shape)
        return x if tuple(x.shape) == shape else self.op("reshape", x, shape=shape)


# --- converters: (importer, node, inputs, attrs) -> output(s) ------------------------

_CONVERTERS: dict[tuple[str, str], object] = {}


def converts(*ops, domain=""):
    def wrap(fn):
        for o in ops:
            _CONVERTERS[(domain, o)] = fn
        return fn
    return wrap


def _optional(im, ins, k, what):
    """Input k as a known array, or None when absent or empty."""
    if len(ins) <= k or ins[k] is None:
        return None
    v = im.static(ins[k], what)
    return v if v.size else None


def _unsupported(msg):
    raise _NotSupported(msg)


@converts("Add", "Sub", "Mul")
def _binary(im, n, ins, a):
    return im.op({"Add": "add", "Sub": "sub", "Mul": "mul"}[n.op_type], ins[0], ins[1])


@converts("Div")
def _div(im, n, ins, a):
    x, y = ins
    if im.dtype(x).is_float:
        return im.op("div", x, y)
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):  # shape arithmetic: truncating division
        with np.errstate(all="ignore"):
            q = np.trunc(x.astype(np.float64) / y.astype(np.float64))
        return _c(q, x.dtype)
    return _unsupported(f"integer Div of run-time values ({im.dtype(x)}) is not supported")


def _rmsnorm(im, n, ins):
    """x * 1/sqrt(ReduceMean(x^2, last axis) + eps) [-> Cast to x's dtype] [* w], as
    the exporters write RMSNorm (Llama, T5), from its Pow node: one ``rmsnorm``
    op (w a constant [D], else ones), the chain's other nodes marked fused.
    None when the nodes differ or an intermediate has another reader."""
    x, e = ins
    if not isinstance(x, Value) or not im.dtype(x).is_float or not len(x.shape):
        return None
    d, r = x.shape[-1], len(x.shape)

    def only_user(node, op):
        out = node.output[0]
        us = im.consumers.get(out, [])
        ok = len(us) == 1 and out not in im.graph_outputs and us[0].op_type == op and id(us[0]) not in im.fused
        return us[0] if ok else None

    def other(node, name):
        """The operand of binary ``node`` that is not ``name``, as a known array (else None)."""
        if list(node.input).count(name) != 1 or len(node.input) != 2:
            return None
        return im.known(node.input[1] if node.input[0] == name else node.input[0])

    if not isinstance(e, np.ndarray) or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
        return None
    rm = only_user(n, "ReduceMean")
    if rm is None:
        return None
    ra = {x.name: im.onnx.helper.get_attribute_value(x) for x in rm.attribute}
    axes = ra.get("axes")
    if axes is None and len(rm.input) > 1 and rm.input[1]:
        axes = im.known(rm.input[1])
    if axes is None or [int(v) % r for v in np.asarray(axes).reshape(-1)] != [r - 1] or not ra.get("keepdims", 1):
        return None
    add = only_user(rm, "Add")
    eps = other(add, rm.output[0]) if add is not None else None
    sq = only_user(add, "Sqrt") if eps is not None and eps.size == 1 else None
    div = only_user(sq, "Div") if sq is not None else None
    if div is None and sq is not None:  # 1/s as Reciprocal (torch's dynamo exporter)
        div = only_user(sq, "Reciprocal")
        one = np.ones(1, np.float32) if div is not None else None
    else:
        one = im.known(div.input[0]) if div is not None and div.input[1] == sq.output[0] else None
    if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
        return None
    mul = only_user(div, "Mul")
    if mul is None or set(mul.input) != {div.output[0], n.input[0]}:
        return None
    chain, last, scale = [rm, add, sq, div, mul], mul, None
    cast = only_user(mul, "Cast")
    if cast is not None:
        to = {x.name: im.onnx.helper.get_attribute_value(x) for x in cast.attribute}.get("to")
        if _DTYPES.get(to) is im.dtype(x):  # a no-op cast (the exporter's .to(input dtype))
            chain.append(cast)
            last = cast
    wm = only_user(last, "Mul")
    w = other(wm, last.output[0]) if wm is not None else None
    if w is not None and w.shape in ((d,), (1,) * (r - 1) + (d,)) and w.dtype == im.dtype(x).np_dtype:
        scale = _c(w.reshape(d))
        chain.append(wm)
    if scale is None:
        scale = np.ones(d, im.dtype(x).np_dtype)
    y = im.op("rmsnorm", x, scale, axis=-1, eps=float(eps.reshape(-1)[0]))
    for node in chain:
        im.fused[id(node)] = _Skip(y)
    return y


@converts("Pow")
def _pow(im, n, ins, a):
    fused = _rmsnorm(im, n, ins)
    if fused is not None:
        return fused
    x, y = ins
    if not im.dtype(x).is_float:
        return _unsupported(f"Pow of {im.dtype(x)} is not supported (float bases only)")
    if im.dtype(y) is not im.dtype(x):
        y = im.op("cast", y, to=im.dtype(x))
    if isinstance(y, np.ndarray) and y.size == 1 and y.ndim <= len(x.shape):
        e = float(y.reshape(-1)[0])
        shape = tuple(x.shape)
        if e == 1.0:
            return x if shape == np.broadcast_shapes(shape, y.shape) else im.op("expand", x, shape=y.shape)
        if e == 2.0 and shape == np.broadcast_shapes(shape, y.shape):
            return im.op("mul", x, x)  # powf(x, 2) is x * x rounded once
    return im.op("pow", x, y)


_UNARY = {"Sqrt": "sqrt", "Exp": "exp", "Log": "log", "Erf": "erf", "Tanh": "tanh", "Sigmoid": "sigmoid",
          "Relu": "relu", "Neg": "neg", "IsNaN": "isnan", "Not": "logical_not"}


@converts(*_UNARY)
def _unary(im, n, ins, a):
    return im.op(_UNARY[n.op_type], ins[0])


@converts("Reciprocal")
def _reciprocal(im, n, ins, a):
    return im.op("div", im.scalar(1, ins[0]), ins[0])


@converts("LeakyRelu")
def _leaky_relu(im, n, ins, a):
    x = ins[0]
    neg = im.op("less", x, im.scalar(0, x))
    return im.op("where", neg, im.op("mul", x, im.scalar(a.get("alpha", 0.01), x)), x)


def _hard_sigmoid(im, x, alpha, beta):
    y = im.op("add", im.op("mul", x, im.scalar(alpha, x)), im.scalar(beta, x))
    return im.op("min", im.op("max", y, im.scalar(0, x)), im.scalar(1, x))


@converts("HardSigmoid")
def _hardsigmoid(im, n, ins, a):
    return _hard_sigmoid(im, ins[0], a.get("alpha", 0.2), a.get("beta", 0.5))


@converts("HardSwish")
def _hardswish(im, n, ins, a):
    return im.op("mul", ins[0], _hard_sigmoid(im, ins[0], 1 / 6, 0.5))


@converts("Gelu")
def _gelu(im, n, ins, a):
    return im.op("gelu", ins[0], approximate=a.get("approximate", "none"))


@converts("Clip")
def _clip(im, n, ins, a):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if lo is not None:
        x = im.op("max", x, lo)
    if hi is not None:
        x = im.op("min", x, hi)
    return x


@converts("Softmax")
def _softmax(im, n, ins, a):
    return im.op("softmax", ins[0], axis=a.get("axis", -1))


@converts("LayerNormalization")
def _layernorm(im, n, ins, a):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = a.get("axis", -1) % len(x.shape)
    want = tuple(x.shape[axis:])
    scale = scale if tuple(scale.shape) == want else im.op("expand", scale, shape=want)
    eps = a.get("epsilon", 1e-5)
    if bias is not None:
        bias = bias if tuple(bias.shape) == want else im.op("expand", bias, shape=want)
        y = im.op("layernorm", x, scale, bias, axis=axis, eps=eps)
    else:
        y = im.op("layernorm", x, scale, axis=axis, eps=eps)
    if not any(n.output[1:]):
        return y
    # Mean and InvStdDev outputs (f32, reduced dims kept): computed again by reductions
    xf = x if im.dtype(x) is dt.f32 else im.op("cast", x, to=dt.f32)
    axes = tuple(range(axis, len(x.shape)))
    mean = im.op("reduce_mean", xf, axes=axes, keepdims=True)
    d = im.op("sub", xf, mean)
    var = im.op("reduce_mean", im.op("mul", d, d), axes=axes, keepdims=True)
    return [y, mean, im.op("rsqrt", im.op("add", var, np.array(eps, np.float32)))]


@converts("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(im, n, ins, a):
    x = ins[0]
    if "axes" in a:
        axes = list(a["axes"])
    elif len(ins) > 1 and ins[1] is not None:
        axes = im.ints(ins[1], "axes")
    else:
        axes = []
    if not axes and a.get("noop_with_empty_axes", 0):
        return x
    op = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max"}[n.op_type]
    if op == "reduce_max" and im.dtype(x) is dt.bool_:  # any(): the max of 0/1 bytes
        y = im.op(op, im.op("cast", x, to=dt.u8), axes=tuple(axes), keepdims=bool(a.get("keepdims", 1)))
        return im.op("cast", y, to=dt.bool_)
    return im.op(op, x, axes=tuple(axes), keepdims=bool(a.get("keepdims", 1)))


@converts("Reshape")
def _reshape(im, n, ins, a):
    x = ins[0]
    shape = im.ints(ins[1], "the target shape")
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return im.reshape(x, resolve_shape(tuple(x.shape), tuple(shape)))


@converts("Flatten")
def _flatten(im, n, ins, a):
    x = ins[0]
    r = len(x.shape)
    axis = a.get("axis", 1)
    axis = axis + r if axis < 0 else axis
    return im.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@converts("Squeeze")
def _squeeze(im, n, ins, a):
    x = ins[0]
    r = len(x.shape)
    if len(ins) > 1 and ins[1] is not None:
        axes = {ax % r for ax in im.ints(ins[1], "axes")}
    else:
        axes = {i for i, d in enumerate(x.shape) if d == 1}
    for ax in axes:
        if x.shape[ax] != 1:
            return _unsupported(f"cannot squeeze axis {ax} of size {x.shape[ax]}")
    return im.reshape(x, [d for i, d in enumerate(x.shape) if i not in axes])


@converts("Unsqueeze")
def _unsqueeze(im, n, ins, a):
    x = ins[0]
    axes = im.ints(ins[1], "axes")
    r = len(x.shape) + len(axes)
    axes = sorted(ax % r for ax in axes)
    shape = list(x.shape)
    for ax in axes:
        shape.insert(ax, 1)
    return im.reshape(x, shape)


@converts("Transpose")
def _transpose(im, n, ins, a):
    perm = tuple(a.get("perm", ())) or tuple(reversed(range(len(ins[0].shape))))
    return im.op("transpose", ins[0], perm=perm)


@converts("Concat")
def _concat(im, n, ins, a):
    return im.op("concat", *ins, axis=a["axis"])


@converts("Slice")
def _slice(im, n, ins, a):
    x = ins[0]
    starts, ends = im.ints(ins[1], "starts"), im.ints(ins[2], "ends")
    axes = im.ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = im.ints(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    return im.op("slice", x, starts=tuple(starts), ends=tuple(ends), axes=tuple(axes), steps=tuple(steps))


@converts("Split")
def _split(im, n, ins, a):
    x = ins[0]
    r = len(x.shape)
    axis = a.get("axis", 0) % r
    dim = x.shape[axis]
    if len(ins) > 1 and ins[1] is not None:
        sizes = im.ints(ins[1], "split")
    elif "split" in a:
        sizes = list(a["split"])
    else:
        k = a.get("num_outputs", len(n.output))
        chunk = -(-dim // k)
        sizes = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
    if sum(sizes) != dim or any(s < 0 for s in sizes):
        return _unsupported(f"split sizes {sizes} do not add up to dim {axis} = {dim}")
    outs, pos = [], 0
    for s in sizes:
        outs.append(im.op("slice", x, starts=(pos,), ends=(pos + s,), axes=(axis,)))
        pos += s
    return outs


@converts("Gather")
def _gather(im, n, ins, a):
    return im.op("gather", ins[0], ins[1], axis=a.get("axis", 0))


@converts("GatherND")
def _gather_nd(im, n, ins, a):
    """One gather along the flattened leading axes: data [B.., D.., R..] as
    [prod(B) * prod(D), R..], each index tuple (with its batch position) as one
    linear index.  Constant indices fold to a constant; run-time ones become
    integer arithmetic (negative indices count from the end)."""
    x, idx = ins
    b = a.get("batch_dims", 0)
    shape, ishape = tuple(x.shape), tuple(idx.shape)
    k = ishape[-1]
    if b + k > len(shape) or ishape[:b] != shape[:b]:
        return _unsupported(f"indices shape {ishape} does not fit data shape {shape} with batch_dims={b}")
    dims = shape[b:b + k]
    strides = [math.prod(dims[j + 1:]) for j in range(k)]
    batch = math.prod(shape[:b])
    # each index tuple's batch position, as a [B.., 1.., 1] array broadcast over the middle dims
    mid = len(ishape) - 1 - b
    base = (np.arange(batch, dtype=np.int64) * math.prod(dims)).reshape(shape[:b] + (1,) * (mid + 1))
    ityp = im.dtype(idx).np_dtype
    lin = None
    for j in range(k):
        col = im.op("slice", idx, starts=(j,), ends=(j + 1,), axes=(len(ishape) - 1,))
        col = im.op("where", im.op("less", col, np.zeros((), ityp)), im.op("add", col, np.asarray(dims[j], ityp)),
                    col)
        term = im.op("mul", im.op("cast", col, to=dt.i64), np.asarray(strides[j], np.int64))
        lin = term if lin is None else im.op("add", lin, term)
    if lin is None:  # k == 0: whole slices per batch position
        lin = np.zeros(ishape[:-1] + (1,), np.int64)
    lin = im.reshape(im.op("add", lin, base) if batch > 1 else lin, ishape[:-1])
    flat = im.reshape(x, (batch * math.prod(dims),) + shape[b + k:])
    return im.op("gather", flat, lin, axis=0)


@converts("GatherElements")
def _gather_elements(im, n, ins, a):
    return im.op("gather_elements", ins[0], ins[1], axis=a.get("axis", 0))


@converts("Expand")
def _expand(im, n, ins, a):
    return im.op("expand", ins[0], shape=tuple(im.ints(ins[1], "the shape")))


@converts("Where")
def _where(im, n, ins, a):
    return im.op("where", *ins)


@converts("Equal", "Less", "Greater")
def _compare(im, n, ins, a):
    return im.op(n.op_type.lower(), ins[0], ins[1])


@converts("GreaterOrEqual", "LessOrEqual")
def _compare_or_equal(im, n, ins, a):
    x, y = ins
    strict = im.op("greater" if n.op_type == "GreaterOrEqual" else "less", x, y)
    if not im.dtype(x).is_float:  # no NaN: x >= y is not x < y
        return im.op("logical_not", im.op("less" if n.op_type == "GreaterOrEqual" else "greater", x, y))
    # strict or equal (NaN compares false in both), as not(not strict and not equal)
    both_false = im.op("logical_and", im.op("logical_not", strict), im.op("logical_not", im.op("equal", x, y)))
    return im.op("logical_not", both_false)


@converts("Sin", "Cos")
def _sin_cos(im, n, ins, a):
    # Only of values known at import time (rotary position tables): sqk has no sin/cos kernel.
    x = im.static(ins[0], f"{n.op_type}'s input (sqk has no run-time sin/cos)")
    with np.errstate(all="ignore"):
        return _c((np.sin if n.op_type == "Sin" else np.cos)(x), x.dtype)


@converts("And")
def _and(im, n, ins, a):
    return im.op("logical_and", ins[0], ins[1])


@converts("Cast")
def _cast(im, n, ins, a):
    to = _DTYPES.get(a["to"])
    if to is None:
        return _unsupported(f"Cast to {_DTYPE_NAMES.get(a['to'], a['to'])}: sqk has no such dtype")
    return ins[0] if im.dtype(ins[0]) is to else im.op("cast", ins[0], to=to)


@converts("Shape")
def _shape(im, n, ins, a):
    shape = list(ins[0].shape)
    r = len(shape)
    start, end = a.get("start", 0), a.get("end", r)
    start, end = max(0, min(r, start + r if start < 0 else start)), max(0, min(r, end + r if end < 0 else end))
    return np.array(shape[start:end], np.int64)


@converts("ConstantOfShape")
def _constant_of_shape(im, n, ins, a):
    shape = im.ints(ins[0], "the shape")
    v = im.tensor(a["value"]) if "value" in a else np.zeros(1, np.float32)
    return np.full(shape, v.reshape(-1)[0], v.dtype)


@converts("Range")
def _range(im, n, ins, a):
    start, limit, delta = (im.static(x, w) for x, w in zip(ins, ("start", "limit", "delta")))
    return _c(np.arange(start.item(), limit.item(), delta.item()), start.dtype)


@converts("Constant")
def _constant(im, n, ins, a):
    if "value" in a:
        return im.tensor(a["value"])
    for k, d in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                 ("value_ints", np.int64)):
        if k in a:
            return np.array(a[k], d)
    return _unsupported(f"Constant with {', '.join(a) or 'no value'} is not supported")


@converts("Identity")
def _identity(im, n, ins, a):
    return ins[0]


class _Alias:
    """Marks a node whose result is another ONNX tensor's (a folded-away scale)."""

    def __init__(self, name):
        self.name = name


def _scaled_projection(im, n, w):
    """``(c, b, add, mul)`` when MatMul ``n``'s result (of constant 2-D ``w``) flows,
    each step its only reader, through Add(constant bias [N]), then Reshape /
    Transpose, into Mul by a constant scalar ``c``: how the TorchScript exporter
    scales q and k in scaled_dot_product_attention.  The scale then folds into
    ``w`` and the bias, and the Mul goes away; else None."""
    def only(node):
        us = im.consumers.get(node.output[0], [])
        ok = len(us) == 1 and node.output[0] not in im.graph_outputs and id(us[0]) not in im.fused
        return us[0] if ok else None

    def known_other(node, name):
        if len(node.input) != 2 or list(node.input).count(name) != 1:
            return None
        return im.known(node.input[1] if node.input[0] == name else node.input[0])

    add = only(n)
    b = known_other(add, n.output[0]) if add is not None and add.op_type == "Add" else None
    if b is None or b.shape != (w.shape[1],) or b.dtype != w.dtype:
        return None
    last, nxt = add, only(add)
    while nxt is not None and nxt.op_type in ("Reshape", "Transpose") and nxt.input[0] == last.output[0]:
        last, nxt = nxt, only(nxt)
    if last is add or nxt is None or nxt.op_type != "Mul":
        return None
    c = known_other(nxt, last.output[0])
    if c is None or c.size != 1 or c.ndim > 1 or c.dtype != w.dtype:
        return None
    return c.reshape(()), b, add, nxt, last


@converts("MatMul")
def _matmul(im, n, ins, a):
    x, w = ins
    if not im.dtype(x).is_float:
        return _unsupported(f"MatMul of {im.dtype(x)} is not supported (float only)")
    if isinstance(x, Value) and isinstance(w, np.ndarray) and w.ndim == 2 and len(x.shape) >= 2 \
            and id(w) not in im.deq and w.dtype.kind == "f":
        found = _scaled_projection(im, n, w)
        if found is not None:
            c, b, add, mul, last = found
            ws = _c(w * c)
            if id(w) in im.const_names:  # the scaled weight keeps its name (quantize skip=...)
                im.const_names[id(ws)] = im.const_names[id(w)]
                im.keep.append(ws)
            y = im.op("matmul", x, ws)
            im.fused[id(add)] = _Skip(im.op("add", y, _c(b * c)))
            im.fused[id(mul)] = _Alias(last.output[0])
            return y
    xs, ws = tuple(x.shape), tuple(w.shape)
    x2 = im.reshape(x, (1,) + xs) if len(xs) == 1 else x
    w2 = im.reshape(w, ws + (1,)) if len(ws) == 1 else w
    q = im.deq.get(id(w)) if isinstance(w, np.ndarray) and len(ws) == 2 else None
    if q is not None and isinstance(x, Value):
        qq, scales, zeros, group = q
        args = [x2, qq, scales] + ([zeros] if zeros is not None else [])
        y = im.b.matmul_q(*[im.value(v) for v in args], group=group)
    else:
        y = im.op("matmul", x2, w2)
    out = tuple(y.shape)
    if len(ws) == 1:
        out = out[:-1]
    if len(xs) == 1:
        out = out[:-2] + out[-1:] if len(ws) > 1 else out[:-1]
    return im.reshape(y, out)


@converts("Gemm")
def _gemm(im, n, ins, a):
    x, w = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if a.get("transA", 0):
        x = im.op("transpose", x, perm=(1, 0))
    if a.get("transB", 0):
        w = im.op("transpose", w, perm=(1, 0))
    y = im.op("matmul", x, w)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = im.op("mul", y, im.scalar(alpha, y))
    if c is not None:
        if beta != 1.0:
            c = im.op("mul", c, im.scalar(beta, c))
        y = im.op("add", y, c)
    return y


# --- convolution and pooling --------------------------------------------------------

def _auto_pads(mode, sizes, kernel, strides, dilations, pads):
    """ONNX auto_pad -> explicit (begins..., ends...)."""
    r = len(sizes)
    if mode in ("", "NOTSET"):
        return list(pads) if pads else [0] * (2 * r)
    if mode == "VALID":
        return [0] * (2 * r)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        return _unsupported(f"auto_pad={mode!r}")
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begins.append(small if mode == "SAME_UPPER" else total - small)
        ends.append(total - small if mode == "SAME_UPPER" else small)
    return begins + ends


def _spatial_attrs(a, x_shape, kernel):
    r = len(kernel)
    strides = list(a.get("strides", [1] * r))
    dilations = list(a.get("dilations", [1] * r))
    pads = _auto_pads(a.get("auto_pad", "NOTSET"), x_shape[2:], kernel, strides, dilations, a.get("pads"))
    return strides, dilations, pads


def _as_2d(im, x, r):
    """A 3-D NCW tensor as NC1W (1-D conv/pool run as 2-D)."""
    return im.reshape(x, (x.shape[0], x.shape[1], 1, x.shape[2])) if r == 1 else x


def _ext(v, r, fill):
    return ([fill] + list(v)) if r == 1 else list(v)


def _bn_params(im, bn):
    """(a, c) of an inference BatchNormalization y = x * a + c, when its
    parameters are known arrays; else None."""
    vals = [im.env.get(i) for i in bn.input[1:5]]
    if len(vals) < 4 or not all(isinstance(v, np.ndarray) for v in vals):
        return None
    attrs = {x.name: im.onnx.helper.get_attribute_value(x) for x in bn.attribute}
    if attrs.get("training_mode", 0) or any(bn.output[1:]):
        return None
    scale, bias, mean, var = (v.astype(np.float32) for v in vals)
    aa = scale / np.sqrt(var + np.float32(attrs.get("epsilon", 1e-5)))
    return aa, bias - mean * aa


@converts("Conv")
def _conv(im, n, ins, a):
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    r = len(x.shape) - 2
    if r not in (1, 2):
        return _unsupported(f"{r}-D convolution is not supported (1-D and 2-D are)")
    kernel = list(w.shape[2:])
    strides, dilations, pads = _spatial_attrs(a, x.shape, kernel)
    group = a.get("group", 1)
    # Fold a following inference BatchNormalization into the weights and bias.
    users = im.consumers.get(n.output[0], [])
    if len(users) == 1 and users[0].op_type == "BatchNormalization" and users[0].input[0] == n.output[0] \
            and n.output[0] not in im.graph_outputs and isinstance(w, np.ndarray) \
            and (bias is None or isinstance(bias, np.ndarray)) and w.dtype == np.float32:
        p = _bn_params(im, users[0])
        if p is not None:
            aa, cc = p
            w = np.ascontiguousarray(w * aa.reshape((-1,) + (1,) * (w.ndim - 1)))
            bias = np.ascontiguousarray((bias if bias is not None else np.float32(0)) * aa + cc)
            fused = True
        else:
            fused = False
    else:
        fused = False
    x4 = _as_2d(im, x, r)
    w4 = _as_2d(im, w, r)
    p = pads if r == 2 else [0, pads[0], 0, pads[1]]
    args = [x4, w4] + ([bias] if bias is not None else [])
    y = im.op("conv2d", *args, strides=tuple(_ext(strides, r, 1)), pads=tuple(p),
              dilations=tuple(_ext(dilations, r, 1)), groups=group)
    if r == 1:
        y = im.reshape(y, (y.shape[0], y.shape[1], y.shape[3]))
    if fused:
        im.fused[id(users[0])] = _Skip(y)
    return y


@converts("BatchNormalization")
def _batchnorm(im, n, ins, a):
    if a.get("training_mode", 0):
        return _unsupported("training_mode=1 is not supported")
    x = ins[0]
    r = len(x.shape)
    shape = (-1,) + (1,) * (r - 2)
    p = _bn_params(im, n)
    if p is not None:
        aa, cc = (v.astype(im.dtype(x).np_dtype).reshape(shape) for v in p)
    else:
        scale, bias, mean, var = ins[1:5]
        aa = im.op("div", scale, im.op("sqrt", im.op("add", var, im.scalar(a.get("epsilon", 1e-5), var))))
        cc = im.op("sub", bias, im.op("mul", mean, aa))
        aa, cc = im.op("reshape", aa, shape=shape), im.op("reshape", cc, shape=shape)
    return im.op("add", im.op("mul", x, aa), cc)


def _pool_common(im, n, x, a):
    r = len(x.shape) - 2
    if r not in (1, 2):
        return _unsupported(f"{r}-D pooling is not supported (1-D and 2-D are)")
    kernel = list(a["kernel_shape"])
    strides, dilations, pads = _spatial_attrs(a, x.shape, kernel)
    p = pads if r == 2 else [0, pads[0], 0, pads[1]]
    return r, dict(kernel=tuple(_ext(kernel, r, 1)), strides=tuple(_ext(strides, r, 1)), pads=tuple(p),
                   ceil_mode=bool(a.get("ceil_mode", 0))), tuple(_ext(dilations, r, 1))


def _pool_out(im, y, r):
    return im.reshape(y, (y.shape[0], y.shape[1], y.shape[3])) if r == 1 else y


@converts("MaxPool")
def _maxpool(im, n, ins, a):
    x = ins[0]
    r, attrs, dil = _pool_common(im, n, x, a)
    return _pool_out(im, im.op("maxpool2d", _as_2d(im, x, r), dilations=dil, **attrs), r)


@converts("AveragePool")
def _avgpool(im, n, ins, a):
    x = ins[0]
    r, attrs, dil = _pool_common(im, n, x, a)
    if any(d != 1 for d in dil):
        return _unsupported("AveragePool with dilations is not supported")
    y = im.op("avgpool2d", _as_2d(im, x, r), count_include_pad=bool(a.get("count_include_pad", 0)), **attrs)
    return _pool_out(im, y, r)


@converts("GlobalAveragePool")
def _global_avgpool(im, n, ins, a):
    x = ins[0]
    if len(x.shape) == 4:
        return im.op("global_avgpool", x)
    return im.op("reduce_mean", x, axes=tuple(range(2, len(x.shape))), keepdims=True)


# --- padding and resizing (exact data movement: slice, concat, gather) -------------------

@converts("Pad")
def _pad(im, n, ins, a):
    x = ins[0]
    r = len(x.shape)
    pads = im.ints(ins[1], "pads")
    axes = im.ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(r))
    axes = [ax % r for ax in axes]
    if len(pads) != 2 * len(axes):
        return _unsupported(f"pads has {len(pads)} values for {len(axes)} axes")
    mode = a.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return _unsupported(f"mode={mode!r}")
    cv = _optional(im, ins, 2, "constant_value")
    cv = cv.reshape(-1)[0] if cv is not None else 0
    for ax, lo, hi in zip(axes, pads[:len(axes)], pads[len(axes):]):
        if lo < 0 or hi < 0:  # negative pads crop
            d = x.shape[ax]
            x = im.op("slice", x, starts=(max(0, -lo),), ends=(d - max(0, -hi),), axes=(ax,))
        lo, hi = max(lo, 0), max(hi, 0)
        if not lo and not hi:
            continue
        if mode == "constant":
            parts = []
            for k in (lo, None, hi):
                if k is None:
                    parts.append(x)
                elif k:
                    shape = list(x.shape)
                    shape[ax] = k
                    parts.append(np.full(shape, cv, im.dtype(x).np_dtype))
            x = im.op("concat", *parts, axis=ax)
        else:
            d = x.shape[ax]
            if d == 0 or (mode == "reflect" and d < 2 and (lo or hi)):
                return _unsupported(f"mode={mode!r} padding of an axis of size {d}")
            idx = np.pad(np.arange(d, dtype=np.int64), (lo, hi), mode={"edge": "edge", "reflect": "reflect",
                                                                        "wrap": "wrap"}[mode])
            x = im.op("gather", x, idx, axis=ax)
    return x


def _nearest_index(out_n, in_n, scale, ctm, nearest):
    """Source index of each output position along one axis (ONNX Resize, mode=nearest)."""
    xs = np.arange(out_n, dtype=np.float64)
    length = scale * in_n
    if ctm == "half_pixel":
        src = (xs + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        adj = out_n / length
        src = in_n / 2 * (1 - adj) + (xs + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        src = (xs + 0.5) / scale - 0.5 if length > 1 else np.full(out_n, -0.5)
    elif ctm == "align_corners":
        src = xs * (in_n - 1) / (length - 1) if length != 1 else np.zeros(out_n)
    elif ctm == "asymmetric":
        src = xs / scale
    elif ctm == "tf_half_pixel_for_nn":
        src = (xs + 0.5) / scale
    else:
        return _unsupported(f"coordinate_transformation_mode={ctm!r} with mode=nearest")
    if nearest == "round_prefer_floor":
        idx = np.where(src == np.floor(src) + 0.5, np.floor(src), np.round(src))
    elif nearest == "round_prefer_ceil":
        idx = np.floor(src + 0.5)
    elif nearest == "floor":
        idx = np.floor(src)
    elif nearest == "ceil":
        idx = np.ceil(src)
    else:
        return _unsupported(f"nearest_mode={nearest!r}")
    return np.clip(idx, 0, in_n - 1).astype(np.int64)


@converts("Resize")
def _resize(im, n, ins, a):
    x = ins[0]
    r = len(x.shape)
    if a.get("mode", "nearest") != "nearest":
        return _unsupported(f"mode={a.get('mode')!r} (only nearest is supported)")
    if a.get("antialias", 0):
        return _unsupported("antialias=1")
    axes = [ax % r for ax in a.get("axes", range(r))]
    scales, sizes = _optional(im, ins, 2, "scales"), _optional(im, ins, 3, "sizes")
    in_sh = [x.shape[ax] for ax in axes]
    if sizes is not None:
        out_sh = im.ints(sizes, "sizes")
        sc = [o / i for o, i in zip(out_sh, in_sh)]
        policy = a.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            s = min(sc) if policy == "not_larger" else max(sc)
            sc = [s] * len(axes)
            out_sh = [int(s * i + 0.5) for i in in_sh]
    elif scales is not None:
        sc = [float(v) for v in scales.reshape(-1)]
        out_sh = [int(s * i) for s, i in zip(sc, in_sh)]
    else:
        return _unsupported("Resize needs scales or sizes")
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    for ax, i, o, s in zip(axes, in_sh, out_sh, sc):
        idx = _nearest_index(o, i, s, ctm, nearest)
        if o == i and (idx == np.arange(i)).all():
            continue
        x = im.op("gather", x, idx, axis=ax)
    return x


# --- quantized weights ---------------------------------------------------------------------

def _per_column(v, k, n):
    """A per-tensor or per-column ([N]) quantization parameter as [1, N]."""
    v = np.asarray(v)
    return np.ascontiguousarray(np.broadcast_to(v.reshape(1, -1) if v.size == n else v.reshape(1, 1), (1, n)))


@converts("DequantizeLinear")
def _dequantize(im, n, ins, a):
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    r = len(x.shape)
    axis = a.get("axis", 1) % max(r, 1)
    block = a.get("block_size", 0)
    if not isinstance(scale, np.ndarray) or (zp is not None and not isinstance(zp, np.ndarray)):
        return _unsupported("run-time scales or zero points are not supported")
    # broadcast shape of the parameters: per tensor, per axis, or blocked along axis
    if scale.size == 1 and not block:
        pshape = (1,) * r
        sc, z = scale.reshape(pshape), None if zp is None else zp.reshape(pshape)
    elif block:
        sc = np.repeat(scale, block, axis=axis)[tuple(slice(0, d) for d in x.shape)]
        z = None if zp is None else np.repeat(zp, block, axis=axis)[tuple(slice(0, d) for d in x.shape)]
    else:
        pshape = tuple(-1 if i == axis else 1 for i in range(r))
        sc, z = scale.reshape(pshape), None if zp is None else zp.reshape(pshape)
    xf = im.op("cast", x, to=dt.f32)
    if z is not None:
        xf = im.op("sub", xf, z.astype(np.float32))
    y = im.op("mul", xf, sc.astype(np.float32))
    if scale.dtype != np.float32:
        y = im.op("cast", y, to=dt.dtype(scale.dtype))
    if isinstance(y, np.ndarray) and r == 2 and x.dtype in (np.int8, np.uint8):
        q = _as_matmul_q(x, scale, zp, axis, block)
        if q is not None:
            im.deq[id(y)] = q
    return y


def _as_matmul_q(x, scale, zp, axis, block):
    """(q i8 [K, N], scales [G, N], zeros i8 [G, N] | None, group) for matmul_q
    from a DequantizeLinear of a constant [K, N] weight, or None when its
    layout (per-row scales, blocks along N) has no matmul_q form."""
    k, nn = x.shape
    if block:
        if axis != 0:
            return None
        group, scales = block, scale
        zeros = zp
    elif scale.size == 1 or axis == 1:
        group, scales = k, _per_column(scale, k, nn)
        zeros = None if zp is None else _per_column(zp, k, nn)
    else:
        return None
    if x.dtype == np.uint8:  # shift codes and zero points by 128: (x - zp) is unchanged
        q = (x.astype(np.int16) - 128).astype(np.int8)
        zeros = ((zeros if zeros is not None else np.zeros(scales.shape, np.uint8)).astype(np.int16) - 128)
        zeros = zeros.astype(np.int8)
    else:
        q = x
        if zeros is not None and not zeros.any():
            zeros = None
    return q, np.ascontiguousarray(scales), None if zeros is None else np.ascontiguousarray(zeros), group


@converts("QuantizeLinear")
def _quantize(im, n, ins, a):
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    if not all(isinstance(v, np.ndarray) for v in (x, scale) + ((zp,) if zp is not None else ())):
        return _unsupported("QuantizeLinear of run-time values is not supported (only of constant weights)")
    r = x.ndim
    axis = a.get("axis", 1) % max(r, 1)
    block = a.get("block_size", 0)
    if scale.size == 1 and not block:
        sc, z = scale.reshape(-1)[0], None if zp is None else zp.reshape(-1)[0]
    elif block:
        sc = np.repeat(scale, block, axis=axis)[tuple(slice(0, d) for d in x.shape)]
        z = None if zp is None else np.repeat(zp, block, axis=axis)[tuple(slice(0, d) for d in x.shape)]
    else:
        shape = tuple(-1 if i == axis else 1 for i in range(r))
        sc, z = scale.reshape(shape), None if zp is None else zp.reshape(shape)
    out = np.dtype(zp.dtype) if zp is not None else np.dtype(np.uint8)
    if a.get("output_dtype", 0):
        out = _DTYPES[a["output_dtype"]].np_dtype
    y = np.rint(x.astype(np.float32) / np.asarray(sc, np.float32))
    if z is not None:
        y = y + np.asarray(z).astype(np.float32)
    info = np.iinfo(out)
    return _c(np.clip(y, info.min, info.max), out)


def _dynamic_matmuls(im, n, x):
    """The MatMulInteger chains DynamicQuantizeLinear ``n`` feeds, as onnxruntime's
    quantize_dynamic writes each MatMul of constant weights:
    ``DynamicQuantizeLinear(x) -> (xq, xs, xzp); s = Mul(xs, w_scale);
    Mul(Cast<float>(MatMulInteger(xq, w_q, xzp, w_zp)), s)``, as a list of
    (nodes to fuse, final Mul, w_q, w_zp | None, w_scale).  Raises _NotSupported
    naming what differs: every reader of xq, xs and xzp must be in a chain,
    and every intermediate read only by its chain."""
    xq, xs, xzp = (list(n.output) + ["", ""])[:3]
    if not isinstance(x, Value) or len(x.shape) < 2:
        _unsupported("converted only when its input is a run-time tensor of rank >= 2 feeding MatMulInteger")
    if any(o and o in im.graph_outputs for o in (xq, xs, xzp)):
        _unsupported("its outputs are graph outputs (sqk converts it only as part of MatMulInteger chains)")

    def only(node, op):
        out = node.output[0]
        us = im.consumers.get(out, [])
        ok = len(us) == 1 and out not in im.graph_outputs and us[0].op_type == op and id(us[0]) not in im.fused
        return us[0] if ok else None

    def label(node):
        return f"{node.op_type} node {node.name or node.output[0]!r}"

    chains, k = [], x.shape[-1]
    for mm in im.consumers.get(xq, []):
        if mm.op_type != "MatMulInteger" or list(mm.input).count(xq) != 1 or mm.input[0] != xq:
            _unsupported(f"its quantized output is read by {label(mm)} (only MatMulInteger's A is converted)")
        if len(mm.input) < 3 or mm.input[2] != xzp:
            _unsupported(f"{label(mm)} does not take its zero point as a_zero_point")
        w, wzp = im.known(mm.input[1]), im.known(mm.input[3]) if len(mm.input) > 3 and mm.input[3] else None
        if w is None or (len(mm.input) > 3 and mm.input[3] and wzp is None):
            _unsupported(f"{label(mm)} has a run-time B or b_zero_point (only constant weights are converted)")
        if w.ndim != 2 or w.dtype not in (np.int8, np.uint8) or w.shape[0] != k:
            _unsupported(f"{label(mm)}: B must be a 2-D int8/uint8 [{k}, N] weight, got {w.dtype} {list(w.shape)}")
        nn = w.shape[1]
        if wzp is not None and (wzp.dtype != w.dtype or wzp.size not in (1, nn)):
            _unsupported(f"{label(mm)}: b_zero_point must be per-tensor or per-column (size 1 or {nn}) of B's dtype")
        cast = only(mm, "Cast")
        to = {a.name: im.onnx.helper.get_attribute_value(a) for a in cast.attribute}.get("to") if cast else None
        mul = only(cast, "Mul") if to == 1 else None
        if mul is None or list(mul.input).count(cast.output[0]) != 1:
            _unsupported(f"{label(mm)} is not followed by Cast(to=FLOAT) and Mul by the scales (its only readers)")
        s = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        smul = im.producer.get(s)
        ws = None
        if smul is not None and smul.op_type == "Mul" and len(smul.input) == 2 and xs in smul.input \
                and list(smul.input).count(xs) == 1 and only(smul, "Mul") is mul:
            ws = im.known(smul.input[1] if smul.input[0] == xs else smul.input[0])
        if ws is None or ws.dtype != np.float32 or ws.size not in (1, nn) or ws.ndim > 2 \
                or (ws.size == nn and ws.shape[-1] != nn):
            _unsupported(f"{label(mul)} does not scale {label(mm)} by (its x_scale * a constant f32 "
                         f"per-tensor or per-column weight scale)")
        chains.append(([mm, cast, smul, mul], mul, w, wzp, ws))
    fused = {id(c[0][0]) for c in chains}
    smuls = {id(c[0][2]) for c in chains}
    for u in im.consumers.get(xzp, []) if xzp else []:
        if id(u) not in fused or list(u.input).index(xzp) != 2:
            _unsupported(f"its zero point is read by {label(u)} outside a MatMulInteger chain")
    for u in im.consumers.get(xs, []) if xs else []:
        if id(u) not in smuls:
            _unsupported(f"its scale is read by {label(u)} outside a MatMulInteger chain")
    if not chains:
        _unsupported("converted only when it feeds MatMulInteger")
    return chains


def _dynamic_weight(w, wzp, ws):
    """(q i8 [K, N], scales f32 [1, N], zeros i8 [1, N] | None) for matmul_q with
    group = K: q = w - zero when that fits int8 (symmetric, the fast path), else
    the codes and zero points as DequantizeLinear's (uint8 shifted by 128)."""
    k, nn = w.shape
    scales = _per_column(ws, k, nn).astype(np.float32)
    zero = np.zeros((1, nn), np.int16) if wzp is None else _per_column(wzp, k, nn).astype(np.int16)
    d = w.astype(np.int16) - zero
    if d.min() >= -128 and d.max() <= 127:
        return d.astype(np.int8), scales, None
    q, _, zeros, _ = _as_matmul_q(w, ws, wzp, 1, 0)
    return q, scales, zeros


@converts("DynamicQuantizeLinear")
def _dynamic_quantize(im, n, ins, a):
    """onnxruntime's quantize_dynamic MatMuls (``_dynamic_matmuls``) become
    ``matmul_q {activations=int8}`` of the constant weights, per-column or
    per-tensor scales as one group spanning K.  The activations are quantized by
    sqk's scheme, not ORT's: dynamic symmetric int8 per row of x (ORT: one
    asymmetric uint8 scale and zero point for the whole tensor), so results
    agree with ORT's within quantization error, not bit for bit (usually
    closer to the float model: per-row scales are finer)."""
    x = ins[0]
    for nodes, mul, w, wzp, ws in _dynamic_matmuls(im, n, x):
        q, scales, zeros = _dynamic_weight(w, wzp, ws)
        name = im.const_names.get(id(w))
        if name:  # the codes keep the weight's name (quantize skip=...)
            im.const_names[id(q)] = name
            im.keep.append(q)
        args = [im.value(x), im.value(q), im.value(scales)] + ([im.value(zeros)] if zeros is not None else [])
        y = im.b.matmul_q(*args, group=w.shape[0], activations="int8")
        for node in nodes:
            im.fused[id(node)] = _Skip(y)
    return [x, x, x]  # placeholders: every reader of the three outputs is fused above


@converts("MatMulInteger")
def _matmul_integer(im, n, ins, a):
    # reached only outside the chains DynamicQuantizeLinear converts (those are fused)
    return _unsupported("MatMulInteger is converted only as onnxruntime's quantize_dynamic writes it: "
                        "DynamicQuantizeLinear -> MatMulInteger(constant B) -> Cast(to=FLOAT) -> Mul by the scales")


@converts("MatMulNBits", domain="com.microsoft")
def _matmul_nbits(im, n, ins, a):
    x, b, scales = ins[0], ins[1], ins[2]
    zp = ins[3] if len(ins) > 3 else None
    if len(ins) > 4 and ins[4] is not None:
        return _unsupported("g_idx (act-order) is not supported")
    bias = ins[5] if len(ins) > 5 else None
    for v, what in ((b, "B"), (scales, "scales")) + (((zp, "zero_points"),) if zp is not None else ()):
        im.static(v, what)
    q, s, zeros, group = from_matmul_nbits(b, scales, zp, a["K"], a["N"], a["block_size"], a.get("bits", 4),
                                           scale_dtype=scales.dtype)
    args = [im.value(x), im.b.const(q, dtype="i4"), im.value(s)]
    if zeros is not None:
        args.append(im.b.const(zeros, dtype="i4"))
    y = im.b.matmul_q(*args, group=group)
    return im.op("add", y, bias) if bias is not None else y


# Ops converted only as parts of a larger pattern (onnxruntime's quantize_dynamic chains),
# never on their own: the importer accepts them, supported_ops() does not claim them.
PATTERN_ONLY = {"DynamicQuantizeLinear", "MatMulInteger"}


def supported_ops() -> list[str]:
    """Every ONNX op the importer converts on its own ("domain::Op" outside the
    default domain); PATTERN_ONLY ops are converted only inside their patterns."""
    return sorted(f"{d}::{o}" if d else o for d, o in _CONVERTERS if d or o not in PATTERN_ONLY)


__all__ = ["OnnxImportError", "from_onnx", "supported_ops", "OPSET_MIN", "OPSET_MAX"]
