"""Self-tests of the driver's pure parts: what it writes into memory is read back by the
oracle's independent walker (fixtures/oracle/walk.py) as intended, descriptors carry their fields
at the spec's bit positions, and PSI blocks cover ranges exactly. No QEMU needed."""

from __future__ import annotations

import itertools
from typing import cast

import pytest

from fixtures.oracle.walk import DeviceMode, DeviceView, Fault, walk_device
from fixtures.qemu.pci_config import Bdf
from fixtures.qemu.qtest import QTestClient
from fixtures.vtd.context_tables import (
    ContextType,
    LegacyContextTables,
    PasidGranularTranslation,
    ScalableContextTables,
)
from fixtures.vtd.driver import VtdDriver, psi_blocks
from fixtures.vtd.invalidation import (
    CcGranularity,
    IotlbGranularity,
    PasidCacheGranularity,
    PiotlbGranularity,
    context_cache,
    device_iotlb,
    iotlb,
    pasid_cache,
    pasid_device_iotlb,
    pasid_iotlb,
    wait,
)
from fixtures.vtd.page_tables import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    SecondLevelTables,
    TablePageAllocator,
)
from fixtures.vtd.registers import Capability

RAM = 32 << 20  # the driver's table window (0x1000000-0x1800000) fits


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


# ---- first-stage tables and PASID entries (scalable mode) ------------------------------------


class NoQtest:
    """The driver's table-writing methods never touch qtest: any use is a test error."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"qtest.{name} used by a table-writing method")


def offline_driver(mem: Memory, *, fs1gp: bool = True) -> VtdDriver:
    driver = VtdDriver(cast("QTestClient", NoQtest()), mem, scalable=True)
    driver.cap = Capability(1 << 56 if fs1gp else 0)  # as init() would have read CAP.FS1GP
    return driver


def walk(driver: VtdDriver, bdf: Bdf, pasid: int = 0, **kw: bool) -> DeviceView:
    return walk_device(
        driver.memory, driver.rtaddr, bdf.bus, bdf.devfn, scalable=True, pasid=pasid, **kw
    )


DEV = Bdf(0, 0x18)


def test_first_stage_tables_walk_back_as_written(mem: Memory) -> None:
    """4 KiB (read-only and read-write), 2 MiB and 1 GiB first-stage leaves written by the
    driver are what the oracle's first-stage walker reads through a PGTT=1 PASID entry."""
    driver = offline_driver(mem)
    dom = driver.first_stage_domain(4)
    dom.tables.map(0x1000_0000, 0x80_0000, 0x2000, write=False)
    dom.tables.map(0x1000_2000, 0x90_0000, PAGE_4K)
    dom.tables.map(0x4000_0000, 0x100_0000, PAGE_2M, page_size=PAGE_2M)
    dom.tables.map(0x80_0000_0000, 0x4000_0000, PAGE_1G, page_size=PAGE_1G)
    driver.attach(DEV, dom)
    view = walk(driver, DEV)
    assert view.mode is DeviceMode.TRANSLATED, view.describe()
    assert view.domain_id == 4
    assert view.faults == ()
    want = [
        (0x1000_0000, 0x80_0000, PAGE_4K, True, False),
        (0x1000_1000, 0x80_1000, PAGE_4K, True, False),
        (0x1000_2000, 0x90_0000, PAGE_4K, True, True),
        (0x4000_0000, 0x100_0000, PAGE_2M, True, True),
        (0x80_0000_0000, 0x4000_0000, PAGE_1G, True, True),
    ]
    assert leaves(view) == want
    assert [t.level for t in sorted(view.translations, key=lambda t: t.iova)] == [1, 1, 1, 2, 3]
    assert sorted((lf.iova, lf.gpa, lf.size, lf.read, lf.write) for lf in dom.tables.leaves()) == (
        want
    )
    # without FS1GP the walker faults a 1 GiB leaf, and the driver refuses to write one
    assert [f.level for f in walk(driver, DEV, fs1gp=False).faults] == [3]
    with pytest.raises(ValueError, match="FS1GP"):
        offline_driver(Memory(), fs1gp=False).first_stage_domain(1).tables.map(
            0, 0x4000_0000, PAGE_1G, page_size=PAGE_1G
        )
    with pytest.raises(ValueError, match="readable"):
        dom.tables.map(0x2000_0000, 0x80_0000, PAGE_4K, read=False)


def test_first_stage_split_merge_and_unmap(mem: Memory) -> None:
    driver = offline_driver(mem)
    dom = driver.first_stage_domain(1)
    driver.attach(DEV, dom)
    dom.tables.map(PAGE_2M, 0x60_0000, PAGE_2M, page_size=PAGE_2M, write=False)
    dom.tables.split(PAGE_2M)
    split = walk(driver, DEV)
    assert len(split.translations) == 512
    assert all(t.gpa - t.iova == 0x60_0000 - PAGE_2M and not t.write for t in split.translations)
    dom.tables.merge(PAGE_2M, 0x60_0000)
    assert leaves(walk(driver, DEV)) == [(PAGE_2M, 0x60_0000, PAGE_2M, True, True)]
    dom.tables.unmap(PAGE_2M, PAGE_2M, page_size=PAGE_2M)
    assert walk(driver, DEV).translations == ()


