"""Golden tests: what the passes make of fixed graphs, and the code generated for
every kernel family on every target, so a refactor that changes either fails
loudly instead of slipping through the numeric tests' tolerances.

- tests/golden/passes/NAME.before.sqkir (a first line ``# pipeline: SPEC``)
  and NAME.expected.sqkir: the pipeline run on the before graph must give
  the expected graph, compared structurally (renamed values do not matter).
  Add a case by writing a before file; the update below writes its
  expected file.
- tests/golden/llvm.json: per kernel family (tests/golden_cases.py) and
  target (host with AVX2 and with AVX-512 described in full, never this
  machine's CPU; riscv64; riscv64-scalar), the SHA-256 of the LLVM IR as
  lowered (before LLVM's optimizer), which depends on sqk's code only (and
  on llvmlite's printer: the file records the llvmlite version it was made
  with, and another version skips these tests, saying so).

After an intended change, regenerate both and review the diff:

    SQK_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

(``SQK_GOLDEN_DUMP=DIR`` also writes each family's LLVM IR to DIR, to diff two
versions of the code generator.)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from golden_cases import FAMILIES, TARGETS
from sqk.compiler.dump import lowered_module, run_pipeline
from sqk.ir import load_ir, parse_ir

GOLDEN = Path(__file__).parent / "golden"
PASS_DIR = GOLDEN / "passes"
LLVM_FILE = GOLDEN / "llvm.json"
UPDATE = os.environ.get("SQK_UPDATE_GOLDEN") == "1"
HINT = "if the change is intended: SQK_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py, and review the diff"


def pass_cases():
    return sorted(p.name.removesuffix(".before.sqkir") for p in PASS_DIR.glob("*.before.sqkir"))


def read_pipeline(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# pipeline:"), f"{path.name}: the first line must be '# pipeline: SPEC'"
    return first.removeprefix("# pipeline:").strip()


def test_pass_cases_exist():
    assert len(pass_cases()) >= 10, "tests/golden/passes lost its cases"


@pytest.mark.parametrize("case", pass_cases())
def test_pass_golden(case):
    before = PASS_DIR / f"{case}.before.sqkir"
    expected = PASS_DIR / f"{case}.expected.sqkir"
    spec = read_pipeline(before)
    got = run_pipeline(load_ir(before), spec)
    text = f"# {case}.before.sqkir after {spec} (written by SQK_UPDATE_GOLDEN=1)\n" + got.to_text(None)
    if UPDATE:
        expected.write_text(text)
    assert expected.exists(), f"{expected.name} is missing; {HINT}"
    want = parse_ir(expected.read_text())
    assert got == want, f"{case}: {spec} gives\n{got.to_text(None)}\nexpected\n{want.to_text(None)}\n{HINT}"
    # the golden text is canonical: it prints back as written
    assert want.to_text(None) == expected.read_text().split("\n", 1)[1]


def llvm_hash(family: str, target: str) -> str:
    build, spec = FAMILIES[family]
    text = str(lowered_module(run_pipeline(build(), spec), TARGETS[target]))
    if os.environ.get("SQK_GOLDEN_DUMP"):
        d = Path(os.environ["SQK_GOLDEN_DUMP"])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{family}.{target}.ll").write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_hashes() -> dict:
    return json.loads(LLVM_FILE.read_text()) if LLVM_FILE.exists() else {}


def _families(hashes: dict) -> dict:
    return {k: v for k, v in hashes.items() if not k.startswith("_")}


def _same_llvmlite(hashes: dict) -> None:
    import llvmlite

    made = hashes.get("_llvmlite")
    if made and made != llvmlite.__version__ and not UPDATE:
        pytest.skip(f"the LLVM IR goldens were made with llvmlite {made}, this is {llvmlite.__version__} "
                    f"(its printer may differ); regenerate them to compare: SQK_UPDATE_GOLDEN=1")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llvm_golden(family):
    import llvmlite

    _same_llvmlite(_load_hashes())
    got = {t: llvm_hash(family, t) for t in TARGETS}
    if UPDATE:  # one family per test: read, update and rewrite (tests may run in any order)
        hashes = _load_hashes()
        hashes[family] = got
        hashes["_llvmlite"] = llvmlite.__version__
        LLVM_FILE.write_text(json.dumps(dict(sorted(hashes.items())), indent=1) + "\n")
    want = _load_hashes().get(family)
    assert want is not None, f"no golden hashes for {family}; {HINT}"
    changed = [t for t in TARGETS if want.get(t) != got[t]]
    assert not changed, f"{family}: the lowered LLVM IR changed on {', '.join(changed)}; {HINT}"


def test_llvm_golden_complete():
    """Every family has hashes and no stale family lingers (a renamed case would)."""
    assert set(_families(_load_hashes())) == set(FAMILIES), HINT
