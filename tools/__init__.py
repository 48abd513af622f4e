"""sqk.tools: what sits on the compiler without being it -- the built-in example
models, the demo, the per-kernel benchmark (``sqk bench``) and its roofline probes,
and the graph picture (``sqk viz``).  Their old paths (``sqk.compiler.models``,
``sqk.compiler.viz``, ...) still import (compiler/__init__.py aliases them)."""
from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.tools.X works after `import sqk`
