"""Inspection: IR dumps at every level (passes, LLVM IR, assembly), the graph
picture (DOT/SVG/PNG/HTML), and the compile progress line."""
from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import sqk
from sqk.codegen.emit import kernel_names, kernel_section
from sqk.codegen.target import host_target
from sqk.compiler import viz
from sqk.compiler.cli import main
from sqk.compiler.dump import load_model, run_pipeline
from sqk.compiler.models import small_cnn, transformer_mlp
from sqk.compiler.progress import Progress
from sqk.ir.ops import OPS

HAVE_DOT = viz.have_dot()
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz dot not installed (apt-get install graphviz)")


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "mlp.sqkir")
    sqk.save_ir(transformer_mlp(hidden=64, ffn=128), path)
    return path


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


PLAIN = "--pipeline=fold_constants,dce"   # a kernel per op: the tests name them


# --- dumps ----------------------------------------------------------------------------

def test_dump_after_all_numbers_every_level(mlp_path, tmp_path, capsys):
    d = tmp_path / "dumps"
    d.mkdir()
    (d / "009_dce.sqkir").write_text("left by an older compile")
    (d / "001_model.sqkir").write_text("not ours")
    rc, out, err = _run(["compile", mlp_path, "-o", str(tmp_path / "o.sqk"), "--dump-after", "all",
                         "--dump-dir", str(d), "--pipeline", "fold_constants,dce"], capsys)   # a kernel per op
    assert rc == 0, err
    files = sorted(f for f in os.listdir(d) if not f.endswith(".npz"))
    assert files == ["000_input.sqkir", "001_fold_constants.sqkir", "001_model.sqkir",  # the user's stays
                     "002_dce.sqkir", "003_llvm.ll", "004_llvm_opt.ll", "005_asm.s"]
    g = sqk.load_ir(mlp_path)
    assert sqk.load_ir(str(d / "000_input.sqkir")) == g
    assert sqk.load_ir(str(d / "001_fold_constants.sqkir")) == run_pipeline(g, after="fold_constants")
    assert sqk.load_ir(str(d / "002_dce.sqkir")) == run_pipeline(g, pipeline="fold_constants,dce")

    import llvmlite.binding as llvm
    for f in ("003_llvm.ll", "004_llvm_opt.ll"):
        llvm.parse_assembly((d / f).read_text()).verify()
    lowered, opt, asm = ((d / f).read_text() for f in ("003_llvm.ll", "004_llvm_opt.ll", "005_asm.s"))
    assert "alwaysinline" in lowered and '@"k1_matmul.body"(' in lowered and "k1_matmul.body\"(" not in opt
    assert kernel_names(lowered) == kernel_names(opt) and "k1_matmul.body" in kernel_section(lowered, "k1_matmul")
    assert kernel_names(opt) == kernel_names(asm) == [f"k{i}_{op}" for i, op in enumerate(
        ("layernorm", "matmul", "add", "gelu", "matmul", "add", "add"))]


def test_dump_after_named_levels(mlp_path, tmp_path, capsys):
    d = tmp_path / "d"
    rc, _, err = _run(["compile", mlp_path, "-o", str(tmp_path / "o.sqk"), "--quiet",
                       "--dump-after", "dce,asm", "--dump-dir", str(d)], capsys)
    assert rc == 0, err
    assert sorted(f for f in os.listdir(d) if not f.endswith(".npz")) == ["003_dce.sqkir", "007_asm.s"]
    rc, _, err = _run(["compile", mlp_path, "-o", str(tmp_path / "o.sqk"), "--dump-after", "fuse",
                       "--pipeline", "fold_constants,dce"], capsys)
    assert rc == 1 and "fuse" in err and "llvm_opt" in err and "fold_constants" in err


