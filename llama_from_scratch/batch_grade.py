"""Grade a whole class: every student's notebooks, each in its own limited process.

    python -m llama_from_scratch.grade --batch submissions/ --out report.csv [--jobs 4]

``submissions/`` holds one folder per student (the folder name is the student's name) with any
subset of the chapters' notebooks, named like the exercise notebooks (``ch01_tokenization.ipynb``;
``ch01_tokenization (1).ipynb`` or ``ch01-copy.ipynb`` are matched by their ``chNN`` prefix).
Every notebook is graded in a separate process (see ``llama_from_scratch.sandbox``) with a time
limit per exercise, a memory limit and capped output, so a notebook that hangs, crashes the
interpreter or floods its output fails its own exercises and nothing else.

Writes ``report.csv`` (one row per student x exercise), ``report.json`` (the rows, per-student and
per-chapter sums, per-notebook details and warnings) and ``report_summary.csv`` (one row per
student: points per chapter and in total), and prints the per-student table. Points come from the
solution notebooks' ``# EXERCISE name (N points)`` lines (``--solutions``), never from the
student's copy, which a student could edit.
"""

from __future__ import annotations

import concurrent.futures
import csv
import datetime
import importlib
import json
import os
import pkgutil
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from llama_from_scratch.notebook_source import exercises_in, read_notebook

FIELDS = ["student", "chapter", "exercise", "passed", "reason", "points", "max_points", "seconds"]
_CHAPTER_NUMBER = re.compile(r"^ch(\d+)", re.IGNORECASE)
_SIGNAL_REASONS = {
    signal.SIGSEGV: "crashed the Python interpreter (segmentation fault)",
    signal.SIGBUS: "crashed the Python interpreter (bus error)",
    signal.SIGABRT: "crashed the Python interpreter (abort)",
    signal.SIGFPE: "crashed the Python interpreter (floating point exception)",
    signal.SIGILL: "crashed the Python interpreter (illegal instruction)",
    signal.SIGXCPU: "used up the CPU time limit",
    signal.SIGXFSZ: "wrote a file larger than the file size limit",
    signal.SIGKILL: "was killed (out of memory?)",
}


@dataclass
class Limits:
    """What one notebook's grading process may use."""

    timeout: float = 60.0          # seconds per exercise (and for loading the notebook)
    startup_timeout: float = 180.0  # seconds to start Python and import the grader and the checks
    memory_mb: int = 4096           # address space (RLIMIT_AS); torch alone maps about 1 GB
    file_mb: int = 64               # largest file the graded code may write in its temp dir
    output_kb: int = 64             # stdout+stderr kept per process; the rest is read and dropped
    grace: float = 5.0              # the parent kills a child this long after an exercise's limit


@dataclass
class Settings:
    """Where the checks, points and forbidden places are."""

    checks_package: str = "llama_from_scratch.checks"
    python_path: list[str] = field(default_factory=list)  # where the checks package lives, if not installed
    solutions: Path | None = None
    deny: list[str] = field(default_factory=list)
    allow_read: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)


@dataclass
class Row:
    student: str
    chapter: str
    exercise: str
    passed: bool
    reason: str
    points: int
    max_points: int
    seconds: float


@dataclass
class Submission:
    student: str
    chapter: str
    path: Path


@dataclass
class NotebookLog:
    """How grading one notebook went: processes used, output seen (capped)."""

    student: str
    chapter: str
    notebook: str
    processes: int = 0
    output_bytes: int = 0
    output_head: str = ""


# --------------------------------------------------------------------------- checks and points

def _with_path(python_path: list[str]) -> Callable[[], None]:
    added = [p for p in python_path if p not in sys.path]
    sys.path[:0] = added
    importlib.invalidate_caches()

    def undo() -> None:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    return undo


def available_chapters(settings: Settings) -> list[str]:
    """Chapters of the checks package (modules named ``ch*``)."""
    undo = _with_path(settings.python_path)
    try:
        package = importlib.import_module(settings.checks_package)
        return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("ch"))
    finally:
        undo()


