"""riscv64 generation in one runner process (llm/native.py, runtime/runner_generate.c,
codegen/generate_runner.py): greedy and seeded ids equal to the host's on a tiny
random-weight decoder under qemu, the KV state handed back, one process per call, a
riscv64 LLM artifact generating without llvmlite, and the runner's argument errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

import sqk
from harness import assert_close, require_riscv
from sqk.llm import Decoder, LlamaConfig, random_weights
from sqk.llm.native import constants_files, generate_runner

CFG = LlamaConfig(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48, max_seq=24)
PROMPT = [3, 17, 42, 5, 9, 11, 1]            # a chunk of 4, then 3 padded to 4 (prefill_chunk=4)
SAMPLED = dict(temperature=1.5, top_k=20, top_p=0.9, seed=123)


@pytest.fixture(scope="module")
def decoders():
    require_riscv()                                          # skips (or fails in CI) without the toolchain
    w = random_weights(CFG, 1)
    return Decoder(CFG, w, prefill_chunk=4), Decoder(CFG, w, target="riscv64", prefill_chunk=4)


def test_generate_equals_host(decoders, monkeypatch):
    host, rv = decoders
    runs = []
    monkeypatch.setattr(rv.module, "_run_runner", lambda *a, **k: runs.append(a))   # the per-call path
    for prompt, kw in ((PROMPT[:5], {}), (PROMPT, {}), (PROMPT, SAMPLED)):   # 4 + a step; 4 + 3 padded
        host.reset()
        rv.reset()
        streamed = []
        want = host.generate(prompt, 10, **kw)
        assert rv.generate(prompt, 10, stream=lambda t, s: streamed.append(t), **kw) == want == streamed
        assert rv.pos == host.pos == len(prompt) + 9
    assert runs == []                        # one generate-runner process per call, no other
    monkeypatch.undo()
    for name, a in host.module.state.items():                      # the KV state came back
        assert_close(rv.module.state[name], a, 1e-4, what=name)
    assert_close(rv.step(want[-1]), host.step(want[-1]), 1e-4, what="a step after generate")


def test_generate_f16_cache():
    require_riscv()
    w = random_weights(CFG, 3)
    host = Decoder(CFG, w, prefill_chunk=8, kv_dtype="f16")
    rv = Decoder(CFG, w, target="riscv64", prefill_chunk=8, kv_dtype="f16")
    assert rv.generate(PROMPT, 8) == host.generate(PROMPT, 8)
    for name, a in host.module.state.items():
        assert rv.module.state[name].dtype == a.dtype == "float16"
        assert_close(rv.module.state[name].astype("float32"), a.astype("float32"), 2e-3, what=name)


def test_generate_stop_and_full_cache(decoders):
    host, rv = decoders
    host.reset()
    first = host.generate(PROMPT, 3)
    rv.reset()
    assert rv.generate(PROMPT, 3, stop=[first[1]]) == first[:1]
    rv.reset()
    host.reset()
    assert rv.generate(PROMPT, 100) == host.generate(PROMPT, 100)      # ends when the cache is full
    assert rv.pos == CFG.max_seq
    rv.reset()
    with pytest.raises(ValueError, match="beyond the KV cache length"):
        rv.generate(list(range(CFG.max_seq + 1)), 1)
    with pytest.raises(ValueError, match="top_p must be"):
        rv.generate(PROMPT, 1, temperature=1.0, top_p=1.5, seed=1)


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def test_runner_generate_cli(decoders):
    host, rv = decoders
    base = rv.module.runner_command()[:-1] + [generate_runner(rv), "--generate"]
    consts = ["--consts", constants_files(rv.chunk_modules)[1][0]]
    host.reset()
    want = host.generate(PROMPT, 5, stop=[])
    r = run(base + ["--prompt-ids", ",".join(map(str, PROMPT)), "-n", "5", "--timing"] + consts)
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == want
    assert "prefill 7 tokens" in r.stderr and "decode 5 tokens" in r.stderr
    errors = [
        ([], "--generate needs --prompt-ids"),
        (["--prompt-ids", ""], "at least one token id"),
        (["--prompt-ids", "1,64"], "token ids in [0, 64)"),
        (["--prompt-ids", "1,x"], "comma-separated token ids"),
        (["--prompt-ids", ",".join(["1"] * 25)], "the prompt has 25 tokens, the KV cache holds 24"),
        (["--prompt-ids", "1", "--temperature", "0.5"], "needs --seed"),
        (["--prompt-ids", "1", "--temperature", "inf", "--seed", "1"], "--temperature must be a finite number"),
        (["--prompt-ids", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt-ids", "1", "-n", "-1"], "-n needs a whole number >= 0"),
        (["--prompt-ids", "1", "--seed", "-3"], "--seed needs a whole number"),
        (["--prompt-ids", "1", "--bogus", "1"], "unknown option '--bogus'"),
        (["--prompt-ids"], "option --prompt-ids needs a value"),
    ]
    for args, msg in errors:
        r = run(base + consts + args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("sqk-runner: error: ")
    r = run(base + ["--prompt-ids", "1"])
    assert r.returncode == 2 and "needs 1 constants file(s)" in r.stderr
    r = run(rv.module.runner_command() + ["--generate", "--prompt-ids", "1"])      # a plain model runner
    assert r.returncode == 2 and "unknown option '--generate'" in r.stderr


def test_riscv64_artifact_generates_without_llvmlite(tmp_path):
    require_riscv()
    w = random_weights(CFG, 2)
    rv = Decoder(CFG, w, target="riscv64", prefill_chunk=4)
    from sqk.llm.artifact import save_llm

    save_llm(rv, tmp_path / "rv.sqk")
    host = Decoder(CFG, w, prefill_chunk=4)
    want = [host.generate(PROMPT, 8)]
    host.reset()
    want.append(host.generate(PROMPT, 8, **SAMPLED))
    code = f"""
