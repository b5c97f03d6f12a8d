"""The release gate: JUnit reading, the per-case verdict, the reports, and one real gate run.

The comparison is pure and checked on hand-made JUnit XML in the shapes pytest writes; a real
inner pytest run confirms those shapes; the last test runs ci/gate.py end to end on two real
QEMU runs of a narrow selection (the QEMU under test against itself: no change, exit 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ci import gate
from ci.gate_verdict import (
    CaseResult,
    Outcome,
    Verdict,
    case_id,
    classify,
    compare,
    markdown_summary,
    read_junit,
    terminal_table,
)

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"baseline": "QEMU A", "candidate": "QEMU B"}


def junit(*cases: str) -> str:
    """A pytest-style (xunit1) report of <testcase> snippets for conformance/test_m.py."""
    return f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'


def case(name: str, body: str = "", classname: str = "conformance.test_m") -> str:
    attrs = f'classname="{classname}" name="{name}" file="conformance/test_m.py" time="0.1"'
    return f"<testcase {attrs}>{body}</testcase>" if body else f"<testcase {attrs}/>"


FAIL = '<failure message="assert 1 == 2">trace</failure>'
ERROR = '<error message="failed on setup with &quot;boom&quot;">trace</error>'
XPASS = '<failure message="[XPASS(strict)] QEMU drops the unmap">[XPASS(strict)] x</failure>'
XFAIL = '<skipped type="pytest.xfail" message="QEMU drops the unmap"/>'


def skip(reason: str) -> str:
    return f'<skipped type="pytest.skip" message="{reason}">test_m.py:3: {reason}</skipped>'


# ---- reading JUnit -----------------------------------------------------------------------
def test_outcomes_are_read_from_each_element() -> None:
    results = read_junit(
        junit(
            case("test_pass"),
            case("test_fail", FAIL),
            case("test_error", ERROR),
            case("test_xpass", XPASS),
            case("test_xfail", XFAIL),
            case("test_skip", skip("no device 'vfio-user-pci'")),
        )
    )
    got = {k.split("::")[-1]: (r.outcome, r.message) for k, r in results.items()}
    assert got == {
        "test_pass": (Outcome.PASSED, ""),
        "test_fail": (Outcome.FAILED, "assert 1 == 2"),
        "test_error": (Outcome.ERROR, 'failed on setup with "boom"'),
        "test_xpass": (Outcome.XPASS_STRICT, "QEMU drops the unmap"),
        "test_xfail": (Outcome.XFAILED, "QEMU drops the unmap"),
        "test_skip": (Outcome.SKIPPED, "no device 'vfio-user-pci'"),
    }


def test_failure_then_teardown_error_keeps_the_error() -> None:
    # pytest writes a second <testcase> with the same id for an error at teardown.
    results = read_junit(junit(case("test_x", FAIL), case("test_x", ERROR)))
    assert [r.outcome for r in results.values()] == [Outcome.ERROR]
    results = read_junit(junit(case("test_x", ERROR), case("test_x", FAIL)))
    assert [r.outcome for r in results.values()] == [Outcome.ERROR]


def test_case_id_is_the_pytest_node_id() -> None:
    def node(xml: str) -> str:
        return case_id(ET.fromstring(xml))

    assert node(case("test_a[39-x y]")) == "conformance/test_m.py::test_a[39-x y]"
    assert (
        node(case("test_b", classname="conformance.test_m.TestGroup"))
        == "conformance/test_m.py::TestGroup::test_b"
    )
    # xunit2 has no file attribute: fall back to classname::name (still unique per side).
    assert node('<testcase classname="c.test_m" name="test_c"/>') == "c.test_m::test_c"


def test_shapes_match_what_pytest_writes(tmp_path: Path) -> None:
    """The hand-made XML above is what pytest itself writes, checked on a real inner run."""
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.fixture
            def broken_teardown():
                yield
                raise RuntimeError("teardown")

            def test_pass(): pass
            def test_fail(): assert 1 == 2
            def test_fail_and_teardown_error(broken_teardown): assert False
            def test_skip(): pytest.skip("no device 'vfio-user-pci'")
            @pytest.mark.xfail(strict=True, reason="bug")
            def test_xfail(): assert False
            @pytest.mark.xfail(strict=True, reason="bug")
            def test_xpass(): pass
            class TestGroup:
                @pytest.mark.parametrize("x", [1, "a b"])
                def test_param(self, x): pass
            """
        )
    )
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"),
            *(f"--junitxml={report}", "-o", "junit_family=xunit1"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout
    got = {k: r.outcome for k, r in read_junit(report.read_text()).items()}
    assert got == {
        "test_inner.py::test_pass": Outcome.PASSED,
        "test_inner.py::test_fail": Outcome.FAILED,
        "test_inner.py::test_fail_and_teardown_error": Outcome.ERROR,
        "test_inner.py::test_skip": Outcome.SKIPPED,
        "test_inner.py::test_xfail": Outcome.XFAILED,
        "test_inner.py::test_xpass": Outcome.XPASS_STRICT,
        "test_inner.py::TestGroup::test_param[1]": Outcome.PASSED,
        "test_inner.py::TestGroup::test_param[a b]": Outcome.PASSED,
    }


# ---- the verdict ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "cand", "verdict"),
    [
        (Outcome.PASSED, Outcome.FAILED, Verdict.REGRESSION),
        (Outcome.PASSED, Outcome.ERROR, Verdict.REGRESSION),
        (Outcome.XFAILED, Outcome.XPASS_STRICT, Verdict.REGRESSION),
        (Outcome.SKIPPED, Outcome.FAILED, Verdict.REGRESSION),  # the candidate runs it and it fails
        (Outcome.ABSENT, Outcome.FAILED, Verdict.REGRESSION),
        (Outcome.FAILED, Outcome.PASSED, Verdict.FIXED),
        (Outcome.ERROR, Outcome.XFAILED, Verdict.FIXED),
        (Outcome.FAILED, Outcome.ERROR, Verdict.STILL_FAILING),
        (Outcome.XPASS_STRICT, Outcome.FAILED, Verdict.STILL_FAILING),
        (Outcome.PASSED, Outcome.SKIPPED, Verdict.NEWLY_SKIPPED),
        (Outcome.FAILED, Outcome.SKIPPED, Verdict.NEWLY_SKIPPED),
        (Outcome.SKIPPED, Outcome.PASSED, Verdict.NEWLY_RUN),
        (Outcome.ABSENT, Outcome.PASSED, Verdict.NEW),
        (Outcome.PASSED, Outcome.ABSENT, Verdict.REMOVED),
        (Outcome.FAILED, Outcome.ABSENT, Verdict.REMOVED),
        (Outcome.PASSED, Outcome.XFAILED, Verdict.CHANGED),
        (Outcome.PASSED, Outcome.PASSED, Verdict.UNCHANGED),
        (Outcome.SKIPPED, Outcome.SKIPPED, Verdict.UNCHANGED),
        (Outcome.XFAILED, Outcome.XFAILED, Verdict.UNCHANGED),
    ],
)
def test_classify(base: Outcome, cand: Outcome, verdict: Verdict) -> None:
    assert classify(base, cand) is verdict


