"""Scaling out (chapter 15): training one model on several processes, built from scratch.

One concept per module, each equal to the single-process result (tests with 2 gloo processes):

* :mod:`~llama_from_scratch.parallel.distributed`: starting and stopping a process group, running a
  function on ``N`` local processes, and the three collectives everything else is made of
  (all-reduce, all-gather, reduce-scatter).
* :mod:`~llama_from_scratch.parallel.data_parallel`: data parallelism. Every rank holds the whole
  model and a slice of the batch; gradients are averaged over the ranks after backward, first by
  hand, then in buckets overlapped with backward (what ``DistributedDataParallel`` does).
* :mod:`~llama_from_scratch.parallel.zero`: ZeRO stages 1, 2 and 3 (Rajbhandari et al. 2020):
  the optimizer state, then the gradients, then the parameters themselves are split across the
  ranks instead of repeated on each, and the per-rank memory this saves.
* :mod:`~llama_from_scratch.parallel.tensor_parallel`: tensor parallelism (Megatron-LM, Shoeybi
  et al. 2019): each weight matrix split across the ranks, column-parallel then row-parallel, so
  that a SwiGLU block or an attention layer needs one all-reduce forward and one backward.
* :mod:`~llama_from_scratch.parallel.pipeline`: a two-stage pipeline (GPipe): each rank whole
  layers, micro-batches to fill the pipeline, and the idle "bubble" that remains.
* :mod:`~llama_from_scratch.parallel.checkpointing`: activation checkpointing, keeping only each
  block's input for backward and recomputing the rest, and the activation memory it saves.
* :mod:`~llama_from_scratch.parallel.torch_native`: the same with PyTorch's own APIs (FSDP2's
  ``fully_shard``, ``torch.distributed.tensor.parallel``), tested equal to the versions above.

Everything runs on CPUs with the gloo backend and on GPUs with NCCL unchanged: no code here names a
device; tensors live where :func:`~llama_from_scratch.parallel.distributed.device_for_rank` says.
"""

from llama_from_scratch.parallel.checkpointing import checkpoint, checkpoint_blocks, saved_activation_bytes
from llama_from_scratch.parallel.data_parallel import (
    BucketedDataParallel,
    all_reduce_gradients,
    broadcast_parameters,
)
from llama_from_scratch.parallel.distributed import (
    all_gather_flat,
    device_for_rank,
    init_distributed,
    reduce_scatter_flat,
    run_on_processes,
)
from llama_from_scratch.parallel.pipeline import PipelineStage, gpipe_bubble_fraction, gpipe_step
from llama_from_scratch.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    tensor_parallel_llama,
)
from llama_from_scratch.parallel.torch_native import dtensor_tensor_parallel_llama, fsdp2_llama
from llama_from_scratch.parallel.zero import (
    ZeroAdamW,
    shard_range,
    state_bytes_per_rank,
    zero_bytes_formula,
)

__all__ = [
    "BucketedDataParallel",
    "ColumnParallelLinear",
    "PipelineStage",
    "RowParallelLinear",
    "ZeroAdamW",
    "all_gather_flat",
    "all_reduce_gradients",
    "broadcast_parameters",
    "checkpoint",
    "checkpoint_blocks",
    "copy_to_tensor_parallel_region",
    "device_for_rank",
    "dtensor_tensor_parallel_llama",
    "fsdp2_llama",
    "gpipe_bubble_fraction",
    "gpipe_step",
    "init_distributed",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_flat",
    "run_on_processes",
    "saved_activation_bytes",
    "shard_range",
    "state_bytes_per_rank",
    "tensor_parallel_llama",
    "zero_bytes_formula",
]
