"""Imports every kernel family so its emitters register (one module per family)."""
from . import matmul  # noqa: F401,E402
from . import reduce  # noqa: F401,E402
from . import gather  # noqa: F401,E402
from . import conv  # noqa: F401,E402
from . import conv_winograd  # noqa: F401,E402
from . import conv_q  # noqa: F401,E402
from . import conv_im2col  # noqa: F401,E402
from . import matmul_q  # noqa: F401,E402
from . import gather_q  # noqa: F401,E402
from . import matmul_ggml  # noqa: F401,E402
from . import sparse  # noqa: F401,E402
from . import sparse_nm  # noqa: F401,E402
from . import fused  # noqa: F401,E402
from . import llm  # noqa: F401,E402
from . import sparse_input  # noqa: F401,E402
