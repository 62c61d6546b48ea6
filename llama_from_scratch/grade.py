"""``python -m llama_from_scratch.grade`` (also the ``lfs-grade`` script) and, in an exercise
notebook, ``from llama_from_scratch.grade import check``: an entry point only, forwarding to the
grader in :mod:`llama_from_scratch.course.grade`, with the rest of the course machinery."""

import sys

from llama_from_scratch.course.grade import check, main

__all__ = ["check", "main"]

if __name__ == "__main__":
    sys.exit(main())
