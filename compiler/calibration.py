"""Calibration: each matmul layer's fp32 inputs over calibration samples,
gathered once per compile and shared by the passes that read them (quantize:
GPTQ, AWQ, imatrix, static activation scales, the error report; sparsify:
Wanda, SparseGPT, the report).

A :class:`Calibration` holds the samples (a list of {input name: array}, as
``compile(calibration_data=...)`` takes them) and, per matmul input value,
the :class:`LayerStats` of the rows that value took over all samples.  Stats
are computed the first time a pass asks for them, with the reference
interpreter on the graph that pass sees, and kept by the input value's name:
a later pass (quantize after sparsify) reads the same fp32 statistics.

Memory stays bounded whatever the number of rows: the statistics are running
sums (X^T X for the Hessian, sum x^2, sum |x|), and at most ``MAX_ROWS`` rows
are kept (an even stride through all of them) for error measurements and
AWQ's scale search.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

MAX_ROWS = 2048   # rows per layer kept for error measurement and searches


@dataclass
class LayerStats:
    """Running statistics of one layer input over the calibration rows."""

    k: int
    rows: int = 0
    xtx: np.ndarray = None        # [K, K] float64: sum over rows of x^T x (GPTQ/SparseGPT Hessian, up to 2/rows)
    sum_sq: np.ndarray = None     # [K] float64: sum of x^2 per input channel
    sum_abs: np.ndarray = None    # [K] float64: sum of |x| per input channel
    chan_amax: np.ndarray = None  # [K]: max |x| per input channel over all rows (static minmax scales)
    kept: list = field(default_factory=list)   # row blocks kept (the input's dtype), at most ~2 max_rows rows
    stride: int = 1               # every stride-th row is kept
    max_rows: int = MAX_ROWS

    def __post_init__(self):
        self.xtx = np.zeros((self.k, self.k))
        self.sum_sq = np.zeros(self.k)
        self.sum_abs = np.zeros(self.k)
        self.chan_amax = np.zeros(self.k)

    def add(self, x: np.ndarray) -> None:
        raw = np.asarray(x).reshape(-1, self.k)
        x = raw.astype(np.float64)
        start = (-self.rows) % self.stride   # continue the stride across blocks
        self.rows += x.shape[0]
        self.xtx += x.T @ x
        self.sum_sq += np.square(x).sum(axis=0)
        self.sum_abs += np.abs(x).sum(axis=0)
        self.chan_amax = np.maximum(self.chan_amax, np.abs(x).max(axis=0, initial=0.0))
        self.kept.append(raw[start::self.stride].copy())   # as the layer saw it (f32 rows of an f32 graph)
        if sum(len(b) for b in self.kept) > 2 * self.max_rows:   # halve what is kept: every other row
            every = np.concatenate(self.kept)[::2]
            self.kept, self.stride = [every], self.stride * 2

    @staticmethod
    def merged(parts: list) -> LayerStats:
        """The statistics of the rows of all ``parts`` together (one weight read by several matmuls)."""
        if len(parts) == 1:
            return parts[0]
        out = LayerStats(parts[0].k)
        for p in parts:
            out.rows += p.rows
            out.xtx += p.xtx
            out.sum_sq += p.sum_sq
            out.sum_abs += p.sum_abs
            out.chan_amax = np.maximum(out.chan_amax, p.chan_amax)
            out.kept.append(p.sample)
        return out

    @property
    def hessian(self) -> np.ndarray:
        """H = 2 X^T X / rows (GPTQ's normalization; methods are invariant to the factor)."""
        return self.xtx * (2.0 / max(self.rows, 1))

    @property
    def amax(self) -> float:
        """max |x| over all rows."""
        return float(self.chan_amax.max(initial=0.0))

    @property
    def mean_sq(self) -> np.ndarray:
        """Mean x^2 per input channel (llama.cpp's importance matrix)."""
        return self.sum_sq / max(self.rows, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        """Mean |x| per input channel (AWQ's activation scale)."""
        return self.sum_abs / max(self.rows, 1)

    @property
    def col_norm(self) -> np.ndarray:
        """||x_k||_2 over all rows per input channel (Wanda's metric)."""
        return np.sqrt(self.sum_sq)

    @property
    def sample(self) -> np.ndarray:
        """The kept rows [<= 2 * max_rows, K] (all rows when there are few)."""
        return np.concatenate(self.kept) if self.kept else np.zeros((0, self.k), np.float32)


class CalibrationError(ValueError):
    pass


class Calibration:
    """Calibration samples and the layer statistics gathered from them."""

    def __init__(self, samples, source: str | None = None):
        if isinstance(samples, dict) or not isinstance(samples, (list, tuple)) or not samples \
                or not all(isinstance(d, dict) for d in samples):
            raise CalibrationError("calibration_data must be a non-empty list of {input name: numpy array} dicts")
        self.samples = list(samples)
        self.source = source or f"calibration_data ({len(self.samples)} samples)"
        self._stats: dict[str, LayerStats] = {}
        self._outputs: list | None = None   # the fp32 graph's outputs per sample (first collection)
        self._memo: dict = {}

    def memo(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, computed once per content of the arguments
        (arrays by their bytes): the passes of every module compiled with this
        calibration (a Decoder's step and chunk modules) share one GPTQ, AWQ
        search or SparseGPT solve per weight."""
        h = hashlib.blake2b(digest_size=16)
        h.update(fn.__module__.encode() + fn.__qualname__.encode())
        for a in list(args) + sorted(kwargs.items()):
            _digest(h, a)
        key = h.digest()
        if key not in self._memo:
            self._memo[key] = fn(*args, **kwargs)
        return self._memo[key]

    @staticmethod
    def of(data) -> Calibration | None:
        """``data`` as a Calibration (None stays None; a Calibration is itself)."""
        return data if data is None or isinstance(data, Calibration) else Calibration(data)

    def stats(self, graph, xs) -> dict:
        """{x value: LayerStats} for the matmul input values ``xs`` of ``graph``
        (the last axis is the layer's K); the missing ones are gathered in one
        run of the reference interpreter over the samples."""
        from ..ir.reference import run_reference

        todo = {x for x in xs if x.name not in self._stats}
        if todo:
            new = {x: LayerStats(x.shape[-1]) for x in todo}
            for i, sample in enumerate(self.samples):
                try:
                    env = run_reference(graph, sample, keep_all=True)
                except (ValueError, TypeError) as e:
                    raise CalibrationError(f"calibration sample {i}: {e}") from None
                if self._outputs is None or len(self._outputs) < len(self.samples):
                    self._outputs = (self._outputs or []) + [[env[v] for v in graph.outputs]]
                for x, st in new.items():
                    a = env[x]
                    if not np.isfinite(a).all():
                        raise CalibrationError(f"calibration sample {i}: layer input {x.name} has non-finite values")
                    st.add(a)
            self._stats.update((x.name, st) for x, st in new.items())
        return {x: self._stats[x.name] for x in xs}

    def fp32_outputs(self, graph) -> list:
        """The outputs of ``graph`` (the fp32 model) on each sample: those of
        the first collection (passes collect on the graph before they change
        it), else run now."""
        if self._outputs is None or len(self._outputs) < len(self.samples):
            from ..ir.reference import run_reference

            self._outputs = [run_reference(graph, s) for s in self.samples]
        return self._outputs

    @staticmethod
    def load_npz(path: str) -> Calibration:
        """Samples from an .npz file: one array per graph input, named as the
        input, with a leading sample axis (``NAME`` of shape [S, *input shape]);
        sample i is {NAME: arr[i] for each array}."""
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise CalibrationError(f"--calibration {path}: cannot read it as .npz ({e})") from None
        if not arrays:
            raise CalibrationError(f"--calibration {path}: holds no arrays")
        counts = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
        if None in counts.values() or len(set(counts.values())) != 1 or 0 in counts.values():
            shapes = ", ".join(f"{k}{list(a.shape)}" for k, a in arrays.items())
            raise CalibrationError(f"--calibration {path}: every array needs the same leading sample axis "
                                   f"(S >= 1); got shapes {shapes}")
        n = next(iter(counts.values()))
        return Calibration([{k: np.ascontiguousarray(a[i]) for k, a in arrays.items()} for i in range(n)],
                           source=f"{path} ({n} samples)")


def _digest(h, a) -> None:
    if isinstance(a, np.ndarray):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    elif isinstance(a, (list, tuple)):
        h.update(f"[{len(a)}".encode())
        for b in a:
            _digest(h, b)
    else:
        h.update(repr(a).encode() + b";")


def random_stats(xs, seed: int, samples: int) -> dict:
    """Stats of ``samples`` seeded standard-normal rows per input value (the
    report's measurement without calibration data; the same rows for every
    matmul of one input)."""
    out = {}
    for i, x in enumerate(xs):
        st = LayerStats(x.shape[-1])
        st.add(np.random.default_rng([seed, i]).standard_normal((samples, x.shape[-1])))
        out[x] = st
    return out
