"""Reshapes as views (compiler/memory.py): a reshape's output shares its
input's buffer and gets no kernel, for arena values, graph inputs and outputs
and plain constants; a reshape that is a graph output still copies into the
caller's buffer; a value and its views are one buffer for liveness and for
in-place writes."""
from __future__ import annotations

import numpy as np

from harness import check, rand, target_param
from sqk.codegen.lower import BUF_ARENA, BUF_CONST, BUF_INPUT, BUF_OUTPUT, pack_constants
from sqk.compiler.memory import plan_memory
from sqk.ir import GraphBuilder

PIPE = "dce"  # no folding or fusing: each op is its own kernel


def ops(m):
    """The op of each kernel of a compiled module, in run order."""
    return [k["name"].split("_", 1)[1] for k in m.manifest["kernels"]]


def plan(g):
    return plan_memory(g, pack_constants(g))


@target_param
def test_reshape_between_ops_is_free(target):
    b = GraphBuilder("between")
    x = b.input("x", (6, 8))
    t = b.exp(x)
    r = b.reshape(t, shape=(4, 12))
    g = b.output(b.neg(r))
    m = check(g, {"x": rand((6, 8))}, target, pipeline=PIPE)
    assert ops(m) == ["exp", "neg"]
    assert all("bytes" in k for k in m.manifest["kernels"])  # costs still matched to kernels
    p = plan(g)
    assert p.buffers[r] == p.buffers[t] and p.buffers[t][0] == BUF_ARENA and r in p.views
    # a view is counted in the no-sharing baseline, like a value written in place
    assert p.intermediate_bytes == 2 * 6 * 8 * 4 and p.arena_bytes == 6 * 8 * 4


@target_param
def test_reshape_of_input_and_constant(target):
    b = GraphBuilder("sources")
    x = b.input("x", (2, 3, 4))
    c = b.const(rand((4, 6), rng=np.random.default_rng(1)))
    rx = b.reshape(x, shape=(4, 6))
    rc = b.reshape(c, shape=(24,))
    g = b.output(b.add(rx, b.reshape(rc, shape=(4, 6))))
    m = check(g, {"x": rand((2, 3, 4))}, target, pipeline=PIPE)
    assert ops(m) == ["add"]
    p = plan(g)
    assert p.buffers[rx] == (BUF_INPUT, 0) and p.buffers[rc] == p.buffers[c] and p.buffers[c][0] == BUF_CONST


@target_param
def test_reshape_that_is_an_output_copies(target):
    """The caller's output buffers never alias its inputs or each other."""
    b = GraphBuilder("outs")
    x = b.input("x", (3, 4))
    t = b.exp(x)
    g = b.output(t, b.reshape(t, shape=(12,)), b.reshape(x, shape=(2, 6)))
    m = check(g, {"x": rand((3, 4))}, target, pipeline=PIPE)
    assert ops(m) == ["exp", "reshape", "reshape"]
    assert not plan(g).views


@target_param
def test_reshape_of_an_output(target):
    b = GraphBuilder("of_output")
    x = b.input("x", (3, 4))
    t = b.exp(x)
    r = b.reshape(t, shape=(12,))
    g = b.output(t, b.neg(r))
    m = check(g, {"x": rand((3, 4))}, target, pipeline=PIPE)
    assert ops(m) == ["exp", "neg"]
    assert plan(g).buffers[r] == (BUF_OUTPUT, 0)


@target_param
def test_reshape_chain_collapses(target):
    b = GraphBuilder("chain")
    x = b.input("x", (4, 6), "i32")
    t = b.neg(x)
    r1 = b.reshape(t, shape=(24,))
    r2 = b.reshape(r1, shape=(2, 12))
    r3 = b.reshape(r2, shape=(2, 3, 4))
    g = b.output(b.add(r3, b.reshape(x, shape=(2, 3, 4))))
    m = check(g, {"x": rand((4, 6), "i32")}, target, pipeline=PIPE)
    assert ops(m) == ["neg", "add"]
    p = plan(g)
    assert p.buffers[r1] == p.buffers[r2] == p.buffers[r3] == p.buffers[t]


@target_param
def test_in_place_waits_for_the_last_view(target):
    """``neg`` is the last reader of ``t`` but not of its view ``r``: it must not
    write over ``t``'s slot, which ``r`` still needs."""
    b = GraphBuilder("hazard")
    x = b.input("x", (2, 6))
    t = b.exp(x)
    r = b.reshape(t, shape=(3, 4))
    u = b.neg(t)
    w = b.mul(b.reshape(u, shape=(3, 4)), r)
    g = b.output(b.tanh(w))
    m = check(g, {"x": rand((2, 6))}, target, pipeline=PIPE)
    assert ops(m) == ["exp", "neg", "mul", "tanh"]
    p = plan(g)
    assert p.buffers[u] != p.buffers[t] and p.buffers[r] == p.buffers[t]
    assert p.buffers[w] in (p.buffers[t], p.buffers[u])  # the group dies at mul: in place again


@target_param
def test_in_place_through_a_dying_view(target):
    """A map whose input is the last use of a view (and of its root) writes in place."""
    b = GraphBuilder("through")
    x = b.input("x", (5, 4))
    t = b.exp(x)
    r = b.reshape(t, shape=(20,))
    u = b.neg(r)
    g = b.output(b.add(u, b.input("y", (20,))))
    m = check(g, {"x": rand((5, 4)), "y": rand((20,))}, target, pipeline=PIPE)
    assert ops(m) == ["exp", "neg", "add"]
    p = plan(g)
    assert p.buffers[u] == p.buffers[t] and p.arena_bytes == 128


def test_views_off_keeps_copies():
    b = GraphBuilder("off")
    x = b.input("x", (6, 8))
    r = b.reshape(b.exp(x), shape=(48,))
    g = b.output(b.neg(r))
    p = plan_memory(g, views=False)
    assert not p.views and p.buffers[r] != p.buffers[g.nodes[0].output]
