"""Hugging Face folders: ``Llama.save_pretrained`` against transformers' loaders, ``Llama.from_hf``
against transformers' and safetensors' writers, the tokenizer files against ``AutoTokenizer``, and
PEFT's ``task_type="CAUSAL_LM"`` wrapper.

The references are independent: ``transformers.AutoModelForCausalLM`` / ``LlamaForCausalLM``
(logits, saved files), ``AutoTokenizer`` (ids, decoded text, chat template), ``safetensors``
(what ``save_model`` keeps of tied weights) and ``peft`` (LoRA outputs without a task type).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.hf_export import hf_state_dict, save_tokenizer, tokenizer_to_hf
from llama_from_scratch.model import Llama
from llama_from_scratch.smollm2_tokenizer import SmolLM2Tokenizer, bytes_to_unicode

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
VARIANTS = {  # name -> LlamaConfig.tiny overrides
    "tied": {},
    "untied": {"tie_embeddings": False},
    "llama3-rope": {"rope_scaling": LLAMA3, "rope_theta": 500000.0},
    "llama3-rope-untied": {"rope_scaling": LLAMA3, "rope_theta": 500000.0, "tie_embeddings": False},
}


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.tiny(**overrides)).to(dtype).eval()
    with torch.no_grad():  # RMSNorm gains of 1 would hide a norm saved under the wrong name
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_hf(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """transformers' own LlamaForCausalLM of the same shape, randomly initialized by transformers."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LlamaConfig.tiny(**overrides).to_hf())
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def ids(seed: int = 0, batch: int = 2, length: int = 100) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(ours: Llama, hf, x: torch.Tensor) -> None:
    """Same weights, same architecture: equal logits up to float rounding of the two code paths.

    Measured on CPU: max |diff| exactly 0 for every tiny variant (float32 and bfloat16, logits up
    to ~1.5) and for SmolLM2 (float32). The tolerances leave room for other kernels (1e-5; one
    bfloat16 ulp at |logit| < 2) and still catch the mistakes measured: llama3 RoPE scaling
    dropped 5.7e-3, two norms of a layer swapped 0.12.
    """
    a, b = ours(x), hf(x).logits
    assert a.dtype == b.dtype
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2**-7)


def hf_weights_equal(ours: Llama, hf) -> None:
    sd = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, sd[name]), name


# ---------------------------------------------------------------------------------------------
# ours -> transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path, variant):
    ours = tiny_llama(**VARIANTS[variant])
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings == ours.config.tie_embeddings
    if ours.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf_weights_equal(ours, hf)
    assert_same_logits(ours, hf, ids())


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_bfloat16(tmp_path, tie):
    ours = tiny_llama(dtype=torch.bfloat16, tie_embeddings=tie)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.bfloat16
    hf_weights_equal(ours, hf)
    assert_same_logits(ours, hf, ids())
    back = Llama.from_hf(tmp_path, dtype=torch.bfloat16)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("tie", [True, False])
def test_saved_files_match_what_transformers_writes(tmp_path, tie):
    """Same safetensors keys, shapes and header format as transformers' save_pretrained; config and
    generation config as documented."""
    ours = tiny_llama(tie_embeddings=tie)
    ours.save_pretrained(tmp_path / "ours")
    tiny_hf(tie_embeddings=tie).save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() == {"format": "pt"}
        assert sorted(a.keys()) == sorted(b.keys())
        assert ("lm_head.weight" in a.keys()) == (not tie)
        for key in a.keys():
            assert a.get_slice(key).get_shape() == b.get_slice(key).get_shape(), key
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # no tokenizer given
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie and config["dtype"] == "float32"
    assert LlamaConfig.from_hf(tmp_path / "ours") == ours.config
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert generation.bos_token_id is None and generation.eos_token_id is None


