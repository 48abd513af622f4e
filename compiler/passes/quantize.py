"""The ``quantize`` pass: matmul(x, W) with a constant 2-D f32/f16 W becomes
matmul_q(x, q, scales[, zeros]) {group}, and a per-layer accuracy report.

    quantize{weights=int8|int4, group=N, scheme=sym|asym, scale_dtype=f32|f16,
             skip=w1|w2, max_error=0.02, activations=none|int8,
             calibration=dynamic|minmax|percentile|mse, percentile=99.99, seed=0, samples=16}

- ``weights=int8`` (default) is per output channel unless ``group`` is given;
  ``weights=int4`` is group-wise along K, ``group`` defaulting to 32.  A group
  that does not divide K leaves a shorter last group.
- ``skip`` names weight constants to leave in float, separated by ``|`` or
  ``;`` (a comma would end the option in a pipeline string).  A name that is
  no matmul weight is an error (it is probably a typo).
- ``max_error``: a layer whose relative L2 output error exceeds the bound
  stays in float (mixed precision); the report says so.
- ``activations=int8``: int8 activations (matmul_q {activations=int8};
  semantics in ``ir.ops.MatMulQ``), symmetric or asymmetric int4/int8
  weights.  ``calibration=dynamic`` (default) quantizes per row and weight
  group at run time; ``minmax``, ``percentile`` and ``mse`` choose one
  static scale per layer (``act_scale``) from the layer's fp32 input
  activations over ``calibration_data`` (required then; see
  ``compiler.quantize.activation_scale``; ``percentile=`` sets the
  percentile of |x|).  The reported error then includes activation rounding
  (and saturation).
- A matmul carrying a non-dense ``sparse`` format (set in the graph or by
  an earlier select_format) keeps it on its matmul_q: symmetric quantization maps the
  pruned zeros to exact zero codes.  matmul_q reads a sparse format only
  with symmetric weights, activations=none and, for int8, per-channel
  scales: other options are an error naming the layer (never a silent
  densification).

Report plumbing: passes stay ``Graph -> Graph``; the pass records its report
on itself (``self.report``, a :class:`QuantReport`) as a side channel that the
driver reads after the pipeline ran (``Module.report``).  Calibration inputs
reach it the same way: ``with_calibration(data)`` returns a copy carrying
``[{input: array}, ...]`` samples.  Each layer's error is measured in
isolation: the layer's fp32 input (from the reference interpreter over the
calibration samples, or seeded standard-normal rows [samples, K] without
them) through the float weight and through the dequantized weight.
A layer quantized again with the same weight bytes, inputs and options (the
step and prefill-chunk modules of one decoder) reuses the first result
(``_MEMO``, at most ``MEMO_BYTES`` of codes and scales kept).
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections import OrderedDict
from typing import ClassVar

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, TensorType, Value
from ...ir.ops import OPS, matmul_q_i8act
from .. import quantize as qm
from . import Pass, register
from .report import LayerReport

WEIGHTS = {"int8": 8, "int4": 4}
ACTIVATIONS = ("none", "int8")
CALIBRATIONS = ("dynamic",) + qm.CALIBRATION_METHODS
DEFAULT_INT4_GROUP = 32


def _error(msg: str):
    from ..pipeline import PipelineError  # the pipeline module imports the passes package

    return PipelineError(msg)


def split_names(spec: str) -> list[str]:
    """``"w1|w2;w3"`` -> ["w1", "w2", "w3"] (blank items dropped)."""
    return [s.strip() for s in spec.replace(";", "|").split("|") if s.strip()]


@register
class Quantize(Pass):
    """Quantize constant matmul weights to int8/int4 (see the module docstring)."""

    name = "quantize"
    weights: str = "int8"
    group: int = 0          # 0: per output channel for int8, 32 for int4
    scheme: str = "sym"
    scale_dtype: str = "f32"
    skip: str = ""
    max_error: float = math.inf
    activations: str = "none"
    calibration: str = "dynamic"
    percentile: float = 99.99
    seed: int = 0
    samples: int = 16

    # side channel, not options (see the module docstring)
    report: ClassVar = None
    calibration_data: ClassVar = None

    def __post_init__(self):
        p = "pass quantize: option"
        if self.weights not in WEIGHTS:
            raise _error(f"{p} weights={self.weights}: expected int8 or int4")
        if self.group < 0:
            raise _error(f"{p} group={self.group}: expected a positive group size (e.g. 32, 64, 128), "
                         f"or 0 for the default")
        if self.scheme not in qm.SCHEMES:
            raise _error(f"{p} scheme={self.scheme}: expected sym or asym")
        if self.scale_dtype not in qm.SCALE_DTYPES:
            raise _error(f"{p} scale_dtype={self.scale_dtype}: expected f32 or f16")
        if "," in self.skip or "{" in self.skip or "}" in self.skip:
            raise _error(f"{p} skip={self.skip}: separate names with '|' or ';'")
        if math.isnan(self.max_error) or self.max_error < 0:
            raise _error(f"{p} max_error={self.max_error}: expected a non-negative relative L2 bound")
        if self.activations not in ACTIVATIONS:
            raise _error(f"{p} activations={self.activations}: expected none or int8")
        if self.calibration not in CALIBRATIONS:
            raise _error(f"{p} calibration={self.calibration}: expected dynamic, minmax, percentile or mse")
        if self.static and self.activations != "int8":
            raise _error(f"pass quantize: calibration={self.calibration} chooses static int8 activation scales: "
                         f"it needs activations=int8 (got activations={self.activations})")
        if not 0 < self.percentile <= 100:
            raise _error(f"{p} percentile={self.percentile}: expected a percentile of |x| in (0, 100], e.g. 99.99")
        if self.percentile != 99.99 and self.calibration != "percentile":
            raise _error(f"pass quantize: percentile={self.percentile} only applies with calibration=percentile "
                         f"(got calibration={self.calibration})")
        if self.samples < 1:
            raise _error(f"{p} samples={self.samples}: expected at least 1 random input row")

    @property
    def bits(self) -> int:
        return WEIGHTS[self.weights]

    @property
    def static(self) -> bool:
        """Static (calibrated) activation scales rather than dynamic ones."""
        return self.calibration != "dynamic"

    def group_for(self, k: int) -> int:
        """The group size for a weight with K rows (per-channel: one group spanning K;
        a group larger than K is the same thing, spelled as K)."""
        group = self.group or (DEFAULT_INT4_GROUP if self.bits == 4 else k)
        return max(min(group, k), 1)

    def with_calibration(self, data) -> Quantize:
        """A copy that measures errors on ``data`` (a list of {input name: array})."""
        if data is not None and (not isinstance(data, (list, tuple)) or not data
                                 or not all(isinstance(d, dict) for d in data)):
            raise _error("calibration_data must be a non-empty list of {input name: numpy array} dicts")
        p = copy.copy(self)
        object.__setattr__(p, "calibration_data", None if data is None else list(data))
        return p

    def run(self, graph: Graph) -> Graph:
        prod = graph.producers()
        # candidates: const W (2-D, float, non-empty) used as the right operand of a matmul
        uses: dict[Value, list[Node]] = {}
        for n in graph.nodes:
            if n.op != "matmul":
                continue
            w = n.inputs[1]
            src = prod.get(w)
            if src is not None and src.op == "const" and w.type.rank == 2 and w.dtype in dt.FLOATS and w.type.size:
                uses.setdefault(w, []).append(n)
        if not uses:
            raise _error(f"quantize: no matmul with a constant 2-D weight in graph @{graph.name}")
        skip = split_names(self.skip)
        names = {w.name for w in uses}
        unknown = [s for s in skip if s not in names]
        if unknown:
            raise _error(f"quantize: skip names {', '.join(unknown)}, which is not a matmul weight of "
                         f"@{graph.name}; weights: {', '.join(sorted(names))}")
        if self.static and self.calibration_data is None:
            raise _error(f"quantize: calibration={self.calibration} chooses static activation scales from "
                         f"calibration data, and none was given: pass calibration_data=[{{input: array}}, ...] "
                         f"to sqk.compile (or use calibration=dynamic)")
        inputs = self._layer_inputs(graph, uses)   # per matmul node

        taken = {v.name for v in graph.values()}
        report = QuantReport()
        replaced: dict[Value, tuple[Value, ...]] = {}   # W -> (q, scales[, zeros])
        new_consts: dict[Value, list[Node]] = {}        # W -> const nodes to insert after W's
        group_of: dict[Value, int] = {}
        act_scale: dict[Node, float] = {}              # matmul -> its static activation scale
        for w in uses:
            k, n = w.shape
            fbytes = w.type.nbytes
            row = {"layer": w.name, "shape": (k, n), "dtype": w.dtype.name, "float_bytes": fbytes}
            if w.name in skip:
                report.append({**row, "weights": w.dtype.name, "rel_l2": None, "cosine": None,
                               "bytes": fbytes, "status": "skipped (skip=)"})
                continue
            group = self.group_for(k)
            self._check_sparse(w, uses[w], group)
            arr = prod[w].attrs["value"]
            scales = {n: qm.activation_scale(inputs[n], self.calibration, self.percentile, name=w.name)
                      for n in uses[w]} if self.static else {}
            xs = [(inputs[n], scales.get(n, 0.0)) for n in uses[w]]
            key = self._memo_key(arr, xs, group)
            if key in _MEMO:
                _MEMO.move_to_end(key)
                q, s, z, rel, cos = _MEMO[key]
            else:
                q, s, z = qm.quantize_weight(arr, self.bits, group, self.scheme, self.scale_dtype, name=w.name)
                rel, cos = self._layer_error(xs, arr, q, s, z, group)
                _remember(key, (q, s, z, rel, cos))
            spelled = f"{self.weights} {'g' + str(group) if group < k else 'per-channel'} {self.scheme}"
            if self.activations == "int8":
                spelled += " + i8 act" + (f" {self.calibration}" if self.static else "")
            row["act_scales"] = list(scales.values())
            if rel > self.max_error:
                report.append({**row, "weights": w.dtype.name, "rel_l2": rel, "cosine": cos, "bytes": fbytes,
                               "status": f"kept {w.dtype.name}: {spelled} error {rel:.3g} > max_error "
                                         f"{self.max_error:g}"})
                continue
            act_scale.update(scales)
            qdt = dt.i4 if self.bits == 4 else dt.i8
            vals, nodes = [], []
            for suffix, a, d in (("q", q, qdt), ("scales", s, dt.dtype(s.dtype)), ("zeros", z, qdt)):
                if a is None:
                    continue
                v = Value(_fresh(f"{w.name}.{suffix}", taken), TensorType(d, a.shape))
                a = np.ascontiguousarray(a)
                a.setflags(write=False)
                vals.append(v)
                nodes.append(Node("const", (), (v,), {"value": a}))
            replaced[w], new_consts[w], group_of[w] = tuple(vals), nodes, group
            report.append({**row, "weights": spelled, "rel_l2": rel, "cosine": cos,
                           "bytes": qm.quantized_nbytes(k, n, self.bits, group, self.scale_dtype, z is not None),
                           "status": "quantized"})

        out_nodes = []
        still_used = {v for n in graph.nodes for v in n.inputs
                      if not (n.op == "matmul" and n.inputs[1] in replaced)} | set(graph.outputs)
        for node in graph.nodes:
            if node.op == "const" and node.output in replaced:
                if node.output in still_used:
                    out_nodes.append(node)
                out_nodes.extend(new_consts[node.output])
            elif node.op == "matmul" and node.inputs[1] in replaced:
                w = node.inputs[1]
                # a sparse format (set in the graph) stays: symmetric codes keep the pruned zeros
                # (checked readable by matmul_q in _check_sparse)
                attrs = OPS["matmul_q"].normalize_attrs({
                    "group": group_of[w], "activations": self.activations,
                    "sparse": node.attrs.get("sparse", "dense"), "act_scale": act_scale.get(node, 0.0)})
                out_nodes.append(Node("matmul_q", (node.inputs[0],) + replaced[w], node.outputs, attrs))
            else:
                out_nodes.append(node)
        object.__setattr__(self, "report", report)
        return graph.with_nodes(out_nodes)

    def _memo_key(self, arr, xs, group) -> tuple:
        """What a layer's codes, scales and error depend on: the weight's and its
        inputs' bytes (hashed), static activation scales and the options."""
        def digest(a):
            a = np.ascontiguousarray(a)
            return hashlib.sha256(a.view(np.uint8).reshape(-1)).digest(), a.shape, a.dtype.str
        return (digest(arr), tuple((digest(x), float(sc)) for x, sc in xs), self.bits, group, self.scheme,
                self.scale_dtype, self.activations)

    def _check_sparse(self, w: Value, users: list[Node], group: int) -> None:
        """A matmul of ``w`` stored in a non-dense format must stay readable as
        one after quantization (matmul_q's rules): else an error naming the layer."""
        for n in users:
            fmt = n.attrs.get("sparse", "dense")
            if fmt == "dense":
                continue
            why = ("asymmetric weights (zero points)" if self.scheme != "sym" else
                   "int8 activations" if self.activations != "none" else
                   f"grouped int8 scales (group={group} < K={w.shape[0]})" if self.bits == 8 and group < w.shape[0]
                   else None)
            if why:
                raise _error(f"quantize: layer {w.name} is stored sparse={fmt}, which matmul_q cannot read with "
                             f"{why}: sparse quantized kernels take symmetric weights, activations=none and, for "
                             f"int8, per-channel scales; change the options or leave the layer in float "
                             f"(skip={w.name})")

    def _layer_error(self, xs, w, q, s, z, group) -> tuple[float, float]:
        """(relative L2, cosine) of the layer's outputs, over its matmuls' inputs
        ``xs`` = [(x, act_scale)], against float64 x @ w; with int8 activations
        the quantized side is the op's own reference (static scale or dynamic)."""
        if self.activations == "none":
            return qm.layer_error(np.concatenate([x for x, _ in xs]), w, q, s, z, group)
        want, got = [], []
        for x, act_scale in xs:
            x2 = np.asarray(x, np.float32).reshape(-1, w.shape[0])
            want.append(x2.astype(np.float64) @ np.asarray(w, np.float64))
            got.append(matmul_q_i8act(x2, q, s, z, group, act_scale).astype(np.float64))
        return qm.output_error(np.concatenate(want), np.concatenate(got))

    def _layer_inputs(self, graph: Graph, uses: dict) -> dict:
        """Each matmul's input rows [rows, K]: from the calibration samples
        through the reference interpreter, or seeded random rows (the same for
        every matmul of a weight)."""
        if self.calibration_data is None:
            out = {}
            for i, (w, users) in enumerate(uses.items()):
                rng = np.random.default_rng([self.seed, i])
                x = rng.standard_normal((self.samples, w.shape[0]))
                out.update((n, x) for n in users)
            return out
        from ...ir.reference import run_reference

        rows: dict[Node, list] = {n: [] for users in uses.values() for n in users}
        for i, sample in enumerate(self.calibration_data):
            if not isinstance(sample, dict):
                raise _error(f"calibration sample {i}: expected a dict of input arrays, got {type(sample).__name__}")
            try:
                env = run_reference(graph, sample, keep_all=True)
            except (ValueError, TypeError) as e:
                raise _error(f"calibration sample {i}: {e}") from None
            for w, users in uses.items():
                for n in users:
                    rows[n].append(env[n.inputs[0]].reshape(-1, w.shape[0]))
        return {n: np.concatenate(r) for n, r in rows.items()}


