"""Chapter 10's checks reject the stubs and plausible wrong answers, and accept the solutions and
correct answers written differently.

Each wrong answer is the solution with one line changed (the mistake a learner would make); the
checks get the answer as the notebook's ``check`` gives it (``LocalObject``, which builds the
``Construct`` arguments here)."""

from __future__ import annotations


import pytest

from llama_from_scratch.course.checks.ch10_lora import CHECKS
from llama_from_scratch.course.grade import LocalObject
from llama_from_scratch.course.notebook_source import EXERCISE_MARKER, cell_source, read_notebook, replace_solutions

from answers import REPO, edited_solution_tests

NOTEBOOK = read_notebook(REPO / "solutions" / "ch10_lora.ipynb")
CELLS = [cell_source(c) for c in NOTEBOOK["cells"] if c["cell_type"] == "code"]
IMPORTS = CELLS[0]
EXERCISES = {m["name"]: src for src in CELLS for m in [EXERCISE_MARKER.search(src)] if m}


def namespace(name: str | None = None, old: str = "", new: str = "", stub: bool = False) -> dict:
    """The notebook's definitions, with exercise ``name``'s source changed (``old`` -> ``new``) or stubbed."""
    ns: dict = {}
    exec(IMPORTS, ns)
    for exercise, source in EXERCISES.items():
        if exercise == name:
            if stub:
                source = replace_solutions(source)
            else:
                assert old in source, f"{old!r} is not in the solution of {name}"
                source = source.replace(old, new)
        exec(source, ns)
    return ns


run, fails, test_solution_passes, test_stub_fails = edited_solution_tests(CHECKS, namespace, LocalObject)


# ----- LoRALinear ---------------------------------------------------------------------------------

LORA_WRONG = {
    "B random at init": ("nn.init.zeros_(self.lora_B.weight)", "pass"),
    "rsLoRA ignored": ("alpha / math.sqrt(r) if use_rslora else alpha / r", "alpha / r"),
    "scaling upside down": ("alpha / math.sqrt(r) if use_rslora else alpha / r",
                            "math.sqrt(r) / alpha if use_rslora else r / alpha"),
    "dropout on the base input too": ("result = self.base_layer(x)", "result = self.base_layer(self.lora_dropout(x))"),
    "bfloat16 adapters for a bfloat16 base": (
        "if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:",
        "if not dtype.is_floating_point:"),
    "base not frozen": ("self.base_layer = base_layer.requires_grad_(False)", "self.base_layer = base_layer"),
    "merge twice adds twice": ("        if not self.merged:\n            self.base_layer.weight +=",
                               "        if True:\n            self.base_layer.weight +="),
    "merged layer still adds the branch": ("        if self.merged:\n            return result\n", ""),
    "unmerge adds instead of subtracting": ("weight -= self.get_delta_weight()", "weight += self.get_delta_weight()"),
}


@pytest.mark.parametrize("wrong", list(LORA_WRONG))
def test_lora_linear_wrong(wrong):
    assert fails("LoRALinear", *LORA_WRONG[wrong])


def test_lora_linear_other_order_passes():
    # scaling folded into A's output, products through the weights rather than the modules
    assert run("LoRALinear", namespace(
        "LoRALinear",
        "branch = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))\n"
        "        return (result + branch * self.scaling).to(result.dtype)",
        "h = self.lora_dropout(x.to(self.lora_A.weight.dtype)) @ self.lora_A.weight.T\n"
        "        return (result + (h * self.scaling) @ self.lora_B.weight.T).to(result.dtype)")) is None


# ----- apply_lora ---------------------------------------------------------------------------------

APPLY_WRONG = {
    "substring match": ("any(n == t or n.endswith(\".\" + t) for t in target_modules)",
                        "any(t in n for t in target_modules)"),
    "endswith without the dot": ("any(n == t or n.endswith(\".\" + t) for t in target_modules)",
                                 "any(n.endswith(t) for t in target_modules)"),
    "regex searched, not fully matched": ("re.fullmatch(target_modules, n)", "re.search(target_modules, n)"),
    "all-linear adapts the output layer": (" and m is not output]", "]"),
    "rank_pattern ignored": ("pattern_value(rank_pattern, name, r)", "r"),
    "patterns matched against the whole name": ("re.match(rf\"(.*\\.)?({key})$\", name)", "re.fullmatch(key, name)"),
    "rest of the model not frozen": ("    model.requires_grad_(False)\n", ""),
    "non-linear targets skipped silently": (
        "raise ValueError(f\"target {name!r} is a {type(module).__name__}, not a linear layer\")", "continue"),
}


