"""Shared test helpers."""
from __future__ import annotations

import os
import shutil

import pytest

RISCV_TOOLS = ("riscv64-linux-gnu-gcc", "qemu-riscv64")


def require_riscv() -> dict[str, str]:
    """Skip the calling test when the RISC-V cross toolchain or qemu-user is missing.

    Returns ``{"gcc": path, "qemu": path}``. With ``SQK_REQUIRE_RISCV=1`` in
    the environment (CI on a machine that has them) a missing tool is a test
    failure instead of a skip, so RISC-V coverage cannot silently vanish.
    """
    found = {tool: shutil.which(tool) for tool in RISCV_TOOLS}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        msg = (f"RISC-V tools not found: {', '.join(missing)} "
               "(apt-get install gcc-riscv64-linux-gnu qemu-user)")
        if os.environ.get("SQK_REQUIRE_RISCV") == "1":
            pytest.fail(msg + "; SQK_REQUIRE_RISCV=1 requires them", pytrace=False)
        pytest.skip(msg)
    return {"gcc": found["riscv64-linux-gnu-gcc"], "qemu": found["qemu-riscv64"]}


@pytest.fixture(scope="session")
def riscv_tools() -> dict[str, str]:
    """Fixture form of :func:`require_riscv`."""
    return require_riscv()


@pytest.fixture(autouse=True)
def _host_avx2(request, monkeypatch):
    """Tests marked host_avx2 (harness.AVX2_PARAMS) see the host without AVX-512 and VNNI."""
    if request.node.get_closest_marker("host_avx2"):
        from harness import host_avx2
        host_avx2(monkeypatch)
