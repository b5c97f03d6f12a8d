"""The guest kernel's build checks: the config it asked for, and the PVH entry QEMU boots."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from guests.kernel import CONFIG, dropped_options, has_pvh_note
from guests.packages import BuildError


def test_dropped_options_names_each_option_kconfig_did_not_give() -> None:
    wanted = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\nCONFIG_D=y\n'
    got = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=m\n"
    assert dropped_options(wanted, got) == [
        "CONFIG_B=n (got y)",
        'CONFIG_C="x" (got n)',
        "CONFIG_D=y (got m)",
    ]
    assert dropped_options(wanted, 'CONFIG_A=y\nCONFIG_C="x"\nCONFIG_D=y\n') == []


def test_the_kernel_config_has_only_option_lines_and_comments() -> None:
    # A malformed line would be neither forced nor checked: kconfig and the check skip it.
    for n, line in enumerate(CONFIG.read_text().splitlines(), 1):
        if line and not line.startswith("#"):
            assert re.fullmatch(r"CONFIG_\w+=\S+", line), f"kernel.config:{n}: {line!r}"
        elif "CONFIG_" in line and line.startswith("# CONFIG_"):
            assert re.fullmatch(r"# CONFIG_\w+ is not set", line), f"kernel.config:{n}: {line!r}"
    assert "CONFIG_PVH=y" in CONFIG.read_text().splitlines()


def _elf_with_note(name: bytes, ntype: int) -> bytes:
    namesz = len(name) + 1
    note = struct.pack("<III", namesz, 4, ntype) + name + b"\0" * (-len(name) % 4 or 4)
    note += b"\0" * 4  # descriptor (the entry address, 4 bytes)
    phoff, phentsize = 64, 56
    note_off = phoff + phentsize
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, note_off, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note


def test_pvh_note_is_the_xen_phys32_entry_note() -> None:
    assert has_pvh_note(_elf_with_note(b"Xen", 18))
    assert not has_pvh_note(_elf_with_note(b"Xen", 17))  # another Xen note
    assert not has_pvh_note(_elf_with_note(b"GNU", 18))
    assert not has_pvh_note(b"MZ" + b"\0" * 100)


def test_a_host_without_a_compiler_gets_one_line_naming_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import guests.kernel as kernel

    monkeypatch.setattr(kernel.shutil, "which", lambda t: None if t == "gcc" else f"/usr/bin/{t}")
    with pytest.raises(BuildError) as err:
        kernel.build_kernel(tmp_path, [], tmp_path / "debs")  # no kernel cached there
    assert str(err.value) == (
        "the guest kernel is built from source and needs gcc on the host: "
        "apt-get install build-essential"
    )
