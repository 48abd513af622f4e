"""sqk.llm: large language models on sqk -- the decoder graph, its compiled
Module with the KV cache as state, and (growing) loaders, tokenizer,
sampling and evaluation.

Layout (DESIGN.md, "Real models"): file formats are frontends
(compiler/frontends/); this package holds the LLM layer itself:

- ``decoder``: ``LlamaConfig``, ``build_decoder`` (one step's graph),
  ``reference_logits`` (an independent numpy model), ``Decoder``.
- ``loader``: ``load(path)`` -> Decoder of a Hugging Face directory or a GGUF
  file (readers in compiler/frontends/hf.py and gguf.py); ``LLMLoadError``.

Loading an LLM artifact and generating needs the runtime only (numpy, cffi,
tokenizers), not llvmlite: modules here import the compiler lazily.
"""
from .decoder import (Decoder, LlamaConfig, QuantWeight, build_decoder, random_weights,  # noqa: F401
                      reference_logits, state_names)
from .errors import LLMLoadError  # noqa: F401
from .loader import load  # noqa: F401

from .. import lazy_submodules as _lazy

__getattr__, __dir__ = _lazy(__name__, __path__)  # sqk.X.module works after `import sqk`
