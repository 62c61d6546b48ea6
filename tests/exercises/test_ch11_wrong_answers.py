"""Chapter 11's checks reject the stubs and plausible wrong answers, and accept the solutions and
correct answers written differently.

Each wrong answer is the solution with one line changed (the mistake a learner would make); the
notebook's definitions are loaded as the grader loads them (imports, functions, classes, ALL_CAPS
constants), and the checks get the answer as the notebook's ``check`` gives it (``LocalObject``)."""

from __future__ import annotations

import ast

import pytest

from llama_from_scratch.course.checks.ch11_quantization import CHECKS
from llama_from_scratch.course.grade import LocalObject
from llama_from_scratch.course.notebook_source import EXERCISE_MARKER, cell_source, read_notebook, replace_solutions

from answers import REPO, edited_solution_tests

NOTEBOOK = read_notebook(REPO / "solutions" / "ch11_quantization.ipynb")
CELLS = [cell_source(c) for c in NOTEBOOK["cells"] if c["cell_type"] == "code"]


def _exercise(source: str) -> str | None:
    match = EXERCISE_MARKER.search(source)
    return match["name"] if match else None


def _definitions(source: str) -> ast.Module:
    tree = ast.parse(source)
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    tree.body = [n for n in tree.body if isinstance(n, keep) or (
        isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))]
    return tree


def namespace(name: str | None = None, old: str = "", new: str = "", stub: bool = False) -> dict:
    """The notebook's definitions, with exercise ``name``'s cell changed (``old`` -> ``new``) or stubbed."""
    ns: dict = {}
    for source in CELLS:
        if name is not None and _exercise(source) == name:
            if stub:
                source = replace_solutions(source)
            else:
                assert old in source, f"{old!r} is not in the solution of {name}"
                source = source.replace(old, new)
        exec(compile(_definitions(source), "<cell>", "exec"), ns)
    return ns


run, fails, test_solution_passes, test_stub_fails = edited_solution_tests(CHECKS, namespace, LocalObject)


# ----- quantize_4bit ------------------------------------------------------------------------------

QUANTIZE_WRONG = {
    "nearest by argmin of the distances": (
        "codes = torch.bucketize(scaled.clamp(-1, 1), (code[:-1] + code[1:]) / 2).to(torch.uint8)",
        "codes = (scaled.clamp(-1, 1)[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)"),
    "first code in the low nibble": ("((codes[0::2] << 4) | codes[1::2])", "((codes[1::2] << 4) | codes[0::2])"),
    "partial block without the 1e-38 floor": ("tail_absmax = flat[full:].abs().max().clamp(min=1e-38)",
                                              "tail_absmax = flat[full:].abs().max()"),
    "FP4 table searched unsorted": ("order = torch.sort(table, stable=True).indices", "order = torch.arange(16)"),
    "odd count padded with code 0": ("7 if quant_type == \"nf4\" else 0", "0"),
    "scales in the input dtype": ("flat = x.reshape(-1).float()", "flat = x.reshape(-1)"),
}


@pytest.mark.parametrize("wrong", list(QUANTIZE_WRONG))
def test_quantize_4bit_wrong(wrong):
    assert fails("quantize_4bit", *QUANTIZE_WRONG[wrong])


def test_quantize_4bit_other_form_passes():
    # midpoints counted by comparison, pairs packed through a view
    ns = namespace("quantize_4bit",
                   "codes = torch.bucketize(scaled.clamp(-1, 1), (code[:-1] + code[1:]) / 2).to(torch.uint8)",
                   "codes = (scaled.clamp(-1, 1)[:, None] > (code[:-1] + code[1:]) / 2).sum(dim=1).to(torch.uint8)")
    assert run("quantize_4bit", ns) is None
    packed_by_view = namespace("quantize_4bit", "((codes[0::2] << 4) | codes[1::2])[:, None]",
                               "((codes.view(-1, 2)[:, 0] << 4) | codes.view(-1, 2)[:, 1])[:, None]")
    assert run("quantize_4bit", packed_by_view) is None


