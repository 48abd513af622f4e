"""Numeric tests of the gather kernel (codegen/gather.py): axis 0 (the
embedding lookup), a middle and the last axis, negative ids, i32 and i64 ids,
every table dtype, and out-of-range ids, which must fail with
SQK_ERR_INDEX (a SqkRuntimeError naming the gather kernel) instead of
reading outside the table."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.ir import dtypes as dt
from harness import assert_close, check, compile_for, rand, target_param


def ids_for(n, shape, dtype, rng):
    """ids in [-n, n), with both ends planted."""
    ids = rng.integers(-n, n, size=shape).astype(dtype)
    flat = ids.reshape(-1)
    flat[:2] = [-n, n - 1][:flat.size]
    return ids


def gather_graph():
    """Several gathers in one graph: axis 0/1/last, i64 and i32 ids, and table dtypes."""
    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("gather")
    inputs = {
        "emb": rand((50, 37), rng=rng),                      # rows of an odd length
        "t3": rand((3, 10, 5), "f16", rng),
        "tb": rand((4, 11), "bool", rng),
        "ti8": rand((6, 2, 3), "i8", rng),
        "ti64": rand((9,), "i64", rng),
        "ids64": ids_for(50, (2, 7), np.int64, rng),
        "ids32": ids_for(10, (3, 2), np.int32, rng),
        "col": ids_for(11, (4,), np.int64, rng),
        "few": ids_for(6, (5,), np.int32, rng),
        "flat": ids_for(9, (3, 1, 2), np.int64, rng),
    }
    v = {n: b.input(n, a.shape, dt.dtype(a.dtype)) for n, a in inputs.items()}
    g = b.output(
        b.gather(v["emb"], v["ids64"], name="axis0_i64"),
        b.gather(v["emb"], v["ids32"], name="axis0_i32"),
        b.gather(v["t3"], v["ids32"], axis=1, name="axis1_f16"),
        b.gather(v["tb"], v["col"], axis=-1, name="last_axis_bool"),
        b.gather(v["ti8"], v["few"], axis=0, name="axis0_i8"),
        b.gather(v["ti64"], v["flat"], name="rank1_i64"),
    )
    return g, inputs


@target_param
def test_gather(target):
    g, inputs = gather_graph()
    check(g, inputs, target)


@target_param
@pytest.mark.parametrize("bad", ["too_big", "too_negative"])
def test_gather_out_of_range(target, bad):
    """An id outside [-n, n) fails the run with SQK_ERR_INDEX, naming the kernel."""
    rng = np.random.default_rng(1)
    b = sqk.GraphBuilder("gather_oob")
    t, ids = b.input("t", (8, 4)), b.input("ids", (2, 3), "i32")
    g = b.output(b.gather(t, ids, axis=0))
    m = compile_for(g, target)
    table, good = rand((8, 4), rng=rng), ids_for(8, (2, 3), np.int32, rng)
    assert_close(m(t=table, ids=good), sqk.reference(g, t=table, ids=good))
    badids = good.copy()
    badids[1, 2] = 8 if bad == "too_big" else -9
    with pytest.raises(sqk.SqkRuntimeError, match=r"gather.*index out of range"):
        m(t=table, ids=badids)


def test_embedding_lookup_threaded():
    """The main use: [1, 128] ids into a [32000, 768] table, split over threads."""
    rng = np.random.default_rng(2)
    b = sqk.GraphBuilder("embedding")
    t, ids = b.input("table", (32000, 768)), b.input("ids", (1, 128), "i64")
    g = b.output(b.gather(t, ids))
    table = rng.standard_normal((32000, 768), dtype=np.float32)
    m = check(g, {"table": table, "ids": ids_for(32000, (1, 128), np.int64, rng)}, "host", threads=2)
    k = m.manifest["kernels"][0]
    assert k["range"] == 128 and k["range"] > k["grain"]


def test_gather_empty():
    b = sqk.GraphBuilder("gather_empty")
    t, ids, e = b.input("t", (5, 3)), b.input("ids", (0,), "i64"), b.input("e", (0, 3))
    g = b.output(b.gather(t, ids, name="no_ids"), b.gather(e, ids, name="empty_table_no_ids"))
    check(g, {"t": rand((5, 3)), "ids": np.zeros((0,), np.int64), "e": np.zeros((0, 3), np.float32)}, "host")


def test_gather_from_empty_table_fails():
    b = sqk.GraphBuilder("gather_nothing")
    t, ids = b.input("t", (0, 3)), b.input("ids", (2,), "i64")
    m = compile_for(b.output(b.gather(t, ids)), "host")
    with pytest.raises(sqk.SqkRuntimeError, match="gather"):
        m(t=np.zeros((0, 3), np.float32), ids=np.zeros(2, np.int64))


def test_shared_gather_kernel_names_its_own_ids():
    """Two gathers of one signature share a kernel (codegen/lower.py); each step's
    out-of-range message still names its own id input."""
    b = sqk.GraphBuilder("gather_shared")
    t, a, c = b.input("t", (8, 4)), b.input("ida", (3,), "i64"), b.input("idc", (3,), "i64")
    m = sqk.compile(b.output(b.gather(t, a), b.gather(t, c)), target="host")
    table, good = rand((8, 4)), np.array([0, 7, -8], np.int64)
    with pytest.raises(sqk.SqkRuntimeError, match=r"every id in %idc must lie in \[-8, 8\).*got idc = \[0, 8, 1\]"):
        m(t=table, ida=good, idc=np.array([0, 8, 1], np.int64))
    with pytest.raises(sqk.SqkRuntimeError, match=r"every id in %ida must lie in \[-8, 8\).*got ida = \[9, 0, 0\]"):
        m(t=table, ida=np.array([9, 0, 0], np.int64), idc=good)
