"""ONNX conformance: the ``onnx.backend.test`` node tests of every operator the
importer claims (``supported_ops()``), run through a thin backend adapter
(prepare = from_onnx + sqk.compile on the host, run = call the module).

The node tests come from ``onnx.backend.test.case.node.collect_testcases``
(the generators behind ``onnx/backend/test/data/node``; the wheel here ships
no data files).  A case is selected when every op in its graph is claimed
(so the ``*_expanded`` function-body variants run too).  Cases that sqk
cannot run are listed, with the reason, in EXCEPTIONS below (the README's
ONNX section has the same list); each one is checked to still fail, so the
list cannot go stale.

Node tests feed shapes, axes, pads, scales ... as graph inputs, which sqk
needs at import time: the adapter binds those inputs (``static_inputs``) to
the values of the run and compiles once per distinct binding.

The full set (~600 cases, a compile each) runs with ``-m slow``; the default
run takes the first REPRESENTATIVE cases of every op.
"""
from __future__ import annotations

import fnmatch
import functools
import re
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx.backend.base import Backend, BackendRep  # noqa: E402

import sqk  # noqa: E402
from sqk.compiler.frontends.onnx import OnnxImportError, from_onnx, static_inputs, supported_ops  # noqa: E402

# Cases sqk does not run, by name pattern -> reason.  Kept in sync with README.md (ONNX import).
EXCEPTIONS = {
    "test_*_DOUBLE*|test_*_double*|test_*float64*|test_*_BFLOAT16*|test_*bfloat16*|test_*_FLOAT8*|test_*FLOAT4*"
    "|test_*_INT4*|test_*_UINT4*|test_*_INT2*|test_*_UINT2*|test_*e4m3fn*|test_*e5m2*|test_*float4e2m1*"
    "|test_*_int16*|test_*_uint16*|test_*_uint32*|test_*_uint64*|test_*int4*|test_*uint4*|test_*int2*|test_*uint2*"
    "|test_*_STRING*|test_*_string*|test_*_e8m0_*|test_*FLOAT8E8M0*":
        "dtype sqk does not have (f64, bf16, float8/4, int2/4 tensors, 16-bit ints, u32, u64, strings)",
    "test_averagepool_3d*|test_maxpool_3d*": "3-D pooling (sqk has 1-D and 2-D)",
    "test_identity_sequence|test_identity_opt": "sequence and optional types (sqk has tensors only)",
    "test_reduce_max_empty_set*": "ReduceMax over an empty axis (-inf; reduce_max requires a non-empty axis)",
    "test_averagepool_2d_dilations": "AveragePool with dilations (avgpool2d has none)",
    "test_maxpool_with_argmax_*": "MaxPool's Indices output",
    "test_maxpool_2d_uint8": "pooling of integers (maxpool2d is float only)",
    "test_batchnorm_*_training_mode": "BatchNormalization in training mode",
    "test_div_int*|test_div_uint8": "integer Div of run-time values (div is float only)",
    "test_pow_types_int*": "Pow with an integer base (pow is float only)",
    "test_quantizelinear*": "QuantizeLinear of run-time values (only constant weights fold at import)",
    "test_resize_*_cubic*|test_resize_*_linear*|test_resize_tf_crop_and_resize*": "Resize modes other than nearest",
}
# Claimed ops none of whose node tests can run, and where they are tested instead.
NO_NODE_TESTS = {"QuantizeLinear": "its node tests quantize run-time inputs; the importer folds QuantizeLinear of "
                                   "constant weights (tests/test_onnx_import.py)"}
# How many cases per op the default (not slow) run takes.
REPRESENTATIVE = 1


def is_exception(name: str) -> str | None:
    for pats, why in EXCEPTIONS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in pats.split("|")):
            return why
    return None


