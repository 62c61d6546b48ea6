"""Document masks for packed sequences (chapter 8, :mod:`llama_from_scratch.packing`).

A packed block run with the document mask and RoPE positions restarting at every document must give
every document the logits and loss it has when run alone, and the logits of transformers'
``LlamaForCausalLM`` when it detects packed sequences from restarting ``position_ids`` (its mask is
built by ``transformers.masking_utils``, which we compare with ours entry by entry).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices

from llama_from_scratch.attention import causal_mask
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.data import pack_tokens
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama
from llama_from_scratch.packing import (
    document_attention_inputs,
    document_causal_mask,
    document_ids_from_eos,
    document_position_ids,
    pack_documents,
)
from llama_from_scratch.trainer import TrainConfig, Trainer

CONFIG = LlamaConfig.tiny(max_seq_len=64)  # vocab 256, GQA 4 query / 2 key-value heads, tied
EOS = CONFIG.vocab_size - 1
# Lengths (EOS excluded) chosen for the edge cases: documents of length 1 (a lone EOS after them
# makes a 2-token document), two EOS in a row, and a stream that cuts documents at block edges.
LENGTHS = [0, 3, 1, 0, 7, 2, 11, 1, 5, 20, 4, 1, 9]
BLOCK = 16


def documents(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(CONFIG).eval()


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return pack_tokens(documents(LENGTHS), BLOCK, EOS)


def segments(document_ids: torch.Tensor) -> list[slice]:
    """The runs of equal document ids in one row, as slices."""
    ids = document_ids.tolist()
    starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


# ----- the ingredients ---------------------------------------------------------------------------


def test_document_ids_and_positions_of_a_small_block():
    """Internal check (no library has these two functions): the example in the docstrings."""
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8]])
    doc = document_ids_from_eos(ids, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3]]        # the EOS ends its own document
    assert document_position_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    mask = document_causal_mask(doc)
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.bool
    for i in range(7):
        for j in range(7):
            assert bool(mask[0, 0, i, j]) == (j <= i and doc[0, i] == doc[0, j])


def test_mask_of_one_document_is_the_causal_mask():
    doc = torch.zeros(3, 9, dtype=torch.long)
    assert torch.equal(document_causal_mask(doc), causal_mask(9, 9).expand(3, 1, 9, 9))
    assert torch.equal(document_position_ids(doc), torch.arange(9).expand(3, 9))


def test_global_document_ids_give_the_same_mask_and_positions():
    """Only equality and order of the ids matter: ids 7, 7, 9, 9, 9 mean what 0, 0, 1, 1, 1 mean."""
    local = torch.tensor([[0, 0, 1, 1, 1, 2]])
    shifted = torch.tensor([[7, 7, 9, 9, 9, 40]])
    assert torch.equal(document_causal_mask(local), document_causal_mask(shifted))
    assert torch.equal(document_position_ids(local), document_position_ids(shifted))


@pytest.mark.parametrize("eos", [EOS, None])
def test_pack_documents_gives_pack_tokens_blocks_and_each_tokens_document(eos):
    docs = documents(LENGTHS)
    packed, doc_ids = pack_documents(docs, BLOCK, eos)
    assert torch.equal(packed, pack_tokens(docs, BLOCK, eos))
    assert doc_ids.shape == packed.shape and doc_ids.dtype == torch.long
    extra = 0 if eos is None else 1
    owner = [i for i, d in enumerate(docs) for _ in range(len(d) + extra)]
    stream = [t for d in docs for t in (d + ([eos] if eos is not None else []))]
    for n in range(packed.shape[0]):
        window = range(n * BLOCK, n * BLOCK + BLOCK + 1)
        assert packed[n].tolist() == [stream[k] for k in window]
        assert doc_ids[n].tolist() == [owner[k] for k in window]
    if eos is not None:  # with separators, the ids of the inputs are what the EOS tokens tell
        x_ids = doc_ids[:, :-1]
        assert torch.equal(x_ids - x_ids[:, :1], document_ids_from_eos(packed[:, :-1], EOS))


# ----- a packed block == every document alone ---------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "from-scratch"])
def test_packed_logits_and_loss_equal_each_document_alone(model, blocks, use_sdpa):
    model.set_use_sdpa(use_sdpa)
    try:
        x, y = blocks[:, :-1], blocks[:, 1:]
        mask, positions = document_attention_inputs(x, EOS)
        doc = document_ids_from_eos(x, EOS)
        with torch.no_grad():
            packed = model(x, attention_mask=mask, position_ids=positions)
            packed_loss = model(x, attention_mask=mask, position_ids=positions, targets=y)
            plain = model(x)
            token_losses, lengths_seen = [], set()
            for b in range(x.shape[0]):
                for seg in segments(doc[b]):
                    alone = model(x[b : b + 1, seg])       # positions 0.., plain causal mask
                    lengths_seen.add(seg.stop - seg.start)
                    # fp32: the masked keys add exact zeros, only the summation order differs (max 2.4e-7)
                    torch.testing.assert_close(packed[b : b + 1, seg], alone, rtol=0, atol=1e-6)
                    token_losses.append(torch.nn.functional.cross_entropy(alone[0], y[b, seg], reduction="none"))
        assert 1 in lengths_seen and max(lengths_seen) >= BLOCK // 2  # lone tokens and long runs both occur
        # cut at a block edge: a row whose first token continues the document of the previous row
        assert any(blocks[b - 1, -2] != EOS for b in range(1, blocks.shape[0]))
        torch.testing.assert_close(packed_loss, torch.cat(token_losses).mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(packed_loss, cross_entropy(packed, y), rtol=1e-6, atol=0)
        # and the plain causal mask does differ: the documents after the first see the earlier ones
        first = segments(doc[0])[0]
        torch.testing.assert_close(plain[0, first], packed[0, first], rtol=0, atol=1e-6)
        assert (plain - packed).abs().max() > 1e-2
    finally:
        model.set_use_sdpa(True)


def test_single_document_block_equals_the_plain_model(model):
    x = torch.randint(0, EOS, (2, 24))
    mask, positions = document_attention_inputs(x, EOS)
    assert torch.equal(mask, causal_mask(24, 24).expand(2, 1, 24, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask, position_ids=positions), model(x), rtol=0, atol=1e-6)


def test_gradients_of_a_packed_block_equal_the_sum_over_documents():
    torch.manual_seed(1)
    net = Llama(LlamaConfig.tiny(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=32))
    eos = 63
    x = torch.tensor([[3, 4, eos, 9, 9, 9, 1, eos, eos, 5, 6, 7]])
    y = torch.randint(0, 64, x.shape)
    mask, positions = document_attention_inputs(x, eos)
    net(x, attention_mask=mask, position_ids=positions, targets=y).backward()
    packed = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for seg in segments(document_ids_from_eos(x, eos)[0]):
        logits = net(x[:, seg])
        (torch.nn.functional.cross_entropy(logits[0], y[0, seg], reduction="sum") / x.numel()).backward()
    for g_packed, p in zip(packed, net.parameters()):
        torch.testing.assert_close(g_packed, p.grad, rtol=1e-5, atol=1e-7)


# ----- transformers' packed sequences -----------------------------------------------------------


def hf_twin(model: Llama, attn: str) -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(**model.config.to_hf())
    hf_config._attn_implementation = attn
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    ref.load_state_dict(model.state_dict())
    return ref


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_transformers_packed_sequences(model, blocks, attn):
    """transformers finds packed sequences from position_ids that restart (masking_utils'
    find_packed_sequence_indices) when no attention_mask and no cache are given: so use_cache=False
    (with the cache its default builds, it silently falls back to the plain causal mask)."""
    ref = hf_twin(model, attn)
    x = blocks[:, :-1]
    mask, positions = document_attention_inputs(x, EOS)
    with torch.no_grad():
        ours = model(x, attention_mask=mask, position_ids=positions)
        theirs = ref(input_ids=x, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # measured: sdpa 0, eager 2.4e-7
        with_cache = ref(input_ids=x, position_ids=positions).logits   # use_cache defaults to True
    assert (with_cache - ours).abs().max() > 1e-2


def test_mask_and_document_ids_equal_transformers_own(model, blocks):
    ref = hf_twin(model, "sdpa")
    x = blocks[:, :-1]
    doc = document_ids_from_eos(x, EOS)
    positions = document_position_ids(doc)
    assert torch.equal(find_packed_sequence_indices(positions), doc)
    theirs = create_causal_mask(config=ref.config, inputs_embeds=torch.zeros(*x.shape, CONFIG.dim),
                                attention_mask=None, cache=None, position_ids=positions)
    assert theirs.dtype == torch.bool and theirs.shape == (x.shape[0], 1, BLOCK, BLOCK)
    assert torch.equal(document_causal_mask(doc), theirs)


def test_positions_equal_transformers_flattening_collator():
    """DataCollatorWithFlattening packs sequences given one by one and numbers each from 0: the
    pieces of documents in each block (known from pack_documents) must get our positions."""
    packed, owners = pack_documents(documents(LENGTHS, seed=3), BLOCK, EOS)
    x, x_owners = packed[:, :-1], owners[:, :-1]
    collate = transformers.DataCollatorWithFlattening(return_tensors="pt")
    for b in range(x.shape[0]):
        pieces = [x[b, seg].tolist() for seg in segments(x_owners[b : b + 1][0])]
        expected = collate([{"input_ids": piece} for piece in pieces])["position_ids"]
        assert torch.equal(document_position_ids(document_ids_from_eos(x[b : b + 1], EOS)), expected)
        assert torch.equal(document_position_ids(x_owners[b : b + 1]), expected)


# ----- the Trainer --------------------------------------------------------------------------------


def test_trainer_with_document_mask_trains_on_the_masked_loss(blocks):
    torch.manual_seed(2)
    net = Llama(CONFIG)
    config = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_interval=0, device="cpu", dtype="fp32",
                         progress=False, document_mask=True, eos_token_id=EOS, seed=3)
    trainer = Trainer(net, blocks, None, config)
    x, y = trainer.train_data.batch(trainer.sampler.indices(0))
    mask, positions = document_attention_inputs(x, EOS)
    with torch.no_grad():
        expected = net(x, attention_mask=mask, position_ids=positions, targets=y)
        plain = net(x, targets=y)
    record = trainer.train_step()
    assert record["train_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert abs(record["train_loss"] - plain.item()) > 1e-4


def test_trainer_takes_the_tokenizers_eos_and_refuses_none(blocks):
    class Tok:
        eos_token_id = EOS

    config = TrainConfig(max_steps=1, warmup_steps=0, device="cpu", progress=False, document_mask=True)
    assert Trainer(Llama(CONFIG), blocks, None, config, tokenizer=Tok()).document_eos == EOS
    with pytest.raises(ValueError, match="eos_token_id"):
        Trainer(Llama(CONFIG), blocks, None, config)
    with pytest.raises(ValueError, match="eos_token_id"):
        TrainConfig(eos_token_id=-1)


def test_pretrain_cli_with_document_mask(tmp_path, monkeypatch):
    """``--document_mask`` on the synthetic corpus: documents end at its EOS, the last id."""
    from llama_from_scratch import pretrain

    built = []

    class Recording(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(pretrain, "Trainer", Recording)
    model = '{"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64, ' \
            '"max_seq_len": 32}'
    history = tmp_path / "history.json"
    assert pretrain.main(["--synthetic", "--model", model, "--block_size", "16", "--batch_size", "2",
                          "--max_steps", "2", "--warmup_steps", "0", "--eval_interval", "0", "--device", "cpu",
                          "--progress", "false", "--document_mask", "--history_out", str(history)]) == 0
    assert history.is_file() and len(built) == 1
    assert built[0].config.document_mask and built[0].document_eos == 63


# ----- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [torch.tensor([1, 2, EOS]), torch.zeros(2, 3, 4, dtype=torch.long),
                                 torch.zeros(2, 3), torch.zeros(2, 0, dtype=torch.long), [[1, 2, EOS]]],
                         ids=["1-D", "3-D", "float", "empty", "list"])
def test_document_ids_from_eos_refuses_bad_input(bad):
    with pytest.raises(ValueError, match="input_ids"):
        document_ids_from_eos(bad, EOS)


def test_document_ids_from_eos_refuses_a_non_integer_eos():
    with pytest.raises(ValueError, match="eos_token_id"):
        document_ids_from_eos(torch.zeros(1, 3, dtype=torch.long), 2.0)


@pytest.mark.parametrize("fn", [document_causal_mask, document_position_ids])
@pytest.mark.parametrize("bad", [torch.tensor([0, 0, 1]), torch.zeros(1, 1, 3, dtype=torch.long),
                                 torch.zeros(1, 3), torch.tensor([[0, 1, 0]])],
                         ids=["1-D", "3-D", "float", "not-contiguous"])
def test_mask_and_positions_refuse_bad_document_ids(fn, bad):
    with pytest.raises(ValueError, match="document_ids"):
        fn(bad)


def test_pack_documents_refuses_what_pack_tokens_refuses():
    with pytest.raises(ValueError, match="block_size"):
        pack_documents([[1, 2, 3]], 0, EOS)
    with pytest.raises(ValueError, match="too few"):
        pack_documents([[1, 2]], 8, EOS)
