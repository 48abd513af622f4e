"""Calibration of a decoder from text, and the end-to-end error budget.

``TextCalibration(cfg, weights, tokenizer, text, ctx)``: the text is
tokenized as perplexity does (llm/perplexity.py: BOS in front when the
tokenizer adds one), cut into ``len // ctx`` windows of ``ctx`` tokens (each
starting with BOS), and every window is run through the fp32 model
(``reference_logits`` on the f32 weights, numpy) while the input of each
linear layer is gathered into a ``LayerStats`` (compiler/calibration.py: the
running X^T X, sums of x^2 and |x|, a bounded sample of rows).  It is a
``Calibration``: the quantize and sparsify passes of every module the Decoder
compiles (step, prefill chunks) ask it for the stats of their matmul inputs,
which it finds by the weight each matmul reads (``wq_0`` -> "wq.0"), and
share one GPTQ / AWQ / SparseGPT result per weight (``Calibration.memo``).
The fp32 model's negative log-likelihoods of the windows' second halves are
kept too (``fp32_nll``): the reference an end-to-end budget is checked
against.

``max_error`` as an end-to-end budget (``parse_budget``): "ppl+2%" (the
quantized model's perplexity on the calibration windows at most 2 % above the
fp32 model's), "ppl+0.5" (at most 0.5 above).  ``fit_budget`` compiles with
every layer quantized, measures, and while over budget keeps more layers in
float, the most sensitive first: sensitivity is each layer's relative L2
output error on its calibration inputs, as the quantize report measured it;
the number kept doubles each round (1, 2, 4, ...) and the last round is then
narrowed by bisection, so the result is a smallest prefix of that order (up
to the bisection) that meets the budget.  With ``fallback="int8"`` (an
option of the quantize pass) the chosen layers are quantized to int8 per
channel instead of kept in float (quantize's ``promote=``): mixed int4 /
int8 precision, as llama.cpp's q4_K_M mixes give their sensitive tensors
more bits.  ``TextCalibration(budget_windows=N)``: the budget is measured
on the first N windows only (every round runs them through the quantized
model; the statistics still come from all windows).  The outcome, with each round's perplexity, is
``Decoder.budget`` (a ``BudgetReport``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..compiler.calibration import Calibration, CalibrationError, LayerStats

KEPT_ROWS = 256     # rows per layer kept for error measurements and AWQ's search (up to twice this)


def split_names(spec) -> list[str]:
    """Weight names of a skip= / promote= option: "a|b", or a list (None: none)."""
    from ..compiler.passes.quantize import split_names as split

    return [] if not spec else split(spec) if isinstance(spec, str) else list(spec)


def text_ids(tokenizer, text) -> tuple[list[int], bool]:
    """(ids, add_bos) of a calibration text (str, with the tokenizer's special
    tokens as perplexity adds them) or of token ids (a 1-D sequence, as given)."""
    if isinstance(text, str):
        if tokenizer is None:
            raise CalibrationError("calibration_text is a str but the model has no tokenizer: give token ids")
        ids = list(tokenizer.encode(text, add_special=True))
        plain = tokenizer.encode(text, add_special=False)
        return ids, tokenizer.bos_id is not None and len(ids) > len(plain) and ids[0] == tokenizer.bos_id
    a = np.asarray(text)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise CalibrationError(f"calibration_text must be a str or a 1-D sequence of token ids, got "
                               f"{type(text).__name__} of shape {list(a.shape)} and dtype {a.dtype}")
    return [int(t) for t in a], False


class TextCalibration(Calibration):
    """Layer statistics of a decoder from a calibration text (module docstring)."""

    def __init__(self, cfg, weights, tokenizer, text, ctx: int = 512, source: str | None = None,
                 kept_rows: int = KEPT_ROWS, budget_windows: int | None = None):
        from .decoder import as_f32, reference_logits
        from .perplexity import log_softmax

        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 3:
            raise CalibrationError(f"calibration_ctx must be an int >= 3, got {ctx!r}")
        ids, add_bos = text_ids(tokenizer, text)
        bad = [t for t in ids if not 0 <= t < cfg.vocab]
        if bad:
            raise CalibrationError(f"calibration text: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab})")
        if len(ids) < ctx:
            raise CalibrationError(f"the calibration text has {len(ids)} tokens; calibration at calibration_ctx "
                                   f"{ctx} needs at least {ctx} (one window): give a longer text or a smaller "
                                   f"calibration_ctx")
        self.samples = []                 # no graph input samples: the stats come from the text
        self._outputs = None
        self._memo = {}
        self.ctx, self.first = ctx, ctx // 2
        bos = tokenizer.bos_id if add_bos else None
        self.windows = [([bos] if bos is not None else []) + ids[s + (bos is not None):s + ctx]
                        for s in range(0, len(ids) - ctx + 1, ctx)]
        self.tokens = len(ids)
        self.source = source or f"calibration text ({len(ids)} tokens, {len(self.windows)} windows of {ctx})"
        f32 = {k: as_f32(v) for k, v in weights.items()}
        by_weight: dict[str, LayerStats] = {}
        last = [None, None]               # (x, stats): q/k/v and w1/w3 read one x, counted once

        def capture(name, x):
            if x is last[0]:
                by_weight.setdefault(name, last[1])
                return
            st = by_weight.setdefault(name, LayerStats(x.shape[-1], max_rows=kept_rows))
            if not np.isfinite(x).all():
                raise CalibrationError(f"calibration text: the input of layer {name} has non-finite values")
            st.add(x)
            last[:] = [x, st]

        nll = []
        for w in self.windows:
            lp = log_softmax(reference_logits(cfg, f32, w, capture=capture)[self.first:-1])
            nll.append(-lp[np.arange(lp.shape[0]), np.asarray(w[self.first + 1:])])
        self.fp32_nll = np.concatenate(nll)
        if budget_windows is not None and not (isinstance(budget_windows, int) and budget_windows >= 1):
            raise CalibrationError(f"budget_windows must be a positive int (windows scoring an end-to-end "
                                   f"budget), got {budget_windows!r}")
        # the first budget_windows windows score an end-to-end budget (all by default): every round of
        # fit_budget runs them through the quantized model
        self.budget_windows = min(budget_windows or len(self.windows), len(self.windows))
        self.by_weight = by_weight
        self._keys = {k.replace(".", "_"): k for k in by_weight}
        # build_decoder's fused projections (wqkv.i, w13.i) read the input of their parts
        for fused, part in (("wqkv", "wq"), ("w13", "w1")):
            self._keys.update({f"{fused}_{k[len(part) + 1:]}": k for k in by_weight if k.startswith(part + ".")})

    def stats(self, graph, xs) -> dict:
        """{x: LayerStats} for matmul inputs ``xs`` of a decoder graph, found by the weight each matmul reads."""
        prod = graph.producers()
        out = {}
        for x in xs:
            names = [n.inputs[1].name for n in graph.nodes if n.op in ("matmul", "matmul_q") and n.inputs[0] is x
                     and prod.get(n.inputs[1]) is not None and prod[n.inputs[1]].op == "const"]
            keys = [self._keys.get(name.partition(".")[0]) for name in names]   # "lm_head.pruned" -> lm_head
            if not keys or None in keys:
                raise CalibrationError(f"calibration text: no statistics for the input {x.name} of "
                                       f"{', '.join(names) or 'no constant weight'} (text calibration covers the "
                                       f"decoder's linear layers: {', '.join(sorted(self.by_weight))[:200]})")
            st = self.by_weight[keys[0]]
            if st.k != x.shape[-1]:
                raise CalibrationError(f"calibration text: layer {keys[0]} has inputs of {st.k} channels, the graph's "
                                       f"{x.name} has {x.shape[-1]}")
            out[x] = st
        return out

    def fp32_outputs(self, graph):
        raise CalibrationError("a text calibration has no graph input samples (its end-to-end figure is the "
                               "perplexity on the calibration windows: Decoder.budget)")

    def nll(self, decoder, windows: int | None = None) -> np.ndarray:
        """The negative log-likelihoods of ``decoder`` at the positions ``fp32_nll`` scores
        (of the first ``windows`` windows: ``fp32_nll[:len(result)]``)."""
        from .perplexity import log_softmax, window_logits

        out = []
        for w in self.windows[:windows]:   # every row through the all-logits chunks: one module to compile
            lp = log_softmax(window_logits(decoder, w, 0)[self.first:-1])
            out.append(-lp[np.arange(lp.shape[0]), np.asarray(w[self.first + 1:])])
        decoder.reset()
        return np.concatenate(out)


_BUDGET = re.compile(r"\s*ppl\s*\+\s*([0-9.eE+-]+)\s*(%?)\s*")


@dataclass(frozen=True)
class Budget:
    """An end-to-end error budget: perplexity at most ``base * (1 + rel) + abs``."""
    spec: str
    rel: float = 0.0
    abs: float = 0.0

    def limit(self, base_ppl: float) -> float:
        return base_ppl * (1 + self.rel) + self.abs


def parse_budget(max_error) -> Budget | None:
    """``max_error`` as an end-to-end Budget ("ppl+2%", "ppl+0.5"); None for a
    number (the quantize pass's per-layer relative L2 bound); ValueError for
    any other string."""
    if max_error is None or isinstance(max_error, (int, float)) and not isinstance(max_error, bool):
        return None
    if isinstance(max_error, str):
        m = _BUDGET.fullmatch(max_error)
        try:
            v = float(m.group(1)) if m else math.nan
        except ValueError:
            v = math.nan
        if m and math.isfinite(v) and v >= 0:
            return Budget(max_error.strip(), rel=v / 100 if m.group(2) else 0.0, abs=0.0 if m.group(2) else v)
        try:
            return parse_budget(float(max_error))
        except ValueError:
            pass
    raise ValueError(f"max_error={max_error!r}: expected a per-layer relative L2 bound (a number, e.g. 0.02) or an "
                     f"end-to-end perplexity budget on the calibration text (\"ppl+2%\" or \"ppl+0.5\")")


@dataclass
class BudgetReport:
    """What ``fit_budget`` did: the budget, the fp32 and limit perplexities on
    the calibration windows, each round (layers kept in float, perplexity) and
    the layers finally kept in float (most sensitive first)."""
    budget: str
    fp32_ppl: float
    limit: float
    rounds: list = field(default_factory=list)     # [(kept layers, ppl)]
    kept: list = field(default_factory=list)
    met: bool = False
    layers: int = 0
    fallback: str = "float"      # what the kept layers get: float, or int8 (quantize's fallback=int8)

    @property
    def ppl(self) -> float:
        return dict((tuple(k), p) for k, p in self.rounds)[tuple(self.kept)]

    def __str__(self) -> str:
        lines = [f"end-to-end budget max_error={self.budget}: fp32 perplexity {self.fp32_ppl:.4f} on the calibration "
                 f"text, limit {self.limit:.4f}"]
        how = "kept in float" if self.fallback == "float" else f"in {self.fallback}"
        lines += [f"  {len(k):>4} of {self.layers} layers {how}: perplexity {p:.4f}" for k, p in self.rounds]
        lines.append(f"{'met' if self.met else 'NOT met'}: {self.ppl:.4f} with "
                     + (f"{len(self.kept)} layers {how} ({', '.join(self.kept)})" if self.kept
                        else "every layer quantized"))
        return "\n".join(lines)


def fit_budget(compile_with, calib: TextCalibration, budget: Budget, report_of) -> tuple[object, BudgetReport]:
    """The decoder of the smallest most-sensitive-first set of float layers
    meeting ``budget`` (module docstring).  ``compile_with(skip)`` compiles a
    Decoder keeping the layers ``skip`` in float; ``report_of(decoder)`` is
    its quantize/sparsify report rows with "layer" and "rel_l2"."""
    wins = calib.budget_windows
    ppl = lambda d: math.exp(float(calib.nll(d, wins).mean()))   # noqa: E731
    base = math.exp(float(calib.fp32_nll[:wins * (calib.ctx - 1 - calib.first)].mean()))
    dec = compile_with([])
    rows = [r for r in report_of(dec) if r.get("rel_l2") is not None]
    order = [r["layer"] for r in sorted(rows, key=lambda r: -r["rel_l2"])]
    rep = BudgetReport(budget.spec, base, budget.limit(base), layers=len(order))
    p = ppl(dec)
    rep.rounds.append(([], p))
    if p <= rep.limit:
        rep.met = True
        return dec, rep
    lo, n, best = 0, 1, None          # lo: a count known over budget
    while True:
        n = min(n, len(order))
        d = compile_with(order[:n])
        p = ppl(d)
        rep.rounds.append((order[:n], p))
        if p <= rep.limit:
            best = (n, d)
            break
        if n == len(order):
            rep.kept = order
            return d, rep
        lo, n = n, 2 * n
    hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        d = compile_with(order[:mid])
        p = ppl(d)
        rep.rounds.append((order[:mid], p))
        if p <= rep.limit:
            hi, best = mid, (mid, d)
        else:
            lo = mid
    rep.kept, rep.met = order[:best[0]], True
    return best[1], rep


def calibrated_decoder(dec, target, keep_ir, text, ctx, options) -> bool:
    """``Decoder.__init__``'s part for ``calibration_text=`` and a string
    ``max_error``: the text's TextCalibration becomes the compile's
    ``calibration_data``; with an end-to-end budget, ``dec`` becomes the
    decoder ``fit_budget`` chose (True: ``dec`` is complete)."""
    from .decoder import Decoder, QuantWeight, as_f32

    passes = [k for k in ("quantize", "sparsify") if options.get(k) is not None] or \
        (["pipeline"] if any(p in str(options.get("pipeline") or "") for p in ("quantize", "sparsify")) else [])
    if not passes:
        what = "calibration_text=" if text is not None else f"max_error={options.get('max_error')!r}"
        raise ValueError(f"{what} applies when the decoder is quantized or sparsified (quantize=..., sparsify=...)")
    if "calibration_data" in options and text is not None:
        raise ValueError("give either calibration_text= or calibration_data=, not both")
    budget = parse_budget(options.get("max_error"))
    if text is not None and any(isinstance(w, QuantWeight) for w in dec.weights.values()):
        # a file's pre-quantized blocks: the methods quantize (or prune) their f32 values
        dec.weights = {k: as_f32(w) for k, w in dec.weights.items()}
    if text is not None:
        options["calibration_data"] = TextCalibration(dec.cfg, dec.weights, dec.tokenizer, text, ctx)
    if budget is None:
        if options.get("max_error") is not None:
            options["max_error"] = float(options["max_error"])
        return False
    calib = options.get("calibration_data")
    if not isinstance(calib, TextCalibration):
        raise ValueError(f"max_error={budget.spec!r} is measured on a calibration text: give calibration_text=")
    if options.get("pipeline") is not None:
        raise ValueError(f"max_error={budget.spec!r} chooses the layers to keep in float through skip=: give "
                         "quantize=/sparsify= rather than pipeline=")
    opts = {k: v for k, v in options.items() if k != "max_error"}
    # fallback=int8: the layers chosen get int8 (quantize's promote=), else they stay in float (skip=)
    key = "promote" if opts.get("fallback") == "int8" else "skip"
    listed = {k: split_names(opts.pop(k, None)) for k in ("skip", "promote")}

    def compile_with(chosen):
        names = dict(listed, **{key: listed[key] + list(chosen)})
        return Decoder(dec.cfg, dec.weights, target=target, kv_dtype=dec.kv_dtype, prefill_chunk=dec.prefill_chunk,
                       tokenizer=dec.tokenizer, keep_ir=keep_ir, **opts, **{k: v for k, v in names.items() if v})

    def report_of(d):
        rep = d.module.report
        worst: dict = {}
        for part in ([rep] if hasattr(rep, "pass_name") else list(rep or [])):
            for r in part:
                if r.get("rel_l2") is not None and r.get("status", "").startswith(("quantized", "pruned")) and \
                        r["layer"] not in listed["skip"] + listed["promote"]:
                    worst[r["layer"]] = max(worst.get(r["layer"], 0.0), r["rel_l2"])
        return [{"layer": k, "rel_l2": v} for k, v in worst.items()]

    best, rep = fit_budget(compile_with, calib, budget, report_of)
    rep.fallback = "int8" if key == "promote" else "float"
    dec.__dict__.update(best.__dict__)
    dec.budget = rep
    return True
