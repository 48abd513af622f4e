"""The ``quantize`` pass: matmul(x, W) with a constant 2-D f32/f16 W becomes
matmul_q(x, q, scales[, zeros]) {group}, and a per-layer accuracy report.

    quantize{weights=int8|int4, group=N, scheme=sym|asym, scale_dtype=f32|f16,
             skip=w1|w2, max_error=0.02, fallback=float|int8, promote=w1|w2,
             activations=none|int8, act_group=0,
             calibration=dynamic|minmax|percentile|mse, percentile=99.99, seed=0, samples=16,
             method=rtn|gptq|awq|imatrix, damp=0.01, act_order=false, clip=minmax|mse}

- ``method``: how codes and scales are chosen. ``rtn`` rounds to nearest
  (``compiler.quantize.quantize_weight``); ``gptq``, ``awq`` and ``imatrix``
  read the layer's calibration inputs (required) and produce the same
  matmul_q schemes (``gptq_quantize``, ``awq_scales``, ``imatrix_quantize``;
  ``damp``, ``act_order`` and ``clip`` are GPTQ's).  AWQ scales W by s per input
  channel and folds 1/s into x's producer where exact (a norm's scale and
  bias, a matmul weight's columns, x read only by these layers), else
  inserts ``mul(x, 1/s)``; a weight read by matmuls of different inputs
  stays in float.  A layer a method cannot handle stays in float with the
  reason in the report's status.

- ``weights=int8`` (default) is per output channel unless ``group`` is given;
  ``weights=int4`` is group-wise along K, ``group`` defaulting to 32.  A group
  that does not divide K leaves a shorter last group.
- ``skip`` names weight constants to leave in float, separated by ``|`` or
  ``;`` (a comma would end the option in a pipeline string).  A name that is
  no matmul weight is an error (it is probably a typo).
- ``max_error``: a layer whose relative L2 output error exceeds the bound
  gets the ``fallback`` precision (mixed precision); the report says so.
  ``fallback=float`` (default) keeps it in float; ``fallback=int8`` (with
  int4 weights) quantizes it to int8 per output channel by the same method
  (AWQ's scaled weight, GPTQ's solver at 8 bits), in float only if that too
  exceeds the bound.  ``promote`` names weights that get the fallback
  precision whatever their error (what the end-to-end budget ``max_error=
  "ppl+2%"`` of llm/calibrate.py chooses, and e.g. ``promote=lm_head`` for a
  tied embedding in int8 as llama.cpp's q4 mixes keep it).  A layer the
  method cannot apply to (AWQ on a shared constant) stays in float.
- A constant that is a quantized matmul weight and also a table read by
  ``gather(W, ids, axis=1)`` (a tied embedding / lm_head [H, V]: the
  embedding is W's columns) is read by ``gather_q`` from the same quantized
  constants (then a transpose), so the table is stored once and the
  embedding rows are the quantized weights, as in a GGUF file whose
  token_embd serves both.
- ``activations=int8``: int8 activations (matmul_q {activations=int8};
  semantics in ``ir.ops.MatMulQ``), symmetric or asymmetric int4/int8
  weights.  ``calibration=dynamic`` (default) quantizes per row and weight
  group at run time; ``minmax``, ``percentile`` and ``mse`` choose one
  static scale per layer (``act_scale``) from the layer's fp32 input
  activations over ``calibration_data`` (required then; see
  ``compiler.quantize.activation_scale``; ``percentile=`` sets the
  percentile of |x|).  The reported error then includes activation rounding
  (and saturation).  ``act_group=N`` gives int8 activations one scale per N
  values of a row (32: llama.cpp's q8 activations; N >= K: one per row)
  instead of one per weight group (0, the default); one of N and the weight
  group must be a multiple of the other (or span K), else an error names the
  layer.
- conv2d layers (groups 1) become int8 too with ``weights=int8,
  activations=int8`` and a static ``calibration`` (sym, rtn): conv_input_q +
  conv2d_q (``compiler/passes/quantize_conv.py``); otherwise they stay float.
- A matmul carrying a non-dense ``sparse`` format (set in the graph or by
  an earlier select_format) keeps it on its matmul_q: symmetric quantization maps the
  pruned zeros to exact zero codes.  matmul_q reads a sparse format only
  with symmetric weights, activations=none and, for int8, per-channel
  scales: other options are an error naming the layer (never a silent
  densification).

Report plumbing: the pass files its report (a :class:`QuantReport`) in the
pass manager's :class:`~sqk.compiler.passes.Context` (``ctx.add_report``),
which the driver turns into ``Module.report``.  Calibration inputs come from
the same context (``ctx.calibration``, a ``compiler.calibration.Calibration``:
one per compile, shared with sparsify, so each layer input's statistics are
gathered once).  Each layer's error is
measured in isolation: the layer's fp32 input (from the reference interpreter
over the calibration samples, at most a bounded even-stride sample of the
rows, or seeded standard-normal rows [samples, K] without them) through the
float weight and through the dequantized weight.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, TensorType, Value
from ...ir.ops import OPS, i8act_segments, matmul_q_i8act
from .. import quantize as qm
from ..calibration import CalibrationError, LayerStats, random_stats
from . import Context, Pass, option, register
from .quantize_conv import conv_weights, quantize_convs
from .report import LayerReport, format_end_to_end

WEIGHTS = {"int8": 8, "int4": 4}
ACTIVATIONS = ("none", "int8")
CALIBRATIONS = ("dynamic",) + qm.CALIBRATION_METHODS
DEFAULT_INT4_GROUP = 32
METHODS = ("rtn", "gptq", "awq", "imatrix")
FALLBACKS = ("float", "int8")


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
    weights: str = option("int8", "quantize matmul weights to int8 or int4", choices=WEIGHTS)
    group: int = option(0, "quantization group along K (0: per output channel for int8, 32 for int4)")
    scheme: str = option("sym", "symmetric, or asymmetric with zero points", choices=qm.SCHEMES)
    scale_dtype: str = option("f32", "scale storage", choices=qm.SCALE_DTYPES)
    skip: str = option("", "weight constants to leave alone (in float, unpruned), separated by '|'")
    max_error: float = option(math.inf, "give the fallback precision to each layer whose relative L2 output error "
                              "exceeds this", flag="")   # the CLI's --max-error is a string: LLMs also take "ppl+2%"
    fallback: str = option("float", "precision of the layers over max_error or named in promote: float (kept as "
                           "they are) or int8 (per channel, by the same method; float if still over)",
                           choices=FALLBACKS)
    promote: str = option("", "weight constants given the fallback precision, separated by '|'")
    activations: str = option("none", "int8: quantize activations (symmetric int4 or int8 weights)",
                              choices=ACTIVATIONS)
    act_group: int = option(0, "int8 activations: one scale per N values of a row (32 as llama.cpp's q8; "
                               "0: the weight group)")
    calibration: str = option("dynamic", "int8 activation scales: per row at run time, or one static scale per "
                              "layer from the calibration data", choices=CALIBRATIONS, flag="--act-calibration")
    percentile: float = option(99.99, "the percentile of |x| for calibration=percentile")
    seed: int = option(0, "seed of the random rows the report measures on without calibration data")
    samples: int = option(16, "random rows the report measures on without calibration data")
    method: str = option("rtn", "how weights are rounded (the others need calibration data)", choices=METHODS,
                         keyword="quantize_method")
    damp: float = option(0.01, "GPTQ's / SparseGPT's dampening, a fraction of mean(diag H)")
    act_order: bool = option(False, "GPTQ: quantize columns in order of decreasing Hessian diagonal")
    clip: str = option("minmax", "GPTQ: each group's range from its max, or by the published quantizer's MSE "
                       "shrink search", choices=qm.CLIPS)

    reads_calibration: ClassVar = True

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
        if any(c in self.promote for c in ",{}"):
            raise _error(f"{p} promote={self.promote}: separate names with '|' or ';'")
        if self.fallback not in FALLBACKS:
            raise _error(f"{p} fallback={self.fallback}: expected float or int8")
        if self.fallback == "int8" and self.weights != "int4":
            raise _error(f"pass quantize: fallback=int8 applies to weights=int4 (int8 weights fall back to float), "
                         f"got weights={self.weights}")
        if math.isnan(self.max_error) or self.max_error < 0:
            raise _error(f"{p} max_error={self.max_error}: expected a non-negative relative L2 bound")
        if self.activations not in ACTIVATIONS:
            raise _error(f"{p} activations={self.activations}: expected none or int8")
        if self.act_group < 0 or (self.act_group and self.activations != "int8"):
            raise _error(f"{p} act_group={self.act_group}: expected values per activation scale (e.g. 32) with "
                         f"activations=int8, or 0 for one scale per row and weight group")
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
        if self.method not in METHODS:
            raise _error(f"{p} method={self.method}: expected {', '.join(METHODS)}")
        if not 0 <= self.damp < math.inf:
            raise _error(f"{p} damp={self.damp}: expected a non-negative fraction of mean(diag H), e.g. 0.01")
        if self.clip not in qm.CLIPS:
            raise _error(f"{p} clip={self.clip}: expected minmax or mse")
        if (self.damp != 0.01 or self.act_order or self.clip != "minmax") and self.method != "gptq":
            raise _error(f"pass quantize: damp=, act_order= and clip= apply to method=gptq (got method={self.method})")

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

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        calib = ctx.calibration if ctx is not None else None
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
        convs = conv_weights(self, graph)   # conv2d layers taken int8 (quantize_conv.py)
        if not uses and not convs:
            raise _error(f"quantize: no matmul with a constant 2-D weight in graph @{graph.name}")
        skip, promote = split_names(self.skip), split_names(self.promote)
        names = {w.name for w in uses} | {w.name for w in convs}
        for opt, listed in (("skip", skip), ("promote", promote)):
            unknown = [s for s in listed if s not in names]
            if unknown:
                raise _error(f"quantize: {opt} names {', '.join(unknown)}, which is not a matmul weight of "
                             f"@{graph.name}; weights: {', '.join(sorted(names))}")
        if self.static and calib is None:
            raise _error(f"quantize: calibration={self.calibration} chooses static activation scales from "
                         f"calibration data, and none was given: pass calibration_data=[{{input: array}}, ...] "
                         f"to sqk.compile (or use calibration=dynamic)")
        if self.method != "rtn" and calib is None:
            raise _error(f"quantize: method={self.method} needs calibration data (each layer's inputs) and none "
                         f"was given: pass calibration_data=[{{input: array}}, ...] to sqk.compile "
                         f"(--calibration FILE.npz on the command line), or use method=rtn")
        if convs:   # one reference run over the samples gathers the conv and matmul inputs
            calib.stats(graph, list(dict.fromkeys([n.inputs[0] for ns in convs.values() for n in ns]
                                                  + [m.inputs[0] for ms in uses.values() for m in ms])))
        stats = self._stats(graph, uses, calib)    # per matmul input value
        source = (calib.source if calib is not None
                  else f"{self.samples} random normal rows (seed={self.seed})")
        const_value = {w: prod[w].attrs["value"] for w in uses}
        awq, awq_why, awq_nodes, awq_inputs = (self._awq(graph, uses, skip, stats, const_value, calib)
                                               if self.method == "awq" else ({}, {}, {}, {}))

        taken = {v.name for v in graph.values()}
        report = QuantReport()
        replaced: dict[Value, tuple[Value, ...]] = {}   # W -> (q, scales[, zeros])
        new_consts: dict[Value, list[Node]] = {}        # W -> const nodes to insert after W's
        group_of: dict[Value, int] = {}
        act_scale: dict[Node, float] = {}              # matmul -> its static activation scale
        for w in uses:
            k, n = w.shape
            fbytes = w.type.nbytes
            row = {"layer": w.name, "shape": (k, n), "dtype": w.dtype.name, "float_bytes": fbytes,
                   "method": self.method, "calibration": source}
            if w.name in skip:
                report.append({**row, "weights": w.dtype.name, "rel_l2": None, "cosine": None,
                               "bytes": fbytes, "status": "skipped (skip=)"})
                continue
            inv = None
            if w in awq:
                row["note"], inv = awq[w]     # const_value[w] is W * s (set by _awq)
            xs = [(stats[m.inputs[0]].sample if inv is None else stats[m.inputs[0]].sample * inv, m)
                  for m in uses[w]]
            st = LayerStats.merged([stats[x] for x in dict.fromkeys(m.inputs[0] for m in uses[w])])
            scales = {m: self._act_scale(stats[m.inputs[0]], w.name, inv) for m in uses[w]} if self.static else {}
            args = (w, uses[w], const_value, st, xs, scales, inv, stats, prod, calib)
            got, why = None, awq_why.get(w)
            if w.name in promote:
                got, why = None, why or "promote="
            elif why is None:
                got = self._layer(*args, self.bits, self.group_for(k))
                why = got if isinstance(got, str) else None
                if got is not None and why is None and got["rel_l2"] > self.max_error:
                    why = f"{got['weights']} error {got['rel_l2']:.3g} > max_error {self.max_error:g}"
            if why is not None and self.fallback == "int8" and w not in awq_why:
                fell = self._layer(*args, 8, k)
                if isinstance(fell, dict) and fell["rel_l2"] <= self.max_error:
                    got, why, row["note"] = fell, None, "; ".join(
                        filter(None, [row.get("note"), f"fallback int8 ({why})"]))
                elif isinstance(fell, dict):
                    got, why = fell, f"{why}; int8 error {fell['rel_l2']:.3g} > max_error {self.max_error:g}"
            if why is not None:
                over = isinstance(got, dict)
                status = (f"kept {w.dtype.name}: {why}" if over or why == "promote=" else
                          f"kept {w.dtype.name}: {self.method} cannot apply: {why}")
                report.append({**row, "weights": w.dtype.name, "rel_l2": got["rel_l2"] if over else None,
                               "cosine": got["cosine"] if over else None, "bytes": fbytes, "status": status,
                               **({"act_scales": got["act_scales"]} if over else {})})
                continue
            act_scale.update(scales)
            qdt = dt.i4 if got["bits"] == 4 else dt.i8
            vals, nodes = [], []
            for suffix, a, d in (("q", got["q"], qdt), ("scales", got["s"], dt.dtype(got["s"].dtype)),
                                 ("zeros", got["z"], qdt)):
                if a is None:
                    continue
                v = Value(_fresh(f"{w.name}.{suffix}", taken), TensorType(d, a.shape))
                a = np.ascontiguousarray(a)
                a.setflags(write=False)
                vals.append(v)
                nodes.append(Node("const", (), (v,), {"value": a}))
            replaced[w], new_consts[w], group_of[w] = tuple(vals), nodes, got["group"]
            report.append({**row, **{k_: got[k_] for k_ in ("weights", "rel_l2", "cosine", "act_scales", "bytes")},
                           **({"rel_l2_rtn": got["rel_l2_rtn"]} if "rel_l2_rtn" in got else {}),
                           "status": "quantized"})

        out_nodes = []
        still_used = {v for n in graph.nodes for v in n.inputs
                      if not (n.op == "matmul" and n.inputs[1] in replaced or
                              n.op == "gather" and n.inputs[0] in replaced and n.attrs["axis"] % 2 == 1)} \
            | set(graph.outputs)
        changed = {v: a for v, a in const_value.items() if a is not prod[v].attrs["value"]}
        for node in graph.nodes:
            for x_node in awq_nodes.get(id(node), ()):
                out_nodes.append(x_node)        # 1/s as an explicit mul, before the first matmul reading it
            if node.op == "const" and node.output in changed and node.output not in replaced:
                value = np.ascontiguousarray(changed[node.output].astype(node.output.dtype.np_dtype))
                value.setflags(write=False)
                out_nodes.append(Node("const", (), node.outputs, {"value": value}))
            elif node.op == "const" and node.output in replaced:
                if node.output in still_used:
                    out_nodes.append(node)
                out_nodes.extend(new_consts[node.output])
            elif node.op == "gather" and node.inputs[0] in replaced and node.attrs["axis"] % 2 == 1:
                out_nodes += _gather_q(node, replaced[node.inputs[0]], group_of[node.inputs[0]], taken)
            elif node.op == "matmul" and node.inputs[1] in replaced:
                w = node.inputs[1]
                # a sparse format (set in the graph) stays: symmetric codes keep the pruned zeros
                # (checked readable by matmul_q in _check_sparse)
                attrs = OPS["matmul_q"].normalize_attrs({
                    "group": group_of[w], "activations": self.activations,
                    "sparse": node.attrs.get("sparse", "dense"), "act_scale": act_scale.get(node, 0.0),
                    "act_group": min(self.act_group, w.shape[0])})
                out_nodes.append(Node("matmul_q", (awq_inputs.get(id(node), node.inputs[0]),) + replaced[w],
                                      node.outputs, attrs))
            elif node.op == "matmul" and id(node) in awq_inputs:
                out_nodes.append(Node("matmul", (awq_inputs[id(node)],) + node.inputs[1:], node.outputs,
                                      node.attrs))
            else:
                out_nodes.append(node)
        out = graph.with_nodes(out_nodes)
        if convs:
            out = quantize_convs(self, graph, out, convs, calib, taken, report, _fresh)
        if ctx is not None:
            ctx.add_report(self, report)
        return out

    def _layer(self, w, users, const_value, st, xs, scales, inv, stats, prod, calib, bits, group):
        """One weight quantized at ``bits`` / ``group`` by the method: a dict
        (q, s, z, bits, group, weights (spelled), rel_l2, cosine, act_scales,
        bytes[, rel_l2_rtn]) or, when the method cannot apply, why (a str)."""
        k, n = w.shape
        self._check_sparse(w, users, group, bits)
        try:
            i8act_segments(k, group, self.act_group)
        except ValueError as e:
            raise _error(f"quantize: layer {w.name}: {e}") from None
        arr = const_value[w]
        try:
            q, s, z = self._quantize(arr, st, bits, group, w.name, calib)
        except ValueError as e:   # e.g. a Hessian GPTQ cannot factor
            if not str(e).startswith(f"quantize {w.name}:"):
                raise
            return str(e).removeprefix(f"quantize {w.name}: ")
        rel, cos = self._layer_error([(x, scales.get(m, 0.0)) for x, m in xs], arr, q, s, z, group)
        out = dict(q=q, s=s, z=z, bits=bits, group=group, rel_l2=rel, cosine=cos, act_scales=list(scales.values()),
                   bytes=qm.quantized_nbytes(k, n, bits, group, self.scale_dtype, z is not None))
        if self.method != "rtn":
            rq, rs, rz = qm.quantize_weight(arr if inv is None else prod[w].attrs["value"], bits, group,
                                            self.scheme, self.scale_dtype, name=w.name)
            xr = xs if inv is None else [(stats[m.inputs[0]].sample, m) for m in users]
            out["rel_l2_rtn"] = self._layer_error([(x, scales.get(m, 0.0)) for x, m in xr],
                                                  prod[w].attrs["value"], rq, rs, rz, group)[0]
        spelled = f"{'int4' if bits == 4 else 'int8'} {'g' + str(group) if group < k else 'per-channel'} {self.scheme}"
        if self.method != "rtn":
            spelled += f" {self.method}"
        if self.activations == "int8":
            spelled += " + i8 act" + (f" a{self.act_group}" if self.act_group else "") + \
                (f" {self.calibration}" if self.static else "")
        out["weights"] = spelled
        return out

    def _quantize(self, arr, st: LayerStats, bits: int, group: int, name: str, calib=None):
        """(q, scales, zeros) of one weight by ``self.method`` (AWQ's weight is W * s already)."""
        args = dict(bits=bits, group=group, scheme=self.scheme, scale_dtype=self.scale_dtype, name=name)
        memo = calib.memo if calib is not None else None   # once per weight
        if self.method == "gptq":
            return memo(qm.gptq_quantize, arr, st.hessian, damp=self.damp, act_order=self.act_order,
                        **({"clip": self.clip} if self.clip != "minmax" else {}), **args)
        if self.method == "imatrix":
            return memo(qm.imatrix_quantize, arr, st.mean_sq, **args)
        return qm.quantize_weight(arr, **args)

    def _act_scale(self, st: LayerStats, name: str, inv=None) -> float:
        """The static activation scale of a matmul input (minmax: from the max
        of all rows; else from the kept rows), times ``inv`` (AWQ's 1/s) when given."""
        if self.calibration == "minmax":
            x = st.chan_amax if inv is None else st.chan_amax * inv
        else:
            x = st.sample if inv is None else st.sample * inv
        return qm.activation_scale(x, self.calibration, self.percentile, name=name)

    def _stats(self, graph: Graph, uses: dict, calib) -> dict:
        """LayerStats per matmul input value: from the calibration samples
        (gathered once, shared with other passes), or seeded random rows."""
        xs = list(dict.fromkeys(m.inputs[0] for users in uses.values() for m in users))
        if calib is None:
            return random_stats(xs, self.seed, self.samples)
        try:
            return calib.stats(graph, xs)
        except CalibrationError as e:
            raise _error(str(e)) from None

    def _awq(self, graph: Graph, uses: dict, skip: list, stats: dict, const_value: dict, calib) -> tuple:
        """AWQ for every group of weights reading one input x: search s, set
        ``const_value`` of each weight to W * s and fold 1/s into x's producer
        where exact (a norm's scale (and bias) vector, a matmul's weight
        columns), else a mul by a 1/s constant.  Returns ({weight: (note, 1/s)}
        for the weights AWQ applies to, {weight: why AWQ cannot apply},
        {id(matmul): (const, mul) nodes to insert before it}, {id(matmul): its
        new input value})."""
        prod = graph.producers()
        readers: dict[Value, list[Node]] = {}
        for n in graph.nodes:
            for v in n.inputs:
                readers.setdefault(v, []).append(n)
        outputs = set(graph.outputs)
        by_x: dict[Value, list[Value]] = {}
        why: dict[Value, str] = {}
        for w, users in uses.items():
            if w.name in skip:
                continue
            xs = {m.inputs[0] for m in users}
            if len(xs) > 1:
                why[w] = "the weight is read by matmuls of different inputs (one 1/s cannot serve them)"
            elif any(r not in users for r in readers[w]) or w in outputs:
                why[w] = "the weight constant is read elsewhere too (scaling it would change that use)"
            else:
                by_x.setdefault(users[0].inputs[0], []).append(w)
        taken = {v.name for v in graph.values()}
        out, nodes, inputs = {}, {}, {}
        for x, ws in by_x.items():
            st = stats[x]
            group = self.group_for(x.shape[-1])
            s, alpha, err, rtn = calib.memo(qm.awq_scales, [const_value[w] for w in ws], st.sample, st.mean_abs,
                                             self.bits, group, self.scheme, self.scale_dtype)
            inv = (np.float32(1) / s).astype(np.float32)
            for w in ws:
                const_value[w] = (const_value[w].astype(np.float32) * s[:, None]).astype(const_value[w].dtype)
            group_users = {id(m) for w in ws for m in uses[w]}
            p = prod.get(x)
            only_group = x not in outputs and all(id(r) in group_users for r in readers.get(x, []))
            folded = None
            if only_group and p is not None and p.op in ("rmsnorm", "layernorm") and \
                    p.attrs["axis"] % x.type.rank == x.type.rank - 1:
                vecs = [v for v in p.inputs[1:] if v is not None]
                if all(prod.get(v) is not None and prod[v].op == "const" and len(readers[v]) == 1 and
                       v not in outputs for v in vecs):
                    for v in vecs:
                        const_value[v] = const_value.get(v, prod[v].attrs["value"]) * inv
                    folded = f"{p.op} {'/'.join(v.name for v in vecs)}"
            elif only_group and p is not None and p.op == "matmul":
                wp = p.inputs[1]
                if prod.get(wp) is not None and prod[wp].op == "const" and wp.type.rank == 2 and \
                        wp.dtype in dt.FLOATS and len(readers[wp]) == 1 and wp not in outputs:
                    const_value[wp] = const_value.get(wp, prod[wp].attrs["value"]) * inv[None, :]
                    folded = f"matmul weight {wp.name} columns"
            note = f"awq alpha={alpha:g} ({len(ws)} layer{'s' if len(ws) > 1 else ''}), 1/s " + \
                   (f"folded into {folded}" if folded else "as an explicit mul")
            if not folded:
                sv = Value(_fresh(f"{x.name}.awq_inv_scale", taken), TensorType(x.dtype, (x.shape[-1],)))
                xv = Value(_fresh(f"{x.name}.awq", taken), x.type)
                first = min((m for w in ws for m in uses[w]), key=lambda m: graph.nodes.index(m))
                nodes[id(first)] = (Node("const", (), (sv,), {"value": inv.astype(x.dtype.np_dtype)}),
                                    Node("mul", (x, sv), (xv,), {}))
                inputs.update((id(m), xv) for w in ws for m in uses[w])
            out.update((w, (note, inv)) for w in ws)
        return out, why, nodes, inputs

    def _check_sparse(self, w: Value, users: list[Node], group: int, bits: int) -> None:
        """A matmul of ``w`` stored in a non-dense format must stay readable as
        one after quantization (matmul_q's rules): else an error naming the layer."""
        for n in users:
            fmt = n.attrs.get("sparse", "dense")
            if fmt == "dense":
                continue
            why = ("asymmetric weights (zero points)" if self.scheme != "sym" else
                   "int8 activations" if self.activations != "none" else
                   f"grouped int8 scales (group={group} < K={w.shape[0]})" if bits == 8 and group < w.shape[0]
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
            got.append(matmul_q_i8act(x2, q, s, z, group, act_scale, act_group=self.act_group).astype(np.float64))
        return qm.output_error(np.concatenate(want), np.concatenate(got))


def _gather_q(node: Node, operands: tuple, group: int, taken: set) -> list[Node]:
    """``gather(W, ids, axis=1)`` [K, *ids] of a quantized W [K, N] as
    ``transpose(gather_q(ids, q, scales[, zeros]))``: W's columns read from its
    quantized constants (gather_q gives [*ids, K])."""
    ids, out = node.inputs[1], node.output
    rows = Value(_fresh(f"{out.name}.rows", taken), TensorType(out.dtype, ids.shape + (out.shape[0],)))
    r = ids.type.rank
    return [Node("gather_q", (ids,) + operands, (rows,), OPS["gather_q"].normalize_attrs({"group": group})),
            Node("transpose", (rows,), (out,), {"perm": (r,) + tuple(range(r))})]


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
    empty without static calibration; absent when skipped), method (rtn,
    gptq, awq, imatrix), calibration (where the layer inputs came from),
    rel_l2_rtn (the error round-to-nearest gets on the same rows; methods
    other than rtn), note (AWQ: alpha and where 1/s went)."""

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
        lines += [f"  {r['layer']}: {r['note']}" for r in self if r.get("note")]
        lines += self.calibration_lines("rel_l2_rtn", "round-to-nearest")
        fb, qb = sum(r["float_bytes"] for r in self), sum(r["bytes"] for r in self)
        lines.append(f"{len(self.quantized())} of {len(self)} weights quantized"
                     + (f", kept in float: {', '.join(self.kept())}" if self.kept() else "")
                     + f"; weight bytes {fb / 2**20:.2f} MiB -> {qb / 2**20:.2f} MiB")
        return "\n".join(lines) + format_end_to_end(self.end_to_end)

    def __str__(self) -> str:
        return self.format()
