"""Module: a compiled model, loaded from an artifact directory and called with
numpy arrays.

This is the deployment side: it needs numpy and cffi only (never llvmlite or
the compiler).  An artifact directory holds

    manifest.json    format version, target, inputs/outputs, arena size,
                     pipeline, file hashes (see ``ARTIFACT_FORMAT``)
    model.so         host: kernels + the ``sqk_model`` program table
    runner           riscv64: an executable (runtime + kernels)
    constants.bin    packed constants, 64-byte aligned, memory-mapped
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from ..ir import dtypes
from ..ir.reference import check_inputs

ARTIFACT_FORMAT = 1
_NP = {d.name: d.np_dtype for d in dtypes.IO}  # dtypes a model takes and returns
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "riscv64": "riscv64"}


class SqkRuntimeError(RuntimeError):
    """A compiled model failed while running (bad index, out of memory, runner error)."""


class ArtifactError(ValueError):
    """An artifact that cannot be loaded here: corrupt, of another format or target."""


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
        if arch != "riscv64" and not shutil.which(qemu_binary()):
            raise ArtifactError(f"running a riscv64 artifact on {arch} needs qemu-user "
                                f"('{qemu_binary()}' not found): apt-get install qemu-user")
    else:
        raise ArtifactError(f"unknown target {target['name']!r} in manifest")


def qemu_binary() -> str:
    return os.environ.get("SQK_QEMU", "qemu-riscv64")


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an artifact directory")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no manifest.json (not an sqk artifact, or a failed save)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "sqk-artifact":
        raise ArtifactError(f"{mpath}: not an sqk artifact manifest")
    if m.get("format_version") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{mpath}: artifact format version {m.get('format_version')}, this sqk reads "
                            f"version {ARTIFACT_FORMAT}; recompile the model")
    try:
        for io in m["inputs"] + m["outputs"]:
            if io["dtype"] not in _NP or not all(isinstance(d, int) and d >= 0 for d in io["shape"]):
                raise ValueError(f"bad tensor entry {io}")
        for key in ("code", "constants"):
            m[key]["file"], m[key]["sha256"]
        int(m["constants"]["bytes"])
        m["target"]["name"], m["target"]["triple"]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{mpath}: incomplete manifest ({e!r})") from None
    return m


class Module:
    """A compiled model.  Call it with keyword arrays: ``m(x=arr)`` returns an
    array (a tuple for several outputs)."""

    def __init__(self, path: str, *, verify: bool = True, threads: int | None = None,
                 vlen: int | None = None, _keep=None):
        self.path = os.path.abspath(path)
        self.manifest = m = read_manifest(self.path)
        _check_target(m["target"])
        self._keep = _keep  # a TemporaryDirectory owned by a freshly compiled module
        self.report = None
        self.ir = None
        code = os.path.join(self.path, m["code"]["file"])
        consts = os.path.join(self.path, m["constants"]["file"])
        for what, p in (("code", code), ("constants", consts)):
            if not os.path.isfile(p):
                raise ArtifactError(f"{self.path}: {what} file {os.path.basename(p)} is missing")
        if os.path.getsize(consts) != m["constants"]["bytes"]:
            raise ArtifactError(f"{consts}: {os.path.getsize(consts)} bytes, manifest says "
                                f"{m['constants']['bytes']} (truncated or replaced)")
        if verify:
            for what, p in (("code", code), ("constants", consts)):
                if sha256_file(p) != m[what]["sha256"]:
                    raise ArtifactError(f"{p}: content hash does not match the manifest (corrupt or modified)")
        self._in_specs = [(t["name"], _NP[t["dtype"]], tuple(t["shape"])) for t in m["inputs"]]
        self._out_specs = [(t["name"], _NP[t["dtype"]], tuple(t["shape"])) for t in m["outputs"]]
        self._lock = threading.Lock()
        self.threads = threads if threads is not None else m.get("threads", 0)
        self.vlen = vlen or m["target"].get("vlen", 256)
        # extra qemu -cpu properties, e.g. "rvv_ta_all_1s=on,rvv_ma_all_1s=on" (tests use it to
        # make code that leans on undisturbed tail or masked-off elements fail)
        self.qemu_options = ""
        self._code, self._consts_path = code, consts
        self._native = None

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
        arrays = check_inputs(self._in_specs, inputs)
        outs = [np.empty(shape, dtype) for _, dtype, shape in self._out_specs]
        if self.target == "host":
            self._run_host(list(arrays.values()), outs)
        else:
            outs = self._run_runner(arrays)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _load_native(self):
        from .ffi import load_runtime, program_from_library

        ffi, lib = load_runtime()
        so = program_from_library(self._code)
        prog = so.program
        if prog.abi_version != lib.SQK_ABI_VERSION:
            raise ArtifactError(f"{self._code}: runtime ABI {prog.abi_version}, this sqk has {lib.SQK_ABI_VERSION}")
        nbytes = self.manifest["constants"]["bytes"]
        consts = np.memmap(self._consts_path, np.uint8, "r") if nbytes else np.zeros(64, np.uint8)
        ctx = ffi.gc(lib.sqk_context_new(int(self.threads or 0)), lib.sqk_context_free)
        if ctx == ffi.NULL:
            raise SqkRuntimeError("could not start the runtime's thread pool")
        self._native = (ffi, lib, so, prog, consts, ctx)

    def _run_host(self, ins, outs):
        with self._lock:
            if self._native is None:
                self._load_native()
            ffi, lib, _, prog, consts, ctx = self._native
            in_ptrs = ffi.new("void *[]", [ffi.from_buffer(a) for a in ins] or [ffi.NULL])
            out_ptrs = ffi.new("void *[]", [ffi.from_buffer(a, require_writable=True) for a in outs] or [ffi.NULL])
            rc = lib.sqk_run(ctx, prog, in_ptrs, out_ptrs, ffi.from_buffer(consts), len(consts))
            if rc != 0:
                step = lib.sqk_context_error_step(ctx)
                where = ffi.string(prog.steps[step].name).decode() if 0 <= step < prog.n_steps else "runtime"
                raise SqkRuntimeError(f"{where}: {ffi.string(lib.sqk_error_string(rc)).decode()} (code {rc})")

    def runner_command(self) -> list[str]:
        """The command that runs this riscv64 artifact's runner here (qemu-user unless native)."""
        runner = self._code
        if platform.machine().lower() == "riscv64":
            return [runner]
        cpu = os.environ.get("SQK_QEMU_CPU") or (
            f"rv64,v=true,vext_spec=v1.0,vlen={self.vlen}" if self.manifest["target"].get("vector", True)
            else "rv64,v=false") + ("," + self.qemu_options if self.qemu_options else "")
        return [qemu_binary(), "-cpu", cpu, "-L", "/usr/riscv64-linux-gnu", runner]

    def _run_runner(self, arrays):
        with tempfile.TemporaryDirectory(prefix="sqk-run-") as tmp:
            cmd = self.runner_command() + ["--consts", self._consts_path, "--output-dir", tmp]
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
                raise SqkRuntimeError(f"riscv64 runner failed: {msg}")
            outs = []
            for name, dtype, shape in self._out_specs:
                a = np.load(os.path.join(tmp, f"{name}.npy"), allow_pickle=False)
                if a.dtype != dtype or a.shape != shape:
                    raise SqkRuntimeError(f"runner wrote {name} as {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
                outs.append(a)
            return outs

    # --- saving --------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Copy the artifact to ``path`` (a directory); written under a temporary
        name and renamed, so a failure never leaves a half-written artifact."""
        path = os.path.abspath(path)
        if path == self.path:
            return
        parent = os.path.dirname(path) or "."
        tmp = tempfile.mkdtemp(prefix=".sqk-save-", dir=parent)
        try:
            for f in os.listdir(self.path):
                shutil.copy2(os.path.join(self.path, f), os.path.join(tmp, f))
            if os.path.isdir(path):
                if not os.path.isfile(os.path.join(path, "manifest.json")):
                    raise FileExistsError(f"{path} exists and is not an sqk artifact; not overwriting it")
                old = path + f".old{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def load(path: str, *, verify: bool = True, threads: int | None = None, vlen: int | None = None) -> Module:
    """Load a saved artifact.  Raises ArtifactError when it cannot run here."""
    return Module(path, verify=verify, threads=threads, vlen=vlen)
