"""matmul_q {activations=int8} with ``act_group``: one activation scale per
act_group values of a row (32: llama.cpp's q8 activations), besides one per
row and weight group.  Kernels equal the reference (ir.ops.matmul_q_i8act)
bit for bit on every target for every weight scheme; with weight group 32 and
act_group 32 the result is ggml's q4_0 x q8_0 / q8_0 x q8_0 dot product up to
ggml's f16 activation step."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import compile_for, host_isa, host_without, rand
from sqk.compiler.pipeline import PassManager, PipelineError, parse_pipeline
from sqk.ir import blocks
from sqk.ir.graph import IRError
from sqk.ir.ops import i8act_segments, matmul_q_i8act
from sqk.ir.text import parse_ir, print_graph

TARGETS = ["host", "riscv64", "riscv64-scalar"]
# scheme: (q dtype, weight group (0: K), zero points, minimums / two-level, static act_scale)
SCHEMES = {
    "i4-g32": ("i4", 32, False, None, 0.0),
    "i4-g32-zeros-static": ("i4", 32, True, None, 0.021),
    "i8-per-channel": ("i8", 0, False, None, 0.0),
    "i8-g16-zeros": ("i8", 16, True, None, 0.0),
    "q4_1-mins": ("i4", 32, False, "mins", 0.0),
    "q4_k-supers": ("i4", 32, False, "supers", 0.0),
}


def act_groups(K: int, group: int) -> list[int]:
    """Per row (K), 32, and a group that does not divide K (coarser than the weight
    group where it is grouped, a 12 not a multiple of 8 where it is per channel)."""
    return [K, 32, 64 if group < K else 12]


def scheme_graph(scheme: str, M: int, K: int, N: int, seed: int = 0, act_groups_=None):
    """x[M, K] @ one matmul_q per activation group (``act_groups``), the same weights."""
    qdt, group, zeros, kind, act_scale = SCHEMES[scheme]
    group = group or K
    rng = np.random.default_rng(seed)
    G = -(-K // group)
    lo, hi = (-8, 7) if qdt == "i4" else (-128, 127)
    b = sqk.GraphBuilder("ag")
    x = b.input("x", (M, K))
    ops = [b.const(rng.integers(lo, hi + 1, (K, N)).astype(np.int8), qdt)]
    attrs = {"group": group}
    if kind == "supers":
        ops += [b.const(rng.integers(0, 64, (G, N)).astype(np.uint8), "u8"),
                b.const(rng.integers(0, 64, (G, N)).astype(np.uint8), "u8"),
                b.const(rng.uniform(-0.01, 0.01, (-(-K // 64), N, 2)).astype(np.float16), "f16")]
        attrs["super_group"] = 64
    else:
        ops.append(b.const(rng.uniform(0.01, 0.1, (G, N)).astype(np.float32), "f32"))
        if kind == "mins":
            ops.append(b.const(rng.uniform(-1, 1, (G, N)).astype(np.float16), "f16"))
        elif zeros:
            ops.append(b.const(rng.integers(lo, hi + 1, (G, N)).astype(np.int8), qdt))
    ags = act_groups(K, group) if act_groups_ is None else act_groups_
    ys = [b.matmul_q(x, *ops, activations="int8", act_scale=act_scale, act_group=a, **attrs) for a in ags]
    return b.output(*ys), {"x": rand((M, K), "f32", rng)}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_act_group_bit_exact(target, scheme):
    """Every weight scheme x act_group in {per row, 32, one not dividing K}, odd M, K, N:
    the kernels equal the reference bit for bit (exact integer dots per segment, then
    the f32 steps in segment order)."""
    M, K, N = (5, 199, 67) if target == "host" else (3, 99, 37)
    g, inputs = scheme_graph(scheme, M, K, N, seed=K)
    got, want = compile_for(g, target)(**inputs), sqk.reference(g, **inputs)
    for a, w in zip(got, want):
        assert a.tobytes() == w.tobytes(), np.abs(a - w).max()
    if not SCHEMES[scheme][4]:   # dynamic: the activation group changes the numerics (static: one step)
        assert not np.array_equal(want[0], want[1])


@host_isa
@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 17])
def test_act_group_register_tiles(host_isa, M):
    """Row counts around the x86 register tiles, per-channel i8 and grouped i4."""
    for scheme in ("i8-per-channel", "i4-g32-zeros-static"):
        g, inputs = scheme_graph(scheme, M, 160, 70, seed=M)
        for a, w in zip(sqk.compile(g)(**inputs), sqk.reference(g, **inputs)):
            assert a.tobytes() == w.tobytes()


@pytest.mark.parametrize("scheme", ["i8-per-channel", "q4_k-supers"])
def test_act_group_without_avx2(monkeypatch, scheme):
    """The portable integer path (x86 without AVX2)."""
    host_without(monkeypatch, lambda f: f.startswith(("+avx2", "+avx512", "+avxvnni", "+fma")))
    g, inputs = scheme_graph(scheme, 3, 99, 37, seed=2)
    for a, w in zip(sqk.compile(g)(**inputs), sqk.reference(g, **inputs)):
        assert a.tobytes() == w.tobytes()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act_scale", [0.0, 0.02])
def test_act_group_non_finite(target, act_scale):
    """quantize_rows_i8's rule per activation group: a NaN (dynamic: or +-inf) makes its
    group's step NaN, so the row's outputs are NaN; static scales saturate +-inf."""
    rng = np.random.default_rng(3)
    K, N = 99, 37
    b = sqk.GraphBuilder("nf")
    x = b.input("x", (6, K))
    q = b.const(rng.integers(-8, 8, (K, N)).astype(np.int8), "i4")
    s = b.const(rng.uniform(0.01, 0.1, (K, N)).astype(np.float32)[:1], "f32")
    g = b.output(*[b.matmul_q(x, q, s, group=K, activations="int8", act_scale=act_scale, act_group=a)
                   for a in (32, 12)])
    xv = rand((6, K), "f32", rng)
    xv[1, 3], xv[2, K - 1], xv[3, 40], xv[4, 0] = np.nan, np.nan, np.inf, -np.inf
    got, want = compile_for(g, target)(x=xv), sqk.reference(g, x=xv)
    for a, w in zip(got, want):
        assert np.isnan(w[1:3]).all() and np.isfinite(w[[0, 5]]).all()
        assert np.isnan(w[3:5]).all() if not act_scale else np.isfinite(w[3:5]).all()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(w))
        assert a[~np.isnan(a)].tobytes() == w[~np.isnan(w)].tobytes()


def test_act_group_semantics():
    """By hand and against the definition: act_group = the weight group is the default
    (0); per row (>= K) is one step for the row; segments follow both groups."""
    rng = np.random.default_rng(0)
    x = rand((3, 100), "f32", rng)
    q = rng.integers(-8, 8, (100, 9)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, (4, 9)).astype(np.float32)
    same = matmul_q_i8act(x, q, s, None, 32)
    assert matmul_q_i8act(x, q, s, None, 32, act_group=32).tobytes() == same.tobytes()
    assert matmul_q_i8act(x, q, s, None, 32, act_group=100).tobytes() == \
        matmul_q_i8act(x, q, s, None, 32, act_group=1000).tobytes()
    # per row with per-channel weights: one integer dot, one step
    s1 = s[:1]
    xq = np.round(x / (np.abs(x).max(axis=1, keepdims=True) / np.float32(127))).astype(np.int64)
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    want = ((d[:, None] * s1) * (xq @ q.astype(np.int64)).astype(np.float32)).astype(np.float32)
    assert matmul_q_i8act(x, q, s1, None, 100, act_group=100).tobytes() == want.tobytes()
    assert i8act_segments(100, 32, 0) == (32, 32, 32)
    assert i8act_segments(100, 100, 12) == (12, 100, 12)
    assert i8act_segments(100, 32, 64) == (32, 32, 64)
    assert i8act_segments(100, 32, 500) == (32, 32, 100)
    with pytest.raises(ValueError, match="one must be a multiple of the other"):
        i8act_segments(100, 48, 32)


@pytest.mark.parametrize("kw, message", [
    ({"act_group": 32}, "act_group=32 must be 0 .* with activations=int8"),
    ({"activations": "int8", "act_group": -1}, "act_group=-1 must be 0"),
    ({"activations": "int8", "act_group": 24, "group": 32}, "one must be a multiple of the other"),
])
def test_act_group_bad_attrs(kw, message):
    b = sqk.GraphBuilder("bad")
    x = b.input("x", (1, 96))
    q = b.const(np.zeros((96, 4), np.int8), "i4")
    s = b.const(np.ones((3, 4), np.float32))
    with pytest.raises(IRError, match=message):
        b.matmul_q(x, q, s, **{"group": 32, **kw})


def test_act_group_text_round_trip():
    g, _ = scheme_graph("i4-g32", 1, 96, 8, act_groups_=[0, 64])
    text = print_graph(g, inline_limit=None)
    assert "act_group=64" in text and text.count("act_group") == 1
    assert [n.attrs["act_group"] for n in parse_ir(text).nodes if n.op == "matmul_q"] == [0, 64]


def ggml_q8_0(x: np.ndarray):
    """ggml's quantize_row_q8_0 (reference C): per block of 32, d = amax / 127 stored as
    f16, codes roundf(x / d) (halves away from zero) computed as x * (1 / d)."""
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = xb * inv[..., None]
    qs = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int64)
    return qs, d.astype(np.float16).astype(np.float32)


def ggml_vec_dot(x: np.ndarray, name: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    """ggml's vec_dot_{q4_0,q8_0}_q8_0 (generic C) of every row of x against every row
    of the [n, k] matrix in ``raw``: sumf += sumi * d_w * d_x per block, in f32."""
    t = blocks.TYPES[name]
    blk = raw.reshape(n, k // 32, t.nbytes)
    dw = blk[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)          # [n, blocks]
    if name == "Q4_0":
        lo, hi = (blk[..., 2:] & 15).astype(np.int64) - 8, (blk[..., 2:] >> 4).astype(np.int64) - 8
        w = np.concatenate([lo, hi], axis=-1)                                   # [n, blocks, 32]
    else:
        w = blk[..., 2:].view(np.int8).astype(np.int64)
    xq, dx = ggml_q8_0(x)                                                       # [r, blocks, 32], [r, blocks]
    y = np.zeros((x.shape[0], n), np.float32)
    for j in range(k // 32):
        sumi = (xq[:, j] @ w[:, j].T).astype(np.float32)
        y = (y + (sumi * dw[None, :, j]) * dx[:, j:j + 1]).astype(np.float32)
    return y


def rel(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0"])
def test_ggml_q8_activations(name):
    """GGUF q4_0 / q8_0 weights with act_group=32: ggml's own dot products (numpy of
    quantize_row_q8_0 + vec_dot_*_q8_0) within ggml's f16 step of the activations
    (relative L2 < 2e-4), and far closer to them than one activation scale per row."""
    from test_matmul_q_gguf import random_blocks

    rng = np.random.default_rng(7)
    n, k = 131, 512
    raw = random_blocks(name, n, k, rng)
    m = blocks.to_matmul_q(name, raw, (n, k))
    b = sqk.GraphBuilder("ggml")
    x = b.input("x", (3, k))
    consts = [b.const(a, d) for a, d in m["inputs"]]
    g = b.output(*[b.matmul_q(x, *consts, activations="int8", act_group=a, **m["attrs"]) for a in (32, k)])
    xv = rand((3, k), "f32", rng)
    xv[:, :64] *= 20    # outliers in a few blocks: where per-row scales lose precision
    y32, yrow = sqk.compile(g)(x=xv)
    want = ggml_vec_dot(xv, name, raw, n, k)
    assert rel(y32, want) < 2e-4
    assert rel(yrow, want) > 5 * rel(y32, want)


def test_ggml_q8_activations_real_smollm2_logits():
    """The real SmolLM2 Q8_0 token_embd as lm_head (its first 8192 rows) with act_group=32:
    logits within 2e-4 (relative L2) of ggml's q8_0 x q8_0 dot products, same top token."""
    from test_matmul_q_gguf import smollm2_gguf

    emb = {t.name: t for t in smollm2_gguf().tensors}["token_embd.weight"]
    vocab, hidden = emb.shape[::-1]
    n = 8192
    raw = np.asarray(emb.data)[:n]
    m = blocks.to_matmul_q(emb.tensor_type, raw, (n, hidden))
    b = sqk.GraphBuilder("lm_head")
    x = b.input("x", (2, hidden))
    g = b.output(b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), activations="int8", act_group=32,
                            **m["attrs"]))
    rng = np.random.default_rng(1)
    xv = rand((2, hidden), "f32", rng, -1, 1)
    xv[:, rng.integers(0, hidden, 6)] *= 30   # a residual stream's few large channels
    got = sqk.compile(g)(x=xv)
    want = ggml_vec_dot(xv, "Q8_0", raw, n, hidden)
    assert rel(got, want) < 2e-4
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def quant_graph(K=96, N=40):
    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("qa")
    x = b.input("x", (2, K))
    g = b.output(b.matmul(x, b.const(rng.standard_normal((K, N)).astype(np.float32), name="w")))
    return g, {"x": rand((2, K), "f32", rng)}


