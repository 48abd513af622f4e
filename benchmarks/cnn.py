"""CNNs through ONNX: resnet18 and mobilenet_v2 (torchvision's architectures,
written here in plain torch: torchvision's wheels pair with a CUDA torch),
random weights from a fixed seed, batch 1, 224x224, sqk vs onnxruntime.

Rows: sqk fp32 (3x3 stride-1 convolutions as winograd F(2x2, 3x3), strided
ones as im2col + GEMM) vs ORT fp32; sqk int8 (``quantize="int8", activations="int8", calibration="minmax"``
calibrated on IMAGES random images: int8 per-channel weights and static int8
activations for every groups-1 convolution (conv2d_q) and the classifier;
mobilenet_v2's depthwise convolutions stay fp32) vs ORT ``quantize_static``
(QDQ, per-channel int8 weights, uint8 activations calibrated on the same
images through a CalibrationDataReader).  Each row: median ms, ratios to ORT
fp32 and int8, top-1 agreement with ORT fp32 over HELD other random images
and the logit cosine.
Then each sqk model's time per op kind and slowest kernels (Module.profile).

BatchNorm layers are in eval mode with random statistics, so the importer's
conv+BN folding has real work to do; the classifier's bias centres the logits
over a few other random images (``center_logits``), so that the top class
depends on the image.  Exports are cached like the onnx
benchmark's (``benchmarks.onnx_models.cache_dir``).  Needs torch (not a
dependency of sqk).
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from . import Table, median, timeit
from .onnx_models import _export, cache_dir, cosine, ort_session, top_kernels

SIZE = 224
CLASSES = 1000
IMAGES = 16          # random images for both int8 calibrations
HELD = 64            # other random images for top-1 agreement
RUNS = 9
INNER = 3


def _bn_random(bn, gen):
    """Eval-mode BatchNorm with random statistics (a fold that changes the weights)."""
    import torch

    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)


def _init(model, seed: int = 0):
    """torchvision's initialization (kaiming-normal fan_out convs, normal(0, 0.01)
    linear), then random BatchNorm statistics; seeded."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            with torch.no_grad():
                m.weight.normal_(0, (2.0 / fan_out) ** 0.5, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            _bn_random(m, gen)
        elif isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.normal_(0, 0.01, generator=gen)
                # rows summing to zero: the pooled features share a large positive mean
                # (after ReLU) that would otherwise pick the same class for every image
                m.weight.sub_(m.weight.mean(dim=1, keepdim=True))
                m.bias.zero_()
    return model.eval()


def resnet18(classes: int = CLASSES):
    """torchvision.models.resnet18's architecture (BasicBlock x [2, 2, 2, 2])."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return _init(nn.Sequential(*layers))


def mobilenet_v2(classes: int = CLASSES):
    """torchvision.models.mobilenet_v2's architecture (width 1.0; inverted
    residuals with ReLU6, dropout omitted: it is the identity in eval)."""
    from torch import nn

    def cbr(cin, cout, k=3, stride=1, groups=1, act=True):
        mods = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return mods + ([nn.ReLU6(inplace=True)] if act else [])

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            mods = cbr(cin, hidden, 1) if expand != 1 else []
            mods += cbr(hidden, hidden, 3, stride, hidden) + cbr(hidden, cout, 1, act=False)
            self.conv = nn.Sequential(*mods)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    layers = cbr(3, 32, 3, 2)
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(Inverted(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += cbr(cin, 1280, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes)]
    return _init(nn.Sequential(*layers))


MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def center_logits(model, size: int, count: int = 8, seed: int = 2):
    """Set the classifier's bias to -W @ (mean pooled features over ``count`` random
    images of another seed): a random network's features are mostly the same for
    every input, which would make one class win for every image; centred, the
    logits follow what differs between images, so top-1 agreement means something."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        feats = model[:-1](torch.randn(count, 3, size, size, generator=gen))
        fc = model[-1]
        fc.bias.copy_(-fc.weight @ feats.mean(dim=0))
    return model


def export(name: str, size: int = SIZE, classes: int = CLASSES) -> str:
    """Path of the cached ONNX export of MODELS[name] (input "image" [1, 3, size,
    size] f32, output "logits" [1, classes])."""
    import torch

    def build(config, seq):
        model = center_logits(MODELS[config["arch"]](config["classes"]), seq)
        return model, (torch.zeros(1, 3, seq, seq),), ["image"], ["logits"]

    if name not in MODELS:
        raise ValueError(f"unknown CNN {name!r}; choose from {', '.join(MODELS)}")
    return _export(name, {"arch": name, "classes": classes, "init": 3}, size, build)


