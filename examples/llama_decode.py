"""Decode with a small random-weight Llama-style model, token by token, the KV
cache kept in the compiled module between steps; check the logits against a
numpy model that recomputes full causal attention from scratch.
Run: python examples/llama_decode.py [host|riscv64] [tokens]"""
import sys
import time

import numpy as np

from sqk.llm import Decoder, LlamaConfig, reference_logits

target = sys.argv[1] if len(sys.argv) > 1 else "host"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
cfg = LlamaConfig(vocab=512, hidden=128, layers=4, heads=8, kv_heads=2, head_dim=16, ffn=384, max_seq=64)
t0 = time.perf_counter()
dec = Decoder(cfg, target=target)
print(f"compiled {len(dec.module.manifest['kernels'])} kernels for {target} in {time.perf_counter() - t0:.1f} s; "
      f"state: {', '.join(dec.module.state)}")
prompt = [1, 42, 7]
dec.prefill(prompt)             # compiles a prefill chunk's module, if the prompt takes one, before the timing
dec.reset()
t0 = time.perf_counter()
out = dec.generate(prompt, n)   # the prompt in one call per chunk, then n - 1 steps
dt = time.perf_counter() - t0
print("generated:", out)
print(f"prefill of {len(prompt)} and {n - 1} steps in {dt * 1e3:.1f} ms ({(len(prompt) + n - 1) / dt:.0f} tokens/s)")
ref = reference_logits(cfg, dec.weights, prompt + out)
greedy = [int(np.argmax(r)) for r in ref[len(prompt) - 1:-1]]
print("numpy reference agrees:", greedy == out)
