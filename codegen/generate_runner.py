"""The generate runner of a riscv64 LLM decoder: one static executable holding the
decoder's programs (the step and each prefill chunk length) and the runner's generate
mode (runtime/runner_generate.c), so a board runs prompt-to-tokens without Python.

Each module's object defines ``sqk_model`` and its kernels; the step's keeps them,
every chunk's gets its program renamed ``sqk_llm_prog_T`` and every other symbol
made local (objcopy), so the objects link side by side.  A generated C table
(``table_source``) names the programs and maps their inputs and outputs onto the
shared KV state slots, the token, the position and the logits.
"""
from __future__ import annotations

import hashlib
import os
import shutil

from .emit import _run, cached, object_code

TOKEN, POS, LAST, LOGITS = -2, -3, -4, -2   # runtime/runner_generate.c's LLM_TOKEN, LLM_POS, LLM_LAST, LLM_LOGITS


def slots(manifest: dict, state: list[str]) -> tuple[list[int], list[int]]:
    """(per input, per output) of a module's manifest: the KV state slot (the index
    in ``state``) each reads or updates, or TOKEN / POS / LOGITS."""
    updates = {s["output"]: s["input"] for s in manifest.get("state", [])}
    named = {"token": TOKEN, "pos": POS, "last": LAST}
    ins = [named[t["name"]] if t["name"] in named else state.index(t["name"]) for t in manifest["inputs"]]
    outs = [state.index(updates[t["name"]]) if t["name"] in updates else LOGITS for t in manifest["outputs"]]
    if outs.count(LOGITS) != 1 or ins.count(TOKEN) != 1 or ins.count(POS) != 1 or ins.count(LAST) > 1:
        raise ValueError(f"{manifest['name']}: not a decoder program (token, pos[, last], state -> logits, state)")
    return ins, outs


def table_source(lengths: list[int], manifests: list[dict], consts: list[int], state: list[str],
                 max_seq: int) -> str:
    """The C table runner_generate.c reads (its header comment); ``lengths[0]`` is 1."""
    def arr(values):
        return "{" + ", ".join(str(v) for v in values) + "}"

    progs = ["sqk_model"] + [f"sqk_llm_prog_{t}" for t in lengths[1:]]
    lines = ['#include "sqk_runtime.h"', f"extern const sqk_program {', '.join(progs)};"]
    for p, m in enumerate(manifests):
        ins, outs = slots(m, state)
        lines += [f"static const int64_t in_{p}[] = {arr(ins)};", f"static const int64_t out_{p}[] = {arr(outs)};"]
    n = len(lengths)
    lines += [f"const int64_t sqk_llm_n_programs = {n}, sqk_llm_n_slots = {len(state)}, "
              f"sqk_llm_max_seq = {max_seq};",
              f"const int64_t sqk_llm_tokens[] = {arr(lengths)};",
              f"const int64_t sqk_llm_consts[] = {arr(consts)};",
              f"const sqk_program *const sqk_llm_programs[] = {arr('&' + p for p in progs)};",
              f"const int64_t *const sqk_llm_in_slot[] = {arr(f'in_{p}' for p in range(n))};",
              f"const int64_t *const sqk_llm_out_slot[] = {arr(f'out_{p}' for p in range(n))};"]
    return "\n".join(lines) + "\n"


def link_generate_runner(modules: dict, consts: dict, state: list[str], max_seq: int, target) -> str:
    """Path of the (cached) generate runner of ``modules`` ({chunk length: Module
    compiled in this process, riscv64}); ``consts`` maps each length to the index
    of its constants file (the runner's --consts order)."""
    from ..runtime.ffi import RUNTIME_DIR

    cc = os.environ.get("SQK_RISCV_CC", "riscv64-linux-gnu-gcc")
    objcopy = os.environ.get("SQK_RISCV_OBJCOPY", cc.removesuffix("gcc") + "objcopy")
    lengths = sorted(modules)
    if lengths[0] != 1:
        raise ValueError(f"a decoder's generate runner needs the one-token step, got lengths {lengths}")
    objs = []
    for t in lengths:
        llvm_ir = getattr(modules[t], "llvm_ir", None)
        if llvm_ir is None:
            raise ValueError(f"the {t}-token module was not compiled in this process: its object code is unknown")
        obj = object_code(llvm_ir, target)
        if t != 1:
            with open(obj, "rb") as f:
                key = hashlib.sha256(f.read()).hexdigest()
            name = f"sqk_llm_prog_{t}"

            def rename(out, obj=obj, name=name):
                shutil.copyfile(obj, out)
                _run([objcopy, f"--redefine-sym=sqk_model={name}", out], "renaming a decoder program")
                _run([objcopy, f"--keep-global-symbol={name}", out], "renaming a decoder program")
            obj = cached([key, name, objcopy, "llm-prog"], ".o", rename)
        objs.append(obj)
    table = table_source(lengths, [modules[t].manifest for t in lengths], [consts[t] for t in lengths], state,
                         max_seq)
    srcs = [os.path.join(RUNTIME_DIR, f) for f in ("runner.c", "runner_generate.c", "sqk_runtime.c",
                                                   "sqk_runtime.h", "sqk_sample.c", "sqk_sample.h")]
    src_key = hashlib.sha256(b"".join(open(s, "rb").read() for s in srcs)).hexdigest()
    flags = [cc, "-O2", "-march=rv64gc", "-mabi=lp64d", "-pthread", "-I", RUNTIME_DIR, "-c"]
    runtime_objs = [cached([src_key, "riscv-gen-obj", cc, src, *extra], ".o", lambda out, src=src, extra=extra: _run(
        [*flags, *extra, "-o", out, os.path.join(RUNTIME_DIR, src)], "compiling the riscv64 generate runner"))
        for src, extra in (("runner.c", ["-DSQK_RUNNER_GENERATE"]), ("sqk_runtime.c", []), ("sqk_sample.c", []))]

    def build(out):
        c = out + ".table.c"
        with open(c, "w") as f:
            f.write(table)
        try:
            _run([*flags, "-o", out + ".table.o", c], "compiling the decoder table")
            _run([cc, "-static", "-pthread", "-o", out, *runtime_objs, out + ".table.o", *objs, "-lm"],
                 "linking the riscv64 generate runner")
        finally:
            for p in (c, out + ".table.o"):
                if os.path.exists(p):
                    os.unlink(p)
    key = hashlib.sha256("\0".join([table, src_key, *objs]).encode()).hexdigest()
    return cached([key, "riscv-generate-runner", cc], ".elf", build)
