"""LLM artifacts (llm/artifact.py): ``sqk compile MODEL_DIR -o model.sqk`` on a tiny
Hugging Face model with a tokenizer, loaded in a process where llvmlite cannot be
imported, generating the same ids and text as the model compiled in place; the
constants stored once; ``sqk generate`` on it; every refusal (stale, partial,
missing tokenizer, another target, options fixed at compile time)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import sqk
from sqk.compiler.cli import main
from sqk.runtime.module import ArtifactError

from test_llm_hf import text_dir  # noqa: F401  (a fixture: tiny Llama + word-level tokenizer.json)

PROMPT = "w5 w17 w42 w7 w9 w11"        # 7 ids with BOS: a chunk of 4, then 3 padded to 4 (prefill_chunk=4)


@pytest.fixture(scope="module")
def art(text_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("art") / "model.sqk"
    assert main(["compile", str(text_dir), "-o", str(out), "--max-seq", "32", "--prefill-chunk", "4",
                 "--quiet"]) == 0
    return out


def test_artifact_layout(art):
    index = json.loads((art / "llm.json").read_text())
    assert [m["tokens"] for m in index["modules"]] == [1, 4]
    assert sorted(os.listdir(art)) == ["constants.bin", "decode", "llm.json", "prefill4", "tokenizer"]
    assert len(index["constants"]) == 1          # one weights file for both modules
    for m in index["modules"]:
        assert sorted(os.listdir(art / m["dir"])) == ["manifest.json", "model.so"]
    assert index["config"]["max_seq"] == 32 and index["prefill_chunk"] == 4


def test_artifact_loads_without_llvmlite(art, text_dir):  # noqa: F811
    code = f"""
import json, sys, time
sys.modules["llvmlite"] = None          # any import of llvmlite now fails
t0 = time.perf_counter()
import sqk
dec = sqk.llm.load({str(art)!r})
t = time.perf_counter() - t0
ids = dec.generate({PROMPT!r}, 10, stop=[])
dec.reset()
sampled = dec.generate({PROMPT!r}, 10, temperature=0.8, top_k=20, seed=7, stop=[])
print(json.dumps({{"ids": ids, "sampled": sampled, "text": dec.tokenizer.decode(ids), "seconds": t,
                  "compiler": [m for m in sys.modules if m.startswith(("sqk.codegen", "sqk.compiler"))]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["compiler"] == []
    dec = sqk.llm.load(text_dir, max_seq=32, prefill_chunk=4)
    want = dec.generate(PROMPT, 10, stop=[])
    dec.reset()
    assert got["ids"] == want and got["text"] == dec.tokenizer.decode(want)
    assert got["sampled"] == dec.generate(PROMPT, 10, temperature=0.8, top_k=20, seed=7, stop=[])
    assert got["seconds"] < 10      # about a second on an idle machine; the suite shares its cores


def test_cli_generate_and_info_on_artifact(art, capsys):
    assert main(["generate", str(art), "--prompt", "w5 w17 w42", "-n", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("w5 w17 w42") and "tokens/s" in err
    assert main(["info", str(art)]) == 0
    out = capsys.readouterr().out
    assert "llama: 2 layers" in out and "module     prefill4: 4 token(s)" in out and "tokenizer  yes" in out


def test_quantized_artifact(text_dir, tmp_path):  # noqa: F811
    out = tmp_path / "q.sqk"
    assert main(["compile", str(text_dir), "-o", str(out), "--max-seq", "16", "--prefill-chunk", "4",
                 "--quantize", "int8", "--quiet"]) == 0
    manifest = json.loads((out / "decode" / "manifest.json").read_text())
    assert "quantize{weights=int8}" in manifest["pipeline"]
    dec = sqk.llm.load(text_dir, max_seq=16, prefill_chunk=4, quantize="int8")
    assert sqk.llm.load(out).generate(PROMPT, 6, stop=[]) == dec.generate(PROMPT, 6, stop=[])


def copy(art, tmp_path):
    dst = tmp_path / "copy.sqk"
    shutil.copytree(art, dst)
    return dst


def refused(path, match, **kw):
    with pytest.raises(ArtifactError, match=match):
        sqk.llm.load(path, **kw)


def test_artifact_refusals(art, tmp_path):
    refused(art, "compiled with target='host', not 'riscv64'", target="riscv64")
    refused(art, "compiled with max_seq=32, not 64", max_seq=64)
    refused(art, "compiled with kv_dtype='f32', not 'f16'", kv_dtype="f16")
    refused(art, "compiled already: quantize cannot apply", quantize="int8")

    a = copy(art, tmp_path)
    (a / "tokenizer" / "tokenizer.json").unlink()
    refused(a, r"tokenizer file tokenizer/tokenizer.json is missing")

    a = copy(art, tmp_path / "1")
    (a / "constants.bin").unlink()
    refused(a, "constants file constants.bin is missing")

    a = copy(art, tmp_path / "2")
    with open(a / "constants.bin", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    refused(a, "content hash does not match llm.json")

    a = copy(art, tmp_path / "3")      # a module of another compile put in its place
    shutil.rmtree(a / "prefill4")
    shutil.copytree(a / "decode", a / "prefill4")
    refused(a, "prefill4: its manifest is not the one llm.json names")

    a = copy(art, tmp_path / "4")
    shutil.rmtree(a / "prefill4")
    refused(a, "module prefill4 is missing")

    a = copy(art, tmp_path / "5")
    (a / "llm.json").unlink()
    refused(a, "no llm.json")

    a = copy(art, tmp_path / "6")
    index = json.loads((a / "llm.json").read_text())
    index["format_version"] = 99
    (a / "llm.json").write_text(json.dumps(index))
    refused(a, "format version 99")

    for field, bad in (("dir", "../x"), ("dir", "..")):
        a = copy(art, tmp_path / f"7{bad}".replace("/", "_"))
        index = json.loads((a / "llm.json").read_text())
        index["modules"][0][field] = bad
        (a / "llm.json").write_text(json.dumps(index))
        refused(a, "is not a file name inside the artifact")
    a = copy(art, tmp_path / "8")
    (a / "constants.bin").unlink()
    os.symlink(art / "constants.bin", a / "constants.bin")         # a file elsewhere, through a symlink
    refused(a, "outside the artifact directory")

    assert main(["compile", str(art), "-o", str(tmp_path / "x.sqk")]) == 1   # an artifact is no source


def test_compile_options_for_llms_only(tmp_path, capsys):
    ir = tmp_path / "m.sqkir"
    ir.write_text("graph @g(%x: f32[2]) -> f32[2] {\n  %0 = relu(%x) : f32[2]\n  return %0\n}\n")
    assert main(["compile", str(ir), "-o", str(tmp_path / "o.sqk"), "--max-seq", "8"]) == 1
    assert "--max-seq apply to LLMs" in capsys.readouterr().err
