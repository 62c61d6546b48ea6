"""The training loop (chapter 8): learning, exact resume, divergence, checkpoints, bf16; and the
speed options, ``optimizer="adamw_fused"`` (compared with the from-scratch AdamW, bit-identical to
torch's default; the fused kernel adds in another order: ~1e-6) and ``compile=True`` (compared
with the eager step: losses and weights within 1e-5 on a tiny float32 model)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import llama_from_scratch.trainer as trainer_module
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.data import pack_tokens, synthetic_corpus, train_val_split
from llama_from_scratch.model import Llama
from llama_from_scratch.pretrain import build_parser
from llama_from_scratch.trainer import (CheckpointError, Trainer, TrainConfig, TrainingDiverged,
                                        estimate_flops_per_token, latest_checkpoint, load_checkpoint, train)

VOCAB, EOS, BLOCK = 64, 63, 16


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def blocks():
    train_docs, val_docs = train_val_split(synthetic_corpus(300, vocab_size=VOCAB, seed=0), 0.1, seed=0)
    return pack_tokens(train_docs, BLOCK, EOS), pack_tokens(val_docs, BLOCK, EOS)


def model_config(**kw) -> LlamaConfig:
    return LlamaConfig.tiny(**{**dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                      max_seq_len=32), **kw})


def make_model(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(model_config(**kw))


def config(**kw) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, grad_accum_steps=1, max_lr=1e-2, min_lr=1e-3, warmup_steps=2,
                eval_interval=0, eval_steps=2, device="cpu", dtype="fp32", progress=False, seed=7)
    base.update(kw)
    base["warmup_steps"] = min(base["warmup_steps"], base["max_steps"])
    return TrainConfig(**base)


def test_loss_falls_and_history_is_complete(blocks):
    train_blocks, val_blocks = blocks
    trainer = Trainer(make_model(), train_blocks, val_blocks,
                      config(max_steps=40, batch_size=8, eval_interval=20, grad_accum_steps=2, peak_flops=1e12))
    history = trainer.train()
    assert len(history) == 40 and [r["step"] for r in history] == list(range(40))
    first = sum(r["train_loss"] for r in history[:3]) / 3
    last = sum(r["train_loss"] for r in history[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert [r["step"] for r in history if r["val_loss"] is not None] == [19, 39]
    assert history[-1]["val_loss"] < history[19]["val_loss"]
    for r in history:
        assert set(r) >= {"step", "lr", "train_loss", "val_loss", "grad_norm", "tokens_per_sec", "mfu"}
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"]
    assert history[0]["lr"] == pytest.approx(5e-3) and history[1]["lr"] == pytest.approx(1e-2)


def test_flops_per_token_formula():
    model = make_model()
    c = model.config
    n = model.num_parameters()  # tied: the embedding counts once, as the output layer
    assert estimate_flops_per_token(model, 16) == 6 * n + 12 * c.n_layers * c.dim * 16
    untied = make_model(tie_embeddings=False)
    n_untied = untied.num_parameters() - untied.model.embed_tokens.weight.numel()
    assert estimate_flops_per_token(untied, 16) == 6 * n_untied + 12 * c.n_layers * c.dim * 16


@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_resume_continues_the_identical_run(blocks, tmp_path, optimizer):
    train_blocks, val_blocks = blocks
    cfg = config(max_steps=8, grad_accum_steps=2, optimizer=optimizer, galore_rank=4, galore_update_proj_gap=3,
                 eval_interval=4)
    straight = Trainer(make_model(), train_blocks, val_blocks, cfg).train()

    first = Trainer(make_model(), train_blocks, val_blocks, cfg)
    first.train(steps=4)
    path = first.save_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed = Trainer(make_model(seed=99), train_blocks, val_blocks, cfg)  # other initial weights
    assert resumed.load_checkpoint(path) == 4
    history = resumed.train()

    def losses(h, key="train_loss"):
        return torch.tensor([r[key] if r[key] is not None else float("nan") for r in h])

    assert torch.equal(losses(history), losses(straight))
    assert torch.equal(losses(history, "grad_norm"), losses(straight, "grad_norm"))
    assert losses(history, "val_loss").nan_to_num().tolist() == losses(straight, "val_loss").nan_to_num().tolist()
    for a, b in zip(resumed.model.parameters(), first.model.parameters()):
        assert a.shape == b.shape


def test_checkpoint_stores_tied_weights_once_and_reties(blocks, tmp_path):
    train_blocks, _ = blocks
    trainer = Trainer(make_model(), train_blocks, None, config(max_steps=2))
    trainer.train()
    path = trainer.save_checkpoint(tmp_path / "c")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    config_json = json.loads((path / "config.json").read_text())
    assert config_json["model"]["dim"] == 32 and config_json["train"]["max_steps"] == 2
    fresh = make_model(seed=5)
    load_checkpoint(path, fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (name, a), b in zip(fresh.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    # weights_only loading works: the state holds only tensors and plain values.
    state = torch.load(path / "training_state.pt", weights_only=True)
    assert state["step"] == 2


def test_nan_loss_stops_with_the_step(blocks):
    train_blocks, _ = blocks
    trainer = Trainer(make_model(), train_blocks, None, config(max_steps=10))
    trainer.train(steps=3)
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="at step 3") as info:
        trainer.train()
    assert info.value.step == 3 and len(trainer.history) == 3


def test_checkpoint_errors_are_clear(blocks, tmp_path):
    train_blocks, _ = blocks
    trainer = Trainer(make_model(), train_blocks, None, config(max_steps=1, checkpoint_dir=str(tmp_path / "run")))
    trainer.train()
    good = latest_checkpoint(tmp_path / "run")
    assert good is not None and good.name == "step_000001"

    def fresh(**kw):
        return Trainer(make_model(**kw), train_blocks, None, config(max_steps=1))

    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        fresh().load_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="different model"):
        fresh(dim=64, hidden_dim=96).load_checkpoint(good)
    with pytest.raises(CheckpointError, match="optimizer"):
        Trainer(make_model(), train_blocks, None, config(max_steps=1, optimizer="galore")).load_checkpoint(good)
    # another global batch (batch_size x processes) would train on other blocks: refused, saying both
    with pytest.raises(CheckpointError, match=r"global batch of batch_size=4 x 1 processes, this run has batch_size=2 x 1"):
        Trainer(make_model(), train_blocks, None, config(max_steps=1, batch_size=2)).load_checkpoint(good)
    assert json.loads((good / "config.json").read_text())["world_size"] == 1

    import shutil

    for name, damage in [("model.safetensors", "truncate"), ("training_state.pt", "truncate"),
                         ("config.json", "truncate"), ("training_state.pt", "delete")]:
        bad = tmp_path / f"bad_{name}_{damage}"
        shutil.copytree(good, bad)
        target = bad / name
        if damage == "delete":
            target.unlink()
            match = "missing"
        else:
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2])
            match = "corrupt|truncated|not valid JSON"
        with pytest.raises(CheckpointError, match=match):
            fresh().load_checkpoint(bad)


def test_checkpoint_with_wrong_shapes_but_no_model_config_is_caught(blocks, tmp_path):
    train_blocks, _ = blocks
    trainer = Trainer(make_model(), train_blocks, None, config(max_steps=1))
    path = trainer.save_checkpoint(tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"] = None  # e.g. a checkpoint of a plain module
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(path, make_model(hidden_dim=96))


def test_save_is_atomic(blocks, tmp_path, monkeypatch):
    train_blocks, _ = blocks
    trainer = Trainer(make_model(), train_blocks, None, config(max_steps=2))
    trainer.train(steps=1)
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    trainer.train(steps=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.torch, "save", crash)  # fails after the weights were written
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "new")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folder, no half-written "new"
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before  # the old checkpoint is intact
    trainer.save_checkpoint(tmp_path / "ckpt")  # replacing an existing checkpoint works
    assert load_checkpoint(tmp_path / "ckpt", make_model())["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_bf16_autocast_run(blocks):
    train_blocks, val_blocks = blocks
    model = make_model()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = Trainer(model, train_blocks, val_blocks, config(max_steps=12, dtype="bf16", eval_interval=12))
    assert trainer.use_bf16
    history = trainer.train()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] is not None


class CharTokenizer:
    eos_token_id = EOS

    def encode(self, text):
        return [ord(c) % EOS for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i % 60) for i in ids)


def test_samples_and_functional_train(blocks):
    train_blocks, val_blocks = blocks
    trainer = train(make_model(), train_blocks, val_blocks, config(max_steps=4), tokenizer=CharTokenizer(),
                    sample_interval=2, sample_prompt="ab", sample_tokens=5)
    assert [s["step"] for s in trainer.samples] == [1, 3]
    assert all(isinstance(s["text"], str) and 3 <= len(s["text"]) <= 7 for s in trainer.samples)
    assert len(trainer.history) == 4


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp16")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"max_step": 3})
    assert TrainConfig.from_dict(TrainConfig(betas=[0.9, 0.99]).to_dict()).betas == (0.9, 0.99)


def test_command_line_run_and_resume(tmp_path, capsys):
    from llama_from_scratch.pretrain import main

    model = json.dumps(dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                            max_seq_len=32))
    common = ["--synthetic", "--model", model, "--block_size", "16", "--max_steps", "6", "--batch_size", "4",
              "--warmup_steps", "2", "--device", "cpu", "--progress", "false", "--eval_interval", "0"]
    main(common + ["--history_out", str(tmp_path / "straight.json")])
    ckpt = tmp_path / "ckpt"
    # Stop after 3 steps by saving every 3 and resuming from the first checkpoint.
    main(common + ["--checkpoint_dir", str(ckpt), "--checkpoint_interval", "3"])
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000003", "step_000006"]
    import shutil

    shutil.rmtree(ckpt / "step_000006")
    main(common + ["--checkpoint_dir", str(ckpt), "--resume", "latest", "--history_out", str(tmp_path / "r.json")])
    assert "resumed from" in capsys.readouterr().out
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert torch.equal(torch.tensor([r["train_loss"] for r in resumed]),
                       torch.tensor([r["train_loss"] for r in straight]))
    with pytest.raises(SystemExit):
        main(["--max_steps", "2"])  # no data




# --------------------------------------------------------------------------------------------
# Instruction tuning with the same Trainer (chapter 9)
# --------------------------------------------------------------------------------------------


class _CharTokenizer:
    """Bytes as tokens (ids 0..59 after folding), EOS 63: enough to build instruction examples."""

    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return [b % 60 for b in text.encode()]


def _sft_blocks(mask_prompt: bool = True, n: int = 24):
    from llama_from_scratch.instruct import InstructionDataset, SFTBlocks

    examples = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(n)]
    examples.append({"instruction": "broken"})  # missing output: skipped, not a crash
    data = InstructionDataset(examples, _CharTokenizer(), template="alpaca")
    assert data.skipped["missing_output"] == 1
    return SFTBlocks(data, pad_token_id=0, mask_prompt=mask_prompt)


def test_trainer_runs_sft_and_its_loss_equals_sft_loss():
    from llama_from_scratch.instruct import instruction_collate, sft_loss

    blocks = _sft_blocks()
    model = make_model(max_seq_len=256)
    trainer = Trainer(model, blocks, blocks, config(max_steps=30, batch_size=4, eval_interval=30, eval_steps=2))
    indices = [0, 5, 7, 11]
    x, y = blocks.batch(indices)
    # Labels: -100 on padding and prompt, the response ids (shifted) elsewhere.
    batch = instruction_collate([blocks.dataset[i] for i in indices], 0)
    assert torch.equal(y, batch["labels"][:, 1:]) and torch.equal(x, batch["input_ids"][:, :-1])
    torch.testing.assert_close(trainer._loss(model, x, y), sft_loss(model, batch), rtol=0, atol=0)
    before = trainer.evaluate()
    history = trainer.train()
    assert history[-1]["val_loss"] < before - 0.5, (before, history[-1]["val_loss"])
    # Throughput counts the tokens actually run (each batch is padded only to its own longest example).
    assert all(r["tokens_per_sec"] > 0 for r in history)


def test_trainer_sft_batch_without_targets_is_a_zero_step():
    blocks = _sft_blocks()
    model = make_model(max_seq_len=256)
    trainer = Trainer(model, blocks, None, config(max_steps=1, batch_size=2))
    x, y = blocks.batch([0, 1])
    loss = trainer._loss(model, x, torch.full_like(y, -100))
    assert loss.item() == 0.0
    loss.backward()  # still connected to the weights
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_trainer_rejects_data_it_cannot_batch():
    with pytest.raises(TypeError, match="batch\\(indices\\)"):
        Trainer(make_model(), [[1, 2, 3]], None, config())


def test_bf16_run_with_samples(blocks):
    """Samples during a bf16-autocast run are drawn in float32 (the KV cache holds one dtype)."""
    train_blocks, val_blocks = blocks
    trainer = Trainer(make_model(), train_blocks, val_blocks,
                      config(max_steps=4, dtype="bf16", sample_interval=2, sample_tokens=5), tokenizer=CharTokenizer())
    trainer.train()
    assert [s["step"] for s in trainer.samples] == [1, 3]
    assert all(isinstance(s["text"], str) and len(s["text"]) > 0 for s in trainer.samples)


# ----- speed options: fused AdamW, torch.compile ----------------------------------------------


def _run(blocks, steps: int = 4, **config) -> tuple[list[float], Llama, Trainer]:
    """A few steps of a 2-layer model on the training blocks; (losses, model, trainer)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                   max_seq_len=32))
    cfg = TrainConfig(max_steps=steps, batch_size=4, max_lr=3e-3, warmup_steps=1, eval_interval=0, device="cpu",
                      dtype="fp32", seed=0, progress=False, **config)
    trainer = Trainer(model, blocks[0], None, cfg)
    trainer.train()
    return [r["train_loss"] for r in trainer.history], trainer.model, trainer


