"""vhost's IOMMU notifiers, seen by the suite's own vhost-user backend (qtest tier).

vhost registers one notifier per IOMMU section of the device's DMA address space when it
starts with VIRTIO_F_ACCESS_PLATFORM (`vhost_iommu_region_add`, hw/virtio/vhost.c): flags
IOMMU_NOTIFIER_UNMAP, or IOMMU_NOTIFIER_DEVIOTLB_UNMAP once the guest enabled ATS on the
device; no MAP, no replay. Each notification becomes one VHOST_USER_IOTLB_MSG INVALIDATE to
the backend, which fetches translations itself (IOTLB MISS -> UPDATE).

Expected values come from what the case programmed and VT-d semantics, never from QEMU's
output: a PSI invalidates 2^am 4 KiB pages from its address; with no MAP notifier on the
address space there is nothing to walk, so an UNMAP-only notifier is told the PSI's range,
cropped to its section; DSI, global and context-cache invalidations may have changed
anything, so they reach it as invalidations covering its whole section; a device-IOTLB
descriptor (ATS size encoding) reaches only a DEVIOTLB notifier, and nothing else does. The
interrupt window is not remapped, so each device has two notifiers, one per section of the
remapping region.

The set-up (firmware, the VT-d driver, the virtio driver up to DRIVER_OK) and the checks every
case gets at teardown (backend protocol errors, unsolicited UPDATEs, QEMU stderr lines the
case did not declare) are the vhost rig's: fixtures/rig/vhost_rig.py, and the `vhost_rig`
fixture in fixtures/plugins/vhost_user.py.
"""

from __future__ import annotations

import asyncio

import pytest

from fixtures.oracle.dma_event import DmaOp
from fixtures.oracle.iotlb_rules import Invalidation, Leaf, Scope, check_translation, check_window
from fixtures.plugins.harness import Launcher
from fixtures.plugins.vfio_user import VfioUserHostFactory
from fixtures.plugins.vhost_user import VhostUserBackendFactory
from fixtures.qemu.errors import QTestError
from fixtures.rig.vhost_rig import (
    DATA_GPA,
    DATA_IOVA,
    DID,
    NET,
    OTHER,
    QUEUES,
    RING_GPA,
    SECTIONS,
    UNMAPPED,
    VFIO,
    Range,
    VhostRigFactory,
    bring_up,
    covers,
    cropped,
    dma_ops,
    ranges,
    show,
    start_rig,
    whole_sections,
)
from fixtures.vhost_user.record import Direction, NoTranslation, Translation
from fixtures.vhost_user.wire import VIRTIO_F_ACCESS_PLATFORM as WIRE_ACCESS_PLATFORM
from fixtures.vhost_user.wire import Access, IotlbType
from fixtures.vtd.page_tables import PAGE_2M, PAGE_4K

pytestmark = pytest.mark.qtest


# ---- vhost start ------------------------------------------------------------------------------


async def test_vhost_start_fetches_exactly_the_used_rings(vhost_rig: VhostRigFactory) -> None:
    """Pins vhost_dev_start with an IOMMU: features with ACCESS_PLATFORM acked, the memory
    table with the RAM fds, the rings as IOVAs (SET_VRING_ADDR); the backend is told no
    translation but the used rings' (one UPDATE each, the 4 KiB leaf the case mapped,
    writable), and no INVALIDATE."""
    rig = await vhost_rig()
    connection = rig.backend.current
    assert connection is not None
    assert connection.features & 1 << WIRE_ACCESS_PLATFORM
    for q, ring in enumerate(rig.rings):
        addr = connection.vrings[q].addr
        assert addr is not None
        assert (addr.desc, addr.avail, addr.used) == ring.pages
        assert connection.vrings[q].num == ring.size
    # The memory table is guest RAM (512 MiB, without the 0xc0000-0x100000 ROM shadows), and
    # the backend's mappings of its fds show the guest's bytes.
    table = connection.mem_table
    assert table is not None
    assert sorted((r.gpa, r.size) for r in table.regions) == [
        (0, 0xC0000),
        (0x100000, (512 << 20) - 0x100000),
    ]
    pattern = bytes(range(256)) * 16
    rig.machine.ram.write(DATA_GPA, pattern)
    assert connection.read_gpa(DATA_GPA, len(pattern)) == pattern
    expected = [
        (IotlbType.UPDATE, ring.used, PAGE_4K, RING_GPA + q * 0x4000 + 0x2000, Access.RW)
        for q, ring in enumerate(rig.rings)
    ]
    got = [(e.type, e.iova, e.size, e.gpa, e.perm) for e in rig.backend.record]
    assert got == expected, show(rig.backend.record)


