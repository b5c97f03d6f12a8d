"""The suite once per QEMU, one table: version x tier, with skip reasons grouped.

Usage: ci/matrix [--output DIR] [--tiers qtest,guest] QEMU... [-- pytest args]
Each QEMU is a path or `default` (the provisioned one). Every (QEMU, tier) is one pytest run
of conformance/ with `-m TIER` and its own JUnit XML, log and artefacts under the output
directory; `matrix.md` there holds the table (Markdown, as printed). Exit 0 when every run gave
a verdict (failures are in the table, not in the exit code), 2 when one could not run.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ci.gate import GateError, qemu_label, resolve_qemu, run_selection
from ci.gate_verdict import CaseResult, Outcome

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (Outcome.PASSED, Outcome.FAILED, Outcome.ERROR, Outcome.XFAILED, Outcome.SKIPPED)


@dataclass
class Cell:
    qemu: str  # version label
    tier: str
    counts: Counter[Outcome] = field(default_factory=Counter)
    skips: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def version_of(label: str) -> str:
    """'QEMU 10.2.2 (Debian ...) — /path' -> '10.2.2'."""
    match = re.match(r"QEMU (\S+)", label)
    return match.group(1) if match else label


def summarise(qemu: str, tier: str, results: dict[str, CaseResult], seconds: float) -> Cell:
    cell = Cell(qemu, tier, seconds=seconds)
    for result in results.values():
        cell.counts[result.outcome] += 1
        if result.outcome is Outcome.SKIPPED:
            cell.skips[result.message.strip() or "(no reason given)"] += 1
    return cell


def markdown(cells: list[Cell], command: str) -> str:
    head = ["QEMU", "tier", *(c.value for c in COLUMNS), "time"]
    lines = [
        f"{datetime.date.today().isoformat()}, `{command}`:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for cell in cells:
        counts = [str(cell.counts[c]) for c in COLUMNS]
        lines.append(
            f"| {cell.qemu} | {cell.tier} | " + " | ".join(counts) + f" | {cell.seconds:.0f} s |"
        )
    reasons: dict[str, list[str]] = defaultdict(list)
    for cell in cells:
        for reason, n in sorted(cell.skips.items(), key=lambda kv: -kv[1]):
            reasons[f"{cell.qemu} {cell.tier}"].append(f"{n} × {reason}")
    if reasons:
        lines += ["", "Skip reasons:", ""]
        for where, texts in reasons.items():
            lines += [f"- {where}: " + "; ".join(texts)]
    return "\n".join(lines) + "\n"


def run_one(
    qemu: Path, tier: str, out: Path, pytest_args: list[str]
) -> tuple[dict[str, CaseResult], float]:
    start = time.monotonic()
    try:
        results = run_selection(
            qemu, ["conformance", "-m", tier, *pytest_args],
            junit=out / f"{tier}.xml", log=out / f"{tier}.log", artefacts=out / "artefacts",
        )  # fmt: skip
    except GateError as err:
        raise GateError(f"{qemu} -m {tier}: {err}") from None
    return results, time.monotonic() - start


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qemus", nargs="+", metavar="QEMU")
    parser.add_argument("--output", type=Path, help="default: artefacts/matrix-<time>")
    parser.add_argument("--tiers", default="qtest,guest")
    options = parser.parse_args(argv)
    out = options.output or ROOT / "artefacts" / f"matrix-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.absolute()
    cells: list[Cell] = []
    try:
        for n, value in enumerate(options.qemus):
            qemu = resolve_qemu(value)
            label = version_of(qemu_label(qemu))
            for tier in options.tiers.split(","):
                where = out / f"{n}-{label}"
                where.mkdir(parents=True, exist_ok=True, mode=0o700)
                print(f"matrix: QEMU {label} -m {tier} ...", file=sys.stderr, flush=True)
                results, seconds = run_one(qemu, tier, where, extra)
                cells.append(summarise(label, tier, results, seconds))
    except GateError as err:
        print(f"matrix: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("matrix: interrupted", file=sys.stderr)
        return 130
    table = markdown(cells, "ci/matrix " + " ".join(options.qemus))
    (out / "matrix.md").write_text(table)
    print(table, end="")
    print(f"matrix: logs, JUnit and artefacts in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
