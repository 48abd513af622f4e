"""Model importers: other formats -> sqk.Graph (``onnx.from_onnx``)."""
