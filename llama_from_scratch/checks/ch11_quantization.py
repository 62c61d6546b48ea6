"""Checks for the exercises of chapter 11 (NF4 quantization and QLoRA).

Every check draws fresh random inputs (odd sizes, partial last blocks, random offsets and block
sizes, exact ties) and compares the student's function with the package's
``llama_from_scratch.quantization`` (which the tests prove byte-for-byte equal to bitsandbytes)
and, where it runs on CPU, with ``bitsandbytes.functional`` itself. Messages name the input, the
expected value and what came back.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
from torch import nn

from llama_from_scratch.quantization import (
    NF4_CODE,
    LinearNF4,
    create_dynamic_map,
    create_normal_map,
    double_dequantize,
    double_quantize,
    memory_footprint,
    quantize_absmax_int8,
    quantize_nf4,
)

_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def _rng() -> random.Random:
    return random.Random()


def _as_tensor(got, name: str) -> torch.Tensor:
    assert isinstance(got, torch.Tensor), f"{name} must return a torch.Tensor, got {type(got).__name__}"
    return got


def _bitsandbytes_functional():
    """``bitsandbytes.functional`` when it imports (it does on CPU), else None."""
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as BF
    except Exception:  # noqa: BLE001 - an optional second reference
        return None
    return BF


# ----- 1. the NF4 code from normal quantiles ------------------------------------------------------


def check_nf4_code(fn: Callable) -> None:
    rng = _rng()
    offsets = [0.9677083] + [rng.uniform(0.85, 0.995) for _ in range(8)]
    for offset in offsets:
        got = _as_tensor(fn(offset), "nf4_code")
        expected = create_normal_map(offset)
        assert tuple(got.shape) == (16,), f"nf4_code({offset:.7f}) has shape {tuple(got.shape)}, expected (16,)"
        assert got.dtype == torch.float32, f"nf4_code({offset:.7f}) must be float32, got {got.dtype}"
        assert bool((got[1:] > got[:-1]).all()), (
            f"nf4_code({offset:.7f}) must be sorted in increasing order with 16 distinct values, got "
            f"{[round(v, 4) for v in got.tolist()]}")
        assert got[7].item() == 0.0, (
            f"nf4_code({offset:.7f})[7] = {got[7].item():.3g}: NF4 has an exact zero at index 7 (7 negative values, "
            "0, then 8 positive ones)")
        assert abs(got[-1].item() - 1) < 1e-7 and abs(got[0].item() + 1) < 1e-7, (
            f"nf4_code({offset:.7f}) spans [{got[0].item():.4f}, {got[-1].item():.4f}]; divide by the largest value "
            "so that it spans [-1, 1] (both ends are the quantile at probability `offset`)")
        diff = (got - expected).abs().max().item()
        worst = int((got - expected).abs().argmax())
        assert diff < 1e-6, (
            f"nf4_code({offset:.7f}) differs from the normal-quantile code by {diff:.3g} at index {worst}: got "
            f"{got[worst].item():.6f}, expected {expected[worst].item():.6f}. Positive half: "
            "ndtri(linspace(offset, 0.5, 9)[:-1]) (8 values), negative half: -ndtri(linspace(offset, 0.5, 8)[:-1]) "
            "(7 values), plus 0; sort; divide by the max")
    BF = _bitsandbytes_functional()
    if BF is not None:
        reference = BF.get_4bit_type("nf4", device="cpu")
        diff = (fn(0.9677083) - reference).abs().max().item()
        assert diff < 1e-6, f"nf4_code(0.9677083) differs from bitsandbytes' NF4 table by {diff:.3g}"


# ----- 2. the absmax of every block ---------------------------------------------------------------


def _random_tensor(rng: random.Random, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    ndim = rng.choice([1, 1, 2, 2, 3])
    shape = tuple(rng.randrange(1, 40 if ndim > 1 else 700) for _ in range(ndim))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(shape, generator=gen) * rng.choice([0.02, 1.0, 30.0])
    if x.numel() > 3 and rng.random() < 0.3:
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([-1, 1]) * 500.0   # an outlier
    return x.to(dtype)


def check_block_absmax(fn: Callable) -> None:
    rng = _rng()
    cases = [(torch.arange(10.0) - 6, 4), (torch.zeros(5), 2), (torch.randn(3, 64), 64), (torch.randn(7), 64)]
    for _ in range(25):
        x = _random_tensor(rng, rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
        cases.append((x, rng.choice([1, 3, 7, 32, 50, 64, 100, 256])))
    wide = torch.randn(48, 20)
    cases.append((wide.T, 64))   # not contiguous: blocks follow the row-major order of x as it is
    for x, blocksize in cases:
        original = x.clone()
        expected = quantize_absmax_int8(x, blocksize=blocksize)[1]
        got = _as_tensor(fn(x, blocksize), "block_absmax")
        assert torch.equal(x, original), "block_absmax must not modify x"
        n_blocks = math.ceil(x.numel() / blocksize)
        assert tuple(got.shape) == (n_blocks,), (
            f"block_absmax(x of shape {tuple(x.shape)} = {x.numel()} values, blocksize={blocksize}) has shape "
            f"{tuple(got.shape)}, expected ({n_blocks},): one value per block of the flattened tensor, the last "
            "block may be partial")
        assert got.dtype == torch.float32, f"block_absmax must return float32, got {got.dtype} (input {x.dtype})"
        if not torch.equal(got, expected):
            bad = int((got != expected).nonzero()[0])
            hint = (" (x is not contiguous here: flatten it with reshape(-1), which follows the logical row-major "
                    "order)" if not x.is_contiguous() else "")
            raise AssertionError(
                f"block_absmax(x of shape {tuple(x.shape)}, blocksize={blocksize}): block {bad} (values "
                f"{bad * blocksize}..{min((bad + 1) * blocksize, x.numel()) - 1}) got {got[bad].item():.6g}, expected "
                f"max |x| = {expected[bad].item():.6g}{hint}")


# ----- 3. the nearest NF4 code --------------------------------------------------------------------


def check_nearest_nf4(fn: Callable) -> None:
    rng = _rng()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    n = rng.randrange(200, 2000)
    values = [torch.rand(n, generator=gen) * 2 - 1,
              NF4_CODE.clone(),                                         # each code maps to itself
              _NF4_MIDPOINTS.clone(),                                   # exact ties: the lower code
              torch.nextafter(_NF4_MIDPOINTS, torch.tensor(2.0)),       # just above a midpoint: the upper
              torch.tensor([-1.0, 1.0, 0.0, -0.0]),
              (torch.randn(n, generator=gen) * 0.4).clamp(-1, 1)]
    for x in values:
        x = x[torch.randperm(x.numel(), generator=gen)]
        expected = torch.bucketize(x, _NF4_MIDPOINTS).to(torch.uint8)
        got = _as_tensor(fn(x.clone()), "nearest_nf4")
        assert tuple(got.shape) == tuple(x.shape), (
            f"nearest_nf4 of {x.numel()} values returned shape {tuple(got.shape)}, expected {tuple(x.shape)}")
        assert got.dtype == torch.uint8, f"nearest_nf4 must return uint8 codes, got {got.dtype}"
        if not torch.equal(got, expected):
            i = int((got != expected).nonzero()[0])
            v, e, g = x[i].item(), int(expected[i]), int(got[i])
            tie = any(v == m for m in _NF4_MIDPOINTS.tolist())
            extra = (" This value is exactly the float32 midpoint (NF4_CODE[i] + NF4_CODE[i+1]) / 2: a tie goes to "
                     "the LOWER code, as in bitsandbytes (count the midpoints strictly below x, or use "
                     "torch.bucketize with right=False). argmin over |x - code| can get ties wrong." if tie else "")
            raise AssertionError(
                f"nearest_nf4: value {v!r} got code {g} (NF4 value {NF4_CODE[g].item() if 0 <= g < 16 else float('nan'):.6f}), "
                f"expected code {e} (NF4 value {NF4_CODE[e].item():.6f}).{extra}")
    x2 = torch.rand(3, 5, 7, generator=gen) * 2 - 1
    got = _as_tensor(fn(x2.clone()), "nearest_nf4")
    assert tuple(got.shape) == (3, 5, 7) and torch.equal(got, torch.bucketize(x2, _NF4_MIDPOINTS).to(torch.uint8)), (
        "nearest_nf4 of a [3, 5, 7] tensor must return codes of the same shape")


# ----- 4. packing two 4-bit codes per byte --------------------------------------------------------


def _reference_pack(codes: torch.Tensor) -> torch.Tensor:
    c = codes.reshape(-1)
    if c.numel() % 2:
        c = torch.cat([c, torch.tensor([7], dtype=torch.uint8)])
    return (c[0::2] << 4) | c[1::2]


def check_pack_nibbles(fn: Callable) -> None:
    rng = _rng()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cases = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([15, 0, 3], dtype=torch.uint8),
             torch.tensor([9], dtype=torch.uint8)]
    cases += [torch.randint(0, 16, (rng.randrange(1, 500),), generator=gen, dtype=torch.uint8) for _ in range(20)]
    for codes in cases:
        original = codes.clone()
        expected = _reference_pack(codes)
        got = _as_tensor(fn(codes), "pack_nibbles")
        assert torch.equal(codes, original), "pack_nibbles must not modify its input"
        assert got.dtype == torch.uint8, f"pack_nibbles must return uint8, got {got.dtype}"
        assert tuple(got.shape) == tuple(expected.shape), (
            f"pack_nibbles of {codes.numel()} codes returned shape {tuple(got.shape)}, expected "
            f"{tuple(expected.shape)}: (n + 1) // 2 bytes")
        if not torch.equal(got, expected):
            i = int((got != expected).nonzero()[0])
            pair = codes[2 * i:2 * i + 2].tolist()
            rule = ("the last code of an odd count is paired with the padding code 7 (the NF4 value 0.0) in the low "
                    "nibble" if len(pair) == 1 else
                    "the FIRST code goes in the HIGH nibble, byte = code[2i] << 4 | code[2i+1]")
            raise AssertionError(
                f"pack_nibbles of {codes.numel()} codes: byte {i} holds codes {pair}; got {int(got[i]):08b}, expected "
                f"{int(expected[i]):08b}: {rule}")
    # the same bytes as bitsandbytes / the package for real NF4 data
    w = torch.randn(rng.randrange(100, 1000) * 2 + 1, generator=gen) * 0.05
    packed, _ = quantize_nf4(w, blocksize=64)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: w.numel()]   # the codes, unpacked
    BF = _bitsandbytes_functional()
    reference = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")[0].reshape(-1) if BF is not None else packed
    got = fn(codes)
    assert torch.equal(got.reshape(-1), reference), (
        f"pack_nibbles of the NF4 codes of {w.numel()} weights differs from bitsandbytes' quantize_4bit bytes")


# ----- 5. a double-quantization round trip --------------------------------------------------------


def check_double_quant_roundtrip(fn: Callable) -> None:
    rng = _rng()
    code = create_dynamic_map()
    sizes = [1, 300, 5, 255, 256, 257] + [rng.randrange(2, 3000) for _ in range(3)] + [rng.randrange(3000, 20000)]
    for n in sizes:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        # NF4 block scales: positive, similar sizes, a few large ones
        absmax = (torch.rand(n, generator=gen) * 0.1 + 0.05) * rng.choice([1.0, 0.01, 30.0])
        if n > 10:
            absmax[torch.randint(0, n, (max(1, n // 500),), generator=gen)] *= 4
        if n == 300:
            absmax = torch.full((n,), 0.17)   # every scale equals the mean: absmax2 = 0 in both blocks
        original = absmax.clone()
        expected = double_dequantize(*double_quantize(absmax))
        got = _as_tensor(fn(absmax), "double_quant_roundtrip")
        assert torch.equal(absmax, original), "double_quant_roundtrip must not modify absmax"
        assert tuple(got.shape) == (n,) and got.dtype == torch.float32, (
            f"double_quant_roundtrip of {n} scales returned {got.dtype} of shape {tuple(got.shape)}, expected float32 "
            f"of shape ({n},)")
        q, absmax2, offset, _ = double_quantize(absmax)
        step = absmax2.repeat_interleave(256)[:n]
        # the nearest of 256 codes; allow a neighbouring code where the scaled value lies on a midpoint
        # (within float32 rounding), e.g. from dividing instead of multiplying by 1 / absmax2
        assert not bool(torch.isnan(got).any()), (
            f"double_quant_roundtrip of {n} scales returned NaN at index {int(torch.isnan(got).nonzero()[0])}: a block "
            "whose values all equal the mean (e.g. a single scale) has absmax2 = 0; divide by "
            "absmax2.clamp(min=1e-38) as bitsandbytes does, so that 0 / absmax2 gives code 0.0")
        err = (got - expected).abs()
        ok = err <= 1e-6 * step + 1e-12
        if not bool(ok.all()):
            scaled = (absmax - offset) / step
            lower = torch.clamp(q.long() - 1, 0, 254)
            near_mid = torch.minimum((scaled - (code[lower] + code[lower + 1]) / 2).abs(),
                                     (scaled - (code[q.long()] + code[torch.clamp(q.long() + 1, max=255)]) / 2).abs())
            tolerated = ~ok & (near_mid < 1e-6) & (err <= 0.016 * step)
            bad = ~ok & ~tolerated
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                block = i // 256
                raise AssertionError(
                    f"double_quant_roundtrip of {n} scales: scale {i} = {absmax[i].item():.6g} came back as "
                    f"{got[i].item():.6g}, expected {expected[i].item():.6g}. Recipe: offset = absmax.mean(); "
                    f"blocks of 256 of (absmax - offset); per block absmax2 = max |.| (block {block}: "
                    f"{absmax2[block].item():.4g}); the nearest value of create_dynamic_map() to (value / absmax2); "
                    "back: code[q] * absmax2 + offset")
    # the round trip must really go through 8 bits: at most 256 distinct values per block
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    absmax = torch.rand(2048, generator=gen) + 0.5
    got = fn(absmax)
    distinct = max(torch.unique(got[i:i + 256]).numel() for i in range(0, 2048, 256))
    assert distinct <= 256 and not torch.equal(got, absmax), (
        "double_quant_roundtrip returned the scales unchanged: quantize them to 8-bit codes and back")


# ----- 6. bits per weight of an NF4 matrix --------------------------------------------------------


def check_nf4_bits_per_weight(fn: Callable) -> None:
    rng = _rng()
    cases = [(576, 576, 64, True), (576, 576, 64, False), (1, 1, 64, True), (7, 9, 32, False), (3, 200, 4096, True)]
    for _ in range(12):
        cases.append((rng.randrange(1, 700), rng.randrange(1, 700), rng.choice([32, 64, 128, 256, 1024]),
                      rng.random() < 0.5))
    for out_f, in_f, blocksize, double_quant in cases:
        layer = LinearNF4(nn.Linear(in_f, out_f, bias=False), blocksize=blocksize, double_quant=double_quant)
        expected = memory_footprint(layer) * 8 / (out_f * in_f)
        got = fn(out_f * in_f, blocksize, double_quant)
        assert isinstance(got, (int, float)) and not isinstance(got, bool), (
            f"nf4_bits_per_weight must return a number, got {type(got).__name__}")
        assert abs(got - expected) < 1e-9, (
            f"nf4_bits_per_weight(n={out_f * in_f}, blocksize={blocksize}, double_quant={double_quant}) = {got!r}, "
            f"expected {expected!r} (measured on LinearNF4's buffers). Count bytes: ceil(n / 2) for the codes, and per "
            f"block ({math.ceil(out_f * in_f / blocksize)} blocks) either a float32 absmax or, with double "
            "quantization, one uint8 code, plus a float32 absmax per 256 blocks and one float32 offset")


CHECKS = {
    "nf4_code": check_nf4_code,
    "block_absmax": check_block_absmax,
    "nearest_nf4": check_nearest_nf4,
    "pack_nibbles": check_pack_nibbles,
    "double_quant_roundtrip": check_double_quant_roundtrip,
    "nf4_bits_per_weight": check_nf4_bits_per_weight,
}
