"""The Llama model: token embedding, a stack of pre-norm transformer blocks, a final RMSNorm and
the output projection.

Every block is

    h = x + attention(rmsnorm(x))      # tokens exchange information
    out = h + swiglu(rmsnorm(h))       # each token is processed on its own

Module names copy Hugging Face's ``LlamaForCausalLM`` exactly, so ``state_dict()`` keys are the
familiar ones (``model.layers.0.self_attn.q_proj.weight``, ...) and weights move between the two
implementations with ``load_state_dict``.

Each ``forward`` reads top to bottom on one screen; what it delegates sits right after it: the
input checks, the positions and mask of a pass (``LlamaBackbone._positions_and_mask``) and the RoPE
rows every block gets (``LlamaBackbone.rope_for``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llama_from_scratch.attention import GroupedQueryAttention, KVCache, build_attention_mask
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.feed_forward import SwiGLU
from llama_from_scratch.gguf_reader import GGUFFile, check_llama_keys, config_from_gguf, llama_state_dict, read_gguf
from llama_from_scratch.hf_export import save_pretrained as _save_pretrained, tie_or_check_keys
from llama_from_scratch.loss import chunked_cross_entropy, cross_entropy
from llama_from_scratch.normalization import RMSNorm
from llama_from_scratch.rope import precompute_rope


def _check_hf_kwargs(hf_kwargs: dict[str, object]) -> None:
    """Refuses Hugging Face forward arguments this model does not implement (see ``Llama.forward``)."""
    known = {"inputs_embeds", "labels", "output_attentions", "output_hidden_states", "return_dict"}
    unknown = sorted(set(hf_kwargs) - known)
    if unknown:
        raise TypeError(f"Llama.forward() got unexpected keyword arguments {unknown}")
    given = sorted(k for k, v in hf_kwargs.items() if v is not None and not (k.startswith("output_") and v is False))
    if given:
        hint = " (for a loss pass targets=, the next token at each position)" if "labels" in given else ""
        raise ValueError(f"Llama.forward does not implement {given}; they are accepted only as None{hint}")


def _check_forward_args(logits_to_keep: int, targets: torch.Tensor | None, hf_kwargs: dict[str, object]) -> None:
    """The checks of :meth:`Llama.forward`'s own arguments: ``logits_to_keep`` an int >= 0, not
    combined with ``targets``; Hugging Face arguments this model does not implement refused."""
    if hf_kwargs:
        _check_hf_kwargs(hf_kwargs)
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}")
    if targets is not None and logits_to_keep:
        raise ValueError("targets needs the logits of every position: do not combine it with logits_to_keep")


class TransformerBlock(nn.Module):
    """One pre-norm Llama block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = GroupedQueryAttention(config.dim, config.n_heads, config.n_kv_heads, layer_idx=layer_idx)
        self.mlp = SwiGLU(config.dim, config.hidden_dim)
        self.input_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (``[B, T, dim]``) -> ``[B, T, dim]``. ``rope`` is the ``(cos, sin)`` of these ``T``
        positions (:meth:`LlamaBackbone.rope_for`); ``start_pos``, ``kv_cache`` and
        ``attention_mask`` are passed to attention (see :class:`GroupedQueryAttention`)."""
        h = x + self.self_attn(self.input_layernorm(x), rope=rope, start_pos=start_pos, kv_cache=kv_cache,
                               attention_mask=attention_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def _padding_positions(attention_mask: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """RoPE positions ``[B, T]`` of the last ``T`` columns of a 2-D padding mask
    (``[B, start_pos + T]``, 1 = token, 0 = padding), counted over real tokens only.

    As Hugging Face does: after left padding the first real token is at position 0, exactly as
    without padding (padding positions get 1; their outputs are masked out anyway).
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, start_pos:]


