"""Build a transformer MLP block in Python, compile it for this machine, save the
artifact, and call it with numpy.  Run: python examples/mlp.py"""
import numpy as np

import sqk
from sqk.tools.models import transformer_mlp

g = transformer_mlp(hidden=768, ffn=3072)
print(g.to_text())
m = sqk.compile(g, target="host", dump_after="all", dump_dir="sqk-dump")
x = np.random.default_rng(0).standard_normal((1, 768)).astype(np.float32)
out = m(x=x)
print("max |sqk - reference| =", float(np.abs(out - sqk.reference(g, x=x)).max()))
m.save("mlp.sqk")
print(sqk.load("mlp.sqk"))
