"""Grade a whole class: every student's notebooks, each in its own limited process.

    python -m llama_from_scratch.grade --batch submissions/ --out report.csv [--jobs 4]

``submissions/`` holds one folder per student (the folder name is the student's name) with any
subset of the chapters' notebooks, named like the exercise notebooks (``ch01_tokenization.ipynb``;
``ch01_tokenization (1).ipynb`` or ``ch01-copy.ipynb`` are matched by their ``chNN`` prefix).
Every notebook's code runs in its own sandboxed process (see ``llama_from_scratch.course.sandbox``) with a
time limit per exercise, a memory limit and capped output, while the checks and verdicts stay in
this process, so a notebook that hangs, crashes the interpreter, floods its output or tries to
cheat fails its own exercises and nothing else. Only regular files are read (a symlink, FIFO or
device in a student's folder is refused with a warning), at most ``--max-student-mb`` per student.

Writes ``report.csv`` (one row per student x exercise), ``report.json`` (the rows, per-student and
per-chapter sums, per-notebook details and warnings) and ``report_summary.csv`` (one row per
student: points per chapter and in total), and prints the per-student table. Points come from the
solution notebooks' ``# EXERCISE name (N points)`` lines (``--solutions``), never from the
student's copy, which a student could edit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import datetime
import importlib
import json
import os
import pkgutil
import re
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from llama_from_scratch.course.notebook_source import exercises_in, parse_notebook, read_notebook
from llama_from_scratch.course.sandbox import Limits

FIELDS = ["student", "chapter", "exercise", "passed", "reason", "points", "max_points", "seconds"]
_CHAPTER_NUMBER = re.compile(r"^ch(\d+)", re.IGNORECASE)


@dataclass
class Settings:
    """Where the checks, points and forbidden places are."""

    checks_package: str = "llama_from_scratch.course.checks"
    python_path: list[str] = field(default_factory=list)  # where the checks package lives, if not installed
    solutions: Path | None = None
    limits: Limits = field(default_factory=Limits)
    isolation: str = "auto"          # "sandbox" refuses to grade without bubblewrap
    max_student_mb: float = 50.0     # notebooks read per student, in all


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
    for candidate in (Path("solutions"), Path(__file__).resolve().parents[2] / "solutions"):
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
        if folder.is_symlink():
            warnings.append(f"{folder.name}: the student folder is a symbolic link; not graded")
            continue
        students.append(folder.name)
        found: dict[str, list[Path]] = {}
        notebooks = sorted(p for p in folder.rglob("*.ipynb")
                           if not any(part.startswith(".") for part in p.relative_to(folder).parts))
        for nb in notebooks:
            problem = _not_a_plain_file(nb, folder)
            if problem:
                warnings.append(f"{folder.name}: {nb.relative_to(folder)} {problem}; not graded")
                continue
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


def _not_a_plain_file(path: Path, folder: Path) -> str | None:
    """Why ``path`` may not be read as a submission (a link anywhere on its way, not a regular file)."""
    current = folder
    for part in path.relative_to(folder).parts:
        current = current / part
        if current.is_symlink():
            return "is (or lies under) a symbolic link"
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return "is not a regular file"
    return None


def read_submission(path: Path, max_bytes: int) -> bytes:
    """The bytes of a submitted notebook: a regular file, not followed through a link, at most
    ``max_bytes`` (a student's folder may hold a link to /dev/zero or to someone else's work)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("is not a regular file")
        data = b""
        while len(data) <= max_bytes:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return data
            data += chunk
        raise ValueError(f"is larger than {max_bytes // (1 << 20)} MB")
    finally:
        os.close(fd)


