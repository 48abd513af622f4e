"""Module: a compiled model, loaded from an artifact directory and called with
numpy arrays.

This is the deployment side: it needs numpy and cffi only (never llvmlite or
the compiler).  An artifact directory holds

    manifest.json    format version, target, inputs/outputs, arena size,
                     pipeline, file hashes (see ``ARTIFACT_FORMAT``)
    model.so         host: kernels + the ``sqk_model`` program table
    runner           riscv64: an executable (runtime + kernels)
    constants.bin    packed constants, 64-byte aligned, memory-mapped
    report.json      the compile report (quantization, sparsity), when a
                     pass made one: ``Module.report`` (``read_report``)

Loading checks the manifest against its schema (``abi.validate_manifest``),
keeps every file it names inside the directory, checks the hashes, and holds
the manifest against the program table of the code (``check_program``): see
the README's "Security model".
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import types
import time

import numpy as np

from ..ir.dtypes import BY_CODE
from ..ir.reference import check_inputs
from .abi import (ABI_VERSION, BUF_OUTPUT, ERR_INDEX, FORMAT_VERSION, IO_DTYPES, ArtifactError, artifact_file,
                  check_elf, manifest_hash, read_manifest, tensor_nbytes)
from .profile import Profile

ARTIFACT_FORMAT = FORMAT_VERSION
_NP = {name: d.np_dtype for name, d in IO_DTYPES.items()}
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "riscv64": "riscv64"}


SQK_ERR_INDEX = ERR_INDEX


class SqkRuntimeError(RuntimeError):
    """A compiled model failed while running (bad index, out of memory, runner error)."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def host_cpu_flags() -> set[str]:
    """CPU feature flags of this machine, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "isa", "Features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def cpuinfo_name(feature: str) -> str:
    """/proc/cpuinfo's spelling of an LLVM x86 feature name."""
    special = {"sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse3": "pni", "avx512vnni": "avx512_vnni",
               "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
               "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "amx-int8": "amx_int8",
               "amx-bf16": "amx_bf16", "amx-tile": "amx_tile", "pclmul": "pclmulqdq", "sha": "sha_ni",
               "avx512vpopcntdq": "avx512_vpopcntdq", "bmi": "bmi1", "lzcnt": "abm", "sahf": "lahf_lm",
               "cx16": "cx16", "crc32": "sse4_2", "rdrnd": "rdrand"}
    return special.get(feature, feature.replace("-", "_"))


def _check_target(target: dict) -> None:
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    want = target["triple"].split("-")[0]
    if target["name"] == "host":
        if want != arch:
            raise ArtifactError(f"artifact was compiled for {target['triple']}, this machine is {arch}")
        flags = host_cpu_flags()
        if flags:
            missing = [f for f in target.get("required_features", []) if cpuinfo_name(f) not in flags]
            if missing:
                raise ArtifactError("artifact needs CPU features this machine lacks: " + ", ".join(missing)
                                    + f" (compiled for {target.get('cpu', '?')}); recompile here")
    elif target["name"] == "riscv64":
        if not want.startswith("riscv64"):
            raise ArtifactError(f"a riscv64 artifact with the target triple {target['triple']}")
        if arch != "riscv64" and not shutil.which(qemu_binary()):
            raise ArtifactError(f"running a riscv64 artifact on {arch} needs qemu-user "
                                f"('{qemu_binary()}' not found): apt-get install qemu-user")
    else:
        raise ArtifactError(f"unknown target {target['name']!r} in manifest")


def qemu_binary() -> str:
    return os.environ.get("SQK_QEMU", "qemu-riscv64")


