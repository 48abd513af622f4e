"""sqk.ir: dtypes, tensor types, op definitions, graphs, text form, verifier
and the numpy reference interpreter."""
from .dtypes import DType  # noqa: F401
from .graph import Graph, IRError, Node, TensorType, Value  # noqa: F401
from .ops import OPS, Attr, OpDef  # noqa: F401
from .text import ParseError, load_ir, parse_ir, save_ir  # noqa: F401
from .verify import VerifyError, verify  # noqa: F401
from .builder import GraphBuilder  # noqa: F401
from .reference import reference, run_reference  # noqa: F401

from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