def test_pasid_entries_of_rid_pasid_and_other_pasids(mem: Memory) -> None:
    """RID_PASID (0) second-stage, PASID 1 first-stage in the same PASID table, PASID 70 (the
    second PASID table) pass-through, PASID 5 never written: each walks back as written."""
    driver = offline_driver(mem)
    sl = driver.domain(1)
    sl.tables.map(0x3000, 0xA0_0000, PAGE_4K)
    driver.attach(DEV, sl)
    fs = driver.new_tables(first_stage=True)
    fs.map(0x5000, 0xB0_0000, PAGE_4K)
    driver.set_pasid_entry(DEV, 1, did=1, tables=fs)
    driver.set_pasid_entry(DEV, 70, did=3, pass_through=True)
    assert leaves(walk(driver, DEV)) == [(0x3000, 0xA0_0000, PAGE_4K, True, True)]
    one = walk(driver, DEV, pasid=1)
    assert (one.mode, one.domain_id, leaves(one)) == (
        DeviceMode.TRANSLATED,
        1,
        [(0x5000, 0xB0_0000, PAGE_4K, True, True)],
    )
    seventy = walk(driver, DEV, pasid=70)
    assert (seventy.mode, seventy.domain_id) == (DeviceMode.PASS_THROUGH, 3)
    assert walk(driver, DEV, pasid=5).faults[0].reason is Fault.PASID_ENTRY_NOT_PRESENT
    assert walk(driver, DEV, pasid=130).faults[0].reason is Fault.PASID_DIR_NOT_PRESENT
    driver.clear_pasid_entry(DEV, 1)
    assert walk(driver, DEV, pasid=1).faults[0].reason is Fault.PASID_ENTRY_NOT_PRESENT
    assert walk(driver, DEV).mode is DeviceMode.TRANSLATED  # RID_PASID untouched


def test_moved_pasid_directory_takes_effect_with_the_context_entry(mem: Memory) -> None:
    driver = offline_driver(mem)
    one, two = driver.domain(1), driver.domain(2)
    one.tables.map(0x1000, 0xA0_0000, PAGE_4K)
    two.tables.map(0x2000, 0xC0_0000, PAGE_4K)
    driver.attach(DEV, one)
    new_dir = driver.move_pasid_dir(DEV)
    driver.set_pasid_entry(DEV, 0, did=2, tables=two.tables)
    assert walk(driver, DEV).domain_id == 1  # the context entry still names the old directory
    driver.set_context_entry(DEV)
    view = walk(driver, DEV)
    assert (view.domain_id, leaves(view)) == (2, [(0x2000, 0xC0_0000, PAGE_4K, True, True)])
    ce = int.from_bytes(mem.read(driver._scalable().context_addr(DEV.bus, DEV.devfn), 8), "little")
    assert (ce & ~0xFFF) == new_dir


@pytest.mark.parametrize(
    ("word", "bit"), [(0, 10), (0, 11), (1, 16), (2, 8), (4, 0), (7, 63), (0, 50)]
)
def test_reserved_pasid_entry_bits_block_the_pasid(mem: Memory, word: int, bit: int) -> None:
    driver = offline_driver(mem)
    dom = driver.domain(1)
    dom.tables.map(0x1000, 0xA0_0000, PAGE_4K)
    driver.attach(DEV, dom)
    addr = driver.pasid_entry_addr(DEV, 0) + 8 * word
    raw = int.from_bytes(mem.read(addr, 8), "little")
    mem.write(addr, (raw | 1 << bit).to_bytes(8, "little"))
    view = walk(driver, DEV)
    assert view.mode is DeviceMode.BLOCKED
    assert view.faults[0].reason is Fault.PASID_ENTRY_RESERVED


def test_pasid_descriptors_at_spec_positions() -> None:
    for gran, g in [
        (PasidCacheGranularity.DOMAIN, 0),
        (PasidCacheGranularity.PASID, 1),
        (PasidCacheGranularity.GLOBAL, 3),
    ]:
        d = pasid_cache(gran, domain=0x21, pasid=0x1234)
        assert (d.lo & 0xF, d.lo >> 4 & 3, d.lo >> 16 & 0xFFFF, d.lo >> 32 & 0xFFFFF) == (
            7,
            g,
            0x21,
            0x1234,
        )
        assert d.hi == 0
    a = pasid_iotlb(PiotlbGranularity.PASID, domain=9, pasid=3)
    assert (a.lo, a.hi) == (0x6 | 2 << 4 | 9 << 16 | 3 << 32, 0)
    d = pasid_device_iotlb(0x0118, 0x42, 0x40_0000)
    assert d.lo == 0x8 | 0x0118 << 16 | 0x42 << 32
    assert d.hi == 0x40_0000
    assert pasid_device_iotlb(0x18, 1, 0, global_=True).hi == 1


@pytest.mark.parametrize("pages", [2, 4, 512])
def test_pasid_device_iotlb_size_encoding(pages: int) -> None:
    """S (bit 11) with the lowest zero bit of ADDR[63:12] giving the size."""
    d = pasid_device_iotlb(0x18, 1, 0x4000_0000, pages)
    assert d.hi & 1 << 11
    ones, bits = 0, d.hi >> 12
    while bits & 1:
        ones += 1
        bits >>= 1
    assert 2 << ones == pages
    assert d.hi & ~((pages << 12) - 1) & ~(1 << 11) == 0x4000_0000
