"""llama.cpp as a benchmark peer: built on first use from the sources that the
PyPI package ``llama-cpp-python`` vendors, cached outside the repository.

``tools()`` returns the directory holding ``llama-bench``, ``llama-quantize``,
``llama-perplexity`` and ``llama-simple``, building them if they are missing:
``pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`` (the
sdist), unpacked; cmake on its ``vendor/llama.cpp`` (Release, ``GGML_NATIVE``
so the kernels fit this CPU, static libraries, no server, tests, network
code), only those four targets, ``-j2``.  The cache directory is
``$SQK_LLAMA_CPP_DIR`` or ``~/.cache/sqk/peers/llama.cpp-py<VERSION>``; a
directory that already holds the four binaries is used as it is (so a
llama.cpp built elsewhere can be pointed to).  No llama.cpp code is part of
sqk.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"      # llama-cpp-python release whose vendored llama.cpp is built
TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-simple")
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=ON"]


class PeerUnavailable(RuntimeError):
    """llama.cpp cannot be built here (no cmake, no compiler, no sdist)."""


def cache_dir() -> Path:
    env = os.environ.get("SQK_LLAMA_CPP_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sqk" / "peers" / f"llama.cpp-py{VERSION}"


def _find(root: Path) -> Path | None:
    """The directory under root holding every tool (root itself, root/bin or a build's bin)."""
    for d in (root, root / "bin", root / "build" / "bin"):
        if all((d / t).is_file() and os.access(d / t, os.X_OK) for t in TOOLS):
            return d
    return None


def build_info() -> str:
    """What was built and how long it took (written by the build), or ''."""
    p = cache_dir() / "BUILD_INFO"
    return p.read_text().strip() if p.is_file() else ""


def tools(log=print) -> Path:
    """The directory of the llama.cpp tools, built first if needed."""
    root = cache_dir()
    found = _find(root)
    if found is not None:
        return found
    missing = [t for t in ("cmake", "cc", "c++") if shutil.which(t) is None]
    if missing:
        raise PeerUnavailable(f"building llama.cpp needs {', '.join(missing)} on PATH (or set SQK_LLAMA_CPP_DIR "
                              f"to a directory holding {', '.join(TOOLS)})")
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.is_file():
            log(f"llama.cpp peer: downloading the llama-cpp-python {VERSION} sdist into {root}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                f"llama-cpp-python=={VERSION}", "-d", str(root)],
                               capture_output=True, text=True)
            if r.returncode != 0 or not sdist.is_file():
                raise PeerUnavailable(f"pip download of llama-cpp-python=={VERSION} failed:\n{r.stderr[-2000:]}")
        with tarfile.open(sdist) as tf:
            tf.extractall(root, filter="data")
        if not (src / "CMakeLists.txt").is_file():
            raise PeerUnavailable(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    build = root / "build"
    log(f"llama.cpp peer: building {', '.join(TOOLS)} in {build} (cmake, -j2; takes several minutes)")
    t0 = time.perf_counter()
    steps = [["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
              *CMAKE_OPTIONS],
             ["cmake", "--build", str(build), "-j2", "--target", *TOOLS]]
    with open(root / "build.log", "w") as logf:
        for cmd in steps:
            r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise PeerUnavailable(f"llama.cpp build failed ({' '.join(cmd[:2])}); see {root / 'build.log'}")
    secs = time.perf_counter() - t0
    found = _find(root)
    if found is None:
        raise PeerUnavailable(f"llama.cpp build finished but {', '.join(TOOLS)} are not all in {build / 'bin'}")
    (root / "BUILD_INFO").write_text(f"llama-cpp-python {VERSION} sdist, vendored llama.cpp, "
                                     f"{' '.join(CMAKE_OPTIONS)}; built in {secs:.0f} s with -j2\n")
    log(f"llama.cpp peer: built in {secs:.0f} s")
    return found


def version(bindir: Path) -> str:
    """llama.cpp's own version line (``llama-bench --version``)."""
    r = subprocess.run([str(bindir / "llama-bench"), "--version"], capture_output=True, text=True)
    lines = (r.stdout + r.stderr).strip().splitlines()
    return lines[0] if lines else "?"
