"""Debian bookworm packages for the guest build: a private apt, download and unpack.

Packages come from a private, freshly updated bookworm apt on the host's own Debian mirror
(ci/private_apt.py) through `apt-get download` and are unpacked with `dpkg-deb -x`: nothing is
installed on the host. Standard library only: the guest build runs before the venv exists.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from ci.private_apt import PrivateApt, ProvisionError
from ci.private_apt import unpack as unpack_debs

__all__ = ["BuildError", "bookworm_apt", "download", "run", "unpack", "unpack_merged"]


class BuildError(Exception):
    """A build step failed; the message is the one line the user sees."""


def run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> str:
    try:
        p = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{argv[0]}: {e}") from e
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        words = [a for a in argv if not a.startswith("-") and "::" not in a and "=" not in a]
        raise BuildError(f"{' '.join(words[:2])} failed ({p.returncode}): {last}")
    return p.stdout


def bookworm_apt(root: Path) -> list[str]:
    """apt options of a private apt for bookworm on the host's own Debian mirror, freshly
    updated: the host's own package lists may be months old, and the mirror keeps only current
    kernels."""
    try:
        apt = PrivateApt(root / "apt-bookworm", ["bookworm", "bookworm-updates"])
        apt.update()
    except ProvisionError as e:
        raise BuildError(f"private bookworm apt: {e}") from e
    return apt.options


def download(packages: Iterable[str], debs: Path, apt_opts: list[str]) -> dict[str, Path]:
    """apt-get download into a shared .deb cache; returns package name -> .deb path."""
    names = list(packages)
    uris = run(["apt-get", *apt_opts, "download", "--print-uris", *names])
    wanted: dict[str, Path] = {}
    for line in uris.splitlines():
        # 'URI' FILENAME SIZE HASH
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("'"):
            fname = parts[1]
            wanted[fname.split("_", 1)[0]] = debs / fname
    missing = [n for n in names if n not in wanted]
    if missing:
        raise BuildError(f"apt has no candidate for: {' '.join(missing)}")
    todo = [n for n, p in wanted.items() if not p.is_file()]
    if todo:
        run(["apt-get", *apt_opts, "download", *todo], cwd=debs, timeout=1800)
    for n, p in wanted.items():
        if not p.is_file():
            raise BuildError(f"apt-get download did not produce {p.name} for {n}")
    return wanted


def unpack_merged(debs: Iterable[Path], root: Path) -> None:
    """The packages unpacked over each other into one tree at `root`."""
    try:
        unpack_debs(list(debs), root)
    except ProvisionError as e:
        raise BuildError(str(e)) from e


def unpack(debs: dict[str, Path], into: Path) -> dict[str, Path]:
    """Each package unpacked into its own directory under `into`; name -> that directory."""
    roots = {}
    for name, deb in debs.items():
        root = into / name
        root.mkdir(parents=True)
        unpack_merged([deb], root)
        roots[name] = root
    return roots
