"""Gate a patch series patch by patch, or bisect a regression to its commit.

  ci/conformance --qemu-src TREE --series BASE..HEAD [--output DIR] [pytest args]
  ci/conformance --qemu-src TREE --bisect GOOD BAD -k CASE [--output DIR] [pytest args]

Both work in a worktree of TREE of their own (TREE's checkout and bisect state are never
touched) with one build directory, both kept under the suite's cache and reused across runs:
moving from one commit to the next rebuilds only what the patch changed (ci/build-qemu).

--series builds BASE and every commit of BASE..HEAD (oldest first), runs the same selection on
each, and prints a table: subject, build ok / failed (with the first compiler error), the
regressions against the previous patch that built and against BASE, the fixes, and the counts.
JUnit per commit and summary.md (the table in Markdown, for a merge-request comment) go to the
output directory. Exit 1 if a patch regresses a case or does not build, 2 if BASE cannot run.

--bisect drives `git bisect run` with the suite: a commit that does not build, or where the
case is skipped or not collected, is skipped (125). It prints the first bad commit with the
case's failure and artefact directory, writes summary.md, and resets the bisect state.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ci.build_qemu import BuildError, build_tree
from ci.gate import GateError, run_selection, with_suite_paths
from ci.gate_verdict import CaseResult, Comparison, Outcome, Verdict, compare, read_junit
from ci.private_apt import cache_root

ROOT = Path(__file__).resolve().parent.parent
SKIP = 125  # git bisect run: this commit cannot be judged


class SeriesError(BuildError):
    """The series cannot be gated at all; the message is the one line the user sees."""


def git(tree: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "failed").splitlines()[-1]
        raise SeriesError(f"git {' '.join(args)}: {last}")
    return proc.stdout


@dataclass
class Workspace:
    """TREE's worktree and build directory for gating, kept in the cache across runs."""

    tree: Path
    home: Path

    @classmethod
    def of(cls, tree: Path) -> Workspace:
        tree = tree.resolve()
        if not (tree / "configure").is_file():
            raise SeriesError(f"{tree}: no configure script (not a QEMU source tree)")
        top = Path(git(tree, "rev-parse", "--show-toplevel").strip())
        key = hashlib.sha256(str(top).encode()).hexdigest()[:12]
        return cls(top, cache_root() / "series" / f"{top.name}-{key}")

    @property
    def worktree(self) -> Path:
        return self.home / "worktree"

    @property
    def build(self) -> Path:
        return self.home / "build"

    def checkout(self, commit: str) -> None:
        if not (self.worktree / ".git").exists():
            shutil.rmtree(self.worktree, ignore_errors=True)
            git(self.tree, "worktree", "prune")
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            git(self.tree, "worktree", "add", "--detach", "-f", str(self.worktree), commit)
        else:
            git(self.worktree, "bisect", "reset", check=False)
            git(self.worktree, "checkout", "--detach", "-f", "-q", commit)
        git(self.worktree, "clean", "-fdq", "-e", "python/wheels")

    def qemu(self) -> Path:
        return build_tree(self.worktree, self.build)


@dataclass
class Run:
    """One commit's build and suite run."""

    commit: str
    subject: str
    seconds_build: float = 0.0
    seconds_suite: float = 0.0
    build_error: str = ""
    results: dict[str, CaseResult] = field(default_factory=dict)
    regressed_prev: list[str] = field(default_factory=list)
    regressed_base: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)

    def counts(self) -> str:
        n = {o: 0 for o in Outcome}
        for r in self.results.values():
            n[r.outcome] += 1
        shown = (Outcome.PASSED, Outcome.FAILED, Outcome.ERROR, Outcome.XFAILED, Outcome.SKIPPED)
        return " ".join(f"{n[o]} {o.value}" for o in shown if n[o]) or "no cases"


def run_suite(qemu: Path, out: Path, name: str, pytest_args: list[str]) -> dict[str, CaseResult]:
    try:
        return run_selection(
            qemu, with_suite_paths(pytest_args), junit=out / f"{name}.xml",
            log=out / f"{name}.log", artefacts=out / "artefacts" / name,
        )  # fmt: skip
    except GateError as err:
        raise SeriesError(f"{name}: {err}") from None


def ids_of(comparison: Comparison, verdict: Verdict) -> list[str]:
    return [row.test_id for row in comparison.of(verdict)]


