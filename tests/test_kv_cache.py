"""The int8 KV cache (attention_decode on i8 caches with per-row scales) and the
sequence-split attention (attention_decode {splits} + attention_merge):
kernels against the numpy reference on host, riscv64 (RVV) and rv64gc."""
from __future__ import annotations

import numpy as np
import pytest
from harness import assert_close, compile_for, rand

import sqk
from sqk.ir.graph import IRError
from sqk.ir.ops import attention_spans, kv_quantize
from sqk.llm import Decoder, LlamaConfig, random_weights


def _graph(t, hq, hkv, s, d, kv="i8", dtype="f32", splits=0):
    """attention_decode of q[T, Hq, D] (t > 0) or q[Hq, D] (t = 0) over caches of
    dtype kv (i8: with scales); ``splits``: partials merged by attention_merge."""
    lead = (t,) if t else ()
    b = sqk.GraphBuilder(f"kv{t}")
    ins = [b.input("q", lead + (hq, d), dtype), b.input("kn", lead + (hkv, d), dtype),
           b.input("vn", lead + (hkv, d), dtype), b.input("kc", (hkv, s, d), kv),
           b.input("vc", (hkv, s, d), kv), b.input("pos", (1,), "i64")]
    if kv == "i8":
        ins += [b.input("ks", (hkv, s)), b.input("vs", (hkv, s))]
    outs = b.attention_decode(*ins, splits=splits)
    if splits:
        return b.output(b.attention_merge(outs[0], dtype=dtype), *outs[1:])
    return b.output(*outs)


def _inputs(t, hq, hkv, s, d, pos, seed=0, kv="i8", dtype="f32"):
    """Random activations and a cache holding what earlier steps would have written."""
    r, lead = np.random.default_rng(seed), ((t,) if t else ())
    ins = dict(q=rand(lead + (hq, d), dtype, r), kn=rand(lead + (hkv, d), dtype, r),
               vn=rand(lead + (hkv, d), dtype, r), pos=np.array([pos]))
    kf, vf = rand((hkv, s, d), "f32", r), rand((hkv, s, d), "f32", r)
    if kv == "i8":
        (ins["kc"], ins["ks"]), (ins["vc"], ins["vs"]) = kv_quantize(kf), kv_quantize(vf)
    else:
        ins["kc"], ins["vc"] = (x.astype({"f32": np.float32, "f16": np.float16}[kv]) for x in (kf, vf))
    return ins


def _check(m, g, ins, what):
    for v, o, r in zip(g.outputs, m(**ins), sqk.reference(g, **ins)):
        # the caches (codes and scales) exactly as the reference stores them
        assert_close(o, r, None if v is g.outputs[0] else 0.0, what=f"{v.name} {what}")


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("t,hq,hkv,d", [(0, 9, 3, 64), (1, 4, 2, 8), (2, 4, 4, 5), (7, 6, 2, 16), (33, 9, 3, 13)])
def test_int8_cache(target, t, hq, hkv, d):
    s = 70                                              # rows in more than two blocks of 32
    g = _graph(t, hq, hkv, s, d)
    m = compile_for(g, target)
    for pos in (0, 5, s - max(t, 1)):                  # first rows, a later start, the end of the cache
        ins = _inputs(t, hq, hkv, s, d, pos, seed=pos)
        before = {k: v.copy() for k, v in ins.items()}
        _check(m, g, ins, f"T={t} pos {pos} on {target}")
        for k in ins:                                  # without state= the caller's caches are untouched
            assert np.array_equal(ins[k], before[k]), k


def test_int8_cache_f16_activations():
    g = _graph(5, 4, 2, 40, 8, dtype="f16")
    _check(sqk.compile(g), g, _inputs(5, 4, 2, 40, 8, 31, dtype="f16"), "f16 activations")


def test_kv_quantize_rule():
    """Per row: d = max|x| / 127, codes round-half-even(x / d); zero rows get
    d = 0 and codes 0; a non-finite value makes d NaN and the codes 0."""
    x = np.array([[127.0, -63.5, 0.5, 1.5], [0, 0, 0, 0], [1, np.nan, 2, 3], [1, np.inf, 2, 3]], np.float32)
    codes, d = kv_quantize(x)
    assert codes.dtype == np.int8 and d.dtype == np.float32
    assert codes[0].tolist() == [127, -64, 0, 2] and d[0] == 1.0       # halves to even
    assert codes[1:].tolist() == [[0] * 4] * 3 and d[1] == 0 and np.isnan(d[2:]).all()
    # the kernel stores the same codes and scales, non-finite rows included
    g = _graph(0, 2, 1, 6, 4)
    ins = _inputs(0, 2, 1, 6, 4, 3)
    for row in x:
        ins["kn"], ins["vn"] = row[None].copy(), (row[None] * 0.25).copy()
        _, kc, vc, ks, vs = sqk.compile(g)(**ins)
        rc, rs = kv_quantize(row)
        assert np.array_equal(kc[0, 3], rc) and np.array_equal(ks[0, 3], rs, equal_nan=True)