import json, sys
sys.modules["llvmlite"] = None
import sqk
dec = sqk.llm.load({str(tmp_path / "rv.sqk")!r})
out = [dec.generate({PROMPT!r}, 8)]
dec.reset()
out.append(dec.generate({PROMPT!r}, 8, **{SAMPLED!r}))
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == want
    index = json.loads((tmp_path / "rv.sqk" / "llm.json").read_text())
    assert index["target"] == "riscv64" and index["generate"]["file"] == "runner"
    assert len(index["constants"]) == 1
    assert sorted(m["tokens"] for m in index["modules"]) == [1, 4]


def test_riscv64_gguf_like_smollm2(tmp_path):
    """SmolLM2's tensor types (Q4_1 projections, a tied Q8_0 token_embd read by gather_q) on riscv64."""
    require_riscv()
    pytest.importorskip("gguf")
    from test_llm_gguf import TOKENS, write_gguf

    write_gguf(tmp_path / "m.gguf", "Q4_1", tied=True, embd_kind="Q8_0")
    host = sqk.llm.load(tmp_path / "m.gguf", max_seq=32, prefill_chunk=4)
    rv = sqk.llm.load(tmp_path / "m.gguf", max_seq=32, prefill_chunk=4, target="riscv64")
    assert_close(rv.prefill(TOKENS), host.prefill(TOKENS), 1e-5, what="riscv64 prefill logits")
    host.reset()
    rv.reset()
    assert rv.generate(TOKENS, 8, stop=[]) == host.generate(TOKENS, 8, stop=[])


# --- host: the decode loop in C (llm/native.py decode_host, runtime/sqk_llm.c) ----------------------

@pytest.fixture(scope="module")
def host_decoder():
    return Decoder(CFG, random_weights(CFG, 1), prefill_chunk=4)


def generate_both(dec, prompt, n, **kw):
    """(tokens, pos, KV state, streamed) of dec.generate from a fresh sequence by the
    Python loop, then by the C loop."""
    runs = []
    for native in (False, True):
        dec.native_generate = native
        dec.reset()
        streamed = []
        out = dec.generate(prompt, n, stream=lambda t, s: streamed.append((t, s)), **kw)
        runs.append((out, dec.pos, {k: a.copy() for k, a in dec.module.state.items()}, streamed))
    del dec.native_generate                                   # back to the class default (native)
    return runs


