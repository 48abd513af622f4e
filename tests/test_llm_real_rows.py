"""benchmarks/llm_real.py's table rows (no llama.cpp, no model files): which
tests a case runs, on which sqk Decoder variant, beside which llama-bench
figure -- the "act i8" rows (int8 activations) compare with the same test."""
from pathlib import Path

from sqk.benchmarks import llm_real as r


def test_act_i8_rows():
    q4 = r.Case("m", "q4_0", Path("m.gguf"))
    assert r.tests_of(q4) == ["pp128", "pp512", "tg64", "pp128 act i8", "pp512 act i8", "tg64 act i8"]
    assert r.tests_of(r.Case("m", "f32", Path("m.gguf"))) == ["pp128", "pp512", "tg64"]   # float weights: no rows
    assert [r.variant(t) for t in ("pp512", "pp512 act i8", "tg64 @ d4096 kv i8")] == \
        [("f16", False), ("f16", True), ("i8", False)]
    assert r.peer_test("tg64 act i8") == "tg64" and r.peer_test("tg64 @ d64 kv f32") == "tg64 @ d64 kv f32"
    depth = r.tests_of(r.Case("m", "q4_0", Path("m.gguf"), depth="only"))
    assert depth and not any("act" in t for t in depth)
    assert r.ACT_I8 == {"activations": "int8", "act_group": 32}
