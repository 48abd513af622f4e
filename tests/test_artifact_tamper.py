"""Tampered artifacts: every field of the manifest and every file, edited the way a
fuzzer or an attacker would (with the hashes recomputed, as an attacker would),
must load and run correctly or be refused with an ArtifactError that names the
problem -- never a signal, never another exception type, never a silent wrong
result.  Cases run in a child process (``_run_cases``), so a crash is a test
failure that names the case instead of a dead pytest.  The default run samples
the cases; ``-m slow`` runs all of them."""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sqk
from sqk.runtime import abi
from sqk.runtime.module import ArtifactError, SqkRuntimeError, clean_stale_saves
from conftest import require_riscv
from harness import compile_for

HERE = os.path.dirname(os.path.abspath(__file__))


def mlp():
    rng = np.random.default_rng(1)
    b = sqk.GraphBuilder("mlp")
    x = b.input("x", (2, 24))
    w = b.const(rng.standard_normal((24, 16)).astype(np.float32), name="w")
    bias = b.const(rng.standard_normal(40).astype(np.float32), name="bias")
    return b.output(b.relu(b.matmul(x, w)), b.tanh(bias))


def attention():
    b = sqk.GraphBuilder("attn")
    hq, hkv, s, d = 4, 2, 6, 8
    ins = [b.input("q", (hq, d)), b.input("kn", (hkv, d)), b.input("vn", (hkv, d)),
           b.input("kc", (hkv, s, d)), b.input("vc", (hkv, s, d)), b.input("pos", (1,), "i64")]
    return b.output(*b.attention_decode(*ins))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A quantized MLP (so it has a report.json) and a model with state."""
    root = tmp_path_factory.mktemp("tamper")
    sqk.compile(mlp(), quantize="int8").save(str(root / "mlp.sqk"))
    sqk.compile(attention(), state=["kc", "vc"]).save(str(root / "attn.sqk"))
    return {"mlp": str(root / "mlp.sqk"), "attn": str(root / "attn.sqk")}


# --- the child process: apply each case to a fresh copy, load, call ----------------------

def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    if value == "<delete>":
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def _apply(case: dict, path: str, outside: str) -> None:
    mp = os.path.join(path, "manifest.json")
    with open(mp) as f:
        man = json.load(f)
    if "field" in case:
        _set(man, case["field"], case["value"])
    elif "file" in case:
        fp = os.path.join(path, case["file"])
        how = case["how"]
        if how == "delete":
            os.unlink(fp)
        elif how == "truncate":
            with open(fp, "r+b") as f:
                f.truncate(case["at"])
        elif how == "flip":
            with open(fp, "r+b") as f:
                f.seek(case["at"])
                b = f.read(1)
                f.seek(case["at"])
                f.write(bytes([b[0] ^ 0x5A]) if b else b"\x5a")
        elif how == "append":
            with open(fp, "ab") as f:
                f.write(b"\0" * 64)
        elif how == "symlink_out":  # the same bytes, outside the directory
            shutil.copyfile(fp, os.path.join(outside, case["file"]))
            os.unlink(fp)
            os.symlink(os.path.join(outside, case["file"]), fp)
        # an attacker updates the size and the hash of the file too
        for key in ("code", "constants", "report"):
            entry = man.get(key)
            if case.get("rehash") and isinstance(entry, dict) and entry.get("file") == case["file"] \
                    and os.path.exists(fp):
                entry["sha256"] = _sha(fp)
                if key == "constants":
                    entry["bytes"] = os.path.getsize(fp)
    elif "edit" in case:
        EDITS[case["edit"]](man, path, outside)
    if case.get("rehash"):
        man["content_hash"] = abi.manifest_hash(man)
    with open(mp, "w") as f:
        json.dump(man, f)


def _sha(p):
    from sqk.runtime.module import sha256_file

    return sha256_file(p)


def _one(case: dict, original: str, work: str) -> dict:
    """Outcome of one case: {"outcome": "refused"|"same"|"differs"|"call-error"|"bad", "detail"}."""
    path = os.path.join(work, "a.sqk")
    outside = os.path.join(work, "outside")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(outside)
    shutil.copytree(original, path)
    _apply(case, path, outside)
    try:
        m = sqk.load(path, verify=case.get("verify", True))
    except ArtifactError as e:
        return {"outcome": "refused", "detail": str(e)}
    except Exception as e:  # noqa: BLE001 -- any other type is the failure being looked for
        return {"outcome": "bad", "detail": f"load raised {type(e).__name__}: {e}"}
    ref = sqk.load(original, verify=False)
    # the same inputs for both; a state starts at zero, so an input one of them keeps as
    # state (a dropped or changed state entry) gets zeros; outputs compared by name
    rng = np.random.default_rng(0)
    full = {}
    for name, dtype, shape in m._in_specs:
        full[name] = (np.zeros(shape, dtype) if name in m.state or name in ref.state
                      else np.zeros(shape, dtype) + 2 if np.issubdtype(dtype, np.integer)
                      else rng.standard_normal(shape).astype(dtype))
    try:
        outs = _named(m, m(**{k: v for k, v in full.items() if k not in m.state}))
    except (ValueError, TypeError, SqkRuntimeError) as e:
        return {"outcome": "call-error", "detail": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001
        return {"outcome": "bad", "detail": f"call raised {type(e).__name__}: {e}"}
    try:
        want = _named(ref, ref(**{k: v for k, v in full.items() if k not in ref.state}))
    except Exception as e:  # noqa: BLE001 -- the tampered specs differ from the real ones
        return {"outcome": "bad", "detail": f"loaded and ran a model whose inputs differ ({e})"}
    common = set(outs) & set(want)
    same = bool(common) and all(outs[n].dtype == want[n].dtype and outs[n].shape == want[n].shape and
                                np.array_equal(outs[n], want[n], equal_nan=True) for n in common)
    return {"outcome": "same" if same else "differs", "detail": ""}


def _named(m, outs) -> dict:
    names = [n for n, _, _ in m._out_specs if n not in m._state_of]
    return dict(zip(names, outs if isinstance(outs, tuple) else (outs,)))


def worker(cases_file: str, work: str) -> None:
    with open(cases_file) as f:
        cases = json.load(f)
    for i, case in enumerate(cases):
        print(json.dumps({"started": i}), flush=True)
        print(json.dumps(dict(_one(case, case["artifact"], work), case=i)), flush=True)


def _run_cases(cases: list[dict], tmp_path, env=None) -> list[dict]:
    """Run ``cases`` in a child process; a crash fails with the case it died in."""
    cf = tmp_path / "cases.json"
    cf.write_text(json.dumps(cases))
    script = (f"import sys; sys.path.insert(0, {HERE!r}); import test_artifact_tamper as t; "
              f"t.worker({str(cf)!r}, {str(tmp_path / 'work')!r})")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800,
                       env=env)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    results = [x for x in lines if "outcome" in x]
    if r.returncode != 0:
        last = lines[-1].get("started") if lines else None
        sig = f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit {r.returncode}"
        raise AssertionError(f"the child died ({sig}) in case {last}: "
                             f"{cases[last] if last is not None else '?'}\n{r.stderr[-3000:]}")
    assert len(results) == len(cases)
    return results


# --- the cases ----------------------------------------------------------------------------

def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):  # long lists (CPU features): their ends stand for the rest
        for i, v in enumerate(obj):
            if i < 2 or i == len(obj) - 1 or isinstance(v, (dict, list)):
                yield from _leaves(v, path + (i,))
    if path:
        yield list(path)


def _mutations(value, wide: bool):
    """Values to put in place of ``value``: a type change, off-by-one, huge, and for
    strings paths out of the directory."""
    out = ["<delete>", None, "1", [], {}, -1]
    if isinstance(value, bool) or not isinstance(value, (int, str, list)):
        pass
    elif isinstance(value, int):
        out += [value + 1, value - 1, 0, 1 << 63, value * 1000 + 7, 2.5]
    elif isinstance(value, str):
        out += ["", value + "x", "../../../../etc/passwd", "/etc/passwd", "i8", "f16", "host", "riscv64"]
    elif isinstance(value, list):
        out += [[1, 1], value[:-1], value + value[-1:] if value else [1], [1 << 62, 1 << 62], [0]]
    if wide:
        out += [True, "NaN", 1e308, [[1]], {"file": "x"}, "k0_copy", "manifest.json", "a" * 5000, -(1 << 63)]
    return out


def manifest_cases(artifacts: dict, wide: bool) -> list[dict]:
    cases = []
    for art, path in artifacts.items():
        with open(os.path.join(path, "manifest.json")) as f:
            man = json.load(f)
        for field in _leaves(man):
            cur = man
            for k in field:
                cur = cur[k]
            for value in _mutations(cur, wide):
                for rehash in (False, True):
                    cases.append({"artifact": path, "name": art, "field": field, "value": value, "rehash": rehash})
                # verify=False skips every hash: the program table alone must stop a bad edit
                cases.append({"artifact": path, "name": art, "field": field, "value": value, "verify": False})
    return cases


def file_cases(artifacts: dict) -> list[dict]:
    cases = []
    for art, path in artifacts.items():
        for name in sorted(os.listdir(path)):
            if name in ("manifest.json", "model.sqkir"):  # the manifest has its own cases; the IR is not loaded
                continue
            size = os.path.getsize(os.path.join(path, name))
            hows = [dict(how="delete"), dict(how="append"), dict(how="symlink_out")]
            hows += [dict(how="truncate", at=at) for at in sorted({0, size // 2}) if at < size]
            hows += [dict(how="flip", at=at) for at in sorted({0, size // 3, size - 1}) if size]
            for how in hows:
                for rehash in (False, True):
                    if rehash and name == "model.so" and how["how"] in ("flip", "append"):
                        continue  # edited native code that loads is trusted by design (README: Security model)
                    cases.append(dict(how, artifact=path, name=art, file=name, rehash=rehash))
    return cases


def _judge(case: dict, res: dict) -> str | None:
    """Why ``res`` is not acceptable for ``case`` (None: it is)."""
    if res["outcome"] == "bad":
        return res["detail"]
    if res["outcome"] == "call-error" and not (case.get("runner") and res["detail"].startswith("SqkRuntimeError")):
        return f"loaded, then the call failed: {res['detail']}"  # (the riscv64 runner refuses at run time)
    if res["outcome"] == "differs":
        # new constants under a recomputed hash are a different model, not a corrupt one
        changed_weights = case.get("file") == "constants.bin" and case.get("rehash") and case["how"] != "symlink_out"
        if not changed_weights:
            return "loaded and ran, with outputs that differ from the original artifact's"
    return None


def _check_all(cases, tmp_path):
    results = _run_cases(cases, tmp_path)
    bad = [(c, r) for c, r in zip(cases, results) if _judge(c, r)]
    assert not bad, "\n".join(f"{ {k: v for k, v in c.items() if k != 'artifact'} } -> {_judge(c, r)}"
                              for c, r in bad[:20])
    return results


def _sample(cases, n, seed=17):
    return random.Random(seed).sample(cases, min(n, len(cases)))


def test_tampered_manifest_fields(artifacts, tmp_path):
    results = _check_all(_sample(manifest_cases(artifacts, wide=False), 240), tmp_path)
    assert sum(r["outcome"] == "refused" for r in results) > 100


def test_tampered_files(artifacts, tmp_path):
    cases = file_cases(artifacts)
    results = _check_all(cases, tmp_path)
    for c, r in zip(cases, results):
        if c["how"] in ("symlink_out", "delete") or not c["rehash"]:
            assert r["outcome"] == "refused", (c, r)


@pytest.mark.slow
def test_tampered_manifest_fields_all(artifacts, tmp_path):
    _check_all(manifest_cases(artifacts, wide=True), tmp_path)


@pytest.mark.slow
def test_tampered_riscv_manifest_fields(tmp_path):
    """riscv64: the runner checks every tensor against its own table at each run, so a
    tampered manifest is refused at load or by the runner (SqkRuntimeError), never run."""
    require_riscv()
    path = str(tmp_path / "rv.sqk")
    compile_for(mlp(), "riscv64").save(path)
    cases = [dict(c, runner=True) for c in _sample(manifest_cases({"rv": path}, wide=False), 150)]
    results = _check_all(cases, tmp_path)
    assert sum(r["outcome"] == "call-error" for r in results) > 0  # the runner's own refusals


# --- the issue's reproducers, by name -----------------------------------------------------

def _outside_file(man, path, outside, target="/etc/passwd", key="constants"):
    rel = os.path.relpath(target, path)
    man[key]["file"] = rel
    man[key]["sha256"] = _sha(target)
    if key == "constants":
        man[key]["bytes"] = os.path.getsize(target)


def _bigger_state(man, path, outside):
    """Map the first state to an output that is larger than it (a new output entry)."""
    man["outputs"].append({"name": "big", "dtype": "f32", "shape": [4096]})
    man["state"][0]["output"] = "big"


def _swap_state(man, path, outside):
    """Map a state (f32 cache) to the attention output (smaller)."""
    man["state"][0]["output"] = man["outputs"][0]["name"]


EDITS = {
    "output_shape_1x1": lambda m, p, o: m["outputs"][0].update(shape=[1, 1]),
    "input_shape_1x1": lambda m, p, o: m["inputs"][0].update(shape=[1, 1]),
    "drop_input": lambda m, p, o: m["inputs"].pop(0),
    "output_dtype_i8": lambda m, p, o: m["outputs"][0].update(dtype="i8"),
    "state_to_bigger_output": _bigger_state,
    "state_to_other_output": _swap_state,
    "constants_passwd": _outside_file,
    "code_absolute": lambda m, p, o: m["code"].update(file="/usr/lib/x86_64-linux-gnu/libc.so.6"),
    "code_dotdot": lambda m, p, o: m["code"].update(file="../a.sqk/model.so"),
    "report_passwd": lambda m, p, o: _outside_file(m, p, o, key="report"),
    "format_version_str": lambda m, p, o: m.update(format_version="1"),
    "inputs_not_list": lambda m, p, o: m.update(inputs={"x": 1}),
    "input_without_dtype": lambda m, p, o: m["inputs"][0].pop("dtype"),
    "dim_2_63": lambda m, p, o: m["inputs"][0].update(shape=[1 << 63]),
    "bytes_overflow": lambda m, p, o: m["inputs"][0].update(shape=[1 << 40, 1 << 40]),
    "constants_bytes_str": lambda m, p, o: m["constants"].update(bytes="1984"),
    "kernels_dropped": lambda m, p, o: m["kernels"].pop(),
    "kernel_renamed": lambda m, p, o: m["kernels"][0].update(name="k9_evil"),
    "arena_smaller": lambda m, p, o: m.update(arena_bytes=0),
    "kernel_not_dict": lambda m, p, o: m["kernels"].__setitem__(0, "k0"),
    "state_unknown": lambda m, p, o: m["state"][0].update(input="nope"),
    "output_renamed": lambda m, p, o: m["outputs"][1].update(name="../../x"),
    "state_dropped": lambda m, p, o: m.pop("state"),
    "state_claimed": lambda m, p, o: m["state"].append({"input": "q", "output": "0"}),  # both 128 bytes
}

REPRODUCERS = [  # (artifact, edit, rehash, message the ArtifactError must match)
    ("mlp", "output_shape_1x1", True, r"outputs\[0\]\.shape is \[1, 1\], the code's program table has \[2, 16\]"),
    ("mlp", "output_shape_1x1", False, r"manifest.json does not match its content_hash"),
    ("mlp", "input_shape_1x1", True, r"inputs\[0\]\.shape is \[1, 1\]"),
    ("mlp", "drop_input", True, r"manifest field inputs is 0 tensors, the code's program table has 1"),
    ("mlp", "output_dtype_i8", True, r"outputs\[0\]\.dtype is i8, the code's program table has f32"),
    ("attn", "state_to_bigger_output", True, r"state\[0\]: input 'kc' is f32 of 384 bytes, its output 'big'"),
    ("attn", "state_to_other_output", True, r"state\[0\]"),
    ("mlp", "constants_passwd", True, r"constants\.file: '(\.\./)+etc/passwd' is not a plain file name"),
    ("mlp", "code_absolute", True, r"code\.file: '/usr/lib.*' is not a plain file name"),
    ("mlp", "code_dotdot", True, r"code\.file: '\.\./a\.sqk/model\.so' is not a plain file name"),
    ("mlp", "report_passwd", True, r"report\.file: .* is not a plain file name"),
    ("mlp", "format_version_str", True, r"format version '1' \(a str\), this sqk reads version 1 \(the integer\)"),
    ("mlp", "inputs_not_list", True, r"manifest field inputs: .* is a dict, expected a list"),
    ("mlp", "input_without_dtype", True, r"manifest field inputs\[0\]\.dtype: missing"),
    ("mlp", "dim_2_63", True, r"inputs\[0\]\.shape\[0\]: 9223372036854775808 is outside \[0, 9223372036854775807\]"),
    ("mlp", "bytes_overflow", True, r"inputs\[0\]\.shape: .* more than 2\^63-1 bytes"),
    ("mlp", "constants_bytes_str", True, r"constants\.bytes: '1984' is a str, expected an integer"),
    ("mlp", "kernels_dropped", True, r"manifest field kernels is 2 kernels, the code's program table has 3"),
    ("mlp", "kernel_renamed", True, r"kernels\[0\]\.name is 'k9_evil'"),
    ("mlp", "arena_smaller", True, r"arena_bytes is 0, the code's program table has"),
    ("mlp", "kernel_not_dict", True, r"manifest field kernels\[0\]: expected an object, got str"),
    ("attn", "state_unknown", True, r"state\[0\]\.input: 'nope' is not an input"),
    ("attn", "state_dropped", True, r"outputs\[1\] is not a state, the code's program table has a state output"),
    ("attn", "state_claimed", True, r"state\[2\]\.output is '0', the code's program table has an output the "
                                    r"code writes itself"),
]


def test_issue_reproducers_refused_cleanly(artifacts, tmp_path):
    cases = [{"artifact": artifacts[a], "name": a, "edit": e, "rehash": rh} for a, e, rh, _ in REPRODUCERS]
    # the same edits with every hash check off: the schema and the program table still refuse them
    cases += [dict(c, verify=False) for c in cases if c["rehash"]]
    results = _run_cases(cases, tmp_path)
    for c, r in zip(cases, results):
        msg = next(m for a, e, rh, m in REPRODUCERS if (a, e, rh) == (c["name"], c["edit"], c["rehash"]))
        assert r["outcome"] == "refused", (c["edit"], r)
        assert re.search(msg, r["detail"]), (c["edit"], r["detail"])


def test_symlink_out_of_the_artifact_refused(artifacts, tmp_path):
    res = _run_cases([{"artifact": artifacts["mlp"], "file": "constants.bin", "how": "symlink_out", "rehash": True}],
                     tmp_path)
    assert res[0]["outcome"] == "refused" and "outside the artifact directory" in res[0]["detail"], res


def test_manifest_hash_is_what_the_compiler_writes(artifacts):
    for path in artifacts.values():
        man = json.load(open(os.path.join(path, "manifest.json")))
        assert abi.manifest_hash(man) == man["content_hash"]
        edited = copy.deepcopy(man)
        edited["pipeline"] += ",dce"
        assert abi.manifest_hash(edited) != man["content_hash"]


# --- riscv64: the runner checks every tensor against its own table -----------------------

def test_riscv_runner_refuses_tampered_artifacts(tmp_path):
    path = str(tmp_path / "rv.sqk")
    compile_for(mlp(), "riscv64").save(path)
    x = np.linspace(-1, 1, 48, dtype=np.float32)
    cases = [("output_shape_1x1", r"runner wrote 1 as float32\[2, 16\], expected float32\[1, 1\]"),
             ("input_shape_1x1", r"input 'x': expected shape f32 \[2,24\], found f32 \[1,1\]|expected shape"),
             ("drop_input", r"missing input 'x'"),
             ("output_dtype_i8", r"runner wrote 1 as float32\[2, 16\], expected int8\[2, 16\]"),
             ("output_renamed", r"runner wrote no readable output '\.\./\.\./x'")]
    for edit, msg in cases:
        dst = str(tmp_path / edit)
        shutil.copytree(path, dst)
        _apply({"edit": edit, "rehash": True}, dst, str(tmp_path))
        m = sqk.load(dst)
        ins = {n: x[:int(np.prod(s))].reshape(s).astype(d) for n, d, s in m._in_specs}
        with pytest.raises(SqkRuntimeError, match=msg):
            m(**ins)
    for edit in ("constants_passwd", "code_absolute", "format_version_str"):
        dst = str(tmp_path / edit)
        shutil.copytree(path, dst)
        _apply({"edit": edit, "rehash": True}, dst, str(tmp_path))
        with pytest.raises(ArtifactError):
            sqk.load(dst)


# --- leftovers: killed saves, library mappings -------------------------------------------

def test_killed_save_is_cleaned_by_the_next_save(artifacts, tmp_path):
    """A save killed mid-copy leaves its .sqk-save-* directory; the next save into the
    same parent removes it, but never the directory of a save that is still running."""
    script = f"""
