"""The student's side of grading: load a notebook's definitions and answer the grader's calls.

    python -I sandbox_worker.py REQUEST_FD REPLY_FD      (started by ``llama_from_scratch.course.sandbox``)

This process is untrusted: it runs the student's code, inside a sandbox when one is available. It
never sees a check, an expected value or a verdict. The grader sends requests (load the notebook,
call this function with these arguments) as data (``wire.py``) and this process sends back what
the student's code returned, raised or printed. Whatever it sends, the grader decides.

It imports only the standard library, torch, safetensors and ``wire.py`` (copied beside it), so
that the package ``llama_from_scratch`` itself is not needed here; importing it from graded code
gives a stand-in whose every use fails with "uses llama_from_scratch..., which this exercise asks
you to write".
"""

from __future__ import annotations

import ast
import contextlib
import importlib.abc
import importlib.machinery
import io
import os
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any, Iterator

_KEPT_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
STUDENT_FILE_PREFIX = "<cell"
BLOCKED_PACKAGE = "llama_from_scratch"


# --------------------------------------------------------------------------- notebook definitions

@dataclass
class LoadedNotebook:
    """The definitions of a notebook and what went wrong while loading them, per cell."""

    namespace: dict[str, Any]
    cell_errors: dict[int, str]


def is_constant_assignment(node: ast.stmt) -> bool:
    """``NAME = ...`` or ``NAME: T = ...`` where every target is an ALL_CAPS name."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets = [node.target]
    else:
        return False
    return all(isinstance(t, ast.Name) and t.id.isupper() for t in targets)


def strip_ipython(source: str) -> str:
    """Comment out IPython-only lines (``%magic``, ``!shell``) so the cell parses as Python."""
    return "\n".join("# " + line if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def definitions_of(source: str, index: int) -> ast.Module:
    """The kept statements of one cell (imports, defs, classes, ALL_CAPS constants); SyntaxError
    propagates."""
    tree = ast.parse(strip_ipython(source), filename=f"<cell {index}>")
    tree.body = [n for n in tree.body if isinstance(n, _KEPT_NODES) or is_constant_assignment(n)]
    return tree


class _Sink(io.TextIOBase):
    """A text stream that keeps the first ``limit`` characters written to it and drops the rest."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        super().__init__()
        self.kept: list[str] = []
        self.room = limit

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.room > 0:
            self.kept.append(text[: self.room])
            self.room -= len(self.kept[-1])
        return len(text)

    def getvalue(self) -> str:
        return "".join(self.kept)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Swallow what student code prints, so a chatty notebook cannot flood anything."""
    sink = _Sink()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def load_cells(cells: list[str]) -> LoadedNotebook:
    """Execute the definitions of every code cell, in order, in one namespace. A cell that does not
    parse, or whose definitions raise (a failing import, say), is recorded and skipped."""
    namespace: dict[str, Any] = {"__name__": "__lfs_notebook__"}
    cell_errors: dict[int, str] = {}
    for index, source in enumerate(cells):
        if source is None:
            continue
        try:
            tree = definitions_of(source, index)
        except SyntaxError as exc:
            cell_errors[index] = f"syntax error in cell {index}, line {exc.lineno}: {exc.msg}"
            continue
        if not tree.body:
            continue
        try:
            with silenced():
                exec(compile(tree, f"<cell {index}>", "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - a student's cell may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            cell_errors[index] = f"cell {index} failed while defining its names: {type(exc).__name__}: {exc}"
    return LoadedNotebook(namespace, cell_errors)


# --------------------------------------------------------------------------- rules

class ForbiddenUse(RuntimeError):
    """Raised when graded code uses what its exercise asks the learner to write."""


def _forbidden_message(name: str) -> str:
    return f"uses {name}, which this exercise asks you to write"


class _Blocked(types.ModuleType):
    """Stand-in for the package inside the sandbox: importable, unusable."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _BlockedThing(f"{self.__name__}.{attr}")


class _BlockedThing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ForbiddenUse(_forbidden_message(self._name))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _BlockedThing(f"{self._name}.{attr}")

    def __mro_entries__(self, bases: tuple) -> tuple:
        raise ForbiddenUse(_forbidden_message(self._name))


