"""Pipeline strings and the pass manager.

    "fold_constants,dce"            two passes
    "fold_constants{limit=1024}"    a pass with options (its dataclass fields)

The pass manager verifies after every pass, says "(unchanged)" when a pass
did nothing, and can dump the IR after any or all passes as numbered files
(``000_input.sqkir``, ``001_fold_constants.sqkir``, ...) that parse back.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

from ..ir.graph import Graph, same_data
from ..ir.text import save_ir
from ..ir.verify import verify
from .passes import PASSES, Pass

DEFAULT_PIPELINE = "fold_constants,dce"


class PipelineError(ValueError):
    pass


def _coerce(value: str, ty, where: str):
    try:
        if ty in (int, "int"):
            return int(value)
        if ty in (float, "float"):
            return float(value)
        if ty in (bool, "bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return value
    except ValueError:
        raise PipelineError(f"{where}: {value!r} is not a valid {getattr(ty, '__name__', ty)}") from None


_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\{([^{}]*)\})?\s*")


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse ``"name{k=v,...},name"`` into pass objects (clear errors on typos).
    An empty or blank string is the empty pipeline."""
    passes = []
    pos = 0
    while spec.strip():
        m = _ITEM.match(spec, pos)
        if not m:
            raise PipelineError(f"malformed pipeline {spec!r} at column {pos + 1}: expected a pass name")
        name, opts = m.group(1), (m.group(2) or "").strip()
        cls = PASSES.get(name)
        if cls is None:
            raise PipelineError(f"unknown pass {name!r} in pipeline {spec!r}; passes: {', '.join(sorted(PASSES))}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for item in opts.split(",") if opts else ():
            k, eq, v = (t.strip() for t in item.partition("="))
            if k not in fields:
                raise PipelineError(f"pass {name}: unknown option {k!r}; options: {', '.join(fields) or 'none'}")
            if not eq or not v:
                raise PipelineError(f"pass {name}: option {k} needs a value ({k}=...)")
            if k in kwargs:
                raise PipelineError(f"pass {name}: option {k} is given twice")
            kwargs[k] = _coerce(v, fields[k].type, f"pass {name} option {k}")
        passes.append(cls(**kwargs))
        pos = m.end()
        if pos == len(spec):
            break
        if spec[pos] == "{":
            raise PipelineError(f"malformed pipeline {spec!r} at column {pos + 1}: '{{' without a matching '}}'")
        if spec[pos] != ",":
            raise PipelineError(f"malformed pipeline {spec!r} at column {pos + 1}: expected ',' after {name}")
        pos += 1
    return passes


class PassManager:
    """Runs passes in order, verifying after each, dumping when asked."""

    def __init__(self, passes: list[Pass], dump_after=None, dump_dir: str | None = None, log=None):
        self.passes = passes
        names = {p.name for p in passes}
        self.dump_after = set() if not dump_after else ({"all"} if dump_after == "all" else
                                                        set([dump_after] if isinstance(dump_after, str) else dump_after))
        unknown = self.dump_after - names - {"all", "input"}
        if unknown:
            raise PipelineError(f"dump_after names {', '.join(sorted(unknown))}, which the pipeline does not run "
                                f"({', '.join(p.name for p in passes) or 'no passes'})")
        self.dump_dir = dump_dir or ("sqk-dump" if self.dump_after else None)
        self.log = log  # a callable taking a line, or None for quiet

    def _dump(self, index: int, name: str, g: Graph):
        if "all" in self.dump_after or name in self.dump_after:
            os.makedirs(self.dump_dir, exist_ok=True)
            save_ir(g, os.path.join(self.dump_dir, f"{index:03d}_{name}.sqkir"))

    def run(self, graph: Graph) -> Graph:
        verify(graph)
        self._dump(0, "input", graph)
        for i, p in enumerate(self.passes, 1):
            t0 = time.perf_counter()
            old, before = graph, graph.to_text(0)
            graph = p.run(graph)
            verify(graph)
            # the text with inline_limit=0 shows every constant as @name: compare their data too
            changed = graph is not old and (graph.to_text(0) != before or not _same_constants(old, graph))
            if self.log:
                self.log(f"[{i:02d}] {p.spelling():<24} {(time.perf_counter() - t0) * 1e3:7.1f} ms"
                         + ("" if changed else "  (unchanged)"))
            self._dump(i, p.name, graph)
        return graph


def _same_constants(a: Graph, b: Graph) -> bool:
    ca = [n.attrs["value"] for n in a.nodes if n.op == "const"]
    cb = [n.attrs["value"] for n in b.nodes if n.op == "const"]
    return len(ca) == len(cb) and all(x is y or same_data(x, y) for x, y in zip(ca, cb))


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr)
