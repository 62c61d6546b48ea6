"""Decoding loops: sampling / greedy ``generate`` and ``beam_search`` (chapter 7).

A causal language model gives next-token scores; text comes out of a loop that feeds each chosen
token back in. Two things make the loop fast and correct for a batch:

* **The KV cache.** The first forward pass (the *prefill*) runs the whole prompt and stores every
  layer's keys and values; each later step runs only the newest token at ``start_pos`` and reads
  the earlier keys and values from the cache. Without the cache (``use_cache=False``) every step
  re-runs the whole sequence: the same numbers, quadratically more work. Both give the same
  greedy output (the tests check it).
* **Left padding.** Prompts of different lengths share one ``[B, T]`` tensor by padding them *on
  the left*, so that every row's next token goes at the same column ``T``. The ``attention_mask``
  (1 = token, 0 = padding) keeps padding out of attention, and RoPE positions are counted over
  real tokens only (``cumsum(mask) - 1``), so each row gets exactly the logits it would get alone.
  Right padding would put the next token after the padding, which is why it is refused.

:func:`generate` follows Hugging Face ``generate``: logits in float32, then the repetition penalty,
then temperature, top-k, top-p and min-p (:mod:`llama_from_scratch.sampling`), then ``argmax``
(``temperature=0``) or a draw. A row stops when it produces an end-of-sequence token; after that
it receives ``pad_token_id``, and the loop ends as soon as every row has stopped.

:func:`beam_search` keeps the ``num_beams`` most likely partial sequences per prompt and
reproduces Hugging Face ``generate(num_beams=k, do_sample=False)`` token for token, including
its length penalty and its (default, heuristic) stopping rule; see its docstring.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from llama_from_scratch import fast_decode
from llama_from_scratch.sampling import _check_sampling_args, apply_repetition_penalty, sample_next_token

__all__ = ["generate", "beam_search"]


# --------------------------------------------------------------------------------------------
# Input checks shared by both loops
# --------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D [batch, seq_len], got shape {tuple(input_ids.shape)} "
            "(for one prompt use ids[None] or ids.unsqueeze(0))"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor (token ids), got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has batch size 0: nothing to generate from")
    if input_ids.shape[1] == 0:
        raise ValueError(
            "empty prompt: input_ids has seq_len 0; the model needs at least one token to condition on "
            "(e.g. a BOS token)"
        )


def _check_lengths(model, prompt_len: int, max_new_tokens) -> None:
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_seq_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_seq_len is not None and prompt_len + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's max_seq_len {max_seq_len}; shorten the prompt or ask for fewer tokens"
        )


def _token_id_list(value, name: str) -> list[int] | None:
    """``None``, an int, or a list / tuple / 1-D tensor of ints -> ``None`` or a non-empty list."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dim() > 1:
            raise ValueError(f"{name} must be an int or a list of ints, got a tensor of shape {tuple(value.shape)}")
        value = value.tolist()
    if _is_int(value):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value or not all(_is_int(v) for v in value):
        raise ValueError(f"{name} must be an int or a non-empty list of ints, got {value!r}")
    if any(v < 0 for v in value):
        raise ValueError(f"{name} must be non-negative token ids, got {value!r}")
    return [int(v) for v in value]


def _check_pad(pad_token_id, eos: list[int] | None) -> int | None:
    if pad_token_id is None:
        return eos[0] if eos else None  # Hugging Face's default: pad with the (first) EOS token
    if not _is_int(pad_token_id) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
    return int(pad_token_id)


def _check_attention_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Validates a ``[B, T]`` left-padding mask; returns it as ``long``, or None when it has no padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} (1 = token, "
            f"0 = padding), got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
    mask = mask.long()
    if (mask.sum(dim=1) == 0).any():
        rows = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are all padding: every prompt needs at least one token")
    # Left padding: along each row the mask never goes from 1 back to 0.
    if (mask[:, 1:] < mask[:, :-1]).any():
        rows = (mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows} have padding after a token (right padding or holes); generation "
            "appends new tokens at the end, so pad prompts on the LEFT (e.g. tokenizer.padding_side = 'left')"
        )
    return None if bool(mask.all()) else mask


