"""The pretraining loop (chapter 8): accumulation, clipping, schedule, mixed precision, evaluation,
samples, checkpoints that resume the exact same run, DistributedDataParallel, and FSDP2
(``TrainConfig.fsdp``, chapter 15).

One optimizer step ("step") is ``grad_accum_steps`` micro-batches of ``batch_size`` blocks per
process; with ``W`` processes the global batch is ``batch_size * grad_accum_steps * W`` blocks.
Which blocks a step uses is a pure function of ``(seed, step)`` (:class:`~llama_from_scratch.data.StepSampler`),
which is what makes resuming exact and makes ``W`` processes with batch ``b`` compute what one
process with batch ``W * b`` computes.

Checkpoints are folders::

    step_000100/
        model.safetensors      weights (a tied lm_head is stored once and re-tied on load)
        training_state.pt      step, optimizer state, RNG states, history: tensors and plain
                               Python values only, so torch.load(weights_only=True) reads it
        config.json            the TrainConfig, the model's LlamaConfig and the SHA-256 of the
                               other two files

written to a temporary folder next to the target and renamed into place, so a crash never leaves
a half-written checkpoint under the real name (a save killed midway leaves a ``.step_N.tmp-PID-*``
folder, which the next save in that directory removes). The safetensors header also stores the
SHA-256 of every tensor (dtype, shape and bytes), so a corrupted weight is refused by name:
:func:`load_checkpoint` raises :class:`CheckpointError` for any file that is not exactly what was
saved, and checks every field of the metadata before it changes the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llama_from_scratch.data import StepSampler, TokenBlockDataset
from llama_from_scratch.environment import pick_device, supports_bf16
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama
from llama_from_scratch.optim import (AdamW, GaLoreAdamW, clip_grad_norm, cosine_schedule, galore_param_groups,
                                      weight_decay_groups)
from llama_from_scratch.packing import document_attention_inputs
from llama_from_scratch.parallel.torch_native import (fsdp2_llama, full_state_dicts, full_tensor, gradient_sync,
                                                     load_full_state_dicts)

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "TrainingDiverged",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "estimate_flops_per_token",
    "estimate_mfu",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = 2  # 2: checksums of both data files and of every tensor
IGNORE_INDEX = -100  # targets with this value do not count in the loss (prompt, padding)


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; ``.step`` is the 0-based step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupt, or made for another model/optimizer."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved into every checkpoint as JSON).

    Attributes:
        max_steps: optimizer steps in the run (also the end of the cosine schedule).
        batch_size: blocks per micro-batch *per process*.
        grad_accum_steps: micro-batches whose gradients are summed before each optimizer step.
        max_lr, min_lr, warmup_steps: :func:`~llama_from_scratch.optim.cosine_schedule`.
        weight_decay: AdamW's decoupled decay, applied to matrices only (not to RMSNorm gains).
        betas, eps: AdamW's.
        grad_clip: max global gradient norm (0 or None: no clipping; the norm is still logged).
        eval_interval: validate every this many steps and after the last (0: never).
        eval_steps: validation batches per evaluation (fixed, unshuffled).
        sample_interval: print a sample every this many steps when a tokenizer is given (0: never).
        sample_prompt, sample_tokens, sample_temperature, sample_top_k: the sample.
        checkpoint_dir: where ``step_XXXXXX`` folders go (None: no checkpoints).
        checkpoint_interval: save every this many steps and after the last (0: only after the last).
        seed: data order and RNG seeds.
        device: "auto" (cuda > mps > cpu) or a torch device string.
        dtype: "auto" (bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere), "bf16" or
            "fp32". Weights and optimizer state stay float32; bf16 is autocast for the forward
            pass. (CPU bf16 autocast works but is usually slower than fp32 on CPUs without AMX.)
        optimizer: "adamw" (the from-scratch :class:`~llama_from_scratch.optim.AdamW`), "adamw_fused"
            (``torch.optim.AdamW(fused=True)``: the same update in one C++/CUDA kernel per step, the
            default of transformers' Trainer) or "galore" (:class:`~llama_from_scratch.optim.GaLoreAdamW`).
        galore_rank, galore_update_proj_gap, galore_scale: GaLore's settings.
        peak_flops: the hardware's peak FLOP/s (e.g. 989e12 for an H100's bf16 dense); when set the
            history reports model FLOPs utilization (MFU).
        progress: show a tqdm bar (rank 0 only).
        fsdp: shard weights, gradients and AdamW state over the processes with PyTorch's FSDP2
            (fully_shard on every block, then on the whole model) instead of replicating them with
            DistributedDataParallel; the steps are the same. Needs torch.distributed initialized
            (torchrun); a group of one process runs as one-rank FSDP2. Optimizer adamw only.
        document_mask: attend only within each document of a packed block, with RoPE positions
            restarting at every document (Llama 3's document mask, :mod:`~llama_from_scratch.packing`);
            a document ends at eos_token_id. False: attention crosses documents (GPT-2, nanoGPT).
        eos_token_id: the token that ends each document, for document_mask (None: the tokenizer's).
        compile: run the training forward and backward through ``torch.compile`` (inductor): the
            first step compiles (tens of seconds), later steps run the generated code. Same losses
            as the eager step up to rounding; falls back to eager, with a warning, where compiling
            fails (e.g. no C++ compiler). Evaluation stays eager.
    """

    max_steps: int = 1000
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    eval_interval: int = 100
    eval_steps: int = 10
    sample_interval: int = 0
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    sample_top_k: int | None = 50
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 0
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    optimizer: str = "adamw"
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    peak_flops: float | None = None
    progress: bool = True
    fsdp: bool = False
    document_mask: bool = False
    eos_token_id: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_interval", "eval_steps", "sample_interval", "checkpoint_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got {self.min_lr}, {self.max_lr}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        if self.optimizer not in ("adamw", "adamw_fused", "galore"):
            raise ValueError(f"optimizer must be 'adamw', 'adamw_fused' or 'galore', got {self.optimizer!r}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool)
                                              or not isinstance(self.eos_token_id, int) or self.eos_token_id < 0):
            raise ValueError(f"TrainConfig.eos_token_id must be a token id (an integer >= 0), got {self.eos_token_id!r}")
        if self.fsdp and self.optimizer != "adamw":
            raise ValueError("fsdp needs optimizer 'adamw': GaLore projects whole gradient matrices, and under "
                             "FSDP2 each rank holds only a slice of each (and torch's fused kernel is not used "
                             "on DTensor shards here)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------------


def estimate_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: ``6 N + 12 L d T`` (Kaplan et al.; PaLM appendix B; nanoGPT).

    ``N`` counts the parameters that take part in matrix multiplies: all of them, except an
    *untied* token-embedding matrix (a lookup, no FLOPs); a tied one counts once, as the output
    layer. Each such weight costs 2 FLOPs per token forward and 4 backward: ``6 N``. Attention's
    score and value products add ``2 * 2 * d * T`` per layer and token forward, times 3 with the
    backward: ``12 L d T`` (``d`` = heads x head size; the causal mask's halving is ignored,
    the usual convention, so that MFU figures compare across codebases).
    """
    config = model.config
    n = sum(p.numel() for p in model.parameters())
    if not config.tie_embeddings:
        n -= model.model.embed_tokens.weight.numel()
    return 6 * n + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


def estimate_mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware's peak."""
    return flops_per_token * tokens_per_sec / peak_flops


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def _dedup_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with every shared tensor stored once (safetensors refuses aliases), and
    the aliases ``{dropped_name: kept_name}`` to restore them."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def _tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a changed dtype or shape changes it too)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _clean_stale_saves(folder: Path) -> None:
    """Removes the temporary folders of saves that were killed midway (``.NAME.tmp-PID-*`` whose
    process is gone, or older unnamed ones), and puts back a checkpoint that a killed save had
    moved aside (``.NAME.old-PID``) if nothing replaced it."""
    for entry in folder.iterdir():
        name = entry.name
        if not (name.startswith(".") and entry.is_dir()):
            continue
        if not {f.name for f in entry.iterdir()} <= {MODEL_FILE, STATE_FILE, CONFIG_FILE}:
            continue  # not a checkpoint's folder: never delete what a save did not write
        for marker in (".tmp-", ".old-"):
            if marker not in name:
                continue
            target, _, rest = name[1:].rpartition(marker)
            pid = rest.split("-")[0]
            if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
                continue  # a save in progress (this process or another one)
            if marker == ".old-" and target and not (folder / target).exists():
                os.replace(entry, folder / target)  # the killed save never published its new folder
            else:
                shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    step: int = 0, train_config: TrainConfig | None = None,
                    history: list[dict] | None = None, extra: dict[str, Any] | None = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None, world_size: int = 1) -> Path:
    """Writes a checkpoint folder at ``path`` atomically (temp folder in the same parent, then
    rename; an existing checkpoint there is replaced only once the new one is complete). Leftovers
    of earlier saves killed midway in the same directory are removed first.

    ``model_state`` / ``optimizer_state`` replace ``model.state_dict()`` / ``optimizer.state_dict()``:
    a sharded (FSDP2) run passes the whole state gathered from its ranks
    (:func:`~llama_from_scratch.parallel.torch_native.full_state_dicts`), so it writes the folder one
    process would. ``world_size`` is the number of processes that trained (recorded so that a run
    with another number of processes can check it sees the same global batch)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_saves(path.parent)
    model = getattr(model, "module", model)  # unwrap DDP
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    old = None
    try:
        tensors, aliases = _dedup_state_dict(model.state_dict() if model_state is None else model_state)
        checksums = {name: _tensor_sha256(t) for name, t in tensors.items()}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases),
                                                             "sha256": json.dumps(checksums)})
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": int(step),
            "optimizer": (optimizer.state_dict() if optimizer_state is None else optimizer_state)
            if optimizer is not None else None,
            "rng": _rng_state(),
            "history": list(history or []),
            "extra": extra or {},
            "train": train_config.to_dict() if train_config is not None else None,  # config.json's, verified
        }
        torch.save(state, tmp / STATE_FILE)
        config = {"format": CHECKPOINT_FORMAT, "step": int(step),
                  "train": train_config.to_dict() if train_config is not None else None, "world_size": int(world_size),
                  "model": _model_config_dict(model),
                  "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
                  "sha256": {name: _file_sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous checkpoint back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_checkpoint_config(path: Path) -> dict[str, Any]:
    """config.json, checked field by field (types, format, checksums)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG_FILE} holds a {type(config).__name__}, not an object")
    if config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path / CONFIG_FILE}: format {config.get('format')!r}; this version reads format "
                              f"{CHECKPOINT_FORMAT} (checkpoints with checksums)")
    if not _is_int(config.get("step")) or config["step"] < 0:
        raise CheckpointError(f"{path / CONFIG_FILE}: step {config.get('step')!r} is not a non-negative integer")
    for key, kinds in (("train", dict), ("model", dict), ("optimizer_class", str)):
        if config.get(key) is not None and not isinstance(config[key], kinds):
            raise CheckpointError(f"{path / CONFIG_FILE}: {key} is a {type(config[key]).__name__}")
    sums = config.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(sums.get(f), str) for f in (MODEL_FILE, STATE_FILE)):
        raise CheckpointError(f"{path / CONFIG_FILE}: no sha256 checksums of {MODEL_FILE} and {STATE_FILE}")
    return config