def test_quantize_pass_act_group():
    """quantize{activations=int8, act_group=32} (and sqk.compile's shorthand): the
    matmul_q carries it (clamped to K), the report says so, the module runs the
    reference's numerics."""
    g, inputs = quant_graph()
    m = sqk.compile(g, quantize="int8", activations="int8", act_group=32)
    assert "a32" in m.report.format()
    qg = PassManager(parse_pipeline("fold_constants,quantize{weights=int8,activations=int8,act_group=32}")).run(g)
    node = [n for n in qg.nodes if n.op == "matmul_q"][0]
    assert node.attrs["act_group"] == 32 and node.attrs["group"] == 96
    got = m(**inputs)
    per_row = sqk.compile(g, quantize="int8", activations="int8")(**inputs)
    assert not np.array_equal(got, per_row)
    big = sqk.compile(g, quantize="int8", activations="int8", act_group=1000)(**inputs)
    np.testing.assert_array_equal(big, per_row)   # >= K: one scale per row, the per-channel default


def test_quantize_pass_act_group_errors():
    g, _ = quant_graph()
    with pytest.raises(PipelineError, match="act_group=32: expected .* with activations=int8"):
        sqk.compile(g, quantize="int8", act_group=32)
    with pytest.raises(PipelineError, match="layer w: .*one must be a multiple of the other"):
        sqk.compile(g, quantize="int4", group=48, activations="int8", act_group=32)