def test_dump_llvm_kernel(mlp_path, capsys):
    rc, out, err = _run(["dump", mlp_path, "--llvm", "--kernel", "k1_matmul", PLAIN], capsys)
    assert rc == 0, err
    defines = re.findall(r"^define .*?@([\w.]+)\(", out, re.M)
    assert defines == ["k1_matmul"]              # the always-inlined body is gone after O3
    assert f"<{host_target().lanes(32)} x float>" in out
    rc, whole, _ = _run(["dump", mlp_path, "--llvm", PLAIN], capsys)
    assert out in whole and len(re.findall(r"^define ", whole, re.M)) == 7


def test_dump_asm_per_target(mlp_path, capsys):
    rc, host, err = _run(["dump", mlp_path, "--asm", "--kernel", "k1_matmul", PLAIN], capsys)
    assert rc == 0, err
    assert re.search(r"^k1_matmul:", host, re.M) and ".size\tk1_matmul" in host
    assert "k4_matmul" not in host
    if "fma" in host_target().enabled_features:
        assert "vfmadd" in host
    rc, rv, err = _run(["dump", mlp_path, "--asm", "--target", "riscv64", "--kernel", "k1_matmul", PLAIN], capsys)
    assert rc == 0, err
    assert re.search(r"\bvset[i]?vli\b", rv) and re.search(r"\bvfmacc\.v[vf]\b", rv)
    rc, scalar, err = _run(["dump", mlp_path, "--asm", "--target", "riscv64-scalar", PLAIN], capsys)
    assert rc == 0, err
    assert "k1_matmul:" in scalar and "fmadd.s" in scalar
    assert re.findall(r"^\s+v[a-z]", scalar, re.M) == []   # RVV mnemonics all start with v


def test_unknown_kernel_lists_kernels(mlp_path, capsys):
    rc, _, err = _run(["dump", mlp_path, "--asm", "--kernel", "k9_conv"], capsys)
    assert rc == 1
    assert err.startswith("sqk: error: no kernel named 'k9_conv'") and "k0_layernorm, k1_fused" in err
    with pytest.raises(LookupError, match="k6_add"):
        kernel_section(sqk.compile(sqk.load_ir(mlp_path), pipeline="fold_constants,dce").llvm_ir, "k1")
    rc, _, err = _run(["dump", mlp_path, "--kernel", "k1_matmul"], capsys)
    assert rc == 1 and "--llvm or --asm" in err


def test_dump_artifact_directory(mlp_path, tmp_path, capsys):
    out = str(tmp_path / "mlp.sqk")
    assert main(["compile", mlp_path, "-o", out, "--quiet"]) == 0
    g, manifest = load_model(out)
    assert manifest["target"]["name"] == "host"
    assert g == run_pipeline(sqk.load_ir(mlp_path))   # constants read back from constants.bin
    rc, from_artifact, err = _run(["dump", out, "--llvm"], capsys)
    assert rc == 0, err
    _, from_model, _ = _run(["dump", mlp_path, "--llvm"], capsys)
    assert from_artifact == from_model
    # a quantized artifact stores its codes packed: it cannot be read back, and says so
    q = str(tmp_path / "q.sqk")
    assert main(["compile", mlp_path, "-o", q, "--quiet", "--quantize", "int8"]) == 0
    rc, _, err = _run(["dump", q, "--asm"], capsys)
    assert rc == 1 and "kernel-specific layout" in err and "IR file" in err


# --- the graph picture ----------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(->)|([{}\[\];,=])|"((?:[^"\\]|\\.)*)"|([A-Za-z_0-9.#]+))')


