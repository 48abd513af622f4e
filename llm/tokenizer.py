"""Text <-> token ids, and chat templates, for the LLM layer.

One class, two sources. ``Tokenizer.from_hf_dir(dir)`` reads a Hugging Face model directory:
``tokenizer.json`` through the ``tokenizers`` package (its post-processor adds BOS/EOS), the
special tokens of ``tokenizer_config.json``, extra EOS ids from ``generation_config.json``, the
chat template from ``chat_template.jinja`` or ``tokenizer_config.json``. ``Tokenizer.from_gguf(file)``
builds the same kind of ``tokenizers.Tokenizer`` from a GGUF file's metadata, as llama.cpp reads it:

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE with the file's vocabulary and merges; the
  pre-tokenizer regex follows ``tokenizer.ggml.pre`` (``PRE_TOKENIZERS``: Llama 3, Qwen2,
  SmolLM/StarCoder's digit split, GPT-2's default).
- ``tokenizer.ggml.model = "llama"``: SentencePiece-style BPE (TinyLlama, Llama 2, Mistral):
  "▁" for spaces, byte fallback to ``<0xNN>`` tokens, merges from the file or, when it has none,
  recovered from the token scores (the pair whose merged piece scores highest merges first).

Control tokens (GGUF token type 3) become special tokens (kept whole in the text, dropped by
``decode(skip_special=True)``), user-defined ones (type 4) plain added tokens; BOS/EOS follow
``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` (defaults as llama.cpp's). Both routes give
the ids of transformers' own tokenizer for the same files (tests/test_tokenizer.py), except where
transformers' GGUF conversion departs from llama.cpp: it has no 'smollm' digit split (we follow
llama.cpp and SmolLM2's own tokenizer.json) and ignores ``add_space_prefix = false``.

Chat templates are rendered as transformers renders them: jinja2's sandboxed environment with
trim_blocks and lstrip_blocks, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII, and ``bos_token`` / ``eos_token`` / ``unk_token`` / ``pad_token`` as variables. The
rendered text already holds the special tokens the model expects, so it is encoded with
``add_special=False`` (``encode_chat`` does both).

``tokenizers`` and ``jinja2`` are imported when first needed (the ``llm`` extra).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes (llama.cpp's llama-vocab.cpp, the same as the models' tokenizer.json)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split, ignore_merges, llama.cpp's add_bos default), grouped as llama.cpp
# groups them. split: a regex applied before the byte-level mapping; "digits": each \p{N} alone,
# then GPT-2's regex (SmolLM, StarCoder, ...: their merges never join digits); None: GPT-2's regex.
# "default" (a file older than the key) gets GPT-2's regex, as transformers reads it.
PRE_TOKENIZERS = {
    **{name: (_LLAMA3, True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    "tekken": (_TEKKEN, True, True),
    **{name: (_QWEN2, False, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
    **{name: ("digits", False, False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                                   "exaone")},
    **{name: (None, False, False) for name in ("gpt-2", "gpt2", "mpt", "olmo", "jais", "default")},
}

# Token texts llama.cpp treats as end of generation besides the EOS/EOT/EOM ids (llama-vocab.cpp)
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
             "<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - the llm extra is a test dependency
        raise ImportError("sqk.llm tokenizers need the 'tokenizers' package (pip install 'sqk[llm]')") from e
    return tokenizers


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what generation needs: BOS/EOS ids and the chat template.

    Build it with ``Tokenizer.load(path)`` (a model directory, a ``tokenizer.json`` or a ``.gguf``),
    ``from_hf_dir``, ``from_gguf`` or ``from_file``; or wrap a ``tokenizers.Tokenizer`` directly."""

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 eos_ids=(), chat_template: str | None = None, special_tokens: dict | None = None,
                 vocab_size: int | None = None, source: str = "<tokenizers.Tokenizer>"):
        self.backend = backend
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = None if bos_token is None else backend.token_to_id(bos_token)
        ids = [] if eos_token is None or backend.token_to_id(eos_token) is None else [backend.token_to_id(eos_token)]
        self.eos_ids = tuple(dict.fromkeys(ids + [int(i) for i in eos_ids]))
        self.chat_template = chat_template
        # what the chat template sees besides the messages: bos_token, eos_token, unk_token, pad_token
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        self.vocab_size = int(vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, chat_template={'yes' if self.chat_template else 'no'})")

    # --- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds what the model's post-processor adds (BOS...)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, chat markers) are dropped when ``skip_special``."""
        ids = [self._check_id(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def _check_id(self, i) -> int:
        try:
            j = int(i)
        except (TypeError, ValueError):
            raise TypeError(f"token ids must be integers, got {i!r}") from None
        if j != i or not 0 <= j < self.vocab_size:
            raise ValueError(f"token id {i!r} is outside the vocabulary [0, {self.vocab_size}) of {self.source}")
        return j

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(self._check_id(i))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def stream(self) -> "TextStream":
        """An incremental decoder for generation: ``s.step(id) -> str`` gives the new text (possibly
        '' while a UTF-8 character is split across tokens); the pieces add up to ``decode(ids)``."""
        return TextStream(self)

    # --- chat --------------------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for ``messages`` (a list of ``{"role": ..., "content": ...}``), as
        transformers' ``apply_chat_template(..., tokenize=False)`` renders it. ``variables`` reach the
        template too (``tools``, ``documents``, ``enable_thinking``, ...)."""
        if not self.chat_template:
            raise ValueError(f"{self.source} has no chat template (tokenizer_config.json 'chat_template', "
                             "chat_template.jinja or GGUF 'tokenizer.chat_template'): chat needs one")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError("messages must be a list of dicts with a 'role' (and 'content'), "
                            f"got {messages!r:.200}")
        try:   # plain JSON data only: nothing with methods reaches the sandbox
            messages = json.loads(json.dumps(list(messages)))
            variables = json.loads(json.dumps(variables))
        except TypeError as e:
            raise TypeError(f"chat messages and template variables must be JSON data: {e}") from None
        context = {"tools": None, "documents": None, **{k: v for k, v in self.special_tokens.items() if v is not None},
                   **variables}
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=bool(add_generation_prompt), **context)

    def encode_chat(self, messages, add_generation_prompt: bool = True, **variables) -> list[int]:
        """Ids of the rendered chat template (``add_special=False``: the template writes BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **variables), add_special=False)

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """From a Hugging Face model directory, a ``tokenizer.json`` file or a ``.gguf`` file."""
        p = Path(path)
        if p.is_dir():
            return cls.from_hf_dir(p)
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer at {p}: expected a model directory with tokenizer.json, "
                                    "a tokenizer.json file or a .gguf file")
        if p.suffix.lower() == ".gguf" or _is_gguf(p):
            return cls.from_gguf(p)
        if p.name == "tokenizer.json":          # with the configs beside it
            return cls.from_hf_dir(p.parent)
        return cls.from_file(p)

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """From a ``tokenizer.json`` alone (no BOS/EOS names, no chat template: see ``from_hf_dir``)."""
        p = Path(path)
        backend = _backend_from_json(p)
        return cls(backend, source=str(p))

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """From a Hugging Face model directory: tokenizer.json [+ tokenizer_config.json,
        special_tokens_map.json, generation_config.json (or config.json), chat_template.jinja]."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a directory")
        backend = _backend_from_json(d / "tokenizer.json")
        cfg = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        gen = _read_json(d / "generation_config.json") or _read_json(d / "config.json")

        def token(name):
            return _token_text(cfg.get(name, smap.get(name)))

        bos, eos = token("bos_token"), token("eos_token")
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = backend.id_to_token(gen["bos_token_id"])
        if eos is None and isinstance(gen.get("eos_token_id"), int):
            eos = backend.id_to_token(gen["eos_token_id"])
        extra = gen.get("eos_token_id")
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        # BOS/EOS insertion is tokenizer.json's post-processor; like transformers (5.x) we ignore
        # tokenizer_config.json's add_bos_token / add_eos_token when tokenizer.json is there
        return cls(backend, bos_token=bos, eos_token=eos, eos_ids=extra, chat_template=_hf_chat_template(d, cfg),
                   special_tokens={"unk_token": token("unk_token"), "pad_token": token("pad_token")}, source=str(d))

    def save(self, directory) -> Path:
        """Write tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        generation_config.json (BOS/EOS ids) into ``directory``; ``from_hf_dir`` reads them back."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        cfg = {k: v for k, v in self.special_tokens.items() if v is not None}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        gen = {"bos_token_id": self.bos_id, "eos_token_id": list(self.eos_ids)}
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        return d

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """From a GGUF file's tokenizer metadata; ``source`` is a path or an open ``gguf.GGUFReader``."""
        reader, where = _gguf_reader(source)
        f = _GGUFFields(reader, where)
        model = f.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError(f"{where} has no tokenizer metadata (tokenizer.ggml.model); "
                             "put the model's tokenizer.json beside it")
        tokens = f.require("tokenizer.ggml.tokens")
        types = f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
        ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
        for k, v in ids.items():
            if v is not None and not 0 <= v < len(tokens):
                raise ValueError(f"{where}: tokenizer.ggml.{k}_token_id = {v} is outside the {len(tokens)} tokens")
        if model == "gpt2":
            pre = f.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                raise ValueError(f"{where}: pre-tokenizer tokenizer.ggml.pre = {pre!r} is not supported "
                                 f"(supported: {', '.join(sorted(PRE_TOKENIZERS))}); "
                                 "put the model's tokenizer.json beside it")
            backend, tokens = _byte_level_bpe(tokens, f.require("tokenizer.ggml.merges"), types, pre, where)
            add_bos_default = PRE_TOKENIZERS[pre][2]
        elif model == "llama":
            unk = ids["unknown"] if ids["unknown"] is not None else 0
            backend = _sentencepiece_bpe(tokens, f.get("tokenizer.ggml.scores"), f.get("tokenizer.ggml.merges"),
                                         types, unk, bool(f.get("tokenizer.ggml.add_space_prefix", True)), where)
            add_bos_default = True
        else:
            raise ValueError(f"{where}: tokenizer.ggml.model = {model!r} is not supported "
                             "(sqk builds 'gpt2' byte-level BPE and 'llama' SentencePiece vocabularies); "
                             "put the model's tokenizer.json beside it")

        def text(i):
            return None if i is None else tokens[i]

        bos, eos = text(ids["bos"]), text(ids["eos"])
        specials = [t for t in (bos, eos, text(ids["unknown"]), text(ids["padding"])) if t is not None]
        _add_special(backend, specials)
        _set_post_processor(backend, bos if f.get("tokenizer.ggml.add_bos_token", add_bos_default) else None,
                            eos if f.get("tokenizer.ggml.add_eos_token", False) else None, where=where)
        eog = [ids["eot"], ids["eom"]] + [i for i, t in enumerate(tokens) if t in EOG_TEXTS]
        return cls(backend, bos_token=bos, eos_token=eos, eos_ids=[i for i in eog if i is not None],
                   chat_template=f.get("tokenizer.chat_template"), vocab_size=len(tokens),
                   special_tokens={"unk_token": text(ids["unknown"]), "pad_token": text(ids["padding"])},
                   source=where)


