"""sqk.compiler: passes, pipelines, memory planning and the compile driver."""
from .driver import compile  # noqa: F401
from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline  # noqa: F401
from .passes import PASSES, Pass  # noqa: F401
