"""Passes: each a frozen dataclass whose fields are its options, registered by
name, with ``run(graph) -> graph``.  Pipelines spell them as
``"fold_constants,dce"`` or ``"name{option=value,...}"``."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...ir.graph import Graph

PASSES: dict[str, type] = {}


class Pass:
    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> Graph:  # pragma: no cover - interface
        raise NotImplementedError

    def spelling(self) -> str:
        opts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def register(cls):
    """Class decorator: make ``cls`` a frozen dataclass pass named ``cls.name``."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    PASSES[cls.name] = cls
    return cls


from . import simplify  # noqa: E402,F401  (registers fold_constants, dce)
from . import quantize  # noqa: E402,F401  (registers quantize)
from . import sparsify  # noqa: E402,F401  (registers sparsify)
from . import select_format  # noqa: E402,F401  (registers select_format)
from . import fuse  # noqa: E402,F401  (registers fuse)
from . import fold_lookup  # noqa: E402,F401  (registers fold_lookup_experts)
from . import sparse_activations  # noqa: E402,F401  (registers sparse_activations)
