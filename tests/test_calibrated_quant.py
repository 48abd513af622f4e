"""quantize{method=gptq|awq|imatrix}: each against a straightforward numpy
transcription of the published algorithm (written here, independently of
compiler/quantize.py), each below round-to-nearest's calibration error, the
compiled graph equal to the reference on the chosen weights, and bad input."""
import numpy as np
import pytest

import sqk
from sqk.compiler import PassManager, PipelineError, parse_pipeline
from sqk.compiler.passes import Context
from sqk.compiler.calibration import MAX_ROWS, Calibration, LayerStats
from sqk.compiler.quantize import awq_scales, dequantize, gptq_quantize, imatrix_quantize, layer_error
from sqk.ir.reference import run_reference

F32 = np.float32
QMAX = {4: (-8, 7, 7), 8: (-128, 127, 127)}   # qmin, qmax, symmetric max code


def outlier_inputs(rows, k, seed=0):
    """Correlated activations with a few outlier channels (where the methods matter)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    scale = np.ones(k)
    scale[rng.choice(k, max(k // 16, 2), replace=False)] = 20.0
    return ((rng.standard_normal((rows, k)) @ mix) * scale).astype(F32)


def layer(k=128, n=64, seed=1):
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(F32)


# --- the published algorithms, transcribed -------------------------------------------------------

def ref_fit(w, bits, scheme):
    """Round-to-nearest parameters of one group w [g, N] (the matmul_q conventions)."""
    qmin, qmax, qs = QMAX[bits]
    w = w.astype(F32)
    if scheme == "sym":
        s = (np.abs(w).max(axis=0) / F32(qs)).astype(F32)
        return np.where(s == 0, F32(1), s), None
    lo, hi = np.minimum(w.min(axis=0), 0), np.maximum(w.max(axis=0), 0)
    s = ((hi - lo) / F32(qmax - qmin)).astype(F32)
    s = np.where(s == 0, F32(1), s)
    return s, np.clip(F32(qmin) - np.rint(lo / s), qmin, qmax)


def ref_fit_mse(w, bits, scheme):
    """The published GPTQ Quantizer.find_params(mse=True) (grid 100, maxshrink 0.8, norm 2.4) in the
    matmul_q conventions: per column, the range shrunk by p = 1 - i / 100 of least sum |w - deq|^2.4."""
    best = None
    for i in range(80):
        p = F32(1 - i / 100)
        s, z = ref_fit(w * p, bits, scheme)          # the shrunk range's parameters ...
        deq = (ref_codes(w.astype(F32), s, z, bits) - (0 if z is None else z)) * s   # ... on the weights
        err = (np.abs(w - deq) ** 2.4).sum(axis=0)
        if best is None:
            best = [err, s, z]
            continue
        better = err < best[0]
        best = [np.where(better, err, best[0]), np.where(better, s, best[1]),
                None if z is None else np.where(better, z, best[2])]
    return best[1], best[2]


def ref_codes(w, s, z, bits):
    qmin, qmax, qs = QMAX[bits]
    if z is None:
        return np.clip(np.rint(w / s), -qs, qs)
    return np.clip(np.rint(w / s) + z, qmin, qmax)


def ref_gptq(w, x, bits, group, scheme, damp=0.01, act_order=False, fit=ref_fit):
    """GPTQ, Algorithm 1 of Frantar et al. without the lazy batching: after
    each column (our row k), every later column is updated at once."""
    W = w.astype(np.float64).T.copy()        # [N, K]
    k = W.shape[1]
    H = 2 * x.astype(np.float64).T @ x.astype(np.float64) / len(x)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    static = [fit(W[:, g:g + group].T, bits, scheme) for g in range(0, k, group)]  # before any update
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H += damp * np.mean(np.diag(H)) * np.eye(k)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    params = {}
    for i in range(k):
        g = perm[i] // group
        if act_order:
            params[g] = static[g]
        elif i % group == 0:
            params[g] = fit(W[:, i:i + group].T, bits, scheme)
        s, z = params[g]
        q = ref_codes(W[:, i], s, z, bits)
        Q[:, perm[i]] = q
        deq = (q - (0 if z is None else z)) * s.astype(np.float64)
        err = (W[:, i] - deq) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
    return Q.T


def ref_awq(w, x, bits, group, scheme, grid=20):
    """llm-awq auto_scale's search for one linear layer: s = mean|x|^ratio."""
    x_max = np.abs(x).mean(axis=0)
    ref = x @ w
    best = (np.inf, None, None)
    for r in range(grid):
        s = np.maximum(x_max.astype(np.float64) ** (r / grid), 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(F32)
        ws = (w * s[:, None]).astype(F32)
        deq = np.concatenate([(ref_codes(ws[g:g + group], *ref_fit(ws[g:g + group], bits, scheme), bits)
                               - (0 if scheme == "sym" else ref_fit(ws[g:g + group], bits, scheme)[1]))
                              * ref_fit(ws[g:g + group], bits, scheme)[0] for g in range(0, len(w), group)])
        loss = np.mean((ref - (x * (F32(1) / s)) @ deq.astype(F32)) ** 2)
        if loss < best[0]:
            best = (loss, s, r / grid)
    return best


def ref_imatrix(w, imp, bits, group, scheme):
    """Per group and column: the candidate scale (max / (nmax + 0.1 is), and
    the weighted least-squares scale of its codes) of least imatrix-weighted error."""
    qmin, qmax, qs = QMAX[bits]
    out = np.zeros_like(w, dtype=np.float64)
    for g in range(0, len(w), group):
        for j in range(w.shape[1]):
            col, iw = w[g:g + group, j].astype(F32), imp[g:g + group]
            lo = min(col.min(), 0)
            span, nmax = (np.abs(col).max(), qs) if scheme == "sym" else (max(col.max(), 0) - lo, qmax - qmin)
            best = None
            for step in sorted(range(-9, 10), key=abs):
                for ls in (False, True):
                    s = F32(span / F32(nmax + 0.1 * step))
                    if ls:
                        z = None if scheme == "sym" else np.clip(F32(qmin) - np.rint(F32(lo) / s), qmin, qmax)
                        c = ref_codes(col, s, z, bits) - (0 if z is None else z)
                        den = (iw * c * c).sum()
                        s = F32((iw * c * col).sum() / den) if den > 0 else F32(0)
                    if not (np.isfinite(s) and s > 0):
                        s = F32(1)
                    z = None if scheme == "sym" else np.clip(F32(qmin) - np.rint(F32(lo) / s), qmin, qmax)
                    deq = (ref_codes(col, s, z, bits) - (0 if z is None else z)) * np.float64(s)
                    err = (iw * (col - deq) ** 2).sum()
                    if best is None or err < best[0]:
                        best = (err, deq)
            out[g:g + group, j] = best[1]
    return out


# --- the math against the transcriptions -------------------------------------------------------

@pytest.mark.parametrize("bits,group,scheme,act_order", [(4, 32, "sym", False), (4, 32, "asym", False),
                                                         (4, 32, "sym", True), (8, 64, "asym", True),
                                                         (8, 200, "sym", False), (4, 48, "sym", False)])
def test_gptq_equals_the_published_algorithm(bits, group, scheme, act_order):
    k, n = 200, 72
    w, x = layer(k, n), outlier_inputs(512, k)
    st = LayerStats(k)
    st.add(x)
    q, s, z = gptq_quantize(w, st.hessian, bits, group, scheme, act_order=act_order)
    want = ref_gptq(w, x, bits, group, scheme, act_order=act_order)
    assert np.mean(q == want) > 0.999       # float order differs: a rare tie may round the other way
    rel = layer_error(x, w, q, s, z, group)[0]
    rtn = layer_error(x, w, *sqk.compiler.quantize.quantize_weight(w, bits, group, scheme), group)[0]
    assert rel < 0.8 * rtn, (rel, rtn)


@pytest.mark.parametrize("scheme,act_order", [("sym", False), ("asym", False), ("sym", True)])
def test_gptq_mse_clip_equals_the_published_search(scheme, act_order):
    k, n = 96, 40
    w, x = layer(k, n), outlier_inputs(384, k)
    st = LayerStats(k)
    st.add(x)
    q, s, z = gptq_quantize(w, st.hessian, 4, 32, scheme, act_order=act_order, clip="mse")
    want = ref_gptq(w, x, 4, 32, scheme, act_order=act_order, fit=ref_fit_mse)
    assert np.mean(q == want) > 0.999
    plain = gptq_quantize(w, st.hessian, 4, 32, scheme, act_order=act_order)
    assert np.mean(q == plain[0]) < 0.99                        # the search changed ranges
    with pytest.raises(ValueError, match="clip must be one of minmax, mse, got 'l1'"):
        gptq_quantize(w, st.hessian, 4, 32, clip="l1")


def test_gptq_blocks_match_unbatched():
    """The lazy batch size changes the float order only."""
    w, x = layer(160, 48), outlier_inputs(300, 160)
    st = LayerStats(160)
    st.add(x)
    a = gptq_quantize(w, st.hessian, 4, 32, block=32)
    b = gptq_quantize(w, st.hessian, 4, 32, block=160)
    assert np.mean(a[0] == b[0]) > 0.99


@pytest.mark.parametrize("bits,group,scheme", [(4, 32, "sym"), (4, 64, "asym"), (8, 128, "sym")])
def test_awq_equals_the_published_search(bits, group, scheme):
    k, n = 128, 96
    w, x = layer(k, n), outlier_inputs(400, k)
    s, alpha, err, rtn = awq_scales([w], x, np.abs(x.astype(np.float64)).mean(axis=0), bits, group, scheme)
    loss, s_ref, alpha_ref = ref_awq(w, x, bits, group, scheme)
    assert alpha == alpha_ref and np.allclose(s, s_ref, rtol=1e-6)
    assert err == pytest.approx(loss, rel=1e-4) and err < rtn


@pytest.mark.parametrize("bits,group,scheme", [(4, 32, "sym"), (4, 32, "asym"), (8, 64, "sym")])
def test_imatrix_equals_the_candidate_search(bits, group, scheme):
    k, n = 96, 48
    w, x = layer(k, n), outlier_inputs(300, k)
    imp = np.mean(x.astype(np.float64) ** 2, axis=0)
    q, s, z = imatrix_quantize(w, imp, bits, group, scheme)
    got = dequantize(q, s, z, group)
    want = ref_imatrix(w, imp, bits, group, scheme)
    assert np.mean(np.isclose(got, want, rtol=1e-6, atol=1e-9)) > 0.995
    rtn = dequantize(*sqk.compiler.quantize.quantize_weight(w, bits, group, scheme), group)
    werr = lambda d: float((imp[:, None] * (w - d) ** 2).sum())  # noqa: E731
    assert werr(got) < werr(rtn)


def test_calibration_stats_are_bounded():
    """Running sums over every row; at most ~2 MAX_ROWS rows kept, an even stride."""
    st = LayerStats(8)
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((1000, 8)) for _ in range(7)]
    for b in blocks:
        st.add(b)
    allx = np.concatenate(blocks)
    assert st.rows == 7000 and np.allclose(st.xtx, allx.T @ allx) and np.allclose(st.mean_sq, (allx ** 2).mean(0))
    assert np.allclose(st.mean_abs, np.abs(allx).mean(0)) and st.amax == np.abs(allx).max()
    assert MAX_ROWS <= len(st.sample) <= 2 * MAX_ROWS
    assert np.array_equal(st.sample, allx[::st.stride][:len(st.sample)])


