"""The ``fold_lookup_experts`` pass: sub-graphs that depend on a token id only
become lookup tables.

    fold_lookup_experts{max_bytes=1073741824, chunk=512}

A ``gather`` from a constant table along axis 0 by a one-element id tensor
(``ids`` of shape () or (1,): a decoding step) has a finite domain, the
table's rows.  Everything computed from that gather's result and constants
alone (the *region*: e.g. Mixture-of-Lookup-Experts' routed experts, FFNs fed
by the token embedding) takes one of only V values, V = the table's rows.
For each region value read outside the region (the *frontier*), the pass
evaluates the region once for every id (the reference semantics, ``chunk``
ids at a time with a leading batch axis), stores the results as a constant
table [V, size] and replaces the value's computation by one ``gather`` of
that table by the same ids (plus a ``reshape`` when its shape is not
[1, size]).  The region's nodes nothing reads any more are dropped.

- It folds only when it pays: the bytes a step loads for the region (its
  constants' bytes and the gathered rows) must exceed the rows of the new
  tables, and all of one region's tables together must stay within
  ``max_bytes``.
- Exactness: each table row is the region's value for that id in f32 (or
  the value's dtype), so the folded graph equals the unfolded one within
  f32 rounding (numpy's batched products may sum in another order).
- The batched evaluation shifts axis attributes and reshape targets by the
  added axis; it is checked against a plain one-id evaluation of the first
  and last ids, and an op it cannot batch makes the pass evaluate id by id
  (slower, same values).
- Ids outside the table still fail at run time: the new gather checks them
  exactly as the original one did.
- The report (``Module.report`` / ``.get("fold_lookup_experts")``): one row
  per region: the gathered table, the frontier values, the nodes folded, the
  bytes loaded per token before and after, the new tables' size, status.
"""
from __future__ import annotations

import numpy as np

from ...ir.graph import Graph, Node, TensorType, Value
from ...ir.ops import OPS
from . import Context, Pass, register
from .report import LayerReport

MiB = 1 << 20


class FoldReport(LayerReport):
    """Rows (dicts), one per gather region: layer (the gathered table's
    name), shape (its shape), values (frontier value names), nodes (how many
    nodes the region held), bytes_before / bytes_after (loaded per token by
    the region: constants read plus gathered rows, before and after folding),
    table_bytes (the new lookup tables), status ("folded" or "kept: why")."""

    pass_name = "fold_lookup_experts"

    def folded(self) -> list[str]:
        return [r["layer"] for r in self if r["status"] == "folded"]

    def format(self) -> str:
        head = f"{'table':<20}{'vocab':>7}{'nodes':>7}{'per token before':>18}{'after':>12}{'tables':>12}  status"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r['layer']:<20}{r['shape'][0]:>7}{r['nodes']:>7}{_size(r['bytes_before']):>18}"
                         f"{_size(r['bytes_after']):>12}{_size(r['table_bytes']):>12}  {r['status']}")
        fb = [r for r in self if r["status"] == "folded"]
        before, after = sum(r["bytes_before"] for r in fb), sum(r["bytes_after"] for r in fb)
        lines.append(f"{len(fb)} of {len(self)} regions folded; bytes per token {_size(before)} -> {_size(after)}")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _batched_attrs(op: str, attrs: dict, count: int) -> dict | None:
    """The attributes of ``op`` evaluated with one more leading axis of
    ``count`` items (None when that cannot be said by attributes)."""
    out = dict(attrs)
    for key, val in attrs.items():
        if key == "axis" and isinstance(val, int):
            out[key] = val + 1 if val >= 0 else val
        elif key == "axes":
            if not val:            # () means every axis (reductions) or the leading ones (slice)
                return None
            out[key] = tuple(a + 1 if a >= 0 else a for a in val)
        elif key == "perm":
            out[key] = (0,) + tuple(p + 1 for p in val)
        elif key == "shape" and op == "reshape":
            out[key] = (count,) + tuple(val)
    if op in ("slice",) and not attrs.get("axes"):
        return None
    return out


