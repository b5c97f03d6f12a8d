"""Provision the project's virtualenv in the cache, keyed by the dependency list.

Prints the venv's python. A venv is trusted only once its stamp exists (written after pip
succeeded), so an interrupted install is rebuilt rather than used half-made.
Usage (from the top): python3 -m ci.provision_venv
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info < (3, 11):  # noqa: UP036 -- runs on the host's python3, whatever it is
    print(f"provision: Python >= 3.11 needed, python3 is {sys.version.split()[0]}", file=sys.stderr)
    raise SystemExit(1)

import tomllib

from ci.private_apt import ProvisionError, cache_root, fail

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"]]


def venv_dir(reqs: list[str]) -> Path:
    key = hashlib.sha256("\n".join([sys.version, *reqs]).encode()).hexdigest()[:12]
    return cache_root() / f"venv-{key}"


def build(venv: Path, reqs: list[str]) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *reqs,
        ],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
            errors = [line for line in lines if "ERROR" in line] or lines
            raise ProvisionError(f"virtualenv: {errors[-1]}")
    (venv / "complete").write_text("\n".join(reqs) + "\n")


def main() -> None:
    reqs = requirements()
    venv = venv_dir(reqs)
    if not (venv / "complete").is_file():
        print("provision: building the Python environment ...", file=sys.stderr)
        try:
            build(venv, reqs)
        except ProvisionError as err:
            fail(str(err))
    print(venv / "bin/python")


if __name__ == "__main__":
    main()
