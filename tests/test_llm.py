"""LLM decoding ops (rope, swiglu, topk, attention_decode, moe), KV-cache state
kept in the Module between calls, and the step-by-step decoder vs a numpy model."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from harness import assert_close, check, compile_for, rand, target_param

import sqk
from sqk.llm import Decoder, LlamaConfig, build_decoder, random_weights, reference_logits
from sqk.ir.graph import IRError


def _rng(seed):
    return np.random.default_rng(seed)


# --- rope, swiglu, topk --------------------------------------------------------------------

def _small_ops_graph(dtype):
    b = sqk.GraphBuilder("llm_small_" + dtype)
    x4 = b.input("x4", (2, 3, 4, 8), dtype)          # [B, T, H, D], one position per token
    p3 = b.input("p3", (3,), "i64")
    x2 = b.input("x2", (5, 6), dtype)                 # [T, D] from a start position (i32)
    p0 = b.input("p0", (), "i32")
    gate, up = b.input("gate", (3, 37), dtype), b.input("up", (3, 37), dtype)
    tk = b.input("tk", (4, 11), dtype)
    vals, idx = b.topk(tk, k=4)
    return b.output(b.rope(x4, p3), b.rope(x2, p0, style="interleaved", theta=500.0), b.swiglu(gate, up), vals, idx)


def _small_inputs(dtype):
    tk = np.array([[1, 2, 2, 0, 5, 5, 5, -1, 3, 2, 0]] * 4, np.float32)
    tk[1, 3] = np.nan
    tk[2, [0, 10]] = np.nan
    tk[3] = 7.0                                       # all equal: indices 0..3
    return dict(x4=rand((2, 3, 4, 8), dtype), p3=np.array([0, 9, 1000]), x2=rand((5, 6), dtype),
                p0=np.array(11, np.int32), gate=rand((3, 37), dtype), up=rand((3, 37), dtype),
                tk=tk.astype(sqk.ir.dtypes.dtype(dtype).np_dtype))


@target_param
def test_rope_swiglu_topk(target):
    check(_small_ops_graph("f32"), _small_inputs("f32"), target)


def test_rope_swiglu_topk_f16():
    check(_small_ops_graph("f16"), _small_inputs("f16"), "host")


def test_op_semantics():
    # rope "half" is HF rotate_half: y = x * cos + rotate_half(x) * sin
    x, d = rand((3, 2, 8)), 8
    ang = np.array([4, 5, 6], np.float32)[:, None] * (10000.0 ** (-np.arange(4) * 2.0 / d)).astype(np.float32)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    b = sqk.GraphBuilder("r")
    g = b.output(b.rope(b.input("x", (3, 2, 8)), b.input("p", (1,), "i64")))
    assert_close(sqk.reference(g, x=x, p=np.array([4])), (x * cos + rot * sin).astype(np.float32), 1e-5)
    # topk: ties to the lower index, NaN first
    b = sqk.GraphBuilder("t")
    g = b.output(*b.topk(b.input("x", (6,)), k=4))
    v, i = sqk.reference(g, x=np.array([3, 1, np.nan, 3, 5, 3], np.float32))
    assert i.tolist() == [2, 4, 0, 3] and np.isnan(v[0]) and v[1:].tolist() == [5, 3, 3]


def test_shape_errors():
    b = sqk.GraphBuilder("e")
    with pytest.raises(IRError, match="even head dim"):
        b.rope(b.input("x", (1, 2, 5)), b.input("p", (), "i64"))
    with pytest.raises(IRError, match=r"k=6 must lie in \[0, 5\]"):
        b.topk(b.input("t", (2, 5)), k=6)
    with pytest.raises(IRError, match="multiple of Hkv"):
        b.attention_decode(b.input("q", (3, 4)), *[b.input(n, s) for n, s in
                           (("kn", (2, 4)), ("vn", (2, 4)), ("kc", (2, 8, 4)), ("vc", (2, 8, 4)))],
                           b.input("pos", (1,), "i64"))
    x, rw = b.input("mx", (1, 4)), b.input("rw", (4, 3))
    w1, w3, w2 = b.input("w1", (3, 4, 6)), b.input("w3", (3, 4, 6)), b.input("w2", (3, 6, 4))
    with pytest.raises(IRError, match=r"k=4 must lie in \[1, 3\] \(the number of experts\)"):
        b.moe(x, rw, w1, w3, w2, k=4)


# --- attention_decode ---------------------------------------------------------------------------

def _attn_graph(hq, hkv, s, d, dtype="f32"):
    b = sqk.GraphBuilder("attn")
    ins = [b.input("q", (hq, d), dtype), b.input("kn", (hkv, d), dtype), b.input("vn", (hkv, d), dtype),
           b.input("kc", (hkv, s, d), dtype), b.input("vc", (hkv, s, d), dtype), b.input("pos", (1,), "i64")]
    return b.output(*b.attention_decode(*ins))


def _attn_inputs(hq, hkv, s, d, pos, seed=0, dtype="f32"):
    r = _rng(seed)
    return dict(q=rand((hq, d), dtype, r), kn=rand((hkv, d), dtype, r), vn=rand((hkv, d), dtype, r),
                kc=rand((hkv, s, d), dtype, r), vc=rand((hkv, s, d), dtype, r), pos=np.array([pos]))


@pytest.mark.parametrize("target,hq,hkv,d", [("host", 2, 2, 5), ("host", 4, 2, 16), ("host", 8, 2, 7),
                                             ("riscv64", 8, 2, 13), ("riscv64-scalar", 4, 2, 5)])
def test_attention_decode(target, hq, hkv, d):
    s = 9
    g = _attn_graph(hq, hkv, s, d)
    m = compile_for(g, target)
    for pos in (0, 4, s - 1):                         # first, middle and last row of the cache
        ins = _attn_inputs(hq, hkv, s, d, pos, seed=pos)
        before = {k: v.copy() for k, v in ins.items()}
        outs = m(**ins)
        for v, o, r in zip(g.outputs, outs, sqk.reference(g, **ins)):
            assert_close(o, r, what=f"{v.name} at pos {pos}")
        for k in ins:                                 # without state= the caller's caches are not touched
            assert np.array_equal(ins[k], before[k]), k


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 12), st.integers(1, 20), st.data())
def test_attention_decode_shapes(hkv, ratio, s, d, data):
    pos = data.draw(st.integers(0, s - 1))
    check(_attn_graph(hkv * ratio, hkv, s, d), _attn_inputs(hkv * ratio, hkv, s, d, pos), "host")


def test_attention_decode_f16():
    check(_attn_graph(4, 1, 6, 8, "f16"), _attn_inputs(4, 1, 6, 8, 3, dtype="f16"), "host")


def test_attention_state_in_place(tmp_path):
    hq, hkv, s, d = 4, 2, 6, 8
    g = _attn_graph(hq, hkv, s, d)
    m = sqk.compile(g, state=["kc", "vc"])
    assert len(m.manifest["kernels"]) == 1            # no cache copy: updated in the state's memory
    addr = m.state["kc"].ctypes.data
    k_ref, v_ref = np.zeros((hkv, s, d), np.float32), np.zeros((hkv, s, d), np.float32)
    for pos in range(5):
        ins = _attn_inputs(hq, hkv, s, d, pos, seed=pos)
        del ins["kc"], ins["vc"]
        out = m(**ins)
        ref, k_ref, v_ref = sqk.reference(g, kc=k_ref, vc=v_ref, **ins)
        assert_close(out, ref, what=f"out at pos {pos}")
        assert np.array_equal(m.state["kc"], k_ref) and np.array_equal(m.state["vc"], v_ref)
    assert m.state["kc"].ctypes.data == addr
    with pytest.raises(sqk.SqkRuntimeError, match=r"must lie in \[0, 6\), the KV cache length 6 \(got pos = \[6\]\)"):
        m(**dict(ins, pos=np.array([6])))
    with pytest.raises(sqk.SqkRuntimeError, match=r"got pos = \[-1\]"):
        m(**dict(ins, pos=np.array([-1])))
    assert np.array_equal(m.state["kc"], k_ref)       # a failed step wrote nothing
    with pytest.raises(ValueError, match="state kept by the module"):
        m(kc=k_ref, **ins)
    m.reset_state()
    assert not m.state["kc"].any() and not m.state["vc"].any()
    m.save(str(tmp_path / "attn"))
    m2 = sqk.load(str(tmp_path / "attn"))             # the manifest keeps the state pairs
    assert sorted(m2.state) == ["kc", "vc"]
    m2(**dict(ins, pos=np.array([2])))
    assert m2.state["kc"][:, 2].any() and not m2.state["kc"][:, 3].any()


def test_state_errors():
    g = _attn_graph(2, 1, 4, 4)
    with pytest.raises(IRError, match="'nope' is not an input"):
        sqk.compile(g, state=["nope"])
    with pytest.raises(IRError, match="no graph output is an in-place update"):
        sqk.compile(g, state=["q"])
    b = sqk.GraphBuilder("late")
    ins = [b.input("q", (2, 4)), b.input("kn", (1, 4)), b.input("vn", (1, 4)), b.input("kc", (1, 4, 4)),
           b.input("vc", (1, 4, 4)), b.input("pos", (1,), "i64")]
    o, kc, vc = b.attention_decode(*ins)
    g = b.output(o, kc, vc, b.neg(ins[3]))            # reads the old cache after the update
    with pytest.raises(IRError, match="read by neg after attention_decode updates it in place"):
        sqk.compile(g, state=["kc", "vc"])


# --- attention_decode over a chunk of T tokens (prefill), f16 caches -------------------------------

def _chunk_graph(t, hq, hkv, s, d, dtype="f32", kv=None):
    """attention_decode of q[T, Hq, D] (t > 0) or q[Hq, D] (t = 0), caches of dtype kv."""
    lead = (t,) if t else ()
    b = sqk.GraphBuilder(f"chunk{t}")
    ins = [b.input("q", lead + (hq, d), dtype), b.input("kn", lead + (hkv, d), dtype),
           b.input("vn", lead + (hkv, d), dtype), b.input("kc", (hkv, s, d), kv or dtype),
           b.input("vc", (hkv, s, d), kv or dtype), b.input("pos", (1,), "i64")]
    return b.output(*b.attention_decode(*ins))


def _chunk_inputs(t, hq, hkv, s, d, pos, seed=0, dtype="f32", kv=None):
    r, lead = _rng(seed), ((t,) if t else ())
    return dict(q=rand(lead + (hq, d), dtype, r), kn=rand(lead + (hkv, d), dtype, r),
                vn=rand(lead + (hkv, d), dtype, r), kc=rand((hkv, s, d), kv or dtype, r),
                vc=rand((hkv, s, d), kv or dtype, r), pos=np.array([pos]))


def _check_chunk(m, g, ins, what):
    for v, o, r in zip(g.outputs, m(**ins), sqk.reference(g, **ins)):
        assert_close(o, r, what=f"{v.name} {what}")


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("t,hq,hkv,d", [(1, 4, 2, 8), (2, 4, 4, 5), (7, 6, 2, 16), (33, 9, 3, 13)])
def test_attention_chunk(target, t, hq, hkv, d):
    s = 40
    g = _chunk_graph(t, hq, hkv, s, d)
    m = compile_for(g, target)
    for pos in (0, 3, s - t):                          # the first rows, a later start, the chunk ending the cache
        ins = _chunk_inputs(t, hq, hkv, s, d, pos, seed=pos)
        before = {k: v.copy() for k, v in ins.items()}
        _check_chunk(m, g, ins, f"T={t} at pos {pos} on {target}")
        for k in ins:                                  # the caches are copied, not updated, without state=
            assert np.array_equal(ins[k], before[k]), k


def test_attention_chunk_reference():
    """The chunk is T decoding steps: row i attends over rows 0..pos+i, causal."""
    t, hq, hkv, s, d, pos = 5, 4, 2, 12, 8, 3
    g, g1 = _chunk_graph(t, hq, hkv, s, d), _chunk_graph(0, hq, hkv, s, d)
    ins = _chunk_inputs(t, hq, hkv, s, d, pos)
    out, kc, vc = sqk.reference(g, **ins)
    kc1, vc1 = ins["kc"], ins["vc"]
    for i in range(t):
        o1, kc1, vc1 = sqk.reference(g1, q=ins["q"][i], kn=ins["kn"][i], vn=ins["vn"][i], kc=kc1, vc=vc1,
                                     pos=np.array([pos + i]))
        assert_close(out[i], o1, 1e-6, what=f"row {i}")
    assert np.array_equal(kc, kc1) and np.array_equal(vc, vc1)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(1, 12), st.integers(1, 20), st.data())
def test_attention_chunk_shapes(hkv, ratio, s, d, data):
    t = data.draw(st.integers(1, s))
    pos = data.draw(st.integers(0, s - t))
    check(_chunk_graph(t, hkv * ratio, hkv, s, d), _chunk_inputs(t, hkv * ratio, hkv, s, d, pos), "host")


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_attention_chunk_state(target):
    """Chunks and single steps in turn on the Module's caches (in place on the
    host); a chunk past the end of the cache is a run-time error writing nothing."""
    hq, hkv, s, d = 6, 2, 12, 8
    chunk, step = _chunk_graph(4, hq, hkv, s, d), _chunk_graph(0, hq, hkv, s, d)
    mc, ms = (compile_for(g, target, state=["kc", "vc"]) for g in (chunk, step))
    if target == "host":
        assert len(mc.manifest["kernels"]) == 1        # no cache copy
    ms.share_state(mc._m if target == "riscv64" else mc)
    kc, vc = np.zeros((hkv, s, d), np.float32), np.zeros((hkv, s, d), np.float32)
    pos = 0
    for i, (g, m) in enumerate([(chunk, mc), (step, ms), (chunk, mc), (step, ms)]):
        ins = _chunk_inputs(g.inputs[0].type.shape[0] if g is chunk else 0, hq, hkv, s, d, pos, seed=i)
        del ins["kc"], ins["vc"]
        out = m(**ins)
        ref, kc, vc = sqk.reference(g, kc=kc, vc=vc, **ins)
        assert_close(out, ref, what=f"call {i} at pos {pos}")
        assert np.array_equal(ms.state["kc"], kc) and np.array_equal(ms.state["vc"], vc)
        pos += 4 if g is chunk else 1
    bad = dict(ins, q=ins["q"][None].repeat(4, 0), kn=ins["kn"][None].repeat(4, 0), vn=ins["vn"][None].repeat(4, 0))
    for p in (9, -1):
        with pytest.raises(sqk.SqkRuntimeError, match=r"a chunk of 4 tokens from position %pos must lie in the KV "
                           rf"cache of length 12 \(positions in \[0, 8\]\) \(got pos = \[{p}\]\)"):
            mc(**dict(bad, pos=np.array([p])))
    assert np.array_equal(mc.state["kc"], kc)          # a failed chunk wrote nothing
    with pytest.raises(IndexError, match=r"positions 9..12 are outside the KV cache of length 12"):
        sqk.reference(chunk, kc=kc, vc=vc, **dict(bad, pos=np.array([9])))


def test_share_state_and_constants():
    small, big = (sqk.compile(_chunk_graph(4, 2, 1, s, 8), state=["kc", "vc"]) for s in (8, 9))
    with pytest.raises(ValueError, match=r"cannot share state 'kc': this module has float32\[1, 9, 8\], "
                                         r"the other float32\[1, 8, 8\]"):
        big.share_state(small)
    with pytest.raises(ValueError, match="cannot share state 'kc'.* the other none"):
        small.share_state(sqk.compile(_chunk_graph(4, 2, 1, 8, 8)))
    def scaled(v):
        b = sqk.GraphBuilder("c")
        return sqk.compile(b.output(b.matmul(b.input("x", (2, 8)), b.const(np.full((8, 8), v, np.float32)))))

    one, two, again = scaled(1), scaled(2), scaled(1)
    assert not one.share_constants(two)                # other bytes: each keeps its own
    assert again.share_constants(one) and again._consts_path == one._consts_path
    assert_close(again(x=np.ones((2, 8), np.float32)), np.full((2, 8), 8, np.float32))


@pytest.mark.parametrize("target,t", [("host", 0), ("host", 6), ("riscv64", 0), ("riscv64", 6)])
def test_attention_f16_cache(target, t):
    """f16 caches of f32 activations: rows rounded on write (exactly as the
    reference stores them), widened on read, f32 math."""
    hq, hkv, s, d = 4, 2, 10, 12
    g = _chunk_graph(t, hq, hkv, s, d, kv="f16")
    assert [v.type.dtype.name for v in g.outputs] == ["f32", "f16", "f16"]
    m = compile_for(g, target)
    for pos in (0, s - max(t, 1)):
        ins = _chunk_inputs(t, hq, hkv, s, d, pos, seed=pos, kv="f16")
        out, kc, vc = m(**ins)
        ref, rkc, rvc = sqk.reference(g, **ins)
        assert np.array_equal(kc, rkc) and np.array_equal(vc, rvc)   # the same f16 rounding
        assert_close(out, ref, what=f"T={t} pos {pos}")


@pytest.mark.parametrize("t", [0, 5])
def test_attention_f16_activations_f32_cache(t):
    g = _chunk_graph(t, 4, 2, 9, 8, dtype="f16", kv="f32")
    check(g, _chunk_inputs(t, 4, 2, 9, 8, 3, dtype="f16", kv="f32"), "host")


def test_attention_chunk_errors():
    b = sqk.GraphBuilder("e")
    q, kc = b.input("q", (3, 4, 8)), b.input("kc", (2, 8, 8))
    with pytest.raises(IRError, match=r"k_new \(2, 2, 8\) and v_new \(3, 2, 8\) must be \(3, 2, 8\)"):
        b.attention_decode(q, b.input("kn", (2, 2, 8)), b.input("vn", (3, 2, 8)), kc, kc, b.input("p", (1,), "i64"))
    with pytest.raises(IRError, match="a chunk of 9 tokens does not fit in the KV cache of length 8"):
        b.attention_decode(b.input("q9", (9, 4, 8)), *[b.input(n, (9, 2, 8)) for n in ("k9", "v9")], kc, kc,
                           b.input("p9", (1,), "i64"))
    with pytest.raises(IRError, match="inputs must share one dtype"):
        b.attention_decode(q, b.input("kh", (3, 2, 8), "f16"), b.input("vh", (3, 2, 8)), kc, kc,
                           b.input("p2", (1,), "i64"))


# --- moe --------------------------------------------------------------------------------------------

def _moe(n, h, e, f, k, dtype="f32"):
    b = sqk.GraphBuilder(f"moe{k}")
    ins = [b.input("x", (n, h), dtype), b.input("rw", (h, e), dtype), b.input("w1", (e, h, f), dtype),
           b.input("w3", (e, h, f), dtype), b.input("w2", (e, f, h), dtype)]
    return b.output(b.moe(*ins, k=k))


def _moe_inputs(n, h, e, f, seed=0, dtype="f32"):
    r = _rng(seed)
    return dict(x=rand((n, h), dtype, r), rw=rand((h, e), dtype, r, -1, 1), w1=rand((e, h, f), dtype, r, -.5, .5),
                w3=rand((e, h, f), dtype, r, -.5, .5), w2=rand((e, f, h), dtype, r, -.5, .5))


@pytest.mark.parametrize("target,k", [("host", 1), ("host", 2), ("riscv64", 2), ("riscv64-scalar", 1)])
def test_moe(target, k):
    check(_moe(3, 12, 5, 19, k), _moe_inputs(3, 12, 5, 19, seed=k), target)


def test_moe_f16():
    check(_moe(1, 8, 4, 16, 2, "f16"), _moe_inputs(1, 8, 4, 16, dtype="f16"), "host")


def test_moe_reads_only_chosen_experts():
    n, h, e, f = 1, 8, 6, 16
    ins = _moe_inputs(n, h, e, f)
    ins["x"] = np.abs(ins["x"]) + 0.5
    ins["rw"] = np.full((h, e), -1.0, np.float32)
    ins["rw"][:, 4], ins["rw"][:, 1] = 2.0, 1.0        # experts 4, then 1
    good = {k: v.copy() for k, v in ins.items()}
    for x in (0, 2, 3, 5):                            # poison every expert the router does not pick
        for w in ("w1", "w3", "w2"):
            ins[w][x] = np.nan
    m = sqk.compile(_moe(n, h, e, f, 2))
    out = m(**ins)
    assert np.isfinite(out).all()
    assert_close(out, sqk.reference(_moe(n, h, e, f, 2), **good))


# --- decoding: gather errors, the step-by-step decoder ------------------------------------------------

CFG = LlamaConfig(vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, max_seq=8)


@pytest.fixture(scope="module")
def host_decoder():
    return Decoder(CFG, seed=1)


def test_decode_steps_match_reference(host_decoder):
    dec = host_decoder
    dec.reset()
    tokens = [5, 60, 2, 96, 33]
    ref = reference_logits(CFG, dec.weights, tokens)
    for i, t in enumerate(tokens):                    # one step, then four more on the kept cache
        assert_close(dec.step(t), ref[i], 1e-4, what=f"logits at step {i}")
    dec.reset()
    out = dec.generate([7, 8], 4)
    ref = reference_logits(CFG, dec.weights, [7, 8] + out)
    assert out == [int(np.argmax(r)) for r in ref[1:-1]]


def test_decode_errors(host_decoder):
    dec = host_decoder
    dec.reset()
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        dec.step(97)
    m = dec.module                                    # the kernels check too, never reading out of bounds
    with pytest.raises(sqk.SqkRuntimeError, match=r"gather: every id in %token must lie in \[-97, 97\).*"
                                                    r"got token = \[97\]"):
        m(token=np.array([97]), pos=np.array([0]))
    with pytest.raises(sqk.SqkRuntimeError, match=r"must lie in \[0, 8\), the KV cache length 8 \(got pos = \[8\]\)"):
        m(token=np.array([1]), pos=np.array([8]))
    for t in range(CFG.max_seq):
        dec.step(t)
    with pytest.raises(ValueError, match="position 8 is beyond the KV cache length 8"):
        dec.step(0)


def test_decode_riscv64():
    compile_for(_attn_graph(2, 1, 2, 4), "riscv64-scalar")  # skips without the toolchain
    cfg = LlamaConfig(vocab=31, hidden=16, layers=1, heads=2, kv_heads=1, head_dim=8, ffn=24, max_seq=4)
    w = random_weights(cfg, 3)
    dec = Decoder(cfg, w, target="riscv64")
    tokens = [3, 30]
    ref = reference_logits(cfg, w, tokens)
    for i, t in enumerate(tokens):                    # the caches round-trip through the runner's files
        assert_close(dec.step(t), ref[i], 1e-4, what=f"riscv64 logits at step {i}")
    assert dec.module.state["k_cache.0"][:, :2].any() and not dec.module.state["k_cache.0"][:, 2:].any()


# --- prefill: the prompt in chunks, then decoding on the same caches ----------------------------------

PCFG = LlamaConfig(vocab=97, hidden=32, layers=2, heads=6, kv_heads=2, head_dim=8, ffn=48, max_seq=24)


@pytest.fixture(scope="module")
def prefill_decoder():
    return Decoder(PCFG, seed=2, prefill_chunk=8)


@pytest.mark.parametrize("n", [8, 16, 17, 19])     # chunks of 8: whole; 8 + 8 + 1 step; 8 + 8 + 3 padded to 8
def test_prefill_matches_reference_and_steps(prefill_decoder, n):
    dec = prefill_decoder
    tokens = [int(t) for t in _rng(n).integers(0, PCFG.vocab, n + 3)]
    ref = reference_logits(PCFG, dec.weights, tokens)
    dec.reset()
    steps = [dec.step(t) for t in tokens[:n]]
    k_steps = {k: v.copy() for k, v in dec.module.state.items()}
    dec.reset()
    logits = dec.prefill(tokens[:n])
    assert dec.pos == n
    assert_close(logits, ref[n - 1], 1e-4, what=f"prefill logits of {n} tokens vs reference")
    assert_close(logits, steps[-1], 1e-4, what=f"prefill logits of {n} tokens vs token by token")
    for name, a in dec.module.state.items():           # the rows the steps wrote
        assert_close(a[:, :n], k_steps[name][:, :n], 1e-4, what=name)
    assert dec.module.state["k_cache.0"][:, n:].any() == (n == 19)   # padding wrote rows 19..23
    for i in range(n, n + 3):                          # decoding continues on the prefilled caches,
        assert_close(dec.step(tokens[i]), ref[i], 1e-4, what=f"step {i} after prefill")   # padding rewritten
    assert list(dec.chunk_modules) == [8]


def test_prefill_twice_and_generate(prefill_decoder):
    """A second prefill continues from the current position (a multi-turn
    prompt), over the padding the first one wrote; near the cache's end a
    piece runs token by token; generate prefills, then decodes greedily."""
    dec = prefill_decoder
    tokens = [5, 60, 2, 96, 33, 7, 1, 80, 44, 12, 3]
    ref = reference_logits(PCFG, dec.weights, tokens)
    dec.reset()
    dec.prefill(tokens[:6])                            # 6 tokens padded to 8: rows 6, 7 hold padding
    assert_close(dec.prefill(tokens[6:]), ref[-1], 1e-4, what="second prefill")
    long = [int(t) for t in _rng(7).integers(0, PCFG.vocab, 22)]
    ref = reference_logits(PCFG, dec.weights, long)
    dec.reset()
    dec.prefill(long[:18])
    assert_close(dec.prefill(long[18:]), ref[-1], 1e-4, what="4 tokens at 18: 18 + 8 > 24, token by token")
    dec.reset()
    out = dec.generate(tokens[:9], 4)
    full = reference_logits(PCFG, dec.weights, tokens[:9] + out)
    assert out == [int(np.argmax(r)) for r in full[8:-1]]


def test_prefill_errors(prefill_decoder):
    dec = prefill_decoder
    dec.reset()
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        dec.prefill([1, 97])
    with pytest.raises(ValueError, match="needs at least one token"):
        dec.prefill([])
    dec.prefill(list(range(20)))
    with pytest.raises(ValueError, match="5 tokens from position 20 go beyond the KV cache length 24"):
        dec.prefill([1] * 5)
    assert dec.pos == 20
    m = dec.chunk_module(8)                            # the kernels check the position and the row too
    with pytest.raises(sqk.SqkRuntimeError, match=r"a chunk of 8 tokens from position %pos must lie in the KV "
                                                   r"cache of length 24 \(positions in \[0, 16\]\)"):
        m(token=np.arange(8), pos=np.array([17]), last=np.array([7]))
    with pytest.raises(sqk.SqkRuntimeError, match=r"gather: every id in %last must lie in \[-8, 8\)"):
        m(token=np.arange(8), pos=np.array([0]), last=np.array([8]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        dec.chunk_module(1)
    with pytest.raises(ValueError, match="a chunk of 25 tokens does not fit in the KV cache of length 24"):
        build_decoder(PCFG, dec.weights, tokens=25)


def test_prefill_f16_cache():
    """kv_dtype="f16": each cached K/V element carries a relative rounding error
    of at most 2^-11 (4.9e-4); through softmax and two layers that stays within
    the f16 tolerance (2e-3 relative to the largest logit; measured ~2e-4)."""
    w = random_weights(PCFG, 2)
    dec = Decoder(PCFG, w, kv_dtype="f16", prefill_chunk=8)
    assert dec.module.state["k_cache.0"].dtype == np.float16
    tokens = [int(t) for t in _rng(4).integers(0, PCFG.vocab, 14)]
    ref = reference_logits(PCFG, w, tokens)
    got = [dec.prefill(tokens[:11])] + [dec.step(t) for t in tokens[11:]]
    for i, g in enumerate(got):
        assert_close(g, ref[10 + i], 2e-3, what=f"f16 cache, logits at {10 + i}")
    err = np.abs(got[0] - ref[10]).max() / np.abs(ref[10]).max()
    assert err > 1e-6                                  # the cache does round (an f32 cache gives ~1e-7)
    dec32 = Decoder(PCFG, w, prefill_chunk=8)
    k16 = dec.module.state["k_cache.1"][:, :14].astype(np.float32)
    dec32.prefill(tokens)
    assert_close(k16, dec32.module.state["k_cache.1"][:, :14], 2e-3, what="f16 vs f32 cache")


def test_prefill_riscv64():
    compile_for(_attn_graph(2, 1, 2, 4), "riscv64-scalar")  # skips without the toolchain
    cfg = LlamaConfig(vocab=31, hidden=16, layers=1, heads=4, kv_heads=2, head_dim=8, ffn=24, max_seq=8)
    w = random_weights(cfg, 3)
    dec = Decoder(cfg, w, target="riscv64", prefill_chunk=4, kv_dtype="f16")
    tokens = [3, 30, 7, 1, 22, 9, 14]
    ref = reference_logits(cfg, w, tokens)
    assert_close(dec.prefill(tokens[:6]), ref[5], 2e-3, what="riscv64 prefill (4, then 2 padded to 4)")
    assert_close(dec.step(tokens[6]), ref[6], 2e-3, what="riscv64 step after prefill")
    assert list(dec.chunk_modules) == [4] and dec.module.state["k_cache.0"].all()   # row 7: padding


def test_prefill_lookup_experts():
    """MoLE's experts over a chunk (per row: route[:, e] * expert_e), with and
    without fold_lookup_experts (which folds only the one-token step)."""
    cfg = LlamaConfig(vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, max_seq=16,
                      lookup_experts=3, lookup_ffn=16)
    w = random_weights(cfg, 5)
    tokens = [int(t) for t in _rng(3).integers(0, cfg.vocab, 13)]
    ref = reference_logits(cfg, w, tokens)
    for opts in ({}, {"pipeline": "fold_constants,fold_lookup_experts,select_format,dce,fuse"}):
        dec = Decoder(cfg, w, prefill_chunk=8, **opts)
        assert_close(dec.prefill(tokens[:12]), ref[11], 1e-4, what=f"MoLE prefill {opts}")
        assert_close(dec.step(tokens[12]), ref[12], 1e-4, what=f"MoLE step after prefill {opts}")
