"""Lowering a planned graph to one LLVM module: a kernel per node, plus the
``sqk_model`` program table the runtime executes (layout: runtime/sqk_runtime.h).

Emitters register per op with ``@emitter("op", ...)``; an emitter gets a Kernel
whose arguments are the node's inputs then outputs, writes the body, and
returns ``(range, grain)``: how many work items the runtime splits over
threads and the fewest worth giving one thread.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from llvmlite import ir

from ..ir.graph import Graph, Node, Value
from ..ir.sparsity import parse_format
from ..runtime.abi import ABI_VERSION, BUF_ARENA, BUF_CONST, BUF_INPUT, BUF_OUTPUT, DTYPE_CODES, STRUCTS  # noqa: F401
from .kernel import I8, I64, PTR, Kernel

# Keys are op names, or "op:kind" for a node whose ``sparse`` attribute names
# a non-dense format of that kind (ir/sparsity.py): ``kernel_key(node)``.
EMITTERS: dict[str, Callable[[Kernel, Node], tuple[int, int]]] = {}
# key -> fn(node, input_index, array, target) -> bytes | None: the layout a kernel
# reads a constant input in, when it is not the plain one (driver.storage_bytes);
# target None: the host's layout.
PACKERS: dict[str, Callable[[Node, int, object, object], bytes | None]] = {}
# key -> indices of the inputs its kernel reads packed: they must be constants.
PACKED_INPUTS: dict[str, tuple[int, ...]] = {}


def kernel_key(node: Node) -> str:
    """The EMITTERS/PACKERS key of ``node``: its op, or "op:kind" when a
    ``sparse`` attribute names a non-dense format."""
    fmt = node.attrs.get("sparse", "dense")
    return node.op if fmt == "dense" else f"{node.op}:{parse_format(fmt).kind}"


def is_view(node: Node, buffers: dict) -> bool:
    """``node`` is a reshape planned in its input's buffer (compiler/memory.py):
    its output is already there, so it gets no kernel."""
    return node.op == "reshape" and buffers[node.outputs[0]] == buffers[node.inputs[0]]


def emitter(*keys: str):
    """Register the decorated function as the emitter of ``keys`` (ops, or
    "op:kind" for a sparse format kind)."""
    def wrap(fn):
        for key in keys:
            EMITTERS[key] = fn
        return fn
    return wrap


def packer(*keys: str, inputs: tuple[int, ...]):
    """Register the decorated ``fn(node, input_index, array, target) -> bytes | None`` as
    the constant packer of ``keys``: the bytes its kernel reads for that constant
    input (None: the plain storage layout).  ``inputs`` are the indices the
    kernel always reads packed: compiling a node whose input there is not a
    constant is an error (the kernel would misread plain data).  The IR keeps
    the logical values."""
    def wrap(fn):
        for key in keys:
            PACKERS[key] = fn
            PACKED_INPUTS[key] = tuple(inputs)
        return fn
    return wrap


def packed_bytes(key: str, n: Node, i: int, value, target, memo: dict | None):
    """PACKERS[key](n, i, value, target), or None when ``key`` packs nothing.
    ``memo`` (one dict per compile, shared by ``unshare_packed_constants`` and
    ``pack_constants``) keeps each result, so a large weight is packed once:
    keyed by the node's output and the constant's array, both alive (held by the
    graph) for as long as the dict is used."""
    if key not in PACKERS:
        return None
    if memo is None:
        return PACKERS[key](n, i, value, target)
    k = (key, i, n.outputs[0], id(value))
    if k not in memo:
        memo[k] = PACKERS[key](n, i, value, target)
    return memo[k]


def unshare_packed_constants(graph: Graph, target=None, memo: dict | None = None) -> Graph:
    """``graph`` with a copy of a constant for each reader that needs another
    layout of it than its first reader (packed one way or another, plain, or
    as a graph output): every constant then has one layout (``pack_constants``;
    ``memo``: see ``packed_bytes``)."""
    from . import elementwise  # noqa: F401  (registers emitters and packers)
    from . import families  # noqa: F401

    consts = {n.output: n for n in graph.nodes if n.op == "const"}
    names = {v.name for v in graph.values()}
    layouts: dict[Value, list] = {v: [None] for v in graph.outputs if v in consts}  # plain for the caller
    copies: dict[tuple, Value] = {}   # (value, layout index) -> its copy
    new_const: dict[Value, list[Node]] = {}
    nodes = []
    for n in graph.nodes:
        if n.op != "const":
            key = kernel_key(n)
            ins = list(n.inputs)
            for i, v in enumerate(ins):
                if v not in consts:
                    continue
                data = packed_bytes(key, n, i, consts[v].attrs["value"], target, memo)
                seen = layouts.setdefault(v, [data])
                j = next((j for j, d in enumerate(seen) if d == data), None)
                if j is None:
                    j = len(seen)
                    seen.append(data)
                if j:
                    if (v, j) not in copies:
                        name = next(f"{v.name}.{c}" for c in range(j, 1 << 30) if f"{v.name}.{c}" not in names)
                        names.add(name)
                        copies[v, j] = Value(name, v.type)
                        new_const.setdefault(v, []).append(Node("const", (), (copies[v, j],), dict(consts[v].attrs)))
                    ins[i] = copies[v, j]
            if ins != list(n.inputs):
                n = Node(n.op, tuple(ins), n.outputs, n.attrs)
        nodes.append(n)
    if not copies:
        return graph
    out = []
    for n in nodes:
        out.append(n)
        if n.op == "const":
            out += new_const.get(n.output, [])
    return graph.with_nodes(out)


def pack_constants(graph: Graph, target=None, memo: dict | None = None) -> dict[Value, bytes]:
    """Kernel-specific bytes of each constant whose consumer packs it.  A packed
    constant must have no other reader (another op or a graph output would read
    the packed bytes as plain storage).  ``memo``: see ``packed_bytes``."""
    from . import elementwise  # noqa: F401  (registers emitters and packers)
    from . import families  # noqa: F401

    consts = {n.output: n.attrs["value"] for n in graph.nodes if n.op == "const"}
    packed: dict[Value, bytes] = {}
    readers: dict[Value, list[str]] = {}
    for n in graph.nodes:
        key = kernel_key(n)
        for i in PACKED_INPUTS.get(key, ()):
            if i < len(n.inputs) and n.inputs[i] is not None and n.inputs[i] not in consts:
                raise UnsupportedOp(f"{n.op} {n.output.name!r} reads its input {i} ({n.inputs[i].name!r}) in a "
                                    f"kernel-specific layout packed at compile time: it must be a constant")
        for i, v in enumerate(n.inputs):
            if v not in consts:
                continue
            data = packed_bytes(key, n, i, consts[v], target, memo)
            readers.setdefault(v, []).append(n.op if data is None else f"{n.op} (packed)")
            if data is not None:
                if v in packed and packed[v] != data:
                    raise ValueError(f"constant {v.name!r} is packed differently by two of its readers")
                packed[v] = data
    for v in packed:
        if len(readers[v]) != sum(r.endswith("(packed)") for r in readers[v]) or v in graph.outputs:
            raise ValueError(f"constant {v.name!r} is read in a kernel-specific layout and also by "
                             f"{', '.join(readers[v])}{' and as a graph output' if v in graph.outputs else ''}: "
                             "give each reader its own constant")
    return packed


@dataclass(frozen=True)
class Step:
    name: str          # kernel symbol
    args: tuple        # buffer ids
    range: int
    grain: int
    index_error: str = ""   # what SQK_ERR_INDEX from this kernel means (Kernel.index_error)


class UnsupportedOp(NotImplementedError):
    pass


def _cstring(module: ir.Module, text: str, name: str):
    data = bytearray(text.encode() + b"\0")
    g = ir.GlobalVariable(module, ir.ArrayType(I8, len(data)), name)
    g.global_constant, g.linkage, g.initializer = True, "private", ir.Constant(ir.ArrayType(I8, len(data)), data)
    return g


def _array(module, ty, values, name):
    arr_ty = ir.ArrayType(ty, len(values))
    g = ir.GlobalVariable(module, arr_ty, name)
    g.global_constant, g.linkage, g.initializer = True, "private", ir.Constant(arr_ty, values)
    return g


def lower(graph: Graph, buffers: dict[Value, tuple[int, int]], arena_bytes: int, const_bytes: int,
          target, sizes: dict[Value, int] | None = None,
          progress: Callable[[int, int], None] | None = None,
          in_place_outputs=frozenset()) -> tuple[ir.Module, list[Step]]:
    """Build the LLVM module of ``graph``.  ``buffers`` maps every value to
    (SQK_BUF_* kind, index or byte offset); ``sizes`` gives the byte size of
    constants stored packed (``pack_constants``) where it differs from their type's.
    Consts and views (``is_view``) get no kernel.
    ``progress(done, total)`` is called after each node's kernel."""
    from . import elementwise  # noqa: F401  (registers emitters)
    from . import families  # noqa: F401

    module = ir.Module(name=graph.name)
    module.triple = target.triple
    module.data_layout = str(target.machine.target_data)

    buf_ids: dict[tuple[int, int, int], int] = {}
    buf_list = []

    def buf(v: Value) -> int:
        kind, index = buffers[v]
        key = (kind, index, (sizes or {}).get(v, v.type.nbytes))
        if key not in buf_ids:
            buf_ids[key] = len(buf_list)
            buf_list.append(key)
        return buf_ids[key]

    consts = {n.output: n.attrs["value"] for n in graph.nodes if n.op == "const"}
    steps: list[Step] = []
    shared: dict[tuple, tuple] = {}   # kernel_signature -> (symbol, range, grain, index_error, node)
    nodes = [n for n in graph.nodes if n.op != "const" and not is_view(n, buffers)]
    for n in nodes:
        fn = EMITTERS.get(kernel_key(n))
        if fn is None:
            fmt = n.attrs.get("sparse", "dense")
            raise UnsupportedOp(f"no kernel for op {n.op!r}" + (f" with sparse={fmt}" if fmt != "dense" else "")
                                + f" on target {target.name}")
        name = f"k{len(steps)}_{n.op}"
        ids = [buf(v) for v in n.inputs + n.outputs]
        aliased = frozenset(j for j, b in enumerate(ids) if ids.count(b) > 1)
        node_consts = [consts.get(v) for v in n.inputs]
        sig = kernel_signature(n, aliased, node_consts)
        if sig in shared:   # the same kernel as an earlier step's: a call to it
            first, rng, grain, message, first_node = shared[sig]
            _forward(module, name, module.globals[first])
            steps.append(Step(name, tuple(ids), rng, grain, rename_values(message, first_node, n)))
        else:
            k = Kernel(module, name, len(ids), target, aliased=aliased, consts=node_consts)
            rng, grain = fn(k, n)
            steps.append(Step(name, tuple(ids), rng, max(1, grain), k.index_error))
            shared[sig] = (name, rng, max(1, grain), steps[-1].index_error, n)
        if progress is not None:
            progress(len(steps), len(nodes))
    # An output that is also an input, a constant or another output gets its own copy
    # (except ``in_place_outputs``: state updated in its input's buffer, which the
    # caller passes as that output too).
    from .elementwise import emit_copy

    seen = set()
    for j, v in enumerate(graph.outputs):
        if (buffers[v] != (BUF_OUTPUT, j) or v in seen) and v not in in_place_outputs:
            name = f"k{len(steps)}_copy"
            k = Kernel(module, name, 2, target)
            rng, grain = emit_copy(k, v.type)
            out_id = len(buf_list)
            buf_list.append((BUF_OUTPUT, j, v.type.nbytes))
            steps.append(Step(name, (buf(v), out_id), rng, grain))
        seen.add(v)
    _program_table(module, graph, buf_list, steps, arena_bytes, const_bytes, target)
    return module, steps


