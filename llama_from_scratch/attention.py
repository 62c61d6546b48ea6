"""Causal self-attention with grouped-query heads (GQA), and the KV cache.

Multi-head attention (MHA) gives every query head its own key and value head. Multi-query
attention (MQA, Shazeer 2019) shares one key/value head among all query heads; grouped-query
attention (GQA, Ainslie et al. 2023) sits between the two: ``n_kv_heads`` key/value heads, each
shared by a group of ``n_heads // n_kv_heads`` query heads. Fewer key/value heads mean a smaller
KV cache, and the cache is what limits decoding speed and batch size.

The attention itself is written out twice: :func:`attention_scratch` does the textbook math
(``softmax(q k^T / sqrt(head_dim) + mask) v``, softmax in float32), and
``torch.nn.functional.scaled_dot_product_attention`` is the fast path. The tests show they agree.

Masks. ``GroupedQueryAttention.forward`` accepts ``attention_mask`` as

* ``None``: plain causal attention;
* a ``[B, S]`` padding mask (1/True = real token, 0/False = padding) over all ``S`` key positions
  (the cached ones plus the new ones); it is combined with the causal mask by
  :func:`build_attention_mask`;
* a 4-D boolean mask ``[B or 1, 1 or H, T, S]`` (True = may attend) or a 4-D float mask that is
  added to the scores (0 or a large negative number). 4-D masks are used as they are, so they
  must already contain the causal part.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_from_scratch.rope import apply_rope, rotate_half

# `enable_gqa` (attention of many query heads on fewer key/value heads without copying them)
# arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, n_kv_heads, S, D]`` -> ``[B, n_kv_heads * n_rep, S, D]``: each key/value head repeated
    for the ``n_rep`` query heads of its group (query head ``h`` uses kv head ``h // n_rep``).

    The same as ``x.repeat_interleave(n_rep, dim=1)`` and Hugging Face's ``repeat_kv``.
    """
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[q_len, kv_len]`` mask, True where a query may attend.

    The queries are the *last* ``q_len`` of the ``kv_len`` positions (the earlier ones are in the KV
    cache), so query ``i`` sits at position ``kv_len - q_len + i`` and sees keys up to there.
    """
    if q_len > kv_len:
        raise ValueError(f"more queries ({q_len}) than keys ({kv_len})")
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def build_attention_mask(padding_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Combines a ``[B, S]`` padding mask (1 = token, 0 = padding) with the causal mask.

    Returns a boolean ``[B, 1, q_len, S]`` mask (True = may attend) for queries at the last
    ``q_len`` of the ``S`` positions. A query may always attend to its own position: a padding
    query would otherwise see no key at all, and a softmax over nothing is NaN. Outputs at padding
    positions are meaningless either way; this keeps them finite.
    """
    if padding_mask.dim() != 2:
        raise ValueError(f"padding mask must be [B, S], got shape {tuple(padding_mask.shape)}")
    kv_len = padding_mask.shape[1]
    causal = causal_mask(q_len, kv_len, device=padding_mask.device)  # [T, S]
    keys_ok = padding_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    device = padding_mask.device
    own = torch.zeros(q_len, kv_len, dtype=torch.bool, device=device)
    own[torch.arange(q_len, device=device), torch.arange(kv_len - q_len, kv_len, device=device)] = True  # own slot
    return (causal & keys_ok) | own


