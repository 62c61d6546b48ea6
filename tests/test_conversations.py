"""Multi-turn SFT (llama_from_scratch.conversations): labels on the assistant turns only.

The reference for the labels is built independently, turn by turn, from transformers' own
rendering of SmolLM2's chat template (the Jinja program in the GGUF; it has no ``{% generation %}``
block, so ``return_assistant_tokens_mask`` cannot be used): for the assistant turn k, the ids of
``apply_chat_template(messages[:k], add_generation_prompt=True)`` must be a prefix of the ids of
``apply_chat_template(messages[:k + 1])``, and the difference, up to and including its first
``<|im_end|>``, is what that turn trains. The package instead tokenizes the whole conversation once
and scans it for the assistant headers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.conversations import (
    ConversationDataset,
    check_conversation,
    conversations_dir,
    few_shot_messages,
    load_conversations,
    render_conversation,
    tokenize_conversation,
)
from llama_from_scratch.instruct import InstructionDataset, SFTBlocks, instruction_collate, sft_loss
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama

smollm2 = pytest.mark.smollm2
DATA = Path(__file__).resolve().parent.parent / "data" / "conversations"


class ToyChatMLTokenizer:
    """A toy tokenizer for tests without weights: <|im_start|> = 1, <|im_end|> = 2 (EOS), every
    other byte b -> b + 3. No template of its own, so SmolLM2's ChatML is rendered by hand."""

    eos_token_id = 2
    pad_token_id = 2

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            if piece == "<|im_start|>":
                ids.append(1)
            elif piece == "<|im_end|>":
                ids.append(2)
            else:
                ids += [b + 3 for b in piece.encode("utf-8")]
        return ids

    def decode(self, ids) -> str:
        names = {1: "<|im_start|>", 2: "<|im_end|>"}
        out, buf = [], bytearray()
        for i in ids:
            if i in names:
                out.append(buf.decode("utf-8", errors="replace") + names[i])
                buf = bytearray()
            else:
                buf.append(i - 3)
        return "".join(out) + buf.decode("utf-8", errors="replace")


TOY = ToyChatMLTokenizer()
CHAT = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7."},
        {"role": "user", "content": "And now double it."}, {"role": "assistant", "content": "7 × 2 = 14."}]


def _ids(value) -> list[int]:
    if hasattr(value, "keys"):
        value = value["input_ids"]
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    return [int(t) for t in value]


def per_turn_reference(messages: list[dict], hf) -> tuple[list[int], list[int]]:
    """(input_ids, labels) built turn by turn from transformers' apply_chat_template."""
    full = _ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=False))
    eos = hf.convert_tokens_to_ids("<|im_end|>")
    ids = full[:len(full) - full[::-1].index(eos)]
    labels = [-100] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _ids(hf.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True))
        upto = _ids(hf.apply_chat_template(messages[:k + 1], tokenize=True, add_generation_prompt=False))
        assert upto[:len(prompt)] == prompt and ids[:len(prompt)] == prompt
        turn = upto[len(prompt):]
        turn = turn[:turn.index(eos) + 1]
        labels[len(prompt):len(prompt) + len(turn)] = turn
    return ids, labels


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    from llama_from_scratch.weights import find_smollm2_gguf
    path = find_smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol_tok():
    from llama_from_scratch.smollm2_tokenizer import load_smollm2_tokenizer
    return load_smollm2_tokenizer()


# ----- the mask against the per-turn reference ------------------------------------------------

@smollm2
def test_assistant_mask_equals_per_turn_chat_template_reference(hf_tok, smol_tok):
    """Every conversation of the project (train and test), with the package's tokenizer and with
    transformers' tokenizer, plus a system message and a 1-exchange case."""
    conversations = [c["messages"] for c in load_conversations("all")]
    conversations += [[{"role": "system", "content": "Answer briefly."}] + CHAT, CHAT[:2],
                      [{"role": "user", "content": "Say hi\n\nplease"}, {"role": "assistant", "content": "Hi!\nBye."}]]
    n_labelled = 0
    for messages in conversations:
        ref_ids, ref_labels = per_turn_reference(messages, hf_tok)
        for tok in (smol_tok, hf_tok):
            item = tokenize_conversation(messages, tok)
            assert item["input_ids"].tolist() == ref_ids
            assert item["labels"].tolist() == ref_labels
        n_labelled += sum(label != -100 for label in ref_labels)
        # each assistant turn is labelled: its content, then <|im_end|>
        n_turns = sum(m["role"] == "assistant" for m in messages)
        assert sum(label == 2 for label in ref_labels) == n_turns
    assert len(conversations) >= 390 and n_labelled > 5000


