"""Weight quantization from scratch: absmax int8, NF4 and QLoRA's double quantization (chapter 11).

A quantized weight is stored as small integer *codes* plus a floating-point *scale* per block of
values. Dequantizing multiplies each code's value by its block's scale.

* **absmax int8** (LLM.int8's building block): ``q = round(x * 127 / absmax)``, ``x ~ q * absmax / 127``.
  One outlier stretches ``absmax`` and wastes the grid for every other value of its block, which
  is why real quantizers work block by block (:func:`quantize_absmax_int8` with ``blocksize``).
* **NF4** (QLoRA, Dettmers et al. 2023): 16 values placed at quantiles of a standard normal
  distribution (:data:`NF4_CODE`), because trained weights are roughly normal; each value is
  scaled by its block's absmax (blocks of 64 by default) and stored as a 4-bit index, two per byte.
* **double quantization**: the float32 absmax of every block costs 32 / 64 = 0.5 bit per weight;
  QLoRA quantizes those scales themselves to 8 bits (blocks of 256, bitsandbytes' dynamic map),
  bringing the overhead down to 8 / 64 + 32 / (64 * 256) = 0.127 bit per weight.

Everything here is byte-for-byte compatible with bitsandbytes (``quantize_4bit(...,
quant_type="nf4")``, ``compress_statistics=True``) on CPU, and the tests check it. Where
bitsandbytes has quirks (multiplication by a reciprocal in full blocks but a division in the last
partial block, a tiny floor on a partial block's absmax), they are reproduced and pointed out,
because bit-exactness is the point.

:class:`LinearNF4` replaces an ``nn.Linear`` by its NF4-quantized copy (dequantized on the fly in
``forward``); :func:`quantize_model_nf4` does it for a whole model. With :func:`apply_lora` on top
this is QLoRA: a frozen 4-bit base plus small trainable float adapters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NF4_CODE",
    "NF4_BLOCKSIZES",
    "LinearNF4",
    "create_dynamic_map",
    "create_normal_map",
    "dequantize_absmax_int8",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "double_dequantize",
    "double_quantize",
    "memory_footprint",
    "quantize_absmax_int8",
    "quantize_blockwise_8bit",
    "quantize_model_nf4",
    "quantize_nf4",
]

#: Block sizes bitsandbytes accepts for 4-bit quantization (``quantize_4bit``).
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# The two code books: NF4 (16 values) and the 8-bit dynamic map (256 values)
# ----------------------------------------------------------------------------------------------


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat code book: quantiles of N(0, 1), normalized to [-1, 1] (float32, sorted).

    With ``use_extra_value=True`` (NF4) there are 8 positive values, 7 negative ones and an exact
    zero: 16 values, so a 4-bit index selects one. The positive half takes the normal quantiles
    at 8 evenly spaced probabilities from ``offset`` down to (but excluding) 0.5, the negative half
    at 7, and everything is divided by the largest value so that the code spans [-1, 1] exactly.
    ``offset = 0.9677083`` is QLoRA's choice (``norm.ppf(offset) ~ 1.85`` standard deviations).

    This follows bitsandbytes' ``create_normal_map`` step by step (including its float32
    ``linspace`` of probabilities), with ``torch.special.ndtri`` as the inverse normal CDF
    instead of scipy's ``norm.ppf``. ``use_extra_value=False`` gives the symmetric 15-value
    variant (7 + 7 + zero).
    """
    n_positive = 9 if use_extra_value else 8
    probs_pos = torch.linspace(offset, 0.5, n_positive)[:-1]  # float32, as in bitsandbytes
    probs_neg = torch.linspace(offset, 0.5, 8)[:-1]
    positive = torch.special.ndtri(probs_pos.double())
    negative = -torch.special.ndtri(probs_neg.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


#: The 16 NF4 values, index 0..15 (float32). Index 7 is exactly 0.0; index 0 is -1, 15 is +1.
NF4_CODE: torch.Tensor = create_normal_map()

# Decision boundaries: a scaled value goes to code i when MIDPOINT[i-1] < x <= MIDPOINT[i], i.e.
# to the nearest code, an exact midpoint going to the lower code (torch.bucketize, right=False).
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def _midpoint_grid(midpoints: torch.Tensor, grid: int = 4096, margin: float = 1e-5) -> torch.Tensor:
    """A lookup table for the nearest-code search on CPU: ``[grid]`` uint8 over ``[-1, 1]``.

    Cell ``k`` covers ``[-1 + 2k/grid, -1 + 2(k+1)/grid]``, widened by ``margin`` on both sides.
    Its entry is the number of midpoints below the widened cell (the code of every value in it)
    when no midpoint lies inside, or that count + 16 (a flag) when one does: values in flagged
    cells are searched exactly with ``torch.bucketize``. The margin (1e-5) is far wider than the
    float32 rounding of ``(x + 1) * grid / 2`` (about 1e-7), so a value is never looked up in a
    cell whose count is wrong for it; the cells (2 / 4096 wide) are far narrower than the gaps
    between midpoints (> 0.07), so a cell holds at most one.
    """
    edges = torch.linspace(-1, 1, grid + 1, dtype=torch.float64)
    mids = midpoints.double().contiguous()
    below = torch.searchsorted(mids, edges[:-1] - margin)                 # midpoints < left edge
    inside = torch.searchsorted(mids, edges[1:] + margin, right=True) - below   # left <= m <= right
    if int(inside.max()) > 1:
        raise AssertionError("grid cells must hold at most one midpoint")
    return (below + 16 * inside).to(torch.uint8)


_NF4_GRID = _midpoint_grid(_NF4_MIDPOINTS)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit *dynamic* code book (Dettmers 2016), sorted, float32, 256 values.

    A value is ``sign * 10**(-e) * fraction``: the exponent ``e`` in 0..6 is written in unary
    (leading zeros), and the bits left after it hold a linear fraction in (0.1, 1). Small exponents
    get few fraction bits, large ones many, so the code covers 7 orders of magnitude with a
    relative error that stays roughly constant. Plus the two values 0 and 1.

    Used by QLoRA's double quantization of the NF4 block scales. Reproduces
    ``bitsandbytes.functional.create_dynamic_map`` (the tests compare them).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        # 2**i fraction steps for exponent -(max_exponent_bits - 1) + i when signed.
        n_fraction = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed \
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # the middle of each fraction interval
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # 0 with the default 7 exponent bits
    if extra > 0:
        boundaries = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC_MAP = create_dynamic_map()


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the functions below
# ----------------------------------------------------------------------------------------------


def _check_blocksize(blocksize: int, allowed: Sequence[int] = NF4_BLOCKSIZES) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {tuple(allowed)} (powers of two that bitsandbytes "
                         f"supports), got {blocksize!r}")


def _check_float_input(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): nothing to quantize")


def _num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


# ----------------------------------------------------------------------------------------------
# absmax int8: the simplest quantizer, per tensor or per block
# ----------------------------------------------------------------------------------------------


def quantize_absmax_int8(x: torch.Tensor, blocksize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization to int8: ``q = round(x * 127 / absmax)``.

    Args:
        x: float tensor of any shape.
        blocksize: ``None`` uses one absmax for the whole tensor; an int splits the flattened
            tensor into blocks of that many values (the last one may be shorter), each with its
            own absmax, so an outlier only spoils its own block.

    Returns:
        ``(q, absmax)``: ``q`` int8 with ``x``'s shape, values in [-127, 127]; ``absmax``
        float32, a 0-d tensor or ``[ceil(n / blocksize)]``. A block of zeros gets absmax 0 and
        codes 0. Rounding is half-to-even (``torch.round``).
    """
    _check_float_input(x, "x")
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    if blocksize is None:
        absmax = flat.abs().max()
        scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        q = torch.round(flat * scale)
    else:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize must be a positive int or None, got {blocksize!r}")
        blocks = _num_blocks(n, blocksize)
        padded = F.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
        absmax = padded.abs().amax(dim=1)
        scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
        q = torch.round(padded * scale[:, None]).reshape(-1)[:n]
    return q.clamp(-127, 127).to(torch.int8).reshape(x.shape), absmax


def dequantize_absmax_int8(q: torch.Tensor, absmax: torch.Tensor, blocksize: int | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax_int8`: ``q * absmax / 127`` (per tensor or per block)."""
    if q.dtype != torch.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    flat = q.reshape(-1).float()
    n = flat.numel()
    if blocksize is None:
        if absmax.numel() != 1:
            raise ValueError(f"without blocksize absmax must hold one value, got shape {tuple(absmax.shape)}")
        out = flat * (absmax.reshape(()) / 127.0)
    else:
        blocks = _num_blocks(n, blocksize)
        if absmax.numel() != blocks:
            raise ValueError(f"{n} values in blocks of {blocksize} need {blocks} absmax values, "
                             f"got {absmax.numel()}")
        scale = (absmax / 127.0).repeat_interleave(blocksize)[:n]
        out = flat * scale
    return out.to(dtype).reshape(q.shape)


# ----------------------------------------------------------------------------------------------
# NF4: 4-bit NormalFloat, blockwise, two codes per byte
# ----------------------------------------------------------------------------------------------


def _blockwise_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], exactly as bitsandbytes computes them.

    Full blocks are multiplied by the float32 reciprocal ``1 / absmax``; the last partial block
    (if any) is divided by its absmax, and that absmax is floored at 1e-38 (an all-zero partial
    block stores 1e-38, an all-zero full block stores 0). These two details change the last bit
    of some values and are kept for byte-exactness.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_absmax, -1, 1)])
    return scaled, absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``w`` to NF4: 4-bit codes packed two per byte, plus one float32 absmax per block.

    Steps: flatten row-major (any shape is accepted; the caller keeps the shape for
    :func:`dequantize_nf4`), cut into blocks of ``blocksize`` values (the last may be partial),
    divide each block by its absmax, pick the nearest :data:`NF4_CODE` value (an exact midpoint
    goes to the lower code) and pack: ``byte = code[2i] << 4 | code[2i + 1]`` (first value in the
    high nibble). An odd count is padded with 0.0, i.e. code 7 in the last low nibble.

    The nearest-code search is vectorised: ``torch.bucketize`` against the 15 midpoints between
    neighbouring codes. On CPU the same search runs in cache-sized steps through a 4096-cell lookup
    table over [-1, 1] (exact: values in the few cells that hold a midpoint are searched with
    ``bucketize``), several times faster than ``bucketize`` alone; the bytes are the same.

    Returns:
        ``(packed, absmax)``: ``packed`` uint8 ``[(n + 1) // 2]``, ``absmax`` float32
        ``[ceil(n / blocksize)]``; byte-for-byte equal to
        ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")``
        (whose packed tensor is ``[(n + 1) // 2, 1]``).

    Raises:
        TypeError: ``w`` not float32 / bfloat16 / float16.
        ValueError: empty ``w``, or ``blocksize`` not in :data:`NF4_BLOCKSIZES`.
    """
    _check_float_input(w, "w")
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()
    if flat.device.type == "cpu" and flat.numel() >= blocksize:
        result = _quantize_nf4_cpu(flat, blocksize)
        if result is not None:
            return result
    return _quantize_nf4_reference(flat, blocksize)


def _quantize_nf4_reference(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe over the whole tensor at once (any device, any values, NaN and inf included)."""
    scaled, absmax = _blockwise_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))  # 0.0 -> code 7
    codes = torch.bucketize(scaled, _NF4_MIDPOINTS.to(scaled.device), out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


# Values per step of the CPU loop in quantize_nf4: whole blocks, 64 KiB of float32 (each step's ops stay
# below torch's parallel grain size, so they run without thread hand-offs, which cost more than they
# save on small, cache-resident steps).
_QUANT_CHUNK_VALUES = 1 << 14


def _quantize_nf4_cpu(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`quantize_nf4` on CPU, same bytes, in cache-sized steps of whole blocks.

    Each step scales its blocks exactly as :func:`_blockwise_scaled` does, looks every value up in
    :data:`_NF4_GRID` (one gather instead of ``torch.bucketize``'s binary search), searches the
    few values of flagged cells exactly, and packs. The last partial block goes through the
    reference recipe. Returns None (the caller falls back to the reference) when a block's absmax
    is not finite, i.e. the weights hold NaN or inf.
    """
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(full // blocksize, dtype=torch.float32)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    chunk = max(blocksize, _QUANT_CHUNK_VALUES // blocksize * blocksize)
    size = min(chunk, full)
    scaled_buf = torch.empty(size, dtype=torch.float32)
    index_buf = torch.empty(size, dtype=torch.int32)
    codes_buf = torch.empty(size, dtype=torch.uint8)
    grid = _NF4_GRID.numel()
    for start in range(0, full, chunk):
        stop = min(start + chunk, full)
        blocks = flat[start:stop].view(-1, blocksize)
        block_absmax = absmax[start // blocksize: stop // blocksize]
        torch.amax(blocks.abs(), dim=1, out=block_absmax)
        scaled = scaled_buf[: stop - start]
        torch.mul(blocks, (1.0 / block_absmax.clamp(min=1e-38))[:, None], out=scaled.view(-1, blocksize))
        scaled.clamp_(-1, 1)
        index = index_buf[: stop - start]
        index.copy_(scaled.add(1).mul_(grid / 2))  # float -> int32 truncates: the cell of each value
        index.clamp_(0, grid - 1)
        codes = codes_buf[: stop - start]
        torch.index_select(_NF4_GRID, 0, index, out=codes)
        flagged = (codes > 15).nonzero().squeeze(1)
        if flagged.numel():
            codes[flagged] = torch.bucketize(scaled[flagged], _NF4_MIDPOINTS, out_int32=True).to(torch.uint8)
        torch.bitwise_or(codes[0::2] << 4, codes[1::2], out=packed[start // 2: stop // 2])
    if not bool(torch.isfinite(absmax).all()):
        return None
    if full < n:  # the last, partial block: the reference recipe on its few values
        tail_packed, tail_absmax = _quantize_nf4_reference(flat[full:], blocksize)
        packed[full // 2:] = tail_packed
        absmax = torch.cat([absmax, tail_absmax])
    return packed, absmax


def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` float32: the two NF4 values (high nibble, low nibble) that each byte holds."""
    byte = torch.arange(256, device=device)
    code = NF4_CODE.to(device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


# The same table with each row's two float32 values seen as one 8-byte integer: one gather copies
# both values of a byte at once (integers, so the bits are copied untouched).
_NF4_BYTE_TABLE_INT64 = _nf4_byte_table(torch.device("cpu")).contiguous().view(torch.int64).reshape(256)

# Bytes per step of the CPU loop in dequantize_nf4: a multiple of every blocksize / 2, small enough
# that a step's indices and values stay in the CPU cache while they are scaled (128 KiB of output).
_DEQUANT_CHUNK_BYTES = 16384


def _unpack_scale_cpu(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """CPU dequantization, ``n`` float32 values: gather from the int64 byte table and scale, in
    cache-sized steps (no full-size int index tensor, and each step is scaled while still cached)."""
    n_bytes = packed.numel()
    out = torch.empty(n_bytes, dtype=torch.int64)
    values = out.view(torch.float32)
    chunk = min(_DEQUANT_CHUNK_BYTES, n_bytes)
    index = torch.empty(chunk, dtype=torch.int32)
    full = n - n % blocksize  # values in whole blocks
    for start in range(0, n_bytes, chunk):
        stop = min(start + chunk, n_bytes)
        idx = index[: stop - start]
        idx.copy_(packed[start:stop])  # uint8 -> int32, into a reused buffer
        torch.index_select(_NF4_BYTE_TABLE_INT64, 0, idx, out=out[start:stop])
        lo, hi = 2 * start, min(2 * stop, full)  # lo is a block boundary: 2 * chunk is a multiple of blocksize
        if hi > lo:
            values[lo:hi].view(-1, blocksize).mul_(absmax[lo // blocksize: hi // blocksize, None])
    if full < n:  # the last, partial block
        values[full:n].mul_(absmax[-1])
    return values[:n]


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int] | torch.Size,
                   blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4`: ``NF4_CODE[code] * absmax[block]``, reshaped to ``shape``.

    The product is taken in float32 and then cast to ``dtype``, which is bitsandbytes' definition
    (its pure-torch backend, ``bitsandbytes.backends.default.ops._dequantize_4bit_compute``); the
    result is bit-identical to it for every shape. (bitsandbytes' native CPU kernel gives wrong
    values when the last dimension of ``shape`` is not a multiple of ``blocksize``; see
    docs/REFERENCES.md and the tests.)

    Each byte is looked up in a 256-row table holding its two values at once, which unpacks both
    nibbles in one gather; the scales are then applied in place. On CPU the table rows are 8-byte
    integers (one copy per byte) and the work goes in cache-sized steps of 16 KiB of packed data,
    which keeps it within about 1.0-1.5x of bitsandbytes' native kernel
    (``benchmarks/lora_quant.py``); elsewhere it is one gather over the whole tensor.

    Raises:
        TypeError: ``packed`` not uint8, ``absmax`` not float32, ``dtype`` not a float type.
        ValueError: empty ``shape``, sizes that do not fit together, or a bad ``blocksize``.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be a float32 tensor, got {getattr(absmax, 'dtype', type(absmax).__name__)}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    _check_blocksize(blocksize)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"shape {shape} holds no values: nothing to dequantize")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"shape {shape} holds {n} values, which pack into {(n + 1) // 2} bytes, "
                         f"but packed has {packed.numel()}")
    blocks = _num_blocks(n, blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"shape {shape} with blocksize {blocksize} has {blocks} blocks, "
                         f"but absmax has {absmax.numel()} values")
    if absmax.device != packed.device:
        raise ValueError(f"packed is on {packed.device} but absmax on {absmax.device}")
    packed, absmax = packed.reshape(-1), absmax.reshape(-1)
    if packed.device.type == "cpu":
        out = _unpack_scale_cpu(packed, absmax, n, blocksize)
    else:
        out = _nf4_byte_table(packed.device).index_select(0, packed.int()).reshape(-1)[:n]
        full = n - n % blocksize
        out[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])  # in place: no extra copy
        if full < n:  # the last, partial block
            out[full:].mul_(absmax[-1])
    return out.to(dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise quantization with the dynamic map, and QLoRA's double quantization
# ----------------------------------------------------------------------------------------------


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256,
                            code: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a sorted 256-value code book (default: the dynamic map).

    The same recipe as NF4 with a bigger code book: per block ``absmax = max|x|``, the values
    scaled into [-1, 1], and the index of the nearest code value (an exact midpoint goes to the
    lower index), found with ``torch.bucketize`` against the 255 midpoints. This is
    bitsandbytes' definition (its pure-torch ``quantize_blockwise`` backend, used off CUDA when
    no native kernel exists). bitsandbytes' native CPU kernel searches the code book
    approximately: for values within ~3e-5 (relative) of a midpoint it may pick the other
    neighbour; the tests measure how rarely, and what it changes.

    Returns ``(q, absmax)``: uint8 codes with ``x``'s shape and float32 ``[ceil(n / blocksize)]``.
    """
    _check_float_input(x, "x")
    _check_blocksize(blocksize)
    code = (_DYNAMIC_MAP if code is None else code).to(x.device, torch.float32)
    scaled, absmax = _blockwise_scaled(x.detach().reshape(-1).float(), blocksize)
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return q.reshape(x.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256,
                              code: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``code[q] * absmax[block]`` in float32."""
    if q.dtype != torch.uint8:
        raise TypeError(f"q must be uint8, got {q.dtype}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    _check_blocksize(blocksize)
    code = (_DYNAMIC_MAP if code is None else code).to(q.device, torch.float32)
    n = q.numel()
    if absmax.numel() != _num_blocks(n, blocksize):
        raise ValueError(f"{n} codes in blocks of {blocksize} need {_num_blocks(n, blocksize)} absmax values, "
                         f"got {absmax.numel()}")
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[q.reshape(-1).long()] * scale).reshape(q.shape)


def double_quantize(absmax: torch.Tensor,
                    blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """QLoRA's double quantization of the NF4 block scales.

    The absmax values are all positive and similar, so their mean is subtracted first
    (``offset``) to centre them on 0 and use both halves of the signed 8-bit dynamic code; then
    :func:`quantize_blockwise_8bit` with blocks of ``blocksize`` (256).

    Returns:
        ``(q, absmax2, offset, blocksize)``: uint8 ``[n]``, float32 ``[ceil(n / blocksize)]``,
        float32 0-d tensor, int; pass it to :func:`double_dequantize` as ``double_dequantize(*t)``.
        Matches bitsandbytes' ``quantize_4bit(..., compress_statistics=True)``.
    """
    _check_float_input(absmax, "absmax")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    offset = absmax.mean()
    q, absmax2 = quantize_blockwise_8bit(absmax - offset, blocksize=blocksize)
    return q, absmax2, offset, blocksize


def double_dequantize(q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    """The NF4 absmax back from :func:`double_quantize`'s tuple: ``dynamic[q] * absmax2 + offset``."""
    return dequantize_blockwise_8bit(q, absmax2, blocksize=blocksize) + offset


# ----------------------------------------------------------------------------------------------
# The quantized linear layer and whole-model quantization
# ----------------------------------------------------------------------------------------------


class LinearNF4(nn.Module):
    """An ``nn.Linear`` whose weight is stored in NF4 and dequantized on the fly in ``forward``.

    Buffers (not parameters: they are not trained and the optimizer must not see them):
    ``weight_packed`` (uint8, two codes per byte), and either ``absmax`` (float32, one per block)
    or, with ``double_quant=True``, ``absmax_q`` (uint8), ``absmax_absmax`` (float32, one per 256
    blocks) and ``absmax_offset`` (float32 scalar). The bias, if any, is kept in full precision as
    a frozen parameter.

    ``forward(x)`` dequantizes the weight to ``compute_dtype``, casts ``x`` and the bias to it,
    and returns ``F.linear`` cast back to ``x``'s dtype, as bitsandbytes' ``Linear4bit`` does.
    The weight memory drops from 32 bits per value to 4 + 8/64 + 32/(64*256) ~ 4.127 bits
    (4.5 without double quantization), at the price of a dequantization per call.

    Raises:
        TypeError: ``base_linear`` is not an ``nn.Linear``.
        ValueError: its weight is not 2-D, is empty, or ``blocksize`` is unsupported.
    """

    def __init__(self, base_linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base_linear, nn.Linear):
            raise TypeError(f"LinearNF4 quantizes an nn.Linear, got {type(base_linear).__name__}")
        weight = base_linear.weight
        if weight.dim() != 2:
            raise ValueError(f"LinearNF4 needs a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
        if compute_dtype not in _FLOAT_DTYPES:
            raise TypeError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        self.in_features = base_linear.in_features
        self.out_features = base_linear.out_features
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        packed, absmax = quantize_nf4(weight, blocksize=blocksize)
        self.register_buffer("weight_packed", packed)
        if double_quant:
            q, absmax2, offset, _ = double_quantize(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_absmax", absmax2)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax)
        if base_linear.bias is not None:
            self.bias = nn.Parameter(base_linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every NF4 block (double-dequantized when ``double_quant``)."""
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.absmax_absmax, self.absmax_offset)
        return self.absmax

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight, dequantized (``compute_dtype`` by default)."""
        return dequantize_nf4(self.weight_packed, self.block_absmax(), self.weight_shape,
                              blocksize=self.blocksize, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize_weight()
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _name_matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's list matching: the module name equals a target or ends with ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_model_nf4(model: nn.Module, skip: Sequence[str] = ("lm_head",), blocksize: int = 64,
                       double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (in place) by a :class:`LinearNF4`, except those
    whose name matches ``skip`` (equal to an entry or ending with ``"." + entry``).

    The output layer is skipped by default, as in QLoRA and bitsandbytes' integration: it is
    sensitive to quantization, and in a model with tied embeddings it shares its weight with the
    embedding table. Remaining parameters (embeddings, norms, skipped layers) are left as they
    are. Returns ``model``.
    """
    if isinstance(skip, str):
        skip = (skip,)
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not _name_matches(name, skip):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LinearNF4(module, blocksize=blocksize, double_quant=double_quant,
                                             compute_dtype=compute_dtype))
            replaced += 1
    if replaced == 0:
        raise ValueError(f"quantize_model_nf4 found no nn.Linear to quantize in {type(model).__name__} "
                         f"(skip={tuple(skip)})")
    return model


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers (each tensor counted once, so a tied
    embedding counts once; packed NF4 storage counts as stored: one byte per two weights)."""
    tensors = {id(t): t for t in model.parameters()}
    tensors.update({id(t): t for t in model.buffers()})
    return sum(t.numel() * t.element_size() for t in tensors.values())
