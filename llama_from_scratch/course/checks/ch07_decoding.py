"""Checks of chapter 7's exercises: typical sampling, the no-repeat n-gram ban, a batched greedy
decode loop with the KV cache on a ``transformers`` Llama, and speculative decoding.

References (all independent of this package):

- ``typical_logits`` / ``no_repeat_ngram_logits``: ``transformers``' ``TypicalLogitsWarper`` and
  ``NoRepeatNGramLogitsProcessor`` on fresh random logits and token ids;
- ``greedy_decode_with_cache``: ``LlamaForCausalLM.generate(do_sample=False)`` of a tiny random
  Llama, rebuilt on the student's side from its config and state dict, on a left-padded batch;
- ``speculative_greedy_decode``: the target model's own greedy tokens (one token per forward
  pass); the two models live in the grader (``Callback``), which counts the target's passes.

Inputs are drawn fresh at every grading run; failure messages say what differed, never the
expected values.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any, Callable

import torch

from llama_from_scratch.course.checks.common import (
    Callback,
    Construct,
    assert_close,
    assert_equal,
    as_tensor,
    fresh_generator,
    fresh_rng,
)

# ----- calling a student's function in this process or through the sandbox ------------------


def _local(value: Any) -> Any:
    """What the sandbox makes of the markers, for a function that runs in this process: each
    ``Construct`` built, each ``Callback`` unwrapped. Containers without markers are returned as
    they are (so in-place updates of them stay visible, as the sandbox copies them back)."""
    if isinstance(value, Construct):
        return Construct(value.target, *_local(list(value.args)), method=value.method,
                         **_local(dict(value.kwargs))).build()
    if isinstance(value, Callback):
        return value.fn
    if isinstance(value, (list, tuple)):
        items = [_local(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items)
    if isinstance(value, dict):
        items = {k: _local(v) for k, v in value.items()}
        if all(items[k] is value[k] for k in value):
            return value
        return items
    return value


def one_thread(check: Callable) -> Callable:
    """Run a check with one torch thread: tiny models are dominated by threading overhead, many
    times slower with two threads on a busy machine than with one."""

    @functools.wraps(check)
    def wrapper(fn: Callable) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            check(fn)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: through the sandbox's proxy as is (the markers are built there), or
    in this process with the markers built here (nested ``Construct``s included)."""
    if type(fn).__name__ == "LocalObject" and hasattr(fn, "_target"):
        fn = fn._target                                  # inside a notebook: the learner's own function
    elif getattr(fn, "_lfs_value_and_grad", None) is not None:
        return fn(*args, **kwargs)
    with contextlib.redirect_stderr(io.StringIO()):      # transformers' weight-loading progress bar
        return fn(*_local(args), **_local(kwargs))


# ----- tiny transformers Llamas -------------------------------------------------------------


def tiny_llama_config(rng, vocab_size: int | None = None) -> dict:
    """Keyword arguments of a tiny ``transformers.LlamaConfig`` (no default special ids, so that
    ``generate`` uses only the ids it is given)."""
    heads, kv_heads = rng.choice([(4, 2), (4, 1), (2, 2), (4, 4)])
    return dict(vocab_size=vocab_size or rng.randrange(40, 160), hidden_size=32, intermediate_size=rng.choice([48, 64]),
                num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=256, rope_theta=rng.choice([100.0, 10000.0]), tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.2)


def tiny_llama(config: dict, seed: int):
    """A ``LlamaForCausalLM`` with seeded random weights (in eval mode), built here."""
    import transformers

    transformers.logging.set_verbosity_error()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return model.eval()


def construct_llama(config: dict, state_dict: dict) -> Construct:
    """The same model, built on the student's side from its config and weights."""
    return Construct("transformers.LlamaForCausalLM", None, method="from_pretrained",
                     config=Construct("transformers.LlamaConfig", **config), state_dict=state_dict)


def _state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----- typical_logits -----------------------------------------------------------------------


