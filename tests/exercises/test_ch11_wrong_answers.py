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
    assert fails("LinearNF4", *LINEAR_WRONG[wrong])


def test_linear_nf4_byte_table_passes():
    # dequantize through a 256-row table: both values of a byte in one lookup
    assert run("LinearNF4", namespace(
        "LinearNF4",
        "        codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()\n"
        "        return (NF4_CODE[codes] * ",
        "        table = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)\n"
        "        values = table[packed.long()].reshape(-1)[:n]\n"
        "        return (values * ")) is None


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
    assert fails("qlora_step", *STEP_WRONG[wrong])


def test_qlora_step_own_loss_passes():
    # the shifted cross-entropy written out instead of transformers' labels loss
    assert run("qlora_step", namespace(
        "qlora_step", "loss = model(input_ids=input_ids, labels=labels).loss",
        "logits = model(input_ids=input_ids).logits.float()\n"
        "    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), "
        "ignore_index=-100)")) is None


# ----- quantize_asymmetric and dequantize_asymmetric ----------------------------------------------


def solution_body(name: str) -> str:
    """The code between the solution markers of exercise ``name`` (to replace as a whole)."""
    (source,) = [s for s in CELLS if _exercise(s) == name]
    return source.split("### BEGIN SOLUTION\n")[1].split("    ### END SOLUTION")[0]

ASYMMETRIC_WRONG = {
    "zero point not rounded (truncated)": ("zero_point = torch.round(-lo / scale).clamp(0, top)",
                                           "zero_point = (-lo / scale).clamp(0, top).floor()"),
    "zero point left unrounded": ("zero_point = torch.round(-lo / scale).clamp(0, top)",
                                  "zero_point = (-lo / scale).clamp(0, top)"),
    "scale from absmax (symmetric)": ("scale = torch.maximum((hi - lo) / top,",
                                      "scale = torch.maximum(2 * torch.maximum(hi, -lo) / top,"),
    "2**bits levels instead of 2**bits - 1": ("scale = torch.maximum((hi - lo) / top,",
                                              "scale = torch.maximum((hi - lo) / 2 ** bits,"),
    "range not stretched to include 0": (
        "lo = torch.minimum(groups.amin(dim=-1), torch.zeros(()))\n"
        "    hi = torch.maximum(groups.amax(dim=-1), torch.zeros(()))",
        "lo = groups.amin(dim=-1)\n    hi = groups.amax(dim=-1)"),
    "rounded after adding the zero point": (
        "q = torch.round(groups * (1 / scale)[..., None]) + zero_point[..., None]",
        "q = torch.round(groups * (1 / scale)[..., None] + zero_point[..., None])"),
    "codes not clamped": ("codes = q.clamp(0, top).to(torch.uint8)", "codes = q.to(torch.uint8)"),
    "divided by the scale": ("q = torch.round(groups * (1 / scale)[..., None])",
                             "q = torch.round(groups / scale[..., None])"),
    "scale not floored (all-zero groups)": (
        "scale = torch.maximum((hi - lo) / top, torch.tensor(torch.finfo(torch.float32).eps))",
        "scale = (hi - lo) / top"),
    "groups across rows (flattened blocks)": (
        "groups = torch.cat([rows, rows[:, -1:].expand(n_rows, pad)], dim=1).reshape(n_rows, n_groups, size)",
        "flat = rows.reshape(-1)\n"
        "    flat = torch.cat([flat, flat[-1:].expand(n_rows * n_groups * size - flat.numel())])\n"
        "    groups = flat.reshape(n_rows, n_groups, size)"),
    "scale multiplied by 1 / L": ("scale = torch.maximum((hi - lo) / top,", "scale = torch.maximum((hi - lo) * (1 / top),"),
}


@pytest.mark.parametrize("wrong", list(ASYMMETRIC_WRONG))
def test_quantize_asymmetric_wrong(wrong):
    assert fails("quantize_asymmetric", *ASYMMETRIC_WRONG[wrong])