class SqkRep(BackendRep):
    def __init__(self, model):
        self.model = model
        inits = {t.name for t in model.graph.initializer}
        self.names = [v.name for v in model.graph.input if v.name not in inits]
        self.static = static_inputs(model)
        self.modules = {}

    def run(self, inputs, **kwargs):
        arrays = [onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)
                  for x in inputs]
        named = dict(zip(self.names, arrays))
        bound = {k: named.pop(k) for k in self.static}
        key = tuple((k, v.dtype.str, v.shape, v.tobytes()) for k, v in bound.items())
        if key not in self.modules:
            g = from_onnx(self.model, input_values=bound)
            self.modules[key] = (g, sqk.compile(g))
        g, m = self.modules[key]
        outs = m(**{v.name: named[n] for v, n in zip(g.inputs, [n for n in self.names if n in named])})
        return outs if isinstance(outs, tuple) else (outs,)


class SqkBackend(Backend):
    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        super().prepare(model, device, **kwargs)
        return SqkRep(model)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


def _op_of(case) -> str:
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    m = re.match(r"test_([a-z_]+?)(?:_expanded|$|_)", case.name)
    return "expanded:" + (m.group(1) if m else case.name)


@functools.lru_cache(maxsize=1)
def node_cases() -> dict[str, list]:
    """Claimed op -> its node test cases (every op of the case's graph claimed)."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    claimed = set(supported_ops())
    by_op: dict[str, list] = {}
    for c in cases:
        if {n.op_type for n in c.model.graph.node} <= claimed:
            by_op.setdefault(_op_of(c), []).append(c)
    return by_op


def run_case(case) -> None:
    rep = SqkBackend.prepare(case.model)
    for inputs, expected in case.data_sets:
        outs = rep.run(inputs)
        assert len(outs) == len(expected), f"{len(outs)} outputs, expected {len(expected)}"
        for o, e in zip(outs, expected):
            e = onnx.numpy_helper.to_array(e) if isinstance(e, onnx.TensorProto) else np.asarray(e)
            assert o.dtype == e.dtype, f"dtype {o.dtype}, expected {e.dtype}"
            np.testing.assert_allclose(o, e, rtol=case.rtol, atol=case.atol)


PASSED: list[str] = []


def run_op(op: str, limit: int | None, capsys) -> None:
    cases = node_cases().get(op, [])
    ran = [c for c in cases if not is_exception(c.name)][:limit]
    if not ran and op in NO_NODE_TESTS:
        pytest.skip(NO_NODE_TESTS[op])
    assert ran, f"no runnable node test of {op}"
    failures = []
    for c in ran:
        try:
            run_case(c)
            PASSED.append(c.name)
        except (AssertionError, OnnxImportError, sqk.SqkRuntimeError, ValueError) as e:
            failures.append(f"{c.name}: {type(e).__name__}: {str(e).strip()[:400]}")
    if limit is None:  # the exceptions must still fail, or the list is stale
        for c in cases:
            if is_exception(c.name):
                try:
                    run_case(c)
                except Exception:
                    continue
                failures.append(f"{c.name} is listed in EXCEPTIONS ({is_exception(c.name)}) but passes")
    with capsys.disabled():
        print(f" [onnx node tests {op}: {len(ran) - len(failures)}/{len(ran)} passed, "
              f"{len(PASSED)} in this session]", end="")
    assert not failures, "\n".join(failures)


# Parametrized by op name; the ids are fixed at collection from the importer's claims
# (collecting the cases themselves costs ~12 s, so it happens in the first test only).
OPS = sorted(o for o in supported_ops() if "::" not in o)


@pytest.mark.parametrize("op", OPS)
def test_node_representative(op, capsys):
    run_op(op, REPRESENTATIVE, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS + ["expanded"])
def test_node_full(op, capsys):
    if op == "expanded":
        for key in sorted(k for k in node_cases() if k.startswith("expanded:")):
            run_op(key, None, capsys)
    else:
        run_op(op, None, capsys)


def test_every_claimed_op_has_node_tests():
    """Each claimed op (apart from the com.microsoft ones, which onnx does not
    test) has at least one node test that runs."""
    cases = node_cases()
    missing = [op for op in OPS if op not in NO_NODE_TESTS
               and not [c for c in cases.get(op, []) if not is_exception(c.name)]]
    assert not missing, f"claimed ops without a runnable node test: {missing}"
