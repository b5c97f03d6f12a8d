"""A private apt: Debian packages downloaded into a cache, never installed on the host.

Both the QEMU sysroot (trixie-backports) and the guest image (bookworm) are unpacked from
.debs fetched this way. The mirror is read from the host's own apt sources so that the suite
follows whatever mirror the machine is configured for. Standard library only: this runs before
the project's virtualenv exists.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CACHE_ENV = "VIOMMU_CACHE"


class ProvisionError(RuntimeError):
    """A provisioning step failed; the message is the one line the user sees."""


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/viommu-conformance")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def host_debian_mirror() -> tuple[str, str]:
    """(URI of the Debian archive, keyring path) taken from the host's apt sources."""
    texts: list[str] = []
    for name in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        if name.endswith((".list", ".sources")) and os.path.isfile(name):
            texts.append(Path(name).read_text(errors="replace"))
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    for text in texts:
        # deb822 stanzas: URIs: ... / Suites: ... / Signed-By: ...
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if (
                uris
                and suites
                and not uris.group(1).rstrip("/").endswith("-security")
                and any(s.strip() in _DEBIAN_SUITES for s in suites.group(1).split())
            ):
                signed = re.search(r"^Signed-By:\s*(\S+)", stanza, re.M)
                return uris.group(1).rstrip("/"), signed.group(1) if signed else keyring
        # one-line format: deb [opts] URI suite components
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if match.group(2) in _DEBIAN_SUITES and "security" not in match.group(1):
                return match.group(1).rstrip("/"), keyring
    raise ProvisionError("no Debian archive found in the host's apt sources (/etc/apt)")


_DEBIAN_SUITES = {
    f"{c}{s}" for c in ("bookworm", "trixie", "stable", "testing") for s in ("", "-updates")
}


class PrivateApt:
    """An apt configuration of its own under `home`, with an empty dpkg status.

    The empty status makes apt resolve the whole dependency closure (glibc included), which
    is what a self-contained sysroot needs.
    """

    def __init__(self, home: Path, suites: list[str], *, source_suites: Sequence[str] = ()) -> None:
        self.home = home
        uri, keyring = host_debian_mirror()
        for sub in ("etc/sources.list.d", "etc/apt.conf.d", "etc/preferences.d", "state/lists"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
        (home / "status").touch()
        (home / "etc/sources.list").write_text(
            "".join(f"deb [signed-by={keyring}] {uri} {suite} main\n" for suite in suites)
            + "".join(
                f"deb-src [signed-by={keyring}] {uri} {suite} main\n" for suite in source_suites
            )
        )
        self.options = [
            f"-oDir={home}",
            f"-oDir::State={home}/state",
            f"-oDir::State::status={home}/status",
            f"-oDir::Cache={home}/cache",
            f"-oDir::Etc={home}/etc",
            f"-oDir::Etc::sourcelist={home}/etc/sources.list",
            f"-oDir::Etc::sourceparts={home}/etc/sources.list.d",
            f"-oDir::Etc::parts={home}/etc/apt.conf.d",
            f"-oDir::Etc::preferencesparts={home}/etc/preferences.d",
            "-oAPT::Sandbox::User=root",
            "-oAcquire::Retries=3",
            "-oDebug::NoLocking=1",
            "-oAPT::Get::AllowUnauthenticated=false",
        ]

    def run(self, *args: str, cwd: Path | None = None) -> str:
        cmd = ["apt-get", "-q", "-y", *self.options, *args]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ProvisionError(f"apt-get {args[0]} failed: {last}")
        return proc.stdout

    def update(self) -> None:
        self.run("update")

    def download_closure(self, packages: list[str], *, target: str | None = None) -> list[Path]:
        """Download `packages` and every dependency; return the .deb files."""
        extra = ["-t", target] if target else []
        self.run(*extra, "install", "--download-only", "--no-install-recommends", *packages)
        debs = sorted((self.home / "cache/archives").glob("*.deb"))
        if not debs:
            raise ProvisionError(f"apt downloaded nothing for {' '.join(packages)}")
        return debs

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """Download exactly `packages` (no dependencies) into `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        self.run("download", *packages, cwd=dest)
        return sorted(dest.glob("*.deb"))

    def source_versions(self, package: str) -> list[str]:
        """The source versions of `package` the deb-src suites offer, as apt lists them."""
        cmd = ["apt-cache", *self.options, "showsrc", package]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return re.findall(r"^Version: (\S+)", proc.stdout, re.M)

    def source(self, package: str, version: str, dest: Path) -> Path:
        """Download and extract `package`=`version` with its patches applied (dpkg-source, as
        `apt-get source` does); returns the extracted tree."""
        if shutil.which("dpkg-source") is None:
            raise ProvisionError(
                "extracting a source package needs dpkg-source: apt-get install dpkg-dev"
            )
        dest.mkdir(parents=True, exist_ok=True)
        self.run("source", f"{package}={version}", cwd=dest)
        upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
        tree = dest / f"{package}-{upstream}"
        if not (tree / "debian").is_dir():
            raise ProvisionError(f"apt-get source {package}={version} left no tree at {tree}")
        return tree


def unpack(debs: list[Path], root: Path) -> None:
    for deb in debs:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise ProvisionError(f"dpkg-deb -x {deb.name} failed: {msg[-1] if msg else '?'}")


def fail(message: str) -> None:
    """Print one clear line and exit non-zero."""
    print(f"provision: {message}", file=sys.stderr)
    raise SystemExit(1)
