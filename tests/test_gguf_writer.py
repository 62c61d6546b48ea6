"""`save_gguf` against three independent readers: the package's own, the `gguf` package, transformers.

Every dtype is written for a tied and an untied tiny Llama (with a tiny byte-level BPE tokenizer)
and read back by

1. `Llama.from_gguf` (this package's reader, dequantizers and q/k permutation);
2. `gguf.GGUFReader` + `gguf.quants.dequantize` (llama.cpp's Python package), tensor by tensor;
3. transformers' `from_pretrained(folder, gguf_file=...)` (model and tokenizer).

Expected values. f32 is exact: the logits read back are `torch.equal` to the original's. For the
other dtypes the independent reference is the original model with each weight matrix replaced by
`gguf.quants.dequantize(gguf.quants.quantize(w))`: the logits read back equal that model's (the
bytes are bit-identical to `gguf.quants.quantize`'s; the tolerance 1e-6 is float32 rounding of a
different summation order, measured 0). The quantization error itself, measured as
max|logits - original logits| / max|original logits| over 12 random tiny models (6 seeds, tied
and untied, std 0.02 weights, 64-wide): f16 6.1e-4, q8_0 1.7e-2, q4_1 0.20, q4_0 0.20 (random
weights of a 64-wide toy are the worst case for 4-bit blocks). The bounds asserted are about
twice those: 1.5e-3, 4e-2, 0.4, 0.4.

Llama 3.1 RoPE scaling travels as llama.cpp stores it, a `rope_freqs.weight` tensor (checked
with the gguf package and read back by `Llama.from_gguf`; transformers' loader ignores that tensor).
llama.cpp itself (`llama-cpp-python`) is optional: its test is skipped with a reason when the
package is not importable.
"""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llama_from_scratch import LlamaConfig, Llama, SmolLM2Tokenizer, apply_lora, read_gguf, save_gguf  # noqa: E402
from llama_from_scratch.gguf_writer import GGUF_WRITE_DTYPES, hf_to_gguf_name, quantize  # noqa: E402
from llama_from_scratch.gguf_reader import dequantize  # noqa: E402
from llama_from_scratch.loading import config_from_gguf, gguf_to_hf_name  # noqa: E402
from llama_from_scratch.rope import permute_qk_for_rotate_half, rope_inv_freq, unpermute_qk  # noqa: E402
from llama_from_scratch.smollm2_tokenizer import bytes_to_unicode  # noqa: E402

DTYPES = list(GGUF_WRITE_DTYPES)
QTYPES = ["Q8_0", "Q4_0", "Q4_1"]
# relative logit error bounds (max |diff| / max |logit|), about twice the measured worst case
QUANT_ERROR_BOUND = {"f16": 1.5e-3, "q8_0": 4e-2, "q4_1": 0.4, "q4_0": 0.4}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> SmolLM2Tokenizer:
    """A byte-level BPE: 3 control tokens, the 256 byte symbols and 13 merges (272 tokens)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "n"), ("e", "r"),
              ("Ġ", "s"), ("a", "t"), ("e", "n"), ("Ġ", "w"), ("o", "r"), ("Ġ", "c")]
    tokens = specials + list(bytes_to_unicode().values()) + [a + b for a, b in merges]
    return SmolLM2Tokenizer(tokens, [f"{a} {b}" for a, b in merges], [3] * 3 + [1] * (len(tokens) - 3),
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0,
                            chat_template=CHAT_TEMPLATE)


def tiny_model(tie: bool, seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=272, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                  tie_embeddings=tie, rope_theta=50000.0, norm_eps=1e-6, max_seq_len=96)
    kwargs.update(overrides)
    model = Llama(LlamaConfig.tiny(**kwargs)).eval()
    with torch.no_grad():  # norms away from 1, so that a norm written wrong would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def reference_quantized(model: Llama, dtype: str) -> Llama:
    """The model with every matrix through `gguf.quants` (quantize then dequantize); norms unchanged.

    Quantization blocks run along rows and the q/k permutation moves whole rows, so quantizing in
    Hugging Face's row order gives the same values as in GGUF's.
    """
    qtype = gguf.GGMLQuantizationType[GGUF_WRITE_DTYPES[dtype][0]]
    ref = Llama(model.config)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                w = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)))
    return ref.eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 272, (2, 16))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, bool], tuple[Path, Llama]]:
    """Every dtype x (tied, untied), written once with the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("gguf_out")
    out = {}
    for tie in (True, False):
        model = tiny_model(tie)
        for dtype in DTYPES:
            path = folder / f"tiny_{'tied' if tie else 'untied'}_{dtype}.gguf"
            assert save_gguf(model, path, tokenizer=tiny_tokenizer(), dtype=dtype) == path
            out[dtype, tie] = (path, model)
    return out