def _typical_margin(logits: torch.Tensor, mass: float) -> float:
    """How far ``mass`` is from every cumulative sum of the typical order (float64): a check only
    uses masses at least 1e-4 away, where float32 rounding cannot decide the kept set."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    ent = -(logp.exp() * logp).nansum(-1, keepdim=True)
    order = (-logp - ent).abs().sort(dim=-1).indices
    cum = logp.exp().gather(-1, order).cumsum(-1)
    return float((cum - mass).abs().min())


@one_thread
def check_typical_logits(fn: Callable) -> None:
    """``fn(logits [B, V], mass, min_tokens_to_keep)`` equals ``transformers.TypicalLogitsWarper``."""
    from transformers import TypicalLogitsWarper

    rng, g = fresh_rng(), fresh_generator()
    cases = [(torch.tensor([[2.0, 1.0, 0.0, -1.0, -4.0]]), 0.5, 1),
             (torch.tensor([[8.0, 1.0, 0.5, 0.0, -0.5, -1.0]]), 0.3, 4)]  # min_tokens_to_keep decides
    while len(cases) < 24:
        batch, vocab = rng.randrange(1, 5), rng.choice([2, 3, 7, rng.randrange(8, 60), rng.randrange(100, 400)])
        keep = 1 if rng.random() < 0.7 else rng.randrange(2, 6)
        if keep == 1 and rng.random() < 0.3:
            logits = torch.randint(-3, 4, (batch, vocab), generator=g).float()      # ties everywhere
        else:
            logits = torch.randn(batch, vocab, generator=g) * rng.choice([0.5, 1.0, 3.0, 6.0]) + rng.uniform(-3, 3)
        mass = rng.choice([0.2, 0.5, 0.8, 0.9, 0.95, rng.uniform(0.05, 0.99)])
        if _typical_margin(logits, mass) > 1e-4:
            cases.append((logits, mass, keep))
    for logits, mass, keep in cases:
        what = f"typical_logits(logits of shape {tuple(logits.shape)}, mass={mass:.3g}, min_tokens_to_keep={keep})"
        got = as_tensor(call(fn, logits.clone(), mass, keep), what)
        expected = TypicalLogitsWarper(mass=mass, min_tokens_to_keep=keep)(None, logits.clone())
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)} and dtype {expected.dtype} "
                                 f"(those of the logits), got {tuple(got.shape)} {got.dtype}")
        kept, kept_ref = got != float("-inf"), expected != float("-inf")
        assert_equal(kept, kept_ref, f"{what}: the kept set (True where the logit is not -inf)",
                     "Rank tokens by |-log p - H| (H the entropy of the row, in nats), keep the smallest prefix of "
                     "that order whose probabilities add up to at least `mass` (plus every token tied with its last "
                     "score), and never fewer than min_tokens_to_keep.")
        assert_equal(got[kept_ref], logits[kept_ref], f"{what}: the kept logits",
                     "kept entries keep their original value; only removed ones become -inf")


# ----- no_repeat_ngram_logits ---------------------------------------------------------------


@one_thread
def check_no_repeat_ngram_logits(fn: Callable) -> None:
    """``fn(logits [B, V], input_ids [B, T], n)`` equals ``transformers.NoRepeatNGramLogitsProcessor``."""
    from transformers import NoRepeatNGramLogitsProcessor

    rng, g = fresh_rng(), fresh_generator()
    cases = [(torch.randn(1, 6, generator=g), torch.tensor([[1, 2, 3, 1, 2]]), 3),
             (torch.randn(2, 5, generator=g), torch.tensor([[4, 4, 4], [0, 1, 2]]), 1),
             (torch.randn(1, 9, generator=g), torch.tensor([[3, 5]]), 3)]
    for _ in range(30):
        batch, vocab = rng.randrange(1, 5), rng.choice([3, 5, rng.randrange(6, 40)])
        n = rng.choice([1, 2, 2, 3, 3, 4])
        length = rng.choice([1, n - 1 if n > 1 else 1, rng.randrange(n, 4 * n + 8), rng.randrange(10, 40)])
        alphabet = rng.choice([2, 3, vocab])                    # a small alphabet makes n-grams repeat
        ids = torch.randint(0, min(alphabet, vocab), (batch, length), generator=g)
        cases.append((torch.randn(batch, vocab, generator=g) * 3, ids, n))
    for logits, ids, n in cases:
        what = (f"no_repeat_ngram_logits(logits {tuple(logits.shape)}, input_ids "
                f"{ids.tolist() if ids.numel() <= 24 else tuple(ids.shape)}, ngram_size={n})")
        got = as_tensor(call(fn, logits.clone(), ids.clone(), n), what)
        expected = NoRepeatNGramLogitsProcessor(n)(ids.clone(), logits.clone())
        assert_equal(got != float("-inf"), expected != float("-inf"), f"{what}: the allowed tokens (True where not -inf)",
                     "Ban token v in row b exactly when the last n - 1 tokens of the row followed by v form an n-gram "
                     "that already occurs in the row (n = 1: every token of the row; fewer than n - 1 tokens: nothing).")
        assert_equal(got[expected != float("-inf")], logits[expected != float("-inf")], f"{what}: the allowed logits",
                     "allowed tokens keep their logit unchanged")


# ----- greedy_decode_with_cache -------------------------------------------------------------


def _left_padded(rng, g, vocab: int, batch: int, pad: int, same_prompt: bool = False):
    """Prompts right-aligned after ``pad`` columns; ``same_prompt``: every row the same prompt (all
    rows then end at the same step), behind 0-2 columns of padding."""
    lengths = [rng.randrange(1, 9) for _ in range(batch)]
    width = max(lengths)
    if same_prompt:
        lengths = [lengths[0]] * batch
        width = lengths[0] + rng.randrange(0, 3)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    prompt = torch.randint(0, vocab, (width,), generator=g)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = prompt[:n] if same_prompt else torch.randint(0, vocab, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


def _generate(model, ids, mask, max_new_tokens, eos, pad) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad)


@one_thread
def check_greedy_decode_with_cache(fn: Callable) -> None:
    """``fn(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)`` returns
    ``(sequences, cache)``: ``sequences`` equal to ``model.generate(do_sample=False)`` on a
    left-padded batch, ``cache`` holding every position but the last."""
    rng, g = fresh_rng(), fresh_generator()
    config = tiny_llama_config(rng)
    model = tiny_llama(config, rng.randrange(2**31))
    weights = _state_dict(model)
    vocab = config["vocab_size"]
    # (batch, max_new_tokens, eos mode, same prompt in every row): "none" = no end token; "row0" = the
    # token row 0 produces at step 2-4 ends row 0 (and maybe others); "all" = every row ends early.
    plans = [(1, rng.randrange(5, 10), "none", False), (rng.randrange(3, 5), rng.randrange(8, 13), "row0", False),
             (rng.choice([2, 3]), rng.randrange(8, 13), "all", True), (rng.randrange(2, 4), 1, "row0", False)]
    for batch, max_new, mode, same in plans:
        pad = rng.randrange(vocab)
        ids, mask = _left_padded(rng, g, vocab, batch, pad, same)
        eos = None
        if mode != "none":
            step = min(rng.randrange(2, 5), max_new - 1)
            free = _generate(model, ids, mask, step + 1, None, pad)
            eos = int(free[0, ids.shape[1] + step])
        expected = _generate(model, ids, mask, max_new, eos, pad)
        what = (f"greedy_decode_with_cache(batch of {batch} prompts of lengths {mask.sum(1).tolist()} left-padded to "
                f"{ids.shape[1]}, max_new_tokens={max_new}, eos_token_id={eos}, pad_token_id={pad})")
        result = call(fn, construct_llama(config, weights), ids.clone(), mask.clone(), max_new, eos, pad)
        if not isinstance(result, tuple) or len(result) != 2:
            raise AssertionError(f"{what}: expected a tuple (sequences, cache), got {type(result).__name__}")
        sequences, cache = result
        assert_equal(sequences, expected, f"{what}: sequences",
                     "Compare with model.generate(input_ids, attention_mask=..., do_sample=False, ...): the prompt "
                     "columns unchanged, then one column per step; a row that produced eos_token_id gets "
                     "pad_token_id afterwards, and the loop stops when every row has ended.")
        length = cache.get_seq_length()
        if length != expected.shape[1] - 1:
            raise AssertionError(f"{what}: the returned cache holds {length} positions; a KV-cache loop runs the prompt "
                                 f"once and then only each new token, so it ends holding every position but the last "
                                 f"generated one ({expected.shape[1] - 1}).")


# ----- speculative_greedy_decode ------------------------------------------------------------


class _Counted:
    """A grader-side model as the student's code sees it: ids [1, L] -> logits [1, L, V] (float64),
    counting forward passes."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, ids: Any) -> torch.Tensor:
        ids = as_tensor(ids, "the ids passed to the model")
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.dtype != torch.long or ids.shape[1] == 0:
            raise AssertionError(f"the models take token ids of shape [1, L] and dtype torch.long, got "
                                 f"{tuple(ids.shape)} {ids.dtype}")
        self.calls += 1
        with torch.no_grad():
            return self.model(ids).logits


