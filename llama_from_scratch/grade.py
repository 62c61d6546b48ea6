"""``python -m llama_from_scratch.grade`` and ``from llama_from_scratch.grade import check``.

A thin entry point: the grader lives with the rest of the course machinery in
:mod:`llama_from_scratch.course.grade`; this module forwards to it so that the documented command,
the ``lfs-grade`` script and the exercise notebooks' import keep working.
"""

import sys

from llama_from_scratch.course.grade import check, main

__all__ = ["check", "main"]

if __name__ == "__main__":
    sys.exit(main())
