"""A fast decoding step: fused projections, a static KV cache, and ``torch.compile``.

One new token of a 135M-parameter model costs about 0.27 GFLOP: a CPU does that in a few
milliseconds, and the real limit is memory, since every weight is read once per token (the
*bandwidth bound*: weight bytes / read bandwidth). In eager PyTorch a second cost appears: each of
the ~25 small operations of a layer (30 layers in SmolLM2) pays a fixed price to be dispatched,
to allocate its output and to start its threads, and for matrices of 576 x 576 that price is as
large as the work. The step below does exactly the arithmetic of :class:`~llama_from_scratch.model.Llama`'s
forward pass with a KV cache, but

1. **fewer, larger operations**: the q, k and v projections are one matrix multiplication with
   the three weights stacked (``qkv_proj``), and so are the gate and up projections
   (``gate_up_proj``): 4 matrix products per layer instead of 7;
2. **static shapes**: the KV cache has its full length from the start, attention runs over all
   of its positions with a mask of those not written yet (a masked key adds exactly nothing), and
   the position is a tensor, not a Python integer; so every step is the same computation on
   tensors of the same shapes;
3. **compiled**: because the shapes never change, ``torch.compile`` turns the whole step into one
   generated program, once: no Python between the operations, elementwise operations fused
   into their neighbours. Where ``torch.compile`` cannot run (no C++ compiler, an unsupported
   platform) the same fused step runs eagerly, with a warning.

Optionally (``quantize="int4"``, CPU only), the matrices of the step are stored in 4 bits:
groups of 32 weights along the input dimension, each with a float scale and minimum, exactly
GGUF's Q4_1 rule (``d = (max - min) / 15``, ``q = round((w - min) / d)``), and multiplied by
PyTorch's int4 weight-only kernel (``aten._weight_int4pack_mm_for_cpu``), with bfloat16
activations. A step then reads 5 bits per weight (4-bit codes plus a bfloat16 scale and zero per
group of 32) instead of 16 or 32. SmolLM2's GGUF file
is itself Q4_1, so its dequantized weights are requantized to the same codes: what changes is
mostly the bfloat16 rounding of the scales and of the activations.

The prompt itself (prefill) runs through the ordinary model, which writes the same KV cache the
fast step then continues. :func:`~llama_from_scratch.generation.generate` uses all this with
``compile=True``; the readable model stays the default.

Results: the fused products and the masked attention add the same numbers in another order, so
logits differ from the eager path by rounding (float32: ~1e-5; bfloat16: ~1e-2) and greedy
decoding gives the same tokens except where two candidates are that close. What each part buys,
measured on a 2-core CPU for SmolLM2 (``benchmarks/generation.py``, README): fusing and compiling
gain 1.15x in bfloat16 and nothing in float32, where the matrix-vector products dominate; reading
fewer bytes is what counts: int4 decodes 3.1x faster than the eager bfloat16 model.
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llama_from_scratch.model import Llama
from llama_from_scratch.rope import rotate_half

__all__ = ["FusedLlamaWeights", "Int4Weight", "fuse_weights", "quantize_int4", "decode_step", "compiled_decode_step",
           "can_fuse", "check_decode_options"]

INT4_GROUP_SIZE = 32  # GGUF Q4_1's block: one scale and one minimum per 32 weights
QUANTIZE_CHOICES = (None, "int4")


class Int4Weight(NamedTuple):
    """A ``[out_features, in_features]`` matrix in PyTorch's packed int4 layout for CPUs.

    ``packed``: the 4-bit codes (``aten._convert_weight_to_int4pack_for_cpu``);
    ``scales_and_zeros``: ``[in_features / group_size, out_features, 2]`` bfloat16, where the
    kernel's weight is ``(q - 8) * scale + zero`` (so ``zero = minimum + 8 * scale``).
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    out_features: int


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[Int4Weight, torch.Tensor]:
    """``weight`` ``[N, K]`` as :class:`Int4Weight` (GGUF Q4_1's min-max rule per group of
    ``group_size`` along K), and the dequantized matrix the kernel multiplies by (float32), to
    measure the error."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 decoding needs in_features divisible by {group_size}, got a {n} x {k} matrix")
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    minimum = groups.amin(dim=-1)
    scale = (groups.amax(dim=-1) - minimum) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    q = torch.round((groups - minimum[..., None]) / safe[..., None]).clamp(0, 15).to(torch.int32)
    scales_and_zeros = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)   # what the kernel will use
    dequantized = ((q.float() - 8) * s[..., None] + z[..., None]).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).contiguous(), 1)
    return Int4Weight(packed, scales_and_zeros, group_size, n), dequantized


def _linear(x: torch.Tensor, weight: torch.Tensor | Int4Weight) -> torch.Tensor:
    """``x @ weight.T`` for a dense matrix or an :class:`Int4Weight`."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), weight.packed, weight.group_size,
                                                     weight.scales_and_zeros)
    return out.view(*x.shape[:-1], weight.out_features)


