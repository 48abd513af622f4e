"""The quantize pass's conv2d layers: int8 weights per output channel and int8
activations with a static, calibrated scale.

    conv2d(x, w, bias)  ->  conv2d_q(conv_input_q(x) {act_scale, pads}, q, scales, bias)

(ir/ops.py; kernels in codegen/conv_q.py).  Taken by ``quantize{weights=int8,
activations=int8, calibration=minmax|percentile|mse}`` (symmetric, round to
nearest, the default scheme and method) for every conv2d with groups 1, a
constant f32 filter and an f32 input; the activation scale comes from the
layer's input over ``calibration_data`` exactly as a matmul's
(``Quantize._act_scale``).  Other settings (dynamic activations, int4, asym,
GPTQ/AWQ/imatrix) keep convolutions in float: conv2d_q has one static scale
per tensor and symmetric per-channel codes.  Depthwise and grouped
convolutions stay float too, and so does a layer whose error exceeds
``max_error`` (as a matmul would).  Where x is never negative by construction (a
relu's result, pooled or added: ``never_negative``) both nodes are
``unsigned``: the same codes, and a kernel without the sign trick.  Each layer's report row gives the relative L2
error and cosine of its output on one calibration input (activation rounding
included) against the float convolution.
"""
from __future__ import annotations

import numpy as np

from ...ir import dtypes as dt
from ...ir.graph import Graph, Node, TensorType, Value
from ...ir.ops import OPS, QUAD
from .. import quantize as qm


def conv_weights(p, graph: Graph) -> dict:
    """{filter value: [conv2d nodes]} the pass ``p`` (a Quantize) makes int8: none
    unless its settings are the ones conv2d_q computes (module docstring)."""
    if not (p.activations == "int8" and p.static and p.bits == 8 and p.scheme == "sym" and p.method == "rtn"):
        return {}
    prod = graph.producers()
    out: dict = {}
    for n in graph.nodes:
        if n.op != "conv2d" or n.attrs["groups"] != 1 or n.inputs[0].dtype is not dt.f32:
            continue
        w = n.inputs[1]
        src = prod.get(w)
        if src is not None and src.op == "const" and w.dtype is dt.f32 and w.type.size:
            out.setdefault(w, []).append(n)
    return out


def never_negative(v: Value, prod: dict) -> bool:
    """``v`` is >= 0 (or NaN) by construction: a relu's result, or pooling, reshaping or
    adding such results."""
    n = prod.get(v)
    if n is None:
        return False
    if n.op == "relu":
        return True
    if n.op in ("maxpool2d", "avgpool2d", "global_avgpool", "reshape"):
        return never_negative(n.inputs[0], prod)
    if n.op == "add":
        return all(never_negative(x, prod) for x in n.inputs)
    return False


