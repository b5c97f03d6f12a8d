"""Build outputs kept under the suite's cache root, one directory per recipe.

    with build_lock(root / f"{name}.lock"): ...      # one builder per recipe at a time
    prune(root, "guest-", keep=final)                 # drop what nobody used for a week
    touch(final)                                      # mark a directory as in use

A directory is complete once its `stamp` exists (written last); its stamp's time is when it
was last used. Standard library only: the guest build runs before the venv exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["build_lock", "prune", "touch"]


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    # pytest-xdist workers may all ask for the image at once: one builds, the others wait.
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prune(root: Path, prefix: str, keep: Path, max_age_days: float = 7.0) -> None:
    """Remove the `prefix`* directories other than `keep` unused for a week (another checkout
    may still want a recent one)."""
    limit = time.time() - max_age_days * 86400
    for d in root.glob(f"{prefix}*"):
        if d == keep or not d.is_dir() or ".build-" in d.name:  # another build in progress
            continue
        stamp = d / "stamp"
        used = stamp.stat().st_mtime if stamp.exists() else d.stat().st_mtime
        if used < limit:
            shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (root / f"{d.name}.lock").unlink()


def touch(d: Path) -> None:
    """Mark a cached directory as in use (prune keeps what was used recently)."""
    with contextlib.suppress(OSError):
        os.utime(d / "stamp")
