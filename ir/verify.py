"""The verifier: every message names the node (line in the text form) and the problem."""
from __future__ import annotations

import weakref

import numpy as np

from . import dtypes as dt
from .graph import Graph, IRError, check_name
from .ops import OPS
from .text import check_const


class VerifyError(IRError):
    pass


# read-only constants whose values passed check_const (each pass of a pipeline verifies the graph:
# scanning every i4 weight each time took seconds on an LLM); entries go with their arrays
_CHECKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def verify(g: Graph) -> Graph:
    """Check SSA form, op arity and attributes, and that every stored type is
    what the op's inference gives.  Returns ``g`` so calls can be chained."""
    seen_names: set[str] = set()
    defined = set()

    def define(v, where):
        try:
            check_name(v.name, "value")
        except IRError as e:
            raise VerifyError(f"{where}: {e}") from None
        if v.name in seen_names:
            raise VerifyError(f"{where}: value %{v.name} is defined twice")
        seen_names.add(v.name)
        defined.add(v)

    try:
        check_name(g.name, "graph")
    except IRError as e:
        raise VerifyError(str(e)) from None
    if not g.outputs:
        raise VerifyError(f"graph @{g.name} has no outputs")
    for v in g.inputs:
        define(v, f"graph @{g.name} input")
        if v.dtype not in dt.IO:
            raise VerifyError(f"graph input %{v.name}: dtype {v.dtype} cannot be a model input")
    for i, n in enumerate(g.nodes):
        where = f"node {i} ({', '.join('%' + v.name for v in n.outputs)} = {n.op})"
        op = OPS.get(n.op)
        if op is None:
            raise VerifyError(f"{where}: unknown op {n.op!r}")
        for v in n.inputs:
            if v not in defined:
                raise VerifyError(f"{where}: input %{v.name} is not defined before use")
        try:
            if n.op == "const":
                arr = n.attrs.get("value")
                t = n.output.type
                if not isinstance(arr, np.ndarray) or arr.shape != t.shape or arr.dtype != t.dtype.np_dtype:
                    raise IRError(f"data {getattr(arr, 'dtype', type(arr))}{list(getattr(arr, 'shape', ()))} "
                                  f"does not match type {t}")
                if _CHECKED.get(id(arr)) is not arr or arr.flags.writeable:
                    try:
                        check_const(arr, t)
                    except ValueError as e:
                        raise IRError(f"data does not match type {t}: {e}") from None
                    if arr.flags.owndata and not arr.flags.writeable:   # cannot change: checked once
                        _CHECKED[id(arr)] = arr
                inferred = [t]
            else:
                op.check_arity(len(n.inputs))
                if op.normalize_attrs(n.attrs) != n.attrs:
                    raise IRError(f"attributes {n.attrs} are not normalized")
                inferred = op.infer(*[v.type for v in n.inputs], **n.attrs)
        except IRError as e:
            raise VerifyError(f"{where}: {e}") from None
        if len(inferred) != len(n.outputs):
            raise VerifyError(f"{where}: op gives {len(inferred)} results, node has {len(n.outputs)}")
        for v, t in zip(n.outputs, inferred):
            if v.type != t:
                raise VerifyError(f"{where}: result %{v.name} has type {v.type}, but the op gives {t}")
            define(v, where)
    for v in g.outputs:
        if v not in defined:
            raise VerifyError(f"graph @{g.name}: output %{v.name} is not defined")
        if v.dtype not in dt.IO:
            raise VerifyError(f"graph output %{v.name}: dtype {v.dtype} cannot be a model output")
    return g
