"""The C runtime on its own, without the compiler: a hand-written C "model"
is compiled with cc, run through the cffi runtime in-process, and linked into
the runner (for the host, and for riscv64 under qemu-user)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sqk.runtime.ffi import RUNTIME_DIR, header_cdef, load_runtime, program_from_library

SQK_OK, SQK_ERR_NOMEM, SQK_ERR_THREADS, SQK_ERR_ABI, SQK_ERR_INDEX, SQK_ERR_ARGS = 0, 1, 2, 3, 4, 5

# The test model: y = 2*x + bias (through the arena), z = y.flat[ids], plus
# helper kernels for the pool tests. Buffers of sqk_model:
#   0 x (input 0)  1 ids (input 1)  2 y (output 0)  3 z (output 1)
#   4 bias (const @0)  5 t (arena @64, so arena offsets are exercised)
MODEL_C = r"""
#define _GNU_SOURCE
#include "sqk_runtime.h"
#include <unistd.h>
#include <sys/syscall.h>

#ifndef MODEL_NEEDS_VECTOR
#define MODEL_NEEDS_VECTOR 0
#endif

int32_t k_double(void **args, int64_t b, int64_t e) {
    const float *x = args[0]; float *t = args[1];
    for (int64_t i = b; i < e; i++) t[i] = 2.0f * x[i];
    return SQK_OK;
}
int32_t k_add(void **args, int64_t b, int64_t e) {
    const float *t = args[0], *c = args[1]; float *y = args[2];
    for (int64_t i = b; i < e; i++) y[i] = t[i] + c[i];
    return SQK_OK;
}
int32_t k_gather(void **args, int64_t b, int64_t e) {
    const float *y = args[0]; const int64_t *ids = args[1]; float *z = args[2];
    for (int64_t i = b; i < e; i++) {
        if (ids[i] < 0 || ids[i] >= 20) return SQK_ERR_INDEX;
        z[i] = y[ids[i]];
    }
    return SQK_OK;
}
/* Must never run: its step has range 0. */
int32_t k_never(void **args, int64_t b, int64_t e) { (void)args; (void)b; (void)e; return SQK_ERR_ARGS; }

/* log = int64 [count, (begin, end, tid) * count] */
int32_t k_record(void **args, int64_t b, int64_t e) {
    int64_t *log = args[0];
    int64_t k = __atomic_fetch_add(&log[0], 1, __ATOMIC_SEQ_CST);
    log[1 + 3 * k] = b;
    log[2 + 3 * k] = e;
    log[3 + 3 * k] = (int64_t)syscall(SYS_gettid);
    return SQK_OK;
}
/* Slow chunks, so that several pool threads must take part. */
int32_t k_record_slow(void **args, int64_t b, int64_t e) {
    usleep(20000);
    return k_record(args, b, e);
}
/* Fails on the chunk holding element *args[0]. */
int32_t k_fail_at(void **args, int64_t b, int64_t e) {
    int64_t bad = *(const int64_t *)args[0];
    return (bad >= b && bad < e) ? SQK_ERR_INDEX : SQK_OK;
}

static const int64_t shape_x[] = {4, 5};
static const int64_t shape_ids[] = {3};
static const sqk_tensor_info model_inputs[] = {
    {"x", SQK_F32, 2, shape_x, 80},
    {"ids", SQK_I64, 1, shape_ids, 24},
};
static const sqk_tensor_info model_outputs[] = {
    {"y", SQK_F32, 2, shape_x, 80},
    {"z", SQK_F32, 1, shape_ids, 12},
};
static const sqk_buffer model_buffers[] = {
    {SQK_BUF_INPUT, 0, 80}, {SQK_BUF_INPUT, 1, 24}, {SQK_BUF_OUTPUT, 0, 80},
    {SQK_BUF_OUTPUT, 1, 12}, {SQK_BUF_CONST, 0, 80}, {SQK_BUF_ARENA, 64, 80},
};
static const int64_t a_double[] = {0, 5}, a_add[] = {5, 4, 2}, a_gather[] = {2, 1, 3};
static const sqk_step model_steps[] = {
    {"double", k_double, a_double, 2, 20, 3},
    {"add_bias", k_add, a_add, 3, 20, 1},
    {"empty", k_never, a_add, 3, 0, 1},
    {"gather", k_gather, a_gather, 3, 3, 1},
};
const sqk_program sqk_model = {
    SQK_ABI_VERSION, "testmodel",
    2, model_inputs, 2, model_outputs,
    6, model_buffers, 4, model_steps,
    192, 80, MODEL_NEEDS_VECTOR,
};
"""

QEMU_V = ["-cpu", "rv64,v=true,vlen=256"]
QEMU_NO_V = ["-cpu", "rv64,v=false"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rt():
    return load_runtime()


@pytest.fixture(scope="module")
def model_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "model.c").write_text(MODEL_C)
    return d / "model.c"


def _cc(args, what):
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, f"{what} failed:\n{' '.join(map(str, args))}\n{r.stderr}"


@pytest.fixture(scope="module")
def model_lib(model_src):
    """The test model as a shared library, opened with dlopen."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no host C compiler")
    so = model_src.parent / "model.so"
    _cc([cc, "-O2", "-Wall", "-shared", "-fPIC", "-I", RUNTIME_DIR, str(model_src), "-o", str(so)], "cc model")
    return program_from_library(str(so))


