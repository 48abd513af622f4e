"""The layering rules (DESIGN.md), read from the source with ast (nothing is
imported), and the contract between the op families of ir/ops.py and codegen:

- ir imports nothing of compiler, codegen, runtime, llm or tools;
- runtime imports nothing of compiler, codegen or tools (an artifact runs with numpy + cffi);
- compiler/passes import nothing of codegen or tools (passes are target-independent);
- tools (models, demo, bench, probe, viz) sit on top: only the CLI imports them;
- codegen does not import the compile driver (nor any compiler module: importing one
  runs compiler/__init__.py, which imports the driver).

Imports inside functions count: a lazy import is still a dependency."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (files, forbidden targets, why): targets are dotted names under sqk ("codegen" covers its modules)
RULES = [
    ("ir", ("compiler", "codegen", "runtime", "llm", "tools"), "ir is the bottom layer"),
    ("runtime", ("compiler", "codegen", "tools"), "a deployed artifact runs with numpy + cffi only"),
    ("compiler/passes", ("codegen", "tools"), "passes are target-independent: fusion reads ir.fusion and op KINDs"),
    ("codegen", ("tools",), "codegen lowers graphs; the tools sit on top"),
    # any sqk.compiler module runs compiler/__init__.py, which imports the driver: so none at all
    ("codegen", ("compiler",), "codegen lowers graphs; the driver calls it, not the reverse"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["sqk"] + parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from . import x" imports the module x
            out += [(node.lineno, f"{mod}.{a.name}" if not node.module else mod) for a in node.names]
    return out


def violations(files: str, forbidden) -> list[str]:
    bad = []
    for path in sorted((ROOT / files).rglob("*.py")):
        for line, mod in imports(path):
            for f in forbidden:
                target = "sqk." + f
                if mod == target or mod.startswith(target + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("files,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_import_rules(files, forbidden, why):
    assert (ROOT / files).is_dir()
    bad = violations(files, forbidden)
    assert not bad, f"{files} must not import {', '.join(forbidden)} ({why}):\n" + "\n".join(bad)


def test_only_the_cli_imports_tools():
    """compiler/ does not lean on tools/ (the old paths sqk.compiler.viz, ... are aliases made by
    compiler/__init__.py with importlib, not imports); only the command line runs them."""
    bad = [b for b in violations("compiler", ("tools",)) if not b.startswith("compiler/cli.py:")]
    assert not bad, "\n".join(bad)


def test_rule_checker_sees_violations(tmp_path, monkeypatch):
    """The checker itself: relative, absolute and function-level imports are found."""
    pkg = tmp_path / "compiler" / "passes"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from ...codegen.fused import body_kind\n")
    (pkg / "bad2.py").write_text("import sqk.codegen.emit\nfrom sqk.ir import graph\n")
    (pkg / "ok.py").write_text("from ...ir.fusion import body_kind\nfrom . import fuse\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("compiler/passes", ("codegen",)) == [
        "compiler/passes/bad.py:2 imports sqk.codegen.fused", "compiler/passes/bad2.py:1 imports sqk.codegen.emit"]


# --- op families and codegen -------------------------------------------------------------------

def test_every_op_has_a_kind():
    from sqk.ir.ops import KINDS, OPS

    assert all(op.kind in KINDS for op in OPS.values())


def test_elementwise_ops_have_per_element_code():
    """Every op of KIND "elementwise" composes in a fused map or epilogue: codegen has its
    per-element function for every dtype the op takes (and every cast target)."""
    from sqk.codegen.fused import scalar_fn
    from sqk.ir import dtypes as dt
    from sqk.ir.graph import IRError, Node, TensorType, Value
    from sqk.ir.ops import OPS

    checked = set()
    for op in (o for o in OPS.values() if o.kind == "elementwise"):
        for d in dt.IO:
            for to in dt.IO if op.name == "cast" else [None]:
                attrs = op.normalize_attrs({"to": to} if to else {})
                ins = [TensorType(d, (4,))] * len(op.inputs)
                try:
                    outs = op.infer(*ins, **attrs)
                except IRError:
                    continue  # the op does not take this dtype
                n = Node(op.name, tuple(Value(f"i{i}", t) for i, t in enumerate(ins)),
                         tuple(Value(f"o{i}", t) for i, t in enumerate(outs)), attrs)
                assert scalar_fn(n) is not None, (op.name, d, to)
                checked.add(op.name)
    assert checked == {o.name for o in OPS.values() if o.kind == "elementwise"}
    x = Value("x", TensorType(dt.f32, (4,)))
    assert scalar_fn(Node("softmax", (x,), (Value("y", x.type),), {"axis": -1})) is None


def test_moved_modules_keep_their_old_paths():
    """models, demo, bench, probe and viz moved from compiler/ to tools/ (the LLM driver to llm/): the old import paths
    give the same module objects, also as attributes after a plain `import sqk` (in a fresh
    interpreter, so nothing was imported before)."""
    import subprocess

    code = ("import sqk, sqk.tools\n"
            "assert sqk.compiler.viz is sqk.tools.viz and sqk.compiler.viz.__spec__.name == 'sqk.tools.viz'\n"
            "from sqk.compiler.probe import read_bandwidth\n"
            "from sqk.compiler import models\n"
            "import sqk.compiler.bench as b, sqk.compiler.demo as d\n"
            "assert read_bandwidth is sqk.tools.probe.read_bandwidth and models is sqk.tools.models\n"
            "assert b is sqk.tools.bench and d is sqk.tools.demo\n"
            "from sqk.compiler.llm import Decoder, build_decoder\n"
            "import sqk.llm.decoder\n"
            "assert sqk.compiler.llm is sqk.llm.decoder and Decoder is sqk.llm.decoder.Decoder\n"
            "assert {'viz', 'models', 'llm', 'driver'} <= set(dir(sqk.compiler))\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr
