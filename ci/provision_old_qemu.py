"""Provision Debian bookworm's QEMU 7.2 (no vfio-user, no qtest) for gating against a QEMU
that lacks features; prints its launcher. Same as `python3 -m ci.provision_qemu --release bookworm`.
Usage (from the top): python3 -m ci.provision_old_qemu
"""

from __future__ import annotations

import os

from ci.provision_qemu import main

if __name__ == "__main__":
    os.umask(0o077)
    main(["--release", "bookworm"])