# ---- UNMAP-only notifier ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "am"),
    [
        (0x2000_0000, 0),
        (0x2000_0000, 3),  # masked: 8 pages
        (0x4000_0000, 9),  # one 2 MiB block
        (0x1_0000_0000, 0),  # above the interrupt window: the upper notifier
        (0xFE00_0000, 13),  # 32 MiB straddling the window: both notifiers, cropped
    ],
    ids=["4k", "masked-32k", "masked-2m", "upper-section", "straddling-window"],
)
async def test_psi_reaches_unmap_notifier_as_its_range(
    vhost_rig: VhostRigFactory,
    addr: int,
    am: int,
) -> None:
    """Pins vtd_iotlb_page_invalidate_notify for a notifier without MAP: no page walk, the
    PSI's own range, cropped to each notifier's section, nothing else."""
    rig = await vhost_rig()
    events = await rig.submit(Invalidation(Scope.PSI, domain=DID, addr=addr, am=am))
    assert all(e.type is IotlbType.INVALIDATE for e in events), show(events)
    assert len(events) == len(cropped(addr, PAGE_4K << am)), show(events)
    assert set(ranges(events)) == cropped(addr, PAGE_4K << am), show(events)


async def test_psi_with_invalidation_hint_reaches_unmap_notifier_as_its_range(
    vhost_rig: VhostRigFactory,
) -> None:
    """IH=1 says only leaf entries changed: the range still has to be invalidated."""
    rig = await vhost_rig()
    mark = rig.backend.mark
    await rig.driver.iotlb_psi(DID, 0x2000_0000, 2, ih=True)
    events = rig.since(mark)
    psi = Invalidation(Scope.PSI, domain=DID, addr=0x2000_0000, am=2)
    assert check_window(psi, events, rig.consumer) == [], show(events)
    assert ranges(events) == [(0x2000_0000, 4 * PAGE_4K)]


async def test_psi_of_another_domain_reaches_nothing(vhost_rig: VhostRigFactory) -> None:
    """A PSI names a domain id: the device's domain is DID, so DID+1's PSI is not for it."""
    rig = await vhost_rig()
    assert await rig.submit(Invalidation(Scope.PSI, domain=DID + 1, addr=0x2000_0000)) == []


@pytest.mark.parametrize("scope", ["domain", "global", "cc-device", "flush-context"])
async def test_wide_invalidation_reaches_unmap_notifier_as_whole_sections(
    vhost_rig: VhostRigFactory,
    scope: str,
) -> None:
    """Pins vtd_address_space_sync for a notifier without MAP: DSI, global IOTLB and a
    device's context-cache invalidation each invalidate both notifiers' whole ranges,
    once."""
    rig = await vhost_rig()
    sid = NET.bus << 8 | NET.devfn
    if scope == "domain":
        events = await rig.submit(Invalidation(Scope.DSI, domain=DID))
    elif scope == "global":
        events = await rig.submit(Invalidation(Scope.GLOBAL))
    elif scope == "cc-device":
        events = await rig.submit(Invalidation(Scope.CC_DEVICE, domain=DID, sid=sid))
    else:  # context-cache for the device, then the domain's IOTLB: two syncs
        mark = rig.backend.mark
        await rig.driver.flush_context(NET, DID)
        events = rig.since(mark)
    assert all(e.type is IotlbType.INVALIDATE for e in events), show(events)
    per_sync = sorted(whole_sections())
    syncs = 2 if scope == "flush-context" else 1
    assert sorted(ranges(events)) == sorted(per_sync * syncs), show(events)


