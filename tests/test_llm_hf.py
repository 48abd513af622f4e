"""sqk.llm.load on Hugging Face checkpoints the tests write with transformers
(small configs, random weights, ``save_pretrained``: the real file layout):
greedy tokens equal to transformers' for 32 steps, logits within 1e-4
relative; and the loader's errors."""
import json
import re
import os

import numpy as np
import pytest

import sqk
from harness import assert_close
from sqk.compiler.frontends.hf import load_hf, read_safetensors
from sqk.llm import LLMLoadError, reference_logits
from sqk.llm.decoder import LlamaConfig, rope_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS = 32
PROMPT = [3, 17, 42, 5]
SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-5)


def write_model(path, arch, dtype=torch.float32, max_shard_size=None, seed=0, **config):
    """A random-weight model of ``arch`` saved to ``path``; returns its f32 twin
    (the saved values upcast: the reference for sqk, which computes in f32)."""
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[arch]
    conf = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config}[arch](**{**SMALL, **config})
    conf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(conf).eval()
    if arch == "qwen2":       # transformers initializes the biases to zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kw)
    # read back in f32 (not model.to(f32): that would keep the rope frequencies rounded to f16)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def file_backed(a) -> bool:
    while a is not None:
        if isinstance(a, np.memmap) and a.filename:
            return True
        a = a.base
    return False


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def check_greedy(dec, model, rtol=1e-4):
    """32 greedy tokens from PROMPT equal to transformers' argmax at every
    position, and every step's logits within rtol of transformers'."""
    dec.reset()
    logits = [dec.prefill(PROMPT)]
    out = []
    for _ in range(STEPS):
        out.append(int(np.argmax(logits[-1])))
        logits.append(dec.step(out[-1]))
    ref = hf_logits(model, PROMPT + out)
    assert [int(np.argmax(r)) for r in ref[len(PROMPT) - 1:-1]] == out
    got = np.stack(logits)
    assert_close(got, ref[len(PROMPT) - 1:], rtol, what="logits vs transformers")
    return out