class LlamaBackbone(nn.Module):
    """Embedding, blocks and final norm: token ids -> normalized hidden states ``[B, T, dim]``.

    (Hugging Face's ``LlamaModel``; reachable as ``Llama.model``, e.g. for a reward head.)
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        # RoPE tables are a function of the config, not learned: non-persistent buffers follow the
        # model across devices but stay out of the state_dict.
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :meth:`Llama.forward`; returns the final hidden states instead of logits.

        ``inputs_embeds`` (``[B, T, dim]``), given instead of ``input_ids`` (then ``None``), are
        the vectors the blocks start from in place of ``embed_tokens(input_ids)``: prompt tuning
        and P-tuning (:mod:`~llama_from_scratch.prompt_tuning`) prepend learned vectors that are
        no token's embedding.
        """
        self._check_inputs(input_ids, inputs_embeds, start_pos, kv_cache)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        seq_len = h.shape[1]
        position_ids, mask = self._positions_and_mask(h, start_pos, kv_cache, attention_mask, position_ids)
        rope = self.rope_for(start_pos, seq_len, position_ids, h.dtype)  # looked up once, for every layer
        for layer in self.layers:
            h = layer(h, rope, start_pos=start_pos, kv_cache=kv_cache, attention_mask=mask)
        return self.norm(h)

    # ----- the helpers of forward ---------------------------------------------------------------

    def _check_inputs(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, start_pos: int,
        kv_cache: KVCache | None,
    ) -> None:
        """Exactly one of ``input_ids`` (a ``[B, T]`` integer tensor) and ``inputs_embeds`` (a
        ``[B, T, dim]`` float tensor), non-empty and fitting in the context from ``start_pos``; a
        ``kv_cache`` shaped for this model and batch."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError("inputs_embeds must be a float tensor [batch, seq_len, dim]")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.dim:
                raise ValueError(f"inputs_embeds must be [batch, seq_len, {self.config.dim}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            bsz, seq_len = inputs_embeds.shape[:2]
        else:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
                raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got {shape}")
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
            bsz, seq_len = input_ids.shape
        if seq_len == 0:
            raise ValueError("input_ids is empty (seq_len 0)")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        max_seq_len = self.config.max_seq_len
        if start_pos + seq_len > max_seq_len:
            raise ValueError(
                f"sequence too long: start_pos {start_pos} + {seq_len} tokens > max_seq_len {max_seq_len}"
            )
        if kv_cache is not None:
            if kv_cache.n_layers != len(self.layers) or kv_cache.batch_size != bsz:
                raise ValueError(
                    f"KV cache has {kv_cache.n_layers} layers and batch {kv_cache.batch_size}; the model has "
                    f"{len(self.layers)} layers and the input batch is {bsz}"
                )

    def _positions_and_mask(
        self,
        h: torch.Tensor,
        start_pos: int,
        kv_cache: KVCache | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The RoPE positions (``[B, T]``, or None for ``start_pos + arange(T)``) and the mask the
        blocks get: explicit ``position_ids`` checked; a 2-D padding mask checked, turned into
        positions counted over real tokens (:func:`_padding_positions`) unless ``position_ids`` are
        given, and into a ``[B, 1, T, S]`` causal-and-padding mask built once for all layers; a
        4-D mask (or None) passed on as is. ``h`` is the blocks' input ``[B, T, dim]``."""
        bsz, seq_len = h.shape[:2]
        if position_ids is not None:
            position_ids = self._check_position_ids(position_ids, seq_len)
        if attention_mask is None or attention_mask.dim() != 2:
            return position_ids, attention_mask
        total = start_pos + seq_len
        if attention_mask.shape != (bsz, total):
            raise ValueError(
                f"attention_mask must be [batch, start_pos + seq_len] = [{bsz}, {total}] (1 = token, "
                f"0 = padding, cached positions included), got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = _padding_positions(attention_mask, start_pos)
        kv_len = total if kv_cache is not None else seq_len  # the key positions attention sees
        return position_ids, build_attention_mask(attention_mask[:, total - kv_len:], seq_len)

    def _check_position_ids(self, position_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Explicit ``position_ids`` (``[T]`` or ``[B, T]``, integer, within the RoPE table) as ``[B, T]``."""
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seq_len:
            raise ValueError(f"position_ids must be [T] or [B, T] with T={seq_len}, got {tuple(position_ids.shape)}")
        max_seq_len = self.rope_cos.shape[0]
        if position_ids.min() < 0 or position_ids.max() >= max_seq_len:
            raise ValueError(
                f"position_ids must lie in [0, {max_seq_len}) (max_seq_len={max_seq_len}), "
                f"got range [{int(position_ids.min())}, {int(position_ids.max())}]"
            )
        return position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)

    def rope_for(
        self, start_pos: int, seq_len: int, position_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE ``(cos, sin)`` rows of this forward pass's positions, in ``dtype``: ``[T, D]``
        for positions ``start_pos .. start_pos + T - 1``, or ``[B, 1, T, D]`` for ``position_ids``
        (``[B, T]``, already checked). This is what the blocks get.

        Every layer rotates by the same angles, so they are looked up (and cast) once per forward
        pass, not once per layer; the values are exactly those :func:`~llama_from_scratch.rope.apply_rope`
        would use (float32 table, then cast, as Hugging Face does).
        """
        if position_ids is None:
            cos = self.rope_cos[start_pos : start_pos + seq_len]
            sin = self.rope_sin[start_pos : start_pos + seq_len]
        else:
            cos = self.rope_cos[position_ids].unsqueeze(1)  # [B, T, D] -> [B, 1, T, D]: same for all heads
            sin = self.rope_sin[position_ids].unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recomputes the RoPE tables (float32) on ``device``, e.g. after building on the meta device."""
        c = self.config
        cos, sin = precompute_rope(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)


class Llama(nn.Module):
    """A Llama causal language model (Hugging Face ``LlamaForCausalLM``'s layout and key names).

    With ``config.tie_embeddings`` the output projection ``lm_head.weight`` *is* the embedding
    matrix (one tensor, two names): both keys appear in ``state_dict()``, as in Hugging Face, and
    :meth:`num_parameters` counts it once.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Hugging Face's initialization: normal(0, 0.02) for linear and embedding weights, zero
        biases; RMSNorm gains stay at 1."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Makes ``lm_head.weight`` the embedding tensor when the config asks for tied embeddings."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        targets: torch.Tensor | None = None,
        **hf_kwargs: None,
    ) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab_size]`` for ``input_ids`` (``[B, T]``, integer), or,
        given ``targets``, the training loss.

        Args:
            input_ids: token ids.
            start_pos: position of the first token of ``input_ids``. With a ``kv_cache`` holding
                positions ``0 .. start_pos - 1``, only the new tokens need to be passed.
            kv_cache: a :class:`KVCache` from :meth:`make_kv_cache`; it is updated in place.
            attention_mask: ``[B, start_pos + T]`` with 1 for real tokens and 0 for (left) padding,
                covering the cached positions too. RoPE positions are then counted over real tokens
                only (``cumsum(mask) - 1``), so a left-padded sequence gets the logits it would
                have alone. A 4-D mask (boolean, True = attend, or additive float, ``[B, 1, T, S]``)
                is passed to attention as is.
            position_ids: explicit RoPE positions ``[B, T]`` or ``[T]``, overriding the above.
            logits_to_keep: ``0`` (default) returns the logits of every position; ``n > 0`` only
                those of the last ``n`` (``[B, n, vocab_size]``), as Hugging Face's argument of
                that name. Generation needs only the last position, and the output projection is
                the largest matrix of a small model: with ``logits_to_keep=1`` a prompt of ``T``
                tokens costs one row of it instead of ``T``.
            targets: the next token at every position, ``[B, T]`` (``-100`` = no target, e.g.
                padding or a masked prompt). Then the mean cross-entropy over the targets (a
                scalar) is returned instead of logits (nanoGPT's ``forward(idx, targets)``); see
                :meth:`next_token_loss`.
            hf_kwargs: the Hugging Face arguments PEFT's ``PeftModelForCausalLM`` (``LoraConfig(
                task_type="CAUSAL_LM")``) always passes: ``inputs_embeds``, ``labels``,
                ``output_attentions``, ``output_hidden_states``, ``return_dict``; accepted only as
                ``None`` (for a loss pass ``targets``, the labels already shifted).
        """
        _check_forward_args(logits_to_keep, targets, hf_kwargs)
        hidden = self.model(input_ids, start_pos, kv_cache, attention_mask, position_ids)
        if targets is not None:
            return self.next_token_loss(hidden, targets)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def next_token_loss(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of the output projection of ``hidden`` (``[B, T, dim]``, the
        backbone's output) against ``targets`` (``[B, T]``), positions equal to ``ignore_index``
        left out.

        In float32 this is chapter 2's :func:`~llama_from_scratch.loss.chunked_cross_entropy` on
        ``lm_head.weight``: the ``[B, T, vocab_size]`` logits are never stored, and neither are
        their softmax nor their gradient, only a chunk at a time (at SmolLM2's 49,152-entry
        vocabulary, 4 x 256 tokens of logits are 201 MB, and the unfused loss keeps about three such
        tensors). Same value and gradients as ``cross_entropy(lm_head(hidden), targets)`` up to
        float32 rounding (tested). Under bfloat16 autocast, or when ``lm_head`` is not a plain
        ``nn.Linear`` (LoRA on it, 4-bit), the logits are computed as usual (autocast then runs the
        projection in bfloat16, the chunked loss would run it in float32) and the loss in float32.
        """
        lm_head = self.lm_head
        fused = (type(lm_head) is nn.Linear and lm_head.bias is None
                 and not torch.is_autocast_enabled(hidden.device.type))
        if fused:
            return chunked_cross_entropy(hidden, lm_head.weight, targets, ignore_index=ignore_index)
        logits = lm_head(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            return cross_entropy(logits.float(), targets, ignore_index=ignore_index)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> dict[str, object]:
        """The keyword arguments of :meth:`forward` for the next decoding step of ``input_ids``
        (the whole sequence so far): with a ``kv_cache`` only the tokens it does not hold yet, at
        ``start_pos`` = its length. PEFT's ``PeftModelForCausalLM`` requires this method (Hugging
        Face models have it); this package's :func:`~llama_from_scratch.generation.generate` does
        not need it. Other keyword arguments are passed through.
        """
        start_pos = kv_cache.lengths[0] if kv_cache is not None else 0
        if start_pos >= input_ids.shape[1]:
            raise ValueError(f"the KV cache already holds {start_pos} positions of {input_ids.shape[1]} tokens")
        return {"input_ids": input_ids[:, start_pos:], "start_pos": start_pos, "kv_cache": kv_cache,
                "attention_mask": attention_mask, **kwargs}

    # ----- helpers ------------------------------------------------------------------------------

    def make_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for this model; dtype and device default to the model's
        weights', ``max_seq_len`` to the config's (which can be large: pass what you need)."""
        param = self.lm_head.weight
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.config.max_seq_len}")
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_seq_len, c.head_dim,
                       dtype=dtype or param.dtype, device=device or param.device)

    def set_use_sdpa(self, use_sdpa: bool) -> None:
        """Switches every attention layer between ``F.scaled_dot_product_attention`` (True) and the
        from-scratch attention (False)."""
        for layer in self.model.layers:
            layer.self_attn.use_sdpa = use_sdpa

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters; a tied embedding counts once (``parameters()`` skips duplicates)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----- loading ------------------------------------------------------------------------------

    @classmethod
    def from_hf(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Llama:
        """Loads a local Hugging Face Llama folder: ``config.json`` plus ``model.safetensors``, or
        shards listed in ``model.safetensors.index.json``.

        The model is built on the meta device (no memory, no random init) and the checkpoint
        tensors are assigned into it, converted to ``dtype``. Missing or unexpected keys raise a
        ``ValueError`` that lists them.
        """
        from safetensors.torch import load_file

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder (expected a Hugging Face model folder)")
        config = LlamaConfig.from_hf(folder)

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"shards listed in {index.name} are missing: {absent}")
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            present = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(
                f"no *.safetensors weights in {folder} (found {present}); PyTorch .bin checkpoints are not "
                "supported, re-save with save_pretrained(..., safe_serialization=True)"
            )

        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            for name, tensor in load_file(str(file), device="cpu").items():
                if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved RoPE tables; we compute them
                    continue
                state_dict[name] = tensor.to(dtype)

        with torch.device("meta"):
            model = cls(config)
        # Tied checkpoints store the shared matrix once, as model.embed_tokens.weight (transformers)
        # or lm_head.weight (safetensors.torch.save_model); genuinely missing keys raise by name.
        state_dict = tie_or_check_keys(state_dict, config, set(model.state_dict()), str(folder))
        model._assign_weights(state_dict)
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(self, folder: str | Path, tokenizer: object | None = None) -> Path:
        """Writes a Hugging Face folder (``config.json``, ``model.safetensors``,
        ``generation_config.json``, and with a tokenizer ``tokenizer.json`` +
        ``tokenizer_config.json``) that ``transformers.AutoModelForCausalLM.from_pretrained`` and
        :meth:`from_hf` load; see :func:`~llama_from_scratch.hf_export.save_pretrained`."""
        return _save_pretrained(self, folder, tokenizer)

    @classmethod
    def from_gguf(cls, path: str | Path | GGUFFile, dtype: torch.dtype = torch.float32) -> Llama:
        """Loads a llama GGUF file (a path or an open :class:`~llama_from_scratch.gguf_reader.GGUFFile`),
        dequantized by this package's own code: metadata -> config, llama.cpp names -> these
        names, q/k rows un-interleaved (see :mod:`~llama_from_scratch.loading`). Raises
        ``ValueError`` (``GGUFError`` for the file itself) naming the offending tensors."""
        gguf = path if isinstance(path, GGUFFile) else read_gguf(path)
        config = config_from_gguf(gguf)
        state_dict, unknown = llama_state_dict(gguf, config, dtype)
        with torch.device("meta"):
            model = cls(config)
        check_llama_keys(model.state_dict(), state_dict, unknown, gguf.path)
        return model._assign_weights(state_dict).eval()

    def _assign_weights(self, state_dict: dict[str, torch.Tensor]) -> Llama:
        """Makes ``state_dict``'s tensors (all keys, right shapes) this model's weights, as they are
        (``assign=True``: a model built on the meta device gets real tensors without a copy)."""
        self.load_state_dict(state_dict, strict=True, assign=True)
        self.tie_weights()  # assign=True made two Parameters; share one again
        self.model.reset_rope()
        return self
