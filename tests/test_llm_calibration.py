"""LLM calibration from text (llm/calibrate.py): each linear layer's inputs
collected by running the calibration windows through the fp32 model, read by
the quantize/sparsify methods of every module a Decoder compiles; the
end-to-end budget ``max_error="ppl+..."``; the bad inputs."""
import math

import numpy as np
import pytest

from sqk.llm import Decoder, LlamaConfig, random_weights, reference_logits
from sqk.llm.calibrate import Budget, TextCalibration, parse_budget

CFG = LlamaConfig(vocab=97, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96, max_seq=32)
W = random_weights(CFG, seed=5)
IDS = [int(t) for t in np.random.default_rng(1).integers(0, CFG.vocab, 100)]
CTX = 32


@pytest.fixture(scope="module")
def calib():
    return TextCalibration(CFG, W, None, IDS, CTX)


def test_windows_and_stats_equal_direct_collection(calib):
    assert calib.windows == [IDS[s:s + CTX] for s in (0, 32, 64)] and calib.tokens == 100
    seen = {}
    for w in calib.windows:
        reference_logits(CFG, W, w, capture=lambda name, x: seen.setdefault(name, []).append(x.astype(np.float64)))
    for name in ("wq.0", "wk.0", "wo.1", "w2.1", "lm_head"):
        x = np.concatenate(seen[name])
        st = calib.by_weight[name]
        assert st.rows == x.shape[0] == 96
        np.testing.assert_allclose(st.xtx, x.T @ x, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(st.sum_sq, (x * x).sum(0), rtol=1e-9)
    assert calib.by_weight["wq.0"] is calib.by_weight["wv.0"]       # one input, one collection
    assert calib.by_weight["w1.1"] is calib.by_weight["w3.1"]
    # the fp32 NLL of the scored second halves
    lp = reference_logits(CFG, W, calib.windows[1]).astype(np.float64)
    lp = lp - lp.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    want = [-lp[j, calib.windows[1][j + 1]] for j in range(CTX // 2, CTX - 1)]
    np.testing.assert_allclose(calib.fp32_nll[len(want):2 * len(want)], want, rtol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "awq", "imatrix"])
def test_calibration_text_methods_beat_rtn(method):
    dec = Decoder(CFG, W, quantize="int4", quantize_method=method, calibration_text=IDS, calibration_ctx=CTX,
                  prefill_chunk=8)
    rows = list(dec.module.report)
    assert len(rows) == 4 * CFG.layers + 1 and all(r["status"] == "quantized" for r in rows)
    assert all(r["calibration"].startswith("calibration text (100 tokens, 3 windows of 32)") for r in rows)
    better = sum(r["rel_l2"] < r["rel_l2_rtn"] for r in rows)
    assert better == len(rows) if method == "gptq" else better >= len(rows) // 2
    # the chunk modules read the same collection and get the same weights (one GPTQ per weight)
    calib = dec.compile_options["calibration_data"]
    memo = len(calib._memo)
    m = dec.chunk_module(8)
    assert len(calib._memo) == memo
    assert [r["rel_l2"] for r in m.report] == [r["rel_l2"] for r in rows]
    dec.reset()
    logits = dec.prefill(IDS[:9])
    ref = reference_logits(CFG, W, IDS[:9])[-1]
    assert np.corrcoef(logits, ref)[0, 1] > 0.98


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_text_pruning(method):
    dec = Decoder(CFG, W, sparsify="2:4", method=method, calibration_text=IDS, calibration_ctx=CTX)
    rows = list(dec.module.report.get("sparsify"))
    assert all(r["status"] == "pruned" for r in rows)
    assert sum(r["rel_l2"] < r["rel_l2_magnitude"] for r in rows) == len(rows)


def sampled_text(cfg, w, n, seed=0):
    """n tokens sampled from the model itself (so that its own perplexity on them is low and any
    perturbation of the weights raises it)."""
    rng = np.random.default_rng(seed)
    ids = [1]
    while len(ids) < n:
        z = reference_logits(cfg, w, ids[-CTX + 1:])[-1].astype(np.float64)
        p = np.exp(z - z.max())
        ids.append(int(rng.choice(cfg.vocab, p=p / p.sum())))
    return ids


def test_budget_holds():
    cfg = LlamaConfig(vocab=97, hidden=64, layers=1, heads=4, kv_heads=2, head_dim=16, ffn=96, max_seq=32)
    w = random_weights(cfg, seed=5)
    w["lm_head"] *= 4                        # a confident model
    text = sampled_text(cfg, w, 96)
    calib = TextCalibration(cfg, w, None, text, CTX)
    opts = dict(prefill_chunk=CTX, quantize="int4", group=64, calibration_data=calib)
    fp32 = math.exp(calib.fp32_nll.mean())
    # a generous budget keeps everything quantized
    all_q = Decoder(cfg, w, **opts, max_error="ppl+50%")
    assert all_q.budget.met and all_q.budget.kept == [] and len(all_q.budget.rounds) == 1
    quant = math.exp(calib.nll(all_q).mean())
    assert quant > fp32 and all_q.budget.ppl == pytest.approx(quant, rel=1e-9)
    limit_abs = (quant - fp32) / 3            # a budget all-int4 misses
    dec = Decoder(cfg, w, **opts, max_error=f"ppl+{limit_abs:.6g}")
    b = dec.budget
    assert b.met and b.kept and len(b.kept) < 8
    assert b.rounds[0] == ([], pytest.approx(quant, rel=1e-9))
    got = math.exp(calib.nll(dec).mean())     # measured again on the decoder returned
    assert got == pytest.approx(b.ppl, rel=1e-9) and got <= b.limit == pytest.approx(fp32 + limit_abs)
    report = list(dec.module.report)
    assert sorted(r["layer"] for r in report if r["status"].startswith("skipped")) == sorted(b.kept)
    # the most sensitive layers are the ones kept
    errs = {r["layer"]: r["rel_l2"] for r in all_q.module.report}
    assert min(errs[k] for k in b.kept) >= max(v for k, v in errs.items() if k not in b.kept)
    assert "met" in str(b) and f"{len(b.kept)} layers kept in float" in str(b)


def test_budget_promotes_to_int8():
    cfg = LlamaConfig(vocab=97, hidden=64, layers=1, heads=4, kv_heads=2, head_dim=16, ffn=96, max_seq=32,
                      tie_embeddings=True)
    w = random_weights(cfg, seed=5)
    w.pop("embed")
    w["lm_head"] *= 4
    text = sampled_text(cfg, w, 96)
    calib = TextCalibration(cfg, w, None, text, CTX)
    opts = dict(prefill_chunk=CTX, quantize="int4", group=64, calibration_data=calib, fallback="int8")
    fp32 = math.exp(calib.fp32_nll.mean())
    all_q = Decoder(cfg, w, **opts, max_error="ppl+1000%")
    quant = all_q.budget.ppl
    dec = Decoder(cfg, w, **opts, max_error=f"ppl+{(quant - fp32) / 3:.6g}")
    b = dec.budget
    assert b.met and b.kept and b.fallback == "int8" and "layers in int8" in str(b)
    rows = {r["layer"]: r for r in dec.module.report}
    assert all(r["status"] == "quantized" for r in rows.values())
    assert sorted(k for k, r in rows.items() if r["weights"] == "int8 per-channel sym") == sorted(b.kept)
    assert all(rows[k]["note"] == "fallback int8 (promote=)" for k in b.kept)
    assert math.exp(calib.nll(dec).mean()) == pytest.approx(b.ppl, rel=1e-9) and b.ppl <= b.limit
    # the bytes: int8 codes + f32 scales per column, int4 codes + f32 scales per group of 64
    for k, r in rows.items():
        kk, n = r["shape"]
        assert r["bytes"] == (kk * n + 4 * n if k in b.kept else kk * n // 2 + 4 * n * -(-kk // 64))
    # a user's promote= stays promoted and out of the budget's choice; budget_windows=1: the budget is
    # measured on the first window only
    one = TextCalibration(cfg, w, None, text, CTX, budget_windows=1)
    dec2 = Decoder(cfg, w, **dict(opts, calibration_data=one), promote="lm_head",
                   max_error=f"ppl+{(quant - fp32) / 3:.6g}")
    b2 = dec2.budget
    assert "lm_head" not in b2.kept
    assert {r["layer"]: r for r in dec2.module.report}["lm_head"]["weights"] == "int8 per-channel sym"
    assert b2.fp32_ppl == pytest.approx(math.exp(one.fp32_nll[:CTX - 1 - CTX // 2].mean()), rel=1e-12)
    assert b2.ppl == pytest.approx(math.exp(one.nll(dec2, 1).mean()), rel=1e-9)
    with pytest.raises(ValueError, match="budget_windows must be a positive int"):
        TextCalibration(cfg, w, None, text, CTX, budget_windows=0)


def test_parse_budget():
    assert parse_budget("ppl+2%") == Budget("ppl+2%", rel=0.02)
    assert parse_budget(" ppl + 0.5 ") == Budget("ppl + 0.5", abs=0.5)
    assert parse_budget(0.02) is None and parse_budget("0.02") is None and parse_budget(None) is None
    for bad in ("ppl-2%", "kl+1", "ppl+", "ppl+nan", "ppl+-1%"):
        with pytest.raises(ValueError, match="end-to-end perplexity budget"):
            parse_budget(bad)


def test_errors():
    with pytest.raises(ValueError, match=r"has 20 tokens; calibration at calibration_ctx 32 needs at least 32 "
                                         r"\(one window\)"):
        Decoder(CFG, W, quantize="int4", quantize_method="gptq", calibration_text=IDS[:20], calibration_ctx=CTX)
    with pytest.raises(ValueError, match=r"1-D sequence of token ids, got ndarray of shape \[2, 50\]"):
        Decoder(CFG, W, quantize="int4", calibration_text=np.array(IDS).reshape(2, 50))
    with pytest.raises(ValueError, match=r"calibration_text is a str but the model has no tokenizer"):
        Decoder(CFG, W, quantize="int4", calibration_text="some text")
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        Decoder(CFG, W, quantize="int4", calibration_text=IDS + [97], calibration_ctx=CTX)
    with pytest.raises(ValueError, match=r"calibration_text= applies when the decoder is quantized or sparsified"):
        Decoder(CFG, W, calibration_text=IDS, calibration_ctx=CTX)
    with pytest.raises(ValueError, match=r"max_error='ppl\+2%' is measured on a calibration text"):
        Decoder(CFG, W, quantize="int4", max_error="ppl+2%")
    with pytest.raises(ValueError, match=r"max_error='2 percent'"):
        Decoder(CFG, W, quantize="int4", max_error="2 percent")
    with pytest.raises(ValueError, match=r"calibration_ctx must be an int >= 3"):
        Decoder(CFG, W, quantize="int4", calibration_text=IDS, calibration_ctx=2)


def test_method_that_cannot_apply_keeps_float():
    # tied embeddings: the lm_head constant is also the embedding table, which AWQ's scaling would change
    cfg = LlamaConfig(vocab=97, hidden=64, layers=1, heads=4, kv_heads=2, head_dim=16, ffn=96, max_seq=32,
                      tie_embeddings=True)
    w = random_weights(cfg, seed=2)
    w.pop("embed")
    dec = Decoder(cfg, w, quantize="int4", quantize_method="awq", calibration_text=IDS, calibration_ctx=CTX)
    rows = {r["layer"]: r for r in dec.module.report}
    assert rows["lm_head"]["status"] == ("kept f32: awq cannot apply: the weight constant is read elsewhere too "
                                         "(scaling it would change that use)")
    assert sum(r["status"] == "quantized" for r in rows.values()) == 4   # wqkv, wo, w13, w2 (fused projections)
    dec.reset()
    assert np.corrcoef(dec.prefill(IDS[:5]), reference_logits(cfg, w, IDS[:5])[-1])[0, 1] > 0.95


def test_mole_experts_are_calibrated():
    cfg = LlamaConfig(vocab=97, hidden=32, layers=1, heads=4, kv_heads=2, head_dim=8, ffn=48, max_seq=32,
                      lookup_experts=2, lookup_ffn=16)
    w = random_weights(cfg, seed=2)
    dec = Decoder(cfg, w, quantize="int4", quantize_method="gptq", calibration_text=IDS, calibration_ctx=CTX)
    rep = dec.module.report
    rows = {r["layer"]: r for r in (rep if hasattr(rep, "pass_name") else rep.get("quantize"))}
    assert rows["mole_up_0_1"]["status"] == rows["mole_router_0"]["status"] == "quantized"
    assert rows["mole_up_0_1"]["rel_l2"] < rows["mole_up_0_1"]["rel_l2_rtn"]


# --- the command line: a model directory with a tokenizer (test_perplexity's) -----------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_perplexity import bos_dir

    return bos_dir.__wrapped__(tmp_path_factory)


def test_cli_calibration_text(model_dir, capsys, tmp_path):
    from sqk.compiler.cli import main

    text = str(model_dir / "text.txt")
    calib = tmp_path / "calib.txt"
    words = [w for w in (model_dir / "text.txt").read_text().split()]
    calib.write_text(" ".join(reversed(words)))      # another text over the same words
    args = ["perplexity", str(model_dir), "--text", text, "--ctx", "16", "--quantize", "int4", "--group", "16",
            "--quantize-method", "gptq", "--calibration-text", str(calib), "--calibration-ctx", "16"]
    assert main(args + ["--max-error", "ppl+1000%"]) == 0
    out, err = capsys.readouterr()
    assert "Final estimate: PPL = " in out
    assert "end-to-end budget max_error=ppl+1000%" in err and "met: " in err
    assert main(args[:-4] + ["--max-error", "ppl+1%"]) == 1
    assert "max_error='ppl+1%' is measured on a calibration text: give calibration_text=" in capsys.readouterr().err
    assert main(args[:-2] + ["--calibration-ctx", "80"]) == 1
    assert "calibration text has 71 tokens; calibration at calibration_ctx 80 needs at least 80 (one window)" in \
        capsys.readouterr().err
    out_dir = tmp_path / "m.sqk"
    assert main(["compile", str(model_dir), "-o", str(out_dir), "--quantize", "int4", "--group", "16",
                 "--quantize-method", "awq", "--calibration-text", str(calib), "--calibration-ctx", "16",
                 "--max-seq", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out_dir), "--prompt", "w1 w2", "-n", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", str(model_dir), "--prompt", "w1", "--calibration-ctx", "16"]) == 1
    assert "--calibration-ctx applies with --calibration-text" in capsys.readouterr().err


def test_promote_within_counts_every_byte():
    """quant-accuracy's mixed row: the lm_head, then the layers of largest error, in int8 while the
    stored bytes (codes and f16 scales) stay within the bits per weight given."""
    from sqk.benchmarks.quant_accuracy import promote_within
    from sqk.compiler.quantize import quantized_nbytes

    shapes = {"lm_head": (64, 512), "a": (64, 64), "b": (128, 64), "c": (64, 64)}
    errs = {"lm_head": 0.1, "a": 0.3, "b": 0.2, "c": 0.1}
    rows = [{"layer": k, "shape": s, "rel_l2": errs[k], "bytes": quantized_nbytes(*s, 4, 32, "f16", False)}
            for k, s in shapes.items()]
    weights = sum(k * n for k, n in shapes.values())

    def bits(chosen):
        return 8 * sum(quantized_nbytes(k, n, 8, k, "f16", False) if name in chosen else
                       quantized_nbytes(k, n, 4, 32, "f16", False) for name, (k, n) in shapes.items()) / weights

    assert promote_within(rows, 4.5) == ["lm_head"] and promote_within(rows, 4.5, ()) == []   # given: always
    assert promote_within(rows, 4.85, ()) == ["a"]
    for cap in (bits(["lm_head"]), 7.3, 7.7, 8.1):
        got = promote_within(rows, cap)
        assert bits(got) <= cap
        assert got == ["lm_head", "a", "b", "c"][:len(got)] or got[:1] == ["lm_head"]
        rest = [k for k in ("a", "b", "c") if k not in got]
        assert all(bits(got + [k]) > cap for k in rest)          # nothing more fits
    assert promote_within(rows, 8.3) == ["lm_head", "a", "b", "c"]
