"""``python -m llama_from_scratch``: lists the commands the package offers; ``chat`` and ``generate``
run SmolLM2 on the from-scratch model (see :mod:`llama_from_scratch.chat`)."""

import sys

COMMANDS = """llama_from_scratch commands:
  python -m llama_from_scratch chat [--temperature T --top-p P ...]   chat with SmolLM2 (streamed; /reset, /exit)
  python -m llama_from_scratch generate "PROMPT" [--raw ...]          answer one prompt and exit
  python -m llama_from_scratch.grade NOTEBOOK...   grade exercise notebooks
  python -m llama_from_scratch.release [--check]   generate exercises/ from solutions/
  python -m llama_from_scratch.release --student-release DIR   exercises + README + requirements for students
  python -m llama_from_scratch.setup_check         what is missing on this machine, and how to fix it
  python -m llama_from_scratch.pretrain --synthetic --max_steps 200   pretrain (also under torchrun; run folder in runs/)
(every command: --help lists its flags, their defaults and meaning)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("chat", "generate"):
        from llama_from_scratch.chat import main as chat_main

        return chat_main(argv)
    if argv and argv[0] not in ("-h", "--help", "help"):
        sys.stderr.write(f"unknown command {argv[0]!r}\n\n{COMMANDS}")
        return 2
    print(COMMANDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
