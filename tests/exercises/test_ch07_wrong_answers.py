"""Chapter 7's checks fail on the stub and on plausible wrong answers, and pass on the solution and
on correct answers written differently."""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.course.checks.ch07_decoding import CHECKS

from answers import fails_on, solution, stub_and_solution_test

SOLUTIONS = solution("ch07_decoding")
fails = fails_on(CHECKS)
test_stub_fails_and_solution_passes = stub_and_solution_test(CHECKS, SOLUTIONS)


# ----- typical_logits -------------------------------------------------------------------------


def _typical(logits, mass, keep=1, *, descending=False, log=torch.log, off_by_one=False, use_keep=True,
             by_probability=False):
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    if log is not torch.log:                          # entropy in another base
        entropy = -(probs * log(probs)).nansum(-1, keepdim=True)
    else:
        entropy = -(probs * logp).nansum(-1, keepdim=True)
    gap = -probs if by_probability else (-logp - entropy).abs()
    sorted_gap, order = torch.sort(gap, dim=-1, descending=descending)
    cumulative = probs.gather(-1, order).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True) - (1 if off_by_one else 0)
    last = last.clamp(0, logits.shape[-1] - 1)
    remove = (sorted_gap < sorted_gap.gather(-1, last)) if descending else (sorted_gap > sorted_gap.gather(-1, last))
    if use_keep:
        remove[..., :keep] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


@pytest.mark.parametrize("wrong", [
    lambda l, m, k=1: _typical(l, m, k, descending=True),            # least typical first
    lambda l, m, k=1: _typical(l, m, k, log=torch.log2),              # entropy in bits against nats
    lambda l, m, k=1: _typical(l, m, k, off_by_one=True),             # stops one token before the mass
    lambda l, m, k=1: _typical(l, m, k, use_keep=False),              # ignores min_tokens_to_keep
    lambda l, m, k=1: _typical(l, m, k, by_probability=True),         # top-p, not typical
], ids=["descending", "entropy-in-bits", "off-by-one", "no-min-tokens", "top-p"])
def test_typical_wrong(wrong):
    assert fails("typical_logits", wrong)


def test_typical_row_by_row_in_float64_passes():
    def rows(logits, mass, keep=1):
        out = torch.full_like(logits, float("-inf"))
        for b, row in enumerate(logits.double()):
            p = row.softmax(-1)
            h = -(p * p.log()).nansum()
            order = sorted(range(len(row)), key=lambda v: abs(-p[v].log().item() - h.item()))
            total, kept = 0.0, []
            for v in order:
                if total >= mass and len(kept) >= keep and abs(-p[v].log() - h) > abs(-p[kept[-1]].log() - h):
                    break
                kept.append(v)
                total += p[v].item()
            out[b, kept] = logits[b, kept]
        return out

    assert CHECKS["typical_logits"](rows) is None  # a check returns None on a right answer and raises otherwise


# ----- no_repeat_ngram_logits -------------------------------------------------------------------


def _ngram(logits, ids, n, *, prefix_len=None, first_row_only=False, skip_unigram=False, all_seen=False):
    out = logits.clone()
    for b in range(ids.shape[0]):
        row = ids[0 if first_row_only else b].tolist()
        if all_seen:
            out[b, row] = float("-inf")
            continue
        if skip_unigram and n == 1:
            continue
        k = n - 1 if prefix_len is None else prefix_len
        prefix = row[len(row) - k:] if k > 0 else []
        for i in range(len(row) - n + 1):
            if row[i:i + k] == prefix and i + k < len(row):
                out[b, row[i + k]] = float("-inf")
    return out


@pytest.mark.parametrize("wrong", [
    lambda l, i, n: _ngram(l, i, n, prefix_len=n),          # matches n tokens instead of n - 1
    lambda l, i, n: _ngram(l, i, n, first_row_only=True),   # the n-grams of row 0 for every row
    lambda l, i, n: _ngram(l, i, n, skip_unigram=True),     # n = 1 bans nothing
    lambda l, i, n: _ngram(l, i, n, all_seen=True),         # bans every token seen
], ids=["prefix-n", "first-row", "no-unigram", "all-seen"])
def test_no_repeat_ngram_wrong(wrong):
    assert fails("no_repeat_ngram_logits", wrong)


def test_no_repeat_ngram_vectorised_passes():
    def vectorised(logits, ids, n):
        if ids.shape[1] < n:
            return logits.clone()
        windows = ids.unfold(1, n, 1)                                   # [B, W, n]
        prefix = ids[:, ids.shape[1] - n + 1:]                          # [B, n - 1]
        match = (windows[..., :-1] == prefix[:, None]).all(-1)          # [B, W]
        banned = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool)
        banned.scatter_(1, torch.where(match, windows[..., -1], logits.shape[1]), True)
        return logits.masked_fill(banned[:, :-1], float("-inf"))

    assert CHECKS["no_repeat_ngram_logits"](vectorised) is None  # a check returns None on a right answer and raises otherwise


# ----- greedy_decode_with_cache ---------------------------------------------------------------