def grade_submission(sub: Submission, exercises: list[str], points: dict[str, int],
                     settings: Settings, budget: list[int] | None = None) -> tuple[list[Row], NotebookLog]:
    """Grade one notebook: its code in a sandboxed process, the checks here. ``budget``: bytes the
    student may still submit (shared by their notebooks)."""
    from llama_from_scratch.course.grade import grade_notebook

    log = NotebookLog(sub.student, sub.chapter, str(sub.path))
    undo = _with_path(settings.python_path)
    try:
        module = importlib.import_module(f"{settings.checks_package}.{sub.chapter}")
        checks = {e: module.CHECKS[e] for e in exercises}
        forbidden = {k: list(v) for k, v in getattr(module, "FORBIDDEN", {}).items()}
    finally:
        undo()
    try:
        left = budget[0] if budget else int(settings.max_student_mb * (1 << 20))
        data = read_submission(sub.path, left)
        if budget:
            budget[0] -= len(data)
        nb = parse_notebook(data, sub.path.name)
    except (OSError, ValueError) as exc:
        why = f"the notebook could not be read: {sub.path.name} {exc}"
        return [Row(sub.student, sub.chapter, e, False, why, 0, points[e], 0.0) for e in exercises], log
    results = grade_notebook(sub.path, checks=checks, forbidden=forbidden, points=points, limits=settings.limits,
                             isolation=settings.isolation, notebook=nb)
    log.processes = 1
    rows = [Row(sub.student, sub.chapter, r.exercise, r.passed, r.reason, r.points, r.max_points, r.seconds)
            for r in results]
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
    settings = Settings(settings.checks_package, [str(Path(p).resolve()) for p in settings.python_path],
                        settings.solutions, settings.limits, settings.isolation, settings.max_student_mb)
    names = {ch: exercise_names(ch, settings) for ch in expected}
    points: dict[tuple[str, str], dict[str, int]] = {}
    for ch in expected:
        from_solution = solution_points(ch, settings)
        if from_solution is None:
            where = f"in {settings.solutions}" if settings.solutions else "(no --solutions folder given)"
            warnings.append(f"{ch}: no solution notebook {where}; points taken from each "
                            "student's own notebook (which the student could edit)")
        declarations: dict[str, dict[str, int]] = {}
        for s in students:
            sub = next((x for x in submissions if x.student == s and x.chapter == ch), None)
            declared = from_solution
            if declared is None:
                try:
                    declared = {e.name: e.points for e in exercises_in(read_notebook(sub.path))} if sub else {}
                except (OSError, ValueError):
                    declared = {}
            declarations[s] = declared
        # an exercise a student's notebook does not declare (no notebook, or the cell deleted) is
        # worth what most of the other students' notebooks declare for it (1 if none does)
        common = {e: collections.Counter(d[e] for d in declarations.values() if e in d).most_common(1)
                  for e in names[ch]}
        for s in students:
            points[s, ch] = {e: int(declarations[s].get(e, common[e][0][0] if common[e] else 1)) for e in names[ch]}

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
    budgets = {s: [int(settings.max_student_mb * (1 << 20))] for s in students}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(grade_submission, sub, names[sub.chapter], points[sub.student, sub.chapter],
                               settings, budgets[sub.student]): sub for sub in submissions}
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
    from llama_from_scratch.course.sandbox import isolation_mode

    info = {"submissions": str(root), "jobs": jobs, "checks_package": settings.checks_package,
            "solutions": str(settings.solutions) if settings.solutions else None,
            "isolation": isolation_mode(settings.isolation), "limits": asdict(lim)}
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
    g.add_argument("--checks-package", default="llama_from_scratch.course.checks",
                   help="package holding the chNN_<topic> check modules (e.g. private instructor checks)")
    g.add_argument("--checks-path", action="append", default=[], metavar="DIR",
                   help="folder to import the checks package from (if not installed)")
    g.add_argument("--max-student-mb", type=float, default=Settings.max_student_mb,
                   help="notebook bytes read per student, in all (MB)")


def run_batch_cli(args: Any) -> int:
    """``--batch`` of ``python -m llama_from_scratch.grade``: grade, write reports, print the table."""
    root: Path = args.batch
    if not root.is_dir():
        print(f"no submissions folder at {root}", file=sys.stderr)
        return 2
    settings = Settings(checks_package=args.checks_package, python_path=list(args.checks_path),
                        solutions=(args.solutions.resolve() if args.solutions else default_solutions_dir()),
                        limits=Limits(timeout=args.timeout, startup_timeout=args.startup_timeout,
                                      memory_mb=args.memory_mb, output_kb=args.output_kb),
                        isolation=args.isolation, max_student_mb=args.max_student_mb)
    from llama_from_scratch.course.sandbox import UNSAFE_WARNING, isolation_mode

    try:
        if isolation_mode(args.isolation) == "unsafe":
            print(UNSAFE_WARNING, file=sys.stderr)
    except RuntimeError as exc:
        print(f"cannot grade {root}: {exc}", file=sys.stderr)
        return 2
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