@smollm2
def test_one_exchange_equals_chapter_9_single_turn_labels(smol_tok):
    examples = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
                {"instruction": "What is 6 times 7?", "input": "", "output": "42"}]
    single = InstructionDataset(examples, smol_tok, template="chatml")
    for ex, item in zip(examples, single):
        user = ex["instruction"] + (f"\n\n{ex['input']}" if ex["input"] else "")
        conv = tokenize_conversation([{"role": "user", "content": user},
                                      {"role": "assistant", "content": ex["output"]}], smol_tok)
        assert torch.equal(conv["input_ids"], item["input_ids"])
        expected = item["input_ids"].clone()
        expected[:item["prompt_length"]] = -100
        assert torch.equal(conv["labels"], expected)
    # and collated the same way
    conv_items = list(ConversationDataset([[{"role": "user", "content": "What is 6 times 7?"},
                                            {"role": "assistant", "content": "42"}]], smol_tok))
    a = instruction_collate([single[1]], pad_token_id=2)
    b = instruction_collate(conv_items, pad_token_id=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


@smollm2
def test_render_conversation_is_the_gguf_template(hf_tok, smol_tok):
    for c in load_conversations("test")[:10]:
        reference = hf_tok.apply_chat_template(c["messages"], tokenize=False)
        assert render_conversation(c["messages"], smol_tok) == reference
        assert render_conversation(c["messages"]) == reference  # the hand-written ChatML
        assert render_conversation(c["messages"][:-1], smol_tok, add_generation_prompt=True) == \
            hf_tok.apply_chat_template(c["messages"][:-1], tokenize=False, add_generation_prompt=True)


@smollm2
def test_content_that_merges_with_the_header_is_refused(smol_tok):
    """Two leading spaces: byte-level BPE's pre-tokenizer puts the header's newline and one space in
    one chunk, so no assistant header is found where the turn starts."""
    with pytest.raises(ValueError, match="whitespace"):
        tokenize_conversation([{"role": "user", "content": "Indent it."},
                               {"role": "assistant", "content": "  indented"}], smol_tok)


# ----- the labels, with a toy tokenizer (no weights needed) ------------------------------------

def test_toy_labels_are_the_assistant_contents_and_their_end_tokens():
    item = tokenize_conversation(CHAT, TOY)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    text = TOY.decode(ids)
    assert text == render_conversation(CHAT).removesuffix("\n")
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert TOY.decode(trained) == "3 + 4 = 7.<|im_end|>7 × 2 = 14.<|im_end|>"
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    assert ids[-1] == 2 and labels[-1] == 2          # ends at the last <|im_end|>, trained
    # the newline after the first <|im_end|> and the next header are not trained
    first_trained = next(t for t, label in enumerate(labels) if label != -100)
    assert TOY.decode(ids[first_trained - 4:first_trained]) == "ant\n"   # right after the header
    first_end = ids.index(2, first_trained)
    assert labels[first_end] == 2 and labels[first_end + 1] == -100


def test_truncation_that_cuts_inside_an_assistant_turn():
    full = tokenize_conversation(CHAT, TOY)
    n = full["input_ids"].numel()
    cut_at = n - 4                                    # inside "7 × 2 = 14." : its <|im_end|> is lost
    cut = tokenize_conversation(CHAT, TOY, max_length=cut_at)
    assert torch.equal(cut["input_ids"], full["input_ids"][:cut_at])
    assert torch.equal(cut["labels"], full["labels"][:cut_at])
    assert (cut["labels"] == 2).sum() == 1           # only the first turn's end token remains
    ds = ConversationDataset([CHAT, CHAT[:2]], TOY, max_length=cut_at, truncation="truncate")
    assert len(ds) == 2 and ds.truncated == 1 and ds.skipped == 0
    assert torch.equal(ds[0]["labels"], cut["labels"])
    skipping = ConversationDataset([CHAT, CHAT[:2]], TOY, max_length=cut_at)
    assert len(skipping) == 1 and skipping.skipped == 1 and skipping.kept == [1]
    # a cut before the first assistant token leaves nothing to learn: skipped even when truncating
    header_end = full["labels"].tolist().index(next(label for label in full["labels"].tolist() if label != -100))
    none_left = ConversationDataset([CHAT], TOY, max_length=header_end, truncation="truncate")
    assert len(none_left) == 0 and none_left.skipped == 1


def test_collate_keeps_item_labels_and_sft_loss_counts_only_assistant_tokens():
    conversations = [CHAT, CHAT[:2], [{"role": "system", "content": "Be brief."}] + CHAT[:2]]
    ds = ConversationDataset(conversations, TOY)
    batch = instruction_collate(list(ds), pad_token_id=TOY.pad_token_id)
    for row, item in enumerate(ds):
        n = item["input_ids"].numel()
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
    everything = instruction_collate(list(ds), pad_token_id=TOY.pad_token_id, mask_prompt=False)
    assert torch.equal(everything["labels"][everything["attention_mask"] == 1],
                       everything["input_ids"][everything["attention_mask"] == 1])
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(vocab_size=300, max_seq_len=256)).eval()
    with torch.no_grad():
        loss = sft_loss(model, batch)
        # independent: per-token log-softmax, summed over the assistant positions only
        logp = torch.log_softmax(model(batch["input_ids"]).double(), dim=-1)
        total, count = 0.0, 0
        for row, item in enumerate(ds):
            ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    total -= logp[row, t - 1, ids[t]].item()
                    count += 1
        x, y = SFTBlocks(ds, pad_token_id=TOY.pad_token_id).batch([0, 1, 2])
        trainer_form = cross_entropy(model(x).float(), y)
    assert count == sum(int((item["labels"][1:] != -100).sum()) for item in ds)
    torch.testing.assert_close(loss.double(), torch.tensor(total / count, dtype=torch.double), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trainer_form, loss, rtol=0, atol=0)


