"""The student's process, seen from the grader: start it isolated, send it calls, kill it.

    grader (this process, trusted)                       student's process (untrusted)
    checks, references, comparisons, verdicts            sandbox_worker.py: the notebook's definitions
    Sandbox.call(name, args)  ---- data (wire.py) --->   fn(*args)
                              <--- data or a handle ---  return value / exception / in-place changes

The student's process never holds an expected value or a verdict, and nothing it sends is more
than data, so reading the caller's frame, patching ``torch.allclose``, rigged ``__eq__``, forged
results and exit codes cannot change a grade: a missing, malformed or late answer is a failure.

Isolation. Where bubblewrap (``bwrap``, Debian package ``bubblewrap``) works, the process runs in
its own user, pid, network, IPC and mount namespaces: no network at all, a read-only system with
only the Python installation and its libraries visible (not the package's repository, not the
solutions, not the other submissions, not the report), a private ``/tmp`` of limited size that
disappears with it, no capabilities, as an unprivileged user where the grader runs as root, with
rlimits (memory, CPU, file size, processes, open files) whose hard values it cannot raise. When the
grader kills it, every process it started dies with it (pid namespace).

Where bubblewrap is missing or cannot create namespaces (a student's laptop, some containers),
grading falls back to a plain child process with the same rlimits and a Python audit hook that
refuses writes outside its folder, process starts and sockets. That fallback is NOT a security
boundary (code that calls C through ctypes gets past it); the grader says so on every run, and it
is not fit for grading other people's code. ``isolation="sandbox"`` refuses to grade without it.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llama_from_scratch.course import wire

WORKER_FILES = ("sandbox_worker.py", "wire.py")
UNSAFE_WARNING = ("warning: bubblewrap (bwrap) is not available here, so graded code runs in a plain "
                  "child process with an audit-hook guard: NOT a sandbox, do not grade other people's "
                  "code this way (install the Debian/Ubuntu package 'bubblewrap'; see docs/INSTRUCTORS.md)")
NOBODY = 65534


@dataclass
class Limits:
    """What one student's process may use."""

    timeout: float = 60.0           # seconds of the student's code per exercise (and to load the notebook)
    startup_timeout: float = 180.0  # seconds to start Python and import torch in the sandbox
    memory_mb: int = 8192           # address space (RLIMIT_AS); torch alone maps about 1 GB
    file_mb: int = 64               # largest file the graded code may write
    tmp_mb: int = 256               # size of its private /tmp (sandbox only)
    processes: int = 64             # processes and threads it may have (sandbox only)
    open_files: int = 256
    message_mb: int = 1024          # largest answer it may send
    output_kb: int = 64             # its stderr kept (for diagnostics); the rest is read and dropped
    grace: float = 5.0


class StudentError(Exception):
    """The student's code raised; subclasses also derive from the builtin exception it raised, so a
    check can ``except ValueError`` a student's ``ValueError``."""

    remote_type = "Exception"
    where = ""
    forbidden = False
    exit_code: Any = None


class StudentTimeout(Exception):
    """The student's code used up its time; the process was killed."""


class StudentCrashed(Exception):
    """The student's process died (os._exit, a crash, the memory limit) or broke the protocol."""


@functools.lru_cache(maxsize=None)
def _student_error_class(type_name: str) -> type[StudentError]:
    base = getattr(builtins, type_name, None)
    if isinstance(base, type) and issubclass(base, Exception) and base not in (Exception,):
        try:
            return type(f"Student{type_name}", (StudentError, base), {})
        except TypeError:  # a builtin that cannot be subclassed together with StudentError
            pass
    return StudentError


def remote_exception(error: Any) -> StudentError:
    """The exception to raise in the grader for what the student's code raised."""
    if not isinstance(error, dict):
        error = {}
    type_name = str(error.get("type", "Exception"))[:100]
    exc = _student_error_class(type_name)(str(error.get("message", ""))[:2000])
    exc.remote_type = type_name
    exc.where = str(error.get("where", ""))[:200]
    exc.forbidden = bool(error.get("forbidden"))
    exc.exit_code = error.get("exit_code") if isinstance(error.get("exit_code"), (int, str, type(None))) else None
    return exc


# --------------------------------------------------------------------------- isolation

