"""Guest userspace VFIO (type1) through intel-iommu to our vfio-user host, end to end.

A real guest kernel builds the VT-d tables and sends the invalidations; QEMU's notifiers turn
them into DMA_MAP / DMA_UNMAP on our host. At every quiescent point the host record must equal
both oracles: the guest's declared intent (IOVA -> the GPAs /proc/self/pagemap reports) and an
independent walk of the live VT-d tables in guest RAM (VM paused).
Cases of one configuration share a booted guest (`shared_guest`), each after a reset that is
checked to reach the fresh boot's state (fixtures/rig/guest_pool.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conformance.known_bugs import U32_DMA_COUNT
from fixtures.guest.machine import GUEST_IOMMU, Guest
from fixtures.guest.vfio import GuestVfioDevice
from fixtures.plugins.guest import SHARED_LOOP, SharedGuestFactory
from fixtures.rig.guest_pool import GuestLease
from fixtures.rig.guest_rig import CheckedContainer, device_state
from fixtures.vfio_user.dma_engine import DmaDirection, DmaPath, DmaStatus, FaultReason
from fixtures.vfio_user.server import VfioUserServer
from fixtures.vfio_user.wire import DmaAccess
from fixtures.vtd.registers import DMAR_BASE, RTADDR, RTADDR_SMT

pytestmark = [pytest.mark.guest, SHARED_LOOP]

DEV_A_BDF = "0000:00:03.0"
DEV_A = {"devA": 3}  # the shared guest's vfio-user device: host devA in slot 3 of pcie.0
IOVA = 0x10_0000


async def device_in_container(
    lease: GuestLease,
) -> tuple[VfioUserServer, Guest, CheckedContainer, GuestVfioDevice]:
    """The leased guest's vfio-user device at 00:03.0, bound to vfio-pci in a checked
    container."""
    srv, g = lease.hosts["devA"], lease.guest
    c = CheckedContainer(g)
    dev = GuestVfioDevice(srv, DEV_A_BDF)
    await c.add(dev)
    return srv, g, c, dev


HUGE = 2 << 20


@pytest.mark.parametrize(
    "iommu",
    [
        pytest.param(GUEST_IOMMU, id="legacy"),
        pytest.param({**GUEST_IOMMU, "scalable-mode": True}, id="scalable"),
    ],
)
async def test_type1_maps_reach_host_as_guest_intended(
    shared_guest: SharedGuestFactory, iommu: dict[str, Any]
) -> None:
    """Small and large maps, read-only and read-write, then partial and full unmaps, with
    legacy and scalable-mode (second-stage) translation tables."""
    lease = await shared_guest(DEV_A, iommu=iommu)
    srv, g = lease.hosts["devA"], lease.guest
    rtaddr = await g.read_phys_u64(DMAR_BASE + RTADDR)
    assert bool(rtaddr & RTADDR_SMT) == bool(iommu.get("scalable-mode")), f"RTADDR {rtaddr:#x}"
    c = CheckedContainer(g)
    await c.add(GuestVfioDevice(srv, DEV_A_BDF))
    await c.alloc("small", 8 * 4096)
    await c.alloc("huge", HUGE, hugepage=True)
    for i in range(4):  # four single pages, scattered IOVAs
        await c.map("small", IOVA + i * 0x10000, offset=i * 4096, size=4096)
    await c.map("small", 0x20_0000, offset=4 * 4096, size=4 * 4096, write=False)
    await c.map("huge", 0x4000_0000)  # 2 MiB aligned: eligible for a superpage leaf
    await c.check()
    # A 2 MiB leaf in the guest's tables is one translation: the host gets it whole.
    async with g.paused():
        view, _host = await device_state(g, c.devices[0])
    leaf = [t for t in view.translations if t.iova == 0x4000_0000]
    assert leaf, "the hugepage map is not in the VT-d tables"
    assert leaf[0].size == HUGE, f"the guest did not use a 2 MiB leaf (CAP.SLLPS allows): {leaf}"
    host = srv.table.lookup(0x4000_0000)
    assert host is not None
    assert (host.iova, host.size) == (0x4000_0000, HUGE), host
    await c.unmap(IOVA + 0x10000, 4096)
    await c.unmap(0x20_0000, 4 * 4096)
    await c.check()
    await c.unmap(0, 1 << 32)  # one unmap covering every live mapping and more
    await c.check()
    assert len(srv.table) == 0


async def test_device_dma_both_directions_then_faults_after_unmap(
    shared_guest: SharedGuestFactory,
) -> None:
    """DMA through the host mapping lands in the guest buffer and back; after the guest
    unmaps, the device's DMA faults on the host side and the guest buffer stays untouched."""
    lease = await shared_guest(DEV_A)
    srv, g, c, dev = await device_in_container(lease)
    await c.alloc("buf", 4 * 4096)
    await c.map("buf", IOVA)
    await c.check()

    # Device -> guest memory, through our host mapping table.
    pattern = bytes(range(256)) * 2
    srv.engine.buffer[: len(pattern)] = pattern
    r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=IOVA + 0x1800, length=len(pattern))
    assert r.status is DmaStatus.DONE, r
    got = await g.call("read", buffer="buf", offset=0x1800, size=len(pattern))
    assert bytes.fromhex(got) == pattern

    # Guest memory -> device.
    await g.call("fill", buffer="buf", byte=0x5A, offset=0x3000, size=0x100)
    r = await dev.dma(g, DmaDirection.FROM_MEMORY, src=IOVA + 0x3000, length=0x100)
    assert r.status is DmaStatus.DONE, r
    assert bytes(srv.engine.buffer[:0x100]) == b"\x5a" * 0x100

    await c.unmap(IOVA, 4 * 4096)
    await c.check()
    before = await g.call("read", buffer="buf")
    srv.engine.buffer[: len(pattern)] = bytes(len(pattern))
    r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=IOVA + 0x1800, length=len(pattern))
    assert r.status is DmaStatus.FAULT, r
    assert (r.fault_reason, r.fault_iova) == (FaultReason.UNMAPPED, IOVA + 0x1800)
    assert await g.call("read", buffer="buf") == before, "DMA after unmap reached the buffer"