def _greedy(model: _Counted, ids: torch.Tensor, max_new: int, eos: int | None) -> torch.Tensor:
    for _ in range(max_new):
        token = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if eos is not None and int(token) == eos:
            break
    return ids


def _speculative_calls(target: _Counted, draft: _Counted, ids: torch.Tensor, max_new: int, k: int,
                       eos: int | None) -> int:
    """The number of target passes of the algorithm the exercise describes."""
    start = ids.shape[1]
    while ids.shape[1] - start < max_new:
        room = max_new - (ids.shape[1] - start)
        proposal = ids
        for _ in range(min(k, room - 1)):
            proposal = torch.cat([proposal, draft(proposal)[:, -1].argmax(-1, keepdim=True)], dim=1)
        drafted = proposal[0, ids.shape[1]:]
        verify = target(proposal)[0, ids.shape[1] - 1:].argmax(-1)
        n = 0
        while n < len(drafted) and drafted[n] == verify[n]:
            n += 1
        new = torch.cat([drafted[:n], verify[n:n + 1]])
        if eos is not None and (new == eos).any():
            new = new[: int((new == eos).nonzero()[0]) + 1]
            ids = torch.cat([ids, new[None]], dim=1)
            break
        ids = torch.cat([ids, new[None]], dim=1)
    return target.calls


