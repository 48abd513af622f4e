"""The compile context and the shorthands generated from the passes' fields
(compiler/passes/__init__.py Context and option, compiler/shorthand.py): a pass
option is one dataclass field and appears in the pipeline string,
``sqk.compile``, ``quantize_pipeline`` and the CLI from that definition."""
from __future__ import annotations

import argparse
import dataclasses
import inspect

import numpy as np
import pytest

import sqk
from sqk.compiler import PassManager, PipelineError, parse_pipeline
from sqk.compiler import shorthand
from sqk.compiler.calibration import Calibration
from sqk.compiler.driver import quantize_pipeline
from sqk.compiler.passes import PASSES, Context, option
from sqk.compiler.passes.quantize import Quantize

F32 = np.float32


def two_layer():
    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("two")
    x = b.input("x", (3, 64))
    h = b.relu(b.matmul(x, b.const(rng.standard_normal((64, 48)).astype(F32), name="w1")))
    return b.output(b.matmul(h, b.const(rng.standard_normal((48, 40)).astype(F32), name="w2")))


@pytest.fixture
def new_option(monkeypatch):
    """quantize with one more field, registered in place of the real pass for one test."""
    class Quantize2(Quantize):
        name = "quantize"
        new_knob: int = option(0, "a new option", choices=(0, 1, 2))
        new_flag: bool = False

    cls = dataclasses.dataclass(frozen=True)(Quantize2)
    monkeypatch.setitem(PASSES, "quantize", cls)
    return cls


def test_a_new_field_is_an_option_everywhere(new_option):
    assert quantize_pipeline("int4", new_knob=2, new_flag=True) == \
        "fold_constants,quantize{weights=int4,new_knob=2,new_flag=True},select_format,dce,fuse"
    p = parse_pipeline("quantize{new_knob=1,new_flag=true}")[0]
    assert isinstance(p, new_option) and p.new_knob == 1 and p.new_flag is True
    assert {"new_knob", "new_flag"} <= {q.name for q in shorthand.signature_parameters()}
    assert "``new_knob`` (quantize; default 0): a new option" in shorthand.options_doc()
    parser = argparse.ArgumentParser()
    shorthand.add_arguments(parser)
    args = parser.parse_args(["--quantize", "int8", "--new-knob", "2", "--new-flag", "--group", "16"])
    assert shorthand.parsed_options(args) == {"quantize": "int8", "new_knob": 2, "new_flag": True, "group": 16}
    with pytest.raises(SystemExit):
        parser.parse_args(["--new-knob", "5"])   # choices from option()
    with pytest.raises(PipelineError, match="new_knob= only apply with quantize="):
        shorthand.shorthand_pipeline(sparsify="2:4", new_knob=1)


def test_compile_signature_lists_every_option():
    params = inspect.signature(sqk.compile).parameters
    for keyword in shorthand.option_fields():
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY and params[keyword].default is None
        assert f"``{keyword}``" in sqk.compile.__doc__
    # renamed and shared keywords: quantize's method, one skip for both passes
    assert [sh.pass_name for sh, _ in shorthand.option_fields()["skip"]] == ["sparsify", "quantize"]
    assert shorthand.option_fields()["quantize_method"][0][1].name == "method"
    with pytest.raises(TypeError, match="unexpected keyword argument 'grup'"):
        sqk.compile(two_layer(), quantize="int4", grup=32)


def test_context_carries_calibration_and_collects_reports():
    g = two_layer()
    data = [{"x": np.random.default_rng(1).standard_normal((3, 64)).astype(F32)}]
    q, s = Quantize(weights="int4"), PASSES["sparsify"](pattern="2:4", method="wanda")
    ctx = Context(calibration=Calibration.of(data))
    PassManager([s, q], context=ctx).run(g)
    assert [p for p, _ in ctx.reports] == [s, q] and ctx.report_of(q)[0]["calibration"].startswith("calibration_data")
    assert not hasattr(q, "report")                 # passes stay stateless values
    with pytest.raises(PipelineError, match="method=wanda needs calibration data"):
        PassManager([PASSES["sparsify"](pattern="2:4", method="wanda")]).run(g)   # a context without any
    assert PassManager([Quantize()]).run(g) is not None   # direct runs without calibration still work
    assert Quantize().run(g).nodes                        # and without a context at all


def test_compile_takes_a_list_of_passes():
    g = two_layer()
    passes = parse_pipeline("fold_constants,quantize{weights=int8},select_format,dce,fuse")
    m = sqk.compile(g, pipeline=passes, progress=False)
    assert m.manifest["pipeline"] == "fold_constants,quantize,select_format,dce,fuse"
    assert m.report is not None and m.report.quantized() == ["w1", "w2"]
    with pytest.raises(PipelineError, match="holds Pass objects, got str"):
        sqk.compile(g, pipeline=["dce"])


def test_a_pass_declares_that_it_reads_calibration(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Reads(PASSES["dce"]):
        name = "t_reads"
        reads_calibration = True

        def run(self, graph, ctx=None):
            assert ctx.calibration is not None and ctx.target.name == "host"
            return graph

    monkeypatch.setitem(PASSES, "t_reads", Reads)
    g = two_layer()
    sqk.compile(g, pipeline="t_reads,fold_constants,dce,fuse", progress=False,
                calibration_data=[{"x": np.zeros((3, 64), F32)}])
    with pytest.raises(PipelineError, match="calibration_data= needs a quantize pass"):
        sqk.compile(g, pipeline="fold_constants,dce,fuse", calibration_data=[{"x": np.zeros((3, 64), F32)}])



def test_cli_flags_come_from_the_fields(tmp_path, capsys):
    """Flags the hand-written parser never had (--damp, --act-order, --min-bytes) reach the passes."""
    from sqk.compiler.cli import main

    g = two_layer()
    path, calib, out = str(tmp_path / "two.sqkir"), str(tmp_path / "calib.npz"), str(tmp_path / "o.sqk")
    sqk.save_ir(g, path)
    np.savez(calib, x=np.random.default_rng(2).standard_normal((4, 3, 64)).astype(F32))
    assert main(["compile", path, "-o", out, "--quantize", "int4", "--quantize-method", "gptq", "--damp", "0.05",
                 "--act-order", "--calibration", calib, "--min-bytes", "0", "--quiet"]) == 0
    assert sqk.load(out).manifest["pipeline"] == ("fold_constants,quantize{weights=int4,method=gptq,damp=0.05,"
                                                  "act_order=True},select_format{min_bytes=0},dce,fuse")
    assert main(["compile", path, "-o", out, "--damp", "0.05"]) == 1
    assert "damp= only apply with sparsify=\"PATTERN\" or quantize=\"int8\" or \"int4\"" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["compile", path, "-o", out, "--quantize", "int4", "--quantize-method", "gptq", "--clip", "mse",
                 "--fallback", "int8", "--promote", "w2", "--calibration", calib, "--quiet"]) == 0
    m = sqk.load(out)
    assert m.manifest["pipeline"] == ("fold_constants,quantize{weights=int4,fallback=int8,promote=w2,method=gptq,"
                                      "clip=mse},select_format,dce,fuse")
    assert [r["weights"] for r in m.report] == ["int4 g32 sym gptq", "int8 per-channel sym gptq"]
