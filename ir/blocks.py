"""GGML's tensor types (GGUF files) as numpy: block sizes, exact dequantization,
and the split of pre-quantized blocks into ``matmul_q`` inputs.

A GGUF matrix of logical shape (N, K) is stored row after row (one row per
output feature), each row ``K // block`` blocks along K.  Here ``raw`` is that
storage as uint8 [N, row_bytes] (what ``gguf.GGUFReader`` gives for quantized
tensors); F32 / F16 / BF16 tensors may also come as their own dtype.

Block layouts and dequantization (llama.cpp ggml-common.h / ggml-quants.c), u
an unsigned code, all arithmetic in f32:

  ======  =====  =====  =====================================================
  type    block  bytes  layout -> value
  ======  =====  =====  =====================================================
  Q8_0     32     34    f16 d, i8 q[32]                      -> d * q
  Q4_0     32     18    f16 d, u4 u[32] (byte j: u[j] low, u[j+16] high)
                                                             -> d * (u - 8)
  Q4_1     32     20    f16 d, f16 m, u4 u[32] (as Q4_0)     -> d * u + m
  Q5_0     32     22    f16 d, u32 qh, u4 u[32] (as Q4_0): code c = u | (bit j
                        of qh) << 4 for weight j                -> d * (c - 16)
  Q4_K    256    144    f16 d, f16 dmin, 12 bytes of eight 6-bit (sc, m),
                        u4 u[256] (32-byte chunk c: sub-block 2c low
                        nibbles, 2c+1 high)   -> (d * sc_j) * u - (dmin * m_j)
  Q6_K    256    210    u4 ql[128], u2 qh[64], i8 sc[16], f16 d
                        -> (d * sc_j) * (6-bit code - 32), j per 16
  ======  =====  =====  =====================================================

Every product above is exact in f32 (at most 11 + 7 + 6 significant bits), so
the only rounding is Q4_1's and Q4_K's final add: the ``matmul_q`` forms below
give bit for bit the same weights (``ir.ops.dequantize_weight``), and
``gather_q`` with the same operands gives rows of the table (a tied embedding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import IRError


@dataclass(frozen=True)
class BlockType:
    name: str
    code: int          # GGMLQuantizationType value
    block: int         # weights per block
    nbytes: int        # bytes per block


TYPES = {t.name: t for t in (
    BlockType("F32", 0, 1, 4), BlockType("F16", 1, 1, 2), BlockType("BF16", 30, 1, 2),
    BlockType("Q4_0", 2, 32, 18), BlockType("Q4_1", 3, 32, 20), BlockType("Q5_0", 6, 32, 22),
    BlockType("Q8_0", 8, 32, 34),
    BlockType("Q4_K", 12, 256, 144), BlockType("Q6_K", 14, 256, 210))}
BY_CODE = {t.code: t for t in TYPES.values()}
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
# kept as the file's blocks (matmul_ggml / gather_ggml): matmul_q has no codes of their width
GGML_BLOCKS = ("Q5_0", "Q6_K")


def block_type(ggml_type) -> BlockType:
    """A type by name ("Q4_1"), GGMLQuantizationType (or its int code) or BlockType."""
    if isinstance(ggml_type, BlockType):
        return ggml_type
    name = getattr(ggml_type, "name", ggml_type)
    if isinstance(name, str) and name.upper() in TYPES:
        return TYPES[name.upper()]
    if isinstance(ggml_type, (int, np.integer)) and int(ggml_type) in BY_CODE:
        return BY_CODE[int(ggml_type)]
    raise IRError(f"GGML tensor type {ggml_type!r} is not supported; supported: {', '.join(TYPES)}")


def _rows(t: BlockType, raw, shape) -> tuple[np.ndarray, int, int]:
    """raw as uint8 [N, row_bytes], checked against shape (N, K)."""
    if len(shape) != 2:
        raise IRError(f"{t.name} matrix shape must be (N, K), got {tuple(shape)}")
    n, k = (int(s) for s in shape)
    if k % t.block:
        raise IRError(f"{t.name} rows of K={k} weights are not whole blocks of {t.block} (GGUF requires K % "
                      f"{t.block} == 0)")
    a = np.asarray(raw)
    row_bytes = k // t.block * t.nbytes
    if a.dtype != np.uint8:
        a = np.ascontiguousarray(a).view(np.uint8)
    if a.size != n * row_bytes:
        raise IRError(f"{t.name} tensor of shape (N={n}, K={k}) needs {n} rows of {row_bytes} bytes, got "
                      f"{a.size} bytes (shape {np.asarray(raw).shape}, {np.asarray(raw).dtype})")
    return a.reshape(n, row_bytes), n, k


def _f16(b: np.ndarray) -> np.ndarray:
    """f16 fields, [..., 2] uint8 little-endian -> f32 [...] (exact)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q5_0_codes(blk: np.ndarray) -> np.ndarray:
    """Q5_0 blocks [..., 22] -> 5-bit codes - 16, int8 [..., 32]: weight j's low
    four bits are Q4_0's nibble, its fifth bit j of the little-endian u32 qh."""
    qh = np.ascontiguousarray(blk[..., 2:6]).view("<u4")                       # [..., 1]
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4    # [..., 32]
    return (_nibbles(blk[..., 6:]) | hi).astype(np.int8) - np.int8(16)


