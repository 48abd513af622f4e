"""The graphs of the golden tests (tests/test_golden.py): one per kernel family,
fixed shapes (odd sizes, so vector tails are in the code) and seeded weights
(sparse formats put the weights' structure in the code)."""
from __future__ import annotations

import numpy as np

from sqk.codegen.target import RISCV_TRIPLE, Target, riscv64_target
from sqk.compiler.models import small_cnn, transformer_block
from sqk.ir import GraphBuilder

# Host targets described in full, not read from this machine: the goldens must not depend on
# the CPU the tests run on.  AVX2 + FMA without AVX-512 or VNNI (the common x86-64 today), and
# an AVX-512 core with VNNI (the wide and the integer-dot code paths).
X86 = "x86_64-unknown-linux-gnu"
HOST_AVX2 = Target("host", X86, "haswell", "+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+popcnt,+sse4.2,-avx512f", 256)
HOST_AVX512 = Target("host", X86, "icelake-server",
                     "+avx,+avx2,+bmi,+bmi2,+f16c,+fma,+popcnt,+sse4.2,+avx512f,+avx512bw,+avx512cd,+avx512dq,"
                     "+avx512vl,+avx512vnni", 512)
TARGETS = {"host-avx2": HOST_AVX2, "host-avx512": HOST_AVX512,
           "riscv64": riscv64_target(True), "riscv64-scalar": riscv64_target(False)}
assert TARGETS["riscv64"].triple == RISCV_TRIPLE


def _w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def elementwise():
    b = GraphBuilder("elementwise")
    x, y = b.input("x", (5, 37)), b.input("y", (37,))
    h = b.cast(b.exp(b.add(x, y)), to="f16")
    i = b.cast(x, to="i32")
    m = b.where(b.less(x, y), b.neg(x), b.sigmoid(x))
    return b.output(b.sqrt(h), b.max(i, b.relu(i)), b.gelu(m, approximate="tanh"))


def fused_map():
    b = GraphBuilder("fused_map")
    x, y = b.input("x", (3, 45)), b.input("y", (45,))
    return b.output(b.mul(b.silu(b.add(x, y)), b.tanh(x)))


def movement():
    b = GraphBuilder("movement")
    x = b.input("x", (2, 5, 7))
    t = b.transpose(x, perm=(2, 0, 1))
    s = b.slice(t, starts=(1, 0), ends=(6, 5), axes=(0, 2), steps=(2, 2))
    c = b.concat(x, b.neg(x), axis=1)
    e = b.expand(b.input("v", (1, 7)), shape=(3, 7))
    return b.output(b.reshape(t, shape=(7, 10)), s, c, e)


def gemm():
    b = GraphBuilder("gemm")
    x = b.input("x", (13, 29))
    y = b.add(b.matmul(x, b.const(_w(29, 35), name="w")), b.const(_w(35, seed=1), name="bias"))
    return b.output(b.relu(y))


def gemv():
    b = GraphBuilder("gemv")
    x = b.input("x", (1, 67))
    return b.output(b.matmul(x, b.const(_w(67, 41), name="w")))


def batched_matmul():
    b = GraphBuilder("batched_matmul")
    a, c = b.input("a", (2, 3, 7, 9)), b.input("c", (2, 1, 9, 5))
    return b.output(b.matmul(a, c), b.matmul(b.input("h", (1, 9), "f16"), b.input("k", (9, 11), "f16")))


def attention():
    b = GraphBuilder("attention")
    q, kt, v = b.input("q", (2, 5, 8)), b.input("kt", (2, 8, 11)), b.input("v", (2, 11, 8))
    s = b.mul(b.matmul(q, kt), b.const(np.float32(0.35), name="scale"))
    return b.output(b.matmul(b.softmax(s), v))


def _mlp(name, k=64, n=48, m=1):
    b = GraphBuilder(name)
    x = b.input("x", (m, k))
    return b.output(b.matmul(x, b.const(_w(k, n), name="w")))


