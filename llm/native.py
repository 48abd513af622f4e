"""Generation in one runner process: a riscv64 Decoder's ``generate`` runs the prompt's
prefill and the whole decode loop in its generate runner (runtime/runner_generate.c,
linked by codegen/generate_runner.py, under qemu-user off a RISC-V machine) instead of
one runner process per chunk and per token.  The runner draws with runtime/sqk_sample.c,
the C twin of llm/sampling.py: the same ids as the host for the same seed.  The KV state
and position come back afterwards, so ``step`` and ``prefill`` continue the sequence.
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
