"""generate and beam_search against Hugging Face ``generate`` on a tiny random Llama, token for token.

The reference is a seeded ``transformers.LlamaForCausalLM`` (eager attention) whose weights are
loaded into our ``Llama`` (from-scratch attention: the same operations in the same order, so
logits agree to the last bit and argmax / top-k choices cannot flip on rounding). Weights are
drawn with std 0.3 instead of 0.02 so that the next-token distributions are peaked enough for
the comparisons to be meaningful (with std 0.02 a random model repeats one token forever).
"""

import warnings

import pytest
import torch
import transformers

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.generation import beam_search, generate
from llama_from_scratch.model import Llama

VOCAB = 128
PAD = 0


def _models(seed: int = 0, std: float = 0.3):
    torch.manual_seed(seed)
    config = LlamaConfig.tiny(vocab_size=VOCAB, max_seq_len=64)
    hf_config = transformers.LlamaConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in ref.parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
    # A fresh HF Llama ends sequences on token 2 by default: switch that off (tests pass EOS explicitly).
    ref.generation_config.eos_token_id = None
    ref.generation_config.bos_token_id = None
    ref.generation_config.pad_token_id = None
    ours = Llama(config).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_use_sdpa(False)
    return ours, ref


@pytest.fixture(scope="module")
def models():
    transformers.logging.set_verbosity_error()
    return _models()