class TextStream:
    """Incremental decoding (``Tokenizer.stream()``): text appears once its bytes are complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._stream = _tokenizers().decoders.DecodeStream(skip_special_tokens=True)

    def step(self, token_id) -> str:
        tok = self.tokenizer
        return self._stream.step(tok.backend, tok._check_id(token_id)) or ""


# --- Hugging Face files ----------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _backend_from_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path} (sqk reads the 'fast' tokenizer file: "
                                "a tokenizer.model or vocab.txt alone is not enough; transformers' "
                                "save_pretrained writes tokenizer.json)")
    try:
        backend = _tokenizers().Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise ValueError(f"{path} is not a tokenizer.json the tokenizers package can read: {e}") from None
    # a saved padding / truncation setting (e.g. pad to 128 for an encoder) would pad or cut prompts
    backend.no_padding()
    backend.no_truncation()
    return backend


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(d: Path, cfg: dict) -> str | None:
    # as transformers: a chat_template.jinja beside the config wins over the config's entry
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if template is None:
        template = _read_json(d / "chat_template.json").get("chat_template")
    if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{d / 'tokenizer_config.json'}: several chat templates ({', '.join(map(str, named))}) "
                             "and none named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{d}: chat_template must be a string, got {type(template).__name__}")
    return template


def _set_post_processor(backend, bos: str | None, eos: str | None, where) -> None:
    """BOS before / EOS after each sequence (None: not added), as transformers' update_post_processor."""
    tk = _tokenizers()
    specials = []
    for t in (bos, eos):
        if t is not None:
            i = backend.token_to_id(t)
            if i is None:
                raise ValueError(f"{where}: special token {t!r} is not in the vocabulary")
            specials.append((t, i))
    b = f"{bos}:0 " if bos is not None else ""
    e = f" {eos}:0" if eos is not None else ""
    single = f"{b}$A:0{e}"
    pair = f"{single}{' ' + bos + ':1' if bos is not None else ''} $B:1{' ' + eos + ':1' if eos is not None else ''}"
    backend.post_processor = tk.processors.TemplateProcessing(single=single, pair=pair,
                                                              special_tokens=list(dict.fromkeys(specials)))


