"""Build and load the sqk C runtime through cffi (API mode).

The runtime (``sqk_runtime.c`` + ``sqk_runtime.h`` next to this file, with
the host decode loop ``sqk_llm.c`` / ``sqk_llm.h`` and the sampler it draws
with, ``sqk_sample.c``) is compiled once per (runtime source, Python ABI, cffi version) into a small
extension module ``_sqkrt`` kept in a cache directory::

    $SQK_CACHE_DIR/runtime-<hash>/_sqkrt<EXT_SUFFIX>     (default ~/.cache/sqk)

Later processes import the cached module directly, so only the first use on
a machine needs a C compiler. This module depends on the standard library and
cffi only (no numpy, no llvmlite): a deployed artifact runs without the
sqk compiler.

Public names: ``load_runtime() -> (ffi, lib)``, ``header_cdef()``,
``RUNTIME_DIR``, and ``program_from_library(path)`` to reach the
``sqk_model`` program of a compiled shared library.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import weakref

RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(RUNTIME_DIR, "sqk_runtime.h")
SOURCE = os.path.join(RUNTIME_DIR, "sqk_runtime.c")
# cffi declarations come from the cdef markers of each header; every source is compiled in
HEADERS = (HEADER, os.path.join(RUNTIME_DIR, "sqk_llm.h"))
SOURCES = (SOURCE, os.path.join(RUNTIME_DIR, "sqk_llm.c"), os.path.join(RUNTIME_DIR, "sqk_sample.c"))
DEPENDS = (os.path.join(RUNTIME_DIR, "sqk_sample.h"),)   # included by the sources: part of the build key
MODULE_NAME = "_sqkrt"

_CDEF_BEGIN = "/* cdef-begin */"
_CDEF_END = "/* cdef-end */"

_lock = threading.Lock()
_loaded = None  # (ffi, lib) once loaded


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def header_cdef(path: str = HEADER) -> str:
    """The declarations between the cdef markers of a header (sqk_runtime.h by
    default: what cffi parses of it)."""
    text = _read(path)
    try:
        start = text.index(_CDEF_BEGIN) + len(_CDEF_BEGIN)
        end = text.index(_CDEF_END, start)
    except ValueError:
        raise RuntimeError(f"{path}: the {_CDEF_BEGIN} / {_CDEF_END} markers are missing") from None
    return text[start:end]


def cache_root() -> str:
    root = os.environ.get("SQK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sqk")
    return os.path.abspath(root)


def _ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def _extra_cflags() -> str:
    """$SQK_RUNTIME_CFLAGS: extra compiler flags for the runtime (e.g. -fsanitize=address,
    see .ci/asan); part of the cache key, so each set of flags has its own build."""
    return os.environ.get("SQK_RUNTIME_CFLAGS", "")


def _build_key() -> str:
    import cffi

    h = hashlib.sha256()
    # The generated C depends on the cffi version too, so it is part of the key.
    for part in (*map(_read, HEADERS + SOURCES + DEPENDS), _ext_suffix(), cffi.__version__, _extra_cflags()):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# The build runs in a child Python so that the compiler's own output (which
# distutils/setuptools writes straight to the process's stderr) can be
# captured and put into the error message, and so that the build's global
# state (distutils, environment tweaks) never leaks into the caller.
_BUILD_SCRIPT = r"""
import os, sys, cffi
cdef_path, header_dir, sources, tmpdir, name, extra = sys.argv[1:7]
ffi = cffi.FFI()
ffi.cdef(open(cdef_path, encoding="utf-8").read())
ffi.set_source(name, '#include "sqk_runtime.h"\n#include "sqk_llm.h"', sources=sources.split(os.pathsep),
               include_dirs=[header_dir], extra_compile_args=["-O2", "-pthread"] + extra.split(),
               extra_link_args=extra.split(), libraries=["pthread"])
try:
    print(ffi.compile(tmpdir=tmpdir, verbose=False))
except Exception as e:  # the compiler's own messages are already on stderr
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
"""

_NEED_CC = (
    "a C compiler (e.g. `apt-get install gcc`) is needed once to build the sqk runtime "
    "(the result is cached in {cache}); "
)


def _build(target: str) -> None:
    """Compile the extension into `target` (atomically: temp dir, then os.replace)."""
    root = os.path.dirname(os.path.dirname(target))
    os.makedirs(root, exist_ok=True)
    cc = os.environ.get("CC", "").split()
    if not (cc and shutil.which(cc[0])) and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        raise RuntimeError(_NEED_CC.format(cache=root) + "no compiler (cc, gcc, clang or $CC) was found on PATH")
    tmp = tempfile.mkdtemp(prefix=".build-", dir=root)
    try:
        cdef_path = os.path.join(tmp, "cdef.h")
        with open(cdef_path, "w", encoding="utf-8") as f:
            f.write("\n".join(header_cdef(h) for h in HEADERS))
        proc = subprocess.run(
            [sys.executable, "-c", _BUILD_SCRIPT, cdef_path, RUNTIME_DIR, os.pathsep.join(SOURCES), tmp, MODULE_NAME,
             _extra_cflags()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp,
        )
        built = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not os.path.isfile(built):
            raise RuntimeError(
                _NEED_CC.format(cache=root) + "the build failed:\n" + proc.stdout.strip()
            )
        # Same file system, so the rename is atomic: a concurrent builder either
        # sees no file or a complete one, and the last writer wins harmlessly.
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(built, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import(path: str):
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import the sqk runtime from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_runtime():
    """Return ``(ffi, lib)`` of the compiled runtime, building it on first use."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            target = os.path.join(cache_root(), "runtime-" + _build_key(), MODULE_NAME + _ext_suffix())
            if not os.path.isfile(target):
                _build(target)
            module = _import(target)
            _loaded = (module.ffi, module.lib)
    return _loaded


class LoadedProgram:
    """A shared library opened with dlopen and a ``const sqk_program *`` into it.

    Keep this object alive as long as the program pointer is used: when it is
    collected the library is closed (dlclose), so a process that loads many
    models does not keep every one mapped.  Nothing may run the program then:
    sqk_run returns only after every pool thread has left the kernels.
    """

    def __init__(self, path: str, symbol: str = "sqk_model"):
        ffi, _ = load_runtime()
        self.path = path
        # RTLD_LOCAL: two models loaded in one process must not see each
        # other's `sqk_model` or kernel symbols.
        self._dll = ctypes.CDLL(os.path.abspath(path), mode=ctypes.RTLD_LOCAL)
        try:
            addr = ctypes.addressof(ctypes.c_char.in_dll(self._dll, symbol))
        except ValueError:
            raise RuntimeError(f"{path}: no symbol {symbol!r}; is this an sqk artifact?") from None
        self.program = ffi.cast("const sqk_program *", addr)
        weakref.finalize(self, _dlclose, self._dll._handle)


def _dlclose(handle: int) -> None:
    import _ctypes

    _ctypes.dlclose(handle)


def program_from_library(path: str, symbol: str = "sqk_model") -> LoadedProgram:
    """dlopen a compiled model library; ``.program`` is its ``const sqk_program *``."""
    try:
        return LoadedProgram(path, symbol)
    except OSError as e:  # not a loadable library for this machine
        raise RuntimeError(f"{path}: cannot load ({e})") from None
