"""The ``sparsify`` pass: magnitude pruning of constant matmul weights, and a
per-layer accuracy report.  Pruning changes values only: how a weight is
stored (dense, csr, bsrRxC, nmN:M) is ``select_format``'s choice, made after
quantization from the weights' actual structure (``compile(sparsify=...)``
runs it; a hand-written pipeline should end with ``select_format``).

    sparsify{pattern=unstructured|N:M|block=RxC, sparsity=0.5, method=magnitude,
             scope=layer|global, skip=w1|w2, seed=0, samples=16}

Every matmul(x, W) with a constant 2-D float W (K rows along the reduction,
N output columns) is pruned; the constant keeps its dense shape with zeros:

- ``N:M`` (1 <= N < M <= 16, e.g. 2:4): in every aligned run of M rows k of
  each column, the N largest |w| stay (ties: the earlier row); a last short
  run keeps at most N (fits ``nmN:M``).  ``sparsity`` does not apply
  (it is 1 - N/M) and neither does ``scope``.
- ``unstructured``: the ``sparsity`` fraction of elements with the smallest
  |w| become zero, per layer (``scope=layer``) or under one threshold over all
  pruned weights (``scope=global``; layers then end up with different
  sparsities; fits ``csr``).
- ``block=RxC``: the weight is tiled into R x C blocks (R rows along K, C
  columns along N, aligned at multiples of R and C, edge blocks smaller);
  whole blocks with the smallest L2 norm become zero until the fraction of
  zeroed elements is nearest ``sparsity`` (per layer or global, as above).
  Fits ``bsrRxC`` for a supported block (``ir.sparsity.BSR_BLOCKS``), else
  the largest supported block dividing R x C (zero 8x8 blocks are zero 4x4
  blocks), else csr.

Elements already zero count as pruned: ``sparsity`` is the fraction of zeros
the weight ends with (more when it had more).  The report's ``format`` column
says which format the pattern fits; ``select_format`` measures every weight
and picks the cheapest, dense included.  ``skip`` names weight constants
to leave alone, separated by ``|`` or ``;``.

A weight constant also read by anything else than the weight operand of a
matmul (or returned) is not changed: the matmuls get a pruned copy named
``<name>.pruned``.

The report (``self.report``, a :class:`SparsityReport`, read by the driver
as ``Module.report``) measures each layer in isolation, as quantize's does:
the layer's input (calibration samples through the reference interpreter,
``with_calibration(data)``; else ``samples`` seeded standard-normal rows)
through the unpruned and the pruned weight, in float64: relative L2 error
and cosine of the outputs.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, Value
from ...ir.sparsity import BSR_BLOCKS, NM_MAX_M
from ..quantize import output_error
from . import Pass, register
from .quantize import _fresh, split_names
from .report import LayerReport, layer_inputs

METHODS = ("magnitude",)
SCOPES = ("layer", "global")


def _error(msg: str):
    from ..pipeline import PipelineError  # the pipeline module imports the passes package

    return PipelineError(msg)


@dataclass(frozen=True)
class Pattern:
    """A pruning pattern: "unstructured", "nm" (n of every m) or "block" (r x c)."""

    kind: str
    n: int = 0
    m: int = 0
    r: int = 1
    c: int = 1

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}",
                "block": f"block={self.r}x{self.c}"}[self.kind]

    @property
    def format(self) -> str:
        """The sparse format a weight pruned this way fits (see the module docstring)."""
        if self.kind == "nm":
            return f"nm{self.n}:{self.m}"
        if self.kind == "block":
            fits = [(r, c) for r, c in BSR_BLOCKS if self.r % r == 0 and self.c % c == 0]
            if fits:
                r, c = max(fits, key=lambda rc: rc[0] * rc[1])
                return f"bsr{r}x{c}"
        return "csr"


_PATTERN = re.compile(r"(unstructured)|(\d+):(\d+)|block=(\d+)x(\d+)")


def parse_pattern(spec: str) -> Pattern:
    """``"unstructured" | "N:M" | "block=RxC"`` -> Pattern; PipelineError names what is wrong."""
    m = _PATTERN.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise _error(f"pass sparsify: option pattern={spec}: does not parse; expected unstructured, "
                     f"N:M (e.g. 2:4) or block=RxC (e.g. block=4x4)")
    if m.group(1):
        return Pattern("unstructured")
    if m.group(2):
        n, mm = int(m.group(2)), int(m.group(3))
        if not 1 <= n < mm:
            raise _error(f"pass sparsify: option pattern={spec}: N:M needs 1 <= N < M (N nonzeros kept in "
                         f"every M rows), got N={n}, M={mm}")
        if mm > NM_MAX_M:
            raise _error(f"pass sparsify: option pattern={spec}: M={mm} is above {NM_MAX_M}, the largest run "
                         f"the nmN:M format stores")
        return Pattern("nm", n=n, m=mm)
    r, c = int(m.group(4)), int(m.group(5))
    if r < 1 or c < 1:
        raise _error(f"pass sparsify: option pattern={spec}: block sizes must be at least 1x1")
    return Pattern("block", r=r, c=c)


# --- pruning math ---------------------------------------------------------------------------------

def prune_nm(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """``w`` [K, N] with, in every aligned run of ``m`` rows of each column,
    only the ``n`` largest |w| kept (ties: the earlier row); same dtype."""
    k, cols = w.shape
    runs = -(-k // m)
    mag = np.full((runs * m, cols), -1.0)   # padding rows rank after every real one
    mag[:k] = np.abs(w.astype(np.float64))
    mag = mag.reshape(runs, m, cols)
    order = np.argsort(-mag, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(m)[None, :, None], order.shape), axis=1)
    keep = (rank < n).reshape(runs * m, cols)[:k]
    return np.where(keep, w, w.dtype.type(0)).astype(w.dtype)


def _block_norms(w: np.ndarray, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """([kb, nb] L2 norms of the r x c blocks of w, [kb, nb] element counts)."""
    k, n = w.shape
    kb, nb = -(-k // r), -(-n // c)
    sq = np.zeros((kb * r, nb * c))
    sq[:k, :n] = np.square(w.astype(np.float64))
    norms = np.sqrt(sq.reshape(kb, r, nb, c).sum(axis=(1, 3)))
    rows = np.minimum(r, k - np.arange(kb) * r)
    cols = np.minimum(c, n - np.arange(nb) * c)
    return norms, rows[:, None] * cols[None, :]


def prune_blocks(ws: list[np.ndarray], r: int, c: int, sparsity: float) -> list[np.ndarray]:
    """Zero the r x c blocks (1x1: elements) of smallest L2 norm over all of
    ``ws`` together until the zeroed elements are nearest ``sparsity`` of
    their total (fewer on a tie); ties between norms go to the earlier block
    (row-major, weights in order).  One weight: per-layer pruning; several:
    one global threshold."""
    stats = [_block_norms(w, r, c) for w in ws]
    norms = np.concatenate([s[0].ravel() for s in stats])
    counts = np.concatenate([s[1].ravel() for s in stats])
    order = np.argsort(norms, kind="stable")
    cum = np.concatenate([[0], np.cumsum(counts[order])])
    take = int(np.argmin(np.abs(cum - sparsity * counts.sum())))
    pruned = np.zeros(norms.size, bool)
    pruned[order[:take]] = True
    out, pos = [], 0
    for w, (bn, _) in zip(ws, stats):
        mask = pruned[pos:pos + bn.size].reshape(bn.shape)
        pos += bn.size
        full = np.repeat(np.repeat(mask, r, axis=0), c, axis=1)[:w.shape[0], :w.shape[1]]
        out.append(np.where(full, w.dtype.type(0), w).astype(w.dtype))
    return out


def zero_fraction(w: np.ndarray) -> float:
    return 1.0 - np.count_nonzero(w) / w.size if w.size else 0.0


# --- the pass -------------------------------------------------------------------------------------

@register
class Sparsify(Pass):
    """Prune constant matmul weights by magnitude (see the module docstring)."""

    name = "sparsify"
    pattern: str = "unstructured"
    sparsity: float = 0.5
    method: str = "magnitude"
    scope: str = "layer"
    skip: str = ""
    seed: int = 0
    samples: int = 16

    # side channel, not options (see passes/quantize.py)
    report: ClassVar = None
    calibration_data: ClassVar = None

    def __post_init__(self):
        p = "pass sparsify: option"
        pat = parse_pattern(self.pattern)
        if not 0 <= self.sparsity < 1:  # NaN fails too
            raise _error(f"{p} sparsity={self.sparsity}: expected a fraction of zeros in [0, 1)")
        if self.method not in METHODS:
            raise _error(f"{p} method={self.method}: unknown method; expected {' or '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise _error(f"{p} scope={self.scope}: expected layer or global")
        if pat.kind == "nm" and self.sparsity != 0.5:
            raise _error(f"{p} sparsity={self.sparsity}: does not apply to pattern={self.pattern}, which keeps "
                         f"{pat.n} of every {pat.m} (sparsity {1 - pat.n / pat.m:g})")
        if pat.kind == "nm" and self.scope != "layer":
            raise _error(f"{p} scope={self.scope}: does not apply to pattern={self.pattern} (every run of "
                         f"{pat.m} rows is pruned on its own)")
        if any(ch in self.skip for ch in ",{}"):
            raise _error(f"{p} skip={self.skip}: separate names with '|' or ';'")
        if self.samples < 1:
            raise _error(f"{p} samples={self.samples}: expected at least 1 random input row")

    def with_calibration(self, data) -> Sparsify:
        """A copy that measures errors on ``data`` (a list of {input name: array})."""
        if data is not None and (not isinstance(data, (list, tuple)) or not data
                                 or not all(isinstance(d, dict) for d in data)):
            raise _error("calibration_data must be a non-empty list of {input name: numpy array} dicts")
        p = copy.copy(self)
        object.__setattr__(p, "calibration_data", None if data is None else list(data))
        return p

    def prune(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The pruned copies of ``arrays`` (the weights pruned in one run, in order)."""
        pat = parse_pattern(self.pattern)
        if pat.kind == "nm":
            return [prune_nm(a, pat.n, pat.m) for a in arrays]
        if self.scope == "global":
            return prune_blocks(arrays, pat.r, pat.c, self.sparsity)
        return [prune_blocks([a], pat.r, pat.c, self.sparsity)[0] for a in arrays]

    def run(self, graph: Graph) -> Graph:
        pat = parse_pattern(self.pattern)
        prod = graph.producers()
        uses: dict[Value, list[Node]] = {}   # weight -> the matmuls reading it as their weight
        for n in graph.nodes:
            if n.op != "matmul":
                continue
            w = n.inputs[1]
            src = prod.get(w)
            if src is not None and src.op == "const" and w.type.rank == 2 and w.dtype in dt.FLOATS and w.type.size:
                uses.setdefault(w, []).append(n)
        if not uses:
            hint = (" (quantize has run: put sparsify before quantize)"
                    if any(n.op == "matmul_q" for n in graph.nodes) else "")
            raise _error(f"sparsify: no matmul with a constant 2-D float weight in graph @{graph.name}{hint}")
        skip = split_names(self.skip)
        names = {w.name for w in uses}
        unknown = [s for s in skip if s not in names]
        if unknown:
            raise _error(f"sparsify: skip names {', '.join(unknown)}, which is not a matmul weight of "
                         f"@{graph.name}; weights: {', '.join(sorted(names))}")
        for w in uses:
            arr = prod[w].attrs["value"]
            if w.name not in skip and not np.isfinite(arr).all():
                raise _error(f"sparsify: constant {w.name} has non-finite weights; cannot rank NaN/Inf by magnitude")

        todo = [w for w in uses if w.name not in skip]
        pruned = dict(zip(todo, self.prune([prod[w].attrs["value"] for w in todo])))
        inputs = layer_inputs(graph, {w: uses[w] for w in todo}, self.calibration_data, self.seed, self.samples,
                              _error)
        report = SparsityReport()
        for w in uses:
            arr = prod[w].attrs["value"]
            row = {"layer": w.name, "shape": w.shape, "dtype": w.dtype.name, "pattern": str(pat),
                   "zeros_before": zero_fraction(arr)}
            if w not in pruned:
                report.append({**row, "zeros": row["zeros_before"], "rel_l2": None, "cosine": None,
                               "format": None, "status": "skipped (skip=)"})
                continue
            new = pruned[w]
            x = np.asarray(inputs[w], np.float64)
            rel, cos = output_error(x @ arr.astype(np.float64), x @ new.astype(np.float64))
            fmt = pat.format if np.count_nonzero(new) < new.size else None
            report.append({**row, "zeros": zero_fraction(new), "rel_l2": rel, "cosine": cos, "format": fmt,
                           "status": "pruned" if fmt else "pruned (no zeros)"})

        # a weight read elsewhere too keeps its values there: the matmuls get a pruned copy
        weight_reads = {id(n) for ns in uses.values() for n in ns}
        shared = {v for n in graph.nodes if id(n) not in weight_reads for v in n.inputs} | set(graph.outputs)
        shared |= {n.inputs[0] for ns in uses.values() for n in ns}   # W as a left operand too
        taken = {v.name for v in graph.values()}
        copies: dict[Value, Value] = {}
        out_nodes = []
        for node in graph.nodes:
            if node.op == "const" and node.output in pruned:
                w = node.output
                value = np.ascontiguousarray(pruned[w])
                value.setflags(write=False)
                if w in shared:
                    copies[w] = Value(_fresh(f"{w.name}.pruned", taken), w.type)
                    out_nodes += [node, Node("const", (), (copies[w],), {"value": value})]
                else:
                    out_nodes.append(Node("const", (), (w,), {"value": value}))
            elif node.op == "matmul" and node.inputs[1] in copies:
                out_nodes.append(Node("matmul", (node.inputs[0], copies[node.inputs[1]]), node.outputs, node.attrs))
            else:
                out_nodes.append(node)
        object.__setattr__(self, "report", report)
        return graph.with_nodes(out_nodes)