def _add_special(backend, texts) -> None:
    tk = _tokenizers()
    backend.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(texts)])


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """The chat template compiled in transformers' environment (chat templates are untrusted code)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - the llm extra is a test dependency
        raise ImportError("chat templates need the 'jinja2' package (pip install 'sqk[llm]')") from e

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training): rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


# --- GGUF metadata ---------------------------------------------------------------------------

def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _gguf_reader(source):
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {p}")
        try:
            import gguf
        except ImportError as e:  # pragma: no cover
            raise ImportError("reading GGUF files needs the 'gguf' package (pip install 'sqk[llm]')") from e
        try:
            return gguf.GGUFReader(str(p)), str(p)
        except Exception as e:  # the reader raises ValueError / struct errors on a bad file
            raise ValueError(f"{p} is not a readable GGUF file: {e}") from None
    if hasattr(source, "fields"):
        return source, str(getattr(source, "path", "<GGUFReader>"))
    raise TypeError(f"from_gguf takes a path or a gguf.GGUFReader, got {type(source).__name__}")


class _GGUFFields:
    def __init__(self, reader, where: str):
        self.fields, self.where = reader.fields, where

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.where}: GGUF metadata {key} is missing")
        return value


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _split_merges(merges, vocab: dict[str, int], where: str) -> list[tuple[str, str]]:
    """GGUF merges ("a b") as pairs, each checked: the tokenizers package panics on a bad one."""
    out = []
    for n, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{where}: merge {n} ({m!r}) is not two tokens separated by one space")
        a, b = parts
        if a not in vocab or b not in vocab or a + b not in vocab:
            missing = next(t for t in (a, b, a + b) if t not in vocab)
            raise ValueError(f"{where}: merge {n} ({m!r}) needs {missing!r}, which is not in the vocabulary")
        out.append((a, b))
    return out


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str, where: str):
    """(tokenizers.Tokenizer, tokens as spelled in it) for a 'gpt2' vocabulary."""
    tk = _tokenizers()
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    # a token outside the byte alphabet (a mislabelled added token) is looked up by its bytes' spelling
    spelled = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")) for t in tokens]
    split, ignore_merges, _ = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(spelled)}
    model = tk.models.BPE(vocab, _split_merges(merges, vocab, where), dropout=None,
                          continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                          ignore_merges=ignore_merges)
    backend = tk.Tokenizer(model)
    pt = tk.pre_tokenizers
    if split is None:
        backend.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        backend.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                             pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pt.Sequence([pt.Split(tk.Regex(split), behavior="isolated"),
                                             pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = tk.decoders.ByteLevel()
    # as transformers: a control token outside the alphabet is a mislabel, kept as an ordinary token
    _add_typed_tokens(backend, tokens, types, keep=lambda t: set(t) <= alphabet)
    return backend, spelled


def _sentencepiece_bpe(tokens, scores, merges, types, unk: int, add_space_prefix: bool, where: str):
    """A tokenizers.Tokenizer for a 'llama' (SentencePiece) vocabulary."""
    tk = _tokenizers()
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = _split_merges(merges, vocab, where)
    else:
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{where}: a 'llama' vocabulary needs tokenizer.ggml.scores (one per token) "
                             "or tokenizer.ggml.merges")
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    model = tk.models.BPE(vocab, pairs, unk_token=tokens[unk] if 0 <= unk < len(tokens) else None,
                          fuse_unk=True, byte_fallback=True, dropout=None)
    backend = tk.Tokenizer(model)
    backend.pre_tokenizer = tk.pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if add_space_prefix:
        steps.append(tk.decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = tk.decoders.Sequence(steps)
    _add_typed_tokens(backend, tokens, types, keep=lambda t: True)
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces of
    the vocabulary, best merged-piece score first (ties: longer left part, then longer right part,
    then vocabulary order), as transformers' ``generate_merges``."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_typed_tokens(backend, tokens, types, keep) -> None:
    """Control tokens -> special added tokens; user-defined -> plain added tokens (kept whole)."""
    tk = _tokenizers()
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and keep(t)]
    if control:
        backend.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and keep(t)]
    if user:
        backend.add_tokens([tk.AddedToken(t, normalized=False, special=False) for t in user])
