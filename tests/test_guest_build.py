"""The guest build's own machinery: the cpio writer and the ELF DT_NEEDED reader."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from guests.build import elf_needed, write_cpio


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + i * 8 : pos + 14 + i * 8], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        body_at = name_at + namesize + (-(110 + namesize) % 4)
        body = data[body_at : body_at + size]
        pos = body_at + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_cpio_holds_files_dirs_and_symlinks_with_modes(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_bytes(b"\x7fELF" + bytes(7))
    (tmp_path / "bin/busybox").chmod(0o755)
    (tmp_path / "bin/sh").symlink_to("busybox")
    (tmp_path / "init").write_text("#!/bin/sh\n")
    out = io.BytesIO()
    write_cpio(tmp_path, out)
    entries = _read_cpio(out.getvalue())
    assert set(entries) == {"bin", "bin/busybox", "bin/sh", "init"}
    assert entries["bin/busybox"] == (0o100755, b"\x7fELF" + bytes(7))
    assert entries["bin/sh"][1] == b"busybox"
    assert entries["bin/sh"][0] & 0o170000 == 0o120000
    assert entries["bin"][0] & 0o170000 == 0o040000


def test_elf_needed_lists_the_shared_libraries_of_a_dynamic_program() -> None:
    env = shutil.which("env")
    if env is None or not os.path.exists(env):
        pytest.skip("no env program to inspect")
    assert "libc.so.6" in elf_needed(Path(env).resolve())


def test_elf_needed_of_a_non_elf_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert elf_needed(tmp_path / "script") == []