def parse_dot(text: str):
    """A strict parser for the DOT subset viz writes: returns (nodes: id -> attrs,
    edges: [(a, b)], clusters: [label]).  Any other syntax is an AssertionError."""
    toks, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m and m.end() > pos, f"bad DOT at {text[pos:pos + 40]!r}"
        toks.append(next(g for g in m.groups() if g is not None) if m.group(3) is None else ("str", m.group(3)))
        pos = m.end()
    toks.append(None)
    nodes, edges, clusters, i = {}, [], [], 0

    def word():
        nonlocal i
        t = toks[i]
        assert isinstance(t, (str, tuple)) and t not in ("{", "}", "[", "]", ";", ",", "=", "->"), t
        i += 1
        return t[1] if isinstance(t, tuple) else t

    def take(s):
        nonlocal i
        assert toks[i] == s, f"expected {s!r}, got {toks[i]!r}"
        i += 1

    def attrs():
        nonlocal i
        out = {}
        take("[")
        while toks[i] != "]":
            k = word()
            take("=")
            out[k] = word()
            if toks[i] in (",", ";"):
                i += 1
        take("]")
        return out

    def stmts(cluster_labels):
        nonlocal i
        while toks[i] != "}":
            if toks[i] == "subgraph":
                i += 1
                name = word()
                take("{")
                inner = []
                stmts(inner)
                take("}")
                assert name.startswith("cluster_")
                clusters.append(inner[0] if inner else "")
            elif toks[i] in ("node", "edge", "graph"):
                i += 1
                attrs()
            else:
                a = word()
                if toks[i] == "=":
                    i += 1
                    value = word()
                    if a == "label":
                        cluster_labels.append(value)
                elif toks[i] == "->":
                    ends = [a]
                    while toks[i] == "->":
                        i += 1
                        ends.append(word())
                    edges.extend(zip(ends, ends[1:]))
                    if toks[i] == "[":
                        attrs()
                else:
                    nodes[a] = attrs() if toks[i] == "[" else {}
            if toks[i] == ";":
                i += 1

    take("digraph")
    if toks[i] != "{":
        word()
    take("{")
    stmts([])
    take("}")
    assert toks[i] is None, "text after the graph"
    for a, b in edges:
        assert a in nodes and b in nodes, f"edge {a} -> {b} to an undeclared node"
    return nodes, edges, clusters


def _labels(nodes):
    return [a["label"].replace("\\n", "\n") for a in nodes.values()]


@pytest.mark.parametrize("make", [transformer_mlp, small_cnn])
def test_dot_text_parses_and_describes_the_graph(make):
    g = make()
    nodes, edges, clusters = parse_dot(viz.to_dot(g))
    labels = _labels(nodes)
    ops = [n for n in g.nodes if n.op != "const"]
    consts = [n for n in g.nodes if n.op == "const"]
    assert len(nodes) == len(g.inputs) + len(g.nodes) + len(g.outputs) and not clusters
    # every node's inputs are edges into it, and each output gets one edge
    assert len(edges) == sum(len(n.inputs) for n in g.nodes) + len(g.outputs)
    for n in ops:
        assert any(lab.startswith(f"%{n.output.name} = {n.op}\n") and str(n.output.type) in lab
                   and viz.fmt_bytes(n.output.type.nbytes) in lab for lab in labels), n
    for n in consts:
        lab = next(lab for lab in labels if lab.startswith(f"const @{n.output.name}\n"))
        assert str(n.output.type) in lab and viz.fmt_bytes(n.output.type.nbytes) in lab
    shapes = {a["label"].split("\\n")[0].split(" ")[0]: a.get("shape") for a in nodes.values()}
    assert shapes["input"] == "invhouse" and shapes["output"] == "house" and shapes["const"] == "note"


def test_weights_show_stored_bytes_and_sparse_format():
    g = run_pipeline(transformer_mlp(hidden=64, ffn=128), "fold_constants,quantize{weights=int4,group=32},dce")
    labels = _labels(parse_dot(viz.to_dot(g))[0])
    w1q = next(lab for lab in labels if lab.startswith("const @w1.q\n"))
    assert "i4[64,128]" in w1q
    stored = viz.stored_sizes(g)[next(n.output for n in g.nodes if n.output.name == "w1.q")]
    assert stored <= 64 * 128 // 2 + 64 and viz.fmt_bytes(stored) in w1q   # 4 bits a weight, packed

    b = sqk.GraphBuilder("sparse")
    x = b.input("x", (2, 8))
    w = np.zeros((8, 4), np.float32)
    w[::2] = 1.0
    y = b.matmul(x, b.const(w, name="w"), sparse="nm2:4")
    labels = _labels(parse_dot(viz.to_dot(b.output(y)))[0])
    assert any(lab.startswith("const @w\n") and "sparse nm2:4" in lab for lab in labels)
    assert any("sparse=nm2:4" in lab for lab in labels)   # the op shows its non-default attribute


