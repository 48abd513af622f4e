"""The sqk command line: compile, dump, run, info, errors."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import sqk
from sqk.compiler.cli import main


@pytest.fixture()
def model(tmp_path):
    b = sqk.GraphBuilder("cli")
    x = b.input("x", (3, 40))
    w = b.const(np.arange(40, dtype=np.float32) / 40, name="w")
    two = b.const(np.float32(2.0))
    y = b.tanh(b.mul(b.add(x, w), b.neg(b.neg(two))))
    g = b.output(y)
    path = str(tmp_path / "cli.sqkir")
    sqk.save_ir(g, path)
    return g, path


def test_compile_run_info(model, tmp_path, capsys):
    g, path = model
    out = str(tmp_path / "out.sqk")
    assert main(["compile", path, "-o", out, "--pipeline", "fold_constants,dce,dce", "--dump-after", "all",
                 "--dump-dir", str(tmp_path / "dumps")]) == 0
    log = capsys.readouterr().out.splitlines()
    assert "fold_constants" in log[0] and "(unchanged)" not in log[0]
    assert "dce" in log[2] and "(unchanged)" in log[2] and "wrote" in log[-1]
    assert sorted(f for f in os.listdir(tmp_path / "dumps") if f.endswith(".sqkir")) == ["000_input.sqkir", "001_fold_constants.sqkir", "002_dce.sqkir",
                                                      "003_dce.sqkir"]
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", out, "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "res")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "res" / "0.npy") if os.path.exists(tmp_path / "res" / "0.npy")
                               else np.load(tmp_path / "res" / f"{g.outputs[0].name}.npy"),
                               sqk.reference(g, x=x), rtol=2e-6)
    capsys.readouterr()
    assert main(["info", out]) == 0
    info = capsys.readouterr().out
    assert "input      x: f32[3, 40]" in info and "arena" in info and "host" in info


def test_dump_after(model, capsys):
    g, path = model
    assert main(["dump", path]) == 0
    assert capsys.readouterr().out == g.to_text()
    assert main(["dump", path, "--after", "fold_constants"]) == 0
    folded = capsys.readouterr().out
    assert "neg" not in folded and "const [2.0]" in folded
    assert main(["dump", path, "--after", "quantize"]) == 1
    assert "not in the pipeline" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["compile", "/nonexistent.sqkir", "-o", "x.sqk"], "No such file"),
    (["info", "/nonexistent.sqk"], "not an artifact directory"),
    (["compile", "MODEL", "-o", "OUT", "--pipeline", "fold_constants,bogus"], "unknown pass 'bogus'"),
    (["compile", "MODEL", "-o", "OUT", "--target", "sparc"], "unknown target 'sparc'"),
])
def test_errors_are_one_line(model, tmp_path, argv, message):
    argv = [a.replace("MODEL", model[1]).replace("OUT", str(tmp_path / "o.sqk")) for a in argv]
    r = subprocess.run([sys.executable, "-m", "sqk.compiler.cli", *argv], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("sqk: error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "o.sqk")


def test_parse_error_has_line_and_column(tmp_path):
    p = tmp_path / "bad.sqkir"
    p.write_text("graph @g(%x: f32[2]) -> f32[2] {\n  %0 = frobnicate(%x) : f32[2]\n  return %0\n}\n")
    r = subprocess.run([sys.executable, "-m", "sqk.compiler.cli", "compile", str(p), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "line 2, column 8: unknown op 'frobnicate'" in r.stderr, r.stderr


def test_demo(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "transformer_block" in out and "small_cnn" in out and "outputs match the reference" in out
    assert "fused IR of transformer_block" in out and "= fused(" in out and "body=graph @" in out
    assert "per-kernel profile" in out and "k1_fused" in out and "arena:" in out
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 5 and line.startswith(("f32 dense", "int8", "int4", "2:4")):
            rows[" ".join(parts[:-5])] = float(parts[-4])       # label -> cosine
    assert set(rows) == {"f32 dense", "int8 per-channel", "int4 g32", "int4 g32 + int8 act", "2:4 f32",
                         "2:4 + int8", "2:4 + int8, nm2:4"}, rows
    assert abs(rows["2:4 + int8, nm2:4"] - rows["2:4 + int8"]) < 1e-5, rows   # same weights, either format
    assert rows["f32 dense"] > 0.99999 and rows["int8 per-channel"] >= 0.999 and rows["int4 g32"] >= 0.99, rows
    # magnitude 2:4 on random (untrained) weights loses much more than on trained ones: bounded, not tiny
    assert 0.85 <= rows["2:4 f32"] < 0.99 and abs(rows["2:4 + int8"] - rows["2:4 f32"]) < 0.01, rows
    assert "accuracy report of 2:4 + int8" in out and "nm2:4" in out