"""Hugging Face model folders: writing one that transformers loads, and reading the weights others write.

A Hugging Face model folder is a few files that ``transformers.AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` understand:

- ``config.json``: the architecture (:meth:`LlamaConfig.to_hf`) plus the special token ids and
  the weights' ``dtype``;
- ``model.safetensors``: the weights under this package's names, which are Hugging Face's. With
  tied embeddings ``lm_head.weight`` *is* ``model.embed_tokens.weight``; safetensors refuses to
  store one tensor twice, and transformers writes only the embedding (and re-ties on loading),
  so that is what :func:`hf_state_dict` keeps. The header carries ``{"format": "pt"}`` as
  transformers' own files do;
- ``generation_config.json``: the special token ids ``generate`` uses (bos, eos, pad);
- with a tokenizer, ``tokenizer.json`` (a ``tokenizers`` pipeline: byte-level pre-tokenizer,
  BPE model from the vocabulary and merges, the special tokens as added tokens, byte-level
  decoder) and ``tokenizer_config.json`` (special token names and the chat template).

Reading goes the other way: :func:`tie_or_check_keys` reconciles a checkpoint's keys with the
config. A tied checkpoint may hold the shared matrix under either name (transformers keeps
``model.embed_tokens.weight``; ``safetensors.torch.save_model`` keeps ``lm_head.weight``);
anything else genuinely missing is reported by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llama_from_scratch.config import LlamaConfig

if TYPE_CHECKING:
    from llama_from_scratch.model import Llama
    from llama_from_scratch.smollm2_tokenizer import SmolLM2Tokenizer

__all__ = [
    "hf_state_dict",
    "save_pretrained",
    "save_tokenizer",
    "tie_or_check_keys",
    "tokenizer_to_hf",
]

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


# ----- weights ----------------------------------------------------------------------------------


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The tensors transformers would write for ``model``: every ``state_dict()`` entry, contiguous
    and on the CPU, without ``lm_head.weight`` when the embeddings are tied (it is the embedding)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop(LM_HEAD, None)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def tie_or_check_keys(state_dict: dict[str, torch.Tensor], config: LlamaConfig, expected: set[str],
                      source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with the tied head filled in, checked against the model's ``expected`` keys.

    Tied (``config.tie_embeddings``): the shared matrix may be stored as ``model.embed_tokens.weight``
    (transformers), as ``lm_head.weight`` (``safetensors.torch.save_model``), or both; either is
    used for both names (the embedding when both are present, as transformers does). Untied: both
    are required. Raises ``ValueError`` naming the missing and unexpected keys (``source`` says
    which checkpoint), with a hint when only the head or only the embedding is absent.
    """
    state = dict(state_dict)
    if config.tie_embeddings:
        shared = state.get(EMBED, state.get(LM_HEAD))
        if shared is not None:
            state[EMBED] = state[LM_HEAD] = shared
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not missing and not unexpected:
        return state

    def short(keys: list[str]) -> str:
        return f"{keys[:20]}{' ...' if len(keys) > 20 else ''}"

    hint = ""
    if config.tie_embeddings and EMBED in missing:
        hint = (" (tied embeddings: the checkpoint has neither model.embed_tokens.weight nor lm_head.weight)")
    elif not config.tie_embeddings and missing == [LM_HEAD]:
        hint = (" (config.json says tie_word_embeddings=false but the checkpoint has no lm_head.weight: "
                "was it saved from a tied model? then set tie_word_embeddings to true)")
    raise ValueError(
        f"checkpoint in {source} does not match its config: missing keys {short(missing)}; "
        f"unexpected keys {short(unexpected)}{hint}"
    )


# ----- tokenizer --------------------------------------------------------------------------------