# --- quantizers: bytes equal to gguf.quants.quantize -----------------------------------------------


def _edge_blocks() -> np.ndarray:
    """Blocks that exercise the corner cases of the block formulas (32 values each)."""
    rng = np.random.default_rng(0)
    blocks = [
        np.zeros(32),                                  # d = 0: 1/d taken as 0
        np.full(32, 0.3),                              # constant: Q4_1's d = 0
        np.full(32, -0.3),
        np.linspace(-1, 1, 32),
        np.linspace(-1, 0.5, 32),                      # largest magnitude negative: Q4_0's d > 0
        np.linspace(-0.5, 1, 32),                      # largest magnitude positive: Q4_0's d < 0
        (np.arange(32) - 16) / 2 * (127 / 16),         # halves in Q8_0's units: roundf, not banker's
        (np.arange(32) % 16) + 0.5,                    # halves in Q4_1's units
        np.where(np.arange(32) == 5, 1e4, 1e-3),       # one outlier
        rng.standard_normal(32) * 1e-6,                # fp16 subnormal scales
        rng.standard_normal(32) * 3e4,                 # large values (d still fits in fp16)
    ]
    return np.stack(blocks).astype(np.float32)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_bytes_equal_gguf(qtype: str) -> None:
    rng = np.random.default_rng(1)
    weights = (0.02 * rng.standard_normal((96, 256))).astype(np.float32)
    weights[rng.random(weights.shape) < 0.002] *= 10
    for x in (weights, _edge_blocks()):
        ours = quantize(x, qtype)
        ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]).reshape(-1)
        assert ours.dtype == np.uint8 and ours.shape == ref.shape
        assert np.array_equal(ours, ref), f"{qtype}: {np.sum(ours != ref)} bytes differ"
        # and the package's dequantizer (chapter 6) reads them back as gguf does
        back = dequantize(ours, qtype, x.size)
        assert np.array_equal(back, gguf.quants.dequantize(ref.reshape(x.shape[0], -1),
                                                           gguf.GGMLQuantizationType[qtype]).reshape(-1))


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_quantize_float_types(qtype: str) -> None:
    x = np.random.default_rng(2).standard_normal((4, 40)).astype(np.float32)
    ours = quantize(torch.from_numpy(x), qtype)
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours, np.ascontiguousarray(ref).view(np.uint8).reshape(-1))


