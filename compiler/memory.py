"""Static memory planning: where every value lives at run time.

Inputs and outputs are the caller's buffers, constants live in the packed
constants blob, and intermediates share one arena: a value's slot is freed
after its last use and reused first-fit.  (A later pass deepens this with
in-place execution.)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph, Value

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


def plan_memory(graph: Graph, packed: dict[Value, bytes] | None = None) -> MemoryPlan:
    """``packed``: constants stored as kernel-specific bytes (codegen.lower.pack_constants)."""
    packed = packed or {}
    buffers: dict[Value, tuple[int, int]] = {}
    for i, v in enumerate(graph.inputs):
        buffers[v] = (BUF_INPUT, i)
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