def test_int8_cache_state():
    """Chunks and steps in turn on a Module's int8 caches, updated in place."""
    hq, hkv, s, d = 6, 2, 40, 8
    chunk, step = _graph(4, hq, hkv, s, d), _graph(0, hq, hkv, s, d)
    names = ["kc", "vc", "ks", "vs"]
    mc, ms = (sqk.compile(g, state=names) for g in (chunk, step))
    assert len(mc.manifest["kernels"]) == 1 and len(ms.manifest["kernels"]) == 1   # no cache copy
    ms.share_state(mc)
    cache = dict(kc=np.zeros((hkv, s, d), np.int8), vc=np.zeros((hkv, s, d), np.int8),
                 ks=np.zeros((hkv, s), np.float32), vs=np.zeros((hkv, s), np.float32))
    pos = 0
    for i, (g, m) in enumerate([(chunk, mc), (step, ms), (chunk, mc), (step, ms)]):
        ins = {k: v for k, v in _inputs(4 if g is chunk else 0, hq, hkv, s, d, pos, seed=i).items() if k not in names}
        out = m(**ins)
        ref, *new = sqk.reference(g, **cache, **ins)
        cache = dict(zip(names, new))
        assert_close(out, ref, what=f"call {i} at pos {pos}")
        for k in names:
            assert np.array_equal(ms.state[k], cache[k]), k
        pos += 4 if g is chunk else 1


def test_attention_spans():
    assert attention_spans(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert attention_spans(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    for n in range(1, 40):
        for k in (1, 2, 3, 5, 8):
            sp = attention_spans(n, k)
            assert sp[0][0] == 0 and sp[-1][1] == n and all(a <= e for a, e in sp)
            assert all(sp[j][1] == sp[j + 1][0] for j in range(k - 1))


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("kv,splits", [("f32", 1), ("f32", 3), ("f16", 4), ("i8", 2), ("i8", 5)])
def test_split_attention(target, kv, splits):
    """Parts of ceil(n / N) rows (lengths not multiples of N or of the block,
    empty trailing parts when n < N), each a work item, merged: equal to the
    unsplit attention within f32 rounding; the partials equal their reference."""
    hq, hkv, s, d = 6, 3, 75, 16
    g, g1 = _graph(0, hq, hkv, s, d, kv=kv, splits=splits), _graph(0, hq, hkv, s, d, kv=kv)
    m = compile_for(g, target)
    for pos in (0, 2, 33, 64, s - 1):
        ins = _inputs(0, hq, hkv, s, d, pos, seed=pos, kv=kv)
        _check(m, g, ins, f"splits={splits} pos {pos} on {target}")
        for o, r in zip(sqk.reference(g, **ins), sqk.reference(g1, **ins)):
            assert_close(o, r, None if o.dtype.kind == "f" and o.ndim == 2 else 0.0, what=f"merged at pos {pos}")
    # the partials alone
    b = sqk.GraphBuilder("parts")
    ins_v = [b.input(n, v.type.shape, v.type.dtype.name) for n, v in zip(("q", "kn", "vn", "kc", "vc", "pos"),
                                                                          g.inputs)]
    if kv == "i8":
        ins_v += [b.input("ks", (hkv, s)), b.input("vs", (hkv, s))]
    gp = b.output(b.attention_decode(*ins_v, splits=splits)[0])
    ins = _inputs(0, hq, hkv, s, d, 40, seed=1, kv=kv)
    assert_close(compile_for(gp, target)(**ins), sqk.reference(gp, **ins), what="partials")


def test_split_attention_state_in_place():
    hq, hkv, s, d = 4, 2, 50, 8
    g = _graph(0, hq, hkv, s, d, splits=3)
    m = sqk.compile(g, state=["kc", "vc", "ks", "vs"])
    assert len(m.manifest["kernels"]) == 2             # attention_decode, attention_merge: no cache copy
    cache = {k: np.zeros_like(v) for k, v in m.state.items()}
    for pos in range(0, 45, 4):
        ins = {k: v for k, v in _inputs(0, hq, hkv, s, d, pos, seed=pos).items() if k not in cache}
        ref, *new = sqk.reference(g, **cache, **ins)
        cache = dict(zip(["kc", "vc", "ks", "vs"], new))
        assert_close(m(**ins), ref, what=f"pos {pos}")
        assert all(np.array_equal(m.state[k], cache[k]) for k in cache)


def test_errors():
    b = sqk.GraphBuilder("e")
    q, kn, pos = b.input("q", (4, 8)), b.input("kn", (2, 8)), b.input("pos", (1,), "i64")
    kc8, kc = b.input("kc8", (2, 6, 8), "i8"), b.input("kc", (2, 6, 8))
    sc = b.input("sc", (2, 6))
    with pytest.raises(IRError, match="an i8 cache takes k_scale and v_scale"):
        b.attention_decode(q, kn, kn, kc8, kc8, pos)
    with pytest.raises(IRError, match="an i8 cache takes k_scale and v_scale"):
        b.attention_decode(q, kn, kn, kc, kc, pos, sc, sc)
    with pytest.raises(IRError, match=r"k_scale must be f32\[2, 6\]"):
        b.attention_decode(q, kn, kn, kc8, kc8, pos, b.input("bad", (2, 5)), sc)
    with pytest.raises(IRError, match="splits=7 must lie in"):
        b.attention_decode(q, kn, kn, kc, kc, pos, splits=7)
    with pytest.raises(IRError, match="be 0 for a chunk"):
        b.attention_decode(b.input("q3", (3, 4, 8)), *[b.input(n, (3, 2, 8)) for n in ("k3", "v3")], kc, kc, pos,
                           splits=2)
    with pytest.raises(IRError, match="attention_merge needs parts"):
        b.attention_merge(b.input("p", (4, 8)))


# --- the decoder with an int8 cache ------------------------------------------------------------

CFG = LlamaConfig(vocab=96, hidden=48, layers=2, heads=6, kv_heads=2, head_dim=8, ffn=64, max_seq=80)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_decoder_int8_cache(target):
    """Logits with the int8 cache against the f32 cache's, step by step after a
    prefill that crosses a block of 32 rows.  Tolerance: each cached value
    carries an error of at most half a step, max|row| / 254 (0.4 % of the
    row's largest value), which moves scores and outputs by about that
    fraction; measured ~0.2 % of the logits' scale here, bounded at 1 %."""
    w = random_weights(CFG, seed=3)
    ref = Decoder(CFG, w, prefill_chunk=8)
    dec = Decoder(CFG, w, target=target, prefill_chunk=8, kv_dtype="i8")
    assert sorted(dec.module.state) == sorted(f"{x}_{c}.{i}" for i in range(2) for x in "kv"
                                              for c in ("cache", "scale"))
    ids = list(np.random.default_rng(0).integers(0, CFG.vocab, 45))
    a, b = ref.prefill(ids), dec.prefill(ids)
    assert_close(b, a, 1e-2, what="prefill logits")
    for tok in (5, 17, 80):
        a, b = ref.step(tok), dec.step(tok)
        assert_close(b, a, 1e-2, what=f"step {tok}")
    assert int(np.argmax(a)) == int(np.argmax(b))


def test_decoder_split_attention():
    """A cache of >= 256 positions splits the decode step's attention
    (attention_splits: 8 parts for 2 KV heads); logits as the numpy model's."""
    from sqk.llm import reference_logits
    from sqk.llm.decoder import attention_splits

    cfg = LlamaConfig(vocab=96, hidden=48, layers=2, heads=6, kv_heads=2, head_dim=8, ffn=64, max_seq=300)
    assert attention_splits(cfg) == 8
    w = random_weights(cfg, seed=3)
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab, 270))
    ref = reference_logits(cfg, w, ids)
    dec = Decoder(cfg, w, prefill_chunk=16)
    assert [n.attrs["splits"] for n in dec.graph.nodes if n.op == "attention_decode"] == [8, 8]
    dec.prefill(ids[:262])
    for i, tok in enumerate(ids[262:]):
        assert_close(dec.step(tok), ref[262 + i], 1e-5, what=f"step at {262 + i}")