class _BlockPackage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every import of ``llama_from_scratch...`` with a ``_Blocked`` module."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):  # noqa: ANN201
        if fullname == BLOCKED_PACKAGE or fullname.startswith(BLOCKED_PACKAGE + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Blocked(spec.name)
        module.__path__ = []  # a package, so submodule imports come back here
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class Tripwires:
    """Wraps forbidden functions so that a direct call from the student's code raises
    ``ForbiddenUse`` while the exercise that forbids them is being graded (library code calling
    them is not affected)."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.installed: set[str] = set()

    def install(self, names: list[str]) -> None:
        for name in names:
            if name in self.installed:
                continue
            owner, attr = _resolve_owner(name)
            if owner is None:
                continue
            original = getattr(owner, attr, None)
            if not callable(original) or isinstance(original, type):
                continue
            try:
                setattr(owner, attr, self._wrap(name, original))
            except (AttributeError, TypeError):
                continue
            self.installed.add(name)

    def _wrap(self, name: str, original: Any) -> Any:
        active = self.active

        def tripwire(*args: Any, **kwargs: Any) -> Any:
            if name in active and sys._getframe(1).f_code.co_filename.startswith(STUDENT_FILE_PREFIX):
                raise ForbiddenUse(_forbidden_message(name))
            return original(*args, **kwargs)

        tripwire.__name__ = getattr(original, "__name__", name.rsplit(".", 1)[-1])
        tripwire.__doc__ = getattr(original, "__doc__", None)
        return tripwire


def _resolve_owner(dotted: str) -> tuple[Any, str]:
    """``"torch.nn.functional.cross_entropy"`` -> (the module torch.nn.functional, "cross_entropy");
    ``"torch.Tensor.logsumexp"`` -> (torch.Tensor, "logsumexp"); (None, "") if it does not resolve."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:-1]:
                obj = getattr(obj, part)
        except AttributeError:
            return None, ""
        return obj, parts[-1]
    return None, ""


# --------------------------------------------------------------------------- the server

class Worker:
    """Answers the grader's requests, one at a time, over two pipes."""

    def __init__(self, request_fd: int, reply_fd: int, max_bytes: int) -> None:
        import wire  # copied beside this file

        self.wire = wire
        self.request_fd, self.reply_fd, self.max_bytes = request_fd, reply_fd, max_bytes
        self.loaded: LoadedNotebook | None = None
        self.objects: dict[int, Any] = {}
        self.tripwires = Tripwires()

    # messages
    def send(self, header: dict[str, Any], value: Any = None, extra: dict[str, Any] | None = None) -> None:
        enc = self._encoder = self.wire.Encoder(on_object=self._handle_for)
        header = dict(header)
        if value is not None or "value" in header:
            header["value"] = enc.encode(value)
        for key, item in (extra or {}).items():
            header[key] = enc.encode(item)
        data = self.wire.pack(header, enc.tensors)
        view = memoryview(data)
        while view:
            view = view[os.write(self.reply_fd, view):]

    def receive(self) -> tuple[dict[str, Any], dict[str, Any]]:
        w = self.wire
        n_head, n_blob = w.unpack_lengths(w.read_exact(self.request_fd, w.HEADER_SIZE, os.read), self.max_bytes)
        head = w.read_exact(self.request_fd, n_head, os.read)
        blob = w.read_exact(self.request_fd, n_blob, os.read)
        return w.unpack_body(head, blob)

    def _handle_for(self, obj: Any) -> Any:
        """Non-data results: iterators become lists (capped); anything else stays here as a handle."""
        if isinstance(obj, (types.GeneratorType, map, filter, zip, range)) or type(obj).__name__ in (
                "dict_keys", "dict_values", "dict_items", "odict_keys", "odict_values", "odict_items"):
            items = []
            for item in obj:
                if len(items) >= 1_000_000:
                    raise self.wire.WireError("an iterator of more than a million items cannot be sent")
                items.append(item)
            return self._encoder.encode(items)
        key = len(self.objects) + 1
        self.objects[key] = obj
        return {"__handle__": key, "type": type(obj).__name__}

    def decoder(self, tensors: dict[str, Any]) -> Any:
        return self.wire.Decoder(tensors, on_handle=self._object, on_construct=lambda c: c.build(),
                                 on_callback=self._callback)

    def _object(self, key: int) -> Any:
        if key not in self.objects:
            raise self.wire.WireError(f"unknown object handle {key}")
        return self.objects[key]

    def _callback(self, key: int) -> Any:
        worker = self

        def call_grader(*args: Any, **kwargs: Any) -> Any:
            worker.send({"op": "callback", "id": key}, extra={"args": list(args), "kwargs": kwargs})
            header, tensors = worker.receive()
            if header.get("op") != "callback_result":
                raise RuntimeError("the grader did not answer the callback")
            if not header.get("ok"):
                raise RuntimeError(str(header.get("error", "the grader's callback failed")))
            return worker.decoder(tensors).decode(header.get("value"))

        return call_grader

    # requests
    def serve(self) -> None:
        sys.meta_path.insert(0, _BlockPackage())
        for name in [m for m in sys.modules if m == BLOCKED_PACKAGE or m.startswith(BLOCKED_PACKAGE + ".")]:
            del sys.modules[name]
        self.send({"op": "ready"})
        while True:
            try:
                header, tensors = self.receive()
            except EOFError:
                return
            op = header.get("op")
            try:
                if op == "load":
                    self.tripwires.install([str(n) for n in header.get("forbidden", [])])
                    self.loaded = load_cells(list(header.get("cells", [])))
                    names = {k: ("class" if isinstance(v, type) else "callable" if callable(v) else "value")
                             for k, v in self.loaded.namespace.items() if not k.startswith("__")}
                    self.send({"op": "loaded", "cell_errors": {str(k): v for k, v in self.loaded.cell_errors.items()},
                               "names": names})
                elif op in ("call", "value_and_grad", "getattr", "setattr"):
                    self._call(op, header, tensors)
                elif op == "exit":
                    return
                else:
                    self.send({"op": "error", "error": {"type": "ProtocolError", "message": f"unknown op {op!r}"}})
            except self.wire.WireError as exc:
                self.send({"op": "error", "error": {"type": "WireError", "message": str(exc), "where": ""}})

    def _target(self, header: dict[str, Any]) -> Any:
        if "handle" in header:
            obj = self._object(int(header["handle"]))
        else:
            assert self.loaded is not None, "load first"
            name = str(header.get("name"))
            if name not in self.loaded.namespace:
                raise NameError(f"{name!r} is not defined in the notebook")
            obj = self.loaded.namespace[name]
        return obj

    def _call(self, op: str, header: dict[str, Any], tensors: dict[str, Any]) -> None:
        dec = self.decoder(tensors)
        self.tripwires.active.clear()
        self.tripwires.active.update(str(n) for n in header.get("forbidden", []))
        try:
            target = self._target(header)
            args = dec.decode(header.get("args", []))
            kwargs = dec.decode(header.get("kwargs", {"__dict__": []}))
            versions = _versions(args)
            with silenced():
                if op == "getattr":
                    value = getattr(target, str(header["attr"]))
                elif op == "setattr":
                    setattr(target, str(header["attr"]), args[0])
                    value = None
                elif op == "value_and_grad":
                    value = value_and_grad(target, tuple(args), kwargs, dec.decode(header.get("grad_output")))
                else:
                    fn = getattr(target, str(header["attr"])) if header.get("attr") else target
                    value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the student's code may raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.send({"op": "raised", "error": _describe(exc)})
            return
        finally:
            self.tripwires.active.clear()
        changed = _changed(args, versions)
        self.send({"op": "returned", "value": None}, value=value, extra={"args_after": changed})


def _versions(args: Any) -> dict[int, int]:
    import torch

    out = {}
    for i, a in enumerate(args if isinstance(args, list) else []):
        if isinstance(a, torch.Tensor):
            out[i] = a._version
    return out


def _changed(args: Any, versions: dict[int, int]) -> dict[int, Any]:
    """The arguments the call may have changed in place: tensors whose version moved, all
    lists and dicts (small by nature)."""
    import torch

    out: dict[int, Any] = {}
    for i, a in enumerate(args if isinstance(args, list) else []):
        if isinstance(a, torch.Tensor) and a._version != versions.get(i):
            out[i] = a
        elif isinstance(a, (list, dict)):
            out[i] = a
    return out


def value_and_grad(fn: Any, args: tuple, kwargs: dict, grad_output: Any) -> Any:
    """Call ``fn``, backpropagate ``grad_output`` (``None`` for a scalar) and return (output,
    grads of the tensor arguments that require grad, grads of fn's parameters by name)."""
    import torch

    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    params = dict(fn.named_parameters()) if isinstance(fn, torch.nn.Module) else {}
    with torch.enable_grad():
        out = fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(out).__name__}")
        if not out.requires_grad:
            raise RuntimeError("the result does not depend on the inputs through autograd (was it detached, "
                               "or computed under torch.no_grad()?)")
        trainable = [n for n, p in params.items() if p.requires_grad]
        targets = leaves + [params[n] for n in trainable]
        if grad_output is None and out.numel() != 1:
            raise RuntimeError(f"expected a single number (a scalar loss), got shape {tuple(out.shape)}")
        grads = torch.autograd.grad(out, targets, grad_outputs=grad_output, allow_unused=True)
    return (out.detach(), list(grads[: len(leaves)]), dict(zip(trainable, grads[len(leaves):])))


