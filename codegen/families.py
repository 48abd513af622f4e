"""Imports every kernel family so its emitters register (one module per family)."""
from . import matmul  # noqa: F401,E402
from . import reduce  # noqa: F401,E402
from . import gather  # noqa: F401,E402
from . import conv  # noqa: F401,E402
from . import matmul_q  # noqa: F401,E402
