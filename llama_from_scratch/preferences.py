"""The project's preference pairs (chapter 12): loading them, and the Llama 2 margin.

A preference pair is a prompt with two answers, the one a person preferred (``chosen``) and the
other (``rejected``); a reward model learns to score ``chosen`` higher. The pairs in
``data/preferences`` also say *how much* better the chosen answer is, as a ``strength`` from 1
(slightly better) to 3 (clearly better). The Llama 2 paper (Touvron et al., 2023, section 3.2.2)
turns such a rating into a margin ``m`` in the ranking loss

    loss = -log sigmoid(r_chosen - r_rejected - m)

so that the reward model must separate clearly different answers by more than slightly different
ones. :func:`preference_margin` gives Llama 2's two margin scales (its Table 28), and
``llama_from_scratch.reward.reward_loss(chosen, rejected, margin)`` takes the result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llama_from_scratch.data_files import find_data_dir, read_jsonl

SPLITS = ("train", "test", "all")
KINDS = ("correctness", "concision", "style", "refusal")
FIELDS = ("prompt", "chosen", "rejected", "strength", "kind", "category")

# Llama 2, Table 28: the margin for each preference rating. Our strengths 1, 2, 3 are its
# "slightly better", "better" and "significantly better" ("negligibly better / unsure" would be 0,
# and such pairs are not in the data).
MARGIN_SCALES: dict[str, dict[int, float]] = {
    "small": {1: 1 / 3, 2: 2 / 3, 3: 1.0},
    "large": {1: 1.0, 2: 2.0, 3: 3.0},
}


def preferences_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the preference ``train.jsonl`` / ``test.jsonl``.

    Looked up in order: ``data_dir``; ``$LFS_PREFERENCES_DIR``; ``data/preferences`` in the
    repository root next to the package (the editable-install / source-checkout case);
    ``data/preferences`` under the current directory. Raises ``FileNotFoundError`` listing the
    places tried.
    """
    return find_data_dir("preferences", "LFS_PREFERENCES_DIR", "preference data", data_dir)


def load_preferences(split: str = "train", data_dir: str | os.PathLike | None = None,
                     kind: str | None = None) -> list[dict[str, Any]]:
    """The project's preference pairs: ``split`` is ``"train"``, ``"test"`` or ``"all"``.

    Each pair is ``{"prompt", "chosen", "rejected", "strength", "kind", "category"}`` (see
    ``data/preferences/README.md``); ``kind`` (one of :data:`KINDS`) keeps only the pairs that test
    that signal, e.g. to report a reward model's accuracy per kind. The folder is found by
    :func:`preferences_dir`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be None or one of {KINDS}, got {kind!r}")
    folder = preferences_dir(data_dir)
    out: list[dict[str, Any]] = []
    for name in (["train", "test"] if split == "all" else [split]):
        path = folder / f"{name}.jsonl"
        for line_no, pair in read_jsonl(path):
            missing = [k for k in FIELDS if k not in pair]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing field(s) {missing}")
            if kind is None or pair["kind"] == kind:
                out.append(pair)
    return out


def preference_margin(strength: int | torch.Tensor, scale: str = "small") -> float | torch.Tensor:
    """Llama 2's margin for a preference ``strength`` (1 slightly, 2, or 3 clearly better).

    ``scale="small"`` gives 1/3, 2/3, 1 and ``scale="large"`` gives 1, 2, 3 (Llama 2, Table 28;
    the paper found the margin helps most on the clearly separable pairs). An int gives a float;
    an integer tensor of strengths (e.g. a batch) gives a float32 tensor of the same shape, ready
    for ``reward_loss(chosen_rewards, rejected_rewards, margin=...)`` (cast it to the rewards'
    dtype there).
    """
    if scale not in MARGIN_SCALES:
        raise ValueError(f"scale must be one of {tuple(MARGIN_SCALES)}, got {scale!r}")
    table = MARGIN_SCALES[scale]
    if isinstance(strength, torch.Tensor):
        if strength.dtype.is_floating_point or strength.dtype == torch.bool or strength.is_complex():
            raise TypeError(f"strength must be an integer tensor, got dtype {strength.dtype}")
        if strength.numel() and not bool(((strength >= 1) & (strength <= 3)).all()):
            bad = strength[(strength < 1) | (strength > 3)].unique().tolist()
            raise ValueError(f"strength must be 1, 2 or 3, got {bad}")
        values = torch.tensor([table[1], table[2], table[3]], dtype=torch.float32, device=strength.device)
        return values[strength.long() - 1]
    if isinstance(strength, bool) or not isinstance(strength, int):
        raise TypeError(f"strength must be an int or an integer tensor, got {type(strength).__name__}")
    if strength not in table:
        raise ValueError(f"strength must be 1, 2 or 3, got {strength}")
    return table[strength]
