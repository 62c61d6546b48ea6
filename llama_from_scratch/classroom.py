"""``python -m llama_from_scratch.classroom``: the GitHub Classroom autograding configuration.

A thin entry point: the code lives with the rest of the course machinery in
:mod:`llama_from_scratch.course.classroom`; this module forwards to it so that the documented
command keeps working.
"""

import sys

from llama_from_scratch.course.classroom import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