def test_identical_reports_are_no_change() -> None:
    report = junit(case("test_a"), case("test_b", XFAIL), case("test_c", skip("no kvm")))
    comparison = compare(read_junit(report), read_junit(report))
    assert not comparison.regressions
    table = terminal_table(comparison, LABELS)
    assert table.startswith("PASS: no regressions (no change)\n")
    assert "unchanged: 3 " in table


def test_regressions_fixes_and_xpass_are_reported_with_their_messages() -> None:
    baseline = read_junit(
        junit(case("test_ok"), case("test_was_broken", FAIL), case("test_known", XFAIL))
    )
    candidate = read_junit(
        junit(case("test_ok", FAIL), case("test_was_broken"), case("test_known", XPASS))
    )
    comparison = compare(baseline, candidate)
    assert [r.test_id.split("::")[1] for r in comparison.regressions] == ["test_known", "test_ok"]
    assert [r.test_id.split("::")[1] for r in comparison.of(Verdict.FIXED)] == ["test_was_broken"]
    artefacts = {"conformance/test_m.py::test_ok": "/tmp/run/x"}
    table = terminal_table(comparison, LABELS, artefacts)
    assert table.startswith("FAIL: 2 regressions\n")
    assert "assert 1 == 2" in table
    assert "QEMU drops the unmap" in table
    assert "artefacts: /tmp/run/x" in table
    summary = markdown_summary(comparison, LABELS, artefacts)
    assert "#### Regression (2)" in summary
    assert "| `conformance/test_m.py::test_ok` | passed | failed | assert 1 == 2" in summary
    assert "| xfailed | XPASS(strict) |" in summary