CASES = {
    # name: (arch, save dtype, max_shard_size, config)
    "llama": ("llama", torch.float32, None, {}),
    "llama3_rope_tied_sharded": ("llama", torch.float32, "60KB", dict(
        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral_f16": ("mistral", torch.float16, None, {}),
    "qwen2_bias_tied": ("qwen2", torch.float32, None, dict(tie_word_embeddings=True)),
    "llama_bf16": ("llama", torch.bfloat16, None, dict(rope_theta=500000.0)),
}


@pytest.mark.parametrize("name", CASES)
def test_hf_greedy_matches_transformers(tmp_path, name):
    arch, dtype, shard, config = CASES[name]
    model = write_model(tmp_path, arch, dtype, shard, **config)
    files = os.listdir(tmp_path)
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    dec = sqk.llm.load(tmp_path)
    cfg = dec.config
    assert cfg.max_seq == 64 == cfg.context_length and cfg.arch == arch
    assert cfg.tie_embeddings == config.get("tie_word_embeddings", False)
    assert cfg.qkv_bias == (arch == "qwen2") and bool(cfg.rope_scaling) == ("rope_scaling" in config)
    assert dec.graph is None and dec.module.ir is None         # the graph's constant copies are dropped
    # f16 / bf16 checkpoints: the saved values are exact in f32, so transformers on the same values upcast
    # to f32 is the reference and the tolerance stays that of f32 arithmetic
    check_greedy(dec, model)


def test_hf_tied_table_is_one_constant(tmp_path):
    model = write_model(tmp_path, "llama", tie_word_embeddings=True)
    cfg, w = load_hf(str(tmp_path))
    assert "embed" not in w and w["lm_head"].shape == (64, 160)
    raw = read_safetensors(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"][0]
    for name in ("lm_head", "wq.0", "w2.1"):           # f32: transposed views of the memory-mapped file
        a = w[name]
        assert a.T.flags.c_contiguous and not a.flags.owndata and file_backed(a), name
    np.testing.assert_array_equal(w["lm_head"], raw.T)
    g = sqk.llm.build_decoder(cfg, w)
    consts = [n for n in g.nodes if n.op == "const" and n.attrs["value"].shape == (64, 160)]
    assert len(consts) == 1                                   # gather and lm_head read the one table
    ref = reference_logits(cfg, w, PROMPT)
    assert_close(ref, hf_logits(model, PROMPT), 1e-4)


def test_llama3_inv_freq_matches_transformers():
    conf = transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64})
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(conf)
    cfg = LlamaConfig(head_dim=16, rope_scaling=("llama3", 8.0, 1.0, 4.0, 64.0))
    np.testing.assert_array_equal(rope_frequencies(cfg), rot.inv_freq.numpy())
    assert rope_frequencies(LlamaConfig()) is None


def test_rope_inv_freq_input_matches_reference():
    b = sqk.GraphBuilder("rope")
    inv = np.geomspace(1.0, 1e-3, 4).astype(np.float32)
    x, p = b.input("x", (3, 2, 8)), b.input("p", (1,), "i64")
    g = b.output(b.rope(x, p, b.const(inv, name="inv")), b.rope(x, p, b.const(inv, name="inv2"), style="interleaved"))
    rng = np.random.default_rng(0)
    xs, ps = rng.standard_normal((3, 2, 8), dtype=np.float32), np.array([5])
    m = sqk.compile(g)
    for got, ref in zip(m(x=xs, p=ps), sqk.reference(g, x=xs, p=ps)):
        assert_close(got, ref)
    t = np.arange(5, 8, dtype=np.float32)[:, None, None] * inv      # [3, 1, 4]
    half = sqk.reference(g, x=xs, p=ps)[0]
    np.testing.assert_allclose(half[..., :4], xs[..., :4] * np.cos(t) - xs[..., 4:] * np.sin(t), rtol=1e-5, atol=1e-6)


# --- generate ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_model(path, "llama", eos_token_id=7)
    return path


@pytest.fixture(scope="module")
def llama_dec(llama_dir):
    return sqk.load_llm(llama_dir, max_seq=40)


def test_generate_stop_stream_and_cache_errors(llama_dec):
    dec = llama_dec
    assert dec.config.max_seq == 40 and dec.config.eos_ids == (7,)
    dec.reset()
    free = dec.generate(PROMPT, 12, stop=[])
    dec.reset()
    seen = []
    out = dec.generate(PROMPT, 12, stop=[free[5]], stream=lambda t, s: seen.append((t, s)))
    first = free.index(free[5])
    assert out == free[:first] and seen == [(t, "") for t in out]     # no tokenizer: empty pieces
    dec.reset()
    with pytest.raises(ValueError, match="41 tokens from position 0 go beyond the KV cache length 40"):
        dec.generate(list(range(41)), 1)
    dec.reset()
    out = dec.generate(list(range(30)), 50, stop=[])                 # ends when the cache is full
    assert len(out) == 11 and dec.pos == 40
    with pytest.raises(ValueError, match="no tokenizer"):
        dec.generate("hello", 2)


def test_generate_sampled_is_seeded(llama_dec):
    pytest.importorskip("sqk.llm.sampling")
    dec = llama_dec
    dec.reset()
    a = dec.generate(PROMPT, 8, temperature=0.8, top_k=20, seed=3, stop=[])
    dec.reset()
    assert dec.generate(PROMPT, 8, temperature=0.8, top_k=20, seed=3, stop=[]) == a
    dec.reset()
    greedy = dec.generate(PROMPT, 8, stop=[])
    dec.reset()
    assert dec.generate(PROMPT, 8, temperature=1e-6, seed=1, stop=[]) == greedy   # ~0 temperature: the argmax


# --- errors ------------------------------------------------------------------------------------

def test_load_errors(tmp_path, llama_dir):
    with pytest.raises(LLMLoadError, match="no such file or directory"):
        sqk.llm.load(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"abcd")
    with pytest.raises(LLMLoadError, match="neither a model directory"):
        sqk.llm.load(tmp_path / "x.bin")
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(LLMLoadError, match=r"config.json: missing"):
        sqk.llm.load(d)
    conf = json.loads((llama_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(conf, architectures=["GPT2LMHeadModel"], model_type="gpt2")))
    with pytest.raises(LLMLoadError, match="architecture GPT2LMHeadModel is not supported"):
        sqk.llm.load(d)
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LLMLoadError, match="no model.safetensors"):
        sqk.llm.load(d)
    data = (llama_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) - 100])
    with pytest.raises(LLMLoadError, match=r"model.safetensors: truncated safetensors file: tensor .* ends at"):
        sqk.llm.load(d)
    (d / "model.safetensors").write_bytes(data[:6])
    with pytest.raises(LLMLoadError, match="truncated safetensors file"):
        sqk.llm.load(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(LLMLoadError, match=r"model-00001-of-00002.safetensors: missing \(a shard named in"):
        sqk.llm.load(d)


def test_unsupported_tensor_dtype_and_missing_tensor(tmp_path, llama_dir):
    from safetensors.numpy import save_file

    conf = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(conf))
    save_file({"model.norm.weight": np.zeros(64, np.float64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LLMLoadError, match=r"tensor 'model.norm.weight' has dtype F64; sqk reads F32, F16 and BF16"):
        sqk.llm.load(tmp_path)
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LLMLoadError, match=r"tensor 'model.embed_tokens.weight' is missing"):
        sqk.llm.load(tmp_path)
    save_file({"model.norm.weight": np.zeros(63, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LLMLoadError, match=r"'model.norm.weight' has shape \[63\], the config says \[64\]"):
        sqk.llm.load(tmp_path)


# --- text: a word-level tokenizer beside a tiny model ---------------------------------------------

WORDS = ["[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(155)]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("text")
    write_model(path, "llama", eos_token_id=2, bos_token_id=1, seed=4)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")        # joins words with spaces
    tok.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]", "chat_template": TEMPLATE}))
    return path


def test_generate_text_stream_and_chat(text_dir):
    dec = sqk.llm.load(text_dir)
    tok = dec.tokenizer
    assert tok is not None and dec.config.eos_ids == (2,)
    ids = tok.encode("w5 w17 w42")
    pieces = []
    out = dec.generate("w5 w17 w42", 10, stop=[], stream=lambda t, s: pieces.append(s))
    dec.reset()
    assert dec.generate(ids, 10, stop=[]) == out                     # text prompt = its ids
    assert "".join(pieces).strip() == tok.decode(out)
    messages = [{"role": "user", "content": "w1 w2"}]
    dec.reset()
    want = dec.generate(tok.encode_chat(messages), 6)
    assert dec.chat(messages, max_new_tokens=6) == tok.decode(want)


def test_cli_generate(text_dir, capsys):
    from sqk.compiler.cli import main

    assert main(["generate", str(text_dir), "--prompt", "w5 w17 w42", "-n", "6", "--max-seq", "32"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("w5 w17 w42") and len(out.split()) > 3
    assert re.search(r"prefill 3 tokens: [\d.]+ tokens/s; decode \d+ tokens: ([\d.]+|-) tokens/s", err), err
    assert main(["generate", str(text_dir / "nope"), "--prompt", "x"]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_max_seq_budget():
    from sqk.llm.loader import KV_BUDGET, choose_max_seq, kv_bytes_per_position

    smol = LlamaConfig(layers=30, heads=9, kv_heads=3, head_dim=64, context_length=8192)
    assert kv_bytes_per_position(smol) == 46080 and KV_BUDGET == 256 << 20
    assert choose_max_seq(smol, None) == 5825 and choose_max_seq(smol, None, "f16") == 8192
    llama3 = LlamaConfig(layers=32, heads=32, kv_heads=8, head_dim=128, context_length=131072)
    assert choose_max_seq(llama3, None) == 1024 and choose_max_seq(llama3, None, "f16") == 2048
    assert choose_max_seq(LlamaConfig(context_length=64), None) == 64 and choose_max_seq(LlamaConfig(), None) == 2048
    assert choose_max_seq(smol, 100000) == 100000                    # asked for: the budget is only the default
    mistral = LlamaConfig(context_length=32768, sliding_window=4096)
    assert choose_max_seq(mistral, None) == 4096
    with pytest.raises(LLMLoadError, match="max_seq=5000 exceeds the model's sliding attention window of 4096"):
        choose_max_seq(mistral, 5000, where="m")
    with pytest.raises(ValueError, match="max_seq must be a positive int"):
        choose_max_seq(smol, 0)


def test_f16_kv_cache(llama_dir, llama_dec):
    dec = sqk.llm.load(llama_dir, max_seq=40, kv_dtype="f16")
    assert dec.module.state["k_cache.0"].dtype == np.float16
    llama_dec.reset()
    want = np.stack([llama_dec.prefill(PROMPT)] + [llama_dec.step(t) for t in (9, 4, 77)])
    got = np.stack([dec.prefill(PROMPT)] + [dec.step(t) for t in (9, 4, 77)])
    assert_close(got, want, 5e-3, what="f16 KV cache vs f32")      # K/V rounded to f16 (11 bits) once
    with pytest.raises(ValueError, match="kv_dtype must be one of f32, f16"):
        sqk.llm.load(llama_dir, kv_dtype="bf16")
