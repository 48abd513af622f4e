"""The ``sparsify`` pass: pruning of constant matmul weights (magnitude, or
calibration-aware Wanda / SparseGPT), and a per-layer accuracy report.  Pruning changes values only: how a weight is
stored (dense, csr, bsrRxC, nmN:M) is ``select_format``'s choice, made after
quantization from the weights' actual structure (``compile(sparsify=...)``
runs it; a hand-written pipeline should end with ``select_format``).

    sparsify{pattern=unstructured|N:M|block=RxC, sparsity=0.5, method=magnitude|wanda|sparsegpt,
             scope=layer|global, skip=w1|w2, seed=0, samples=16, damp=0.01}

``method=magnitude`` ranks by |w| as below; ``wanda`` and ``sparsegpt``
(:func:`wanda_prune`, :func:`sparsegpt_prune`) rank with the layer's inputs
over the calibration data (required; shared with quantize through
``compiler.calibration``), per layer only (``scope=layer``); SparseGPT also
updates the weights it keeps, and a layer whose Hessian it cannot factor
is left unpruned, the report saying why.

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

The report (a :class:`SparsityReport` filed in the pass manager's context,
read by the driver as ``Module.report``) measures each layer in isolation, as
quantize's does: the layer's input (calibration samples through the reference
interpreter, ``ctx.calibration``, at most ``calibration.MAX_ROWS``-ish rows of
them; else ``samples`` seeded standard-normal rows) through the unpruned and
the pruned weight, in float64: relative L2 error and cosine of the outputs,
and for wanda/sparsegpt magnitude's error on the same rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, Value
from ...ir.sparsity import BSR_BLOCKS, NM_MAX_M
from ..calibration import CalibrationError, LayerStats, random_stats
from ..quantize import output_error
from . import Context, Pass, option, register
from .quantize import _fresh, split_names
from .report import LayerReport, format_end_to_end

METHODS = ("magnitude", "wanda", "sparsegpt")
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
    return np.where(nm_keep(np.abs(w.astype(np.float64)), n, m), w, w.dtype.type(0)).astype(w.dtype)


def nm_keep(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Mask [K, N]: in every aligned run of ``m`` rows of each column, the
    ``n`` largest ``score`` (>= 0; ties: the earlier row); a last short run keeps at most n."""
    k, cols = score.shape
    runs = -(-k // m)
    mag = np.full((runs * m, cols), -1.0)   # padding rows rank after every real one
    mag[:k] = score
    mag = mag.reshape(runs, m, cols)
    order = np.argsort(-mag, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(m)[None, :, None], order.shape), axis=1)
    return (rank < n).reshape(runs * m, cols)[:k]


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
    return [np.where(mask, w.dtype.type(0), w).astype(w.dtype)
            for w, mask in zip(ws, block_masks(ws, r, c, sparsity))]


def block_masks(scores: list[np.ndarray], r: int, c: int, sparsity: float) -> list[np.ndarray]:
    """The masks (True: pruned) :func:`prune_blocks` applies, ranking the
    blocks by the L2 norm of ``scores`` (the weights themselves for magnitude)."""
    stats = [_block_norms(w, r, c) for w in scores]
    norms = np.concatenate([s[0].ravel() for s in stats])
    counts = np.concatenate([s[1].ravel() for s in stats])
    order = np.argsort(norms, kind="stable")
    cum = np.concatenate([[0], np.cumsum(counts[order])])
    take = int(np.argmin(np.abs(cum - sparsity * counts.sum())))
    pruned = np.zeros(norms.size, bool)
    pruned[order[:take]] = True
    out, pos = [], 0
    for w, (bn, _) in zip(scores, stats):
        mask = pruned[pos:pos + bn.size].reshape(bn.shape)
        pos += bn.size
        out.append(np.repeat(np.repeat(mask, r, axis=0), c, axis=1)[:w.shape[0], :w.shape[1]])
    return out


def wanda_prune(w: np.ndarray, col_norm: np.ndarray, pattern: Pattern, sparsity: float) -> np.ndarray:
    """Wanda (Sun et al. 2023): score |w_kn| * ||x_k||_2 (``col_norm`` [K],
    the layer input's L2 norm per channel over the calibration rows), pruned
    without any update: ``unstructured``: in every output column n, the
    int(K * sparsity) lowest scores (the paper's per-output comparison group);
    ``N:M``: the N highest scores of every aligned run of M rows stay;
    ``block``: the blocks of lowest score norm, per layer."""
    score = np.abs(w.astype(np.float64)) * np.asarray(col_norm, np.float64)[:, None]
    if pattern.kind == "nm":
        keep = nm_keep(score, pattern.n, pattern.m)
    elif pattern.kind == "block":
        keep = ~block_masks([score], pattern.r, pattern.c, sparsity)[0]
    else:
        order = np.argsort(score, axis=0, kind="stable")
        keep = np.ones(w.shape, bool)
        np.put_along_axis(keep, order[:int(w.shape[0] * sparsity)], False, axis=0)
    return np.where(keep, w, w.dtype.type(0)).astype(w.dtype)