# --- the pass ---------------------------------------------------------------------------------------

def net(k=128, n=96, m=48, rows=8):
    """rmsnorm -> matmul w1 -> matmul w3 -> relu -> matmul w2: AWQ folds into
    the norm's scale and w1's columns, and needs a mul before w2."""
    rng = np.random.default_rng(3)
    b = sqk.GraphBuilder("net")
    x = b.input("x", (rows, k))
    xn = b.rmsnorm(x, b.const(rng.uniform(0.5, 1.5, k).astype(F32), name="gamma"))
    h = b.matmul(b.matmul(xn, b.const(layer(k, n, 1), name="w1")), b.const(layer(n, n, 2), name="w3"))
    return b.output(b.matmul(b.relu(h), b.const(layer(n, m, 4), name="w2")))


def samples(n=6, rows=8, k=128, seed=7):
    x = outlier_inputs(n * rows, k, seed)
    return [{"x": x[i * rows:(i + 1) * rows]} for i in range(n)]


def run_pass(spec, g, data):
    pm = PassManager(parse_pipeline(spec), context=Context(calibration=Calibration.of(data)))
    return pm.run(g), pm.context.reports[0][1]


@pytest.mark.parametrize("method", ["gptq", "awq", "imatrix"])
@pytest.mark.parametrize("weights,scheme", [("int4", "sym"), ("int4", "asym"), ("int8", "sym")])
def test_each_method_beats_rtn_on_calibration_data(method, weights, scheme):
    g, data = net(), samples()
    q, report = run_pass(f"quantize{{weights={weights},scheme={scheme},method={method},group=32}}", g, data)
    assert report.quantized() == ["w1", "w3", "w2"]
    for r in report:
        assert r["method"] == method and r["calibration"] == "calibration_data (6 samples)"
        assert r["rel_l2"] <= r["rel_l2_rtn"] * (1 + 1e-9), r
    assert sum(r["rel_l2"] for r in report) < sum(r["rel_l2_rtn"] for r in report)
    # the graph's own error on the calibration data is smaller than rtn's too
    rtn, _ = run_pass(f"quantize{{weights={weights},scheme={scheme},group=32}}", g, data)
    err = lambda h: sum(np.linalg.norm(run_reference(h, d)[0] - run_reference(g, d)[0]) for d in data)  # noqa: E731
    assert err(q) < err(rtn)


