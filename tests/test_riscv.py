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


def test_gemv_hot_loop_is_vectorized():
    g = gemv_f32()
    rvv = kernel_asm(compile_for(g, "riscv64"), "riscv64", "k0_matmul")
    ops = {m.group(1) for m in VECTOR.finditer(rvv)}
    assert any(o.startswith("vfmacc") or o.startswith("vfmadd") for o in ops), sorted(ops)
    assert any(o.startswith("vle32") for o in ops) and any(o.startswith("vsetivli") or o.startswith("vsetvli")
                                                           for o in ops), sorted(ops)
    scalar = kernel_asm(compile_for(g, "riscv64-scalar"), "riscv64-scalar", "k0_matmul")
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