def _python() -> str:
    """This interpreter's path without ``..`` parts: run as ``../venv/bin/python``, ``sys.executable``
    is ``<cwd>/../venv/bin/python``, and the working folder does not exist inside the sandbox."""
    return os.path.normpath(sys.executable)


@functools.lru_cache(maxsize=None)
def bubblewrap_problem() -> str | None:
    """``None`` if bubblewrap can start a sandbox here, else why not (checked once per process)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap is not installed"
    workdir = tempfile.mkdtemp(prefix="lfs-grade-probe-")
    try:
        os.chmod(workdir, 0o755)
        lib = os.path.join(workdir, "grader")
        os.mkdir(lib)
        cmd = _bwrap_command(lib, Limits(), workdir) + [_python(), "-s", "-c", "pass"]
        done = subprocess.run(cmd, capture_output=True, timeout=60, env=_child_env())
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap failed to run: {exc}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if done.returncode != 0:
        return f"bwrap cannot create namespaces here: {done.stderr.decode(errors='replace').strip()[:300]}"
    return None


def isolation_mode(requested: str = "auto") -> str:
    """``"sandbox"`` or ``"unsafe"``; ``requested`` is ``auto``, ``sandbox`` (refuse without
    bubblewrap) or ``unsafe`` (the plain child process, for a student checking their own work)."""
    if requested not in ("auto", "sandbox", "unsafe"):
        raise ValueError(f"isolation must be auto, sandbox or unsafe, not {requested!r}")
    if requested == "unsafe":
        return "unsafe"
    problem = bubblewrap_problem()
    if problem is None:
        return "sandbox"
    if requested == "sandbox":
        raise RuntimeError(f"cannot grade in a sandbox: {problem} (install the package 'bubblewrap')")
    return "unsafe"


def _stages_as_nobody() -> bool:
    """When the grader is root, the sandbox is entered as the real user ``nobody``. Its Python may
    live where ``nobody`` cannot reach (``/root/.pyenv``), so a private mount namespace first binds
    what it needs to a reachable place (``unshare`` and ``setpriv`` from util-linux)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "setpriv", "mount"))


# Bind each "SOURCE TARGET" pair given before "--", then run the rest of the command line.
_STAGE_SCRIPT = 'while [ "$1" != "--" ]; do mount --bind "$1" "$2" || exit 97; shift 2; done; shift; exec "$@"'


_PIDS_CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")