@register
class FoldLookupExperts(Pass):
    """Precompute sub-graphs fed only by a gathered token id (see the module docstring)."""

    name = "fold_lookup_experts"
    max_bytes: int = 1 << 30
    chunk: int = 512

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        consts = {n.output: n.attrs["value"] for n in graph.nodes if n.op == "const"}
        users = graph.users()
        outputs = set(graph.outputs)
        taken = {v.name for v in graph.values()}
        report = FoldReport()
        replace: dict[Node, list[Node]] = {}     # a region node -> the nodes standing in its place
        seen: set[Value] = set()
        folded: set[Node] = set()
        for n in graph.nodes:
            if n.op != "gather" or n.inputs[0] not in consts or n.inputs[1] in consts or n.inputs[1] in seen:
                continue
            table, ids = n.inputs
            if ids.type.size != 1 or n.attrs["axis"] not in (0, -table.type.rank):
                continue
            seen.add(ids)
            seeds = [m for m in graph.nodes if m.op == "gather" and m.inputs[1] is ids and m.inputs[0] in consts
                     and m.attrs["axis"] in (0, -m.inputs[0].type.rank) and m.inputs[0].shape[0] == table.shape[0]]
            region, dep = self._region(graph, seeds, consts)
            frontier = [v for m in region for v in m.outputs if v in outputs or
                        any(u not in region and u not in seeds for u in users.get(v, ()))]
            if not frontier or len(region) == 0:
                continue
            vocab = table.shape[0]
            row = {"layer": table.name, "shape": table.shape, "values": [v.name for v in frontier],
                   "nodes": len(region)}
            weights = {v for m in region for v in m.inputs if v in consts}
            before = sum(v.type.nbytes for v in weights) + sum(m.output.type.nbytes for m in seeds)
            kept_rows = sum(m.output.type.nbytes for m in seeds
                            if any(u not in region for u in users.get(m.output, ())) or m.output in outputs)
            after = sum(v.type.nbytes for v in frontier) + kept_rows
            table_bytes = sum(vocab * v.type.nbytes for v in frontier)
            row.update(bytes_before=before, bytes_after=after, table_bytes=table_bytes)
            if after >= before:
                report.append(dict(row, status="kept: the tables' rows are no smaller than what the region loads"))
                continue
            if table_bytes > self.max_bytes:
                report.append(dict(row, status=f"kept: tables of {_size(table_bytes)} exceed max_bytes="
                                               f"{self.max_bytes}"))
                continue
            tables = self._tables(seeds, region, frontier, consts, vocab)
            for v in frontier:
                lut_name = _fresh(f"{v.name}_lut", taken)
                lut = Value(lut_name, TensorType(v.dtype, (vocab, v.type.size)))
                arr = np.ascontiguousarray(tables[v].reshape(vocab, -1).astype(v.dtype.np_dtype))
                arr.setflags(write=False)
                new = [Node("const", (), (lut,), {"value": arr})]
                flat = (1, v.type.size) if ids.shape == (1,) else (v.type.size,)
                if v.shape == flat:
                    new.append(Node("gather", (lut, ids), (v,), {"axis": 0}))
                else:
                    g = Value(_fresh(f"{v.name}_row", taken), TensorType(v.dtype, flat))
                    new += [Node("gather", (lut, ids), (g,), {"axis": 0}),
                            Node("reshape", (g,), (v,), {"shape": v.shape})]
                replace.setdefault(next(m for m in region if v in m.outputs), []).extend(new)
            folded.update(region + seeds)   # a seed gather only the region read goes too
            report.append(dict(row, status="folded"))
        if ctx is not None:
            ctx.add_report(self, report)
        if not replace:
            return graph
        nodes = []
        for n in graph.nodes:
            nodes.extend(replace.get(n, [n]))
        droppable = set(folded) | {n for n in graph.nodes if n.op == "const" and n.output in consts
                                   and all(u in folded for u in users.get(n.output, ()))}
        return graph.with_nodes(_drop_dead(nodes, set(graph.outputs), droppable))

    @staticmethod
    def _region(graph: Graph, seeds: list[Node], consts: dict) -> tuple[list[Node], set[Value]]:
        """Nodes computed from the seeds' results and constants only."""
        dep = {m.output for m in seeds}
        region = []
        for m in graph.nodes:
            if m in seeds or m.op == "const" or not m.inputs:
                continue
            if getattr(OPS[m.op], "ALIASES", None):
                continue   # in-place updates (caches) are state, never folded
            if all(v in dep or v in consts for v in m.inputs) and any(v in dep for v in m.inputs):
                region.append(m)
                dep.update(m.outputs)
        return region, dep

    def _tables(self, seeds, region, frontier, consts, vocab) -> dict[Value, np.ndarray]:
        """Each frontier value for every id: arrays [vocab, *value.shape]."""
        def single(i):
            env = {m.output: consts[m.inputs[0]][i:i + 1].reshape(m.output.shape) for m in seeds}
            return _evaluate(region, env, consts, None)

        def batched(lo, hi):
            env = {m.output: consts[m.inputs[0]][lo:hi].reshape((hi - lo,) + m.output.shape) for m in seeds}
            return _evaluate(region, env, consts, hi - lo)

        out = {v: np.empty((vocab,) + v.shape, v.dtype.np_dtype) for v in frontier}
        try:
            with np.errstate(all="ignore"):
                probe = batched(0, min(2, vocab))
                for i in {0, min(2, vocab) - 1}:
                    want = single(i)
                    for v in frontier:
                        if not np.allclose(probe[v][i], want[v], rtol=1e-5, atol=1e-6, equal_nan=True):
                            raise ValueError("batched evaluation differs")
                for lo in range(0, vocab, self.chunk):
                    hi = min(vocab, lo + self.chunk)
                    got = batched(lo, hi)
                    for v in frontier:
                        out[v][lo:hi] = got[v]
            return out
        except (ValueError, TypeError, IndexError, AssertionError):
            pass
        with np.errstate(all="ignore"):     # the op cannot batch: id by id
            for i in range(vocab):
                got = single(i)
                for v in frontier:
                    out[v][i] = got[v]
        return out


