"""Provisioning fails with one clear line and leaves nothing a later run would trust."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def provision_qemu(
    cache: Path, path_prefix: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VIOMMU_CACHE=str(cache))
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(
        [sys.executable, "-m", "ci.provision_qemu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def failing_apt(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(
        "#!/bin/sh\necho 'E: Failed to fetch: Temporary failure resolving' >&2\nexit 100\n"
    )
    apt.chmod(0o755)
    return bin_dir


def test_failed_download_is_one_line_and_leaves_no_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = provision_qemu(cache, failing_apt(tmp_path))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.endswith("...")]
    assert errors == ["provision: apt-get update failed: E: Failed to fetch: Temporary failure "
                      "resolving"], result.stderr  # fmt: skip
    assert not (cache / "qemu").exists(), "a failed build left a sysroot behind"
    assert not list(cache.glob("qemu-build-*")), "a failed build left its work directory"


def test_sysroot_without_stamp_is_not_trusted(tmp_path: Path) -> None:
    """A half-built sysroot (no stamp) is rebuilt, not run: here the rebuild fails loudly."""
    cache = tmp_path / "cache"
    launcher = cache / "qemu/bin/qemu-system-x86_64"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\necho half-built\n")
    launcher.chmod(0o755)
    result = provision_qemu(cache, failing_apt(tmp_path))
    assert result.returncode == 1
    assert "apt-get update failed" in result.stderr
    assert str(launcher) not in result.stdout
