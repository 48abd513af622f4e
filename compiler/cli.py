"""The ``sqk`` command line.

    sqk compile MODEL.sqkir -o OUT.sqk [--target T] [--pipeline P] [--dump-after all|PASS] [--dump-dir D]
                [--quantize int8|int4 [--group N] [--scheme sym|asym] [--scale-dtype f32|f16]
                 [--skip W1|W2] [--max-error E] [--activations none|int8]] [--report]
    sqk dump MODEL.sqkir [--after PASS] [--pipeline P]
    sqk run OUT.sqk --input x=x.npy ... [--output-dir D]
    sqk info OUT.sqk
    sqk demo [--target T]

Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sqk", description="sqk: compile neural-network graphs to native kernels")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile an IR text model into an artifact directory")
    c.add_argument("model", help="IR text file (a .npz side table beside it holds large constants)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (e.g. out.sqk)")
    c.add_argument("--target", default="host", help="host (default), riscv64 or riscv64-scalar")
    c.add_argument("--pipeline", default=None, help='pass pipeline, e.g. "fold_constants,dce"')
    c.add_argument("--dump-after", default=None, help="dump the IR after 'all' passes or after PASS")
    c.add_argument("--dump-dir", default=None, help="where dumps go (default ./sqk-dump)")
    c.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    c.add_argument("--quiet", action="store_true", help="print nothing on success")
    c.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="quantize matmul weights (shorthand for a pipeline with the quantize pass)")
    c.add_argument("--group", type=int, default=None, help="quantization group along K (int4 default 32)")
    c.add_argument("--scheme", default=None, choices=("sym", "asym"), help="symmetric (default) or zero points")
    c.add_argument("--scale-dtype", default=None, choices=("f32", "f16"), help="scale storage (default f32)")
    c.add_argument("--skip", default=None, metavar="W1|W2", help="weight constants to leave in float")
    c.add_argument("--max-error", type=float, default=None,
                   help="keep in float each layer whose relative L2 output error exceeds this")
    c.add_argument("--activations", default=None, choices=("none", "int8"),
                   help="int8: quantize activations per row and group at run time (symmetric int4 or int8 weights)")
    c.add_argument("--report", action="store_true", help="print the per-layer quantization accuracy table")

    d = sub.add_parser("dump", help="print a model's IR, optionally after running passes")
    d.add_argument("model")
    d.add_argument("--after", default=None, help="run the pipeline up to and including this pass")
    d.add_argument("--pipeline", default=None)

    r = sub.add_parser("run", help="run an artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("--output-dir", default=".")

    i = sub.add_parser("info", help="print an artifact's manifest summary")
    i.add_argument("artifact")

    m = sub.add_parser("demo", help="compile and run the built-in examples, check and time them")
    m.add_argument("--target", default="host")
    return p


def _cmd_compile(a) -> None:
    import sqk

    g = sqk.load_ir(a.model)
    log = None if a.quiet else (lambda line: print(line))
    qopts = {k: v for k, v in (("quantize", a.quantize), ("group", a.group), ("scheme", a.scheme),
                               ("scale_dtype", a.scale_dtype), ("skip", a.skip), ("max_error", a.max_error),
                               ("activations", a.activations))
             if v is not None}
    m = sqk.compile(g, target=a.target, pipeline=a.pipeline, dump_after=a.dump_after, dump_dir=a.dump_dir,
                    threads=a.threads, log=log, **qopts)
    if a.report:  # printed even with --quiet: it was asked for
        print(m.report.format() if m.report is not None else "no quantization report (no quantize pass ran)")
    m.save(a.output)
    if not a.quiet:
        print(f"wrote {a.output} ({m.manifest['target']['name']}, {len(m.manifest['kernels'])} kernels, "
              f"arena {m.manifest['arena_bytes']} bytes)")


def _cmd_dump(a) -> None:
    import sqk
    from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline

    g = sqk.load_ir(a.model)
    passes = parse_pipeline(a.pipeline or DEFAULT_PIPELINE)
    if a.after:
        names = [p.name for p in passes]
        if a.after not in names:
            raise PipelineError(f"--after {a.after}: not in the pipeline ({', '.join(names)})")
        passes = passes[:names.index(a.after) + 1]
        g = PassManager(passes).run(g)
    sys.stdout.write(g.to_text())


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
    from ..runtime.module import read_manifest

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


def _median_ms(fn, reps: int = 20) -> float:
    import statistics

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cmd_demo(a) -> None:
    import numpy as np

    import sqk
    from .models import small_cnn, transformer_mlp

    rng = np.random.default_rng(0)
    print(f"sqk demo: target {a.target}")
    print(f"{'model':<18}{'kernels':>8}{'max |err|':>12}{'sqk ms':>10}{'numpy ms':>10}")
    ok = True
    for g in (transformer_mlp(), small_cnn()):
        inputs = {v.name: rng.standard_normal(v.shape).astype(v.dtype.np_dtype) for v in g.inputs}
        m = sqk.compile(g, target=a.target)
        out, ref = m(**inputs), sqk.reference(g, **inputs)
        err = float(np.max(np.abs(out - ref)))
        ok &= bool(np.allclose(out, ref, rtol=1e-4, atol=1e-4))
        reps = 20 if a.target == "host" else 1
        t_sqk = _median_ms(lambda: m(**inputs), reps)
        t_np = _median_ms(lambda: sqk.reference(g, **inputs), reps)
        print(f"{g.name:<18}{len(m.manifest['kernels']):>8}{err:>12.2e}{t_sqk:>10.3f}{t_np:>10.3f}")
    print("numpy ms is sqk's numpy reference interpreter (the same graph, op by op)")
    if not ok:
        raise RuntimeError("demo outputs differ from the reference")
    print("outputs match the reference")

    g = transformer_mlp(tokens=4)
    x = rng.standard_normal((4, 768)).astype(np.float32)
    ref = sqk.reference(g, x=x).astype(np.float64)
    print(f"\nquantized {g.name} (4 tokens) against fp32:")
    print(f"{'weights':<22}{'weight MiB':>11}{'cosine':>10}{'rel L2':>10}")
    for label, opts in (("f32", {}), ("int8 per-channel", {"quantize": "int8"}),
                        ("int4 g32", {"quantize": "int4", "group": 32}),
                        ("int4 g32 + int8 act", {"quantize": "int4", "group": 32, "activations": "int8"})):
        m = sqk.compile(g, target=a.target, **opts)
        out = m(x=x).astype(np.float64)
        cos = float(out.ravel() @ ref.ravel() / (np.linalg.norm(out) * np.linalg.norm(ref)))
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        print(f"{label:<22}{m.manifest['constants']['bytes'] / 2**20:>11.2f}{cos:>10.6f}{rel:>10.2e}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"compile": _cmd_compile, "dump": _cmd_dump, "run": _cmd_run, "info": _cmd_info,
         "demo": _cmd_demo}[args.cmd](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"sqk: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
