"""The ``sqk`` command line.

    sqk compile MODEL_DIR|MODEL.gguf -o OUT.sqk [--target T] [--max-seq S] [--prefill-chunk C] [--kv-dtype f32|f16|i8]
                [--quantize int8|int4 ...] [--calibration-text FILE [--calibration-ctx N]]
                [--max-error E|ppl+P%]   (an LLM artifact; default: the file's own quantization)
    sqk compile MODEL.sqkir|MODEL.onnx -o OUT.sqk [--input-shape NAME=1x128 ...]
                [--target T] [--pipeline P] [--dump-after all|PASS] [--dump-dir D]
                [--quantize int8|int4 [--group N] [--scheme sym|asym] [--scale-dtype f32|f16]
                 [--skip W1|W2] [--max-error E] [--activations none|int8]
                 [--quantize-method rtn|gptq|awq|imatrix] ...]
                [--sparsify unstructured|N:M|block=RxC [--sparsity F]
                 [--sparsify-method magnitude|wanda|sparsegpt] ...] [--format NAME:FMT ...]
                [--calibration FILE.npz] [--report]
                (every option of the quantize, sparsify and select_format passes is a flag:
                 compiler/shorthand.py; `sqk compile --help` lists them)
    sqk dump MODEL [--after PASS] [--pipeline P] [--llvm | --asm [--kernel NAME] [--target T]]
    sqk viz MODEL -o graph.svg|.png|.pdf|.dot|.html [--after PASS] [--pipeline P]
    sqk run OUT.sqk --input x=x.npy ... [--output-dir D]
    sqk info OUT.sqk|MODEL
    sqk demo [--target T]
    sqk bench OUT.sqk [--runs N] [--threads N] [--probe-mib M]
    sqk generate MODEL_DIR|MODEL.gguf --prompt TEXT [-n 64] [--temperature T] [--top-k K] [--top-p P]
                 [--seed S] [--threads N] [--max-seq S] [--chat] [--kv-dtype f32|f16|i8] [QUANTIZE]
    sqk perplexity MODEL_DIR|MODEL.gguf --text FILE [--ctx 512] [--stride S] [--chunks N]
                   [QUANTIZE] [--threads N] [--kv-dtype f32|f16|i8] [--kl-base MODEL|fp32]
        QUANTIZE: the compile flags of the quantize and sparsify passes ([--quantize int8|int4 [--group N]
                  [--quantize-method rtn|gptq|awq|imatrix] ...] [--sparsify PATTERN [--sparsify-method M]]
                  [--skip W1|W2]), [--max-error E|ppl+P%] [--calibration-text FILE [--calibration-ctx N]]
    sqk --version

MODEL is an IR text file, an ONNX model (.onnx; dump, viz and info take
--input-shape as compile does) or, for dump, viz and info, an artifact
directory.  Errors, usage errors included, print one line (``sqk: error:
...``) and exit 1; ``--debug`` shows the traceback.  A closed output pipe
(``sqk info X | head -2``) ends the command quietly with exit status 141,
as for other commands stopped by SIGPIPE.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


class UsageError(ValueError):
    """A command line argparse refuses: reported as one line, exit 1, like any error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .shorthand import add_arguments

    p = _Parser(prog="sqk", description="sqk: compile neural-network graphs to native kernels")
    p.add_argument("--version", action="version", version=f"sqk {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a model (IR text or ONNX) into an artifact directory")
    c.add_argument("model", help="IR text file (a .npz side table beside it holds large constants) or an ONNX model "
                                 "(.onnx)")
    _input_shape_arg(c)
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (e.g. out.sqk)")
    c.add_argument("--target", default="host", help="host (default), riscv64 or riscv64-scalar")
    c.add_argument("--pipeline", default=None, help='pass pipeline, e.g. "fold_constants,dce"')
    c.add_argument("--dump-after", default=None, metavar="all|PASS[,PASS]",
                   help="dump the IR after all passes or the named ones (also input, llvm, llvm_opt, asm)")
    c.add_argument("--dump-dir", default=None, help="where dumps go (default ./sqk-dump)")
    c.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    c.add_argument("--quiet", action="store_true", help="print nothing on success (and no progress bar)")
    c.add_argument("--calibration", default=None, metavar="FILE.npz",
                   help="calibration samples: one array per model input, named as the input, with a leading "
                        "sample axis (gptq/awq/imatrix/wanda/sparsegpt read them; the report measures on them)")
    add_arguments(c)   # --quantize, --sparsify and every option of their passes (compiler/shorthand.py)
    c.add_argument("--report", action="store_true",
                   help="print the per-layer quantization, pruning and format tables")
    c.add_argument("--max-seq", type=int, default=None,
                   help="LLM: KV cache length (default: the context, within 256 MiB)")
    c.add_argument("--prefill-chunk", type=int, default=None, help="LLM: tokens per prefill call (default 64)")
    c.add_argument("--kv-dtype", default=None, choices=("f32", "f16", "i8"), help="LLM: KV cache dtype (default f32)")
    _max_error_arg(c)
    _calibration_text_args(c)

    d = sub.add_parser("dump", help="print a model's IR, optionally after running passes, or its LLVM IR or assembly")
    d.add_argument("model", help="IR text file, ONNX model (.onnx), or an artifact directory (its final IR)")
    _input_shape_arg(d)
    d.add_argument("--after", default=None, help="run the pipeline up to and including this pass")
    d.add_argument("--pipeline", default=None)
    level = d.add_mutually_exclusive_group()
    level.add_argument("--llvm", action="store_true", help="the LLVM IR after O3 (whole pipeline, or up to --after)")
    level.add_argument("--asm", action="store_true", help="the target assembly, as llc prints it")
    d.add_argument("--kernel", default=None, metavar="NAME", help="only this kernel (e.g. k3_matmul)")
    d.add_argument("--target", default=None, help="host (default; an artifact: its own), riscv64 or riscv64-scalar")

    v = sub.add_parser("viz", help="draw a model's graph (Graphviz)")
    v.add_argument("model", help="IR text file, ONNX model (.onnx), or an artifact directory (its final IR)")
    _input_shape_arg(v)
    v.add_argument("-o", "--output", required=True, help="graph.svg, .png, .pdf (need Graphviz), .dot or .html")
    v.add_argument("--after", default=None, help="run the pipeline up to and including this pass")
    v.add_argument("--pipeline", default=None)

    r = sub.add_parser("run", help="run an artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("--output-dir", default=".")

    i = sub.add_parser("info", help="print an artifact's manifest summary, or a model's inputs, outputs and ops")
    i.add_argument("artifact", metavar="ARTIFACT|MODEL")
    _input_shape_arg(i)

    bn = sub.add_parser("bench", help="time each kernel of an artifact against the machine's roofline")
    bn.add_argument("artifact")
    bn.add_argument("--runs", type=int, default=20, help="timed runs (median per kernel; default 20)")
    bn.add_argument("--threads", type=int, default=None, help="runtime threads (default: the artifact's, or all cores)")
    bn.add_argument("--probe-mib", type=int, default=int(os.environ.get("SQK_PROBE_MIB", 512)),
                    help="read-bandwidth probe buffer in MiB (default 512, or $SQK_PROBE_MIB; keep it above the "
                         "last-level cache)")

    m = sub.add_parser("demo", help="compile and run the built-in examples, check and time them")
    m.add_argument("--target", default="host")

    g = sub.add_parser("generate", help="generate text with an LLM: a Hugging Face model directory or a GGUF file")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("-n", "--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--max-seq", type=int, default=None, help="KV cache length (default: the context, within 256 MiB)")
    g.add_argument("--chat", action="store_true", help="the prompt is a user message in the model's chat template")
    g.add_argument("--kv-dtype", default=None, choices=("f32", "f16", "i8"),
                   help="KV cache dtype (default f32; i8: int8 codes with a scale per row of a head)")
    _llm_quant_args(g, skip=("seed",))   # --seed is the sampling seed here
    pp = sub.add_parser("perplexity", help="perplexity of an LLM on a text file, as llama.cpp's llama-perplexity")
    pp.add_argument("model")
    pp.add_argument("--text", required=True, help="the text file (UTF-8)")
    pp.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    pp.add_argument("--stride", type=int, default=None, help="llama.cpp's --ppl-stride (default: non-overlapping)")
    pp.add_argument("--chunks", type=int, default=None, help="evaluate at most this many windows")
    _llm_quant_args(pp)
    pp.add_argument("--threads", type=int, default=None)
    pp.add_argument("--kv-dtype", default=None, choices=("f32", "f16", "i8"), help="KV cache dtype (default f32)")
    pp.add_argument("--kl-base", default=None, metavar="MODEL|fp32",
                    help="also the mean KL divergence and top-1 agreement against this model "
                         "(fp32: the same weights in f32)")
    return p


def _calibration_text_args(p) -> None:
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="LLM: a text (UTF-8) run through the fp32 model to collect each layer's inputs for "
                        "gptq/awq/imatrix/wanda/sparsegpt and the report")
    p.add_argument("--calibration-ctx", type=int, default=None,
                   help="LLM: tokens per calibration window (default 512; the text needs at least one window)")