def _describe(exc: BaseException) -> dict[str, Any]:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(STUDENT_FILE_PREFIX)]
    where = f"{frames[-1].filename[1:-1]}, line {frames[-1].lineno}" if frames else ""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a student's exception may not even print
        message = "(unprintable)"
    code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, (int, str, type(None))) else None
    return {"type": type(exc).__name__, "message": message[:2000], "where": where,
            "forbidden": isinstance(exc, ForbiddenUse), "exit_code": code}


# --------------------------------------------------------------------------- the unsafe fallback's guard

_WRITE_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.mkdir": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.utime": (0,),
    "shutil.rmtree": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
}
_FORBIDDEN_EVENTS = {
    "subprocess.Popen": "starting a process", "os.system": "starting a process", "os.exec": "starting a process",
    "os.posix_spawn": "starting a process", "os.spawn": "starting a process", "os.fork": "forking",
    "os.forkpty": "forking", "pty.spawn": "starting a process", "socket.connect": "network access",
    "socket.bind": "network access", "socket.getaddrinfo": "network access", "os.kill": "sending signals",
    "os.killpg": "sending signals", "resource.setrlimit": "changing limits", "resource.prlimit": "changing limits",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_guard(workdir: str) -> None:
    """The fallback when no sandbox is available: a Python audit hook (PEP 578) that refuses writes
    outside ``workdir``, reading /proc of other processes, process starts, signals, sockets and rlimit
    changes (libraries' own ctypes loading and environment changes stay allowed: bitsandbytes and
    transformers need them). It stops honest mistakes and casual tricks; it is NOT a security boundary."""
    work = os.path.realpath(workdir).rstrip("/") + "/"

    def inside(path: str) -> bool:
        return path == work[:-1] or path.startswith(work) or path in ("/dev/null", "/dev/tty")

    def real(path: Any) -> str | None:
        if path is None or isinstance(path, int):
            return None
        try:
            return os.path.realpath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path = real(args[0])
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if path is not None and path.startswith("/proc/") and not path.startswith(("/proc/self/", "/proc/thread-self/")):
                raise PermissionError(f"the grader refused to read {path!r}")
            if path is not None and (any(c in mode for c in "wax+") or flags & _WRITE_FLAGS) and not inside(path):
                raise PermissionError(f"the grader refused to write {path!r}: graded code may only write in its own folder")
        elif event in _WRITE_EVENTS:
            for i in _WRITE_EVENTS[event]:
                path = real(args[i]) if i < len(args) else None
                if path is not None and not inside(path):
                    raise PermissionError(f"the grader refused to modify {path!r} ({event})")
        elif event in _FORBIDDEN_EVENTS:
            raise PermissionError(f"the grader refused {_FORBIDDEN_EVENTS[event]} ({event}) in graded code")

    sys.addaudithook(hook)


def _main(argv: list[str]) -> None:
    request_fd, reply_fd, max_bytes = int(argv[1]), int(argv[2]), int(argv[3])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch  # noqa: F401 - imported before the guard, which would refuse what its import does
    import wire  # noqa: F401

    if len(argv) > 5 and argv[4] == "--guard":
        install_guard(argv[5])
    # What the student prints goes nowhere the grader reads as answers.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    worker = Worker(request_fd, reply_fd, max_bytes)
    worker.serve()
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv)