def test_awq_folds_where_exact_else_a_mul():
    g, data = net(), samples()
    q, report = run_pass("quantize{weights=int4,method=awq}", g, data)
    notes = {r["layer"]: r["note"] for r in report}
    assert "folded into rmsnorm gamma" in notes["w1"] and "folded into matmul weight w1 columns" in notes["w3"]
    assert "explicit mul" in notes["w2"]
    assert [n.op for n in q.nodes].count("mul") == 1 and "awq" in report.format()
    # the fold is exact: float weights scaled by s, inputs by 1/s, give the fp32 outputs back
    f, _ = run_pass("quantize{weights=int4,method=awq,max_error=0}", g, data)
    assert all(r["status"].startswith("kept f32") for r in _)
    for d in data:
        np.testing.assert_allclose(run_reference(f, d)[0], run_reference(g, d)[0], rtol=2e-5, atol=2e-5)


def test_compiled_equals_reference_of_chosen_weights():
    """The kernels are unchanged: the compiled module matches the reference
    interpreter on the quantized graph; the report carries the end-to-end error."""
    g, data = net(), samples()
    m = sqk.compile(g, quantize="int4", quantize_method="gptq", calibration_data=data, progress=False)
    for d in data[:2]:
        np.testing.assert_allclose(m(**d), run_reference(m.ir, d)[0], rtol=1e-4, atol=1e-4)
    e2e = m.report.end_to_end
    got = np.concatenate([m(**d).ravel() for d in data])
    want = np.concatenate([run_reference(g, d)[0].ravel() for d in data])
    assert e2e["rel_l2"] == pytest.approx(np.linalg.norm(got - want) / np.linalg.norm(want), rel=1e-6)
    assert "end to end on calibration_data (6 samples)" in m.report.format()
    assert 0.99 < e2e["cosine"] < 1