def _max_error_arg(p) -> None:
    # a string: LLMs with --calibration-text also take an end-to-end budget (the quantize pass's field is
    # kept off the generated flags for that reason)
    p.add_argument("--max-error", default=None, metavar="E|ppl+P%",
                   help="keep in float each layer whose relative L2 output error exceeds E; LLMs with "
                        "--calibration-text also take an end-to-end budget, e.g. ppl+2%% (perplexity on that text)")


def _llm_quant_args(p, skip=()) -> None:
    """generate / perplexity: the compile flags of the quantize and sparsify passes (but ``skip``, the
    command's own flags), --max-error and the calibration text."""
    from .shorthand import add_arguments

    add_arguments(p, skip)
    _max_error_arg(p)
    _calibration_text_args(p)


def _llm_quant_opts(a) -> dict:
    """The Decoder options of the quantize/sparsify flags, --max-error and the calibration text."""
    from .shorthand import parsed_options

    opts = parsed_options(a)
    if a.max_error is not None:
        opts["max_error"] = a.max_error
    return dict(opts, **_calibration_text(a))


def _calibration_text(a) -> dict:
    if a.calibration_text is None:
        if a.calibration_ctx is not None:
            raise ValueError("--calibration-ctx applies with --calibration-text")
        return {}
    with open(a.calibration_text, encoding="utf-8") as f:
        out = {"calibration_text": f.read()}
    return dict(out, calibration_ctx=a.calibration_ctx) if a.calibration_ctx is not None else out