@pytest.mark.parametrize("scope", ["cc-domain", "cc-global"])
async def test_context_cache_flush_covers_each_section_and_stays_inside_it(
    vhost_rig: VhostRigFactory,
    scope: str,
) -> None:
    """A domain or global context-cache invalidation may move the device anywhere: every
    INVALIDATE lies inside one notifier's section and together they cover both sections."""
    rig = await vhost_rig()
    if scope == "cc-domain":
        events = await rig.submit(Invalidation(Scope.CC_DOMAIN, domain=DID))
    else:
        events = await rig.submit(Invalidation(Scope.CC_GLOBAL))
    assert events
    assert all(e.type is IotlbType.INVALIDATE for e in events), show(events)
    for event in events:
        assert any(s <= event.iova and event.end <= e for s, e in SECTIONS), event.describe()
    for start, end in SECTIONS:
        inside = [e for e in events if start <= e.iova < end]
        assert covers(inside, start, end), f"section {start:#x}-{end:#x}:\n{show(inside)}"


async def test_device_iotlb_does_not_reach_unmap_notifier(vhost_rig: VhostRigFactory) -> None:
    """ATS is off: the notifier is UNMAP-only, and a device-IOTLB descriptor is not an
    IOTLB invalidation (memory_region_notify_iommu_one checks the event type)."""
    rig = await vhost_rig()
    assert not await rig.ats.enabled()
    sid = NET.bus << 8 | NET.devfn
    for addr, pages in ((0x2000_0000, 4), (0x1_0000_0000, 1)):
        dev = Invalidation(Scope.DEV_IOTLB, sid=sid, addr=addr, pages=pages)
        assert await rig.submit(dev) == []


# ---- DEVIOTLB_UNMAP notifier (ATS enabled by the guest) ------------------------------------------


@pytest.mark.parametrize(
    ("addr", "pages"),
    [(0x2000_0000, 1), (0x2000_0000, 4), (0x4000_0000, 512), (0x1_0000_0000, 16)],
    ids=["4k", "16k", "2m", "upper-section"],
)
async def test_device_iotlb_reaches_deviotlb_notifier_as_its_ats_range(
    vhost_rig: VhostRigFactory,
    addr: int,
    pages: int,
) -> None:
    """Pins vtd_process_device_iotlb_desc: the descriptor's range (S bit and address
    low bits encode 2^n pages) reaches the device's DEVIOTLB notifier, cropped to its
    section."""
    rig = await vhost_rig(ats=True)
    sid = NET.bus << 8 | NET.devfn
    events = await rig.submit(Invalidation(Scope.DEV_IOTLB, sid=sid, addr=addr, pages=pages))
    span = pages * PAGE_4K
    assert all(e.type is IotlbType.INVALIDATE for e in events), show(events)
    assert ranges(events) == sorted(cropped(addr & ~(span - 1), span)), show(events)


async def test_iotlb_invalidations_do_not_reach_deviotlb_notifier(
    vhost_rig: VhostRigFactory,
) -> None:
    """With ATS enabled vhost registers DEVIOTLB_UNMAP only: PSI, DSI, global IOTLB and
    every context-cache scope are not device-IOTLB events; a device-IOTLB descriptor for
    another requester id is not for this device."""
    rig = await vhost_rig(ats=True)
    sid = NET.bus << 8 | NET.devfn
    other = OTHER.bus << 8 | OTHER.devfn
    for inv in (
        Invalidation(Scope.PSI, domain=DID, addr=0x2000_0000),
        Invalidation(Scope.PSI, domain=DID, addr=0xFE00_0000, am=13),
        Invalidation(Scope.DSI, domain=DID),
        Invalidation(Scope.GLOBAL),
        Invalidation(Scope.CC_DEVICE, domain=DID, sid=sid),
        Invalidation(Scope.CC_DOMAIN, domain=DID),
        Invalidation(Scope.CC_GLOBAL),
        Invalidation(Scope.DEV_IOTLB, sid=other, addr=0x2000_0000),
    ):
        assert await rig.submit(inv) == [], inv.describe()


