"""Moved to the package ``sqk.llm`` (llm/decoder.py); this import path stays."""
from ..llm.decoder import *  # noqa: F401,F403
from ..llm.decoder import Decoder, LlamaConfig, build_decoder, random_weights, reference_logits, state_names  # noqa: F401
