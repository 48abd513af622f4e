"""``python -m benchmarks llm-1b``: only llm-real's random 1.1B Llama rows
(benchmarks/llm_real.py ``run_1b``): q4_0 and q8_0, pp128 / pp512 / tg64, sqk
with f32 and with int8 activations ("act i8") against llama-bench, decode in
GB/s of weights and as a share of the read probe (memory-bound)."""
from .llm_real import run_1b as run  # noqa: F401