async def test_toggling_ats_re_registers_the_notifier_without_replay(
    vhost_rig: VhostRigFactory,
) -> None:
    """Pins vhost_toggle_device_iotlb (virtio-net): the guest's ATS enable bit switches
    vhost's notifiers between UNMAP and DEVIOTLB_UNMAP while vhost runs, and the
    re-registration itself sends nothing (no replay to an invalidation-only notifier)."""
    rig = await vhost_rig()
    psi = cropped(0x2000_0000, PAGE_4K)
    dev = cropped(0x3000_0000, 4 * PAGE_4K)
    sid = NET.bus << 8 | NET.devfn

    async def observe() -> tuple[set[Range], set[Range]]:
        """What a PSI and a device-IOTLB invalidation reach now (each judged by the rules of
        the notifier kind the ATS bit selects)."""
        by_psi = await rig.submit(Invalidation(Scope.PSI, domain=DID, addr=0x2000_0000))
        dev_inv = Invalidation(Scope.DEV_IOTLB, sid=sid, addr=0x3000_0000, pages=4)
        by_dev = await rig.submit(dev_inv)
        return set(ranges(by_psi)), set(ranges(by_dev))

    assert await observe() == (psi, set())
    for on, expected in ((True, (set(), dev)), (False, (psi, set())), (True, (set(), dev))):
        mark = rig.backend.mark
        await rig.set_ats(on)
        assert rig.since(mark) == [], f"ATS {on}: {show(rig.since(mark))}"
        assert await observe() == expected, f"after ATS {'on' if on else 'off'}"


async def test_ats_without_device_iotlb_support_stops_qemu_naming_the_device(
    vhost_user_backend: VhostUserBackendFactory, launch: Launcher
) -> None:
    """vtd_iommu_notify_flag_changed refuses a DEVIOTLB_UNMAP notifier when the IOMMU has no
    device-IOTLB support. The guest enabling ATS (a capability of the virtio device's own)
    makes the running vhost re-register for device-IOTLB invalidations; the refusal is fatal
    to vhost (error_fatal), so QEMU stops at once with status 1 and one line naming the device
    by the requester id the case put it at: no crash, and no vhost left without invalidations."""
    rig = await start_rig(vhost_user_backend, launch, device_iotlb=False)
    machine = rig.machine
    machine.exit_expected = True
    with pytest.raises(QTestError):
        await rig.set_ats(True)
    for _ in range(250):
        if not machine.running:
            break
        await asyncio.sleep(0.02)
    assert machine.exitcode == 1, machine.crash_report() or "QEMU kept running"
    named = f"device {NET.bus:02x}.{NET.dev:02x}.{NET.fn:x} requires device IOTLB mode"
    stderr = machine.stderr_path.read_text(errors="replace")
    assert named in stderr, stderr[-600:]


# ---- translations on MISS ---------------------------------------------------------------------


async def test_miss_on_4k_leaf_translates_to_the_programmed_page(
    vhost_rig: VhostRigFactory,
) -> None:
    """The UPDATE for a MISS is the 4 KiB leaf: page-aligned IOVA, one page, the GPA the case
    wrote (through the memory table), writable as mapped."""
    rig = await vhost_rig()
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K)
    result = await rig.backend.translate(DATA_IOVA + 0x123, Access.RO)
    assert isinstance(result, Translation), result
    assert result.gpa == DATA_GPA + 0x123
    update = result.update
    assert (update.iova, update.size, update.gpa) == (DATA_IOVA, PAGE_4K, DATA_GPA)
    assert update.perm is Access.RW
    assert check_translation(update, Leaf(DATA_IOVA, PAGE_4K, DATA_GPA, True, True)) == []


async def test_miss_on_2m_leaf_translates_to_the_whole_leaf(vhost_rig: VhostRigFactory) -> None:
    rig = await vhost_rig()
    iova, gpa = DATA_IOVA + PAGE_2M, DATA_GPA + PAGE_2M
    await rig.map_data(iova, gpa, PAGE_2M, page_size=PAGE_2M)
    result = await rig.backend.translate(iova + 0x12345, Access.WO)
    assert isinstance(result, Translation), result
    assert result.gpa == gpa + 0x12345
    update = result.update
    assert (update.iova, update.size, update.gpa, update.perm) == (iova, PAGE_2M, gpa, Access.RW)
    assert check_translation(update, Leaf(iova, PAGE_2M, gpa, True, True)) == []


@pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU 11.1.3 hands out read-only VT-d entries as RW: address_space_get_iotlb_entry "
        "(system/physmem.c) returns perm = IOMMU_RW for every translation ('IOTLBs are for "
        "DMAs, and DMA only allows on RAMs') and vhost_device_iotlb_miss (hw/virtio/vhost.c) "
        "forwards it as VHOST_ACCESS_RW: the backend may write a page the guest mapped "
        "read-only. Trace: 'vtd_iotlb_page_update IOTLB page update sid 0x100 iova "
        "0x40001010 slpte 0x4001001 domain 0x1' (R, no W); backend record: 'MISS iova "
        "0x40001010 RO' answered 'UPDATE iova 0x40001000+0x1000 (gpa 0x4001000) RW'."
    ),
)
async def test_miss_on_read_only_leaf_is_read_only(vhost_rig: VhostRigFactory) -> None:
    rig = await vhost_rig()
    await rig.map_data(DATA_IOVA + PAGE_4K, DATA_GPA + PAGE_4K, PAGE_4K, write=False)
    result = await rig.backend.translate(DATA_IOVA + PAGE_4K + 0x10, Access.RO)
    assert isinstance(result, Translation), result
    assert result.gpa == DATA_GPA + PAGE_4K + 0x10
    leaf = Leaf(DATA_IOVA + PAGE_4K, PAGE_4K, DATA_GPA + PAGE_4K, read=True, write=False)
    broken = check_translation(result.update, leaf)
    assert not broken, "; ".join(v.describe() for v in broken)


@pytest.mark.parametrize("perm", [Access.WO, Access.RW])
async def test_write_miss_on_read_only_leaf_gets_no_translation(
    vhost_rig: VhostRigFactory,
    perm: Access,
) -> None:
    """A write access to a read-only entry is a DMA fault: no UPDATE, QEMU acks the MISS
    with failure."""
    rig = await vhost_rig()
    rig.expect_stderr(
        r"vtd_iova_to_s[sl]pte: detected s[sl]pte permission error", r"Interrupt Mask"
    )
    rig.expect_stderr(r"vtd_iommu_translate: detected translation failure")
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K, write=False)
    mark = rig.backend.mark
    result = await rig.backend.translate(DATA_IOVA, perm)
    assert isinstance(result, NoTranslation), result
    assert rig.since(mark, IotlbType.UPDATE) == []


async def test_miss_on_unmapped_iova_gets_no_translation(vhost_rig: VhostRigFactory) -> None:
    rig = await vhost_rig()
    rig.expect_stderr(r"vtd_iova_to_s[sl]pte: detected", r"Interrupt Mask")
    rig.expect_stderr(r"vtd_iommu_translate: detected translation failure")
    mark = rig.backend.mark
    result = await rig.backend.translate(UNMAPPED, Access.RO)
    assert isinstance(result, NoTranslation), result
    assert result.reply not in (None, 0), "QEMU should ack the failed MISS with non-zero"
    assert [e.type for e in rig.since(mark)] == [IotlbType.MISS]


async def test_unmap_invalidates_the_translation_before_the_wait_completes(
    vhost_rig: VhostRigFactory,
) -> None:
    """Safety: a translation the backend holds is covered by an INVALIDATE before the
    guest's wait descriptor completes, and a MISS afterwards gets no translation."""
    rig = await vhost_rig()
    rig.expect_stderr(r"vtd_iova_to_s[sl]pte: detected", r"Interrupt Mask")
    rig.expect_stderr(r"vtd_iommu_translate: detected translation failure")
    await rig.map_data(DATA_IOVA, DATA_GPA, 4 * PAGE_4K)
    held = await rig.backend.translate(DATA_IOVA + PAGE_4K, Access.RO)
    assert isinstance(held, Translation), held
    mark = rig.backend.mark
    await rig.driver.unmap(rig.domain, DATA_IOVA, 4 * PAGE_4K)  # returns after the wait
    invalidations = rig.since(mark, IotlbType.INVALIDATE)
    update = held.update
    assert covers(
        [e for e in invalidations if e.iova <= update.iova < e.end], update.iova, update.end
    ), show(invalidations)
    again = await rig.backend.translate(DATA_IOVA + PAGE_4K, Access.RO)
    assert isinstance(again, NoTranslation), again


async def test_miss_is_recorded_in_order_with_its_update(vhost_rig: VhostRigFactory) -> None:
    """The record interleaves both directions: MISS (backend -> QEMU) then UPDATE."""
    rig = await vhost_rig()
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K)
    mark = rig.backend.mark
    await rig.backend.translate(DATA_IOVA, Access.RO)
    events = rig.since(mark)
    assert [(e.direction, e.type) for e in events] == [
        (Direction.TO_QEMU, IotlbType.MISS),
        (Direction.FROM_QEMU, IotlbType.UPDATE),
    ]
    assert [e.seq for e in events] == [mark, mark + 1]