def _make_pids_cgroup(limit: int) -> str | None:
    """A cgroup allowing ``limit`` processes/threads, where this process may create one (root in a
    container, or a delegated cgroup); ``None`` elsewhere. Needed when the grader is root, because
    RLIMIT_NPROC does not hold for processes of root."""
    for root in _PIDS_CGROUP_ROOTS:
        if not os.path.isfile(os.path.join(root, "cgroup.procs")) or not os.access(root, os.W_OK):
            continue
        if root == "/sys/fs/cgroup" and "pids" not in _read(os.path.join(root, "cgroup.subtree_control")):
            continue
        path = os.path.join(root, f"lfs-grade-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.mkdir(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(limit))
            return path
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(path)
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _readable_roots() -> list[str]:
    """What the student's Python needs to read: the system, the interpreter and its libraries."""
    roots = {"/usr", sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(_python()),
             os.path.dirname(os.path.realpath(sys.executable))}
    roots.update(p for p in sys.path if p and "-packages" in p and os.path.isdir(p))
    for p in ("/opt/conda",):
        if os.path.isdir(p) and sys.prefix.startswith(p):
            roots.add(p)
    # keep only the outermost of nested roots
    ordered = sorted({os.path.realpath(r) for r in roots if os.path.exists(r)}, key=len)
    kept: list[str] = []
    for r in ordered:
        if not any(r == k or r.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(r)
    return kept


def _hidden_paths(roots: list[str]) -> list[str]:
    """The package's own folder when it is installed inside a readable root (a wheel install):
    hidden from graded code, which must not use it."""
    package_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # llama_from_scratch/, above course/
    hidden = [package_dir]
    return [p for p in hidden if any(p.startswith(r.rstrip("/") + "/") for r in roots)]


_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts", "passwd", "group",
              "alternatives", "ssl", "ca-certificates", "mime.types", "os-release", "fonts", "matplotlibrc")


def _bwrap_command(lib_dir: str, limits: Limits, stage_dir: str) -> list[str]:
    """The command line that starts a program in the sandbox (append the program's argv)."""
    roots = _readable_roots()
    sources = {root: root for root in roots}
    prefix: list[str] = []
    if _stages_as_nobody():
        pairs: list[str] = []
        for i, root in enumerate(roots):
            target = os.path.join(stage_dir, f"root{i}")
            os.makedirs(target, exist_ok=True)
            pairs += [root, target]
            sources[root] = target
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _STAGE_SCRIPT, "sh", *pairs, "--",
                  "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
        user = ["--unshare-user"]
    else:  # not root: the grader's own user, seen as nobody inside its user namespace
        user = ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    cmd = prefix + [shutil.which("bwrap") or "bwrap", "--unshare-all", *user, "--cap-drop", "ALL", "--die-with-parent",
                    "--new-session", "--proc", "/proc", "--dev", "/dev",
                    # the private /tmp first: a Python installed under /tmp is bound over it below
                    "--size", str(limits.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):
        path = f"/{name}"
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for root in roots:
        cmd += ["--ro-bind", sources[root], root]
    for name in _ETC_FILES:  # what the dynamic linker and Python's libraries read; not /etc/shadow & co
        path = os.path.join("/etc", name)
        if os.path.exists(path):
            cmd += ["--ro-bind", path, path]
    for hidden in _hidden_paths(roots):
        cmd += ["--tmpfs", hidden]
    cmd += ["--ro-bind", lib_dir, "/grader", "--chdir", "/tmp"]
    return cmd


def _count_own_processes() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                status = _read(f"/proc/{entry}/status")
                threads = int(next(l.split()[1] for l in status.splitlines() if l.startswith("Threads:")))
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += threads
            except (OSError, StopIteration, ValueError):
                continue
    return count


def _set_limits(limits: Limits, cpu_seconds: float, cgroup: str | None, nproc: int | None) -> Callable[[], None]:
    """rlimits set in the child just before exec, soft = hard, so they cannot be raised; and the
    child joins its pids cgroup when it has one."""

    def apply() -> None:
        import resource

        def cap(which: int, value: int) -> None:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))

        os.setsid()
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        cap(resource.RLIMIT_CORE, 0)
        cap(resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024)
        cap(resource.RLIMIT_FSIZE, limits.file_mb * 1024 * 1024)
        cap(resource.RLIMIT_CPU, int(cpu_seconds) + 1)
        cap(resource.RLIMIT_NOFILE, limits.open_files)
        if nproc is not None:
            cap(resource.RLIMIT_NPROC, nproc)

    return apply


def _child_env() -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    if "LFS_QUICK" in os.environ:
        env["LFS_QUICK"] = os.environ["LFS_QUICK"]
    return env


# --------------------------------------------------------------------------- the session

