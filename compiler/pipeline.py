"""Pipeline strings and the pass manager.

    "fold_constants,dce"            two passes
    "fold_constants{limit=1024}"    a pass with options (its dataclass fields)

The pass manager verifies after every pass, says "(unchanged)" when a pass
did nothing, and can dump the IR after any or all passes as numbered files
(``000_input.sqkir``, ``001_fold_constants.sqkir``, ...) that parse back;
the compile driver continues the numbering with the codegen levels
(``CODEGEN_DUMPS``: the LLVM IR as lowered, after O3, and the assembly).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time

from ..ir.graph import Graph, same_data
from ..ir.text import save_ir
from ..ir.verify import verify
from .passes import PASSES, Context, Pass

# After the passes that rewrite weights (quantize, sparsify): choose each weight's
# storage format, drop dead nodes, fuse what one kernel can do.
TAIL = "select_format,dce,fuse"
DEFAULT_PIPELINE = "fold_constants," + TAIL
# Dump levels after the passes, in order, with their file suffixes (``dump_after`` names).
CODEGEN_DUMPS = (("llvm", ".ll"), ("llvm_opt", ".ll"), ("asm", ".s"))
# Files a dump writes; older ones are removed when a new dump starts, so a
# dump directory never mixes two compiles.
_DUMP_FILE = re.compile(r"\d{3}_([A-Za-z0-9_]+)(\.sqkir(\.npz)?|\.ll|\.s)")


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
    """Runs passes in order, verifying after each, dumping when asked.

    ``dump_after``: "all", a pass name, a comma-separated string of names or a
    list ("input" is the graph before any pass; ``codegen=True`` also accepts
    the ``CODEGEN_DUMPS`` levels, which the caller writes with ``dump_text``).
    ``progress``: a :class:`~sqk.compiler.progress.Progress` told each pass.
    ``context``: the :class:`~sqk.compiler.passes.Context` handed to every pass
    (calibration data, target; the passes' reports are filed in it), a new
    empty one by default: ``pm.context.reports`` after ``run``."""

    def __init__(self, passes: list[Pass], dump_after=None, dump_dir: str | None = None, log=None,
                 progress=None, codegen: bool = False, context: Context | None = None):
        self.passes = passes
        self.context = context if context is not None else Context()
        names = {p.name for p in passes}
        if isinstance(dump_after, str):
            dump_after = [d.strip() for d in dump_after.split(",") if d.strip()]
        self.dump_after = set(dump_after or ())
        levels = {name for name, _ in CODEGEN_DUMPS} if codegen else set()
        unknown = self.dump_after - names - levels - {"all", "input"}
        if unknown:
            raise PipelineError(f"dump_after names {', '.join(sorted(unknown))}, which the pipeline does not run "
                                f"({', '.join(p.name for p in passes) or 'no passes'})"
                                + (f"; dump levels: input, {', '.join(n for n, _ in CODEGEN_DUMPS)}" if levels else ""))
        self.dump_dir = dump_dir or ("sqk-dump" if self.dump_after else None)
        self.log = log  # a callable taking a line, or None for quiet
        self.progress = progress
        self._cleared = False
        self._last_dump = None   # (large constants, path) of the last graph dumped

    def wants(self, name: str) -> bool:
        """Whether the IR after ``name`` (a pass, "input" or a codegen level) is dumped."""
        return "all" in self.dump_after or name in self.dump_after

    def _open_dump_dir(self) -> None:
        os.makedirs(self.dump_dir, exist_ok=True)
        if not self._cleared:
            ours = set(PASSES) | {"input"} | {name for name, _ in CODEGEN_DUMPS}
            for f in os.listdir(self.dump_dir):
                m = _DUMP_FILE.fullmatch(f)
                if m and m.group(1) in ours:  # a user's "001_model.sqkir" stays
                    os.unlink(os.path.join(self.dump_dir, f))
            self._cleared = True

    def _dump(self, index: int, name: str, g: Graph):
        if not self.wants(name):
            return
        self._open_dump_dir()
        path = os.path.join(self.dump_dir, f"{index:03d}_{name}.sqkir")
        big = {k: v for k, v in g.constants.items() if v.size > _INLINE}
        last = self._last_dump
        if big and last and last[0].keys() == big.keys() and all(last[0][k] is v or same_data(last[0][k], v)
                                                                  for k, v in big.items()):
            # the weights are those of the previous dump (most passes leave them): its .npz is linked,
            # not written again, so a dump of every pass holds each version of the weights once
            with open(path, "w") as f:
                f.write(g.to_text(_INLINE))
            _link(last[1] + ".npz", path + ".npz")
        else:
            save_ir(g, path, _INLINE)
        self._last_dump = (big, path)

    def dump_text(self, level: str, text) -> str | None:
        """Write a codegen level's text (``text`` may be a callable, called only
        when the level is dumped), numbered after the passes; returns the path."""
        if not self.wants(level):
            return None
        index, suffix = next((len(self.passes) + 1 + i, sfx) for i, (name, sfx) in enumerate(CODEGEN_DUMPS)
                             if name == level)
        self._open_dump_dir()
        path = os.path.join(self.dump_dir, f"{index:03d}_{level}{suffix}")
        with open(path, "w") as f:
            f.write(text() if callable(text) else text)
        return path

    def run(self, graph: Graph) -> Graph:
        verify(graph)
        self._dump(0, "input", graph)
        for i, p in enumerate(self.passes, 1):
            if self.progress is not None:
                self.progress.update(f"pass {p.name}", i - 1, len(self.passes), "passes")
            t0 = time.perf_counter()
            old, before = graph, graph.to_text(0) if self.log else None   # printed only for the log
            graph = p.run(graph, self.context)
            verify(graph)
            if self.log:
                # the text with inline_limit=0 shows every constant as @name: compare their data too
                changed = graph is not old and (graph.to_text(0) != before or not _same_constants(old, graph))
                self.log(f"[{i:02d}] {p.spelling():<24} {(time.perf_counter() - t0) * 1e3:7.1f} ms"
                         + ("" if changed else "  (unchanged)"))
            self._dump(i, p.name, graph)
        return graph


_INLINE = 16  # constants of more elements go to the dump's .npz side table


def _link(src: str, dst: str) -> None:
    """``dst`` a hard link to ``src`` (a copy where the file system has none)."""
    if os.path.lexists(dst):
        os.unlink(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _same_constants(a: Graph, b: Graph) -> bool:
    ca = [n.attrs["value"] for n in a.nodes if n.op == "const"]
    cb = [n.attrs["value"] for n in b.nodes if n.op == "const"]
    return len(ca) == len(cb) and all(x is y or same_data(x, y) for x, y in zip(ca, cb))


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr)
