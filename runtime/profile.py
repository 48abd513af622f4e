"""Per-kernel profile of a compiled model (``Module.profile``): measured time per
kernel beside its static cost (bytes moved, FLOPs) from the manifest.

Deployment side: numpy only (no llvmlite, no compiler).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileRow:
    kernel: str               # kernel symbol, e.g. "k3_matmul"
    op: str                   # the op it runs ("copy" for an output copy)
    calls: int                # times it ran during the timed runs
    ms: float                 # median wall time of one call, milliseconds
    bytes: int | None         # bytes moved per call (manifest; None if unknown)
    flops: int | None         # FLOPs per call (manifest; None if unknown)

    @property
    def gbps(self) -> float | None:
        """Bytes moved per second, in GB/s (None without a cost or a time)."""
        return self.bytes / self.ms / 1e6 if self.bytes is not None and self.ms > 0 else None

    @property
    def gflops(self) -> float | None:
        return self.flops / self.ms / 1e6 if self.flops is not None and self.ms > 0 else None


class Profile(list):
    """A list of ProfileRow, one per kernel in run order, plus the run's context:
    ``runs``, ``threads``, ``target``, ``total_ms`` (median over runs of the sum of
    the kernel times) and ``wall_ms`` (median time of a whole call, seen from
    Python: the kernels plus argument checks, output allocation and, for
    riscv64, qemu start-up and file exchange)."""

    def __init__(self, rows, *, runs: int, threads: int, target: str, total_ms: float, wall_ms: float):
        super().__init__(rows)
        self.runs, self.threads, self.target = runs, threads, target
        self.total_ms, self.wall_ms = total_ms, wall_ms

    @staticmethod
    def from_times(kernels: list[dict], per_run_ns: list[list[int]], calls: list[int], *, threads: int,
                   target: str, wall_s: list[float]) -> "Profile":
        """Build from the manifest's kernel entries and ``per_run_ns[run][step]``."""
        rows = []
        for i, k in enumerate(kernels):
            name = k["name"]
            op = name.split("_", 1)[1] if name.startswith("k") and "_" in name else name
            ms = statistics.median(r[i] for r in per_run_ns) / 1e6 if per_run_ns else 0.0
            rows.append(ProfileRow(name, op, calls[i], ms, k.get("bytes"), k.get("flops")))
        total = statistics.median(sum(r) for r in per_run_ns) / 1e6 if per_run_ns else 0.0
        wall = statistics.median(wall_s) * 1e3 if wall_s else 0.0
        return Profile(rows, runs=len(per_run_ns), threads=threads, target=target, total_ms=total, wall_ms=wall)

    def format(self) -> str:
        """The rows as an aligned text table."""
        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        head = f"{'kernel':<24}{'op':<12}{'calls':>6}{'ms':>10}{'MB':>10}{'MFLOP':>11}{'GB/s':>8}{'GFLOP/s':>9}"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.kernel:<24}{r.op:<12}{r.calls:>6}{r.ms:>10.4f}"
                         f"{num(r.bytes and r.bytes / 1e6, '10.3f'):>10}{num(r.flops and r.flops / 1e6, '11.3f'):>11}"
                         f"{num(r.gbps, '8.2f'):>8}{num(r.gflops, '9.2f'):>9}")
        lines.append(f"total {self.total_ms:.4f} ms in kernels, {self.wall_ms:.4f} ms per call "
                     f"(median of {self.runs} runs, {self.threads} threads, {self.target})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


__all__ = ["Profile", "ProfileRow"]
