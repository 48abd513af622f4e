"""The artifact contract: the runtime ABI (version, buffer kinds, error codes,
dtype codes, the program table's struct layouts), the storage layout of
constants, and the manifest schema (``write_manifest``, ``read_manifest``,
``validate_manifest``).

One place for what codegen, the driver and the loader must agree on (the C
side is runtime/sqk_runtime.h; tests/test_abi.py holds these against it).  The manifest is validated field by field here; a
problem is an ``ArtifactError`` that names the field (``outputs[0].shape``).
Depends on the standard library and ``sqk.ir.dtypes`` only: a deployed
artifact loads without the compiler.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from ..ir import dtypes

FORMAT = "sqk-artifact"
FORMAT_VERSION = 1
ABI_VERSION = 1                      # SQK_ABI_VERSION
BUF_INPUT, BUF_OUTPUT, BUF_CONST, BUF_ARENA = 0, 1, 2, 3   # SQK_BUF_*
# Error codes (SQK_OK, SQK_ERR_*): kernels and runtime calls return them instead of aborting.
OK = 0
ERR_NOMEM = 1        # allocation of the arena or scratch failed
ERR_THREADS = 2      # the thread pool could not be started
ERR_ABI = 3          # program built for another ABI version
ERR_INDEX = 4        # an index input (gather ids) was out of range: the kernel's manifest index_error says which
ERR_ARGS = 5         # bad arguments to a runtime call
ERR_IO = 6           # runner: a file could not be read or written
ERR_FORMAT = 7       # runner: an input file has the wrong dtype/shape/format
ERR_CPU = 8          # runner: the CPU lacks a feature the program needs
ERRORS = {"OK": OK, "ERR_NOMEM": ERR_NOMEM, "ERR_THREADS": ERR_THREADS, "ERR_ABI": ERR_ABI, "ERR_INDEX": ERR_INDEX,
          "ERR_ARGS": ERR_ARGS, "ERR_IO": ERR_IO, "ERR_FORMAT": ERR_FORMAT, "ERR_CPU": ERR_CPU}   # SQK_<key>
# dtype codes (SQK_F32 ...) of tensor infos: the IR's numbering (ir.dtypes, the bottom layer, defines it).
DTYPE_CODES = {d.name: d.code for d in dtypes.ALL}
ALIGN = 64           # constants (and arena buffers) start at multiples of this many bytes
# The program table's structs, field by field as in sqk_runtime.h.  Every field is 8 bytes, an
# int64_t ("i64") or a pointer ("ptr"), so one layout holds on every 64-bit target without padding.
STRUCTS = {
    "sqk_buffer": (("kind", "i64"), ("index", "i64"), ("nbytes", "i64")),
    "sqk_step": (("name", "ptr"), ("fn", "ptr"), ("args", "ptr"), ("n_args", "i64"), ("range", "i64"),
                 ("grain", "i64")),
    "sqk_tensor_info": (("name", "ptr"), ("dtype", "i64"), ("rank", "i64"), ("shape", "ptr"), ("nbytes", "i64")),
    "sqk_program": (("abi_version", "i64"), ("name", "ptr"), ("n_inputs", "i64"), ("inputs", "ptr"),
                    ("n_outputs", "i64"), ("outputs", "ptr"), ("n_buffers", "i64"), ("buffers", "ptr"),
                    ("n_steps", "i64"), ("steps", "ptr"), ("arena_bytes", "i64"), ("const_bytes", "i64"),
                    ("needs_vector", "i64")),
}
INT64_MAX = (1 << 63) - 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB; refuse to parse a giant one
IO_DTYPES = {d.name: d for d in dtypes.IO}   # dtypes a model takes and returns

# A file an artifact names: one plain component (no separator, no "..", not hidden).
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    """An artifact that cannot be loaded here: corrupt, tampered with, of another format or target."""


def manifest_hash(manifest: dict) -> str:
    """The manifest's ``content_hash``: sha256 of its canonical JSON (keys sorted,
    ``content_hash`` itself left out).  An integrity check against accidental
    damage, not an authentication: anyone who edits the manifest can recompute
    it, so the loader also checks every field that sizes memory against the
    program table of the code (``Module``)."""
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def storage_bytes(arr: np.ndarray, dtype) -> bytes:
    """Bytes of a constant in its plain layout (``dtype`` an ir DType), as
    kernels read it unless their packer chose another (codegen.lower.PACKERS):
    little-endian, C order; i4 packs two values per byte, element 2i in the
    low nibble, 2i+1 in the high one (an odd count leaves the last high nibble 0)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if dtype.name == "i4":
        u = (flat.astype(np.int16) & 0xF).astype(np.uint8)
        if u.size % 2:
            u = np.append(u, np.uint8(0))
        return (u[0::2] | (u[1::2] << 4)).tobytes()
    return flat.astype(flat.dtype.newbyteorder("<")).tobytes()


