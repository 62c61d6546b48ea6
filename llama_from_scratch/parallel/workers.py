"""What chapter 15's processes run.

A notebook cannot hand a function defined in one of its cells to new processes (they import
functions by module name), so the chapter's multi-process experiments live here, and the chapter
runs them with :func:`~llama_from_scratch.parallel.distributed.run_on_processes`, which returns what
every rank returned. ``python -m torch.distributed.run --nproc_per_node 2 -m
llama_from_scratch.parallel.workers`` runs :func:`main` the ``torchrun`` way.

Every training function takes the model's shape as a dict of :class:`LlamaConfig` fields, trains a
few AdamW steps on random tokens (the same global batches whatever the number of ranks; each rank
takes its consecutive rows) and returns the weights, the global losses, the bytes this rank held
and the time it took, so that the chapter can compare them with one process.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.parallel.checkpointing import checkpoint_blocks, saved_activation_bytes
from llama_from_scratch.parallel.data_parallel import BucketedDataParallel, all_reduce_gradients
from llama_from_scratch.parallel.distributed import all_gather_flat, init_distributed, reduce_scatter_flat
from llama_from_scratch.parallel.pipeline import PipelineStage, gpipe_step
from llama_from_scratch.parallel.tensor_parallel import tensor_parallel_llama
from llama_from_scratch.parallel.torch_native import dtensor_tensor_parallel_llama, fsdp2_llama, local_tensor
from llama_from_scratch.parallel.zero import ZeroAdamW, state_bytes_per_rank

ADAMW = dict(lr=1e-2, weight_decay=0.1)
METHODS = ("one_process", "by_hand", "bucketed", "torch_ddp", "zero1", "zero2", "zero3", "fsdp2")


def collectives(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Each rank's tensor and what the three collectives give it back."""
    mine = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1)
    summed = mine.clone()
    dist.all_reduce(summed)
    return {"mine": mine, "all_reduce": summed, "all_gather": all_gather_flat(mine),
            "reduce_scatter": reduce_scatter_flat(mine)}


def make_model(config: dict) -> Llama:
    """The chapter's model, the same initial weights on every rank (seed 0)."""
    torch.manual_seed(0)
    return Llama(LlamaConfig(**config))


def make_batches(config: dict, steps: int, global_batch: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of random tokens (inputs, next-token targets), seed 1."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, config["vocab_size"], (global_batch, seq_len + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def train(rank: int, world_size: int, method: str, config: dict, steps: int, global_batch: int,
          seq_len: int) -> dict[str, object]:
    """``steps`` AdamW steps of ``method`` (one of :data:`METHODS`; ``one_process`` ignores the
    other ranks and takes the whole batch). Returns the global mean loss of each step, the final
    full weights, the bytes of parameters/gradients/optimizer state this rank held at the last step,
    and the seconds the steps took."""
    model = make_model(config)
    single = method == "one_process"
    rows = slice(None) if single else slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
    zero = None
    runner = model
    if method.startswith("zero"):
        zero = ZeroAdamW(model, stage=int(method[-1]), **ADAMW)
        opt = zero.optimizer
    else:
        if method == "bucketed":
            runner = BucketedDataParallel(model, bucket_cap_mb=1.0)
        elif method == "torch_ddp":
            runner = torch.nn.parallel.DistributedDataParallel(model)
        elif method == "fsdp2":
            runner = fsdp2_llama(model)
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses, memory = [], {}
    start = time.perf_counter()
    for x, y in make_batches(config, steps, global_batch, seq_len):
        loss = runner(x[rows], targets=y[rows])
        loss.backward()
        if method == "by_hand":
            all_reduce_gradients(model)
        elif method == "bucketed":
            runner.finish_gradient_sync()
        if zero is not None:
            zero.step()
        else:
            opt.step()
        memory = state_bytes_per_rank(model, opt, zero)
        (zero or opt).zero_grad()
        loss = loss.detach()
        if not single:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    if zero is not None:
        weights = zero.full_parameters()
    else:
        weights = {n: (p.full_tensor() if method == "fsdp2" else p.detach().clone())
                   for n, p in model.named_parameters()}
    return {"losses": losses, "weights": weights, "memory": memory, "seconds": seconds}


def train_all(rank: int, world_size: int, methods: list[str], config: dict, steps: int, global_batch: int,
              seq_len: int) -> dict[str, dict[str, object]]:
    """:func:`train` for each of ``methods`` in turn (one start of the processes for all)."""
    return {m: train(rank, world_size, m, config, steps, global_batch, seq_len) for m in methods}


