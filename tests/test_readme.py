"""Every code block of README.md, run or checked, so the README cannot drift from the code.

Blocks run in order of appearance in one temporary directory:
- ```python blocks run in one shared namespace (a later block uses the `g` of an earlier one);
- ```sh blocks run with bash (`set -euo pipefail`), with `python` and `sqk` of this checkout;
- blocks without a language are checked by what they hold: a graph in the IR text parses,
  IR fragment lines name real ops and attributes, a pass's option grammar names its real
  options, a `sqk ...` synopsis names real subcommands and flags, a single `sqk` command
  line runs, and the layout block names real folders and every pass.

A block may be preceded by directives in HTML comments (invisible when rendered):
    <!-- readme-test: setup CODE -->        python run first (data the block takes as given)
    <!-- readme-test: replace OLD => NEW --> run the block with OLD replaced (e.g. smaller sizes)
    <!-- readme-test: skip REASON -->       not run, with the reason shown
A block that needs the RISC-V tools or Graphviz skips, saying so, when they are missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```[ \t]*$", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(setup|replace|skip)\s+(.*?)\s*-->", re.S)


class Block:
    def __init__(self, index, line, lang, text, directives):
        self.index, self.line, self.lang, self.text, self.directives = index, line, lang, text, directives

    @property
    def id(self):
        return f"{self.index:02d}-L{self.line}-{self.lang or 'text'}"

    def get(self, kind):
        return [arg for k, arg in self.directives if k == kind]


def blocks() -> list[Block]:
    text = README.read_text()
    out = []
    for i, m in enumerate(_FENCE.finditer(text)):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).splitlines()) + "\n"
        # directives: the HTML comments right above the fence (blank lines between them allowed)
        above = text[:m.start()].rstrip()
        directives = []
        while above.endswith("-->"):
            start = above.rfind("<!--")
            d = _DIRECTIVE.fullmatch(above[start:].strip())
            if d is None:
                break
            directives.insert(0, (d.group(1), d.group(2)))
            above = above[:start].rstrip()
        out.append(Block(i, text[:m.start()].count("\n") + 1, m.group(2), body, directives))
    return out


BLOCKS = blocks()


def test_readme_has_blocks():
    assert len(BLOCKS) >= 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory and one Python namespace for the whole README, in order."""
    d = tmp_path_factory.mktemp("readme")
    return {"dir": d, "ns": {"__name__": "readme"}}


def _apply_replacements(block: Block) -> str:
    text = block.text
    for arg in block.get("replace"):
        old, sep, new = arg.partition("=>")
        old, new = old.strip().strip('"'), new.strip().strip('"')
        assert sep and old in text, f"README line {block.line}: replace directive {old!r} not found in the block"
        text = text.replace(old, new)
    return text


def _needs(block: Block | None, text: str) -> None:
    """Skip, naming what is missing, when the block needs qemu or Graphviz."""
    if "riscv64" in text and ("target='riscv64'" in text or 'target="riscv64"' in text or "--target riscv64" in text):
        from conftest import require_riscv

        require_riscv()
    if re.search(r"\.(svg|png|pdf)\b", text) and "viz" in text and shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz)")


# A board for the "Deploy to a RISC-V board" block: `scp` copies into ./board, `ssh board CMD`
# runs CMD there, and the runner it finds runs under qemu-user.
_BOARD = r'''
mkdir -p board
scp() {
  local recurse=; [ "$1" = -r ] && { recurse=-r; shift; }
  local src=$1 dst=board/${2#*:}
  cp $recurse "$src" "$dst"
  local copied=$dst; [ -d "$dst" ] && copied=$dst/$(basename "$src")
  if [ -f "$copied/runner" ] && [ ! -f "$copied/runner.rv64" ]; then
    mv "$copied/runner" "$copied/runner.rv64"
    printf '#!/bin/sh\nexec qemu-riscv64 -cpu rv64,v=true,vext_spec=v1.0,vlen=256 "$(dirname "$0")/runner.rv64" "$@"\n' \
      > "$copied/runner"
    chmod +x "$copied/runner"
  fi
}
ssh() { local host=$1; shift; (cd board && bash -c "$*"); }
'''