@pytest.mark.skipif("fused" not in OPS, reason="no fused op in this tree")
def test_fused_body_is_a_cluster(tmp_path):
    body = sqk.GraphBuilder("body")
    p, q = body.input("p", (2, 8)), body.input("q", (8, 8))
    body = body.output(body.relu(body.matmul(p, q)))
    b = sqk.GraphBuilder("outer")
    x = b.input("x", (2, 8))
    g = b.output(b.add(b.fused(x, b.const(np.ones((8, 8), np.float32), name="w"), body=body), x))
    nodes, edges, clusters = parse_dot(viz.to_dot(g))
    assert clusters == ["fused body @body"]
    ids = {a["label"].split("\\n")[0]: k for k, a in nodes.items()}
    assert (ids["input %x"], ids["%p"]) in edges and (ids["const @w"], ids["%q"]) in edges
    assert (ids["%1 = relu"], ids["%0 = fused"]) in edges and (ids["%0 = fused"], ids["%1 = add"]) in edges
    if HAVE_DOT:
        svg = ET.fromstring(viz.render(viz.to_dot(g), "svg"))
        assert any(e.get("class") == "cluster" for e in svg.iter("{http://www.w3.org/2000/svg}g"))
    from sqk.compiler.passes import PASSES
    if "fuse" in PASSES:  # the fuse pass's groups, one cluster each
        g = run_pipeline(transformer_mlp(hidden=64, ffn=128), "fold_constants,fuse,dce")
        fused = [n for n in g.nodes if n.op == "fused"]
        assert fused and len(parse_dot(viz.to_dot(g))[2]) == len(fused)


def _svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    return [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.text]