# ---- address-space switches ------------------------------------------------------------------


async def test_dmar_off_invalidates_every_translation_held(vhost_rig: VhostRigFactory) -> None:
    """Turning DMA remapping off changes every translation: each one the backend holds is
    covered by INVALIDATEs once GSTS.TES reads 0 (vtd_switch_address_space unmaps the
    notifiers' ranges up to the address width first)."""
    rig = await vhost_rig()
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K)
    await rig.map_data(DATA_IOVA + PAGE_2M, DATA_GPA + PAGE_2M, PAGE_2M, page_size=PAGE_2M)
    held = [
        await rig.backend.translate(DATA_IOVA, Access.RO),
        await rig.backend.translate(DATA_IOVA + PAGE_2M, Access.RO),
    ]
    mark = rig.backend.mark
    await rig.driver.disable_translation()
    events = rig.since(mark)
    assert all(e.type is IotlbType.INVALIDATE for e in events), show(events)
    for translation in held:
        assert isinstance(translation, Translation), translation
        update = translation.update
        assert covers(
            [e for e in events if e.iova < update.end and update.iova < e.end],
            update.iova,
            update.end,
        ), f"{update.describe()} survives DMAR off:\n{show(events)}"
    for ring in rig.rings:  # vhost's own used-ring translations too
        assert covers([e for e in events if e.iova <= ring.used < e.end], ring.used, ring.used + 1)


async def test_miss_with_dmar_off_is_the_identity(vhost_rig: VhostRigFactory) -> None:
    rig = await vhost_rig()
    await rig.driver.disable_translation()
    result = await rig.backend.translate(DATA_GPA + 0x10, Access.RW)
    assert isinstance(result, Translation), result
    assert result.gpa == DATA_GPA + 0x10
    assert result.update.iova <= DATA_GPA < result.update.end


@pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU 11.1.3 keeps the identity translations a vhost backend obtained while DMA "
        "remapping was off once the guest turns it on: enabling DMAR swaps the nodmar "
        "(system memory) section of the device's DMA address space for the IOMMU one, vhost's "
        "iommu_listener only registers notifiers for the new IOMMU sections "
        "(vhost_iommu_region_add, hw/virtio/vhost.c, no flush) and ignores the removed RAM "
        "section, so no INVALIDATE is sent (the global flushes the guest issues before "
        "enabling reach no notifier: there is none while DMAR is off): the backend keeps "
        "'UPDATE iova 0x4000000+0x1000 (gpa 0x4000000) RW' although, with translation on, "
        "a MISS on that IOVA faults (vtd_iommu_translate: detected translation failure)."
    ),
)
async def test_dmar_on_invalidates_identity_translations_held(vhost_rig: VhostRigFactory) -> None:
    """Safety across a switch: a translation obtained while translation was off (identity)
    no longer holds once it is on and the tables do not map that IOVA. The guest flushes
    context cache and IOTLB globally before enabling, as Linux does (with translation off
    there is no IOMMU section, so no notifier, for those flushes to reach)."""
    rig = await vhost_rig()
    rig.expect_stderr(r"vtd_iova_to_s[sl]pte: detected", r"Interrupt Mask")
    rig.expect_stderr(r"vtd_iommu_translate: detected translation failure")
    await rig.driver.disable_translation()
    identity = await rig.backend.translate(DATA_GPA, Access.RW)
    assert isinstance(identity, Translation), identity
    mark = rig.backend.mark
    await rig.driver.cc_global()  # what Linux flushes before setting GCMD.TE
    await rig.driver.iotlb_global()
    await rig.driver.enable_translation()
    switched = rig.since(mark, IotlbType.INVALIDATE)
    now = await rig.backend.translate(DATA_GPA, Access.RW)
    assert isinstance(now, NoTranslation), f"the tables do not map {DATA_GPA:#x}: {now}"
    update = identity.update
    overlapping = [e for e in switched if e.iova < update.end and update.iova < e.end]
    assert covers(overlapping, update.iova, update.end), (
        f"{update.describe()} still held after DMAR on; the switch sent:\n{show(switched)}"
    )


