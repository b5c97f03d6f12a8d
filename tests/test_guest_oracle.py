"""Self-tests of the guest tier's intent oracle and its report (no QEMU)."""

from __future__ import annotations

import pytest

from fixtures.guest.vfio import bus_devfn
from fixtures.oracle.expected_state import MapIntent, PageMap, Run, from_intent
from fixtures.oracle.intent import Intent
from fixtures.qemu.pci_config import Bdf
from fixtures.rig.guest_rig import mismatch


def test_intent_maps_each_page_to_its_buffer_gpa() -> None:
    intent = Intent()
    intent.buffer("b", [0x5000, 0x9000, 0x6000])  # scattered frames, as pagemap reports
    intent.map("b", 0x10_0000, offset=0x1000, size=0x2000, read=True, write=False)
    assert intent.page_map() == PageMap(
        [Run(0x10_0000, 0x1000, 0x9000, True, False), Run(0x10_1000, 0x1000, 0x6000, True, False)]
    )


def test_intent_refuses_a_double_map_and_forgets_unmapped_pages() -> None:
    intent = Intent()
    intent.buffer("b", [0x5000, 0x6000])
    intent.map("b", 0x10_0000, offset=0, size=0x2000, read=True, write=True)
    with pytest.raises(ValueError, match="twice"):
        intent.map("b", 0x10_1000, offset=0, size=0x1000, read=True, write=True)
    intent.unmap(0x10_0000, 0x1000)
    assert intent.page_map() == from_intent([MapIntent(0x10_1000, 0x6000, 0x1000)])


def test_intent_unmap_of_a_huge_range_forgets_exactly_the_covered_pages() -> None:
    intent = Intent()
    intent.buffer("b", [0x5000, 0x6000, 0x7000])
    intent.map("b", 0x10_0000, offset=0, size=0x1000, read=True, write=True)
    intent.map("b", 0x7FFF_F000, offset=0x1000, size=0x2000, read=True, write=True)
    intent.unmap(0x7FFF_F000, 1 << 40)  # more pages than held: the held ones are walked
    assert intent.page_map() == from_intent([MapIntent(0x10_0000, 0x5000, 0x1000)])
    intent.map("b", 0x20_0000, offset=0x1000, size=0x1000, read=True, write=True)
    intent.unmap(0x1F_F800, 1 << 40)  # off the page lattice of the range: nothing matches
    assert 0x20_0000 in intent.pages
    intent.unmap(0, 1 << 40)
    assert intent.page_map() == from_intent([])


def test_mismatch_is_silent_when_equal_and_names_the_differing_pages() -> None:
    expected = PageMap([Run(0x1000, 0x3000, 0x8000, True, True)])
    assert mismatch(expected, expected, "host vs intent") is None
    actual = PageMap(
        [Run(0x1000, 0x1000, 0x8000, True, True), Run(0x2000, 0x1000, 0xF000, True, True)]
    )
    report = mismatch(expected, actual, "host vs intent")
    assert report is not None
    assert report.startswith("host vs intent differ: 2 ranges, 2 pages")
    # Page 0x2000 translates wrongly, page 0x3000 is missing: one row each.
    rows = [" ".join(line.split()) for line in report.splitlines()[2:4]]
    assert rows == [
        "0x000000002000-0x000000002fff 1 -> 0x0000009000 rw -> 0x000000f000 rw none",
        "0x000000003000-0x000000003fff 1 -> 0x000000a000 rw unmapped none",
    ]


@pytest.mark.parametrize(
    ("bdf", "expected"),
    [("0000:00:03.0", (0, 0x18)), ("0000:01:00.0", (1, 0)), ("0000:00:1f.3", (0, 0xFB))],
)
def test_bus_devfn_is_the_requester_id(bdf: str, expected: tuple[int, int]) -> None:
    assert bus_devfn(bdf) == expected
    parsed = Bdf.parse(bdf)  # the one parser of PCI addresses bus_devfn can defer to
    assert (parsed.bus, parsed.devfn) == expected