def check_program(ffi, prog, m: dict, where: str) -> None:
    """ArtifactError unless manifest ``m`` describes the program table ``prog``
    (a ``const sqk_program *``): the same inputs and outputs (name, dtype,
    shape, bytes), arena and constants sizes and kernels.  Module sizes every
    buffer it hands the kernels from the manifest, so this is what keeps an
    edited manifest from driving an out-of-bounds access."""
    def fail(field, manifest_has, code_has):
        raise ArtifactError(f"{where}: manifest field {field} is {manifest_has}, the code's program table has "
                            f"{code_has} (a modified manifest, or files of two artifacts)")

    def text(p):
        return ffi.string(p).decode("utf-8", "replace") if p != ffi.NULL else ""

    if prog.abi_version != ABI_VERSION:
        raise ArtifactError(f"{where}: runtime ABI {prog.abi_version}, this sqk has {ABI_VERSION}")
    if text(prog.name) != m["name"]:
        fail("name", repr(m["name"]), repr(text(prog.name)))
    for key, n, table in (("inputs", prog.n_inputs, prog.inputs), ("outputs", prog.n_outputs, prog.outputs)):
        if n != len(m[key]):
            fail(key, f"{len(m[key])} tensors", f"{n}")
        for j, t in enumerate(m[key]):
            info = table[j]
            rank = info.rank if 0 <= info.rank <= 32 else 0
            code = {"name": text(info.name), "dtype": getattr(BY_CODE.get(info.dtype), "name", info.dtype),
                    "shape": [info.shape[i] for i in range(rank)], "bytes": info.nbytes}
            mine = dict(t, bytes=tensor_nbytes(t["dtype"], t["shape"]))
            for f in ("name", "dtype", "shape", "bytes"):
                if mine[f] != code[f]:
                    fail(f"{key}[{j}].{f}" if f != "bytes" else f"{key}[{j}] (dtype and shape)", mine[f], code[f])
    # A state output is updated in its input's memory, so the code has no buffer in the
    # output itself; every other output is written through one (codegen/lower.py).
    written = {prog.buffers[i].index for i in range(prog.n_buffers) if prog.buffers[i].kind == BUF_OUTPUT}
    state_out = {s["output"]: k for k, s in enumerate(m.get("state", []))}
    for j, t in enumerate(m["outputs"]):
        if t["name"] in state_out and j in written:
            fail(f"state[{state_out[t['name']]}].output", repr(t["name"]),
                 "an output the code writes itself, not a state updated in its input's memory")
        if t["name"] not in state_out and j not in written and tensor_nbytes(t["dtype"], t["shape"]):
            fail(f"outputs[{j}]", "not a state", "a state output updated in an input's memory")
    if m["arena_bytes"] != prog.arena_bytes:
        fail("arena_bytes", m["arena_bytes"], prog.arena_bytes)
    if m["constants"]["bytes"] != prog.const_bytes:
        fail("constants.bytes", m["constants"]["bytes"], prog.const_bytes)
    if len(m["kernels"]) != prog.n_steps:
        fail("kernels", f"{len(m['kernels'])} kernels", f"{prog.n_steps}")
    for i, k in enumerate(m["kernels"]):
        if k["name"] != text(prog.steps[i].name):
            fail(f"kernels[{i}].name", repr(k["name"]), repr(text(prog.steps[i].name)))