def test_native_generate_int8_cache():
    """riscv64 generate in one runner process keeps the int8 codes and scales
    as state: the same greedy tokens as the host and the same cache bytes."""
    from harness import require_riscv

    require_riscv()
    w = random_weights(CFG, 3)
    host = Decoder(CFG, w, prefill_chunk=8, kv_dtype="i8")
    rv = Decoder(CFG, w, target="riscv64", prefill_chunk=8, kv_dtype="i8")
    prompt = [1, 5, 9, 33, 2, 7, 11, 40, 3, 8, 12]
    assert rv.generate(prompt, 8) == host.generate(prompt, 8)
    for name, a in host.module.state.items():
        assert rv.module.state[name].dtype == a.dtype == ("int8" if "_cache." in name else "float32")
        # codes may differ by one step where f32 rounding differs between host and riscv64 upstream
        assert np.abs(rv.module.state[name].astype(np.float32) - a.astype(np.float32)).max() <= \
            (1 if "_cache." in name else 1e-4 * np.abs(a).max()), name


def test_artifact_int8_cache(tmp_path):
    """An LLM artifact of an int8-cache Decoder keeps the int8 caches and their
    scales as state, and generates as the Decoder."""
    from sqk.llm.artifact import save_llm

    w = random_weights(CFG, 3)
    dec = Decoder(CFG, w, prefill_chunk=8, kv_dtype="i8")
    save_llm(dec, tmp_path / "m.sqk")
    art = sqk.llm.load(str(tmp_path / "m.sqk"))
    assert art.kv_dtype == "i8" and sorted(art.module.state) == sorted(dec.module.state)
    assert art.module.state["k_cache.0"].dtype == np.int8 and art.module.state["k_scale.0"].dtype == np.float32
    prompt = [1, 5, 9, 33, 2, 7, 11, 40, 3, 8, 12]
    assert art.generate(prompt, 6) == dec.generate(prompt, 6)
    with pytest.raises(ValueError, match="compiled with kv_dtype='i8', not 'f16'"):
        sqk.llm.load(str(tmp_path / "m.sqk"), kv_dtype="f16")