SPARSEGPT_BLOCK = 128   # columns per lazy batch (SparseGPT's Bs; masks of unstructured/block patterns chosen per batch)


def sparsegpt_prune(w: np.ndarray, hessian: np.ndarray, pattern: Pattern, sparsity: float,
                    damp: float = 0.01, block: int = SPARSEGPT_BLOCK, name: str = "weight") -> np.ndarray:
    """SparseGPT (Frantar & Alistarh 2023) of ``w`` [K, N] for a layer whose
    inputs have Hessian ``hessian`` [K, K]: the GPTQ solver with pruning in
    place of rounding.  Rows k of w (the paper's columns) are visited in
    order; a pruned weight's error is spread over the rows not yet visited
    through the Cholesky factor of H^-1 (dampened by ``damp`` * mean diag H),
    in lazy batches of ``block`` rows.  Masks by the score w^2 / [H^-1]_kk^2:

    - ``unstructured``: per batch, the round(sparsity * size) lowest scores
      of the batch (all outputs together, as the paper's adaptive mask);
    - ``N:M``: when a run of M rows starts, the M - N lowest of each column
      (a last short run of r rows prunes r - N when r > N); batches are
      whole runs;
    - ``block=RxC``: per batch (whole R-row tiles), the R x C tiles of
      lowest score norm, nearest ``sparsity`` of the batch.

    Returns the pruned and updated weight, ``w``'s dtype."""
    k, n = w.shape
    h = np.array(hessian, np.float64)
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise ValueError(f"sparsify {name}: hessian must be a finite [{k}, {k}] matrix, got {list(h.shape)}")
    W = w.astype(np.float64).T.copy()            # [N, K]: the paper's orientation
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        raise ValueError(f"sparsify {name}: the calibration Hessian is not positive definite even with "
                         f"damp={damp}; raise damp") from None
    unit = {"nm": pattern.m, "block": pattern.r}.get(pattern.kind, 1)
    step = -(-block // unit) * unit
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].copy()
        err1 = np.zeros((n, i2 - i1))
        d = np.diag(hinv)[i1:i2]
        mask = np.zeros(W1.shape, bool)
        if pattern.kind == "unstructured":
            score = (np.square(W1) / np.square(d)[None, :]).ravel()
            mask.ravel()[np.argsort(score, kind="stable")[:int(round(score.size * sparsity))]] = True
        elif pattern.kind == "block":
            score = np.sqrt(np.square(W1) / np.square(d)[None, :]).T     # [rows of the batch, N]
            mask = block_masks([score], pattern.r, pattern.c, sparsity)[0].T
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                run = W1[:, i:i + pattern.m]
                drop = run.shape[1] - pattern.n
                if drop > 0:
                    score = np.square(run) / np.square(d[i:i + pattern.m])[None, :]
                    low = np.argsort(score, axis=1, kind="stable")[:, :drop]
                    np.put_along_axis(mask[:, i:i + pattern.m], low, True, axis=1)
            col = i1 + i
            q = np.where(mask[:, i], 0.0, W1[:, i])
            e = (W1[:, i] - q) / hinv[col, col]
            W1[:, i:] -= np.outer(e, hinv[col, col:i2])
            W1[:, i] = q
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return W.T.astype(w.dtype)


def zero_fraction(w: np.ndarray) -> float:
    return 1.0 - np.count_nonzero(w) / w.size if w.size else 0.0


# --- the pass -------------------------------------------------------------------------------------