def quad_filter(q: np.ndarray) -> np.ndarray:
    """Codes [C_out, C_in, KH, KW] as conv2d_q's q [C_out, C4, KH, KW, 4] (0 past C_in)."""
    co, c, kh, kw = q.shape
    c4 = -(-c // QUAD)
    padded = np.zeros((co, c4 * QUAD, kh, kw), np.int8)
    padded[:, :c] = q
    return np.ascontiguousarray(padded.reshape(co, c4, QUAD, kh, kw).transpose(0, 1, 3, 4, 2))


def _layer_error(node: Node, x: np.ndarray, w, q4, scales, act_scale: float) -> tuple[float, float]:
    """(relative L2, cosine) of the int8 layer's output against the float one on input x."""
    a = node.attrs
    ref = OPS["conv2d"].reference(x, w, None, strides=a["strides"], pads=a["pads"], dilations=a["dilations"],
                                  groups=1)[0].astype(np.float64).ravel()
    xq = OPS["conv_input_q"].reference(x, act_scale=act_scale, pads=a["pads"])[0]
    got = OPS["conv2d_q"].reference(xq, q4, scales, None, strides=a["strides"], dilations=a["dilations"],
                                    act_scale=act_scale)[0].astype(np.float64).ravel()
    den = float(np.linalg.norm(ref)) or 1.0
    cos = float(got @ ref / ((np.linalg.norm(got) * np.linalg.norm(ref)) or 1.0))
    return float(np.linalg.norm(got - ref)) / den, cos


def quantize_convs(p, fp32: Graph, graph: Graph, convs: dict, calib, taken: set, report, fresh) -> Graph:
    """``graph`` (the pass's output so far) with the conv2d layers of ``convs`` (found in
    the float graph ``fp32``) as conv_input_q + conv2d_q; rows appended to ``report``."""
    skip = set(qm_split(p.skip))
    xs = list(dict.fromkeys(n.inputs[0] for ns in convs.values() for n in ns))
    stats = calib.stats(fp32, xs)
    prod = fp32.producers()
    sample = calib.samples[0] if calib.samples else None
    env = None
    replace: dict[int, list[Node]] = {}
    consts: dict[Value, list[Node]] = {}
    for w, nodes in convs.items():
        arr = np.asarray(prod[w].attrs["value"], np.float32)
        co = arr.shape[0]
        row = {"layer": w.name, "shape": arr.shape, "dtype": "f32", "float_bytes": w.type.nbytes, "method": "rtn",
               "calibration": calib.source}
        if w.name in skip:
            report.append({**row, "weights": "f32", "rel_l2": None, "cosine": None, "bytes": w.type.nbytes,
                           "status": "skipped (skip=)"})
            continue
        q, s, _ = qm.quantize_weight(arr.reshape(co, -1).T, 8, arr[0].size, "sym", "f32", name=w.name)
        q4 = quad_filter(np.asarray(q).T.reshape(arr.shape))
        scales = np.ascontiguousarray(np.asarray(s, np.float32).reshape(co))
        vq = Value(fresh(f"{w.name}.q", taken), TensorType(dt.i8, q4.shape))
        vs = Value(fresh(f"{w.name}.scales", taken), TensorType(dt.f32, scales.shape))
        q4.setflags(write=False), scales.setflags(write=False)
        consts[w] = [Node("const", (), (vq,), {"value": q4}), Node("const", (), (vs,), {"value": scales})]
        errs = []
        for n in nodes:
            d = p._act_scale(stats[n.inputs[0]], w.name)
            if sample is not None:
                if env is None:
                    from ...ir.reference import run_reference
                    env = run_reference(fp32, sample, keep_all=True)
                errs.append(_layer_error(n, env[n.inputs[0]][:1], arr, q4, scales, d))
            xq = Value(fresh(f"{n.output.name}.xq", taken), OPS["conv_input_q"].infer(
                n.inputs[0].type, act_scale=d, pads=n.attrs["pads"])[0])
            # after a relu the codes are 0..127: the kernel skips the sign trick
            pos = never_negative(n.inputs[0], prod)
            attrs = {"strides": n.attrs["strides"], "dilations": n.attrs["dilations"], "act_scale": d,
                     "unsigned": pos}
            replace[id(n)] = [Node("conv_input_q", (n.inputs[0],), (xq,),
                                   {"act_scale": d, "pads": n.attrs["pads"], "unsigned": pos}),
                              Node("conv2d_q", (xq, vq, vs, *n.inputs[2:]), n.outputs, attrs)]
        rel, cos = (max(e[0] for e in errs), min(e[1] for e in errs)) if errs else (None, None)
        spelled = f"int8 per-channel sym + i8 act {p.calibration} (conv2d_q)"
        if rel is not None and rel > p.max_error:   # mixed precision, as for matmuls
            for m in nodes:
                del replace[id(m)]
            del consts[w]
            report.append({**row, "weights": "f32", "rel_l2": rel, "cosine": cos, "bytes": w.type.nbytes,
                           "status": f"kept f32: {spelled} error {rel:.3g} > max_error {p.max_error:g}"})
            continue
        report.append({**row, "weights": spelled, "rel_l2": rel, "cosine": cos, "bytes": q4.nbytes + scales.nbytes,
                       "status": "quantized", "act_scales": [replace[id(m)][1].attrs["act_scale"] for m in nodes]})
    out = []
    for n in graph.nodes:
        out.extend(replace.get(id(n), [n]))
        if n.op == "const" and n.output in consts:
            out.extend(consts[n.output])
    return graph.with_nodes(out)


def qm_split(spec: str) -> list[str]:
    from .quantize import split_names
    return split_names(spec)
