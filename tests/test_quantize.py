"""Weight quantization: the math (compiler/quantize.py), the quantize pass and
its accuracy report, the compile(quantize=...) shorthand and CLI flags, and
the conversion to and from ONNX Runtime's MatMulNBits."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from sqk.compiler import PassManager, PipelineError, parse_pipeline
from sqk.compiler.cli import main
from sqk.compiler.driver import quantize_pipeline
from sqk.compiler.models import transformer_mlp
from sqk.compiler.calibration import Calibration, CalibrationError
from sqk.compiler.onnx_nbits import from_matmul_nbits, to_matmul_nbits
from sqk.compiler.passes import Context
from sqk.compiler.passes.quantize import QuantReport, Quantize
from sqk.compiler.quantize import (activation_scale, dequantize, fake_quant_i8, layer_error, output_error,
                                   quantize_weight)
from sqk.ir.reference import run_reference
from sqk.ir.sparsity import holds, parse_format
from sqk.runtime.module import ArtifactError

F32 = np.float32


def run_pipeline(g, spec):
    pm = PassManager(parse_pipeline(spec))
    out = pm.run(g)
    reports = [r for p, r in pm.context.reports if isinstance(p, Quantize)]
    return out, reports[-1] if reports else None


def calibrated(passes, data) -> PassManager:
    """A pass manager whose context holds calibration ``data``, as compile(calibration_data=...) makes."""
    return PassManager(passes, context=Context(calibration=Calibration.of(data)))


def two_layer(k=64, n=48, m=40, seed=0, w1=None, w2=None, dtype="f32"):
    rng = np.random.default_rng(seed)
    b = sqk.GraphBuilder("two")
    x = b.input("x", (3, k), dtype)
    w1 = rng.standard_normal((k, n)).astype(F32) if w1 is None else w1
    w2 = rng.standard_normal((n, m)).astype(F32) if w2 is None else w2
    h = b.relu(b.matmul(x, b.const(w1, dtype, name="w1")))
    return b.output(b.matmul(h, b.const(w2, dtype, name="w2")))


def kernels_available() -> bool:
    import sqk.codegen.families  # noqa: F401  (registers the emitters)
    from sqk.codegen.lower import EMITTERS

    return "matmul_q" in EMITTERS


needs_kernels = pytest.mark.skipif(not kernels_available(), reason="matmul_q kernels not yet available")


# --- the math ---------------------------------------------------------------------------------

def test_int4_sym_exact_with_ties_to_even():
    # max|w| = 7 in each group gives scale 1 exactly, so halves are true ties
    w = np.array([[7, -1], [2.5, 0.5], [3.5, -7], [-2.5, 1.5],
                  [-3.5, 0], [7, 0], [0, 0]], F32)
    q, s, z = quantize_weight(w, bits=4, group=4)
    assert z is None and q.dtype == np.int8 and s.dtype == np.float32
    np.testing.assert_array_equal(q, [[7, -1], [2, 0], [4, -7], [-2, 2], [-4, 0], [7, 0], [0, 0]])
    # the second group is the shorter last one (rows 4..6); its column 1 is all zero: scale 1
    np.testing.assert_array_equal(s, [[1, 1], [1, 1]])
    q, s, _ = quantize_weight(np.array([[1], [0.5], [-0.25]], F32), bits=4)
    assert s[0, 0] == F32(1) / F32(7) and q[:, 0].tolist() == [7, 3, -2]  # 0.5 / f32(1/7) = 3.4999998


def test_int8_sym_per_channel_exact():
    w = np.array([[127, -2], [0.5, 1.1], [-1.5, 0.25]], F32)
    q, s, z = quantize_weight(w, bits=8)
    assert z is None and s.shape == (1, 2)
    np.testing.assert_array_equal(s, [[1, F32(2) / F32(127)]])
    assert q[:, 0].tolist() == [127, 0, -2]        # 0.5 -> 0 and -1.5 -> -2: half to even
    assert q[:, 1].tolist() == [-127, 70, 16]      # 1.1 * 63.5 = 69.85, 0.25 * 63.5 = 15.875


def test_asym_exact():
    w = np.array([[10], [-5], [0.5], [1.5], [0]], F32)  # lo -5, hi 10: scale 1, zero point -8 - (-5) = -3
    q, s, z = quantize_weight(w, bits=4, scheme="asym")
    assert s.tolist() == [[1.0]] and z.tolist() == [[-3]] and z.dtype == np.int8
    assert q[:, 0].tolist() == [7, -8, -3, -1, -3]
    np.testing.assert_array_equal(dequantize(q, s, z, 5)[:, 0], [10, -5, 0, 2, 0])
    w8 = np.array([[255], [0], [100.5]], F32)  # lo 0, hi 255: scale 1, zero -128
    q8, s8, z8 = quantize_weight(w8, bits=8, scheme="asym")
    assert s8.tolist() == [[1.0]] and z8.tolist() == [[-128]] and q8[:, 0].tolist() == [127, -128, -28]


@pytest.mark.parametrize("bits, scheme, group", [(8, "sym", None), (8, "asym", None), (4, "sym", 32),
                                                 (4, "asym", 32), (4, "sym", 64), (8, "sym", 16)])
@pytest.mark.parametrize("scale_dtype", ["f32", "f16"])
def test_ranges_and_error_bound(bits, scheme, group, scale_dtype):
    rng = np.random.default_rng(bits + len(scheme))
    w = (rng.standard_normal((100, 30)) * np.exp(rng.standard_normal(30))).astype(F32)  # varied column scales
    q, s, z = quantize_weight(w, bits, group, scheme, scale_dtype)
    g = group or 100
    assert s.shape == (-(-100 // g), 30) and s.dtype == np.dtype(scale_dtype.replace("f", "float"))
    lo, hi = {(8, "sym"): (-127, 127), (8, "asym"): (-128, 127), (4, "sym"): (-7, 7), (4, "asym"): (-8, 7)}[bits, scheme]
    assert lo <= q.min() and q.max() <= hi
    if scheme == "sym":
        assert q.min() == lo or q.max() == hi  # max|w| maps to the extreme code
    if z is not None:
        assert z.shape == s.shape and z.min() >= lo and z.max() <= hi
    # round-to-nearest with no clipping: every weight within half a step of its dequantized value
    step = s.astype(np.float64)[np.arange(100) // g]
    err = np.abs(dequantize(q, s, z, g).astype(np.float64) - w)
    slack = 1e-5 if scale_dtype == "f32" else 0.02  # an f16 scale's rounding can clip by a fraction of a step
    assert (err <= (0.5 + slack) * step).all()


def test_zero_groups_and_padded_last_group():
    w = np.zeros((40, 3), F32)
    w[:32, 1] = np.linspace(-1, 1, 32)
    w[32:, 1] = 1e-3 * np.arange(8)          # last group (8 rows): its own small scale
    w[32:, 2] = 5.0                          # column 2: first group all zero
    for scheme in ("sym", "asym"):
        q, s, z = quantize_weight(w, 4, 32, scheme)
        assert s.shape == (2, 3) and s[0, 0] == 1 and s[1, 0] == 1 and s[0, 2] == 1   # zero groups: scale 1
        zz = np.zeros_like(s, np.int8) if z is None else z
        assert (q[:, 0] == zz[np.arange(40) // 32, 0]).all()    # zero weights -> code == zero point
        d = dequantize(q, s, z, 32)
        assert (d[:, 0] == 0).all() and (d[:32, 2] == 0).all()
        assert s[1, 1] == F32(7e-3) / F32(7 if scheme == "sym" else 15)  # from rows 32..39 only
        np.testing.assert_allclose(d[32:, 1], w[32:, 1], atol=float(s[1, 1]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_names_the_constant(bad):
    w = np.ones((8, 4), F32)
    w[3, 2] = bad
    with pytest.raises(ValueError, match=r"constant w_up has 1 non-finite weight.*\[3, 2\]"):
        quantize_weight(w, 4, 4, name="w_up")


def test_math_argument_errors():
    w = np.ones((8, 4), F32)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_weight(w, bits=3)
    with pytest.raises(ValueError, match="scheme must be"):
        quantize_weight(w, scheme="nf4")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_weight(np.ones(8, F32))
    with pytest.raises(ValueError, match="group must be a positive"):
        quantize_weight(w, group=0)
    with pytest.raises(ValueError, match="too large for f16 scales"):
        quantize_weight(np.full((4, 1), 1e9, F32), scale_dtype="f16", name="big")


def test_f16_scales_are_the_ones_codes_were_computed_with():
    w = np.random.default_rng(3).standard_normal((64, 8)).astype(F32)
    q, s, _ = quantize_weight(w, 4, 32, scale_dtype="f16")
    expect = np.clip(np.rint(w / s.astype(F32)[np.arange(64) // 32]), -7, 7)
    np.testing.assert_array_equal(q, expect)


def test_output_error():
    assert output_error(np.zeros(3), np.zeros(3)) == (0.0, 1.0)
    assert output_error(np.zeros(3), np.ones(3)) == (float("inf"), 0.0)
    rel, cos = output_error(np.array([3.0, 4.0]), np.array([3.0, 4.5]))
    assert rel == pytest.approx(0.1) and cos == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))


# --- the pass -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, qdtype, zeros, group", [
    ("quantize", "i8", False, 64), ("quantize{weights=int8,scheme=asym}", "i8", True, 64),
    ("quantize{weights=int4}", "i4", False, 32), ("quantize{weights=int4,group=128,scheme=asym,scale_dtype=f16}",
                                                  "i4", True, 128),
    ("quantize{weights=int4,group=24}", "i4", False, 24)])
def test_pass_rewrites_and_text_round_trips(spec, qdtype, zeros, group):
    g = two_layer(k=64, n=48, m=40)
    q, report = run_pipeline(g, spec + ",dce")
    text = q.to_text()
    assert text.count("matmul_q(") == 2 and " matmul(" not in text and "@w1 " not in text
    assert f"%w1.q = const @w1.q : {qdtype}[64,48]" in text
    assert ("%w1.zeros" in text) == zeros
    w1_group = min(group, 64)
    assert f"{{group={w1_group}}}" in text
    assert sqk.parse_ir(text, q.constants) == q
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(F32)
    rel, cos = output_error(sqk.reference(g, x=x), sqk.reference(q, x=x))
    assert cos > (0.999 if qdtype == "i8" else 0.98) and rel < 0.2
    assert isinstance(report, QuantReport) and report.quantized() == ["w1", "w2"] and not report.kept()
    assert all(r["status"] == "quantized" and r["bytes"] < r["float_bytes"] for r in report)


def test_report_is_each_layers_error_on_seeded_inputs():
    g = two_layer()
    _, r1 = run_pipeline(g, "quantize{weights=int4}")
    _, r2 = run_pipeline(g, "quantize{weights=int4}")
    _, r3 = run_pipeline(g, "quantize{weights=int4,seed=7}")
    assert [r["rel_l2"] for r in r1] == [r["rel_l2"] for r in r2] != [r["rel_l2"] for r in r3]
    w1 = g.constants["w1"]
    q, s, z = quantize_weight(w1, 4, 32)
    x = np.random.default_rng([0, 0]).standard_normal((16, 64))
    assert r1[0]["rel_l2"] == layer_error(x, w1, q, s, z, 32)[0]
    table = r1.format()
    assert "w1" in table and "int4 g32 sym" in table and "2 of 2 weights quantized" in table


def test_report_on_calibration_data():
    g = two_layer()
    rng = np.random.default_rng(5)
    data = [{"x": rng.standard_normal((3, 64)).astype(F32)} for _ in range(2)]
    p = Quantize(weights="int4")
    pm = calibrated([p], data)
    pm.run(g)
    # the second layer's input is relu(x @ w1): taken from the reference interpreter
    h = np.concatenate([run_reference(g, d, keep_all=True)[g.nodes[-1].inputs[0]] for d in data])
    w2 = g.constants["w2"]
    assert pm.context.report_of(p)[1]["rel_l2"] == layer_error(h, w2, *quantize_weight(w2, 4, 32), 32)[0]
    with pytest.raises(PipelineError, match="calibration sample 1: unknown input.*y"):
        calibrated([Quantize()], [data[0], {"y": data[0]["x"]}]).run(g)
    with pytest.raises(PipelineError, match=r"calibration sample 0: input 'x': shape \(2, 64\)"):
        calibrated([Quantize()], [{"x": np.zeros((2, 64), F32)}]).run(g)
    with pytest.raises(CalibrationError, match="non-empty list"):
        Calibration.of([])
    with pytest.raises(PipelineError, match="non-empty list"):
        sqk.compile(g, quantize="int4", calibration_data=[])


def test_skip():
    g = two_layer()
    q, report = run_pipeline(g, "quantize{weights=int4,skip=w2},select_format,dce,fuse")
    text = q.to_text()
    assert "matmul_q(%x, %w1.q" in text and "matmul(%1, %w2)" in text
    assert report.quantized() == ["w1"] and report[1]["status"] == "skipped (skip=)"
    q2, report2 = run_pipeline(g, "quantize{skip=w1;w2}")
    assert q2 == g and report2.quantized() == []
    with pytest.raises(PipelineError, match="skip names w3, which is not a matmul weight of @two; weights: w1, w2"):
        run_pipeline(g, "quantize{skip=w1|w3}")


def test_max_error_keeps_a_layer_in_float():
    rng = np.random.default_rng(2)
    easy = rng.integers(-7, 8, (64, 48)).astype(F32)
    easy[::32] = 7                                   # every group's max|w| is 7: scale 1, exact codes
    g = two_layer(w1=easy)
    q, report = run_pipeline(g, "quantize{weights=int4,max_error=0.05},select_format,dce,fuse")
    assert report.quantized() == ["w1"] and report.kept() == ["w2"]
    assert report[0]["rel_l2"] == 0.0 and report[0]["cosine"] == pytest.approx(1.0)
    assert report[1]["rel_l2"] > 0.05 and report[1]["status"].startswith("kept f32: int4 g32 sym error")
    assert "kept in float: w2" in report.format()
    text = q.to_text()
    assert "matmul_q(%x, %w1.q" in text and "matmul(%1, %w2)" in text
    x = rng.standard_normal((3, 64)).astype(F32)
    np.testing.assert_allclose(sqk.reference(q, x=x), sqk.reference(g, x=x), rtol=1e-5, atol=1e-4)


def test_fallback_int8_and_promote():
    rng = np.random.default_rng(2)
    easy = rng.integers(-7, 8, (64, 48)).astype(F32)
    easy[::32] = 7                                   # exact in int4 g32
    g = two_layer(w1=easy)
    q, report = run_pipeline(g, "quantize{weights=int4,max_error=0.05,fallback=int8},select_format,dce,fuse")
    assert report.quantized() == ["w1", "w2"] and report.kept() == []
    r = report[1]
    assert r["weights"] == "int8 per-channel sym" and r["rel_l2"] < 0.05
    assert r["note"].startswith("fallback int8 (int4 g32 sym error ") and "> max_error 0.05)" in r["note"]
    assert r["bytes"] == 48 * 40 + 40 * 4                     # codes + one f32 scale per column
    text = q.to_text()
    assert "matmul_q(%x, %w1.q, %w1.scales) {group=32}" in text and "matmul_q(%1, %w2.q, %w2.scales) {group=48}" in text
    x = rng.standard_normal((3, 64)).astype(F32)
    want = np.maximum(x @ dequantize(*quantize_weight(easy, 4, 32), 32), 0)
    want = want @ dequantize(*quantize_weight(_const(g, "w2"), 8, None), 48)
    np.testing.assert_allclose(sqk.reference(q, x=x), want, rtol=1e-5, atol=1e-4)
    # int8 still over the bound: float, the report says both errors
    _, report = run_pipeline(g, "quantize{weights=int4,max_error=0.001,fallback=int8}")
    assert report.kept() == ["w2"] and "; int8 error " in report[1]["status"]
    # promote= gives the fallback precision whatever the error; with fallback=float it keeps the layer in float
    _, report = run_pipeline(g, "quantize{weights=int4,fallback=int8,promote=w1}")
    assert [r["weights"] for r in report] == ["int8 per-channel sym", "int4 g32 sym"]
    assert report[0]["note"] == "fallback int8 (promote=)"
    _, report = run_pipeline(g, "quantize{weights=int4,promote=w1}")
    assert report.kept() == ["w1"] and report[0]["status"] == "kept f32: promote="
    with pytest.raises(PipelineError, match="promote names w3, which is not a matmul weight of @two"):
        run_pipeline(g, "quantize{weights=int4,fallback=int8,promote=w3}")


def _const(g, name):
    return next(n.attrs["value"] for n in g.nodes if n.op == "const" and n.output.name == name)


def test_tied_table_is_read_from_the_quantized_weight():
    # a tied embedding / lm_head W [H, V]: the embedding gathers W's columns, the head multiplies by W
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 40)).astype(F32)
    b = sqk.GraphBuilder("tied")
    ids = b.input("ids", (5,), "i64")
    table = b.const(w, name="head")
    e = b.transpose(b.gather(table, ids, axis=1), perm=(1, 0))     # [5, 64]
    g = b.output(b.matmul(e, table))
    for spec, bits, group in (("quantize{weights=int4}", 4, 32), ("quantize{weights=int4,fallback=int8,promote=head}",
                                                                  8, None)):
        q, report = run_pipeline(g, spec + ",select_format,dce,fuse")
        text = q.to_text()
        assert "gather_q(%ids, %head.q, %head.scales)" in text and "%head = const" not in text, text
        assert report[0]["bytes"] == (64 * 40 * bits // 8 + (-(-64 // (group or 64))) * 40 * 4)
        dq = dequantize(*quantize_weight(w, bits, group), group or 64)
        i = np.array([0, 39, 7, -1, 3])
        np.testing.assert_allclose(sqk.reference(q, ids=i), dq[:, i].T @ dq, rtol=1e-5, atol=1e-4)
    m = sqk.compile(g, quantize="int4")       # the kernels: gather_q and matmul_q on the same packed constants
    np.testing.assert_allclose(m(ids=i), sqk.reference(run_pipeline(g, "quantize{weights=int4}")[0], ids=i),
                               rtol=1e-5, atol=1e-4)


def test_shared_and_otherwise_used_weights():
    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("shared")
    x = b.input("x", (2, 32))
    w = b.const(rng.standard_normal((32, 32)).astype(F32), name="w")
    y = b.matmul(b.matmul(x, w), w)
    g = b.output(y, b.add(w, w))                     # w is also used outside a matmul: it stays
    q, report = run_pipeline(g, "quantize{weights=int4},select_format,dce,fuse")
    text = q.to_text()
    assert text.count("matmul_q(") == 2 and text.count("const @w.q") == 1 and "%w = const @w" in text
    assert len(report) == 1
    xs = rng.standard_normal((2, 32)).astype(F32)
    assert output_error(sqk.reference(g, x=xs)[0], sqk.reference(q, x=xs)[0])[1] > 0.98


def test_f16_weights_and_fresh_names():
    g = two_layer(dtype="f16")
    q, _ = run_pipeline(g, "quantize{weights=int4,scale_dtype=f16},select_format,dce,fuse")
    assert "matmul_q(%x, %w1.q, %w1.scales) {group=32} : f16[3,48]" in q.to_text()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float16)
    assert output_error(sqk.reference(g, x=x), sqk.reference(q, x=x))[1] > 0.98
    b = sqk.GraphBuilder("names")  # a value already named w.q: the new constant gets w.q_1
    x = b.input("x", (1, 16))
    wq = b.const(np.ones((16, 16), F32), name="w.q")
    w = b.const(np.ones((16, 16), F32), name="w")
    g2 = b.output(b.add(b.matmul(x, w), b.matmul(x, wq)))
    q2, _ = run_pipeline(g2, "quantize{skip=w.q}")
    assert "%w.q_1 = const @w.q_1 : i8[16,16]" in q2.to_text()


def test_no_weights_error():
    b = sqk.GraphBuilder("noweights")
    x, y = b.input("x", (2, 8)), b.input("y", (8, 4))
    g = b.output(b.matmul(x, y))
    with pytest.raises(PipelineError, match="quantize: no matmul with a constant 2-D weight in graph @noweights"):
        run_pipeline(g, "quantize")


def test_non_finite_constant_error_names_it():
    w1 = np.ones((64, 48), F32)
    w1[5, 5] = np.nan
    with pytest.raises(ValueError, match="constant w1 has 1 non-finite"):
        run_pipeline(two_layer(w1=w1), "quantize{weights=int4}")


@pytest.mark.parametrize("spec, message", [
    ("quantize{weights=int3}", "option weights=int3: expected int8 or int4"),
    ("quantize{scheme=nf4}", "option scheme=nf4: expected sym or asym"),
    ("quantize{scale_dtype=f64}", "option scale_dtype=f64: expected f32 or f16"),
    ("quantize{group=-32}", "option group=-32: expected a positive group size"),
    ("quantize{group=x}", "option group: 'x' is not a valid int"),
    ("quantize{max_error=-1}", "option max_error=-1.0: expected a non-negative"),
    ("quantize{activations=fp8}", "option activations=fp8: expected none or int8"),
    ("quantize{calibration=kl}", "option calibration=kl: expected dynamic, minmax, percentile or mse"),
    ("quantize{calibration=mse}", "calibration=mse chooses static int8 activation scales: it needs activations=int8"),
    ("quantize{activations=int8,calibration=percentile,percentile=0}",
     "option percentile=0.0: expected a percentile of |x| in (0, 100]"),
    ("quantize{activations=int8,calibration=percentile,percentile=100.5}", "option percentile=100.5: expected"),
    ("quantize{activations=int8,calibration=percentile,percentile=nan}", "option percentile=nan: expected"),
    ("quantize{activations=int8,calibration=mse,percentile=99}",
     "percentile=99.0 only applies with calibration=percentile (got calibration=mse)"),
    ("quantize{skip=w1,w2}", "unknown option 'w2'"),
    ("quantize{samples=0}", "samples=0: expected at least 1"),
    ("quantize{fallback=int4}", "option fallback=int4: expected float or int8"),
    ("quantize{fallback=int8}", "fallback=int8 applies to weights=int4 (int8 weights fall back to float)"),
    ("quantize{weight=int4}", "unknown option 'weight'"),
])
def test_bad_options(spec, message):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(spec)
    assert message in str(e.value), str(e.value)


def test_spelling_round_trips():
    (p,) = parse_pipeline("quantize{weights=int4,group=64,skip=a|b,max_error=0.1}")
    assert p.spelling() == "quantize{weights=int4,group=64,skip=a|b,max_error=0.1}"
    assert parse_pipeline(p.spelling()) == [p]


# --- the transformer MLP block ---------------------------------------------------------------

@pytest.mark.parametrize("spec, bound", [("quantize{weights=int8}", 0.999), ("quantize{weights=int4,group=32}", 0.99),
                                         ("quantize{weights=int4,group=32,activations=int8}", 0.99)])
def test_transformer_mlp_cosine(spec, bound):
    g = transformer_mlp(tokens=4)
    q, report = run_pipeline(g, f"fold_constants,{spec},select_format,dce,fuse")
    x = np.random.default_rng(11).standard_normal((4, 768)).astype(F32)
    ref, out = sqk.reference(g, x=x), sqk.reference(q, x=x)
    rel, cos = output_error(ref, out)
    branch = output_error(ref - x, out - x)[1]  # the MLP branch without the residual
    print(f"{spec}: block output cosine {cos:.6f} (MLP branch {branch:.6f}), rel L2 {rel:.3e}\n{report.format()}")
    assert cos >= bound and all(r["cosine"] >= bound for r in report)


def test_int8_activations_pipeline():
    """activations=int8 sets the attribute; the report's error includes activation
    rounding (the op's reference), so it exceeds the weights-only error."""
    g = two_layer(k=64, n=48, m=40)
    q, report = run_pipeline(g, "quantize{weights=int4,group=32,activations=int8}")
    text = q.to_text()
    assert text.count('{group=32, activations="int8"}') == 2, text
    wq, wonly = run_pipeline(g, "quantize{weights=int4,group=32}")
    for r, w in zip(report, wonly):
        assert w["rel_l2"] < r["rel_l2"] < 0.2 and r["cosine"] > 0.98
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(F32)
    assert not np.allclose(sqk.reference(q, x=x), sqk.reference(wq, x=x), rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_int8_weights_int8_activations_pipeline(target):
    """weights=int8 (per channel, sym) with activations=int8: i8 matmul_q nodes
    with the attribute, an error including activation rounding, and kernels
    that agree with the rewritten graph's reference."""
    from harness import compile_for

    g = two_layer(k=64, n=48, m=40)
    q, report = run_pipeline(g, "quantize{weights=int8,activations=int8}")
    text = q.to_text()
    assert text.count('{group=64, activations="int8"}') == 1 and text.count('{group=48, activations="int8"}') == 1
    assert [n.attrs["value"].dtype for n in q.nodes if n.op == "const"] == [np.int8, F32] * 2
    _, wonly = run_pipeline(g, "quantize{weights=int8}")
    for r, w in zip(report, wonly):
        assert "+ i8 act" in r["weights"] and w["rel_l2"] < r["rel_l2"] < 0.05 and r["cosine"] > 0.999
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(F32)
    np.testing.assert_allclose(compile_for(q, target)(x=x), sqk.reference(q, x=x), rtol=1e-5, atol=1e-4)
    assert sqk.compile(g, quantize="int8", activations="int8").manifest["pipeline"] == \
        "fold_constants,quantize{weights=int8,activations=int8},select_format,dce,fuse"


@needs_kernels
def test_transformer_mlp_int8_activations_compiled():
    """The whole MLP block compiled with int4 weights + int8 activations agrees
    with its reference (f32 rounding of the final multiply-adds only)."""
    g = transformer_mlp(tokens=3)
    m = sqk.compile(g, quantize="int4", group=32, activations="int8")
    assert m.manifest["pipeline"] == "fold_constants,quantize{weights=int4,group=32,activations=int8},select_format,dce,fuse"
    x = np.random.default_rng(5).standard_normal((3, 768)).astype(F32)
    np.testing.assert_allclose(m(x=x), sqk.reference(m.ir, x=x), rtol=1e-4, atol=1e-4)
    assert output_error(sqk.reference(g, x=x), m(x=x))[1] >= 0.99


# --- static int8 activations (calibration) -----------------------------------------------------

def quant_mse(x, scale):
    return float(np.mean((fake_quant_i8(x, scale).astype(np.float64) - x) ** 2))


def test_activation_scale_methods():
    """minmax is max|x| / 127; with three outliers among 10^5 values in
    [-1, 1), the 99.99th percentile ignores them, and mse finds a threshold in
    between whose quantize-dequantize error beats both (and a fine brute-force
    grid, within 1%)."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 100_000).astype(F32)
    x[[10, 20, 30]] = [50, -80, 64]
    mm, pc, ms = (activation_scale(x, m) for m in ("minmax", "percentile", "mse"))
    assert np.float32(mm) == np.float32(80) / np.float32(127)
    assert np.float32(pc) == np.float32(np.percentile(np.abs(x), 99.99)) / np.float32(127)
    assert pc * 127 < 1.0001 and pc < ms < mm
    assert quant_mse(x, ms) < min(quant_mse(x, mm), quant_mse(x, pc))
    brute = min(quant_mse(x, t / 127) for t in np.linspace(0.5, 80, 2000))
    assert quant_mse(x, ms) <= 1.01 * brute
    # a lower percentile clips more; 100 is the max
    assert activation_scale(x, "percentile", 99) < pc and activation_scale(x, "percentile", 100) == mm
    # scales are the shortest decimal of their f32 value (the IR prints them so)
    for s in (mm, pc, ms):
        assert float(str(np.float32(s))) == s and len(repr(s)) <= 12
    # Gaussian activations: no outliers, so mse stays near the max and every method is close
    g = rng.standard_normal(200_000).astype(F32)
    scales = [activation_scale(g, m) for m in ("minmax", "percentile", "mse")]
    assert scales[1] <= scales[0] and 0.5 * scales[0] < scales[2] <= scales[0]


def test_activation_scale_edge_cases():
    assert activation_scale(np.zeros((4, 8), F32), "mse") == 1.0      # any step quantizes 0 exactly
    assert activation_scale(np.array([0, 0, 0, 2.54], F32), "percentile", 50) == 0.02  # mostly zeros: the max
    with pytest.raises(ValueError, match="layer w7 saw 1 non-finite activation"):
        activation_scale(np.array([1, np.nan], F32), name="w7")
    with pytest.raises(ValueError, match="percentile must be in"):
        activation_scale(np.ones(3, F32), "percentile", 0)
    with pytest.raises(ValueError, match="calibration method must be one of minmax, percentile, mse"):
        activation_scale(np.ones(3, F32), "kl")


def calibration_samples(n=3, rows=3, k=64, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, k)).astype(F32)} for _ in range(n)]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_static_calibration_pass(method):
    """Each matmul_q gets the scale of its own fp32 input activations over the
    calibration samples (the second layer's: relu(x @ w1)); the report says so,
    measures the static numerics, and the IR text round-trips."""
    g, data = two_layer(), calibration_samples()
    pm = calibrated(parse_pipeline(f"quantize{{weights=int4,activations=int8,calibration={method}}}"), data)
    q = pm.run(g)
    report = pm.context.reports[0][1]
    envs = [run_reference(g, d, keep_all=True) for d in data]
    mqs = [n for n in q.nodes if n.op == "matmul_q"]
    for i, (mm, n) in enumerate(zip([n for n in g.nodes if n.op == "matmul"], mqs)):
        assert n.outputs == mm.outputs
        acts = np.concatenate([e[mm.inputs[0]] for e in envs])
        assert n.attrs["act_scale"] == activation_scale(acts, method) > 0
        assert report[i]["act_scales"] == [n.attrs["act_scale"]]
        assert report[i]["weights"] == f"int4 g32 sym + i8 act {method}" and report[i]["cosine"] > 0.98
        qv = [q.producers()[v].attrs["value"] for v in n.inputs[1:]]
        want = acts.astype(np.float64) @ g.constants[mm.inputs[1].name].astype(np.float64)
        got = sqk.ir.ops.matmul_q_i8act(acts, *qv, None, 32, n.attrs["act_scale"])
        assert report[i]["rel_l2"] == output_error(want, got)[0]
    text = q.to_text(inline_limit=None)
    assert f"act_scale={mqs[0].attrs['act_scale']!r}" in text and sqk.parse_ir(text) == q


def test_static_calibration_errors():
    g = two_layer()
    with pytest.raises(PipelineError, match=r"calibration=mse chooses static activation scales from calibration "
                                            r"data, and none was given: pass calibration_data="):
        sqk.compile(g, quantize="int4", activations="int8", calibration="mse")
    with pytest.raises(PipelineError, match="calibration=minmax chooses static int8 activation scales: it needs "
                                            "activations=int8"):
        sqk.compile(g, quantize="int4", calibration="minmax", calibration_data=calibration_samples())
    with pytest.raises(PipelineError, match="percentile=150.0: expected a percentile"):
        sqk.compile(g, quantize="int4", activations="int8", calibration="percentile", percentile=150,
                    calibration_data=calibration_samples())
    assert quantize_pipeline("int8", activations="int8", calibration="percentile", percentile=99.9) == \
        "fold_constants,quantize{weights=int8,activations=int8,calibration=percentile,percentile=99.9},select_format,dce,fuse"


@needs_kernels
@pytest.mark.parametrize("weights, scheme", [("int4", "asym"), ("int8", "sym")])
def test_static_calibration_compiled(weights, scheme):
    """Static scales (and asymmetric weights, whose zero points the int8
    kernels now apply) compiled: the whole graph equals its reference bit for
    bit (relu and the int8 matmul_q kernels are exact)."""
    g = two_layer()
    m = sqk.compile(g, quantize=weights, scheme=scheme, activations="int8", calibration="mse",
                    calibration_data=calibration_samples())
    assert [n.op for n in m.ir.nodes if n.op.startswith("matmul")] == ["matmul_q"] * 2
    assert all(n.attrs["act_scale"] > 0 for n in m.ir.nodes if n.op == "matmul_q")
    assert sum(n.op == "const" for n in m.ir.nodes) == (6 if scheme == "asym" else 4)  # q, scales[, zeros]
    x = calibration_samples(1, seed=9)[0]["x"]
    for xs in (x, 40 * x):  # the second saturates
        np.testing.assert_array_equal(m(x=xs), sqk.reference(m.ir, x=xs))
    assert output_error(sqk.reference(g, x=x), m(x=x))[1] > 0.98


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_transformer_mlp_static_activations(method):
    """int4 g32 weights + static int8 activations calibrated on 2 samples of 4
    tokens; measured on held-out tokens."""
    g = transformer_mlp(tokens=4)
    rng = np.random.default_rng(21)
    data = [{"x": rng.standard_normal((4, 768)).astype(F32)} for _ in range(2)]
    p = Quantize(weights="int4", activations="int8", calibration=method)
    pm = calibrated(parse_pipeline("fold_constants") + [p] + parse_pipeline("dce"), data)
    q = pm.run(g)
    x = np.random.default_rng(11).standard_normal((4, 768)).astype(F32)
    ref, out = sqk.reference(g, x=x), sqk.reference(q, x=x)
    cos = output_error(ref, out)[1]
    print(f"{method}: block output cosine {cos:.6f}\n{pm.context.report_of(p).format()}")
    assert cos >= 0.99 and all(r["cosine"] >= 0.99 for r in pm.context.report_of(p))


# --- the report in a saved artifact ----------------------------------------------------------------

@needs_kernels
def test_report_saved_in_artifact(tmp_path):
    import json
    import subprocess
    import sys

    m = sqk.compile(two_layer(), quantize="int4", group=32, activations="int8", calibration="percentile",
                    percentile=99.9, calibration_data=calibration_samples())
    m.save(str(tmp_path / "a"))
    assert m.manifest["report"]["file"] == "report.json"
    loaded = sqk.load(str(tmp_path / "a"))
    assert loaded.report == json.loads(json.dumps(list(m.report)))   # the rows (tuples as lists)
    assert loaded.report.format() == m.report.format() == str(loaded.report)
    assert loaded.report.get("quantize") == list(loaded.report) and loaded.report.get("sparsify") is None
    assert [r["act_scales"][0] for r in loaded.report] == [n.attrs["act_scale"] for n in m.ir.nodes
                                                           if n.op == "matmul_q"]
    # the loader needs neither the compiler nor llvmlite
    code = ("import sys; sys.modules['llvmlite'] = sys.modules['sqk.compiler'] = None; import sqk; "
            f"print(sqk.load({str(tmp_path / 'a')!r}).report.format())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == m.report.format(), r.stderr
    # no quantization: no report file
    b = sqk.GraphBuilder("plain")
    plain = sqk.compile(b.output(b.relu(b.input("x", (4,)))))
    plain.save(str(tmp_path / "p"))
    assert "report" not in plain.manifest and sqk.load(str(tmp_path / "p")).report is None
    # a modified or missing report is caught
    rep = tmp_path / "a" / "report.json"
    rep.write_text(rep.read_text().replace("quantized", "kept f32"))
    with pytest.raises(ArtifactError, match="report.json: content hash does not match"):
        sqk.load(str(tmp_path / "a"))
    assert sqk.load(str(tmp_path / "a"), verify=False).report[0]["status"] == "kept f32"
    rep.unlink()
    with pytest.raises(ArtifactError, match="report file 'report.json' cannot be read"):
        sqk.load(str(tmp_path / "a"))


# --- weights stored sparse (sparsify / select_format) ------------------------------------------------

def sparse_two_layer(fmt1="csr", fmt2="nm2:4", k=64, n=48, m=40):
    """two_layer with w1 75% zeros (unstructured) and w2 pruned to 2:4 along K,
    their matmuls carrying sparse formats."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((k, n)).astype(F32) * (rng.random((k, n)) < 0.25)
    w2 = rng.standard_normal((n, m)).astype(F32)
    w2.reshape(n // 4, 4, m)[:, :2] = 0
    b = sqk.GraphBuilder("sparse")
    x = b.input("x", (3, k))
    h = b.relu(b.matmul(x, b.const(w1, name="w1"), sparse=fmt1))
    return b.output(b.matmul(h, b.const(w2, name="w2"), sparse=fmt2)), w1, w2


@pytest.mark.parametrize("spec", ["quantize{weights=int8}", "quantize{weights=int4,group=32}",
                                  "quantize{weights=int4,group=16,scale_dtype=f16}"])
def test_sparse_format_is_kept(spec):
    """The format stays on the matmul_q, and every pruned zero is an exact zero code."""
    g, w1, w2 = sparse_two_layer()
    q, report = run_pipeline(g, spec)
    mqs = [n for n in q.nodes if n.op == "matmul_q"]
    assert [n.attrs["sparse"] for n in mqs] == ["csr", "nm2:4"] and report.quantized() == ["w1", "w2"]
    for n, w in zip(mqs, (w1, w2)):
        codes = q.producers()[n.inputs[1]].attrs["value"]
        assert not codes[w == 0].any() and holds(parse_format(n.attrs["sparse"]), codes) is None
    assert 'sparse="csr"' in q.to_text() and 'sparse="nm2:4"' in q.to_text()


@pytest.mark.parametrize("spec, why", [
    ("quantize{weights=int8,group=32}", "grouped int8 scales (group=32 < K=64)"),
    ("quantize{weights=int4,scheme=asym}", "asymmetric weights (zero points)"),
    ("quantize{weights=int4,activations=int8}", "int8 activations"),
])
def test_sparse_format_refused(spec, why):
    """Options matmul_q cannot read sparse are an error naming the layer, never
    a silent densification; skipping the layer leaves it in float, still sparse."""
    g, _, _ = sparse_two_layer(fmt2="dense")
    with pytest.raises(PipelineError) as e:
        run_pipeline(g, spec)
    assert f"layer w1 is stored sparse=csr, which matmul_q cannot read with {why}" in str(e.value)
    assert "(skip=w1)" in str(e.value)
    q, report = run_pipeline(g, spec[:-1] + ",skip=w1}")
    assert [(n.op, n.attrs["sparse"]) for n in q.nodes if n.op.startswith("matmul")] == [
        ("matmul", "csr"), ("matmul_q", "dense")]


# --- convenience API and CLI ---------------------------------------------------------------------

def test_quantize_pipeline_spelling():
    assert quantize_pipeline("int4", group=32) == "fold_constants,quantize{weights=int4,group=32},select_format,dce,fuse"
    assert quantize_pipeline("int8", scheme="asym", skip=["a", "b"], max_error=0.1) == \
        "fold_constants,quantize{weights=int8,scheme=asym,skip=a|b,max_error=0.1},select_format,dce,fuse"
    spec = quantize_pipeline("int4", group=32, scheme="sym")
    assert [p.spelling() for p in parse_pipeline(spec)] == ["fold_constants", "quantize{weights=int4,group=32}",
                                                           "select_format", "dce", "fuse"]


def test_compile_option_errors():
    g = two_layer()
    with pytest.raises(PipelineError, match="either pipeline= or quantize=, not both"):
        sqk.compile(g, pipeline="dce", quantize="int4")
    with pytest.raises(PipelineError, match="group= only apply with quantize="):
        sqk.compile(g, group=32)
    with pytest.raises(PipelineError, match="calibration_data= needs a quantize pass"):
        sqk.compile(g, calibration_data=[{"x": np.zeros((3, 64), F32)}])
    with pytest.raises(PipelineError, match="option weights=int2"):
        sqk.compile(g, quantize="int2")
    with pytest.raises(PipelineError, match="no matmul with a constant 2-D weight"):
        b = sqk.GraphBuilder("plain")
        sqk.compile(b.output(b.relu(b.input("x", (4,)))), quantize="int8")


def test_compile_without_quantization_has_no_report():
    b = sqk.GraphBuilder("plain")
    m = sqk.compile(b.output(b.relu(b.input("x", (4,)))))
    assert m.report is None


@needs_kernels
def test_compile_quantized_end_to_end(tmp_path, capsys):
    g = two_layer()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(F32)
    data = [{"x": x}]
    m = sqk.compile(g, quantize="int4", group=32, scheme="sym", calibration_data=data)
    same, _ = run_pipeline(g, "fold_constants,quantize{weights=int4,group=32},select_format,dce,fuse")
    assert m.ir == same and m.manifest["pipeline"] == "fold_constants,quantize{weights=int4,group=32,scheme=sym},select_format,dce,fuse"
    assert isinstance(m.report, QuantReport) and m.report.quantized() == ["w1", "w2"]
    np.testing.assert_allclose(m(x=x), sqk.reference(m.ir, x=x), rtol=1e-4, atol=1e-4)
    # the CLI: --quantize/--group/--report print the table
    path = str(tmp_path / "two.sqkir")
    sqk.save_ir(g, path)
    assert main(["compile", path, "-o", str(tmp_path / "o.sqk"), "--quantize", "int4", "--group", "32",
                 "--max-error", "0.01", "--report", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "int4 g32 sym" in out and "kept in float: w1, w2" in out


def test_cli_flags_errors_and_no_report(tmp_path, capsys):
    b = sqk.GraphBuilder("plain")
    path = str(tmp_path / "plain.sqkir")
    sqk.save_ir(b.output(b.relu(b.input("x", (4,)))), path)
    assert main(["compile", path, "-o", str(tmp_path / "o.sqk"), "--group", "32"]) == 1
    assert "group= only apply with quantize=" in capsys.readouterr().err
    assert main(["compile", path, "-o", str(tmp_path / "o.sqk"), "--quantize", "int4"]) == 1
    assert "no matmul with a constant 2-D weight in graph @plain" in capsys.readouterr().err
    assert main(["compile", path, "-o", str(tmp_path / "o.sqk"), "--report", "--quiet"]) == 0
    assert "no quantization report" in capsys.readouterr().out


# --- ONNX Runtime MatMulNBits ------------------------------------------------------------------

def matmul_q_graph(q, s, z, group, m):
    b = sqk.GraphBuilder("mq")
    x = b.input("x", (m, q.shape[0]))
    ins = [b.const(q, "i4", name="q"), b.const(s, name="s")] + ([b.const(z, "i4", name="z")] if z is not None else [])
    return b.output(b.matmul_q(x, *ins, group=group))


@pytest.mark.parametrize("k, n, group, scheme", [(64, 5, 32, "sym"), (80, 7, 32, "asym"), (100, 3, 16, "asym"),
                                                 (256, 9, 128, "sym"), (96, 4, 64, "asym")])
def test_matmul_nbits_runs_like_matmul_q(k, n, group, scheme):
    pytest.importorskip("onnx", reason="onnx not installed (pip install -e '.[bench]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[bench]')")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(k + n)
    q, s, z = quantize_weight(rng.standard_normal((k, n)).astype(F32), 4, group, scheme)
    d = to_matmul_nbits(q, s, z, group)
    nb = -(-k // group)
    assert d["B"].shape == (n, nb, group // 2) and d["B"].dtype == np.uint8 and d["scales"].shape == (n * nb,)
    assert (d["zero_points"] is None) == (z is None)
    inits = [numpy_helper.from_array(d["B"], "B"), numpy_helper.from_array(d["scales"], "scales")]
    if d["zero_points"] is not None:
        assert d["zero_points"].shape == (n * ((nb + 1) // 2),)
        inits.append(numpy_helper.from_array(d["zero_points"], "zero_points"))
    node = helper.make_node("MatMulNBits", ["A"] + [t.name for t in inits], ["Y"], domain="com.microsoft",
                            K=d["K"], N=d["N"], bits=d["bits"], block_size=d["block_size"], accuracy_level=0)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, k)).astype(F32)
    ref = sqk.reference(matmul_q_graph(q, s, z, group, 3), x=a)
    np.testing.assert_allclose(sess.run(None, {"A": a})[0], ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    # and back
    q2, s2, z2, g2 = from_matmul_nbits(d["B"], d["scales"], d["zero_points"], k, n, d["block_size"])
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)
    assert g2 == group and (z2 is None if z is None else (z2 == z).all())


def test_matmul_nbits_round_trip_from_onnx_side():
    rng = np.random.default_rng(0)
    k, n, bs = 48, 6, 16                                  # 3 blocks: zero points pad the odd nibble
    nb = 3
    B = rng.integers(0, 256, (n, nb, bs // 2), dtype=np.uint8)
    scales = rng.random(n * nb).astype(F32)
    zp = rng.integers(0, 256, n * 2, dtype=np.uint8) & np.tile(np.array([0xFF, 0x0F], np.uint8), n)
    q, s, z, g = from_matmul_nbits(B, scales, zp, k, n, bs)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (nb, n) and z.shape == (nb, n)
    d = to_matmul_nbits(q, s, z, g)
    np.testing.assert_array_equal(d["B"], B)
    np.testing.assert_array_equal(d["scales"], scales)
    np.testing.assert_array_equal(d["zero_points"], zp)
    # all zero points 8 (ORT's default) is symmetric: no zeros
    assert from_matmul_nbits(B, scales, np.tile(np.array([0x88, 0x08], np.uint8), n), k, n, bs)[2] is None


def test_matmul_nbits_errors():
    q = np.zeros((40, 2), np.int8)
    s = np.ones((2, 2), F32)
    with pytest.raises(ValueError, match="power of two >= 16"):
        to_matmul_nbits(q, np.ones((2, 2), F32), None, 24)
    with pytest.raises(ValueError, match="int4 codes"):
        to_matmul_nbits(q + 9, s, None, 32)
    with pytest.raises(ValueError, match=r"scales shape \(1, 2\) must be \(2, 2\)"):
        to_matmul_nbits(q, np.ones((1, 2), F32), None, 32)
    with pytest.raises(ValueError, match="only bits=4"):
        from_matmul_nbits(np.zeros((2, 2, 16), np.uint8), np.ones(4, F32), None, 40, 2, 32, bits=8)
    with pytest.raises(ValueError, match="only uint8 packed zero points"):
        from_matmul_nbits(np.zeros((2, 2, 16), np.uint8), np.ones(4, F32), np.ones(4, F32), 40, 2, 32)

