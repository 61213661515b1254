"""Bit packing: round trips, the MatMulNBits layout, and ONNX's own reading of our sub-byte tensors."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.formats.packing import pack_bits, pack_nbits, pack_subbyte, unpack_bits, unpack_nbits, unpack_subbyte

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [1, 7, 33, 80])
def test_pack_bits_round_trip(bits, length):
    x = RNG.integers(0, 1 << bits, (3, 5, length))
    packed = pack_bits(x, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, -(-length * bits // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits, length), x)


def test_low_bits_first():
    assert pack_bits(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(np.array([0, 1, 2, 3]), 2).tolist() == [0b11100100]
    assert pack_bits(np.array([1, 2, 3]), 4).tolist() == [0x21, 0x03]  # odd length: high nibble of the pad is 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,block", [(80, 32), (64, 16), (200, 128), (48, 64)])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_nbits_round_trip_ragged_k(bits, k, block, sym):
    n, kb = 6, -(-k // block)
    codes = RNG.integers(0, 1 << bits, (n, k))
    scales = RNG.random((n, kb)).astype(np.float32)
    zeros = None if sym else RNG.integers(0, 1 << bits, (n, kb))
    blob, sc, zp = pack_nbits(codes, scales, zeros, bits, block)
    assert blob.shape == (n, kb, block * bits // 8) and blob.dtype == np.uint8
    assert sc.shape == (n, kb) and sc.dtype == np.float32
    assert zp is None if sym else zp.shape == (n, -(-kb * bits // 8))
    got, got_zeros = unpack_nbits(blob, zp, bits, k)
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_array_equal(sc, scales)
    if not sym:
        np.testing.assert_array_equal(got_zeros, zeros)
    padding = unpack_bits(blob, bits, block).reshape(n, -1)[:, k:]
    np.testing.assert_array_equal(padding, np.broadcast_to((1 << bits - 1) if sym else zeros[:, -1:], padding.shape))


def test_pack_nbits_per_channel_repeats_the_scale():
    codes = RNG.integers(0, 16, (4, 300))
    scales, zeros = RNG.random((4, 1)).astype(np.float32), RNG.integers(0, 16, (4, 1))
    _, sc, zp = pack_nbits(codes, scales, zeros, 4, 128)
    np.testing.assert_array_equal(sc, np.repeat(scales, 3, axis=1))
    np.testing.assert_array_equal(unpack_bits(zp, 4, 3), np.repeat(zeros, 3, axis=1))


def test_pack_nbits_rejects_mismatched_scales():
    with pytest.raises(ValueError, match="do not fit"):
        pack_nbits(np.zeros((4, 64), int), np.ones((4, 3), np.float32), None, 4, 32)


@pytest.mark.parametrize(
    "data_type,bits,lo,hi",
    [(TensorProto.INT4, 4, -8, 8), (TensorProto.UINT4, 4, 0, 16), (TensorProto.INT2, 2, -2, 2), (TensorProto.UINT2, 2, 0, 4)],
)
def test_subbyte_tensors_read_back_by_onnx(data_type, bits, lo, hi):
    values = RNG.integers(lo, hi, (5, 7))  # 35 values: the last byte is partly padding
    tensor = helper.make_tensor("t", data_type, values.shape, pack_subbyte(values, bits), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int64), values)
    got = unpack_subbyte(tensor.raw_data, bits, values.size, signed=lo < 0)
    np.testing.assert_array_equal(got.reshape(values.shape), values)


def test_bad_bit_width():
    with pytest.raises(ValueError, match="3-bit"):
        pack_bits(np.zeros(4, int), 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [7, 64])
def test_kept_results_hold_codes_two_to_a_byte(bits, k):
    """A solved layer kept for the rewrite gives back its codes exactly, in half the bytes up to 4 bits."""
    import torch

    from onnxq.solve.loop import compact
    from onnxq.solvers import QuantResult

    codes = torch.randint(0, 1 << bits, (5, k), dtype=torch.int32, generator=torch.Generator().manual_seed(bits))
    kept = compact(QuantResult(torch.zeros(5, k), codes, torch.ones(5, 1), torch.zeros(5, 1, dtype=torch.int32), bits, -1, False))
    assert torch.equal(kept.unpacked().int(), codes)
    assert kept.codes.numel() == (5 * -(-k // 2) if bits <= 4 else 5 * k)
