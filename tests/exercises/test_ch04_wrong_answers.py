"""Chapter 4's checks reject the stubs and plausible wrong answers, and accept the solutions and
correct answers written differently."""

from __future__ import annotations

import math

import pytest
import torch

from llama_from_scratch.course.checks.ch04_rope import CHECKS

from answers import fails_on, solution, solution_and_stub_tests, stub

SOLUTION = solution("ch04_rope")
STUB = stub("ch04_rope")
fails = fails_on(CHECKS)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, SOLUTION, STUB)


# ----- rotate_half_to_interleaved -----------------------------------------------------------------

def interleave_forward_again(w, n_heads):        # the chapter's direction (even rows, then odd rows) once more
    d = w.shape[0] // n_heads
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return w[torch.cat([h * d + order for h in range(n_heads)])]


def interleave_one_head(w, n_heads):             # ignores the heads: permutes all rows as one block
    rows, dim = w.shape
    return w.reshape(2, rows // 2, dim).transpose(0, 1).reshape(rows, dim)


def interleave_no_transpose(w, n_heads):         # reshapes but forgets to swap the axes
    rows, dim = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, dim).reshape(rows, dim)


@pytest.mark.parametrize("wrong", [interleave_forward_again, interleave_one_head, interleave_no_transpose])
def test_rotate_half_to_interleaved_wrong(wrong):
    assert fails("rotate_half_to_interleaved", wrong)


