"""Compile the small CNN for 64-bit RISC-V with the vector extension and run it
under qemu-user (apt-get install qemu-user gcc-riscv64-linux-gnu).
Run: python examples/riscv_cnn.py"""
import numpy as np

import sqk
from sqk.tools.models import small_cnn

g = small_cnn()
m = sqk.compile(g, target="riscv64", vlen=256)
img = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
probs = m(image=img)
print("class probabilities:", np.round(probs, 4))
print("max |sqk - reference| =", float(np.abs(probs - sqk.reference(g, image=img)).max()))
m.save("cnn-riscv.sqk")  # copy this directory to a board and run ./runner --help there
