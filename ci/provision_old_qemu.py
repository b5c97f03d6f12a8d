"""Provision Debian bookworm's QEMU 7.2 (no vfio-user, no qtest) for gating against a QEMU
that lacks features; prints its launcher. Same as `ci/provision_qemu.py --release bookworm`.
Usage: python3 ci/provision_old_qemu.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provision_qemu import main

if __name__ == "__main__":
    os.umask(0o077)
    main(["--release", "bookworm"])
