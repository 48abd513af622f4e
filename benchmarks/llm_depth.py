"""``python -m benchmarks llm-depth``: only llm-real's depth rows (benchmarks/llm_real.py
``run_depth``): SmolLM2-135M q4_0, tg64 after prompts of 64 and 4096 tokens, sqk with
its f16, f32 and int8 KV caches against llama-bench ``-d 64,4096``."""
from .llm_real import run_depth as run  # noqa: F401