@register
class Sparsify(Pass):
    """Prune constant matmul weights by magnitude (see the module docstring)."""

    name = "sparsify"
    pattern: str = option("unstructured", "prune matmul weights: unstructured, N:M or block=RxC")
    sparsity: float = option(0.5, "fraction of zeros for unstructured and block patterns")
    method: str = option("magnitude", "how weights are chosen for pruning (the others need calibration data)",
                         choices=METHODS, flag="--sparsify-method")
    scope: str = option("layer", "one threshold per layer, or one over all pruned weights", choices=SCOPES)
    skip: str = ""
    seed: int = 0
    samples: int = 16
    damp: float = 0.01

    reads_calibration: ClassVar = True

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
        if self.method != "magnitude" and self.scope != "layer":
            raise _error(f"{p} scope={self.scope}: applies to method=magnitude only ({self.method} ranks weights "
                         f"by their own layer's inputs)")
        if not 0 <= self.damp < float("inf"):
            raise _error(f"{p} damp={self.damp}: expected a non-negative fraction of mean(diag H), e.g. 0.01")
        if self.damp != 0.01 and self.method != "sparsegpt":
            raise _error(f"pass sparsify: damp= applies to method=sparsegpt (got method={self.method})")

    def prune(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The pruned copies of ``arrays`` (the weights pruned in one run, in order)."""
        pat = parse_pattern(self.pattern)
        if pat.kind == "nm":
            return [prune_nm(a, pat.n, pat.m) for a in arrays]
        if self.scope == "global":
            return prune_blocks(arrays, pat.r, pat.c, self.sparsity)
        return [prune_blocks([a], pat.r, pat.c, self.sparsity)[0] for a in arrays]

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
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
        calib = ctx.calibration if ctx is not None else None
        if self.method != "magnitude" and calib is None:
            raise _error(f"sparsify: method={self.method} needs calibration data (each layer's inputs) and none "
                         f"was given: pass calibration_data=[{{input: array}}, ...] to sqk.compile "
                         f"(--calibration FILE.npz on the command line), or use method=magnitude")
        xs = list(dict.fromkeys(m.inputs[0] for w in todo for m in uses[w]))
        if calib is None:
            by_x = random_stats(xs, self.seed, self.samples)
            source = f"{self.samples} random normal rows (seed={self.seed})"
        else:
            try:
                by_x = calib.stats(graph, xs)
            except CalibrationError as e:
                raise _error(str(e)) from None
            source = calib.source
        stats = {w: LayerStats.merged([by_x[x] for x in dict.fromkeys(m.inputs[0] for m in uses[w])]) for w in todo}
        arrays = [prod[w].attrs["value"] for w in todo]
        magnitude = dict(zip(todo, self.prune(arrays)))
        pruned, why = {}, {}
        for w, a in zip(todo, arrays):
            if self.method == "magnitude":
                pruned[w] = magnitude[w]
            elif self.method == "wanda":
                pruned[w] = wanda_prune(a, stats[w].col_norm, pat, self.sparsity)
            else:
                try:
                    pruned[w] = calib.memo(sparsegpt_prune, a, stats[w].hessian, pat, self.sparsity, self.damp,
                                           name=w.name)
                except ValueError as e:
                    why[w] = str(e).removeprefix(f"sparsify {w.name}: ")
        report = SparsityReport()
        for w in uses:
            arr = prod[w].attrs["value"]
            row = {"layer": w.name, "shape": w.shape, "dtype": w.dtype.name, "pattern": str(pat),
                   "zeros_before": zero_fraction(arr), "method": self.method, "calibration": source}
            if w not in pruned:
                report.append({**row, "zeros": row["zeros_before"], "rel_l2": None, "cosine": None, "format": None,
                               "status": f"kept: {self.method} cannot apply: {why[w]}" if w in why
                               else "skipped (skip=)"})
                continue
            new = pruned[w]
            x = np.asarray(stats[w].sample, np.float64)
            rel, cos = output_error(x @ arr.astype(np.float64), x @ new.astype(np.float64))
            if self.method != "magnitude":
                row["rel_l2_magnitude"] = output_error(x @ arr.astype(np.float64),
                                                       x @ magnitude[w].astype(np.float64))[0]
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
        if ctx is not None:
            ctx.add_report(self, report)
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
        lines += self.calibration_lines("rel_l2_magnitude", "magnitude pruning")
        size = sum(int(np.prod(r["shape"])) for r in self)
        before = sum(r["zeros_before"] * np.prod(r["shape"]) for r in self) / size if size else 0.0
        after = sum(r["zeros"] * np.prod(r["shape"]) for r in self) / size if size else 0.0
        lines.append(f"{len(self.pruned())} of {len(self)} weights pruned"
                     + (f", skipped: {', '.join(self.skipped())}" if self.skipped() else "")
                     + f"; zeros {before:.1%} -> {after:.1%} of weight elements")
        return "\n".join(lines) + format_end_to_end(self.end_to_end)
