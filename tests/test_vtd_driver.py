"""Self-tests of the driver's pure parts: what it writes into memory is read back by the
oracle's independent walker (fixtures/oracle/walk.py) as intended, descriptors carry their fields
at the spec's bit positions, and PSI blocks cover ranges exactly. No QEMU needed."""

from __future__ import annotations

import itertools

import pytest

from fixtures.oracle.walk import DeviceMode, DeviceView, walk_device
from fixtures.vtd.context_tables import (
    ContextType,
    LegacyContextTables,
    PasidGranularTranslation,
    ScalableContextTables,
)
from fixtures.vtd.driver import psi_blocks
from fixtures.vtd.invalidation import (
    CcGranularity,
    IotlbGranularity,
    PiotlbGranularity,
    context_cache,
    device_iotlb,
    iotlb,
    pasid_iotlb,
    wait,
)
from fixtures.vtd.page_tables import PAGE_2M, PAGE_4K, SecondLevelTables, TablePageAllocator

RAM = 32 << 20


class Memory:
    def __init__(self) -> None:
        self.data = bytearray(RAM)

    def read(self, addr: int, size: int) -> bytes:
        if addr + size > RAM:
            raise ValueError("outside RAM")
        return bytes(self.data[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        self.data[addr : addr + len(data)] = data


@pytest.fixture
def mem() -> Memory:
    return Memory()


@pytest.fixture
def alloc(mem: Memory) -> TablePageAllocator:
    return TablePageAllocator(mem, 0x100000, 0x400000)


def leaves(view: DeviceView) -> list[tuple[int, int, int, bool, bool]]:
    return sorted((t.iova, t.gpa, t.size, t.read, t.write) for t in view.translations)


@pytest.mark.parametrize("levels", [3, 4])
def test_legacy_tables_walk_back_as_written(
    mem: Memory, alloc: TablePageAllocator, levels: int
) -> None:
    ctx = LegacyContextTables(mem, alloc)
    tables = SecondLevelTables(mem, alloc, levels)
    tables.map(0x1000_0000, 0x80_0000, 0x3000, write=False)
    tables.map(0x4000_0000, 0x100_0000, PAGE_2M, page_size=PAGE_2M)
    ctx.set_context(1, 0x18, domain=7, slptptr=tables.root, levels=levels)
    view = walk_device(mem, ctx.root, 1, 0x18, aw_bits=48 if levels == 4 else 39)
    assert view.mode is DeviceMode.TRANSLATED
    assert view.domain_id == 7
    assert leaves(view) == [
        (0x1000_0000, 0x80_0000, PAGE_4K, True, False),
        (0x1000_1000, 0x80_1000, PAGE_4K, True, False),
        (0x1000_2000, 0x80_2000, PAGE_4K, True, False),
        (0x4000_0000, 0x100_0000, PAGE_2M, True, True),
    ]
    assert sorted((lf.iova, lf.gpa, lf.size, lf.read, lf.write) for lf in tables.leaves()) == (
        leaves(view)
    )


def test_pass_through_and_cleared_context(mem: Memory, alloc: TablePageAllocator) -> None:
    ctx = LegacyContextTables(mem, alloc)
    tables = SecondLevelTables(mem, alloc)
    ctx.set_context(
        0, 0x18, domain=1, slptptr=tables.root, levels=4, ctype=ContextType.PASS_THROUGH
    )
    assert walk_device(mem, ctx.root, 0, 0x18).mode is DeviceMode.PASS_THROUGH
    ctx.clear_context(0, 0x18)
    assert walk_device(mem, ctx.root, 0, 0x18).mode is DeviceMode.BLOCKED


def test_split_and_merge_keep_the_translation(mem: Memory, alloc: TablePageAllocator) -> None:
    ctx = LegacyContextTables(mem, alloc)
    tables = SecondLevelTables(mem, alloc)
    ctx.set_context(0, 0x20, domain=1, slptptr=tables.root, levels=4)
    tables.map(PAGE_2M, 0x60_0000, PAGE_2M, page_size=PAGE_2M, write=False)
    tables.split(PAGE_2M)
    split = walk_device(mem, ctx.root, 0, 0x20)
    assert len(split.translations) == 512
    assert all(t.gpa - t.iova == 0x60_0000 - PAGE_2M and not t.write for t in split.translations)
    tables.merge(PAGE_2M, 0x60_0000, write=False)
    assert leaves(walk_device(mem, ctx.root, 0, 0x20)) == [
        (PAGE_2M, 0x60_0000, PAGE_2M, True, False)
    ]


def test_clear_pointer_drops_a_whole_page_table(mem: Memory, alloc: TablePageAllocator) -> None:
    ctx = LegacyContextTables(mem, alloc)
    tables = SecondLevelTables(mem, alloc)
    ctx.set_context(0, 0x20, domain=1, slptptr=tables.root, levels=4)
    tables.map(0, 0x80_0000, 0x10000)
    tables.clear_pointer(0, 2)
    assert walk_device(mem, ctx.root, 0, 0x20).translations == ()


@pytest.mark.parametrize(
    ("pgtt", "mode"),
    [
        (PasidGranularTranslation.SECOND_STAGE, DeviceMode.TRANSLATED),
        (PasidGranularTranslation.PASS_THROUGH, DeviceMode.PASS_THROUGH),
    ],
)
@pytest.mark.parametrize("devfn", [0x18, 0x88])  # lower and upper context table
def test_scalable_entries_walk_back_as_written(
    mem: Memory,
    alloc: TablePageAllocator,
    pgtt: PasidGranularTranslation,
    mode: DeviceMode,
    devfn: int,
) -> None:
    ctx = ScalableContextTables(mem, alloc)
    tables = SecondLevelTables(mem, alloc)
    tables.map(0x2000, 0x90_0000, PAGE_4K)
    ctx.set_pasid(2, devfn, 0, domain=9, pgtt=pgtt, ssptptr=tables.root)
    ctx.set_context(2, devfn)
    view = walk_device(mem, ctx.root, 2, devfn, scalable=True)
    assert view.mode is mode, view.describe()
    assert view.domain_id == 9
    if mode is DeviceMode.TRANSLATED:
        assert leaves(view) == [(0x2000, 0x90_0000, PAGE_4K, True, True)]


def test_psi_blocks_cover_exactly_and_align() -> None:
    for iova, size in [(0x1000, 0x1000), (0x3000, 0x23000), (0, PAGE_2M), (0x1FF000, 0x3000)]:
        blocks = psi_blocks(iova, size)
        covered = []
        for addr, am in blocks:
            assert addr % (PAGE_4K << am) == 0
            covered.append((addr, PAGE_4K << am))
        assert covered[0][0] == iova
        assert sum(s for _, s in covered) == size
        assert all(a + s == b for (a, s), (b, _) in itertools.pairwise(covered))
    assert psi_blocks(0, 1 << 30, max_am=18) == [(0, 18)]
    assert psi_blocks(0, PAGE_2M) == [(0, 9)]


def test_descriptor_fields_at_spec_positions() -> None:
    cc = context_cache(CcGranularity.DEVICE, domain=0x12, sid=0x0118, function_mask=2)
    assert cc.lo == 0x1 | 3 << 4 | 0x12 << 16 | 0x0118 << 32 | 2 << 48
    psi = iotlb(IotlbGranularity.PAGE, domain=5, addr=0x20_0000, am=9, ih=True)
    assert psi.lo & 0xF == 2
    assert (psi.lo >> 4) & 3 == 3
    assert (psi.lo >> 16) & 0xFFFF == 5
    assert psi.hi == 0x20_0000 | 9 | 1 << 6
    with pytest.raises(ValueError, match="aligned"):
        iotlb(IotlbGranularity.PAGE, domain=5, addr=0x1000, am=1)
    p = pasid_iotlb(PiotlbGranularity.PAGE, domain=3, pasid=0x55, addr=0x4000, am=2)
    assert p.lo == 0x6 | 3 << 4 | 3 << 16 | 0x55 << 32
    assert p.hi == 0x4000 | 2
    w = wait(0x1000, 0xABCD)
    assert w.lo == 0x5 | 1 << 5 | 1 << 6 | 0xABCD << 32
    assert w.hi == 0x1000
    assert len(w.encode(wide=True)) == 32


@pytest.mark.parametrize("pages", [1, 2, 4, 16])
def test_device_iotlb_size_encoding(pages: int) -> None:
    """S=1 with the lowest zero bit of ADDR[63:12] giving the size (ATS spec table 2.4)."""
    d = device_iotlb(0x18, 0x40_0000, pages)
    assert d.lo == 0x3 | 0x18 << 32
    assert (d.hi & 1) == (pages > 1)
    ones, bits = 0, d.hi >> 12
    while bits & 1:
        ones += 1
        bits >>= 1
    decoded = 1 if pages == 1 else 2 << ones
    assert decoded == pages
    assert d.hi & ~((pages << 12) - 1) & ~1 == 0x40_0000
