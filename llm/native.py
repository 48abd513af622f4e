"""Generation without Python on the per-token path.

riscv64: a Decoder's ``generate`` runs the prompt's prefill and the whole decode loop in
its generate runner (runtime/runner_generate.c, linked by codegen/generate_runner.py,
under qemu-user off a RISC-V machine) instead of one runner process per chunk and per
token.  The runner draws with runtime/sqk_sample.c, the C twin of llm/sampling.py: the
same ids as the host for the same seed.  The KV state and position come back afterwards,
so ``step`` and ``prefill`` continue the sequence.

Host (``decode_host``): the prompt is prefilled from Python (one call per chunk), then
the decode loop runs in C (runtime/sqk_llm.c ``sqk_llm_decode``, built into the cffi
runtime): sqk_sample draws each token from the step's logits and the step program runs
on it in the Module's own context and KV state, in batches of tokens between which
Python streams them (the first token alone, then ``STREAM_BATCH`` at a time) or only
checks for Ctrl-C (``BATCH``).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import tempfile

import numpy as np

from ..runtime.module import SqkRuntimeError
from .decoder import state_names


def constants_files(modules: dict) -> tuple[dict, list[str]]:
    """({chunk length: constants file index}, the distinct files): modules with equal
    constants (one set of weights in one layout) share one file."""
    index, files, seen = {}, [], {}
    for t, m in sorted(modules.items()):
        digest = m.manifest["constants"]["sha256"]
        if digest not in seen:
            seen[digest] = len(files)
            files.append(m._consts_path)
        index[t] = seen[digest]
    return index, files


def generate_runner(dec) -> str:
    """The decoder's generate runner: the artifact's, or linked from its modules
    (every chunk length compiled first)."""
    if dec.generate_runner is None:
        from ..codegen.generate_runner import link_generate_runner
        from ..codegen.target import get_target
        from .artifact import decoder_modules

        mods = decoder_modules(dec)
        dec.generate_runner = link_generate_runner(mods, constants_files(mods)[0], state_names(dec.cfg, dec.kv_dtype),
                                                   dec.cfg.max_seq, get_target(dec.target))
    return dec.generate_runner


def generate_native(dec, ids: list[int], max_new_tokens: int, temperature: float, top_k, top_p, seed, stop,
                    stream) -> list[int]:
    """Decoder.generate from position 0 in one runner process (module docstring)."""
    from .sampling import _check

    _check(np.zeros(1, np.float32), temperature, top_k, top_p)
    dec.check_prompt(np.asarray(ids, np.int64))
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    runner = generate_runner(dec)
    from .artifact import decoder_modules

    _, files = constants_files(decoder_modules(dec))
    cmd = dec.module.runner_command()[:-1] + [runner, "--generate", "--prompt-ids", ",".join(map(str, ids)),
                                              "-n", str(max_new_tokens), "--stop", ",".join(map(str, sorted(stop)))]
    if temperature > 0:
        cmd += ["--temperature", repr(float(temperature)),
                "--seed", str((secrets.randbits(64) if seed is None else int(seed)) & (2 ** 64 - 1))]
        cmd += ["--top-k", str(int(top_k))] if top_k is not None else []
        cmd += ["--top-p", repr(float(top_p))] if top_p is not None else []
    for f in files:
        cmd += ["--consts", f]
    if dec.module.threads:
        cmd += ["--threads", str(dec.module.threads)]
    out: list[int] = []
    pieces = dec.tokenizer.stream() if stream is not None and dec.tokenizer is not None else None
    with tempfile.TemporaryDirectory(prefix="sqk-generate-") as tmp:
        try:
            proc = subprocess.Popen(cmd + ["--state-dir", tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        except FileNotFoundError as e:
            raise SqkRuntimeError(f"cannot start the riscv64 generate runner ({e}): apt-get install qemu-user") \
                from None
        with proc:
            for line in proc.stdout:
                tok = int(line)
                out.append(tok)
                if stream is not None:
                    stream(tok, pieces.step(tok) if pieces is not None else "")
            err = proc.stderr.read()
        if proc.returncode != 0:
            msg = (err.strip() or f"exit code {proc.returncode}").splitlines()[-1]
            raise SqkRuntimeError(f"riscv64 generate runner failed: {msg}")
        for name, a in dec.module.state.items():
            a[...] = np.load(os.path.join(tmp, name + ".npy"), allow_pickle=False)
        with open(os.path.join(tmp, "pos.txt")) as f:
            dec.pos = int(f.read())
    return out


BATCH = 64          # tokens per C call without a stream callback (Ctrl-C is seen between calls)
STREAM_BATCH = 4    # with one: tokens are handed to it in groups of up to this many (the first alone)


class BoundStep:
    """A host Decoder's one-token step Module with its run bound once: the token,
    position and logits buffers and the pointer arrays sqk_run takes (the KV state
    is the Module's own arrays, updated in place), so a step costs one runtime call
    instead of Module.__call__'s per-call checks and pointer building.  Used by
    ``Decoder.step`` and by ``decode_host`` (the C loop runs the same program on
    the same pointers)."""

    def __init__(self, m, vocab: int):
        with m._lock:
            if m._native is None:
                m._load_native()
        self.m = m
        ffi, self.lib, _, self.prog, consts, self.ctx = m._native
        self.ffi = ffi
        self.token, self.pos = np.zeros(1, np.int64), np.zeros(1, np.int64)
        named = {"token": self.token, "pos": self.pos}
        extra = [n for n, _, _ in m._in_specs if n not in m._state and n not in named]
        logit_outs = [(n, dt, sh) for n, dt, sh in m._out_specs if n not in m._state_of]
        if extra or len(logit_outs) != 1 or logit_outs[0][1] != np.float32 or \
                int(np.prod(logit_outs[0][2])) != vocab:
            raise ValueError(f"{m.manifest['name']}: not a one-token decoder step (token, pos, state -> logits, state)")
        self.logits = np.zeros(logit_outs[0][2], np.float32)
        self.state = dict(m.state)          # the arrays the pointers hold (checked before each use)
        ins = [named[n] if n in named else m.state[n] for n, _, _ in m._in_specs]
        outs = [m.state[m._state_of[n]] if n in m._state_of else self.logits for n, _, _ in m._out_specs]
        self.in_ptrs = ffi.new("void *[]", [ffi.from_buffer(a) for a in ins])
        self.out_ptrs = ffi.new("void *[]", [ffi.from_buffer(a, require_writable=True) for a in outs])
        self.consts, self.const_bytes = ffi.from_buffer(consts), len(consts)
        self.names = [n for n, _, _ in m._in_specs]

    def valid(self, m) -> bool:
        """Still bound to ``m``'s program and state arrays."""
        return m is self.m and m._native is not None and m._native[3] == self.prog and \
            all(m.state[n] is a for n, a in self.state.items())

    def run(self, token: int, pos: int) -> np.ndarray:
        """The logits [vocab] (a new array) of ``token`` at ``pos``; the KV state updated."""
        self.token[0], self.pos[0] = token, pos
        with self.m._lock:
            rc = self.lib.sqk_run(self.ctx, self.prog, self.in_ptrs, self.out_ptrs, self.consts, self.const_bytes)
        self.check(rc)
        return self.logits.reshape(-1).copy()

    def check(self, rc: int) -> None:
        if rc != 0:
            ffi, lib, prog = self.ffi, self.lib, self.prog
            step = lib.sqk_context_error_step(self.ctx)
            where = ffi.string(prog.steps[step].name).decode() if 0 <= step < prog.n_steps else "runtime"
            raise SqkRuntimeError(f"{where}: {ffi.string(lib.sqk_error_string(rc)).decode()} (code {rc})"
                                  + self.m._index_hint(step, rc, {"token": self.token.copy(), "pos": self.pos.copy()}))


def bound_step(dec) -> BoundStep:
    """The Decoder's BoundStep (made on first use, remade when its module or state arrays changed)."""
    b = getattr(dec, "_bound_step", None)
    if b is None or not b.valid(dec.module):
        b = dec._bound_step = BoundStep(dec.module, dec.cfg.vocab)
    return b


def decode_host(dec, logits: np.ndarray, max_new_tokens: int, temperature: float, top_k, top_p, seed, stop,
                stream) -> list[int]:
    """The decode loop of Decoder.generate on the host, in C (module docstring):
    from ``logits`` (the prefill's, for the token at ``dec.pos``) the same tokens,
    stops and errors as the Python loop of llm/decoder.py, which it replaces."""
    from .sampling import Rng, _check, sample

    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    _check(logits, temperature, top_k, top_p)     # the ValueError the first sample() would raise
    b = bound_step(dec)
    ffi, lib = b.ffi, b.lib
    b.pos[0] = dec.pos
    buf = b.logits
    buf.reshape(-1)[...] = logits
    sampler = ffi.new("sqk_sampler *", {
        "temperature": float(temperature), "top_k": 0 if top_k is None else int(top_k),
        "top_p": 0.0 if top_p is None else float(top_p),
        "rng_state": Rng(seed).state if temperature > 0 else 0})
    stops = np.array(sorted(stop), np.int64)
    batch = STREAM_BATCH if stream is not None else BATCH
    got = np.empty(batch, np.int64)
    scratch_ids, scratch_cum = np.empty(dec.cfg.vocab, np.int64), np.empty(dec.cfg.vocab, np.float64)
    n_out, status = ffi.new("int64_t *"), ffi.new("int64_t *")
    pieces = dec.tokenizer.stream() if stream is not None and dec.tokenizer is not None else None

    def i64(a):
        return ffi.from_buffer("int64_t[]", a)

    args = (b.ctx, b.prog, b.in_ptrs, b.out_ptrs, b.consts, b.const_bytes, i64(b.token), i64(b.pos),
            ffi.from_buffer("float[]", buf), dec.cfg.vocab, dec.cfg.max_seq, sampler,
            i64(stops) if stops.size else ffi.NULL, stops.size)
    scratch = (i64(got), n_out, status, i64(scratch_ids), ffi.from_buffer("double[]", scratch_cum))
    while True:
        with b.m._lock:
            rc = lib.sqk_llm_decode(*args, max_new_tokens - len(out), batch if out or stream is None else 1, *scratch)
        dec.pos = int(b.pos[0])
        new = got[:n_out[0]].tolist()
        out += new
        if stream is not None:
            for tok in new:
                stream(tok, pieces.step(tok) if pieces is not None else "")
        b.check(rc)
        if status[0] == lib.SQK_DECODE_BADLOGITS:
            sample(buf.reshape(-1), temperature, top_k, top_p)    # raises the Python loop's ValueError
            raise SqkRuntimeError("sqk_llm_decode could not sample logits that sample() accepts")
        if status[0] != lib.SQK_DECODE_BATCH:
            return out