def attention_scratch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention written out: ``softmax(q @ k^T * scale + mask) @ v``.

    ``q`` is ``[B, H, T, D]``; ``k`` and ``v`` are ``[B, H, S, D]`` (already repeated for GQA).
    ``mask`` is None (no masking: use :func:`causal_mask` for causality), a boolean mask
    broadcastable to ``[B, H, T, S]`` (True = may attend), or a float mask that is added. The
    softmax runs in float32 whatever the input dtype (bfloat16 scores would round badly), as
    Hugging Face's eager attention does. A query row whose keys are all masked outputs zeros.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, T, S]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None and mask.dtype == torch.bool:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # all-masked rows: 0, not NaN
    return torch.matmul(probs.to(v.dtype), v)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads.

    ``n_kv_heads == n_heads`` is multi-head attention, ``n_kv_heads == 1`` multi-query attention.
    Submodules ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` have Hugging Face ``LlamaAttention``'s
    names and shapes, so weights copy across by name.

    Args:
        dim: model width.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads; must divide ``n_heads``.
        head_dim: size of one head; ``dim // n_heads`` when None.
        bias: LLaMA has no biases in attention.
        layer_idx: which layer this is, i.e. which slot of a :class:`KVCache` it uses.

    Set ``use_sdpa = False`` to run the from-scratch attention instead of
    ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int | None = None,
        bias: bool = False,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        if dim <= 0 or n_heads <= 0 or n_kv_heads <= 0:
            raise ValueError(f"dim, n_heads, n_kv_heads must be positive, got {dim}, {n_heads}, {n_kv_heads}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}): each key/value head "
                "serves a whole group of query heads"
            )
        if head_dim is None:
            if dim % n_heads != 0:
                raise ValueError(
                    f"dim ({dim}) is not divisible by n_heads ({n_heads}); pass head_dim explicitly"
                )
            head_dim = dim // n_heads
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_rep = n_heads // n_kv_heads  # query heads per key/value head
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.layer_idx = layer_idx
        self.use_sdpa = True
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        layer_idx: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention output for ``x`` (``[B, T, dim]``) -> ``[B, T, dim]``.

        Args:
            cos, sin: RoPE tables from :func:`~llama_from_scratch.rope.precompute_rope` (or pass
                ``rope``).
            start_pos: position of ``x``'s first token; with a cache, also where its keys and
                values are written (the cache must hold positions ``0 .. start_pos - 1``).
            kv_cache: a :class:`KVCache`; keys and values of all positions up to
                ``start_pos + T`` then take part in attention.
            layer_idx: slot in the cache; defaults to ``self.layer_idx``.
            attention_mask: see the module docstring. A 2-D padding mask covers the ``S`` key
                positions (``start_pos + T`` with a cache, ``T`` without).
            position_ids: explicit RoPE positions ``[B, T]`` (e.g. restarting after left padding);
                default ``start_pos + arange(T)``.
            rope: instead of ``cos``, ``sin`` and ``position_ids``: the ``(cos, sin)`` rows already
                selected for these ``T`` positions (``[T, D]`` or ``[B, 1, T, D]``) and cast to
                ``x``'s dtype. The model's blocks pass it: the selection is the same for every
                layer, so it is done once per forward pass instead of once per layer
                (:meth:`~llama_from_scratch.model.LlamaBackbone.rope_for`).
        """
        if rope is None and (cos is None or sin is None):
            raise TypeError("GroupedQueryAttention.forward needs the RoPE tables cos and sin (or rope=)")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, T, {self.dim}], got {tuple(x.shape)}")
        bsz, seq_len, _ = x.shape
        layer_idx = self.layer_idx if layer_idx is None else layer_idx

        # Project, then split the last dimension into heads: [B, T, H * D] -> [B, H, T, D].
        q = self.q_proj(x).view(bsz, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)

        # Rotate queries and keys to their positions (values carry no position).
        if rope is None:
            q = apply_rope(q, cos, sin, offset=start_pos, position_ids=position_ids)
            k = apply_rope(k, cos, sin, offset=start_pos, position_ids=position_ids)
        else:
            cos_t, sin_t = rope  # what apply_rope computes, with the table lookup done by the caller
            q = q * cos_t + rotate_half(q) * sin_t
            k = k * cos_t + rotate_half(k) * sin_t

        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v, start_pos)  # all positions 0 .. start_pos + T - 1
        kv_len = k.shape[2]

        mask: torch.Tensor | None
        if attention_mask is None:
            mask = None if seq_len == 1 else causal_mask(seq_len, kv_len, device=x.device)
        elif attention_mask.dim() == 2:
            if attention_mask.shape != (bsz, kv_len):
                raise ValueError(
                    f"2-D attention_mask must be [B, S] = [{bsz}, {kv_len}] (all key positions, cached "
                    f"ones included), got {tuple(attention_mask.shape)}"
                )
            mask = build_attention_mask(attention_mask, seq_len)
        elif attention_mask.dim() == 4:
            if attention_mask.shape[-2:] != (seq_len, kv_len):
                raise ValueError(
                    f"4-D attention_mask must end in [T, S] = [{seq_len}, {kv_len}], got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask
        else:
            raise ValueError(f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")

        if self.use_sdpa:
            out = self._sdpa(q, k, v, mask, plain_causal=attention_mask is None and seq_len == kv_len)
        else:
            out = attention_scratch(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), mask, self.scale)

        # Merge the heads back: [B, H, T, D] -> [B, T, H * D], then mix them with o_proj.
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        plain_causal: bool,
    ) -> torch.Tensor:
        """The fast path: PyTorch's fused ``scaled_dot_product_attention``."""
        kwargs: dict[str, Any] = {"scale": self.scale}
        if self.n_rep > 1:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        if plain_causal and q.shape[2] > 1:
            # Queries and keys are the same positions: the kernel can build the causal mask itself.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    While generating, each new token needs the keys and values of all earlier tokens. Instead of
    recomputing them, each layer writes them here once. Storage is two tensors of shape
    ``[n_layers, batch_size, n_kv_heads, max_seq_len, head_dim]``, allocated up front so that
    decoding never reallocates or concatenates.

    ``update(layer_idx, k, v, start_pos)`` writes the new ``k``/``v`` (``[B, n_kv_heads, T, D]``)
    at positions ``start_pos .. start_pos + T - 1`` in place and returns views of positions
    ``0 .. start_pos + T - 1``. Writing at a ``start_pos`` before the end (rewinding) is allowed;
    leaving a gap or running past ``max_seq_len`` raises ``ValueError``.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = dict(n_layers=n_layers, batch_size=batch_size, n_kv_heads=n_kv_heads,
                     max_seq_len=max_seq_len, head_dim=head_dim)
        bad = {name: value for name, value in sizes.items() if value <= 0}
        if bad:
            raise ValueError(f"KVCache sizes must be positive, got {bad}")
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.n_kv_heads = n_kv_heads
        self.max_seq_len = max_seq_len
        self.head_dim = head_dim
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * n_layers  # how many positions each layer holds

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def seq_len(self) -> int:
        """Number of positions held (by the last layer, i.e. after a complete forward pass)."""
        return self.lengths[-1]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores ``k``, ``v`` at ``start_pos`` for ``layer_idx``; returns that layer's keys and values
        for positions ``0 .. start_pos + T - 1`` (views into the cache, no copy)."""
        if not 0 <= layer_idx < self.n_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {self.n_layers} layers")
        expected = (self.batch_size, self.n_kv_heads, k.shape[2] if k.dim() == 4 else -1, self.head_dim)
        if k.dim() != 4 or tuple(k.shape) != expected or k.shape != v.shape:
            raise ValueError(
                f"k and v must both be [batch={self.batch_size}, n_kv_heads={self.n_kv_heads}, T, "
                f"head_dim={self.head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(
                f"cache dtype is {self.dtype} but got k/v of dtype {k.dtype}/{v.dtype}; create the cache with "
                "the dtype the attention computes in (e.g. the autocast dtype)"
            )
        if k.device != self.device:
            raise ValueError(f"cache is on {self.device} but k/v are on {k.device}")
        seq_len = k.shape[2]
        end = start_pos + seq_len
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: positions {start_pos}..{end - 1} do not fit in max_seq_len="
                f"{self.max_seq_len}; allocate a larger cache"
            )
        if start_pos > self.lengths[layer_idx]:
            raise ValueError(
                f"start_pos={start_pos} would leave a gap: layer {layer_idx} holds only "
                f"{self.lengths[layer_idx]} positions"
            )
        self.k[layer_idx, :, :, start_pos:end] = k
        self.v[layer_idx, :, :, start_pos:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def reset(self) -> None:
        """Forgets everything stored (the memory stays allocated)."""
        self.lengths = [0] * self.n_layers

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Reorders the batch dimension in place, e.g. to follow the surviving beams of beam search."""
        batch_indices = batch_indices.to(self.device)
        if batch_indices.shape != (self.batch_size,):
            raise ValueError(f"batch_indices must have shape [{self.batch_size}], got {tuple(batch_indices.shape)}")
        self.k.copy_(self.k.index_select(1, batch_indices))
        self.v.copy_(self.v.index_select(1, batch_indices))

    def memory_bytes(self) -> int:
        """Bytes held by the key and value storage."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def __repr__(self) -> str:
        return (f"KVCache(n_layers={self.n_layers}, batch_size={self.batch_size}, n_kv_heads={self.n_kv_heads}, "
                f"max_seq_len={self.max_seq_len}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, seq_len={self.seq_len}, {self.memory_bytes() / 2**20:.1f} MiB)")


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache needs per token of one sequence: ``2 (k and v) * n_layers * n_kv_heads *
    head_dim * bytes per element``. ``config`` is anything with ``n_layers``, ``n_kv_heads`` and
    ``head_dim`` (e.g. a :class:`~llama_from_scratch.config.LlamaConfig`)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element_size
