"""What a new user meets first: `sqk --version`, the README's module paths after a
plain `import sqk`, MODEL files of every kind for dump / viz / info, named outputs,
one-line errors with exit 1 (argparse's too), a closed pipe, the onnx install
hint, `help(sqk.compile)`, and a dump of every pass that stores each version of
the weights once."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sqk
from sqk.compiler.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
CLI = [sys.executable, "-m", "sqk.compiler.cli"]


def sqk_cmd(*args, cwd=None, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, **kw)


def test_version():
    r = sqk_cmd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sqk {sqk.__version__}"


def test_readme_module_paths_work_after_import_sqk():
    """Every sqk.a.b path the README names resolves after `import sqk` alone, in a fresh
    interpreter (subpackages and their modules load on first use)."""
    paths = sorted(set(re.findall(r"\bsqk(?:\.[A-Za-z_]\w*)+", README.read_text())))
    paths = [p for p in paths if not re.search(r"\.(py|sqk|sqkir|npz)$", p)]  # file names (`sqk/compiler/cost.py`)
    assert "sqk.compiler.dump.llvm_ir" in paths and "sqk.codegen.emit.kernel_section" in paths
    code = ("import sqk, functools, json\nbad = []\n"
            f"for p in {paths!r}:\n"
            "    try: functools.reduce(getattr, p.split('.')[1:], sqk)\n"
            "    except AttributeError as e: bad.append(f'{p}: {e}')\n"
            "print(json.dumps(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_import_sqk_loads_neither_compiler_nor_llvmlite():
    code = "import sys, sqk; sqk.load; print(sorted(m for m in sys.modules if m in ('llvmlite', 'sqk.compiler')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_compile_has_its_real_signature_and_docstring():
    from sqk.compiler.driver import compile as real

    assert sqk.compile is real
    params = inspect.signature(sqk.compile).parameters
    assert {"quantize", "sparsify", "calibration_data", "state", "progress"} <= set(params)
    assert len(sqk.compile.__doc__.splitlines()) > 20
    assert inspect.signature(sqk.from_onnx).parameters.keys() >= {"input_shapes", "input_values"}


def test_named_outputs(tmp_path):
    b = sqk.GraphBuilder("named")
    x = b.input("x", (2, 3))
    g = b.output(b.exp(x), logits=b.relu(x))
    assert [v.name for v in g.outputs] == ["0", "logits"]
    assert "return %0, %logits" in str(g)
    b2 = sqk.GraphBuilder("named2")
    x2 = b2.input("x", (2, 3))
    g2 = b2.output(b2.neg(x2), b2.tanh(x2), names=["a", "b"])
    assert [v.name for v in g2.outputs] == ["a", "b"]
    for bad, msg in ((lambda b, x: b.output(y=x), "is an input"),
                     (lambda b, x: b.output(x, names=["a", "b"]), "2 names"),
                     (lambda b, x: b.output(b.neg(x), names=["x"]), "already used"),
                     (lambda b, x: b.output(b.neg(x), names=["a b"]), "cannot be written")):
        bb = sqk.GraphBuilder("bad")
        with pytest.raises(sqk.IRError, match=msg):
            bad(bb, bb.input("x", (2,)))
    # sqk run writes out/logits.npy
    path, out = str(tmp_path / "m.sqkir"), str(tmp_path / "m.sqk")
    sqk.save_ir(g, path)
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    assert main(["compile", path, "-o", out, "--quiet"]) == 0
    assert main(["run", out, "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "res")]) == 0
    assert sorted(os.listdir(tmp_path / "res")) == ["0.npy", "logits.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "res" / "logits.npy"), np.ones((2, 3), np.float32))


@pytest.fixture()
def onnx_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "relu",
                     [h.make_tensor_value_info("x", 1, ["n", 4])], [h.make_tensor_value_info("y", 1, ["n", 4])])
    path = str(tmp_path / "relu.onnx")
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def test_dump_viz_info_take_onnx_ir_and_artifacts(onnx_model, tmp_path, capsys):
    shape = ["--input-shape", "n=3"]
    assert main(["dump", onnx_model, *shape]) == 0
    assert "relu(%x) : f32[3,4]" in capsys.readouterr().out
    assert main(["viz", onnx_model, *shape, "-o", str(tmp_path / "g.dot")]) == 0
    assert "relu" in (tmp_path / "g.dot").read_text()
    assert main(["info", onnx_model, *shape]) == 0
    out = capsys.readouterr().out
    assert "input      x: f32[3,4]" in out and "relu x1" in out and "not compiled" in out
    art = str(tmp_path / "r.sqk")
    assert main(["compile", onnx_model, *shape, "-o", art, "--quiet"]) == 0
    capsys.readouterr()
    for cmd in (["dump", art], ["info", art], ["viz", art, "-o", str(tmp_path / "a.dot")]):
        assert main(cmd) == 0, cmd
    assert "relu" in capsys.readouterr().out
    ir = str(tmp_path / "r.sqkir")
    sqk.save_ir(sqk.from_onnx(onnx_model, {"n": 3}), ir)
    assert main(["info", ir]) == 0 and "relu x1" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["compile", "{npy}", "-o", "o.sqk"], "x.npy: a numpy array, not a model"),
    (["dump", "{npy}"], "x.npy: a numpy array, not a model"),
    (["info", "{bin}"], "blob.bin: a binary file, not an IR text file (an ONNX model must be named *.onnx)"),
    (["compile", "{art}", "-o", "o2.sqk"], "is a compiled artifact"),
    (["info", "{art}", "--input-shape", "n=2"], "--input-shape applies to ONNX models (.onnx) only"),
    (["compile"], "the following arguments are required: model, -o/--output (see: sqk compile --help)"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run", "{art}", "--runs", "3"], "unrecognized arguments: --runs 3"),
    ([], "the following arguments are required: cmd"),
])
def test_errors_are_one_line_exit_1(args, message, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3, np.float32))
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    art = tmp_path / "a.sqk"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    args = [a.format(npy=tmp_path / "x.npy", bin=tmp_path / "blob.bin", art=art) for a in args]
    r = sqk_cmd(*args, cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("sqk: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert r.stdout == ""


def test_closed_pipe_is_quiet(tmp_path):
    b = sqk.GraphBuilder("pipe")
    x = b.input("x", (2,))
    path = str(tmp_path / "p.sqkir")
    sqk.save_ir(b.output(b.neg(x)), path)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written, as after `| head -2`
    try:
        p = subprocess.run(CLI + ["info", path], stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


def test_missing_onnx_hint_is_installable(monkeypatch):
    from sqk.compiler.frontends.onnx import INSTALL_HINT

    assert "sqk[onnx]" not in INSTALL_HINT and "pip install onnx" in INSTALL_HINT
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="pip install onnx"):
        sqk.from_onnx("model.onnx")


def test_dump_after_all_writes_each_weight_version_once(tmp_path):
    """Passes that leave the weights share the previous dump's .npz (a hard link), so
    the dump directory holds the input weights and the quantized ones, not one copy per pass."""
    from sqk.compiler.models import transformer_mlp

    g = transformer_mlp(hidden=64, ffn=256)
    d = tmp_path / "d"
    sqk.compile(g, quantize="int8", dump_after="all", dump_dir=str(d), progress=False)
    npz = sorted(d.glob("*.sqkir.npz"))
    assert [p.name.split("_", 1)[1] for p in npz] == [
        "input.sqkir.npz", "fold_constants.sqkir.npz", "quantize.sqkir.npz", "select_format.sqkir.npz",
        "dce.sqkir.npz", "fuse.sqkir.npz"]
    inodes = {p.name: p.stat().st_ino for p in npz}
    assert len(set(inodes.values())) == 2, inodes   # the f32 weights, then the int8 ones
    for f in sorted(d.glob("*.sqkir")):
        h = sqk.load_ir(f)
        assert h.constants.keys() == sqk.load_ir(f).constants.keys()
    assert sqk.load_ir(d / "005_fuse.sqkir").constants.keys() >= {"w1.q", "w2.q"}