@needs_dot
@pytest.mark.parametrize("make", [transformer_mlp, small_cnn])
def test_viz_svg_png_html(make, tmp_path, capsys):
    g = make()
    model = str(tmp_path / "m.sqkir")
    sqk.save_ir(g, model)
    svg = str(tmp_path / "g.svg")
    rc, out, err = _run(["viz", model, "-o", svg], capsys)
    assert rc == 0 and "wrote" in out, err
    texts = _svg_texts(svg)
    for n in g.nodes:
        first = f"const @{n.output.name}" if n.op == "const" else f"%{n.output.name} = {n.op}"
        assert first in texts, first
    assert f"input %{g.inputs[0].name}" in texts and any(t.startswith("output 0:") for t in texts)

    png = viz.render(viz.to_dot(g), "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])   # the IHDR chunk comes first
    assert width > 100 and height > 100

    page = str(tmp_path / "g.html")
    assert main(["viz", model, "-o", page]) == 0
    text = open(page).read()
    assert text.startswith("<!doctype html>") and "<svg" in text and "DOT source" in text
    capsys.readouterr()


def test_viz_without_graphviz(monkeypatch, tmp_path, capsys):
    g = small_cnn()
    model = str(tmp_path / "m.sqkir")
    sqk.save_ir(g, model)
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    rc, _, err = _run(["viz", model, "-o", str(tmp_path / "g.svg")], capsys)
    assert rc == 1 and ".dot" in err and "apt-get install graphviz" in err
    assert not os.path.exists(tmp_path / "g.svg")
    assert main(["viz", model, "-o", str(tmp_path / "g.html")]) == 0
    page = open(tmp_path / "g.html").read()
    assert "<svg" not in page and "was not found" in page and "digraph" in page
    assert main(["viz", model, "-o", str(tmp_path / "g.dot")]) == 0
    parse_dot(open(tmp_path / "g.dot").read())
    rc, _, err = _run(["viz", model, "-o", str(tmp_path / "g.jpeg2000")], capsys)
    assert rc == 1 and "unknown picture kind" in err


def test_viz_after_pass(capsys, tmp_path):
    b = sqk.GraphBuilder("fold")
    x = b.input("x", (4,))
    two = b.neg(b.neg(b.const(np.float32(2.0))))
    model = str(tmp_path / "m.sqkir")
    sqk.save_ir(b.output(b.mul(x, two)), model)
    assert main(["viz", model, "-o", str(tmp_path / "a.dot")]) == 0
    assert main(["viz", model, "-o", str(tmp_path / "b.dot"), "--after", "dce"]) == 0
    before = _labels(parse_dot(open(tmp_path / "a.dot").read())[0])
    after = _labels(parse_dot(open(tmp_path / "b.dot").read())[0])
    assert sum("= neg" in lab for lab in before) == 2 and not any("= neg" in lab for lab in after)


# --- progress -------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: \\r returns to column 0, \\n starts a line."""
    lines, col = [[]], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            line[col:col + 1] = [ch]
            col += 1
    return ["".join(line).rstrip() for line in lines]


def chain(n: int):
    b = sqk.GraphBuilder("chain")
    x = b.input("x", (2, 16))
    y = x
    for _ in range(n):
        y = b.tanh(b.add(y, x))
    return b.output(y)


def test_progress_on_a_terminal(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(Progress, "INTERVAL", 0.0)   # draw every update
    log = []
    m = sqk.compile(chain(20), log=lambda line: (log.append(line), tty.write(line + "\n")),
                    pipeline="fold_constants,dce")   # 40 kernels (fuse would make one)
    text = tty.getvalue()
    assert "\rsqk [" in text and "pass fold_constants 0/2 passes" in text
    assert "codegen 40/40 kernels" in text and "\rsqk [" + "#" * Progress.WIDTH + "] codegen 40/40" in text
    assert "LLVM O3 + object code" in text and "] link" in text
    assert screen(text) == log + [""]     # the bar is erased and never garbles a log line
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(m(x=x), sqk.reference(chain(20), x=x), rtol=1e-5, atol=1e-6)


def test_progress_quiet_off_a_terminal_or_when_asked(monkeypatch, mlp_path, tmp_path):
    g = chain(3)
    for stream, flag, drawn in ((io.StringIO(), None, False), (FakeTTY(), False, False),
                                (io.StringIO(), True, True)):
        monkeypatch.setattr(sys, "stderr", stream)
        sqk.compile(g, progress=flag)
        assert (stream.getvalue() != "") == drawn, (flag, stream.getvalue())
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["compile", mlp_path, "-o", str(tmp_path / "o.sqk"), "--quiet"]) == 0
    assert tty.getvalue() == ""


def test_cli_subprocess_has_no_progress_on_a_pipe(mlp_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sqk.compiler.cli", "compile", mlp_path, "-o",
                        str(tmp_path / "o.sqk"), "--dump-after", "asm", "--dump-dir", str(tmp_path / "d")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "wrote" in r.stdout and "\r" not in r.stdout
    assert os.listdir(tmp_path / "d") == ["007_asm.s"]


def test_viz_sizes_follow_the_target():
    """Packed sizes are the target's: int4 [64, 70] weights take 2 host column blocks of
    64 x 32 bytes, and on riscv64 64 rows of 35 bytes (two columns a byte)."""
    from sqk.codegen.target import get_target

    rng = np.random.default_rng(0)
    b = sqk.GraphBuilder("q")
    y = b.matmul_q(b.input("x", (1, 64)), b.const(rng.integers(-8, 8, (64, 70)).astype(np.int8), "i4"),
                   b.const(np.ones((2, 70), np.float32)), group=32)
    g = b.output(y)
    w = next(n.output for n in g.nodes if n.op == "const" and n.output.dtype.name == "i4")
    assert viz.stored_sizes(g)[w] == 2 * 64 * 32
    assert viz.stored_sizes(g, get_target("riscv64"))[w] == 64 * 35