def hf_generate(ref, ids, mask=None, **kwargs):
    # Always pass the mask (see REFERENCES.md: pad == eos would otherwise mask real tokens).
    mask = torch.ones_like(ids) if mask is None else mask
    kwargs.setdefault("do_sample", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(ids, attention_mask=mask, **kwargs)


def left_pad(seqs):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    return ids, mask


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


# --------------------------------------------------------------------------------------------
# greedy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len,max_new", [(1, 8), (5, 1), (7, 20), (12, 10)])
def test_greedy_equals_hf(models, prompt_len, max_new):
    ours, ref = models
    ids = torch.stack(prompts(prompt_len, prompt_len, seed=prompt_len))
    expected = hf_generate(ref, ids, max_new_tokens=max_new)
    for use_cache in (True, False):
        got = generate(ours, ids, max_new, temperature=0, use_cache=use_cache)
        assert got.dtype == torch.long and got.shape == (2, prompt_len + max_new)
        assert torch.equal(got, expected), use_cache


def test_use_cache_true_equals_false_with_sdpa_and_padding():
    ours, _ = _models(seed=3)
    ours.set_use_sdpa(True)  # the fast path this time
    ids, mask = left_pad(prompts(6, 2, 4, seed=3))
    with_cache = generate(ours, ids, 15, temperature=0, attention_mask=mask, use_cache=True)
    without = generate(ours, ids, 15, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(with_cache, without)


def test_left_padded_batch_equals_each_prompt_alone_and_hf(models):
    ours, ref = models
    seqs = prompts(7, 3, 5, 1, seed=4)
    ids, mask = left_pad(seqs)
    T = ids.shape[1]
    got = generate(ours, ids, 10, temperature=0, attention_mask=mask)
    assert torch.equal(got[:, :T], ids)
    for b, s in enumerate(seqs):
        alone = generate(ours, s[None], 10, temperature=0)
        assert torch.equal(got[b, T:], alone[0, len(s):]), b
    expected = hf_generate(ref, ids, mask, max_new_tokens=10, pad_token_id=PAD)
    assert torch.equal(got, expected)
    # a mask of all ones is the same as no mask
    full = torch.stack(prompts(4, 4, seed=5))
    assert torch.equal(generate(ours, full, 5, temperature=0, attention_mask=torch.ones_like(full)),
                       generate(ours, full, 5, temperature=0))


def test_repetition_penalty_greedy_equals_hf(models):
    ours, ref = models
    ids = torch.stack(prompts(6, 6, seed=6))
    for penalty in (1.5, 0.8):
        expected = hf_generate(ref, ids, max_new_tokens=15, repetition_penalty=penalty)
        got = generate(ours, ids, 15, temperature=0, repetition_penalty=penalty)
        assert torch.equal(got, expected), penalty
    assert not torch.equal(generate(ours, ids, 15, temperature=0, repetition_penalty=1.5),
                           generate(ours, ids, 15, temperature=0))


def test_repetition_penalty_ignores_left_padding(models):
    ours, _ = models
    seqs = prompts(6, 2, seed=7)
    ids, mask = left_pad(seqs)
    got = generate(ours, ids, 8, temperature=0, attention_mask=mask, repetition_penalty=1.8)
    for b, s in enumerate(seqs):
        alone = generate(ours, s[None], 8, temperature=0, repetition_penalty=1.8)
        assert torch.equal(got[b, ids.shape[1]:], alone[0, len(s):])


# --------------------------------------------------------------------------------------------
# EOS
# --------------------------------------------------------------------------------------------


def test_eos_stops_each_sequence_and_matches_hf(models):
    ours, ref = models
    ids, mask = left_pad(prompts(5, 8, 3, seed=8))
    T = ids.shape[1]
    free = generate(ours, ids, 12, temperature=0, attention_mask=mask)
    eos = int(free[0, T + 2])  # row 0 emits it at step 3
    first = [int((free[b, T:] == eos).nonzero()[0]) if (free[b, T:] == eos).any() else None for b in range(3)]
    assert first[0] == 2 and any(f != 2 for f in first)  # the rows do not all stop together

    pad = 1
    got = generate(ours, ids, 12, temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=pad)
    for b, f in enumerate(first):
        if f is None:
            assert torch.equal(got[b], free[b, : got.shape[1]])
        else:
            assert torch.equal(got[b, : T + f + 1], free[b, : T + f + 1])  # EOS kept
            assert (got[b, T + f + 1:] == pad).all()
    expected = hf_generate(ref, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(got, expected)

    # pad defaults to EOS; a list of EOS ids works; once every row is done the loop stops early
    one = ids[:1]
    stopped = generate(ours, one, 12, temperature=0, eos_token_id=[VOCAB - 1, eos], attention_mask=mask[:1])
    assert stopped.shape == (1, T + 3) and int(stopped[0, -1]) == eos
    default_pad = generate(ours, ids, 12, temperature=0, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(default_pad, torch.where(got == pad, eos, got))


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def test_sampling_reproducible_and_top_k_1_is_greedy(models):
    ours, _ = models
    ids = torch.stack(prompts(5, 5, seed=9))

    def draw(seed, temperature=1.0, **kw):
        return generate(ours, ids, 15, temperature=temperature, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(0, top_k=1), generate(ours, ids, 15, temperature=0))
    assert torch.equal(draw(0, temperature=1e-4), generate(ours, ids, 15, temperature=0))


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
])
def test_sampling_equals_hf_with_same_seed(models, settings):
    """Same global seed, same filters, same order -> the same torch.multinomial draws as HF."""
    ours, ref = models
    ids = torch.stack(prompts(6, 6, seed=10))
    hf_settings = dict(top_k=None, top_p=None, min_p=None)  # HF's own defaults off
    hf_settings.update(settings)
    torch.manual_seed(123)
    expected = hf_generate(ref, ids, max_new_tokens=12, do_sample=True, **hf_settings)
    torch.manual_seed(123)
    got = generate(ours, ids, 12, **settings)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------
# streaming, modes, dtypes
# --------------------------------------------------------------------------------------------


def test_stream_callback_and_model_state(models):
    ours, _ = models
    ids = torch.stack(prompts(4, 4, seed=11))
    seen = []
    ours.train()
    out = generate(ours, ids, 6, temperature=0, stream=lambda t: seen.append(t.clone()))
    assert ours.training  # state restored
    ours.eval()
    assert torch.equal(torch.stack(seen, dim=1), out[:, 4:])
    assert not torch.is_inference(out)  # usable in a later forward pass with gradients
    assert torch.equal(generate(ours, ids, 0), ids)  # max_new_tokens=0: the input unchanged


def test_bfloat16_weights():
    ours, _ = _models(seed=12)
    ours.set_use_sdpa(True)
    ours = ours.to(torch.bfloat16)
    ids, mask = left_pad(prompts(5, 3, seed=12))
    out = generate(ours, ids, 6, temperature=0, attention_mask=mask)
    assert out.shape == (2, 11) and out.dtype == torch.long
    with torch.no_grad():
        first = ours(ids, attention_mask=mask)[:, -1].float().argmax(-1)
    assert torch.equal(out[:, 5], first)
    sampled = generate(ours, ids, 6, temperature=0.9, top_p=0.9, attention_mask=mask,
                       generator=torch.Generator().manual_seed(0))
    assert ((sampled >= 0) & (sampled < VOCAB)).all()


# --------------------------------------------------------------------------------------------
# beam search
# --------------------------------------------------------------------------------------------


# The EOS ids are emitted by some beams of this prompt, so finished hypotheses of different
# lengths compete and the length penalty decides (lp 0 and -1 pick a short EOS-ended one);
# with early_stopping=True and eos [4, 46] the search stops after 8 tokens.
BEAM_CASES = [
    dict(num_beams=2, length_penalty=1.0, eos=None, early_stopping=False),
    dict(num_beams=3, length_penalty=1.0, eos=97, early_stopping=False),
    dict(num_beams=3, length_penalty=0.0, eos=97, early_stopping=False),
    dict(num_beams=3, length_penalty=-1.0, eos=106, early_stopping=False),
    dict(num_beams=4, length_penalty=2.0, eos=97, early_stopping=False),
    dict(num_beams=4, length_penalty=1.0, eos=[4, 46], early_stopping=True),
    dict(num_beams=2, length_penalty=0.5, eos=97, early_stopping="never"),
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_beam_search_equals_hf(models, case):
    ours, ref = models
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 7))
    k, lp, eos, es = case.values()
    expected = hf_generate(ref, ids, max_new_tokens=12, num_beams=k, length_penalty=lp, eos_token_id=eos,
                           pad_token_id=1, early_stopping=es)
    got = beam_search(ours, ids, k, 12, length_penalty=lp, eos_token_id=eos, pad_token_id=1, early_stopping=es)
    assert torch.equal(got, expected)


def test_beam_search_short_result_with_length_penalty_0(models):
    ours, _ = models
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 7))
    got = beam_search(ours, ids, 3, 12, length_penalty=0.0, eos_token_id=97)
    assert got.shape[1] < 7 + 12 and int(got[0, -1]) == 97


