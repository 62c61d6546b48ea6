"""``python -m llama_from_scratch.release``: an entry point only, forwarding to
:mod:`llama_from_scratch.course.release` (exercises/ from solutions/, the student release)."""

import sys

from llama_from_scratch.course.release import main

if __name__ == "__main__":
    sys.exit(main())
