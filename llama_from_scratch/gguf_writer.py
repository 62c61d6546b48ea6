"""Writing a Llama to a GGUF file, from scratch with `struct` and numpy: the reader in reverse.

Chapter 6 read llama.cpp's single-file format; this module writes it, so that a model trained or
fine-tuned with this package can be run by llama.cpp, transformers (``gguf_file=``) or
:meth:`Llama.from_gguf <llama_from_scratch.model.Llama.from_gguf>`. The file is, in order:

    magic "GGUF" | version 3 (u32) | tensor_count (u64) | kv_count (u64)
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims (fastest-varying first), ggml_type: u32,
                    offset in the data section: u64, a multiple of the alignment)
    zero padding to a multiple of the alignment (32), then each tensor's bytes, each padded too

Three things make a model file rather than just a container:

* **Metadata** under llama.cpp's names: ``general.architecture = "llama"``, the ``llama.*``
  hyperparameters that :func:`~llama_from_scratch.loading.config_from_gguf` reads back and, with a
  tokenizer, the ``tokenizer.ggml.*`` keys (vocabulary, merges, token types, special ids, chat
  template) from which transformers and llama.cpp rebuild it.
* **Names and layout**: Hugging Face names become llama.cpp's (``model.layers.3.self_attn.q_proj``
  -> ``blk.3.attn_q``), dimensions are written reversed, and the rows of q and k go back to the
  interleaved RoPE order llama.cpp computes with (:func:`~llama_from_scratch.rope.unpermute_qk`,
  the inverse of what the loader undoes).
* **Quantization**, the inverse of the reader's dequantizers: blocks of 32 weights with fp16
  constants. Q8_0: ``d = max|x| / 127``, ``q = round(x / d)``. Q4_0: ``d = x_absmax / -8`` (the
  signed value of largest magnitude), ``q = min(15, trunc(x / d + 8.5))``. Q4_1: ``d = (max - min)
  / 15``, ``m = min``, ``q = min(15, trunc((x - m) / d + 0.5))``. The arithmetic is ggml's
  reference (``quantize_row_*_ref``): float32, ``1/d`` from the unrounded ``d``, ``roundf``
  (halves away from zero). The bytes equal ``gguf.quants.quantize``'s (tested).

As llama.cpp's converter does, 1-D tensors (the RMSNorm gains) stay float32 whatever ``dtype`` is
asked for: they are tiny and every backend computes norms in float32. Llama 3.1's RoPE scaling
travels the way llama.cpp stores it, as a float32 tensor ``rope_freqs.weight`` holding the
``head_dim / 2`` factors that divide each frequency (transformers' GGUF loader ignores that tensor,
in llama.cpp's own files as in these).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama_from_scratch.gguf_reader import DEFAULT_ALIGNMENT, GGML_TYPES, GGUF_MAGIC
from llama_from_scratch.rope import rope_inv_freq, unpermute_qk

__all__ = ["GGUF_WRITE_DTYPES", "hf_to_gguf_name", "quantize", "save_gguf"]

# dtype argument of save_gguf -> (ggml type name, llama.cpp's general.file_type: LLAMA_FTYPE_*)
GGUF_WRITE_DTYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "q4_0": ("Q4_0", 2),
    "q4_1": ("Q4_1", 3),
    "q8_0": ("Q8_0", 7),
}
GGML_QUANT_VERSION = 2  # general.quantization_version: the block layouts of ggml since 2023
_TYPE_ID = {t.name: t.id for t in GGML_TYPES.values()}
_F16_MAX = 65504.0

# Metadata value type ids (the reader's GGUF_VALUE_TYPES)
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9

# Hugging Face (this package's) name -> llama.cpp's; the inverse of gguf_reader.py's tables
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def hf_to_gguf_name(name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name (the inverse of ``gguf_to_hf_name``).

    ``"model.layers.3.self_attn.q_proj.weight"`` -> ``"blk.3.attn_q.weight"``,
    ``"lm_head.weight"`` -> ``"output.weight"``. Raises ``KeyError`` for a name it does not know.
    """
    base, _, kind = name.rpartition(".")
    if kind in ("weight", "bias"):
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
        parts = base.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_NAMES:
            return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}.{kind}"
    raise KeyError(f"no llama.cpp tensor name corresponds to {name!r} (merge LoRA adapters before exporting)")


