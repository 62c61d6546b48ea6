"""The pretraining data pipeline (chapter 8): documents -> one token stream -> fixed-length blocks.

A language model is trained on next-token prediction over fixed-length windows. Documents have
all sorts of lengths, so instead of padding each one we *pack* them: concatenate every document
followed by an end-of-sequence token into one long stream, and cut the stream into blocks of
``block_size + 1`` tokens. Block ``i`` gives the input ``x = block[:-1]`` and the targets
``y = block[1:]`` (each position predicts the token after it). No padding is wasted; the EOS
token teaches the model where documents end. (Attention still crosses document boundaries inside
a block, as in GPT-2 / nanoGPT; the EOS tells the model the context changed. Llama 3 masks attention
across documents instead: :mod:`~llama_from_scratch.packing`.)

Data order is a pure function of ``(seed, step)`` (:class:`StepSampler`), so a resumed run sees
exactly the batches it would have seen, and ``world_size`` processes each take their slice of the
same global batch.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "pack_tokens",
    "TokenBlockDataset",
    "train_val_split",
    "StepSampler",
    "make_dataloader",
    "synthetic_corpus",
    "load_token_file",
    "load_stories",
    "stories_dir",
]


def _as_id_list(doc, index: int) -> list[int]:
    if isinstance(doc, torch.Tensor):
        if doc.dim() != 1 or doc.is_floating_point():
            raise ValueError(f"document {index} must be a 1-D integer tensor, got {doc.dtype} {tuple(doc.shape)}")
        return doc.tolist()
    ids = list(doc)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) and not (hasattr(t, "__index__")):
            raise ValueError(f"document {index} contains a non-integer token {t!r}")
    return [int(t) for t in ids]


def pack_tokens(token_ids_list: Sequence[Sequence[int] | torch.Tensor], block_size: int,
                eos_token_id: int | None) -> torch.Tensor:
    """Packs documents into a ``LongTensor [N, block_size + 1]`` for next-token prediction.

    Every document is followed by ``eos_token_id`` (None: no separator), the results are
    concatenated, and the stream is cut into windows of ``block_size + 1`` tokens taken every
    ``block_size`` tokens: consecutive blocks share one token (the last target of block ``i`` is
    the first input of block ``i + 1``), so every token of the stream except the first is a
    target exactly once. The tail that does not fill a block is dropped.

    Raises ``ValueError`` when the stream is too short for a single block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    stream: list[int] = []
    for i, doc in enumerate(token_ids_list):
        stream.extend(_as_id_list(doc, i))
        if eos_token_id is not None:
            stream.append(int(eos_token_id))
    n_blocks = (len(stream) - 1) // block_size
    if n_blocks <= 0:
        raise ValueError(
            f"{len(stream)} tokens (EOS included) are too few for one block of block_size + 1 = {block_size + 1}")
    data = torch.tensor(stream[: n_blocks * block_size + 1], dtype=torch.long)
    return data.unfold(0, block_size + 1, block_size).contiguous()


class TokenBlockDataset(Dataset):
    """Packed blocks ``[N, block_size + 1]`` as ``(x, y)`` pairs: ``x = block[:-1]``, ``y = block[1:]``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[1] < 2:
            shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
            raise ValueError(f"blocks must be a [N, block_size + 1] tensor with block_size >= 1, got {shape}")
        if blocks.is_floating_point():
            raise ValueError(f"blocks must hold integer token ids, got {blocks.dtype}")
        self.blocks = blocks.long()

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1] - 1

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index):
        block = self.blocks[index]
        return block[..., :-1], block[..., 1:]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of shape ``[len(indices), block_size]`` each, in one indexing operation."""
        return self[torch.as_tensor(indices, dtype=torch.long)]


def train_val_split(items, val_fraction: float = 0.1, seed: int = 0):
    """Splits a sequence (list of documents, or a tensor along dim 0) into ``(train, val)``.

    A seeded permutation (``torch.Generator().manual_seed(seed)``) picks the validation items, so
    the split is the same on every machine and every run. At least one item goes to each side.
    Split *documents* before packing, so no document leaks across the two.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(items)
    if n < 2:
        raise ValueError(f"need at least 2 items to split, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    if isinstance(items, torch.Tensor):
        return items[train_idx], items[val_idx]
    return [items[i] for i in train_idx.tolist()], [items[i] for i in val_idx.tolist()]


class StepSampler:
    """Deterministic batches as a function of the (global micro-)step: the resumable sampler.

    The sample order is an endless sequence of epochs, epoch ``e`` being
    ``randperm(num_samples)`` drawn from a generator seeded with ``seed + e`` (or ``0..n-1`` when
    ``shuffle=False``). Micro-step ``k`` owns the global slice ``[k * G, (k + 1) * G)`` of that
    sequence, with ``G = batch_size * world_size``; rank ``r`` takes the ``r``-th run of
    ``batch_size`` indices in it. So ``world_size`` processes with ``batch_size`` b see exactly
    the samples that one process with ``batch_size`` ``world_size * b`` sees, and a run resumed at
    step ``k`` sees exactly what it would have seen.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"num_samples and batch_size must be positive, got {num_samples}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self._cache: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._cache[epoch] = torch.randperm(self.num_samples, generator=g)
            else:
                self._cache[epoch] = torch.arange(self.num_samples)
        return self._cache[epoch]

    def indices(self, micro_step: int) -> list[int]:
        """This rank's sample indices for global micro-step ``micro_step``."""
        start = (micro_step * self.world_size + self.rank) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self._epoch(epoch)[offset]))
        return out

    def iter_from(self, micro_step: int = 0) -> Iterator[list[int]]:
        """Endless batches of indices starting at ``micro_step`` (a ``batch_sampler`` for DataLoader)."""
        while True:
            yield self.indices(micro_step)
            micro_step += 1


