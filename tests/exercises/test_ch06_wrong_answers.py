"""Chapter 6's checks reject the stubs and plausible wrong answers, and accept the solutions and
correct answers written differently.

The capstone's wrong loaders are built from the solution's loaded weights and its wrong answers
from transformers' reference generation (both cached), so that each costs a fraction of a second
rather than a load of the file or a generation."""

from __future__ import annotations

import math

import pytest
import regex
import torch
from torch import nn

from llama_from_scratch.course.checks.ch06_llama_model import CHECKS, reference_answer, reference_prompt

from answers import fails_on, solution, solution_and_stub_tests, stub

SOLUTION = solution("ch06_llama_model")
STUB = stub("ch06_llama_model")
QUESTION = "What is the capital of France?"

NEEDS_WEIGHTS = {"GGUFTokenizer", "load_llama_from_gguf", "ask_smollm2"}  # read the SmolLM2 GGUF
EXERCISES = [pytest.param(name, marks=pytest.mark.smollm2) if name in NEEDS_WEIGHTS else name for name in CHECKS]
fails = fails_on(CHECKS)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, SOLUTION, STUB, EXERCISES)


# ----- dequantize_ggml --------------------------------------------------------------------------

def _dequant_variant(**changes):
    """The solution's algorithm with one mistake, written in torch."""
    def dequantize_ggml(raw, ggml_type, shape):
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        dtype = torch.float64 if changes.get("float64") else torch.float32
        if ggml_type == "F32":
            values = data.view(torch.float32).to(dtype)
        elif ggml_type == "F16" or (ggml_type == "BF16" and changes.get("bf16_as_f16")):
            values = data.view(torch.float16).to(dtype)
        elif ggml_type == "BF16":
            values = data.view(torch.bfloat16).to(dtype)
        else:
            size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}[ggml_type]
            blocks = data.view(-1, size)
            n_consts = 2 if ggml_type in ("Q4_1", "Q5_1") else 1
            consts = blocks[:, : 2 * n_consts].contiguous().view(torch.float16).to(dtype)
            rest = blocks[:, 2 * n_consts:]
            if ggml_type == "Q8_0":
                q = rest.contiguous().view(torch.int8).to(dtype)
            else:
                high = torch.zeros(1, dtype=torch.int64)
                if ggml_type.startswith("Q5"):
                    qh = rest[:, :4].to(torch.int64)
                    order = [3, 2, 1, 0] if changes.get("qh_big_endian") else [0, 1, 2, 3]
                    word = sum(qh[:, i:i + 1] << (8 * k) for k, i in enumerate(order))
                    bits = torch.arange(32)
                    if changes.get("qh_reversed"):
                        bits = 31 - bits
                    high = ((word >> bits) & 1) << 4
                    rest = rest[:, 4:]
                rest = rest.to(torch.int64)
                if changes.get("interleaved_nibbles"):
                    nib = torch.stack([rest & 0x0F, rest >> 4], dim=-1).flatten(1)
                else:
                    nib = torch.cat([rest & 0x0F, rest >> 4], dim=1)
                q = (nib | high).to(dtype)
                if ggml_type == "Q4_0":
                    q -= 8
                elif ggml_type == "Q5_0":
                    q -= 8 if changes.get("q5_0_offset_8") else 16
            values = consts[:, :1] * q
            if n_consts == 2 and not changes.get("no_min"):
                values = values + consts[:, 1:]
        out = values.reshape(tuple(shape) if changes.get("shape_not_reversed") else tuple(reversed(shape)))
        return out.to(torch.float32)
    return dequantize_ggml


def test_dequantize_correct_in_torch_and_float64_passes():
    assert CHECKS["dequantize_ggml"](_dequant_variant()) is None
    assert CHECKS["dequantize_ggml"](_dequant_variant(float64=True)) is None  # every product and sum is exact in float64


@pytest.mark.parametrize("change", ["shape_not_reversed", "q5_0_offset_8", "qh_reversed", "qh_big_endian",
                                    "bf16_as_f16", "no_min", "interleaved_nibbles"])
def test_dequantize_wrong(change):
    assert fails("dequantize_ggml", _dequant_variant(**{change: True}))


# ----- GGUFTokenizer ----------------------------------------------------------------------------