def gate_series(ws: Workspace, rev_range: str, out: Path, pytest_args: list[str]) -> list[Run]:
    if ".." not in rev_range:
        raise SeriesError(f"--series {rev_range}: expected BASE..HEAD")
    base = rev_range.split("..", 1)[0]
    commits = git(ws.tree, "rev-list", "--reverse", rev_range).split()
    if not commits:
        raise SeriesError(f"--series {rev_range}: no commits in the range")
    runs: list[Run] = []
    last_good: Run | None = None
    for n, commit in enumerate([git(ws.tree, "rev-parse", base).strip(), *commits]):
        subject = git(ws.tree, "log", "-1", "--format=%s", commit).strip()
        run = Run(commit, subject)
        label = "base" if n == 0 else f"patch {n}/{len(commits)}"
        print(f"series: {label} {commit[:12]} {subject}: building ...", file=sys.stderr, flush=True)
        ws.checkout(commit)
        start = time.monotonic()
        try:
            qemu = ws.qemu()
        except BuildError as err:
            run.build_error = str(err)
            run.seconds_build = time.monotonic() - start
            if n == 0:
                raise SeriesError(f"BASE {commit[:12]} does not build: {err}") from None
            runs.append(run)
            continue
        run.seconds_build = time.monotonic() - start
        print(f"series: {label}: built in {run.seconds_build:.0f} s, running the suite ...",
              file=sys.stderr, flush=True)  # fmt: skip
        start = time.monotonic()
        run.results = run_suite(qemu, out, f"{n:02d}-{commit[:12]}", pytest_args)
        run.seconds_suite = time.monotonic() - start
        if last_good is not None:
            versus_prev = compare(last_good.results, run.results)
            run.regressed_prev = ids_of(versus_prev, Verdict.REGRESSION)
            run.fixed = ids_of(versus_prev, Verdict.FIXED)
            run.regressed_base = ids_of(compare(runs[0].results, run.results), Verdict.REGRESSION)
        last_good = run
        runs.append(run)
    return runs


def _short(ids: list[str], *, full: bool) -> str:
    """A table cell for a list of cases: every name in Markdown, the count in the terminal
    (whose detail lines below the table name them)."""
    if not ids:
        return "-"
    return ", ".join(i.rsplit("::", 1)[-1] for i in ids) if full else str(len(ids))


def series_rows(runs: list[Run], *, full: bool) -> list[list[str]]:
    rows = []
    for n, run in enumerate(runs):
        build = "ok" if not run.build_error else "FAILED" + (f": {run.build_error}" if full else "")
        rows.append([
            "base" if n == 0 else str(n), run.commit[:12], run.subject[:60], build,
            _short(run.regressed_prev, full=full), _short(run.regressed_base, full=full),
            _short(run.fixed, full=full),
            run.counts() if not run.build_error else "-",
            f"{run.seconds_build:.0f} s / {run.seconds_suite:.0f} s",
        ])  # fmt: skip
    return rows


HEAD = ["#", "commit", "subject", "build", "regressions vs previous", "regressions vs base",
        "fixes", "cases", "build / suite"]  # fmt: skip


def verdict(runs: list[Run]) -> tuple[int, str]:
    broken = [n for n, r in enumerate(runs) if r.build_error]
    regressing = [n for n, r in enumerate(runs) if r.regressed_prev]
    if not broken and not regressing:
        return 0, f"PASS: {len(runs) - 1} patches, none regresses a case, all build"
    parts = []
    if regressing:
        parts.append("regressions in patch " + ", ".join(map(str, regressing)))
    if broken:
        parts.append("does not build: patch " + ", ".join(map(str, broken)))
    return 1, "FAIL: " + "; ".join(parts)