def test_save_pretrained_refuses_lora_and_mixed_dtypes(tmp_path):
    from llama_from_scratch.lora import apply_lora

    model = tiny_llama()
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="merge LoRA"):
        model.save_pretrained(tmp_path / "lora")
    model = tiny_llama()
    model.model.norm.to(torch.bfloat16)
    with pytest.raises(ValueError, match="mixed dtypes"):
        model.save_pretrained(tmp_path / "mixed")
    with pytest.raises(TypeError, match="expects a llama_from_scratch Llama"):
        from llama_from_scratch.hf_export import save_pretrained

        save_pretrained(tiny_hf(), tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# transformers -> ours


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_reads_transformers_save_pretrained(tmp_path, variant):
    hf = tiny_hf(**VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    ours = Llama.from_hf(tmp_path)
    assert ours.config == LlamaConfig.tiny(**VARIANTS[variant])
    hf_weights_equal(ours, hf)
    assert_same_logits(ours, hf, ids(1))


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_reads_transformers_bfloat16(tmp_path, tie):
    hf = tiny_hf(dtype=torch.bfloat16, tie_embeddings=tie)
    hf.save_pretrained(tmp_path)
    ours = Llama.from_hf(tmp_path, dtype=torch.bfloat16)
    hf_weights_equal(ours, hf)
    assert_same_logits(ours, hf, ids(2))


@pytest.mark.parametrize("writer", ["ours", "transformers"])
def test_tied_checkpoint_from_safetensors_save_model(tmp_path, writer):
    """``safetensors.torch.save_model`` keeps one name of a shared tensor; transformers loads the
    folder, and so must from_hf, whichever name was kept."""
    model = tiny_llama() if writer == "ours" else tiny_hf()
    save_model(model, str(tmp_path / "model.safetensors"))
    config = LlamaConfig.tiny().to_hf()
    (tmp_path / "config.json").write_text(json.dumps(config))
    kept = set(load_file(str(tmp_path / "model.safetensors")))
    assert len({"lm_head.weight", "model.embed_tokens.weight"} & kept) == 1  # one of the two names
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = Llama.from_hf(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    hf_weights_equal(ours, hf)
    assert_same_logits(ours, hf, ids(3))


@pytest.mark.parametrize("kept", ["lm_head.weight", "model.embed_tokens.weight"])
def test_tied_checkpoint_with_either_name(tmp_path, kept):
    """Both spellings of a tied checkpoint give the model that wrote them (equal state dicts)."""
    model = tiny_llama()
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k not in {"lm_head.weight", "model.embed_tokens.weight"} - {kept}}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    back = Llama.from_hf(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def _write(folder, state, config):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    return folder


def test_from_hf_errors_name_genuinely_missing_keys(tmp_path):
    tied = tiny_llama()
    state = hf_state_dict(tied)
    broken = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]; "
                                         r"unexpected keys \[\]$"):
        Llama.from_hf(_write(tmp_path / "a", broken, tied.config))

    no_embedding = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}
    with pytest.raises(ValueError, match="neither model.embed_tokens.weight nor lm_head.weight"):
        Llama.from_hf(_write(tmp_path / "b", no_embedding, tied.config))

    untied_config = LlamaConfig.tiny(tie_embeddings=False)
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\].*tie_word_embeddings=false"):
        Llama.from_hf(_write(tmp_path / "c", state, untied_config))

    extra = {**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.self_attn.q_proj.bias'\]"):
        Llama.from_hf(_write(tmp_path / "d", extra, tied.config))


# ---------------------------------------------------------------------------------------------
# tokenizer files


def tiny_tokenizer(pre_tokenizer: str = "gpt2") -> SmolLM2Tokenizer:
    """A small byte-level BPE with SmolLM2's layout: 3 special tokens first, then the byte
    alphabet minus two bytes (0x04 and 0xF1, dropped when encoding, as in SmolLM2), then merges."""
    alphabet = [c for b, c in sorted(bytes_to_unicode().items()) if b not in (0x04, 0xF1)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "1 2", "o n", "Ġa n", "Ġan d",
              "Ċ Ċ", "Ġ 1"]
    tokens = specials + alphabet + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    return SmolLM2Tokenizer(tokens, merges, types, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                            unk_token_id=0, chat_template=template, pre_tokenizer=pre_tokenizer)


TEXTS = [
    "the and then in an other 12 123 1212",
    "a  1\n\n  2\t\t3    4",  # whitespace before digits: where the two pre-tokenizers differ
    "    indented\n        code()\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|><|im_end|>",
    "<|im_start<|im_end|>|>",  # a broken special token is ordinary text
    "Ünïcödé 日本語 😀👍🏽 \U00050000 a\x04b",  # includes bytes absent from the vocabulary
    "it's I'M we'll",
    "",
    " ",
]


@pytest.mark.parametrize("pre_tokenizer", ["gpt2", "smollm"])
def test_saved_tokenizer_loads_in_auto_tokenizer_with_same_ids(tmp_path, pre_tokenizer):
    ours = tiny_tokenizer(pre_tokenizer)
    written = save_tokenizer(ours, tmp_path, model_max_length=128)
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert hf.model_max_length == 128 and len(hf) == ours.vocab_size
    for text in TEXTS:
        expected = ours.encode(text)
        assert hf.encode(text) == expected, repr(text)
        assert hf(text)["input_ids"] == expected  # no BOS added
        assert hf.decode(expected) == ours.decode(expected), repr(text)
        assert hf.decode(expected, skip_special_tokens=True) == ours.decode(expected, skip_special_tokens=True)
    messages = [{"role": "user", "content": "the 12 <|im_end|>"}, {"role": "assistant", "content": "and"}]
    for prompt in (True, False):
        text = hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
        assert text == ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
        assert hf.encode(text) == ours.apply_chat_template(messages, add_generation_prompt=prompt)


def test_pre_tokenizer_choice_is_kept():
    """The two pre-tokenizers split "a  1" differently; each saved pipeline follows its own."""
    gpt2, smollm = tiny_tokenizer("gpt2"), tiny_tokenizer("smollm")
    assert [gpt2.tokens[i] for i in gpt2.encode("a  1")] == ["a", "Ġ", "Ġ1"]
    assert [smollm.tokens[i] for i in smollm.encode("a  1")] == ["a", "ĠĠ", "1"]
    for ours in (gpt2, smollm):
        assert tokenizer_to_hf(ours).encode("a  1").ids == ours.encode("a  1")


def test_save_tokenizer_errors(tmp_path):
    with pytest.raises(TypeError, match="byte-level BPE tokenizer"):
        save_tokenizer(object(), tmp_path)


# ---------------------------------------------------------------------------------------------
# SmolLM2: the whole round trip


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_round_trip(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF -> save_pretrained -> transformers (model and
    tokenizer) -> from_hf: equal weights, equal logits, equal ids and chat template."""
    from llama_from_scratch.loading import load_smollm2

    ours, tokenizer = load_smollm2()
    ours.save_pretrained(tmp_path, tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 2)

    texts = TEXTS + ["The capital of France is", "def f(x):\n    return x ** 2  # 1234\n",
                     "<jupyter_code>print(1)<jupyter_output>", "1,000,000 and 3.14159"]
    for text in texts:
        assert hf_tok.encode(text) == tokenizer.encode(text), repr(text)
    messages = [{"role": "user", "content": "What is 2 + 2? <|im_end|>"}]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == tokenizer.render_chat(messages)
    prompt = torch.tensor([tokenizer.apply_chat_template(messages)])
    assert hf_tok.encode(text) == prompt[0].tolist()

    assert_same_logits(ours, hf, prompt)
    back = Llama.from_hf(tmp_path)
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------
# PEFT with task_type="CAUSAL_LM"


def test_peft_causal_lm_task_type_matches_plain_wrapper():
    """``LoraConfig(task_type="CAUSAL_LM")`` wraps our Llama in ``PeftModelForCausalLM``; its
    outputs equal PEFT's task-less wrapper with the same adapters, and training steps work."""
    import copy

    peft = pytest.importorskip("peft")
    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    causal = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    assert type(causal).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():  # the same adapters in both, B non-zero (B = 0 would hide the adapters)
        gen = torch.Generator().manual_seed(0)
        for (name, p), (name2, q) in zip(causal.named_parameters(), plain.named_parameters()):
            assert name == name2
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                q.copy_(p)
    x = ids(4, length=20)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(causal(input_ids=x, attention_mask=mask), plain(x, attention_mask=mask),
                                   rtol=0, atol=0)
        assert not torch.allclose(causal(input_ids=x), base(x))  # the adapters are active

    causal.train()
    loss = causal(input_ids=x, targets=torch.roll(x, -1, dims=1))
    loss.backward()
    grads = {n: p.grad for n, p in causal.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all("lora_" in n for n in grads)

    with pytest.raises(ValueError, match=r"does not implement \['labels'\].*targets="):
        causal(input_ids=x, labels=x)
    with pytest.raises(ValueError, match=r"\['inputs_embeds'\]"):
        causal(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['past_key_values'\]"):
        base(x, past_key_values=None)


@torch.no_grad()
def test_prepare_inputs_for_generation_greedy_decoding_with_kv_cache():
    """A greedy loop driven by PeftModelForCausalLM.prepare_inputs_for_generation (KV cache, one
    new token per step) gives the argmax tokens of full recomputation without a cache."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    model.eval()
    seq = ids(5, batch=2, length=7)
    cache = model.base_model.model.make_kv_cache(batch_size=2, max_seq_len=32)
    reference = seq.clone()
    for _ in range(6):
        inputs = model.prepare_inputs_for_generation(seq, kv_cache=cache)
        assert inputs["input_ids"].shape[1] == (seq.shape[1] if inputs["start_pos"] == 0 else 1)
        next_token = model(**inputs)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
        full = model(input_ids=reference)[:, -1].argmax(-1, keepdim=True)
        reference = torch.cat([reference, full], dim=1)
    assert torch.equal(seq, reference)
    base = model.base_model.model
    plain = base.prepare_inputs_for_generation(seq)
    assert plain["start_pos"] == 0 and plain["kv_cache"] is None and torch.equal(plain["input_ids"], seq)
    with pytest.raises(ValueError, match="already holds"):
        base.prepare_inputs_for_generation(seq[:, :3], kv_cache=cache)
