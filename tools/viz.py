"""A picture of a graph: Graphviz DOT text, rendered to SVG/PNG/PDF by ``dot``.

    to_dot(g)                       DOT text (needs nothing)
    write(g, "graph.svg")           by extension: .dot/.gv, .svg/.png/.pdf (Graphviz), .html

One box per node with its op, non-default attributes, output type and output
bytes; inputs (green), outputs (blue) and constants (grey, with the bytes
they are stored in: i4/i8 codes, packed sparse formats) are drawn apart.  A
node whose attribute is a sub-Graph (``fused`` and its ``body``) is drawn as
a cluster holding the body, its parameters wired to the fused node's inputs.
"""
from __future__ import annotations

import html
import os
import shutil
import subprocess

from ..ir.graph import Graph, Value


class VizError(RuntimeError):
    """Graphviz is missing or failed, or the output kind is unknown."""


RENDERED = ("svg", "png", "pdf")     # formats made by Graphviz's dot
TEXT = ("dot", "gv")


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _q(s: str) -> str:
    """A DOT quoted string; newlines become centred line breaks."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attr_text(node) -> str:
    """Attributes that differ from the op's defaults, short ones only (a box is not a dump)."""
    from ..ir.ops import OPS

    schema = getattr(OPS.get(node.op), "attrs", {})
    parts = []
    for k, v in node.attrs.items():
        if k == "value" or isinstance(v, Graph) or hasattr(v, "shape"):
            continue
        a = schema.get(k)
        if a is not None and _same(getattr(a, "default", None), v):
            continue
        text = f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        if len(text) <= 32:
            parts.append(text)
    return " ".join(parts)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays and other values without a plain ==
        return False


def weight_formats(graph: Graph) -> dict[Value, str]:
    """value -> the sparse format its reader stores it in (the ``sparse``
    attribute of a matmul/matmul_q reading it as weights), through fused bodies."""
    out: dict[Value, str] = {}
    for n in graph.nodes:
        fmt = n.attrs.get("sparse", "dense")
        if fmt != "dense" and len(n.inputs) > 1:
            out[n.inputs[1]] = fmt
        for body in (v for v in n.attrs.values() if isinstance(v, Graph)):
            inner = weight_formats(body)
            for outer, param in zip(n.inputs, body.inputs):
                if param in inner:
                    out[outer] = inner[param]
    return out


def stored_sizes(graph: Graph, target=None) -> dict[Value, int]:
    """Bytes each constant takes in the artifact: packed by its kernel when it
    is (quantized codes, sparse formats; as ``target`` lays them out, None: the
    host), else its type's bytes."""
    sizes = {n.output: n.output.type.nbytes for n in graph.nodes if n.op == "const"}
    try:
        from ..codegen.lower import pack_constants

        sizes.update({v: len(b) for v, b in pack_constants(graph, target).items()})
    except Exception:  # no codegen for a node yet: the picture still shows the logical sizes
        pass
    return sizes


class _Dot:
    def __init__(self, graph: Graph, target=None):
        self.lines: list[str] = []
        self.edges: list[str] = []  # written last, at the top level: an edge inside a cluster would pull
        self.count = 0              # its other end into that cluster
        self.formats = weight_formats(graph)
        self.sizes = stored_sizes(graph, target)

    def new_id(self) -> str:
        self.count += 1
        return f"n{self.count}"

    def node(self, nid: str, label: str, indent: str, **style) -> None:
        attrs = ", ".join([f"label={_q(label)}"] + [f"{k}={_q(str(v))}" for k, v in style.items()])
        self.lines.append(f"{indent}{nid} [{attrs}];")

    def edge(self, a: str, b: str) -> None:
        self.edges.append(f"  {a} -> {b};")

    def body(self, graph: Graph, source: dict[Value, str], indent: str) -> dict[Value, str]:
        """Draw ``graph``'s nodes; ``source`` maps values already drawn (inputs)
        to their node ids.  Returns the ids of every value produced."""
        for n in graph.nodes:
            if n.op == "const":
                v = n.output
                fmt = self.formats.get(v)
                label = (f"const @{v.name}\n{v.type}" + (f"\nsparse {fmt}" if fmt else "")
                         + f"\n{fmt_bytes(self.sizes.get(v, v.type.nbytes))}")
                nid = self.new_id()
                self.node(nid, label, indent, shape="note", style="filled", fillcolor="#e8e8e8",
                          fontsize="9")
                source[v] = nid
                continue
            sub = [v for v in n.attrs.values() if isinstance(v, Graph)]
            attrs = _attr_text(n)
            types = "\n".join(f"{v.type}  {fmt_bytes(v.type.nbytes)}" for v in n.outputs)
            names = ", ".join(f"%{v.name}" for v in n.outputs)
            label = f"{names} = {n.op}" + (f"\n{attrs}" if attrs else "") + f"\n{types}"
            nid = self.new_id()
            if sub:
                self.cluster(n, sub, nid, label, source, indent)
            else:
                self.node(nid, label, indent, shape="box", style="rounded")
                for v in n.inputs:
                    if v in source:
                        self.edge(source[v], nid)
            for v in n.outputs:
                source[v] = nid
        return source

    def cluster(self, n, subs, nid, label, source, indent) -> None:
        """A node holding sub-graphs: a cluster with each body, the body's
        parameters fed by the node's inputs, its results gathered by the node."""
        cid = self.new_id()
        self.lines.append(f"{indent}subgraph cluster_{cid} {{")
        inner = indent + "  "
        names = [k for k, v in n.attrs.items() if isinstance(v, Graph)]
        self.lines.append(f"{inner}label={_q(f'{n.op} ' + ', '.join(f'{k} @{g.name}' for k, g in zip(names, subs)))};")
        self.lines.append(f'{inner}style="filled,rounded"; fillcolor="#fff8dc"; color="#c8a000";')
        self.node(nid, label, inner, shape="box", style="rounded,bold")
        for body in subs:
            inside: dict[Value, str] = {}
            for i, p in enumerate(body.inputs):
                pid = self.new_id()
                self.node(pid, f"%{p.name}", inner, shape="plaintext", fontsize="9")
                inside[p] = pid
                if i < len(n.inputs) and n.inputs[i] in source:
                    self.edge(source[n.inputs[i]], pid)
            # values from outside that a body reads without a parameter (not valid IR, but draw it)
            inside.update({v: i for v, i in source.items() if v not in inside})
            produced = self.body(body, inside, inner)
            for v in body.outputs:
                if v in produced:
                    self.edge(produced[v], nid)
        self.lines.append(f"{indent}}}")


