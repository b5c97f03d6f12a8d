"""ci/faults --short: one trial of each qtest-tier fault (QEMU SIGKILL, vfio-user and vhost-user
host crashes mid-reply, SIGINT and SIGTERM to pytest, a full artefact filesystem) leaves nothing
behind and reports one clear line. The full campaign (guest faults too, 200 trials) is
`ci/faults`; this keeps its machinery and the harness's fault handling from rotting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci.faults import FAULTS, SHORT

ROOT = Path(__file__).resolve().parent.parent


def short_campaign(tmp_path: Path, qemu: str, names: list[str]) -> tuple[int, str, str]:
    """Run `ci/faults --short` over `names`; its exit status, output and table."""
    done = subprocess.run(
        [
            sys.executable, "-m", "ci.faults", "--short", "--seed", "7", "--faults",
            ",".join(names), "--output", str(tmp_path),
        ],
        cwd=ROOT,
        env=dict(os.environ, VIOMMU_QEMU=qemu, PYTHONPATH=str(ROOT)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr, (tmp_path / "faults.md").read_text()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ci/faults needs root (unshare, tmpfs)")


@needs_root
def test_short_campaign_is_clean_and_leaks_nothing(tmp_path: Path, qemu_binary: str) -> None:
    names = [n for n in SHORT if n != "full-fs"]
    code, out, table = short_campaign(tmp_path, qemu_binary, names)
    assert code == 0, out
    for name in names:
        assert f"| {name} | 1 | 1 | 1 (100 %) | 0 |" in table, table
    assert "Unclear reports and leaks" not in table, table


@needs_root
@pytest.mark.xfail(
    strict=True,
    reason="fixtures/plugins/harness.py writes failure.txt unguarded: on a full disk the "
    "OSError becomes a pytest INTERNALERROR (fix proposed to the harness's owner)",
)
def test_full_artefact_filesystem_is_one_line_and_leaks_nothing(
    tmp_path: Path, qemu_binary: str
) -> None:
    code, out, table = short_campaign(tmp_path, qemu_binary, ["full-fs"])
    assert "| full-fs | 1 | 1 | 1 (100 %) | 0 |" in table, table
    assert code == 0, out


def test_bad_fault_name_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ci.faults", "--faults", "nonsense", "--qemu", sys.executable],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"ci/faults: error: unknown fault 'nonsense' (known: {', '.join(FAULTS)})"
    )