@pytest.mark.parametrize("wrong", list(APPLY_WRONG))
def test_apply_lora_wrong(wrong):
    assert fails("apply_lora", *APPLY_WRONG[wrong])


def test_apply_lora_other_matching_passes():
    # list matching with a regular expression anchored at a dot (or the start) instead of endswith
    assert run("apply_lora", namespace(
        "apply_lora", "any(n == t or n.endswith(\".\" + t) for t in target_modules)",
        "any(re.search(r\"(^|\\.)\" + re.escape(t) + \"$\", n) for t in target_modules)")) is None


# ----- DoRALinear ---------------------------------------------------------------------------------

DORA_WRONG = {
    "norm not detached": ("self.get_delta_weight().detach(), dim=1).detach()", "self.get_delta_weight(), dim=1)"),
    "magnitude from column norms": ("torch.linalg.norm(self.base_layer.weight, dim=1)",
                                    "torch.linalg.norm(self.base_layer.weight, dim=0)"),
    "bias kept in the base term": (
        "base = result if self.base_layer.bias is None else result - self.base_layer.bias", "base = result"),
    "norm of W alone": ("torch.linalg.norm(weight + self.get_delta_weight().detach(), dim=1)",
                        "torch.linalg.norm(weight, dim=1)"),
    "merge forgets the magnitude": (
        "weight.copy_((self.lora_magnitude_vector / self.norm)[:, None] * (weight + delta))",
        "weight.copy_(weight + delta)"),
    "dropout ignored": ("if isinstance(self.lora_dropout, nn.Identity) or not self.training:", "if True:"),
}


@pytest.mark.parametrize("wrong", list(DORA_WRONG))
def test_dora_linear_wrong(wrong):
    assert fails("DoRALinear", *DORA_WRONG[wrong])


def test_dora_linear_other_norm_passes():
    # the row norm as the square root of a sum of squares
    assert run("DoRALinear", namespace(
        "DoRALinear", "norm = torch.linalg.norm(weight + self.get_delta_weight().detach(), dim=1).detach()",
        "norm = (weight + self.get_delta_weight()).detach().pow(2).sum(dim=1).sqrt()")) is None


# ----- prefix_attention ---------------------------------------------------------------------------

PREFIX_WRONG = {
    "RoPE applied to the prefix keys": (
        "k = torch.cat([prefix_key.expand(bsz, -1, -1, -1), k], dim=2)",
        "k = torch.cat([rope(prefix_key.expand(bsz, -1, -1, -1), torch.arange(p)), k], dim=2)"),
    "positions not offset by the prefix": ("positions = torch.arange(p, p + seq_len)", "positions = torch.arange(seq_len)"),
    "causal mask hides most of the prefix": (".tril(diagonal=p)", ".tril()"),
    "prefix masked like padding": ("torch.cat([torch.ones(bsz, p, dtype=torch.bool), attention_mask.bool()], dim=1)",
                                   "torch.cat([torch.zeros(bsz, p, dtype=torch.bool), attention_mask.bool()], dim=1)"),
    "padding attended": ("allowed = causal & keys_ok[:, None, None, :]", "allowed = causal"),
    "key/value heads tiled instead of grouped": (
        "k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)\n    v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)",
        "k = k.repeat(1, n_heads // n_kv_heads, 1, 1)\n    v = v.repeat(1, n_heads // n_kv_heads, 1, 1)"),
    "prefix keys used as values": ("v = torch.cat([prefix_value.expand", "v = torch.cat([prefix_key.expand"),
}


@pytest.mark.parametrize("wrong", list(PREFIX_WRONG))
def test_prefix_attention_wrong(wrong):
    assert fails("prefix_attention", *PREFIX_WRONG[wrong])


def test_prefix_attention_other_formulation_passes():
    # PyTorch's fused attention with the boolean mask, and the prefix scores taken as a block of their own
    assert run("prefix_attention", namespace(
        "prefix_attention",
        "    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)\n"
        "    scores = scores.masked_fill(~allowed, float(\"-inf\"))\n"
        "    out = torch.softmax(scores, dim=-1) @ v\n",
        "    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)\n")) is None
    assert run("prefix_attention", namespace(
        "prefix_attention",
        "    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)\n",
        "    scores = torch.cat([q @ k[:, :, :p].transpose(-2, -1), q @ k[:, :, p:].transpose(-2, -1)], dim=-1)\n"
        "    scores = scores * head_dim ** -0.5\n")) is None
