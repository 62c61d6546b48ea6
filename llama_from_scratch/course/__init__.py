"""The course machinery around the book: not part of the Llama a reader builds.

``grade`` (the grader: ``python -m llama_from_scratch.grade``), ``sandbox``, ``sandbox_worker`` and
``wire`` (the isolated process that runs a student's code, and the data format between the two),
``answer_rules`` (what an answer may not use), ``batch_grade`` (a whole class at once),
``notebook_source`` (reading exercise notebooks), ``release`` (exercises/ from solutions/, the
student release), ``classroom`` (GitHub Classroom's autograding file) and ``checks/`` (each
chapter's exercise checks). ``llama_from_scratch.grade``, ``.release`` and ``.classroom`` at the
top level are entry points that forward here.
"""
