"""Run a throw-away pytest session on a generated test file, as a user would from a shell.

The lifecycle self-tests need a harness process they can fail, time out, interrupt or kill,
and then look at what it left behind; an in-process pytester run could not be killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_case(directory: Path, source: str) -> Path:
    path = directory / "test_inner.py"
    path.write_text(textwrap.dedent(source))
    return path


def start_pytest(case: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "fixtures.plugins.harness",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "--rootdir",
            str(case.parent),
            "--artefacts",
            str(case.parent / "artefacts"),
            "-q",
            str(case),
            *args,
        ],
        cwd=case.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_pytest(case: Path, *args: str, timeout: float = 60.0) -> tuple[int, str]:
    proc = start_pytest(case, *args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"inner pytest hung:\n{out}") from None
    return proc.returncode, out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
