"""Shards: a suite split over parallel jobs (pytest-split) has one JUnit file per shard and side;
the gate merges each side's files into the verdict one unsplit run would give.

The merge is checked on hand-made JUnit in the shapes tests/test_gate.py pins, then on real
inner pytest runs split by pytest-split (a generated module, no QEMU): the shards' union is the
unsplit run, case by case.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ci import gate
from ci.gate_verdict import Outcome, ShardOverlap, merge_shards, read_junit
from tests.test_gate import FAIL, XFAIL, case, junit, skip


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_disjoint_shards_merge_into_the_unsplit_report() -> None:
    cases = [case("test_a"), case("test_b", FAIL), case("test_c", XFAIL), case("test_d", skip("x"))]
    merged = merge_shards([("1.xml", junit(*cases[:2])), ("2.xml", junit(*cases[2:]))])
    assert merged == read_junit(junit(*cases))


def test_a_case_in_two_shards_is_an_overlap_naming_both() -> None:
    with pytest.raises(ShardOverlap, match=r"test_m.py::test_a is in two shards \(1.xml, 2.xml\)"):
        merge_shards([("1.xml", junit(case("test_a"))), ("2.xml", junit(case("test_a")))])


def test_an_empty_shard_adds_nothing() -> None:
    assert merge_shards([("1.xml", junit(case("test_a"))), ("2.xml", junit())]) == read_junit(
        junit(case("test_a"))
    )


# ---- the gate's command line -------------------------------------------------------------
def gate_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = gate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gate_merging_shards_matches_the_single_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [case("test_a"), case("test_b", XFAIL), case("test_c", skip("no vfio-user"))]
    single = write(tmp_path / "single.xml", junit(*cases))
    one = write(tmp_path / "1.xml", junit(*cases[:1]))
    two = write(tmp_path / "2.xml", junit(*cases[1:]))
    argv = ["--baseline-junit", str(single), "--candidate-junit", str(one), str(two)]
    code, out, _ = gate_main([*argv, "--output", str(tmp_path / "out")], capsys)
    assert code == 0, out
    assert "PASS: no regressions (no change)" in out
    assert "2 JUnit files merged" in out
    assert "PASS: no regressions (no change)" in (tmp_path / "out" / "summary.md").read_text()


def test_gate_finds_a_regression_in_any_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [write(tmp_path / f"b{i}.xml", junit(case(f"test_{i}"))) for i in (1, 2)]
    cand = [
        write(tmp_path / "c1.xml", junit(case("test_1"))),
        write(tmp_path / "c2.xml", junit(case("test_2", FAIL))),
    ]
    argv = ["--baseline-junit", *map(str, base), "--candidate-junit", *map(str, cand)]
    code, out, _ = gate_main([*argv, "--output", str(tmp_path / "out")], capsys)
    assert code == 1, out
    assert "FAIL: 1 regression" in out
    assert "conformance/test_m.py::test_2" in out


def test_a_shard_lost_on_one_side_shows_as_removed_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard job that died without JUnit is not silently a smaller suite: its cases show."""
    base = [write(tmp_path / f"b{i}.xml", junit(case(f"test_{i}"))) for i in (1, 2)]
    argv = ["--baseline-junit", *map(str, base), "--candidate-junit", str(base[0])]
    code, out, _ = gate_main([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "removed case" in out, out
    assert "test_m.py::test_2" in out, out
    assert code == 0  # removal is reported, not a regression (as for one unsplit run)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not a readable JUnit XML file"),
        ("<testsuites><testsuite", "not a readable JUnit XML file"),
        ("<html></html>", "not a JUnit report (root element <html>)"),
    ],
)
def test_a_bad_shard_file_is_one_line_and_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    good = write(tmp_path / "good.xml", junit(case("test_a")))
    bad = tmp_path / "bad.xml"
    if content is not None:
        bad.write_text(content)
    argv = ["--baseline-junit", str(good), "--candidate-junit", str(good), str(bad)]
    code, out, err = gate_main([*argv, "--output", str(tmp_path / "out")], capsys)
    assert code == 2, out + err
    assert err.count("\n") == 1, err
    assert message in err, err
    assert err.startswith("gate: candidate: "), err
    assert "Traceback" not in err


def test_overlapping_shards_are_no_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = write(tmp_path / "1.xml", junit(case("test_a")))
    argv = ["--baseline-junit", str(one), str(one), "--candidate-junit", str(one)]
    code, _, err = gate_main([*argv, "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "baseline: the shards overlap" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--baseline-junit", "a.xml"],
        ["--baseline-junit", "a.xml", "--candidate-junit", "b.xml", "--candidate", "/q"],
        ["--baseline-junit", "a.xml", "--candidate-junit", "b.xml", "-k", "vtd"],
    ],
)
def test_merge_mode_refuses_run_options(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gate.parse_args(argv)
    assert exit_info.value.code == 2
    assert "--baseline-junit" in capsys.readouterr().err


def test_split_options_values_are_not_test_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "2").mkdir()  # a directory named like the value must not become a test path
    args = ["--splits", "2", "--group", "2", "-m", "qtest"]
    assert gate.with_suite_paths(args) == ["conformance", *args]


# ---- real pytest-split runs ----------------------------------------------------------------
INNER = """
    import pytest

    @pytest.mark.parametrize("n", range(7))
    def test_pass(n): pass
    def test_fail(): assert 1 == 2
    @pytest.mark.xfail(strict=True, reason="bug")
    def test_xfail(): assert False
    def test_skip(): pytest.skip("no device")
"""


def run_inner(tmp_path: Path, report: Path, *args: str) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"),
            *(f"--junitxml={report}", "-o", "junit_family=xunit1", *args),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: the shard has test_fail


def test_pytest_split_shards_give_the_unsplit_verdict(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    # Uneven durations, so that the split is by duration and not by count.
    durations = {f"test_inner.py::test_pass[{n}]": 1.0 + n for n in range(7)}
    write(tmp_path / "durations.json", json.dumps(durations))
    run_inner(tmp_path, tmp_path / "single.xml")
    shards = []
    for group in (1, 2):
        shards.append(tmp_path / f"shard{group}.xml")
        run_inner(
            tmp_path,
            shards[-1],
            *("--splits", "2", "--group", str(group)),
            f"--durations-path={tmp_path / 'durations.json'}",
        )
    reports = [(str(p), p.read_text()) for p in shards]
    assert all(read_junit(text) for _, text in reports), "a shard ran no cases"
    merged = merge_shards(reports)
    single = read_junit((tmp_path / "single.xml").read_text())
    assert {k: r.outcome for k, r in merged.items()} == {k: r.outcome for k, r in single.items()}
    assert {r.outcome for r in single.values()} == {
        Outcome.PASSED,
        Outcome.FAILED,
        Outcome.XFAILED,
        Outcome.SKIPPED,
    }
