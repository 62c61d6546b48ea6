"""Instruction-tuning data: Alpaca/ChatML templates, InstructionDataset, collate, SFT loss."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.instruct import (InstructionDataset, format_alpaca, format_chatml, instruction_collate,
                                         instructions_dir, load_instructions, sft_loss, shift_for_trainer)
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama

smollm2 = pytest.mark.smollm2


class ByteTokenizer:
    """A toy tokenizer: id = byte + 3 (0 pad, 1 bos, 2 eos); never adds special tokens."""

    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


# ----- format_alpaca ------------------------------------------------------------------------

def test_format_alpaca_without_input_is_the_exact_alpaca_string():
    ex = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.")
    assert format_alpaca(ex) == expected
    assert format_alpaca(ex, with_response=False) == expected[: -len("Blue.")]
    # a missing or whitespace-only input uses the same short template
    assert format_alpaca({"instruction": "Name a colour.", "output": "Blue."}) == expected
    assert format_alpaca({"instruction": "Name a colour.", "input": " \n", "output": "Blue."}) == expected


def test_format_alpaca_with_input_is_the_exact_alpaca_string():
    ex = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    expected = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\nBonjour")
    assert format_alpaca(ex) == expected
    assert format_alpaca(ex, with_response=False) == expected[: -len("Bonjour")]


def test_format_alpaca_errors():
    with pytest.raises(ValueError, match="instruction"):
        format_alpaca({"input": "x", "output": "y"})
    with pytest.raises(ValueError, match="output"):
        format_alpaca({"instruction": "x"})
    assert format_alpaca({"instruction": "x"}, with_response=False).endswith("### Response:\n")
    with pytest.raises(TypeError):
        format_alpaca(["instruction", "output"])


# ----- InstructionDataset -------------------------------------------------------------------

def test_dataset_alpaca_items_are_prompt_response_eos():
    tok = ByteTokenizer()
    examples = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
                {"instruction": "Add.", "input": "2 + 2", "output": "4"}]
    ds = InstructionDataset(examples, tok)
    assert len(ds) == 2 and not ds.skipped and ds.kept == [0, 1]
    for item, ex in zip(ds, examples):
        prompt = tok.encode(format_alpaca(ex, with_response=False))
        assert item["prompt_length"] == len(prompt)
        assert item["input_ids"].tolist() == prompt + tok.encode(ex["output"]) + [tok.eos_token_id]
        assert item["input_ids"].dtype == torch.long
        assert tok.decode(item["input_ids"].tolist()) == format_alpaca(ex)


def test_dataset_skips_bad_examples_with_counts():
    tok = ByteTokenizer()
    good = {"instruction": "Say hi.", "output": "Hi!"}
    n_good = len(InstructionDataset([good], tok)[0]["input_ids"])
    examples = [
        good,
        {"input": "x", "output": "y"},                       # missing instruction
        {"instruction": "Say hi.", "input": "x"},            # missing output
        {"instruction": "Say hi.", "output": None},          # missing output
        {"instruction": "Say hi.", "output": "   "},         # empty output
        {"instruction": "\n", "output": "Hi!"},              # empty instruction
        {"instruction": "Say hi.", "output": 42},            # not a string
        "not an example",
        {"instruction": "Say hi. " * 20, "output": "Hi!"},   # too long
        good,
    ]
    ds = InstructionDataset(examples, tok, max_length=n_good)
    assert ds.skipped == Counter({"missing_instruction": 1, "missing_output": 2, "empty_output": 1,
                                  "empty_instruction": 1, "bad_field_type": 1, "not_a_dict": 1, "too_long": 1})
    assert len(ds) == 2 and ds.kept == [0, 9] and ds.truncated == 0
    # an example exactly max_length long is kept; one token more is skipped
    assert InstructionDataset([good], tok, max_length=n_good - 1).skipped == Counter({"too_long": 1})
    # iterating a whole epoch never raises
    assert sum(1 for _ in torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda b: b)) == 1


def test_dataset_truncate_mode_keeps_the_prompt_and_part_of_the_response():
    tok = ByteTokenizer()
    ex = {"instruction": "Count.", "output": "one two three"}
    p = len(tok.encode(format_alpaca(ex, with_response=False)))
    ds = InstructionDataset([ex], tok, max_length=p + 3, truncation="truncate")
    assert ds.truncated == 1 and not ds.skipped
    assert ds[0]["input_ids"].tolist() == tok.encode(format_alpaca(ex))[: p + 3]
    assert ds[0]["prompt_length"] == p
    # a prompt that alone fills max_length leaves no response token: skipped even in truncate mode
    ds = InstructionDataset([ex], tok, max_length=p, truncation="truncate")
    assert len(ds) == 0 and ds.skipped == Counter({"too_long": 1})


def test_dataset_argument_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="template"):
        InstructionDataset([], tok, template="vicuna")
    with pytest.raises(ValueError, match="max_length"):
        InstructionDataset([], tok, max_length=1)
    with pytest.raises(ValueError, match="truncation"):
        InstructionDataset([], tok, truncation="left")

    class NoEos:
        eos_token_id = None

        def encode(self, text):
            return [1]

    with pytest.raises(ValueError, match="eos_token_id"):
        InstructionDataset([], NoEos())
    assert len(InstructionDataset([], tok)) == 0


# ----- instruction_collate ------------------------------------------------------------------

HAND_BATCH = [
    {"input_ids": [11, 12, 13, 14, 2], "prompt_length": 3},
    {"input_ids": torch.tensor([21, 22, 2]), "prompt_length": 1},
    {"input_ids": [31, 2], "prompt_length": 2},   # all prompt (e.g. response cut away)
]


def test_collate_hand_made_batch():
    out = instruction_collate(HAND_BATCH, pad_token_id=2)   # pad == eos, as SmolLM2
    P = -100
    assert out["input_ids"].tolist() == [[11, 12, 13, 14, 2], [21, 22, 2, 2, 2], [31, 2, 2, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    # the real EOS (id 2) keeps its label; the padding (also id 2) does not
    assert out["labels"].tolist() == [[P, P, P, 14, 2], [P, 22, 2, P, P], [P, P, P, P, P]]
    for v in out.values():
        assert v.dtype == torch.long and v.shape == (3, 5)


def test_collate_without_prompt_masking_and_custom_ignore_index():
    out = instruction_collate(HAND_BATCH, pad_token_id=0, ignore_index=-1, mask_prompt=False)
    assert out["input_ids"].tolist() == [[11, 12, 13, 14, 2], [21, 22, 2, 0, 0], [31, 2, 0, 0, 0]]
    assert out["labels"].tolist() == [[11, 12, 13, 14, 2], [21, 22, 2, -1, -1], [31, 2, -1, -1, -1]]


def test_collate_max_length_truncates_before_padding():
    out = instruction_collate(HAND_BATCH, pad_token_id=0, max_length=3)
    P = -100
    assert out["input_ids"].tolist() == [[11, 12, 13], [21, 22, 2], [31, 2, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[P, P, P], [P, 22, 2], [P, P, P]]
    one = instruction_collate([{"input_ids": [5], "prompt_length": 0}], pad_token_id=0)
    assert one["labels"].tolist() == [[5]] and one["attention_mask"].tolist() == [[1]]


def test_collate_errors():
    with pytest.raises(ValueError, match="at least one"):
        instruction_collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="prompt_length"):
        instruction_collate([{"input_ids": [1, 2], "prompt_length": 3}], pad_token_id=0)
    with pytest.raises(ValueError, match="no tokens"):
        instruction_collate([{"input_ids": [], "prompt_length": 0}], pad_token_id=0)
    with pytest.raises(TypeError, match="integer"):
        instruction_collate([{"input_ids": torch.tensor([1.0, 2.0]), "prompt_length": 0}], pad_token_id=0)
    with pytest.raises(TypeError, match="pad_token_id"):
        instruction_collate(HAND_BATCH, pad_token_id=None)
    with pytest.raises(ValueError, match="max_length"):
        instruction_collate(HAND_BATCH, pad_token_id=0, max_length=0)


# ----- sft_loss -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny()).eval()


def _manual_loss(model, batch_items):
    """Each sequence run alone (no padding), -log p of every response token, averaged over all."""
    nll, count = [], 0
    for item in batch_items:
        ids = torch.as_tensor(item["input_ids"])
        logp = F.log_softmax(model(ids[None])[0].double(), dim=-1)
        for t in range(max(item["prompt_length"], 1), len(ids)):
            nll.append(-logp[t - 1, ids[t]])
            count += 1
    return torch.stack(nll).sum() / count


def test_sft_loss_equals_manual_per_sequence_computation(tiny_model):
    torch.manual_seed(1)
    items = [{"input_ids": torch.randint(3, 256, (n,)), "prompt_length": p} for n, p in [(9, 4), (5, 2), (12, 11), (3, 0)]]
    batch = instruction_collate(items, pad_token_id=2)
    with torch.no_grad():
        loss = sft_loss(tiny_model, batch)
        expected = _manual_loss(tiny_model, items)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # the trainer's convention, (x, y) pre-shifted, gives the same number
    x, y = shift_for_trainer(batch)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(tiny_model(x), y), loss, rtol=0, atol=0)


def test_sft_loss_without_prompt_masking_counts_prompt_tokens(tiny_model):
    items = [{"input_ids": torch.arange(10, 20), "prompt_length": 6}]
    masked = instruction_collate(items, pad_token_id=0)
    full = instruction_collate(items, pad_token_id=0, mask_prompt=False)
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(tiny_model, masked).double(), _manual_loss(tiny_model, items),
                                   rtol=1e-5, atol=1e-5)
        unmasked = [{"input_ids": torch.arange(10, 20), "prompt_length": 0}]
        torch.testing.assert_close(sft_loss(tiny_model, full).double(), _manual_loss(tiny_model, unmasked),
                                   rtol=1e-5, atol=1e-5)


def test_sft_loss_all_masked_is_zero_with_gradients(tiny_model):
    batch = instruction_collate([{"input_ids": [5, 6, 7], "prompt_length": 3}], pad_token_id=0)
    model = Llama(LlamaConfig.tiny())
    loss = sft_loss(model, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_sft_loss_bf16_close_to_fp32(tiny_model):
    torch.manual_seed(2)
    items = [{"input_ids": torch.randint(3, 256, (16,)), "prompt_length": 5} for _ in range(2)]
    batch = instruction_collate(items, pad_token_id=0)
    model_bf16 = Llama(LlamaConfig.tiny())
    model_bf16.load_state_dict(tiny_model.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16)
    with torch.no_grad():
        l32 = sft_loss(tiny_model, batch)
        l16 = sft_loss(model_bf16, batch)
    assert l16.dtype == torch.float32 and torch.isfinite(l16)
    assert abs(l16.item() - l32.item()) < 0.05 * l32.item()


def test_sft_loss_trains_only_the_response():
    """End to end: dataset -> collate -> loss -> backward; the labelled tokens are the response and EOS."""
    torch.manual_seed(3)
    model = Llama(LlamaConfig.tiny(max_seq_len=256))
    tok = ByteTokenizer()
    ds = InstructionDataset([{"instruction": "Say hi.", "output": "Hi!"}], tok)
    batch = instruction_collate(list(ds), pad_token_id=0)
    n_labels = int((batch["labels"] != -100).sum())
    assert n_labels == len("Hi!") + 1        # the response bytes and EOS
    loss = sft_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad.abs().sum() > 0


# ----- ChatML with SmolLM2's tokenizer --------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tok():
    from llama_from_scratch.smollm2_tokenizer import load_smollm2_tokenizer
    from llama_from_scratch.weights import find_smollm2_gguf
    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not installed")
    return load_smollm2_tokenizer()


@smollm2
def test_format_chatml_with_smollm2_tokenizer(smol_tok):
    ex = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    prompt = format_chatml(ex, smol_tok, with_response=False)
    full = format_chatml(ex, smol_tok)
    expected_prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                       "<|im_end|>\n<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>\n"
                       "<|im_start|>assistant\n")
    assert smol_tok.decode(prompt) == expected_prompt
    assert full[: len(prompt)] == prompt
    assert full[-1] == smol_tok.eos_token_id == 2
    assert smol_tok.decode(full[len(prompt):]) == "Bonjour<|im_end|>"
    ds = InstructionDataset([ex, {"instruction": "Hi", "output": ""}], smol_tok, template="chatml")
    assert ds.skipped == Counter({"empty_output": 1})
    assert ds[0]["input_ids"].tolist() == full and ds[0]["prompt_length"] == len(prompt)


@smollm2
def test_format_chatml_matches_transformers_tokenizer(smol_tok):
    transformers = pytest.importorskip("transformers")
    from llama_from_scratch.weights import find_smollm2_gguf
    path = find_smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for ex in load_instructions("test")[:5]:
        assert format_chatml(ex, hf) == format_chatml(ex, smol_tok)
        assert format_chatml(ex, hf, with_response=False) == format_chatml(ex, smol_tok, with_response=False)


# ----- load_instructions ----------------------------------------------------------------------

def test_load_instructions_from_the_repository():
    train, test = load_instructions("train"), load_instructions("test")
    assert len(train) >= 500 and len(test) >= 50
    assert load_instructions("all") == train + test
    assert instructions_dir() == Path(__file__).resolve().parent.parent / "data" / "instructions"
    with pytest.raises(ValueError, match="split"):
        load_instructions("validation")


def test_load_instructions_explicit_folder_and_env(tmp_path, monkeypatch):
    rows = [{"instruction": "a b c", "input": "", "output": "d", "category": "x", "exact": False}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_instructions("train", data_dir=tmp_path) == rows
    monkeypatch.setenv("LFS_INSTRUCTIONS_DIR", str(tmp_path))
    assert load_instructions("train") == rows
    monkeypatch.setenv("LFS_INSTRUCTIONS_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LFS_INSTRUCTIONS_DIR"):
        load_instructions("train")
    (tmp_path / "test.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="test.jsonl:1"):
        load_instructions("test", data_dir=tmp_path)
