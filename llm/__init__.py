"""sqk.llm: large language models on sqk -- the decoder graph, its compiled
Module with the KV cache as state, and (growing) loaders, tokenizer,
sampling and evaluation.

Layout (DESIGN.md, "Real models"): file formats are frontends
(compiler/frontends/); this package holds the LLM layer itself:

- ``decoder``: ``LlamaConfig``, ``build_decoder`` (one step's graph),
  ``reference_logits`` (an independent numpy model), ``Decoder``.
- ``loader``: ``load(path)`` -> Decoder of a Hugging Face directory, a GGUF
  file (readers in compiler/frontends/hf.py and gguf.py) or an LLM artifact;
  ``LLMLoadError``.
- ``artifact``: LLM artifacts (``sqk compile MODEL -o model.sqk``): ``save_llm``,
  ``load_llm``.
- ``native``: riscv64 generation in one runner process (the runner's generate mode).
- ``perplexity``: ``perplexity(decoder, text, ctx=, stride=, base=)`` as
  llama.cpp's llama-perplexity, with KL divergence / top-1 agreement against a
  base (``fp32_decoder``); ``offline_text()`` an English text to measure on.

Loading an LLM artifact and generating needs the runtime only (numpy, cffi,
tokenizers), not llvmlite: modules here import the compiler lazily.
"""
from .decoder import (Decoder, LlamaConfig, QuantWeight, build_decoder, random_weights,  # noqa: F401
                      reference_logits, state_names)
from .errors import LLMLoadError  # noqa: F401
from .loader import load  # noqa: F401
from .perplexity import PerplexityResult, fp32_decoder, offline_text, perplexity  # noqa: F401

from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
