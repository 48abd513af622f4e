"""Target descriptions: triple, CPU, features and vector width.

The host is read from llvmlite (never assumed), so an artifact records what it
was compiled for and the loader can refuse a machine that lacks it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import llvmlite.binding as llvm


@dataclass(frozen=True)
class Target:
    name: str              # "host" or "riscv64"
    triple: str
    cpu: str
    features: str          # LLVM feature string, e.g. "+avx2,+fma,-avx512f"
    vector_bits: int       # width of the fixed-width vectors kernels are written with (0: scalar loops)
    data_layout: str = ""

    @property
    def enabled_features(self) -> list[str]:
        return sorted(f[1:] for f in self.features.split(",") if f.startswith("+"))

    @property
    def has_vector(self) -> bool:
        return self.name != "riscv64" or "+v" in self.features.split(",")

    def lanes(self, bits: int) -> int:
        """Vector lanes for elements of ``bits`` bits (1: write scalar code).

        riscv64 kernels are scalar loops, with or without V: with V, LLVM's loop
        vectorizer makes them vector-length agnostic (scalable vectors, a
        ``vsetvli`` per strip with the elements left as AVL), so they use the
        whole register of whatever VLEN the core has."""
        return max(1, self.vector_bits // bits) if self.has_vector else 1

    @functools.cached_property
    def machine(self) -> llvm.TargetMachine:
        llvm.initialize_all_targets()
        llvm.initialize_all_asmprinters()
        t = llvm.Target.from_triple(self.triple)
        return t.create_target_machine(cpu=self.cpu, features=self.features, opt=3, reloc="pic",
                                       codemodel="default",
                                       abiname="lp64d" if self.name == "riscv64" else "")

    def to_json(self) -> dict:
        return {"name": self.name, "triple": self.triple, "cpu": self.cpu,
                "features": self.enabled_features, "vector_bits": self.vector_bits,
                "vector": self.has_vector}


@functools.lru_cache(maxsize=None)
def host_target() -> Target:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    feats = llvm.get_host_cpu_features()
    fs = feats.flatten()
    return Target("host", llvm.get_process_triple(), llvm.get_host_cpu_name(), fs, x86_vector_bits(fs))


def x86_vector_bits(features: str) -> int:
    """The vector width kernels use on x86 with these LLVM features."""
    on = {f[1:] for f in features.split(",") if f.startswith("+")}
    return 512 if "avx512f" in on else 256 if "avx2" in on or "avx" in on else 128


RISCV_TRIPLE = "riscv64-unknown-linux-gnu"


@functools.lru_cache(maxsize=None)
def riscv64_target(vector: bool = True) -> Target:
    # rv64gc (+v).  Kernels are scalar loops here (vector_bits 0, lanes() 1):
    # with V, LLVM vectorizes them length-agnostically (Zvl128b, implied by V,
    # is all it assumes: a short loop it vectorizes at a fixed width instead
    # stays correct for any VLEN >= 128).
    feats = "+m,+a,+f,+d,+c,+zicsr,+zifencei" + (",+v" if vector else ",-v")
    return Target("riscv64", RISCV_TRIPLE, "generic-rv64", feats, 0)


def get_target(name: str, **options) -> Target:
    """``"host"``, ``"riscv64"`` (rv64gcv) or ``"riscv64-scalar"`` (rv64gc)."""
    if name == "host":
        return host_target()
    if name == "riscv64":
        return riscv64_target(vector=options.get("vector", True))
    if name == "riscv64-scalar":
        return riscv64_target(vector=False)
    raise ValueError(f"unknown target {name!r}; expected host, riscv64 or riscv64-scalar")
