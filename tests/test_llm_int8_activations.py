"""``sqk.llm.load(gguf, activations="int8", act_group=32)``: llama.cpp's
numerics for a GGUF file's quantized blocks (activations quantized to int8
per 32 values of a row, integer dot products), on tiny GGUF files of every
block type (tests/test_llm_gguf.py writes them), the artifact, the command
line and the real SmolLM2 file.

Exactness is checked layer by layer: the compiled decoder (a step, and a
chunk of 12 tokens: M = 12) with every quantized matmul's input and output
tapped as graph outputs, each output bit for bit ``matmul_q_i8act`` of its
own input.  End to end the logits follow a numpy model that rounds each
quantized layer's input as ggml's q8_0 blocks (d = max|x| / 127 per 32
values) only up to rounding ties: the kernels and numpy compute norms and
attention in other orders, an activation within an ulp of a tie rounds the
other way (a step d), and through the KV cache that moves later tokens'
logits by up to ~1 % -- about as far as int8 activations move them from
f32 ones on these random models.  So the end-to-end check is that the
logits are nearer the q8 model than the f32-activation one."""
import json

import numpy as np
import pytest

import sqk
from sqk.compiler.cli import main
from sqk.llm import reference_logits

from test_llm_gguf import smollm2_path, write_gguf

gguf = pytest.importorskip("gguf")

TOKENS = [3, 17, 42, 5, 99, 7, 64, 12, 1, 88, 23, 56, 31]   # 12 in one chunk (a GEMM), then a step


def assert_int8_close(got, ref, f32, what):
    """Logits ``got`` nearer ``ref`` (the q8 numpy model) than ``f32`` (the
    f32-activation one), summed over rows, and every row within 5 % of the
    logits' scale of ref (module docstring: rounding ties)."""
    got, ref, f32 = (np.atleast_2d(np.asarray(a, np.float64)) for a in (got, ref, f32))
    scale = max(1.0, float(np.abs(ref).max()))
    e8, ef = np.abs(got - ref).max(axis=1), np.abs(got - f32).max(axis=1)
    assert e8.max() <= 0.05 * scale, f"{what}: rows off by {e8.tolist()} (scale {scale})"
    assert e8.sum() < 0.75 * ef.sum(), f"{what}: off the q8 model by {e8.tolist()}, the f32 one by {ef.tolist()}"


def tapped_layers_exact(cfg, w, tokens, steps, **numerics):
    """Compile the decoder of ``tokens`` per call with every matmul_q's input
    and output as extra outputs, run ``steps`` calls (token ids per call) and
    check each output bit for bit against the op's reference on its input."""
    from sqk.ir.ops import OPS
    from sqk.llm.decoder import build_decoder, state_names

    g = build_decoder(cfg, w, tokens=tokens, all_logits=True, **numerics)
    qs = [n for n in g.nodes if n.op == "matmul_q"]
    assert qs and all(n.attrs["activations"] == "int8" for n in qs)
    taps = [v for n in qs for v in (n.inputs[0], n.outputs[0])]
    m = sqk.compile(g.with_nodes(g.nodes, outputs=list(g.outputs) + taps), pipeline="fold_constants,dce,fuse",
                    state=state_names(cfg))
    prod = g.producers()
    pos = 0
    for ids in steps:
        vals = m(token=np.array(ids), pos=np.array([pos]))[-len(taps):]
        pos += len(ids)
        for i, n in enumerate(qs):
            x, y = vals[2 * i], vals[2 * i + 1]
            want = OPS["matmul_q"].reference(x, *(prod[v].attrs["value"] for v in n.inputs[1:]), **n.attrs)[0]
            assert want.tobytes() == y.tobytes(), (tokens, pos, i, np.abs(want - y).max())