@torch.no_grad()
def _decode(model, ids, mask, max_new, eos, pad, *, use_mask=True, pad_finished=True, stop_at_first=False,
            steps_off=0, grow_mask=True, stop_when_done=True, extra_pass=False):
    sequences, m = ids, mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    cache, new = None, ids
    for _ in range(max_new - steps_off):
        pos = (m.cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1]:]
        out = model(input_ids=new, attention_mask=m if use_mask else None, position_ids=pos, cache=cache,
                    use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1)
        if eos is not None:
            if pad_finished:
                token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= token == eos
        sequences = torch.cat([sequences, token[:, None]], 1)
        if grow_mask:
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
        new = token[:, None]
        if stop_at_first and finished.any():
            break
        if stop_when_done and finished.all():
            break
    if extra_pass:
        cache = model(input_ids=new, attention_mask=m, cache=cache, use_cache=True).cache
    return sequences, cache


@pytest.mark.parametrize("options", [
    dict(use_mask=False),            # attends to the left padding
    dict(pad_finished=False),        # finished rows keep generating
    dict(stop_at_first=True),        # the whole batch stops at the first end token
    dict(steps_off=1),               # one step short
    dict(grow_mask=False),           # the mask does not grow with the generated tokens
    dict(stop_when_done=False),      # pads on after every row has ended
    dict(extra_pass=True),           # runs the model once more after the last token
], ids=lambda o: next(iter(o)))
def test_greedy_decode_wrong(options):
    assert fails("greedy_decode_with_cache", lambda *a: _decode(*a, **options))


def test_greedy_decode_with_a_prebuilt_cache_and_a_separate_prefill_passes():
    import transformers

    @torch.no_grad()
    def prefill_first(model, ids, mask, max_new, eos, pad):
        cache = transformers.DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    cache=cache, use_cache=True)
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        columns = []
        for step in range(max_new):
            token = out.logits[:, -1].argmax(-1)
            if eos is not None:
                token[done] = pad
                done = done | (token == eos)
            columns.append(token)
            mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
            if step == max_new - 1 or bool(done.all()):
                break
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        cache=out.cache, use_cache=True)
        return torch.cat([ids, torch.stack(columns, 1)], 1), out.cache

    assert CHECKS["greedy_decode_with_cache"](prefill_first) is None  # a check returns None on a right answer and raises otherwise


# ----- speculative_greedy_decode --------------------------------------------------------------


@torch.no_grad()
def _speculate(target, draft, ids, max_new, k, eos=None, *, bonus=True, trust_draft=False, shift=0, use_eos=True):
    start = ids.shape[1]
    while ids.shape[1] - start < max_new:
        proposal = ids
        for _ in range(min(k, max_new - (ids.shape[1] - start) - 1)):
            proposal = torch.cat([proposal, draft(proposal)[:, -1].argmax(-1, keepdim=True)], 1)
        drafted = proposal[0, ids.shape[1]:]
        choice = target(proposal)[0, ids.shape[1] - 1 + shift:].argmax(-1)
        if trust_draft and len(drafted):
            new = drafted
        else:
            n = 0
            while n < len(drafted) and n < len(choice) and drafted[n] == choice[n]:
                n += 1
            new = choice[: n + 1] if (bonus or n < len(drafted)) else drafted[:n]
            if len(new) == 0:
                return ids
        if use_eos and eos is not None and (new == eos).any():
            return torch.cat([ids, new[: int((new == eos).nonzero()[0]) + 1][None]], 1)
        ids = torch.cat([ids, new[None]], 1)
    return ids[:, : start + max_new]


def _plain_greedy(target, draft, ids, max_new, k, eos=None):
    for _ in range(max_new):
        token = target(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        if eos is not None and int(token) == eos:
            break
    return ids


@pytest.mark.parametrize("wrong", [
    lambda *a: _speculate(*a, bonus=False),         # drops the target's extra token when all drafts pass
    lambda *a: _speculate(*a, trust_draft=True),    # keeps the draft's tokens without checking them
    lambda *a: _speculate(*a, shift=1),             # reads the target's logits one position late
    lambda *a: _speculate(*a, use_eos=False),       # ignores the end token
    _plain_greedy,                                  # right tokens, one target pass per token
], ids=["no-bonus", "trust-draft", "shifted", "no-eos", "plain-greedy"])
def test_speculative_wrong(wrong):
    assert fails("speculative_greedy_decode", wrong)


def test_speculative_drafting_k_always_and_truncating_passes():
    @torch.no_grad()
    def always_k(target, draft, ids, max_new, k, eos=None):
        start = ids.shape[1]
        while ids.shape[1] - start < max_new:
            proposal = ids
            for _ in range(k):
                proposal = torch.cat([proposal, draft(proposal)[:, -1].argmax(-1, keepdim=True)], 1)
            choice = target(proposal)[0, ids.shape[1] - 1:].argmax(-1)
            agree = (proposal[0, ids.shape[1]:] == choice[:-1]).long().cumprod(0).sum()
            new = choice[: int(agree) + 1][: max_new - (ids.shape[1] - start)]
            hits = (new == eos).nonzero() if eos is not None else []
            if len(hits):
                return torch.cat([ids, new[: int(hits[0]) + 1][None]], 1)
            ids = torch.cat([ids, new[None]], 1)
        return ids

    assert CHECKS["speculative_greedy_decode"](always_k) is None  # a check returns None on a right answer and raises otherwise
