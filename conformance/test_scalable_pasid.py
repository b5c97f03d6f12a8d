"""Scalable mode, PASID entries and the PASID cache: PGTT switches under each PASID-cache
invalidation scope, cleared and malformed PASID entries, a PASID directory moved under a live
context, PASID-based IOTLB PSIs with masks for RID_PASID and for another PASID.

A vfio-user device's notifier sits on its request-without-PASID address space (RID_PASID, 0):
after every step its host record must equal the oracle's walk of PASID 0's entry and tables
in guest RAM, and an invalidation of another PASID must reach it not at all (oracle rule
notifier_hears_own_pasid_only, through vtd_rig.pasid_step).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from fixtures.oracle.dma_event import DmaOp
from fixtures.oracle.walk import DeviceMode, Fault
from fixtures.rig.vtd_rig import (
    D0,
    DATA_BASE,
    IOVA,
    Leaves,
    RigFactory,
    VtdRig,
    maps_of,
    ops,
    pasid_step,
    remaps_of,
)
from fixtures.vtd.page_tables import PAGE_2M, PAGE_4K

pytestmark = pytest.mark.qtest

MAP, UNMAP = DmaOp.MAP, DmaOp.UNMAP
OTHER = 1  # a PASID other than RID_PASID

SCOPES: dict[str, Callable[[VtdRig, int], Awaitable[None]]] = {
    "pasid": lambda rig, pasid: rig.driver.pasid_cache_pasid(1, pasid),
    "domain": lambda rig, pasid: rig.driver.pasid_cache_domain(1),
    "global": lambda rig, pasid: rig.driver.pasid_cache_global(),
}


async def entry_changed(rig: VtdRig, scope: str, pasid: int = 0) -> None:
    """A driver's flushes after rewriting a present PASID entry: PASID cache (`scope`), then
    the PASID-based IOTLB of that PASID."""
    await SCOPES[scope](rig, pasid)
    await rig.driver.piotlb_pasid(1, pasid)


async def second_stage(vtd_rig: RigFactory, **kwargs: object) -> VtdRig:
    rig = await vtd_rig(devices=("d0",), scalable=True, **kwargs)  # type: ignore[arg-type]
    await rig.translate({"d0": 1})
    await rig.populate(1)
    return rig


# ---- PGTT switches ------------------------------------------------------------------------


PASS_THROUGH_KEPT = (
    "since 11.1 (as README finding 6, from pass-through back to first-stage this time): after "
    "RID_PASID's entry goes from pass-through to PGTT first-stage, neither the PASID-cache "
    "invalidation (PASID-selective, domain or global) nor the P-IOTLB flush after it switches "
    "the address space back (vtd_pasid_cache_sync, hw/i386/intel_iommu.c): the host keeps "
    "the identity map of all guest RAM (131008 pages) where the first-stage walk gives the "
    "device 536; no 'vtd_switch_address_space' follows the 'vtd_inv_desc_pasid_cache_*' line."
)


@pytest.mark.qemu_bug(since=(11, 1), raises=AssertionError, reason=PASS_THROUGH_KEPT)
@pytest.mark.parametrize("scope", sorted(SCOPES))
async def test_first_stage_to_pass_through_and_back(vtd_rig: RigFactory, scope: str) -> None:
    """fsts=on: RID_PASID's entry goes PGTT first-stage -> pass-through -> first-stage, each
    followed by a PASID-cache invalidation of `scope` and the P-IOTLB flush: identity over
    RAM, then exactly the first-stage walk again."""
    rig = await vtd_rig(devices=("d0",), scalable=True, iommu={"fsts": True})
    dom = rig.driver.first_stage_domain(1)
    async with rig.step("PGTT=1"):
        await rig.driver.attach_and_flush(D0, dom)
    await rig.populate(1)
    async with rig.switch_step("DMAR on"):
        await rig.driver.enable_translation()
    rig.driver.attach(D0, dom, pass_through=True)
    async with rig.switch_step(f"PGTT first-stage -> pass-through, pasid-cache {scope}"):
        await entry_changed(rig, scope)
    assert rig.view("d0").mode is DeviceMode.PASS_THROUGH
    rig.driver.attach(D0, dom)
    async with rig.switch_step(f"PGTT pass-through -> first-stage, pasid-cache {scope}"):
        await entry_changed(rig, scope)


@pytest.mark.parametrize("scope", sorted(SCOPES))
async def test_second_stage_to_first_stage(vtd_rig: RigFactory, scope: str) -> None:
    """Where the IOMMU offers both (ECAP SLTS and FLTS): RID_PASID's entry goes PGTT
    second-stage -> first-stage (a first-stage domain mapping other GPAs) with a PASID-cache
    invalidation of `scope`: the host ends equal to the first-stage walk."""
    rig = await vtd_rig(devices=("d0",), scalable=True, iommu={"fsts": True})
    if not rig.driver.ecap.slts:
        pytest.skip(f"ECAP {rig.driver.ecap.raw:#x}: fsts=on offers no second-stage (SLTS)")
    await rig.translate({"d0": 1})
    await rig.populate(1)
    fs = rig.driver.first_stage_domain(2)
    fs.tables.map(IOVA, DATA_BASE + 0x80_0000, 0x4000)
    rig.driver.attach(D0, fs)
    async with rig.step(f"PGTT second-stage -> first-stage, pasid-cache {scope}"):
        await SCOPES[scope](rig, 0)
        await rig.driver.piotlb_pasid(2, 0)


# ---- cleared, malformed, moved ----------------------------------------------------------------


INVALID_ENTRY_KEPT = (
    "before 11.1 (11.1.3 unmaps): after RID_PASID's entry is cleared or given a reserved PGTT "
    "/ AW encoding, neither the PASID-cache invalidation (PASID-selective, domain or global) "
    "nor the P-IOTLB flush unmaps anything: the host keeps the domain's 536 pages where the "
    "walk blocks the device. Suspected from reading 10.2.2's source: "
    "vtd_pasid_cache_sync_locked (hw/i386/intel_iommu.c) returns early when the address "
    "space's PASID-cache entry is not valid, and vfio's address space (pasid PCI_NO_PASID) "
    "never got a valid one (the PASID-selective invalidation at attach skips it: "
    "pc_info->pasid != vtd_as->pasid); vtd_piotlb_pasid_invalidate then reads DID 0 from the "
    "cleared entry and skips the device. trace: 'vtd_inv_desc_pasid_cache_psi PASID selective "
    "PC invalidation domain 0x1 pasid 0x0' with no vtd_switch_address_space and no UNMAP."
)


@pytest.mark.qemu_bug(before=(11, 1), raises=AssertionError, reason=INVALID_ENTRY_KEPT)
@pytest.mark.parametrize("scope", sorted(SCOPES))
async def test_cleared_pasid_entry_leaves_nothing_mapped(vtd_rig: RigFactory, scope: str) -> None:
    """RID_PASID's entry zeroed under a populated domain, then a PASID-cache invalidation of
    `scope` and the P-IOTLB flush: the device's host record ends empty (no DMA window stays
    open: neither the domain's pages nor an identity map)."""
    rig = await second_stage(vtd_rig)
    rig.driver.clear_pasid_entry(D0, 0)
    async with rig.switch_step(f"PASID entry cleared, pasid-cache {scope}"):
        await entry_changed(rig, scope)
    view = rig.view("d0")
    assert view.faults[0].reason is Fault.PASID_ENTRY_NOT_PRESENT
    assert any(e.op is MAP and e.iova == IOVA for e in rig.devices["d0"].events)
    # rig.check compared the host with the walk of the blocked entry: nothing mapped at all