# Recently quantized layers (q, scales, zeros, rel, cos), by ``Quantize._memo_key``: a decoder's
# step and prefill-chunk modules hold the same weights, quantized and measured once.  The arrays
# are read-only constants, shared by the graphs; at most MEMO_BYTES of them are kept.
_MEMO: OrderedDict = OrderedDict()
_MEMO_TOTAL = [0]   # bytes of the arrays in _MEMO
MEMO_BYTES = 256 << 20


def _remember(key, entry) -> None:
    size = lambda e: sum(a.nbytes for a in e[:3] if a is not None)   # noqa: E731
    _MEMO[key] = entry
    total = _MEMO_TOTAL[0] = _MEMO_TOTAL[0] + size(entry)
    while total > MEMO_BYTES and _MEMO:
        total = _MEMO_TOTAL[0] = total - size(_MEMO.popitem(last=False)[1])


def clear_memo() -> None:
    _MEMO.clear()
    _MEMO_TOTAL[0] = 0


def _fresh(name: str, taken: set) -> str:
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


class QuantReport(LayerReport):
    """Rows (dicts), one per weight: layer, shape, dtype, weights (the format
    used, or the float dtype kept), rel_l2, cosine (None when skipped),
    float_bytes, bytes, status ("quantized", "kept f32: ...", "skipped (skip=)"),
    act_scales (the static activation scale of each matmul of the weight;
    empty without static calibration; absent when skipped)."""

    pass_name = "quantize"

    def quantized(self) -> list[str]:
        return [r["layer"] for r in self if r["status"] == "quantized"]

    def kept(self) -> list[str]:
        return [r["layer"] for r in self if r["status"].startswith("kept")]

    def format(self) -> str:
        """A text table with a summary line."""
        ww = max([22] + [len(r["weights"]) + 1 for r in self])
        head = f"{'layer':<20}{'shape':>14}  {'weights':<{ww}}{'rel L2':>10}{'cosine':>10}{'KiB':>10}  status"
        lines = [head, "-" * len(head)]
        for r in self:
            shape = "x".join(map(str, r["shape"]))
            rel = "-" if r["rel_l2"] is None else f"{r['rel_l2']:.2e}"
            cos = "-" if r["cosine"] is None else f"{r['cosine']:.6f}"
            lines.append(f"{r['layer']:<20}{shape:>14}  {r['weights']:<{ww}}{rel:>10}{cos:>10}"
                         f"{r['bytes'] / 1024:>10.1f}  {r['status']}")
        fb, qb = sum(r["float_bytes"] for r in self), sum(r["bytes"] for r in self)
        lines.append(f"{len(self.quantized())} of {len(self)} weights quantized"
                     + (f", kept in float: {', '.join(self.kept())}" if self.kept() else "")
                     + f"; weight bytes {fb / 2**20:.2f} MiB -> {qb / 2**20:.2f} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