@U32_DMA_COUNT
async def test_client_path_dma_agrees_with_the_host_then_faults_after_unmap(
    shared_guest: SharedGuestFactory,
) -> None:
    """QEMU's own translation path (vfio-user DMA_WRITE messages, translated by the vIOMMU)
    lands where the guest mapped; after the unmap QEMU refuses the DMA_WRITE, the buffer stays
    untouched and the guest logs the DMAR fault."""
    lease = await shared_guest(DEV_A)
    srv, g, c, dev = await device_in_container(lease)
    await c.alloc("buf", 4 * 4096)
    await c.map("buf", IOVA)
    await c.check()
    sent = b"client-path-ok!!"
    srv.engine.buffer[:16] = sent
    r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=IOVA + 0x10, length=16, path=DmaPath.CLIENT)
    assert r.status is DmaStatus.DONE, r
    got = bytes.fromhex(await g.call("read", buffer="buf", offset=0x10, size=16))
    assert got == sent, DmaAccess.explain_landed(got, sent)

    await c.unmap(IOVA, 4 * 4096)
    await c.check()
    before = await g.call("read", buffer="buf")
    # The DMA_WRITE is refused and the guest sees a DMAR fault.
    r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=IOVA + 0x10, length=16, path=DmaPath.CLIENT)
    assert (r.status, r.fault_reason) == (DmaStatus.FAULT, FaultReason.CLIENT_ERROR), r
    assert await g.call("read", buffer="buf") == before, "client-path DMA after unmap landed"
    # VT-d fault reason 5: a write through a second-level entry whose W bit is clear
    # (a non-present entry has neither R nor W). The fault record holds the page address.
    want = f"[DMA Write NO_PASID] Request device [00:03.0] fault addr {IOVA:#x} [fault reason 0x05]"
    for _ in range(25):  # the guest logs the fault from its fault-event interrupt
        if any(want in line for line in await lease.dmesg()):  # this case's lines only
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"no guest DMAR fault logged: {want!r}")


async def test_read_only_mapping_faults_device_writes(
    shared_guest: SharedGuestFactory,
) -> None:
    """A map without VFIO_DMA_MAP_FLAG_WRITE reaches the host read-only: reads work,
    device writes fault with a permission error and do not modify the buffer."""
    lease = await shared_guest(DEV_A)
    srv, g, c, dev = await device_in_container(lease)
    await c.alloc("ro", 4096)
    await g.call("fill", buffer="ro", byte=0x33)
    await c.map("ro", IOVA, write=False)
    await c.check()
    r = await dev.dma(g, DmaDirection.FROM_MEMORY, src=IOVA, length=64)
    assert r.status is DmaStatus.DONE, r
    assert bytes(srv.engine.buffer[:64]) == b"\x33" * 64
    srv.engine.buffer[:64] = b"\xee" * 64
    r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=IOVA, length=64)
    assert (r.status, r.fault_reason) == (DmaStatus.FAULT, FaultReason.PERMISSION), r
    assert bytes.fromhex(await g.call("read", buffer="ro", size=64)) == b"\x33" * 64


async def test_two_containers_keep_their_domains_apart(
    shared_guest: SharedGuestFactory,
) -> None:
    """Two devices in two type1 containers (two guest domains) map the same IOVA to
    different buffers: each host record holds only its own container's mapping, and each
    device's DMA at that IOVA lands in its own buffer."""
    lease = await shared_guest({"devA": 3, "devB": 4})
    a, b, g = lease.hosts["devA"], lease.hosts["devB"], lease.guest
    ca, cb = CheckedContainer(g, "ca"), CheckedContainer(g, "cb")
    dev_a, dev_b = GuestVfioDevice(a, DEV_A_BDF), GuestVfioDevice(b, "0000:00:04.0")
    await ca.add(dev_a)
    await cb.add(dev_b)
    await ca.alloc("for_a", 4096)
    await cb.alloc("for_b", 4096)
    await ca.map("for_a", IOVA)
    await cb.map("for_b", IOVA)
    await ca.check()  # devA's record == container ca's intent only
    await cb.check()
    a.engine.buffer[:5] = b"AAAAA"
    b.engine.buffer[:5] = b"BBBBB"
    for dev, g_buf, want in ((dev_a, "for_a", b"AAAAA"), (dev_b, "for_b", b"BBBBB")):
        r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=IOVA + 8, length=5)
        assert r.status is DmaStatus.DONE, r
        assert bytes.fromhex(await g.call("read", buffer=g_buf, offset=8, size=5)) == want
    await cb.unmap(IOVA, 4096)
    await ca.check()  # devA keeps its mapping when the other domain unmaps the same IOVA
    await cb.check()