def from_storage(data: bytes, dtype, shape) -> np.ndarray:
    """The inverse of :func:`storage_bytes`: an array of ``dtype`` (an ir DType) and ``shape``."""
    size = 1
    for d in shape:
        size *= d
    if dtype.name == "i4":
        u = np.frombuffer(data, np.uint8)
        nib = np.stack([u & 0xF, u >> 4], axis=1).reshape(-1)[:size].astype(np.int8)
        return np.where(nib > 7, nib - 16, nib).astype(np.int8).reshape(shape)
    arr = np.frombuffer(data, dtype.np_dtype.newbyteorder("<"), count=size)
    return arr.astype(dtype.np_dtype).reshape(shape)


def tensor_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of a valid IO ``dtype`` name and ``shape``."""
    n = IO_DTYPES[dtype].nbytes(1)
    for d in shape:
        n *= d
    return n


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str):
        raise ArtifactError(f"{self.where}: manifest field {field}: {problem}")

    def get(self, obj: dict, key: str, field: str, kind, optional: bool = False):
        if key not in obj:
            if optional:
                return None
            self.fail(field, "missing")
        v = obj[key]
        if kind is int:
            self.int(v, field)
        elif not isinstance(v, kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(field, f"{v!r} is a {type(v).__name__}, expected a {want}")
        return v

    def int(self, v, field: str, lo: int = 0, hi: int = INT64_MAX) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(field, f"{v!r} is a {type(v).__name__}, expected an integer")
        if not lo <= v <= hi:
            self.fail(field, f"{v} is outside [{lo}, {hi}]")
        return v

    def file_entry(self, entry, field: str, sized: bool = False):
        if not isinstance(entry, dict):
            self.fail(field, f"expected an object with 'file' and 'sha256', got {type(entry).__name__}")
        name = self.get(entry, "file", f"{field}.file", str)
        if not _FILE_NAME.fullmatch(name) or name in (".", ".."):
            self.fail(f"{field}.file", f"{name!r} is not a plain file name inside the artifact directory")
        digest = self.get(entry, "sha256", f"{field}.sha256", str)
        if not _SHA256.fullmatch(digest):
            self.fail(f"{field}.sha256", f"{digest!r} is not a sha256 hex digest")
        if sized:
            self.get(entry, "bytes", f"{field}.bytes", int)

    def tensors(self, m: dict, key: str) -> dict:
        specs = self.get(m, key, key, list)
        names = {}
        for j, t in enumerate(specs):
            f = f"{key}[{j}]"
            if not isinstance(t, dict):
                self.fail(f, f"expected an object, got {type(t).__name__}")
            name = self.get(t, "name", f + ".name", str)
            if not name or (key == "inputs" and name in names):  # an output may be returned twice
                self.fail(f + ".name", f"{name!r} is empty or repeated")
            dtype = self.get(t, "dtype", f + ".dtype", str)
            if dtype not in IO_DTYPES:
                self.fail(f + ".dtype", f"{dtype!r} is not one of {', '.join(IO_DTYPES)}")
            shape = self.get(t, "shape", f + ".shape", list)
            if len(shape) > 32:
                self.fail(f + ".shape", f"rank {len(shape)} is more than 32")
            for i, d in enumerate(shape):
                self.int(d, f"{f}.shape[{i}]")
            if tensor_nbytes(dtype, shape) > INT64_MAX:
                self.fail(f + ".shape", f"{shape} of {dtype} is more than 2^63-1 bytes")
            names.setdefault(name, (dtype, tensor_nbytes(dtype, shape)))
        return names


def validate_manifest(m, where: str = "manifest.json") -> dict:
    """``m`` (parsed manifest.json) if it follows the schema; else ArtifactError
    naming the first bad field.  ``where`` prefixes the messages."""
    c = _Checker(where)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not an sqk artifact manifest")
    v = m.get("format_version")
    if v != FORMAT_VERSION or isinstance(v, bool) or not isinstance(v, int):
        shown = f"{v!r} (a {type(v).__name__})" if not isinstance(v, int) or isinstance(v, bool) else str(v)
        raise ArtifactError(f"{where}: artifact format version {shown}, this sqk reads version {FORMAT_VERSION} "
                            f"(the integer); recompile the model")
    c.get(m, "name", "name", str)
    c.get(m, "sqk_version", "sqk_version", str)
    c.get(m, "pipeline", "pipeline", str)
    t = c.get(m, "target", "target", dict)
    c.get(t, "name", "target.name", str)
    c.get(t, "triple", "target.triple", str)
    c.get(t, "cpu", "target.cpu", str)
    feats = c.get(t, "required_features", "target.required_features", list, optional=True) or []
    for i, f in enumerate(feats):
        if not isinstance(f, str):
            c.fail(f"target.required_features[{i}]", f"{f!r} is not a string")
    if "vlen" in t:
        c.int(t["vlen"], "target.vlen", 32, 65536)
    if "vector" in t and not isinstance(t["vector"], bool):
        c.fail("target.vector", f"{t['vector']!r} is not true or false")
    ins, outs = c.tensors(m, "inputs"), c.tensors(m, "outputs")
    c.get(m, "arena_bytes", "arena_bytes", int)
    c.get(m, "intermediate_bytes", "intermediate_bytes", int)
    c.int(c.get(m, "threads", "threads", int), "threads", 0, 1 << 20)
    for j, k in enumerate(c.get(m, "kernels", "kernels", list)):
        f = f"kernels[{j}]"
        if not isinstance(k, dict):
            c.fail(f, f"expected an object, got {type(k).__name__}")
        c.get(k, "name", f + ".name", str)
        for key in ("range", "grain", "bytes", "flops"):
            c.get(k, key, f"{f}.{key}", int, optional=key in ("bytes", "flops"))
        c.get(k, "index_error", f + ".index_error", str, optional=True)
    c.file_entry(c.get(m, "code", "code", dict), "code")
    c.file_entry(c.get(m, "constants", "constants", dict), "constants", sized=True)
    if "report" in m:
        c.file_entry(m["report"], "report")
    # any other entry naming a file (whatever a later format adds) is confined too
    for key, entry in m.items():
        if key not in ("code", "constants", "report") and isinstance(entry, dict) and "file" in entry:
            c.file_entry(entry, key)
    seen_in, seen_out = set(), set()
    for j, s in enumerate(c.get(m, "state", "state", list, optional=True) or []):
        f = f"state[{j}]"
        if not isinstance(s, dict):
            c.fail(f, f"expected an object, got {type(s).__name__}")
        i, o = c.get(s, "input", f + ".input", str), c.get(s, "output", f + ".output", str)
        if i not in ins or i in seen_in:
            c.fail(f + ".input", f"{i!r} is not an input, or is the state of two entries")
        if o not in outs or o in seen_out:
            c.fail(f + ".output", f"{o!r} is not an output, or is the state of two entries")
        if ins[i] != outs[o]:
            c.fail(f, f"input {i!r} is {ins[i][0]} of {ins[i][1]} bytes, its output {o!r} {outs[o][0]} of "
                      f"{outs[o][1]} bytes: a state must be updated in its own memory")
        seen_in.add(i)
        seen_out.add(o)
    h = c.get(m, "content_hash", "content_hash", str)
    if not _SHA256.fullmatch(h):
        c.fail("content_hash", f"{h!r} is not a sha256 hex digest")
    return m


def read_manifest(path: str) -> dict:
    """The manifest of the artifact directory ``path``, checked against the
    schema (``abi.validate_manifest``); ArtifactError naming the problem."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an artifact directory")
    try:
        with open(mpath, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath}: more than {MAX_MANIFEST_BYTES >> 20} MB, not a manifest")
        m = json.loads(data.decode())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no manifest.json (not an sqk artifact, or a failed save)") from None
    except OSError as e:
        raise ArtifactError(f"{mpath}: cannot be read ({e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    return validate_manifest(m, mpath)


def write_manifest(out: str, manifest: dict) -> None:
    """Write ``out``/manifest.json with its content hash (over everything else in it),
    checked against the schema first: the compiler never writes what the loader refuses."""
    manifest["content_hash"] = manifest_hash(manifest)
    validate_manifest(manifest, os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


ELF_MACHINE = {"x86_64": 62, "aarch64": 183, "riscv64": 243}   # e_machine of a triple's architecture


def check_elf(path: str, triple: str) -> None:
    """ArtifactError unless ``path`` is a 64-bit little-endian ELF file for the
    architecture of ``triple`` whose program and section headers, and the
    segments they describe, lie inside the file (dlopen of a truncated library
    maps pages past its end: the first touch is a SIGBUS)."""
    arch = triple.split("-")[0]
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                raise ArtifactError(f"{path}: not a 64-bit little-endian ELF file (corrupt or replaced)")
            machine = int.from_bytes(head[18:20], "little")
            if arch in ELF_MACHINE and machine != ELF_MACHINE[arch]:
                raise ArtifactError(f"{path}: code for ELF machine {machine}, the manifest's target is {triple}")
            u = lambda b, at, n: int.from_bytes(b[at:at + n], "little")  # noqa: E731
            phoff, shoff = u(head, 32, 8), u(head, 40, 8)
            phentsize, phnum, shentsize, shnum = u(head, 54, 2), u(head, 56, 2), u(head, 58, 2), u(head, 60, 2)
            if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size or \
                    (phnum and phentsize < 56):
                raise ArtifactError(f"{path}: ELF headers past the end of the file (truncated)")
            f.seek(phoff)
            table = f.read(phnum * phentsize)
            for i in range(phnum):
                ph = table[i * phentsize:(i + 1) * phentsize]
                if u(ph, 8, 8) + u(ph, 32, 8) > size:  # p_offset + p_filesz
                    raise ArtifactError(f"{path}: ELF segment {i} past the end of the file (truncated)")
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read ({e})") from None


def artifact_file(path: str, name: str) -> str:
    """The path of file ``name`` (validated by ``validate_manifest``) of the
    artifact directory ``path``: it must resolve, through any symlinks, to a
    regular file directly inside the directory."""
    p = os.path.join(path, name)
    real_dir = os.path.realpath(path)
    real = os.path.realpath(p)
    if os.path.dirname(real) != real_dir:
        raise ArtifactError(f"{p}: resolves to {real}, outside the artifact directory (a symlink out of it)")
    if os.path.exists(real) and not os.path.isfile(real):
        raise ArtifactError(f"{p}: not a regular file")
    return p
