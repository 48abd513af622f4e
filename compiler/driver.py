"""compile(): graph -> passes -> memory plan -> LLVM -> native code -> artifact.

The whole pipeline as one straight function; each step is a call into the
module that owns it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

from .. import __version__
from ..ir.graph import Graph
from ..ir.verify import verify
from ..runtime.abi import manifest_hash
from ..runtime.module import ARTIFACT_FORMAT, Module, cpuinfo_name, host_cpu_flags, sha256_file
from .calibration import Calibration, CalibrationError
from .cost import kernel_costs
from .dump import dump_codegen
from .memory import plan_memory, state_pairs
from .passes.report import combine_reports, end_to_end_error
from .pipeline import DEFAULT_PIPELINE, TAIL, PassManager, PipelineError, parse_pipeline
from .progress import Progress


def compile(graph: Graph, target: str = "host", pipeline: str | None = None, dump_after=None,
            dump_dir: str | None = None, threads: int | None = None, vlen: int | None = None,
            log=None, quantize: str | None = None, group: int | None = None, scheme: str | None = None,
            scale_dtype: str | None = None, skip=None, max_error: float | None = None,
            activations: str | None = None, act_group: int | None = None, calibration: str | None = None,
            calibration_data=None, percentile: float | None = None, quantize_method: str | None = None,
            sparsify: str | None = None, sparsity: float | None = None, method: str | None = None,
            scope: str | None = None, force=None, formats=None,
            progress: bool | None = None, state=None) -> Module:
    """Compile ``graph`` for ``target`` ("host", "riscv64", "riscv64-scalar").

    ``pipeline`` is a pass string (default ``"fold_constants,select_format,dce,fuse"``);
    ``dump_after`` ("all", a pass name, comma-separated names or a list) writes
    numbered IR files into ``dump_dir``, continued by the codegen levels
    "llvm", "llvm_opt" and "asm" (``pipeline.CODEGEN_DUMPS``); ``progress``
    draws a progress line on stderr (None: only when stderr is a terminal);
    ``threads`` fixes the runtime's thread count (default: all cores, or
    $SQK_NUM_THREADS); ``vlen`` is the vector length qemu emulates
    for riscv64.  Returns a loaded Module backed by a temporary artifact
    directory; ``Module.save(path)`` keeps it.

    ``quantize="int8"|"int4"`` (with ``group``, ``scheme``, ``scale_dtype``,
    ``skip`` (a name or a list of weight names), ``max_error``,
    ``activations``, ``act_group``, ``calibration``, ``percentile``, ``quantize_method``:
    "rtn" (default), "gptq", "awq" or "imatrix", the pass's ``method``) is shorthand for the
    pipeline ``fold_constants,quantize{weights=...,...},select_format,dce,fuse`` (see
    :func:`quantize_pipeline`); giving ``pipeline`` as well is an error.
    Static activation scales (``activations="int8"``, ``calibration=
    "minmax"|"percentile"|"mse"``) are chosen on ``calibration_data``.
    ``sparsify="2:4"|"unstructured"|"block=4x4"`` (with ``sparsity``,
    ``method``, ``scope``, and ``skip``, which then applies to both passes) is
    shorthand for ``fold_constants,sparsify{pattern=...},select_format,dce,fuse``,
    with ``quantize{...}`` after sparsify when ``quantize`` is given too;
    ``force`` ({weight: format} or "w1:csr|w2:nm2:4") and ``formats`` (the
    candidates) go to select_format, and alone add that pass (see
    :func:`sparsify_pipeline`).
    ``calibration_data=[{input: array}, ...]`` is collected once (each
    layer's fp32 inputs, ``compiler.calibration``) and read by every quantize
    and sparsify pass: their methods other than rtn/magnitude need it, and
    their reports measure on it; the report then also carries the compiled
    graph's end-to-end error against fp32 on these samples (``end_to_end``).  ``Module.report`` is the report of the
    passes that report (quantize, sparsify, select_format): that pass's
    report when one kind ran, a ``CompileReport`` of them when several did
    (``passes/report.py``), None without any.  The artifact keeps it as
    report.json (:func:`write_report`): ``sqk.load(path).report`` reads it
    back as a ``runtime.module.ArtifactReport`` (rows and the printed table).

    ``state`` (input names) marks inputs the Module keeps between calls, e.g.
    a KV cache: each must be updated in place by an op with an aliased output
    (attention_decode's caches) whose result is a graph output
    (``memory.state_pairs``).  The Module then owns them (``Module.state``,
    ``reset_state()``), its calls take and return only the other inputs and
    outputs, and on the host the update happens in the state's own memory,
    never copied (riscv64: round-trips through the runner's files).
    """
    from ..codegen.emit import link, object_code
    from ..codegen.lower import lower, pack_constants, unshare_packed_constants
    from ..codegen.target import get_target

    if not isinstance(graph, Graph):
        raise TypeError(f"compile() takes a sqk.Graph, got {type(graph).__name__}")
    tgt = get_target(target)
    qopts = dict(group=group, scheme=scheme, scale_dtype=scale_dtype, skip=skip, max_error=max_error,
                 activations=activations, act_group=act_group, calibration=calibration, percentile=percentile,
                 quantize_method=quantize_method)
    sopts = dict(sparsity=sparsity, method=method, scope=scope)
    if sparsify is not None or force is not None or formats is not None:
        spec = sparsify_pipeline(sparsify, **sopts, force=force, formats=formats, quantize=quantize, **qopts)
        if pipeline is not None:
            raise PipelineError(f"give either pipeline= or sparsify=/force=/formats=, not both (they mean "
                                f"pipeline={spec!r}; add the passes there)")
    elif any(v is not None for v in sopts.values()):
        raise PipelineError(f"{', '.join(k for k, v in sopts.items() if v is not None)}= only apply with "
                            f"sparsify=\"PATTERN\"")
    elif quantize is not None:
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
    quant = [i for i, p in enumerate(passes) if hasattr(p, "with_calibration")]  # quantize, sparsify
    calib = None
    if calibration_data is not None:
        if not quant:
            raise PipelineError("calibration_data= needs a quantize pass or a sparsify pass (quantize=..., "
                                "sparsify=... or one in pipeline=)")
        try:   # one collection of layer inputs, shared by the passes
            calib = Calibration.of(calibration_data)
        except CalibrationError as e:
            raise PipelineError(str(e)) from None
        for i in quant:
            passes[i] = passes[i].with_calibration(calib)
    bar = Progress(progress)  # erased when done, and on an error before the message shows
    log = bar.wrap_log(log)
    pm = PassManager(passes, dump_after=dump_after, dump_dir=dump_dir, log=log, progress=bar, codegen=True)
    with bar:
        g = pm.run(verify(graph))
        # each reporting pass records its report on itself (passes/report.py)
        report = combine_reports([getattr(p, "report", None) for p in passes])
        memo: dict = {}   # each constant packed once, though both steps ask
        g = unshare_packed_constants(g, tgt, memo)   # a constant read in two layouts becomes two constants
        pairs = state_pairs(g, [state] if isinstance(state, str) else state) if state else {}
        plan = plan_memory(g, pack_constants(g, tgt, memo), state=pairs)
        # state updated in its input's buffer (host only: the runner copies every output)
        in_place = frozenset(c[-1] for c in pairs.values()) if tgt.name == "host" else frozenset()
        t0 = time.perf_counter()
        module, steps = lower(g, plan.buffers, plan.arena_bytes, plan.const_bytes, tgt, sizes=plan.const_sizes,
                              progress=lambda k, n: bar.update("codegen", k, n, "kernels"),
                              in_place_outputs=in_place)
        llvm_ir = str(module)
        dump_codegen(pm, llvm_ir, tgt)
        bar.update("LLVM O3 + object code")
        obj = object_code(llvm_ir, tgt)
        bar.update("link")
        code = link(obj, tgt)
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
        "kernels": [dict({"name": s.name, "range": s.range, "grain": s.grain},
                         **({"bytes": c[0], "flops": c[1]} if c else {}),
                         **({"index_error": s.index_error} if s.index_error else {}))
                    for s, c in zip(steps, kernel_costs(g, steps, plan.buffers, plan.const_sizes, in_place))],
        "code": {"file": code_name, "sha256": sha256_file(os.path.join(out, code_name))},
        "constants": {"file": "constants.bin", "bytes": plan.const_bytes,
                      "sha256": sha256_file(os.path.join(out, "constants.bin"))},
    }
    if pairs:
        manifest["state"] = [{"input": v.name, "output": c[-1].name} for v, c in pairs.items()]
    if report is not None:
        manifest["report"] = write_report(os.path.join(out, "report.json"), report)
    write_manifest(out, manifest)
    with open(os.path.join(out, "model.sqkir"), "w") as f:
        f.write(g.to_text())
    m = Module(out, verify=False, threads=threads, vlen=vlen, _keep=tmp)
    m.ir = g
    m.llvm_ir = llvm_ir
    if calib is not None and report is not None and not pairs:
        report.end_to_end = _end_to_end(graph, g, m, tgt, calib)
        # measured by running the module: its report (and so the manifest) is written again
        manifest["report"] = write_report(os.path.join(out, "report.json"), report)
        write_manifest(out, manifest)
        m.manifest = manifest
    m.report = report
    return m


def _end_to_end(graph: Graph, compiled: Graph, module: Module, tgt, calib) -> dict:
    """The compiled graph's outputs against the fp32 graph's on the calibration
    samples (the native code on the host; the reference interpreter of the
    compiled graph, which the kernels match, for other targets)."""
    from ..ir.reference import run_reference

    if tgt.name == "host":
        def run(sample):
            out = module(**sample)
            return list(out) if isinstance(out, tuple) else [out]
    else:
        def run(sample):
            return run_reference(compiled, sample)
    run.output_names = [v.name for v in compiled.outputs]
    return end_to_end_error(calib.samples, calib.fp32_outputs(graph), run, calib.source)


def quantize_pipeline(weights: str, group: int | None = None, scheme: str | None = None,
                      scale_dtype: str | None = None, skip=None, max_error: float | None = None,
                      activations: str | None = None, act_group: int | None = None,
                      calibration: str | None = None, percentile: float | None = None, quantize_method: str | None = None) -> str:
    """The pipeline string ``compile(quantize=...)`` runs, e.g.
    ``quantize_pipeline("int4", group=32)`` ->
    ``"fold_constants,quantize{weights=int4,group=32},select_format,dce,fuse"``; options left
    None keep the pass's defaults.  ``skip`` is a name or a list of names."""
    if not isinstance(weights, str):
        raise PipelineError(f"quantize= must be \"int8\" or \"int4\", got {weights!r}")
    if skip is not None and not isinstance(skip, str):
        skip = "|".join(skip)
    opts = [f"weights={weights}"] + [f"{k}={v}" for k, v in (
        ("group", group), ("scheme", scheme), ("scale_dtype", scale_dtype), ("skip", skip),
        ("max_error", max_error), ("activations", activations), ("act_group", act_group),
        ("calibration", calibration),
        ("percentile", percentile), ("method", quantize_method)) if v is not None]
    for o in opts:
        if any(c in o for c in ",{}"):
            raise PipelineError(f"quantize option {o!r} cannot contain ',', '{{' or '}}'")
    return "fold_constants,quantize{" + ",".join(opts) + "}," + TAIL


def sparsify_pipeline(pattern: str | None = None, sparsity: float | None = None, method: str | None = None,
                      scope: str | None = None, skip=None, force=None, formats=None, quantize: str | None = None,
                      **qopts) -> str:
    """The pipeline string ``compile(sparsify=...)`` runs:
    ``fold_constants,sparsify{...},[quantize{...},]select_format{...},dce,fuse``,
    e.g. ``sparsify_pipeline("2:4", quantize="int8")`` ->
    ``"fold_constants,sparsify{pattern=2:4},quantize{weights=int8},select_format,dce,fuse"``.
    Without ``pattern`` there is no sparsify pass (``force``/``formats`` alone
    add select_format); ``quantize`` and ``qopts`` make quantize's item as
    :func:`quantize_pipeline` does; ``skip`` (a name or a list) goes to both
    sparsify and quantize.  ``force`` is {weight: format}, a list of
    "NAME:FORMAT" or one "w1:csr|w2:nm2:4" string; ``formats`` a list or a
    "|"-separated string.  Options left None keep the passes' defaults."""
    def item(name, pairs):
        opts = [f"{k}={v if isinstance(v, str) or not hasattr(v, '__iter__') else '|'.join(v)}"
                for k, v in pairs if v is not None]
        for o in opts:
            if any(c in o for c in ",{}"):
                raise PipelineError(f"{name} option {o!r} cannot contain ',', '{{' or '}}'")
        return name + ("{" + ",".join(opts) + "}" if opts else "")

    if pattern is not None and not isinstance(pattern, str):
        raise PipelineError(f"sparsify= must be a pattern string (\"unstructured\", \"2:4\", \"block=4x4\"), "
                            f"got {pattern!r}")
    if pattern is None:
        given = [k for k, v in (("sparsity", sparsity), ("method", method), ("scope", scope)) if v is not None]
        if given:
            raise PipelineError(f"{', '.join(given)}= only apply with sparsify=\"PATTERN\"")
    if isinstance(force, dict):
        force = [f"{k}:{v}" for k, v in force.items()]
    items = ["fold_constants"]
    if pattern is not None:
        items.append(item("sparsify", (("pattern", pattern), ("sparsity", sparsity), ("method", method),
                                       ("scope", scope), ("skip", skip))))
    if quantize is not None:  # quantize_pipeline's own item, between its fold_constants and dce
        items.append(quantize_pipeline(quantize, skip=skip, **qopts).removeprefix("fold_constants,")
                     .removesuffix("," + TAIL))
    else:
        given = [k for k, v in qopts.items() if v is not None] + (["skip"] if skip is not None and pattern is None
                                                                   else [])
        if given:
            raise PipelineError(f"{', '.join(given)}= only apply with quantize=\"int8\" or \"int4\"")
    items += [item("select_format", (("force", force), ("formats", formats))), "dce", "fuse"]
    return ",".join(items)


def write_report(path: str, report) -> dict:
    """Write the compile report (one pass's LayerReport or a CompileReport of
    several) as JSON: {"format": "sqk-report", "passes": [{"pass", "rows"}],
    "text": the formatted table, "end_to_end": the whole graph's error on the
    calibration samples, when measured}, read back by ``runtime.module.read_report``
    without the compiler.  Returns the manifest entry {"file", "sha256"}."""
    parts = [report] if hasattr(report, "pass_name") else list(report)
    data = {"format": "sqk-report", "passes": [{"pass": p.pass_name, "rows": list(p)} for p in parts],
            "text": report.format()}
    if getattr(report, "end_to_end", None):
        data["end_to_end"] = report.end_to_end
    with open(path, "w") as f:  # numpy scalars as Python numbers; tuples become lists
        json.dump(data, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return {"file": os.path.basename(path), "sha256": sha256_file(path)}


def write_manifest(out: str, manifest: dict) -> None:
    """Write ``out``/manifest.json with its content hash (over everything else in it)."""
    manifest["content_hash"] = manifest_hash(manifest)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


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


__all__ = ["compile", "quantize_pipeline", "sparsify_pipeline"]
