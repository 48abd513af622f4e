"""The IR of a model at every level, for reading: the graph after any pass,
the LLVM IR as lowered and after O3, and the target assembly.

    llvm_ir(g, "host", optimized=True)           the module object code is built from
    assembly(g, "riscv64")                        what llc would print for it
    kernel_section(text, "k3_matmul")             one kernel of either (codegen.emit)

``load_model(path)`` reads what the ``sqk`` command line takes as MODEL: an IR
text file (with its .npz), an ONNX model or a compiled artifact directory.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ..ir.graph import Graph
from ..ir.text import load_ir, parse_ir
from ..runtime.abi import from_storage
from .memory import align
from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline


def run_pipeline(graph: Graph, pipeline: str | None = None, after: str | None = None) -> Graph:
    """``graph`` after ``pipeline`` (default: the compile default), stopped
    after the pass named ``after`` when given (its first occurrence)."""
    passes = parse_pipeline(DEFAULT_PIPELINE if pipeline is None else pipeline)
    if after is not None:
        names = [p.name for p in passes]
        if after not in names:
            raise PipelineError(f"--after {after}: not in the pipeline ({', '.join(names) or 'no passes'})")
        passes = passes[:names.index(after) + 1]
    return PassManager(passes).run(graph)


def lowered_module(graph: Graph, target):
    """The llvmlite module of an already-transformed ``graph`` for ``target``
    (a Target): memory plan then lowering, as ``compile`` does."""
    from ..codegen.lower import lower, pack_constants, unshare_packed_constants
    from .memory import plan_memory

    graph = unshare_packed_constants(graph, target)
    plan = plan_memory(graph, pack_constants(graph, target))
    module, _ = lower(graph, plan.buffers, plan.arena_bytes, plan.const_bytes, target, sizes=plan.const_sizes)
    return module


def llvm_ir(graph: Graph, target: str = "host", pipeline: str | None = None, optimized: bool = True,
            after: str | None = None) -> str:
    """LLVM IR of ``graph`` compiled with ``pipeline`` for ``target``: after
    LLVM's O3 pipeline (the module the object code is emitted from), or as
    lowered with ``optimized=False``."""
    from ..codegen.emit import optimized_ir
    from ..codegen.target import get_target

    tgt = get_target(target)
    text = str(lowered_module(run_pipeline(graph, pipeline, after), tgt))
    return optimized_ir(text, tgt) if optimized else text


def assembly(graph: Graph, target: str = "host", pipeline: str | None = None, after: str | None = None) -> str:
    """Target assembly of ``graph`` compiled with ``pipeline``, as llc prints it."""
    from ..codegen.emit import assembly as emit_assembly
    from ..codegen.target import get_target

    tgt = get_target(target)
    return emit_assembly(str(lowered_module(run_pipeline(graph, pipeline, after), tgt)), tgt)


def dump_codegen(pm: PassManager, lowered: str, target) -> None:
    """Write the codegen levels ``pm`` was asked to dump (``CODEGEN_DUMPS``):
    the LLVM IR as lowered, after O3, and the assembly (one O3 run for both)."""
    from ..codegen.emit import optimized_ir_and_assembly

    pm.dump_text("llvm", lowered)
    if pm.wants("llvm_opt") or pm.wants("asm"):
        opt, asm = optimized_ir_and_assembly(lowered, target)
        pm.dump_text("llvm_opt", opt)
        pm.dump_text("asm", asm)


def is_artifact(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))


def load_model(path: str, input_shapes: dict | None = None) -> tuple[Graph, dict | None]:
    """(graph, manifest) of MODEL, what the command line takes: an IR text file
    (with its .npz), an ONNX model (``.onnx``, sized by ``input_shapes`` as
    ``from_onnx`` takes them) or an artifact directory (manifest: its final IR,
    ``model.sqkir``, with the constants read back from ``constants.bin``; run
    its graph with the empty pipeline: its passes have run already).  Anything
    else is a ValueError that says what MODEL may be."""
    if str(path).lower().endswith(".onnx"):
        from .frontends.onnx import from_onnx

        return from_onnx(path, input_shapes=input_shapes or None), None
    if input_shapes:
        raise ValueError("--input-shape applies to ONNX models (.onnx) only")
    if not is_artifact(path):
        if os.path.isdir(path):
            raise FileNotFoundError(f"{path}: a directory without manifest.json (not an sqk artifact)")
        with open(path, "rb") as f:
            head = f.read(4096)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if len(head) < 4096 or e.start < len(head) - 4:  # not a character cut by the 4096-byte read
                raise ValueError(_not_a_model(path, head)) from None
        return load_ir(path), None
    from ..codegen.target import get_target
    from ..runtime.module import artifact_file, read_manifest

    manifest = read_manifest(path)
    ir_path = os.path.join(path, "model.sqkir")
    if not os.path.isfile(ir_path):
        raise FileNotFoundError(f"{path}: the artifact has no model.sqkir (compile it again from the IR)")
    if os.path.exists(ir_path + ".npz"):
        return load_ir(ir_path), manifest
    with open(ir_path) as f:
        text = f.read()
    return _with_blob_constants(text, artifact_file(path, manifest["constants"]["file"]),
                                manifest["constants"]["bytes"], path, get_target(target_name(manifest))), manifest


def _not_a_model(path: str, head: bytes) -> str:
    if head.startswith(b"\x93NUMPY"):
        what = "a numpy array, not a model (inputs go to `sqk run ARTIFACT --input NAME=FILE.npy`)"
    else:
        what = "a binary file, not an IR text file (an ONNX model must be named *.onnx)"
    return (f"{path}: {what}; MODEL is an IR text file (sqk.save_ir writes one), an ONNX model (.onnx) or, for "
            f"dump, viz and info, an artifact directory")


_CONST_REF = re.compile(r"^\s*%[A-Za-z0-9_.]+ = const @([A-Za-z0-9_.]+) : (\w+)\[([\d,]*)\]", re.M)


def target_name(manifest: dict) -> str:
    """The target (as ``sqk.compile`` names it) an artifact was compiled for."""
    t = manifest["target"]
    return t["name"] + ("-scalar" if t["name"] == "riscv64" and not t.get("vector", True) else "")


def _with_blob_constants(text: str, blob_path: str, blob_bytes: int, where: str, target=None) -> Graph:
    """Parse ``text`` taking each ``@name`` constant from the constants blob at
    the offset the memory planner gave it.  Only the plain storage layout can
    be read back: a constant its kernel reads packed is refused."""
    from ..codegen.lower import PACKERS, kernel_key
    from ..ir.dtypes import dtype as as_dtype

    # First pass: zeros of the right types, to learn the graph's constants and their readers.
    shapes = {name: (as_dtype(d), tuple(int(x) for x in dims.split(",") if x))
              for name, d, dims in _CONST_REF.findall(text)}
    g = parse_ir(text, {n: np.zeros(s, d.np_dtype) for n, (d, s) in shapes.items()})
    const_vals = {n.output: n.attrs["value"] for n in g.nodes if n.op == "const"}
    for n in g.nodes:  # packers that pack only some constants (e.g. matmul: GEMM, not GEMV) say None
        fn = PACKERS.get(kernel_key(n))
        if fn and any(v in const_vals and fn(n, i, const_vals[v], target) is not None for i, v in enumerate(n.inputs)):
            raise ValueError(f"{where}: {n.op} {n.output.name!r} reads its constants in a kernel-specific "
                             "layout that cannot be read back from constants.bin; give the IR file the "
                             "artifact was compiled from (with its .npz) instead")
    with open(blob_path, "rb") as f:
        blob = f.read()
    values, offset = {}, 0
    for n in g.nodes:  # the planner's order and alignment (compiler/memory.py)
        if n.op != "const":
            continue
        t = n.output.type
        values[n.output.name] = from_storage(blob[offset:offset + t.nbytes], t.dtype, t.shape)
        offset = align(offset + max(t.nbytes, 1))
    if offset != blob_bytes or len(blob) != blob_bytes:
        raise ValueError(f"{where}: constants.bin holds {len(blob)} bytes, its layout here needs {offset}: "
                         "give the IR file the artifact was compiled from instead")
    return parse_ir(text, {name: values[name] for name in shapes})