class Kernels:
    """Function pointers of the test kernels, for programs built from Python."""

    def __init__(self, ffi, loaded):
        self.ffi = ffi
        self._dll = loaded._dll

    def __getattr__(self, name):
        import ctypes

        addr = ctypes.cast(getattr(self._dll, name), ctypes.c_void_p).value
        return self.ffi.cast("sqk_kernel_fn", addr)


@pytest.fixture(scope="module")
def kernels(rt, model_lib):
    ffi, _ = rt
    return Kernels(ffi, model_lib)


class Prog:
    """An sqk_program assembled in Python; keeps every piece alive."""

    def __init__(self, ffi, *, steps, buffers, outputs=(), inputs=(), arena=0, consts=0, abi=1):
        self.keep = []
        k = self.keep.append
        p = ffi.new("sqk_program *")
        p.abi_version = abi
        p.name = _s(ffi, "prog", k)
        p.n_inputs, p.inputs = len(inputs), _tensors(ffi, inputs, k)
        p.n_outputs, p.outputs = len(outputs), _tensors(ffi, outputs, k)
        bufs = ffi.new("sqk_buffer[]", [list(b) for b in buffers] or 1)
        k(bufs)
        p.n_buffers, p.buffers = len(buffers), bufs
        st = ffi.new("sqk_step[]", max(len(steps), 1))
        k(st)
        for i, (name, fn, args, rng, grain) in enumerate(steps):
            a = ffi.new("int64_t[]", list(args) or 1)
            k(a)
            st[i].name, st[i].fn, st[i].args = _s(ffi, name, k), fn, a
            st[i].n_args, st[i].range, st[i].grain = len(args), rng, grain
        p.n_steps, p.steps = len(steps), st
        p.arena_bytes, p.const_bytes, p.needs_vector = arena, consts, 0
        self.p = p


def _s(ffi, text, keep):
    c = ffi.new("char[]", text.encode())
    keep(c)
    return c


def _tensors(ffi, specs, keep):
    """specs: (name, dtype_code, shape, nbytes)"""
    t = ffi.new("sqk_tensor_info[]", max(len(specs), 1))
    keep(t)
    for i, (name, dtype, shape, nbytes) in enumerate(specs):
        sh = ffi.new("int64_t[]", list(shape) or 1)
        keep(sh)
        t[i].name, t[i].dtype, t[i].rank, t[i].shape, t[i].nbytes = _s(ffi, name, keep), dtype, len(shape), sh, nbytes
    return t


def _ptrs(ffi, arrays):
    return ffi.new("void *[]", [ffi.from_buffer(a) for a in arrays] or [ffi.NULL])


def run(rt, ctx, prog, outputs=(), inputs=(), consts=None, const_bytes=None):
    ffi, lib = rt
    c = ffi.from_buffer(consts) if consts is not None else ffi.NULL
    n = const_bytes if const_bytes is not None else (consts.nbytes if consts is not None else 0)
    return lib.sqk_run(ctx, prog.p, _ptrs(ffi, inputs), _ptrs(ffi, outputs), c, n)


@pytest.fixture(scope="module")
def contexts(rt):
    ffi, lib = rt
    made = {}

    def get(n):
        if n not in made:
            ctx = lib.sqk_context_new(n)
            assert ctx != ffi.NULL
            made[n] = ctx
        return made[n]

    yield get
    for ctx in made.values():
        lib.sqk_context_free(ctx)


def record_program(rt, kernels, rng, grain, slow=False):
    ffi, _ = rt
    log = np.zeros(1 + 3 * max(rng, 1), np.int64)
    fn = kernels.k_record_slow if slow else kernels.k_record
    prog = Prog(ffi, steps=[("record", fn, [0], rng, grain)], buffers=[(1, 0, log.nbytes)],
                outputs=[("log", 2, [log.size], log.nbytes)])
    return prog, log


def ranges_of(log):
    n = int(log[0])
    return sorted((int(log[1 + 3 * k]), int(log[2 + 3 * k])) for k in range(n)), {int(log[3 + 3 * k]) for k in range(n)}


