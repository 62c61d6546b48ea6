"""LlamaConfig: presets, validation, and conversion to and from Hugging Face config dicts."""

import dataclasses
import json

import pytest
import transformers

from llama_from_scratch.config import LlamaConfig

API_FIELDS = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps", "rope_theta",
              "rope_scaling", "max_seq_len", "tie_embeddings"]


def test_fields_are_exactly_the_api():
    assert [f.name for f in dataclasses.fields(LlamaConfig)] == API_FIELDS


def test_smollm2_preset():
    c = LlamaConfig.smollm2_135m()
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.max_seq_len, c.head_dim) == (100000.0, 1e-5, True, 8192, 64)
    assert c.rope_scaling is None


def test_llama32_1b_preset():
    c = LlamaConfig.llama32_1b()
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (16, 2048, 32, 8, 8192, 128256)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.max_seq_len, c.head_dim) == (500000.0, 1e-5, True, 131072, 64)
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}


def test_tiny_preset_and_defaults():
    c = LlamaConfig.tiny()
    assert c.n_layers <= 4 and c.dim <= 128 and c.n_heads % c.n_kv_heads == 0
    assert LlamaConfig.tiny(n_layers=3).n_layers == 3
    d = LlamaConfig(vocab_size=100, dim=64, n_layers=1, n_heads=4)
    assert d.n_kv_heads == 4 and d.hidden_dim == 256  # MHA, and llama_hidden_dim(64) rounded to 256


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
        (dict(dim=66, n_heads=4), r"dim \(66\) must be divisible by n_heads \(4\)"),
        (dict(dim=12, n_heads=4, n_kv_heads=2), "must be even"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(n_layers=-1), "n_layers must be a positive integer"),
        (dict(hidden_dim=2.5), "hidden_dim must be a positive integer"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported rope_type"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**overrides)


@pytest.mark.parametrize("preset", [LlamaConfig.smollm2_135m, LlamaConfig.llama32_1b, LlamaConfig.tiny])
def test_to_hf_from_hf_round_trip(preset):
    c = preset()
    hf = c.to_hf()
    assert LlamaConfig.from_hf(hf) == c
    # transformers accepts the dict and reads the same architecture ...
    t = transformers.LlamaConfig(**hf)
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (c.dim, c.hidden_dim, c.n_layers)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (c.n_heads, c.n_kv_heads, c.head_dim)
    assert (t.rms_norm_eps, t.max_position_embeddings, t.tie_word_embeddings) == (c.norm_eps, c.max_seq_len,
                                                                                 c.tie_embeddings)
    assert t.rope_parameters["rope_theta"] == c.rope_theta
    assert t.rope_parameters["rope_type"] == ("default" if c.rope_scaling is None else "llama3")
    # ... and its own serialization (transformers 5: rope_parameters) reads back to the same config.
    assert LlamaConfig.from_hf(t.to_dict()) == c


def test_to_hf_keys():
    hf = LlamaConfig.tiny().to_hf()
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
                "vocab_size", "head_dim"]:
        assert key in hf
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]


def test_from_hf_transformers4_style_and_files(tmp_path):
    # transformers 4 wrote rope_theta at the top level and rope_scaling without rope_theta.
    old = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
           "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
           "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert LlamaConfig.from_hf(old) == LlamaConfig.llama32_1b()
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert LlamaConfig.from_hf(tmp_path) == LlamaConfig.llama32_1b()
    assert LlamaConfig.from_hf(tmp_path / "config.json") == LlamaConfig.llama32_1b()
    assert LlamaConfig.from_hf(str(tmp_path)) == LlamaConfig.llama32_1b()


def test_from_hf_errors(tmp_path):
    base = LlamaConfig.tiny().to_hf()
    with pytest.raises(FileNotFoundError):
        LlamaConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="attention_bias"):
        LlamaConfig.from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="silu"):
        LlamaConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig.from_hf({**base, "head_dim": 32})
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf({**base, "model_type": "mistral"})