class FusedLlamaWeights(NamedTuple):
    """A Llama's weights rearranged for decoding (plain tensors, no autograd).

    Per layer ``i``: ``input_norm[i]`` ``[dim]``, ``qkv_proj[i]`` ``[(H + 2 * KV) * D, dim]`` (rows
    of q, then k, then v), ``o_proj[i]`` ``[dim, H * D]``, ``post_norm[i]`` ``[dim]``,
    ``gate_up_proj[i]`` ``[2 * hidden_dim, dim]`` (gate rows, then up rows), ``down_proj[i]``
    ``[dim, hidden_dim]``. Then the final norm, the embedding and the output projection (the same
    tensor when the embedding is tied), and the float32 RoPE tables. With ``quantize="int4"`` the
    six kinds of matrices are :class:`Int4Weight` and the rest bfloat16 (the activations' dtype).
    """

    input_norm: tuple[torch.Tensor, ...]
    qkv_proj: tuple[torch.Tensor | Int4Weight, ...]
    o_proj: tuple[torch.Tensor | Int4Weight, ...]
    post_norm: tuple[torch.Tensor, ...]
    gate_up_proj: tuple[torch.Tensor | Int4Weight, ...]
    down_proj: tuple[torch.Tensor | Int4Weight, ...]
    norm: torch.Tensor
    embed_tokens: torch.Tensor
    lm_head: torch.Tensor | Int4Weight
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor


