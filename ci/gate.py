"""Gate a QEMU patch series: the conformance suite against a baseline and a candidate QEMU.

Each side is one pytest run (same cases, same extra pytest args) with its own JUnit XML, log and
artefact directory under the output directory; then ci/gate_verdict.py compares them case by
case. Prints the verdict table, writes summary.md (a merge-request comment) and exits 1 on any
regression, 2 when a side could not run at all (bad QEMU path, usage error, nothing collected,
interrupted), else 0. Sides run one after the other unless --parallel.

A suite split over parallel CI jobs (pytest-split: --splits N --group I among the pytest args,
the same on both sides) gives one gate run per shard; --baseline-junit/--candidate-junit then
merge the shards' JUnit files, every shard of each side, into the verdict of the whole suite,
without running anything (no QEMU needed: standard library only).

Usage (through ci/gate or ci/conformance, which provision the default QEMU first):
  ci/conformance --baseline PATH|default --candidate PATH|default [--output DIR] [pytest args]
  python3 -m ci.gate --baseline-junit B1.xml B2.xml --candidate-junit C1.xml C2.xml [--output DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ci.gate_verdict import (
    SIDES,
    CaseResult,
    Comparison,
    ShardOverlap,
    compare,
    markdown_summary,
    merge_shards,
    read_junit,
    terminal_table,
)
from fixtures import HarnessError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_QEMU_ENV = "VIOMMU_QEMU"
# Options the gate sets per side; given among the pytest args they would silently clash.
PER_SIDE_OPTIONS = ("--qemu", "--junitxml", "--junit-xml", "--artefacts")
# pytest exit codes: 0 all passed, 1 some failed; anything else means no usable verdict.
PYTEST_OK = (0, 1)
PYTEST_NO_TESTS = 5
VERSION_TIMEOUT_S = 30.0


class GateError(HarnessError):
    """The gate cannot give a verdict; the message is the one line the user sees."""


@dataclass
class Side:
    name: str
    qemu: Path
    label: str
    out: Path

    @property
    def junit(self) -> Path:
        return self.out / f"{self.name}.xml"

    @property
    def log(self) -> Path:
        return self.out / f"{self.name}.log"

    @property
    def artefacts(self) -> Path:
        return self.out / self.name


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="ci/conformance --baseline A --candidate B",
        description="Run the conformance suite against two QEMUs and compare (exit 1 on any "
        "regression). Other arguments go to pytest on both sides (e.g. -k, -m, -n 2).",
        allow_abbrev=False,
    )
    parser.add_argument("--baseline", default=None, help="QEMU binary, or 'default'")
    parser.add_argument("--candidate", default=None, help="QEMU binary, or 'default'")
    for name in SIDES:
        parser.add_argument(
            f"--{name}-junit",
            nargs="+",
            type=Path,
            metavar="XML",
            help=f"no run: the {name}'s JUnit files, one per shard, merged",
        )
    parser.add_argument(
        "--output", default=None, help="output directory (default artefacts/gate-<timestamp>)"
    )
    parser.add_argument(
        "--parallel", action="store_true", help="run both sides at once (twice the load)"
    )
    parser.add_argument(
        "--stream", action="store_true", help="show each side's pytest output as it runs"
    )
    options, pytest_args = parser.parse_known_args(argv)
    merging = [options.baseline_junit is not None, options.candidate_junit is not None]
    if any(merging):
        if not all(merging):
            parser.error("--baseline-junit and --candidate-junit go together")
        if options.baseline or options.candidate or options.parallel or options.stream:
            parser.error("--baseline-junit/--candidate-junit run nothing: no QEMU or run options")
        if pytest_args:
            parser.error(f"--baseline-junit/--candidate-junit run no pytest: {pytest_args[0]}")
    options.baseline = options.baseline or "default"
    options.candidate = options.candidate or "default"
    for arg in pytest_args:
        if arg.split("=", 1)[0] in PER_SIDE_OPTIONS:
            parser.error(
                f"{arg.split('=', 1)[0]} is set per side by the gate; use --baseline/"
                "--candidate/--output"
            )
    return options, pytest_args


def resolve_qemu(value: str) -> Path:
    """'default' -> the provisioned QEMU ($VIOMMU_QEMU); else a path from the caller's cwd."""
    if value == "default":
        default = os.environ.get(DEFAULT_QEMU_ENV)
        if not default:
            raise GateError("no default QEMU: run through ci/conformance (it provisions one)")
        value = default
    path = Path(value).expanduser().absolute()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise GateError(f"{value}: not an executable file")
    return path


