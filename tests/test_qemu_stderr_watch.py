"""The launcher's QEMU stderr watch: which lines count as QEMU errors, and what a declaration
(`qemu_stderr(...)`) lets through. (The real thing bites in conformance/test_notifier_flags.py,
whose refused-notifier cases declare vfio's "hardware error" line.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fixtures.plugins.harness import Launcher


class _Machine:
    def __init__(self, run_dir: Path, stderr: str) -> None:
        self.run_dir = run_dir
        self.stderr_path = run_dir / "qemu.stderr"
        self.stderr_path.write_text(stderr)


def launcher_with(tmp_path: Path, stderr: str) -> Launcher:
    launcher = Launcher("qemu", caps=Any, accel="tcg", run_dir=tmp_path)  # type: ignore[arg-type]  # caps unused here
    launcher.machines = [_Machine(tmp_path, stderr)]  # type: ignore[list-item]  # only run_dir/stderr_path are read
    return launcher


STDERR = """\
qemu-system-x86_64: failed to read header: EOF
qemu-system-x86_64: vfio_container_dma_map(0x5, 0x100000000, 0x1000, 0x7f) = -17 (File exists)
qemu-system-x86_64: vtd_iommu_translate: detected translation failure (dev=00:03:00, iova=0x0)
qemu: hardware error: vfio: DMA mapping failed, unable to continue
"""


def test_error_lines_are_reported_and_noise_is_not(tmp_path: Path) -> None:
    stray = launcher_with(tmp_path, STDERR).undeclared_errors([])
    assert [line.split(": ", 1)[1] for line in stray] == [
        "qemu-system-x86_64: vfio_container_dma_map(0x5, 0x100000000, 0x1000, 0x7f) = -17 "
        "(File exists)",
        "qemu: hardware error: vfio: DMA mapping failed, unable to continue",
    ]


def test_declared_lines_pass(tmp_path: Path) -> None:
    launcher = launcher_with(tmp_path, STDERR)
    assert launcher.undeclared_errors([r"File exists", r"hardware error"]) == []
    assert len(launcher.undeclared_errors([r"hardware error"])) == 1
