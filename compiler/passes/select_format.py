"""The ``select_format`` pass: for every matmul / matmul_q with a constant 2-D
weight, measure its density and structure and choose how its kernel stores
it (``sparse`` = dense, csr, bsrRxC or nmN:M; ir/sparsity.py) by an
estimated-time cost model; a report per layer.

    select_format{force=w1:csr|w2:nm2:4, formats=csr|bsr|nm|winograd|im2col, min_bytes=65536}

- ``winograd`` (in ``formats``): 3x3 stride-1 conv2d filters stored transformed
  for winograd F(2x2, 3x3) where its rule says it pays (compiler/passes/winograd.py,
  run first); ``im2col`` likewise strided conv2d layers as im2col + GEMM
  (compiler/passes/im2col.py, run after it); ``formats=csr|bsr|nm`` keeps
  every conv2d direct.

- Works on any graph, pruned or not: a weight with enough zeros in a usable
  structure gets a sparse format whatever put them there.
- Dense is the default and the fallback: a sparse format is chosen only when
  its estimated time is at most ``MARGIN`` (0.9) of dense's, so an error of
  the estimates of a few percent does not make a layer slower than dense
  (the goal: never more than 5% slower).  Ties go to the earlier candidate
  (csr, bsr blocks in ``BSR_BLOCKS`` order, nm by growing M).
- ``formats`` restricts the candidates: kinds (csr, bsr, nm) and/or exact
  spellings (bsr4x4, nm2:4), separated by ``|`` or ``;``; dense always stays.
- ``min_bytes``: a weight whose dense storage is smaller stays dense: it
  sits in cache and the call costs more than any format saves.
- A format already set on a matmul (by the graph's author, or by an earlier
  select_format) is kept as if forced: checked, never silently replaced.
- ``force=NAME:FORMAT|...`` fixes the format of the matmuls reading weight
  NAME (a matmul_q weight also answers to its float weight's name, ``w1``
  for ``w1.q``), whatever its size and cost; a format that cannot hold the
  weight exactly (``ir.sparsity.holds``) or that the node cannot use is an
  error naming the layer and why.
- Dense only (reported so): matmul_q with zero points, int8 activations, or
  grouped int8 scales (ir/ops.py); csr and bsr also need per-channel scales
  for i4, nm a group that is a multiple of M (the kernels); a
  weight constant that something else reads too or that is returned (a
  packed constant has one reader layout).  A weight read by several matmuls
  gets one format, chosen on the sum of their costs.

Cost model: per layer and format, for a weight of K x N values of dtype
f32/f16/i8/i4 read by a matmul with ``rows`` rows of x (all leading dims),

    time = bytes / READ_GBPS + rows * (units * VALUE_NS[kind][dtype] + blocks * BLOCK_NS[block])

- bytes: the packed layouts of codegen/sparse.py and codegen/sparse_nm.py:
  dense K*N values; csr the nonzeros of each column padded to a multiple of
  ``CSR_PAD`` entries, each a value and a u16 row index, plus N+1 i32
  pointers; bsrRxC the stored (not all-zero) blocks of R*C values with a u16
  index each, plus ceil(N/C)+1 pointers (csr and bsr store i4 as i8); nmN:M
  ceil(K/M) runs of N slots for every column (columns padded to a multiple
  of ``NM_COLUMNS``), each a value and a 2-bit (M <= 4) or 4-bit position;
  arrays aligned to 64 bytes.  A matmul_q's scales (the same in every format) are added.
- units: the values the kernel multiplies (dense K*N, csr its padded
  entries, bsr blocks*R*C, nm its slots); blocks: bsr's stored blocks.
The estimate is a GEMV-style model (weights streamed once from memory,
compute adding to it rather than hidden under it), which is what decoding
is, calibrated at one row of x: with more rows each format is charged its
one-row cost per row (the M > 1 sparse kernels are not measured yet), which
favours dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, IRError, Node, Value
from ...ir.sparsity import BSR_BLOCKS, CSR_PAD, NM_COLUMNS, Format, block_density, holds, nm_counts, parse_format
from . import Context, Pass, option, register
from .im2col import Im2col
from .winograd import Winograd
from .quantize import split_names
from .report import LayerReport

# --- cost table ---------------------------------------------------------------------------------------
# To be recalibrated with `python -m benchmarks sparse` on a quiet machine: the sparse figures below are a
# quick fit on a loaded one.  Machine: AMD EPYC Zen 3, 2 cores, AVX2+FMA, both threads.
# - READ_GBPS: the sqk reduce_sum read probe, 23.6 GB/s over 640 MiB (benchmarks/README.md).
# - dense f32: GEMV streams at ~0.93 of the probe (21.2 GB/s), i.e. 4/23.6 * (1/0.93 - 1) = 0.013 ns of
#   compute per value on top of the bytes; the same as the 1/(141 GFLOP/s / 2) = 0.014 ns per
#   multiply-add the f32 GEMM reaches, so the sum form holds for one row and for many.
# - dense i8 / i4 (matmul_q, f32 activations): GEMV 37.1 ms for 512 MiB of int8, 51.8 ms for 576 MiB of
#   int4 g32 (f16 scales): 0.069 and 0.048 ns per value in all, minus the bytes at the probe's speed
#   leaves 0.027 / 0.025 ns (the kernels are bound by int->float conversion, not memory); the model
#   then predicts the M=4 GEMMs within 20%.  dense f16: a guess between f32 and i8.
# - csr, bsr, nm (f32 and i8): fitted to GEMV (M = 1) times of the landed kernels relative to dense,
#   2048x2048 weights, 16-64 per graph (160-256 MiB packed, every weight once per call), medians of
#   7 interleaved runs, three runs on 2026-11-23 ~19:00 with the load average at 6-10 (other jobs):
#   time / dense time measured (model with these constants): f32 nm2:4 0.62 (0.62), csr at 30%
#   nonzeros 0.75 (0.75), csr at 10% 0.32 (0.25), bsr 25% of blocks 4x4 0.37, 1x8 0.35, 8x1 0.34,
#   4x1 0.40, 1x4 0.41 (fitted per block); i8 nm2:4 0.56 (0.60), i8 csr at 10% 0.56 (0.56).  A loaded
#   machine starves compute more than memory, so these err towards dense.  f16 and i4: guesses
#   between f32 and i8.
# - checked against one run of `python -m benchmarks sparse` (19:10, load 5.4 -> 2.4; 40 x 2048x2048,
#   time / sqk dense f32 time, measured (model)): csr at 50/75/90/95% sparsity 1.10 (1.25), 0.34
#   (0.63), 0.31 (0.25), 0.10 (0.13); bsr1x8 block-pruned 0.60 (0.70), 0.16 (0.35), 0.12 (0.14),
#   0.05 (0.07); nm2:4 0.66 (0.62).  Mostly pessimistic for sparse, as intended.
# - bytes follow the packers' layouts (codegen/sparse.py, codegen/sparse_nm.py); the estimates equal
#   the packed constants' sizes to within 1% in the runs above.
# - in cache: a model whose weights all fit CACHE_BYTES is read from cache on every call after the
#   first, not from DRAM; its bytes are charged at CACHE_GBPS (dense f32 GEMV over 8 x 2048x2048 ran at
#   ~79 GB/s on the AMD EPYC Zen 4 of 2026-12-04), so compute decides: e.g. the demo's transformer
#   block (27 MiB f32, 4 rows), where 2:4 + int8 measured 0.51 ms against dense int8's 0.38 ms.
# - dense i8 / i4 were refitted on that Zen 4 (AVX-512): GEMV 24.7 ms for 512 MiB of int8 and 36.1 ms
#   for 576 MiB of int4 g32 against the probe's 16.9 ms for 512 MiB: 0.015 and 0.016 ns per value on
#   top of the bytes.  The sparse constants are still the Zen 3 fit (they err towards dense there);
#   checked on the Zen 4 with `python -m benchmarks sparse` (2026-12-04, benchmarks/README.md): every
#   pick ran at least as fast as dense (csr f32 at 75/90/95% 2.6/5.2/8.9x, int8 csr at 90/95% 2.1/3.5x,
#   bsr1x8 1.9-15.5x, nm2:4 1.9-2.0x), and int8 at 75% stays dense where csr measured 1.09x.
READ_GBPS = 23.6
CACHE_GBPS = 80.0
CACHE_BYTES = 24 << 20
VALUE_BYTES = {"f32": 4.0, "f16": 2.0, "i8": 1.0, "i4": 0.5}   # csr and bsr store i4 as one byte
VALUE_NS = {   # ns per multiplied value (csr: padded entry; nm: slot) per row of x
    "dense": {"f32": 0.013, "f16": 0.018, "i8": 0.015, "i4": 0.016},
    "csr": {"f32": 0.20, "f16": 0.22, "i8": 0.26, "i4": 0.26},
    "bsr": {"f32": 0.015, "f16": 0.020, "i8": 0.029, "i4": 0.029},
    "nm": {"f32": 0.045, "f16": 0.045, "i8": 0.03, "i4": 0.035},
}
BLOCK_NS = {(1, 4): 0.37, (1, 8): 0.48, (4, 1): 0.34, (8, 1): 0.42, (4, 4): 1.3}   # bsr: per block per row
INDEX_BYTES = 2     # csr row / bsr block-row indices (u16; i32 past 65536 block rows)
POINTER_BYTES = 4   # csr / bsr column (block) pointers
ALIGN = 64          # packed arrays start at multiples of this
MARGIN = 0.9        # a sparse format must be estimated at most this fraction of dense's time
MIN_BYTES = 64 << 10
NM_RUNS = (2, 4, 8, 16)   # the M of the N:M candidates
KINDS = ("csr", "bsr", "nm")


def _error(msg: str):
    from ..pipeline import PipelineError  # the pipeline module imports the passes package

    return PipelineError(msg)


@dataclass(frozen=True)
class Estimate:
    """One format's estimate for one weight: stored bytes and time (ns) per call."""

    format: Format
    bytes: int
    ns: float


