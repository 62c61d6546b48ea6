"""What an answer may not use, decided by reading its code in the grader.

An exercise that asks the learner to write cross-entropy is not answered by calling
``F.cross_entropy``. Each chapter's checks declare, per exercise, the dotted names an answer must not
use (``FORBIDDEN`` in ``checks/chNN_*.py``); this module reads the exercise's function or class and
every notebook function or class it refers to (transitively), resolves import aliases
(``import torch.nn.functional as F`` makes ``F.cross_entropy`` ``torch.nn.functional.cross_entropy``)
and reports the first forbidden use. The student's process also trips a wire on the forbidden
functions at run time (``sandbox_worker.Tripwires``), which catches what reading cannot
(``getattr(F, "cross" + "_entropy")``).

Always forbidden: the package itself (``llama_from_scratch``, the book's own implementation), and
``eval``/``exec``/``compile``/``__import__``/``importlib``, which would hide what an answer calls.
"""

from __future__ import annotations

import ast
from typing import Iterable

ALWAYS_FORBIDDEN = ("llama_from_scratch", "builtins.eval", "builtins.exec", "builtins.compile",
                    "builtins.__import__", "importlib")
_BUILTINS = {"eval", "exec", "compile", "__import__", "getattr"}


class _Uses(ast.NodeVisitor):
    """Collects the dotted names a piece of code uses, and the notebook names it refers to."""

    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = dict(aliases)
        self.used: set[str] = set()
        self.names: set[str] = set()

    def _dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            self.names.add(node.id)
            if node.id in self.aliases:
                return self.aliases[node.id]
            if node.id in _BUILTINS:
                return f"builtins.{node.id}"
            return None
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            if base is None:
                return f"*.{node.attr}"
            if base.startswith("*."):
                return f"*.{node.attr}"
            return f"{base}.{node.attr}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            base = self._dotted(node.args[0])
            return f"{base}.{node.args[1].value}" if base and not base.startswith("*.") else f"*.{node.args[1].value}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = self._dotted(node)
        if dotted:
            self.used.add(dotted)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        dotted = self._dotted(node)
        if dotted:
            self.used.add(dotted)

    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node)
        if dotted and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            self.used.add(dotted)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.used.add(alias.name)
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = "." * node.level + (node.module or "")
        for alias in node.names:
            full = f"{module}.{alias.name}"
            self.used.add(full)
            self.aliases[alias.asname or alias.name] = full


def top_level_aliases(trees: Iterable[ast.Module]) -> tuple[dict[str, str], dict[str, ast.AST]]:
    """Import aliases and the defs/classes of a notebook's definitions (later cells win)."""
    aliases: dict[str, str] = {}
    definitions: dict[str, ast.AST] = {}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                for a in node.names:
                    aliases[a.asname or a.name] = f"{module}.{a.name}"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                definitions[node.name] = node
                aliases.pop(node.name, None)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):  # only ALL_CAPS ones are ever loaded
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id.isupper():
                        definitions[t.id] = node
                        aliases.pop(t.id, None)
    return aliases, definitions


def names_used_by(exercise: str, trees: list[ast.Module]) -> set[str]:
    """Dotted names used by ``exercise`` and by every notebook definition it reaches."""
    aliases, definitions = top_level_aliases(trees)
    seen: set[str] = set()
    used: set[str] = set()
    todo = [exercise]
    while todo:
        name = todo.pop()
        if name in seen or name not in definitions:
            continue
        seen.add(name)
        node = definitions[name]
        visitor = _Uses(aliases)
        visitor.visit(node)
        used |= visitor.used
        local = _bound_inside(node) - {name}
        todo += [n for n in visitor.names if n in definitions and n not in seen and n not in local]
    return used


def _bound_inside(node: ast.AST) -> set[str]:
    """Names a function or class binds itself (parameters, assignments, loop targets): a use of
    them is not a use of the notebook's definition of the same name."""
    bound: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
    return bound


def _matches(used: str, forbidden: str) -> bool:
    if used == forbidden or used.startswith(forbidden + "."):
        return True
    if used.startswith("*.") and forbidden.startswith("torch.Tensor."):
        return used[2:] == forbidden[len("torch.Tensor."):]
    return False


def first_violation(exercise: str, trees: list[ast.Module], forbidden: Iterable[str]) -> str | None:
    """``None``, or why the answer to ``exercise`` breaks its rules."""
    used = names_used_by(exercise, trees)
    rules = list(forbidden) + list(ALWAYS_FORBIDDEN)
    for rule in rules:
        hits = sorted(u for u in used if _matches(u, rule))
        if hits:
            shown = hits[0].replace("*.", "Tensor.", 1) if hits[0].startswith("*.") else hits[0]
            if rule == "llama_from_scratch":
                return (f"uses {shown}, the book's own implementation, which this exercise asks you to write "
                        "(graded code may not use the package llama_from_scratch)")
            if rule.startswith(("builtins.", "importlib")):
                return f"uses {shown.removeprefix('builtins.')}, which graded answers may not use (it hides what they call)"
            return f"uses {shown}, which this exercise asks you to write"
    return None
