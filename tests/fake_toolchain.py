"""Fake build tools on PATH for the self-tests that drive ci/build-qemu on fake QEMU trees:
every program ci/build-qemu checks for exits 0 (so pkg-config finds every library), and ninja
is the test's own script."""

from __future__ import annotations

import os
from pathlib import Path

from ci.build_qemu import BUILD_TOOLS


def fake_toolchain(tmp_path: Path, ninja: str) -> dict[str, str]:
    """The environment to run ci/build-qemu with: PATH starts with the fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {program: "#!/bin/sh\nexit 0\n" for program, _package in BUILD_TOOLS}
    scripts["ninja"] = ninja
    for program, text in scripts.items():
        (bin_dir / program).write_text(text)
        (bin_dir / program).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