# --- quantizers -------------------------------------------------------------------------------


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: to the nearest integer, halves away from zero (numpy rounds halves to even).

    ``a - floor(a)`` is exact in float32, so the comparison with 0.5 is too.
    """
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + (a - whole >= 0.5))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``[n, 32]`` values 0..15 -> ``[n, 16]`` bytes: element j in the low nibble of byte j,
    element j + 16 in its high nibble (the reader's ``_nibbles`` in reverse)."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 ``[n, 1]`` -> its fp16 bytes ``[n, 2]`` (little-endian, round to nearest even)."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``1 / d`` in float32, and 0 where ``d`` is 0 (an all-zero block), as ggml does."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def quantize(values: np.ndarray | torch.Tensor, ggml_type: str) -> np.ndarray:
    """Encodes float values into the bytes of ``ggml_type`` (F32, F16, Q8_0, Q4_0 or Q4_1).

    The values are flattened in C order (the last, fastest dimension first within a row); a
    block-quantized type needs a multiple of 32 of them. Returns a uint8 array of
    ``n / block_size * type_size`` bytes, which the reader's ``dequantize`` decodes back
    (exactly for F32; to the nearest of the format's levels otherwise).
    """
    x = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if ggml_type == "F32":
        return x.astype("<f4").view(np.uint8)
    if ggml_type == "F16":
        return x.astype("<f2").view(np.uint8)
    if ggml_type not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ValueError(f"cannot quantize to {ggml_type!r}; supported: F32, F16, Q8_0, Q4_0, Q4_1")
    block_size = GGML_TYPES[_TYPE_ID[ggml_type]].block_size
    if x.size % block_size:
        raise ValueError(f"{ggml_type} quantizes blocks of {block_size} values; got {x.size} values")
    blocks = x.reshape(-1, block_size)
    if ggml_type == "Q8_0":
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        q = _roundf(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([_fp16_bytes(d), q], axis=1).reshape(-1)
    if ggml_type == "Q4_0":
        # the value of largest magnitude, with its sign, becomes level 0 (it maps to -8)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = extreme / np.float32(-8)
        q = np.minimum(np.trunc(blocks * _inverse(d) + np.float32(8.5)), 15)
        return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1).reshape(-1)
    # Q4_1
    lo = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - lo) / np.float32(15)
    q = np.minimum(np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)), 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1).reshape(-1)


# --- metadata -----------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


_SCALAR_FORMATS = {_UINT32: "<I", _INT32: "<i", _FLOAT32: "<f", _BOOL: "<?"}


def _value(value_type: int, value: Any) -> bytes:
    """The bytes of one metadata value (without its type); arrays are ``(item_type, items)``."""
    if value_type == _STRING:
        return _string(value)
    if value_type == _ARRAY:
        item_type, items = value
        head = struct.pack("<IQ", item_type, len(items))
        if item_type == _STRING:
            return head + b"".join(_string(s) for s in items)
        return head + np.asarray(items, dtype=_SCALAR_FORMATS[item_type].replace("?", "u1")).tobytes()
    return struct.pack(_SCALAR_FORMATS[value_type], value)


def _llama_metadata(config: Any, name: str, file_type: int) -> list[tuple[str, int, Any]]:
    """The general.* and llama.* keys that describe the architecture."""
    u32 = lambda key, v: (key, _UINT32, int(v))  # noqa: E731
    return [
        ("general.architecture", _STRING, "llama"),
        ("general.name", _STRING, name),
        u32("general.file_type", file_type),
        u32("general.quantization_version", GGML_QUANT_VERSION),
        u32("llama.vocab_size", config.vocab_size),
        u32("llama.context_length", config.max_seq_len),
        u32("llama.embedding_length", config.dim),
        u32("llama.block_count", config.n_layers),
        u32("llama.feed_forward_length", config.hidden_dim),
        u32("llama.attention.head_count", config.n_heads),
        u32("llama.attention.head_count_kv", config.n_kv_heads),
        u32("llama.rope.dimension_count", config.head_dim),
        ("llama.rope.freq_base", _FLOAT32, float(config.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", _FLOAT32, float(config.norm_eps)),
    ]


def _tokenizer_metadata(tokenizer: Any, vocab_size: int) -> list[tuple[str, int, Any]]:
    """The tokenizer.* keys of a byte-level BPE tokenizer (a ``SmolLM2Tokenizer``)."""
    from llama_from_scratch.smollm2_tokenizer import SmolLM2Tokenizer

    if not isinstance(tokenizer, SmolLM2Tokenizer):
        raise TypeError(
            f"tokenizer must be a SmolLM2Tokenizer (byte-level BPE, e.g. from load_smollm2_tokenizer), "
            f"got {type(tokenizer).__name__}"
        )
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
            "readers take the vocabulary size from the tokens, so they must agree"
        )
    entries: list[tuple[str, int, Any]] = [
        ("tokenizer.ggml.model", _STRING, "gpt2"),
        # the regex this tokenizer splits with ("gpt2" or llama.cpp's "smollm")
        ("tokenizer.ggml.pre", _STRING, tokenizer.pre_tokenizer),
        ("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokenizer.tokens)),
        # 1 = normal, 3 = control (special tokens, matched whole in the text)
        ("tokenizer.ggml.token_type", _ARRAY, (_INT32, [3 if s else 1 for s in tokenizer._is_special])),
        ("tokenizer.ggml.merges", _ARRAY, (_STRING, [f"{a} {b}" for a, b in tokenizer.merge_ranks])),
    ]
    for key, token_id in [("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                          ("unknown_token_id", tokenizer.unk_token_id),
                          ("padding_token_id", tokenizer.pad_token_id)]:
        if token_id is not None:
            entries.append((f"tokenizer.ggml.{key}", _UINT32, int(token_id)))
    # this tokenizer never prepends BOS or a space: tell llama.cpp not to either
    entries += [("tokenizer.ggml.add_bos_token", _BOOL, False), ("tokenizer.ggml.add_space_prefix", _BOOL, False)]
    if tokenizer.chat_template is not None:
        entries.append(("tokenizer.chat_template", _STRING, tokenizer.chat_template))
    return entries


# --- tensors ------------------------------------------------------------------------------------


def _gguf_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """``(llama.cpp name, float32 CPU tensor in GGUF's layout)`` for every weight, in llama.cpp's
    order: embedding, blocks, final norm, output (absent when tied to the embedding)."""
    config = model.config
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    unknown = [k for k in state if not k.endswith(".weight") or _safe_name(k) is None]
    if unknown:
        raise ValueError(f"cannot export these parameters to a llama GGUF file: {unknown[:8]} "
                         "(merge LoRA adapters and dequantize the model first)")
    tensors = []
    for hf_name, tensor in state.items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if hf_name.endswith("q_proj.weight"):
            tensor = unpermute_qk(tensor, config.n_heads)  # rotate-half -> interleaved RoPE rows
        elif hf_name.endswith("k_proj.weight"):
            tensor = unpermute_qk(tensor, config.n_kv_heads)
        tensors.append((hf_to_gguf_name(hf_name), tensor))
    rope_freqs = _rope_freqs(config)
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", rope_freqs))
    order = {"rope_freqs.weight": -1, "token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}
    return sorted(tensors, key=lambda item: order.get(item[0], 1))  # stable: blocks keep their order


def _rope_freqs(config: Any) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs.weight`` for llama3 RoPE scaling (None without scaling).

    Readers (llama.cpp, this package's loader) recover the scaling from these factors assuming
    Llama 3.1's ``low_freq_factor = 1`` and ``high_freq_factor = 4``, and take ``factor`` as the
    largest of them: other settings could not be read back, so they are refused.
    """
    scaling = config.rope_scaling
    if scaling is None:
        return None
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"RoPE scaling {scaling} is not exported; only default and llama3 RoPE are supported")
    if float(scaling["low_freq_factor"]) != 1.0 or float(scaling["high_freq_factor"]) != 4.0:
        raise ValueError(
            f"llama3 RoPE scaling with low_freq_factor={scaling['low_freq_factor']}, high_freq_factor="
            f"{scaling['high_freq_factor']} cannot be exported: GGUF readers assume Llama 3.1's 1 and 4"
        )
    factors = rope_inv_freq(config.head_dim, config.rope_theta) / rope_inv_freq(config.head_dim, config.rope_theta, scaling)
    if not torch.isclose(factors.max(), torch.tensor(float(scaling["factor"])), rtol=1e-6):
        raise ValueError(
            f"no RoPE frequency of this model is slowed by the full factor {scaling['factor']} (head_dim "
            f"{config.head_dim}, rope_theta {config.rope_theta}): GGUF readers could not recover it"
        )
    return factors


def _safe_name(name: str) -> str | None:
    try:
        return hf_to_gguf_name(name)
    except KeyError:
        return None


def _pad(n: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
    return -n % alignment


def save_gguf(
    model: Any,
    path: str | os.PathLike,
    tokenizer: Any = None,
    dtype: str = "f32",
    name: str = "llama_from_scratch",
) -> Path:
    """Writes ``model`` (a :class:`~llama_from_scratch.model.Llama`) to the GGUF file ``path``.

    Args:
        model: the model; its ``config`` gives the ``llama.*`` metadata. Tied embeddings are
            written once (no ``output.weight``, which is how readers recognise tying).
        path: the file to write (its folder must exist).
        tokenizer: optionally a ``SmolLM2Tokenizer`` (byte-level BPE) with ``vocab_size`` tokens,
            written as ``tokenizer.ggml.*`` metadata so that readers rebuild it.
        dtype: the type of the 2-D weight matrices: ``"f32"``, ``"f16"``, ``"q8_0"`` (8.5 bits
            per weight), ``"q4_1"`` (5) or ``"q4_0"`` (4.5). Norm gains always stay float32. The
            q types need every matrix row (``in_features`` and ``dim``) to be a multiple of 32.
        name: ``general.name``.

    Returns the path. Raises ``ValueError`` for an unknown dtype, rows that the block size does
    not divide, NaN or infinite weights, weights beyond float16's range with ``"f16"``, RoPE
    scaling other than Llama 3.1's, or parameters that have no llama.cpp name (un-merged LoRA,
    4-bit layers).
    """
    if dtype not in GGUF_WRITE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(GGUF_WRITE_DTYPES)}")
    ggml_type, file_type = GGUF_WRITE_DTYPES[dtype]
    config = model.config
    tensors = _gguf_tensors(model)

    types = {}
    for tname, tensor in tensors:
        types[tname] = ggml_type if tensor.dim() == 2 else "F32"
        block = GGML_TYPES[_TYPE_ID[types[tname]]].block_size
        if tensor.shape[-1] % block:
            raise ValueError(
                f"{dtype} quantizes rows in blocks of {block} values, but {tname} has rows of "
                f"{tensor.shape[-1]} (shape {tuple(tensor.shape)}); use f16 or f32, or a width that is a "
                f"multiple of {block}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{tname} has NaN or infinite values; nothing to export")
        if ggml_type == "F16" and tensor.dim() == 2 and tensor.abs().max() > _F16_MAX:
            raise ValueError(f"{tname} has values beyond float16's range (+-{_F16_MAX:g}); use f32 or a q type")

    metadata = _llama_metadata(config, name, file_type)
    if config.rope_scaling is not None:  # used by readers with rope_freqs.weight (YaRN's key in llama.cpp)
        original = int(config.rope_scaling["original_max_position_embeddings"])
        metadata.append(("llama.rope.scaling.original_context_length", _UINT32, original))
    if tokenizer is not None:
        metadata += _tokenizer_metadata(tokenizer, config.vocab_size)

    # The tensor table: each tensor's offset in the data section, each one aligned.
    table, offset, sizes = [], 0, []
    for tname, tensor in tensors:
        gtype = GGML_TYPES[_TYPE_ID[types[tname]]]
        n_bytes = tensor.numel() // gtype.block_size * gtype.type_size
        dims = tuple(reversed(tensor.shape))  # ggml lists the fastest-varying dimension first
        table.append(_string(tname) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gtype.id, offset))
        sizes.append(n_bytes)
        offset += n_bytes + _pad(n_bytes)

    header = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_string(key) + struct.pack("<I", vtype) + _value(vtype, value)
                       for key, vtype, value in metadata)
    header += b"".join(table)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(header + bytes(_pad(len(header))))
        for (tname, tensor), n_bytes in zip(tensors, sizes):
            data = quantize(tensor, types[tname])
            assert data.size == n_bytes, (tname, data.size, n_bytes)
            f.write(data.tobytes())
            f.write(bytes(_pad(n_bytes)))
    return path
