"""The one error of loading an LLM from its files."""


class LLMLoadError(ValueError):
    """A model file or directory sqk cannot load: an unsupported architecture
    or tensor type, a missing or truncated file.  The message names the file
    and what is wrong with it."""