def kernel_signature(n: Node, aliased: frozenset, consts: list) -> tuple:
    """What a kernel emitted for ``n`` depends on: the node without its value names
    (ir.text.node_signature), which arguments share a buffer, which inputs are
    constants, and for sparse formats (whose kernels are cut from the weight's
    nonzeros, ``Kernel.consts``) the constants' values.  Nodes of equal signatures,
    like the layers of a transformer, share one kernel: it is emitted and optimized
    once."""
    from ..ir.text import node_signature

    body = n.attrs.get("body")
    reads_values = any(":" in kernel_key(m) for m in [n] + (list(body.nodes) if isinstance(body, Graph) else []))
    values = tuple(None if c is None else hashlib.blake2b(np.ascontiguousarray(c).tobytes(), digest_size=16).digest()
                   for c in consts) if reads_values else ()
    return node_signature(n), aliased, tuple(c is not None for c in consts), values


def rename_values(message: str, first: Node, node: Node) -> str:
    """``message`` about ``first`` (its values written %name) said of ``node``, a node of
    the same signature: each of first's input/output names becomes node's at that place."""
    pairs = {a.name: b.name for a, b in zip(first.inputs + first.outputs, node.inputs + node.outputs)
             if a is not None and b is not None}
    if not message or all(a == b for a, b in pairs.items()):
        return message
    names = "|".join(re.escape(a) for a in sorted(pairs, key=len, reverse=True))   # longest name first
    return re.sub(rf"%({names})(?![\w])", lambda m: "%" + pairs[m.group(1)], message)