def test_quantize_error_is_within_half_a_level() -> None:
    """Q8_0 and Q4_1 round to the nearest level: |error| <= d / 2, plus the fp16 rounding of the
    stored constants (relative 2^-11: up to 127 d 2^-11 for Q8_0, 15 d 2^-11 + |m| 2^-11 for Q4_1)."""
    x = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    for qtype, levels in [("Q8_0", 127), ("Q4_1", 15)]:
        back = dequantize(quantize(x, qtype), qtype, x.size).reshape(x.shape)
        if qtype == "Q8_0":
            d, m = np.abs(x).max(1) / 127, 0.0
        else:
            d, m = (x.max(1) - x.min(1)) / 15, np.abs(x.min(1))
        bound = 0.5 * d + (levels * d + m) * 2.0**-11
        error = np.abs(back - x).max(1)
        assert np.all(error <= bound * (1 + 1e-6))
        assert np.all(error > 0.25 * d)  # and it is a real rounding, not a copy


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize(np.zeros(48, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="Q5_0"):
        quantize(np.zeros(32, np.float32), "Q5_0")


# --- names ----------------------------------------------------------------------------------------


def test_names_are_the_inverse_of_the_loader() -> None:
    model = tiny_model(tie=False)
    for name in model.state_dict():
        assert gguf_to_hf_name(hf_to_gguf_name(name)) == name
    assert hf_to_gguf_name("model.layers.11.mlp.down_proj.weight") == "blk.11.ffn_down.weight"
    with pytest.raises(KeyError, match="no llama.cpp tensor name"):
        hf_to_gguf_name("model.layers.0.self_attn.q_proj.lora_A")


# --- reader 1: Llama.from_gguf ----------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_gguf_logits(written, ids, dtype: str, tie: bool) -> None:
    path, model = written[dtype, tie]
    loaded = Llama.from_gguf(path)
    assert loaded.config == model.config
    with torch.no_grad():
        original = model(ids)
        logits = loaded(ids)
        if dtype == "f32":
            assert torch.equal(logits, original)
            for name, tensor in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], tensor), name
            return
        expected = reference_quantized(model, dtype)(ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    relative = ((logits - original).abs().max() / original.abs().max()).item()
    assert 0 < relative < QUANT_ERROR_BOUND[dtype]
    if tie:  # one matrix, shared again after loading
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# --- reader 2: the gguf package ---------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gguf_package_reads_the_tensors(written, dtype: str, tie: bool) -> None:
    path, model = written[dtype, tie]
    reader = gguf.GGUFReader(str(path))
    state = model.state_dict()
    names = [t.name for t in reader.tensors]
    expected_names = [hf_to_gguf_name(n) for n in state if not (tie and n == "lm_head.weight")]
    assert names[0] == "token_embd.weight" and sorted(names) == sorted(expected_names)
    assert ("output.weight" in names) == (not tie)
    mine = read_gguf(path)
    n_heads = {"attn_q": model.config.n_heads, "attn_k": model.config.n_kv_heads}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        hf_name = gguf_to_hf_name(t.name)
        original = state[hf_name]
        expected_type = "F32" if original.dim() == 1 else GGUF_WRITE_DTYPES[dtype][0]
        assert t.tensor_type.name == expected_type
        assert list(t.shape) == list(reversed(original.shape))  # ggml order
        # the package's reader decodes the same bytes to the same values
        assert np.array_equal(mine.load_tensor(t.name).numpy().reshape(-1), values.reshape(-1))
        tensor = torch.from_numpy(np.array(values)).reshape(original.shape)
        kind = t.name.split(".")[-2]
        if kind in n_heads:  # stored in llama.cpp's interleaved RoPE order
            if dtype == "f32":
                assert not torch.equal(tensor, original)
            tensor = permute_qk_for_rotate_half(tensor, n_heads[kind])
        if expected_type == "F32":
            assert torch.equal(tensor, original), t.name
        else:
            qtype = gguf.GGMLQuantizationType[expected_type]
            ref = gguf.quants.dequantize(gguf.quants.quantize(original.numpy(), qtype), qtype)
            assert np.array_equal(tensor.numpy(), ref), t.name
            # the stored bytes themselves are gguf's
            stored = np.asarray(t.data).reshape(-1)
            raw = gguf.quants.quantize(original.numpy(), qtype)
            if kind in n_heads:
                raw = gguf.quants.quantize(unpermute_qk(original, n_heads[kind]).numpy(), qtype)
            assert np.array_equal(stored.view(np.uint8), np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    mine.close()


def test_file_layout(written) -> None:
    """Header, alignment and sizes as GGUF specifies (read with struct, independently of both readers)."""
    path, model = written["q4_1", False]
    raw = path.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", raw)
    assert (magic, version) == (b"GGUF", 3)
    assert n_tensors == len(model.state_dict())
    info = read_gguf(path)
    assert info.alignment == 32 and info.data_offset % 32 == 0
    assert all(t.offset % 32 == 0 for t in info.tensors.values())
    last = max(info.tensors.values(), key=lambda t: t.offset)
    assert info.file_size == info.data_offset + last.offset + last.n_bytes + (-last.n_bytes % 32)
    assert len(info.metadata) == n_kv


# --- metadata ---------------------------------------------------------------------------------------


def test_metadata_round_trip(written) -> None:
    path, model = written["q8_0", True]
    c = model.config
    tok = tiny_tokenizer()
    md = read_gguf(path).metadata
    expected = {
        "general.architecture": "llama", "general.name": "llama_from_scratch", "general.file_type": 7,
        "general.quantization_version": 2, "llama.vocab_size": 272, "llama.context_length": 96,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tok.tokens, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in tok.merge_ranks],
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 269,
    }
    for key, value in expected.items():
        assert md[key] == value, key
    assert np.float32(md["llama.rope.freq_base"]) == np.float32(c.rope_theta)
    assert np.float32(md["llama.attention.layer_norm_rms_epsilon"]) == np.float32(c.norm_eps)
    assert config_from_gguf(path) == c
    # the gguf package reads the same keys and types
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["llama.rope.freq_base"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert fields["general.name"].contents() == "llama_from_scratch"
    assert fields["tokenizer.ggml.merges"].contents() == expected["tokenizer.ggml.merges"]
    # and the tokenizer rebuilt from the file encodes as the original
    back = SmolLM2Tokenizer.from_gguf(path)
    text = "<|im_start|>the weather in the center<|im_end|> 42"
    assert back.encode(text) == tok.encode(text) and back.chat_template == CHAT_TEMPLATE


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path, ids, dtype: str) -> None:
    """Llama 3.1's RoPE scaling is stored as llama.cpp stores it: a float32 `rope_freqs.weight`
    of head_dim / 2 factors (checked with the gguf package), from which the loader recovers it."""
    model = tiny_model(tie=False, rope_scaling=LLAMA3_SCALING)
    path = save_gguf(model, tmp_path / "llama3.gguf", dtype=dtype)
    reader = gguf.GGUFReader(str(path))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32" and list(freqs.shape) == [8]
    plain, scaled = rope_inv_freq(16, 50000.0), rope_inv_freq(16, 50000.0, LLAMA3_SCALING)
    torch.testing.assert_close(torch.from_numpy(np.array(freqs.data)), plain / scaled, rtol=0, atol=0)
    assert 1.0 in freqs.data and 8.0 in freqs.data  # high frequencies kept, low ones slowed 8x
    loaded = Llama.from_gguf(path)
    assert loaded.config == model.config
    with torch.no_grad():
        expected = model(ids) if dtype == "f32" else reference_quantized(model, dtype)(ids)
        torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=1e-6)