def _check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, where: Path) -> None:
    """The optimizer state dict's structure, hyperparameters (finite numbers) and moment tensors
    (finite, and shaped like their parameter unless GaLore projects them)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise CheckpointError(f"optimizer state in {where} is not a state dict (state, param_groups)")
    for i, group in enumerate(state["param_groups"]):
        if not isinstance(group, dict):
            raise CheckpointError(f"optimizer param_groups[{i}] in {where} is not a dict")
        for key in ("lr", "eps", "weight_decay", "betas"):
            values = group.get(key, 0.0)
            for v in values if isinstance(values, (list, tuple)) else [values]:
                if isinstance(v, torch.Tensor):
                    v = v.item() if v.numel() == 1 else float("nan")
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    raise CheckpointError(f"optimizer param_groups[{i}].{key} = {values!r} in {where} is not a "
                                          "finite non-negative number")
    saved_ids = [i for group in state["param_groups"] for i in group.get("params", [])]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(saved_ids) != len(params):
        raise CheckpointError(f"optimizer state in {where} covers {len(saved_ids)} parameters; this optimizer "
                              f"has {len(params)}")
    by_id = dict(zip(saved_ids, params))
    for pid, entry in state["state"].items():
        if pid not in by_id or not isinstance(entry, dict):
            raise CheckpointError(f"optimizer state in {where} has a bad entry for parameter {pid!r}")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"optimizer state {key} of parameter {pid} in {where} is not finite")
            if key in ("exp_avg", "exp_avg_sq") and "projector" not in entry and value.shape != by_id[pid].shape:
                raise CheckpointError(f"optimizer state {key} of parameter {pid} in {where} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(by_id[pid].shape)}")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, sharded: bool = False) -> dict[str, Any]:
    """Loads a checkpoint folder into ``model`` (and ``optimizer``), restores the RNG states and
    returns ``{"step", "history", "train_config", "extra"}``.

    Everything is checked before the model changes: both data files against their SHA-256 in
    config.json, every tensor against its own SHA-256 (so the error names it), every metadata field
    (step, configs, optimizer hyperparameters). Raises :class:`CheckpointError` naming the problem
    for a missing folder or file, a corrupt (truncated, altered) file, or a checkpoint made for a
    different model shape or optimizer; no other exception escapes for a bad checkpoint.

    ``sharded=True``: ``model`` is sharded with FSDP2 and ``optimizer`` steps its shards; every rank
    reads the whole checkpoint and keeps its own shard
    (:func:`~llama_from_scratch.parallel.torch_native.load_full_state_dicts`, a collective).
    """
    from safetensors import safe_open

    path = Path(path)
    model = getattr(model, "module", model)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    missing = [name for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    config = _read_checkpoint_config(path)

    saved_model_config, current = config.get("model"), _model_config_dict(model)
    if saved_model_config is not None and current is not None and saved_model_config != current:
        diffs = {k: (saved_model_config.get(k), current.get(k)) for k in set(saved_model_config) | set(current)
                 if saved_model_config.get(k) != current.get(k)}
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model: (checkpoint, this model) = {diffs}")
    if optimizer is not None and config.get("optimizer_class") not in (None, type(optimizer).__name__):
        raise CheckpointError(f"checkpoint {path} holds {config['optimizer_class']} state; the optimizer here is "
                              f"{type(optimizer).__name__}")
    try:
        train_config = TrainConfig.from_dict(config["train"]) if config.get("train") else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid train config: {e}") from None

    # Both data files must be exactly what was saved (a pickle is only unpickled once verified).
    corrupt = [name for name in (MODEL_FILE, STATE_FILE) if _file_sha256(path / name) != config["sha256"][name]]
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            aliases = json.loads(header.get("aliases", "{}"))
            tensor_sums = json.loads(header.get("sha256", "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for truncated or garbled files
        raise CheckpointError(f"cannot read weights {path / MODEL_FILE} (corrupt or truncated?): {e}") from None
    if not isinstance(tensor_sums, dict) or not isinstance(aliases, dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path / MODEL_FILE}: its header lacks the tensor checksums or has bad aliases")
    altered = [name for name, t in tensors.items() if tensor_sums.get(name) != _tensor_sha256(t)]
    if altered or set(tensor_sums) != set(tensors):
        raise CheckpointError(f"{path / MODEL_FILE} is corrupt: tensors {sorted(altered)[:10]} do not match their "
                              f"sha256, or tensors are missing {sorted(set(tensor_sums) - set(tensors))[:10]}")
    if corrupt:  # the tensors are intact: the header or the training state was altered
        raise CheckpointError(f"{[str(path / name) for name in corrupt]} corrupt: sha256 differs from {CONFIG_FILE}")
    for alias, name in aliases.items():
        if name in tensors:
            tensors[alias] = tensors[name]
    expected = model.state_dict()
    missing_keys = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in tensors and tensors[k].shape != v.shape]
    if missing_keys or unexpected or wrong_shape:
        raise CheckpointError(f"weights in {path} do not fit the model: missing {missing_keys[:10]}, unexpected "
                              f"{unexpected[:10]}, shape mismatches (checkpoint vs model) {wrong_shape[:10]}")

    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / STATE_FILE} (corrupt or truncated?): {e}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path / STATE_FILE} is not a format-{CHECKPOINT_FORMAT} training state")
    if state.get("step") != config["step"] or not _is_int(state.get("step")):
        raise CheckpointError(f"{path}: step {state.get('step')!r} in {STATE_FILE} differs from step "
                              f"{config['step']!r} in {CONFIG_FILE}")
    if not isinstance(state.get("history"), list) or not isinstance(state.get("extra"), dict) \
            or not isinstance(state.get("rng"), dict):
        raise CheckpointError(f"{path / STATE_FILE}: history, extra or rng has the wrong type")
    if state.get("train") != config.get("train"):
        raise CheckpointError(f"{path}: the train config in {CONFIG_FILE} differs from the one saved in {STATE_FILE}")
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state")
        _check_optimizer_state(state["optimizer"], optimizer, path)

    # Everything checked: set the RNGs and the optimizer (torch checks the state dict before it
    # changes anything; the RNGs are put back if either refuses), then the model, whose names and
    # shapes were checked above.
    rng_before = _rng_state()
    try:
        if restore_rng:
            _set_rng_state(state["rng"])
        if sharded:
            load_full_state_dicts(model, optimizer, tensors, state["optimizer"] if optimizer is not None else None)
        elif optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except Exception as e:
        _set_rng_state(rng_before)
        raise CheckpointError(f"checkpoint {path}: the optimizer or RNG state does not fit "
                              f"({type(e).__name__}: {e})") from None
    if not sharded:
        with torch.no_grad():
            model.load_state_dict(tensors, strict=True)
    return {"step": state["step"], "history": state["history"], "extra": state["extra"],
            "train_config": train_config}


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The ``step_XXXXXX`` folder with the highest step in ``checkpoint_dir`` (None if none)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    steps = [(int(p.name[5:]), p) for p in folder.iterdir()
             if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return max(steps)[1] if steps else None


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def _as_dataset(data):
    """A ``[N, block_size + 1]`` tensor becomes a :class:`TokenBlockDataset`; anything else must
    already offer ``len(data)``, ``data.block_size`` and ``data.batch(indices) -> (x, y)`` (for
    instance :class:`~llama_from_scratch.instruct.SFTBlocks`, whose targets hold ``-100`` on the
    positions the loss skips)."""
    if data is None or isinstance(data, TokenBlockDataset):
        return data
    if isinstance(data, torch.Tensor):
        return TokenBlockDataset(data)
    if all(hasattr(data, name) for name in ("batch", "block_size", "__len__")):
        return data
    raise TypeError(f"data must be a [N, block_size + 1] LongTensor, a TokenBlockDataset, or a dataset with "
                    f"__len__, block_size and batch(indices) -> (x, y); got {type(data).__name__}")


class Trainer:
    """Trains ``model`` (a :class:`~llama_from_scratch.model.Llama`, or any module mapping ids
    ``[B, T]`` to logits ``[B, T, V]``) on packed blocks.

    ``train_data`` / ``val_data``: a ``[N, block_size + 1]`` LongTensor (from
    :func:`~llama_from_scratch.data.pack_tokens`), a :class:`~llama_from_scratch.data.TokenBlockDataset`,
    or any dataset with ``batch(indices) -> (x, y)`` such as
    :class:`~llama_from_scratch.instruct.SFTBlocks` (instruction tuning: targets are ``-100`` on
    the prompt and the padding, which the loss skips).
    Under ``torchrun`` (``torch.distributed`` initialized before the Trainer is built) the model is
    wrapped in ``DistributedDataParallel`` and each process takes its slice of every global batch;
    only rank 0 prints, samples and saves. With ``config.fsdp`` the model is sharded with FSDP2
    instead (:func:`~llama_from_scratch.parallel.torch_native.fsdp2_llama`): the same steps, each
    rank holding ``1 / world_size`` of the weights, gradients and AdamW state; checkpoints gather
    the whole state and are the folders one process writes.

    ``trainer.train()`` runs to ``config.max_steps`` (``train(steps=k)`` runs ``k`` more) and
    returns ``trainer.history``: one dict per step with ``step`` (0-based), ``lr``, ``train_loss``,
    ``grad_norm``, ``tokens_per_sec``, ``val_loss`` (None except at evaluations) and ``mfu`` (when
    ``peak_flops`` is set).
    """

    def __init__(self, model: nn.Module, train_data, val_data=None, config: TrainConfig | None = None,
                 tokenizer=None) -> None:
        self.config = config = config if config is not None else TrainConfig()
        self.tokenizer = tokenizer
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0

        if config.device == "auto":
            device = pick_device()
            if device.type == "cuda" and self.distributed:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = pick_device(config.device)
        self.device = device
        if config.dtype == "bf16" and device.type == "cuda" and not supports_bf16(device):
            raise ValueError(f"bf16 autocast is not supported on {device} (a GPU older than Ampere)")
        self.use_bf16 = config.dtype == "bf16" or (config.dtype == "auto" and device.type == "cuda"
                                                   and supports_bf16(device))

        self.train_data = _as_dataset(train_data)
        self.val_data = _as_dataset(val_data)
        if self.train_data is None or len(self.train_data) == 0:
            raise ValueError("train_data is empty")
        self.block_size = self.train_data.block_size
        self.document_eos: int | None = None  # the EOS id whose documents the attention keeps apart
        if config.document_mask:
            eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("TrainConfig.document_mask needs the token that ends each document: set "
                                 "eos_token_id, or pass a tokenizer that has an eos_token_id")
            self.document_eos = int(eos)

        self.model = model.to(device)
        self.flops_per_token = (estimate_flops_per_token(self.model, self.block_size)
                                if hasattr(self.model, "config") and hasattr(self.model.config, "n_layers")
                                else None)
        # ddp_model is what the training step calls: DDP's wrapper, or the model itself (one
        # process, or FSDP2, which shards the model in place).
        if config.fsdp:
            self.parallelism = "fsdp2"
            self.model = self.ddp_model = self._shard_fsdp2(self.model)
        elif self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.parallelism = "ddp"
            device_ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=device_ids)
        else:
            self.parallelism = "none"
            self.ddp_model = self.model

        # The compiled step: what train_step calls when config.compile (None: the eager ddp_model).
        self.compiled_model = torch.compile(self.ddp_model) if config.compile else None

        self.sampler = StepSampler(len(self.train_data), config.batch_size, seed=config.seed, rank=self.rank,
                                   world_size=self.world_size)
        self.optimizer = self._build_optimizer()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []

    # ----- setup ----------------------------------------------------------------------------

    def _shard_fsdp2(self, model: nn.Module) -> nn.Module:
        """``model`` sharded in place with FSDP2 over all processes of the group."""
        from torch.distributed.device_mesh import init_device_mesh

        if not self.distributed:
            raise ValueError("TrainConfig.fsdp shards the model over the processes of a torch.distributed group, "
                             "and none is initialized: launch with torchrun (torchrun --nproc_per_node N -m "
                             "llama_from_scratch.pretrain --fsdp ...) or call dist.init_process_group first")
        if not isinstance(model, Llama):
            raise ValueError(f"TrainConfig.fsdp shards a Llama block by block; got a {type(model).__name__}")
        return fsdp2_llama(model, init_device_mesh(self.device.type, (self.world_size,)))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "galore":
            groups = galore_param_groups(self.model, rank=c.galore_rank, update_proj_gap=c.galore_update_proj_gap,
                                         scale=c.galore_scale, weight_decay=c.weight_decay)
            return GaLoreAdamW(groups, lr=c.max_lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        if c.optimizer == "adamw_fused":
            return torch.optim.AdamW(weight_decay_groups(self.model, c.weight_decay), lr=c.max_lr, betas=c.betas,
                                     eps=c.eps, weight_decay=c.weight_decay, fused=True)
        # Under FSDP2 the parameters are DTensor shards, and AdamW updates each rank's shard.
        return AdamW(weight_decay_groups(self.model, c.weight_decay), lr=c.max_lr, betas=c.betas, eps=c.eps,
                     weight_decay=c.weight_decay)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _gradient_sync(self, enabled: bool):
        """Gradients are averaged over the processes only on the last micro-batch of a step (DDP's
        ``no_sync``, FSDP2's ``set_requires_gradient_sync``); the others accumulate locally."""
        if self.parallelism == "fsdp2":
            return gradient_sync(self.ddp_model, enabled)
        if self.parallelism == "ddp" and not enabled:
            return self.ddp_model.no_sync()
        return contextlib.nullcontext()

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world_size
        return t

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on the targets ``y`` of the inputs ``x``.

        A :class:`~llama_from_scratch.model.Llama` computes it itself (``model(x, targets=y)``,
        through DistributedDataParallel's wrapper when there is one): in float32 that is the
        chunked loss, which never stores the ``[B, T, vocab]`` logits. Other models return logits.
        With ``config.document_mask`` the model also gets the document mask and the restarting
        positions of ``x`` (:func:`~llama_from_scratch.packing.document_attention_inputs`).
        """
        kwargs = {}
        if self.document_eos is not None:
            mask, positions = document_attention_inputs(x, self.document_eos)
            kwargs = {"attention_mask": mask, "position_ids": positions}
        with self._autocast():
            if not (y != IGNORE_INDEX).any():
                # A micro-batch without a single target (every response cut away in SFT): a zero that
                # still depends on the weights, so backward works and the step changes nothing.
                return model(x, **kwargs).float().sum() * 0.0
            if isinstance(self.model, Llama):
                return model(x, targets=y, **kwargs)
            logits = model(x, **kwargs)
        return cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)

    def _train_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`_loss` of the training model: the compiled one when ``config.compile``, falling
        back for good to the eager model (with a warning) if compiling fails."""
        if self.compiled_model is not None:
            try:
                return self._loss(self.compiled_model, x, y)
            except Exception as error:  # noqa: BLE001 (inductor raises many kinds: no compiler, unsupported op)
                self.compiled_model = None
                warnings.warn(f"torch.compile of the training step failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); training eagerly",
                              RuntimeWarning, stacklevel=2)
        return self._loss(self.ddp_model, x, y)

    # ----- one step -------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns its history record."""
        c, step = self.config, self.step
        lr = cosine_schedule(step, c.max_lr, c.min_lr, c.warmup_steps, c.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(c.grad_accum_steps):
            x, y = self.train_data.batch(self.sampler.indices(step * c.grad_accum_steps + micro))
            x, y = x.to(self.device), y.to(self.device)
            tokens += x.numel() * self.world_size
            last = micro == c.grad_accum_steps - 1
            with self._gradient_sync(last):
                loss = self._train_loss(x, y)
                (loss / c.grad_accum_steps).backward()
            total += loss.detach() / c.grad_accum_steps
        train_loss = self._all_reduce_mean(total).item()
        if not math.isfinite(train_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"training diverged: loss is {train_loss} at step {step}", step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm(params, c.grad_clip if c.grad_clip else float("inf"))
        grad_norm = full_tensor(grad_norm).item()  # under FSDP2 a DTensor (the norm over all shards)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"training diverged: gradient norm is {grad_norm} at step {step}", step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        record = {"step": step, "lr": lr, "train_loss": train_loss, "val_loss": None, "grad_norm": grad_norm,
                  "tokens_per_sec": tokens / dt if dt > 0 else float("inf")}
        if c.peak_flops and self.flops_per_token:
            record["mfu"] = estimate_mfu(self.flops_per_token, record["tokens_per_sec"], c.peak_flops)
        self.step += 1
        self.history.append(record)
        return record

    # ----- evaluation and samples -------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over ``eval_steps`` fixed batches (the same every time; under DDP
        each process takes its slice of each global batch). None without validation data."""
        if self.val_data is None or self.config.eval_steps == 0:
            return None
        sampler = StepSampler(len(self.val_data), self.config.batch_size, rank=self.rank,
                              world_size=self.world_size, shuffle=False)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.config.eval_steps):
            x, y = self.val_data.batch(sampler.indices(i))
            total += self._loss(self.model, x.to(self.device), y.to(self.device))
        self.model.train(was_training)
        return self._all_reduce_mean(total / self.config.eval_steps).item()

    @torch.no_grad()
    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """A sampled continuation of ``prompt`` (needs a tokenizer); uses its own seeded generator,
        so sampling does not disturb the training run's random state."""
        from llama_from_scratch.generation import generate

        if self.tokenizer is None:
            raise ValueError("sampling needs a tokenizer (Trainer(..., tokenizer=...))")
        c = self.config
        prompt = c.sample_prompt if prompt is None else prompt
        ids = list(self.tokenizer.encode(prompt)) or [self.tokenizer.eos_token_id]
        max_new = c.sample_tokens if max_new_tokens is None else max_new_tokens
        max_new = max(1, min(max_new, self.model.config.max_seq_len - len(ids)))
        generator = torch.Generator(device=self.device).manual_seed(c.seed + self.step)
        # Sampling runs in the weights' dtype (float32), not under autocast: the KV cache holds one
        # dtype, and a few dozen tokens cost little.
        out = generate(self.model, torch.tensor([ids], device=self.device), max_new,
                       temperature=c.sample_temperature, top_k=c.sample_top_k, generator=generator,
                       eos_token_id=getattr(self.tokenizer, "eos_token_id", None))
        return self.tokenizer.decode(out[0].tolist())

    # ----- the loop ---------------------------------------------------------------------------

    def train(self, steps: int | None = None) -> list[dict[str, Any]]:
        """Trains until ``config.max_steps`` (or for ``steps`` more steps); returns the history."""
        from tqdm.auto import tqdm

        c = self.config
        end = c.max_steps if steps is None else min(c.max_steps, self.step + steps)
        bar = tqdm(total=end - self.step, disable=not (c.progress and self.is_main), desc="train")
        try:
            while self.step < end:
                record = self.train_step()
                done = self.step
                if c.eval_interval and (done % c.eval_interval == 0 or done == c.max_steps):
                    record["val_loss"] = self.evaluate()
                # Under FSDP2 every rank samples (each forward gathers the weights from all of
                # them; the seeded generator makes the ranks agree); rank 0 keeps and prints it.
                if (c.sample_interval and self.tokenizer is not None and (self.is_main or c.fsdp)
                        and (done % c.sample_interval == 0 or done == c.max_steps)):
                    text = self.sample()
                    if self.is_main:
                        self.samples.append({"step": record["step"], "text": text})
                        bar.write(f"[step {record['step']}] {text!r}")
                if c.checkpoint_dir and ((c.checkpoint_interval and done % c.checkpoint_interval == 0)
                                         or done == c.max_steps):
                    self.save_checkpoint()
                postfix = {"loss": f"{record['train_loss']:.4f}", "lr": f"{record['lr']:.2e}"}
                if record["val_loss"] is not None:
                    postfix["val"] = f"{record['val_loss']:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
        finally:
            bar.close()
        return self.history

    # ----- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Saves to ``path`` (default ``checkpoint_dir/step_XXXXXX``); only rank 0 writes, the
        others wait for it (under FSDP2 they first send it their shards). Returns the folder (None
        on other ranks)."""
        if path is None:
            if not self.config.checkpoint_dir:
                raise ValueError("no path given and config.checkpoint_dir is not set")
            path = Path(self.config.checkpoint_dir) / f"step_{self.step:06d}"
        saved = None
        model_state = optimizer_state = None
        if self.parallelism == "fsdp2":
            model_state, optimizer_state = full_state_dicts(self.model, self.optimizer)  # every rank takes part
        if self.is_main:
            saved = save_checkpoint(path, self.model, self.optimizer, self.step, self.config, self.history,
                                    model_state=model_state, optimizer_state=optimizer_state,
                                    world_size=self.world_size)
        if self.world_size > 1:
            dist.barrier()
        return saved

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restores model, optimizer, step, history and RNG states from ``path`` so that
        :meth:`train` continues the exact same run. Returns the step.

        The number of processes may differ from the run that saved (a checkpoint holds the whole
        model, however many ranks wrote it) as long as the global batch, ``batch_size`` times the
        number of processes, is the same: every step then sees the same blocks."""
        try:
            written = _read_checkpoint_config(Path(path))
            saved, saved_world = written.get("train"), written.get("world_size", 1)
        except (OSError, CheckpointError):
            saved = None  # load_checkpoint below reports what is wrong with the folder
        if saved is not None:
            # These decide which data each step sees and what the optimizer state means: a
            # different value would not continue the same run. (max_steps may change.)
            for name in ("optimizer", "grad_accum_steps", "seed"):
                if saved.get(name) != getattr(self.config, name):
                    raise CheckpointError(f"checkpoint {path} was made with {name}={saved.get(name)!r}, "
                                          f"this run has {name}={getattr(self.config, name)!r}")
            saved_batch = saved.get("batch_size")
            if not (_is_int(saved_world) and _is_int(saved_batch)) or \
                    saved_batch * saved_world != self.config.batch_size * self.world_size:
                raise CheckpointError(f"checkpoint {path} was made with a global batch of batch_size="
                                      f"{saved.get('batch_size')!r} x {saved_world!r} processes, this run has "
                                      f"batch_size={self.config.batch_size} x {self.world_size} processes")
        info = load_checkpoint(path, self.model, self.optimizer, sharded=self.parallelism == "fsdp2")
        self.step = info["step"]
        self.history = list(info["history"])
        return self.step


def train(model: nn.Module, data, val_data=None, config: TrainConfig | None = None, tokenizer=None,
          resume_from: str | os.PathLike | None = None, **overrides) -> Trainer:
    """Functional entry: builds a :class:`Trainer` (``overrides`` replace ``config`` fields), resumes
    from a checkpoint if given, trains to ``max_steps`` and returns the trainer (its ``history``,
    ``samples`` and ``model``)."""
    base = config.to_dict() if config is not None else {}
    base.update(overrides)
    trainer = Trainer(model, data, val_data, TrainConfig.from_dict(base), tokenizer=tokenizer)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    trainer.train()
    return trainer