def _tokenizer_variant(change):
    base = SOLUTION["GGUFTokenizer"]

    class GGUFTokenizer(base):
        def __init__(self, path):
            super().__init__(path)
            if change == "latin1_alphabet":
                self.byte_char = {b: chr(b) for b in range(256)}
                self.char_byte = {c: b for b, c in self.byte_char.items()}
            if change == "eos_is_bos":
                self.eos_id = 1

        def _bpe(self, chunk):
            symbols = [s for s in (self.byte_char[b] for b in chunk.encode("utf-8")) if s in self.ids]
            while len(symbols) > 1:
                pairs = list(zip(symbols, symbols[1:]))
                if change == "leftmost_merge":
                    found = [i for i, p in enumerate(pairs) if p in self.ranks]
                    if not found:
                        break
                    i = found[0]
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                    continue
                best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
                if best not in self.ranks:
                    break
                merged, i = [], 0  # chapter 1's merge: every non-overlapping occurrence, left to right
                while i < len(symbols):
                    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                        merged.append(symbols[i] + symbols[i + 1])
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            return [self.ids[s] for s in symbols]

        def encode(self, text):
            pieces = [text] if change == "no_special_split" else self.special_pattern.split(text)
            ids = []
            for piece in pieces:
                if piece in self.specials and change != "no_special_split":
                    ids.append(self.ids[piece])
                    continue
                chunks = [piece] if change == "no_pretokenizer" else regex.findall(SOLUTION["GPT2_SPLIT_PATTERN"], piece)
                for chunk in chunks:
                    ids += self._bpe(chunk)
            return ids

        def decode(self, ids):
            text = super().decode(ids)
            if change == "decode_ignore":
                return text.replace("\ufffd", "")
            return text

    return GGUFTokenizer


@pytest.mark.smollm2
def test_tokenizer_merging_all_occurrences_passes():
    assert CHECKS["GGUFTokenizer"](_tokenizer_variant(None)) is None


@pytest.mark.smollm2
@pytest.mark.parametrize("change", ["latin1_alphabet", "eos_is_bos", "leftmost_merge", "no_special_split",
                                    "no_pretokenizer", "decode_ignore"])
def test_tokenizer_wrong(change):
    assert fails("GGUFTokenizer", _tokenizer_variant(change))


# ----- LlamaBlock -------------------------------------------------------------------------------

def _rope(x, theta, interleaved=False):
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(t).float()[:, None] * inv[None, :]
    if interleaved:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    return x * cos + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * sin


def _block_variant(change):
    base = SOLUTION["LlamaBlock"]

    class LlamaBlock(base):
        def norm(self, x, weight):
            ms = x.pow(2).mean(-1, keepdim=True)
            if change == "eps_outside_sqrt":
                return weight * x / (ms.sqrt() + self.eps)
            return weight * x / torch.sqrt(ms + self.eps)

        def attention(self, x):
            b, t, dim = x.shape
            a = self.self_attn
            head_dim = dim // self.n_heads
            q = a.q_proj(x).view(b, t, self.n_heads, head_dim).transpose(1, 2)
            k = a.k_proj(x).view(b, t, self.n_kv_heads, head_dim).transpose(1, 2)
            v = a.v_proj(x).view(b, t, self.n_kv_heads, head_dim).transpose(1, 2)
            interleaved = change == "interleaved_rope"
            q, k = _rope(q, self.theta, interleaved), _rope(k, self.theta, interleaved)
            if change == "rope_on_v":
                v = _rope(v, self.theta)
            n_rep = self.n_heads // self.n_kv_heads
            outs = []
            for h in range(self.n_heads):  # one head at a time, an additive mask
                kv = (h % self.n_kv_heads) if change == "tiled_kv_heads" else h // n_rep
                scale = math.sqrt(dim if change == "scale_by_dim" else head_dim)
                scores = q[:, h] @ k[:, kv].transpose(-1, -2) / scale
                if change != "no_causal_mask":
                    scores = scores + torch.full((t, t), float("-inf")).triu(1)
                outs.append(torch.softmax(scores, -1) @ v[:, kv])
            return a.o_proj(torch.stack(outs, 1).transpose(1, 2).reshape(b, t, dim))

        def forward(self, x):
            n1, n2 = self.input_layernorm.weight, self.post_attention_layernorm.weight
            m = self.mlp
            mlp = lambda h: m.down_proj(nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))  # noqa: E731
            if change == "post_norm":
                h = self.norm(x + self.attention(x), n1)
                return self.norm(h + mlp(h), n2)
            h = x + self.attention(self.norm(x, n1))
            if change == "no_mlp_residual":
                return mlp(self.norm(h, n2))
            return h + mlp(self.norm(h, n2))

    return LlamaBlock


def test_block_per_head_loop_passes():
    assert CHECKS["LlamaBlock"](_block_variant(None)) is None