def _input_shape_arg(p) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x128",
                   help="ONNX only: the shape of input NAME, or the size of symbolic dim NAME (repeatable)")


def _input_shapes(items) -> dict:
    """--input-shape NAME=1x128 (or 1,128; NAME=7 also sizes a symbolic dim) -> {NAME: shape}."""
    out = {}
    for item in items:
        name, eq, spec = item.partition("=")
        try:
            dims = tuple(int(d) for d in re.split(r"[x,]", spec) if d.strip()) if spec.strip() else ()
        except ValueError:
            dims = None
        if not eq or not name or dims is None:
            raise ValueError(f"--input-shape {item!r}: expected NAME=1x128")
        out[name] = dims
    return out


def _cmd_compile(a) -> None:
    import sqk
    from .dump import is_artifact, load_model
    from .shorthand import parsed_options

    from ..llm.artifact import is_llm_artifact
    from ..llm.loader import is_gguf

    if is_artifact(a.model) or is_llm_artifact(a.model):
        raise ValueError(f"{a.model} is a compiled artifact; compile the model it came from (an IR text file, "
                         "an ONNX model, a Hugging Face model directory or a GGUF file)")
    qopts = parsed_options(a)
    if os.path.isdir(a.model) or is_gguf(a.model):
        if a.calibration is not None:
            raise ValueError("--calibration (input samples as .npz) applies to graphs (IR text or ONNX), "
                             "not to LLMs (give --calibration-text)")
        return _compile_llm(a, _llm_quant_opts(a))
    llm_only = [f"--{k}" for k in ("max_seq", "prefill_chunk", "kv_dtype", "calibration_text", "calibration_ctx")
                if getattr(a, k) is not None]
    if llm_only:
        raise ValueError(f"{', '.join(llm_only).replace('_', '-')} apply to LLMs (a model directory or a GGUF file)")
    if a.max_error is not None:
        try:
            qopts["max_error"] = float(a.max_error)
        except ValueError:
            raise ValueError(f"--max-error {a.max_error}: a graph takes a per-layer relative L2 bound (a number); "
                             "end-to-end perplexity budgets (ppl+2%) apply to LLMs with --calibration-text") from None
    if a.calibration is not None:
        from .calibration import Calibration

        qopts["calibration_data"] = Calibration.load_npz(a.calibration)
    g, _ = load_model(a.model, _input_shapes(a.input_shape))
    log = None if a.quiet else (lambda line: print(line))
    m = sqk.compile(g, target=a.target, pipeline=a.pipeline, dump_after=a.dump_after, dump_dir=a.dump_dir,
                    threads=a.threads, log=log, progress=False if a.quiet else None, **qopts)
    if a.report:  # printed even with --quiet: it was asked for
        print(m.report.format() if m.report is not None
              else "no quantization report, no sparsity report (no quantize, sparsify or select_format pass ran)")
    m.save(a.output)
    if not a.quiet:
        print(f"wrote {a.output} ({m.manifest['target']['name']}, {len(m.manifest['kernels'])} kernels, "
              f"arena {m.manifest['arena_bytes']} bytes)")


