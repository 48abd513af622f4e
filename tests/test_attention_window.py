"""Sliding-window attention (attention_decode {window}: token at position a
attends to rows max(0, a - W + 1)..a, as llama.cpp's and transformers' masks):
the reference against a direct masked softmax, and the kernels (one token,
split parts, prefill chunks; f32 / f16 / i8 caches) against the reference on
host, riscv64 (RVV) and rv64gc."""
from __future__ import annotations

import numpy as np
import pytest
from harness import assert_close, compile_for
from test_kv_cache import _inputs   # random q/k/v and a cache as earlier steps would have written it

import sqk
from sqk.ir.graph import IRError


def _graph(t, hq, hkv, s, d, window, kv="f32", splits=0):
    lead = (t,) if t else ()
    b = sqk.GraphBuilder(f"win{t}")
    ins = [b.input("q", lead + (hq, d)), b.input("kn", lead + (hkv, d)), b.input("vn", lead + (hkv, d)),
           b.input("kc", (hkv, s, d), kv), b.input("vc", (hkv, s, d), kv), b.input("pos", (1,), "i64")]
    if kv == "i8":
        ins += [b.input("ks", (hkv, s)), b.input("vs", (hkv, s))]
    outs = b.attention_decode(*ins, splits=splits, window=window)
    if splits:
        return b.output(b.attention_merge(outs[0], dtype="f32"), *outs[1:])
    return b.output(*outs)


def test_reference_is_masked_softmax():
    """The reference equals softmax over the last W positions, computed directly,
    and ignores what lies before the window (rows poisoned with 1e30)."""
    hq, hkv, s, d, w, t = 4, 2, 40, 8, 5, 6
    g = _graph(t, hq, hkv, s, d, w)
    for pos in (0, 3, 20, s - t):
        ins = _inputs(t, hq, hkv, s, d, pos, seed=pos, kv="f32")
        ins["kc"][:, :max(0, pos - w + 1)] = 1e30        # outside every query's window
        out = sqk.reference(g, **ins)[0]
        k = ins["kc"].copy()
        v = ins["vc"].copy()
        k[:, pos:pos + t], v[:, pos:pos + t] = ins["kn"].transpose(1, 0, 2), ins["vn"].transpose(1, 0, 2)
        for i in range(t):
            a = pos + i
            lo = max(0, a - w + 1)
            for h in range(hq):
                sc = k[h // 2, lo:a + 1].astype(np.float64) @ ins["q"][i, h] / np.sqrt(d)
                p = np.exp(sc - sc.max())
                want = (p / p.sum()) @ v[h // 2, lo:a + 1]
                np.testing.assert_allclose(out[i, h], want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("kv", ["f32", "f16", "i8"])
@pytest.mark.parametrize("t,window,splits", [(0, 1, 0), (0, 7, 0), (0, 40, 3), (0, 33, 5), (5, 3, 0), (9, 37, 0),
                                             (33, 20, 0)])
def test_window_kernels(target, kv, t, window, splits):
    """Windows shorter and longer than the prefix, than a block of 32 rows and
    than a chunk; split parts over a window; the caches written as without one."""
    hq, hkv, s, d = 6, 3, 75, 16
    g = _graph(t, hq, hkv, s, d, window, kv, splits)
    m = compile_for(g, target)
    for pos in (0, 2, 40, s - max(t, 1)):
        ins = _inputs(t, hq, hkv, s, d, pos, seed=pos, kv=kv)
        for v, o, r in zip(g.outputs, m(**ins), sqk.reference(g, **ins)):
            assert_close(o, r, None if v is g.outputs[0] else 0.0, what=f"{v.name} pos {pos} on {target}")


def test_window_errors():
    b = sqk.GraphBuilder("bad")
    q, kc = b.input("q", (2, 4)), b.input("kc", (1, 8, 4))
    with pytest.raises(IRError, match="window=-1 must be >= 0"):
        b.attention_decode(q, b.input("k", (1, 4)), b.input("v", (1, 4)), kc, kc, b.input("pos", (1,), "i64"),
                           window=-1)