def test_fused_adamw_follows_the_from_scratch_adamw(blocks):
    losses, model, _ = _run(blocks)
    fused_losses, fused_model, _ = _run(blocks, optimizer="adamw_fused")
    assert losses[0] == fused_losses[0]  # the same first batch and weights: the first loss is bit-equal
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(losses), rtol=0, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)
    # The weights moved: a fused optimizer that did nothing would fail the comparison above.
    torch.manual_seed(0)
    initial = Llama(model.config)
    assert (initial.model.layers[0].mlp.gate_proj.weight - model.model.layers[0].mlp.gate_proj.weight).abs().max() > 1e-3


def test_fused_adamw_is_torch_fused(blocks):
    torch.manual_seed(0)
    trainer = Trainer(Llama(LlamaConfig.tiny(vocab_size=VOCAB, max_seq_len=32)), blocks[0], None,
                      TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, eval_interval=0, device="cpu",
                                  optimizer="adamw_fused", progress=False))
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.optimizer.defaults["fused"] is True
    decayed = [g["weight_decay"] for g in trainer.optimizer.param_groups]
    assert sorted(decayed) == [0.0, 0.1]  # matrices decay, norm gains do not


@pytest.mark.cxx_compiler
def test_compiled_step_gives_the_eager_losses(blocks):
    losses, model, _ = _run(blocks, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to eager would pass the comparison
        compiled_losses, compiled_model, trainer = _run(blocks, steps=3, compile=True)
    assert trainer.compiled_model is not None
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(losses), rtol=0, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


def test_compile_falls_back_to_eager_with_a_warning(blocks, monkeypatch):
    def broken_compile(module, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return call

    losses, _, _ = _run(blocks, steps=2)
    monkeypatch.setattr(trainer_module.torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile of the training step failed.*InvalidCxxCompiler"):
        fallback_losses, _, trainer = _run(blocks, steps=2, compile=True)
    assert fallback_losses == losses and trainer.compiled_model is None  # eager from the first micro-batch on: bit-equal


def test_speed_option_config_checks():
    with pytest.raises(ValueError, match="'adamw', 'adamw_fused' or 'galore'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="fsdp needs optimizer 'adamw'"):
        TrainConfig(optimizer="adamw_fused", fsdp=True)
    assert TrainConfig.from_dict(TrainConfig(compile=True).to_dict()).compile is True


def test_speed_option_command_line_flags():
    args = build_parser().parse_args(["--compile", "--optimizer", "adamw_fused"])
    assert args.compile is True and args.optimizer == "adamw_fused"
    assert build_parser().parse_args([]).compile is None  # unset: TrainConfig's default (False)
    help_text = build_parser().format_help()
    assert "--compile" in help_text and "torch.compile" in help_text
