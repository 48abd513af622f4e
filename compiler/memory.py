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

A reshape is a view: its output shares its input's bytes (tensors are
contiguous row-major, so a reshape is the same bytes) and lowering emits no
kernel for it (``is_view``).  The input may be an arena intermediate, a graph
input or output, or a constant stored plain (not ``packed``); chains collapse
to the root.  A value and its views are one buffer for liveness: the slot is
freed, or taken by an in-place write, only after the last use of any of them.
Not viewed: a reshape that is a graph output (its kernel copies into the
caller's buffer, so outputs never alias inputs) and one of a state value
(that buffer is updated in place while the view may still be read).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph, Node, Value
from ..runtime.abi import ALIGN, BUF_ARENA, BUF_CONST, BUF_INPUT, BUF_OUTPUT  # noqa: F401  (the plan's kinds)


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass
class MemoryPlan:
    buffers: dict[Value, tuple[int, int]]   # value -> (kind, index or byte offset)
    arena_bytes: int
    intermediate_bytes: int                 # sum of all intermediates (no reuse, no in-place, no views)
    const_bytes: int
    const_layout: list[tuple[Value, int, object]]   # (value, offset, array or packed bytes) in blob order
    const_sizes: dict[Value, int]           # byte size of each constant in the blob
    views: frozenset = frozenset()          # reshape outputs sharing their input's buffer (no kernel)


def plan_memory(graph: Graph, packed: dict[Value, bytes] | None = None, in_place: bool = True,
                state: dict[Value, list[Value]] | None = None, views: bool = True) -> MemoryPlan:
    """``packed``: constants stored as kernel-specific bytes (codegen.lower.pack_constants);
    ``in_place``: let elementwise maps write over a dying input; ``state``
    (``state_pairs``): every value of each state input's update chain lives in
    that input's buffer; ``views``: reshapes share their input's buffer.
    ``intermediate_bytes`` is the no-sharing baseline: every intermediate at
    its own size, including those written in place and views of an arena
    value (not views of an input, output or constant: never arena bytes)."""
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
    stateful = {u for v, chain in (state or {}).items() for u in (v, *chain)}
    root = _view_roots(graph, buffers, packed, stateful) if views else {}
    for v, r in root.items():
        if r in buffers:  # a view of an input, output or constant: its bytes
            buffers[v] = buffers[r]
    # intermediates: liveness over node order (a view's uses count for its
    # root: one buffer), first-fit reuse
    last_use: dict[Value, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            last_use[root.get(v, v)] = i
    for v, r in root.items():
        last_use[v] = last_use.get(r, -1)
    free: list[tuple[int, int]] = []   # (offset, size), sorted by offset
    live: dict[Value, tuple[int, int]] = {}
    top = total = 0
    for i, n in enumerate(graph.nodes):
        for v in n.outputs:
            if v in buffers:
                continue
            size = align(max(v.type.nbytes, 1))
            total += size
            if v in root:  # a view of a live arena value
                buffers[v] = buffers[root[v]]
                continue
            u = _dying_input(n, v, live, root, last_use, i) if in_place else None
            if u is None:
                u = _aliased_input(n, v, live, root, last_use, i)
            if u is not None:
                buffers[v], live[v] = buffers[u], live.pop(root.get(u, u))
                continue
            for k, (off, sz) in enumerate(free):
                if sz >= size:
                    free[k:k + 1] = [(off + size, sz - size)] if sz > size else []
                    break
            else:
                off, top = top, top + size
            buffers[v] = (BUF_ARENA, off)
            live[v] = (off, size)
        for v in {root.get(x, x) for x in (*n.inputs, *n.outputs)}:
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
    return MemoryPlan(buffers, top, total, offset, layout, sizes, frozenset(root))


def _view_roots(graph: Graph, buffers: dict, packed: dict, stateful: set) -> dict[Value, Value]:
    """{reshape output: the value whose bytes it views}, chains resolved to the
    root, for every reshape that can be a view (module docstring)."""
    root: dict[Value, Value] = {}
    for n in graph.nodes:
        if n.op != "reshape" or n.output in buffers:  # a graph output: copied into the caller's buffer
            continue
        x = n.inputs[0]
        r = root.get(x, x)
        if r in stateful or r in packed:
            continue
        root[n.output] = r
    return root


def _dying_input(n: Node, v: Value, live: dict, root: dict, last_use: dict, i: int) -> Value | None:
    """An arena input of map node ``n`` (index ``i``) whose slot its result ``v``
    can take: last read here (with its views: ``last_use`` is the group's), same
    shape and element size as ``v`` (so the map reads each element just before
    writing the same bytes; another view of the slot among the inputs has the
    same element count, so broadcasting cannot make it read other bytes)."""
    from ..ir.fusion import body_kind, is_elementwise

    if len(n.outputs) != 1 or not (is_elementwise(n) or (n.op == "fused" and body_kind(n.attrs["body"]) == "map")):
        return None
    for u in n.inputs:
        if root.get(u, u) in live and last_use[u] == i and u.shape == v.shape and u.dtype.bits == v.dtype.bits:
            return u
    return None


def _aliased_input(n: Node, v: Value, live: dict, root: dict, last_use: dict, i: int) -> Value | None:
    """The arena input that output ``v`` of ``n`` is declared an in-place update
    of (OpDef.aliases), when node ``i`` is its last reader."""
    from ..ir.ops import OPS

    j = OPS[n.op].aliases.get(n.outputs.index(v))
    u = n.inputs[j] if j is not None else None
    if u is not None and root.get(u, u) in live and last_use[u] == i and u.type.nbytes == v.type.nbytes:
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
            updates = [(n, o) for n in users.get(cur, ()) for o, j in OPS[n.op].aliases.items()
                       if j < len(n.inputs) and n.inputs[j] is cur]
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
