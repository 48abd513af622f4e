"""fold_lookup_experts: sub-graphs fed only by a gathered token id become
lookup tables; the folded model equals the unfolded one (MoLE decoder)."""
from __future__ import annotations

import numpy as np
import pytest
from harness import assert_close, check, rand

import sqk
from sqk.llm import Decoder, LlamaConfig, random_weights, reference_logits

FOLD = "fold_constants,fold_lookup_experts,dce"
CFG = LlamaConfig(vocab=61, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, max_seq=8,
                  lookup_experts=3, lookup_ffn=40)


def test_mole_decoder_folded_equals_unfolded():
    w = random_weights(CFG, 2)
    plain, folded = Decoder(CFG, w), Decoder(CFG, w, pipeline=FOLD)
    rep = folded.module.report
    assert rep.folded() == ["embed"]
    r = rep.row("embed")
    assert r["bytes_after"] * 20 < r["bytes_before"] and r["table_bytes"] > 0
    ops = [n.op for n in folded.module.ir.nodes]
    # every expert matmul (2 per expert and layer) is gone: only the lookups' gathers remain for them
    assert ops.count("matmul") <= [n.op for n in folded.graph.nodes].count("matmul") - 2 * 3 * 2
    tokens = [3, 60, 0, 17, 3]
    ref = reference_logits(CFG, w, tokens)
    for i, t in enumerate(tokens):
        a, b = plain.step(t), folded.step(t)
        assert_close(b, a, 1e-5, what=f"folded vs unfolded at step {i}")
        assert_close(b, ref[i], 1e-4, what=f"folded vs numpy at step {i}")
    with pytest.raises(sqk.SqkRuntimeError, match=r"gather: every id .* must lie in"):
        folded.module(token=np.array([61]), pos=np.array([0]))   # the lookups check ids as the embedding did


def _graph(vocab=50, h=8):
    r = np.random.default_rng(0)
    b = sqk.GraphBuilder("lut")
    ids = b.input("ids", (1,), "i64")
    x = b.input("x", (1, h))
    e = b.gather(b.const(rand((vocab, h), rng=r), name="emb"), ids)
    f = b.gelu(b.matmul(e, b.const(rand((h, 64), rng=r), name="up")))
    s = b.reduce_sum(b.mul(f, f), keepdims=True)                 # axes=(): batched evaluation cannot say it
    y = b.add(x, b.mul(b.matmul(f, b.const(rand((64, h), rng=r), name="down")), s))
    return b.output(y, b.add(x, e))                             # the embedding is also read directly


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_fold_any_token_subgraph(target):
    g = _graph()
    for tok in (0, 7, 49, -1):
        m = check(g, dict(ids=np.array([tok]), x=rand((1, 8))), target, pipeline=FOLD, rtol=1e-5)
    row = m.report.row("emb")
    assert row["status"] == "folded" and row["nodes"] == 6
    assert row["bytes_after"] == 8 * 4 + 8 * 4             # the table row, and the embedding row still read
    assert {n.op for n in m.ir.nodes} <= {"const", "gather", "add"}


def test_region_only_gather_is_dropped():
    b = sqk.GraphBuilder("only")
    ids = b.input("ids", (1,), "i64")
    e = b.gather(b.const(rand((20, 8)), name="emb"), ids)
    g = b.output(b.matmul(b.relu(e), b.const(rand((8, 64)), name="w")))
    m = check(g, dict(ids=np.array([13])), "host", pipeline="fold_lookup_experts")   # no dce after it
    assert [n.op for n in m.ir.nodes] == ["const", "gather"]
    assert m.report.row("emb")["bytes_after"] == 64 * 4


def test_kept_when_it_does_not_pay():
    b = sqk.GraphBuilder("wide")
    ids = b.input("ids", (), "i64")
    e = b.gather(b.const(rand((30, 4)), name="emb"), ids)
    g = b.output(e, b.concat(e, e, e, axis=0))
    m = sqk.compile(g, pipeline=FOLD)
    assert m.report.row("emb")["status"].startswith("kept: the tables' rows are no smaller")
    m = sqk.compile(_graph(), pipeline="fold_lookup_experts{max_bytes=1000}")
    assert m.report.row("emb")["status"].startswith("kept: tables of")