def _compile_llm(a, qopts) -> None:
    """``sqk compile MODEL_DIR|MODEL.gguf``: the decoder's step and prefill-chunk
    modules, tokenizer and config as an LLM artifact (llm/artifact.py)."""
    import sqk
    from ..llm.artifact import chunk_lengths, save_llm

    if a.pipeline is not None or a.dump_after is not None or a.input_shape:
        raise ValueError("--pipeline, --dump-after and --input-shape do not apply to an LLM (give --quantize)")
    t0 = time.perf_counter()
    opts = dict(qopts, prefill_chunk=a.prefill_chunk) if a.prefill_chunk is not None else qopts
    dec = sqk.llm.load(a.model, target=a.target, max_seq=a.max_seq, kv_dtype=a.kv_dtype, threads=a.threads,
                       progress=False if a.quiet else None, **opts)
    save_llm(dec, a.output)
    if not a.quiet:
        c = dec.cfg
        print(f"wrote {a.output} ({dec.target}, {c.arch} {c.layers} layers, vocab {c.vocab}, max_seq {c.max_seq}, "
              f"chunks {chunk_lengths(dec.prefill_chunk)}, tokenizer {'yes' if dec.tokenizer else 'none'}) "
              f"in {time.perf_counter() - t0:.1f} s")


def _model_graph(a):
    """(graph, pipeline, target) of MODEL: an artifact's final IR runs no
    passes unless --pipeline is given, and compiles for the artifact's target."""
    from .dump import load_model, target_name

    g, manifest = load_model(a.model, _input_shapes(a.input_shape))
    if manifest is None:
        return g, a.pipeline, getattr(a, "target", None) or "host"
    return g, a.pipeline if a.pipeline is not None else "", getattr(a, "target", None) or target_name(manifest)


def _cmd_dump(a) -> None:
    from ..codegen.emit import kernel_section
    from .dump import assembly, llvm_ir, run_pipeline

    g, pipeline, target = _model_graph(a)
    if a.kernel and not (a.llvm or a.asm):
        raise ValueError("--kernel selects a kernel of --llvm or --asm output")
    if a.llvm or a.asm:
        text = (llvm_ir(g, target, pipeline, after=a.after) if a.llvm
                else assembly(g, target, pipeline, after=a.after))
        sys.stdout.write(kernel_section(text, a.kernel) if a.kernel else text)
        return
    if a.after:
        g = run_pipeline(g, pipeline, a.after)
    sys.stdout.write(g.to_text())


