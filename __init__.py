"""sqk: a sparse/quantized kernel compiler.

Build a graph (``GraphBuilder`` or ``parse_ir``), check it against the numpy
reference (``reference``), compile it ahead of time for the host or riscv64
(``compile``), save the artifact and ``load`` it where only numpy and cffi
are installed.
"""
__version__ = "0.1.0"

# This file is the repository's root; pytest also imports it when it collects the
# checkout as a package (under the folder's name), where relative imports fail.
if __name__ == "sqk":
    from .ir import (DType, Graph, GraphBuilder, IRError, Node, ParseError, TensorType, Value,  # noqa: F401
                     load_ir, parse_ir, reference, save_ir, verify)
    from .runtime.module import Module, SqkRuntimeError, load  # noqa: F401


def compile(graph, target="host", pipeline=None, dump_after=None, dump_dir=None, threads=None, **options):
    """Compile ``graph`` ahead of time; see :func:`sqk.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(graph, target=target, pipeline=pipeline, dump_after=dump_after,
                    dump_dir=dump_dir, threads=threads, **options)


def from_onnx(path_or_model, input_shapes=None, **options):
    """Import an ONNX model as a sqk.Graph; see :func:`sqk.compiler.frontends.onnx.from_onnx`
    (needs the onnx package: ``pip install 'sqk[onnx]'``)."""
    from .compiler.frontends.onnx import from_onnx as _from_onnx

    return _from_onnx(path_or_model, input_shapes=input_shapes, **options)


def __getattr__(name):
    if name == "llm":  # the LLM layer (llm/), loaded on first use
        import importlib  # not `from . import llm`: that asks this __getattr__ again

        return importlib.import_module(".llm", __name__)
    if name == "load_llm":  # sqk.llm.load
        import importlib

        return importlib.import_module(".llm", __name__).load
    # OnnxImportError lives with the importer, loaded on first use (the runtime needs no compiler).
    if name == "OnnxImportError":
        from .compiler.frontends.onnx import OnnxImportError

        return OnnxImportError
    raise AttributeError(f"module 'sqk' has no attribute {name!r}")
