"""sqk.llm.perplexity: llama.cpp's llama-perplexity definition checked against a
direct numpy computation on tiny random models (reference_logits, log-softmax,
the same windows and scored positions), KL divergence / top-1 agreement, the
all-logits chunk graph, the CLI and the errors."""
import json
import math

import numpy as np
import pytest

import sqk
from sqk.llm import Decoder, LlamaConfig, build_decoder, random_weights, reference_logits
from sqk.llm.perplexity import fp32_decoder, offline_text, perplexity

CFG = LlamaConfig(vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, max_seq=16)
W = random_weights(CFG, seed=3)
IDS = [int(t) for t in np.random.default_rng(0).integers(0, CFG.vocab, 61)]


@pytest.fixture(scope="module")
def dec():
    return Decoder(CFG, W, prefill_chunk=4)


def numpy_ppl(cfg, w, ids, ctx, stride=None, bos=None):
    """(PPL, its error) straight from the definition: llama.cpp's windows, scored
    positions and standard error, on reference_logits."""
    if stride is None:
        starts, first = [i * ctx for i in range(len(ids) // ctx)], ctx // 2
    else:
        starts, first = list(range(0, len(ids) - ctx, stride)), ctx - stride - 1
    nll = []
    for s in starts:
        win = list(ids[s:s + ctx])
        if bos is not None:
            win[0] = bos
        z = reference_logits(cfg, w, win).astype(np.float64)
        lp = z - z.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll += [-lp[j, win[j + 1]] for j in range(first, ctx - 1)]
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(nll.var() / (nll.size - 1)), nll.size


@pytest.mark.parametrize("ctx,stride", [(8, None), (7, None), (12, None), (10, 3)])
def test_perplexity_equals_numpy(dec, ctx, stride):
    # ctx 12, chunk 4: the all-logits chunks of the second half overlap at the end (6 rows, chunks 6..9, 8..11)
    r = perplexity(dec, IDS, ctx=ctx, stride=stride)
    ppl, err, count = numpy_ppl(CFG, W, IDS, ctx, stride)
    assert r.count == count and r.tokens == len(IDS)
    assert r.ppl == pytest.approx(ppl, rel=1e-4) and r.ppl_err == pytest.approx(err, rel=1e-3)
    assert f"PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}" in str(r)


def test_chunks_limits_windows(dec):
    seen = []
    r = perplexity(dec, IDS, ctx=8, chunks=2, progress=lambda i, n, ppl: seen.append((i, n, ppl)))
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and seen[-1][2] == pytest.approx(r.ppl)
    assert r.windows == 2 and r.ppl == pytest.approx(numpy_ppl(CFG, W, IDS[:16], 8)[0], rel=1e-4)


def test_all_logits_chunk_graph():
    g = build_decoder(CFG, W, tokens=5, all_logits=True)
    assert "last" not in [v.name for v in g.inputs] and g.outputs[0].type.shape == (5, CFG.vocab)
    m = Decoder(CFG, W, prefill_chunk=5).chunk_module(5, all_logits=True)
    out = m(token=np.array(IDS[:5]), pos=np.array([0]))
    np.testing.assert_allclose(out, reference_logits(CFG, W, IDS[:5]), rtol=1e-4, atol=1e-4)


def test_kl_against_itself_and_quantized(dec):
    same = perplexity(dec, IDS, ctx=8, base=Decoder(CFG, W, prefill_chunk=4))
    assert same.kld == pytest.approx(0, abs=1e-9) and same.top1 == 1 and same.base_ppl == pytest.approx(same.ppl)
    q = Decoder(CFG, W, prefill_chunk=4, quantize="int4", group=16)
    r = perplexity(q, IDS, ctx=8, base=fp32_decoder(q))
    q2 = fp32_decoder(dec, quantize="int4", group=16)      # the same quantization of the same weights
    assert perplexity(q2, IDS, ctx=8).ppl == pytest.approx(r.ppl, rel=1e-5)
    assert r.kld > 1e-4 and 0 < r.top1 <= 1 and r.base_ppl == pytest.approx(same.ppl, rel=1e-4)
    assert r.ppl != pytest.approx(same.ppl, rel=1e-4)
    assert "Mean KLD" in str(r) and "Same top p" in str(r)


def test_errors(dec):
    with pytest.raises(ValueError, match=r"the text has 20 tokens; perplexity at ctx 12 needs at least 24"):
        perplexity(dec, IDS[:20], ctx=12)
    with pytest.raises(ValueError, match=r"ctx 32 exceeds the KV cache length 16"):
        perplexity(dec, IDS, ctx=32)
    with pytest.raises(ValueError, match="no tokenizer"):
        perplexity(dec, "some words", ctx=8)
    with pytest.raises(ValueError, match="stride must be"):
        perplexity(dec, IDS, ctx=8, stride=8)
    with pytest.raises(ValueError, match="ctx must be"):
        perplexity(dec, IDS, ctx=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        perplexity(dec, IDS + [CFG.vocab], ctx=8)
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(dec, IDS, ctx=8, base=Decoder(LlamaConfig(vocab=50, hidden=32, heads=4, kv_heads=2,
                                                             head_dim=8, max_seq=16)))


def test_offline_text(monkeypatch, tmp_path):
    import importlib

    P = importlib.import_module("sqk.llm.perplexity")    # the module (sqk.llm.perplexity is the function)
    monkeypatch.setattr(P, "LICENSES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="base-files"):
        offline_text()
    (tmp_path / "GPL-3").write_text("text")
    assert offline_text() == str(tmp_path / "GPL-3")


# --- a model directory with a tokenizer that adds BOS: the text route and the CLI ---------------------

@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from test_llm_hf import WORDS, write_model

    path = tmp_path_factory.mktemp("ppl")
    write_model(path, "llama", eos_token_id=2, bos_token_id=1, seed=5)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    words = [w for w in WORDS if w.startswith("w")]
    rng = np.random.default_rng(1)
    (path / "text.txt").write_text(" ".join(rng.choice(words, 70)))
    return path


def test_text_puts_bos_in_each_window(bos_dir):
    dec = sqk.llm.load(bos_dir, max_seq=16)
    tok = dec.tokenizer
    text = (bos_dir / "text.txt").read_text()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) == 71
    r = perplexity(dec, text, ctx=16)
    ppl, err, count = numpy_ppl(dec.cfg, dec.weights, ids, 16, bos=tok.bos_id)
    assert r.count == count and r.ppl == pytest.approx(ppl, rel=1e-4)
    assert r.ppl != pytest.approx(perplexity(dec, ids, ctx=16).ppl, rel=1e-6)     # ids: as given, no BOS


def test_cli_perplexity(bos_dir, capsys):
    from sqk.compiler.cli import main

    text = str(bos_dir / "text.txt")
    assert main(["perplexity", str(bos_dir), "--text", text, "--ctx", "16", "--quantize", "int8",
                 "--kl-base", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert "[4/4] " in err
    assert "71 tokens, 4 windows of 16" in out and "Final estimate: PPL = " in out
    assert "Mean KLD" in out and "Same top p" in out
    assert main(["perplexity", str(bos_dir), "--text", text, "--ctx", "64"]) == 1
    assert "the text has 71 tokens; perplexity at ctx 64 needs at least 128" in capsys.readouterr().err
