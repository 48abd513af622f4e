"""Prompt tokens/s of chunked prefill against token-by-token steps on a
random-weight decoder of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads,
3 kv heads, head_dim 64, ffn 1536, vocab 49152), f32 and int4 g32 weights.
A quick measurement, not a benchmark: one process, no peers, best of a few runs.
Run: python examples/prefill_speed.py [--prompt 128] [--chunk 128] [--threads 2] [--quant f32,int4,int4+a8]"""
import argparse
import time

import numpy as np

from sqk.llm import Decoder, LlamaConfig, random_weights

ap = argparse.ArgumentParser()
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--chunk", type=int, default=128)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--quant", default="f32,int4")
a = ap.parse_args()

cfg = LlamaConfig(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536,
                  max_seq=max(256, a.prompt), theta=100000.0)
w = random_weights(cfg, 0)
prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab, a.prompt)]
for quant in a.quant.split(","):
    opts = {} if quant == "f32" else {"quantize": quant.split("+")[0], "group": 32}
    if quant.endswith("+a8"):                      # e.g. int4+a8: int8 activations, integer dot products
        opts["activations"] = "int8"
    t0 = time.perf_counter()
    dec = Decoder(cfg, w, threads=a.threads, prefill_chunk=a.chunk, **opts)
    t_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.chunk_module(a.chunk)
    t_chunk = time.perf_counter() - t0
    print(f"{quant}: compiled the step module in {t_step:.1f} s, the {a.chunk}-token chunk module in {t_chunk:.1f} s")
    pre, steps = [], []
    for _ in range(a.runs):
        dec.reset()
        t0 = time.perf_counter()
        lp = dec.prefill(prompt)
        pre.append(time.perf_counter() - t0)
        dec.reset()
        t0 = time.perf_counter()
        for tok in prompt:
            ls = dec.step(tok)
        steps.append(time.perf_counter() - t0)
    rel = float(np.abs(lp - ls).max() / np.abs(ls).max())
    print(f"{quant}: prefill {a.prompt / min(pre):.0f} tokens/s (best of {a.runs}: {min(pre) * 1e3:.0f} ms), "
          f"token by token {a.prompt / min(steps):.0f} tokens/s ({min(steps) * 1e3:.0f} ms): "
          f"{min(steps) / min(pre):.1f}x; last logits differ by {rel:.1e} relative")
