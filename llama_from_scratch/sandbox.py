"""Grade one notebook in a separate, limited process (used by the batch grader).

    parent (batch_grade)                          child (python -I -m llama_from_scratch.sandbox)
    copy the notebook to a fresh temp dir  --->   set rlimits: memory, file size, CPU, no core
    minimal env, cwd = temp dir                   import the grader and the chapter's checks
    read stdout/stderr, keep the first N KB       install the audit hook (the guard below)
    read JSON events on a dedicated pipe   <---   {"event": "start", "exercise": ...}
    kill the process group on a deadline   <---   {"event": "result", ...} per exercise

Every exercise is announced before its check runs, so when the child dies (``os._exit``, a
segfault, the memory limit, a hang the in-process alarm cannot interrupt) the parent knows which
exercise did it: that one fails with the reason and a fresh child grades the ones after it.

What the guard is, honestly: a Python audit hook (PEP 578) that refuses, inside the child,

- opening for reading anything outside the child's temp dir and the read-only places code needs
  (the Python installation, site-packages, the package and its data, ``/usr``, ``/etc``, ...),
  and always anything inside the submissions folder, the solutions, or the report's folder;
- writing, deleting, renaming, ``chmod``, ``mkdir``... anywhere but the temp dir;
- starting processes (``subprocess``, ``os.system``, ``fork``, ``exec``) and opening sockets.

It stops honest mistakes (a stray ``open("../data.txt", "w")``, an ``rm`` of the wrong folder)
and casual cheating (reading a classmate's notebook or the solutions). It is NOT a security
sandbox: code that calls C through ``ctypes``, or that patches the grader from inside the same
process, can get around it. For untrusted or hostile code run the batch inside a container or VM
with no network and only the submissions mounted (see docs/INSTRUCTORS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

MAX_REASON_CHARS = 2000

# Audit events that change the file system: (event, indexes of the path arguments).
_WRITE_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
    "os.chmod": (0,), "os.chown": (0,), "os.mkdir": (0,), "os.link": (0, 1), "os.symlink": (0, 1),
    "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,),
    "shutil.rmtree": (0,), "shutil.chown": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
}
_LIST_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "glob.glob": (0,), "os.getxattr": (0,)}
_FORBIDDEN_EVENTS = {
    "subprocess.Popen": "starting a process", "os.system": "starting a process",
    "os.exec": "starting a process", "os.posix_spawn": "starting a process",
    "os.spawn": "starting a process", "os.fork": "forking", "os.forkpty": "forking",
    "pty.spawn": "starting a process", "socket.connect": "network access", "socket.bind": "network access",
    "socket.getaddrinfo": "network access",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/sys", "/dev")
_DEVICES_WRITABLE = ("/dev/null", "/dev/tty")


class GuardError(PermissionError):
    """What the guard raises: a ``PermissionError`` whose message says what was refused."""


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _real(path: Any) -> str | None:
    """Absolute, symlink-resolved path of an audit argument; ``None`` for file descriptors."""
    if path is None or isinstance(path, int):
        return None
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return None
    return os.path.realpath(path)


def install_guard(workdir: str, deny: list[str], allow_read: list[str]) -> None:
    """Install the audit hook. ``workdir`` is read-write; ``deny`` is never readable (it wins over
    ``allow_read`` but not over ``workdir``); everything else is read-only if under ``allow_read``
    or the system roots, and refused otherwise."""
    work = (os.path.realpath(workdir),)
    denied = tuple(os.path.realpath(p) for p in deny)
    readable = tuple(os.path.realpath(p) for p in allow_read) + _SYSTEM_READ_ROOTS

    def refuse(what: str, path: str) -> None:
        raise GuardError(f"the grader refused to {what} {path!r}: graded code may only read and write "
                         f"files in its own folder")

    def check_read(path: str | None, what: str = "read") -> None:
        if path is None or _inside(path, work):
            return
        if _inside(path, denied) or not _inside(path, readable):
            refuse(what, path)

    def check_write(path: str | None, what: str) -> None:
        if path is None or _inside(path, work) or path in _DEVICES_WRITABLE:
            return
        refuse(what, path)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path = _real(args[0])
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if any(c in mode for c in "wax+") or flags & _WRITE_FLAGS:
                check_write(path, "write")
            else:
                check_read(path)
        elif event in _WRITE_EVENTS:
            for i in _WRITE_EVENTS[event]:
                if i < len(args):
                    check_write(_real(args[i]), f"modify ({event})")
        elif event in _LIST_EVENTS:
            check_read(_real(args[0] if args and args[0] is not None else "."), "list")
        elif event in _FORBIDDEN_EVENTS:
            raise GuardError(f"the grader refused {_FORBIDDEN_EVENTS[event]} ({event}) in graded code")

    sys.addaudithook(hook)


def set_limits(memory_mb: int | None, file_mb: int | None, cpu_s: float | None) -> None:
    """rlimits of this process: address space, size of any file written, CPU seconds, no core."""
    import resource

    def limit(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, hard))

    limit(resource.RLIMIT_CORE, 0)
    if memory_mb:
        limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    if file_mb:
        limit(resource.RLIMIT_FSIZE, file_mb * 1024 * 1024)
    if cpu_s:
        limit(resource.RLIMIT_CPU, int(cpu_s) + 1)


class _Channel:
    """JSON lines on the dedicated results pipe (never stdout, which the student's code owns)."""

    def __init__(self, fd: int, workdir: str) -> None:
        self.fd = fd
        self.workdir = workdir.rstrip("/") + "/"

    def send(self, **event: Any) -> None:
        if isinstance(event.get("reason"), str):  # the temp folder means nothing to a student
            event["reason"] = event["reason"].replace(self.workdir, "")[:MAX_REASON_CHARS]
        data = (json.dumps(event) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]


def _child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_from_scratch.sandbox")
    parser.add_argument("notebook")
    parser.add_argument("--chapter", required=True)
    parser.add_argument("--checks-package", default="llama_from_scratch.checks")
    parser.add_argument("--python-path", action="append", default=[])
    parser.add_argument("--exercise", action="append", default=[], help="grade these, in this order")
    parser.add_argument("--points", default="{}", help="JSON: exercise -> points")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--file-mb", type=int, default=0)
    parser.add_argument("--cpu-s", type=float, default=0)
    parser.add_argument("--results-fd", type=int, required=True)
    parser.add_argument("--deny", action="append", default=[])
    parser.add_argument("--allow-read", action="append", default=[])
    args = parser.parse_args(argv)
    channel = _Channel(args.results_fd, os.getcwd())
    set_limits(args.memory_mb, args.file_mb, args.cpu_s)
    sys.path[:0] = args.python_path

    import importlib

    import llama_from_scratch
    from llama_from_scratch import grade

    checks = dict(importlib.import_module(f"{args.checks_package}.{args.chapter}").CHECKS)
    points = json.loads(args.points)
    workdir = os.getcwd()
    package_dir = os.path.dirname(llama_from_scratch.__file__)
    allow = [sys.prefix, sys.base_prefix, sys.exec_prefix, package_dir,
             os.path.join(os.path.dirname(package_dir), "data"), *args.allow_read]
    allow += [p for p in sys.path if p and os.path.isdir(p) and "site-packages" in p]
    allow += [p for p in args.python_path]
    channel.send(event="ready")
    install_guard(workdir, args.deny, allow)

    channel.send(event="load")
    try:
        with grade._time_limit(args.timeout):
            loaded = grade.load_definitions(args.notebook)
    except grade.GradingTimeout:
        channel.send(event="load_failed", reason=f"loading the notebook's definitions did not finish "
                                                 f"within {args.timeout:g} s (a loop at the top level of a cell?)")
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - an unreadable notebook fails its exercises
        channel.send(event="load_failed", reason=f"the notebook could not be read: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS])
        os._exit(0)
    channel.send(event="loaded")
    for name in args.exercise:
        channel.send(event="start", exercise=name)
        if name not in checks:
            channel.send(event="result", exercise=name, passed=False, seconds=0.0,
                         reason=f"no check named {name!r} for chapter {args.chapter}")
            continue
        r = grade.grade_exercise(loaded, name, checks[name], args.notebook, points.get(name), args.timeout)
        channel.send(event="result", exercise=name, passed=r.passed, reason=r.reason[:MAX_REASON_CHARS],
                     seconds=r.seconds)
    channel.send(event="done")
    # Leave at once: no atexit handlers or non-daemon threads of the student's code run after this.
    os._exit(0)


if __name__ == "__main__":
    _child_main()