def can_fuse(model: nn.Module) -> str | None:
    """None when ``model`` is a plain :class:`~llama_from_scratch.model.Llama` whose projections are
    ``nn.Linear`` without bias (what :func:`fuse_weights` needs); otherwise why not (e.g. LoRA
    adapters or quantized layers in place)."""
    if not isinstance(model, Llama):
        return f"the fast path needs a llama_from_scratch Llama, got {type(model).__name__}"
    for i, layer in enumerate(model.model.layers):
        linears = {**{n: getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                   **{n: getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")}}
        for name, module in linears.items():
            if type(module) is not nn.Linear or module.bias is not None:
                return (f"layer {i}'s {name} is a {type(module).__name__}"
                        f"{' with a bias' if type(module) is nn.Linear else ''}: the fast path fuses plain "
                        "nn.Linear weights only (merge LoRA adapters first, or decode without compile)")
    return None


def check_decode_options(model: nn.Module, quantize: str | None) -> None:
    """Raises ``ValueError`` unless ``model`` can be fused (:func:`can_fuse`) and ``quantize`` is one
    this module offers (and, for int4, can run: PyTorch's int4 CPU kernel, a model on the CPU)."""
    reason = can_fuse(model)
    if reason is not None:
        raise ValueError(reason)
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be None or 'int4', got {quantize!r}")
    if quantize == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"quantize='int4' needs PyTorch's int4 CPU kernel (torch >= 2.6), not in torch {torch.__version__}")
    if quantize == "int4" and model.lm_head.weight.device.type != "cpu":
        raise ValueError("quantize='int4' uses PyTorch's int4 kernel for CPUs; this model is on "
                         f"{model.lm_head.weight.device}")


# The fused copy of each model's weights, rebuilt when a weight is replaced or modified in place
# (an optimizer step bumps the tensors' version counters).
_FUSED: weakref.WeakKeyDictionary[nn.Module, dict[str | None, tuple[tuple, FusedLlamaWeights]]] = (
    weakref.WeakKeyDictionary())


def _weights_key(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


@torch.no_grad()
def fuse_weights(model: nn.Module, quantize: str | None = None) -> FusedLlamaWeights:
    """The weights of ``model`` (a :class:`~llama_from_scratch.model.Llama`) as
    :class:`FusedLlamaWeights`, in the model's dtype and on its device (``quantize="int4"``:
    4-bit matrices and bfloat16 elsewhere, CPU only).

    The stacked matrices are copies (for SmolLM2 in float32, about 400 MB more), made once and
    kept while the model's weights do not change; the embedding, the norms and the output
    projection are the model's own tensors.
    """
    check_decode_options(model, quantize)
    key = _weights_key(model)
    cached = _FUSED.setdefault(model, {}).get(quantize)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = model.model.layers
    fused = FusedLlamaWeights(
        input_norm=tuple(layer.input_layernorm.weight.detach() for layer in layers),
        qkv_proj=tuple(torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                  layer.self_attn.v_proj.weight]).detach() for layer in layers),
        o_proj=tuple(layer.self_attn.o_proj.weight.detach() for layer in layers),
        post_norm=tuple(layer.post_attention_layernorm.weight.detach() for layer in layers),
        gate_up_proj=tuple(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach()
                           for layer in layers),
        down_proj=tuple(layer.mlp.down_proj.weight.detach() for layer in layers),
        norm=model.model.norm.weight.detach(),
        embed_tokens=model.model.embed_tokens.weight.detach(),
        lm_head=model.lm_head.weight.detach(),
        rope_cos=model.model.rope_cos,
        rope_sin=model.model.rope_sin,
    )
    if quantize == "int4":
        fused = _to_int4(fused)
    _FUSED[model][quantize] = (key, fused)
    return fused


def _to_int4(w: FusedLlamaWeights) -> FusedLlamaWeights:
    """The matrices of ``w`` in int4, everything else in bfloat16 (the dtype the int4 kernel takes)."""
    def int4(matrices):
        return tuple(quantize_int4(m)[0] for m in matrices)

    def bf16(tensors):
        return tuple(t.to(torch.bfloat16) for t in tensors)

    return w._replace(qkv_proj=int4(w.qkv_proj), o_proj=int4(w.o_proj), gate_up_proj=int4(w.gate_up_proj),
                      down_proj=int4(w.down_proj), lm_head=quantize_int4(w.lm_head)[0],
                      input_norm=bf16(w.input_norm), post_norm=bf16(w.post_norm), norm=w.norm.to(torch.bfloat16),
                      embed_tokens=w.embed_tokens.to(torch.bfloat16))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As RMSNorm.forward: normalise in float32, back to the input's dtype, then scale.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # RoPE as apply_rope: x * cos + rotate_half(x) * sin.
    return x * cos + rotate_half(x) * sin


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Attention of one new query per sequence, written out (chapter 5's formula): for a single
    query, two small matrix products beat the fused kernel, whose set-up costs more than the work.

    ``q`` ``[B, H, 1, D]``; ``k``, ``v`` ``[B, KV, S, D]`` (each key head serves ``H / KV`` query
    heads: grouped-query attention without copying the keys); ``visible`` ``[B, S]``.
    """
    bsz, n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[1]
    # In float32 whatever the weights' dtype: CPU matrix products this small are faster in float32,
    # and the softmax wants it anyway.
    q = q.float().view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)  # query heads grouped by key head
    scores = (q @ k.float().transpose(-1, -2)) * scale                   # [B, KV, H / KV, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ v.float()
    return out.view(bsz, n_heads, 1, head_dim).to(v.dtype)


def decode_step(
    w: FusedLlamaWeights,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tokens: torch.Tensor,
    cur: torch.Tensor,
    padding: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    eps: float,
) -> torch.Tensor:
    """One decoding step for a batch of sequences; returns the float32 logits ``[B, vocab]``.

    Args:
        w: the fused weights (:func:`fuse_weights`).
        k_cache, v_cache: ``[n_layers, B, n_kv_heads, S, head_dim]``, the layout of
            :class:`~llama_from_scratch.attention.KVCache`; positions ``0 .. cur - 1`` hold the
            sequence so far. The new token's keys and values are written at column ``cur``.
        tokens: ``[B]`` the newest token of each sequence (at column ``cur``).
        cur: ``[1]`` long, the column of the new token.
        padding: ``[B, S]`` bool, False at (left) padding columns; True elsewhere, the columns
            not written yet included (they are masked by ``cur``).
        n_heads, n_kv_heads, eps: from the model's config.
    """
    bsz = tokens.shape[0]
    seq = k_cache.shape[3]
    head_dim = k_cache.shape[4]
    columns = torch.arange(seq, device=tokens.device)
    visible = padding & (columns <= cur)                          # [B, S]: keys this query may see
    position = (padding & (columns < cur)).sum(dim=1)            # [B]: real tokens before this one
    h = F.embedding(tokens, w.embed_tokens).unsqueeze(1)          # [B, 1, dim]
    cos = w.rope_cos[position].to(h.dtype)[:, None, None, :]      # [B, 1, 1, head_dim]
    sin = w.rope_sin[position].to(h.dtype)[:, None, None, :]
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    for i in range(len(w.qkv_proj)):
        x = _rms_norm(h, w.input_norm[i], eps)
        q, k, v = _linear(x, w.qkv_proj[i]).split([q_size, kv_size, kv_size], dim=-1)
        q = _rotate(q.view(bsz, 1, n_heads, head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(bsz, 1, n_kv_heads, head_dim).transpose(1, 2), cos, sin)
        v = v.view(bsz, 1, n_kv_heads, head_dim).transpose(1, 2)
        k_cache[i].index_copy_(2, cur, k.to(k_cache.dtype))
        v_cache[i].index_copy_(2, cur, v.to(v_cache.dtype))
        out = _decode_attention(q, k_cache[i], v_cache[i], visible, head_dim**-0.5).to(q.dtype)
        h = h + _linear(out.transpose(1, 2).reshape(bsz, 1, q_size), w.o_proj[i])
        x = _rms_norm(h, w.post_norm[i], eps)
        gate, up = _linear(x, w.gate_up_proj[i]).chunk(2, dim=-1)
        h = h + _linear(F.silu(gate) * up, w.down_proj[i])
    return _linear(_rms_norm(h, w.norm, eps), w.lm_head)[:, 0].float()


_compiled = None          # torch.compile(decode_step), made on first use
_compile_failed = False   # set when compiling failed once: the eager step is used from then on


def compiled_decode_step():
    """``torch.compile(decode_step)``, or :func:`decode_step` itself where compiling is not possible.

    The compiled function is shared: each new combination of shapes and dtypes (batch size, cache
    length, model) compiles once (tens of seconds for SmolLM2 on a 2-core CPU) and is reused.
    """
    global _compiled
    if _compile_failed:
        return decode_step
    if _compiled is None:
        import torch._dynamo  # noqa: PLC0415

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        _compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _compiled


def run_decode_step(*args, **kwargs) -> torch.Tensor:
    """:func:`compiled_decode_step`'s function applied to the arguments, falling back to the eager
    step (with one warning) if compiling fails, e.g. without a C++ compiler."""
    global _compile_failed
    step = compiled_decode_step()
    if step is decode_step:
        return decode_step(*args, **kwargs)
    try:
        return step(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 (inductor raises many kinds: compiler missing, unsupported op)
        _compile_failed = True
        warnings.warn(f"torch.compile of the decoding step failed ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); decoding with the eager fused step",
                      RuntimeWarning, stacklevel=2)
        return decode_step(*args, **kwargs)
