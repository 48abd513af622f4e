"""sqk.compiler: passes, pipelines, memory planning and the compile driver."""
import importlib
import importlib.abc
import importlib.util
import sys

from .driver import compile  # noqa: F401
from .pipeline import DEFAULT_PIPELINE, PassManager, PipelineError, parse_pipeline  # noqa: F401
from .passes import PASSES, Pass  # noqa: F401

from .. import lazy_submodules as _lazy

# Modules that moved out of the compiler (to sqk.tools; the LLM driver to sqk.llm): their
# old paths stay importable, as the very same modules.
MOVED = {"models": "tools.models", "demo": "tools.demo", "bench": "tools.bench", "probe": "tools.probe",
         "viz": "tools.viz", "llm": "llm.decoder"}
_ROOT = __name__.rpartition(".")[0]   # "sqk"


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import sqk.compiler.viz`` gives the module sqk.tools.viz itself (one module, two names)."""

    specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        parent, _, leaf = fullname.rpartition(".")
        return importlib.util.spec_from_loader(fullname, self) if parent == __name__ and leaf in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(f"{_ROOT}.{MOVED[spec.name.rpartition('.')[2]]}")
        self.specs[module.__name__] = module.__spec__   # the import machinery sets the alias's spec on it
        return module

    def exec_module(self, module):
        module.__spec__ = self.specs[module.__name__]   # its own back: it ran under its own name already


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())

_getattr, _dir = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`


def __getattr__(attr):
    if attr in MOVED:
        return importlib.import_module(f"{__name__}.{attr}")
    return _getattr(attr)


def __dir__():
    return sorted(set(_dir()) | set(MOVED))