def to_dot(graph: Graph, target=None) -> str:
    """Graphviz DOT text of ``graph`` (see the module docstring); constants' sizes as
    ``target`` stores them (None: the host)."""
    d = _Dot(graph, target)
    d.lines += [f"digraph {_q(graph.name)} {{",
                f"  label={_q(f'@{graph.name}')}; labelloc=t; rankdir=TB;",
                '  node [fontname="Helvetica", fontsize=10];',
                '  edge [color="#555555"];']
    source: dict[Value, str] = {}
    for v in graph.inputs:
        nid = d.new_id()
        d.node(nid, f"input %{v.name}\n{v.type}\n{fmt_bytes(v.type.nbytes)}", "  ",
               shape="invhouse", style="filled", fillcolor="#d4f4d4")
        source[v] = nid
    d.body(graph, source, "  ")
    for j, v in enumerate(graph.outputs):
        nid = d.new_id()
        d.node(nid, f"output {j}: %{v.name}\n{v.type}", "  ", shape="house", style="filled", fillcolor="#d4e4f8")
        if v in source:
            d.edge(source[v], nid)
    d.lines += d.edges + ["}"]
    return "\n".join(d.lines) + "\n"


def have_dot() -> bool:
    return shutil.which("dot") is not None


def render(dot_text: str, fmt: str) -> bytes:
    """``dot_text`` rendered by Graphviz (``fmt``: svg, png, pdf)."""
    exe = shutil.which("dot")
    if exe is None:
        raise VizError(f"rendering {fmt} needs Graphviz's 'dot', which is not on PATH: write a .dot or .html "
                       "file instead, or install it (apt-get install graphviz)")
    r = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True)
    if r.returncode != 0:
        raise VizError(f"dot -T{fmt} failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def to_html(graph: Graph, dot_text: str | None = None) -> str:
    """A page with the SVG picture (or, without Graphviz, the DOT text and a
    note saying how to get the picture)."""
    dot_text = dot_text or to_dot(graph)
    title = html.escape(f"sqk: @{graph.name}")
    n_ops = sum(n.op != "const" for n in graph.nodes)
    summary = (f"{len(graph.inputs)} inputs, {n_ops} ops, {len(graph.nodes) - n_ops} constants, "
               f"{len(graph.outputs)} outputs")
    if have_dot():
        svg = render(dot_text, "svg").decode()
        picture = svg[svg.index("<svg"):]
    else:
        picture = ("<p><b>Graphviz's <code>dot</code> was not found</b>, so this page shows the graph as DOT "
                   "text; install it (<code>apt-get install graphviz</code>) for the picture.</p>"
                   f"<pre>{html.escape(dot_text)}</pre>")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            "<style>body{font-family:sans-serif;margin:1em} svg{max-width:100%;height:auto}</style></head>\n"
            f"<body><h1>{title}</h1><p>{summary}</p>\n{picture}\n"
            f"<details><summary>DOT source</summary><pre>{html.escape(dot_text)}</pre></details>\n"
            "</body></html>\n")


def write(graph: Graph, path: str, target=None) -> str:
    """Write the picture of ``graph`` to ``path``, its kind chosen by the
    extension; returns the kind written."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in TEXT + RENDERED + ("html", "htm"):
        raise VizError(f"{path}: unknown picture kind {ext!r}; use .svg, .png, .pdf, .dot or .html")
    dot_text = to_dot(graph, target)
    data = (dot_text.encode() if ext in TEXT else to_html(graph, dot_text).encode() if ext in ("html", "htm")
            else render(dot_text, ext))
    with open(path, "wb") as f:
        f.write(data)
    return ext
