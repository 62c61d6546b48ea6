"""Decoding speed: this package's ``generate`` vs transformers' ``generate`` on SmolLM2-135M-Instruct.

Both models are loaded from the same GGUF file (ours with :func:`llama_from_scratch.loading.load_smollm2`,
theirs with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``), get the same prompt
ids and the same settings, and run in this one process, alternately, several times each; the best
run of each counts (other processes on a shared machine only ever slow a run down).

Three settings:

* batch 1, float32, greedy (the outputs must be identical token for token: checked and printed);
* batch 1, bfloat16, greedy;
* batch 16, bfloat16, sampling (temperature 0.8, top-p 0.95; different prompts, left-padded).

Every run generates exactly ``--new-tokens`` tokens per row (no early stop at EOS), so both sides
do the same work. Two figures per side: the decoding speed, from the median time between two new
tokens (taken with our ``stream`` callback and transformers' ``streamer``; the median shrugs off
moments when another process takes the CPU), and the whole call's tokens per second (prompt
included; best run). Besides tokens/s and the ratio, the script prints the memory-bandwidth bound of
decoding: each step reads every weight once (the tied embedding counts once, as the output
projection), so a step cannot be faster than ``weight bytes / read bandwidth``; the read bandwidth
is measured here, in the same process, as the speed of ``sum()`` over a 1 GiB tensor.

    python benchmarks/generation.py            # 128 new tokens, 3 runs each
    python benchmarks/generation.py --quick    # 32 new tokens, 2 runs each
"""

from __future__ import annotations

import argparse
import time

import torch

from llama_from_scratch.generation import generate
from llama_from_scratch.loading import load_smollm2
from llama_from_scratch.weights import find_smollm2_gguf

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What is a llama?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Name a famous painter.",
    "How many legs does a spider have?",
    "Suggest a name for a cat.",
    "What is 12 times 7?",
    "Describe autumn in two sentences.",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
]


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second that ``sum()`` reads from a large float32 tensor (best of ``repeats``)."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied matrix counts once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prompts(tokenizer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` chat prompts, left-padded: ``(input_ids, attention_mask)``."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(batch)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class _Clock:
    """Timestamps of the tokens as they come out (our ``stream`` callback, transformers' ``streamer``)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, _tokens) -> None:  # ours: stream(next_tokens)
        self.times.append(time.perf_counter())

    def put(self, value) -> None:  # transformers: put(prompt) first, then put(next_tokens) per step
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_time(self) -> float:
        """Median time between two new tokens: the decoding step, without the prompt's prefill and
        robust to another process stealing the CPU for part of the run."""
        gaps = sorted(b - a for a, b in zip(self.times, self.times[1:]))
        return gaps[len(gaps) // 2]


def run_ours(model, ids, mask, new_tokens, sample, seed=0) -> tuple[float, float, torch.Tensor]:
    """(wall time, median step time, output)."""
    gen = torch.Generator().manual_seed(seed)
    clock = _Clock()
    t = time.perf_counter()
    out = generate(model, ids, new_tokens, temperature=0.8 if sample else 0.0, top_p=0.95 if sample else None,
                   attention_mask=mask, generator=gen, stream=clock)
    return time.perf_counter() - t, clock.step_time(), out


def run_theirs(model, ids, mask, new_tokens, sample, seed=0) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
    clock = _Clock()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=2, streamer=clock, **kwargs)
    clock.times = clock.times[1:]  # the first put() is the prompt
    return time.perf_counter() - t, clock.step_time(), out


def load_theirs(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = find_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.generation_config.eos_token_id = None  # as ours: exactly new_tokens tokens per row
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 2 runs each")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16, help="batch size of the batched setting")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    runs = args.runs or (2 if args.quick else 3)

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    bandwidth = read_bandwidth()
    print(f"read bandwidth (sum over a 1 GiB float32 tensor): {bandwidth / 1e9:.1f} GB/s")
    print(f"{new_tokens} new tokens per row, best of {runs} runs each, runs alternate ours / transformers\n")

    settings = [("batch 1, fp32, greedy", torch.float32, 1, False),
                ("batch 1, bf16, greedy", torch.bfloat16, 1, False),
                (f"batch {args.batch}, bf16, sampling", torch.bfloat16, args.batch, True)]
    rows = []
    models: dict[torch.dtype, tuple] = {}
    for name, dtype, batch, sample in settings:
        if dtype not in models:
            models.clear()
            ours, tokenizer = load_smollm2(dtype=dtype)
            models[dtype] = (ours, tokenizer, load_theirs(dtype))
        ours, tokenizer, theirs = models[dtype]
        ids, mask = prompts(tokenizer, batch)
        run_ours(ours, ids, mask, 4, sample)  # warm-up
        run_theirs(theirs, ids, mask, 4, sample)
        t_ours = t_theirs = s_ours = s_theirs = float("inf")
        for _ in range(runs):
            dt, st, out_ours = run_ours(ours, ids, mask, new_tokens, sample)
            t_ours, s_ours = min(t_ours, dt), min(s_ours, st)
            dt, st, out_theirs = run_theirs(theirs, ids, mask, new_tokens, sample)
            t_theirs, s_theirs = min(t_theirs, dt), min(s_theirs, st)
        assert out_ours.shape[1] == out_theirs.shape[1] == ids.shape[1] + new_tokens
        n = batch * new_tokens
        bound = bandwidth / weight_bytes(ours) * batch  # tokens/s if a step only read the weights
        rows.append((name, batch / s_ours, batch / s_theirs, n / t_ours, n / t_theirs, bound))
        print(f"{name}: decoding ours {batch / s_ours:.1f} tok/s, transformers {batch / s_theirs:.1f} tok/s "
              f"({s_theirs / s_ours:.2f}x), bound {bound:.1f} tok/s", flush=True)
        if dtype == torch.float32 and not sample:
            same = torch.equal(out_ours, out_theirs)
            text = tokenizer.decode(out_ours[0, ids.shape[1]:].tolist())
            print(f"{name}: outputs identical to transformers: {same}\n  {text!r}")
            if not same:
                raise SystemExit("greedy fp32 outputs differ from transformers")

    print("\ndecoding (tokens/s from the median time between two new tokens, prompt excluded):")
    header = f"{'setting':<28}{'ours':>9}{'transformers':>14}{'ratio':>8}{'bw bound':>10}{'of bound':>10}"
    print(header)
    print("-" * len(header))
    for name, ours_tps, theirs_tps, _, _, bound in rows:
        print(f"{name:<28}{ours_tps:>9.1f}{theirs_tps:>14.1f}{ours_tps / theirs_tps:>7.2f}x"
              f"{bound:>10.1f}{ours_tps / bound:>9.0%}")
    print("\nwhole generate call (prompt included; tokens/s = new tokens / wall time):")
    header = f"{'setting':<28}{'ours':>9}{'transformers':>14}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, _, _, ours_tps, theirs_tps, _ in rows:
        print(f"{name:<28}{ours_tps:>9.1f}{theirs_tps:>14.1f}{ours_tps / theirs_tps:>7.2f}x")


if __name__ == "__main__":
    main()