def images(count: int = IMAGES, size: int = SIZE, seed: int = 1) -> list[np.ndarray]:
    """Random standard-normal images [1, 3, size, size] (what a normalized photo's range looks like)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, size, size), dtype=np.float32) for _ in range(count)]


def ort_static_int8(path: str, out: str, calib: list[np.ndarray]) -> str:
    """onnxruntime's quantize_static of ``path``: QDQ, per-channel int8 weights, uint8
    activations (MinMax over ``calib``); reduce_range off (see the run's notes)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": x} for x in calib])

        def get_next(self):
            return next(self.it, None)

    ort.set_default_logger_severity(3)   # its unused-initializer warnings are about the export
    quantize_static(path, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _agreement(outs: list, ref: list) -> tuple[float, float]:
    """(top-1 agreement, mean logit cosine) of ``outs`` against ``ref``."""
    top = np.mean([np.argmax(a) == np.argmax(r) for a, r in zip(outs, ref)])
    return float(top), float(np.mean([cosine(a, r) for a, r in zip(outs, ref)]))


def run(threads: int) -> Table:
    import sqk

    threads = 2 if threads is None else threads
    imgs = images()
    t = Table(f"CNNs, batch 1, {SIZE}x{SIZE}, {threads} threads, random weights (seeded)",
              ["model", "contender", "ms", "vs ORT fp32", "vs ORT int8", f"top-1 agree ({HELD})", "logit cos"])
    notes, secs = [], {}
    for name in MODELS:
        path = export(name)
        t0 = time.perf_counter()
        fp32 = sqk.compile(sqk.from_onnx(path), threads=threads)
        secs[f"{name} fp32"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        int8 = sqk.compile(sqk.from_onnx(path), quantize="int8", activations="int8", calibration="minmax",
                           calibration_data=[{"image": x} for x in imgs], threads=threads)
        secs[f"{name} int8"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            ort32 = ort_session(path, threads)
            ort8 = ort_session(ort_static_int8(path, os.path.join(tmp, "int8.onnx"), imgs), threads)
        held = images(HELD, seed=7)
        ref = [ort32.run(None, {"image": x})[0] for x in held]
        contenders = {"ORT fp32": lambda x: ort32.run(None, {"image": x})[0],
                      "sqk fp32": lambda x: fp32(image=x),
                      "ORT int8 (quantize_static QDQ)": lambda x: ort8.run(None, {"image": x})[0],
                      "sqk int8 (quantize int8, static int8 activations)": lambda x: int8(image=x)}
        quality = {k: _agreement([f(x) for x in held], ref) for k, f in contenders.items()}
        err = max(float(np.max(np.abs(fp32(image=x) - r)) / np.max(np.abs(r))) for x, r in zip(held, ref))
        if err > 1e-3:
            raise AssertionError(f"{name}: sqk fp32 differs from ORT fp32 (max relative error {err:.2e})")
        x0 = imgs[0]
        times = {k: median(v) * 1e3 for k, v in
                 timeit({k: (lambda f: lambda: f(x0))(f) for k, f in contenders.items()}, RUNS, inner=INNER).items()}
        o32, o8 = times["ORT fp32"], times["ORT int8 (quantize_static QDQ)"]
        for k, ms in times.items():
            top, cos = quality[k]
            t.add(name, k, f"{ms:.2f}", f"{ms / o32:.2f}", f"{ms / o8:.2f}", f"{top:.3f}", f"{cos:.5f}")
        classes = len({int(np.argmax(r)) for r in ref})
        notes.append(f"{name}: ORT fp32's top-1 over the {HELD} held-out images falls on {classes} distinct classes; "
                     f"sqk fp32 max relative error to ORT fp32 {err:.1e}")
        for label, mod in (("fp32", fp32), ("int8", int8)):
            rows, by_op, total = top_kernels(mod, {"image": x0})
            notes.append(f"{name} sqk {label} profile (kernels sum to {total:.2f} ms): by op " + ", ".join(
                f"{op} {ms:.2f} ms/{n}" for op, (ms, n) in list(by_op.items())[:5]) + "; slowest kernels "
                + ", ".join(f"{k} {ms:.2f} ms" for k, ms in rows[:4]))
    t.notes += [f"ms per call: median of {RUNS} interleaved runs of {INNER} calls each (one image); "
                f"top-1 agreement and logit cosine against ORT fp32 over {HELD} held-out random N(0,1) images",
                "ORT int8: quantize_static(QuantFormat.QDQ, per_channel=True, activations QUInt8, weights QInt8, "
                f"MinMax calibration on {IMAGES} random images through a CalibrationDataReader)",
                "sqk int8: compile(quantize='int8', activations='int8', calibration='minmax') on the same "
                f"{IMAGES} images: groups-1 convolutions as conv2d_q and the classifier as matmul_q, static "
                "per-tensor int8 activations, per-channel int8 weights; depthwise convolutions stay fp32",
                "sqk fp32: 3x3 stride-1 convolutions (>= 16 channels) as winograd F(2x2, 3x3), strided ones "
                "(>= 16 channels) as im2col + GEMM",
                "compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()),
                "targets (issue 19): fp32 <= 0.8x ORT fp32; int8 <= 1.0x ORT int8 at top-1 agreement"] + notes
    return t