def qemu_label(qemu: Path) -> str:
    """'QEMU 11.1.3 (Debian ...) — path', from -version (no QMP needed)."""
    try:
        proc = subprocess.run(
            [str(qemu), "-version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GateError(f"{qemu}: cannot run -version: {err}") from None
    match = re.search(r"QEMU emulator version (\S+(?: \([^)]*\))?)", proc.stdout)
    if proc.returncode != 0 or not match:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise GateError(f"{qemu} -version failed: {tail}")
    return f"QEMU {match.group(1)} — {qemu}"


# pytest options whose value is a separate argument: the value is never a test path.
VALUE_OPTIONS = {"-k", "-m", "-n", "-p", "-o", "-c", "-W", "--rootdir", "--maxfail", "--dist"}
VALUE_OPTIONS |= {"--durations", "--tb", "--accel", "--fuzz-examples", "--deselect", "--ignore"}
# pytest-split's
VALUE_OPTIONS |= {"--splits", "--group", "--splitting-algorithm", "--durations-path"}


def with_suite_paths(pytest_args: list[str]) -> list[str]:
    """The pytest arguments with test paths made absolute (pytest runs from the suite's top),
    and the default suite "conformance" when none is given (as ci/conformance does)."""
    out: list[str] = []
    explicit = after_option = False
    for arg in pytest_args:
        path = Path(arg.split("::")[0])
        if not after_option and not arg.startswith("-") and path.exists():
            explicit = True
            arg = str(path.absolute()) + arg[len(str(path)) :]
        out.append(arg)
        after_option = arg in VALUE_OPTIONS
    return out if explicit else ["conformance", *out]


def run_selection(
    qemu: Path, args: list[str], *, junit: Path, log: Path, artefacts: Path
) -> dict[str, CaseResult]:
    """One pytest run (`args`: test paths and options) against `qemu`, output to `log`; its
    JUnit results. GateError when pytest gave no verdict (exit other than 0, 1 or 5)."""
    junit.unlink(missing_ok=True)  # a reused output directory must not lend an old verdict
    cmd = [
        sys.executable, "-m", "pytest", *args, "-q", f"--qemu={qemu}", f"--junitxml={junit}",
        f"--artefacts={artefacts}", "-o", "junit_family=xunit1",
    ]  # fmt: skip
    with log.open("wb") as sink:
        code = subprocess.run(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            env=dict(os.environ, **{DEFAULT_QEMU_ENV: str(qemu)}), check=False,
        ).returncode  # fmt: skip
    if code not in (*PYTEST_OK, PYTEST_NO_TESTS) or not junit.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise GateError(f"pytest exited {code} without a verdict: {tail[0]}")
    return read_junit(junit.read_text())


def side_command(side: Side, pytest_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        *with_suite_paths(pytest_args),
        f"--qemu={side.qemu}",
        f"--junitxml={side.junit}",
        f"--artefacts={side.artefacts}",
        # xunit1 records each case's file, so a JUnit test id is exactly the pytest node id.
        "-o",
        "junit_family=xunit1",
        "-o",
        f"junit_suite_name={side.name}",
    ]


def start_side(side: Side, pytest_args: list[str], stream: bool) -> subprocess.Popen[bytes]:
    side.artefacts.mkdir(parents=True, exist_ok=True, mode=0o700)
    side.junit.unlink(missing_ok=True)  # a reused --output must not lend an old verdict
    env = dict(os.environ, **{DEFAULT_QEMU_ENV: str(side.qemu)})
    with side.log.open("wb") as log:
        log.write(("$ " + " ".join(side_command(side, pytest_args)) + "\n").encode())
    log = side.log.open("ab")
    try:
        return subprocess.Popen(
            side_command(side, pytest_args),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stream else log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


def finish_side(side: Side, proc: subprocess.Popen[bytes], stream: bool) -> int:
    """Wait for one side (copying its output to the terminal and the log when streaming)."""
    if stream and proc.stdout is not None:
        with side.log.open("ab") as log:
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(f"{side.name}| {line.decode(errors='replace')}")
                sys.stdout.flush()
    return proc.wait()


def run_sides(sides: list[Side], pytest_args: list[str], parallel: bool, stream: bool) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if parallel:
            logs = ", ".join(str(side.log) for side in sides)
            print(f"gate: both sides running at once ({logs})", flush=True)
            procs = [start_side(s, pytest_args, stream=False) for s in sides]
            for side, proc in zip(sides, procs, strict=True):
                check_side(side, proc.wait())
        else:
            for side in sides:
                print(f"gate: {side.name}: running ({side.log})", flush=True)
                procs = [start_side(side, pytest_args, stream)]
                check_side(side, finish_side(side, procs[0], stream))
    except BaseException as err:
        # Ctrl-C reaches the pytest children too (same process group); SIGTERM (a cancelled CI
        # job) is passed on. Then wait, so that their own teardown (QEMU killed and reaped)
        # completes before the gate exits.
        for proc in procs:
            if not isinstance(err, KeyboardInterrupt) and proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def check_side(side: Side, code: int) -> None:
    """Raise GateError unless the side's pytest run gave a verdict (then the next side runs)."""
    if code == PYTEST_NO_TESTS:
        raise GateError(f"{side.name}: the selection matched no cases (see {side.log})")
    if code not in PYTEST_OK or not side.junit.is_file():
        tail = side.log.read_text(errors="replace").strip().splitlines()[-3:]
        raise GateError(
            f"{side.name}: pytest exited {code} without a verdict: {' / '.join(tail)} "
            f"(log: {side.log})"
        )


def artefact_dirs(comparison: Comparison, roots: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Test id -> artefact directories kept for its failure, one per failing side; `roots`:
    side name -> the artefact directories its run(s) wrote into."""
    found: dict[str, list[Path]] = {}
    for row in comparison.rows:
        paths: list[Path] = []
        for side, side_roots in roots.items():
            if getattr(row, side).outcome.failing:
                # The harness names a test's directory after its node id
                # (fixtures/plugins/harness.py).
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", row.test_id)[-120:]
                for root in side_roots:
                    paths += sorted(root.glob(f"run-*/{name}"))
        if paths:
            found[row.test_id] = paths
    return found


def read_side(side: str, paths: list[Path]) -> dict[str, CaseResult]:
    """One side's results over its shards' JUnit files; GateError (one line) for a missing,
    unreadable or overlapping file."""
    reports = []
    for path in paths:
        try:
            text = path.read_text()
            root = ET.fromstring(text)
        except (OSError, UnicodeDecodeError, ET.ParseError) as err:
            raise GateError(f"{side}: {path}: not a readable JUnit XML file ({err})") from None
        if root.tag not in ("testsuites", "testsuite"):
            raise GateError(f"{side}: {path}: not a JUnit report (root element <{root.tag}>)")
        reports.append((str(path), text))
    try:
        return merge_shards(reports)
    except ShardOverlap as err:
        raise GateError(f"{side}: the shards overlap: {err}") from None


@dataclass
class Sides:
    """What the verdict needs of both sides, by side name."""

    results: dict[str, dict[str, CaseResult]]
    labels: dict[str, str]
    artefact_roots: dict[str, list[Path]]
    junits: list[Path]


def merged_sides(options: argparse.Namespace) -> Sides:
    """--baseline-junit/--candidate-junit: each side's shards merged. A shard's artefacts are
    where the gate put them: beside its JUnit, in a directory named after the side."""
    results: dict[str, dict[str, CaseResult]] = {}
    labels: dict[str, str] = {}
    roots: dict[str, list[Path]] = {}
    for side in SIDES:
        paths: list[Path] = getattr(options, f"{side}_junit")
        results[side] = read_side(side, paths)
        labels[side] = f"{len(paths)} JUnit file{'s' if len(paths) != 1 else ''} merged: " + (
            ", ".join(str(p) for p in paths)
        )
        roots[side] = [p.parent / side for p in paths]
    junits = [*options.baseline_junit, *options.candidate_junit]
    return Sides(results, labels, roots, junits)


def ran_sides(options: argparse.Namespace, pytest_args: list[str], out: Path) -> Sides:
    """Both sides run here, one pytest run each."""
    sides = []
    for name in SIDES:
        qemu = resolve_qemu(getattr(options, name))
        sides.append(Side(name, qemu, qemu_label(qemu), out))
    run_sides(sides, pytest_args, options.parallel, options.stream)
    return Sides(
        results={side.name: read_side(side.name, [side.junit]) for side in sides},
        labels={side.name: side.label for side in sides},
        artefact_roots={side.name: [side.artefacts] for side in sides},
        junits=[side.junit for side in sides],
    )


def main(argv: list[str]) -> int:
    options, pytest_args = parse_args(argv)
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(options.output or ROOT / "artefacts" / f"gate-{stamp}").absolute()
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        started = time.monotonic()
        if options.baseline_junit:
            sides = merged_sides(options)
        else:
            sides = ran_sides(options, pytest_args, out)
        elapsed = time.monotonic() - started
    except GateError as err:
        print(f"gate: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gate: interrupted (no verdict)", file=sys.stderr)
        return 130
    comparison = compare(sides.results["baseline"], sides.results["candidate"])
    labels = sides.labels
    kept = artefact_dirs(comparison, sides.artefact_roots)
    table = terminal_table(comparison, labels, {k: ", ".join(map(str, v)) for k, v in kept.items()})
    # The comment names them relative to the output directory: CI uploads that directory (and,
    # for merged shards, the shards' directories beside it).
    relative = {k: ", ".join(os.path.relpath(p, out) for p in v) for k, v in kept.items()}
    summary = markdown_summary(comparison, labels, relative)
    (out / "summary.md").write_text(summary)
    (out / "verdict.txt").write_text(table)
    print()
    print(table, end="")
    print(
        f"\ngate: {elapsed:.1f} s; summary: {out / 'summary.md'}; JUnit: "
        f"{', '.join(map(str, sides.junits))}"
    )
    return 1 if comparison.regressions else 0


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    os.umask(0o077)
    signal.signal(signal.SIGTERM, _terminated)
    raise SystemExit(main(sys.argv[1:]))
