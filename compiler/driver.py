"""compile(): graph -> passes -> memory plan -> LLVM -> native code -> artifact.

The whole pipeline as one straight function; each step is a call into the
module that owns it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from .. import __version__
from ..ir.graph import Graph
from ..ir.verify import verify
from ..runtime.module import ARTIFACT_FORMAT, Module, cpuinfo_name, host_cpu_flags, sha256_file
from .memory import plan_memory
from .passes.quantize import Quantize, QuantReport
from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline


def compile(graph: Graph, target: str = "host", pipeline: str | None = None, dump_after=None,
            dump_dir: str | None = None, threads: int | None = None, vlen: int | None = None,
            log=None, quantize: str | None = None, group: int | None = None, scheme: str | None = None,
            scale_dtype: str | None = None, skip=None, max_error: float | None = None,
            activations: str | None = None, calibration: str | None = None, calibration_data=None) -> Module:
    """Compile ``graph`` for ``target`` ("host", "riscv64", "riscv64-scalar").

    ``pipeline`` is a pass string (default ``"fold_constants,dce"``);
    ``dump_after`` ("all", a pass name or a list) writes numbered IR files into
    ``dump_dir``; ``threads`` fixes the runtime's thread count (default: all
    cores, or $SQK_NUM_THREADS); ``vlen`` is the vector length qemu emulates
    for riscv64.  Returns a loaded Module backed by a temporary artifact
    directory; ``Module.save(path)`` keeps it.

    ``quantize="int8"|"int4"`` (with ``group``, ``scheme``, ``scale_dtype``,
    ``skip`` (a name or a list of weight names), ``max_error``,
    ``activations``, ``calibration``) is shorthand for the pipeline
    ``fold_constants,quantize{weights=...,...},dce`` (see
    :func:`quantize_pipeline`); giving ``pipeline`` as well is an error.
    ``calibration_data=[{input: array}, ...]`` feeds every quantize pass's
    accuracy report.  ``Module.report`` is that report (None without a
    quantize pass).
    """
    from ..codegen.emit import link, object_code
    from ..codegen.lower import lower, pack_constants
    from ..codegen.target import get_target

    if not isinstance(graph, Graph):
        raise TypeError(f"compile() takes a sqk.Graph, got {type(graph).__name__}")
    tgt = get_target(target)
    qopts = dict(group=group, scheme=scheme, scale_dtype=scale_dtype, skip=skip, max_error=max_error,
                 activations=activations, calibration=calibration)
    if quantize is not None:
        if pipeline is not None:
            raise PipelineError(f"give either pipeline= or quantize=, not both (quantize={quantize!r} means "
                                f"pipeline={quantize_pipeline(quantize, **qopts)!r}; add the quantize pass there)")
        spec = quantize_pipeline(quantize, **qopts)
    else:
        given = [k for k, v in qopts.items() if v is not None]
        if given:
            raise PipelineError(f"{', '.join(given)}= only apply with quantize=\"int8\" or \"int4\"")
        spec = DEFAULT_PIPELINE if pipeline is None else pipeline
    passes = parse_pipeline(spec)
    quant = [i for i, p in enumerate(passes) if isinstance(p, Quantize)]
    if calibration_data is not None:
        if not quant:
            raise PipelineError("calibration_data= needs a quantize pass (quantize=... or one in pipeline=)")
        for i in quant:
            passes[i] = passes[i].with_calibration(calibration_data)
    pm = PassManager(passes, dump_after=dump_after, dump_dir=dump_dir, log=log)
    g = pm.run(verify(graph))
    report = None
    for i in quant:  # each quantize pass records its report on itself (see passes/quantize.py)
        report = QuantReport((report or []) + list(passes[i].report or []))
    plan = plan_memory(g, pack_constants(g))
    t0 = time.perf_counter()
    module, steps = lower(g, plan.buffers, plan.arena_bytes, plan.const_bytes, tgt, sizes=plan.const_sizes)
    llvm_ir = str(module)
    code = link(object_code(llvm_ir, tgt), tgt)
    if log:
        log(f"codegen: {len(steps)} kernels, {(time.perf_counter() - t0) * 1e3:.0f} ms")

    tmp = tempfile.TemporaryDirectory(prefix="sqk-artifact-")
    out = tmp.name
    code_name = "model.so" if tgt.name == "host" else "runner"
    shutil.copyfile(code, os.path.join(out, code_name))
    if tgt.name != "host":
        os.chmod(os.path.join(out, code_name), 0o755)
    write_constants(os.path.join(out, "constants.bin"), plan)
    target_json = tgt.to_json()
    if tgt.name == "host":
        flags = host_cpu_flags()  # only features the loader can check on another machine
        target_json["required_features"] = [f for f in tgt.enabled_features if cpuinfo_name(f) in flags]
    else:
        target_json["vlen"] = vlen or 256
    io = lambda vs: [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in vs]  # noqa: E731
    manifest = {
        "format": "sqk-artifact", "format_version": ARTIFACT_FORMAT, "sqk_version": __version__,
        "name": g.name, "target": target_json,
        "inputs": io(g.inputs), "outputs": io(g.outputs),
        "arena_bytes": plan.arena_bytes, "intermediate_bytes": plan.intermediate_bytes,
        "threads": threads or 0, "pipeline": spec,
        "kernels": [{"name": s.name, "range": s.range, "grain": s.grain} for s in steps],
        "code": {"file": code_name, "sha256": sha256_file(os.path.join(out, code_name))},
        "constants": {"file": "constants.bin", "bytes": plan.const_bytes,
                      "sha256": sha256_file(os.path.join(out, "constants.bin"))},
    }
    manifest["content_hash"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    with open(os.path.join(out, "model.sqkir"), "w") as f:
        f.write(g.to_text())
    m = Module(out, verify=False, threads=threads, vlen=vlen, _keep=tmp)
    m.ir = g
    m.llvm_ir = llvm_ir
    m.report = report
    return m


def quantize_pipeline(weights: str, group: int | None = None, scheme: str | None = None,
                      scale_dtype: str | None = None, skip=None, max_error: float | None = None,
                      activations: str | None = None, calibration: str | None = None) -> str:
    """The pipeline string ``compile(quantize=...)`` runs, e.g.
    ``quantize_pipeline("int4", group=32)`` ->
    ``"fold_constants,quantize{weights=int4,group=32},dce"``; options left
    None keep the pass's defaults.  ``skip`` is a name or a list of names."""
    if not isinstance(weights, str):
        raise PipelineError(f"quantize= must be \"int8\" or \"int4\", got {weights!r}")
    if skip is not None and not isinstance(skip, str):
        skip = "|".join(skip)
    opts = [f"weights={weights}"] + [f"{k}={v}" for k, v in (
        ("group", group), ("scheme", scheme), ("scale_dtype", scale_dtype), ("skip", skip),
        ("max_error", max_error), ("activations", activations), ("calibration", calibration)) if v is not None]
    for o in opts:
        if any(c in o for c in ",{}"):
            raise PipelineError(f"quantize option {o!r} cannot contain ',', '{{' or '}}'")
    return "fold_constants,quantize{" + ",".join(opts) + "},dce"


def write_constants(path: str, plan) -> None:
    """Pack constants at their planned offsets (zero padding between them);
    kernel-packed constants (``codegen.lower.pack_constants``) are bytes already."""
    with open(path, "wb") as f:
        pos = 0
        for v, off, arr in plan.const_layout:
            f.write(b"\0" * (off - pos))
            data = arr if isinstance(arr, bytes) else storage_bytes(arr, v.dtype)
            f.write(data)
            pos = off + len(data)
        f.write(b"\0" * (plan.const_bytes - pos))


def storage_bytes(arr: np.ndarray, dtype) -> bytes:
    """Bytes of a constant as kernels read it: little-endian, C order; i4 packs
    two values per byte, element 2i in the low nibble, 2i+1 in the high one."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if dtype.name == "i4":
        u = (flat.astype(np.int16) & 0xF).astype(np.uint8)
        if u.size % 2:
            u = np.append(u, np.uint8(0))
        return (u[0::2] | (u[1::2] << 4)).tobytes()
    return flat.astype(flat.dtype.newbyteorder("<")).tobytes()


__all__ = ["compile", "quantize_pipeline"]