def tokenizer_to_hf(tokenizer: SmolLM2Tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes exactly as ``tokenizer`` (a byte-level BPE such as
    :class:`~llama_from_scratch.smollm2_tokenizer.SmolLM2Tokenizer`), special tokens recognised.

    The BPE model gets the vocabulary and the merges in rank order and no unknown token, so that a
    byte missing from the vocabulary is dropped, as ``SmolLM2Tokenizer`` drops it. The
    pre-tokenizer is ``ByteLevel`` (GPT-2's regex) for ``pre_tokenizer="gpt2"``, preceded by
    ``Digits(individual_digits=True)`` for ``"smollm"`` (SmolLM2's original ``tokenizer.json``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    merges = [pair for pair, _rank in sorted(tokenizer.merge_ranks.items(), key=lambda kv: kv[1])]
    bpe = models.BPE(vocab=dict(tokenizer.encoder), merges=merges, unk_token=None, fuse_unk=False,
                     byte_fallback=False)
    hf = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if tokenizer.pre_tokenizer == "smollm":
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif tokenizer.pre_tokenizer == "gpt2":
        hf.pre_tokenizer = byte_level
    else:
        raise ValueError(f"no tokenizers pre-tokenizer for pre_tokenizer={tokenizer.pre_tokenizer!r}")
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])  # in id order
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token, _id in specials])
    for token, token_id in specials:
        if hf.token_to_id(token) != token_id:
            raise ValueError(f"special token {token!r} got id {hf.token_to_id(token)}, expected {token_id}")
    return hf


def save_tokenizer(tokenizer: SmolLM2Tokenizer, folder: str | os.PathLike,
                   model_max_length: int | None = None) -> list[Path]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` so that
    ``transformers.AutoTokenizer.from_pretrained(folder)`` gives the same ids, special tokens and
    chat template; returns the paths written.

    No BOS is added (``add_bos_token`` false, no post-processor), as ``SmolLM2Tokenizer.encode``.
    """
    for attr in ("tokens", "encoder", "merge_ranks", "special_tokens", "pre_tokenizer"):
        if not hasattr(tokenizer, attr):
            raise TypeError(
                f"save_tokenizer needs a byte-level BPE tokenizer such as SmolLM2Tokenizer (no .{attr} on "
                f"{type(tokenizer).__name__})"
            )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = folder / "tokenizer.json"
    tokenizer_to_hf(tokenizer).save(str(tokenizer_json))

    def name(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.tokens[token_id]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # "a tokenizer.json": transformers 4 and 5 read it
        "bos_token": name(tokenizer.bos_token_id),
        "eos_token": name(tokenizer.eos_token_id),
        "pad_token": name(tokenizer.pad_token_id),
        "unk_token": name(tokenizer.unk_token_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    config_json = folder / "tokenizer_config.json"
    config_json.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [tokenizer_json, config_json]


# ----- the whole folder -------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _llama_class(model: object) -> type | None:
    """``llama_from_scratch.model.Llama`` when ``model`` is one (or a subclass's instance), else None.

    Found among the model's classes rather than imported: ``model.py`` imports this module (for
    :meth:`Llama.save_pretrained`), and the imports go one way."""
    classes = type(model).__mro__
    return next((c for c in classes if (c.__module__, c.__name__) == ("llama_from_scratch.model", "Llama")), None)


def save_pretrained(model: Llama, folder: str | os.PathLike, tokenizer: SmolLM2Tokenizer | None = None) -> Path:
    """Writes ``model`` (and ``tokenizer``, if given) as a Hugging Face folder that
    ``AutoModelForCausalLM.from_pretrained(folder)`` (and ``AutoTokenizer``) load, and that
    :meth:`Llama.from_hf` reads back. Weights keep their dtype (float32, bfloat16, ...). Returns
    the folder.

    Only a plain model can be saved: merge LoRA adapters first (:func:`~llama_from_scratch.lora.merge_lora`),
    and a 4-bit model has no Hugging Face Llama equivalent. Special token ids (``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``) come from the tokenizer, or are null without one.
    """
    from safetensors.torch import save_file

    llama = _llama_class(model)
    if llama is None:
        raise TypeError(f"save_pretrained expects a llama_from_scratch Llama, got {type(model).__name__}")
    state = hf_state_dict(model)
    with torch.device("meta"):
        expected = set(llama(model.config).state_dict())  # a plain model's keys, no memory used
    if set(model.state_dict()) != expected:
        extra = sorted(set(model.state_dict()) ^ expected)[:6]
        raise ValueError(
            f"the model holds tensors a Hugging Face Llama does not have ({extra}); merge LoRA adapters "
            "(merge_lora) or dequantize before saving"
        )
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"the weights have mixed dtypes {sorted(map(str, dtypes))}; cast the model to one first")
    dtype = dtypes.pop()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        special_ids = {k: getattr(tokenizer, k) for k in special_ids}

    config = {**model.config.to_hf(), **special_ids, "dtype": _dtype_name(dtype), "use_cache": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {**special_ids, "_from_model_config": True}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, model_max_length=model.config.max_seq_len)
    return folder