def ggml_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0 (per 32 values: d = amax / 127, q = round(x / d))
    and back, in float64: the activation a q8_0 dot product multiplies (ties
    rounded to even as sqk does; ggml's AVX2 path does too)."""
    x = np.asarray(x, np.float64)
    b = x.reshape(x.shape[0], -1, 32)
    d = np.abs(b).max(axis=2, keepdims=True) / 127
    q = np.round(np.divide(b, d, out=np.zeros_like(b), where=d > 0))
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_int8_activations_match_q8_reference(tmp_path, kind):
    from sqk.compiler.frontends.gguf import load_gguf

    tied = kind in ("Q4_1", "Q6_K")
    path = tmp_path / f"{kind}.gguf"
    write_gguf(path, kind, tied=tied, seed=3)
    cfg, w, _ = load_gguf(str(path))
    ref = reference_logits(cfg, w, TOKENS, activations="int8", act_group=32)
    f32 = reference_logits(cfg, w, TOKENS)
    # the reference's rounding is ggml's q8_0 blocks: its first layer's input, row by row
    from sqk.llm.decoder import int8_round_trip
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    x[1, :32] = 0                                                # an all-zero block: d = 0
    np.testing.assert_allclose(int8_round_trip(x, 32), ggml_q8_0(x), rtol=1e-6, atol=1e-7)

    tapped_layers_exact(cfg, w, 1, [[t] for t in TOKENS[:4]], activations="int8", act_group=32)
    tapped_layers_exact(cfg, w, 12, [TOKENS[:12], TOKENS[1:13]], activations="int8", act_group=32)

    dec = sqk.llm.load(path, activations="int8", act_group=32, prefill_chunk=12)
    assert dec.numerics == {"activations": "int8", "act_group": 32}
    got = np.stack([dec.step(t) for t in TOKENS])
    dec.reset()
    last = dec.prefill(TOKENS[:12])                  # one chunk of 12: matmul_q with M = 12
    assert 12 in dec.chunk_modules
    got = np.concatenate([got, [last, dec.step(TOKENS[12])]])
    assert_int8_close(got, np.concatenate([ref, ref[11:]]), np.concatenate([f32, f32[11:]]),
                      f"{kind} int8-activation logits (13 steps; a chunk of 12 and a step)")


def test_int8_activation_graph(tmp_path):
    """Every quantized matmul reads int8 activations in groups of 32 (Q6_K
    through its matmul_q operands, which the tied embedding's gather reads
    too: one table), float matrices stay float matmuls; the default is
    unchanged."""
    from sqk.compiler.frontends.gguf import load_gguf
    from sqk.llm import build_decoder

    path = tmp_path / "mixed.gguf"
    write_gguf(path, "Q6_K", tied=True, kinds={"attn_v": "F32", "ffn_up": "Q4_0", "ffn_down": "Q8_0"})
    cfg, w, _ = load_gguf(str(path))
    g = build_decoder(cfg, w, tokens=4, activations="int8", act_group=32)
    qs = [n for n in g.nodes if n.op == "matmul_q"]
    assert qs and all(n.attrs["activations"] == "int8" and n.attrs["act_group"] == 32 for n in qs)
    assert not any(n.op == "matmul_ggml" for n in g.nodes)
    assert sum(n.op == "matmul" for n in g.nodes) == cfg.layers     # attn_v (F32): q/k/v apart, v in float
    table = next(n.output for n in g.nodes if n.op == "const" and n.output.name == "lm_head")
    assert sorted(n.op for n in g.nodes if table in n.inputs) == ["gather_q", "matmul_q"]
    g0 = build_decoder(cfg, w, tokens=4)
    assert all(n.attrs["activations"] == "none" for n in g0.nodes if n.op == "matmul_q")
    assert any(n.op == "matmul_ggml" for n in g0.nodes)
    for bad, match in (({"activations": "int4"}, "activations must be one of none, int8"),
                       ({"act_group": 32}, "act_group=32: values per activation scale"),
                       ({"activations": "int8", "act_group": -1}, "act_group=-1")):
        with pytest.raises(ValueError, match=match):
            build_decoder(cfg, w, **bad)
    with pytest.raises(ValueError, match="act_group=32: values per activation scale"):
        sqk.llm.load(path, act_group=32)


def test_int8_activation_artifact_and_cli(tmp_path, capsys):
    """``sqk compile model.gguf --activations int8 --act-group 32``: the artifact
    records the numerics and computes the loaded model's logits."""
    path = tmp_path / "q4.gguf"
    write_gguf(path, "Q4_0", seed=5)
    out = tmp_path / "q4.sqk"
    assert main(["compile", str(path), "-o", str(out), "--activations", "int8", "--act-group", "32",
                 "--prefill-chunk", "4", "--quiet"]) == 0
    index = json.loads((out / "llm.json").read_text())
    assert (index["activations"], index["act_group"]) == ("int8", 32)
    art = sqk.llm.load(out)
    assert art.numerics == {"activations": "int8", "act_group": 32}
    dec = sqk.llm.load(path, activations="int8", act_group=32, prefill_chunk=4)
    for d in (art, dec):
        d.prefill(TOKENS[:4])
    np.testing.assert_array_equal(art.step(TOKENS[4]), dec.step(TOKENS[4]))


def test_smollm2_int8_activations():
    """The real SmolLM2-135M-Instruct Q4_1 file with llama.cpp's numerics:
    along a chat prompt and 8 greedy tokens logits as far from the
    f32-activation model's as the numpy q8 model's are (30 layers turn the
    rounding ties of the module docstring into noise of that size: sqk's
    and numpy's q8 logits are ~4 % apart, as each is from f32), the same
    top-1 token at nearly every position, and llama.cpp's text: its
    ``llama-simple`` on this file and prompt (q8 activations) answers
    "L'Étoile, la Marseillaise, la femme", as sqk does (with f32
    activations sqk answers "The capital of France is Paris."); the words
    after "la" vary with rounding ties (prefill in chunks or token by token)."""
    from sqk.compiler.frontends.gguf import load_gguf

    path = smollm2_path()
    pytest.importorskip("sqk.llm.tokenizer")
    dec = sqk.llm.load(path, max_seq=64, prefill_chunk=1, activations="int8", act_group=32)
    tok = dec.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.encode_chat(messages)
    seq = ids + dec.generate(ids, 8, stop=[])
    dec.reset()
    got = np.stack([dec.step(t) for t in seq])
    cfg, w, _ = load_gguf(path)
    ref = reference_logits(cfg, w, seq, activations="int8", act_group=32)
    f32 = reference_logits(cfg, w, seq)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert 0.3 * rel(ref, f32) < rel(got, f32) < 2 * rel(ref, f32), (rel(got, f32), rel(ref, f32))
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.85 and (got.argmax(1) == f32.argmax(1)).mean() >= 0.85
    assert dec.chat(messages, max_new_tokens=9).startswith("L'Étoile, la ")   # then tie-sensitive
    assert "red" in dec.chat([{"role": "user", "content": "Name three colors of the rainbow."}], max_new_tokens=16)