@pytest.mark.parametrize("kw", [{}, SAMPLED, dict(temperature=0.7, seed=5), dict(temperature=1.0, top_k=1, seed=9),
                                dict(temperature=2.0, top_p=0.5, seed=2**64 - 1)])
def test_host_native_generate_equals_python_loop(host_decoder, kw):
    for prompt, n in ((PROMPT[:5], 10), (PROMPT, 7), (PROMPT[:1], 1), (PROMPT, 100)):   # 100: the cache fills
        (want, pos, state, streamed), (got, npos, nstate, nstreamed) = generate_both(host_decoder, prompt, n, **kw)
        assert got == want and npos == pos and nstreamed == streamed == [(t, "") for t in want]
        assert pos == min(len(prompt) + n - 1, CFG.max_seq) or len(want) < n
        for name, a in state.items():                          # the same kernels on the same tokens
            assert (nstate[name] == a).all(), name
    assert len(want) == CFG.max_seq - len(PROMPT) + 1 and pos == CFG.max_seq


def test_host_native_generate_stop_continue_and_errors(host_decoder):
    dec = host_decoder
    dec.reset()
    first = dec.generate(PROMPT, 6)
    for n in (0, -1):
        (want, pos, _, _), (got, npos, _, _) = generate_both(dec, PROMPT, n)
        assert got == want == [] and npos == pos == len(PROMPT)
    (want, pos, _, _), (got, npos, _, _) = generate_both(dec, PROMPT, 6, stop=[first[3]])
    assert got == want == first[:3] and npos == pos == len(PROMPT) + 3
    runs = []
    for native in (False, True):                                # a generate continuing the sequence
        dec.native_generate = native
        dec.reset()
        runs.append((dec.generate(PROMPT, 3), dec.generate([first[2]], 4, temperature=1.0, seed=7), dec.pos))
    del dec.native_generate
    assert runs[0] == runs[1]
    dec.reset()
    with pytest.raises(ValueError, match="top_p must be"):
        dec.generate(PROMPT, 1, temperature=1.0, top_p=1.5, seed=1)
    with pytest.raises(ValueError, match="top_k must be"):
        dec.generate(PROMPT, 1, temperature=1.0, top_k=0, seed=1)


def test_host_native_generate_nan_logits():
    """A token whose embedding is NaN makes the next logits NaN: the C loop stops and
    generate raises sample()'s ValueError, as the Python loop does."""
    w = random_weights(CFG, 1)
    dec = Decoder(CFG, w, prefill_chunk=4)
    bad = dec.generate(PROMPT, 2)[0]
    assert bad not in PROMPT
    w = dict(w, embed=w["embed"].copy())
    w["embed"][bad] = float("nan")
    dec = Decoder(CFG, w, prefill_chunk=4)
    for native in (False, True):
        dec.native_generate = native
        dec.reset()
        with pytest.raises(ValueError, match="logits contain NaN"):
            dec.generate(PROMPT, 5)
        assert dec.pos == len(PROMPT) + 1


def test_host_step_bound_equals_module_call():
    """Decoder.step on the host runs the step through pointers bound once
    (llm/native.py BoundStep): the logits and KV state of the Module's own call,
    a fresh logits array per step, and bound again when the state arrays change."""
    dec, ref = (Decoder(CFG, random_weights(CFG, 1), prefill_chunk=4) for _ in range(2))
    dec.reset()
    ref.reset()
    seen = []
    for pos, tok in enumerate(PROMPT):
        got = dec.step(tok)
        want = ref.module(token=np.array([tok]), pos=np.array([pos]))[0]
        assert (got == want).all() and not any(got is s for s in seen)
        seen.append(got)
    for name, a in ref.module.state.items():
        assert (dec.module.state[name] == a).all(), name
    other = Decoder(CFG, random_weights(CFG, 1), prefill_chunk=4)
    other.reset()
    other.prefill(PROMPT)
    dec.module.share_state(other.module)                     # new state arrays: the pointers follow
    dec.pos = other.pos
    assert (dec.step(5) == other.step(5)).all()