def test_quantize_asymmetric_other_forms_pass():
    # a loop over each row's groups (torch.split), with PyTorch's own form of the zero point
    looped = namespace("quantize_asymmetric", solution_body("quantize_asymmetric"), """    top = 2 ** bits - 1
    rows = x.detach().to(torch.float32).flatten(0, -2) if x.dim() > 1 else x.detach().to(torch.float32)[None]
    size = rows.shape[1] if group_size is None else group_size
    codes, scales, zeros = [], [], []
    for row in rows:
        row_codes, row_scales, row_zeros = [], [], []
        for group in torch.split(row, size):
            lo, hi = min(group.min(), torch.tensor(0.0)), max(group.max(), torch.tensor(0.0))
            scale = ((hi - lo) / float(top)).clamp(min=torch.finfo(torch.float32).eps)
            zero = torch.clamp(0 - torch.round(lo / scale), 0, top)
            row_codes.append(torch.clamp(torch.round(group * (1.0 / scale)) + zero, 0, top))
            row_scales.append(scale)
            row_zeros.append(zero)
        codes.append(torch.cat(row_codes))
        scales.append(torch.stack(row_scales))
        zeros.append(torch.stack(row_zeros))
    shape = (*x.shape[:-1], -1)
    return (torch.stack(codes).to(torch.uint8).reshape(x.shape), torch.stack(scales).reshape(shape),
            torch.stack(zeros).to(torch.int32).reshape(shape))
""")
    assert run("quantize_asymmetric", looped) is None
    # codes clamped with torch.where
    where = namespace("quantize_asymmetric", "codes = q.clamp(0, top).to(torch.uint8)",
                      "codes = torch.where(q < 0, 0.0, torch.where(q > top, float(top), q)).to(torch.uint8)")
    assert run("quantize_asymmetric", where) is None


DEQUANTIZE_WRONG = {
    "zero point not subtracted": ("(codes.float() - per_value_zero.float()) * per_value_scale",
                                  "codes.float() * per_value_scale"),
    "codes * scale - zero_point * scale": ("(codes.float() - per_value_zero.float()) * per_value_scale",
                                           "codes.float() * per_value_scale - per_value_zero.float() * per_value_scale"),
    "groups tiled, not repeated": ("scale.repeat_interleave(size, dim=-1)[..., :width]",
                                   "scale.repeat(*[1] * (scale.dim() - 1), size)[..., :width]"),
    "zero points tiled, not repeated": ("zero_point.repeat_interleave(size, dim=-1)[..., :width]",
                                        "zero_point.repeat(*[1] * (zero_point.dim() - 1), size)[..., :width]"),
    "subtracted in uint8 (wraps around)": ("(codes.float() - per_value_zero.float()) * per_value_scale",
                                           "(codes - per_value_zero.to(torch.uint8)).float() * per_value_scale"),
}


@pytest.mark.parametrize("wrong", list(DEQUANTIZE_WRONG))
def test_dequantize_asymmetric_wrong(wrong):
    assert fails("dequantize_asymmetric", *DEQUANTIZE_WRONG[wrong])


def test_dequantize_asymmetric_other_form_passes():
    # the codes padded to whole groups and broadcast against [..., n_groups, 1] parameters
    broadcast = namespace("dequantize_asymmetric", solution_body("dequantize_asymmetric"), """    width = codes.shape[-1]
    n_groups = scale.shape[-1]
    size = width if group_size is None else min(group_size, width)
    padded = F.pad(codes.to(torch.int32), (0, n_groups * size - width)).unflatten(-1, (n_groups, size))
    values = (padded - zero_point[..., None]).to(torch.float32) * scale[..., None]
    return values.flatten(-2)[..., :width]
""")
    assert run("dequantize_asymmetric", broadcast) is None
