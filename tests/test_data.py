"""Packing, datasets, splits and the resumable step sampler (chapter 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_from_scratch.data import (StepSampler, TokenBlockDataset, load_token_file, make_dataloader, pack_tokens,
                                     synthetic_corpus, train_val_split)

EOS = 99


def test_pack_tokens_joins_documents_with_eos_and_overlaps_by_one():
    blocks = pack_tokens([[1, 2, 3], [4, 5], torch.tensor([6, 7, 8, 9])], block_size=4, eos_token_id=EOS)
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E  (12 tokens) -> (12 - 1) // 4 = 2 blocks of 5
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 3, EOS, 4], [4, 5, EOS, 6, 7]]
    ds = TokenBlockDataset(blocks)
    x, y = ds[1]
    assert x.tolist() == [4, 5, EOS, 6] and y.tolist() == [5, EOS, 6, 7]
    assert len(ds) == 2 and ds.block_size == 4
    xb, yb = ds.batch([1, 0])
    assert xb.shape == (2, 4) and torch.equal(yb[1], blocks[0, 1:])


def test_pack_tokens_every_token_is_a_target_once():
    docs = synthetic_corpus(50, vocab_size=32, seed=1)
    blocks = pack_tokens(docs, block_size=16, eos_token_id=31)
    stream = [t for d in docs for t in d + [31]]
    targets = blocks[:, 1:].reshape(-1).tolist()
    assert targets == stream[1: 1 + len(targets)]
    assert len(stream) - 1 - len(targets) < 16  # only a partial block is dropped


def test_pack_tokens_errors():
    with pytest.raises(ValueError, match="too few"):
        pack_tokens([[1, 2]], block_size=8, eos_token_id=EOS)
    with pytest.raises(ValueError, match="block_size"):
        pack_tokens([[1, 2]], block_size=0, eos_token_id=EOS)
    with pytest.raises(ValueError, match="non-integer"):
        pack_tokens([[1, 2.5, 3, 4]], block_size=2, eos_token_id=EOS)
    assert pack_tokens([[1, 2, 3]], block_size=2, eos_token_id=None).tolist() == [[1, 2, 3]]


def test_train_val_split_is_deterministic_and_disjoint():
    docs = [[i] for i in range(50)]
    train, val = train_val_split(docs, val_fraction=0.2, seed=3)
    assert (train, val) == train_val_split(docs, val_fraction=0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == docs
    assert train_val_split(docs, 0.2, seed=4)[1] != val
    t_train, t_val = train_val_split(torch.arange(50), 0.2, seed=3)
    assert [[i] for i in t_val.tolist()] == val
    with pytest.raises(ValueError):
        train_val_split(docs, val_fraction=1.0)


def test_step_sampler_is_a_function_of_the_step_and_shards_the_global_batch():
    one = StepSampler(37, batch_size=6, seed=5)
    a = StepSampler(37, batch_size=3, seed=5, rank=0, world_size=2)
    b = StepSampler(37, batch_size=3, seed=5, rank=1, world_size=2)
    for step in range(20):  # crosses several epochs
        assert one.indices(step) == a.indices(step) + b.indices(step)
    # Each epoch is a permutation: the first 37 samples are all different.
    seen = [i for s in range(7) for i in one.indices(s)][:37]
    assert sorted(seen) == list(range(37))
    # A fresh sampler resumed at step 11 continues identically.
    assert StepSampler(37, 6, seed=5).indices(11) == one.indices(11)
    assert StepSampler(37, 6, seed=6).indices(0) != one.indices(0)
    with pytest.raises(ValueError):
        StepSampler(10, 2, rank=2, world_size=2)


def test_make_dataloader_follows_the_sampler():
    ds = TokenBlockDataset(pack_tokens(synthetic_corpus(40, vocab_size=32), 8, 31))
    loader = make_dataloader(ds, batch_size=4, seed=2, start_step=3, num_batches=2)
    batches = list(loader)
    assert len(batches) == 2
    sampler = StepSampler(len(ds), 4, seed=2)
    x, y = batches[1]
    assert torch.equal(x, ds.blocks[sampler.indices(4), :-1]) and torch.equal(y, ds.blocks[sampler.indices(4), 1:])


def test_synthetic_corpus_is_deterministic_and_avoids_eos():
    a, b = synthetic_corpus(30, vocab_size=50, seed=0), synthetic_corpus(30, vocab_size=50, seed=0)
    assert a == b and a != synthetic_corpus(30, vocab_size=50, seed=1)
    assert all(0 <= t < 49 for d in a for t in d)


def test_load_token_file(tmp_path):
    torch.save(torch.arange(10), tmp_path / "ids.pt")
    assert [d.tolist() for d in load_token_file(tmp_path / "ids.pt")] == [list(range(10))]
    np.save(tmp_path / "ids.npy", np.arange(6, dtype=np.uint16).reshape(2, 3))
    assert [d.tolist() for d in load_token_file(tmp_path / "ids.npy")] == [[0, 1, 2], [3, 4, 5]]

    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    (tmp_path / "corpus.txt").write_text("ab\n\ncd\n")
    assert load_token_file(tmp_path / "corpus.txt", Chars()) == [[97, 98], [99, 100]]
    with pytest.raises(ValueError, match="tokenizer"):
        load_token_file(tmp_path / "corpus.txt")
    with pytest.raises(FileNotFoundError):
        load_token_file(tmp_path / "absent.pt")


# --------------------------------------------------------------------------------------------
# The story corpus (data/stories)
# --------------------------------------------------------------------------------------------


def test_story_corpus_loads_without_the_model_and_splits_are_disjoint():
    import json as _json

    from llama_from_scratch.data import load_stories, stories_dir

    train, val = load_stories("train"), load_stories("val")
    assert len(train) > 10 * len(val) > 0
    assert not set(train) & set(val)
    assert load_stories("all") == train + val
    records = load_stories("val", with_prompts=True)
    assert [r["text"] for r in records] == val
    assert all(r["prompt"].startswith("Write a very short children's story") and r["smollm2_tokens"] > 0
               for r in records)
    stats = _json.loads((stories_dir() / "stats.json").read_text())
    assert stats["train"] == len(train) and stats["val"] == len(val)
    assert sum(r["smollm2_tokens"] for r in load_stories("all", with_prompts=True)) == stats["smollm2_tokens_kept"]
    assert stats["smollm2_tokens_kept"] >= 1_000_000  # the size the pretraining issue asked for


def test_story_corpus_errors_are_clear(tmp_path):
    import gzip

    from llama_from_scratch.data import load_stories

    with pytest.raises(ValueError, match="split"):
        load_stories("test")
    with pytest.raises(FileNotFoundError, match="train.jsonl.gz"):
        load_stories("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-6])  # truncated
    with pytest.raises(ValueError, match="cannot read the story corpus"):
        load_stories("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n[1, 2]\n'))
    with pytest.raises(ValueError, match="line 2"):
        load_stories("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n'))
    assert load_stories("train", data_dir=tmp_path) == ["ok"]
    with pytest.raises(FileNotFoundError, match="val.jsonl.gz"):
        load_stories("all", data_dir=tmp_path)


def _story_build_module(tmp_path, monkeypatch):
    """data/stories/build.py, loaded as a module with its corpus folder moved to tmp_path."""
    import importlib.util

    from llama_from_scratch.data import stories_dir

    spec = importlib.util.spec_from_file_location("stories_build", stories_dir() / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setattr(build, "HERE", tmp_path)
    monkeypatch.setattr(build, "RAW", tmp_path / "raw")
    return build


def _story(n: int) -> str:
    """A distinct story that passes the quality filter (the near-duplicate key ignores digits)."""
    name = chr(97 + n % 26) + chr(97 + n // 26)
    words = " ".join(f"{name}word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(45))
    return f"Once upon a time {name} began. {words}. The end of {name}."


def test_story_build_extends_the_committed_corpus_on_a_fresh_clone(tmp_path, monkeypatch):
    """``--finish`` with raw batches that start after the committed ones keeps the committed stories
    (in order, same split), adds the new ones, drops near-duplicates across both, and sums the counts."""
    import json as _json

    build = _story_build_module(tmp_path, monkeypatch)
    raw = tmp_path / "raw"
    raw.mkdir()

    def write_batch(index: int, texts: list[str], finished: bool = True) -> None:
        rows = [{"prompt": f"Write a very short children's story {t[:10]}", "text": t, "new_tokens": 60,
                 "finished": finished, "batch": index, "seconds": 10.0} for t in texts]
        (raw / f"batch_{index:05d}.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))

    write_batch(0, [_story(i) for i in range(30)] + ["As an AI, I cannot. " * 10])
    build.finish()
    first = _json.loads((tmp_path / "stats.json").read_text())
    assert first["generated"] == 31 and first["quality"] == 1 and first["kept"] == 30 and first["batches"] == 1
    committed_train = [r["text"] for r in build.committed()[0]][: first["train"]]

    # A fresh clone: the raw folder is gone; new batches continue at the committed batch count.
    for f in raw.iterdir():
        f.unlink()
    write_batch(1, [_story(i) for i in range(30, 50)] + [_story(3)])  # story 3 again: a near-duplicate
    build.finish()
    stats = _json.loads((tmp_path / "stats.json").read_text())
    assert stats["generated"] == 31 + 21 and stats["duplicate"] == 1 and stats["quality"] == 1
    assert stats["kept"] == 50 and stats["batches"] == 2 and stats["generation_seconds"] == 20
    records = build.committed()[0]
    assert len(records) == 50 == stats["train"] + stats["val"]
    assert [r["text"] for r in records][: len(committed_train)] == committed_train  # old stories first, in order

    # Raw batches that leave a gap after the committed corpus are refused.
    for f in raw.iterdir():
        f.unlink()
    write_batch(5, [_story(99)])
    with pytest.raises(SystemExit, match="must continue it"):
        build.finish()


def test_read_jsonl_skips_blank_lines_and_names_the_bad_line(tmp_path):
    from llama_from_scratch.data_files import read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[2, 3]\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, [2, 3])]
    path.write_text('{"a": 1}\n{"b": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not valid JSON"):
        list(read_jsonl(path))