def _run_sh(text: str, cwd: Path) -> None:
    bindir = cwd / ".bin"
    bindir.mkdir(exist_ok=True)
    for name, target in (("python", sys.executable),):
        link = bindir / name
        if not link.exists():
            link.symlink_to(target)
    sqk = bindir / "sqk"
    sqk.write_text(f"#!/bin/sh\nexec {sys.executable} -m sqk.compiler.cli \"$@\"\n")
    sqk.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    script = "set -euo pipefail\n" + _BOARD + text
    r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, workdir, monkeypatch):
    for reason in block.get("skip"):
        pytest.skip(f"README line {block.line}: {reason}")
    text = _apply_replacements(block)
    if block.lang:   # blocks without a language are checked, not run
        _needs(block, text)
    monkeypatch.chdir(workdir["dir"])
    ns = workdir["ns"]
    for code in block.get("setup"):
        exec(compile(code, f"README.md:{block.line} setup", "exec"), ns)
    if block.lang == "python":
        exec(compile(text, f"README.md:{block.line}", "exec"), ns)
    elif block.lang == "sh":
        _run_sh(text, workdir["dir"])
    elif block.lang == "":
        check_text_block(text, block.line, workdir["dir"])
    else:
        pytest.fail(f"README line {block.line}: no runner for ```{block.lang} blocks")


# --- blocks without a language ---------------------------------------------------------------------

def check_text_block(text: str, line: int, cwd: Path) -> None:
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith("graph @"):
        return _check_graph(text)
    if re.match(r"%[\w.]+ = \w+\(", first):
        return _check_fragment(text)
    if re.match(r"\w+\{\w+=", first):
        return _check_pass_grammar(text)
    if first.startswith("sqk ") and "[" in text:
        return _check_synopsis(text)
    if first.startswith("sqk ") and text.strip().count("\n") == 0:
        _needs(None, text)
        return _run_sh(text, cwd)
    if re.match(r"[a-z]+/ +\S", first):
        return _check_layout(text)
    pytest.fail(f"README line {line}: a block without a language that no check recognizes; give it a language "
                f"(```python, ```sh) or a <!-- readme-test: skip REASON --> directive")


def _check_graph(text: str) -> None:
    import numpy as np

    from sqk.ir.dtypes import dtype
    from sqk.ir.text import parse_ir

    consts = {name: np.zeros([int(d) for d in dims.split(",") if d], dtype(dt).np_dtype)
              for name, dt, dims in re.findall(r"const @([\w.]+) : (\w+)\[([\d,]*)\]", text)}
    g = parse_ir(text, consts)
    assert g.nodes


def _check_fragment(text: str) -> None:
    from sqk.ir.ops import OPS

    for line in text.strip().splitlines():
        m = re.match(r"\s*%[\w.]+ = (\w+)\(.*?\)(?: \{(.*)\})? : \w+\[[\d,]*\]$", line)
        assert m, f"not an IR node line: {line!r}"
        op, attrs = OPS[m.group(1)], m.group(2) or ""
        for name, value in re.findall(r"(\w+)=(\"[^\"]*\"|[^,]+)", attrs):
            assert name in op.attrs, f"{op.name} has no attribute {name}"
            op.attrs[name].normalize(name, value.strip('"') if value.startswith('"') else int(value))


def _check_pass_grammar(text: str) -> None:
    import dataclasses

    from sqk.compiler.passes import PASSES

    name, opts = re.fullmatch(r"(\w+)\{(.*)\}", " ".join(text.split()), re.S).groups()
    fields = {f.name for f in dataclasses.fields(PASSES[name])}
    given = {item.split("=")[0].strip() for item in opts.split(",")}
    assert given == fields, (f"{name}: the README lists options {sorted(given - fields)} the pass does not have "
                             f"and misses {sorted(fields - given)}")


def _check_synopsis(text: str) -> None:
    from sqk.compiler.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "cmd").choices
    commands = re.split(r"\n(?=sqk )", text.strip())
    for cmd in commands:
        words = cmd.split()
        if words[1].startswith("--"):
            assert any(words[1] in a.option_strings for a in _parser()._actions), words[1]
            continue
        assert words[1] in sub, f"sqk {words[1]}: no such subcommand"
        flags = {s for a in sub[words[1]]._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", cmd):
            assert flag in flags, f"sqk {words[1]}: no flag {flag}"


def _check_layout(text: str) -> None:
    from sqk.compiler.passes import PASSES

    for folder in re.findall(r"^([a-z]+)/ ", text, re.M):
        assert (ROOT / folder).is_dir(), f"the layout names {folder}/, which does not exist"
    passes = re.search(r"passes/ \(([^)]*)\)", text, re.S)
    assert passes, "the layout lists compiler/passes/"
    assert sorted(p.strip() for p in passes.group(1).replace("\n", " ").split(",")) == sorted(PASSES)
    for name in re.findall(r"\b([a-z_]+\.py)\b", text):
        assert list(ROOT.rglob(name)), f"the layout names {name}, which does not exist"