def exercise_names(chapter: str, settings: Settings) -> list[str]:
    """The exercises of a chapter, from its checks (deleting a cell cannot hide an exercise)."""
    undo = _with_path(settings.python_path)
    try:
        return list(importlib.import_module(f"{settings.checks_package}.{chapter}").CHECKS)
    finally:
        undo()


def solution_points(chapter: str, settings: Settings) -> dict[str, int] | None:
    """Points per exercise from ``solutions/<chapter>.ipynb``; ``None`` if there is no such file."""
    if settings.solutions is None:
        return None
    path = settings.solutions / f"{chapter}.ipynb"
    if not path.is_file():
        return None
    return {e.name: e.points for e in exercises_in(read_notebook(path))}


def default_solutions_dir() -> Path | None:
    """``./solutions`` if present, else the ``solutions`` folder next to the package (a checkout)."""
    for candidate in (Path("solutions"), Path(__file__).resolve().parent.parent / "solutions"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


# --------------------------------------------------------------------------- finding submissions

def find_submissions(root: Path, chapters: list[str], warnings: list[str]) -> tuple[list[str], list[Submission]]:
    """Students (the folders of ``root``) and their notebooks matched to chapters."""
    by_number: dict[str, list[str]] = {}
    for ch in chapters:
        m = _CHAPTER_NUMBER.match(ch)
        if m:
            by_number.setdefault(str(int(m[1])), []).append(ch)
    students, submissions = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        students.append(folder.name)
        found: dict[str, list[Path]] = {}
        notebooks = sorted(p for p in folder.rglob("*.ipynb")
                           if not any(part.startswith(".") for part in p.relative_to(folder).parts))
        for nb in notebooks:
            chapter = nb.stem if nb.stem in chapters else None
            m = _CHAPTER_NUMBER.match(nb.stem)
            if chapter is None and m and len(by_number.get(str(int(m[1])), [])) == 1:
                chapter = by_number[str(int(m[1]))][0]
            if chapter is None:
                warnings.append(f"{folder.name}: {nb.relative_to(folder)} is not named after a chapter; not graded")
                continue
            found.setdefault(chapter, []).append(nb)
        for chapter, paths in sorted(found.items()):
            exact = [p for p in paths if p.stem == chapter]
            chosen = (exact or paths)[0]
            if len(paths) > 1:
                others = ", ".join(str(p.relative_to(folder)) for p in paths if p != chosen)
                warnings.append(f"{folder.name}: several notebooks for {chapter}; graded "
                                f"{chosen.relative_to(folder)}, ignored {others}")
            submissions.append(Submission(folder.name, chapter, chosen))
    return students, submissions


# --------------------------------------------------------------------------- one child process

@dataclass
class _ChildOutcome:
    results: dict[str, tuple[bool, str, float]]
    failed_exercise: str | None = None   # the exercise running when the child died or was killed
    failure: str | None = None           # why it died, or why loading failed
    failed_phase: str | None = None      # "startup", "load" or "exercise"
    output_bytes: int = 0
    output_head: bytes = b""


def _child_env(workdir: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": workdir,
           "CUDA_VISIBLE_DEVICES": ""}
    for name in ("LFS_QUICK", "LFS_SMOLLM2_GGUF", "SYSTEMROOT"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"was killed by signal {-code}"
        return _SIGNAL_REASONS.get(sig, f"was killed by {sig.name}")
    return f"ended the Python interpreter (exit status {code}; os._exit or a fatal error?)"


def _run_child(notebook: Path, chapter: str, exercises: list[str], points: dict[str, int],
               settings: Settings) -> _ChildOutcome:
    limits = settings.limits
    workdir = tempfile.mkdtemp(prefix="lfs-grade-")
    copy = Path(workdir) / f"{chapter}.ipynb"
    shutil.copyfile(notebook, copy)
    read_fd, write_fd = os.pipe()
    cpu_s = limits.startup_timeout + (limits.timeout + limits.grace) * (len(exercises) + 1)
    cmd = [sys.executable, "-I", "-B", "-X", "faulthandler", "-m", "llama_from_scratch.sandbox", str(copy),
           "--chapter", chapter, "--checks-package", settings.checks_package,
           "--points", json.dumps(points), "--timeout", str(limits.timeout),
           "--memory-mb", str(limits.memory_mb), "--file-mb", str(limits.file_mb), "--cpu-s", str(int(cpu_s)),
           "--results-fd", str(write_fd)]
    for name in exercises:
        cmd += ["--exercise", name]
    for p in settings.python_path:
        cmd += ["--python-path", str(p)]
    for p in settings.deny:
        cmd += ["--deny", str(p)]
    for p in settings.allow_read:
        cmd += ["--allow-read", str(p)]
    outcome = _ChildOutcome(results={})
    head = bytearray()
    total = [0]
    cap = limits.output_kb * 1024

    try:
        proc = subprocess.Popen(cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                                start_new_session=True)
    finally:
        os.close(write_fd)

    def drain() -> None:  # read all output, keep the first `cap` bytes
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            total[0] += len(chunk)
            if len(head) < cap:
                head.extend(chunk[: cap - len(head)])

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    phase, current = "startup", None
    deadline = time.monotonic() + limits.startup_timeout
    started_at = time.monotonic()
    buffer = b""
    finished = False
    try:
        while not finished:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(proc)
                if phase == "startup":
                    why = f"the grader did not start within {limits.startup_timeout:g} s"
                elif phase == "load":
                    why = f"loading the notebook's definitions did not finish within {limits.timeout:g} s"
                else:
                    why = (f"did not finish within {limits.timeout:g} s (an endless loop? the grading "
                           "process was stopped)")
                outcome.failure, outcome.failed_phase, outcome.failed_exercise = why, phase, current
                outcome.results.pop(current or "", None)
                break
            ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:  # the child closed the channel: it ended or died
                try:
                    code = proc.wait(timeout=limits.grace)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    code = None
                outcome.failure = _describe_exit(code)
                if phase == "startup":
                    tail = bytes(head[-1500:]).decode("utf-8", "replace").strip()
                    outcome.failure = f"the grader could not start ({outcome.failure}): {tail}"
                outcome.failed_phase, outcome.failed_exercise = phase, current
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if len(buffer) > 1 << 20:  # a megabyte without a newline is not from the grader
                buffer = b""
            for line in lines:
                try:
                    event = json.loads(line)
                    kind = event["event"]
                except (ValueError, KeyError, TypeError):
                    continue  # not from the grader: ignore
                now = time.monotonic()
                if kind == "ready":
                    phase, deadline = "guard", now + limits.timeout + limits.grace
                elif kind == "load":
                    phase, deadline = "load", now + limits.timeout + limits.grace
                elif kind == "loaded":
                    phase, deadline = "between", now + limits.timeout + limits.grace
                elif kind == "load_failed":
                    outcome.failure, outcome.failed_phase = str(event.get("reason")), "load"
                    finished = True
                    break
                elif kind == "start" and event.get("exercise") in exercises:
                    phase, current = "exercise", event["exercise"]
                    started_at, deadline = now, now + limits.timeout + limits.grace
                elif kind == "result" and event.get("exercise") == current:
                    outcome.results[current] = (bool(event.get("passed")), str(event.get("reason", ""))[:2000],
                                                float(event.get("seconds", now - started_at)))
                    phase, current, deadline = "between", None, now + limits.timeout + limits.grace
                elif kind == "done":
                    finished = True
                    break
        if outcome.failed_exercise is not None:
            outcome.results[outcome.failed_exercise] = (False, outcome.failure or "failed",
                                                        round(time.monotonic() - started_at, 3))
    finally:
        _kill_group(proc)  # also ends anything the graded code left running
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        os.close(read_fd)
        reader.join(timeout=5)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)
    outcome.output_bytes, outcome.output_head = total[0], bytes(head)
    return outcome


def grade_submission(sub: Submission, exercises: list[str], points: dict[str, int],
                     settings: Settings) -> tuple[list[Row], NotebookLog]:
    """Grade one notebook, restarting a fresh process after an exercise that killed one."""
    log = NotebookLog(sub.student, sub.chapter, str(sub.path))
    results: dict[str, tuple[bool, str, float]] = {}
    remaining = list(exercises)
    while remaining:
        outcome = _run_child(sub.path, sub.chapter, remaining, points, settings)
        log.processes += 1
        log.output_bytes += outcome.output_bytes
        if len(log.output_head) < 2000:
            log.output_head += outcome.output_head.decode("utf-8", "replace")[: 2000 - len(log.output_head)]
        results.update(outcome.results)
        remaining = [e for e in remaining if e not in results]
        if not remaining:
            break
        if outcome.failed_phase == "exercise":
            continue  # the exercise that killed the process is failed; grade the rest afresh
        why = outcome.failure or "the grading process ended without grading this exercise"
        if outcome.failed_phase in ("load", "guard", "between"):
            why = f"the notebook could not be graded: {why}"
        for e in remaining:
            results[e] = (False, why, 0.0)
        break
    rows = []
    for e in exercises:
        passed, reason, seconds = results[e]
        rows.append(Row(sub.student, sub.chapter, e, passed, "passed" if passed else reason,
                        points[e] if passed else 0, points[e], round(seconds, 3)))
    return rows, log


# --------------------------------------------------------------------------- the batch

@dataclass
class BatchReport:
    rows: list[Row]
    students: list[str]
    chapters: list[str]
    notebooks: list[NotebookLog]
    warnings: list[str]
    seconds: float
    settings: dict[str, Any]

    def student_totals(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for s in self.students:
            out[s] = {"points": 0, "max_points": 0, "chapters": {}}
            for ch in self.chapters:
                out[s]["chapters"][ch] = {"points": 0, "max_points": 0, "passed": 0, "failed": 0,
                                          "submitted": False}
        submitted = {(n.student, n.chapter) for n in self.notebooks}
        for r in self.rows:
            c = out[r.student]["chapters"][r.chapter]
            c["points"] += r.points
            c["max_points"] += r.max_points
            c["passed" if r.passed else "failed"] += 1
            c["submitted"] = (r.student, r.chapter) in submitted
            out[r.student]["points"] += r.points
            out[r.student]["max_points"] += r.max_points
        return out

    def chapter_totals(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for ch in self.chapters:
            rows = [r for r in self.rows if r.chapter == ch]
            per_student = {}
            for r in rows:
                per_student[r.student] = per_student.get(r.student, 0) + r.points
            exercises: dict[str, dict[str, int]] = {}
            for r in rows:
                e = exercises.setdefault(r.exercise, {"max_points": r.max_points, "passed": 0, "students": 0})
                e["passed"] += r.passed
                e["students"] += 1
            out[ch] = {"max_points": sum(e["max_points"] for e in exercises.values()),
                       "mean_points": round(sum(per_student.values()) / max(len(per_student), 1), 2),
                       "submitted": sum(1 for n in self.notebooks if n.chapter == ch),
                       "exercises": exercises}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"generated": datetime.datetime.now().isoformat(timespec="seconds"),
                "seconds": round(self.seconds, 1), "settings": self.settings,
                "students": self.student_totals(), "chapters": self.chapter_totals(),
                "results": [asdict(r) for r in self.rows],
                "notebooks": [asdict(n) for n in self.notebooks], "warnings": self.warnings}

    def table(self) -> str:
        totals = self.student_totals()
        width = max([len("student")] + [len(s) for s in self.students])
        cols = [max(len(ch), 9) for ch in self.chapters]
        header = "  ".join([f"{'student':<{width}}"] + [f"{ch:>{w}}" for ch, w in zip(self.chapters, cols)]
                           + [f"{'total':>9}", "    %"])
        lines = [header, "-" * len(header)]
        for s in self.students:
            t = totals[s]
            cells = []
            for ch, w in zip(self.chapters, cols):
                c = t["chapters"][ch]
                cells.append(f"{(str(c['points']) + '/' + str(c['max_points'])) if c['submitted'] else 'missing':>{w}}")
            pct = 100 * t["points"] / t["max_points"] if t["max_points"] else 0.0
            lines.append("  ".join([f"{s:<{width}}"] + cells + [f"{t['points']:>4}/{t['max_points']:<4}", f"{pct:5.1f}"]))
        return "\n".join(lines)


def _csv_cell(value: Any) -> Any:
    """Defuse spreadsheet formulas: a text cell starting with = + - @ gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def report_paths(out: Path) -> tuple[Path, Path, Path]:
    """``report.csv`` -> (report.csv, report.json, report_summary.csv)."""
    base = out.with_suffix("") if out.suffix.lower() in (".csv", ".json") else out
    return base.with_suffix(".csv"), base.with_suffix(".json"), base.with_name(base.name + "_summary.csv")


def write_reports(report: BatchReport, out: Path) -> tuple[Path, Path, Path]:
    csv_path, json_path, summary_path = report_paths(out)

    def rows_csv(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for r in report.rows:
            w.writerow([_csv_cell(v) for v in asdict(r).values()])

    def summary_csv(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(["student"] + [f"{ch}_points" for ch in report.chapters] + ["points", "max_points", "percent"])
        for s, t in report.student_totals().items():
            pct = round(100 * t["points"] / t["max_points"], 1) if t["max_points"] else 0.0
            w.writerow([_csv_cell(s)] + [t["chapters"][ch]["points"] for ch in report.chapters]
                       + [t["points"], t["max_points"], pct])

    _write_atomic(csv_path, rows_csv)
    _write_atomic(json_path, lambda f: json.dump(report.to_json(), f, indent=1))
    _write_atomic(summary_path, summary_csv)
    return csv_path, json_path, summary_path


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def grade_batch(root: Path, settings: Settings | None = None, jobs: int | None = None,
                chapters: list[str] | None = None, progress: Callable[[str], None] | None = None) -> BatchReport:
    """Grade every student folder of ``root``. ``chapters``: the chapters every student owes
    (a missing notebook fails its exercises); default: every chapter someone submitted."""
    settings = settings or Settings()
    root = Path(root).resolve()
    started = time.perf_counter()
    warnings: list[str] = []
    known = available_chapters(settings)
    for ch in chapters or []:
        if ch not in known:
            raise KeyError(f"no checks for chapter {ch!r}; known chapters: {', '.join(known)}")
    students, submissions = find_submissions(root, known, warnings)
    expected = sorted(chapters or {s.chapter for s in submissions})
    submissions = [s for s in submissions if s.chapter in expected]
    deny = [str(root), *settings.deny]
    if settings.solutions is not None:
        deny.append(str(Path(settings.solutions).resolve()))
    settings = Settings(settings.checks_package, [str(Path(p).resolve()) for p in settings.python_path],
                        settings.solutions, deny, settings.allow_read, settings.limits)
    names = {ch: exercise_names(ch, settings) for ch in expected}
    points: dict[tuple[str, str], dict[str, int]] = {}
    for ch in expected:
        from_solution = solution_points(ch, settings)
        if from_solution is None:
            warnings.append(f"{ch}: no solution notebook in {settings.solutions}; points taken from each "
                            "student's own notebook (which the student could edit)")
        for s in students:
            sub = next((x for x in submissions if x.student == s and x.chapter == ch), None)
            declared = from_solution
            if declared is None:
                try:
                    declared = {e.name: e.points for e in exercises_in(read_notebook(sub.path))} if sub else {}
                except (OSError, ValueError):
                    declared = {}
            points[s, ch] = {e: int(declared.get(e, 1)) for e in names[ch]}

    rows: list[Row] = []
    logs: list[NotebookLog] = []
    submitted = {(s.student, s.chapter) for s in submissions}
    for s in students:
        for ch in expected:
            if (s, ch) not in submitted:
                rows += [Row(s, ch, e, False, f"no notebook submitted for {ch} (expected {ch}.ipynb)", 0,
                             points[s, ch][e], 0.0) for e in names[ch]]
    jobs = max(1, jobs or _cores())
    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(grade_submission, sub, names[sub.chapter], points[sub.student, sub.chapter],
                               settings): sub for sub in submissions}
        for future in concurrent.futures.as_completed(futures):
            sub = futures[future]
            try:
                sub_rows, log = future.result()
            except Exception as exc:  # noqa: BLE001 - a grader bug on one notebook must not stop the batch
                sub_rows = [Row(sub.student, sub.chapter, e, False, f"grader error: {type(exc).__name__}: {exc}",
                                0, points[sub.student, sub.chapter][e], 0.0) for e in names[sub.chapter]]
                log = NotebookLog(sub.student, sub.chapter, str(sub.path))
                warnings.append(f"{sub.student}/{sub.chapter}: grader error {type(exc).__name__}: {exc}")
            rows += sub_rows
            logs.append(log)
            done += 1
            if progress:
                got = sum(r.points for r in sub_rows)
                total = sum(r.max_points for r in sub_rows)
                progress(f"[{done}/{len(submissions)}] {sub.student} {sub.chapter}: {got}/{total}")
    order = {ch: {e: i for i, e in enumerate(names[ch])} for ch in expected}
    rows.sort(key=lambda r: (students.index(r.student), expected.index(r.chapter), order[r.chapter][r.exercise]))
    logs.sort(key=lambda n: (n.student, n.chapter))
    for log in logs:
        log.notebook = os.path.relpath(log.notebook, root)
    lim = settings.limits
    info = {"submissions": str(root), "jobs": jobs, "checks_package": settings.checks_package,
            "solutions": str(settings.solutions) if settings.solutions else None,
            "limits": asdict(lim)}
    return BatchReport(rows, students, expected, logs, warnings, time.perf_counter() - started, info)


def add_arguments(parser: Any) -> None:
    """The batch options of ``python -m llama_from_scratch.grade``."""
    g = parser.add_argument_group("batch grading (a whole class)")
    g.add_argument("--batch", type=Path, metavar="SUBMISSIONS_DIR",
                   help="grade every student folder in SUBMISSIONS_DIR (one folder per student)")
    g.add_argument("--out", type=Path, default=Path("report.csv"),
                   help="report path: writes NAME.csv, NAME.json and NAME_summary.csv (default report.csv)")
    g.add_argument("--jobs", type=int, default=None, help="notebooks graded in parallel (default: CPU cores)")
    g.add_argument("--chapters", default=None,
                   help="comma-separated chapters every student owes (default: those anyone submitted)")
    g.add_argument("--solutions", type=Path, default=None,
                   help="solution notebooks, for the points (default: ./solutions or the checkout's)")
    g.add_argument("--memory-mb", type=int, default=Limits.memory_mb, help="memory limit per process (MB)")
    g.add_argument("--startup-timeout", type=float, default=Limits.startup_timeout,
                   help="seconds to start a grading process")
    g.add_argument("--output-kb", type=int, default=Limits.output_kb, help="output kept per process (KB)")
    g.add_argument("--checks-package", default="llama_from_scratch.checks",
                   help="package holding the chNN_<topic> check modules (e.g. private instructor checks)")
    g.add_argument("--checks-path", action="append", default=[], metavar="DIR",
                   help="folder to import the checks package from (if not installed)")
    g.add_argument("--allow-read", action="append", default=[], metavar="PATH",
                   help="extra path graded code may read (data files); repeatable")


def run_batch_cli(args: Any) -> int:
    """``--batch`` of ``python -m llama_from_scratch.grade``: grade, write reports, print the table."""
    root: Path = args.batch
    if not root.is_dir():
        print(f"no submissions folder at {root}", file=sys.stderr)
        return 2
    settings = Settings(checks_package=args.checks_package, python_path=list(args.checks_path),
                        solutions=(args.solutions.resolve() if args.solutions else default_solutions_dir()),
                        deny=[str(p.resolve()) for p in report_paths(args.out)],
                        allow_read=list(args.allow_read),
                        limits=Limits(timeout=args.timeout, startup_timeout=args.startup_timeout,
                                      memory_mb=args.memory_mb, output_kb=args.output_kb))
    chapters = [c.strip() for c in args.chapters.split(",") if c.strip()] if args.chapters else None
    try:
        report = grade_batch(root, settings, args.jobs, chapters,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (KeyError, ImportError, OSError) as exc:
        print(f"cannot grade {root}: {exc}", file=sys.stderr)
        return 2
    paths = write_reports(report, args.out)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.table())
    print(f"\n{len(report.students)} students, {len(report.notebooks)} notebooks graded in "
          f"{report.seconds:.1f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0
