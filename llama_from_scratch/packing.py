"""Document masks for packed sequences (chapter 8): attention that stays inside each document.

:func:`~llama_from_scratch.data.pack_tokens` concatenates documents (each followed by EOS) and cuts
the stream into blocks, so one block holds the end of one story, a few whole ones and the start of
the next. With the plain causal mask every token attends to *all* earlier tokens of the block,
including those of unrelated documents before it: the model is trained to predict a story's words
from another story, and each token's RoPE position counts from the start of the block, not of its
document. Llama 3 (Dubey et al. 2024, section 3.2) instead "use[s] an attention mask that prevents
self-attention between different documents within the same sequence".

Two ingredients, both functions of the *document id* of every position:

* the **document causal mask** ``[B, 1, T, T]`` (True = may attend): query ``i`` sees key ``j``
  when ``j <= i`` *and* both are in the same document, a block-diagonal of causal triangles;
* **position ids that restart** at 0 at every document start, so that every document gets the
  RoPE positions it would have alone.

With both, the logits of a packed block equal those of each document run on its own (tested, and
equal to what transformers computes when it detects packed sequences from restarting
``position_ids``). Convention: the EOS token belongs to the document it *ends* (it is that
document's last token; the next token starts a new document), as when each document is run alone
as ``tokens + [EOS]``. A document cut at the start of a block is just a shorter document there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llama_from_scratch.data import pack_tokens

__all__ = [
    "pack_documents",
    "document_ids_from_eos",
    "document_position_ids",
    "document_causal_mask",
    "document_attention_inputs",
]


def _check_2d_integer(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a [batch, seq_len] tensor, got {shape}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} is empty (seq_len 0)")


def pack_documents(token_ids_list: Sequence[Sequence[int] | torch.Tensor], block_size: int,
                   eos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~llama_from_scratch.data.pack_tokens`'s blocks ``[N, block_size + 1]`` and, aligned with
    them, the index of the document every token comes from (``[N, block_size + 1]``, long; the EOS
    after document ``d`` counts as document ``d``).

    Then ``blocks[:, :-1]`` is the input of a block and ``document_ids[:, :-1]`` the documents of its
    positions. Unlike :func:`document_ids_from_eos`, this needs no separator (``eos_token_id=None``)
    and cannot be fooled by an EOS id inside a document.
    """
    blocks = pack_tokens(token_ids_list, block_size, eos_token_id)  # checks the arguments
    extra = 0 if eos_token_id is None else 1
    owner = [i for i, doc in enumerate(token_ids_list) for _ in range(len(doc) + extra)]
    ids = torch.tensor(owner[: blocks.shape[0] * block_size + 1], dtype=torch.long)
    return blocks, ids.unfold(0, block_size + 1, block_size).contiguous()


def document_ids_from_eos(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The document of every position of packed ``input_ids`` (``[B, T]``), counted from 0 in each
    row: a new document starts right *after* each EOS, and the EOS belongs to the document it ends.

    ``[[5, 6, EOS, 7, EOS, EOS, 8]] -> [[0, 0, 0, 1, 1, 2, 3]]`` (an exclusive cumulative sum of the
    EOS positions).
    """
    _check_2d_integer(input_ids, "input_ids")
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
        raise ValueError(f"eos_token_id must be an integer token id, got {eos_token_id!r}")
    is_eos = (input_ids == eos_token_id).long()
    return is_eos.cumsum(dim=1) - is_eos


def _check_document_ids(document_ids: torch.Tensor) -> None:
    _check_2d_integer(document_ids, "document_ids")
    if (document_ids[:, 1:] < document_ids[:, :-1]).any():
        raise ValueError("document_ids must not decrease along a row: each document is one contiguous run of "
                         "positions (as packing makes it)")


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[B, T]`` that restart at 0 where each document starts: position ``t`` minus
    the first position of its document. ``[[0, 0, 0, 1, 1, 2]] -> [[0, 1, 2, 0, 1, 0]]``."""
    _check_document_ids(document_ids)
    t = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_of_document = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - start_of_document


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask ``[B, 1, T, T]`` (True = may attend) of packed documents: query
    ``i`` sees key ``j`` when ``j <= i`` and both belong to the same document. For a single
    document it is the plain causal mask. The model's attention takes it as a 4-D mask."""
    _check_document_ids(document_ids)
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
    return (same_document & causal)[:, None]


def document_attention_inputs(input_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention_mask, position_ids)`` for a packed batch ``input_ids`` (``[B, T]``) whose
    documents end with ``eos_token_id``: ``model(input_ids, attention_mask=..., position_ids=...)``
    then runs every document as if it were alone."""
    document_ids = document_ids_from_eos(input_ids, eos_token_id)
    return document_causal_mask(document_ids), document_position_ids(document_ids)
