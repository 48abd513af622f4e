"""Model importers: other formats -> sqk.Graph (``onnx.from_onnx``)."""

from ... import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
