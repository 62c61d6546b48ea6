"""Command-line pretraining, single process or distributed (chapter 8).

    python -m llama_from_scratch.pretrain --synthetic --max_steps 200
    python -m llama_from_scratch.pretrain --config run.json --data stories.txt --tokenizer smollm2
    torchrun --nproc_per_node 2 -m llama_from_scratch.pretrain --config run.json --batch_size 4

``--config`` is a JSON file whose keys are :class:`~llama_from_scratch.trainer.TrainConfig` fields
plus, optionally, ``"model"`` (``{"preset": "tiny", ...LlamaConfig fields}``) and ``"data"``
(``{"path", "tokenizer", "synthetic", "block_size", "val_fraction"}``). Every TrainConfig field is
also a command-line option (``--max_lr 3e-4``), which overrides the file.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized (gloo on CPU, NCCL on
CUDA), the model wrapped in DistributedDataParallel, and ``--batch_size`` is *per process*: two
processes with batch b compute the same steps as one process with batch 2b. Only rank 0 logs,
samples, saves checkpoints and writes ``--history_out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

import torch
import torch.distributed as dist

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.data import load_token_file, pack_tokens, synthetic_corpus, train_val_split
from llama_from_scratch.environment import seed_everything
from llama_from_scratch.model import Llama
from llama_from_scratch.trainer import Trainer, TrainConfig, latest_checkpoint

PRESETS = {"tiny": LlamaConfig.tiny, "smollm2_135m": LlamaConfig.smollm2_135m}
DATA_KEYS = {"path", "tokenizer", "synthetic", "block_size", "val_fraction"}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(convert):
    def parse(text: str):
        return None if text.strip().lower() in {"none", "null", ""} else convert(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_from_scratch.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file of TrainConfig fields (+ 'model', 'data')")
    parser.add_argument("--data", help="token ids (.pt / .npy) or a text file (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer name for text data and samples (cl100k_base, smollm2)")
    parser.add_argument("--synthetic", action="store_true", help="train on a deterministic toy corpus")
    parser.add_argument("--block_size", type=int, help="tokens per training sequence (default: min(128, max_seq_len))")
    parser.add_argument("--val_fraction", type=float, help="share of documents held out (default 0.1)")
    parser.add_argument("--model", help="JSON object of LlamaConfig fields, with optional 'preset' (default tiny)")
    parser.add_argument("--resume", help="a checkpoint folder, or 'latest' (in checkpoint_dir)")
    parser.add_argument("--history_out", help="write the history (JSON) here (rank 0)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if f.name == "betas":
            convert = lambda text: tuple(float(v) for v in text.split(","))  # noqa: E731
        elif base is bool:
            convert = _parse_bool
        elif base in (int, float, str):
            convert = base
        else:
            convert = str
        if type(None) in args:
            convert = _optional(convert)
        parser.add_argument(f"--{f.name}", type=convert, default=None, help=f"TrainConfig.{f.name}")
    return parser


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, dict, dict, argparse.Namespace]:
    """Parses the command line: ``(train_config, model_dict, data_dict, namespace)``."""
    args = build_parser().parse_args(argv)
    file_cfg: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"config file {path} not found")
        file_cfg = json.loads(path.read_text())
    model_cfg = dict(file_cfg.pop("model", {}) or {})
    data_cfg = dict(file_cfg.pop("data", {}) or {})
    unknown = set(data_cfg) - DATA_KEYS
    if unknown:
        raise SystemExit(f"unknown data keys {sorted(unknown)}; known: {sorted(DATA_KEYS)}")
    if args.model:
        model_cfg.update(json.loads(args.model))
    for key, value in (("path", args.data), ("tokenizer", args.tokenizer), ("block_size", args.block_size),
                       ("val_fraction", args.val_fraction)):
        if value is not None:
            data_cfg[key] = value
    if args.synthetic:
        data_cfg["synthetic"] = True
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            file_cfg[f.name] = value
    try:
        config = TrainConfig.from_dict(file_cfg)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad training config: {e}") from e
    return config, model_cfg, data_cfg, args


def build_model_config(model_cfg: dict) -> LlamaConfig:
    model_cfg = dict(model_cfg)
    preset = model_cfg.pop("preset", "tiny")
    if preset not in PRESETS:
        raise SystemExit(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    base = PRESETS[preset]().to_dict()
    base.update(model_cfg)
    return LlamaConfig(**base)


def load_data(data_cfg: dict, model_config: LlamaConfig, seed: int):
    """``(train_blocks, val_blocks, tokenizer)`` from the data settings."""
    tokenizer = None
    if data_cfg.get("tokenizer"):
        from llama_from_scratch.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(data_cfg["tokenizer"])
    if data_cfg.get("synthetic"):
        docs = synthetic_corpus(num_docs=400, vocab_size=model_config.vocab_size, seed=seed)
        eos = model_config.vocab_size - 1
    elif data_cfg.get("path"):
        docs = load_token_file(data_cfg["path"], tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
    else:
        raise SystemExit("no data: pass --data PATH or --synthetic")
    top = max((int(max(d)) for d in docs if len(d)), default=-1)
    if top >= model_config.vocab_size:
        raise SystemExit(f"token id {top} does not fit the model's vocab_size {model_config.vocab_size}")
    block_size = data_cfg.get("block_size") or min(128, model_config.max_seq_len)
    if block_size > model_config.max_seq_len:
        raise SystemExit(f"block_size {block_size} exceeds the model's max_seq_len {model_config.max_seq_len}")
    train_docs, val_docs = train_val_split(docs, data_cfg.get("val_fraction", 0.1), seed=seed)
    return pack_tokens(train_docs, block_size, eos), pack_tokens(val_docs, block_size, eos), tokenizer




def main(argv: list[str] | None = None) -> int:
    config, model_cfg, data_cfg, args = resolve(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and config.device in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        model_config = build_model_config(model_cfg)
        seed_everything(config.seed)  # the same initial weights in every process
        model = Llama(model_config)
        train_blocks, val_blocks, tokenizer = load_data(data_cfg, model_config, config.seed)
        trainer = Trainer(model, train_blocks, val_blocks, config, tokenizer=tokenizer)
        if rank == 0:
            print(f"model: {model.num_parameters():,} parameters; train blocks {tuple(train_blocks.shape)}, "
                  f"val blocks {tuple(val_blocks.shape)}; world size {trainer.world_size}; device {trainer.device}; "
                  f"{'bf16 autocast' if trainer.use_bf16 else 'fp32'}", flush=True)
        if args.resume:
            path = latest_checkpoint(config.checkpoint_dir) if args.resume == "latest" else Path(args.resume)
            if path is None:
                raise SystemExit(f"--resume latest: no checkpoint in {config.checkpoint_dir}")
            step = trainer.load_checkpoint(path)
            if rank == 0:
                print(f"resumed from {path} at step {step}", flush=True)
        history = trainer.train()
        if rank == 0:
            last = history[-1] if history else {}
            print(json.dumps({"final_step": trainer.step, "train_loss": last.get("train_loss"),
                              "val_loss": last.get("val_loss")}), flush=True)
            if args.history_out:
                Path(args.history_out).write_text(json.dumps(history, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
