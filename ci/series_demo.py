"""The series gate and the bisect on a real QEMU tree (builds QEMU: not part of ci/test).

Usage (from the top): python3 -m ci.series_demo [--version 10.2.2] [-- pytest args]

Makes a git repository from Debian's QEMU source package (ci/provision_qemu's fetch, through a
private apt), commits a three-patch series on top of it, and runs
  ci/conformance --qemu-src REPO --series BASE..HEAD   (expected: 2 regresses, 3 fixes)
  ci/conformance --qemu-src REPO --bisect BASE HEAD~1 -k CASE   (expected: patch 2)
printing each command's output and wall time. The patches:
  1. harmless: a comment in vtd_iommu_replay (hw/i386/intel_iommu.c), so the file rebuilds;
  2. breaks replay: MAP notifiers no longer get the existing mappings walked to them, which
     the replay cases pin (conformance/test_replay.py);
  3. reverts patch 2.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ci.private_apt import cache_root
from ci.provision_qemu import fetch_source

ROOT = Path(__file__).resolve().parent.parent
FILE = "hw/i386/intel_iommu.c"
ONLY_MAP = "\n            /* This is required only for MAP typed notifiers */"
REPLAY_GUARD = "        if (n->notifier_flags & IOMMU_NOTIFIER_MAP) {" + ONLY_MAP
BROKEN_GUARD = "        if (n->notifier_flags & IOMMU_NOTIFIER_DEVIOTLB_UNMAP) {" + ONLY_MAP
COMMENT_AT = "    /* replay is protected by BQL, page walk will re-setup it safely */"
CASE = "test_replay"
IDENTITY = ("-c", "user.name=viommu-series-demo", "-c", "user.email=demo@example.invalid")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *IDENTITY, *args], check=True, capture_output=True, text=True
    ).stdout


def edit(repo: Path, old: str, new: str, message: str) -> None:
    path = repo / FILE
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"series_demo: {FILE} has no {old.splitlines()[0].strip()!r}")
    path.write_text(text.replace(old, new, 1))
    git(repo, "commit", "-qam", message)


def make_repo(version: str) -> Path:
    repo = cache_root() / "series-demo" / f"qemu-{version}"
    if (repo / ".git").is_dir() and len(git(repo, "rev-list", "HEAD").split()) == 4:
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    repo.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(fetch_source(version), repo, symlinks=True)
    git(repo, "init", "-q", "-b", "master")
    # -f: QEMU's .gitignore ignores the bundled subprojects (keycodemapdb, ...), which an
    # offline build needs.
    git(repo, "add", "-A", "-f")
    git(repo, "commit", "-qm", f"QEMU {version} (Debian source package)")
    edit(repo, COMMENT_AT, COMMENT_AT + "\n    /* (the walk below only reports what is mapped) */",
         "intel_iommu: comment on the replay walk")  # fmt: skip
    edit(
        repo,
        REPLAY_GUARD,
        BROKEN_GUARD,
        "intel_iommu: walk on replay only for device-IOTLB notifiers",
    )
    git(repo, "revert", "--no-edit", "HEAD")
    return repo


def timed(cmd: list[str]) -> int:
    print("$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    print(f"(exit {code}, {time.monotonic() - start:.0f} s wall)\n", flush=True)
    return code


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="10.2.2")
    options = parser.parse_args(argv)
    start = time.monotonic()
    repo = make_repo(options.version)
    print(f"series_demo: repository {repo} ready in {time.monotonic() - start:.0f} s", flush=True)
    selection = extra or ["-m", "qtest", "-k", CASE]
    series = timed([str(ROOT / "ci" / "conformance"), "--qemu-src", str(repo),
                    "--series", "HEAD~3..HEAD", *selection])  # fmt: skip
    bisect = timed([str(ROOT / "ci" / "conformance"), "--qemu-src", str(repo), "--bisect",
                    "HEAD~3", "HEAD~1", *selection])  # fmt: skip
    # Expected: the series fails (patch 2 regresses), the bisect succeeds (names patch 2).
    return 0 if (series, bisect) == (1, 0) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
