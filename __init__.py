"""sqk: a sparse/quantized kernel compiler.

Build a graph (``GraphBuilder`` or ``parse_ir``), check it against the numpy
reference (``reference``), compile it ahead of time for the host or riscv64
(``compile``), save the artifact and ``load`` it where only numpy and cffi
are installed.

``import sqk`` loads the IR and the runtime only; ``sqk.compile``,
``sqk.from_onnx`` and the subpackages (``sqk.compiler``, ``sqk.codegen``,
``sqk.llm``, and their modules such as ``sqk.compiler.dump``) load on first
use, so a deployed artifact runs without the compiler or llvmlite.
"""
__version__ = "0.1.0"


def lazy_submodules(name: str, path) -> tuple:
    """``(__getattr__, __dir__)`` for package ``name``: its modules and subpackages
    (``sqk.compiler.dump``, ``sqk.codegen.emit``, ...) import on first attribute access."""
    import importlib
    import pkgutil

    names = {m.name for m in pkgutil.iter_modules(path)}

    def getattr_(attr):
        if attr in names:
            return importlib.import_module(f"{name}.{attr}")
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    def dir_():
        return sorted(set(vars(importlib.import_module(name))) | names)

    return getattr_, dir_


# This file is the repository's root; pytest also imports it when it collects the
# checkout as a package (under the folder's name), where relative imports fail.
if __name__ == "sqk":
    from .ir import (DType, Graph, GraphBuilder, IRError, Node, ParseError, TensorType, Value,  # noqa: F401
                     load_ir, parse_ir, reference, save_ir, verify)
    from .runtime.module import Module, SqkRuntimeError, load  # noqa: F401
    from .runtime.abi import ArtifactError  # noqa: F401

# name -> (module, attribute or None for the module itself), imported on first use
_LAZY = {
    "compile": (".compiler.driver", "compile"),
    "from_onnx": (".compiler.frontends.onnx", "from_onnx"),
    "OnnxImportError": (".compiler.frontends.onnx", "OnnxImportError"),
    "compiler": (".compiler", None),
    "codegen": (".codegen", None),
    "llm": (".llm", None),
    "tools": (".tools", None),
    "load_llm": (".llm.loader", "load"),   # sqk.llm.load
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'sqk' has no attribute {name!r}")
    import importlib  # not `from . import x`: that asks this __getattr__ again

    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