@pytest.mark.parametrize("change", ["eps_outside_sqrt", "interleaved_rope", "rope_on_v", "tiled_kv_heads",
                                    "scale_by_dim", "no_causal_mask", "post_norm", "no_mlp_residual"])
def test_block_wrong(change):
    assert fails("LlamaBlock", _block_variant(change))


# ----- load_llama_from_gguf ---------------------------------------------------------------------

def _interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_qk: rotate-half rows back to the file's interleaved order."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _loader_variant(change):
    """A loader with one mistake, built from the solution's loaded weights (no second dequantization)."""
    def load_llama_from_gguf(path):
        tokenizer, correct = SOLUTION["smollm2_once"](path)
        meta = {key: field.contents() for key, field in SOLUTION["read_gguf_file"](path).fields.items()
                if key.startswith("llama.")}
        n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
        state = {}
        for name, w in correct.state_dict().items():
            if name.endswith("q_proj.weight") and change in ("no_permutation",):
                w = _interleave(w, n_heads)
            elif name.endswith("k_proj.weight") and change in ("no_permutation", "only_q_permuted"):
                w = _interleave(w, n_kv)
            state[name] = w
        with torch.device("meta"):
            model = SOLUTION["LlamaModel"](
                vocab_size=len(tokenizer.tokens), dim=meta["llama.embedding_length"], n_layers=meta["llama.block_count"],
                n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=meta["llama.feed_forward_length"],
                norm_eps=1e-6 if change == "default_norm_eps" else meta["llama.attention.layer_norm_rms_epsilon"],
                rope_theta=10000.0 if change == "default_rope_theta" else meta["llama.rope.freq_base"])
        state.pop("lm_head.weight")
        model.load_state_dict(state, strict=False, assign=True)
        if change == "untied_head":
            model.lm_head.weight = nn.Parameter(torch.zeros_like(state["model.embed_tokens.weight"]))
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.requires_grad_(False).eval()
    return load_llama_from_gguf


def test_interleave_undoes_permute_qk():
    w = torch.randn(12, 5)
    assert torch.equal(_interleave(SOLUTION["permute_qk"](w, 3), 3), w)


@pytest.mark.smollm2
@pytest.mark.parametrize("change", ["no_permutation", "only_q_permuted", "default_rope_theta", "default_norm_eps",
                                    "untied_head"])
def test_loader_wrong(change):
    assert fails("load_llama_from_gguf", _loader_variant(change))


# ----- ask_smollm2 ------------------------------------------------------------------------------

def _correct_run() -> tuple[list[int], int]:
    """The right ids for 10 new tokens (the model ends its turn before), and the prompt's length."""
    return reference_answer(QUESTION, 10)[0], len(reference_prompt(QUESTION))


def _ask_variant(change):
    def ask_smollm2(path, question, max_new_tokens):
        tokenizer = SOLUTION["smollm2_once"](path)[0]
        ids, n_prompt = _correct_run()
        prompt, generated = ids[:n_prompt], ids[n_prompt:]
        eos = tokenizer.eos_id
        if change == "pieces_encoded_separately":  # correct: the special tokens' ids put in by hand
            im_start, im_end = tokenizer.encode("<|im_start|>"), tokenizer.encode("<|im_end|>")
            prompt = (im_start + tokenizer.encode(f"system\n{SOLUTION['DEFAULT_SYSTEM_PROMPT']}") + im_end
                      + tokenizer.encode("\n") + im_start + tokenizer.encode(f"user\n{question}") + im_end
                      + tokenizer.encode("\n") + im_start + tokenizer.encode("assistant\n"))
        if change == "no_system_prompt":
            prompt = tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        if change == "no_eos_stop":
            generated = generated + tokenizer.encode("\n<|im_start|>user\n")
        n = max_new_tokens + (1 if change == "one_too_many" else -1 if change == "one_too_few" else 0)
        generated = generated[:n]
        answer_ids = generated if change == "eos_in_text" else [i for i in generated if i != eos]
        text = tokenizer.decode(prompt + answer_ids if change == "text_with_prompt" else answer_ids)
        return prompt + generated, text
    return ask_smollm2


@pytest.mark.smollm2
def test_ask_with_pieces_encoded_separately_passes():
    assert CHECKS["ask_smollm2"](_ask_variant("pieces_encoded_separately")) is None


@pytest.mark.smollm2
@pytest.mark.parametrize("change", ["no_system_prompt", "no_eos_stop", "one_too_many", "one_too_few", "eos_in_text",
                                    "text_with_prompt"])
def test_ask_wrong(change):
    assert fails("ask_smollm2", _ask_variant(change))
