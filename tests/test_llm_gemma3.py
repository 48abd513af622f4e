"""Gemma 3 (arch "gemma3"): a tiny random Gemma3ForCausalLM written by
transformers (f32 and bf16) against transformers itself: 32 greedy tokens
and logits within 1e-4 relative, over sequences longer than the sliding
window, prefilled token by token and in chunks."""
import dataclasses

import numpy as np
import pytest

import sqk
from harness import assert_close
from sqk.llm import reference_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS = 32
SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=64, initializer_range=0.1,
             rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=24, bos_token_id=2, eos_token_id=1,
             pad_token_id=0)


def write_gemma3(path, dtype=torch.float32, seed=0, **config):
    """A random Gemma3ForCausalLM saved to ``path`` (its RMSNorm weights random
    too: transformers starts them at 0, the scale 1); returns it read back in f32."""
    conf = transformers.Gemma3TextConfig(**{**SMALL, **config})
    conf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    model.to(dtype).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def check_greedy(dec, model, prompt, rtol=1e-4):
    dec.reset()
    logits = [dec.prefill(prompt)]
    out = []
    for _ in range(STEPS):
        out.append(int(np.argmax(logits[-1])))
        logits.append(dec.step(out[-1]))
    ref = hf_logits(model, prompt + out)
    assert [int(np.argmax(r)) for r in ref[len(prompt) - 1:-1]] == out
    assert_close(np.stack(logits), ref[len(prompt) - 1:], rtol, what="logits vs transformers")
    return out


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gemma3_hf_matches_transformers(tmp_path, dtype):
    model = write_gemma3(tmp_path, {"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    dec = sqk.llm.load(tmp_path)
    cfg = dec.config
    assert cfg.arch == "gemma3" and cfg.tie_embeddings and cfg.act == "gelu_tanh" and cfg.qk_norm
    assert cfg.window_layers == (0, 1, 2, 3, 4, 6) and cfg.sliding_window == 8
    assert cfg.theta == 1e6 and cfg.theta_local == 1e4 and cfg.max_seq == 64
    out = check_greedy(dec, model, [2, 17, 42, 5])          # 36 positions: past the window of 8
    assert len(out) == STEPS
    # the numpy reference agrees as well, and would not without the window
    ids = [2, 17, 42, 5] + out[:12]
    from sqk.compiler.frontends.hf import load_hf
    c, w = load_hf(str(tmp_path))
    want = hf_logits(model, ids)
    assert_close(reference_logits(c, w, ids), want, 1e-4, what="reference_logits")
    unwindowed = reference_logits(dataclasses.replace(c, sliding_window=0), w, ids)
    assert np.abs(unwindowed[8:] - want[8:]).max() > 1e-2 and np.allclose(unwindowed[:8], want[:8], 1e-4, 1e-4)


def test_gemma3_hf_chunked_prefill(tmp_path):
    """A 30-token prompt in chunks of 8 (each straddling the window), then 32 steps."""
    model = write_gemma3(tmp_path, seed=1, num_key_value_heads=1)
    dec = sqk.llm.load(tmp_path)
    dec.prefill_chunk = 8
    prompt = [2] + [int(t) for t in np.random.default_rng(0).integers(3, 160, 29)]
    check_greedy(dec, model, prompt)
    assert 8 in dec.chunk_modules


def test_gemma3_graph_windows():
    from sqk.llm import LlamaConfig, build_decoder, random_weights

    cfg = LlamaConfig(arch="gemma3", layers=3, act="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=8.0,
                      window_layers=(0, 2), sliding_window=5, theta_local=100.0, max_seq=16)
    g = build_decoder(cfg, random_weights(cfg))
    att = [n for n in g.nodes if n.op == "attention_decode"]
    assert [n.attrs["window"] for n in att] == [5, 0, 5]
    assert [n.attrs["theta"] for n in g.nodes if n.op == "rope"] == [100.0, 100.0, 10000.0, 10000.0, 100.0, 100.0]
    assert sum(n.op == "gelu" for n in g.nodes) == 3 and not any(n.op == "swiglu" for n in g.nodes)


def test_gemma3_hf_errors(tmp_path):
    import json

    from sqk.llm import LLMLoadError

    write_gemma3(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    for key, value, msg in (("final_logit_softcapping", 30.0, "final_logit_softcapping is not supported"),
                            ("hidden_activation", "relu", "hidden_activation 'relu' is not supported"),
                            ("layer_types", ["full_attention"], "layer_types")):
        (tmp_path / "config.json").write_text(json.dumps({**c, key: value}))
        with pytest.raises(LLMLoadError, match=msg):
            sqk.llm.load(tmp_path)
