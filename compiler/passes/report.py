"""Per-layer reports of the passes that change weights (quantize, sparsify,
select_format), and how ``compile()`` combines them into ``Module.report``.

A pass files its report in the pass manager's context (``ctx.add_report``,
passes/__init__.py); the driver reads them after the pipeline ran.  Every report
is a :class:`LayerReport`: a list of row dicts, one per weight, each with at
least ``layer`` (the weight constant's name), ``shape`` and ``status``, and a
``format()`` that prints a text table.  :func:`combine_reports` turns the
reports of one pipeline run into ``Module.report``.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np


class LayerReport(list):
    """Rows (dicts) of one pass, one per weight: ``layer``, ``shape``,
    ``status`` and the pass's own columns.  ``pass_name`` names the pass.
    ``end_to_end`` (set by compile() with calibration data, else None): the
    compiled graph's outputs against fp32 (see :func:`end_to_end_error`)."""

    pass_name: ClassVar[str] = ""
    end_to_end: dict | None = None

    def layers(self) -> list[str]:
        return [r["layer"] for r in self]

    def row(self, layer: str) -> dict:
        """The row of weight ``layer`` (KeyError when the pass did not report it)."""
        for r in self:
            if r["layer"] == layer:
                return r
        raise KeyError(f"{self.pass_name or 'report'}: no row for weight {layer!r}; rows: {', '.join(self.layers())}")

    def calibration_lines(self, key: str, baseline: str) -> list[str]:
        """Closing lines of a calibrated report: each layer's rel L2 with the
        ``baseline`` method instead (rows' ``key``), and where the errors were measured."""
        lines = []
        base = [r for r in self if r.get(key) is not None and r["rel_l2"] is not None]
        if base:
            lines.append(f"rel L2 with {baseline} instead: " + ", ".join(f"{r['layer']} {r[key]:.2e}" for r in base))
        sources = sorted({r["calibration"] for r in self if r.get("calibration")})
        if sources:
            lines.append(f"errors measured on {'; '.join(sources)}")
        return lines

    def format(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def __str__(self) -> str:
        return self.format()


class CompileReport(list):
    """The reports of several kinds of passes from one pipeline run, in
    pipeline order (one :class:`LayerReport` per pass that ran).
    ``get(name)`` is one pass's report (rows of repeated runs concatenated);
    ``end_to_end`` as in LayerReport."""

    end_to_end: dict | None = None

    def get(self, pass_name: str) -> LayerReport | None:
        parts = [r for r in self if r.pass_name == pass_name]
        return type(parts[0])(row for p in parts for row in p) if parts else None

    def format(self) -> str:
        return "\n\n".join(f"{r.pass_name}:\n{r.format()}" for r in self) + format_end_to_end(self.end_to_end)

    def __str__(self) -> str:
        return self.format()


def combine_reports(reports: list) -> LayerReport | CompileReport | None:
    """``Module.report`` from the reports of the passes that ran, in order:
    None without any; the rows of one kind of report concatenated into that
    kind (several quantize passes give one QuantReport); a CompileReport when
    different kinds ran (e.g. sparsify, quantize and select_format).  A
    report whose ``informative`` is False (select_format keeping every weight
    dense) is left out."""
    reports = [r for r in reports if r is not None and getattr(r, "informative", True)]
    if not reports:
        return None
    if all(type(r) is type(reports[0]) for r in reports):
        return type(reports[0])(row for r in reports for row in r)
    return CompileReport(reports)


def end_to_end_error(samples: list, fp32_outputs: list, run, source: str) -> dict:
    """The whole graph's error on calibration samples: ``run(sample)`` (the
    compiled graph: a list of output arrays) against ``fp32_outputs[i]`` (the
    fp32 graph's outputs on sample i), per output and over all outputs
    together: {"source", "samples", "rel_l2", "cosine", "outputs": [{"name",
    "rel_l2", "cosine"}]}; output names come from ``run.output_names``."""
    from ..quantize import output_error

    got = [[np.asarray(a) for a in run(s)] for s in samples]
    per = []
    for j, name in enumerate(run.output_names):
        rel, cos = output_error(np.concatenate([r[j].ravel() for r in fp32_outputs]),
                                np.concatenate([g[j].ravel() for g in got]))
        per.append({"name": name, "rel_l2": rel, "cosine": cos})
    rel, cos = output_error(np.concatenate([a.ravel() for r in fp32_outputs for a in r]),
                            np.concatenate([a.ravel() for g in got for a in g]))
    return {"source": source, "samples": len(samples), "rel_l2": rel, "cosine": cos, "outputs": per}


def format_end_to_end(e2e: dict | None) -> str:
    """The end-to-end lines appended to a report's table ("" without them)."""
    if not e2e:
        return ""
    outs = "".join(f"\n  output {o['name']}: rel L2 {o['rel_l2']:.3e}, cosine {o['cosine']:.6f}"
                   for o in e2e["outputs"]) if len(e2e["outputs"]) > 1 else ""
    return (f"\nend to end on {e2e['source']}: rel L2 {e2e['rel_l2']:.3e}, cosine {e2e['cosine']:.6f} "
            f"(compiled outputs against fp32)" + outs)
