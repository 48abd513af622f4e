"""sqk.compiler: passes, pipelines, memory planning and the compile driver."""
from .driver import compile  # noqa: F401
from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline  # noqa: F401
from .passes import PASSES, Pass  # noqa: F401

from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
