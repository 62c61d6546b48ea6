"""The ``Trainer`` with FSDP2 (``TrainConfig.fsdp``, chapter 15), on 2 gloo processes.

* 2 ranks with FSDP2 and batch ``b`` per rank take the steps one process takes with batch ``2b``,
  with gradient accumulation over 2 micro-batches and clipping. Tolerance, float32 (the ranks sum
  the gradients in another order than one process does): the losses, gradient norms and validation
  losses of every step within ``rtol=1e-5, atol=1e-6`` (``parallel_common.TOL``); the weights after
  6 steps within ``rtol=1e-5, atol=1e-5``. The weights need the looser ``atol`` because AdamW
  divides every gradient element by its own running size: where an element's gradient is a
  near-cancellation, the summation order's rounding moves its update by a visible fraction of the
  learning rate (3e-3 here). The largest difference measured was 5.6e-6 beyond ``rtol``.
* An FSDP2 run stopped after ``N`` steps, saved, and continued by a new ``Trainer`` from the
  checkpoint takes exactly the steps of the run that went ``2N`` steps straight: losses, gradient
  norms and final weights bit for bit (``rtol=0, atol=0``).
* Across world sizes: the one-process run's checkpoint, resumed on 2 FSDP2 ranks, and the FSDP2
  run's checkpoint, resumed by one process with the global batch, both continue as the
  uninterrupted runs do (losses to ``TOL``, weights to the weights' tolerance).
* The checkpoint an FSDP2 run writes is the folder one process writes: the same tensor names (a
  tied weight stored once), the same weights and AdamW moments as the one-process run's at the same
  step (to the weights' tolerance), and the single-process ``load_checkpoint`` reads it.
"""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.data import pack_tokens, synthetic_corpus
from llama_from_scratch.model import Llama
from llama_from_scratch.parallel import run_on_processes
from llama_from_scratch.parallel.torch_native import full_tensor
from llama_from_scratch.optim import AdamW, weight_decay_groups
from llama_from_scratch.trainer import MODEL_FILE, STATE_FILE, Trainer, TrainConfig, load_checkpoint
from parallel_common import TOL, WORLD, fresh_model, needs_gloo, tiny_config

pytestmark = needs_gloo

N = 3  # steps before the checkpoint, and after it
BLOCK = 16
EXACT = dict(rtol=0, atol=0)
WEIGHTS_TOL = dict(rtol=1e-5, atol=1e-5)  # see the module docstring


def blocks() -> torch.Tensor:
    """Blocks ``[n, BLOCK + 1]`` of the package's learnable toy corpus (the same in every process)."""
    vocab = tiny_config().vocab_size
    return pack_tokens(synthetic_corpus(num_docs=40, vocab_size=vocab, seed=2), BLOCK, vocab - 1)


def config(**overrides) -> TrainConfig:
    """``2N`` steps, 2 micro-batches of 2 blocks per rank and step, validation every ``N`` steps."""
    base = dict(max_steps=2 * N, batch_size=2, grad_accum_steps=2, max_lr=3e-3, min_lr=3e-4, warmup_steps=1,
                eval_interval=N, eval_steps=2, device="cpu", dtype="fp32", progress=False, seed=5, fsdp=True)
    return TrainConfig(**{**base, **overrides})


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The whole weights (FSDP2's shards gathered: every rank must call this)."""
    return {n: full_tensor(p.detach()).clone() for n, p in trainer.model.named_parameters()}


def other_model() -> Llama:
    """A model of the same shape with other weights (seed 123): a checkpoint must replace them all."""
    torch.manual_seed(123)
    return Llama(tiny_config())


class DigitTokenizer:
    """Enough of a tokenizer for ``Trainer.sample``: characters to ids below the vocabulary size."""

    eos_token_id = 63

    def encode(self, text: str) -> list[int]:
        return [ord(ch) % 60 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def losses(history: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([r[key] if r[key] is not None else float("nan") for r in history])
            for key in ("train_loss", "grad_norm", "val_loss")}


def fsdp_trainer_worker(rank: int, world_size: int, folder: str, one_process_checkpoint: str) -> dict[str, object]:
    train, val = blocks(), blocks()[:8]
    # Sampling at the last step: every rank runs the forward passes (they gather the shards), rank 0 keeps it.
    straight = Trainer(fresh_model(), train, val, config(sample_interval=2 * N, sample_prompt="ab", sample_tokens=8),
                       tokenizer=DigitTokenizer())
    straight.train()

    first = Trainer(fresh_model(), train, val, config(checkpoint_dir=folder))
    first.train(steps=N)
    saved = first.save_checkpoint()  # rank 0's path; None on rank 1
    del first
    resumed = Trainer(other_model(), train, val, config())  # (other_model also moves the RNG on)
    resumed.load_checkpoint(f"{folder}/step_{N:06d}")
    resumed.train()
    from_one = Trainer(other_model(), train, val, config())  # a 1-process checkpoint, continued on 2 ranks
    from_one.load_checkpoint(one_process_checkpoint)
    from_one.train()
    return {"straight": straight.history, "straight_weights": weights(straight), "resumed": resumed.history,
            "resumed_weights": weights(resumed), "from_one": from_one.history, "from_one_weights": weights(from_one),
            "saved": str(saved) if saved else None,
            "parallelism": straight.parallelism, "samples": straight.samples}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """The one-process run with the global batch, one start of 2 processes for the whole file, and
    one process resuming the FSDP2 run's checkpoint."""
    one = Trainer(fresh_model(), blocks(), blocks()[:8],
                  config(fsdp=False, batch_size=2 * WORLD, checkpoint_dir=str(tmp_path_factory.mktemp("one"))),
                  tokenizer=DigitTokenizer())
    one.train(steps=N)
    one_ckpt = one.save_checkpoint()
    one.train()
    one.sampled = one.sample("ab", 8)
    folder = tmp_path_factory.mktemp("fsdp_ckpt")
    ranks = run_on_processes(fsdp_trainer_worker, WORLD, str(folder), str(one_ckpt))
    from_fsdp = Trainer(other_model(), blocks(), blocks()[:8], config(fsdp=False, batch_size=2 * WORLD))
    from_fsdp.load_checkpoint(folder / f"step_{N:06d}")
    from_fsdp.train()
    return {"ranks": ranks, "one": one, "one_ckpt": one_ckpt, "folder": folder, "from_fsdp": from_fsdp}


def test_fsdp2_trainer_equals_one_process_with_the_global_batch(runs):
    one = runs["one"]
    expected, expected_weights = losses(one.history), {n: p.detach() for n, p in one.model.named_parameters()}
    train_losses = [r["train_loss"] for r in one.history]
    assert len(train_losses) == 2 * N and train_losses[-1] < train_losses[0], train_losses  # it learns
    for rank, res in enumerate(runs["ranks"]):
        assert res["parallelism"] == "fsdp2"
        got = losses(res["straight"])
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], **TOL, equal_nan=True, msg=f"rank {rank} {key}")
        if rank == 0:  # the same tokens as one process samples
            assert [s["text"] for s in res["samples"]] == [one.sampled] and len(one.sampled.split()) == 2 + 8
        else:
            assert res["samples"] == []
        assert res["straight_weights"].keys() == expected_weights.keys()
        for name, value in expected_weights.items():
            torch.testing.assert_close(res["straight_weights"][name], value, **WEIGHTS_TOL, msg=f"rank {rank} {name}")


