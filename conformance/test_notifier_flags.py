"""Notifier flags: a notifier sees only the event types it registered, and intel-iommu refuses
notifiers it cannot serve.

QEMU: vtd_iommu_notify_flag_changed (hw/i386/intel_iommu.c) refuses MAP without caching-mode
and any notifier with snoop-control (b8d78277c0 / 09adb0e021); memory_region_notify_iommu_one
delivers by flag. vfio registers MAP|UNMAP (IOMMU_NOTIFIER_IOTLB_EVENTS) and no DEVIOTLB_UNMAP.
With vfio-user QEMU skips the caching-mode check at realize, so the refusal surfaces only when
the guest enables DMA remapping: pinned below.
"""

from __future__ import annotations

import asyncio

import pytest

from fixtures.oracle.dma_event import DmaOp
from fixtures.qemu.errors import QTestError
from fixtures.rig.vtd_rig import D0, DATA_BASE, IOVA, RigFactory, VtdRig, ops
from fixtures.vtd.page_tables import PAGE_4K

pytestmark = pytest.mark.qtest


async def refused_on_dmar_enable(rig: VtdRig, message: str) -> None:
    """Enabling DMAR must make QEMU refuse vfio's notifier: it reports `message` and stops
    (vfio cannot continue without its mappings); no MAP under translation reaches the host."""
    rig.driver.attach(D0, rig.driver.domain(1))
    rig.driver.domain(1).tables.map(IOVA, DATA_BASE, PAGE_4K)
    await rig.driver.flush_context(D0, 1)
    before = len(rig.devices["d0"].events)
    rig.machine.exit_expected = True
    with pytest.raises(QTestError):
        await rig.driver.enable_translation()
    for _ in range(100):
        if not rig.machine.running:
            break
        await asyncio.sleep(0.02)
    assert not rig.machine.running, "QEMU kept running with a refused MAP notifier"
    stderr = rig.machine.stderr_path.read_text(errors="replace")
    assert message in stderr, stderr[-400:]
    assert "vfio: DMA mapping failed" in stderr
    after = rig.devices["d0"].events[before:]
    assert not [e for e in after if e.op is DmaOp.MAP], "a MAP got through the refused notifier"
    rig.devices["d0"].present = False


async def test_caching_mode_off_realizes_and_works_untranslated(vtd_rig: RigFactory) -> None:
    """vfio-user skips the realize-time caching-mode check: the device starts, identity-mapped."""
    rig = await vtd_rig(devices=("d0",), iommu={"caching-mode": False})
    assert rig.machine.running
    await rig.check("caching-mode=off, DMAR off")


@pytest.mark.qemu_stderr(r"hardware error: vfio: DMA mapping failed")
async def test_caching_mode_off_refuses_map_notifier_on_dmar_enable(vtd_rig: RigFactory) -> None:
    """vtd_iommu_notify_flag_changed: MAP without caching-mode is refused ('requires caching mode');
    vfio then stops QEMU (hw_error 'DMA mapping failed')."""
    rig = await vtd_rig(devices=("d0",), iommu={"caching-mode": False})
    await refused_on_dmar_enable(rig, "requires caching mode")


@pytest.mark.qemu_stderr(r"hardware error: vfio: DMA mapping failed")
async def test_snoop_control_rejects_every_notifier(vtd_rig: RigFactory) -> None:
    """vtd_iommu_notify_flag_changed: snoop-control=on refuses vfio's notifier; QEMU stops rather
    than run unprotected."""
    rig = await vtd_rig(devices=("d0",), iommu={"snoop-control": True})
    await refused_on_dmar_enable(rig, "Snoop Control with vhost or VFIO is not supported")


async def test_map_unmap_notifier_gets_both(vtd_rig: RigFactory) -> None:
    """vfio's IOMMU_NOTIFIER_IOTLB_EVENTS notifier receives both MAP and UNMAP events."""
    rig = await vtd_rig(devices=("d0",))
    await rig.translate({"d0": 1})
    dom = rig.driver.domain(1)
    async with rig.step("map") as mapped:
        await rig.driver.map(dom, IOVA, DATA_BASE, 0x3000)
    async with rig.change_step("unmap", [(IOVA, 0x3000)], remapped=False) as unmapped:
        await rig.driver.unmap(dom, IOVA, 0x3000)
    pages = [IOVA + off for off in range(0, 0x3000, PAGE_4K)]
    assert ops(mapped) == [(DmaOp.MAP, page, PAGE_4K) for page in pages]
    assert ops(unmapped) == [(DmaOp.UNMAP, page, PAGE_4K) for page in pages]


async def test_device_iotlb_descriptor_never_reaches_vfio(vtd_rig: RigFactory) -> None:
    """device-iotlb=on: a device-IOTLB invalidation notifies DEVIOTLB_UNMAP only; vfio did not
    register it, so nothing reaches the host, least of all a MAP."""
    rig = await vtd_rig(devices=("d0",), iommu={"device-iotlb": True})
    await rig.translate({"d0": 1})
    dom = rig.driver.domain(1)
    async with rig.step("map"):
        await rig.driver.map(dom, IOVA, DATA_BASE, 0x4000)
    async with rig.noop_step("device-IOTLB invalidations"):
        await rig.driver.dev_iotlb(D0, IOVA, 1)
        await rig.driver.dev_iotlb(D0, IOVA, 4)


async def test_device_iotlb_descriptor_does_not_replace_the_iotlb_flush(
    vtd_rig: RigFactory,
) -> None:
    """A guest that unmaps and sends only the device-IOTLB invalidation leaves vfio's mapping
    alone (vfio follows the IOTLB, not the ATC); the PSI that follows removes it."""
    rig = await vtd_rig(devices=("d0",), iommu={"device-iotlb": True})
    await rig.translate({"d0": 1})
    dom = rig.driver.domain(1)
    async with rig.step("map"):
        await rig.driver.map(dom, IOVA, DATA_BASE, 0x4000)
    dom.tables.unmap(IOVA, PAGE_4K)
    async with rig.noop_step("device-IOTLB only", skip=("d0",)):
        await rig.driver.dev_iotlb(D0, IOVA, 1)
    async with rig.change_step("PSI", [(IOVA, PAGE_4K)], remapped=False):
        await rig.driver.iotlb_psi(1, IOVA, 0)