def test_skips_are_listed_per_side_with_their_reasons() -> None:
    old = "QEMU 7.2.22 at /old has no qtest accelerator"
    baseline = read_junit(junit(case("test_a", skip(old)), case("test_b", skip(old))))
    candidate = read_junit(junit(case("test_a"), case("test_b", skip("needs | a pipe"))))
    comparison = compare(baseline, candidate)
    assert not comparison.regressions
    assert comparison.skips("baseline") == {old: [f"conformance/test_m.py::test_{x}" for x in "ab"]}
    assert comparison.skips("candidate") == {"needs | a pipe": ["conformance/test_m.py::test_b"]}
    table = terminal_table(comparison, LABELS)
    assert f"skipped on baseline (2): {old}" in table
    assert "skipped on candidate (1): needs | a pipe" in table
    assert "newly run: 1 " in table
    summary = markdown_summary(comparison, LABELS)
    assert "<summary>Skipped on baseline: 2</summary>" in summary
    assert "- needs \\| a pipe (1)" in summary  # escaped: it must not split a table cell


def test_new_and_removed_cases() -> None:
    comparison = compare(
        read_junit(junit(case("test_gone"), case("test_kept"))),
        read_junit(junit(case("test_kept"), case("test_added"))),
    )
    assert [r.verdict for r in comparison.rows] == [Verdict.NEW, Verdict.REMOVED, Verdict.UNCHANGED]
    assert not comparison.regressions
    assert "#### New case (1)" in markdown_summary(comparison, LABELS)


def test_counts_per_side() -> None:
    comparison = compare(
        {"a": CaseResult(Outcome.PASSED), "b": CaseResult(Outcome.SKIPPED, "x")},
        {"a": CaseResult(Outcome.FAILED, "boom")},
    )
    assert comparison.counts("baseline") == {Outcome.PASSED: 1, Outcome.SKIPPED: 1}
    assert comparison.counts("candidate") == {Outcome.FAILED: 1}


# ---- the command line ------------------------------------------------------------------------
def test_pytest_args_go_to_both_sides_and_per_side_options_are_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    options, extra = gate.parse_args(["--baseline", "/a", "-k", "vtd", "-m", "qtest", "-n", "2"])
    assert (options.baseline, options.candidate) == ("/a", "default")
    assert extra == ["-k", "vtd", "-m", "qtest", "-n", "2"]
    assert gate.with_suite_paths(extra) == ["conformance", *extra]
    # "conformance" exists, but as the value of -k it is an expression, not a path.
    assert gate.with_suite_paths(["-k", "conformance"]) == ["conformance", "-k", "conformance"]
    # An explicit test path replaces the suite and is made absolute: pytest runs from the top.
    monkeypatch.chdir(ROOT / "tests")
    assert gate.with_suite_paths(["-q", "test_gate.py::test_classify"]) == [
        "-q",
        f"{ROOT}/tests/test_gate.py::test_classify",
    ]
    with pytest.raises(SystemExit):
        gate.parse_args(["--qemu=/x"])
    assert "set per side by the gate" in capsys.readouterr().err


def test_a_missing_qemu_is_a_usage_error_not_a_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gate.main(["--baseline", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "not an executable file" in capsys.readouterr().err


# ---- end to end ------------------------------------------------------------------------------
def test_gating_a_qemu_against_itself_reports_no_change(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    qemu = pytestconfig.getoption("qemu")
    if not qemu:
        pytest.skip("no QEMU under test (--qemu or VIOMMU_QEMU)")
    out = tmp_path / "gate"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "ci.gate", "--candidate", qemu, "--output", out),
            *("-k", "test_cap_caching_mode_follows_property"),
        ],
        env=dict(os.environ, VIOMMU_QEMU=str(qemu)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS: no regressions (no change)" in proc.stdout
    for side in ("baseline", "candidate"):
        results = read_junit((out / f"{side}.xml").read_text())
        assert len(results) == 2, f"{side}: {results}"
        assert {r.outcome for r in results.values()} == {Outcome.PASSED}, f"{side}: {results}"
    summary = (out / "summary.md").read_text()
    assert "PASS: no regressions (no change)" in summary
    assert "| results | 2 passed | 2 passed |" in summary
