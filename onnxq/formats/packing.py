"""Bit packing for MatMulNBits blobs and ONNX sub-byte (int4/uint4/int2/uint2) tensors; pure numpy."""
from __future__ import annotations

import numpy as np

PACKABLE_BITS = (2, 4, 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints < 2**bits along the last axis, low bits first: [..., L] -> uint8 [..., ceil(L*bits/8)]."""
    per = _per_byte(bits)
    v = np.asarray(values).astype(np.uint8)
    pad = -v.shape[-1] % per
    if pad:
        v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    v = v.reshape(*v.shape[:-1], -1, per) << (np.arange(per, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(v, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 [..., B] -> uint8 [..., length]."""
    per = _per_byte(bits)
    p = np.asarray(packed, dtype=np.uint8)
    v = (p[..., None] >> (np.arange(per, dtype=np.uint8) * bits)) & np.uint8((1 << bits) - 1)
    return v.reshape(*p.shape[:-1], -1)[..., :length]


def pack_nbits(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pack codes [N, K] into MatMulNBits (B [N, k_blocks, blob], scales [N, k_blocks], zero points | None).

    K is padded to k_blocks*block_size with each row's last zero point (so padding dequantizes to 0).
    `scales`/`zeros` have one column per block, or one column in all (per-channel, repeated in every block).
    `zeros=None` means symmetric: MatMulNBits' implicit zero point 2^(bits-1); float zeros stay unpacked float32.
    """
    n, k = codes.shape
    k_blocks = -(-k // block_size)
    if scales.shape not in ((n, k_blocks), (n, 1)) or (zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"scales {scales.shape} / zeros do not fit codes {codes.shape} with block_size {block_size}")
    scales = np.broadcast_to(scales, (n, k_blocks)).astype(np.float32)
    float_zero = zeros is not None and np.issubdtype(zeros.dtype, np.floating)
    fill = np.full((n, 1), 1 << (bits - 1)) if zeros is None else np.clip(np.round(zeros[:, -1:]), 0, (1 << bits) - 1)
    padded = np.concatenate([codes, np.broadcast_to(fill.astype(codes.dtype), (n, k_blocks * block_size - k))], axis=1)
    blob = pack_bits(padded.reshape(n, k_blocks, block_size), bits)
    if zeros is None:
        return blob, scales, None
    zeros = np.broadcast_to(zeros, (n, k_blocks))
    zp = zeros.astype(np.float32) if float_zero else pack_bits(zeros, bits)
    return blob, scales, zp


def unpack_nbits(
    blob: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of `pack_nbits` for B and zero points: (codes [N, K], zeros [N, k_blocks] | None)."""
    n, k_blocks, _ = blob.shape
    codes = unpack_bits(blob, bits, blob.shape[-1] * 8 // bits).reshape(n, -1)[:, :k]
    zeros = None if zero_points is None else unpack_bits(zero_points, bits, k_blocks)
    return codes, zeros


def pack_subbyte(values: np.ndarray, bits: int) -> bytes:
    """Raw data of an ONNX int2/uint2/int4/uint4 tensor: flattened row-major, low bits first (signed as two's complement)."""
    flat = np.asarray(values, dtype=np.int64).ravel() & ((1 << bits) - 1)
    return pack_bits(flat, bits).tobytes()


def unpack_subbyte(data: bytes, bits: int, count: int, *, signed: bool) -> np.ndarray:
    """Inverse of `pack_subbyte`: int8 values (sign-extended when `signed`)."""
    v = unpack_bits(np.frombuffer(data, dtype=np.uint8), bits, count).astype(np.int8)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v).astype(np.int8) if signed else v


def _per_byte(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit values: use one of {PACKABLE_BITS}")
    return 8 // bits
