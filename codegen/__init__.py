"""sqk.codegen: lowering of fused groups to LLVM IR (one emitter module per kernel
family), targets, object emission, linking and the compile cache."""

from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