class _BatchSamplerFrom(torch.utils.data.Sampler):
    def __init__(self, sampler: StepSampler, start: int, num_batches: int | None) -> None:
        self.sampler, self.start, self.num_batches = sampler, start, num_batches

    def __iter__(self):
        it = self.sampler.iter_from(self.start)
        for i, batch in enumerate(it):
            if self.num_batches is not None and i >= self.num_batches:
                return
            yield batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless batch sampler has no length")
        return self.num_batches


def make_dataloader(dataset: Dataset, batch_size: int, seed: int = 0, start_step: int = 0,
                    num_batches: int | None = None, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                    **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` whose batches follow :class:`StepSampler` from
    ``start_step`` on (endless unless ``num_batches`` is given). Extra keyword arguments
    (``num_workers``, ``pin_memory``, ...) go to ``DataLoader``."""
    sampler = StepSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle)
    return DataLoader(dataset, batch_sampler=_BatchSamplerFrom(sampler, start_step, num_batches), **loader_kwargs)


def synthetic_corpus(num_docs: int = 400, vocab_size: int = 256, min_len: int = 8, max_len: int = 64,
                     seed: int = 0) -> list[list[int]]:
    """A deterministic toy corpus for tests and smoke runs: each document is an arithmetic
    progression ``a, a + d, a + 2d, ... (mod vocab_size - 1)`` with a random start ``a``, stride
    ``d`` in 1..4 and length. Id ``vocab_size - 1`` never occurs: use it as EOS. A model learns it
    quickly (after two tokens the rest is determined), so the loss visibly falls."""
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3, got {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    modulus = vocab_size - 1
    docs = []
    for _ in range(num_docs):
        a = int(torch.randint(modulus, (1,), generator=g))
        d = int(torch.randint(1, 5, (1,), generator=g))
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        docs.append([(a + i * d) % modulus for i in range(n)])
    return docs


def load_token_file(path, tokenizer=None) -> list[list[int]] | torch.Tensor:
    """Token ids from a file: ``.pt`` (a 1-D / 2-D integer tensor or a list of lists), ``.npy``
    (integer array), or text (``.txt`` and anything else) encoded with ``tokenizer`` (an object
    with ``encode``, or a name for :func:`~llama_from_scratch.tokenizers.load_tokenizer`);
    text documents are separated by blank lines. Returns a list of documents."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        obj = torch.load(path, weights_only=True)
    elif suffix == ".npy":
        import numpy as np

        obj = torch.from_numpy(np.load(path).astype("int64"))
    else:
        if tokenizer is None:
            raise ValueError(f"{path} is text: pass a tokenizer (e.g. --tokenizer cl100k_base) to encode it")
        if isinstance(tokenizer, str):
            from llama_from_scratch.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        text = path.read_text(encoding="utf-8")
        return [tokenizer.encode(doc.strip()) for doc in text.split("\n\n") if doc.strip()]
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            raise ValueError(f"{path} holds {obj.dtype} values, expected integer token ids")
        return [obj.long()] if obj.dim() == 1 else list(obj.long())
    if isinstance(obj, list):
        return obj
    raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor or a list of token-id lists")


# ---------------------------------------------------------------------------------------------
# The project's pretraining corpus: short stories written by SmolLM2 (data/stories)
# ---------------------------------------------------------------------------------------------


def stories_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``train.jsonl.gz`` / ``val.jsonl.gz``: ``data_dir``, else
    ``$LFS_STORIES_DIR``, else ``data/stories`` of the repository (or of the current directory)."""
    from llama_from_scratch.data_files import find_data_dir

    return find_data_dir("stories", "LFS_STORIES_DIR", "the story corpus", data_dir, marker="train.jsonl.gz")


def load_stories(split: str = "train", data_dir: str | os.PathLike | None = None,
                 with_prompts: bool = False) -> list[str] | list[dict]:
    """The chapter-8 pretraining corpus: short stories generated by SmolLM2-135M-Instruct.

    ``split``: ``"train"``, ``"val"`` (held out: split by a hash of each story, so no story is in
    both) or ``"all"``. Returns the story texts, or with ``with_prompts`` the records
    ``{"text", "prompt", "smollm2_tokens"}``. Needs only ``gzip`` and ``json``, never the model;
    ``data/stories/README.md`` tells how the corpus was made.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    folder = stories_dir(data_dir)
    records: list[dict] = []
    for name in (("train", "val") if split == "all" else (split,)):
        path = folder / f"{name}.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"the story corpus has no {path.name} in {folder}")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"line {line_no} is not a story record with a 'text' string")
                    records.append(record)
        except (OSError, EOFError, ValueError) as err:  # missing, truncated or corrupt file
            raise ValueError(f"cannot read the story corpus {path}: {err}") from err
    return records if with_prompts else [r["text"] for r in records]
