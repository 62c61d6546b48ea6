"""Checks of chapter 6's exercises: dequantizing Q8_0 and Q4_1 blocks, counting a Llama's
parameters, mapping GGUF tensor names to Hugging Face's, and reading a GGUF header.

Every check draws fresh random inputs (random fp16 scales, random bytes, random configurations
with odd sizes, random layer indices) and compares the student's function with the package:
``llama_from_scratch.gguf_reader.dequantize`` (bit-identical to the ``gguf`` package),
``Llama(config).num_parameters()`` and ``llama_from_scratch.loading.gguf_to_hf_name``. A failure
names the input, what was expected and what came back.
"""

from __future__ import annotations

import random
import struct
from typing import Callable

import numpy as np
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.gguf_reader import dequantize
from llama_from_scratch.loading import gguf_to_hf_name


def _rng() -> random.Random:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return random.Random(random.SystemRandom().randrange(2**31))


def _fp16_bytes(rng: random.Random) -> bytes:
    """A finite float16 scale: typical weight scales, negative ones, zero and tiny ones included."""
    value = rng.choice([rng.gauss(0, 0.01), rng.gauss(0, 1), -abs(rng.gauss(0, 0.05)), 0.0,
                        rng.uniform(-1e-5, 1e-5), rng.uniform(-60000, 60000)])
    return np.float16(value).tobytes()


def _show(t: torch.Tensor, n: int = 6) -> str:
    values = t.flatten()[:n].tolist()
    return "[" + ", ".join(f"{v:.6g}" for v in values) + (", ...]" if t.numel() > n else "]")


def _check_block(fn: Callable, ggml_type: str, make_block: Callable[[random.Random], bytes], hint: str) -> None:
    rng = _rng()
    for trial in range(60):
        block = make_block(rng)
        expected = torch.from_numpy(dequantize(np.frombuffer(block, dtype=np.uint8), ggml_type, 32))
        got = fn(bytes(block))
        what = f"dequantize_{ggml_type.lower()}_block(bytes.fromhex('{block.hex()}'))"
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{what} must return a torch.Tensor, got {type(got).__name__}")
        if tuple(got.shape) != (32,):
            raise AssertionError(f"{what} must return 32 values (shape (32,)), got shape {tuple(got.shape)}")
        if got.dtype != torch.float32:
            raise AssertionError(f"{what} must return float32 values, got {got.dtype}")
        if not torch.allclose(got, expected, rtol=1e-6, atol=0.0, equal_nan=True):
            diff = (got - expected).abs()
            i = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
            raise AssertionError(
                f"{what}: expected {_show(expected)}, got {_show(got)}; max abs difference "
                f"{diff.max().item():.3g} at element {i} (expected {expected[i].item():.6g}, got {got[i].item():.6g}). "
                f"{hint}")


def _q8_0_block(rng: random.Random) -> bytes:
    return _fp16_bytes(rng) + bytes(rng.randrange(256) for _ in range(32))


def _q4_1_block(rng: random.Random) -> bytes:
    return _fp16_bytes(rng) + _fp16_bytes(rng) + bytes(rng.randrange(256) for _ in range(16))


def check_dequantize_q8_0_block(fn: Callable) -> None:
    """``fn(block: bytes)`` -> 32 float32 values of one Q8_0 block (34 bytes)."""
    _check_block(fn, "Q8_0", _q8_0_block,
                 "A Q8_0 block is a little-endian float16 scale d (2 bytes) and 32 SIGNED int8 q; value = d * q "
                 "in float32 (e.g. np.frombuffer(block[2:], dtype=np.int8)).")


def check_dequantize_q4_1_block(fn: Callable) -> None:
    """``fn(block: bytes)`` -> 32 float32 values of one Q4_1 block (20 bytes)."""
    _check_block(fn, "Q4_1", _q4_1_block,
                 "A Q4_1 block is float16 d, float16 m, then 16 bytes: element j < 16 is the LOW nibble of byte j, "
                 "element j + 16 the HIGH nibble of byte j; value = d * q + m in float32.")


def _random_config(rng: random.Random) -> LlamaConfig:
    n_kv_heads = rng.randrange(1, 5)
    n_heads = n_kv_heads * rng.randrange(1, 5)
    head_dim = 2 * rng.randrange(1, 12)
    return LlamaConfig(
        vocab_size=rng.randrange(3, 3000), dim=n_heads * head_dim, n_layers=rng.randrange(1, 7),
        n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=rng.randrange(1, 400),
        max_seq_len=rng.randrange(1, 64), tie_embeddings=rng.random() < 0.5,
    )


def _llama_parameters(config: LlamaConfig) -> int:
    from llama_from_scratch.model import Llama

    with torch.device("meta"):  # shapes only: no memory, no random initialization
        return Llama(config).num_parameters()


