"""RISC-V specifics: vector code in the hot loops, and the slower vlen=512 job."""
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


def gemv_f32():
    b = sqk.GraphBuilder("gemv")
    x = b.input("x", (1, 256))
    w = b.const(np.random.default_rng(0).standard_normal((256, 200)).astype(np.float32), name="w")
    return b.output(b.matmul(x, w))


VECTOR = re.compile(r"^\s+(v[a-z0-9]+(\.[a-z0-9]+)*)\s", re.M)


def gemv_q(bits: int):
    from sqk.compiler.quantize import quantize_weight

    w = np.random.default_rng(0).standard_normal((256, 200)).astype(np.float32)
    q, s, _ = quantize_weight(w, bits=bits, group=32 if bits == 4 else None)
    b = sqk.GraphBuilder(f"gemv_i{bits}")
    return b.output(b.matmul_q(b.input("x", (1, 256)), b.const(q, f"i{bits}"), b.const(s, "f32"),
                               group=32 if bits == 4 else 256))


@pytest.mark.parametrize("graph, kernel", [(gemv_f32, "k0_matmul"), (lambda: gemv_q(8), "k0_matmul_q"),
                                           (lambda: gemv_q(4), "k0_matmul_q")], ids=["f32", "int8", "int4"])
def test_gemv_hot_loop_is_vectorized(graph, kernel):
    g = graph()
    rvv = kernel_asm(compile_for(g, "riscv64"), "riscv64", kernel)
    ops = {m.group(1) for m in VECTOR.finditer(rvv)}
    assert any(o.startswith("vfmacc") or o.startswith("vfmadd") for o in ops), sorted(ops)
    assert any(o.startswith("vle") for o in ops) and any(o.startswith("vsetivli") or o.startswith("vsetvli")
                                                         for o in ops), sorted(ops)
    scalar = kernel_asm(compile_for(g, "riscv64-scalar"), "riscv64-scalar", kernel)
    assert not VECTOR.findall(scalar), "vector instructions in the rv64gc build"
    assert "fmadd.s" in scalar or "fmul.s" in scalar


@pytest.mark.slow
@pytest.mark.parametrize("model", [transformer_mlp, small_cnn])
def test_models_at_vlen_512(model):
    g = model()
    rng = np.random.default_rng(0)
    inputs = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in g.inputs}
    m = compile_for(g, "riscv64")
    assert isinstance(m, RVVModule)
    base = m(**inputs)
    m._m.vlen, m._m.qemu_options = 512, ""
    assert m._m(**inputs).tobytes() == base.tobytes()
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
