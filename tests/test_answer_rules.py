"""Reading an answer for what it must not use: aliases, helpers it calls, methods, obfuscation,
and no false alarms from names the grader never loads or the answer binds itself."""

from __future__ import annotations

import ast

import pytest

from llama_from_scratch.course.answer_rules import first_violation

RULES = ["torch.nn.functional.cross_entropy", "torch.logsumexp", "torch.Tensor.logsumexp"]


def violation(exercise: str, *cells: str) -> str | None:
    return first_violation(exercise, [ast.parse(c) for c in cells], RULES)


@pytest.mark.parametrize("cells", [
    ["import torch.nn.functional as F\ndef loss(z, t):\n    return F.cross_entropy(z, t)"],
    ["from torch.nn.functional import cross_entropy as ce\ndef loss(z, t):\n    return ce(z, t)"],
    ["import torch\ndef helper(z):\n    return torch.logsumexp(z, -1)", "def loss(z, t):\n    return helper(z).mean()"],
    ["def loss(z, t):\n    return z.logsumexp(-1).mean()"],
    ["import torch\ndef loss(z, t):\n    return getattr(torch, 'logsumexp')(z, -1)"],
    ["def loss(z, t):\n    import torch\n    return torch.logsumexp(z, -1)"],
    ["import llama_from_scratch as lfs\ndef loss(z, t):\n    return lfs.cross_entropy(z, t)"],
    ["def loss(z, t):\n    return eval('z.sum()')"],
    ["class Loss:\n    def __call__(self, z):\n        import torch\n        return torch.logsumexp(z, -1)", "def loss(z, t):\n    return Loss()(z)"],
])
def test_forbidden_uses_are_found(cells: list[str]) -> None:
    assert violation("loss", *cells) is not None


@pytest.mark.parametrize("cells", [
    ["import torch\ndef loss(z, t):\n    m = z.amax(-1, keepdim=True)\n    return (m + (z - m).exp().sum(-1, keepdim=True).log()).mean()"],
    # a demo cell's variable that the grader never loads, and a parameter of the same name
    ["import torch\nhelper = torch.logsumexp", "def loss(helper, t):\n    return helper * 2"],
    # the notebook imports the grader's check() for its own cells: not a use by the answer
    ["from llama_from_scratch.grade import check\nimport torch.nn.functional as F\ndef loss(z, t):\n    return z.sum()",
     "check(loss)\nF.cross_entropy"],
])
def test_allowed_answers_are_not_flagged(cells: list[str]) -> None:
    assert violation("loss", *cells) is None