def terminal(runs: list[Run]) -> str:
    rows = [HEAD, *series_rows(runs, full=False)]
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(HEAD))]
    lines = ["  ".join(c[:w].ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    details = []
    for n, run in enumerate(runs):
        if run.build_error:
            details.append(f"patch {n} does not build: {run.build_error}")
        for case in run.regressed_prev:
            message = run.results[case].message.strip().splitlines()[:1]
            details.append(f"patch {n} regresses {case}: {message[0] if message else ''}")
        details += [f"patch {n} fixes {case}" for case in run.fixed]
    return "\n".join([verdict(runs)[1], "", *lines, *(["", *details] if details else [])]) + "\n"


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown(runs: list[Run]) -> str:
    lines = [f"### vIOMMU conformance, patch by patch — {verdict(runs)[1]}", ""]
    lines += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in series_rows(runs, full=True)]
    return "\n".join(lines) + "\n"


def bisect_step(ws: Workspace, out: Path, case_args: list[str]) -> int:
    """One `git bisect run` step at the worktree's current commit: 0 good, 1 bad, 125 skip."""
    commit = git(ws.worktree, "rev-parse", "HEAD").strip()
    try:
        qemu = ws.qemu()
    except BuildError as err:
        print(f"bisect: {commit[:12]} does not build ({err}): skipped", file=sys.stderr)
        return SKIP
    try:
        results = run_suite(qemu, out, f"bisect-{commit[:12]}", case_args)
    except SeriesError as err:
        print(f"bisect: {commit[:12]}: {err}: skipped", file=sys.stderr)
        return SKIP
    outcomes = {r.outcome for r in results.values()}
    if not results or outcomes <= {Outcome.SKIPPED}:
        print(f"bisect: {commit[:12]}: the case is not run here: skipped", file=sys.stderr)
        return SKIP
    bad = any(o.failing for o in outcomes)
    print(f"bisect: {commit[:12]}: {'bad' if bad else 'good'}", file=sys.stderr, flush=True)
    return 1 if bad else 0


def bisect(ws: Workspace, good: str, bad: str, out: Path, case_args: list[str]) -> tuple[str, str]:
    """(first bad commit, the report) of `git bisect run` with the suite."""
    # Revisions are the user's, resolved in their tree (HEAD~N means their HEAD).
    good, bad = (
        git(ws.tree, "rev-parse", "--verify", f"{r}^{{commit}}").strip() for r in (good, bad)
    )
    ws.checkout(bad)
    git(ws.worktree, "bisect", "start", bad, good)
    try:
        step = [
            sys.executable, "-m", "ci.series", "--bisect-step", "--qemu-src", str(ws.tree),
            "--output", str(out), *case_args,
        ]  # fmt: skip
        proc = subprocess.run(
            ["git", "-C", str(ws.worktree), "bisect", "run", *step],
            cwd=ROOT, capture_output=True, text=True, check=False,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
        (out / "bisect.log").write_text(proc.stdout + proc.stderr)
        match = re.search(r"^([0-9a-f]{40}) is the first bad commit", proc.stdout, re.M)
        if not match:
            tail = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()[-1]
            raise SeriesError(f"git bisect run found no first bad commit: {tail}")
        first = match.group(1)
    finally:
        git(ws.worktree, "bisect", "reset", check=False)
    subject = git(ws.tree, "log", "-1", "--format=%s", first).strip()
    junit = out / f"bisect-{first[:12]}.xml"
    if not junit.is_file():  # BAD itself: bisect never ran it; run it for the failure summary
        ws.checkout(first)
        run_suite(ws.qemu(), out, f"bisect-{first[:12]}", case_args)
    results = read_junit(junit.read_text())
    failing = [(i, r) for i, r in results.items() if r.outcome.failing]
    artefacts = sorted((out / "artefacts" / f"bisect-{first[:12]}").glob("run-*/*"))
    lines = [f"first bad commit: {first[:12]} {subject}"]
    for case, result in failing:
        message = result.message.strip().splitlines()[:1]
        lines.append(f"  {case}: {result.outcome.value}: {message[0] if message else ''}")
    lines += [f"  artefacts: {a}" for a in artefacts]
    return first, "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu-src", type=Path, required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--series", metavar="BASE..HEAD")
    what.add_argument("--bisect", nargs=2, metavar=("GOOD", "BAD"))
    what.add_argument("--bisect-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path)
    options, pytest_args = parser.parse_known_args(argv)
    try:
        ws = Workspace.of(options.qemu_src)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kind = "series" if options.series else "bisect"
        out = (options.output or ROOT / "artefacts" / f"{kind}-{stamp}").absolute()
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        if options.bisect_step:
            return bisect_step(ws, out, pytest_args)
        if options.bisect:
            if "-k" not in pytest_args and not any(a.startswith("-k") for a in pytest_args):
                raise SeriesError("--bisect needs the case: -k CASE")
            good, bad = options.bisect
            _, text = bisect(ws, good, bad, out, pytest_args)
            (out / "summary.md").write_text(
                "### vIOMMU conformance bisect\n\n```\n" + text + "```\n"
            )
            print(text, end="")
            print(f"bisect: logs and artefacts in {out}", file=sys.stderr)
            return 0
        runs = gate_series(ws, options.series, out, pytest_args)
    except SeriesError as err:
        print(f"series: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("series: interrupted (no verdict)", file=sys.stderr)
        return 130
    (out / "summary.md").write_text(markdown(runs))
    print(terminal(runs), end="")
    print(f"series: JUnit per commit, logs and summary.md in {out}", file=sys.stderr)
    return verdict(runs)[0]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