class _Forward:
    """Runs the model for one decoding step, with or without a KV cache.

    ``step(tokens)``: ``tokens`` is the whole current sequence ``[N, cur_len]``; with a cache only
    its new part is fed (the prompt on the first call, then the last token). Returns the float32
    logits of the last position, ``[N, V]``.

    Nothing grows step by step: the padding mask is extended once to the final length (new
    tokens are never padding) and each step passes a view of its first ``cur_len`` columns. When
    the model takes ``logits_to_keep`` (:class:`~llama_from_scratch.model.Llama` does), only the
    last position goes through the output projection.
    """

    def __init__(self, model, batch_size: int, max_len: int, mask: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.full_mask = None
        if mask is not None:
            extra = max_len - mask.shape[1]
            self.full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1) if extra > 0 else mask
        self.cache = model.make_kv_cache(batch_size, max_seq_len=max_len) if use_cache else None
        self.cached = 0  # positions held by the cache
        try:
            takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_keep = False
        self.kwargs = {"logits_to_keep": 1} if takes_keep else {}

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cur_len = tokens.shape[1]
        mask = None if self.full_mask is None else self.full_mask[:, :cur_len]
        if self.cache is None:
            logits = self.model(tokens, attention_mask=mask, **self.kwargs)
        else:
            logits = self.model(tokens[:, self.cached :], self.cached, self.cache, attention_mask=mask, **self.kwargs)
            self.cached = cur_len
        return logits[:, -1, :].float()  # as transformers: decide in float32 whatever the weights' dtype