# ----- LinearNF4 ----------------------------------------------------------------------------------

LINEAR_WRONG = {
    "scales quantized without the offset": ("offset = absmax.mean()", "offset = torch.zeros(())"),
    "scale blocks of 64": ("quantize_blockwise(absmax - offset, DYNAMIC_MAP, 256)",
                           "quantize_blockwise(absmax - offset, DYNAMIC_MAP, 64)"),
    "offset forgotten when dequantizing": ("DYNAMIC_MAP[self.absmax_q.long()] * absmax2 + self.absmax_offset",
                                           "DYNAMIC_MAP[self.absmax_q.long()] * absmax2"),
    "second-level scales tiled, not repeated": ("self.absmax2.repeat_interleave(256)", "self.absmax2.repeat(256)"),
    "low nibble first": ("torch.stack([packed >> 4, packed & 15], dim=1)",
                         "torch.stack([packed & 15, packed >> 4], dim=1)"),
    "computed in x's dtype": ("return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)",
                              "return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))"),
    "result left in compute_dtype": ("return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)",
                                     "return F.linear(x.to(self.compute_dtype), weight, bias)"),
    "bias trainable": ("nn.Parameter(bias.detach().clone(), requires_grad=False)",
                       "nn.Parameter(bias.detach().clone())"),
}


@pytest.mark.parametrize("wrong", list(LINEAR_WRONG))
def test_linear_nf4_wrong(wrong):
    fails("LinearNF4", *LINEAR_WRONG[wrong])


def test_linear_nf4_byte_table_passes():
    # dequantize through a 256-row table: both values of a byte in one lookup
    run("LinearNF4", namespace(
        "LinearNF4",
        "        codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()\n"
        "        return (NF4_CODE[codes] * ",
        "        table = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)\n"
        "        values = table[packed.long()].reshape(-1)[:n]\n"
        "        return (values * "))


# ----- qlora_step (capstone) ----------------------------------------------------------------------

STEP_WRONG = {
    "base left in float32": (
        "names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]", "names = []"),
    "output layer quantized too": (
        "names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output]",
        "names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]"),
    "double quantization ignored": ("LinearNF4(linear.weight.detach(), linear.bias, blocksize, double_quant)",
                                    "LinearNF4(linear.weight.detach(), linear.bias, blocksize, False)"),
    "block size ignored": ("LinearNF4(linear.weight.detach(), linear.bias, blocksize, double_quant)",
                           "LinearNF4(linear.weight.detach(), linear.bias, 64, double_quant)"),
    "SGD instead of AdamW": ("torch.optim.AdamW(params.values(), lr=lr)", "torch.optim.SGD(params.values(), lr=lr)"),
    "Adam without weight decay": ("torch.optim.AdamW(params.values(), lr=lr)",
                                  "torch.optim.Adam(params.values(), lr=lr)"),
    "no optimizer step": ("    optimizer.step()\n", ""),
    "adapters not loaded": (
        "missing, unexpected = model.load_state_dict(adapters, strict=False)", "missing, unexpected = [], []"),
    "labels not shifted": ("loss = model(input_ids=input_ids, labels=labels).loss",
                           "logits = model(input_ids=input_ids).logits\n"
                           "    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))"),
}


@pytest.mark.parametrize("wrong", list(STEP_WRONG))
def test_qlora_step_wrong(wrong):
    fails("qlora_step", *STEP_WRONG[wrong])


def test_qlora_step_own_loss_passes():
    # the shifted cross-entropy written out instead of transformers' labels loss
    run("qlora_step", namespace(
        "qlora_step", "loss = model(input_ids=input_ids, labels=labels).loss",
        "logits = model(input_ids=input_ids).logits.float()\n"
        "    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), "
        "ignore_index=-100)"))