def _q4k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes [..., 12] -> (sc, m) [..., 8], 6 bits each: j < 4 in the
    low 6 bits of bytes j and j + 4; j >= 4 split over byte j + 4 (low 4 bits of
    each) and the top 2 bits of bytes j - 4 and j."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q6k_codes(blk: np.ndarray) -> np.ndarray:
    """Q6_K blocks [..., 210] -> 6-bit codes - 32, int8 [..., 256].  Within each
    half h of 128 weights, weight 32*i + l (i < 4, l < 32) takes the low or high
    nibble (i >= 2) of ql[64h + 32*(i % 2) + l] and bits 2i..2i+1 of qh[32h + l]."""
    ql, qh = blk[..., :128], blk[..., 128:192]
    out = []
    for h in range(2):
        l4 = ql[..., 64 * h:64 * h + 64]
        h2 = qh[..., 32 * h:32 * h + 32]
        for i in range(4):
            lo = l4[..., 32 * (i % 2):32 * (i % 2) + 32]
            lo = (lo >> 4) if i >= 2 else (lo & 0x0F)
            out.append(lo | (((h2 >> (2 * i)) & 3) << 4))
    return np.concatenate(out, axis=-1).astype(np.int8) - np.int8(32)


def dequantize(ggml_type, raw, shape) -> np.ndarray:
    """f32 [N, K] of a GGML matrix (or any tensor with shape (..., K) for the float
    types), exactly as ggml dequantizes it."""
    t = block_type(ggml_type)
    if t.name in ("F32", "F16", "BF16"):
        shape = tuple(int(s) for s in shape)
        a = np.ascontiguousarray(np.asarray(raw))
        if a.nbytes != int(np.prod(shape)) * t.nbytes:
            raise IRError(f"{t.name} tensor of shape {shape} needs {int(np.prod(shape)) * t.nbytes} bytes, "
                          f"got {a.nbytes}")
        flat = a.reshape(-1).view(np.uint8)
        if t.name == "F32":
            return flat.view("<f4").astype(np.float32).reshape(shape)
        if t.name == "F16":
            return flat.view("<f2").astype(np.float32).reshape(shape)
        return (flat.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)   # bf16: exact
    a, n, k = _rows(t, raw, shape)
    blk = a.reshape(n, k // t.block, t.nbytes)
    if t.name == "Q8_0":
        w = _f16(blk[..., 0:2])[..., None] * blk[..., 2:].view(np.int8).astype(np.float32)
    elif t.name == "Q4_0":
        w = _f16(blk[..., 0:2])[..., None] * (_nibbles(blk[..., 2:]).astype(np.float32) - np.float32(8))
    elif t.name == "Q4_1":
        w = _f16(blk[..., 0:2])[..., None] * _nibbles(blk[..., 4:]).astype(np.float32) + _f16(blk[..., 2:4])[..., None]
    elif t.name == "Q5_0":
        w = _f16(blk[..., 0:2])[..., None] * _q5_0_codes(blk).astype(np.float32)
    elif t.name == "Q4_K":
        sc, mn = _q4k_scales(blk[..., 4:16])
        d = _f16(blk[..., 0:2])[..., None] * sc.astype(np.float32)          # [n, b, 8]
        dm = _f16(blk[..., 2:4])[..., None] * mn.astype(np.float32)
        qs = blk[..., 16:].reshape(n, k // 256, 4, 32)
        u = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k // 256, 8, 32).astype(np.float32)
        w = d[..., None] * u - dm[..., None]
    else:  # Q6_K
        sc = blk[..., 192:208].view(np.int8).astype(np.float32)
        d = _f16(blk[..., 208:210])[..., None] * sc                        # [n, b, 16]
        q = _q6k_codes(blk).reshape(n, k // 256, 16, 16).astype(np.float32)
        w = d[..., None] * q
    return w.reshape(n, k).astype(np.float32, copy=False)


def to_matmul_q(ggml_type, raw, shape) -> dict:
    """The ``matmul_q`` operands holding a GGML matrix's blocks as they are.

    ``raw``: uint8 [N, row_bytes] (one row per output feature, as in the file);
    ``shape``: (N, K), K a multiple of the type's block (else IRError, as for
    wrong row bytes).  From ``gguf.GGUFReader``: ``to_matmul_q(t.tensor_type,
    t.data, t.shape[::-1])`` (the reader's shape is GGML's (K, N) order).
    Returns ``{"inputs": [(array, dtype), ...], "attrs": {...}}`` for
    ``matmul_q``'s q [K, N], scales [K / group, N] and, for Q4_1, float
    minimums (the ``zeros`` operand in float), for Q4_K the two-level operands
    (``supers``, attribute ``super_group``): build the node with

        m = to_matmul_q(t, raw, shape)
        y = b.matmul_q(x, *(b.const(a, d) for a, d in m["inputs"]), **m["attrs"])

    so that y = x @ dequantize(t, raw, shape).T, the weights bit for bit ggml's:

    * Q8_0: q = the i8 codes, scales = d (f16), group 32: 8.5 bits per weight, as the file;
    * Q4_0: q = u - 8 (i4), scales = d (f16), group 32: 4.5 bits, as the file;
    * Q4_1: q = u - 8 (i4), scales = d (f16), minimums = m (f16), group 32:
      w = (q + 8) * d + m = d * u + m; 5 bits, as the file;
    * Q5_0: q = code - 16 (i8), scales = d (f16), group 32: 8.5 bits per weight
      against the file's 5.5 (``matmul_ggml`` reads its blocks as stored);
    * Q4_K: q = u - 8 (i4), group 32, two-level: u8 scales = sc, u8 zeros = m,
      supers [K / 256, N, 2] f16 = (d, -dmin), super_group 256: w = (q + 8) *
      (d * sc) + (-dmin) * m; 4.625 bits per weight against the file's 4.5 (the
      6-bit sc and m take a byte each);
    * Q6_K: q = code - 32 (i8), group 16, scales = d * sc in f32 (exact): 10 bits
      per weight against the file's 6.5625 (matmul_q has no 6-bit codes; the
      ``matmul_ggml`` op reads Q6_K's blocks as stored: ``matmul`` below picks it).
    F32 / F16 / BF16 are not matmul_q weights (``dequantize`` gives their floats)."""
    t = block_type(ggml_type)
    if t.name not in QUANTIZED:
        raise IRError(f"{t.name} is a float type, not matmul_q blocks: use dequantize()")
    a, n, k = _rows(t, raw, shape)
    blk = a.reshape(n, k // t.block, t.nbytes)

    def kn(x):  # [N, K'] -> [K', N], in strips of rows (twice numpy's plain transposed copy)
        x = x.reshape(n, -1)
        out = np.empty(x.shape[::-1], x.dtype)
        for i in range(0, n, 256):
            out[:, i:i + 256] = x[i:i + 256].T
        return out

    def f16(b):
        return kn(np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float16))

    if t.name == "Q8_0":
        ins = [(kn(blk[..., 2:].view(np.int8)), "i8"), (f16(blk[..., 0:2]), "f16")]
        group = 32
    elif t.name == "Q5_0":
        ins = [(kn(_q5_0_codes(blk)), "i8"), (f16(blk[..., 0:2]), "f16")]
        group = 32
    elif t.name in ("Q4_0", "Q4_1"):
        off = 2 if t.name == "Q4_0" else 4
        q = _nibbles(blk[..., off:]).astype(np.int8) - np.int8(8)
        ins = [(kn(q), "i4"), (f16(blk[..., 0:2]), "f16")]
        if t.name == "Q4_1":
            ins.append((f16(blk[..., 2:4]), "f16"))
        group = 32
    elif t.name == "Q4_K":
        sc, mn = _q4k_scales(blk[..., 4:16])
        qs = blk[..., 16:].reshape(n, k // 256, 4, 32)
        u = np.stack([qs & 0x0F, qs >> 4], axis=3).astype(np.int8) - np.int8(8)
        sup = np.ascontiguousarray(blk[..., 0:4]).view("<f2").astype(np.float16)       # [n, b, 2]: d, dmin
        sup[..., 1] = -sup[..., 1]                                                    # minimum = -dmin * m
        ins = [(kn(u), "i4"), (kn(sc), "u8"), (kn(mn), "u8"), (np.ascontiguousarray(sup.transpose(1, 0, 2)), "f16")]
        return {"inputs": ins, "attrs": {"group": 32, "super_group": 256}}
    else:  # Q6_K
        sc = blk[..., 192:208].view(np.int8).astype(np.float32)
        d = _f16(blk[..., 208:210])[..., None] * sc
        ins = [(kn(_q6k_codes(blk)), "i8"), (kn(d), "f32")]
        group = 16
    return {"inputs": ins, "attrs": {"group": group}}


class Weight:
    """A GGML matrix W[N, K] as constants of a GraphBuilder ``b``, made once and
    shared by every node reading it: ``matmul(x)`` = x @ W.T and ``gather(ids)``
    = W[ids] (a tied embedding and lm_head store one table).  Q6_K and Q5_0 are
    kept as their blocks (matmul_ggml / gather_ggml: the file's 6.5625 / 5.5
    bits per weight), every other type as matmul_q operands (``to_matmul_q``:
    matmul_q / gather_q); ``matmul(x, activations="int8")`` on those uses matmul_q
    operands (made on first use: then stored too); ``act_group=32`` with it
    quantizes x as llama.cpp's q8 activations."""

    def __init__(self, b, ggml_type, raw, shape, name: str | None = None):
        self.b, self.type, self.name = b, block_type(ggml_type), name
        self.raw, self.shape = raw, tuple(int(s) for s in shape)
        self._blocks = self._q = None

    def _const(self, a, d, i):
        return self.b.const(a, d, name=None if self.name is None else f"{self.name}{i}")

    def _operands(self):
        if self._q is None:
            m = to_matmul_q(self.type, self.raw, self.shape)
            self._q = ([self._const(a, d, f".{i}") for i, (a, d) in enumerate(m["inputs"])], m["attrs"])
        return self._q

    def _raw_blocks(self):
        if self._blocks is None:
            self._blocks = self._const(_rows(self.type, self.raw, self.shape)[0], "u8", "")
        return self._blocks

    def matmul(self, x, activations: str = "none", act_group: int = 0):
        if self.type.name in GGML_BLOCKS and activations == "none":
            return self.b.matmul_ggml(x, self._raw_blocks(), type=self.type.name)
        ops, attrs = self._operands()
        return self.b.matmul_q(x, *ops, activations=activations, act_group=act_group, **attrs)

    def gather(self, ids):
        if self.type.name in GGML_BLOCKS:
            return self.b.gather_ggml(ids, self._raw_blocks(), type=self.type.name)
        ops, attrs = self._operands()
        return self.b.gather_q(ids, *ops, **attrs)


def matmul(b, x, ggml_type, raw, shape, **matmul_q_attrs):
    """x @ W.T for a GGML matrix W used once (``Weight`` to share it)."""
    return Weight(b, ggml_type, raw, shape).matmul(x, **matmul_q_attrs)