class ArtifactReport(list):
    """The compile report saved in an artifact (report.json, written by the
    compiler's ``write_report``): the rows (dicts, JSON types) of every
    reporting pass in pipeline order; ``get(pass_name)`` is one pass's rows
    ("quantize", "sparsify", ...); ``format()`` the table compile() printed."""

    def __init__(self, passes: list, text: str):
        super().__init__(row for p in passes for row in p["rows"])
        self.passes = passes
        self.text = text

    def get(self, pass_name: str) -> list | None:
        rows = [row for p in self.passes if p["pass"] == pass_name for row in p["rows"]]
        return rows if any(p["pass"] == pass_name for p in self.passes) else None

    def format(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


def read_report(path: str, manifest: dict, verify: bool = True) -> ArtifactReport | None:
    """The artifact's saved compile report (None when it has none)."""
    entry = manifest.get("report")
    if entry is None:
        return None
    rpath = artifact_file(path, entry["file"])  # read_manifest checked the entry
    try:
        if verify and sha256_file(rpath) != entry.get("sha256"):
            raise ArtifactError(f"{rpath}: content hash does not match the manifest (corrupt or modified)")
        with open(rpath) as f:
            data = json.load(f)
        return ArtifactReport(data["passes"], data["text"])
    except OSError as e:
        raise ArtifactError(f"{path}: report file {entry.get('file')!r} cannot be read ({e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{rpath}: corrupt report ({e!r})") from None


def runner_output_file(name: str) -> str:
    """The file the riscv64 runner writes output ``name`` to (runner.c's
    output_path): characters outside [A-Za-z0-9_.-], and a leading '.', become '_'."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-" or (b == 46 and i)) else "_"
                   for i, b in enumerate(name.encode())) + ".npy"


class Module:
    """A compiled model.  Call it with keyword arrays: ``m(x=arr)`` returns an
    array (a tuple for several outputs)."""

    def __init__(self, path: str, *, verify: bool = True, threads: int | None = None,
                 vlen: int | None = None, constants: str | None = None, _keep=None):
        self.path = os.path.abspath(path)
        self.manifest = m = read_manifest(self.path)
        _check_target(m["target"])
        self._keep = _keep  # a TemporaryDirectory owned by a freshly compiled module
        code = artifact_file(self.path, m["code"]["file"])
        # ``constants``: the file kept elsewhere, e.g. the one an LLM artifact's modules share
        consts = os.path.abspath(constants) if constants else artifact_file(self.path, m["constants"]["file"])
        for what, p in (("code", code), ("constants", consts)):
            if not os.path.isfile(p):
                raise ArtifactError(f"{self.path}: {what} file {os.path.basename(p)} is missing")
        if os.path.getsize(consts) != m["constants"]["bytes"]:
            raise ArtifactError(f"{consts}: {os.path.getsize(consts)} bytes, manifest says "
                                f"{m['constants']['bytes']} (truncated or replaced)")
        if verify:
            if manifest_hash(m) != m["content_hash"]:
                raise ArtifactError(f"{self.path}: manifest.json does not match its content_hash (corrupt or "
                                    "modified)")
            for what, p in (("code", code), ("constants", consts)):
                if sha256_file(p) != m[what]["sha256"]:
                    raise ArtifactError(f"{p}: content hash does not match the manifest (corrupt or modified)")
        check_elf(code, m["target"]["triple"])
        self.report = read_report(self.path, m, verify)
        self.ir = None
        self._code, self._consts_path = code, consts
        self._native = None
        self._so = self._open_code() if m["target"]["name"] == "host" else None
        self._in_specs = [(t["name"], _NP[t["dtype"]], tuple(t["shape"])) for t in m["inputs"]]
        self._out_specs = [(t["name"], _NP[t["dtype"]], tuple(t["shape"])) for t in m["outputs"]]
        # State (compile(state=...)): inputs the Module keeps between calls, each
        # updated by the run into its output (host: in place, in the same memory).
        self._state = {s["input"]: s["output"] for s in m.get("state", [])}
        self._state_of = {o: i for i, o in self._state.items()}
        self.state = types.MappingProxyType(
            {n: np.zeros(shape, dtype) for n, dtype, shape in self._in_specs if n in self._state})
        self._lock = threading.Lock()
        self.threads = threads if threads is not None else m.get("threads", 0)
        self.vlen = vlen or m["target"].get("vlen", 256)
        # extra qemu -cpu properties, e.g. "rvv_ta_all_1s=on,rvv_ma_all_1s=on" (tests use it to
        # make code that leans on undisturbed tail or masked-off elements fail)
        self.qemu_options = ""

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def input_names(self) -> list[str]:
        return [s[0] for s in self._in_specs]

    @property
    def output_names(self) -> list[str]:
        return [s[0] for s in self._out_specs]

    def __repr__(self) -> str:
        sig = ", ".join(f"{n}: {t['dtype']}{list(t['shape'])}" for n, t in
                        zip(self.input_names, self.manifest["inputs"]))
        return f"<sqk.Module {self.manifest['name']}({sig}) target={self.target} at {self.path}>"

    # --- running ---------------------------------------------------------------
    def __call__(self, **inputs):
        """Run on the non-state inputs; returns the non-state outputs.  State
        arrays (``self.state``) are read and updated in place: on the host the
        kernels work in their memory (no copy per call); riscv64 round-trips
        them through the runner's files (a copy each way)."""
        arrays = self._full_inputs(inputs)
        outs = [self.state[self._state_of[name]] if name in self._state_of else np.empty(shape, dtype)
                for name, dtype, shape in self._out_specs]
        if self.target == "host":
            self._run_host(list(arrays.values()), outs)
        else:
            outs = self._run_runner(arrays)
            for (name, _, _), a in zip(self._out_specs, outs):
                if name in self._state_of:
                    self.state[self._state_of[name]][...] = a
        outs = [a for (name, _, _), a in zip(self._out_specs, outs) if name not in self._state_of]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _full_inputs(self, inputs: dict) -> dict:
        """Every program input in order: the checked call inputs and the state arrays."""
        given = [n for n in inputs if n in self._state]
        if given:
            raise ValueError(f"input(s) {', '.join(given)} are state kept by the module between calls: write "
                             f"m.state[{given[0]!r}][...] instead (m.reset_state() zeroes it)")
        arrays = check_inputs([s for s in self._in_specs if s[0] not in self._state], inputs)
        return {n: self.state[n] if n in self._state else arrays[n] for n, _, _ in self._in_specs}

    def share_state(self, other: "Module") -> None:
        """Use ``other``'s state arrays as this module's own (the same names,
        dtypes and shapes): two programs over one state, e.g. an LLM's prefill
        chunk and its one-token step sharing the KV caches.  Nothing is copied;
        a call of either updates the arrays both see."""
        mine = dict(self.state)
        for n, a in mine.items():
            o = other.state.get(n)
            if o is None or o.shape != a.shape or o.dtype != a.dtype:
                theirs = "none" if o is None else f"{o.dtype}{list(o.shape)}"
                raise ValueError(f"cannot share state {n!r}: this module has {a.dtype}{list(a.shape)}, "
                                 f"the other {theirs}")
        self.state = types.MappingProxyType({n: other.state[n] for n in mine})

    def share_constants(self, other: "Module") -> bool:
        """Map ``other``'s constants file instead of this module's own when both
        hold the same bytes (equal content hashes in the manifests), so modules
        compiled from one set of weights (an LLM's prefill chunk lengths) keep
        one copy in memory.  Returns whether it does; call before the first run.
        Host only: the riscv64 runner reads its artifact directory, and maps
        its constants in a process of its own per call anyway."""
        if (self.target != "host" or self._native is not None
                or self.manifest["constants"]["sha256"] != other.manifest["constants"]["sha256"]):
            return False
        self._consts_path = other._consts_path
        self._consts_owner = other   # keeps a freshly compiled module's directory, and the file, alive
        return True

    def reset_state(self) -> None:
        """Zero every state array (e.g. the KV caches, before a new sequence)."""
        with self._lock:
            for a in self.state.values():
                a.fill(0)

    def _index_hint(self, step: int, rc: int, inputs: dict) -> str:
        """What an index error of kernel ``step`` means (its manifest entry), with
        the values of the small model inputs it names as %name."""
        kernels = self.manifest.get("kernels", [])
        if rc != SQK_ERR_INDEX or not 0 <= step < len(kernels) or not kernels[step].get("index_error"):
            return ""
        text = kernels[step]["index_error"]
        vals = [f"{n} = {np.asarray(inputs[n]).reshape(-1).tolist()}" for n in re.findall(r"%([A-Za-z0-9_.]+)", text)
                if n in inputs and np.asarray(inputs[n]).size <= 8]
        return ": " + text + (f" (got {', '.join(vals)})" if vals else "")

    def _open_code(self):
        """dlopen the host code and hold the manifest against its program table
        (the source of truth for everything that sizes memory)."""
        from .ffi import load_runtime, program_from_library

        ffi, _ = load_runtime()
        try:
            so = program_from_library(self._code)
        except RuntimeError as e:
            raise ArtifactError(str(e)) from None
        check_program(ffi, so.program, self.manifest, self._code)
        return so

    def _load_native(self):
        from .ffi import load_runtime

        ffi, lib = load_runtime()
        so = self._so
        nbytes = self.manifest["constants"]["bytes"]
        consts = np.memmap(self._consts_path, np.uint8, "r") if nbytes else np.zeros(64, np.uint8)
        ctx = ffi.gc(lib.sqk_context_new(int(self.threads or 0)), lib.sqk_context_free)
        if ctx == ffi.NULL:
            raise SqkRuntimeError("could not start the runtime's thread pool")
        self._native = (ffi, lib, so, so.program, consts, ctx)

    def _run_host(self, ins, outs):
        with self._lock:
            self._run_host_locked(ins, outs)

    def _run_host_locked(self, ins, outs):
        if self._native is None:
            self._load_native()
        ffi, lib, _, prog, consts, ctx = self._native
        in_ptrs = ffi.new("void *[]", [ffi.from_buffer(a) for a in ins] or [ffi.NULL])
        out_ptrs = ffi.new("void *[]", [ffi.from_buffer(a, require_writable=True) for a in outs] or [ffi.NULL])
        rc = lib.sqk_run(ctx, prog, in_ptrs, out_ptrs, ffi.from_buffer(consts), len(consts))
        if rc != 0:
            step = lib.sqk_context_error_step(ctx)
            where = ffi.string(prog.steps[step].name).decode() if 0 <= step < prog.n_steps else "runtime"
            raise SqkRuntimeError(f"{where}: {ffi.string(lib.sqk_error_string(rc)).decode()} (code {rc})"
                                  + self._index_hint(step, rc, dict(zip(self.input_names, ins))))

    def runner_command(self) -> list[str]:
        """The command that runs this riscv64 artifact's runner here (qemu-user unless native)."""
        runner = self._code
        if platform.machine().lower() == "riscv64":
            return [runner]
        cpu = os.environ.get("SQK_QEMU_CPU") or (
            f"rv64,v=true,vext_spec=v1.0,vlen={self.vlen}" if self.manifest["target"].get("vector", True)
            else "rv64,v=false") + ("," + self.qemu_options if self.qemu_options else "")
        return [qemu_binary(), "-cpu", cpu, "-L", "/usr/riscv64-linux-gnu", runner]

    def _run_runner(self, arrays, extra=(), stdout=None):
        """Run the riscv64 runner on ``arrays``; returns the outputs.  ``extra``
        runner options; ``stdout``, a list, receives the runner's stdout."""
        with tempfile.TemporaryDirectory(prefix="sqk-run-") as tmp:
            cmd = self.runner_command() + ["--consts", self._consts_path, "--output-dir", tmp, *extra]
            if self.threads:
                cmd += ["--threads", str(self.threads)]
            for name, a in arrays.items():
                p = os.path.join(tmp, f"in_{len(cmd)}.npy")
                np.save(p, a)
                cmd += ["--input", f"{name}={p}"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError as e:
                raise SqkRuntimeError(f"cannot start the riscv64 runner ({e}): apt-get install qemu-user") from None
            if r.returncode != 0:
                msg = (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}").splitlines()[-1]
                step = re.search(r"step (\d+) .*\(code (\d+)\)", msg)
                hint = self._index_hint(int(step[1]), int(step[2]), arrays) if step else ""
                raise SqkRuntimeError(f"riscv64 runner failed: {msg}{hint}")
            if stdout is not None:
                stdout.append(r.stdout)
            outs = []
            for name, dtype, shape in self._out_specs:
                try:
                    a = np.load(os.path.join(tmp, runner_output_file(name)), allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise SqkRuntimeError(f"riscv64 runner wrote no readable output {name!r} ({e}); the manifest "
                                          "does not describe this runner") from None
                if a.dtype != dtype or a.shape != shape:
                    raise SqkRuntimeError(f"runner wrote {name} as {a.dtype}{list(a.shape)}, "
                                          f"expected {dtype}{list(shape)}")
                outs.append(a)
            return outs

    # --- profiling ---------------------------------------------------------------
    def profile(self, runs: int = 10, warmup: int = 1, **inputs) -> Profile:
        """Run the model ``runs`` times (after ``warmup`` untimed runs) with the
        runtime's per-kernel timer on; return a Profile: per kernel its calls,
        median ms, bytes and FLOPs (from the manifest) and the rates.  The timer
        is turned off again afterwards.  riscv64 runs ``runs + warmup`` times in
        one runner process (``--runs --profile``): emulated times under qemu."""
        if runs < 1 or warmup < 0:
            raise ValueError(f"profile needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
        arrays = self._full_inputs(inputs)  # state arrays are updated by every run
        kernels = self.manifest["kernels"]
        if self.target == "host":
            per_run, calls, wall, threads = self._profile_host(list(arrays.values()), runs, warmup)
        else:
            per_run, calls, wall, threads = self._profile_runner(arrays, runs, warmup)
        if len(calls) != len(kernels):
            raise ArtifactError(f"{self.path}: the code has {len(calls)} kernels, the manifest {len(kernels)}")
        return Profile.from_times(kernels, per_run, calls, threads=threads, target=self.target, wall_s=wall)

    def _profile_host(self, ins, runs, warmup):
        outs = [np.empty(shape, dtype) for _, dtype, shape in self._out_specs]
        with self._lock:  # the whole profile: another thread's call would count too
            for _ in range(warmup):
                self._run_host_locked(ins, outs)
            if self._native is None:  # no warm-up ran
                self._load_native()
            ffi, lib, _, prog, _, ctx = self._native
            n = prog.n_steps
            sp = ffi.new("sqk_step_profile *")
            if lib.sqk_set_profile(ctx, 1) != 0:
                raise SqkRuntimeError("could not turn the runtime's profile on")
            try:
                prev, per_run, wall = [0] * n, [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    self._run_host_locked(ins, outs)
                    wall.append(time.perf_counter() - t0)
                    row = []
                    for i in range(n):
                        lib.sqk_profile(ctx, i, sp)
                        row.append(sp.ns - prev[i])
                        prev[i] = sp.ns
                    per_run.append(row)
                calls = []
                for i in range(n):
                    lib.sqk_profile(ctx, i, sp)
                    calls.append(sp.calls)
            finally:
                lib.sqk_set_profile(ctx, 0)
            return per_run, calls, wall, lib.sqk_context_threads(ctx)

    def _profile_runner(self, arrays, runs, warmup):
        out: list[str] = []
        t0 = time.perf_counter()
        self._run_runner(arrays, extra=["--runs", str(runs + warmup), "--profile"], stdout=out)
        wall = [(time.perf_counter() - t0) / (runs + warmup)]
        times: dict[int, dict[int, int]] = {}
        for line in out[0].splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "profile":
                times.setdefault(int(parts[1]), {})[int(parts[2])] = int(parts[3])
        n = len(self.manifest["kernels"])
        per_run = [[times[r].get(i, 0) for i in range(n)] for r in sorted(times) if r >= warmup]
        if len(per_run) != runs:
            raise SqkRuntimeError(f"riscv64 runner printed a profile of {len(per_run)} runs, expected {runs}")
        calls = [sum(i in times[r] for r in sorted(times) if r >= warmup) for i in range(n)]
        threads = int(self.threads or os.environ.get("SQK_NUM_THREADS") or os.cpu_count() or 1)
        return per_run, calls, wall, threads

    # --- saving --------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Copy the artifact to ``path`` (a directory); written under a temporary
        name and renamed, so a failure never leaves a half-written artifact.  The
        temporary directories of saves into the same parent that were killed are
        removed first (``clean_stale_saves``)."""
        path = os.path.abspath(path)
        if path == self.path:
            return
        parent = os.path.dirname(path) or "."
        clean_stale_saves(parent)
        tmp = tempfile.mkdtemp(prefix=SAVE_PREFIX, dir=parent)
        lock = _hold_save_lock(tmp)
        try:
            for f in os.listdir(self.path):
                shutil.copy2(os.path.join(self.path, f), os.path.join(tmp, f))
            os.unlink(os.path.join(tmp, SAVE_LOCK))  # still held (the descriptor) until the rename
            if os.path.isdir(path):
                if not os.path.isfile(os.path.join(path, "manifest.json")):
                    raise FileExistsError(f"{path} exists and is not an sqk artifact; not overwriting it")
            replace_dir(tmp, path)   # an existing artifact ends up in tmp: removed below
        finally:
            os.close(lock)
            if os.path.islink(tmp):  # path was a symlink, swapped out: the link goes, not its target
                os.unlink(tmp)
            elif os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished directory ``tmp`` to ``path``.  An existing directory there is
    swapped atomically (``_exchange``: then ``tmp`` holds the old one, for the caller to
    remove), or, where that is unsupported, renamed away and removed."""
    if not os.path.isdir(path):
        os.replace(tmp, path)
    elif not _exchange(tmp, path):  # no atomic swap here: two renames
        old = path + f".old{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE), so an
    artifact being overwritten is never missing; False where that is unsupported."""
    import ctypes
    import errno

    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


SAVE_PREFIX = ".sqk-save-"
SAVE_LOCK = ".lock"
STALE_SAVE_SECONDS = 3600  # a save directory without a lock older than this is a dead one


def _hold_save_lock(tmp: str) -> int:
    """Take an exclusive flock on ``tmp``/.lock for as long as the returned
    descriptor is open: the kernel drops it when the saving process dies, which
    is how ``clean_stale_saves`` tells a killed save from a running one.  Locked
    under another name, then renamed, so the lock file is never seen unlocked."""
    import fcntl

    fd, name = tempfile.mkstemp(prefix=".locking-", dir=tmp)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(name, os.path.join(tmp, SAVE_LOCK))
    return fd


def clean_stale_saves(parent: str) -> list[str]:
    """Remove the ``.sqk-save-*`` directories in ``parent`` left by saves that were
    killed: those whose lock no process holds, and those without a lock (a save
    of an older sqk, or one killed before it took the lock) older than
    ``STALE_SAVE_SECONDS``.  A running save holds its lock, so it is never
    touched.  Returns the paths removed; errors (permissions) are ignored."""
    import fcntl

    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(SAVE_PREFIX)]
    except OSError:
        return removed
    for name in names:
        d = os.path.join(parent, name)
        try:
            if os.path.islink(d) or not os.path.isdir(d):
                continue
            try:
                fd = os.open(os.path.join(d, SAVE_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                if time.time() - os.lstat(d).st_mtime < STALE_SAVE_SECONDS:
                    continue  # just created, or about to be renamed into place
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                finally:
                    os.close(fd)
            shutil.rmtree(d)
            removed.append(d)
        except OSError:
            continue
    return removed


def load(path: str, *, verify: bool = True, threads: int | None = None, vlen: int | None = None) -> Module:
    """Load a saved artifact.  Raises ArtifactError when it cannot run here."""
    return Module(path, verify=verify, threads=threads, vlen=vlen)
