"""``python -m llama_from_scratch``: lists the commands the package offers."""

COMMANDS = """llama_from_scratch commands:
  python -m llama_from_scratch.grade NOTEBOOK...   grade exercise notebooks
  python -m llama_from_scratch.release [--check]   generate exercises/ from solutions/
"""

if __name__ == "__main__":
    print(COMMANDS)
