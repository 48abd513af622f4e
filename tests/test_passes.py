"""Pipeline strings, the pass manager (verify, log, dump) and the simplifying
passes fold_constants and dce."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import sqk
from sqk.compiler import DEFAULT_PIPELINE, PASSES, Pass, PassManager, PipelineError, parse_pipeline
from sqk.compiler.passes.simplify import DeadCodeElimination, FoldConstants
from sqk.ir import GraphBuilder, VerifyError
from sqk.ir.graph import Node

from harness import rand


def spell(passes):
    return ",".join(p.spelling() for p in passes)


# --- pipeline strings -------------------------------------------------------------------------

def test_parse_pipeline():
    ps = parse_pipeline("fold_constants,dce")
    assert [type(p) for p in ps] == [FoldConstants, DeadCodeElimination]
    assert ps[0].limit == FoldConstants.limit
    assert spell(ps) == "fold_constants,dce"
    assert spell(parse_pipeline("  fold_constants ,\n dce  ")) == "fold_constants,dce"
    assert spell(parse_pipeline("dce,dce")) == "dce,dce"
    assert parse_pipeline("") == [] and parse_pipeline("  ") == []
    assert spell(parse_pipeline(DEFAULT_PIPELINE)) == DEFAULT_PIPELINE


@pytest.mark.parametrize("spec, limit, spelling", [
    ("fold_constants{limit=10}", 10, "fold_constants{limit=10}"),
    ("fold_constants{ limit = 10 }", 10, "fold_constants{limit=10}"),
    ("fold_constants {limit=-1}", -1, "fold_constants{limit=-1}"),
    ("fold_constants{}", FoldConstants.limit, "fold_constants"),
    (f"fold_constants{{limit={FoldConstants.limit}}}", FoldConstants.limit, "fold_constants"),
])
def test_parse_pipeline_options(spec, limit, spelling):
    (p,) = parse_pipeline(spec)
    assert isinstance(p, FoldConstants) and p.limit == limit and type(p.limit) is int
    assert p.spelling() == spelling
    assert spell(parse_pipeline(spelling)) == spelling  # the spelling parses back


@pytest.mark.parametrize("spec, message", [
    ("fold_constant", "unknown pass 'fold_constant' in pipeline 'fold_constant'; passes: "),
    ("dce,quantise", "unknown pass 'quantise'"),
    ("fold_constants{lmit=10}", "pass fold_constants: unknown option 'lmit'; options: limit"),
    ("dce{limit=10}", "pass dce: unknown option 'limit'; options: none"),
    ("fold_constants{limit=abc}", "pass fold_constants option limit: 'abc' is not a valid int"),
    ("fold_constants{limit=1.5}", "pass fold_constants option limit: '1.5' is not a valid int"),
    ("fold_constants{limit}", "pass fold_constants: option limit needs a value (limit=...)"),
    ("fold_constants{limit=}", "pass fold_constants: option limit needs a value"),
    ("fold_constants{limit=1,limit=2}", "pass fold_constants: option limit is given twice"),
    ("fold_constants dce", "malformed pipeline 'fold_constants dce' at column 16: expected ',' after fold_constants"),
    ("fold_constants,,dce", "malformed pipeline 'fold_constants,,dce' at column 16: expected a pass name"),
    (",dce", "at column 1: expected a pass name"),
    ("dce,", "at column 5: expected a pass name"),
    ("fold_constants{limit=10", "at column 15: '{' without a matching '}'"),
    ("fold_constants{limit={10}}", "at column 15: '{' without a matching '}'"),
    ("dce}", "at column 4: expected ',' after dce"),
    ("{limit=10}", "at column 1: expected a pass name"),
    ("dce;fold_constants", "at column 4: expected ',' after dce"),
    ("1dce", "at column 1: expected a pass name"),
])
def test_pipeline_errors(spec, message):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(spec)
    assert message in str(e.value), str(e.value)


@pytest.fixture
def options_pass(monkeypatch):
    """A pass with an option of every type, registered only for one test."""
    @dataclasses.dataclass(frozen=True)
    class Opts(Pass):
        name = "t_opts"
        n: int = 1
        x: float = 0.5
        flag: bool = False
        mode: str = "a"

        def run(self, graph, ctx=None):
            return graph

    monkeypatch.setitem(PASSES, "t_opts", Opts)
    return Opts


@pytest.mark.parametrize("opts, want", [
    ("n=3,x=1e-3,flag=true,mode=fast", dict(n=3, x=1e-3, flag=True, mode="fast")),
    ("flag=1", dict(flag=True)),
    ("flag=False", dict(flag=False)),
    ("flag=0,x=-2", dict(flag=False, x=-2.0)),
])
def test_option_types(options_pass, opts, want):
    (p,) = parse_pipeline(f"t_opts{{{opts}}}")
    for k, v in want.items():
        assert getattr(p, k) == v and type(getattr(p, k)) is type(v)


@pytest.mark.parametrize("opts, message", [
    ("flag=yes", "pass t_opts option flag: 'yes' is not a valid bool"),
    ("x=fast", "pass t_opts option x: 'fast' is not a valid float"),
    ("n=0x10", "pass t_opts option n: '0x10' is not a valid int"),
])
def test_option_type_errors(options_pass, opts, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(f"t_opts{{{opts}}}")


# --- fold_constants -------------------------------------------------------------------------------

def const_chain():
    """x + exp(-(c * 2)) reshaped and transposed: everything but the last add is constant."""
    b = GraphBuilder("chain")
    x = b.input("x", (3, 2))
    c = b.const(rand((2, 3)), name="c")
    two = b.const(np.array(2.0, np.float32), name="two")
    k = b.transpose(b.reshape(b.exp(b.neg(b.mul(c, two))), shape=(2, 3)))
    return b.output(b.add(x, k))


def run(passes, g):
    return PassManager(parse_pipeline(passes) if isinstance(passes, str) else passes).run(g)


def test_fold_constants_folds_a_const_chain():
    g = const_chain()
    folded = run("fold_constants", g)
    assert [n.op for n in folded.nodes] == ["const"] * 7 + ["add"]  # every const op became a const
    clean = run("dce", folded)
    assert [n.op for n in clean.nodes] == ["const", "add"]
    assert clean.nodes[1].inputs[0] is g.inputs[0]
    # the folded constant is what the reference computes, bit for bit
    x = rand((3, 2), rng=np.random.default_rng(1))
    np.testing.assert_array_equal(sqk.reference(clean, x=x), sqk.reference(g, x=x))
    env = sqk.ir.run_reference(g, {"x": x}, keep_all=True)
    k = clean.nodes[1].inputs[1]
    np.testing.assert_array_equal(clean.nodes[0].attrs["value"], env[k])
    assert not clean.nodes[0].attrs["value"].flags.writeable
    # the input graph is left alone
    assert [n.op for n in g.nodes] == ["const", "const", "mul", "neg", "exp", "reshape", "transpose", "add"]


def test_fold_constants_keeps_nodes_that_read_inputs():
    b = GraphBuilder()
    x = b.input("x", (4,))
    c = b.const(np.arange(4, dtype=np.float32))
    y = b.mul(b.exp(x), b.neg(c))   # exp(x) stays, neg(c) folds, mul stays
    g = b.output(b.add(y, x))
    out = run("fold_constants", g)
    assert [n.op for n in out.nodes] == ["const", "exp", "const", "mul", "add"]
    assert out.nodes[1] is g.nodes[1] and out.nodes[3] is g.nodes[3]
    x = rand((4,))
    np.testing.assert_array_equal(sqk.reference(out, x=x), sqk.reference(g, x=x))


def test_fold_constants_respects_its_limit():
    b = GraphBuilder()
    x = b.input("x", (1000,))
    small = b.neg(b.const(np.ones(2, np.float32)))                     # 8 bytes
    big = b.add(b.const(np.ones(1, np.float32)), b.const(np.zeros(1000, np.float32)))  # 4000 bytes
    g = b.output(b.add(x, big), small)
    assert [n.op for n in run("fold_constants{limit=10}", g).nodes] == \
        ["const", "const", "const", "const", "add", "add"]
    assert [n.op for n in run("fold_constants{limit=7}", g).nodes] == \
        ["const", "neg", "const", "const", "add", "add"]
    assert [n.op for n in run("fold_constants{limit=4000}", g).nodes] == ["const"] * 5 + ["add"]
    assert [n.op for n in run("fold_constants", g).nodes] == ["const"] * 5 + ["add"]


def test_fold_constants_folds_outputs_and_f16():
    b = GraphBuilder()
    c = b.const(rand((5,), "f16"))
    s = b.reduce_sum(b.sigmoid(c), keepdims=True)
    g = b.output(s, b.cast(s, to="f32"))
    out = run("fold_constants,dce", g)
    assert [n.op for n in out.nodes] == ["const", "const"]
    assert [v.type for v in out.outputs] == [v.type for v in g.outputs]
    for a, r in zip(sqk.reference(out), sqk.reference(g)):
        assert a.dtype == r.dtype
        np.testing.assert_array_equal(a, r)


def test_fold_constants_leaves_what_would_fail_at_run_time():
    b = GraphBuilder()
    table = b.const(np.arange(6, dtype=np.float32).reshape(3, 2))
    ids = b.const(np.array([0, 7], np.int64))  # 7 is out of range: the runtime reports it
    g = b.output(b.gather(table, ids), b.input("x", (1,)))
    out = run("fold_constants", g)
    assert [n.op for n in out.nodes] == ["const", "const", "gather"]


# --- dce ---------------------------------------------------------------------------------------------

def test_dce_removes_dead_nodes():
    b = GraphBuilder()
    x = b.input("x", (3,))
    unused_in = b.input("unused", (2,))
    b.const(np.ones(3, np.float32), name="dead_c")
    dead = b.exp(b.neg(x))
    b.relu(dead)
    b.neg(unused_in)
    live = b.sqrt(x)
    g = b.output(b.add(live, live), x)
    out = run("dce", g)
    assert [n.op for n in out.nodes] == ["sqrt", "add"]
    assert out.inputs == g.inputs  # inputs are the calling interface: kept even when unused
    x = rand((3,), low=0)
    for a, r in zip(sqk.reference(out, x=x, unused=rand((2,))), sqk.reference(g, x=x, unused=rand((2,)))):
        np.testing.assert_array_equal(a, r)
    assert run("dce", out) == out


def test_dce_keeps_order_and_everything_live():
    g = const_chain()
    out = run("dce", g)
    assert out == g and [n.op for n in out.nodes] == [n.op for n in g.nodes]


# --- the pass manager --------------------------------------------------------------------------

def big_const_graph():
    """Foldable, with a constant too large to print inline (so dumps need their .npz)."""
    b = GraphBuilder("dumped")
    x = b.input("x", (4, 32))
    w = b.const(rand((32, 8)), name="w")
    scale = b.const(np.full((8,), 0.5, np.float32), name="scale")
    b.const(np.zeros(3, np.float32), name="dead")
    ws = b.mul(w, scale)  # folds to a 32x8 constant
    return b.output(b.relu(b.matmul(x, ws)))


def test_dump_after_all(tmp_path):
    g = big_const_graph()
    lines = []
    out = PassManager(parse_pipeline("fold_constants,dce"), dump_after="all", dump_dir=str(tmp_path),
                      log=lines.append).run(g)
    assert sorted(os.listdir(tmp_path)) == [
        "000_input.sqkir", "000_input.sqkir.npz", "001_fold_constants.sqkir", "001_fold_constants.sqkir.npz",
        "002_dce.sqkir", "002_dce.sqkir.npz"]
    # each file is the graph after that step
    after_fold = FoldConstants().run(g)
    expected = {"000_input": g, "001_fold_constants": after_fold, "002_dce": DeadCodeElimination().run(after_fold)}
    for stem, want in expected.items():
        got = sqk.load_ir(str(tmp_path / f"{stem}.sqkir"))
        assert got == want, stem
        assert (tmp_path / f"{stem}.sqkir").read_text() == str(want)
    assert sqk.load_ir(str(tmp_path / "002_dce.sqkir")) == out
    assert len(lines) == 2 and not any("(unchanged)" in ln for ln in lines)


def test_dump_after_some_passes(tmp_path):
    g = big_const_graph()
    PassManager(parse_pipeline("fold_constants,dce"), dump_after="dce", dump_dir=str(tmp_path / "a")).run(g)
    assert sorted(os.listdir(tmp_path / "a")) == ["002_dce.sqkir", "002_dce.sqkir.npz"]
    PassManager(parse_pipeline("dce,fold_constants,dce"), dump_after=["input", "dce"],
                dump_dir=str(tmp_path / "b")).run(g)
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".sqkir")) == \
        ["000_input.sqkir", "001_dce.sqkir", "003_dce.sqkir"]


def test_dump_dir_defaults_to_sqk_dump(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    PassManager(parse_pipeline("dce"), dump_after="all").run(const_chain())
    assert sorted(os.listdir(tmp_path / "sqk-dump")) == ["000_input.sqkir", "001_dce.sqkir"]


def test_no_dump_without_dump_after(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    PassManager(parse_pipeline("fold_constants,dce"), dump_dir=str(tmp_path / "d")).run(const_chain())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dump_after, names", [("dec", "dec"), (["dce", "fold"], "fold"), (["x", "y"], "x, y")])
def test_dump_after_a_pass_not_in_the_pipeline(tmp_path, dump_after, names):
    with pytest.raises(PipelineError) as e:
        PassManager(parse_pipeline("fold_constants,dce"), dump_after=dump_after, dump_dir=str(tmp_path))
    assert str(e.value) == f"dump_after names {names}, which the pipeline does not run (fold_constants, dce)"
    assert os.listdir(tmp_path) == []


def test_log_says_unchanged():
    lines = []
    PassManager(parse_pipeline("fold_constants,dce,fold_constants{limit=16},dce"), log=lines.append).run(const_chain())
    assert len(lines) == 4
    assert [ln.split()[:2] for ln in lines] == [["[01]", "fold_constants"], ["[02]", "dce"],
                                                ["[03]", "fold_constants{limit=16}"], ["[04]", "dce"]]
    assert ["(unchanged)" in ln for ln in lines] == [False, False, True, True]
    assert all(ln.endswith(("ms", "ms  (unchanged)")) for ln in lines)


@dataclasses.dataclass(frozen=True)
class ZeroConstants(Pass):
    """Test pass: same nodes, names and types, new constant data."""
    name = "t_zero_constants"

    def run(self, graph, ctx=None):
        return graph.with_nodes([Node("const", (), n.outputs, {"value": np.zeros_like(n.attrs["value"])})
                                 if n.op == "const" else n for n in graph.nodes])


def test_log_sees_changes_to_constant_data():
    """Regression: the change test compared only the text, where big constants are @name."""
    lines = []
    g = const_chain()
    out = PassManager([ZeroConstants()], log=lines.append).run(g)
    assert out != g
    assert "(unchanged)" not in lines[0]
    lines.clear()
    PassManager([ZeroConstants()], log=lines.append).run(out)  # zeros again: nothing changes
    assert "(unchanged)" in lines[0]


@dataclasses.dataclass(frozen=True)
class Breaker(Pass):
    """Test pass: returns a graph whose node claims the wrong type."""
    name = "t_breaker"

    def run(self, graph, ctx=None):
        n = graph.nodes[-1]
        bad = sqk.Value(n.output.name, sqk.TensorType("f16", n.output.shape))
        return sqk.Graph(graph.name, graph.inputs, graph.nodes[:-1] + [Node(n.op, n.inputs, (bad,), n.attrs)], [bad])


def test_pass_manager_verifies_after_each_pass(tmp_path):
    with pytest.raises(VerifyError, match=r"result %\d+ has type f16\[3,2\], but the op gives f32\[3,2\]"):
        PassManager([DeadCodeElimination(), Breaker()], dump_after="all", dump_dir=str(tmp_path)).run(const_chain())
    assert sorted(os.listdir(tmp_path)) == ["000_input.sqkir", "001_dce.sqkir"]  # nothing dumped for the bad pass


def test_pass_manager_verifies_its_input():
    g = const_chain()
    g.nodes = g.nodes[1:]  # drop the definition of %c
    with pytest.raises(VerifyError, match="input %c is not defined before use"):
        PassManager(parse_pipeline("dce")).run(g)


def test_compile_dumps_every_pass(tmp_path):
    # elementwise only: this test is about the pipeline, not about a kernel family
    b = GraphBuilder("e2e")
    x = b.input("x", (4, 64))
    w = b.mul(b.const(rand((64,)), name="w"), b.const(np.full((64,), 0.5, np.float32), name="scale"))
    b.exp(x)  # dead
    g = b.output(b.relu(b.add(x, w)))
    lines = []
    m = sqk.compile(g, dump_after="all", dump_dir=str(tmp_path), log=lines.append)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".sqkir"))
    assert files == ["000_input.sqkir", "001_fold_constants.sqkir", "002_select_format.sqkir", "003_dce.sqkir",
                     "004_fuse.sqkir"]
    assert sqk.load_ir(str(tmp_path / "000_input.sqkir")) == g
    assert sqk.load_ir(str(tmp_path / files[-1])) == m.ir
    assert [n.op for n in m.ir.nodes] == ["const", "fused"]      # add + relu: one kernel
    assert [n.op for n in m.ir.nodes[1].attrs["body"].nodes] == ["add", "relu"]
    assert any(ln.startswith("[01] fold_constants") for ln in lines)
    x = rand((4, 64))
    np.testing.assert_array_equal(m(x=x), sqk.reference(g, x=x))
