"""Command-line pretraining, single process or distributed (chapter 8).

    python -m llama_from_scratch.pretrain --synthetic --max_steps 200
    python -m llama_from_scratch.pretrain --synthetic --max_steps 200 --document_mask   # Llama 3's document mask
    python -m llama_from_scratch.pretrain --config run.json --data stories.txt --tokenizer smollm2
    torchrun --nproc_per_node 2 -m llama_from_scratch.pretrain --config run.json --batch_size 4
    torchrun --nproc_per_node 2 -m llama_from_scratch.pretrain --config run.json --fsdp

``--config`` is a JSON file whose keys are :class:`~llama_from_scratch.trainer.TrainConfig` fields
plus, optionally, ``"model"`` (``{"preset": "tiny", ...LlamaConfig fields}``) and ``"data"``
(``{"path", "tokenizer", "synthetic", "block_size", "val_fraction"}``). Every TrainConfig field is
also a command-line option (``--max_lr 3e-4``), which overrides the file.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized (gloo on CPU, NCCL on
CUDA), the model wrapped in DistributedDataParallel, and ``--batch_size`` is *per process*: two
processes with batch b compute the same steps as one process with batch 2b. Only rank 0 logs,
samples, saves checkpoints and writes ``--history_out``. ``--fsdp`` shards the model with FSDP2
instead of DistributedDataParallel (chapter 15): the same steps, each process holding ``1/N`` of
the weights, gradients and AdamW state; checkpoints are gathered on rank 0 and are the folders one
process writes, so ``--resume`` works across the two. ``--fsdp`` needs ``torchrun`` (one process
under ``torchrun --nproc_per_node 1`` runs as one-rank FSDP2); run without it, it exits with a
message saying so.

Unless told where outputs go (``--checkpoint_dir``, ``--history_out``), a run writes them to a run
folder it names at the start, ``runs/pretrain_<UTC time>`` (``--run_dir`` picks another, ``--run_dir
none`` keeps nothing): ``checkpoints/step_XXXXXX`` (every ``--checkpoint_interval`` steps and at the
end), ``history.json`` and ``loss.png`` (the training and validation loss curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.data import load_token_file, pack_tokens, synthetic_corpus, train_val_split
from llama_from_scratch.environment import seed_everything
from llama_from_scratch.model import Llama
from llama_from_scratch.trainer import Trainer, TrainConfig, latest_checkpoint

PRESETS = {"tiny": LlamaConfig.tiny, "smollm2_135m": LlamaConfig.smollm2_135m}
PARALLELISM = {"none": "one process", "ddp": "DistributedDataParallel", "fsdp2": "FSDP2, sharded"}
DATA_KEYS = {"path", "tokenizer", "synthetic", "block_size", "val_fraction"}
RUNS_ROOT = Path("runs")
# warmup used when the default (TrainConfig.warmup_steps) would not fit in --max_steps
SHORT_RUN_WARMUP_SHARE = 0.1


# Fields the docstring describes as a group ("max_lr, min_lr, warmup_steps: cosine_schedule"):
# their own words on the command line.
FLAG_HELP = {
    "max_lr": "peak learning rate, reached at the end of the warmup",
    "min_lr": "learning rate the cosine decay ends at (step max_steps)",
    "warmup_steps": "steps of linear warmup from 0 to max_lr (a short run with the default: 10%% of max_steps)",
    "betas": "AdamW's beta1,beta2 (comma-separated)",
    "eps": "AdamW's epsilon",
    "sample_prompt": "the prompt of the printed samples",
    "sample_tokens": "new tokens per printed sample",
    "sample_temperature": "sampling temperature of the printed samples",
    "sample_top_k": "top-k of the printed samples (none: no cut)",
    "galore_rank": "GaLore: rank of the gradient projection",
    "galore_update_proj_gap": "GaLore: steps between recomputing the projection",
    "galore_scale": "GaLore: scale of the projected update",
    "checkpoint_dir": "where step_XXXXXX checkpoint folders go (default on the command line: <run_dir>/checkpoints)",
}


def field_help() -> dict[str, str]:
    """The meaning of every TrainConfig field, from the ``Attributes:`` section of its docstring
    (one source of truth for the class and the command line). Lines naming several fields
    (``max_lr, min_lr, warmup_steps: ...``) give each of them that text."""
    doc = TrainConfig.__doc__ or ""
    section = doc.split("Attributes:", 1)[-1]
    meanings: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        match = re.match(r"\s{8}([a-z_][a-z0-9_, ]*):\s(.*)", line)
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                meanings[name] = match.group(2).strip()
        elif line.strip() and names:
            for name in names:
                meanings[name] += " " + line.strip()
    for name, text in meanings.items():  # reStructuredText markup reads badly in a terminal
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", text).replace("``", "")
        meanings[name] = text.rstrip(".").replace("%", "%%")
    return meanings


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
    parser.add_argument("--resume", help="a checkpoint folder, or 'latest': the newest in --checkpoint_dir, "
                        "else in --run_dir, else in the newest runs/pretrain_* folder")
    parser.add_argument("--history_out", help="write the history (JSON) here (rank 0)")
    parser.add_argument("--run_dir", help="folder for checkpoints/, history.json and loss.png (default: "
                        f"{RUNS_ROOT}/pretrain_<UTC time> unless --checkpoint_dir or --history_out is given; "
                        "'none': write nothing)")
    hints = typing.get_type_hints(TrainConfig)
    meanings = field_help()
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if f.name == "betas":
            convert = lambda text: tuple(float(v) for v in text.split(","))  # noqa: E731
        elif base is bool:
            convert = _parse_bool  # "--fsdp" alone means true; "--progress false" still works
        elif base in (int, float, str):
            convert = base
        else:
            convert = str
        if type(None) in args:
            convert = _optional(convert)
        default = ",".join(str(b) for b in f.default) if f.name == "betas" else f.default
        meaning = FLAG_HELP.get(f.name) or meanings.get(f.name, f"TrainConfig.{f.name}")
        flag = dict(nargs="?", const=True, metavar="BOOL") if base is bool else {}
        parser.add_argument(f"--{f.name}", type=convert, default=None, help=f"{meaning} (default: {default})",
                            **flag)
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
    max_steps = file_cfg.get("max_steps", TrainConfig.max_steps)
    if "warmup_steps" not in file_cfg and isinstance(max_steps, int) and TrainConfig.warmup_steps > max_steps:
        # a short run (--max_steps 60) with the default warmup (100) would never reach max_lr
        file_cfg["warmup_steps"] = int(SHORT_RUN_WARMUP_SHARE * max_steps)
        print(f"note: the default warmup ({TrainConfig.warmup_steps} steps) exceeds --max_steps {max_steps}; "
              f"warming up for {file_cfg['warmup_steps']} steps instead (set --warmup_steps to choose)",
              file=sys.stderr)
    try:
        config = TrainConfig.from_dict(file_cfg)
    except (TypeError, ValueError) as e:
        hint = " (lower --warmup_steps or raise --max_steps)" if "warmup_steps" in str(e) else ""
        raise SystemExit(f"bad training config: {e}{hint}") from e
    return config, model_cfg, data_cfg, args


def build_model_config(model_cfg: dict) -> LlamaConfig:
    model_cfg = dict(model_cfg)
    preset = model_cfg.pop("preset", "tiny")
    if preset not in PRESETS:
        raise SystemExit(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    base = PRESETS[preset]().to_dict()
    base.update(model_cfg)
    return LlamaConfig(**base)


def data_eos_token_id(data_cfg: dict, model_config: LlamaConfig, tokenizer) -> int | None:
    """The token that ends each document: the synthetic corpus's last id, else the tokenizer's EOS
    (None without a tokenizer: documents of token files are then packed without a separator)."""
    if data_cfg.get("synthetic"):
        return model_config.vocab_size - 1
    return getattr(tokenizer, "eos_token_id", None)


def load_data(data_cfg: dict, model_config: LlamaConfig, seed: int):
    """``(train_blocks, val_blocks, tokenizer)`` from the data settings."""
    tokenizer = None
    if data_cfg.get("tokenizer"):
        from llama_from_scratch.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(data_cfg["tokenizer"])
    if data_cfg.get("synthetic"):
        docs = synthetic_corpus(num_docs=400, vocab_size=model_config.vocab_size, seed=seed)
    elif data_cfg.get("path"):
        docs = load_token_file(data_cfg["path"], tokenizer)
    else:
        raise SystemExit("no data: pass --data PATH or --synthetic")
    top = max((int(max(d)) for d in docs if len(d)), default=-1)
    if top >= model_config.vocab_size:
        raise SystemExit(f"token id {top} does not fit the model's vocab_size {model_config.vocab_size}")
    block_size = data_cfg.get("block_size") or min(128, model_config.max_seq_len)
    if block_size > model_config.max_seq_len:
        raise SystemExit(f"block_size {block_size} exceeds the model's max_seq_len {model_config.max_seq_len}")
    train_docs, val_docs = train_val_split(docs, data_cfg.get("val_fraction", 0.1), seed=seed)
    eos = data_eos_token_id(data_cfg, model_config, tokenizer)
    return pack_tokens(train_docs, block_size, eos), pack_tokens(val_docs, block_size, eos), tokenizer


def choose_run_dir(args: argparse.Namespace, config: TrainConfig) -> Path | None:
    """The run folder: ``--run_dir`` (None for ``none``), else a new ``runs/pretrain_<UTC time>``
    when the command line names no other place for the outputs, else None."""
    if args.run_dir is not None:
        return None if args.run_dir.strip().lower() == "none" else Path(args.run_dir)
    if config.checkpoint_dir or args.history_out:
        return None
    return RUNS_ROOT / datetime.datetime.now(datetime.timezone.utc).strftime("pretrain_%Y%m%d_%H%M%S")


def latest_run_checkpoint(runs_root: Path = RUNS_ROOT) -> Path | None:
    """The newest checkpoint of the newest run folder under ``runs_root`` that has one."""
    for run in sorted((p for p in runs_root.glob("pretrain_*") if p.is_dir()), reverse=True):
        found = latest_checkpoint(run / "checkpoints")
        if found is not None:
            return found
    return None


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """A PNG of the training loss per step, and the validation loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["train_loss"] for r in history], label="train", linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    config, model_cfg, data_cfg, args = resolve(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.fsdp and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        raise SystemExit("--fsdp shards the model over the processes torchrun starts: run "
                         "torchrun --nproc_per_node N -m llama_from_scratch.pretrain --fsdp ... "
                         "(N = 1 gives one-rank FSDP2), or drop --fsdp to train in this one process")
    if (world_size > 1 or config.fsdp) and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and config.device in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    run_dir = choose_run_dir(args, config)
    resume_from = None
    if args.resume == "latest" and not config.checkpoint_dir and args.run_dir is None and run_dir is not None:
        resume_from = latest_run_checkpoint()  # a default run folder is new: continue the newest run
        if resume_from is None:
            raise SystemExit(f"--resume latest: no checkpoint in any {RUNS_ROOT}/pretrain_* folder "
                             "(--checkpoint_dir or --run_dir to look elsewhere)")
        run_dir = resume_from.parent.parent
    if dist.is_initialized():  # every rank uses rank 0's run folder (the clocks may differ)
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    if run_dir is not None and not config.checkpoint_dir:
        config = dataclasses.replace(config, checkpoint_dir=str(run_dir / "checkpoints"))
    if rank == 0:
        if run_dir is not None:
            every = f"every {config.checkpoint_interval} steps and " if config.checkpoint_interval else ""
            print(f"run folder: {run_dir} (checkpoints in {config.checkpoint_dir} {every}at the end, "
                  "history.json, loss.png)", flush=True)
        elif not config.checkpoint_dir:
            print("note: no checkpoints will be saved (--checkpoint_dir or --run_dir to keep them)", flush=True)
    try:
        model_config = build_model_config(model_cfg)
        seed_everything(config.seed)  # the same initial weights in every process
        model = Llama(model_config)
        train_blocks, val_blocks, tokenizer = load_data(data_cfg, model_config, config.seed)
        if config.document_mask and config.eos_token_id is None:
            eos = data_eos_token_id(data_cfg, model_config, tokenizer)
            if eos is None:
                raise SystemExit("--document_mask needs the token that ends each document: pass --eos_token_id "
                                 "or a --tokenizer that has one")
            config = dataclasses.replace(config, eos_token_id=eos)
        trainer = Trainer(model, train_blocks, val_blocks, config, tokenizer=tokenizer)
        if rank == 0:
            print(f"model: {model.num_parameters():,} parameters; train blocks {tuple(train_blocks.shape)}, "
                  f"val blocks {tuple(val_blocks.shape)}; world size {trainer.world_size} "
                  f"({PARALLELISM[trainer.parallelism]}); device {trainer.device}; "
                  f"{'bf16 autocast' if trainer.use_bf16 else 'fp32'}", flush=True)
        if args.resume:
            if resume_from is not None:
                path = resume_from
            elif args.resume == "latest":
                path = latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None
            else:
                path = Path(args.resume)
            if path is None:
                where = config.checkpoint_dir or "any folder: --run_dir none leaves none to look in"
                raise SystemExit(f"--resume latest: no checkpoint in {where}")
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
            if run_dir is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "history.json").write_text(json.dumps(history, indent=1))
                if history:
                    plot_history(history, run_dir / "loss.png")
                print(f"wrote {run_dir / 'history.json'} and {run_dir / 'loss.png'}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
