"""Asymmetric (zero-point, min-max) blockwise quantization (chapter 11).

absmax quantization (:func:`llama_from_scratch.quantization.quantize_absmax_int8`, NF4) is
*symmetric*: its grid spans ``[-absmax, absmax]`` around 0. When a block's values are not centred
on zero (all positive after a SiLU or a ReLU, shifted by a LayerNorm bias, or simply a block whose
largest value is far from its most negative one), part of that grid covers values the block never
takes: for an all-positive block, the whole negative half of the levels is wasted.

*Asymmetric* (affine) quantization fits the grid to the block's actual range instead. Per block of
``block_size`` values, with ``L = 2**bits - 1`` the largest code:

* ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``: the range, stretched to contain 0 so that 0
  is exactly representable (zero weights and padding come back as 0) and the zero point is a
  valid code;
* ``scale = (hi - lo) / L``, floored at float32's machine epsilon (a block of zeros would
  otherwise divide by 0);
* the integer *zero point* ``z = round(-lo / scale)``, clamped to ``[0, L]``: the code that means 0;
* ``q = clamp(round(x / scale) + z, 0, L)``, and back ``x_hat = (q - z) * scale``.

All ``2**bits`` codes lie inside the block's range, so for a block whose range already contains 0
the step is ``(max - min) / L``, against ``2 * max|x| / (2**bits - 2)`` for absmax with codes
``-(2**(bits-1) - 1) .. 2**(bits-1) - 1``: up to about half the step when the block is lopsided.
Each value is off by at most half a step (``scale / 2``).

This is the scheme of PyTorch's quantized tensors (``torch.quantize_per_channel`` with
``torch.quint8``, ``torch.fake_quantize_per_channel_affine``) with the parameters of its min-max
observers (``torch.ao.quantization.PerChannelMinMaxObserver``): the tests compare codes, scales,
zero points and dequantized values with them bit for bit. Like PyTorch (and bitsandbytes, see
:mod:`llama_from_scratch.quantization`), the division by the scale is a multiplication by the
float32 reciprocal ``1 / scale``; it changes a code only when ``x / scale`` lands within a rounding
error of a half-integer, and is kept for bit-exactness. Rounding is half-to-even (``torch.round``,
``std::nearbyint``).

llama.cpp's Q4_1 (GGUF, chapter 6) is the same idea in another parametrisation: per block of 32,
``d = (max - min) / 15`` and a float minimum ``m`` (both float16), ``x_hat = q * d + m``. It keeps
the minimum as a float offset instead of rounding it to an integer zero point, so its grid starts
exactly at the block's minimum but need not contain 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from llama_from_scratch.quantization import _FLOAT_DTYPES, _num_blocks

__all__ = ["AsymmetricQuantized", "asymmetric_params", "dequantize_asymmetric", "quantize_asymmetric"]

_EPS = torch.finfo(torch.float32).eps  # the scale floor of torch's observers


class AsymmetricQuantized(NamedTuple):
    """What :func:`quantize_asymmetric` returns; :func:`dequantize_asymmetric` takes it back.

    Attributes:
        codes: uint8, the input's shape, values in ``[0, 2**bits - 1]`` (one code per byte: not packed).
        scale: float32 ``[n_blocks]``, the step of each block.
        zero_point: int32 ``[n_blocks]``, the code that stands for 0 in each block.
        bits: bits per code.
        block_size: values per block of the flattened input (the last block may be shorter).
        dtype: the input's dtype, restored on dequantization.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    block_size: int
    dtype: torch.dtype


def _check_args(bits: int, block_size: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8 (codes are stored in uint8), got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def asymmetric_params(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``blocks`` ``[n_blocks, block_size]`` (float32).

    The range is stretched to contain 0, the scale floored at float32's epsilon, the zero point
    rounded half-to-even and clamped to the codes: PyTorch's ``PerChannelMinMaxObserver`` with
    ``quant_min=0, quant_max=2**bits - 1``.
    """
    levels = 2**bits - 1
    lo = blocks.amin(dim=1).clamp(max=0.0)
    hi = blocks.amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / float(levels)).clamp(min=_EPS)
    zero_point = torch.round(-lo / scale).clamp(0, levels).to(torch.int32)
    return scale, zero_point


def quantize_asymmetric(x: torch.Tensor, bits: int = 4, block_size: int = 64) -> AsymmetricQuantized:
    """Min-max asymmetric quantization of ``x`` in blocks of ``block_size`` values.

    ``x`` is flattened row-major and cut into blocks (the last one may be shorter: its range is
    its own values'); each block gets ``scale = (hi - lo) / (2**bits - 1)`` and an integer zero
    point ``z = round(-lo / scale)``, where ``[lo, hi]`` is the block's range stretched to contain
    0, and each value the code ``clamp(round(x / scale) + z, 0, 2**bits - 1)``. The arithmetic
    is float32 whatever the input dtype (bfloat16 and float16 values are exact in float32).

    Why: a block whose values are not centred on 0 uses all ``2**bits`` levels, where absmax would
    spend the levels of the side it does not reach. A block that is all one value gets a scale of
    ``|value| / (2**bits - 1)`` (its value comes back exactly up to rounding) or, for zeros, the
    floor ``eps``: no division by zero.

    Returns:
        An :class:`AsymmetricQuantized`; an empty ``x`` gives empty codes and no blocks.

    Raises:
        TypeError: ``x`` is not a float32 / bfloat16 / float16 tensor.
        ValueError: ``bits`` not in 2..8, or ``block_size`` not a positive int.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    _check_args(bits, block_size)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = _num_blocks(n, block_size)
    if n == 0:
        return AsymmetricQuantized(torch.zeros(x.shape, dtype=torch.uint8, device=x.device),
                                   torch.zeros(0, device=x.device), torch.zeros(0, dtype=torch.int32, device=x.device),
                                   bits, block_size, x.dtype)
    pad = n_blocks * block_size - n
    # Pad the last block with its own last value: the padding changes neither its min nor its max.
    padded = torch.cat([flat, flat[-1:].expand(pad)]) if pad else flat
    blocks = padded.view(n_blocks, block_size)
    scale, zero_point = asymmetric_params(blocks, bits)
    inv_scale = 1.0 / scale  # float32 reciprocal, as torch's kernels compute it
    q = torch.round(blocks * inv_scale[:, None]) + zero_point[:, None].float()
    codes = q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(-1)[:n].reshape(x.shape)
    return AsymmetricQuantized(codes, scale, zero_point, bits, block_size, x.dtype)


def dequantize_asymmetric(quantized: AsymmetricQuantized) -> torch.Tensor:
    """Inverse of :func:`quantize_asymmetric`: ``(q - z) * scale`` per block, in float32, then cast
    to the dtype that was quantized; the shape is the codes'.

    Raises:
        ValueError: the number of scales or zero points does not match the codes' blocks.
    """
    codes, scale, zero_point, bits, block_size, dtype = quantized
    _check_args(bits, block_size)
    n = codes.numel()
    n_blocks = _num_blocks(n, block_size)
    if scale.numel() != n_blocks or zero_point.numel() != n_blocks:
        raise ValueError(f"{n} codes in blocks of {block_size} need {n_blocks} scales and zero points, "
                         f"got {scale.numel()} and {zero_point.numel()}")
    if n == 0:
        return torch.zeros(codes.shape, dtype=dtype, device=codes.device)
    centred = codes.reshape(-1).float() - zero_point.float().repeat_interleave(block_size)[:n]
    out = centred * scale.float().repeat_interleave(block_size)[:n]
    return out.to(dtype).reshape(codes.shape)

