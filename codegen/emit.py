"""From LLVM IR to native code: optimize (LLVM's O3 pipeline for the target
machine), emit an object, link it, and cache the results.

The cache is keyed by the hash of (LLVM IR, triple, CPU, features, sqk
version); it lives in ``$SQK_CACHE_DIR`` or ``~/.cache/sqk`` and is safe
against concurrent writers (write to a temporary name, then rename).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import llvmlite.binding as llvm

from .. import __version__
from .target import Target


class ToolchainError(RuntimeError):
    """A compiler or linker needed for this target is missing or failed."""


def cache_dir() -> str:
    d = os.environ.get("SQK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sqk")
    os.makedirs(d, exist_ok=True)
    return d


def cached(key_parts: list[str], suffix: str, build) -> str:
    """Path of the cached file for ``key_parts``; ``build(path)`` makes it on a miss."""
    key = hashlib.sha256("\0".join(key_parts + [__version__]).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), key + suffix)
    if not os.path.exists(path) or os.environ.get("SQK_NO_CACHE"):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=cache_dir())
        os.close(fd)
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def optimize(llvm_ir: str, target: Target) -> llvm.ModuleRef:
    """Parse, verify and optimize at O3 for ``target``."""
    mod = llvm.parse_assembly(llvm_ir)
    mod.verify()
    tm = target.machine
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def object_code(llvm_ir: str, target: Target) -> str:
    """Path of the (cached) object file for ``llvm_ir``."""
    def build(path):
        mod = optimize(llvm_ir, target)
        with open(path, "wb") as f:
            f.write(target.machine.emit_object(mod))
    return cached([llvm_ir, target.triple, target.cpu, target.features], ".o", build)


def assembly(llvm_ir: str, target: Target) -> str:
    """The target assembly of ``llvm_ir`` after O3, as ``llc`` prints it."""
    return target.machine.emit_assembly(optimize(llvm_ir, target))


def optimized_ir(llvm_ir: str, target: Target) -> str:
    """``llvm_ir`` after the O3 pipeline (what ``object_code`` compiles)."""
    return str(optimize(llvm_ir, target))


def optimized_ir_and_assembly(llvm_ir: str, target: Target) -> tuple[str, str]:
    """Both of the above from one optimization run."""
    mod = optimize(llvm_ir, target)
    return str(mod), target.machine.emit_assembly(mod)


# A function in LLVM IR text: "define [linkage] ... @name(" up to the "}" line.
_LL_DEFINE = re.compile(r'^define\s[^@\n]*@("?)([^"(\s]+)\1\(', re.M)
# A function in ELF assembly (x86-64, riscv64): its ".type name,@function" directive.
_ASM_FUNCTION = re.compile(r"^\s*\.type\s+([^,\s]+),\s*@function", re.M)


def kernel_names(text: str) -> list[str]:
    """The kernels defined in LLVM IR or assembly text, in order: exported
    functions (an internal helper ``name.x`` belongs to kernel ``name``)."""
    if _LL_DEFINE.search(text):
        return [m.group(2) for m in _LL_DEFINE.finditer(text)
                if not re.search(r"\b(internal|private)\b", text[m.start():m.end()])]
    return [n for n in _ASM_FUNCTION.findall(text) if not n.startswith(".") and "." not in n]


def kernel_section(text: str, name: str) -> str:
    """The part of LLVM IR or assembly ``text`` that defines kernel ``name``:
    its function and any helper functions ``name.*`` (LLVM IR), or its code
    with the constant pool just before it (assembly).  An unknown name is a
    LookupError listing the kernels."""
    names = kernel_names(text)
    if name not in names:
        raise LookupError(f"no kernel named {name!r}; kernels: {', '.join(names) or 'none'}")
    mine = lambda f: f == name or f.startswith(name + ".")  # noqa: E731
    parts = []
    if _LL_DEFINE.search(text):
        for m in _LL_DEFINE.finditer(text):
            if mine(m.group(2)):
                end = text.index("\n}", m.end()) + 2
                parts.append(text[m.start():end] + "\n")
        return "\n".join(parts)
    lines = text.splitlines(keepends=True)
    start = 0  # a function's text starts after the previous one's ".size" (its constant pool and section)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(".file"):
            start = i + 1
        m = re.match(r"\.size\s+([^,\s]+),", stripped)
        if m:
            if mine(m.group(1)) and any(_ASM_FUNCTION.match(x) for x in lines[start:i]):
                parts.append("".join(lines[start:i + 1]))
            start = i + 1
    return "".join(parts)


def _run(cmd: list[str], what: str) -> None:
    exe = shutil.which(cmd[0])
    if exe is None:
        hint = {"cc": "apt-get install gcc", "riscv64-linux-gnu-gcc": "apt-get install gcc-riscv64-linux-gnu"}
        raise ToolchainError(f"{what} needs '{cmd[0]}', which is not installed ({hint.get(cmd[0], '')})")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolchainError(f"{what} failed ({' '.join(cmd)}):\n{r.stderr.strip()}")


def link(obj: str, target: Target) -> str:
    """Host: a shared library.  riscv64: a static runner executable with the runtime."""
    from ..runtime.ffi import RUNTIME_DIR

    with open(obj, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()
    if target.name == "host":
        cc = os.environ.get("CC", "cc")
        return cached([key, "host-so", cc], ".so",
                      lambda out: _run([cc, "-shared", "-o", out, obj, "-lm"], "linking the model"))
    cc = os.environ.get("SQK_RISCV_CC", "riscv64-linux-gnu-gcc")
    srcs = [os.path.join(RUNTIME_DIR, f) for f in ("runner.c", "sqk_runtime.c")]
    src_key = hashlib.sha256(b"".join(open(s, "rb").read() for s in srcs + [
        os.path.join(RUNTIME_DIR, "sqk_runtime.h")])).hexdigest()
    # The runtime and runner objects are built once (rv64gc: they run on any core) and cached.
    runtime_objs = [cached([src_key, "riscv-obj", cc, src], ".o", lambda out, src=src: _run(
        [cc, "-O2", "-march=rv64gc", "-mabi=lp64d", "-pthread", "-I", RUNTIME_DIR, "-c", "-o", out, src],
        "compiling the riscv64 runtime")) for src in srcs]
    return cached([key, src_key, "riscv-runner", cc], ".elf", lambda out: _run(
        [cc, "-static", "-pthread", "-o", out, *runtime_objs, obj, "-lm"], "building the riscv64 runner"))
