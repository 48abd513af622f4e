"""Per-layer reports of the passes that change weights (quantize, sparsify,
select_format), and how ``compile()`` combines them into ``Module.report``.

A pass records its report on itself (``self.report``) as a side channel the
driver reads after the pipeline ran (see passes/quantize.py).  Every report
is a :class:`LayerReport`: a list of row dicts, one per weight, each with at
least ``layer`` (the weight constant's name), ``shape`` and ``status``, and a
``format()`` that prints a text table.  :func:`combine_reports` turns the
reports of one pipeline run into ``Module.report``.
"""
from __future__ import annotations

from typing import ClassVar


class LayerReport(list):
    """Rows (dicts) of one pass, one per weight: ``layer``, ``shape``,
    ``status`` and the pass's own columns.  ``pass_name`` names the pass."""

    pass_name: ClassVar[str] = ""

    def layers(self) -> list[str]:
        return [r["layer"] for r in self]

    def row(self, layer: str) -> dict:
        """The row of weight ``layer`` (KeyError when the pass did not report it)."""
        for r in self:
            if r["layer"] == layer:
                return r
        raise KeyError(f"{self.pass_name or 'report'}: no row for weight {layer!r}; rows: {', '.join(self.layers())}")

    def format(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def __str__(self) -> str:
        return self.format()


class CompileReport(list):
    """The reports of several kinds of passes from one pipeline run, in
    pipeline order (one :class:`LayerReport` per pass that ran).
    ``get(name)`` is one pass's report (rows of repeated runs concatenated)."""

    def get(self, pass_name: str) -> LayerReport | None:
        parts = [r for r in self if r.pass_name == pass_name]
        return type(parts[0])(row for p in parts for row in p) if parts else None

    def format(self) -> str:
        return "\n\n".join(f"{r.pass_name}:\n{r.format()}" for r in self)

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
