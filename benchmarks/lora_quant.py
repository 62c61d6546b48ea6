"""LoRA training step vs PEFT, and NF4 quantize / dequantize vs bitsandbytes, in one process.

Printed output (2-core shared CPU, heavily loaded by other jobs: load average ~7 on 2 cores):

    $ python benchmarks/lora_quant.py
    torch 2.13.0+cpu, 2 threads
    NF4 4096 x 4096 float32, blocksize 64 (outputs checked byte-equal), best of 3
      quantize   bitsandbytes    734.1 ms   ours    741.5 ms   ours / bnb  1.01
      dequantize bitsandbytes     45.5 ms   ours     97.1 ms   ours / bnb  2.13
    LoRA r=8 on all linear layers: 4 layers x dim 576, 325,632 trainable of 42,798,144; batch 4 x 256; best of 3 steps
      peft    12599.5 ms/step      81.3 tok/s  x peft  1.00
      ours    10391.5 ms/step      98.5 tok/s  x peft  1.21

Machine load makes absolute times swing by 2x or more between runs; read the ratios only, and
rerun on a quiet machine before quoting them. Across four runs the LoRA step ratio ranged
0.73-1.21 and depended on which model was timed first (the first one paid for memory warm-up);
the ABBA order used now (ours, peft, peft, ours) is meant to cancel that bias. Both run the same base-model code and the adapters
do the same three small matmuls, so ~1.0 is expected (a single adapted layer, fwd + bwd:
412 ms ours vs 416 ms PEFT). NF4 quantize: ours 0.5-1.0x bitsandbytes' time (both are the same
vectorised torch recipe: bitsandbytes has no native CPU quantize_4bit). NF4 dequantize: ours
2.1-4x slower than bitsandbytes' native multi-threaded C++ kernel; ours is one gather from a
256-row byte table plus an in-place multiply, memory-bound in torch's index_select.

What is measured:

* **LoRA step**: forward + backward + AdamW step of a Llama with rank-8 adapters on all seven
  linear layers of every block (q, k, v, o, gate, up, down), base frozen. ``ours`` is
  ``apply_lora`` on our ``Llama``; ``peft`` is ``peft.get_peft_model`` on a copy of the *same*
  model (PEFT wraps our module), with the same adapters. Both run the same model code, so the
  ratio isolates the adapter layers. Default: SmolLM2-135M's shapes with 4 layers instead of 30
  (``--full`` for all 30), batch 4 x 256 tokens, float32.
* **NF4**: quantizing and dequantizing a 4096 x 4096 float32 matrix (blocksize 64), ours
  (``quantize_nf4`` / ``dequantize_nf4``) vs ``bitsandbytes.functional.quantize_4bit`` /
  ``dequantize_4bit`` on CPU. Best of ``--repeats`` after a warm-up.

    python benchmarks/lora_quant.py                 # defaults
    python benchmarks/lora_quant.py --full --steps 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import llama_from_scratch.lora as lora
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.quantization import dequantize_nf4, quantize_nf4

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def lora_step_fn(model: torch.nn.Module, ids: torch.Tensor):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_lora(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig.smollm2_135m()
    if not args.full:
        config = LlamaConfig(**{**config.to_dict(), "n_layers": args.layers})
    torch.manual_seed(0)
    base = Llama(config).train()
    ours = lora.apply_lora(copy.deepcopy(base), target_modules=ALL_LINEAR, r=8, alpha=16)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    ref.train()
    del base
    trainable = lora.count_parameters(ours, trainable_only=True)
    assert trainable == ref.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq_len
    print(f"LoRA r=8 on all linear layers: {config.n_layers} layers x dim {config.dim}, {trainable:,} trainable "
          f"of {lora.count_parameters(ours):,}; batch {args.batch} x {args.seq_len}; "
          f"best of {args.steps} steps")
    results = {}
    for name, model in (("ours", ours), ("peft", ref), ("peft", ref), ("ours", ours)):  # ABBA: no order bias
        t = best_time(lora_step_fn(model, ids), args.steps)
        results[name] = min(t, results.get(name, float("inf")))
    for name in ("peft", "ours"):
        t = results[name]
        print(f"  {name:5s} {t * 1000:9.1f} ms/step {tokens / t:9.1f} tok/s  x peft {results['peft'] / t:5.2f}")


def bench_nf4(args: argparse.Namespace) -> None:
    import bitsandbytes.functional as BF

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, absmax = quantize_nf4(w)
    ref_packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.reshape(-1)) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_nf4(packed, absmax, w.shape), BF.dequantize_4bit(ref_packed, state))
    print(f"NF4 4096 x 4096 float32, blocksize 64 (outputs checked byte-equal), best of {args.repeats}")
    rows = [
        ("quantize", lambda: quantize_nf4(w), lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4")),
        ("dequantize", lambda: dequantize_nf4(packed, absmax, w.shape), lambda: BF.dequantize_4bit(ref_packed, state)),
    ]
    totals = {"ours": 0.0, "bnb": 0.0}
    for name, ours_fn, ref_fn in rows:
        # ABBA order (ours, bnb, bnb, ours), best of each: no bias from which one runs first
        t_ours = best_time(ours_fn, args.repeats)
        t_ref = min(best_time(ref_fn, args.repeats), best_time(ref_fn, args.repeats))
        t_ours = min(t_ours, best_time(ours_fn, args.repeats))
        totals["ours"] += t_ours
        totals["bnb"] += t_ref
        print(f"  {name:10s} bitsandbytes {t_ref * 1000:8.1f} ms   ours {t_ours * 1000:8.1f} ms   "
              f"ours / bnb {t_ours / t_ref:5.2f}")
    print(f"  {'both':10s} bitsandbytes {totals['bnb'] * 1000:8.1f} ms   ours {totals['ours'] * 1000:8.1f} ms   "
          f"ours / bnb {totals['ours'] / totals['bnb']:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="all 30 layers of SmolLM2-135M")
    parser.add_argument("--layers", type=int, default=4, help="layers when not --full (default 4)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--skip-nf4", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_nf4:
        bench_nf4(args)
    if not args.skip_lora:
        bench_lora(args)


if __name__ == "__main__":
    main()