# (length_penalty, eos) for which the two prompts' best hypotheses end at different lengths
# (found by trying EOS ids on this seeded model): the shorter row is filled with the pad id.
@pytest.mark.parametrize("lp,eos", [(1.0, 38), (0.0, 91)])
def test_beam_search_batched_left_padded_equals_hf_and_cache_free(models, lp, eos):
    ours, ref = models
    seqs = prompts(7, 4, seed=13)
    ids, mask = left_pad(seqs)
    T = ids.shape[1]
    expected = hf_generate(ref, ids, mask, max_new_tokens=10, num_beams=3, eos_token_id=eos, pad_token_id=1,
                           length_penalty=lp)
    got = beam_search(ours, ids, 3, 10, lp, eos, pad_token_id=1, attention_mask=mask)
    assert torch.equal(got, expected)
    assert (got[1, T:] == 1).any()  # the scenario: row 1 ended early and was padded
    assert torch.equal(beam_search(ours, ids, 3, 10, lp, eos, pad_token_id=1, attention_mask=mask,
                                   use_cache=False), got)
    # each prompt alone gives its row (up to the padding of the shorter result)
    for b, s in enumerate(seqs):
        alone = beam_search(ours, s[None], 3, 10, lp, eos, pad_token_id=1)
        n = alone.shape[1] - len(s)
        assert torch.equal(got[b, T:T + n], alone[0, len(s):])
        assert (got[b, T + n:] == 1).all()


def test_beam_search_one_beam_is_greedy(models):
    ours, _ = models
    ids = torch.stack(prompts(5, 5, seed=14))
    assert torch.equal(beam_search(ours, ids, 1, 10), generate(ours, ids, 10, temperature=0))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_errors(models):
    ours, _ = models
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(ours, ids, -1)
    with pytest.raises(ValueError, match="top-p"):
        generate(ours, ids, 3, top_p=1.5)
    with pytest.raises(ValueError, match="top-p"):
        generate(ours, ids, 3, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(ours, ids, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(ours, ids, 3, repetition_penalty=0)
    with pytest.raises(ValueError, match=r"prompt length 3 \+ max_new_tokens 62 .* max_seq_len 64"):
        generate(ours, ids, 62)
    with pytest.raises(ValueError, match="2-D"):
        generate(ours, ids[0], 3)
    with pytest.raises(TypeError, match="integer"):
        generate(ours, ids.float(), 3)
    with pytest.raises(ValueError, match="shape of input_ids"):
        generate(ours, ids, 3, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):
        generate(ours, ids, 3, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="all padding"):
        generate(ours, ids, 3, attention_mask=torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(ours, ids, 3, eos_token_id="</s>")
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(ours, ids, 0, 3)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        beam_search(ours, ids, 2, 100)
    with pytest.raises(ValueError, match="pad prompts on the LEFT"):
        beam_search(ours, ids, 2, 3, attention_mask=torch.tensor([[1, 0, 1]]))
    assert torch.equal(beam_search(ours, ids, 2, 0), ids)