import shutil, sys, time
sys.path.insert(0, {HERE!r})
import sqk, sqk.runtime.module as mod
real = shutil.copy2
def slow_copy(a, b):
    real(a, b)
    print("copying", flush=True)
    time.sleep(120)
mod.shutil.copy2 = slow_copy
sqk.load({artifacts['mlp']!r}).save(sys.argv[1])
"""
    procs = []
    for name in ("killed", "running"):
        p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / name)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "copying"
        procs.append(p)
    killed, running = procs
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        left = [n for n in os.listdir(tmp_path) if n.startswith(".sqk-save-")]
        assert len(left) == 2
        # an old directory without a lock (a save of an earlier sqk) goes too; a fresh one stays
        (tmp_path / ".sqk-save-old").mkdir()
        (tmp_path / ".sqk-save-fresh").mkdir()
        past = time.time() - 2 * 3600
        os.utime(tmp_path / ".sqk-save-old", (past, past))
        sqk.load(artifacts["mlp"]).save(str(tmp_path / "next.sqk"))
        after = sorted(n for n in os.listdir(tmp_path) if n.startswith(".sqk-save-"))
        assert len(after) == 2 and ".sqk-save-fresh" in after and ".sqk-save-old" not in after, after
        alive = next(n for n in after if n != ".sqk-save-fresh")
        assert os.path.exists(tmp_path / alive / ".lock")  # the running save's, untouched
        assert sqk.load(str(tmp_path / "next.sqk")) is not None
    finally:
        running.kill()
        running.wait()
    assert len(clean_stale_saves(str(tmp_path))) == 1  # the running save's, once it is dead


def test_module_releases_its_library(artifacts, tmp_path):
    """Each distinct model.so is unmapped (dlclose) once its Module is collected."""
    script = f"""
import gc, shutil, sys
import numpy as np, sqk
paths = []
for i in range(3):
    p = {str(tmp_path)!r} + f"/copy{{i}}.sqk"
    shutil.copytree({artifacts['mlp']!r}, p)
    paths.append(p)
    m = sqk.load(p)
    m(x=np.ones((2, 24), np.float32))
    del m
    gc.collect()
maps = open("/proc/self/maps").read()
print(sum(p in maps for p in paths))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
