"""RISC-V specifics: vector-length-agnostic code in the hot loops of every kernel family,
the runner's refusals, and whole models at qemu's widest VLEN (1024)."""
from __future__ import annotations

import re

import numpy as np
import pytest

import sqk
from sqk.codegen.emit import assembly
from sqk.codegen.target import get_target
from sqk.compiler.models import small_cnn, transformer_mlp
from harness import RVVModule, assert_close, compile_for


def kernel_asm(m, target: str, kernel: str) -> str:
    """Assembly of one kernel function (its always-inlined body included)."""
    asm = assembly(m.llvm_ir, get_target(target))
    start = asm.index(f"\n{kernel}:")
    return asm[start:asm.index(".Lfunc_end", start)]


# a single-block loop: a label, its instructions, and a branch back to the label
LOOP = re.compile(r"^(\.LBB\w+):\n((?:\t[^\n]*\n)*?\tb[a-z]*\t[^\n]*\1\n)", re.M)


def hot_loop(fn: str) -> str:
    """The largest single-block loop of a kernel's assembly: LLVM leaves the
    unrolled inner loop as one block, bigger than any tail or copy loop."""
    loops = [m.group(2) for m in LOOP.finditer(fn)]
    assert loops, "no single-block loop in the kernel"
    return max(loops, key=lambda t: t.count("\n"))


def opcodes(asm: str) -> set[str]:
    return {line.split()[0] for line in asm.splitlines() if line.startswith("\t")}


def gemv_f32():
    b = sqk.GraphBuilder("gemv")
    x = b.input("x", (1, 256))
    w = b.const(np.random.default_rng(0).standard_normal((256, 200)).astype(np.float32), name="w")
    return b.output(b.matmul(x, w))


VECTOR = re.compile(r"^\s+(v[a-z0-9]+(\.[a-z0-9]+)*)\s", re.M)


# vector-length agnostic: a strip-mining vsetvli whose element count (AVL) is a register,
# not vsetivli's immediate (fixed-width vectors) nor "zero" (keep VL / take VLMAX)
VLA = re.compile(r"^\tvsetvli\t\w+, (?!zero,)\w+, ", re.M)


def gemv_q(bits: int, act: str = "none"):
    from sqk.compiler.quantize import quantize_weight

    w = np.random.default_rng(0).standard_normal((256, 200)).astype(np.float32)
    q, s, _ = quantize_weight(w, bits=bits, group=32 if bits == 4 else None)
    b = sqk.GraphBuilder(f"gemv_i{bits}")
    return b.output(b.matmul_q(b.input("x", (1, 256)), b.const(q, f"i{bits}"), b.const(s, "f32"),
                               group=32 if bits == 4 else 256, activations=act))


# (graph, kernel, what the RVV hot loop must hold besides vector loads)
GEMV_HOT = [(gemv_f32, "k0_matmul", "vfmacc|vfmadd"), (lambda: gemv_q(8), "k0_matmul_q", "vfmacc|vfmadd"),
            (lambda: gemv_q(4), "k0_matmul_q", "vfmacc|vfmadd"),
            # int8 activations: exact integer dot products, widened i8 x i8 -> i16 -> i32
            (lambda: gemv_q(8, "int8"), "k0_matmul_q", "vwmacc|vwmul"),
            (lambda: gemv_q(4, "int8"), "k0_matmul_q", "vwmacc|vwmul")]


@pytest.mark.parametrize("graph, kernel, wanted", GEMV_HOT, ids=["f32", "int8", "int4", "int8-act8", "int4-act8"])
def test_gemv_hot_loop_is_vectorized(graph, kernel, wanted):
    g = graph()
    rvv = kernel_asm(compile_for(g, "riscv64"), "riscv64", kernel)
    hot = hot_loop(rvv)
    assert VLA.search(hot), f"no vector-length-agnostic vsetvli in the hot loop:\n{hot}"
    ops = opcodes(hot)
    assert any(o.startswith(tuple(wanted.split("|"))) for o in ops), sorted(ops)
    assert any(o.startswith("vle") for o in ops), sorted(ops)
    scalar = kernel_asm(compile_for(g, "riscv64-scalar"), "riscv64-scalar", kernel)
    assert not VECTOR.findall(scalar), "vector instructions in the rv64gc build"
    assert {"fmadd.s", "fmul.s", "mul", "mulw"} & opcodes(hot_loop(scalar))


