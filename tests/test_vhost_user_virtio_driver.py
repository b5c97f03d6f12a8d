"""The qtest-side helpers of the vhost-user cases, against fake config spaces: BAR sizing and
placement, the extended-capability walk (ATS), ring layout. No QEMU needed."""

from __future__ import annotations

import pytest

from fixtures.qemu.pci_config import Bdf
from fixtures.virtio.driver import RingLayout
from fixtures.virtio.ecam import ATS_CONTROL_ENABLE, ECAM_BASE, Ats, Ecam
from fixtures.virtio.resources import assign_bars, open_memory_window

DEV = Bdf(1, 0)


class FakeConfig:
    """Config space of one function with BARs of the given sizes (0: unimplemented)."""

    def __init__(self, bars: dict[int, tuple[int, int]], *, bridge: bool = False) -> None:
        self.bars = bars  # index -> (size, type bits)
        self.bridge = bridge  # type-1 header: 0x18 up are bus numbers and windows
        self.regs: dict[int, int] = {}
        for index, (_size, kind) in bars.items():
            self.regs[0x10 + 4 * index] = kind

    async def read(self, bdf: Bdf, offset: int, size: int = 4) -> int:
        value = self.regs.get(offset & ~3, 0)
        return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    async def write(self, bdf: Bdf, offset: int, value: int, size: int = 4) -> None:
        for index, (bar_size, kind) in self.bars.items():
            base = 0x10 + 4 * index
            if offset == base:
                mask = ~(bar_size - 1) & 0xFFFF_FFFF
                self.regs[offset] = (value & mask & ~0xF) | kind
                return
            if kind & 0x4 and offset == base + 4:
                self.regs[offset] = value & (~(bar_size - 1) >> 32) & 0xFFFF_FFFF
                return
        if not self.bridge and 0x10 <= offset < 0x28:
            return  # an unimplemented BAR is read-only zero
        self.regs[offset & ~3] = value


async def test_bars_are_sized_and_placed_naturally_aligned() -> None:
    # BAR1: 4 KiB 32-bit (MSI-X); BAR4: 16 KiB 64-bit prefetchable (virtio modern).
    cfg = FakeConfig({1: (0x1000, 0x0), 4: (0x4000, 0xC)})
    bars = await assign_bars(cfg, DEV, 0xC000_0000)  # type: ignore[arg-type]
    assert sorted(bars) == [1, 4]
    assert (bars[1].address, bars[1].size, bars[1].is_64) == (0xC000_0000, 0x1000, False)
    assert bars[4].address == 0xC000_4000  # aligned to its 16 KiB size
    assert (bars[4].size, bars[4].is_64, bars[4].prefetchable) == (0x4000, True, True)
    assert cfg.regs[0x20] & ~0xF == 0xC000_4000
    assert cfg.regs[0x24] == 0


async def test_bridge_window_encoding_and_granularity() -> None:
    cfg = FakeConfig({}, bridge=True)
    await open_memory_window(cfg, Bdf(0, 0x10), 0xC000_0000, 0xC03F_FFFF)  # type: ignore[arg-type]
    assert cfg.regs[0x20] == 0xC030_C000  # limit 0xc03 << 4 | base 0xc00 << 4
    with pytest.raises(ValueError, match="granular"):
        await open_memory_window(cfg, Bdf(0, 0x10), 0xC000_1000, 0xC03F_FFFF)  # type: ignore[arg-type]


class FakeEcamQtest:
    def __init__(self, space: dict[int, int]) -> None:
        self.space = space
        self.writes: list[tuple[int, int]] = []

    async def readl(self, addr: int) -> int:
        return self.space.get(addr, 0)

    async def readb(self, addr: int) -> int:
        return (await self.readw(addr & ~1) >> (8 * (addr & 1))) & 0xFF

    async def readw(self, addr: int) -> int:
        word = self.space.get(addr & ~3, 0)
        return (word >> (8 * (addr & 3))) & 0xFFFF

    async def writeb(self, addr: int, value: int) -> None:
        raise AssertionError("ATS control is written as one 16-bit word")

    async def writel(self, addr: int, value: int) -> None:
        raise AssertionError("ATS control is written as one 16-bit word")

    async def writew(self, addr: int, value: int) -> None:
        self.writes.append((addr, value))
        word = self.space.get(addr & ~3, 0)
        shift = 8 * (addr & 3)
        self.space[addr & ~3] = (word & ~(0xFFFF << shift)) | value << shift


def ecam_of(bdf: Bdf, offset: int) -> int:
    return ECAM_BASE + (bdf.bus << 20 | bdf.devfn << 12 | offset)


async def test_ats_is_found_behind_other_extended_capabilities_and_toggled() -> None:
    space = {
        ecam_of(DEV, 0x100): 0x1 | 1 << 16 | 0x148 << 20,  # AER, next at 0x148
        ecam_of(DEV, 0x148): 0xF | 1 << 16,  # ATS, last
        ecam_of(DEV, 0x14C): 0x0000_0020,  # capability: page aligned; control 0
    }
    qtest = FakeEcamQtest(space)
    ecam = Ecam(qtest)  # type: ignore[arg-type]
    ats = await Ats.find(ecam, DEV)
    assert ats is not None
    assert ats.offset == 0x148
    assert not await ats.enabled()
    await ats.set_enabled(True)
    assert qtest.writes == [(ecam_of(DEV, 0x14E), ATS_CONTROL_ENABLE)]  # one 16-bit write
    assert await ats.enabled()
    await ats.set_enabled(False)
    assert not await ats.enabled()


async def test_no_ats_and_looping_lists_end() -> None:
    assert await Ats.find(Ecam(FakeEcamQtest({})), DEV) is None  # type: ignore[arg-type]
    loop = {ecam_of(DEV, 0x100): 0x1 | 0x100 << 20}  # points at itself
    assert await Ats.find(Ecam(FakeEcamQtest(loop)), DEV) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        Ecam(FakeEcamQtest({})).address(DEV, 0x1000)  # type: ignore[arg-type]


def test_ring_layout_gives_each_part_its_own_page() -> None:
    ring = RingLayout.at(0x10_0000_0000, 256)
    assert ring.pages == (0x10_0000_0000, 0x10_0000_1000, 0x10_0000_2000)
    assert 16 * 256 <= 0x1000  # the descriptor table fits its page
    assert 6 + 8 * 256 <= 0x1000  # and so does the used ring
    with pytest.raises(ValueError, match="power of two"):
        RingLayout.at(0, 512)
    with pytest.raises(ValueError, match="aligned"):
        RingLayout.at(0x800)