def test_cli_act_group(tmp_path, capsys):
    from sqk.compiler.cli import main

    g, inputs = quant_graph()
    path = str(tmp_path / "m.sqkir")
    sqk.save_ir(g, path)
    out = str(tmp_path / "m.sqk")
    assert main(["compile", path, "-o", out, "--quantize", "int4", "--activations", "int8", "--act-group", "32",
                 "--report", "--quiet"]) == 0
    got = sqk.load(out)(**inputs)
    want = sqk.compile(g, quantize="int4", activations="int8", act_group=32)(**inputs)
    np.testing.assert_array_equal(got, want)


def test_gguf_weight_act_group():
    """ir.blocks.Weight.matmul passes act_group on (a GGUF decoder's q8 activations)."""
    from test_matmul_q_gguf import random_blocks

    rng = np.random.default_rng(2)
    raw = random_blocks("Q4_0", 40, 64, rng)
    b = sqk.GraphBuilder("w")
    x = b.input("x", (2, 64))
    w = blocks.Weight(b, "Q4_0", raw, (40, 64))
    g = b.output(w.matmul(x, activations="int8", act_group=32), w.matmul(x, activations="int8", act_group=64))
    nodes = [n for n in g.nodes if n.op == "matmul_q"]
    assert [n.attrs["act_group"] for n in nodes] == [32, 64]
    xv = rand((2, 64), "f32", rng)
    for a, r in zip(sqk.compile(g)(x=xv), sqk.reference(g, x=xv)):
        assert a.tobytes() == r.tobytes()