def _spec_models(seed: int, vocab: int, noise: float):
    import random

    rng = random.Random(seed)
    config = tiny_llama_config(rng, vocab)
    target = tiny_llama(config, seed).double()
    draft = tiny_llama(config, seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise * p.std().clamp_min(1e-3))
    return target, draft


@one_thread
def check_speculative_greedy_decode(fn: Callable) -> None:
    """``fn(target, draft, input_ids [1, T], max_new_tokens, num_draft_tokens, eos_token_id)``
    returns the target's greedy tokens, with no more target passes than the algorithm needs."""
    rng, g = fresh_rng(), fresh_generator()
    plans = [(rng.choice([0.0, 0.05]), rng.randrange(2, 5), None), (rng.choice([0.2, 0.4]), rng.randrange(2, 5), None),
             (0.1, 1, None), (rng.choice([0.0, 0.1]), rng.randrange(2, 6), "eos")]
    for noise, k, eos_mode in plans:
        seed = rng.randrange(2**31)
        vocab = rng.randrange(40, 120)
        target_model, draft_model = _spec_models(seed, vocab, noise)
        ids = torch.randint(0, vocab, (1, rng.randrange(1, 8)), generator=g)
        max_new = rng.randrange(8, 20)
        eos = None
        if eos_mode:
            step = rng.randrange(1, max_new - 1)
            free = _greedy(_Counted(target_model), ids, step + 1, None)
            eos = int(free[0, ids.shape[1] + step])
        expected = _greedy(_Counted(target_model), ids, max_new, eos)
        budget = _speculative_calls(_Counted(target_model), _Counted(draft_model), ids, max_new, k, eos)
        target, draft = _Counted(target_model), _Counted(draft_model)
        what = (f"speculative_greedy_decode(prompt of {ids.shape[1]} tokens, max_new_tokens={max_new}, "
                f"num_draft_tokens={k}, eos_token_id={eos}; a draft model that agrees "
                f"{'always' if noise == 0 else 'often' if noise < 0.3 else 'less often'})")
        got = call(fn, Callback(target), Callback(draft), ids.clone(), max_new, k, eos)
        assert_equal(got, expected, f"{what}: the tokens",
                     "The output must be exactly the target model's greedy tokens: accept the drafted tokens up to "
                     "the first one the target disagrees with, then add the target's own token at that position; "
                     "stop after eos_token_id and after max_new_tokens new tokens.")
        if target.calls > budget:
            raise AssertionError(
                f"{what}: the target model ran {target.calls} forward passes; the algorithm needs at most {budget} "
                "here. Verify all drafted tokens with ONE target pass over the prompt plus the draft, and when "
                "every drafted token is accepted keep the target's extra token from that same pass.")


CHECKS = {
    "typical_logits": check_typical_logits,
    "no_repeat_ngram_logits": check_no_repeat_ngram_logits,
    "greedy_decode_with_cache": check_greedy_decode_with_cache,
    "speculative_greedy_decode": check_speculative_greedy_decode,
}

FORBIDDEN = {
    "typical_logits": ["transformers"],
    "no_repeat_ngram_logits": ["transformers"],
    "greedy_decode_with_cache": ["transformers.GenerationMixin.generate", "transformers.generation"],
    "speculative_greedy_decode": ["transformers"],
}
