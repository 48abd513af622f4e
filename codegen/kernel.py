"""Building blocks for kernel emitters: the kernel signature, loops, types,
vector helpers and scalar math shared by every kernel family.

Every kernel is ``i32 @name(ptr %args, i64 %begin, i64 %end)`` (see
runtime/sqk_runtime.h).  The wrapper loads the buffer pointers and calls an
always-inlined body whose pointer parameters are ``noalias``: buffers never
overlap, and telling LLVM so is what lets it vectorize and reorder freely.
"""
from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from ..ir import dtypes as dt

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()
PTR = ir.PointerType()  # opaque pointer

_LL = {"f32": F32, "f16": F16, "i64": I64, "i32": I32, "i8": I8, "u8": I8, "bool": I8, "i4": I8}


def lltype(d: dt.DType) -> ir.Type:
    """LLVM storage type of one element (bool is a byte, i4 a packed byte)."""
    return _LL[d.name]


def compute_type(d: dt.DType) -> ir.Type:
    """Type that arithmetic happens in: f16 widens to f32."""
    return F32 if d.is_float else lltype(d)


def const(ty, v):
    return ir.Constant(ty, v)


def i64(v):
    return ir.Constant(I64, int(v))


class Kernel:
    """One kernel function.  Emitters write into ``self.b`` (positioned in the
    body); ``self.args`` are the buffer pointers, ``self.begin``/``self.end``
    the work-item range.  Call ``finish()`` (returns SQK_OK) when done.
    ``consts``: per input, its numpy value when it is a constant, else None (lower()
    passes them: a kernel may specialize on known structure, e.g. sparsity).  An
    emitter whose kernel can return SQK_ERR_INDEX says what it means in
    ``index_error`` (the manifest keeps it; the loader adds it to the error message)."""

    def __init__(self, module: ir.Module, name: str, n_args: int, target, exported: bool = True,
                 aliased: frozenset = frozenset(), consts=()):
        self.module, self.name, self.target = module, name, target
        body_ty = ir.FunctionType(I32, [PTR] * n_args + [I64, I64])
        self.body = ir.Function(module, body_ty, name + ".body")
        self.body.linkage = "internal"
        self.body.attributes.add("alwaysinline")
        self.body.attributes.add("nounwind")
        for j, a in enumerate(self.body.args[:n_args]):
            if j not in aliased:  # arguments sharing a buffer (in-place maps) may not claim noalias
                a.add_attribute("noalias")
        wrapper = ir.Function(module, ir.FunctionType(I32, [PTR, I64, I64]), name)
        wrapper.attributes.add("nounwind")
        if not exported:  # a helper kernel called from another one
            wrapper.linkage = "internal"
        wb = ir.IRBuilder(wrapper.append_basic_block("entry"))
        argv, begin, end = wrapper.args
        ptrs = [wb.load(wb.gep(argv, [i64(i)], inbounds=True, source_etype=PTR), typ=PTR) for i in range(n_args)]
        wb.ret(wb.call(self.body, ptrs + [begin, end]))
        self.function = wrapper
        self.b = ir.IRBuilder(self.body.append_basic_block("entry"))
        self.args = list(self.body.args[:n_args])
        self.begin, self.end = self.body.args[n_args], self.body.args[n_args + 1]
        self.error_block = None
        self.consts: list = list(consts)
        self.index_error = ""

    def finish(self):
        self.b.ret(ir.Constant(I32, 0))

    def fail(self, code: int):
        """Branch to a block returning ``code`` (an SQK_ERR_*)."""
        blk = self.body.append_basic_block(f"fail{code}")
        ir.IRBuilder(blk).ret(ir.Constant(I32, code))
        return blk

    def intrinsic(self, name: str, ret, args):
        """Declare (once) and return an LLVM intrinsic or libm function."""
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, args), name)
        return fn