def spmv(fmt: str, quant: bool = False):
    """M = 1 matmul (or i8 matmul_q) with a 256 x 200 constant weight stored as ``fmt``:
    90% zeros (csr, bsr: whole 1 x 8 blocks), or 2 of every 4 rows per column (nm2:4)."""
    rng = np.random.default_rng(0)
    K, N = 256, 200
    w = rng.standard_normal((K, N)).astype(np.float32)
    if fmt.startswith("nm"):
        keep = np.argsort(rng.random((K // 4, 4, N)), axis=1) < 2
        w = (w.reshape(K // 4, 4, N) * keep).reshape(K, N)
    elif fmt.startswith("bsr"):
        w *= np.repeat(rng.random((K, N // 8)) < 0.1, 8, axis=1)
    else:
        w[rng.random((K, N)) < 0.9] = 0
    b = sqk.GraphBuilder("spmv_" + fmt.replace(":", "_"))
    x = b.input("x", (1, K))
    if quant:
        scale = np.abs(w).max(axis=0) / 127 + 1e-6
        q = np.round(w / scale).astype(np.int8)
        return b.output(b.matmul_q(x, b.const(q, "i8"), b.const(scale[None, :].astype(np.float32)),
                                   group=K, sparse=fmt))
    return b.output(b.matmul(x, b.const(w, name="w"), sparse=fmt))


# what the RVV hot loop must hold: loads, FMAs, and for csr / N:M an indexed load (the gather of x)
SPARSE_HOT = [("csr", False, ("vle", "vluxei", "vfmacc|vfmadd")), ("csr", True, ("vle", "vluxei", "vfmacc|vfmadd")),
              ("nm2:4", False, ("vle", "vluxei", "vfmacc|vfmadd")), ("bsr1x8", False, ("vle", "vfmacc|vfmadd"))]


@pytest.mark.parametrize("fmt, quant, wanted", SPARSE_HOT, ids=["csr-f32", "csr-int8", "nm2:4-f32", "bsr1x8-f32"])
def test_spmv_hot_loop_is_vectorized(fmt, quant, wanted):
    g = spmv(fmt, quant)
    kernel = "k0_matmul_q" if quant else "k0_matmul"
    loop_asm = hot_loop(kernel_asm(compile_for(g, "riscv64"), "riscv64", kernel))
    assert VLA.search(loop_asm), f"no vector-length-agnostic vsetvli in the hot loop:\n{loop_asm}"
    hot = opcodes(loop_asm)
    for w in wanted:
        assert any(o.startswith(tuple(w.split("|"))) for o in hot), (w, sorted(hot))
    scalar = kernel_asm(compile_for(g, "riscv64-scalar"), "riscv64-scalar", kernel)
    assert not VECTOR.findall(scalar), "vector instructions in the rv64gc build"
    assert {"fmadd.s", "fmul.s"} & opcodes(hot_loop(scalar))


def _family_graphs():
    """One graph per kernel family, rows wide enough (>= 64) that LLVM keeps them as loops
    (a loop of a few dozen iterations may be fully unrolled and SLP-vectorized at a fixed
    width instead: correct at any VLEN, but vsetivli)."""
    rng = np.random.default_rng(1)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731

    def g(name, fn):
        b = sqk.GraphBuilder(name)
        return b.output(fn(b))

    def fused_gemm(b):
        return b.gelu(b.add(b.matmul(b.input("x", (9, 80)), b.const(r(80, 100))), b.const(r(100))))

    from test_llm import _attn_graph, _chunk_graph
    return {
        "elementwise": (g("ew", lambda b: b.mul(b.exp(b.input("x", (3, 300))), b.input("y", (3, 300)))),
                        "vfmul|vfmacc|vfmadd"),
        "reduce_sum": (g("rs", lambda b: b.reduce_sum(b.input("x", (5, 300)), axes=[1])), "vfadd|vfredusum|vfredosum"),
        "softmax": (g("sm", lambda b: b.softmax(b.input("x", (5, 300)), axis=-1)),
                    "vfadd|vfredusum|vfredosum|vfmul|vfdiv"),
        "layernorm": (g("ln", lambda b: b.layernorm(b.input("x", (5, 300)), b.const(r(300)), b.const(r(300)))),
                      "vfadd|vfmul|vfmacc|vfsub|vfredusum|vfredosum"),
        "gemm_f32": (g("mm", lambda b: b.matmul(b.input("x", (33, 65)), b.const(r(65, 200)))), "vfmacc|vfmadd"),
        "gemm_fused_epilogue": (g("mmf", fused_gemm), "vfmacc|vfmadd"),
        "matmul_q_i4_gemm": (gemv_q_rows(4, 9), "vfmacc|vfmadd"),
        "conv2d": (g("conv", lambda b: b.relu(b.conv2d(b.input("x", (1, 4, 6, 90)), b.const(r(8, 4, 3, 3)),
                                                        pads=(1, 1, 1, 1)))), "vfmacc|vfmadd"),
        "maxpool2d": (g("mp", lambda b: b.maxpool2d(b.input("x", (1, 2, 6, 150)), kernel=(3, 3), strides=(1, 2),
                                                    pads=(1, 1, 1, 1))), "vfmax|vmfeq|vmerge"),
        "avgpool2d": (g("ap", lambda b: b.avgpool2d(b.input("x", (1, 2, 6, 150)), kernel=(3, 3), pads=(1, 1, 1, 1))),
                      "vfadd"),
        "global_avgpool": (g("gap", lambda b: b.global_avgpool(b.input("x", (1, 3, 20, 20)))),
                           "vfadd|vfredusum|vfredosum"),
        "attention_decode": (_attn_graph(16, 4, 200, 64), "vfmacc|vfmadd|vfmul|vfredusum|vfredosum"),
        "attention_chunk_f16_cache": (_chunk_graph(8, 16, 4, 200, 64, kv="f16"),
                                      "vfmacc|vfmadd|vfmul|vfredusum|vfredosum"),
        "rope": (g("rope", lambda b: b.rope(b.input("x", (1, 8, 128)), b.input("p", (1,), "i64"))),
                 "vfmul|vfmacc|vfmadd|vfnmsac|vfmsac|vfsub"),
        "sparse_input": (g("spin", lambda b: b.matmul_sparse_input(b.input("a", (2, 256)), b.input("w", (256, 300)))),
                         "vfmacc|vfmadd"),
    }


def gemv_q_rows(bits: int, rows: int):
    from sqk.compiler.quantize import quantize_weight

    q, s, _ = quantize_weight(np.random.default_rng(0).standard_normal((256, 200)).astype(np.float32), bits=bits,
                              group=32)
    b = sqk.GraphBuilder(f"mq{bits}")
    return b.output(b.matmul_q(b.input("x", (rows, 256)), b.const(q, f"i{bits}"), b.const(s, "f32"), group=32))


FAMILIES = _family_graphs()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_family_is_vector_length_agnostic(family, riscv_tools):
    """Each kernel of a family's graph has a loop whose strips take a register-AVL vsetvli
    and that does the family's arithmetic (GEMV, matmul_q GEMV and SpMV: the tests above)."""
    g, wanted = FAMILIES[family]
    m = sqk.compile(g, target="riscv64")
    asm = assembly(m.llvm_ir, get_target("riscv64"))
    kernels = re.findall(r"^(k\d+_\w+):\n(.*?)\.Lfunc_end", asm, re.M | re.S)
    assert kernels
    for name, body in kernels:
        loops = [lp.group(2) for lp in LOOP.finditer(body)]
        good = [lp for lp in loops
                if VLA.search(lp) and any(o.startswith(tuple(wanted.split("|"))) for o in opcodes(lp))]
        assert good, f"{family}: kernel {name} has no vector-length-agnostic loop doing {wanted}"


@pytest.mark.parametrize("model", [transformer_mlp, small_cnn])
def test_models_at_vlen_1024(model):
    """Every test runs riscv64 modules at VLEN 128, 256 and 512; whole models also at 1024."""
    g = model()
    rng = np.random.default_rng(0)
    inputs = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in g.inputs}
    m = compile_for(g, "riscv64")
    assert isinstance(m, RVVModule)
    base = m(**inputs)
    m._m.vlen, m._m.qemu_options = 1024, ""
    assert_close(m._m(**inputs), base)   # reassociated float sums may round differently per VLEN
    assert_close(base, sqk.reference(g, **inputs), rtol=1e-4)


def test_runner_refuses_a_host_artifact(tmp_path, riscv_tools):
    """The same model's host constants have the right size; the manifest beside
    them tells the runner they belong to another target (and another model)."""
    import subprocess

    g = gemv_f32()
    rv = sqk.compile(g, target="riscv64")
    sqk.compile(g).save(str(tmp_path / "host"))
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 256), np.float32))
    run = lambda consts: subprocess.run(rv.runner_command() + ["--consts", str(consts), "--input", f"x={x}",  # noqa: E731
                                                                "--output-dir", str(tmp_path)],
                                        capture_output=True, text=True)
    r = run(tmp_path / "host" / "constants.bin")
    assert r.returncode == 2 and "not riscv64" in r.stderr, r.stderr
    other = transformer_mlp(hidden=16, ffn=32)
    sqk.compile(other, target="riscv64").save(str(tmp_path / "other"))
    r = run(tmp_path / "other" / "constants.bin")
    assert r.returncode == 2 and "model 'transformer_mlp'" in r.stderr, r.stderr
    rv.save(str(tmp_path / "own"))
    assert run(tmp_path / "own" / "constants.bin").returncode == 0