def reduction():
    b = GraphBuilder("reduction")
    x = b.input("x", (3, 5, 37))
    return b.output(b.reduce_sum(x, axes=(2,)), b.reduce_mean(x, axes=(0, 2), keepdims=True),
                    b.reduce_max(x, axes=(1,)))


def norms():
    b = GraphBuilder("norms")
    x = b.input("x", (3, 45))
    return b.output(b.softmax(x), b.layernorm(x, b.const(_w(45), name="g"), b.const(_w(45, seed=1), name="bt")),
                    b.rmsnorm(x, b.const(_w(45, seed=2), name="s")))


def conv():
    b = GraphBuilder("conv")
    x = b.input("x", (1, 3, 11, 13))
    y = b.relu(b.conv2d(x, b.const(_w(5, 3, 3, 3), name="w"), b.const(_w(5, seed=1), name="bias"),
                        pads=(1, 1, 1, 1)))
    return b.output(b.maxpool2d(y, kernel=(2, 2), strides=(2, 2)), b.avgpool2d(y, kernel=(3, 3), pads=(1, 1, 1, 1)),
                    b.global_avgpool(y),
                    b.conv2d(x, b.const(_w(3, 1, 3, 3, seed=2), name="dw"), b.const(_w(3, seed=3), name="db"),
                             groups=3, strides=(2, 2)))


def winograd():
    b = GraphBuilder("winograd")
    x = b.input("x", (1, 16, 7, 6))
    return b.output(b.relu(b.conv2d(x, b.const(_w(17, 16, 3, 3), name="w"), b.const(_w(17, seed=1), name="bias"),
                                    pads=(1, 1, 1, 1))))


