"""ci/series on a fake QEMU tree: a git repository whose "build" writes a small wrapper around
the QEMU under test, so each commit builds in milliseconds and runs real cases.

The series: base; patch 1 harmless; patch 2 breaks a behaviour the suite pins (the wrapper turns
intel-iommu's caching mode off, so CAP.CM no longer follows the property); patch 3 does not
build; patch 4 reverts patch 2. The gate must name patch 2 as the regression, patch 3 as not
building and patch 4 as the fix; the bisect must name patch 2 and leave no bisect state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_toolchain import fake_toolchain

ROOT = Path(__file__).resolve().parent.parent
CASE = "test_cap_caching_mode_follows_property"

CONFIGURE = """\
#!/bin/sh
# Fake configure: the build directory remembers the source tree; firmware is "there".
if [ "$1" = --help ]; then
  printf 'Optional features, enabled with --enable-FEATURE and\\n\\n  kvm  KVM\\n'; exit 0
fi
src=$(cd "$(dirname "$0")" && pwd)
echo "$src" > src
mkdir -p pc-bios
for f in bios-256k.bin kvmvapic.bin linuxboot_dma.bin; do : > pc-bios/$f; done
echo "# fake" > build.ninja
"""
BUILD = """\
#!/bin/sh
# Fake build: BUILD/qemu-system-x86_64 wraps the real QEMU; BREAK_CM turns caching mode off.
src=$(dirname "$0"); out="$1/qemu-system-x86_64"
if [ -e "$src/DOES_NOT_BUILD" ]; then
  echo "../hw/i386/intel_iommu.c:10:5: error: expected ';' before '}' token"; exit 1
fi
{
  echo '#!/bin/sh'
  if [ -e "$src/BREAK_CM" ]; then
    echo 'for a in "$@"; do shift'
    echo '  set -- "$@" "$(printf %s "$a" |'
    echo '    sed "s/\\"caching-mode\\": true/\\"caching-mode\\": false/")"'
    echo 'done'
  fi
  echo "exec \\"$REAL_QEMU\\" \\"\\$@\\""
} > "$out"
chmod +x "$out"
"""
NINJA = """\
#!/bin/sh
# ninja -C DIR -jN TARGET
exec sh "$(cat "$2/src")/build.sh" "$2"
"""


def git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
         *args],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


@pytest.fixture
def fake_series(tmp_path: Path, pytestconfig: pytest.Config) -> tuple[Path, dict[str, str]]:
    qemu = pytestconfig.getoption("qemu")
    if not qemu:
        pytest.skip("no QEMU under test (--qemu or VIOMMU_QEMU)")
    tree = tmp_path / "qemu"
    tree.mkdir()
    git(tree, "init", "-q", "-b", "master")
    for name, text in (("configure", CONFIGURE), ("build.sh", BUILD)):
        (tree / name).write_text(text)
        (tree / name).chmod(0o755)
    (tree / "README").write_text("fake QEMU\n")
    git(tree, "add", ".")
    git(tree, "commit", "-qm", "base")
    (tree / "README").write_text("fake QEMU, now documented\n")
    git(tree, "commit", "-qam", "docs: say more")
    (tree / "BREAK_CM").touch()
    git(tree, "add", "BREAK_CM")
    git(tree, "commit", "-qm", "intel_iommu: drop caching mode")
    (tree / "DOES_NOT_BUILD").touch()
    git(tree, "add", "DOES_NOT_BUILD")
    git(tree, "commit", "-qm", "intel_iommu: half-done refactor")
    git(tree, "rm", "-q", "BREAK_CM", "DOES_NOT_BUILD")
    git(tree, "commit", "-qm", "Revert: caching mode back")
    env = dict(
        fake_toolchain(tmp_path, NINJA),
        REAL_QEMU=str(qemu),
        VIOMMU_CACHE=str(tmp_path / "cache"),
    )
    return tree, env


def series(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ci.series", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_series_names_the_regression_the_broken_build_and_the_fix(
    fake_series: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    tree, env = fake_series
    out = tmp_path / "out"
    result = series(env, "--qemu-src", str(tree), "--series", "HEAD~4..HEAD",
                    "--output", str(out), "-k", CASE)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "FAIL: regressions in patch 2; does not build: patch 3"
    rows = {line.split()[0]: line for line in lines[3:8]}
    assert "intel_iommu: drop caching mode" in rows["2"]
    assert f"patch 2 regresses conformance/test_vtd_registers.py::{CASE}[True]: " in result.stdout
    assert "FAILED" in rows["3"]
    assert (
        "patch 3 does not build: ninja qemu-system-x86_64 failed: "
        "../hw/i386/intel_iommu.c:10:5: error: expected ';' before '}' token"
    ) in lines
    assert "Revert: caching mode back" in rows["4"]
    assert f"patch 4 fixes conformance/test_vtd_registers.py::{CASE}[True]" in lines
    assert not any(line.startswith("patch 4 regresses") for line in lines)
    summary = (out / "summary.md").read_text()
    assert f"{CASE}[True]" in summary.splitlines()[6]  # patch 2's row names the case
    assert summary.startswith(
        "### vIOMMU conformance, patch by patch — FAIL: regressions in patch 2"
    )
    assert len(list(out.glob("*.xml"))) == 4  # base, patches 1, 2, 4 (3 did not build)
    # The user's tree is untouched: same checkout, no bisect or worktree state in it.
    assert git(tree, "status", "--porcelain") == ""
    assert git(tree, "log", "-1", "--format=%s").strip() == "Revert: caching mode back"


def test_base_that_does_not_build_is_exit_2(
    fake_series: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    tree, env = fake_series
    result = series(env, "--qemu-src", str(tree), "--series", "HEAD~1..HEAD",
                    "--output", str(tmp_path / "out"), "-k", CASE)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "series: BASE" in result.stderr
    assert "does not build" in result.stderr


def test_bisect_names_the_first_bad_commit_and_resets(
    fake_series: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    tree, env = fake_series
    out = tmp_path / "out"
    bad = git(tree, "rev-parse", "HEAD~2").strip()  # patch 2
    result = series(env, "--qemu-src", str(tree), "--bisect", "HEAD~4", bad,
                    "--output", str(out), "-k", f"{CASE} and True")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first == f"first bad commit: {bad[:12]} intel_iommu: drop caching mode"
    assert f"{CASE}[True]: failed:" in result.stdout
    assert (out / "summary.md").read_text().startswith("### vIOMMU conformance bisect")
    worktrees = [p for p in (tmp_path / "cache" / "series").glob("*/worktree")]
    assert len(worktrees) == 1
    assert subprocess.run(["git", "-C", str(worktrees[0]), "bisect", "log"],
                          capture_output=True, check=False).returncode != 0  # fmt: skip


def test_not_a_tree_is_one_line(tmp_path: Path) -> None:
    result = series(dict(os.environ), "--qemu-src", str(tmp_path), "--series", "a..b")
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"series: {tmp_path}: no configure script (not a QEMU source tree)"
    )