def test_without_tokenizer(tmp_path) -> None:
    model = tiny_model(tie=True)
    path = save_gguf(model, tmp_path / "m.gguf", name="tiny")
    md = read_gguf(path).metadata
    assert not any(k.startswith("tokenizer.") for k in md) and md["general.name"] == "tiny"
    assert Llama.from_gguf(path).config == model.config  # vocab size from llama.vocab_size


# --- reader 3: transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_reads_the_file(written, ids, dtype: str, tie: bool) -> None:
    transformers = pytest.importorskip("transformers")
    path, model = written[dtype, tie]
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tie
    assert hf.config.num_key_value_heads == 2 and hf.config.rms_norm_eps == pytest.approx(1e-6)
    with torch.no_grad():
        logits = hf(ids).logits
        ours = Llama.from_gguf(path)(ids)
        expected = model(ids) if dtype == "f32" else reference_quantized(model, dtype)(ids)
    torch.testing.assert_close(logits, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_transformers_rebuilds_the_tokenizer(written) -> None:
    transformers = pytest.importorskip("transformers")
    path, _ = written["f32", True]
    tok = tiny_tokenizer()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the cat sat on the mat, whatever", "<|im_start|>user\nhi<|im_end|>", "  tabs\tand 123 €"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hello there"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.render_chat(messages)


@pytest.mark.smollm2
def test_requantizing_smollm2_reproduces_llama_cpp_bytes() -> None:
    """The SmolLM2 file was quantized by llama.cpp. Dequantizing a tensor and quantizing it again
    to its own type gives the file's bytes back, for all 210 Q4_1 matrices and the Q8_0 embedding:
    each Q4_1 block's minimum and maximum sit on its levels 0 and 15 (and a Q8_0 block's largest
    magnitude on +-127), so d, m and every q are recovered."""
    from llama_from_scratch import find_smollm2_gguf

    with read_gguf(find_smollm2_gguf()) as g:
        checked = {"Q4_1": 0, "Q8_0": 0}
        for name, info in g.tensors.items():
            if info.ggml_type in checked:
                again = quantize(g.load_tensor(name), info.ggml_type)
                assert np.array_equal(again, np.asarray(g.raw_tensor(name))), name
                checked[info.ggml_type] += 1
    assert checked == {"Q4_1": 210, "Q8_0": 1}


@pytest.mark.smollm2
def test_smollm2_tokenizer_travels(tmp_path) -> None:
    """SmolLM2's real tokenizer (49,152 tokens, 48,900 merges, ChatML template), written with a
    small model, comes back from transformers encoding exactly as the package's tokenizer."""
    transformers = pytest.importorskip("transformers")
    from llama_from_scratch import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    model = tiny_model(tie=True, vocab_size=tok.vocab_size)
    path = save_gguf(model, tmp_path / "smol_tok.gguf", tokenizer=tok, dtype="q8_0")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    messages = [{"role": "user", "content": "What is 12 + 30? Answer in français, s'il vous plaît."}]
    text = tok.render_chat(messages)
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text


# --- llama.cpp (optional) ------------------------------------------------------------------------


def test_llama_cpp_runs_the_file(written, ids) -> None:
    """llama.cpp's own loader and kernels run the q8_0 file: its logits match ours within the
    error of llama.cpp quantizing activations to 8 bits in its q8_0 matmuls."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    path, model = written["q8_0", False]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False)
    tokens = ids[0].tolist()
    llm.eval(tokens)
    theirs = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    with torch.no_grad():
        ours = Llama.from_gguf(path)(ids[:1])[0]
    assert (theirs - ours).abs().max() <= 0.05 * ours.abs().max()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(tmp_path) -> None:
    model = tiny_model(tie=True)
    with pytest.raises(ValueError, match="unknown dtype 'q5_0'; choose one of f32, f16, q4_0, q4_1, q8_0"):
        save_gguf(model, tmp_path / "x.gguf", dtype="q5_0")
    narrow = tiny_model(tie=True, dim=48, n_heads=4, n_kv_heads=2, hidden_dim=96)  # rows of 48: not 32k
    for dtype in ("q8_0", "q4_0", "q4_1"):
        with pytest.raises(ValueError, match=r"blocks of 32 values, but token_embd.weight has rows of 48"):
            save_gguf(narrow, tmp_path / "x.gguf", dtype=dtype)
    save_gguf(narrow, tmp_path / "narrow.gguf", dtype="f16")  # any width is fine unquantized
    with pytest.raises(ValueError, match="tokenizer has 272 tokens but the model's vocab_size is 300"):
        save_gguf(tiny_model(tie=True, vocab_size=300), tmp_path / "x.gguf", tokenizer=tiny_tokenizer())
    with pytest.raises(TypeError, match="SmolLM2Tokenizer"):
        save_gguf(model, tmp_path / "x.gguf", tokenizer="gpt2")
    big = tiny_model(tie=True)
    with torch.no_grad():
        big.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight has values beyond float16's range"):
        save_gguf(big, tmp_path / "x.gguf", dtype="f16")
    odd_scaling = tiny_model(tie=True, rope_scaling=dict(LLAMA3_SCALING, low_freq_factor=2.0))
    with pytest.raises(ValueError, match="GGUF readers assume Llama 3.1's 1 and 4"):
        save_gguf(odd_scaling, tmp_path / "x.gguf")
    broken = tiny_model(tie=True)
    with torch.no_grad():
        broken.model.norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="output_norm.weight has NaN or infinite values"):
        save_gguf(broken, tmp_path / "x.gguf")
    lora = apply_lora(tiny_model(tie=False), r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="merge LoRA adapters"):
        save_gguf(lora, tmp_path / "x.gguf")
