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

from .. import __version__
from ..ir.graph import Graph
from ..ir.verify import verify
from ..runtime.abi import storage_bytes, write_manifest
from ..runtime.module import ARTIFACT_FORMAT, Module, cpuinfo_name, host_cpu_flags, sha256_file
from .calibration import Calibration, CalibrationError
from .cost import kernel_costs
from .dump import dump_codegen
from .memory import plan_memory, state_pairs
from .passes.report import combine_reports, end_to_end_error
from .passes import Context, Pass
from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline
from .progress import Progress
from .shorthand import options_doc, shorthand_pipeline, signature_parameters


def compile(graph: Graph, target: str = "host", pipeline: str | list[Pass] | None = None, dump_after=None,
            dump_dir: str | None = None, threads: int | None = None, vlen: int | None = None,
            log=None, quantize: str | None = None, *, sparsify: str | None = None, calibration_data=None,
            progress: bool | None = None, state=None, **options) -> Module:
    """Compile ``graph`` for ``target`` ("host", "riscv64", "riscv64-scalar").

    ``pipeline`` is a pass string (default ``"fold_constants,select_format,dce,fuse"``)
    or a list of pass objects;
    ``dump_after`` ("all", a pass name, comma-separated names or a list) writes
    numbered IR files into ``dump_dir``, continued by the codegen levels
    "llvm", "llvm_opt" and "asm" (``pipeline.CODEGEN_DUMPS``); ``progress``
    draws a progress line on stderr (None: only when stderr is a terminal);
    ``threads`` fixes the runtime's thread count (default: all cores, or
    $SQK_NUM_THREADS); ``vlen`` is the vector length qemu emulates
    for riscv64.  Returns a loaded Module backed by a temporary artifact
    directory; ``Module.save(path)`` keeps it.

    ``quantize="int8"|"int4"`` is shorthand for the pipeline
    ``fold_constants,quantize{weights=...,...},select_format,dce,fuse`` and
    ``sparsify="2:4"|"unstructured"|"block=4x4"`` for
    ``fold_constants,sparsify{pattern=...},select_format,dce,fuse`` (quantize's
    item after sparsify's when both are given); every other option of these
    passes and of select_format is a keyword of its own (listed below,
    generated from the passes' fields: ``compiler/shorthand.py``), e.g.
    ``group=32``, ``quantize_method="gptq"``, ``sparsity=0.7``,
    ``force={"w1": "csr"}``; ``skip`` (a name or a list) goes to both passes.
    Options of select_format alone add that pass's options to the default
    pipeline.  Giving ``pipeline`` as well is an error (the message spells
    the pipeline the shorthand means: add the passes there).
    Static activation scales (``activations="int8"``, ``calibration=
    "minmax"|"percentile"|"mse"``) are chosen on ``calibration_data``.
    ``calibration_data=[{input: array}, ...]`` (or a
    ``compiler.calibration.Calibration``) is collected once (each layer's fp32
    inputs) and handed to every pass in the pass manager's context
    (``passes.Context``): the quantize and sparsify methods other than
    rtn/magnitude need it, and their reports measure on it; the report then
    also carries the compiled graph's end-to-end error against fp32 on these
    samples (``end_to_end``).  ``Module.report`` is the report of the
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
    spec, passes = _passes(pipeline, quantize, sparsify, options)
    calib = _calibration(calibration_data, passes)
    bar = Progress(progress)  # erased when done, and on an error before the message shows
    log = bar.wrap_log(log)
    pm = PassManager(passes, dump_after=dump_after, dump_dir=dump_dir, log=log, progress=bar, codegen=True,
                     context=Context(calibration=calib, target=tgt))
    with bar:
        g = pm.run(verify(graph))
        report = combine_reports([r for _, r in pm.context.reports])   # filed by the passes that report
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

    tmp, manifest = _write_artifact(code, g, tgt, plan, steps, spec, threads=threads, vlen=vlen, in_place=in_place,
                                    pairs=pairs, report=report)
    m = Module(tmp.name, verify=False, threads=threads, vlen=vlen, _keep=tmp)
    m.ir = g
    m.llvm_ir = llvm_ir
    if calib is not None and report is not None and not pairs:
        report.end_to_end = _end_to_end(graph, g, m, tgt, calib)
        # measured by running the module: its report (and so the manifest) is written again
        manifest["report"] = write_report(os.path.join(tmp.name, "report.json"), report)
        write_manifest(tmp.name, manifest)
        m.manifest = manifest
    m.report = report
    return m


def _calibration(calibration_data, passes) -> Calibration | None:
    """compile()'s ``calibration_data`` collected once (each layer's inputs), shared by
    the passes that read it; None without."""
    if calibration_data is None:
        return None
    if not any(p.reads_calibration for p in passes):
        raise PipelineError("calibration_data= needs a quantize pass or a sparsify pass (quantize=..., "
                            "sparsify=... or one in pipeline=)")
    try:
        return Calibration.of(calibration_data)
    except CalibrationError as e:
        raise PipelineError(str(e)) from None


def _write_artifact(code: str, g: Graph, tgt, plan, steps, spec: str, *, threads, vlen, in_place, pairs,
                    report) -> tuple[tempfile.TemporaryDirectory, dict]:
    """compile()'s artifact in a temporary directory (removed with the Module unless it
    is saved): the code (model.so, or the riscv64 runner), constants.bin, the manifest
    (with the state pairs and report.json when there are any) and model.sqkir.
    Returns (the directory, the manifest)."""
    tmp = tempfile.TemporaryDirectory(prefix="sqk-artifact-")
    out = tmp.name
    code_name = "model.so" if tgt.name == "host" else "runner"
    shutil.copyfile(code, os.path.join(out, code_name))
    if tgt.name != "host":
        os.chmod(os.path.join(out, code_name), 0o755)
    write_constants(os.path.join(out, "constants.bin"), plan)
    manifest = _manifest(out, g, tgt, plan, steps, spec, code_name, threads=threads, vlen=vlen, in_place=in_place)
    if pairs:
        manifest["state"] = [{"input": v.name, "output": c[-1].name} for v, c in pairs.items()]
    if report is not None:
        manifest["report"] = write_report(os.path.join(out, "report.json"), report)
    write_manifest(out, manifest)
    with open(os.path.join(out, "model.sqkir"), "w") as f:
        f.write(g.to_text())
    return tmp, manifest


def _passes(pipeline, quantize, sparsify, options: dict) -> tuple[str, list]:
    """(the pipeline's spelling, its passes) from compile()'s pipeline= (a string or a list
    of passes) or its shorthands (one or the other)."""
    shorthand = shorthand_pipeline(quantize, sparsify, **options)   # None without shorthands
    if shorthand is not None and pipeline is not None:
        given = [k for k, v in dict(sparsify=sparsify, quantize=quantize, **options).items() if v is not None]
        raise PipelineError(f"give either pipeline= or {'/'.join(k + '=' for k in given)}, not both (they mean "
                            f"pipeline={shorthand!r}; add the passes there)")
    if isinstance(pipeline, (list, tuple)):
        passes = list(pipeline)
        bad = [p for p in passes if not isinstance(p, Pass)]
        if bad:
            raise PipelineError(f"pipeline= as a list holds Pass objects, got {type(bad[0]).__name__}")
        return ",".join(p.spelling() for p in passes), passes
    spec = shorthand or (DEFAULT_PIPELINE if pipeline is None else pipeline)
    return spec, parse_pipeline(spec)


def _manifest(out: str, g: Graph, tgt, plan, steps, spec: str, code_name: str, threads, vlen, in_place) -> dict:
    """The manifest of the artifact in ``out`` (its code and constants written already;
    schema: runtime/abi.py validate_manifest), without state, report and content hash."""
    target_json = tgt.to_json()
    if tgt.name == "host":
        flags = host_cpu_flags()  # only features the loader can check on another machine
        target_json["required_features"] = [f for f in tgt.enabled_features if cpuinfo_name(f) in flags]
    else:
        target_json["vlen"] = vlen or 256
    io = lambda vs: [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in vs]  # noqa: E731
    return {
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


def quantize_pipeline(weights: str, **options) -> str:
    """The pipeline string ``compile(quantize=...)`` runs, e.g.
    ``quantize_pipeline("int4", group=32)`` ->
    ``"fold_constants,quantize{weights=int4,group=32},select_format,dce,fuse"``; options
    (``compile()``'s keywords) left None keep the pass's defaults.  ``skip`` is a name
    or a list of names."""
    if not isinstance(weights, str):
        raise PipelineError(f"quantize= must be \"int8\" or \"int4\", got {weights!r}")
    return shorthand_pipeline(quantize=weights, **options)


def sparsify_pipeline(pattern: str | None = None, quantize: str | None = None, **options) -> str:
    """The pipeline string ``compile(sparsify=...)`` runs:
    ``fold_constants,sparsify{...},[quantize{...},]select_format{...},dce,fuse``,
    e.g. ``sparsify_pipeline("2:4", quantize="int8")`` ->
    ``"fold_constants,sparsify{pattern=2:4},quantize{weights=int8},select_format,dce,fuse"``.
    Without ``pattern`` there is no sparsify pass (``force``/``formats`` alone
    add select_format's options); ``skip`` (a name or a list) goes to both
    sparsify and quantize.  ``force`` is {weight: format}, a list of
    "NAME:FORMAT" or one "w1:csr|w2:nm2:4" string; ``formats`` a list or a
    "|"-separated string.  Options left None keep the passes' defaults."""
    return shorthand_pipeline(quantize=quantize, sparsify=pattern, **options) or DEFAULT_PIPELINE


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


def _generated_signature():
    """compile()'s signature and docstring with the generated pass options in place of ``**options``."""
    import inspect

    params = [p for p in inspect.signature(compile).parameters.values() if p.kind is not p.VAR_KEYWORD]
    compile.__signature__ = inspect.Signature(params + signature_parameters(), return_annotation="Module")
    compile.__doc__ = compile.__doc__.rstrip() + "\n\n    " + options_doc().replace("\n", "\n    ") + "\n"


_generated_signature()

__all__ = ["compile", "quantize_pipeline", "sparsify_pipeline"]
