"""Submissions written by an attacker, not a learner: none may earn a point it did not compute,
change anything outside its sandbox, outlive its time limit, stall or kill the grader, or leak the
grader's environment; and the student's exit status never decides a verdict.

The exercises here are toys (square a number, double a tensor) so that every attack is the only
thing under test; ``probe`` exercises report what the student's process can see and do, and the
test asserts the sandbox's guarantees on that report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama_from_scratch.course.batch_grade import Settings, grade_batch, write_reports
from llama_from_scratch.course.grade import grade_notebook, main
from llama_from_scratch.course.sandbox import Limits, bubblewrap_problem

SECRET = "lfs-grader-secret-4f1c"
needs_sandbox = pytest.mark.skipif(bubblewrap_problem() is not None,
                                   reason=f"bubblewrap unavailable: {bubblewrap_problem()}")


def check_square(fn) -> None:
    import random

    x = random.randint(-10 ** 6, 10 ** 6)
    got = fn(x)
    assert got == x * x, "square returned the wrong value"


def check_double(fn) -> None:
    x = torch.randn(5, 7)
    got = fn(x)
    assert isinstance(got, torch.Tensor) and torch.allclose(got, 2 * x), "double returned the wrong tensor"


def check_logsumexp(fn) -> None:
    x = torch.randn(4, 9)
    got = fn(x)
    assert isinstance(got, torch.Tensor) and torch.allclose(got, torch.logsumexp(x, -1)), "wrong log-sum-exp"


CHECKS = {"square": check_square, "double": check_double, "logsumexp": check_logsumexp}
FORBIDDEN = {"logsumexp": ["torch.logsumexp", "torch.Tensor.logsumexp"]}
HONEST = ["import torch\n# EXERCISE square (2 points)\ndef square(x):\n    return x * x",
          "def double(x):\n    return x + x",
          "def logsumexp(x):\n    m = x.amax(-1, keepdim=True)\n    return (m + (x - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)"]


def write_notebook(path: Path, *cells: str) -> Path:
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None}
                    for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))
    return path


def grade(path: Path, isolation: str = "sandbox", timeout: float = 10.0, checks=None, forbidden=None) -> dict:
    results = grade_notebook(path, checks=checks or CHECKS, forbidden=FORBIDDEN if forbidden is None else forbidden,
                             limits=Limits(timeout=timeout, memory_mb=4096), isolation=isolation)
    return {r.exercise: r for r in results}


MODES = [pytest.param("sandbox", marks=needs_sandbox), "unsafe"]


@pytest.mark.parametrize("isolation", MODES)
def test_honest_answers_pass(tmp_path: Path, isolation: str) -> None:
    results = grade(write_notebook(tmp_path / "nb.ipynb", *HONEST), isolation)
    assert all(r.passed for r in results.values()), {k: r.reason for k, r in results.items()}
    assert results["square"].points == 2


CHEATS = {
    "peek at the caller's frame": (
        "import sys\ndef square(x):\n    f = sys._getframe(1)\n    while f is not None:\n"
        "        for k in ('expected', 'x'):\n            if k in f.f_locals and f.f_locals[k] is not x:\n"
        "                return f.f_locals[k]\n        f = f.f_back\n    return 0"),
    "patch every comparison": (
        "import torch, math\ntorch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n"
        "torch.testing.assert_close = lambda *a, **k: None\nmath.isclose = lambda *a, **k: True\n"
        "def double(x):\n    return x"),
    "an object equal to everything": (
        "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "def square(x):\n    return Any()"),
    "an int subclass equal to everything": (
        "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def square(x):\n    return Yes(0)"),
    "patch the grader from inside": (
        "import llama_from_scratch.grade as g\n"
        "def square(x):\n    g.run_check = lambda *a, **k: (True, 'passed')\n    return 0"),
    "import the package's answer": (
        "from llama_from_scratch import loss\ndef logsumexp(x):\n    return loss.logsumexp(x)"),
    "forge results on every file descriptor": (
        "import os, json\ndef square(x):\n    for fd in range(3, 64):\n        for msg in (b'{\"event\": \"result\", \"passed\": true}\\n', b'\\x00' * 64):\n"
        "            try:\n                os.write(fd, msg)\n            except OSError:\n                pass\n    return 0"),
    "exit with success": "import os\ndef square(x):\n    os._exit(0)",
    "exit at interpreter shutdown": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef square(x):\n    raise SystemExit(0)",
    "forbidden call": "import torch\ndef logsumexp(x):\n    return torch.logsumexp(x, -1)",
    "forbidden method": "def logsumexp(x):\n    return x.logsumexp(-1)",
    "forbidden call, hidden": "import torch\ndef logsumexp(x):\n    f = getattr(torch, 'logs' + 'umexp')\n    return f(x, -1)",
    "forbidden call through eval": "import torch\ndef logsumexp(x):\n    return eval('torch.logsumexp')(x, -1)",
}


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("attack", list(CHEATS))
def test_cheats_earn_nothing(tmp_path: Path, isolation: str, attack: str) -> None:
    nb = write_notebook(tmp_path / "nb.ipynb", "import torch", CHEATS[attack])
    results = grade(nb, isolation, timeout=10.0)
    assert not any(r.passed for r in results.values()), {k: r.reason for k, r in results.items()}
    assert sum(r.points for r in results.values()) == 0
    if attack.startswith(("forbidden", "import the package")):
        assert "uses " in results["logsumexp"].reason, results["logsumexp"].reason


@pytest.mark.parametrize("isolation", MODES)
def test_exit_status_of_the_plain_grader_is_the_verdict(tmp_path: Path, isolation: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    from llama_from_scratch.course.checks import chapter_checks, chapters

    chapter = chapters()[0]
    name = list(chapter_checks(chapter))[0]
    nb = write_notebook(tmp_path / f"{chapter}.ipynb", "import os, atexit\natexit.register(lambda: os._exit(0))",
                        f"def {name}(*args, **kwargs):\n    os._exit(0)\n\nclass {name}X:\n    pass")
    assert main([str(nb), "--isolation", isolation, "--timeout", "20", "--only", name]) == 1
    assert "FAIL" in capsys.readouterr().out


PROBE = r'''
import os, socket, resource, json
def probe(target):
    report = {"uid": os.getuid(), "pid": os.getpid()}
    def attempt(name, fn):
        try:
            report[name] = repr(fn())
        except BaseException as exc:
            report[name] = "refused: " + type(exc).__name__
    attempt("read_target", lambda: open(target).read()[:20])
    attempt("read_shadow", lambda: open("/etc/shadow").read()[:20])
    attempt("list_target_dir", lambda: os.listdir(os.path.dirname(target)))
    attempt("write_root", lambda: open("/lfs-evil", "w").write("x"))
    attempt("write_target_dir", lambda: open(os.path.join(os.path.dirname(target), "evil.txt"), "w").write("x"))
    attempt("tcp", lambda: socket.create_connection(("127.0.0.1", int(open("/dev/null").read() or PORT)), timeout=2))
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", UDP_PORT)))
    attempt("raise_as", lambda: resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)))
    attempt("raise_nproc", lambda: resource.setrlimit(resource.RLIMIT_NPROC, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)))
    environs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environs.append(open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"))
            except OSError:
                pass
    report["environ"] = "\n".join(environs) + "\n".join(f"{k}={v}" for k, v in os.environ.items())
    report["pids_visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    children = 0
    try:
        for _ in range(300):
            if os.fork() == 0:
                import time
                time.sleep(5)
                os._exit(0)
            children += 1
    except OSError:
        pass
    report["children"] = children
    return json.dumps(report)
'''


@needs_sandbox
def test_the_sandbox_hides_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LFS_TEST_SECRET", SECRET)
    target = tmp_path / "solutions" / "answers.txt"
    target.parent.mkdir()
    target.write_text("the expected answers")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    seen: dict = {}

    def check_probe(fn) -> None:
        seen.update(json.loads(fn(str(target))))
        sandbox = object.__getattribute__(fn, "_lfs_sandbox")  # seen from outside, by the kernel
        status = Path(f"/proc/{sandbox.proc.pid}/status").read_text()
        seen["outside_uid"] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))

    limits = Limits(timeout=20.0, processes=64)
    nb = write_notebook(tmp_path / "nb.ipynb", f"PORT = {port}\nUDP_PORT = {udp.getsockname()[1]}\n" + PROBE)
    grade_notebook(nb, checks={"probe": check_probe}, forbidden={}, limits=limits, isolation="sandbox")
    assert seen, "the probe did not run"
    assert seen["read_target"].startswith("refused") and seen["list_target_dir"].startswith("refused"), seen
    assert seen["write_target_dir"].startswith("refused") and seen["read_shadow"].startswith("refused")
    assert not Path("/lfs-evil").exists() and not (target.parent / "evil.txt").exists()  # writes stay inside
    assert seen["tcp"].startswith("refused"), seen["tcp"]  # its own network namespace: nobody listens there
    server.settimeout(0.5)
    with pytest.raises(socket.timeout):
        server.accept()
    with pytest.raises(socket.timeout):  # a datagram sent to the grader's machine never arrives
        udp.recvfrom(16)
    udp.close()
    assert seen["raise_as"].startswith("refused") and seen["raise_nproc"].startswith("refused")
    assert SECRET not in seen["environ"]
    assert max(seen["pids_visible"]) < 10, "the student's process sees processes outside its sandbox"
    assert seen["children"] < limits.processes, f"forked {seen['children']} processes"
    assert seen["uid"] != 0
    assert seen["outside_uid"] != 0 or os.geteuid() != 0, "a root grader's sandbox must not be root outside"
    server.close()


SPAWNERS = {
    "fork and exec": "pid = os.fork()\n    if pid == 0:\n        os.setsid()\n"
                     "        os.execv('/bin/sh', ['sh', '-c', 'exec -a {marker} sleep 600'])",
    "_posixsubprocess.fork_exec": "subprocess.Popen(['/bin/sh', '-c', 'exec -a {marker} sleep 600'], start_new_session=True,\n"
                                  "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
}


@needs_sandbox
@pytest.mark.parametrize("spawn", list(SPAWNERS))
def test_nothing_outlives_grading_and_temp_folders_go(tmp_path: Path, spawn: str) -> None:
    import tempfile

    marker = f"lfs-survivor-{os.getpid()}-{time.monotonic_ns()}"
    before = {p.name for p in Path(tempfile.gettempdir()).glob("lfs-grade-*")}
    body = SPAWNERS[spawn].format(marker=marker)  # subprocess.Popen goes through _posixsubprocess.fork_exec
    nb = write_notebook(tmp_path / "nb.ipynb", "import os, subprocess",
                        f"def square(x):\n    {body}\n    import time\n    time.sleep(0.5)\n    return x * x")
    started = time.monotonic()
    results = grade(nb, timeout=10.0)
    assert results["square"].passed, results["square"].reason  # right answer; what it left must not survive
    time.sleep(0.5)
    survivors = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert survivors == [], "a process started by graded code outlived grading"
    assert time.monotonic() - started < 60
    for _ in range(50):  # a concurrent grader's folder may still be going away
        after = {p.name for p in Path(tempfile.gettempdir()).glob("lfs-grade-*")}
        if after <= before:
            break
        time.sleep(0.1)
    assert after <= before, "the grader left temporary folders behind"


@needs_sandbox
def test_a_hostile_class_cannot_stall_kill_or_rewrite_the_batch(tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    package = tmp_path / "pkgs" / "attackchecks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ch90_toy.py").write_text(
        "import random, torch\n\ndef check_square(fn):\n    x = random.randint(-99, 99)\n"
        "    assert fn(x) == x * x, 'wrong square'\n\nCHECKS = {'square': check_square}\n")
    report_path = tmp_path / "out" / "report.csv"
    write_notebook(subs / "honest" / "ch90_toy.ipynb", "# EXERCISE square (3 points)\ndef square(x):\n    return x * x")
    write_notebook(subs / "killer" / "ch90_toy.ipynb", "import os\ndef square(x):\n    os.kill(os.getppid(), 9)\n    os.kill(1, 9)\n    return x * x")
    write_notebook(subs / "staller" / "ch90_toy.ipynb",
                   "import os, time\ndef square(x):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(600)\n    return x * x")
    write_notebook(subs / "rewriter" / "ch90_toy.ipynb",
                   "import os, time\ndef square(x):\n    if os.fork() == 0:\n        time.sleep(3)\n"
                   f"        open({str(report_path)!r}, 'w').write('rewriter,ch90_toy,square,True,passed,3,3,0')\n"
                   "        os._exit(0)\n    return 0")
    (subs / "linker").mkdir()
    (subs / "linker" / "ch90_toy.ipynb").symlink_to(subs / "honest" / "ch90_toy.ipynb")
    (subs / "zero").mkdir()
    (subs / "zero" / "ch90_toy.ipynb").symlink_to("/dev/zero")
    (subs / "fifo").mkdir()
    os.mkfifo(subs / "fifo" / "ch90_toy.ipynb")
    write_notebook(subs / "huge" / "ch90_toy.ipynb", "# " + "x" * (3 << 20) + "\ndef square(x):\n    return x * x")
    settings = Settings(checks_package="attackchecks", python_path=[str(tmp_path / "pkgs")], solutions=None,
                        limits=Limits(timeout=10.0), isolation="sandbox", max_student_mb=2.0)
    started = time.monotonic()
    report = grade_batch(subs, settings, jobs=2)
    write_reports(report, report_path)
    assert time.monotonic() - started < 120
    time.sleep(4)  # longer than the rewriter waits
    rows = {r.student: r for r in report.rows}
    assert rows["honest"].passed and rows["honest"].points == 3
    for student in ("killer", "staller"):
        assert rows[student].passed, rows[student].reason  # right answers; the attacks changed nothing
    for student in ("rewriter", "linker", "zero", "fifo", "huge"):
        assert not rows[student].passed and rows[student].points == 0, (student, rows[student].reason)
    assert "rewriter,ch90_toy,square,True" not in report_path.read_text()
    assert any("linker" in w and "symbolic link" in w for w in report.warnings)
    assert "larger than" in rows["huge"].reason


def test_answers_travel_as_data_only() -> None:
    from llama_from_scratch.course import wire

    class Sneaky:
        def __eq__(self, other):
            return True

    with pytest.raises(wire.WireError):
        wire.Encoder().encode(Sneaky())
    enc = wire.Encoder()
    header = enc.encode({"t": torch.arange(3.0), (1, 2): [b"x", float("nan"), {1, 2}], "c": torch.randn(2, dtype=torch.cfloat)})
    out = wire.Decoder(enc.tensors).decode(header)
    assert torch.equal(out["t"], torch.arange(3.0)) and out[(1, 2)][0] == b"x" and out[(1, 2)][2] == {1, 2}
    assert out["c"].is_complex()
    leaf = torch.randn(3, requires_grad=True)  # the student's side gets a leaf it can differentiate
    assert wire.Decoder((enc := wire.Encoder()).tensors).decode(enc.encode(leaf)).requires_grad
    for bad in ({"__tensor__": "9"}, {"__pickle__": "x"}, {"__handle__": 1}, {"__construct__": "os.system", "args": [], "kwargs": {}}):
        with pytest.raises(wire.WireError):
            wire.Decoder({}).decode(bad)
    with pytest.raises(ValueError):
        wire.Construct("os.system", "true")
