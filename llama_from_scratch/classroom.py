"""``python -m llama_from_scratch.classroom``: an entry point only, forwarding to
:mod:`llama_from_scratch.course.classroom` (GitHub Classroom's autograding configuration)."""

import sys

from llama_from_scratch.course.classroom import main

if __name__ == "__main__":
    sys.exit(main())