def _cmd_viz(a) -> None:
    from ..codegen.target import get_target
    from .dump import run_pipeline
    from ..tools.viz import write

    g, pipeline, target = _model_graph(a)
    if a.after:
        g = run_pipeline(g, pipeline, a.after)
    kind = write(g, a.output, get_target(target))   # packed sizes as the target lays them out
    print(f"wrote {a.output} ({kind}, {sum(n.op != 'const' for n in g.nodes)} ops)")


def _cmd_run(a) -> None:
    import numpy as np

    import sqk

    m = sqk.load(a.artifact)
    inputs = {}
    for item in a.input:
        name, eq, path = item.partition("=")
        if not eq:
            raise ValueError(f"--input {item!r}: expected NAME=FILE.npy")
        inputs[name] = np.load(path, allow_pickle=False)
    t0 = time.perf_counter()
    outs = m(**inputs)
    dt = time.perf_counter() - t0
    outs = outs if isinstance(outs, tuple) else (outs,)
    os.makedirs(a.output_dir, exist_ok=True)
    for name, arr in zip(m.output_names, outs):
        path = os.path.join(a.output_dir, f"{name}.npy")
        np.save(path, arr)
        print(f"{name}: {arr.dtype}{list(arr.shape)} -> {path}")
    print(f"ran in {dt * 1e3:.2f} ms")


def _cmd_info(a) -> None:
    if os.path.isfile(a.artifact):   # a model file (a missing path gets the artifact's message)
        return _model_info(a)
    if a.input_shape:
        raise ValueError("--input-shape applies to ONNX models (.onnx) only")
    from ..llm.artifact import is_llm_artifact
    from ..runtime.module import read_manifest

    if is_llm_artifact(a.artifact):
        return _llm_info(a.artifact)

    m = read_manifest(a.artifact)
    t = m["target"]
    print(f"model      {m['name']}  (sqk {m['sqk_version']}, artifact format {m['format_version']})")
    print(f"target     {t['name']}  {t['triple']}  cpu={t['cpu']}")
    if t.get("required_features"):
        print(f"features   {','.join(t['required_features'])}")
    for io in m["inputs"]:
        print(f"input      {io['name']}: {io['dtype']}{io['shape']}")
    for io in m["outputs"]:
        print(f"output     {io['name']}: {io['dtype']}{io['shape']}")
    print(f"arena      {m['arena_bytes']} bytes (intermediates without reuse: {m['intermediate_bytes']} bytes)")
    print(f"constants  {m['constants']['bytes']} bytes")
    print(f"kernels    {len(m['kernels'])}: " + " ".join(k["name"] for k in m["kernels"]))
    print(f"pipeline   {m['pipeline']}")
    print(f"hash       {m['content_hash']}")


def _llm_info(path: str) -> None:
    """``sqk info model.sqk`` of an LLM artifact: its llm.json and modules."""
    from ..llm.artifact import read_index
    from ..runtime.module import read_manifest

    index = read_index(path)
    c = index["config"]
    print(f"llm        {c['arch']}: {c['layers']} layers, hidden {c['hidden']}, heads {c['heads']}/{c['kv_heads']} x "
          f"{c['head_dim']}, ffn {c['ffn']}, vocab {c['vocab']}  (sqk {index['sqk_version']})")
    print(f"target     {index['target']}")
    print(f"kv cache   {c['max_seq']} positions, {index['kv_dtype']}; prefill chunk {index['prefill_chunk']}")
    for e in index["modules"]:
        m = read_manifest(os.path.join(path, e["dir"]))
        print(f"module     {e['dir']}: {e['tokens']} token(s), {len(m['kernels'])} kernels, "
              f"arena {m['arena_bytes']} bytes")
    for f in index["constants"]:
        print(f"constants  {f['file']}: {f['bytes']} bytes")
    print(f"tokenizer  {'yes' if index.get('tokenizer') else 'none'}")
    if index.get("generate"):
        print(f"runner     {index['generate']['file']} (--generate)")