def test_methods_need_calibration_data():
    with pytest.raises(PipelineError, match="method=gptq needs calibration data.*--calibration FILE.npz"):
        PassManager(parse_pipeline("quantize{weights=int4,method=gptq}")).run(net())
    with pytest.raises(PipelineError, match="method=bogus: expected rtn, gptq, awq, imatrix"):
        parse_pipeline("quantize{method=bogus}")
    with pytest.raises(PipelineError, match="damp=, act_order= and clip= apply to method=gptq"):
        parse_pipeline("quantize{method=awq,act_order=true}")
    with pytest.raises(PipelineError, match="damp=, act_order= and clip= apply to method=gptq"):
        parse_pipeline("quantize{method=rtn,clip=mse}")
    with pytest.raises(PipelineError, match="option clip=l1: expected minmax or mse"):
        parse_pipeline("quantize{method=gptq,clip=l1}")


@pytest.mark.parametrize("bad,match", [
    ({"x": np.zeros((3, 128), F32)}, r"calibration sample 1: input 'x': shape \(3, 128\), expected \(8, 128\)"),
    ({"x": np.zeros((8, 128), np.float64)}, "calibration sample 1: input 'x': dtype float64, expected float32"),
    ({"y": np.zeros((8, 128), F32)}, "calibration sample 1: unknown input.*y"),
    ({}, "calibration sample 1: missing input.*x"),
])
def test_bad_calibration_inputs(bad, match):
    data = samples(1) + [bad]
    with pytest.raises(PipelineError, match=match):
        run_pass("quantize{weights=int4,method=imatrix}", net(), data)
    with pytest.raises(PipelineError, match="non-empty list"):
        sqk.compile(net(), quantize="int4", calibration_data={"x": bad})


