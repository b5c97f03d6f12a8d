"""The gate's verdict: two JUnit XML reports (baseline, candidate) compared case by case;
each side may also be several reports of one selection split into shards (merge_shards).

Pure: reads XML text, returns data and text. A case is *failing* when pytest reported it failed,
errored (set-up/teardown) or XPASS(strict) (an expected failure that passed: the xfail's evidence
no longer holds, so the case must be revisited). A *regression* is a case failing on the
candidate that was not failing on the baseline, whatever it was there (passed, xfailed, skipped,
absent): the candidate is what gets merged. Skips never gate; they are listed per side with
their reasons, so a QEMU lacking a feature shows up as skips, not failures.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    XPASS_STRICT = "XPASS(strict)"
    SKIPPED = "skipped"
    XFAILED = "xfailed"
    ABSENT = "absent"

    @property
    def failing(self) -> bool:
        return self in (Outcome.FAILED, Outcome.ERROR, Outcome.XPASS_STRICT)

    @property
    def good(self) -> bool:
        return self in (Outcome.PASSED, Outcome.XFAILED)


# Worst first: a case reported twice (call failed, teardown errored) keeps the worse outcome.
_SEVERITY = [
    Outcome.ERROR,
    Outcome.FAILED,
    Outcome.XPASS_STRICT,
    Outcome.SKIPPED,
    Outcome.XFAILED,
    Outcome.PASSED,
]


@dataclass(frozen=True)
class CaseResult:
    outcome: Outcome
    message: str = ""  # failure message or skip/xfail reason
    seconds: float = 0.0


def case_id(testcase: ET.Element) -> str:
    """The pytest node id of a <testcase> (exact with junit_family=xunit1, which has `file`)."""
    classname = testcase.get("classname", "")
    name = testcase.get("name", "")
    path = testcase.get("file")
    if path and path.endswith(".py"):
        module = path[: -len(".py")].replace("/", ".")
        rest = classname[len(module) :].lstrip(".") if classname.startswith(module) else ""
        return "::".join([path, *(rest.split(".") if rest else []), name])
    return f"{classname}::{name}" if classname else name


def _result(testcase: ET.Element) -> CaseResult:
    seconds = float(testcase.get("time", "0") or 0)
    found: list[CaseResult] = []
    for child in testcase:
        message = (child.get("message") or (child.text or "").strip()).strip()
        if child.tag == "error":
            found.append(CaseResult(Outcome.ERROR, message, seconds))
        elif child.tag == "failure":
            # pytest writes a strict XPASS as a failure whose message starts "[XPASS(strict)]".
            if message.startswith("[XPASS(strict)]"):
                reason = message.removeprefix("[XPASS(strict)]").strip()
                found.append(CaseResult(Outcome.XPASS_STRICT, reason, seconds))
            else:
                found.append(CaseResult(Outcome.FAILED, message, seconds))
        elif child.tag == "skipped":
            kind = Outcome.XFAILED if child.get("type") == "pytest.xfail" else Outcome.SKIPPED
            found.append(CaseResult(kind, message, seconds))
    if not found:
        return CaseResult(Outcome.PASSED, "", seconds)
    return min(found, key=lambda r: _SEVERITY.index(r.outcome))


def read_junit(xml_text: str) -> dict[str, CaseResult]:
    """Test id -> result for every <testcase> in a JUnit XML report."""
    root = ET.fromstring(xml_text)
    results: dict[str, CaseResult] = {}
    for testcase in root.iter("testcase"):
        key = case_id(testcase)
        result = _result(testcase)
        previous = results.get(key)
        if previous is None or _SEVERITY.index(result.outcome) < _SEVERITY.index(previous.outcome):
            results[key] = result
    return results


class ShardOverlap(ValueError):
    """The same case is in two shards of one side: the split is wrong (a group run twice, say,
    while another group's cases went missing from both sides, where no comparison sees them)."""


def merge_shards(reports: Sequence[tuple[str, str]]) -> dict[str, CaseResult]:
    """Test id -> result over the JUnit reports (name, XML text) of one side whose selection
    was split into disjoint shards (pytest-split's --splits/--group): the union, as if one
    run. ShardOverlap if a case is in more than one of them."""
    merged: dict[str, CaseResult] = {}
    found_in: dict[str, str] = {}
    for name, text in reports:
        for test_id, result in read_junit(text).items():
            if test_id in found_in:
                raise ShardOverlap(f"{test_id} is in two shards ({found_in[test_id]}, {name})")
            found_in[test_id] = name
            merged[test_id] = result
    return merged


class Verdict(enum.Enum):
    """What a case's pair of outcomes means for the candidate, in report order."""

    REGRESSION = "regression"
    FIXED = "fixed"
    STILL_FAILING = "still failing"
    NEWLY_SKIPPED = "newly skipped"
    NEWLY_RUN = "newly run"
    NEW = "new case"
    REMOVED = "removed case"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


def classify(base: Outcome, cand: Outcome) -> Verdict:
    if cand.failing:
        return Verdict.STILL_FAILING if base.failing else Verdict.REGRESSION
    if base is Outcome.ABSENT:
        return Verdict.NEW
    if cand is Outcome.ABSENT:
        return Verdict.REMOVED
    if base.failing:
        return Verdict.FIXED if cand.good else Verdict.NEWLY_SKIPPED
    if base.good and cand is Outcome.SKIPPED:
        return Verdict.NEWLY_SKIPPED
    if base is Outcome.SKIPPED and cand.good:
        return Verdict.NEWLY_RUN
    return Verdict.UNCHANGED if base is cand else Verdict.CHANGED


@dataclass(frozen=True)
class CaseRow:
    test_id: str
    verdict: Verdict
    baseline: CaseResult
    candidate: CaseResult


@dataclass
class Comparison:
    rows: list[CaseRow]
    by_verdict: dict[Verdict, list[CaseRow]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        grouped: dict[Verdict, list[CaseRow]] = defaultdict(list)
        for row in self.rows:
            grouped[row.verdict].append(row)
        self.by_verdict = dict(grouped)

    def of(self, verdict: Verdict) -> list[CaseRow]:
        return self.by_verdict.get(verdict, [])

    @property
    def regressions(self) -> list[CaseRow]:
        return self.of(Verdict.REGRESSION)

    def counts(self, side: str) -> dict[Outcome, int]:
        totals: dict[Outcome, int] = defaultdict(int)
        for row in self.rows:
            outcome = getattr(row, side).outcome
            if outcome is not Outcome.ABSENT:
                totals[outcome] += 1
        return dict(totals)

    def skips(self, side: str) -> dict[str, list[str]]:
        """Skip reason -> test ids skipped for it, on one side."""
        reasons: dict[str, list[str]] = defaultdict(list)
        for row in self.rows:
            result: CaseResult = getattr(row, side)
            if result.outcome is Outcome.SKIPPED:
                reasons[result.message or "(no reason given)"].append(row.test_id)
        return dict(reasons)


_ABSENT = CaseResult(Outcome.ABSENT)


def compare(baseline: dict[str, CaseResult], candidate: dict[str, CaseResult]) -> Comparison:
    rows = []
    for test_id in sorted(baseline.keys() | candidate.keys()):
        base = baseline.get(test_id, _ABSENT)
        cand = candidate.get(test_id, _ABSENT)
        rows.append(CaseRow(test_id, classify(base.outcome, cand.outcome), base, cand))
    return Comparison(rows)


# ---- rendering ---------------------------------------------------------------------------
SIDES = ("baseline", "candidate")
# Listed case by case. Skip transitions are counted (their cases and reasons are in the
# skips-by-reason part: a QEMU lacking qtest turns every qtest case into one), UNCHANGED too.
LISTED = [
    Verdict.REGRESSION,
    Verdict.FIXED,
    Verdict.STILL_FAILING,
    Verdict.NEW,
    Verdict.REMOVED,
    Verdict.CHANGED,
]
COUNTED = [Verdict.NEWLY_SKIPPED, Verdict.NEWLY_RUN, Verdict.UNCHANGED]
COUNTED_MEANING = {
    Verdict.NEWLY_SKIPPED: "ran on baseline, skipped on candidate",
    Verdict.NEWLY_RUN: "skipped on baseline, ran on candidate",
    Verdict.UNCHANGED: "same outcome on both sides",
}
MESSAGE_WIDTH = 160


def _one_line(text: str, width: int = MESSAGE_WIDTH) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _status(result: CaseResult) -> str:
    return result.outcome.value


def _detail(row: CaseRow) -> str:
    """The message that explains the row: the failing side's, else the candidate's."""
    if row.candidate.outcome.failing or row.candidate.outcome is Outcome.SKIPPED:
        return row.candidate.message
    return row.baseline.message or row.candidate.message


def count_line(comparison: Comparison, side: str) -> str:
    counts = comparison.counts(side)
    order = [o for o in _SEVERITY[::-1] if counts.get(o)]
    return ", ".join(f"{counts[o]} {o.value}" for o in order) or "no cases"


def headline(comparison: Comparison) -> str:
    n = len(comparison.regressions)
    if n:
        return f"FAIL: {n} regression{'s' if n != 1 else ''}"
    changed = len(comparison.rows) - len(comparison.of(Verdict.UNCHANGED))
    return "PASS: no regressions" + ("" if changed else " (no change)")


def terminal_table(
    comparison: Comparison, labels: dict[str, str], artefacts: dict[str, str] | None = None
) -> str:
    """The verdict as plain text: one row per changed or failing case, skips by reason."""
    artefacts = artefacts or {}
    out = [headline(comparison), ""]
    for side in SIDES:
        out.append(f"{side:>9}: {labels.get(side, '')}")
        out.append(f"{'':>9}  {count_line(comparison, side)}")
    listed = [row for v in LISTED for row in comparison.of(v)]
    if listed:
        width = max(len(row.test_id) for row in listed)
        width = min(width, 90)
        out += ["", f"{'verdict':<14} {'case':<{width}} {'baseline':<14} {'candidate':<14}"]
        for row in listed:
            out.append(
                f"{row.verdict.value:<14} {row.test_id:<{width}} "
                f"{_status(row.baseline):<14} {_status(row.candidate):<14}"
            )
            if detail := _detail(row):
                out.append(f"{'':<15}{_one_line(detail)}")
            if row.test_id in artefacts:
                out.append(f"{'':<15}artefacts: {artefacts[row.test_id]}")
    out.append("")
    for verdict in COUNTED:
        n = len(comparison.of(verdict))
        out.append(f"{verdict.value}: {n} ({COUNTED_MEANING[verdict]})")
    for side in SIDES:
        for reason, ids in sorted(comparison.skips(side).items()):
            out.append(f"skipped on {side} ({len(ids)}): {_one_line(reason, 200)}")
            shown = ids[:3]
            more = f" … and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
            out.append(f"    {', '.join(shown)}{more}")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    """Safe inside a Markdown table cell."""
    return _one_line(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown_summary(
    comparison: Comparison, labels: dict[str, str], artefacts: dict[str, str] | None = None
) -> str:
    """A merge-request comment: headline, per-side counts, changed cases, skips per side."""
    artefacts = artefacts or {}
    out = [f"### vIOMMU conformance gate — {headline(comparison)}", ""]
    out += ["| | baseline | candidate |", "|---|---|---|"]
    for what, cell in (("QEMU", lambda side: _md(labels.get(side, ""))), ("results", None)):
        cells = [cell(side) if cell else count_line(comparison, side) for side in SIDES]
        out.append(f"| {what} | {' | '.join(cells)} |")
    for verdict in LISTED:
        rows = comparison.of(verdict)
        if not rows:
            continue
        out += ["", f"#### {verdict.value.capitalize()} ({len(rows)})", ""]
        out += ["| case | baseline | candidate | detail |", "|---|---|---|---|"]
        for row in rows:
            detail = _md(_detail(row))
            if row.test_id in artefacts:
                detail += f"<br>artefacts: `{artefacts[row.test_id]}`"
            out.append(
                f"| `{row.test_id}` | {_status(row.baseline)} | {_status(row.candidate)} "
                f"| {detail} |"
            )
    out.append("")
    for verdict in COUNTED:
        n = len(comparison.of(verdict))
        out.append(f"- {verdict.value.capitalize()}: {n} ({COUNTED_MEANING[verdict]})")
    for side in SIDES:
        skips = comparison.skips(side)
        if not skips:
            continue
        total = sum(len(ids) for ids in skips.values())
        out += ["", f"<details><summary>Skipped on {side}: {total}</summary>", ""]
        for reason, ids in sorted(skips.items()):
            out.append(f"- {_md(reason)} ({len(ids)})")
            out += [f"  - `{test_id}`" for test_id in ids]
        out += ["", "</details>"]
    return "\n".join(out) + "\n"