async def test_pasid_directory_moved_under_a_live_context(vtd_rig: RigFactory) -> None:
    """The context entry is pointed at a new PASID directory whose RID_PASID entry names
    domain 2 (other tables, other GPAs); the context-cache device invalidation, PASID cache
    and IOTLB flushes follow: the host ends with domain 2's walk, nothing of domain 1."""
    rig = await second_stage(vtd_rig)
    two = rig.driver.domain(2)
    two.tables.map(IOVA + 0x10_0000, DATA_BASE + 0x90_0000, 0x3000)
    rig.driver.move_pasid_dir(D0)
    rig.driver.set_pasid_entry(D0, 0, did=2, tables=two.tables)
    rig.driver.set_context_entry(D0)
    async with rig.step("PASID directory moved: cc device, pasid-cache, iotlb"):
        await rig.driver.flush_context(D0, 2)
    assert rig.view("d0").domain_id == 2


KEPT_ON_10_2 = pytest.mark.qemu_bug(
    before=(11, 1), raises=AssertionError, reason=INVALID_ENTRY_KEPT
)
RESERVED = {
    # (word, bits) of the 512-bit entry
    "pgtt-5": (0, 0b111 << 6, 0b101 << 6),  # PGTT 5 is a reserved encoding
    "aw-4": (0, 0b111 << 2, 0b100 << 2),  # AW 4 is a reserved encoding
    "bit-10": (0, 0, 1 << 10),  # bits 11:10 are reserved
}
PASID_ENTRY_RESERVED_IGNORED = (
    "vtd_get_pe_in_pasid_leaf_table (hw/i386/intel_iommu.c) checks a PASID entry's PGTT "
    "(vtd_pe_type_check) and its level, never its reserved bits: an entry with bit 10 set "
    "keeps translating through its second-stage tables, so the device keeps all its host "
    "mappings where the hardware would fault every request (trace: "
    "'vtd_inv_desc_pasid_cache_psi PASID selective PC invalidation domain 0x1 pasid 0x0', "
    "no vtd_switch_address_space, no UNMAP)."
)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("pgtt-5", marks=KEPT_ON_10_2),
        pytest.param("aw-4", marks=KEPT_ON_10_2),
        pytest.param(
            "bit-10",
            marks=pytest.mark.xfail(
                strict=True, raises=AssertionError, reason=PASID_ENTRY_RESERVED_IGNORED
            ),
        ),
    ],
)
async def test_reserved_pasid_entry_maps_nothing(vtd_rig: RigFactory, kind: str) -> None:
    """A present RID_PASID entry made malformed (a reserved PGTT or AW encoding, or a
    reserved bit) under a populated domain, then the PASID-selective PASID-cache invalidation
    and the P-IOTLB flush: the walk faults the entry (PASID_ENTRY_INVALID / _RESERVED) and the
    host must end with nothing mapped."""
    rig = await second_stage(vtd_rig)
    word, clear, bits = RESERVED[kind]
    addr = rig.driver.pasid_entry_addr(D0, 0) + 8 * word
    raw = int.from_bytes(rig.machine.ram.read(addr, 8), "little")
    rig.machine.ram.write(addr, (raw & ~clear | bits).to_bytes(8, "little"))
    view = rig.view("d0")
    assert view.mode is DeviceMode.BLOCKED
    assert view.faults[0].reason in (Fault.PASID_ENTRY_INVALID, Fault.PASID_ENTRY_RESERVED)
    async with rig.switch_step(f"PASID entry {kind}, pasid-cache psi"):
        await entry_changed(rig, "pasid")


