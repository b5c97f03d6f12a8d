"""PCI addresses as Linux and QEMU write them (no QEMU needed)."""

from __future__ import annotations

import pytest

from fixtures.qemu.pci_config import Bdf


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000:00:03.0", Bdf(0, 3, 0)),  # Linux (sysfs, the guest agent)
        ("00:03.0", Bdf(0, 3, 0)),  # QEMU, and Bdf's own str()
        ("0000:01:1f.7", Bdf(1, 0x1F, 7)),
        ("ff:00.1", Bdf(0xFF, 0, 1)),
    ],
)
def test_parse_takes_both_spellings(text: str, expected: Bdf) -> None:
    assert Bdf.parse(text) == expected
    assert Bdf.parse(str(expected)) == expected
    assert Bdf.parse(text).devfn == expected.dev << 3 | expected.fn


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0001:00:03.0", "segment 0001"),
        ("00:20.0", "device number 0x20"),
        ("00:03.8", "not a PCI address"),
        ("00:03", "not a PCI address"),
        ("0000:100:03.0", "not a PCI address"),
        ("", "not a PCI address"),
    ],
)
def test_parse_refuses_what_is_not_a_segment_0_function(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Bdf.parse(text)