def tensor_parallel(rank: int, world_size: int, config: dict, batch: int, seq_len: int) -> dict[str, object]:
    """Logits and gradients of our tensor-parallel Llama and of PyTorch's (DTensor), against the
    unsplit model: the largest absolute differences, and this rank's weight shapes."""
    x, y = make_batches(config, 1, batch, seq_len)[0]
    unsplit = make_model(config)
    ours = tensor_parallel_llama(make_model(config))
    theirs = dtensor_tensor_parallel_llama(make_model(config))
    logits = unsplit(x).detach()
    out: dict[str, object] = {}
    for name, m in (("ours", ours), ("dtensor", theirs)):
        out[f"logits_diff_{name}"] = (m(x).detach() - logits).abs().max().item()
    for m in (unsplit, ours, theirs):
        m(x, targets=y).backward()
    full = dict(unsplit.named_parameters())
    theirs_params = dict(theirs.named_parameters())
    column = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    row = ("o_proj", "down_proj")
    diff_ours = diff_theirs = 0.0
    for name, p in ours.named_parameters():
        g = full[name].grad
        if any(f".{c}." in name for c in column):
            g = g.chunk(world_size, dim=0)[rank]
        elif any(f".{r}." in name for r in row):
            g = g.chunk(world_size, dim=1)[rank]
        diff_ours = max(diff_ours, (p.grad - g).abs().max().item())
        diff_theirs = max(diff_theirs, (local_tensor(theirs_params[name].grad) - g).abs().max().item())
    out["grad_diff_ours"], out["grad_diff_dtensor"] = diff_ours, diff_theirs
    out["shapes"] = {n: tuple(p.shape) for n, p in ours.named_parameters() if ".layers.0." in n}
    return out


def pipeline(rank: int, world_size: int, config: dict, batch: int, seq_len: int, micro_batches: list[int],
             repeats: int) -> list[dict[str, float]]:
    """Two-stage GPipe steps (untied embeddings) with each number of micro-batches: the batch's
    loss, and the fraction of the step this rank spent computing, from the fastest of
    ``repeats`` steps after one warm-up step."""
    config = {**config, "tie_embeddings": False}
    stage = PipelineStage(make_model(config), rank)
    x, y = make_batches(config, 1, batch, seq_len)[0]
    rows = []
    for m in micro_batches:
        best = None
        for _ in range(repeats + 1):
            stage.zero_grad()
            result = gpipe_step(stage, x, y, m, config["dim"])
            if best is None or result["elapsed"] < best["elapsed"]:
                best = result
        busy = sum(end - start for start, end in best["busy"])
        rows.append({"micro_batches": m, "loss": best["loss"], "elapsed": best["elapsed"],
                     "busy_fraction": busy / best["elapsed"]})
    return rows


def checkpointing_cost(config: dict, batch: int, seq_lens: list[int], repeats: int) -> list[dict[str, float]]:
    """One process: activation bytes kept from forward to backward, and the fastest of
    ``repeats`` timed forward + backward passes, with and without activation checkpointing, at each
    sequence length.

    The two models (same weights) take turns, one pass each, after one untimed warm-up pass each:
    whatever else the machine does then slows both alike, and the fastest pass is the one least
    disturbed."""
    rows = []
    for seq_len in seq_lens:
        x, y = make_batches(config, 1, batch, seq_len)[0]
        models = {enabled: checkpoint_blocks(make_model(config), enabled) for enabled in (False, True)}
        saved = {enabled: saved_activation_bytes(m, lambda m=m: m(x, targets=y)) for enabled, m in models.items()}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats + 1):
            for enabled, model in models.items():
                model.zero_grad()
                start = time.perf_counter()
                model(x, targets=y).backward()
                times[enabled].append(time.perf_counter() - start)
        for enabled in (False, True):
            rows.append({"seq_len": seq_len, "checkpointing": enabled, "saved_bytes": saved[enabled],
                         "seconds": min(times[enabled][1:])})  # the first pass was the warm-up
    return rows


def main() -> None:
    """The ``torchrun`` way: every rank joins the group from the environment ``torchrun`` set,
    trains 3 steps of bucketed data parallelism on a tiny model and rank 0 prints the losses."""
    rank, world_size, _ = init_distributed("gloo")
    config = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    method = "bucketed" if dist.is_initialized() else "one_process"  # run without torchrun: one process
    result = train(rank, world_size, method, config, steps=3, global_batch=4, seq_len=16)
    if rank == 0:
        print(f"world size {world_size}: losses {[round(v, 4) for v in result['losses']]}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
