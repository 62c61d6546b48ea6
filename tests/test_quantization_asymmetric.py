"""Asymmetric (zero-point, min-max) blockwise quantization against PyTorch's affine quantization:
its min-max observer (scales, zero points), ``torch.fake_quantize_per_channel_affine`` (values),
``torch.quantize_per_channel`` / ``torch.quantize_per_tensor`` with ``torch.quint8`` (codes), and
against GGUF's Q4_1 (the ``gguf`` package) where the two schemes share a parameter."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from llama_from_scratch.asymmetric_quantization import (
    AsymmetricQuantized,
    asymmetric_params,
    dequantize_asymmetric,
    quantize_asymmetric,
)
from llama_from_scratch.quantization import dequantize_absmax_int8, quantize_absmax_int8

SHAPES = [(1,), (5,), (63,), (64,), (65,), (1000,), (7, 9), (33, 65), (3, 5, 7)]


def lopsided(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Blocks with different spreads and centres: some straddle 0, some are all on one side."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
            + torch.randn(rows, 1, generator=g) * 2)


def torch_reference(x: torch.Tensor, bits: int, block_size: int):
    """Scale and zero point from torch's PerChannelMinMaxObserver and values from
    fake_quantize_per_channel_affine, with each block of the flattened ``x`` as one channel.
    ``x.numel()`` must be a multiple of ``block_size``."""
    blocks = x.reshape(-1, block_size).float()
    levels = 2**bits - 1
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine,
                                        quant_min=0, quant_max=levels)
    observer(blocks)
    scale, zero_point = observer.calculate_qparams()
    values = torch.fake_quantize_per_channel_affine(blocks, scale, zero_point.int(), 0, 0, levels)
    return scale, zero_point.int(), values


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [1, 32, 64, 256])
def test_equals_torch_observer_and_fake_quantize(bits, block_size):
    for seed in range(3):
        x = lopsided(4096 // block_size if block_size > 1 else 64, block_size, seed)
        qt = quantize_asymmetric(x, bits=bits, block_size=block_size)
        scale, zero_point, values = torch_reference(x, bits, block_size)
        assert torch.equal(qt.scale, scale)
        assert torch.equal(qt.zero_point, zero_point)
        assert torch.equal(dequantize_asymmetric(qt), values.reshape(x.shape))
        # the codes, read back from torch's values (exact: (q - z) * scale / scale is q - z to within 1e-4)
        codes = torch.round(values / scale[:, None]) + zero_point[:, None]
        assert torch.equal(qt.codes.reshape(-1, block_size).float(), codes)


def test_codes_equal_quantize_per_channel_except_where_it_rounds_after_adding_z():
    """torch.quantize_per_channel (quint8) rounds the float32 sum x / scale + z; fake_quantize (and we)
    round x / scale, then add z. The two differ, by one code, exactly where x / scale is a
    half-integer (or within float32 rounding of one, once z is added) and the rounding goes the other
    way; everywhere else the codes and the dequantized values are equal."""
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    n_differ = 0
    for seed in range(4):
        x = lopsided(1000, 64, seed)
        qt = quantize_asymmetric(x, bits=8, block_size=64)
        ref = torch.quantize_per_channel(x, qt.scale.double(), qt.zero_point.long(), 0, torch.quint8)
        scaled = x * (1.0 / qt.scale)[:, None]
        rounded_after = torch.round(scaled + qt.zero_point[:, None].float()).clamp(0, 255)
        assert torch.equal(ref.int_repr().float(), rounded_after)  # torch's rule, reproduced exactly
        differ = ref.int_repr() != qt.codes
        near_half = (scaled - scaled.floor() - 0.5).abs() <= 1e-4
        assert torch.equal(differ, differ & near_half) and (ref.int_repr().int() - qt.codes.int()).abs().max() <= 1
        n_differ += int(differ.sum())
        assert torch.equal(ref.dequantize()[~differ], dequantize_asymmetric(qt)[~differ])
    assert n_differ > 0  # the difference was exercised, not vacuous


def test_quantize_per_tensor_on_one_block():
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    x = torch.randn(256, generator=torch.Generator().manual_seed(3)) + 0.7
    qt = quantize_asymmetric(x, bits=8, block_size=256)
    ref = torch.quantize_per_tensor(x, qt.scale.item(), int(qt.zero_point), torch.quint8)
    assert torch.equal(ref.int_repr(), qt.codes)
    assert torch.equal(ref.dequantize(), dequantize_asymmetric(qt))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_partial_last_block_and_shapes(shape, bits):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.2
    qt = quantize_asymmetric(x, bits=bits, block_size=64)
    n = x.numel()
    assert qt.codes.shape == x.shape and qt.codes.dtype == torch.uint8
    assert qt.scale.shape == qt.zero_point.shape == (-(-n // 64),)
    assert int(qt.codes.max()) <= 2**bits - 1
    # each block, the partial one included, equals torch on that block alone
    flat = x.reshape(-1)
    deq = dequantize_asymmetric(qt).reshape(-1)
    for b, start in enumerate(range(0, n, 64)):
        block = flat[start:start + 64]
        scale, zero_point, values = torch_reference(block, bits, block.numel())
        assert qt.scale[b] == scale[0] and qt.zero_point[b] == zero_point[0]
        assert torch.equal(deq[start:start + 64], values.reshape(-1))


@pytest.mark.parametrize("bits", [4, 8])
def test_error_at_most_half_a_step(bits):
    x = lopsided(500, 64, seed=5)
    qt = quantize_asymmetric(x, bits=bits, block_size=64)
    err = (dequantize_asymmetric(qt) - x).abs()
    # half a step, plus float32 rounding of (q - z) * scale (a few ulps of the block's largest value)
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().amax(dim=1)
    assert (err <= qt.scale[:, None] / 2 + slack[:, None]).all()
    # in blocks whose range holds 0 the grid spans the block: its minimum gets code 0, its maximum
    # the top code or the one below (the zero point's rounding moves the grid by < half a step)
    straddle = (x.amin(dim=1) < 0) & (x.amax(dim=1) > 0)
    assert straddle.sum() > 100 and (~straddle).sum() > 100
    codes = qt.codes[straddle].int()
    assert codes.amin(dim=1).eq(0).all() and codes.amax(dim=1).ge(2**bits - 2).all()


def test_exact_zero_and_constant_blocks():
    x = torch.cat([torch.zeros(64), torch.full((64,), 0.37), torch.full((64,), -2.5), torch.full((64,), 1e-30)])
    for bits in (4, 8):
        qt = quantize_asymmetric(x, bits=bits, block_size=64)
        assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
        deq = dequantize_asymmetric(qt)
        assert torch.equal(deq[:64], torch.zeros(64))  # zeros come back as exact zeros
        assert torch.allclose(deq[64:192], x[64:192], rtol=1e-6, atol=0)
        assert deq[192:].abs().max() <= torch.finfo(torch.float32).eps / 2  # below the scale floor
        scale, zero_point, values = torch_reference(x, bits, 64)
        assert torch.equal(qt.scale, scale) and torch.equal(qt.zero_point, zero_point)
        assert torch.equal(deq, values.reshape(-1))
    # a 0 inside a lopsided block is exact too: the zero point is an integer code
    y = torch.tensor([0.0, 0.3, 0.9, 1.4, -0.2])
    assert dequantize_asymmetric(quantize_asymmetric(y, bits=4, block_size=5))[0] == 0.0


def test_empty_input():
    for shape in [(0,), (3, 0)]:
        qt = quantize_asymmetric(torch.empty(shape), bits=4, block_size=64)
        assert qt.codes.shape == shape and qt.scale.numel() == 0 and qt.zero_point.numel() == 0
        out = dequantize_asymmetric(qt)
        assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    x = lopsided(64, 64, seed=2).to(dtype)
    qt = quantize_asymmetric(x, bits=4, block_size=64)
    ref = quantize_asymmetric(x.float(), bits=4, block_size=64)  # same arithmetic in float32
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scale, ref.scale)
    out = dequantize_asymmetric(qt)
    assert out.dtype == dtype and out.shape == x.shape
    _, _, values = torch_reference(x.float(), 4, 64)
    assert torch.equal(out, values.reshape(x.shape).to(dtype))


def test_bad_arguments():
    x = torch.randn(128)
    for bits in (1, 9, 16, 0, 4.0, True):
        with pytest.raises(ValueError, match="bits must be"):
            quantize_asymmetric(x, bits=bits)
    for block_size in (0, -64, 64.0, True, None):
        with pytest.raises(ValueError, match="block_size must be"):
            quantize_asymmetric(x, block_size=block_size)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_asymmetric(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_asymmetric([1.0, 2.0])
    qt = quantize_asymmetric(x, bits=4, block_size=64)
    with pytest.raises(ValueError, match="need 2 scales"):
        dequantize_asymmetric(qt._replace(scale=qt.scale[:1]))
    assert isinstance(qt, AsymmetricQuantized)


def test_min_max_beats_absmax_on_shifted_data():
    """All-positive blocks (as after a SiLU, or a shifted LayerNorm output): absmax spends half its
    codes on negative values that never occur; min-max uses them all."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 64, generator=g) * 0.5 + 0.1  # every block in [0.1, 0.6]
    qt = quantize_asymmetric(x, bits=8, block_size=64)
    q8, absmax = quantize_absmax_int8(x, blocksize=64)
    err_minmax = (dequantize_asymmetric(qt) - x).pow(2).mean()
    err_absmax = (dequantize_absmax_int8(q8, absmax, blocksize=64) - x).pow(2).mean()
    # steps: max / 255 against max / 127 (the range is stretched to 0 here), so about 4x in squared error
    assert 3.0 < err_absmax / err_minmax < 5.0
    assert int(q8.min()) >= 0  # absmax never used its negative codes
    # on centred, symmetric data the two are close (min-max has 255 steps over max - min, absmax 254 over 2 max)
    y = torch.randn(256, 64, generator=g)
    err_minmax_c = (dequantize_asymmetric(quantize_asymmetric(y, 8, 64)) - y).pow(2).mean()
    q8c, absmaxc = quantize_absmax_int8(y, blocksize=64)
    err_absmax_c = (dequantize_absmax_int8(q8c, absmaxc, blocksize=64) - y).pow(2).mean()
    assert 0.8 < err_absmax_c / err_minmax_c < 1.6