def _forward(module: ir.Module, name: str, target_fn: ir.Function) -> None:
    """Kernel ``name``: a call of ``target_fn`` (an identical kernel), kept out of line."""
    fn = ir.Function(module, target_fn.function_type, name)
    fn.attributes.add("nounwind")
    target_fn.attributes.add("noinline")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.ret(b.call(target_fn, list(fn.args)))


def _struct_type(name: str) -> ir.LiteralStructType:
    """The LLVM type of C struct ``name`` (runtime/abi.py STRUCTS: int64_t or pointer fields)."""
    return ir.LiteralStructType([PTR if kind == "ptr" else I64 for _, kind in STRUCTS[name]])


def _struct(struct: str, /, **fields) -> ir.Constant:
    """A constant of C struct ``struct`` from its fields by name (ints become i64 constants)."""
    order = [f for f, _ in STRUCTS[struct]]
    if set(fields) != set(order):
        raise ValueError(f"{struct}: fields {sorted(fields)}, the ABI has {order}")
    return ir.Constant(_struct_type(struct), [ir.Constant(I64, fields[f]) if isinstance(fields[f], int) else fields[f]
                                            for f in order])


def _program_table(module, graph, buf_list, steps, arena_bytes, const_bytes, target):
    tensor_t, step_t, buf_t = (_struct_type(n) for n in ("sqk_tensor_info", "sqk_step", "sqk_buffer"))
    null = ir.Constant(PTR, None)

    def tensors(values, tag):
        infos = []
        for j, v in enumerate(values):
            shape = _array(module, I64, [ir.Constant(I64, d) for d in v.shape], f"{tag}.shape.{j}") \
                if v.shape else null
            infos.append(_struct("sqk_tensor_info", name=_cstring(module, v.name, f"{tag}.name.{j}"),
                                 dtype=DTYPE_CODES[v.dtype.name], rank=len(v.shape), shape=shape,
                                 nbytes=v.type.nbytes))
        return _array(module, tensor_t, infos, tag) if infos else null

    step_consts = []
    for s in steps:
        args = _array(module, I64, [ir.Constant(I64, a) for a in s.args], f"{s.name}.args")
        step_consts.append(_struct("sqk_step", name=_cstring(module, s.name, f"{s.name}.name"),
                                   fn=module.globals[s.name], args=args, n_args=len(s.args), range=s.range,
                                   grain=s.grain))
    bufs = [_struct("sqk_buffer", kind=kind, index=index, nbytes=nbytes) for kind, index, nbytes in buf_list]
    g = ir.GlobalVariable(module, _struct_type("sqk_program"), "sqk_model")
    g.global_constant = True
    g.initializer = _struct(
        "sqk_program", abi_version=ABI_VERSION, name=_cstring(module, graph.name, "model.name"),
        n_inputs=len(graph.inputs), inputs=tensors(graph.inputs, "inputs"),
        n_outputs=len(graph.outputs), outputs=tensors(graph.outputs, "outputs"),
        n_buffers=len(bufs), buffers=_array(module, buf_t, bufs, "buffers") if bufs else null,
        n_steps=len(steps), steps=_array(module, step_t, step_consts, "steps") if steps else null,
        arena_bytes=arena_bytes, const_bytes=const_bytes,
        needs_vector=int(target.name == "riscv64" and target.has_vector))