async def test_system_reset_stops_vhost_and_it_starts_again(vhost_rig: VhostRigFactory) -> None:
    """system_reset resets the virtio device: vhost stops (GET_VRING_BASE of both rings);
    set up again from scratch, vhost restarts and fetches the used rings again."""
    rig = await vhost_rig()
    notes = len(rig.backend.notes)
    await rig.machine.qmp("system_reset")

    def stopped() -> bool:
        connection = rig.backend.current
        return connection is not None and all(r.stopped for r in connection.vrings.values())

    await rig.backend.wait_until(stopped, "GET_VRING_BASE of every ring")
    stops = [n.text for n in rig.backend.notes[notes:] if n.text.startswith("GET_VRING_BASE")]
    assert sorted(stops) == [f"GET_VRING_BASE ring {q} num 0" for q in range(QUEUES)]
    mark = rig.backend.mark
    again = await bring_up(rig.machine, rig.net)
    updates = [(e.type, e.iova, e.gpa) for e in rig.since(mark)]
    assert updates == [
        (IotlbType.UPDATE, ring.used, RING_GPA + q * 0x4000 + 0x2000)
        for q, ring in enumerate(again.rings)
    ], show(rig.since(mark))


@pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU 11.1.3 sends a vhost backend no invalidation across system_reset: the virtio "
        "reset stops vhost (GET_VRING_BASE), vhost_dev_stop unregisters the notifiers "
        "(hw/virtio/vhost.c) and the VT-d reset then has no notifier to tell, and the restart "
        "only pushes the used rings' UPDATEs; the backend keeps 'UPDATE iova 0x40000000+0x1000 "
        "(gpa 0x4000000) RW' from before the reset, although the new tables do not map "
        "0x40000000 (a MISS on it faults)."
    ),
)
async def test_system_reset_invalidates_translations_held(vhost_rig: VhostRigFactory) -> None:
    """Safety across a reset: whatever the backend held before system_reset is invalidated
    before vhost runs again (the reset removed every translation)."""
    rig = await vhost_rig()
    rig.expect_stderr(r"vtd_iova_to_s[sl]pte: detected", r"Interrupt Mask")
    rig.expect_stderr(r"vtd_iommu_translate: detected translation failure")
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K)
    held = await rig.backend.translate(DATA_IOVA, Access.RO)
    assert isinstance(held, Translation), held
    mark = rig.backend.mark
    await rig.machine.qmp("system_reset")
    await bring_up(rig.machine, rig.net)  # a fresh domain that maps the rings only
    across = rig.since(mark, IotlbType.INVALIDATE)
    now = await rig.backend.translate(DATA_IOVA, Access.RO)
    assert isinstance(now, NoTranslation), f"the new tables do not map {DATA_IOVA:#x}: {now}"
    update = held.update
    overlapping = [e for e in across if e.iova < update.end and update.iova < e.end]
    assert covers(overlapping, update.iova, update.end), (
        f"{update.describe()} still held after reset and restart; they sent:\n{show(across)}"
    )


# ---- two kinds of consumer in one domain --------------------------------------------------------


async def test_vfio_and_vhost_in_one_domain_each_see_their_own_kind(
    vfio_user_host: VfioUserHostFactory, vhost_rig: VhostRigFactory
) -> None:
    """One domain, two consumers: vfio (MAP|UNMAP) gets the page walk's MAP for a new leaf,
    vhost (UNMAP-only) gets the PSI's range as an INVALIDATE and no translation; with ATS on,
    a device-IOTLB descriptor reaches vhost only."""
    host = await vfio_user_host("d0")
    rig = await vhost_rig(vfio=host)
    vfio_mark, mark = len(host.table.events), rig.backend.mark
    await rig.map_data(DATA_IOVA, DATA_GPA, 4 * PAGE_4K)  # tables + the PSI covering them
    vfio_events = host.table.events[vfio_mark:]
    assert dma_ops(vfio_events) == [("MAP", DATA_IOVA + i * PAGE_4K, PAGE_4K) for i in range(4)]
    assert all(e.gpa == DATA_GPA + (e.iova - DATA_IOVA) for e in vfio_events)
    vhost_events = rig.since(mark)
    assert ranges(vhost_events) == [(DATA_IOVA, 4 * PAGE_4K)], show(vhost_events)
    assert vhost_events[0].type is IotlbType.INVALIDATE

    await rig.set_ats(True)
    vfio_mark = len(host.table.events)
    sid = NET.bus << 8 | NET.devfn
    dev = await rig.submit(Invalidation(Scope.DEV_IOTLB, sid=sid, addr=DATA_IOVA, pages=4))
    assert ranges(dev) == [(DATA_IOVA, 4 * PAGE_4K)]
    vfio_sid = VFIO.bus << 8 | VFIO.devfn
    assert await rig.submit(Invalidation(Scope.DEV_IOTLB, sid=vfio_sid, addr=DATA_IOVA)) == []
    assert await rig.submit(Invalidation(Scope.PSI, domain=DID, addr=DATA_IOVA, am=2)) == []
    assert all(e.op is not DmaOp.UNMAP_ALL for e in host.table.events[vfio_mark:])
    assert dma_ops(host.table.events[vfio_mark:]) == [], "no change: vfio's walk finds nothing"