def test_q4_1_same_scale_float_minimum():
    """GGUF's Q4_1 (the gguf package's quantizer) uses the same step (max - min) / 15 per block of 32,
    stored in float16, but keeps the minimum as a float offset instead of an integer zero point."""
    x = lopsided(256, 32, seed=7)
    raw = gguf.quants.quantize(x.numpy(), QT.Q4_1).reshape(256, -1)
    d = torch.from_numpy(raw[:, :2].copy().view(np.float16).astype(np.float32)).reshape(-1)
    m = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(-1)
    qt = quantize_asymmetric(x, bits=4, block_size=32)
    straddle = (x.amin(dim=1) <= 0) & (x.amax(dim=1) >= 0)
    assert straddle.sum() > 50 and (~straddle).sum() > 50
    # blocks whose range holds 0: the same step, to float16
    assert torch.equal(qt.scale[straddle].half().float(), d[straddle])
    assert torch.equal(m[straddle], x.amin(dim=1)[straddle].half().float())
    # blocks on one side of 0: Q4_1's step is smaller (its range is not stretched to 0)
    assert (d[~straddle] < qt.scale[~straddle]).all()
    # Q4_1 written with our zero point: z = -m / d, not rounded; rounding it moves the grid by < d / 2
    z_float = -m[straddle] / d[straddle]
    assert ((qt.zero_point[straddle] - z_float).abs() <= 0.5 + 1e-2).all()


def test_params_helper_matches_observer():
    x = lopsided(128, 64, seed=11)
    for bits in (4, 8):
        scale, zero_point = asymmetric_params(x, bits)
        ref_scale, ref_zero_point, _ = torch_reference(x, bits, 64)
        assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)