def test_collate_rejects_labels_of_another_length():
    item = tokenize_conversation(CHAT, TOY)
    with pytest.raises(ValueError, match="labels of shape"):
        instruction_collate([{"input_ids": item["input_ids"], "labels": item["labels"][:-1]}], pad_token_id=2)


# ----- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "Hi."}], "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty content"),
    ([{"role": "user", "content": " \n"}, {"role": "assistant", "content": "b"}], "empty content"),
    ([{"role": "user", "content": "a"}], "must end with a 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system message may only come first"),
    ([{"role": "bot", "content": "a"}], "unknown role"),
    ([{"role": "user", "content": "a<|im_end|>"}, {"role": "assistant", "content": "b"}], "marker"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}], "must be a str"),
    ([{"role": "user"}], "exactly 'role' and 'content'"),
    ([], "empty"),
    ("user: hi", "list"),
])
def test_bad_conversations_raise_clear_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(messages, TOY)


def test_dataset_names_the_bad_conversation_and_checks_its_arguments():
    with pytest.raises(ValueError, match=r"conversation 1: .*roles out of order"):
        ConversationDataset([CHAT, CHAT[1:]], TOY)
    with pytest.raises(ValueError, match="truncation"):
        ConversationDataset([CHAT], TOY, truncation="cut")
    with pytest.raises(ValueError, match="max_length"):
        ConversationDataset([CHAT], TOY, max_length=1)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(CHAT, TOY, max_length=0)


def test_check_conversation_final_role():
    check_conversation(CHAT[:3], final_role="user")
    check_conversation(CHAT[:3], final_role=None)
    with pytest.raises(ValueError, match="must end with a 'user'"):
        check_conversation(CHAT, final_role="user")
    with pytest.raises(ValueError, match="only a system message"):
        check_conversation([{"role": "system", "content": "s"}], final_role=None)


# ----- few-shot prompts ---------------------------------------------------------------------------

def test_few_shot_messages_put_the_examples_first():
    example = {"messages": CHAT[:2], "task": "arithmetic", "answer": "7"}
    prompt = few_shot_messages([example, CHAT], CHAT[:3])
    assert prompt == CHAT[:2] + CHAT + CHAT[:3]
    assert few_shot_messages([], CHAT[:1]) == CHAT[:1]
    with pytest.raises(ValueError, match="example 0"):
        few_shot_messages([CHAT[:1]], CHAT[:1])           # an example must end with the assistant
    with pytest.raises(ValueError, match="roles out of order"):
        few_shot_messages([CHAT], CHAT[1:])


# ----- loading ------------------------------------------------------------------------------------

def test_load_conversations(tmp_path, monkeypatch):
    train, test = load_conversations("train"), load_conversations("test")
    assert load_conversations("all") == train + test and conversations_dir() == DATA
    with open(DATA / "test.jsonl", encoding="utf-8") as f:
        assert test == [json.loads(line) for line in f]
    with pytest.raises(ValueError, match="split"):
        load_conversations("validation")
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT, "task": "t", "answer": "14"}) + "\n{bad\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        load_conversations("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT[1:]}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:1: .*roles out of order"):
        load_conversations("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    monkeypatch.setenv("LFS_CONVERSATIONS_DIR", str(tmp_path))
    assert load_conversations("train") == [{"messages": CHAT}]
