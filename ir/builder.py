"""GraphBuilder: every IR op is a method of the same name.

    b = GraphBuilder("mlp")
    x = b.input("x", (1, 768), "f32")
    w = b.const(np.ones((768, 3072), np.float32), name="w")
    g = b.output(b.gelu(b.matmul(x, w)))
"""
from __future__ import annotations

import numpy as np

from . import dtypes as dt
from .graph import Graph, IRError, Node, TensorType, Value, check_name
from .ops import OPS
from .text import check_const
from .verify import verify


class GraphBuilder:
    def __init__(self, name: str = "main"):
        self.name = check_name(name, "graph")
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._counter = 0

    def _fresh(self, name: str | None) -> str:
        if name is None:
            while str(self._counter) in self._names:
                self._counter += 1
            name = str(self._counter)
        check_name(name, "value")
        base, k = name, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def input(self, name: str, shape, dtype="f32") -> Value:
        """A graph input (its name is the keyword used when calling the model)."""
        if name in self._names:
            raise IRError(f"name {name!r} is already used")
        d = dt.dtype(dtype)
        if d not in dt.IO:
            raise IRError(f"input {name!r}: dtype {d} cannot be a model input")
        v = Value(self._fresh(name), TensorType(d, tuple(shape)))
        self.inputs.append(v)
        return v

    def const(self, array, dtype=None, name: str | None = None) -> Value:
        """A constant; the array is copied (``dtype`` converts it, e.g. "i4")."""
        arr = np.asarray(array)
        try:
            d = dt.dtype(dtype) if dtype is not None else dt.dtype(arr.dtype)
        except TypeError:
            raise IRError(f"const{' ' + name if name else ''}: numpy dtype {arr.dtype} has no sqk dtype; pass dtype= "
                          f"(e.g. \"f32\") or convert the array") from None
        arr = np.array(arr, dtype=d.np_dtype, copy=True, order="C")
        t = TensorType(d, arr.shape)
        v = Value(self._fresh(name), t)
        try:
            check_const(arr, t)
        except ValueError as e:
            raise IRError(f"const %{v.name}: {e}") from None
        arr.setflags(write=False)
        self.nodes.append(Node("const", (), (v,), {"value": arr}))
        return v

    def op(self, opname: str, *inputs: Value, name: str | None = None, **attrs) -> Value:
        """Append a node of op ``opname``; returns its result."""
        opdef = OPS.get(opname)
        if opdef is None or opname == "const":
            raise IRError(f"unknown op {opname!r}")
        opdef.check_arity(len(inputs))
        for v in inputs:
            if not isinstance(v, Value):
                raise IRError(f"{opname}: inputs must be values of this builder, got {type(v).__name__} "
                              f"(wrap arrays with b.const)")
        attrs = opdef.normalize_attrs(attrs)
        try:
            types = opdef.infer(*[v.type for v in inputs], **attrs)
        except IRError as e:
            raise IRError(f"{opname}: {e}") from None
        outs = tuple(Value(self._fresh(name if len(types) == 1 else None), t) for t in types)
        self.nodes.append(Node(opname, tuple(inputs), outs, attrs))
        return outs[0] if len(outs) == 1 else outs

    def __getattr__(self, opname: str):
        if opname in OPS and opname != "const":
            return lambda *inputs, **attrs: self.op(opname, *inputs, **attrs)
        raise AttributeError(f"GraphBuilder has no op or method {opname!r}")

    def output(self, *values: Value, names=None, **named: Value) -> Graph:
        """Finish: the graph returning ``values`` (verified), then the keyword
        ones: ``b.output(logits=y)`` or ``b.output(y, names=["logits"])`` names
        an output (the value is renamed), which the compiled model's outputs,
        ``sqk run``'s files (out/logits.npy) and the manifest use; unnamed
        outputs keep their value's name (an SSA number unless given ``name=``)."""
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            if len(names) != len(values):
                raise IRError(f"output(): {len(names)} names for {len(values)} values")
            named = {**dict(zip(names, values)), **named}
            values = ()
        values = values + tuple(named.values())
        if not values:
            raise IRError("output() needs at least one value")
        if len({id(v) for v in named.values()}) != len(named):
            raise IRError("output(): one value under two names")
        for name, v in named.items():
            self._rename(v, name)
        return verify(Graph(self.name, self.inputs, self.nodes, values))

    def _rename(self, v: Value, name: str) -> None:
        if isinstance(v, Value) and v.name == name:
            return
        if not isinstance(v, Value) or not any(v in n.outputs for n in self.nodes):
            raise IRError(f"output {name!r}: not a value computed by this builder"
                          + (f" (%{v.name} is an input: outputs cannot rename inputs)" if v in self.inputs else ""))
        if name in self._names:
            raise IRError(f"output {name!r}: the name is already used in the graph")
        check_name(name, "output")
        self._names.discard(v.name)
        self._names.add(name)
        v.name = name  # values are immutable once in a Graph; this one is still being built