def im2col():
    b = GraphBuilder("im2col")
    return b.output(b.im2col(b.input("x", (1, 3, 9, 14)), kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
                    b.im2col(b.input("y", (2, 2, 5, 21)), kernel=(2, 3), strides=(1, 3), pads=(0, 2, 1, 0),
                             dilations=(2, 1)))


def conv_q():
    b = GraphBuilder("conv_q")
    xq_in = b.input("x", (1, 5, 7, 11))
    xq = b.conv_input_q(xq_in, act_scale=0.05, pads=(1, 1, 1, 1))
    q = b.const((np.arange(6 * 2 * 9 * 4) % 255 - 127).astype(np.int8).reshape(6, 2, 3, 3, 4), name="q")
    xu = b.conv_input_q(xq_in, act_scale=0.05, pads=(1, 1, 1, 1), unsigned=True)
    return b.output(b.relu(b.conv2d_q(xq, q, b.const(_w(6), name="s"), b.const(_w(6, seed=1), name="bias"),
                                      strides=(2, 1), act_scale=0.05)),
                    b.conv2d_q(xu, q, b.const(_w(6, seed=2), name="s2"), act_scale=0.05, unsigned=True))


def gather():
    b = GraphBuilder("gather")
    table = b.const(_w(19, 12), name="table")
    ids = b.input("ids", (5,), "i64")
    x = b.input("x", (4, 6))
    return b.output(b.gather(table, ids), b.gather_elements(x, b.input("j", (4, 3), "i64"), axis=1))


def llm_ops():
    b = GraphBuilder("llm_ops")
    pos = b.input("pos", (1,), "i64")
    q, kn, vn = b.input("q", (4, 8)), b.input("kn", (2, 8)), b.input("vn", (2, 8))
    kc, vc = b.input("kc", (2, 6, 8)), b.input("vc", (2, 6, 8))
    att, kc2, vc2 = b.attention_decode(q, kn, vn, kc, vc, pos)
    r = b.rope(b.input("xr", (3, 2, 8)), pos, theta=500.0)
    x = b.input("x", (2, 12))
    top, idx = b.topk(x, k=3)
    moe = b.moe(x, b.const(_w(12, 4), name="router"), b.const(_w(4, 12, 10, seed=1), name="w1"),
                b.const(_w(4, 12, 10, seed=2), name="w3"), b.const(_w(4, 10, 12, seed=3), name="w2"), k=2)
    return b.output(att, kc2, vc2, r, b.swiglu(b.input("gate", (1, 21)), b.input("up", (1, 21))), top, idx, moe)


def _sparse_weight(k, n, keep=0.1, seed=0):
    w = _w(k, n, seed=seed)
    return np.where(np.random.default_rng(seed + 7).random((k, n)) < keep, w, 0).astype(np.float32)


def _sparse(name, w, m=1):
    b = GraphBuilder(name)
    return b.output(b.matmul(b.input("x", (m, w.shape[0])), b.const(w, name="w")))


# family -> (graph, pipeline; None: the default one): the pipeline picks the kernel (quantize, a storage format, fusion)
def gguf_blocks():
    """GGUF's block formats as the loader uses them (ir/blocks.py): float minimums (Q4_1),
    two-level scales (Q4_K, also with int8 activations), Q6_K's own blocks, and row gathers
    of a tied table from the same constants."""
    from sqk.ir import blocks

    b = GraphBuilder("gguf_blocks")
    k, n = 512, 37
    x, ids = b.input("x", (3, k)), b.input("ids", (2,), "i64")
    rng = np.random.default_rng(0)
    outs = []
    for i, name in enumerate(("Q4_1", "Q4_K", "Q6_K")):
        t = blocks.block_type(name)
        raw = rng.integers(0, 256, (n, k // t.block * t.nbytes), dtype=np.uint8)
        w = blocks.Weight(b, name, raw, (n, k), name=f"w{i}")
        outs += [w.matmul(x), w.gather(ids)]
        if name == "Q4_K":
            outs.append(w.matmul(x, activations="int8"))
    return b.output(*outs)


def matmul_q_gemm():
    """matmul_q with enough rows of x for the GEMM (codegen/matmul_q_gemm.py): i8 with
    zero points, a short last group, odd N; a Q4_K weight (two-level scales); matmul_ggml
    (Q6_K) through the same GEMM."""
    from sqk.ir import blocks

    b = GraphBuilder("matmul_q_gemm")
    rng = np.random.default_rng(0)
    x, x2 = b.input("x", (13, 100)), b.input("x2", (21, 256))
    q = b.const(rng.integers(-128, 128, (100, 70)).astype(np.int8), "i8", name="q")
    s = b.const(rng.uniform(0.01, 0.05, (4, 70)).astype(np.float16), "f16", name="s")
    z = b.const(rng.integers(-4, 4, (4, 70)).astype(np.int8), "i8", name="z")
    raw = rng.integers(0, 256, (37, blocks.block_type("Q4_K").nbytes), dtype=np.uint8)
    w = blocks.Weight(b, "Q4_K", raw, (37, 256), name="wk")
    raw6 = rng.integers(0, 256, (70, blocks.block_type("Q6_K").nbytes), dtype=np.uint8)
    w6 = blocks.Weight(b, "Q6_K", raw6, (70, 256), name="w6")
    return b.output(b.matmul_q(x, q, s, z, group=32), w.matmul(x2), w6.matmul(x2))
def matmul_q_gemm_i8():
    """GGUF 4-bit blocks with llama.cpp's q8 activations (act_group 32) and enough rows of
    x for the int8 GEMM (codegen/matmul_q_gemm_i8.py): Q4_0, Q4_1 (minimums) and Q4_K
    (two-level scales), odd N, a tail row tile."""
    from sqk.ir import blocks

    b = GraphBuilder("matmul_q_gemm_i8")
    rng = np.random.default_rng(0)
    x = b.input("x", (13, 256))
    outs = []
    for i, (name, n) in enumerate((("Q4_0", 37), ("Q4_1", 64), ("Q4_K", 33))):
        t = blocks.block_type(name)
        raw = rng.integers(0, 256, (n, 256 // t.block * t.nbytes), dtype=np.uint8)
        outs.append(blocks.Weight(b, name, raw, (n, 256), name=f"w{i}").matmul(x, activations="int8", act_group=32))
    return b.output(*outs)


def kv_int8():
    """attention_decode on an int8 cache: a prefill chunk, and a split decode step merged."""
    b = GraphBuilder("kv_int8")
    pos = b.input("pos", (1,), "i64")
    kc, vc = b.input("kc", (2, 40, 8), "i8"), b.input("vc", (2, 40, 8), "i8")
    ks, vs = b.input("ks", (2, 40)), b.input("vs", (2, 40))
    chunk = b.attention_decode(b.input("qc", (3, 4, 8)), b.input("kn3", (3, 2, 8)), b.input("vn3", (3, 2, 8)),
                               kc, vc, pos, ks, vs)
    parts, *caches = b.attention_decode(b.input("q", (4, 8)), b.input("kn", (2, 8)), b.input("vn", (2, 8)),
                                        *chunk[1:3], pos, *chunk[3:], splits=3)
    return b.output(chunk[0], b.attention_merge(parts), *caches)


FAMILIES = {
    "elementwise": (elementwise, "dce"),
    "fused_map": (fused_map, "fuse"),
    "movement": (movement, "dce"),
    "gemm_epilogue": (gemm, "fuse"),
    "gemv": (gemv, "dce"),
    "batched_matmul": (batched_matmul, "dce"),
    "attention": (attention, "fold_constants,fuse"),
    "matmul_q_int8": (lambda: _mlp("q8", m=3), "quantize{weights=int8}"),
    "matmul_q_int4": (lambda: _mlp("q4"), "quantize{weights=int4,group=32}"),
    "matmul_q_int4_asym": (lambda: _mlp("q4a", m=5), "quantize{weights=int4,group=16,scheme=asym,scale_dtype=f16}"),
    "matmul_q_i8act": (lambda: _mlp("q8act", m=2), "quantize{weights=int8,group=32,activations=int8}"),
    "matmul_q_i4_i8act": (lambda: _mlp("q4act"), "quantize{weights=int4,group=32,activations=int8}"),
    "matmul_q_i8act_group": (lambda: _mlp("q8ag", m=3), "quantize{weights=int8,activations=int8,act_group=32}"),
    "sparse_csr": (lambda: _sparse("csr", _sparse_weight(61, 37)), "select_format{force=w:csr}"),
    "sparse_bsr": (lambda: _sparse("bsr", _sparse_weight(64, 40), m=3), "select_format{force=w:bsr4x1}"),
    "sparse_nm": (lambda: _sparse("nm", _w(64, 37), m=2), "sparsify{pattern=2:4},select_format{force=w:nm2:4}"),
    "sparse_q_csr": (lambda: _sparse("qcsr", _sparse_weight(64, 37)),
                     "quantize{weights=int8},select_format{force=w:csr}"),
    "sparse_input": (lambda: _relu_mlp(), "sparse_activations{min_bytes=0}"),
    "reduction": (reduction, "dce"),
    "norms": (norms, "dce"),
    "conv": (conv, "fuse"),
    "winograd": (winograd, "winograd,fuse"),
    "conv_q": (conv_q, "fuse"),
    "im2col": (im2col, "dce"),
    "gather": (gather, "dce"),
    "gguf_blocks": (gguf_blocks, "dce"),
    "matmul_q_gemm": (matmul_q_gemm, "dce"),
    "matmul_q_gemm_i8": (matmul_q_gemm_i8, "dce"),
    "llm_ops": (llm_ops, "dce"),
    "kv_int8": (kv_int8, "dce"),
    # whole models through the default pipeline: fusion decisions and the memory plan
    "transformer_block": (lambda: transformer_block(hidden=48, heads=4, ffn=80, tokens=5), None),
    "small_cnn": (lambda: small_cnn(channels=(4, 8), image=12), None),
}


def _relu_mlp():
    b = GraphBuilder("relu_mlp")
    return b.output(b.matmul(b.relu(b.input("x", (2, 40))), b.const(_w(40, 23), name="w")))