def _open_loop(b: ir.IRBuilder, start, stop, inits, name):
    """Header of a counted loop: the i64 counter and loop-carried phis; leaves
    ``b`` in the body.  Returns (i, phis, head, done)."""
    start = i64(start) if isinstance(start, int) else start
    stop = i64(stop) if isinstance(stop, int) else stop
    pre = b.block
    head = b.append_basic_block(name + ".head")
    body = b.append_basic_block(name + ".body")
    done = b.append_basic_block(name + ".done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name=name)
    i.add_incoming(start, pre)
    phis = []
    for v in inits:
        p = b.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    b.cbranch(b.icmp_signed("<", i, stop), body, done)
    b.position_at_end(body)
    return i, phis, head, done


def _close_loop(b: ir.IRBuilder, i, phis, new, step, head, done, name):
    last = b.block
    i.add_incoming(b.add(i, i64(step), name=name + ".next", flags=["nsw"]), last)
    for p, v in zip(phis, new):
        p.add_incoming(v, last)
    b.branch(head)
    b.position_at_end(done)


@contextmanager
def loop(b: ir.IRBuilder, start, stop, step=1, name="i"):
    """``for (i = start; i < stop; i += step)`` over i64; yields i.  Bounds may
    be Python ints or i64 values."""
    i, _, head, done = _open_loop(b, start, stop, (), name)
    yield i
    _close_loop(b, i, (), (), step, head, done, name)


def fold_loop(b: ir.IRBuilder, start, stop, inits: list, body, step=1, name="k"):
    """``vals = inits; for i in range(start, stop, step): vals = body(i, vals)``;
    returns the final values (loop-carried phis, so they stay in registers)."""
    i, phis, head, done = _open_loop(b, start, stop, inits, name)
    _close_loop(b, i, phis, body(i, phis), step, head, done, name)
    return phis


def last_chunk(b: ir.IRBuilder, index, count: int, last: int, full: int, fn, lone: str = "test") -> None:
    """fn(size) for chunk ``index`` (an i64) of ``count``: ``last`` for the last one when
    it is shorter than ``full``, else ``full`` -- static code for each size (the tile
    loops' dispatch of a short last row chunk or column block).  ``lone``: what a lone
    short chunk (count 1) gets: "test" the index compared anyway and fn(last) only,
    "plain" fn(last) alone, "both" the comparison and both sizes.  (The kernels keep
    the form they were written with: their lowered IR is pinned by the goldens.)"""
    if last == full:
        fn(full)
        return
    if count == 1 and lone == "plain":
        fn(last)
        return
    with b.if_else(b.icmp_signed("==", index, i64(count - 1))) as (tail, body):
        with tail:
            fn(last)
        with body:
            if count > 1 or lone == "both":
                fn(full)


def gep(b, ptr, elem_ty, index):
    return b.gep(ptr, [index], inbounds=True, source_etype=elem_ty)


def vec_type(ty, n):
    return ir.VectorType(ty, n)


def splat(b, value, n):
    """Broadcast a scalar to an n-lane vector."""
    vt = ir.VectorType(value.type, n)
    v = b.insert_element(ir.Constant(vt, ir.Undefined), value, i64(0))
    return b.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(I32, n), [0] * n))


def elem_bytes(ty) -> int:
    return {F32: 4, F16: 2, I64: 8, I32: 4, I16: 2, I8: 1}[ty]


def load_vec(b, ptr, elem_ty, index, n):
    """Load n contiguous elements; only element alignment is assumed."""
    return b.load(gep(b, ptr, elem_ty, index), typ=ir.VectorType(elem_ty, n), align=elem_bytes(elem_ty))


def store_vec(b, value, ptr, elem_ty, index):
    return b.store(value, gep(b, ptr, elem_ty, index), align=elem_bytes(elem_ty))


def load_elem(b, ptr, d: dt.DType, index, n=1):
    """Load one element (or n contiguous) of storage dtype d, widened to its compute type."""
    ty = lltype(d)
    v = b.load(gep(b, ptr, ty, index), typ=ty) if n == 1 else load_vec(b, ptr, ty, index, n)
    return widen(b, v, d, n)


def store_elem(b, value, ptr, d: dt.DType, index, n=1):
    ty = lltype(d)
    value = narrow(b, value, d, n)
    if n == 1:
        b.store(value, gep(b, ptr, ty, index))
    else:
        store_vec(b, value, ptr, ty, index)


def widen(b, v, d: dt.DType, n=1):
    return b.fpext(v, F32 if n == 1 else ir.VectorType(F32, n)) if d is dt.f16 else v


def narrow(b, v, d: dt.DType, n=1):
    return b.fptrunc(v, F16 if n == 1 else ir.VectorType(F16, n)) if d is dt.f16 else v


def vtype(ty, n):
    return ty if n == 1 else ir.VectorType(ty, n)


def llvm_name(ty) -> str:
    """Suffix of overloaded intrinsics: f32, v8f32, i64 ..."""
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{llvm_name(ty.element)}"
    return {F32: "f32", F16: "f16", I64: "i64", I32: "i32", I8: "i8", I1: "i1"}[ty]


def call_intrinsic(k: Kernel, name: str, *args):
    """``llvm.<name>.<type>`` on args of one type (scalar or vector)."""
    ty = args[0].type
    fn = k.intrinsic(f"llvm.{name}.{llvm_name(ty)}", ty, [a.type for a in args])
    return k.b.call(fn, list(args))


def fconst(ty, v):
    """A float constant (splatted for vector types)."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, v)] * ty.count)
    return ir.Constant(ty, v)


def iconst(ty, v):
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, v)] * ty.count)
    return ir.Constant(ty, v)


def hsum(k: Kernel, v, fast=True):
    """Horizontal sum of a float vector (reassociating: fine for reductions)."""
    fn = k.intrinsic(f"llvm.vector.reduce.fadd.{llvm_name(v.type)}", v.type.element, [v.type.element, v.type])
    return k.b.call(fn, [ir.Constant(v.type.element, 0.0), v], fastmath=("reassoc",) if fast else ())


def hmax(k: Kernel, v):
    """Horizontal maximum of a float vector (NaN-propagating)."""
    fn = k.intrinsic(f"llvm.vector.reduce.fmaximum.{llvm_name(v.type)}", v.type.element, [v.type])
    return k.b.call(fn, [v])
