"""The numpy reference interpreter: the meaning of a graph."""
from __future__ import annotations

import numpy as np

from .graph import Graph
from .ops import OPS


def check_inputs(specs, inputs: dict) -> dict:
    """Check call inputs against ``specs`` [(name, numpy dtype, shape)]; returns
    C-contiguous arrays in spec order.  Raises ValueError/TypeError naming the
    input and what was expected."""
    names = [name for name, _, _ in specs]
    unknown = [k for k in inputs if k not in names]
    if unknown:
        raise ValueError(f"unknown input(s) {', '.join(unknown)}; the model takes {', '.join(names)}")
    missing = [k for k in names if k not in inputs]
    if missing:
        raise ValueError(f"missing input(s) {', '.join(missing)}")
    out = {}
    for name, dtype, shape in specs:
        a = inputs[name]
        if isinstance(a, np.generic):  # a numpy scalar is a 0-d array
            a = np.asarray(a)
        if not isinstance(a, np.ndarray):
            raise TypeError(f"input {name!r}: expected a numpy array, got {type(a).__name__}")
        if a.dtype != dtype:
            raise TypeError(f"input {name!r}: dtype {a.dtype}, expected {np.dtype(dtype)}")
        if a.shape != tuple(shape):
            raise ValueError(f"input {name!r}: shape {a.shape}, expected {tuple(shape)}")
        out[name] = np.asarray(a, order="C")  # copies views; keeps 0-d shapes
    return out


def io_specs(values) -> list:
    return [(v.name, v.dtype.np_dtype, v.shape) for v in values]


def run_reference(g: Graph, inputs: dict, keep_all: bool = False):
    """Evaluate ``g``; returns the outputs (or, with keep_all, every value)."""
    env = {v: a for v, a in zip(g.inputs, check_inputs(io_specs(g.inputs), inputs).values())}
    for n in g.nodes:
        op = OPS[n.op]
        with np.errstate(all="ignore"):
            res = op.reference(*[env[v] for v in n.inputs], **n.attrs)
        for v, r in zip(n.outputs, res):
            r = np.asarray(r)
            assert r.shape == v.shape and r.dtype == v.dtype.np_dtype, (n.op, r.shape, r.dtype, v.type)
            env[v] = r
    return env if keep_all else [env[v] for v in g.outputs]


def reference(g: Graph, **inputs):
    """Run ``g`` on numpy arrays; one array, or a tuple for several outputs."""
    outs = run_reference(g, inputs)
    return outs[0] if len(outs) == 1 else tuple(outs)
