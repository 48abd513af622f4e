"""Artifacts: save, load in a fresh process without the compiler, and refuse
anything broken or foreign with a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sqk
from sqk.runtime.module import ArtifactError
from harness import compile_for


def mlp():
    rng = np.random.default_rng(1)
    b = sqk.GraphBuilder("mlp")
    x = b.input("x", (2, 24))
    bias = b.const(rng.standard_normal(40).astype(np.float32), name="bias")
    return b.output(b.relu(b.add(b.mul(x, x), b.const(np.float32(0.5)))), b.tanh(bias))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = mlp()
    m = sqk.compile(g)
    path = str(tmp_path_factory.mktemp("art") / "mlp.sqk")
    m.save(path)
    return g, path


X = np.linspace(-2, 2, 48, dtype=np.float32).reshape(2, 24)


def test_save_load_same_outputs(saved):
    g, path = saved
    m = sqk.load(path)
    for a, r in zip(m(x=X), sqk.reference(g, x=X)):
        np.testing.assert_allclose(a, r, rtol=1e-6)
    assert sorted(os.listdir(path)) == ["constants.bin", "manifest.json", "model.so", "model.sqkir"]


def test_load_in_fresh_process_without_llvmlite(saved, tmp_path):
    g, path = saved
    np.save(tmp_path / "x.npy", X)
    script = f"""
import sys
sys.modules["llvmlite"] = None          # any import of llvmlite now raises ImportError
import numpy as np, sqk
m = sqk.load({path!r})
out = m(x=np.load({str(tmp_path / 'x.npy')!r}))
assert "llvmlite" not in [k for k, v in sys.modules.items() if v is not None]
assert "sqk.codegen" not in sys.modules and "sqk.compiler.driver" not in sys.modules, sorted(sys.modules)
np.save({str(tmp_path / 'out0.npy')!r}, out[0]); np.save({str(tmp_path / 'out1.npy')!r}, out[1])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = sqk.reference(g, x=X)
    np.testing.assert_allclose(np.load(tmp_path / "out0.npy"), ref[0], rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "out1.npy"), ref[1], rtol=1e-6)


def test_bad_call_inputs(saved):
    m = sqk.load(saved[1])
    with pytest.raises(ValueError, match="missing input.*x"):
        m()
    with pytest.raises(ValueError, match="unknown input.*y"):
        m(x=X, y=X)
    with pytest.raises(ValueError, match=r"input 'x': shape \(24, 2\), expected \(2, 24\)"):
        m(x=X.T.copy())
    with pytest.raises(TypeError, match="input 'x': dtype float64, expected float32"):
        m(x=X.astype(np.float64))
    with pytest.raises(TypeError, match="input 'x': expected a numpy array"):
        m(x=X.tolist())
    # non-contiguous views are copied, not read out of bounds
    wide = np.zeros((2, 48), np.float32)
    wide[:, ::2] = X
    np.testing.assert_array_equal(m(x=wide[:, ::2])[0], m(x=X)[0])


def _copy(path, tmp_path):
    import shutil

    dst = str(tmp_path / "copy.sqk")
    shutil.copytree(path, dst)
    return dst


def _edit_manifest(path, fn):
    mp = os.path.join(path, "manifest.json")
    with open(mp) as f:
        man = json.load(f)
    fn(man)
    with open(mp, "w") as f:
        json.dump(man, f)


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(os.path.join(p, "manifest.json"), "w").write('{"format": "sqk-art'), "corrupt manifest"),
    (lambda p: os.unlink(os.path.join(p, "manifest.json")), "no manifest.json"),
    (lambda p: _edit_manifest(p, lambda m: m.update(format_version=99)), "format version 99"),
    (lambda p: _edit_manifest(p, lambda m: m.pop("inputs")), "manifest field inputs: missing"),
    (lambda p: _edit_manifest(p, lambda m: m["target"].update(triple="aarch64-unknown-linux-gnu")),
     "compiled for aarch64"),
    (lambda p: _edit_manifest(p, lambda m: m["target"].update(name="gpu")), "unknown target"),
    (lambda p: _edit_manifest(p, lambda m: m["target"]["required_features"].append("avx512_nonexistent")),
     "CPU features this machine lacks: avx512_nonexistent"),
    (lambda p: open(os.path.join(p, "constants.bin"), "r+b").truncate(10), "truncated or replaced"),
    (lambda p: open(os.path.join(p, "constants.bin"), "r+b").write(b"\x01\x02"), "content hash does not match"),
    (lambda p: open(os.path.join(p, "model.so"), "r+b").write(b"garbage!"), "content hash does not match"),
    (lambda p: os.unlink(os.path.join(p, "model.so")), "model.so is missing"),
])
def test_broken_artifacts_refused(saved, tmp_path, damage, message):
    path = _copy(saved[1], tmp_path)
    damage(path)
    with pytest.raises(ArtifactError, match=message):
        sqk.load(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        sqk.load(str(tmp_path / "nothing"))


def test_save_never_leaves_half_written(saved, tmp_path):
    m = sqk.load(saved[1])
    target = tmp_path / "keep"
    target.mkdir()
    (target / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an sqk artifact"):
        m.save(str(target))
    assert os.listdir(target) == ["precious.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".sqk-save")] == []
    # overwriting an existing artifact replaces it whole
    out = str(tmp_path / "a.sqk")
    m.save(out)
    m.save(out)
    assert sqk.load(out)(x=X)[0].shape == (2, 24)
    assert sorted(os.listdir(tmp_path)) == ["a.sqk", "keep"]  # no .old or .sqk-save-* left


def test_failed_compile_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown target"):
        sqk.compile(mlp(), target="sparc")
    assert os.listdir(tmp_path) == []


def test_riscv_artifact_without_qemu(tmp_path, monkeypatch):
    m = compile_for(mlp(), "riscv64")
    path = str(tmp_path / "rv.sqk")
    m.save(path)
    assert json.load(open(os.path.join(path, "manifest.json")))["target"]["triple"].startswith("riscv64")
    np.testing.assert_allclose(sqk.load(path)(x=X)[0], sqk.reference(mlp(), x=X)[0], rtol=1e-6)
    monkeypatch.setenv("SQK_QEMU", "/nonexistent/qemu-riscv64")
    with pytest.raises(ArtifactError, match="needs qemu-user.*apt-get install qemu-user"):
        sqk.load(path)


def test_threads_setting(saved):
    g, path = saved
    for n in (1, 2, 3):
        out = sqk.load(path, threads=n)(x=X)
        np.testing.assert_allclose(out[0], sqk.reference(g, x=X)[0], rtol=1e-6)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_artifact_ir_reads_back_in_its_targets_layout(tmp_path, target):
    """``sqk dump`` of an artifact reads its constants back from constants.bin when they
    are stored plain, which depends on the target: a GEMM's constant b is packed on the
    host (refused, with a hint) but plain on riscv64 (read back)."""
    from sqk.compiler.dump import load_model

    w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    b = sqk.GraphBuilder("g")
    g = b.output(b.matmul(b.input("x", (8, 16)), b.const(w)))
    compile_for(g, target).save(str(tmp_path / "a"))
    if target == "host":
        with pytest.raises(ValueError, match="kernel-specific layout"):
            load_model(str(tmp_path / "a"))
        return
    g2, manifest = load_model(str(tmp_path / "a"))
    assert manifest["target"]["name"] == "riscv64"
    np.testing.assert_array_equal(next(n.attrs["value"] for n in g2.nodes if n.op == "const"), w)
