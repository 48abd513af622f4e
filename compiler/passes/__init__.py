"""Passes: each a frozen dataclass whose fields are its options, registered by
name, with ``run(graph, ctx) -> graph``.  Pipelines spell them as
``"fold_constants,dce"`` or ``"name{option=value,...}"``.

What a pass needs beyond the graph and its options comes in the
:class:`Context` the PassManager hands to every pass of one run: the
calibration data, the target description, and where a pass files its report.
Passes stay stateless values (a pipeline can run twice).

A field is an option everywhere at once: in the pipeline string, and for the
passes with a shorthand (``compiler/shorthand.py``: quantize, sparsify,
select_format) as a ``sqk.compile`` keyword and a ``sqk compile`` flag.
:func:`option` gives a field its help text, choices, and a different public
keyword or flag where the field's name would collide.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...ir.graph import Graph

PASSES: dict[str, type] = {}


@dataclasses.dataclass
class Context:
    """Shared by the passes of one pipeline run (one per compile).

    ``calibration``: a :class:`~sqk.compiler.calibration.Calibration` (each
    layer's fp32 inputs over the calibration samples, collected once) or None;
    ``target``: the codegen Target description being compiled for, or None
    (passes read it, never import codegen); ``reports``: (pass, report) in
    the order the passes filed them (:meth:`add_report`)."""

    calibration: Any = None
    target: Any = None
    reports: list = dataclasses.field(default_factory=list)

    def add_report(self, p: Pass, report) -> None:
        self.reports.append((p, report))

    def report_of(self, p: Pass):
        """The report pass ``p`` (this object) filed in this run, or None."""
        return next((r for q, r in reversed(self.reports) if q is p), None)


class Pass:
    name: ClassVar[str] = ""
    # the pass reads Context.calibration (compile(calibration_data=...) needs such a pass)
    reads_calibration: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:  # pragma: no cover - interface
        raise NotImplementedError

    def spelling(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def option(default, help: str = "", *, choices=None, keyword: str | None = None, flag: str | None = None,
           repeat: bool = False):
    """A pass option (a dataclass field) with its help text and ``choices``;
    ``keyword`` / ``flag`` name it as a ``compile()`` keyword / CLI flag where
    the field name would collide (default: the field name, ``--field-name``;
    ``flag=""`` keeps it off the command line); ``repeat``: the flag may be
    given several times, the values joined with '|'."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "keyword": keyword, "flag": flag,
        "repeat": repeat})


def register(cls):
    """Class decorator: make ``cls`` a frozen dataclass pass named ``cls.name``."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    PASSES[cls.name] = cls
    return cls


from . import simplify  # noqa: E402,F401  (registers fold_constants, dce)
from . import quantize  # noqa: E402,F401  (registers quantize)
from . import sparsify  # noqa: E402,F401  (registers sparsify)
from . import select_format  # noqa: E402,F401  (registers select_format, and winograd which it runs)
from . import fuse  # noqa: E402,F401  (registers fuse)
from . import fold_lookup  # noqa: E402,F401  (registers fold_lookup_experts)
from . import sparse_activations  # noqa: E402,F401  (registers sparse_activations)