# ---- scalable mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "am"), [(0x2000_0000, 0), (0x2000_0000, 3), (0xFE00_0000, 13)])
async def test_scalable_pasid_psi_reaches_unmap_notifier_as_its_range(
    vhost_rig: VhostRigFactory, addr: int, am: int
) -> None:
    """Scalable mode, second-stage tables behind PASID 0: a PASID-based PSI reaches the
    UNMAP-only notifier as its range, cropped to each section, like a legacy PSI."""
    rig = await vhost_rig(scalable=True)
    psi = Invalidation(Scope.PSI, domain=DID, addr=addr, am=am)
    events = await rig.submit(psi, pasid_based=True)
    assert sorted(ranges(events)) == sorted(cropped(addr, PAGE_4K << am)), show(events)


async def test_scalable_pasid_selective_flush_reaches_as_whole_sections(
    vhost_rig: VhostRigFactory,
) -> None:
    rig = await vhost_rig(scalable=True)
    events = await rig.submit(Invalidation(Scope.DSI, domain=DID), pasid_based=True)
    assert sorted(ranges(events)) == sorted(whole_sections()), show(events)


async def test_scalable_miss_translates_through_the_pasid_entry(
    vhost_rig: VhostRigFactory,
) -> None:
    rig = await vhost_rig(scalable=True)
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K)
    result = await rig.backend.translate(DATA_IOVA + 0x44, Access.RO)
    assert isinstance(result, Translation), result
    assert result.gpa == DATA_GPA + 0x44
    assert check_translation(result.update, Leaf(DATA_IOVA, PAGE_4K, DATA_GPA, True, True)) == []


# ---- moving the device between domains --------------------------------------------------------


@pytest.mark.parametrize("scalable", [False, True], ids=["legacy", "scalable"])
async def test_moving_the_device_invalidates_what_the_backend_holds(
    vhost_rig: VhostRigFactory, scalable: bool
) -> None:
    """The guest moves the device to a domain that does not map DATA_IOVA, with the flushes
    the spec asks for (context / PASID cache for the device, then the old domain's IOTLB):
    the translation the backend held is invalidated before the wait completes, and a MISS
    on it now faults."""
    rig = await vhost_rig(scalable=scalable)
    rig.expect_stderr(r"vtd_iova_to_s[sl]pte: detected", r"Interrupt Mask")
    rig.expect_stderr(r"vtd_iommu_translate: detected translation failure")
    await rig.map_data(DATA_IOVA, DATA_GPA, PAGE_4K)
    held = await rig.backend.translate(DATA_IOVA, Access.RO)
    assert isinstance(held, Translation), held
    other = rig.driver.domain(DID + 1)
    for q, ring in enumerate(rig.rings):
        await rig.driver.map(other, ring.desc, RING_GPA + q * 0x4000, ring.span)
    mark = rig.backend.mark
    await rig.driver.attach_and_flush(NET, other)
    await rig.driver.iotlb_domain(DID)
    moved = rig.since(mark, IotlbType.INVALIDATE)
    update = held.update
    overlapping = [e for e in moved if e.iova < update.end and update.iova < e.end]
    assert covers(overlapping, update.iova, update.end), show(moved)
    now = await rig.backend.translate(DATA_IOVA, Access.RO)
    assert isinstance(now, NoTranslation), now
