"""ci/matrix: the per-QEMU x tier table from JUnit results, and one real (narrow) run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci.gate_verdict import CaseResult, Outcome
from ci.matrix import markdown, summarise, version_of

ROOT = Path(__file__).resolve().parent.parent


def test_cells_count_outcomes_and_group_skip_reasons() -> None:
    results = {
        "a": CaseResult(Outcome.PASSED),
        "b": CaseResult(Outcome.PASSED),
        "c": CaseResult(Outcome.FAILED, "boom"),
        "d": CaseResult(Outcome.XFAILED, "known bug"),
        "e": CaseResult(Outcome.SKIPPED, "QEMU 10.0: no device 'vfio-user-pci'"),
        "f": CaseResult(Outcome.SKIPPED, "QEMU 10.0: no device 'vfio-user-pci'"),
        "g": CaseResult(Outcome.SKIPPED, "guest image not built"),
    }
    cell = summarise("10.0.13", "qtest", results, 12.3)
    table = markdown([cell], "ci/matrix q")
    rows = table.splitlines()
    assert rows[2] == "| QEMU | tier | passed | failed | error | xfailed | skipped | time |"
    assert rows[4] == "| 10.0.13 | qtest | 2 | 1 | 0 | 1 | 3 | 12 s |"
    assert (
        "- 10.0.13 qtest: 2 × QEMU 10.0: no device 'vfio-user-pci'; 1 × guest image not built"
        in rows
    )


def test_version_of_a_label() -> None:
    assert version_of("QEMU 10.2.2 (Debian 1:10.2.2+ds-1) — /x/qemu") == "10.2.2"


def test_one_real_run_gives_a_table(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    qemu = pytestconfig.getoption("qemu")
    if not qemu:
        pytest.skip("no QEMU under test (--qemu or VIOMMU_QEMU)")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "ci.matrix", str(qemu), "--tiers", "qtest"),
            *("--output", str(tmp_path), "--", "-k", "test_cap_caching_mode_follows_property"),
        ],
        cwd=ROOT,
        env=dict(os.environ, VIOMMU_QEMU=str(qemu)),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "| qtest |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[2]) >= 1, row  # passed
    assert cells[3:6] == ["0", "0", "0"], row  # none failed, errored or xfailed
    assert (tmp_path / "matrix.md").read_text() == proc.stdout