CHUNKS_PER_THREAD = 4   # SQK_CHUNKS_PER_THREAD in runtime/sqk_runtime.c


def expected_ranges(rng, grain, threads):
    if rng <= grain or threads == 1:
        return [(0, rng)]
    chunk = max(grain, -(-rng // (threads * CHUNKS_PER_THREAD)))
    return [(b, min(b + chunk, rng)) for b in range(0, rng, chunk)]


# ------------------------------------------------------------ runtime in-process


def test_load_runtime_is_memoized_and_cached(rt):
    import sysconfig

    from sqk.runtime import ffi as rtffi

    assert load_runtime() is rt
    root = rtffi.cache_root()
    built = [os.path.join(root, d, "_sqkrt" + sysconfig.get_config_var("EXT_SUFFIX"))
             for d in os.listdir(root) if d.startswith("runtime-")]
    assert any(os.path.isfile(b) for b in built)


_LOAD = "from sqk.runtime.ffi import load_runtime; ffi, lib = load_runtime(); print(lib.SQK_ABI_VERSION)"


def test_concurrent_builders(tmp_path):
    """Several processes building into one empty cache at once all succeed."""
    env = dict(os.environ, SQK_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "1", err
    entries = os.listdir(tmp_path / "cache")
    assert len([e for e in entries if e.startswith("runtime-")]) == 1
    assert not [e for e in entries if e.startswith(".build-")], "temporary build folders were left behind"


def test_missing_compiler_message(tmp_path):
    env = {"PATH": str(tmp_path / "nothing"), "HOME": str(tmp_path), "SQK_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "RuntimeError: a C compiler (e.g. `apt-get install gcc`) is needed once to build the sqk runtime" in r.stderr



def test_cdef_and_constants(rt):
    ffi, lib = rt
    assert "sqk_run" in header_cdef() and "#include" not in header_cdef()
    assert lib.SQK_ABI_VERSION == 1
    # every field is 8 bytes wide: the codegen side relies on this layout
    assert ffi.sizeof("sqk_buffer") == 24
    assert ffi.sizeof("sqk_step") == 48
    assert ffi.sizeof("sqk_tensor_info") == 40
    assert ffi.sizeof("sqk_program") == 13 * 8
    assert ffi.offsetof("sqk_program", "needs_vector") == 12 * 8


def test_error_strings(rt):
    ffi, lib = rt
    texts = [ffi.string(lib.sqk_error_string(c)).decode() for c in range(9)]
    assert texts[0] == "ok" and all(texts) and len(set(texts)) == 9
    assert "index" in texts[SQK_ERR_INDEX]
    assert ffi.string(lib.sqk_error_string(99)).decode() == "unknown error code"


def test_context_threads(rt, monkeypatch):
    ffi, lib = rt
    for n in (1, 2, 5):
        ctx = lib.sqk_context_new(n)
        assert lib.sqk_context_threads(ctx) == n
        lib.sqk_context_free(ctx)
    monkeypatch.setenv("SQK_NUM_THREADS", "3")
    ctx = lib.sqk_context_new(0)
    assert lib.sqk_context_threads(ctx) == 3
    lib.sqk_context_free(ctx)
    monkeypatch.delenv("SQK_NUM_THREADS")
    ctx = lib.sqk_context_new(-1)
    assert lib.sqk_context_threads(ctx) == os.sysconf("SC_NPROCESSORS_ONLN")
    lib.sqk_context_free(ctx)
    lib.sqk_context_free(ffi.NULL)  # harmless


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("rng,grain", [(1, 1), (2, 1), (3, 1), (5, 1), (7, 1), (8, 1), (9, 1),
                                       (100, 1), (100, 7), (100, 40), (13, 20), (20, 20), (21, 20), (1000, 3)])
def test_ranges_cover_exactly_once(rt, kernels, contexts, threads, rng, grain):
    prog, log = record_program(rt, kernels, rng, grain)
    assert run(rt, contexts(threads), prog, outputs=[log]) == SQK_OK
    got, tids = ranges_of(log)
    assert got == expected_ranges(rng, grain, threads)
    assert len(tids) <= threads


def test_pool_threads_take_part_and_are_reused(rt, kernels, contexts):
    ctx = contexts(4)
    prog, log = record_program(rt, kernels, 8, 1, slow=True)
    assert run(rt, ctx, prog, outputs=[log]) == SQK_OK
    got, tids = ranges_of(log)
    assert got == expected_ranges(8, 1, 4)
    assert len(tids) >= 2, "the pool threads never ran a chunk"
    # Many runs: coverage stays exact and no thread is created per step.
    all_tids = set(tids)
    for i in range(300):
        prog, log = record_program(rt, kernels, 37 + i % 5, 1)
        assert run(rt, ctx, prog, outputs=[log]) == SQK_OK
        got, tids = ranges_of(log)
        assert got == expected_ranges(37 + i % 5, 1, 4)
        all_tids |= tids
    assert len(all_tids) <= 4


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_chained_steps_see_each_others_results(rt, kernels, contexts, threads):
    """A chain of 60 dependent parallel steps (each doubles the previous step's
    result, chunks of different grains), run many times: a step starts only
    after every chunk of the one before has finished, and no pool thread that
    wakes late runs a chunk of a step that is gone (the result would differ)."""
    ffi, _ = rt
    n = 101
    x = np.arange(n, dtype=np.float32) / 7
    bufs = [(0, 0, 4 * n), (1, 0, 4 * n), (3, 0, 4 * n), (3, 512, 4 * n)]   # x, y, arena a, arena b
    chain = [0] + [2 + i % 2 for i in range(59)] + [1]
    steps = [(f"double{i}", kernels.k_double, [src, dst], n, 1 + i % 4)
             for i, (src, dst) in enumerate(zip(chain, chain[1:]))]
    prog = Prog(ffi, steps=steps, buffers=bufs, inputs=[("x", 0, [n], 4 * n)], outputs=[("y", 0, [n], 4 * n)],
                arena=1024)
    ctx = contexts(threads)
    for _ in range(200):
        y = np.zeros(n, np.float32)
        assert run(rt, ctx, prog, inputs=[x], outputs=[y]) == SQK_OK
        np.testing.assert_array_equal(y, x * np.float32(2.0 ** 60))


def test_model_outputs(rt, model_lib, contexts):
    ffi, lib = rt
    prog = model_lib.program
    assert ffi.string(prog.name) == b"testmodel" and prog.n_steps == 4
    rs = np.random.default_rng(0)
    x = rs.standard_normal((4, 5)).astype(np.float32)
    bias = rs.standard_normal(20).astype(np.float32)
    ids = np.array([0, 19, 7], np.int64)
    for threads in (1, 2, 3, 8):
        y, z = np.zeros((4, 5), np.float32), np.zeros(3, np.float32)
        ctx = contexts(threads)
        rc = lib.sqk_run(ctx, prog, _ptrs(ffi, [x, ids]), _ptrs(ffi, [y, z]), ffi.from_buffer(bias), bias.nbytes)
        assert rc == SQK_OK and lib.sqk_context_error_step(ctx) == -1
        np.testing.assert_array_equal(y, 2 * x + bias.reshape(4, 5))
        np.testing.assert_array_equal(z, y.ravel()[ids])


def test_kernel_error_reports_step(rt, model_lib, contexts):
    ffi, lib = rt
    prog = model_lib.program
    x, bias = np.ones((4, 5), np.float32), np.zeros(20, np.float32)
    y, z = np.zeros((4, 5), np.float32), np.zeros(3, np.float32)
    ctx = contexts(2)
    ids = np.array([0, 20, 1], np.int64)
    rc = lib.sqk_run(ctx, prog, _ptrs(ffi, [x, ids]), _ptrs(ffi, [y, z]), ffi.from_buffer(bias), bias.nbytes)
    assert rc == SQK_ERR_INDEX
    step = lib.sqk_context_error_step(ctx)
    assert step == 3 and ffi.string(prog.steps[step].name) == b"gather"
    # the context stays usable after an error
    ids[1] = 2
    rc = lib.sqk_run(ctx, prog, _ptrs(ffi, [x, ids]), _ptrs(ffi, [y, z]), ffi.from_buffer(bias), bias.nbytes)
    assert rc == SQK_OK and lib.sqk_context_error_step(ctx) == -1


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_error_stops_the_run(rt, kernels, contexts, threads):
    ffi, _ = rt
    bad = np.array([57], np.int64)
    log0, log2 = np.zeros(1 + 3 * 10, np.int64), np.zeros(1 + 3 * 10, np.int64)
    prog = Prog(ffi, steps=[("first", kernels.k_record, [1], 10, 1),
                            ("failing", kernels.k_fail_at, [0], 100, 1),
                            ("after", kernels.k_record, [2], 10, 1)],
                buffers=[(0, 0, 8), (1, 0, log0.nbytes), (1, 1, log2.nbytes)],
                inputs=[("bad", 2, [1], 8)],
                outputs=[("log0", 2, [log0.size], log0.nbytes), ("log2", 2, [log2.size], log2.nbytes)])
    ctx = contexts(threads)
    assert run(rt, ctx, prog, inputs=[bad], outputs=[log0, log2]) == SQK_ERR_INDEX
    assert rt[1].sqk_context_error_step(ctx) == 1
    assert log0[0] > 0 and log2[0] == 0, "the step after the failing one must not run"


def test_abi_mismatch_refused(rt, kernels, contexts):
    ffi, lib = rt
    log = np.zeros(4, np.int64)
    prog = Prog(ffi, steps=[("record", kernels.k_record, [0], 1, 1)], buffers=[(1, 0, 32)],
                outputs=[("log", 2, [4], 32)], abi=2)
    ctx = contexts(2)
    assert run(rt, ctx, prog, outputs=[log]) == SQK_ERR_ABI
    assert lib.sqk_context_error_step(ctx) == -1 and log[0] == 0


def test_bad_arguments_refused(rt, kernels, contexts):
    ffi, lib = rt
    ctx = contexts(2)
    log = np.zeros(1 + 3 * 4, np.int64)  # room for every record of one run
    consts = np.zeros(10, np.int64)

    def prog(**kw):
        base = dict(steps=[("record", kernels.k_record, [0], 1, 1)], buffers=[(1, 0, log.nbytes), (2, 8, 72)],
                    outputs=[("log", 2, [log.size], log.nbytes)], consts=80)
        base.update(kw)
        return Prog(ffi, **base)

    def check(p, want, **kw):
        log[:] = 0
        assert run(rt, ctx, p, **kw) == want

    good = prog()  # keep the Prog alive while its struct is in use
    check(good, SQK_OK, outputs=[log], consts=consts)
    # short or missing constants
    check(good, SQK_ERR_ARGS, outputs=[log], consts=consts, const_bytes=40)
    check(good, SQK_ERR_ARGS, outputs=[log])
    # NULL context, NULL program, NULL output pointers
    c = ffi.from_buffer(consts)
    assert lib.sqk_run(ffi.NULL, good.p, _ptrs(ffi, []), _ptrs(ffi, [log]), c, 80) == SQK_ERR_ARGS
    assert lib.sqk_run(ctx, ffi.NULL, _ptrs(ffi, []), _ptrs(ffi, [log]), c, 80) == SQK_ERR_ARGS
    assert lib.sqk_run(ctx, good.p, _ptrs(ffi, []), ffi.NULL, c, 80) == SQK_ERR_ARGS
    assert lib.sqk_run(ctx, good.p, _ptrs(ffi, []), ffi.new("void *[]", [ffi.NULL]), c, 80) == SQK_ERR_ARGS
    # a buffer outside the constants / arena, an unknown kind, an output index out of range
    out = (1, 0, log.nbytes)
    check(prog(buffers=[out, (2, 16, 72)]), SQK_ERR_ARGS, outputs=[log], consts=consts)
    check(prog(buffers=[out, (3, 0, 8)]), SQK_ERR_ARGS, outputs=[log], consts=consts)
    check(prog(buffers=[out, (9, 0, 8)]), SQK_ERR_ARGS, outputs=[log], consts=consts)
    check(prog(buffers=[(1, 1, 8)]), SQK_ERR_ARGS, outputs=[log], consts=consts)
    check(prog(buffers=[(1, 0, log.nbytes + 8)]), SQK_ERR_ARGS, outputs=[log], consts=consts)
    assert log[0] == 0 and lib.sqk_context_error_step(ctx) == -1
    # a step argument naming a buffer that does not exist: the step is reported
    bad = prog(steps=[("ok", kernels.k_record, [0], 1, 1), ("bad", kernels.k_record, [7], 1, 1)])
    check(bad, SQK_ERR_ARGS, outputs=[log], consts=consts)
    assert lib.sqk_context_error_step(ctx) == 1 and log[0] == 1


def test_one_run_at_a_time_and_fork(rt, kernels):
    import threading
    import time

    ffi, lib = rt
    ctx = lib.sqk_context_new(2)
    try:
        slow_log = np.zeros(1 + 3 * 10, np.int64)
        slow = Prog(ffi, steps=[("slow", kernels.k_record_slow, [0], 2, 1)] * 5,  # 5 x 20 ms
                    buffers=[(1, 0, slow_log.nbytes)], outputs=[("log", 2, [slow_log.size], slow_log.nbytes)])
        result = []
        t = threading.Thread(target=lambda: result.append(run(rt, ctx, slow, outputs=[slow_log])))
        t.start()  # cffi releases the GIL during sqk_run
        time.sleep(0.02)
        quick, quick_log = record_program(rt, kernels, 1, 1)
        assert run(rt, ctx, quick, outputs=[quick_log]) == SQK_ERR_ARGS  # the context is busy
        t.join()
        assert result == [SQK_OK] and slow_log[0] == 10
        # a forked child has no pool threads: the context refuses instead of hanging
        pid = os.fork()
        if pid == 0:
            os._exit(run(rt, ctx, quick, outputs=[quick_log]))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == SQK_ERR_THREADS
        assert run(rt, ctx, quick, outputs=[quick_log]) == SQK_OK
    finally:
        lib.sqk_context_free(ctx)


def test_zero_range_and_arena_growth(rt, kernels, contexts):
    ffi, lib = rt
    ctx = contexts(3)
    log = np.zeros(4, np.int64)
    for arena in (0, 64, 1 << 20, 128):  # grows, then a smaller one reuses it
        prog = Prog(ffi, steps=[("never", kernels.k_never, [0], 0, 1), ("record", kernels.k_record, [0], 1, 1)],
                    buffers=[(1, 0, 32), (3, 0, arena)], outputs=[("log", 2, [4], 32)], arena=arena)
        log[:] = 0
        assert run(rt, ctx, prog, outputs=[log]) == SQK_OK
        assert log[0] == 1


# ------------------------------------------------------------------- the runner


class Runner:
    def __init__(self, exe, prefix=()):
        self.exe, self.prefix = str(exe), list(prefix)

    def __call__(self, *args, cwd=None, prefix=None):
        cmd = list(self.prefix if prefix is None else prefix) + [self.exe] + [str(a) for a in args]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
        # qemu 7.2 warns on stderr when vext_spec is not given; not ours to check
        r.stderr = "".join(l for l in r.stderr.splitlines(True) if "vector version is not specified" not in l)
        return r


def build_runner(compiler, model_src, out, extra=()):
    srcs = [str(model_src), os.path.join(RUNTIME_DIR, "runner.c"), os.path.join(RUNTIME_DIR, "sqk_runtime.c")]
    _cc([compiler, "-std=c11", "-O2", "-Wall", "-Wextra", *extra, "-I", RUNTIME_DIR, *srcs,
         "-o", str(out), "-pthread", "-lm"], f"{compiler} runner")
    return out


@pytest.fixture(scope="module", params=["host", "riscv64"])
def runner(request, model_src):
    if request.param == "host":
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no host C compiler")
        return Runner(build_runner(cc, model_src, model_src.parent / "runner-host"))
    tools = request.getfixturevalue("riscv_tools")
    exe = build_runner(tools["gcc"], model_src, model_src.parent / "runner-rv64", extra=["-static"])
    return Runner(exe, [tools["qemu"], *QEMU_V])


@pytest.fixture
def data(tmp_path):
    rs = np.random.default_rng(1)
    x = rs.standard_normal((4, 5)).astype(np.float32)
    bias = rs.standard_normal(20).astype(np.float32)
    ids = np.array([3, 19, 0], np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    bias.tofile(tmp_path / "consts.bin")
    y = 2 * x + bias.reshape(4, 5)
    return dict(x=x, ids=ids, bias=bias, y=y, z=y.ravel()[ids], dir=tmp_path)


def ok_args(d, **override):
    files = {"x": d["dir"] / "x.npy", "ids": d["dir"] / "ids.npy"}
    files.update(override)
    args = ["--consts", d["dir"] / "consts.bin", "--output-dir", d["dir"] / "out"]
    for name, path in files.items():
        if path is not None:
            args += ["--input", f"{name}={path}"]
    return args


def assert_error(r, code, *fragments):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sqk-runner: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_runner_outputs(runner, data):
    for threads in ("1", "3"):
        r = runner(*ok_args(data), "--threads", threads)
        assert r.returncode == 0, r.stderr
        out = data["dir"] / "out"
        y, z = np.load(out / "y.npy"), np.load(out / "z.npy")
        assert y.dtype == np.float32 and y.shape == (4, 5) and z.shape == (3,)
        np.testing.assert_array_equal(y, data["y"])
        np.testing.assert_array_equal(z, data["z"])
        # NumPy's layout: version 1.0 header padded so the data starts on 64 bytes
        raw = (out / "y.npy").read_bytes()
        assert raw[6:8] == b"\x01\x00" and (len(raw) - 80) % 64 == 0


def test_runner_npy_versions_and_option_forms(runner, data):
    d = data["dir"]
    for version in ((2, 0), (3, 0)):
        with open(d / "x2.npy", "wb") as f:
            np.lib.format.write_array(f, data["x"], version=version)
        args = ok_args(data, x=None) + [f"--input=x={d / 'x2.npy'}"]
        r = runner(*args)
        assert r.returncode == 0, r.stderr
        np.testing.assert_array_equal(np.load(d / "out" / "y.npy"), data["y"])


def test_runner_wrong_dtype(runner, data):
    np.save(data["dir"] / "x64.npy", data["x"].astype(np.float64))
    r = runner(*ok_args(data, x=data["dir"] / "x64.npy"))
    assert_error(r, 2, "input 'x'", "expected dtype f32", "'<f8'")


def test_runner_big_endian(runner, data):
    np.save(data["dir"] / "xbe.npy", data["x"].astype(">f4"))
    assert_error(runner(*ok_args(data, x=data["dir"] / "xbe.npy")), 2, "input 'x'", "big-endian")


def test_runner_wrong_shape(runner, data):
    np.save(data["dir"] / "xt.npy", data["x"].T.copy())
    assert_error(runner(*ok_args(data, x=data["dir"] / "xt.npy")), 2, "input 'x'", "expected shape f32 [4,5]",
                 "found f32 [5,4]")


def test_runner_missing_unknown_duplicate_input(runner, data):
    assert_error(runner(*ok_args(data, ids=None)), 2, "missing input 'ids'")
    assert_error(runner(*ok_args(data, w=data["dir"] / "x.npy")), 2, "unknown input 'w'", "'x', 'ids'")
    assert_error(runner(*ok_args(data), "--input", f"x={data['dir'] / 'x.npy'}"), 2, "input 'x'", "more than once")


def test_runner_bad_files(runner, data):
    d = data["dir"]
    raw = (d / "x.npy").read_bytes()
    (d / "short.npy").write_bytes(raw[:-7])
    assert_error(runner(*ok_args(data, x=d / "short.npy")), 2, "input 'x'", "truncated")
    (d / "shorthdr.npy").write_bytes(raw[:40])
    assert_error(runner(*ok_args(data, x=d / "shorthdr.npy")), 2, "input 'x'", "truncated")
    (d / "long.npy").write_bytes(raw + b"\0")
    assert_error(runner(*ok_args(data, x=d / "long.npy")), 2, "input 'x'", "after the array data")
    np.save(d / "xf.npy", np.asfortranarray(data["x"]))
    assert_error(runner(*ok_args(data, x=d / "xf.npy")), 2, "input 'x'", "Fortran order")
    (d / "junk.npy").write_bytes(b"not a numpy file at all")
    assert_error(runner(*ok_args(data, x=d / "junk.npy")), 2, "input 'x'", "not a .npy file")
    assert_error(runner(*ok_args(data, x=d / "nonexistent.npy")), 2, "input 'x'", "cannot open")


def test_runner_consts_checked(runner, data):
    d = data["dir"]
    (d / "c_short.bin").write_bytes(b"\0" * 40)
    args = ok_args(data)
    args[1] = d / "c_short.bin"
    assert_error(runner(*args), 2, "40 bytes", "expects 80")
    assert_error(runner(*args[2:]), 2, "--consts")


def test_runner_kernel_error(runner, data):
    np.save(data["dir"] / "bad_ids.npy", np.array([0, 20, 1], np.int64))
    r = runner(*ok_args(data, ids=data["dir"] / "bad_ids.npy"))
    assert_error(r, 3, "step 3", "kernel 'gather'", "index out of range")


def test_runner_usage_errors(runner, data):
    assert_error(runner("--bogus"), 2, "unknown option '--bogus'")
    assert_error(runner("--threads", "many"), 2, "--threads")
    assert_error(runner("--input", "x"), 2, "NAME=FILE")
    assert_error(runner("--consts"), 2, "needs a value")


def test_runner_info_and_help(runner):
    r = runner("--info")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for want in ("program testmodel", "input x f32 [4,5]", "input ids i64 [3]", "output y f32 [4,5]",
                 "output z f32 [3]", "arena_bytes 192", "const_bytes 80"):
        assert want in lines, (want, lines)
    r = runner("--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "input x f32 [4,5]" in r.stdout


def test_runner_vector_check(riscv_tools, model_src, data, tmp_path):
    exe = build_runner(riscv_tools["gcc"], model_src, tmp_path / "runner-v", extra=["-static", "-DMODEL_NEEDS_VECTOR=1"])
    r = Runner(exe, [riscv_tools["qemu"], *QEMU_NO_V])(*ok_args(data))
    assert_error(r, 4, "compiled for RISC-V with the vector extension (V), but this CPU does not report it")
    r = Runner(exe, [riscv_tools["qemu"], *QEMU_V])(*ok_args(data))
    assert r.returncode == 0, r.stderr
    # --info works without V: it only reads the program's metadata
    r = Runner(exe, [riscv_tools["qemu"], *QEMU_NO_V])("--info")
    assert r.returncode == 0 and "needs_vector 1" in r.stdout
    # the fallback probe (vlenb CSR behind a SIGILL handler), with AT_HWCAP ignored
    probe = build_runner(riscv_tools["gcc"], model_src, tmp_path / "runner-probe",
                         extra=["-static", "-DMODEL_NEEDS_VECTOR=1", "-DSQK_RUNNER_PROBE_ONLY"])
    assert Runner(probe, [riscv_tools["qemu"], *QEMU_V])(*ok_args(data)).returncode == 0
    assert_error(Runner(probe, [riscv_tools["qemu"], *QEMU_NO_V])(*ok_args(data)), 4, "vector extension")


F16_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
/* declared the way LLVM calls them: the half as 16 bits in an f register */
float __extendhfsf2(float h);
float __truncsfhf2(float f);
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    FILE *in = fopen(argv[1], "rb"), *trunc = fopen(argv[2], "wb"), *ext = fopen(argv[3], "wb");
    if (!in || !trunc || !ext) return 2;
    float v;
    while (fread(&v, 4, 1, in) == 1) {
        float r = __truncsfhf2(v);
        uint32_t bits;
        memcpy(&bits, &r, 4);
        uint16_t h = (uint16_t)bits;
        fwrite(&h, 2, 1, trunc);
    }
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t bits = 0xffff0000u | h;
        float f;
        memcpy(&f, &bits, 4);
        float r = __extendhfsf2(f);
        fwrite(&r, 4, 1, ext);
    }
    return fclose(trunc) || fclose(ext);
}
"""


def test_riscv_f16_helpers(riscv_tools, tmp_path):
    """The runtime's __extendhfsf2/__truncsfhf2 (LLVM's f16 libcalls, missing from
    GCC 12's riscv64 libgcc) agree with NumPy: every half, and round-to-nearest-even."""
    (tmp_path / "f16.c").write_text(F16_C)
    exe = tmp_path / "f16"
    _cc([riscv_tools["gcc"], "-O2", "-static", "-pthread", str(tmp_path / "f16.c"),
         os.path.join(RUNTIME_DIR, "sqk_runtime.c"), "-I", RUNTIME_DIR, "-o", str(exe)], "f16 helpers")
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    finite.sort()
    mids = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # exact ties between neighbours
    mids = mids[np.abs(mids) < 65520].astype(np.float32)
    rs = np.random.default_rng(0)
    vals = np.concatenate([
        finite, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        rs.integers(0, 2**32, 100000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e10, -1e10, 5.96e-8,
                  2.98e-8, 2.99e-8, 1e-30], np.float32)]).astype(np.float32)
    vals.tofile(tmp_path / "in.f32")
    r = subprocess.run([riscv_tools["qemu"], *QEMU_V, str(exe), str(tmp_path / "in.f32"), str(tmp_path / "t.u16"),
                        str(tmp_path / "e.f32")], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = np.fromfile(tmp_path / "t.u16", np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = vals.astype(np.float16).view(np.uint16)
    nan = np.isnan(vals)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()
    ext = np.fromfile(tmp_path / "e.f32", np.float32)
    want_ext = halves.astype(np.float32)
    nan = np.isnan(want_ext)
    assert np.array_equal(ext[~nan].view(np.uint32), want_ext[~nan].view(np.uint32))
    assert np.isnan(ext[nan]).all()


_AFFINITY = r"""
import json, os, sys
import numpy as np
import sqk

def masks():
    return {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}

before = masks()
b = sqk.GraphBuilder("aff")
x, w = b.input("x", (256, 256)), b.input("w", (256, 256))
m = sqk.compile(b.output(b.matmul(x, w)), threads=3)
a = np.ones((256, 256), np.float32)
for _ in range(3):
    m(x=a, w=a)
after = masks()
print(json.dumps({"main": after[os.getpid()], "allowed": before[os.getpid()],
                  "pool": [v for t, v in after.items() if t not in before]}))
"""


@pytest.mark.parametrize("setting", ["default", "off"])
def test_pool_kept_off_the_callers_cpu(setting):
    """A pool woken by the caller tends to land on the caller's CPU; the runtime pins
    each pool thread to one of the other CPUs of the caller's mask (round robin) and
    never pins the caller; SQK_AFFINITY=0 leaves every mask alone."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU allowed: nothing to keep apart")
    env = dict(os.environ, SQK_AFFINITY="0" if setting == "off" else "1")
    r = subprocess.run([sys.executable, "-c", _AFFINITY], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["main"] == got["allowed"]            # the caller is never pinned
    assert len(got["pool"]) == 2                     # threads=3: two pool threads
    for mask in got["pool"]:
        if setting == "off":
            assert mask == got["allowed"]
        else:
            assert len(mask) == 1 and mask[0] in got["allowed"]