# ---- PASID-based IOTLB PSIs with masks -------------------------------------------------------


@pytest.mark.parametrize(("am", "size"), [(0, PAGE_4K), (3, 0x8000), (9, PAGE_2M)])
async def test_rid_pasid_psi_with_mask_remaps_the_block(
    vtd_rig: RigFactory, am: int, size: int
) -> None:
    """RID_PASID: a block of (1 << am) pages retargeted, one PASID-based PSI with that mask:
    UNMAP then MAP of each page (a 2 MiB leaf for am=9), nothing else."""
    rig = await vtd_rig(devices=("d0",), scalable=True)
    await rig.translate({"d0": 1})
    dom = rig.driver.domain(1)
    page = PAGE_2M if am == 9 else PAGE_4K
    async with rig.step("map the block"):
        await rig.driver.map(dom, IOVA, DATA_BASE, size, page_size=page)
    new = Leaves(IOVA, DATA_BASE + 0x40_0000, size, page_size=page)
    dom.tables.map(new.iova, new.gpa, new.size, page_size=page)
    async with rig.change_step(f"p-iotlb psi am={am}", [(IOVA, size)]) as events:
        await rig.driver.piotlb_psi(1, IOVA, am=am, pasid=0)
    assert ops(events) == remaps_of(new)


@pytest.mark.parametrize("am", [0, 4, 9])
async def test_other_pasid_psi_reaches_only_its_own_address_space(
    vtd_rig: RigFactory, am: int
) -> None:
    """PASID 1 has an entry in the same domain (1) with tables of its own; new leaves there and
    a PASID-based PSI of PASID 1 with mask `am` reach RID_PASID's notifier not at all (rule
    notifier_hears_own_pasid_only); the same PSI for RID_PASID then maps RID_PASID's own
    new leaves, and a PASID-selective P-IOTLB of PASID 1 is silent too."""
    rig = await vtd_rig(devices=("d0",), scalable=True)
    await rig.translate({"d0": 1})
    own = rig.driver.domain(1)
    other = rig.driver.new_tables()
    rig.driver.set_pasid_entry(D0, OTHER, did=1, tables=other)
    async with pasid_step(rig, "PASID 1 entry, pasid-cache of PASID 1", OTHER):
        await rig.driver.pasid_cache_pasid(1, OTHER)
    size = PAGE_4K << am
    other.map(IOVA, DATA_BASE + 0x80_0000, size)
    async with pasid_step(rig, f"p-iotlb psi of PASID 1 am={am}", OTHER) as events:
        await rig.driver.piotlb_psi(1, IOVA, am=am, pasid=OTHER)
        await rig.driver.pasid_dev_iotlb(D0, OTHER, IOVA, 1 << am)
    assert ops(events) == []
    own.tables.map(IOVA, DATA_BASE, size)
    async with pasid_step(rig, f"p-iotlb psi of RID_PASID am={am}", 0) as events:
        await rig.driver.piotlb_psi(1, IOVA, am=am, pasid=0)
    assert ops(events) == maps_of(Leaves(IOVA, DATA_BASE, size))
    other.unmap(IOVA, size)
    async with pasid_step(rig, "p-iotlb all-in-pasid of PASID 1", OTHER) as events:
        await rig.driver.piotlb_pasid(1, OTHER)
    assert ops(events) == []