def test_a_method_that_cannot_apply_keeps_the_layer_in_float():
    """AWQ on a weight read by matmuls of two different inputs: one 1/s
    cannot serve both, so the layer stays in float and the report says why;
    GPTQ without dampening on a rank-deficient Hessian: the same."""
    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("shared")
    x, y = b.input("x", (4, 64)), b.input("y", (4, 64))
    w = b.const(layer(64, 32), name="w")
    g = b.output(b.add(b.matmul(x, w), b.matmul(y, w)))
    data = [{"x": rng.standard_normal((4, 64)).astype(F32), "y": rng.standard_normal((4, 64)).astype(F32)}]
    q, report = run_pass("quantize{weights=int4,method=awq}", g, data)
    assert report.kept() == ["w"] and "matmuls of different inputs" in report.row("w")["status"]
    assert not any(n.op == "matmul_q" for n in q.nodes)
    # 4 rows of 64 channels: H has rank 4; without dampening GPTQ cannot factor it
    g2, data2 = net(), samples(1, rows=8)
    _, report = run_pass("quantize{weights=int4,method=gptq,damp=0}", g2, data2)
    assert report.kept() and all("not positive definite" in r["status"] or "ill-conditioned" in r["status"]
                                 for r in report if r["status"].startswith("kept"))


def test_calibration_is_collected_once_per_compile(monkeypatch):
    import importlib

    reference = importlib.import_module("sqk.ir.reference")   # sqk.ir.reference is also a function's name
    calls = []
    real = reference.run_reference
    monkeypatch.setattr(reference, "run_reference", lambda *a, **k: calls.append(k) or real(*a, **k))
    g, data = net(), samples(3)
    sqk.compile(g, sparsify="2:4", method="wanda", quantize="int4", quantize_method="gptq",
                calibration_data=data, progress=False)
    assert len([c for c in calls if c.get("keep_all")]) == 3   # one reference run per sample, for both passes


def test_calibration_npz_and_cli(tmp_path):
    from sqk.compiler.cli import main

    g, data = net(), samples(4)
    np.savez(tmp_path / "calib.npz", x=np.stack([d["x"] for d in data]))
    c = Calibration.load_npz(str(tmp_path / "calib.npz"))
    assert len(c.samples) == 4 and np.array_equal(c.samples[2]["x"], data[2]["x"])
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 8, 128), F32), y=np.zeros((3, 1), F32))
    with pytest.raises(ValueError, match="same leading sample axis"):
        Calibration.load_npz(str(tmp_path / "bad.npz"))
    from sqk.ir.text import save_ir

    save_ir(g, str(tmp_path / "net.sqkir"))
    rc = main(["compile", str(tmp_path / "net.sqkir"), "-o", str(tmp_path / "out.sqk"), "--quantize", "int4",
               "--quantize-method", "imatrix", "--calibration", str(tmp_path / "calib.npz"), "--report", "--quiet"])
    assert rc in (0, None)
    rep = sqk.load(str(tmp_path / "out.sqk")).report
    assert all(r["method"] == "imatrix" for r in rep.get("quantize")) and "end to end on" in rep.format()


@pytest.mark.parametrize("calibration", ["dynamic", "minmax", "mse"])
def test_awq_with_int8_activations(calibration):
    """The static activation scale is that of AWQ's scaled input x / s, and the
    report's error is the op's own int8 numerics on it."""
    g, data = net(), samples()
    q, report = run_pass(f"quantize{{weights=int4,method=awq,activations=int8,calibration={calibration}}}", g, data)
    assert report.quantized() == ["w1", "w3", "w2"]
    if calibration == "minmax":   # the first layer's input is exactly fp32's x / s (folded into the norm)
        first = next(n for n in q.nodes if n.op == "matmul_q")
        x = np.concatenate([run_reference(q, d, keep_all=True)[first.inputs[0]] for d in data])
        assert first.attrs["act_scale"] == pytest.approx(float(np.abs(x).max()) / 127, rel=1e-5)
    rtn, _ = run_pass(f"quantize{{weights=int4,activations=int8,calibration={calibration}}}", g, data)
    err = lambda h: sum(np.linalg.norm(run_reference(h, d)[0] - run_reference(g, d)[0]) for d in data)  # noqa: E731
    assert err(q) < err(rtn) * 1.05
