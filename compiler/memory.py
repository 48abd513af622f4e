"""Static memory planning: where every value lives at run time.

Inputs and outputs are the caller's buffers, constants live in the packed
constants blob, and intermediates share one arena: a value's slot is freed
after its last use and reused first-fit.  An elementwise map (a unary,
binary, gelu or cast node, or a fused map) runs in place: its result takes
the slot of an input of the same shape and element size whose last use it
is (sound for a map: element i of the output depends on element i of the
input only); codegen drops ``noalias`` from arguments that share a buffer.

Ops that declare ``aliases`` (ir/ops.py: an output that is an in-place update
of an input, e.g. attention_decode's KV caches) get the input's buffer for
that output when the input is a *state* input (``state_pairs``: a model input
the Module keeps between calls, the output being its new value) or an
intermediate read last by that node; otherwise the output gets its own
buffer and the kernel copies.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph, Node, Value

ALIGN = 64
BUF_INPUT, BUF_OUTPUT, BUF_CONST, BUF_ARENA = 0, 1, 2, 3


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass
class MemoryPlan:
    buffers: dict[Value, tuple[int, int]]   # value -> (kind, index or byte offset)
    arena_bytes: int
    intermediate_bytes: int                 # sum of all intermediates (no reuse)
    const_bytes: int
    const_layout: list[tuple[Value, int, object]]   # (value, offset, array or packed bytes) in blob order
    const_sizes: dict[Value, int]           # byte size of each constant in the blob


def plan_memory(graph: Graph, packed: dict[Value, bytes] | None = None, in_place: bool = True,
                state: dict[Value, list[Value]] | None = None) -> MemoryPlan:
    """``packed``: constants stored as kernel-specific bytes (codegen.lower.pack_constants);
    ``in_place``: let elementwise maps write over a dying input; ``state``
    (``state_pairs``): every value of each state input's update chain lives in
    that input's buffer."""
    packed = packed or {}
    buffers: dict[Value, tuple[int, int]] = {}
    for i, v in enumerate(graph.inputs):
        buffers[v] = (BUF_INPUT, i)
        for u in (state or {}).get(v, ()):
            buffers[u] = (BUF_INPUT, i)
    # constants: packed blob, 64-byte aligned entries (a constant that is also
    # an output stays here; lowering copies it out)
    offset, layout, sizes = 0, [], {}
    for n in graph.nodes:
        if n.op == "const":
            data = packed.get(n.output)
            size = n.output.type.nbytes if data is None else len(data)
            layout.append((n.output, offset, n.attrs["value"] if data is None else data))
            sizes[n.output] = size
            buffers[n.output] = (BUF_CONST, offset)
            offset = align(offset + max(size, 1))
    for j, v in enumerate(graph.outputs):
        if v not in buffers:
            buffers[v] = (BUF_OUTPUT, j)
    # intermediates: liveness over node order, first-fit reuse
    last_use: dict[Value, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last_use[v] = i
    free: list[tuple[int, int]] = []   # (offset, size), sorted by offset
    live: dict[Value, tuple[int, int]] = {}
    top = total = 0
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            if v in buffers:
                continue
            size = align(max(v.type.nbytes, 1))
            total += size
            u = _dying_input(n, v, live, last_use, i) if in_place else None
            if u is None:
                u = _aliased_input(n, v, live, last_use, i)
            if u is not None:
                buffers[v], live[v] = buffers[u], live.pop(u)
                continue
            for k, (off, sz) in enumerate(free):
                if sz >= size:
                    free[k:k + 1] = [(off + size, sz - size)] if sz > size else []
                    break
            else:
                off, top = top, top + size
            buffers[v] = (BUF_ARENA, off)
            live[v] = (off, size)
        for v in set(n.inputs) | set(n.outputs):
            if v in live and last_use.get(v, -1) <= i:
                free.append(live.pop(v))
                free.sort()
                merged = []
                for off, sz in free:  # coalesce neighbours
                    if merged and merged[-1][0] + merged[-1][1] == off:
                        merged[-1] = (merged[-1][0], merged[-1][1] + sz)
                    else:
                        merged.append((off, sz))
                free = merged
    return MemoryPlan(buffers, top, total, offset, layout, sizes)


def _dying_input(n: Node, v: Value, live: dict, last_use: dict, i: int) -> Value | None:
    """An arena input of map node ``n`` (index ``i``) whose slot its result ``v``
    can take: last read here, same shape and element size as ``v`` (so the map
    reads each element just before writing the same bytes)."""
    from ..codegen.fused import body_kind, is_elementwise

    if len(n.outputs) != 1 or not (is_elementwise(n) or (n.op == "fused" and body_kind(n.attrs["body"]) == "map")):
        return None
    for u in n.inputs:
        if u in live and last_use[u] == i and u.shape == v.shape and u.dtype.bits == v.dtype.bits:
            return u
    return None


def _aliased_input(n: Node, v: Value, live: dict, last_use: dict, i: int) -> Value | None:
    """The arena input that output ``v`` of ``n`` is declared an in-place update
    of (OpDef.aliases), when node ``i`` is its last reader."""
    from ..ir.ops import OPS

    j = OPS[n.op].aliases.get(n.outputs.index(v))
    u = n.inputs[j] if j is not None else None
    if u is not None and u in live and last_use[u] == i and u.type.nbytes == v.type.nbytes:
        return u
    return None


def state_pairs(graph: Graph, names) -> dict[Value, list[Value]]:
    """Resolve state input ``names``: for each, the chain of values that update
    it in place (through ops' ``aliases``), ending at a graph output: the
    input's new value.  Every value of the chain is then planned into the
    input's buffer, so no node may read a value of the chain after it has been
    updated (it would see the new data), and the output is returned once.
    Returns {input: [chain values..., output]}; IRError naming the problem."""
    from ..ir.graph import IRError
    from ..ir.ops import OPS

    by_name = {v.name: v for v in graph.inputs}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    users = graph.users()
    out: dict[Value, list[Value]] = {}
    for name in names:
        v = by_name.get(name)
        if v is None:
            raise IRError(f"state {name!r} is not an input of @{graph.name} (inputs: "
                          f"{', '.join(by_name) or 'none'})")
        chain, cur = [], v
        while True:
            updates = [(n, o) for n in users.get(cur, ()) for o, j in OPS[n.op].aliases.items() if n.inputs[j] is cur]
            if not updates:
                break
            if len(updates) > 1:
                raise IRError(f"state {name!r}: %{cur.name} is updated in place by {len(updates)} nodes; "
                              "a state value can have one update")
            n, o = updates[0]
            late = [u for u in users[cur] if u is not n and order[id(u)] > order[id(n)]]
            if late or sum(x is cur for x in n.inputs) > 1:
                raise IRError(f"state {name!r}: %{cur.name} is read by {(late[0] if late else n).op} after "
                              f"{n.op} updates it in place; read the updated value instead")
            cur = n.outputs[o]
            chain.append(cur)
        if not chain or graph.outputs.count(cur) != 1:
            raise IRError(f"state {name!r}: no graph output is an in-place update of it (an op with an aliased "
                          f"output, e.g. attention_decode's caches, returned once as an output)")
        if any(u in graph.outputs for u in chain[:-1]):
            raise IRError(f"state {name!r}: an intermediate value of its update chain is a graph output")
        out[v] = chain
    return out