@dataclass(frozen=True)
class WeightStats:
    """What the cost model needs of a weight: shape, dtype, nonzeros, csr's
    padded entries, the stored blocks of each bsr block and the worst run of
    each N:M run length."""

    k: int
    n: int
    dtype: str
    nnz: int
    csr_entries: int   # nonzeros of each column rounded up to CSR_PAD, summed
    blocks: dict       # (r, c) -> stored blocks
    nm_max: dict       # m -> largest nonzero count in an aligned run of m rows of a column

    @classmethod
    def of(cls, w: np.ndarray, dtype: str) -> WeightStats:
        k, n = w.shape
        nz = np.asarray(w) != 0
        per_col = np.count_nonzero(nz, axis=0)
        if set(BSR_BLOCKS) == {(1, 4), (1, 8), (4, 1), (8, 1), (4, 4)} and NM_RUNS == (2, 4, 8, 16) and nz.size:
            # one pass over the weight: the larger blocks and runs from the smaller ones (exact counts,
            # those of block_density / nm_counts; seconds saved per LLM compile)
            r4 = _pairs(_pairs(nz, 0, np.logical_or), 0, np.logical_or)           # [K/4, N]: 4x1 blocks
            c4 = _pairs(_pairs(nz, 1, np.logical_or), 1, np.logical_or)           # [K, N/4]: 1x4 blocks
            any_blocks = {(4, 1): r4, (8, 1): _pairs(r4, 0, np.logical_or), (1, 4): c4,
                          (1, 8): _pairs(c4, 1, np.logical_or),
                          (4, 4): _pairs(_pairs(r4, 1, np.logical_or), 1, np.logical_or)}
            blocks = {rc: int(np.count_nonzero(any_blocks[rc])) for rc in BSR_BLOCKS}
            runs, nm_max = nz.astype(np.uint8), {}
            for m in NM_RUNS:                                                  # m = 2, 4, 8, 16 rows
                runs = _pairs(runs, 0, np.add)
                nm_max[m] = int(runs.max(initial=0))
        else:
            blocks = {(r, c): round(block_density(w, r, c) * -(-k // r) * -(-n // c)) for r, c in BSR_BLOCKS}
            nm_max = {m: int(nm_counts(w, m).max(initial=0)) for m in NM_RUNS}
        return cls(k, n, dtype, int(per_col.sum()), int((-(-per_col // CSR_PAD) * CSR_PAD).sum()), blocks, nm_max)

    @property
    def density(self) -> float:
        return self.nnz / (self.k * self.n) if self.k * self.n else 1.0


def _pairs(a: np.ndarray, axis: int, op) -> np.ndarray:
    """``op`` of aligned pairs along ``axis`` (0 or 1) of 2-D ``a``, an odd end padded with zeros."""
    if a.shape[axis] % 2:
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, 1)
        a = np.pad(a, pad)
    return op(a[0::2], a[1::2]) if axis == 0 else op(a[:, 0::2], a[:, 1::2])


def _aligned(nbytes: float) -> int:
    return -(-math.ceil(nbytes) // ALIGN) * ALIGN


def estimate(fmt: Format, s: WeightStats, rows: int, side_bytes: int = 0, gbps: float = READ_GBPS) -> Estimate:
    """The cost model (module docstring) for weight ``s`` stored as ``fmt``,
    read by a matmul with ``rows`` rows; ``side_bytes`` (scales) are added;
    bytes move at ``gbps`` (DRAM, or CACHE_GBPS for a model that fits in cache)."""
    e, ns = VALUE_BYTES[s.dtype], VALUE_NS[fmt.kind][s.dtype]
    blocks = 0
    if fmt.kind == "dense":
        units = s.k * s.n
        size = math.ceil(units * e)
    elif fmt.kind in ("csr", "bsr"):
        r, c = (fmt.r, fmt.c) if fmt.kind == "bsr" else (1, 1)
        entries = s.blocks[(r, c)] if fmt.kind == "bsr" else s.csr_entries
        blocks = entries if fmt.kind == "bsr" else 0
        units = entries * r * c
        index = INDEX_BYTES if -(-s.k // r) <= 65536 else 4
        size = (_aligned((-(-s.n // c) + 1) * POINTER_BYTES) + _aligned(entries * index)
                + math.ceil(units * max(e, 1.0)))
    else:
        units = -(-s.k // fmt.m) * -(-s.n // NM_COLUMNS) * NM_COLUMNS * fmt.n
        size = _aligned(units * e) + math.ceil(units * (2 if fmt.m <= 4 else 4) / 8)
    size += side_bytes
    block_ns = BLOCK_NS[(fmt.r, fmt.c)] if blocks else 0.0
    return Estimate(fmt, size, size / gbps + rows * (units * ns + blocks * block_ns))


def candidates(s: WeightStats, allowed: tuple[set, set]) -> list[Format]:
    """The sparse formats worth estimating among ``allowed`` (kinds, exact
    formats): csr, every bsr block, for each run length M the tightest nmN:M
    (N the weight's worst run; none when that is M), and the exact formats
    listed (the caller drops those that do not hold the weight)."""
    kinds, exact = allowed
    out = [Format("csr")] if "csr" in kinds else []
    out += [Format("bsr", r=r, c=c) for r, c in BSR_BLOCKS if "bsr" in kinds]
    if "nm" in kinds:
        out += [Format("nm", n=max(s.nm_max[m], 1), m=m) for m in NM_RUNS if s.nm_max[m] < m]
    out += [f for f in exact if f not in out]   # e.g. nm2:4 for a weight whose tightest is nm1:4
    return out


@register
class SelectFormat(Pass):
    """Choose each constant matmul weight's storage format (see the module docstring)."""

    name = "select_format"
    force: str = option("", "store weight NAME as FMT (dense, csr, bsrRxC, nmN:M): NAME:FMT items separated by '|'",
                        flag="--format", repeat=True)
    formats: str = option("csr|bsr|nm|winograd|im2col", "the formats select_format may choose, separated by "
                          "'|' (winograd: 3x3 conv2d filters; im2col: strided conv2d filters as a GEMM's a)")
    min_bytes: int = option(MIN_BYTES, "weights smaller than this many bytes stay dense")

    def __post_init__(self):
        self.allowed()
        self.forced()
        if self.min_bytes < 0:
            raise _error(f"pass select_format: option min_bytes={self.min_bytes}: expected a byte count >= 0")

    def allowed(self) -> tuple[set, set]:
        """``formats`` as (kinds, exact formats); PipelineError names a bad item."""
        kinds, exact = set(), set()
        for item in split_names(self.formats):
            if item in KINDS or item in ("dense", "winograd", "im2col"):
                kinds.add(item)
                continue
            try:
                exact.add(parse_format(item))
            except IRError as e:
                raise _error(f"pass select_format: option formats={self.formats}: {item!r} is neither a kind "
                             f"({', '.join(('dense',) + KINDS)}) nor a format: {e}") from None
        return kinds, {f for f in exact if not f.dense}

    def forced(self) -> dict[str, Format]:
        """``force`` as {weight name: format}; PipelineError names a bad entry."""
        out = {}
        for item in split_names(self.force):
            name, colon, spec = (t.strip() for t in item.partition(":"))
            if not colon or not name or not spec:
                raise _error(f"pass select_format: option force={self.force}: {item!r} is not NAME:FORMAT "
                             f"(e.g. w1:csr or w2:nm2:4)")
            if name in out:
                raise _error(f"pass select_format: option force={self.force}: weight {name} is forced twice")
            try:
                out[name] = parse_format(spec)
            except IRError as e:
                raise _error(f"pass select_format: option force={self.force}: weight {name}: {e}") from None
        return out

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        kinds = self.allowed()[0]
        if "winograd" in kinds:
            graph = Winograd().run(graph, ctx)
        if "im2col" in kinds:
            graph = Im2col().run(graph, ctx)
        prod = graph.producers()
        uses: dict[Value, list[Node]] = {}   # weight -> matmul/matmul_q nodes reading it as the weight
        for n in graph.nodes:
            if n.op in ("matmul", "matmul_q"):
                w = n.inputs[1]
                src = prod.get(w)
                if src is not None and src.op == "const" and w.type.rank == 2 and w.type.size:
                    uses.setdefault(w, []).append(n)
        forced = self._match_forced(graph, uses)
        weight_reads = {id(n) for ns in uses.values() for n in ns}
        other = {}   # value -> the first other reader's description
        for n in graph.nodes:
            for i, v in enumerate(n.inputs):
                if v is not None and (id(n) not in weight_reads or i != 1):
                    other.setdefault(v, f"{n.op} {n.outputs[0].name!r}")
        for v in graph.outputs:
            other.setdefault(v, "the graph's outputs")

        allowed = self.allowed()
        report = FormatReport()
        # every weight of a small model stays in cache between calls: bytes cost less, compute decides
        resident = sum(w.type.nbytes for w in uses) <= CACHE_BYTES
        gbps = CACHE_GBPS if resident else READ_GBPS
        chosen: dict[Value, str] = {}
        for w, users in uses.items():
            arr = prod[w].attrs["value"]
            stats = WeightStats.of(arr, w.dtype.name)
            rows = [int(np.prod(u.inputs[0].shape[:-1], dtype=np.int64)) for u in users]
            side = [sum(v.type.nbytes for v in u.inputs[2:] if v is not None) for u in users]
            current = {u.attrs.get("sparse", "dense") for u in users}
            row = {"layer": w.name, "shape": w.shape, "dtype": w.dtype.name, "rows": sum(rows),
                   "density": stats.density, "before": "/".join(sorted(current))}

            def total(fmt: Format) -> Estimate:
                ests = [estimate(fmt, stats, r, s, gbps) for r, s in zip(rows, side)]
                return Estimate(fmt, ests[0].bytes, sum(e.ns for e in ests))

            dense = total(Format("dense"))
            why_dense = self._dense_only(w, users, other)
            # a format already set in the graph (by its author or an earlier run) is kept, like force=
            preset = parse_format(next(iter(current))) if len(current) == 1 and current != {"dense"} else None
            if w in forced or preset is not None:
                fmt = forced.get(w, preset)
                spelled = f"force={w.name}:{fmt}" if w in forced else f"sparse={fmt} set in the graph"
                if not fmt.dense:
                    why = why_dense or self._kernel_takes(fmt, w, users) or holds(fmt, arr)
                    if why:
                        raise _error(f"select_format: {spelled}: weight {w.name} of "
                                     f"{users[0].op} {users[0].output.name!r} cannot be stored as {fmt}: {why}")
                est = total(fmt)
                status = "forced (force=)" if w in forced else "set in the graph: kept"
            elif why_dense:
                est, status = dense, f"dense only: {why_dense}"
            elif stats.k * stats.n * VALUE_BYTES[stats.dtype] < self.min_bytes:
                keep = parse_format(current.pop()) if len(current) == 1 else Format("dense")
                why = None if keep.dense else self._kernel_takes(keep, w, users) or holds(keep, arr)
                est = total(Format("dense") if why else keep)
                status = (f"small (< {self.min_bytes} bytes): " +
                          (f"dense, not {keep}: {why}" if why else f"kept {keep}"))
            else:
                ests = [total(f) for f in candidates(stats, allowed)
                        if self._kernel_takes(f, w, users) is None and holds(f, arr) is None]
                best = min(ests, key=lambda e: e.ns, default=None)
                model = "cost model, in cache" if resident else "cost model"
                if best is not None and best.ns <= MARGIN * dense.ns:
                    est, status = best, model
                else:
                    est = dense
                    status = model + (f": best sparse {best.format} only {dense.ns / best.ns:.2f}x"
                                             if best is not None else ": no sparse candidate")
            chosen[w] = str(est.format)
            report.append({**row, "format": str(est.format), "dense_bytes": dense.bytes, "bytes": est.bytes,
                           "dense_us": dense.ns / 1e3, "us": est.ns / 1e3, "status": status})

        out_nodes = []
        for node in graph.nodes:
            w = node.inputs[1] if node.op in ("matmul", "matmul_q") else None
            if w in chosen and node.attrs.get("sparse", "dense") != chosen[w]:
                node = Node(node.op, node.inputs, node.outputs, {**node.attrs, "sparse": chosen[w]})
            out_nodes.append(node)
        if ctx is not None:
            ctx.add_report(self, report)
        return graph.with_nodes(out_nodes)

    def _match_forced(self, graph: Graph, uses: dict) -> dict[Value, Format]:
        """``force`` by weight value (a name may be the weight's or, for a
        matmul_q weight ``X.q``, X's)."""
        by_name = {}
        for w in uses:
            by_name[w.name] = w
            if w.name.endswith(".q") and any(u.op == "matmul_q" for u in uses[w]):
                by_name.setdefault(w.name[:-2], w)
        out = {}
        for name, fmt in self.forced().items():
            if name not in by_name:
                raise _error(f"select_format: force names {name}, which is not a constant 2-D matmul weight of "
                             f"@{graph.name}; weights: {', '.join(sorted(w.name for w in uses)) or 'none'}")
            out[by_name[name]] = fmt
        return out

    @staticmethod
    def _dense_only(w: Value, users: list[Node], other: dict) -> str | None:
        """Why weight ``w`` cannot leave dense storage, or None."""
        if w in other:
            return f"also read by {other[w]} (a packed constant has one layout)"
        for u in users:
            if u.op != "matmul_q":
                continue
            k = w.shape[0]
            if len(u.inputs) > 3 and u.inputs[3] is not None:
                return f"matmul_q {u.output.name!r} has zero points (scheme=asym); sparse kernels take symmetric weights"
            if u.attrs.get("activations", "none") != "none":
                return f"matmul_q {u.output.name!r} has activations={u.attrs['activations']}; sparse kernels take none"
            if w.dtype is dt.i8 and u.attrs["group"] < k:
                return (f"matmul_q {u.output.name!r} has i8 weights in groups of {u.attrs['group']} < K={k}; "
                        f"sparse i8 kernels take per-channel scales")
        return None


    @staticmethod
    def _kernel_takes(fmt: Format, w: Value, users: list[Node]) -> str | None:
        """Why the sparse kernels cannot read matmul_q weight ``w`` as ``fmt``
        (codegen/sparse.py, codegen/sparse_nm.py), or None."""
        k = w.shape[0]
        for u in users:
            group = u.attrs.get("group", k) if u.op == "matmul_q" else k
            if group >= k:
                continue
            if fmt.kind in ("csr", "bsr"):
                return (f"matmul_q {u.output.name!r} has i4 weights in groups of {group} < K={k}; the {fmt.kind} "
                        f"kernels take per-channel scales")
            if fmt.kind == "nm" and group % fmt.m:
                return (f"matmul_q {u.output.name!r} has groups of {group}, not a multiple of M={fmt.m} "
                        f"(a run must not straddle two groups)")
        return None


REPORT_ZEROS = 0.25


class FormatReport(LayerReport):
    """Rows (dicts), one per constant 2-D matmul weight: layer, shape, dtype,
    rows (of x, summed over the weight's matmuls), density (nonzero fraction),
    before (the format it had), format (chosen), dense_bytes and bytes
    (estimated storage, scales included), dense_us and us (estimated time per
    call), status ("cost model[: why dense]", "forced (force=)",
    "small (< N bytes): kept F", "dense only: why")."""

    pass_name = "select_format"

    @property
    def informative(self) -> bool:
        """Whether there is sparsity to report: a weight stored sparse, or one
        with at least REPORT_ZEROS zeros (pruned; quantization alone leaves
        fewer zero codes).  Every compile runs this pass: choosing dense for
        weights without such zeros does not make a report of its own."""
        return any(r["format"] != "dense" or r["density"] <= 1.0 - REPORT_ZEROS for r in self)

    def chosen(self) -> dict[str, str]:
        return {r["layer"]: r["format"] for r in self}

    def format(self) -> str:
        """A text table with a summary line."""
        head = (f"{'layer':<20}{'shape':>14}{'density':>9}  {'format':<9}{'KiB dense':>11}{'KiB':>10}"
                f"{'est x':>7}  status")
        lines = [head, "-" * len(head)]
        for r in self:
            shape = "x".join(map(str, r["shape"]))
            speed = r["dense_us"] / r["us"] if r["us"] else math.inf
            lines.append(f"{r['layer']:<20}{shape:>14}{r['density']:>9.3f}  {r['format']:<9}"
                         f"{r['dense_bytes'] / 1024:>11.1f}{r['bytes'] / 1024:>10.1f}{speed:>7.2f}  {r['status']}")
        sparse = [r["layer"] for r in self if r["format"] != "dense"]
        db, b = sum(r["dense_bytes"] for r in self), sum(r["bytes"] for r in self)
        lines.append(f"{len(sparse)} of {len(self)} weights sparse; est. weight bytes {db / 2**20:.2f} MiB dense -> "
                     f"{b / 2**20:.2f} MiB (estimates: the cost table in compiler/passes/select_format.py)")
        return "\n".join(lines)
