"""Conversion between sqk's int4 ``matmul_q`` constants and ONNX Runtime's
``com.microsoft`` ``MatMulNBits`` initializers (bits=4).

sqk (``ir.ops.dequantize_weight``):
    q       i4 [K, N], codes in [-8, 7] (unpacked, one int8 each)
    scales  [G, N], G = ceil(K / group)
    zeros   i4 [G, N] in [-8, 7], or None (zero point 0)
    w[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]

MatMulNBits (Y = A @ dequant(B)^T):
    B            uint8 [N, n_blocks, block_size / 2]: row n of W^T, block by block
                 along K, two unsigned 4-bit codes per byte, element 2i in the
                 low nibble, 2i+1 in the high one; a last block past K is padded
    scales       [N * n_blocks] (row-major [N, n_blocks]), the dtype of A
    zero_points  uint8 [N * ceil(n_blocks / 2)] packed the same way per row n
                 (block 2j low nibble, 2j+1 high), or absent: zero point 8
    w[k, n] = (B_code[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]

So the codes map by u = q + 8 and zp = zeros + 8 (no zeros: no zero_points,
ORT's default 8), and group == block_size.  ORT requires block_size to be a
power of two >= 16.  Padding codes are 8 (a zero weight).
"""
from __future__ import annotations

import numpy as np


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 2m] -> bytes [..., m], element 2i low, 2i+1 high."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.uint8)
    out[..., 0::2] = b & 0xF
    out[..., 1::2] = b >> 4
    return out


def to_matmul_nbits(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int,
                    scale_dtype=np.float32) -> dict:
    """MatMulNBits initializers and attributes for sqk's int4 (q, scales, zeros, group).

    Returns ``{"B", "scales", "zero_points" (None when zeros is None), "K", "N",
    "bits": 4, "block_size"}``; ``scales`` is 1-D [N * n_blocks] of
    ``scale_dtype`` (the dtype of the model's activations A)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype != np.int8 or (q.size and (q.min() < -8 or q.max() > 7)):
        raise ValueError(f"to_matmul_nbits: q must be int4 codes (int8 array in [-8, 7]) of shape [K, N], "
                         f"got {q.dtype}{list(q.shape)}")
    if group < 16 or group & (group - 1):
        raise ValueError(f"to_matmul_nbits: MatMulNBits needs block_size a power of two >= 16, got group {group}")
    k, n = q.shape
    nb = -(-k // group)
    scales = np.asarray(scales)
    if scales.shape != (nb, n):
        raise ValueError(f"to_matmul_nbits: scales shape {scales.shape} must be ({nb}, {n}) for K={k}, group={group}")
    u = np.full((n, nb * group), 8, np.uint8)  # padding past K: code 8, a zero weight without zero points
    u[:, :k] = (q.T.astype(np.int16) + 8).astype(np.uint8)
    out = {"B": _pack_nibbles(u).reshape(n, nb, group // 2),
           "scales": np.ascontiguousarray(scales.T).reshape(-1).astype(scale_dtype),
           "zero_points": None, "K": k, "N": n, "bits": 4, "block_size": group}
    if zeros is not None:
        zeros = np.asarray(zeros)
        if zeros.shape != (nb, n) or zeros.dtype != np.int8 or (zeros.size and (zeros.min() < -8 or zeros.max() > 7)):
            raise ValueError(f"to_matmul_nbits: zeros must be int4 codes of shape ({nb}, {n}), "
                             f"got {zeros.dtype}{list(zeros.shape)}")
        zp = np.zeros((n, nb + nb % 2), np.uint8)
        zp[:, :nb] = (zeros.T.astype(np.int16) + 8).astype(np.uint8)
        out["zero_points"] = _pack_nibbles(zp).reshape(-1)
    return out


def from_matmul_nbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int,
                      block_size: int, bits: int = 4, scale_dtype=np.float32):
    """sqk (q, scales, zeros, group) from MatMulNBits initializers (bits=4,
    uint8 packed zero points).  zeros is None when there are no zero points or
    all are 8 (the default), i.e. symmetric."""
    if bits != 4:
        raise ValueError(f"from_matmul_nbits: only bits=4 converts to sqk's i4, got bits={bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"from_matmul_nbits: block_size must be a power of two >= 16, got {block_size}")
    nb = -(-K // block_size)
    B = np.asarray(B)
    if B.dtype != np.uint8 or B.size != N * nb * (block_size // 2):
        raise ValueError(f"from_matmul_nbits: B must be uint8 [{N}, {nb}, {block_size // 2}], got "
                         f"{B.dtype}{list(B.shape)}")
    u = _unpack_nibbles(B.reshape(N, nb * block_size // 2))[:, :K]
    q = np.ascontiguousarray((u.astype(np.int16) - 8).T).astype(np.int8)
    scales = np.asarray(scales)
    if scales.size != N * nb:
        raise ValueError(f"from_matmul_nbits: scales must have N * n_blocks = {N * nb} elements, got {scales.shape}")
    s = np.ascontiguousarray(scales.reshape(N, nb).T).astype(scale_dtype)
    zeros = None
    if zero_points is not None:
        zero_points = np.asarray(zero_points)
        per_row = (nb + 1) // 2
        if zero_points.dtype != np.uint8:
            raise ValueError(f"from_matmul_nbits: only uint8 packed zero points convert to sqk's i4, got "
                             f"{zero_points.dtype}")
        if zero_points.size != N * per_row:
            raise ValueError(f"from_matmul_nbits: zero_points must have N * ceil(n_blocks / 2) = {N * per_row} "
                             f"bytes, got {zero_points.shape}")
        zp = _unpack_nibbles(zero_points.reshape(N, per_row))[:, :nb]
        if not (zp == 8).all():
            zeros = np.ascontiguousarray((zp.astype(np.int16) - 8).T).astype(np.int8)
    return q, s, zeros, block_size
