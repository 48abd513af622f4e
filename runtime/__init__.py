"""sqk.runtime: the C runtime, its cffi build, and Module (load, call, save:
numpy + cffi only)."""

from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