def test_fsdp2_trainer_resumes_exactly_from_a_checkpoint(runs):
    for rank, res in enumerate(runs["ranks"]):
        straight, resumed = losses(res["straight"]), losses(res["resumed"])
        assert len(res["resumed"]) == 2 * N  # the first N steps come back from the checkpoint's history
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], **EXACT, equal_nan=True, msg=f"rank {rank} {key}")
        for name, value in res["straight_weights"].items():
            torch.testing.assert_close(res["resumed_weights"][name], value, **EXACT, msg=f"rank {rank} {name}")
    assert runs["ranks"][0]["saved"] is not None and runs["ranks"][1]["saved"] is None  # rank 0 writes


def test_checkpoints_resume_across_world_sizes(runs):
    """2 ranks -> 1 process and 1 process -> 2 ranks continue as the uninterrupted runs do."""
    one = runs["one"]
    expected, expected_weights = losses(one.history), {n: p.detach() for n, p in one.model.named_parameters()}
    continued = {"FSDP2 checkpoint resumed by one process": (runs["from_fsdp"].history,
                                                              dict(runs["from_fsdp"].model.named_parameters()))}
    for rank, res in enumerate(runs["ranks"]):
        continued[f"one-process checkpoint resumed on 2 ranks (rank {rank})"] = (res["from_one"], res["from_one_weights"])
    for name, (history, trained) in continued.items():
        assert len(history) == 2 * N, name
        got = losses(history)
        for key in expected:
            torch.testing.assert_close(got[key][N:], expected[key][N:], **TOL, equal_nan=True, msg=f"{name} {key}")
        for param, value in expected_weights.items():
            torch.testing.assert_close(trained[param].detach(), value, **WEIGHTS_TOL, msg=f"{name} {param}")


def test_fsdp2_checkpoint_is_the_one_process_folder(runs):
    """The FSDP2 run's checkpoint after N steps holds what the one-process run's holds (names, the
    tied weight stored once, weights and AdamW moments to the tolerance), and the package's
    single-process ``load_checkpoint`` reads it into a plain Llama and the package's AdamW."""
    from safetensors import safe_open

    fsdp_ckpt, one_ckpt = runs["folder"] / f"step_{N:06d}", runs["one_ckpt"]
    with safe_open(str(fsdp_ckpt / MODEL_FILE), "pt") as f, safe_open(str(one_ckpt / MODEL_FILE), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert f.metadata()["aliases"] == g.metadata()["aliases"] == '{"lm_head.weight": "model.embed_tokens.weight"}'
        for name in g.keys():
            torch.testing.assert_close(f.get_tensor(name), g.get_tensor(name), **WEIGHTS_TOL, msg=name)
    fsdp_state = torch.load(fsdp_ckpt / STATE_FILE, weights_only=True)
    one_state = torch.load(one_ckpt / STATE_FILE, weights_only=True)
    assert fsdp_state["step"] == one_state["step"] == N
    assert fsdp_state["optimizer"]["state"].keys() == one_state["optimizer"]["state"].keys()
    for i, moments in one_state["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(fsdp_state["optimizer"]["state"][i][key], value, **WEIGHTS_TOL, msg=f"{i} {key}")

    model = other_model()
    optimizer = AdamW(weight_decay_groups(model, 0.1))
    assert load_checkpoint(fsdp_ckpt, model, optimizer)["step"] == N
    with safe_open(str(fsdp_ckpt / MODEL_FILE), "pt") as f:
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), f.get_tensor(name), **EXACT, msg=name)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after loading
    assert optimizer.state_dict()["state"][0]["step"].item() == N


def test_fsdp_without_a_process_group_or_with_galore_is_refused():
    with pytest.raises(ValueError, match="torchrun"):
        Trainer(fresh_model(), blocks(), None, config())
    with pytest.raises(ValueError, match="GaLore"):
        config(optimizer="galore")