class _FastForward:
    """:class:`_Forward` for ``generate(..., compile=True)``: the prompt runs through the model as
    usual (into a :class:`KVCache` whose length is rounded up to a multiple of 128, so that a few
    compiled shapes serve all lengths), then every new token goes through the fused, compiled
    :func:`~llama_from_scratch.fast_decode.decode_step`, which continues the same cache."""

    BUCKET = 128

    def __init__(self, model, batch_size: int, max_len: int, mask: torch.Tensor | None, quantize: str | None = None):
        self.weights = fast_decode.fuse_weights(model, quantize)
        c = model.config
        self.args = (c.n_heads, c.n_kv_heads, c.norm_eps)
        cache_len = min(-(-max_len // self.BUCKET) * self.BUCKET, c.max_seq_len)
        self.prefill = _Forward(model, batch_size, cache_len, mask, use_cache=True)
        device = self.weights.embed_tokens.device
        self.padding = torch.ones(batch_size, cache_len, dtype=torch.bool, device=device)
        if mask is not None:
            self.padding[:, : mask.shape[1]] = mask.bool()
        self.cur = torch.zeros(1, dtype=torch.long, device=device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.prefill.cached == 0:
            return self.prefill.step(tokens)
        cache = self.prefill.cache
        self.cur.fill_(tokens.shape[1] - 1)
        return fast_decode.run_decode_step(self.weights, cache.k, cache.v, tokens[:, -1], self.cur,
                                           self.padding, *self.args)


class _EvalMode:
    """``model.eval()`` for the duration, then the previous train/eval state back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# --------------------------------------------------------------------------------------------
# generate: greedy decoding and sampling
# --------------------------------------------------------------------------------------------


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> torch.Tensor:
    """Continues each prompt of ``input_ids`` by up to ``max_new_tokens`` tokens.

    Each step: logits of the last position (in float32), :func:`apply_repetition_penalty`
    (if ``repetition_penalty != 1``), then ``temperature``, ``top_k``, ``top_p``, ``min_p`` (in that
    order, as Hugging Face ``generate``), then the choice: ``argmax`` when ``temperature == 0``
    (greedy decoding: equal to ``transformers`` ``generate(do_sample=False)``), otherwise a draw
    with ``torch.multinomial`` using ``generator`` (seed it for reproducible samples).

    Args:
        model: a :class:`~llama_from_scratch.model.Llama` (anything with its ``forward`` and
            ``make_kv_cache``). It runs in eval mode; its train/eval state is restored afterwards.
        input_ids: ``[B, T]`` integer prompt ids, ``T >= 1``; batched prompts are padded on the
            LEFT, with ``attention_mask`` marking the padding.
        max_new_tokens: tokens to add; ``0`` returns a copy of ``input_ids`` unchanged.
        eos_token_id: an id or a list of ids that end a sequence (the EOS token is kept in the
            output). None: never stop early.
        use_cache: ``True`` runs the prompt once (prefill) into a :class:`KVCache` sized
            ``T + max_new_tokens``, then one token per step; ``False`` re-runs the whole sequence
            each step. Same greedy output.
        attention_mask: ``[B, T]``, 1 for tokens and 0 for left padding. Right padding raises.
        pad_token_id: what finished rows receive while other rows go on (default: the first EOS
            id, as ``transformers``).
        stream: optional callback, called after every step with the new tokens ``[B]`` (padding
            for finished rows), e.g. to print text as it is produced.
        compile: decode with :mod:`~llama_from_scratch.fast_decode`: the prompt as usual, then each
            token through one fused, ``torch.compile``-d step over a static cache (the first call
            for a batch size and length compiles, tens of seconds; later ones reuse it). Needs a
            plain :class:`~llama_from_scratch.model.Llama` (``ValueError`` otherwise) and a KV
            cache (``use_cache=True``). Same arithmetic in another order: logits within rounding
            of the default path, the same greedy tokens except at near-ties. Falls back to the
            eager fused step, with a warning, where compiling is impossible.
        quantize: with ``compile=True`` on a CPU, ``"int4"`` runs the decoding steps on 4-bit copies
            of the weight matrices (GGUF Q4_1's rule, PyTorch's int4 kernel, bfloat16 activations;
            :mod:`~llama_from_scratch.fast_decode`): 5 bits per weight against bfloat16's 16,
            logits within quantization error of the model's own (the prompt still runs through the
            model as it is). None: the model's own weights.

    Returns:
        ``[B, T + n]`` ``long`` ids on the model's device, prompt included, where ``n <=
        max_new_tokens`` is the number of steps run (fewer when every row hit EOS). The result
        is an ordinary tensor (computation runs under ``torch.inference_mode``; the output is
        copied out of it so it can feed a later forward pass that needs gradients).

    Raises ``ValueError`` for an empty prompt, ``max_new_tokens < 0``, ``T + max_new_tokens >
    config.max_seq_len``, bad sampling settings (``temperature < 0``, ``top_p`` outside (0, 1],
    ...), a mask of the wrong shape or with right padding; ``TypeError`` for non-integer ids.

    Repetition penalty and padding: the penalty counts only real tokens (``attention_mask == 1``),
    so a padded row is penalised as it would be alone. (``transformers`` also counts the padding
    id in the prompt; the two differ only in the pad token's own score.)
    """
    _check_input_ids(input_ids)
    _check_lengths(model, input_ids.shape[1], max_new_tokens)
    _check_sampling_args(temperature, top_k, top_p, min_p, allow_zero_temperature=True)
    if (not isinstance(repetition_penalty, numbers.Real) or isinstance(repetition_penalty, bool)
            or not repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0 = off), got {repetition_penalty!r}")
    eos = _token_id_list(eos_token_id, "eos_token_id")
    pad = _check_pad(pad_token_id, eos)
    if stream is not None and not callable(stream):
        raise TypeError("stream must be a callable taking the new token ids [B], or None")
    if quantize is not None and not compile:
        raise ValueError("quantize= selects the weights of the compiled decoding step: pass compile=True too")
    if compile:
        if not use_cache:
            raise ValueError("compile=True decodes over a KV cache: it needs use_cache=True")
        fast_decode.check_decode_options(model, quantize)

    device = _model_device(model)
    input_ids = input_ids.to(device)
    mask = _check_attention_mask(attention_mask, input_ids)
    if max_new_tokens == 0:
        return input_ids.long().clone()

    with torch.inference_mode(), _EvalMode(model):
        out = _generate_loop(model, input_ids.long(), mask, max_new_tokens, temperature, top_k, top_p, min_p,
                             repetition_penalty, eos, pad, use_cache, generator, stream, compile, quantize)
    return out.clone()  # a normal tensor, usable outside inference mode


def _generate_loop(model, ids, mask, max_new_tokens, temperature, top_k, top_p, min_p,
                   repetition_penalty, eos, pad, use_cache, generator, stream, compile=False,
                   quantize=None) -> torch.Tensor:
    batch, prompt_len = ids.shape
    vocab_size = model.config.vocab_size if hasattr(model, "config") else None
    if compile:
        forward = _FastForward(model, batch, prompt_len + max_new_tokens, mask, quantize)
    else:
        forward = _Forward(model, batch, prompt_len + max_new_tokens, mask, use_cache)
    eos_ids = torch.tensor(eos, device=ids.device) if eos else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    # The output is written into one preallocated [B, T + max_new_tokens] tensor; each step reads
    # the view of its filled part (no torch.cat, no reallocation per step).
    buffer = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=ids.device)
    buffer[:, :prompt_len] = ids
    # Repetition penalty looks only at real tokens: padding positions get an id outside the
    # vocabulary, which apply_repetition_penalty ignores.
    penalty_buffer = buffer.clone() if mask is not None and repetition_penalty != 1.0 else buffer
    if penalty_buffer is not buffer:
        penalty_buffer[:, :prompt_len].masked_fill_(mask == 0, vocab_size or int(ids.max()) + 1)
    pad_tokens = torch.full((batch,), pad if pad is not None else 0, dtype=torch.long, device=ids.device)

    cur_len = prompt_len
    for _ in range(max_new_tokens):
        logits = forward.step(buffer[:, :cur_len])  # [B, V] float32
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, penalty_buffer[:, :cur_len], repetition_penalty)
        next_tokens = sample_next_token(logits, temperature, top_k, top_p, min_p, generator=generator)
        if eos_ids is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad_tokens)
            unfinished &= ~torch.isin(next_tokens, eos_ids)
        buffer[:, cur_len] = next_tokens
        if penalty_buffer is not buffer:
            penalty_buffer[:, cur_len] = next_tokens
        cur_len += 1
        if stream is not None:
            stream(next_tokens)
        if eos_ids is not None and not unfinished.any():
            break
    return buffer[:, :cur_len]


# --------------------------------------------------------------------------------------------
# beam search
# --------------------------------------------------------------------------------------------


def _gather_beams(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j], ...]`` for ``x`` ``[B, N, ...]`` and ``index`` ``[B, M]`` -> ``[B, M, ...]``."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    early_stopping: bool | str = False,
) -> torch.Tensor:
    """The most likely continuation of each prompt found by beam search; Hugging Face semantics.

    Returns, for every row of ``input_ids`` (``[B, T]``, left-padded with ``attention_mask`` when
    batched), the best finished hypothesis, ``[B, T + n]`` with ``n <= max_new_tokens`` the
    longest returned continuation; shorter ones are filled with ``pad_token_id`` (default: the
    first EOS id). Token for token what ``transformers`` ``generate(num_beams=num_beams,
    do_sample=False, length_penalty=..., early_stopping=...)`` returns. The algorithm:

    1. Keep ``num_beams`` running hypotheses per prompt with their summed log-probabilities
       (initially one: the other beams start at ``-1e9`` so the first step does not pick the
       same token ``num_beams`` times).
    2. Each step, score every (beam, next token) pair by ``beam score + log_softmax(logits)`` and
       take the best ``2 * num_beams`` (``(1 + number of EOS ids) * num_beams`` if larger), so
       that enough non-EOS candidates remain even when the best ones all end.
    3. A candidate ending in EOS (or reaching ``max_new_tokens``) that ranks among the top
       ``num_beams`` becomes a *finished* hypothesis with score ``sum of log-probs / n **
       length_penalty``, ``n`` = its generated tokens (EOS included): ``length_penalty > 0``
       favours longer, ``< 0`` shorter sequences. The best ``num_beams`` finished are kept.
    4. The best ``num_beams`` candidates that did not end are the next running beams; the KV
       cache is reordered (:meth:`KVCache.reorder`) to follow them.
    5. Stop at ``max_new_tokens``, or once every prompt has ``num_beams`` finished hypotheses
       and no running beam can still beat the worst of them. ``early_stopping=False`` (the
       default, as in ``transformers``) estimates the best a running beam can reach as its
       current score divided by its current length ** length_penalty; ``"never"`` uses the
       maximal length when ``length_penalty > 0`` (the exact bound); ``True`` stops a prompt as
       soon as it has ``num_beams`` finished hypotheses.

    ``eos_token_id`` may be an int or a list. ``num_beams=1`` is greedy decoding. The arguments
    after ``eos_token_id`` are additions to the chapter's API: ``attention_mask`` for left-padded
    batches (as in :func:`generate`), ``use_cache=False`` to recompute every step, and
    ``early_stopping`` (``transformers``' option of that name).

    One deliberate difference: where a returned hypothesis is shorter than the longest one, the
    gap is filled with ``pad_token_id``. ``transformers`` fills it with ``pad_token_id or
    eos_token_id`` and so uses the EOS id when ``pad_token_id == 0`` (Python's ``or`` treats 0 as
    missing); the tokens themselves are the same.
    """
    _check_input_ids(input_ids)
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    _check_lengths(model, input_ids.shape[1], max_new_tokens)
    if not isinstance(length_penalty, numbers.Real) or isinstance(length_penalty, bool):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f'early_stopping must be True, False or "never", got {early_stopping!r}')
    eos = _token_id_list(eos_token_id, "eos_token_id")
    pad = _check_pad(pad_token_id, eos)
    device = _model_device(model)
    input_ids = input_ids.to(device)
    mask = _check_attention_mask(attention_mask, input_ids)
    vocab_size = model.config.vocab_size
    keep = max(2, 1 + len(eos or [])) * num_beams
    if keep > num_beams * vocab_size:
        raise ValueError(f"num_beams {num_beams} is too large for a vocabulary of {vocab_size} tokens")
    if max_new_tokens == 0:
        return input_ids.long().clone()

    with torch.inference_mode(), _EvalMode(model):
        out = _beam_search_loop(model, input_ids.long(), mask, num_beams, max_new_tokens, float(length_penalty),
                                eos, pad if pad is not None else 0, use_cache, early_stopping, keep)
    return out.clone()


def _beam_search_loop(model, ids, mask, num_beams, max_new_tokens, length_penalty, eos, fill,
                      use_cache, early_stopping, keep) -> torch.Tensor:
    B, T = ids.shape
    K = num_beams
    max_len = T + max_new_tokens
    device = ids.device
    eos_ids = torch.tensor(eos, device=device) if eos else None

    # Every prompt is copied K times: row b * K + k of the flat batch is beam k of prompt b.
    flat_mask = None if mask is None else mask.repeat_interleave(K, dim=0)
    forward = _Forward(model, B * K, max_len, flat_mask, use_cache)

    running = torch.full((B, K, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :T] = ids[:, None, :]
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9  # step 1 expands beam 0 only (all beams are the same prompt)

    finished = running.clone()  # the best K finished hypotheses per prompt
    finished_scores = torch.full((B, K), -1e9, device=device)
    finished_lens = torch.zeros(B, K, dtype=torch.long, device=device)  # generated tokens of each
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_k_mask = torch.arange(keep, device=device) < K  # only the best K candidates may finish

    for cur_len in range(T, max_len):
        logits = forward.step(running.view(B * K, max_len)[:, :cur_len])  # [B*K, V]
        log_probs = F.log_softmax(logits, dim=-1).view(B, K, -1)
        vocab_size = log_probs.shape[-1]
        scores = (log_probs + running_scores[:, :, None]).view(B, K * vocab_size)

        # Best `keep` (beam, token) candidates of each prompt, sorted by score.
        cand_scores, cand_index = torch.topk(scores, keep)  # [B, keep]
        cand_beam, cand_token = cand_index // vocab_size, cand_index % vocab_size
        cand_seqs = _gather_beams(running, cand_beam)
        cand_seqs[:, :, cur_len] = cand_token
        ends = torch.full_like(cand_token, cur_len + 1 >= max_len, dtype=torch.bool)
        if eos_ids is not None:
            ends |= torch.isin(cand_token, eos_ids)

        # Running beams for the next step: the best K candidates that did not end.
        open_scores = cand_scores + ends.float() * -1e9
        chosen = torch.topk(open_scores, K).indices  # [B, K]
        running = _gather_beams(cand_seqs, chosen)
        running_scores = _gather_beams(open_scores, chosen)
        source_beam = _gather_beams(cand_beam, chosen)  # which old beam each new one continues

        # Finished hypotheses: merge the candidates that just ended (among the top K) into the best K.
        just_finished = ends & top_k_mask[None, :]
        new_scores = cand_scores / ((cur_len + 1 - T) ** length_penalty)
        if early_stopping is True:
            new_scores = new_scores + is_finished.all(dim=-1, keepdim=True).float() * -1e9
        new_scores = new_scores + (~can_improve).float() * -1e9
        new_scores = new_scores + (~just_finished) * -1e9
        merged_scores = torch.cat([finished_scores, new_scores], dim=1)
        best = torch.topk(merged_scores, K).indices
        finished = _gather_beams(torch.cat([finished, cand_seqs], dim=1), best)
        finished_scores = _gather_beams(merged_scores, best)
        new_lens = torch.full_like(cand_token, cur_len + 1 - T)
        finished_lens = _gather_beams(torch.cat([finished_lens, new_lens], dim=1), best)
        is_finished = _gather_beams(torch.cat([is_finished, just_finished], dim=1), best)

        if forward.cache is not None:  # the cache rows must follow the beams they belong to
            flat_source = (source_beam + torch.arange(B, device=device)[:, None] * K).flatten()
            forward.cache.reorder(flat_source)

        # Can a running beam still beat the worst finished hypothesis? (Hugging Face's heuristic.)
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_len - T
        else:
            best_len = cur_len + 1 - T
        best_running = running_scores[:, :1] / (best_len**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)

        all_full = bool(is_finished.all()) and early_stopping is True
        if not bool(can_improve.any()) or all_full or bool(ends.all()):
            break

    # The best hypothesis of each prompt, cut to the longest one returned.
    out_len = T + int(finished_lens[:, 0].max())
    return finished[:, 0, :out_len]