def test_rotate_half_to_interleaved_other_form_passes():
    def rotate_half_to_interleaved(w, n_heads):  # index arithmetic: new row 2i + c comes from c * d/2 + i
        d = w.shape[0] // n_heads
        within = torch.tensor([(j % 2) * (d // 2) + j // 2 for j in range(d)])
        return torch.stack([w[h * d + within] for h in range(n_heads)]).reshape(w.shape)
    assert CHECKS["rotate_half_to_interleaved"](rotate_half_to_interleaved) is None


# ----- rope_init ----------------------------------------------------------------------------------

def _variant(**changes):
    """The solution's rope_init with one piece replaced."""
    def rope_init(config, seq_len=None):
        p = config["rope_parameters"]
        rope_type, theta = p.get("rope_type", "default"), p["rope_theta"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if changes.get("head_dim_from_hidden"):
            head_dim = config["hidden_size"] // config["num_attention_heads"]
        dim = head_dim if changes.get("ignore_partial") else int(head_dim * p.get("partial_rotary_factor", 1.0))
        if rope_type == "dynamic":
            max_len, factor = config["max_position_embeddings"], p["factor"]
            n = max_len if seq_len is None else (seq_len if changes.get("no_clamp") else max(seq_len, max_len))
            exponent = 1.0 if changes.get("no_exponent") else dim / (dim - 2)
            theta = theta * (factor * n / max_len - (factor - 1)) ** exponent
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
        if rope_type == "linear":
            inv_freq = inv_freq * p["factor"] if changes.get("linear_multiplies") else inv_freq / p["factor"]
        elif rope_type == "llama3":
            factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            original = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            smooth = (original / wavelen - low) / (high - low)
            if changes.get("blend_swapped"):
                blended = (1 - smooth) * inv_freq + smooth * inv_freq / factor
            else:
                blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
            inv_freq = torch.where(wavelen > original / low, inv_freq / factor,
                                   torch.where(wavelen < original / high, inv_freq, blended))
        return inv_freq, 1.0
    return rope_init


@pytest.mark.parametrize("change", ["head_dim_from_hidden", "ignore_partial", "no_clamp", "no_exponent",
                                   "linear_multiplies", "blend_swapped"])
def test_rope_init_wrong(change):
    assert fails("rope_init", _variant(**{change: True}))


def test_rope_init_right_variant_passes():    # the test's own variant machinery is right when nothing changes
    assert CHECKS["rope_init"](_variant()) is None


def test_rope_init_other_form_passes():
    def rope_init(config, seq_len=None):       # float64 arithmetic, a loop over the pairs for llama3
        p = config["rope_parameters"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
        theta = p["rope_theta"]
        if p["rope_type"] == "dynamic":
            n = max(seq_len or 0, config["max_position_embeddings"])
            theta *= (p["factor"] * n / config["max_position_embeddings"] - p["factor"] + 1) ** (dim / (dim - 2))
        freqs = [theta ** (-2 * i / dim) for i in range(dim // 2)]
        if p["rope_type"] == "linear":
            freqs = [f / p["factor"] for f in freqs]
        if p["rope_type"] == "llama3":
            orig, lo, hi, fac = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                                 p["factor"])
            out = []
            for f in freqs:
                f32 = float(torch.tensor(f, dtype=torch.float32))
                wl = 2 * math.pi / f32
                if wl < orig / hi:
                    out.append(f32)
                elif wl > orig / lo:
                    out.append(f32 / fac)
                else:
                    s = (orig / wl - lo) / (hi - lo)
                    out.append((1 - s) * f32 / fac + s * f32)
            freqs = out
        return torch.tensor(freqs, dtype=torch.float32), 1.0
    assert CHECKS["rope_init"](rope_init) is None


# ----- yarn_init ----------------------------------------------------------------------------------

def _yarn_variant(**changes):
    def yarn_init(config):
        p = config["rope_parameters"]
        base, original = p["rope_theta"], p["original_max_position_embeddings"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
        factor = p.get("factor") or config["max_position_embeddings"] / original

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scaling = p.get("attention_factor")
        if scaling is None:
            if p.get("mscale") and p.get("mscale_all_dim") and not changes.get("ignore_mscale"):
                scaling = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                scaling = mscale(factor)

        def correction_dim(turns):
            return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

        fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
        if changes.get("betas_swapped"):
            fast, slow = slow, fast
        low, high = correction_dim(fast), correction_dim(slow)
        if p.get("truncate", True) or changes.get("always_truncate"):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        if changes.get("ramp_reversed"):
            ramp = 1 - ramp
        pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        return 1.0 / (factor * pos) * ramp + 1.0 / pos * (1 - ramp), float(scaling)
    return yarn_init


@pytest.mark.parametrize("change", ["ignore_mscale", "betas_swapped", "always_truncate", "ramp_reversed"])
def test_yarn_init_wrong(change):
    assert fails("yarn_init", _yarn_variant(**{change: True}))


def test_yarn_init_without_factor_fallback_fails():
    def yarn_init(config):                     # crashes when factor is None
        config = {**config, "rope_parameters": {**config["rope_parameters"]}}
        if config["rope_parameters"]["factor"] is None:
            raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'float'")
        return _yarn_variant()(config)
    assert fails("yarn_init", yarn_init)


def test_yarn_init_right_variant_passes():
    assert CHECKS["yarn_init"](_yarn_variant()) is None


def test_yarn_init_other_form_passes():
    def yarn_init(config):                     # ramp with torch.linspace-free arithmetic, float64 frequencies
        p = config["rope_parameters"]
        hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        dim = int(hd * p.get("partial_rotary_factor", 1.0))
        L, base = p["original_max_position_embeddings"], p["rope_theta"]
        f = p["factor"] if p["factor"] is not None else config["max_position_embeddings"] / L
        ms = lambda s, m=1.0: 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0  # noqa: E731
        if p.get("attention_factor") is not None:
            a = p["attention_factor"]
        elif p.get("mscale") and p.get("mscale_all_dim"):
            a = ms(f, p["mscale"]) / ms(f, p["mscale_all_dim"])
        else:
            a = ms(f)
        cd = [dim * math.log(L / (r * 2 * math.pi)) / (2 * math.log(base))
              for r in (p.get("beta_fast") or 32, p.get("beta_slow") or 1)]
        lo, hi = (math.floor(cd[0]), math.ceil(cd[1])) if p.get("truncate", True) else cd
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        out = []
        for i in range(dim // 2):
            r = min(max((float(torch.tensor(i - lo, dtype=torch.float32)) / (hi - lo)), 0.0), 1.0)
            e = float(1.0 / torch.tensor(base, dtype=torch.float32) ** torch.tensor(2 * i / dim, dtype=torch.float32))
            out.append(e / f * r + e * (1 - r))
        return torch.tensor(out, dtype=torch.float32), float(a)
    assert CHECKS["yarn_init"](yarn_init) is None


# ----- apply_rotary -------------------------------------------------------------------------------

def _rotary_variant(**changes):
    def apply_rotary(q, k, position_ids, inv_freq, attention_scaling=1.0):
        if changes.get("first_row_positions"):
            position_ids = position_ids[:1].expand_as(position_ids)
        pos = position_ids[..., None]
        angles = pos.to(q.dtype) * inv_freq.to(q.dtype) if changes.get("angles_in_dtype") else pos.float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        scale = 1.0 if changes.get("no_scaling") else attention_scaling
        cos, sin = (emb.cos() * scale).to(q.dtype)[:, None], (emb.sin() * scale).to(q.dtype)[:, None]
        r = emb.shape[-1]

        def rotate(x):
            if changes.get("interleaved"):
                x_rot = x[..., :r]
                pairs = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
                c = cos[..., : r // 2].repeat_interleave(2, dim=-1)
                s = sin[..., : r // 2].repeat_interleave(2, dim=-1)
                return torch.cat((x_rot * c + pairs * s, x[..., r:]), dim=-1)
            if changes.get("split_whole_head"):
                d = x.shape[-1]
                x1, x2 = x[..., : d // 2], x[..., d // 2:]
                half = torch.cat((-x2, x1), dim=-1)[..., :r]
                return torch.cat((x[..., :r] * cos + half * sin, x[..., r:]), dim=-1)
            x_rot, x_pass = x[..., :r], x[..., r:]
            x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
            return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)

        return rotate(q), rotate(k)
    return apply_rotary


@pytest.mark.parametrize("change", ["first_row_positions", "angles_in_dtype", "no_scaling", "interleaved",
                                    "split_whole_head"])
def test_apply_rotary_wrong(change):
    assert fails("apply_rotary", _rotary_variant(**{change: True}))


def test_apply_rotary_right_variant_passes():
    assert CHECKS["apply_rotary"](_rotary_variant()) is None


def test_apply_rotary_other_form_passes():
    def apply_rotary(q, k, position_ids, inv_freq, attention_scaling=1.0):   # complex numbers z = x1 + i x2
        r = 2 * inv_freq.shape[0]
        angles = position_ids[:, None, :, None].float() * inv_freq.float()
        turn = torch.polar(torch.full_like(angles, float(attention_scaling)), angles)

        def rotate(x):
            z = torch.complex(x[..., : r // 2].float(), x[..., r // 2: r].float()) * turn
            return torch.cat((z.real.to(x.dtype), z.imag.to(x.dtype), x[..., r:]), dim=-1)

        return rotate(q), rotate(k)
    assert CHECKS["apply_rotary"](apply_rotary) is None