class SparsityReport(LayerReport):
    """Rows (dicts), one per weight: layer, shape, dtype, pattern, zeros_before
    and zeros (fractions of zero elements), rel_l2 and cosine of the layer
    output (None when skipped), format (the sparse format the pattern fits, or
    None), status ("pruned", "pruned (no zeros)", "skipped (skip=)")."""

    pass_name = "sparsify"

    def pruned(self) -> list[str]:
        return [r["layer"] for r in self if r["status"].startswith("pruned")]

    def skipped(self) -> list[str]:
        return [r["layer"] for r in self if r["status"].startswith("skipped")]

    def format(self) -> str:
        """A text table with a summary line."""
        head = (f"{'layer':<20}{'shape':>14}  {'pattern':<14}{'zeros':>15}{'rel L2':>10}{'cosine':>10}  "
                f"{'format':<9} status")
        lines = [head, "-" * len(head)]
        for r in self:
            shape = "x".join(map(str, r["shape"]))
            zeros = f"{r['zeros_before']:.1%} -> {r['zeros']:.1%}"
            rel = "-" if r["rel_l2"] is None else f"{r['rel_l2']:.2e}"
            cos = "-" if r["cosine"] is None else f"{r['cosine']:.6f}"
            lines.append(f"{r['layer']:<20}{shape:>14}  {r['pattern']:<14}{zeros:>15}{rel:>10}{cos:>10}  "
                         f"{r['format'] or '-':<9} {r['status']}")
        size = sum(int(np.prod(r["shape"])) for r in self)
        before = sum(r["zeros_before"] * np.prod(r["shape"]) for r in self) / size if size else 0.0
        after = sum(r["zeros"] * np.prod(r["shape"]) for r in self) / size if size else 0.0
        lines.append(f"{len(self.pruned())} of {len(self)} weights pruned"
                     + (f", skipped: {', '.join(self.skipped())}" if self.skipped() else "")
                     + f"; zeros {before:.1%} -> {after:.1%} of weight elements")
        return "\n".join(lines)
