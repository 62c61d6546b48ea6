"""The Trainer's speed options: ``optimizer="adamw_fused"`` and ``compile=True``.

References: torch's own ``torch.optim.AdamW`` (the from-scratch AdamW is bit-identical to its
default implementation; the fused kernel computes the same update in another order, so losses
and weights agree to ~1e-6) and the eager training step (the compiled step runs the same
arithmetic through generated code: losses within 1e-5 on a tiny float32 model).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import llama_from_scratch.trainer as trainer_module
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.data import pack_tokens, synthetic_corpus, train_val_split
from llama_from_scratch.model import Llama
from llama_from_scratch.pretrain import build_parser
from llama_from_scratch.trainer import Trainer, TrainConfig

VOCAB, EOS, BLOCK = 64, 63, 16


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def blocks():
    train_docs, _ = train_val_split(synthetic_corpus(300, vocab_size=VOCAB, seed=0), 0.1, seed=0)
    return pack_tokens(train_docs, BLOCK, EOS)


def _run(blocks, steps: int = 4, **config) -> tuple[list[float], Llama, Trainer]:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                   max_seq_len=32))
    cfg = TrainConfig(max_steps=steps, batch_size=4, max_lr=3e-3, warmup_steps=1, eval_interval=0, device="cpu",
                      dtype="fp32", seed=0, progress=False, **config)
    trainer = Trainer(model, blocks, None, cfg)
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
    trainer = Trainer(Llama(LlamaConfig.tiny(vocab_size=VOCAB, max_seq_len=32)), blocks, None,
                      TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, eval_interval=0, device="cpu",
                                  optimizer="adamw_fused", progress=False))
    assert type(trainer.optimizer) is torch.optim.AdamW and trainer.optimizer.defaults["fused"] is True
    decayed = [g["weight_decay"] for g in trainer.optimizer.param_groups]
    assert sorted(decayed) == [0.0, 0.1]  # matrices decay, norm gains do not


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


def test_config_checks():
    with pytest.raises(ValueError, match="'adamw', 'adamw_fused' or 'galore'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="fsdp needs optimizer 'adamw'"):
        TrainConfig(optimizer="adamw_fused", fsdp=True)
    assert TrainConfig.from_dict(TrainConfig(compile=True).to_dict()).compile is True


def test_command_line_flags():
    args = build_parser().parse_args(["--compile", "--optimizer", "adamw_fused"])
    assert args.compile is True and args.optimizer == "adamw_fused"
    assert build_parser().parse_args([]).compile is None  # unset: TrainConfig's default (False)
    help_text = build_parser().format_help()
    assert "--compile" in help_text and "torch.compile" in help_text
