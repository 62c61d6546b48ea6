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

Then, at batch 1 (greedy): ours with ``generate(..., compile=True)`` (:mod:`llama_from_scratch.fast_decode`:
fused projections, a static KV cache, ``torch.compile``) in float32 and bfloat16, its greedy
tokens compared with the eager path's; and, when ``llama-cpp-python`` is importable, llama.cpp
decoding the same GGUF file (its own quantized weights, ``--threads`` threads), timed the same way
(median time between two tokens of its ``generate`` iterator). Last, the prefill: tokens/s of one
forward pass over a ``--prompt-tokens`` prompt (best of the runs) for ours, transformers and llama.cpp.

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


def int4_bytes(model: torch.nn.Module) -> int:
    """Bytes one int4 decoding step reads: 4 bits per matrix weight plus a bf16 scale and zero per
    group of 32 (4.5 + 0.5 bits), norms in bf16; the embedding lookup reads one row."""
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    matrices += model.lm_head.weight.numel() if model.config.tie_embeddings else 0
    others = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    return int(matrices * (4 + 32 / 32) / 8 + 2 * others)


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


def run_compiled(model, ids, new_tokens, quantize=None) -> tuple[float, float, torch.Tensor]:
    """Ours through the fused, compiled step (greedy, batch 1): (wall time, median step time, output)."""
    clock = _Clock()
    t = time.perf_counter()
    out = generate(model, ids, new_tokens, temperature=0.0, stream=clock, compile=True, quantize=quantize)
    return time.perf_counter() - t, clock.step_time(), out


def load_llama_cpp(threads: int):
    """llama.cpp on the same GGUF file, or None (with the reason printed) when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python to compare with it)")
        return None
    path = find_smollm2_gguf()
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, {path.name}, {threads} threads")
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)


def run_llama_cpp(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(wall time, median step time, new tokens) of llama.cpp's greedy decoding of ``prompt``."""
    llm.reset()
    clock = _Clock()
    tokens = []
    t = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        clock(token)
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
    return time.perf_counter() - t, clock.step_time(), tokens


def prefill_seconds(run, runs: int) -> float:
    """Best time of ``run()`` (one forward pass over the prompt) after a warm-up."""
    run()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


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
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the prefill test")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp's threads")
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

    # Batch 1, greedy: the compiled fast path and llama.cpp.
    models.clear()  # the batched settings' models; the fast path loads its own below
    fast_rows = []
    loaded = {torch.float32: load_smollm2(dtype=torch.float32)[0]}
    ids_1 = prompts(tokenizer, 1)[0]
    fp32_tokens = run_ours(loaded[torch.float32], ids_1, None, new_tokens, False)[2]
    for dtype, quantize, name in ((torch.float32, None, "fp32"), (torch.bfloat16, None, "bf16"),
                                  (torch.bfloat16, "int4", "int4 weights, bf16")):
        if dtype not in loaded:
            loaded[dtype] = load_smollm2(dtype=dtype)[0]
        ours = loaded[dtype]
        t = time.perf_counter()
        run_compiled(ours, ids_1, 4, quantize)  # compiles (or finds the compiled step) for this dtype and length
        compile_seconds = time.perf_counter() - t
        _, s_eager, out_eager = run_ours(ours, ids_1, None, new_tokens, False)
        s_fast = float("inf")
        for _ in range(runs):
            _, st, out_fast = run_compiled(ours, ids_1, new_tokens, quantize)
            s_fast = min(s_fast, st)
            _, st, out_eager = run_ours(ours, ids_1, None, new_tokens, False)
            s_eager = min(s_eager, st)
        same = int((out_fast == fp32_tokens).all(dim=0).long().cumprod(0).sum()) - ids_1.shape[1]
        n_bytes = weight_bytes(ours) if quantize is None else int4_bytes(ours)
        bound = bandwidth / n_bytes
        fast_rows.append((f"batch 1, {name}", 1 / s_fast, 1 / s_eager, bound))
        print(f"batch 1, {name}: compiled {1 / s_fast:.1f} tok/s, eager ({'bf16' if quantize else name}) "
              f"{1 / s_eager:.1f} tok/s (x{s_eager / s_fast:.2f}); first call {compile_seconds:.0f} s (compiling); "
              f"greedy tokens equal to the fp32 eager path's for the first {same} of {new_tokens}", flush=True)
    llm = load_llama_cpp(args.threads)
    cpp_tps = None
    if llm is not None:
        prompt_1 = ids_1[0].tolist()
        run_llama_cpp(llm, prompt_1, 4)
        s_cpp = min(run_llama_cpp(llm, prompt_1, new_tokens)[1] for _ in range(runs))
        cpp_tps = 1 / s_cpp
        print(f"batch 1, llama.cpp: {cpp_tps:.1f} tok/s", flush=True)

    # Prefill: one forward pass over a long prompt.
    n_prompt = args.prompt_tokens
    prefill = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        ours = loaded[dtype]
        theirs = load_theirs(dtype)
        long_ids = torch.randint(0, ours.config.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            s_ours = prefill_seconds(lambda: ours(long_ids, logits_to_keep=1), runs)
            s_theirs = prefill_seconds(lambda: theirs(input_ids=long_ids, logits_to_keep=1), runs)
        prefill.append((f"prefill {n_prompt} tokens, {name}", n_prompt / s_ours, n_prompt / s_theirs))
        del theirs
    if llm is not None:
        long_prompt = torch.randint(0, 49152, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()

        def cpp_prefill():
            llm.reset()
            llm.eval(long_prompt)

        cpp_prefill_tps = n_prompt / prefill_seconds(cpp_prefill, runs)

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

    print("\nbatch 1, greedy, the compiled fast path (tokens/s, median step):")
    header = f"{'setting':<28}{'compiled':>9}{'eager':>9}{'speed-up':>10}{'bw bound':>10}{'of bound':>10}" + (
        f"{'vs llama.cpp':>14}" if cpp_tps else "")
    print(header)
    print("-" * len(header))
    for name, fast_tps, eager_tps, bound in fast_rows:
        print(f"{name:<28}{fast_tps:>9.1f}{eager_tps:>9.1f}{fast_tps / eager_tps:>9.2f}x{bound:>10.1f}"
              f"{fast_tps / bound:>9.0%}" + (f"{fast_tps / cpp_tps:>13.2f}x" if cpp_tps else ""))
    if cpp_tps:
        print(f"{'llama.cpp (' + find_smollm2_gguf().name.split('.')[-2] + ')':<28}{cpp_tps:>9.1f}")

    print("\nprefill (tokens/s of one forward pass over the prompt, best run):")
    header = f"{'setting':<28}{'ours':>9}{'transformers':>14}{'ratio':>8}" + (f"{'llama.cpp':>11}" if llm else "")
    print(header)
    print("-" * len(header))
    for name, ours_tps, theirs_tps in prefill:
        print(f"{name:<28}{ours_tps:>9.1f}{theirs_tps:>14.1f}{ours_tps / theirs_tps:>7.2f}x"
              + (f"{cpp_prefill_tps:>11.1f}" if llm else ""))


if __name__ == "__main__":
    main()