def _model_info(a) -> None:
    """``sqk info MODEL``: what a model file holds (before any pass)."""
    from collections import Counter

    from .dump import load_model

    g, _ = load_model(a.artifact, _input_shapes(a.input_shape))
    consts = [n.output for n in g.nodes if n.op == "const"]
    ops = Counter(n.op for n in g.nodes if n.op != "const")
    print(f"model      {g.name}  (not compiled: {a.artifact})")
    for v in g.inputs:
        print(f"input      {v.name}: {v.type}")
    for v in g.outputs:
        print(f"output     {v.name}: {v.type}")
    print(f"constants  {len(consts)}, {sum(v.type.nbytes for v in consts)} bytes")
    print(f"ops        {sum(ops.values())}: " + " ".join(f"{op} x{k}" for op, k in ops.most_common()))


def _cmd_demo(a) -> None:
    from ..tools.demo import run

    run(a.target)


def _cmd_bench(a) -> None:
    from ..tools.bench import bench

    if a.runs < 1 or a.probe_mib < 1:
        raise ValueError("--runs and --probe-mib must be >= 1")
    print(bench(a.artifact, runs=a.runs, threads=a.threads, probe_mib=a.probe_mib))


def _cmd_generate(a) -> None:
    """Stream the text, then the prefill and decode speeds (stderr)."""
    import sqk

    t0 = time.perf_counter()
    dec = sqk.llm.load(a.model, max_seq=a.max_seq, threads=a.threads, kv_dtype=a.kv_dtype, **_llm_quant_opts(a))
    if dec.budget is not None:
        print(dec.budget, file=sys.stderr)
    tok = dec.tokenizer
    if tok is None:
        raise ValueError(f"{a.model} has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")
    ids = tok.encode_chat([{"role": "user", "content": a.prompt}]) if a.chat else tok.encode(a.prompt)
    if dec.target == "host":   # riscv64 generates in one runner process, its modules built already
        dec.prefill(ids)     # compiles the prefill chunk's module (when the prompt uses one) before the timing
        dec.reset()
    print(f"loaded and compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if not a.chat:
        print(a.prompt, end="", flush=True)
    times = []
    t0 = time.perf_counter()
    out = dec.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       seed=a.seed, stream=lambda t, text: (times.append(time.perf_counter()),
                                                            print(text, end="", flush=True)))
    print()
    if times:
        pre = times[0] - t0      # the prompt's prefill and the first token's sampling
        rate = f"{(len(out) - 1) / (times[-1] - times[0]):.1f}" if len(out) > 1 else "-"
        print(f"prefill {len(ids)} tokens: {len(ids) / pre:.1f} tokens/s; decode {len(out)} tokens: {rate} tokens/s",
              file=sys.stderr)


def _cmd_perplexity(a) -> None:
    """The figure with its uncertainty (and KL / top-1 against --kl-base)."""
    import sqk

    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    dec = sqk.llm.load(a.model, max_seq=a.ctx, threads=a.threads, kv_dtype=a.kv_dtype, **_llm_quant_opts(a))
    if dec.budget is not None:
        print(dec.budget, file=sys.stderr)
    base = None
    if a.kl_base == "fp32":
        base = sqk.llm.fp32_decoder(dec)
    elif a.kl_base is not None:
        base = sqk.llm.load(a.kl_base, max_seq=a.ctx, threads=a.threads)
    t0 = time.perf_counter()
    r = sqk.llm.perplexity(dec, text, ctx=a.ctx, stride=a.stride, base=base, chunks=a.chunks,
                           progress=lambda i, n, ppl: print(f"[{i}/{n}] {ppl:.4f}", file=sys.stderr, flush=True))
    print(r)
    print(f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv=None) -> int:
    """Run the command line; returns the exit status: 0, 1 on any error (one line
    on stderr), 130 on Ctrl-C, 141 when stdout is a pipe closed early."""
    args = None
    try:
        args = _parser().parse_args(argv)
        {"compile": _cmd_compile, "dump": _cmd_dump, "run": _cmd_run, "info": _cmd_info,
         "demo": _cmd_demo, "bench": _cmd_bench, "viz": _cmd_viz, "generate": _cmd_generate,
         "perplexity": _cmd_perplexity}[args.cmd](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (`| head`): nothing more to say; stdout to /dev/null so the
        # interpreter's last flush at exit cannot complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # one clear line unless --debug
        if args is not None and args.debug:
            raise
        print(f"sqk: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