class Sandbox:
    """One student's process: start it, load a notebook's cells, call what they define, close it.

    Use as a context manager. ``budget`` is the time (s) the student's code may still use in the
    current exercise; ``new_budget`` resets it. Every call that runs past it kills the process and
    raises ``StudentTimeout``; a process that dies or sends garbage raises ``StudentCrashed``."""

    def __init__(self, limits: Limits | None = None, isolation: str = "auto") -> None:
        self.limits = limits or Limits()
        self.mode = isolation_mode(isolation)
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.budget = self.limits.timeout
        self.callbacks: list[Callable[..., Any]] = []
        self.stderr_head = b""
        self.calls = 0
        self.forbidden: list[str] = []  # what the exercise being graded forbids (set by the grader)

    # lifecycle
    def __enter__(self) -> "Sandbox":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="lfs-grade-")
        lib = os.path.join(self.workdir, "grader")
        os.mkdir(lib)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in WORKER_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(lib, name))
        os.chmod(self.workdir, 0o755)
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        max_bytes = self.limits.message_mb * 1024 * 1024
        cpu = self.limits.startup_timeout + self.limits.timeout * 200
        sandboxed = self.mode == "sandbox"
        python = [_python(), "-s", "-B"]
        if sandboxed:
            script = "/grader/sandbox_worker.py"
            cmd = _bwrap_command(lib, self.limits, self.workdir) + python + [script, str(req_r), str(rep_w), str(max_bytes)]
            cwd = "/"
        else:
            scratch = os.path.join(self.workdir, "work")
            os.mkdir(scratch)
            script = os.path.join(lib, "sandbox_worker.py")
            cmd = python + [script, str(req_r), str(rep_w), str(max_bytes), "--guard", scratch]
            cwd = scratch
        env = _child_env()
        if not sandboxed:
            env.update(HOME=cwd, TMPDIR=cwd, MPLCONFIGDIR=cwd)
        # The process-count limit. RLIMIT_NPROC counts every process of the user, across sandboxes:
        # as root (the sandbox then runs as nobody) a pids cgroup per sandbox is preferred where the
        # machine lets us make one, with RLIMIT_NPROC as a backstop; otherwise RLIMIT_NPROC alone.
        self.cgroup = _make_pids_cgroup(self.limits.processes) if sandboxed and os.geteuid() == 0 else None
        if sandboxed and _stages_as_nobody():
            nproc = self.limits.processes * (8 if self.cgroup else 1)
        elif os.geteuid() != 0:
            nproc = _count_own_processes() + self.limits.processes
        else:
            nproc = None
        try:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, pass_fds=(req_r, rep_w),
                                         preexec_fn=_set_limits(self.limits, cpu, self.cgroup, nproc))
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.request_fd, self.reply_fd = req_w, rep_r
        os.set_blocking(self.proc.stderr.fileno(), False)
        self.budget = self.limits.startup_timeout
        header, _ = self._read_message()
        if header.get("op") != "ready":
            raise StudentCrashed("the grading process did not start")

    def close(self) -> None:
        if self.proc is not None:
            self._kill()
            for fd in (self.request_fd, self.reply_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.proc = None
        if self.workdir:
            for _ in range(50):  # a sandbox's mounts may take a moment to go after its processes
                shutil.rmtree(self.workdir, ignore_errors=True)
                if not os.path.exists(self.workdir):
                    break
                time.sleep(0.05)
            self.workdir = None
        if getattr(self, "cgroup", None):
            for _ in range(50):  # the kernel frees the cgroup once its last process is reaped
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.02)
            self.cgroup = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _kill(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._drain_stderr()
        if self.proc.stderr:
            self.proc.stderr.close()

    def _drain_stderr(self) -> None:
        if self.proc is None or self.proc.stderr is None or self.proc.stderr.closed:
            return
        try:
            while chunk := self.proc.stderr.read(65536):
                room = self.limits.output_kb * 1024 - len(self.stderr_head)
                if room > 0:
                    self.stderr_head += chunk[:room]
        except (OSError, ValueError, TypeError):
            pass

    def new_budget(self, seconds: float | None = None) -> None:
        self.budget = self.limits.timeout if seconds is None else seconds

    # messages
    def _send(self, header: dict[str, Any], **values: Any) -> None:
        enc = wire.Encoder(on_object=self._encode_object, on_callback=self._register_callback)
        header = dict(header)
        for key, value in values.items():
            header[key] = enc.encode(value)
        data = memoryview(wire.pack(header, enc.tensors))
        try:
            while data:
                data = data[os.write(self.request_fd, data):]
        except (BrokenPipeError, OSError) as exc:
            raise self._died() from exc

    def _encode_object(self, value: Any) -> Any:
        if isinstance(value, RemoteObject) and object.__getattribute__(value, "_lfs_sandbox") is self:
            return {"__handle__": object.__getattribute__(value, "_lfs_handle")}
        raise wire.WireError(f"a check cannot send a {type(value).__name__} to the student's code")

    def _register_callback(self, cb: wire.Callback) -> int:
        self.callbacks.append(cb.fn)
        return len(self.callbacks) - 1

    def _read_exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            started = time.monotonic()
            ready, _, _ = select.select([self.reply_fd], [], [], max(0.0, min(self.budget, 1.0)))
            self.budget -= time.monotonic() - started
            self._drain_stderr()
            if not ready:
                if self.budget <= 0:
                    self._kill()
                    raise StudentTimeout(f"did not finish within {self.limits.timeout:g} s (an endless loop? "
                                         "the process was stopped)")
                if self.proc is not None and self.proc.poll() is not None:
                    raise self._died()
                continue
            chunk = os.read(self.reply_fd, min(n - got, 1 << 20))
            if not chunk:
                raise self._died()
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read_message(self) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            n_head, n_blob = wire.unpack_lengths(self._read_exact(wire.HEADER_SIZE), self.limits.message_mb << 20)
            return wire.unpack_body(self._read_exact(n_head), self._read_exact(n_blob))
        except wire.WireError as exc:
            self._kill()
            raise StudentCrashed(f"sent an answer the grader cannot read ({exc})") from exc

    def _died(self) -> StudentCrashed:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=self.limits.grace)
            except subprocess.TimeoutExpired:
                self._kill()
                code = None
        self._drain_stderr()
        return StudentCrashed(_describe_exit(code))

    def request(self, header: dict[str, Any], **values: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send a request and wait for its answer, serving the student's callbacks meanwhile."""
        if not self.alive:
            raise StudentCrashed("the student's process is no longer running")
        self.calls += 1
        self._send(header, **values)
        while True:
            reply, tensors = self._read_message()
            if reply.get("op") != "callback":
                return reply, tensors
            self._serve_callback(reply, tensors)

    def _serve_callback(self, reply: dict[str, Any], tensors: dict[str, Any]) -> None:
        key = reply.get("id")
        if not isinstance(key, int) or not 0 <= key < len(self.callbacks):
            self._kill()
            raise StudentCrashed("asked for a callback the grader never gave")
        dec = wire.Decoder(tensors)
        try:
            args, kwargs = dec.decode(reply.get("args", [])), dec.decode(reply.get("kwargs", {"__dict__": []}))
        except wire.WireError as exc:
            self._kill()
            raise StudentCrashed(f"called back the grader with something that is not data ({exc})") from exc
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            self._kill()
            raise StudentCrashed("called back the grader with malformed arguments")
        paused = self.budget
        try:
            value = self.callbacks[key](*args, **kwargs)
            answer: dict[str, Any] = {"op": "callback_result", "ok": True}
            self._send(answer, value=value)
        except (StudentError, StudentTimeout, StudentCrashed):
            raise
        except Exception as exc:  # noqa: BLE001 - a bad call of the grader's function is the student's error
            self._send({"op": "callback_result", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
        self.budget = paused

    def _answer(self, reply: dict[str, Any], tensors: dict[str, Any], args: list[Any] | None = None) -> Any:
        op = reply.get("op")
        if op == "raised":
            raise remote_exception(reply.get("error"))
        if op == "error":
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            raise StudentCrashed(f"the student's process could not take the call: {str(error.get('message'))[:300]}")
        if op != "returned":
            self._kill()
            raise StudentCrashed(f"answered {str(op)[:40]!r} where the grader expected a result")
        dec = wire.Decoder(tensors, on_handle=lambda key: RemoteObject(self, key))
        try:
            value = dec.decode(reply.get("value"))
            after = dec.decode(reply.get("args_after", {"__dict__": []}))
        except wire.WireError as exc:
            self._kill()
            raise StudentCrashed(f"sent an answer the grader cannot read ({exc})") from exc
        if args is not None and isinstance(after, dict):
            _copy_back(args, after)
        return value

    # the calls checks make (through RemoteObject)
    def load(self, cells: list[str | None], forbidden: list[str]) -> tuple[dict[int, str], dict[str, str]]:
        """Execute the notebook's definitions; returns (errors by cell, kind of each defined name)."""
        reply, _ = self.request({"op": "load", "cells": cells, "forbidden": sorted(set(forbidden))})
        if reply.get("op") != "loaded":
            self._kill()
            raise StudentCrashed("did not load the notebook")
        errors = reply.get("cell_errors") if isinstance(reply.get("cell_errors"), dict) else {}
        names = reply.get("names") if isinstance(reply.get("names"), dict) else {}
        return ({int(k): str(v)[:2000] for k, v in errors.items() if str(k).isdigit()},
                {str(k): str(v) for k, v in names.items()})

    def call(self, target: dict[str, Any], args: tuple, kwargs: dict, op: str = "call",
             forbidden: list[str] | None = None, **extra: Any) -> Any:
        header = dict(target, op=op, forbidden=forbidden or [])
        arg_list = list(args)
        reply, tensors = self.request(header, args=arg_list, kwargs=dict(kwargs), **extra)
        return self._answer(reply, tensors, arg_list)


def _copy_back(args: list[Any], after: dict[Any, Any]) -> None:
    """Apply the student's in-place changes to the grader's own arguments."""
    import torch

    for i, new in after.items():
        if not isinstance(i, int) or not 0 <= i < len(args):
            continue
        old = args[i]
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            if new.shape == old.shape:
                with torch.no_grad():
                    old.copy_(new.to(old.dtype))
        elif isinstance(old, list) and isinstance(new, list):
            old[:] = new
        elif isinstance(old, dict) and isinstance(new, dict):
            for key, value in new.items():
                if isinstance(old.get(key), torch.Tensor) and isinstance(value, torch.Tensor) \
                        and old[key].shape == value.shape:
                    with torch.no_grad():
                        old[key].copy_(value.to(old[key].dtype))
                else:
                    old[key] = value
            for key in [k for k in old if k not in new]:
                del old[key]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code > 128 and code - 128 in {int(sig) for sig in signal.Signals}:
        code = 128 - code  # bubblewrap reports a child killed by signal N as 128 + N
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"the student's process was killed by signal {-code}"
        reasons = {signal.SIGSEGV: "crashed the Python interpreter (segmentation fault)",
                   signal.SIGXCPU: "used up the CPU time limit", signal.SIGXFSZ: "wrote a file larger than the limit",
                   signal.SIGKILL: "was killed (out of memory?)"}
        return reasons.get(sig, f"the student's process was killed by {sig.name}")
    return f"ended the student's process (exit status {code}; os._exit, sys.exit at import, or the memory limit?)"


class RemoteObject:
    """The grader's proxy of a function, class or object living in the student's process.

    Calling it calls the real thing there; reading an attribute fetches it (data comes back as a
    copy, anything else as another proxy); ``value_and_grad`` in ``checks.common`` runs forward and
    backward there. Its ``==`` is identity: the grader never compares against the student's objects."""

    __slots__ = ("_lfs_sandbox", "_lfs_handle", "_lfs_name")

    def __init__(self, sandbox: Sandbox, handle: int | None = None, name: str | None = None) -> None:
        object.__setattr__(self, "_lfs_sandbox", sandbox)
        object.__setattr__(self, "_lfs_handle", handle)
        object.__setattr__(self, "_lfs_name", name)

    def _lfs_target(self) -> dict[str, Any]:
        handle = object.__getattribute__(self, "_lfs_handle")
        return {"handle": handle} if handle is not None else {"name": object.__getattribute__(self, "_lfs_name")}

    def _lfs_rules(self) -> list[str]:
        return list(object.__getattribute__(self, "_lfs_sandbox").forbidden)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sandbox = object.__getattribute__(self, "_lfs_sandbox")
        return sandbox.call(self._lfs_target(), args, kwargs, forbidden=self._lfs_rules())

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        sandbox = object.__getattribute__(self, "_lfs_sandbox")
        return sandbox.call(dict(self._lfs_target(), attr=attr), (), {}, op="getattr", forbidden=self._lfs_rules())

    def __setattr__(self, attr: str, value: Any) -> None:
        sandbox = object.__getattribute__(self, "_lfs_sandbox")
        sandbox.call(dict(self._lfs_target(), attr=attr), (value,), {}, op="setattr", forbidden=self._lfs_rules())

    def _lfs_value_and_grad(self, args: tuple, kwargs: dict, grad_output: Any) -> Any:
        sandbox = object.__getattribute__(self, "_lfs_sandbox")
        out = sandbox.call(self._lfs_target(), args, kwargs, op="value_and_grad", forbidden=self._lfs_rules(),
                           grad_output=grad_output)
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[1], list) and isinstance(out[2], dict)):
            raise StudentCrashed("value_and_grad came back malformed")
        return out

    def __repr__(self) -> str:
        name = object.__getattribute__(self, "_lfs_name")
        return f"<{name or 'object'} in the student's process>"

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> bool:
        return True