def check_count_llama_parameters(fn: Callable) -> None:
    """``fn(config: LlamaConfig)`` -> the number of parameters of ``Llama(config)``."""
    rng = _rng()
    configs = [LlamaConfig.smollm2_135m(), LlamaConfig.llama32_1b(), LlamaConfig()]
    configs += [_random_config(rng) for _ in range(25)]
    for config in configs:
        expected = _llama_parameters(config)
        got = fn(config)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, np.integer)) or isinstance(got, bool):
            raise AssertionError(f"count_llama_parameters must return an int, got {type(got).__name__} ({got!r})")
        if got != expected:
            c = config
            raise AssertionError(
                f"count_llama_parameters({c}) returned {int(got):,}; expected {expected:,} (off by "
                f"{int(got) - expected:+,}). Remember: k and v project to n_kv_heads * head_dim = "
                f"{c.n_kv_heads * c.head_dim} outputs, the MLP has three {c.dim} x {c.hidden_dim} matrices, there are "
                f"2 RMSNorms per layer plus a final one, and a tied output layer (tie_embeddings={c.tie_embeddings}) "
                "adds nothing.")


_LAYER_PARTS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


def check_gguf_to_hf_name(fn: Callable) -> None:
    """``fn(name)`` -> the Hugging Face name of a llama.cpp tensor name; KeyError if unknown."""
    rng = _rng()
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for part in _LAYER_PARTS:
        names += [f"blk.{rng.randrange(0, 200)}.{part}.weight", f"blk.{rng.choice([0, 1, 9, 10, 31])}.{part}.weight"]
    rng.shuffle(names)
    for name in names:
        expected = gguf_to_hf_name(name)
        got = fn(name)
        if got != expected:
            raise AssertionError(f"gguf_to_hf_name({name!r}) returned {got!r}; expected {expected!r}")
    for bad in ["blk.0.attn_qkv.weight", "rope_freqs.weight", f"blk.{rng.randrange(50)}.ffn_gate_exps.weight",
                "token_embedding.weight"]:
        try:
            got = fn(bad)
        except KeyError:
            continue
        except Exception as exc:  # noqa: BLE001 - any other exception is the wrong kind
            raise AssertionError(
                f"gguf_to_hf_name({bad!r}) raised {type(exc).__name__}: {exc}; it should raise KeyError "
                "for a name it does not know") from None
        raise AssertionError(f"gguf_to_hf_name({bad!r}) returned {got!r}; it should raise KeyError (not a Llama tensor)")


def check_read_gguf_header(fn: Callable) -> None:
    """``fn(data: bytes)`` -> ``(version, tensor_count, metadata_count)``; ValueError if not GGUF."""
    rng = _rng()
    for trial in range(30):
        version = rng.choice([2, 3, 3, rng.randrange(1, 2**32)])
        n_tensors = rng.choice([0, rng.randrange(1, 2000), rng.randrange(2**32, 2**50)])
        n_kv = rng.choice([0, rng.randrange(1, 100), rng.randrange(2**33, 2**60)])
        tail = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        data = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + tail
        got = fn(data)
        expected = (version, n_tensors, n_kv)
        if not isinstance(got, tuple) or tuple(got) != expected:
            raise AssertionError(
                f"read_gguf_header(bytes.fromhex('{data[:24].hex()}') + ...) returned {got!r}; expected {expected} "
                "(after the 4-byte magic: version u32, tensor count u64, metadata count u64, all little-endian: "
                "struct format '<IQQ')")
    bad_inputs = {
        "a wrong magic": b"GGML" + struct.pack("<IQQ", 3, 1, 1),
        "a big-endian-looking magic": b"FUGG" + struct.pack("<IQQ", 3, 1, 1),
        f"only {rng.randrange(4, 24)} bytes": None,
    }
    for what, data in bad_inputs.items():
        if data is None:
            data = (b"GGUF" + struct.pack("<IQQ", 3, 1, 1))[: int(what.split()[1])]
        try:
            got = fn(data)
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001 - any other exception is the wrong kind
            raise AssertionError(
                f"read_gguf_header on {what} ({data!r}) raised {type(exc).__name__}: {exc}; raise ValueError instead"
            ) from None
        raise AssertionError(f"read_gguf_header on {what} ({data!r}) returned {got!r}; it should raise ValueError")


CHECKS = {
    "dequantize_q8_0_block": check_dequantize_q8_0_block,
    "dequantize_q4_1_block": check_dequantize_q4_1_block,
    "count_llama_parameters": check_count_llama_parameters,
    "gguf_to_hf_name": check_gguf_to_hf_name,
    "read_gguf_header": check_read_gguf_header,
}
