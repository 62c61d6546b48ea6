"""Prompt tuning, prefix tuning and P-tuning: fine-tuning by learned virtual tokens (chapter 10).

LoRA (:mod:`~llama_from_scratch.lora`) adds trainable matrices *inside* the frozen model. The
prompt-learning family leaves every weight alone and learns what the model *reads*:

* **Prompt tuning** (Lester et al. 2021, *The Power of Scale for Parameter-Efficient Prompt
  Tuning*): ``P`` learned vectors are prepended to the token embeddings of every input, as if the
  prompt began with ``P`` "virtual tokens" that are no word of the vocabulary. Trainable:
  ``P * dim`` numbers (:class:`PromptTuning`).
* **P-tuning** (Liu et al. 2021, *GPT Understands, Too*): the same prepended vectors, produced by
  a small *prompt encoder* (an MLP, or an LSTM followed by an MLP) from ``P`` learned inputs; the
  reparameterisation makes the virtual tokens depend on one another and trains more stably
  (:class:`PTuning`). After training the encoder's outputs can be stored and the encoder dropped.
* **Prefix tuning** (Li & Liang 2021, *Prefix-Tuning*; Liu et al. 2022, *P-Tuning v2*): instead
  of input vectors, learned **keys and values** for ``P`` virtual positions in *every* layer's
  attention. Every real token attends to them in every layer; nothing is prepended to the input.
  Optionally the prefix is produced by an MLP from ``P`` smaller vectors (``prefix_projection``)
  (:class:`PrefixTuning`).

Each wrapper freezes a :class:`~llama_from_scratch.model.Llama` and returns the logits of the
*real* tokens only (``[B, T, vocab_size]``), or the training loss with ``targets``, so the
training loop of chapters 9 and 10 runs unchanged.

Hugging Face PEFT's ``PromptTuningConfig``, ``PromptEncoderConfig`` and ``PrefixTuningConfig``
are the references (tests/test_prompt_tuning.py): our modules carry PEFT's parameter names
(``prompt_encoder.embedding``, ``mlp_head``, ``lstm_head``, ``transform``) and layouts, so with the
same learned parameters the logits are PEFT's over ``transformers.LlamaForCausalLM``. PEFT's
conventions kept here:

* virtual tokens sit at positions ``0 .. P - 1`` and the real tokens from ``P`` on: for prompt
  tuning and P-tuning because they are part of the input, for prefix tuning because the prefix is
  a KV cache holding ``P`` positions;
* the attention mask gets ``P`` ones in front (the virtual tokens are always visible);
* prefix keys are used as they are: no RoPE is applied to them (a cache holds keys already
  rotated, and the prefix is learned directly in that form);
* for grouped-query attention the prefix has ``n_kv_heads`` heads, PEFT's ``token_dim =
  n_kv_heads * head_dim``.

One difference: with an ``attention_mask``, our model counts positions over real tokens
(``cumsum(mask) - 1``, see :meth:`~llama_from_scratch.model.Llama.forward`), transformers' forward
pass counts every column. Without padding, or with right padding (chapter 9's batches), the two
agree; with left padding ours gives a row the logits it would have alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from llama_from_scratch.model import Llama

__all__ = ["PrefixCache", "PrefixEncoder", "PrefixTuning", "PromptEmbedding", "PromptEncoder", "PromptTuning",
           "PTuning"]

_INITS = ("random", "sample_vocab", "tokens")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The encoders: learned parameters -> virtual token embeddings or prefix keys/values
# ---------------------------------------------------------------------------------------------

class PromptEmbedding(nn.Module):
    """Prompt tuning's parameters: ``P`` free vectors of the model width (PEFT's ``PromptEmbedding``).

    ``forward()`` returns them, ``[P, dim]``.

    Args:
        num_virtual_tokens: ``P``.
        word_embeddings: the model's token embedding (used by the ``"sample_vocab"`` and
            ``"tokens"`` initializations).
        init: ``"random"``: ``nn.Embedding``'s default N(0, 1) (PEFT's ``RANDOM``);
            ``"sample_vocab"``: the embeddings of ``P`` tokens drawn uniformly from the vocabulary
            (PEFT's ``SAMPLE_VOCAB``); ``"tokens"``: the embeddings of ``init_token_ids``, repeated
            or cut to ``P`` (PEFT's ``TEXT``, which tokenizes ``prompt_tuning_init_text`` first).
            Lester et al. found initialising from real tokens better than random, especially for
            smaller models.
        init_token_ids: the token ids for ``init="tokens"``.
    """

    def __init__(self, num_virtual_tokens: int, word_embeddings: nn.Embedding, init: str = "random",
                 init_token_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        _check_positive_int("num_virtual_tokens", num_virtual_tokens)
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if (init == "tokens") != (init_token_ids is not None):
            raise ValueError('init_token_ids are needed for init="tokens", and only for it')
        weight = word_embeddings.weight
        vocab_size, dim = weight.shape
        self.embedding = nn.Embedding(num_virtual_tokens, dim, device=weight.device)
        if init == "random":
            return
        if init == "sample_vocab":
            ids = torch.randint(0, vocab_size, (num_virtual_tokens,), device=weight.device)
        else:
            ids_list = list(init_token_ids)  # type: ignore[arg-type]
            if not ids_list or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids_list):
                raise ValueError(f"init_token_ids must be a non-empty list of token ids in [0, {vocab_size})")
            ids_list = (ids_list * math.ceil(num_virtual_tokens / len(ids_list)))[:num_virtual_tokens]
            ids = torch.tensor(ids_list, device=weight.device)
        with torch.no_grad():
            self.embedding.weight.copy_(weight[ids].float())  # float32 parameters, as PEFT keeps them

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's parameters: ``P`` input vectors and the encoder that maps them to the virtual
    token embeddings (PEFT's ``PromptEncoder``). ``forward()`` returns ``[P, dim]``.

    * ``encoder_type="MLP"``: ``mlp_head`` = Linear(dim, h), ReLU, Linear(h, h), ReLU,
      Linear(h, dim), applied to each input vector.
    * ``encoder_type="LSTM"`` (the paper's choice): a bidirectional ``lstm_head`` (``num_layers``
      layers, hidden size ``h``) reads the ``P`` inputs as a sequence, then ``mlp_head`` =
      Linear(2h, 2h), ReLU, Linear(2h, dim). The LSTM ties the virtual tokens to one another.

    ``h = encoder_hidden_size`` (default ``dim``, as PEFT). Parameters start as PyTorch's defaults.
    """

    def __init__(self, num_virtual_tokens: int, dim: int, encoder_hidden_size: int | None = None,
                 encoder_type: str = "MLP", num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive_int("num_virtual_tokens", num_virtual_tokens)
        _check_positive_int("dim", dim)
        hidden = dim if encoder_hidden_size is None else encoder_hidden_size
        _check_positive_int("encoder_hidden_size", hidden)
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f'encoder_type must be "MLP" or "LSTM", got {encoder_type!r}')
        self.encoder_type = encoder_type
        self.embedding = nn.Embedding(num_virtual_tokens, dim)
        if encoder_type == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        else:
            _check_positive_int("num_layers", num_layers)
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)  # [P, 2h]: both directions
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning's parameters (PEFT's ``PrefixEncoder``). ``forward()`` returns the flat
    prefix ``[P, n_layers * 2 * kv_dim]``, ``kv_dim = n_kv_heads * head_dim``: for each virtual
    position, layer 0's key, layer 0's value, layer 1's key, ... (PEFT's layout).

    Without ``prefix_projection`` the flat prefix *is* the parameter (``embedding``, N(0, 1) as
    ``nn.Embedding``). With it, ``embedding`` is ``[P, kv_dim]`` and ``transform`` = Linear(kv_dim,
    h), Tanh, Linear(h, n_layers * 2 * kv_dim) maps it to the prefix: Li & Liang's
    reparameterisation, which they found necessary for stable training (the MLP can be dropped
    after training, keeping only its output). ``h = encoder_hidden_size``, default ``kv_dim``.
    """

    def __init__(self, num_virtual_tokens: int, n_layers: int, kv_dim: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None) -> None:
        super().__init__()
        for name, value in [("num_virtual_tokens", num_virtual_tokens), ("n_layers", n_layers), ("kv_dim", kv_dim)]:
            _check_positive_int(name, value)
        self.prefix_projection = prefix_projection
        out = n_layers * 2 * kv_dim
        if prefix_projection:
            hidden = kv_dim if encoder_hidden_size is None else encoder_hidden_size
            _check_positive_int("encoder_hidden_size", hidden)
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            if encoder_hidden_size is not None:
                raise ValueError("encoder_hidden_size is the width of the projection MLP: it needs prefix_projection")
            self.embedding = nn.Embedding(num_virtual_tokens, out)

    def forward(self) -> torch.Tensor:
        prefix = self.embedding.weight
        return self.transform(prefix) if self.prefix_projection else prefix


# ---------------------------------------------------------------------------------------------
# Prefix keys and values as a KV cache
# ---------------------------------------------------------------------------------------------

class PrefixCache:
    """A KV cache that holds the learned prefix of every layer and nothing else.

    Our attention writes the keys (after RoPE) and values of its tokens into a cache and attends
    to everything the cache returns (:class:`~llama_from_scratch.attention.KVCache`). Prefix tuning
    is exactly a cache that already holds ``P`` positions: run the real tokens at ``start_pos=P``
    and each layer's attention sees the prefix first. Unlike ``KVCache`` (preallocated, written in
    place) this one concatenates, so gradients flow back to the prefix; it serves one forward pass.

    Args:
        keys, values: ``[n_layers, n_kv_heads, P, head_dim]``, the same for every row of the batch.
        batch_size: rows of the batch it serves.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, batch_size: int) -> None:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(f"keys and values must both be [n_layers, n_kv_heads, P, head_dim], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        self.keys, self.values = keys, values
        self.n_layers = keys.shape[0]
        self.batch_size = batch_size
        self.prefix_len = keys.shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix of ``layer_idx`` followed by ``k``, ``v`` (``[B, n_kv_heads, T, head_dim]``)."""
        if start_pos != self.prefix_len:
            raise ValueError(f"the real tokens start after the prefix, at start_pos={self.prefix_len}, "
                             f"got {start_pos}")
        shape = (k.shape[0], -1, -1, -1)
        prefix_k = self.keys[layer_idx].to(k.dtype).expand(*shape)
        prefix_v = self.values[layer_idx].to(v.dtype).expand(*shape)
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


# ---------------------------------------------------------------------------------------------
# The wrappers: a frozen Llama plus virtual tokens
# ---------------------------------------------------------------------------------------------

class _VirtualTokens(nn.Module):
    """What the three wrappers share: the frozen model, the mask with ``P`` ones in front, and
    the logits (or loss) of the real tokens."""

    prompt_encoder: nn.Module

    def __init__(self, model: Llama, num_virtual_tokens: int) -> None:
        super().__init__()
        if not isinstance(model, Llama):
            raise TypeError(f"expected a llama_from_scratch Llama, got {type(model).__name__}")
        _check_positive_int("num_virtual_tokens", num_virtual_tokens)
        self.model = model.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens

    @staticmethod
    def _check_ids(input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [batch, seq_len], got {shape}")

    def _extend_mask(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[B, T]`` padding mask -> ``[B, P + T]``: the virtual tokens are always visible."""
        if attention_mask is None:
            return None
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be [B, T] like input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def _output(self, hidden: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Logits of ``hidden`` (the real tokens' final hidden states), or the loss on ``targets``."""
        if targets is not None:
            return self.model.next_token_loss(hidden, targets)
        return self.model.lm_head(hidden)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of model and prompt encoder (tied embeddings once); PEFT's
        ``get_nb_trainable_parameters()[0]`` with ``trainable_only``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class _PrependedTokens(_VirtualTokens):
    """Prompt tuning and P-tuning: the encoder's ``[P, dim]`` vectors go in front of the token
    embeddings, and the blocks run over ``P + T`` positions."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` of the real tokens ``input_ids`` (``[B, T]``), or the mean
        cross-entropy on ``targets`` (``[B, T]``, the next token, -100 = none). ``attention_mask``
        (``[B, T]``, 1 = token, 0 = padding) covers the real tokens only."""
        self._check_ids(input_ids)
        backbone = self.model.model
        embeds = backbone.embed_tokens(input_ids)
        prompts = self.prompt_encoder().to(embeds.dtype)
        prompts = prompts.unsqueeze(0).expand(embeds.shape[0], -1, -1)
        hidden = backbone(None, inputs_embeds=torch.cat([prompts, embeds], dim=1),
                          attention_mask=self._extend_mask(attention_mask, input_ids))
        return self._output(hidden[:, self.num_virtual_tokens:], targets)


class PromptTuning(_PrependedTokens):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned vectors prepended to the
    input embeddings of a frozen ``model``; PEFT's ``PromptTuningConfig``.

    ``init`` and ``init_token_ids``: see :class:`PromptEmbedding` (``"random"``, PEFT's default;
    ``"sample_vocab"``; ``"tokens"``). The trainable parameters are
    ``prompt_encoder.embedding.weight``, ``[P, dim]``.
    """

    def __init__(self, model: Llama, num_virtual_tokens: int, init: str = "random",
                 init_token_ids: Sequence[int] | None = None) -> None:
        super().__init__(model, num_virtual_tokens)
        self.prompt_encoder = PromptEmbedding(num_virtual_tokens, model.model.embed_tokens, init, init_token_ids)


class PTuning(_PrependedTokens):
    """P-tuning (Liu et al. 2021): virtual token embeddings produced by a prompt encoder (MLP, or
    LSTM + MLP), prepended to the input embeddings of a frozen ``model``; PEFT's
    ``PromptEncoderConfig`` (``encoder_reparameterization_type``, ``encoder_hidden_size``,
    ``encoder_num_layers``, ``encoder_dropout``). See :class:`PromptEncoder`.
    """

    def __init__(self, model: Llama, num_virtual_tokens: int, encoder_type: str = "MLP",
                 encoder_hidden_size: int | None = None, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__(model, num_virtual_tokens)
        weight = model.model.embed_tokens.weight
        self.prompt_encoder = PromptEncoder(num_virtual_tokens, model.config.dim, encoder_hidden_size, encoder_type,
                                            num_layers, dropout).to(weight.device)


class PrefixTuning(_VirtualTokens):
    """Prefix tuning (Li & Liang 2021; P-tuning v2, Liu et al. 2022): learned keys and values for
    ``num_virtual_tokens`` positions in every attention layer of a frozen ``model``; PEFT's
    ``PrefixTuningConfig`` (``prefix_projection``, ``encoder_hidden_size``). See
    :class:`PrefixEncoder` and :class:`PrefixCache`.
    """

    def __init__(self, model: Llama, num_virtual_tokens: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None) -> None:
        super().__init__(model, num_virtual_tokens)
        c = model.config
        self.prompt_encoder = PrefixEncoder(num_virtual_tokens, c.n_layers, c.n_kv_heads * c.head_dim,
                                            prefix_projection, encoder_hidden_size).to(model.lm_head.weight.device)

    @torch.no_grad()
    def init_from_tokens(self, token_ids: Sequence[int]) -> None:
        """Li & Liang's initialisation: the prefix becomes the keys and values the frozen model
        computes for ``P`` real tokens at positions ``0 .. P - 1`` (what its KV cache would hold
        after reading them), so training starts from the model reading those tokens first instead
        of from random keys. Needs ``prefix_projection=False`` (the MLP's output cannot be set)."""
        if self.prompt_encoder.prefix_projection:
            raise ValueError("init_from_tokens sets the prefix itself: it needs prefix_projection=False")
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.model.lm_head.weight.device)
        if ids.shape != (self.num_virtual_tokens,):
            raise ValueError(f"need exactly num_virtual_tokens={self.num_virtual_tokens} token ids, got {ids.numel()}")
        c = self.model.config
        cache = self.model.make_kv_cache(batch_size=1, max_seq_len=self.num_virtual_tokens)
        self.model(ids[None], kv_cache=cache)
        kv = torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1)  # [n_layers, 2, n_kv_heads, P, head_dim]
        flat = kv.reshape(2 * c.n_layers, c.n_kv_heads, self.num_virtual_tokens, c.head_dim).permute(2, 0, 1, 3)
        self.prompt_encoder.embedding.weight.copy_(flat.reshape(self.num_virtual_tokens, -1))

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of every layer, each ``[n_layers, n_kv_heads, P, head_dim]``."""
        c = self.model.config
        flat = self.prompt_encoder()  # [P, n_layers * 2 * kv_dim]
        kv = flat.view(self.num_virtual_tokens, 2 * c.n_layers, c.n_kv_heads, c.head_dim).permute(1, 2, 0, 3)
        return kv[0::2], kv[1::2]  # layer i: key at 2i, value at 2i + 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`PromptTuning.forward`: the real tokens run at positions ``P ..`` with the
        prefix in every layer's cache."""
        self._check_ids(input_ids)
        keys, values = self.prefix()
        cache = PrefixCache(keys, values, batch_size=input_ids.shape[0])
        hidden = self.model.model(input_ids, start_pos=self.num_virtual_tokens, kv_cache=cache,  # type: ignore[arg-type]
                                  attention_mask=self._extend_mask(attention_mask, input_ids))
        return self._output(hidden, targets)