def _evaluate(region, env, consts, count):
    """Run ``region`` by the reference semantics; ``count`` not None: every
    non-constant value carries a leading axis of that many ids."""
    env = dict(env)
    for m in region:
        attrs = m.attrs if count is None else _batched_attrs(m.op, m.attrs, count)
        if attrs is None:
            raise ValueError(f"{m.op} cannot be evaluated batched")
        args = [consts[v] if v in consts else env[v] for v in m.inputs]
        if count is not None and m.op in ("matmul", "matmul_sparse_input") and m.inputs[1] in consts \
                and m.inputs[1].type.rank == 2 and m.inputs[0] not in consts:
            # [count, ..., K] @ [K, N] as one 2-D product (numpy loops over a 3-D batch of GEMVs)
            a = args[0]
            res = [r.reshape(a.shape[:-1] + r.shape[-1:]) for r in
                   OPS[m.op].reference(a.reshape(-1, a.shape[-1]), args[1], **attrs)]
        else:
            res = OPS[m.op].reference(*args, **attrs)
        for v, r in zip(m.outputs, res):
            r = np.asarray(r)
            want = v.shape if count is None else (count,) + v.shape
            if r.shape != want:
                raise ValueError(f"{m.op}: shape {r.shape}, expected {want}")
            env[v] = r.astype(v.dtype.np_dtype, copy=False)
    return env


def _fresh(name: str, taken: set[str]) -> str:
    base, i = name, 1
    while name in taken:
        name, i = f"{base}{i}", i + 1
    taken.add(name)
    return name


def _drop_dead(nodes: list[Node], live: set[Value], droppable: set[Node]) -> list[Node]:
    """``nodes`` without those of ``droppable`` (the folded regions, their
    gathers and the constants they read) whose results nothing reads any more; other nodes
    stay as they are (dead code elsewhere is dce's business)."""
    live = set(live)
    keep = []
    for n in reversed(nodes):
        if n not in droppable or any(v in live for v in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    return list(reversed(keep))
