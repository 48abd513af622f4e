"""``python -m benchmarks [name ...] [--threads N] [--markdown] [--quick]``: run the named
benchmarks (all but the on-demand ones without names) and print each one's table."""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys


def main(argv=None) -> int:
    from . import BENCHMARKS, ON_DEMAND, header, load_average

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(":")[1].strip())
    p.add_argument("names", nargs="*", metavar="name", help=f"benchmarks to run: {', '.join(BENCHMARKS)} "
                                                            f"(default: all but {', '.join(sorted(ON_DEMAND))})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for sqk and for numpy's BLAS (default: all cores)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables (for benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and models, for benchmarks that "
                                                        "have a quick mode (llm-real)")
    p.add_argument("--model", help="the model of benchmarks that offer several (quant-accuracy: smollm2, gemma3)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    command = "python -m benchmarks " + " ".join((argv if argv is not None else sys.argv[1:]))
    print("\n".join(header(command.strip())), end="\n\n", flush=True)
    for name in args.names or [n for n in BENCHMARKS if n not in ON_DEMAND]:
        run = importlib.import_module(BENCHMARKS[name][0]).run
        quick = {"quick": True} if args.quick and "quick" in inspect.signature(run).parameters else {}
        if args.model and "model" in inspect.signature(run).parameters:
            quick["model"] = args.model
        table = run(args.threads, **quick)
        table.notes.append(f"load average after the run: {load_average()}")
        print(table.markdown() if args.markdown else table.text(), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
