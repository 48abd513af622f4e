"""GGUF's pre-quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) as matmul_q
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
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


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
    (q, qdt), (s, _), *rest = m["inputs"]
    assert q.shape == (k, n)
    with np.errstate(all="ignore"):
        w = dequantize_weight(q, s, rest[0][0] if rest else None, m["attrs"]["group"])
        want = blocks.dequantize(name, raw, (n, k))
    np.testing.assert_array_equal(bits(w.T), bits(want))
    stored = sum(sqk.ir.dtypes.dtype(d).nbytes(a.size) for a, d in m["inputs"])
    extra = {"Q4_K": (6 - 4.5) / 8 * n * k, "Q6_K": (10 - 6.5625) / 8 * n * k}.get(name, 0)
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
    with pytest.raises(IRError, match="int8 activations are not supported with minimums"):
        b.matmul_q(x, q, s, z, group=32, activations="int8")
    with pytest.raises(IRError, match="need i4 weights"):
        b.matmul_q(x, b.const(np.zeros((64, 4), np.int8), "i8"), s, z, group=32)


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
