"""The graph IR: typed values, nodes, and graphs.

A Graph owns an ordered list of nodes (topological order), its input values
and its output values.  Values and nodes are immutable; passes build new
graphs.  networkx is only an analysis view (``Graph.to_networkx``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .dtypes import DType, dtype as as_dtype


class IRError(ValueError):
    """A malformed graph, op use or IR text."""


NAME = re.compile(r"[A-Za-z0-9_.]+")  # what the text form accepts after % and @
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1   # dims, element counts, byte sizes and int attributes


def check_name(name, what: str) -> str:
    """``name`` if the text form can print it and parse it back, else IRError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise IRError(f"{what} name {name!r} cannot be written in the IR text: "
                      f"use letters, digits, '_' and '.'")
    return name


@dataclass(frozen=True)
class TensorType:
    """Element type and static shape of a tensor."""

    dtype: DType
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise IRError(f"negative dimension in shape {shape}")
        # sizes are int64 everywhere below (numpy, the kernels, the runtime): refuse more here, not at compile
        big = [d for d in shape if d > INT64_MAX]
        if big:
            raise IRError(f"dimension {big[0]} in shape {shape} is beyond int64")
        n = math.prod(shape)
        if max(n, self.dtype.nbytes(n)) > INT64_MAX:
            raise IRError(f"{self.dtype}[{','.join(map(str, shape))}] holds {n} elements "
                          f"({self.dtype.nbytes(n)} bytes), beyond int64")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.size)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


class Value:
    """An SSA value: a name unique in its graph and a type.  Compared by identity."""

    __slots__ = ("name", "type")

    def __init__(self, name: str, type: TensorType):
        self.name = name
        self.type = type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(frozen=True, eq=False)
class Node:
    """One operation.  ``attrs`` are normalized by the op's schema; a ``const``
    node keeps its numpy array in ``attrs["value"]``."""

    op: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRError(f"node {self.op} has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __repr__(self) -> str:
        outs = ", ".join("%" + v.name for v in self.outputs)
        ins = ", ".join("%" + v.name for v in self.inputs)
        return f"{outs} = {self.op}({ins})"


class Graph:
    """A function from named inputs to outputs, as an ordered list of nodes."""

    def __init__(self, name: str, inputs: Iterable[Value], nodes: Iterable[Node],
                 outputs: Iterable[Value]):
        self.name = name
        self.inputs = list(inputs)
        self.nodes = list(nodes)
        self.outputs = list(outputs)

    # --- views -----------------------------------------------------------
    @property
    def constants(self) -> dict[str, np.ndarray]:
        """Name -> array of every ``const`` node (the side table of the text form)."""
        return {n.output.name: n.attrs["value"] for n in self.nodes if n.op == "const"}

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def values(self) -> list[Value]:
        return list(self.inputs) + [v for n in self.nodes for v in n.outputs]

    def to_networkx(self):
        """A networkx DiGraph over nodes (by index), edges labelled by value."""
        import networkx as nx

        g = nx.DiGraph()
        prod = {v: i for i, n in enumerate(self.nodes) for v in n.outputs}
        for i, n in enumerate(self.nodes):
            g.add_node(i, node=n)
            for v in n.inputs:
                if v in prod:
                    g.add_edge(prod[v], i, value=v)
        return g

    def with_nodes(self, nodes: Iterable[Node], outputs: Iterable[Value] | None = None) -> "Graph":
        return Graph(self.name, self.inputs, nodes, self.outputs if outputs is None else outputs)

    # --- text ------------------------------------------------------------
    def to_text(self, inline_limit: int | None = 16) -> str:
        """The text form; constants with more than ``inline_limit`` elements
        print as ``@name`` references to ``self.constants`` (None: inline all)."""
        from .text import print_graph

        return print_graph(self, inline_limit=inline_limit)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"<Graph @{self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes>"

    # --- structural equality -------------------------------------------
    def _canonical(self):
        from .text import print_graph

        return print_graph(self, inline_limit=0, canonical=True)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        if self._canonical() != other._canonical():
            return False
        ca = [n.attrs["value"] for n in self.nodes if n.op == "const"]
        cb = [n.attrs["value"] for n in other.nodes if n.op == "const"]
        return all(same_data(a, b) for a, b in zip(ca, cb))

    __hash__ = None  # mutable container


def same_data(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal constants: NaN equals NaN, but -0.0 differs from 0.0 (it changes 1/x)."""
    if a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
        return False
    if a.dtype.kind != "f":
        return True
    return np.array_equal(np.signbit(a) & ~np.isnan(a), np.signbit(b) & ~np.isnan(b))
