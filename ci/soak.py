"""Soak: the qtest tier N times and the guest tier ceil(N/5) times; per-case flake counts.

Usage: ci/soak N [--output DIR] [--qemu PATH] [--report-only] [-- pytest args]

Each run is one ordinary pytest session (ci.gate.run_selection: JUnit in, no verdict is an
error) with its JUnit file, log and failure artefacts kept under OUTPUT/<tier>-<i>/. A case is
a flake when it did not give the same outcome in every run of its tier (a case missing from a
run counts as the outcome "absent"; in a run that died in a pytest INTERNALERROR, listed below
the table, only the cases it reached count). The table lists every flake with how often it had each
outcome; exit 1 if there is one. Ctrl-C or SIGTERM stops after the run in progress is killed
and reports the runs that finished (the count is printed: the table says what it covers).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ci.gate import GateError, run_selection
from ci.gate_verdict import CaseResult, read_junit

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("qtest", "guest")
INTERNAL = "pytest::internal"


@dataclass
class TierRuns:
    tier: str
    wanted: int
    runs: list[dict[str, CaseResult]] = field(default_factory=list)
    died: list[bool] = field(default_factory=list)  # the run ended in a pytest INTERNALERROR
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # runs that gave no verdict

    def add(self, run_dir: Path, results: dict[str, CaseResult], seconds: float) -> None:
        # pytest records an INTERNALERROR as a pseudo-case: the session died there.
        died = results.pop(INTERNAL, None) is not None
        results.pop("", None)  # a <testcase> with no name: the item pytest was at when it died
        if died:
            self.errors.append(
                f"{run_dir.name}: pytest INTERNALERROR after {len(results)} cases "
                f"(its cause: {run_dir / 'pytest.log'})"
            )
        self.runs.append(results)
        self.died.append(died)
        self.seconds.append(seconds)

    def outcomes(self) -> dict[str, Counter[str]]:
        """Case -> how often it had each outcome. In a run that died (INTERNALERROR) the cases
        it never reached have no outcome; everywhere else a missing case is "absent"."""
        cases = sorted({case for run in self.runs for case in run})
        return {
            case: Counter(
                run[case].outcome.value if case in run else "absent"
                for run, died in zip(self.runs, self.died, strict=True)
                if case in run or not died
            )
            for case in cases
        }

    def flakes(self) -> dict[str, Counter[str]]:
        return {case: seen for case, seen in self.outcomes().items() if len(seen) > 1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ci/soak", description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="qtest-tier runs (guest tier: ceil(N/5))")
    parser.add_argument("--output", type=Path, default=None, help="default artefacts/soak-<time>")
    parser.add_argument(
        "--report-only", action="store_true", help="the table from OUTPUT's JUnit files, no runs"
    )
    parser.add_argument("--qemu", default=os.environ.get("VIOMMU_QEMU"), help="QEMU under test")
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to pytest as it is
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_args(argv)
    args.pytest_args = extra
    if args.n < 1:
        parser.error(f"N must be at least 1, not {args.n}")
    if args.report_only and args.output is None:
        parser.error("--report-only needs --output DIR (the soak's output directory)")
    if not args.report_only and (not args.qemu or not os.access(args.qemu, os.X_OK)):
        parser.error(f"--qemu {args.qemu}: not an executable QEMU (ci/soak provisions one)")
    return args


def report(tiers: list[TierRuns]) -> str:
    lines = ["| tier | runs | cases | flakes | wall s (mean) |", "|---|---|---|---|---|"]
    for t in tiers:
        timed = [x for x in t.seconds if x]  # --report-only has no times
        mean = f"{sum(timed) / len(timed):.0f}" if timed else "-"
        lines.append(
            f"| {t.tier} | {len(t.runs)} of {t.wanted} | {len(t.outcomes())} | "
            f"{len(t.flakes())} | {mean} |"
        )
    flaky = [(t.tier, case, seen) for t in tiers for case, seen in t.flakes().items()]
    lines += ["", "| tier | flaky case | outcomes over the runs |", "|---|---|---|"]
    for tier, case, seen in flaky:
        shown = ", ".join(f"{outcome} {count}" for outcome, count in sorted(seen.items()))
        lines.append(f"| {tier} | {case} | {shown} |")
    if not flaky:
        lines.append("| - | (none: every case gave the same outcome in every run) | |")
    for t in tiers:
        steady = [c for c, seen in t.outcomes().items() if set(seen) <= {"failed", "error"}]
        lines += [f"{t.tier}: failing in every run (not a flake): {case}" for case in steady]
        lines += [f"{t.tier}: run without a full verdict: {err}" for err in t.errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.output or ROOT / "artefacts" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM stops the soak as Ctrl-C does: the running pytest gets it too (same process
    # group), and the runs already done are reported.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tiers = [TierRuns("qtest", args.n), TierRuns("guest", math.ceil(args.n / 5))]
    if args.report_only:
        # The table again from the JUnit files an earlier (or still running) soak kept.
        for t in tiers:
            for run_dir in sorted(out.glob(f"{t.tier}-[0-9][0-9]")):
                if (run_dir / "junit.xml").is_file():
                    t.add(run_dir, read_junit((run_dir / "junit.xml").read_text()), 0.0)
        print(report(tiers), end="")
        return 1 if any(t.flakes() or t.errors for t in tiers) else 0
    started = time.monotonic()
    try:
        for index in range(max(t.wanted for t in tiers)):
            for t in tiers:
                if index >= t.wanted:
                    continue
                run_dir = out / f"{t.tier}-{index:02d}"
                run_dir.mkdir(exist_ok=True)
                t0 = time.monotonic()
                try:
                    results = run_selection(
                        Path(args.qemu),
                        ["conformance", "-m", t.tier, *args.pytest_args],
                        junit=run_dir / "junit.xml",
                        log=run_dir / "pytest.log",
                        artefacts=run_dir / "artefacts",
                    )
                except GateError as err:
                    t.errors.append(f"{run_dir.name}: {err}")
                    continue
                t.add(run_dir, results, time.monotonic() - t0)
                print(
                    f"{run_dir.name}: {len(results)} cases, {t.seconds[-1]:.0f} s, "
                    f"flakes so far {len(t.flakes())}",
                    flush=True,
                )
                (out / "soak.md").write_text(report(tiers))
    except KeyboardInterrupt:
        print("ci/soak: interrupted; the table covers the finished runs", file=sys.stderr)
    text = report(tiers)
    (out / "soak.md").write_text(text)
    print(text + f"wall time {time.monotonic() - started:.0f} s; runs and JUnit files in {out}")
    return 1 if any(t.flakes() or t.errors for t in tiers) else 0


if __name__ == "__main__":
    sys.exit(main())
