"""Sparse storage formats of a constant matmul weight W[K, N] (y = x @ W).

A format is a property of how a kernel reads the weight, not of its values:
``matmul`` and ``matmul_q`` carry it as the attribute ``sparse`` (default
"dense"), the weight constant keeps its logical (dense, zero-filled) values,
and the reference interpreter ignores the attribute.  Spellings, with rows k
along the reduction axis K and columns n along the outputs N, as the weight
is printed in the IR:

* ``dense``    every element stored;
* ``csr``      unstructured: the nonzeros of each output column n with their
               row indices k (compressed sparse rows of W transposed);
* ``bsrRxC``   R x C blocks (R rows along K, C columns along N, R and C
               dividing neither K nor N necessarily: edge blocks are padded),
               stored when any element is nonzero; R x C in ``BSR_BLOCKS``;
* ``nmN:M``    in every run of M consecutive rows k (aligned at multiples of
               M) of each column, at most N nonzeros (2:4 is N=2, M=4); the
               packed form stores exactly N values and their positions.

``holds(fmt, w)`` says why a format cannot represent a weight exactly (an
N:M format on a weight with more than N nonzeros in a run); the packers and
the ``select_format`` pass use it, so a forced format never drops values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .graph import IRError

BSR_BLOCKS = ((1, 4), (1, 8), (4, 1), (8, 1), (4, 4))
NM_MAX_M = 16
# Packed layouts' padding, defined here for the packers (codegen/sparse.py, sparse_nm.py) and the
# cost model that sizes them (compiler/passes/select_format.py) alike:
CSR_PAD = 8        # csr: entries per column padded to a multiple of this (one gather of 8 lanes)
NM_COLUMNS = 32    # nm (x86 layout): columns per packed block, N padded to a multiple of it


@dataclass(frozen=True)
class Format:
    kind: str       # "dense" | "csr" | "bsr" | "nm"
    r: int = 1      # bsr: block rows (along K)
    c: int = 1      # bsr: block columns (along N)
    n: int = 0      # nm: nonzeros kept per run
    m: int = 0      # nm: run length along K

    def __str__(self) -> str:
        if self.kind == "bsr":
            return f"bsr{self.r}x{self.c}"
        if self.kind == "nm":
            return f"nm{self.n}:{self.m}"
        return self.kind

    @property
    def dense(self) -> bool:
        return self.kind == "dense"


_SPELLING = re.compile(r"(dense|csr)|bsr(\d+)x(\d+)|nm(\d+):(\d+)")


def parse_format(spec) -> Format:
    """``"dense" | "csr" | "bsrRxC" | "nmN:M"`` -> Format; IRError names what is wrong."""
    if isinstance(spec, Format):
        return spec
    m = _SPELLING.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        raise IRError(f"sparse format {spec!r} does not parse: expected dense, csr, bsrRxC "
                      f"({', '.join(f'{r}x{c}' for r, c in BSR_BLOCKS)}) or nmN:M (e.g. nm2:4)")
    if m.group(1):
        return Format(m.group(1))
    if m.group(2):
        r, c = int(m.group(2)), int(m.group(3))
        if (r, c) not in BSR_BLOCKS:
            raise IRError(f"sparse format {spec!r}: block {r}x{c} is not supported; "
                          f"blocks are {', '.join(f'{a}x{b}' for a, b in BSR_BLOCKS)}")
        return Format("bsr", r=r, c=c)
    n, mm = int(m.group(4)), int(m.group(5))
    if not (1 <= n < mm <= NM_MAX_M):
        raise IRError(f"sparse format {spec!r}: N:M needs 1 <= N < M <= {NM_MAX_M}, got N={n}, M={mm}")
    return Format("nm", n=n, m=mm)


def nm_counts(w: np.ndarray, m: int) -> np.ndarray:
    """[ceil(K/m), N] nonzeros per aligned run of m rows of each column."""
    k, n = w.shape
    nz = np.zeros((-(-k // m) * m, n), bool)
    nz[:k] = w != 0
    return nz.reshape(-(-k // m), m, n).sum(axis=1)


def holds(fmt: Format, w: np.ndarray) -> str | None:
    """None when ``fmt`` represents the 2-D weight ``w`` exactly, else why not."""
    if fmt.kind != "nm":
        return None
    counts = nm_counts(np.asarray(w), fmt.m)
    worst = int(counts.max(initial=0))
    if worst <= fmt.n:
        return None
    run, col = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return (f"{fmt} keeps at most {fmt.n} nonzeros in every {fmt.m} rows of a column, but rows "
            f"{run * fmt.m}..{run * fmt.m + fmt.m - 1} of column {col} hold {worst}")


def density(w: np.ndarray) -> float:
    """Fraction of nonzero elements (1.0 for an empty weight)."""
    w = np.asarray(w)
    return float(np.count_nonzero(w)) / w.size if w.size else 1.0


def block_density(w: np.ndarray, r: int, c: int) -> float:
    """Fraction of r x c blocks (edge blocks padded with zeros) holding a nonzero."""
    w = np.asarray(w)
    k, n = w.shape
    if w.size == 0:
        return 1.0
    kb, nb = -(-k // r), -(-n // c)
    nz = np.zeros((kb * r, nb * c), bool)
    nz[:k, :n] = w != 0
    return float(nz.reshape(kb, r, nb, c).any(axis=(1, 3)).mean())
