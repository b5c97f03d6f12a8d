"""Hotplug in a real guest: replay into a hot-added device, and cooperative hot-unplug.

Seeds: replay (memory_region_iommu_replay / vtd_iommu_replay: a notifier registered while
the domain already has mappings gets a MAP for each, and only that notifier does) and type1
replay into a new domain (the guest's type1 attaches the new group to the container's
existing domain, so the device's context entry starts pointing at live page tables). The
guest's attach also sends domain-selective IOTLB invalidations for the shared domain: devA,
already in sync, must see no traffic at all (63b88968f1: DSI unmapped then replayed, a window
in which devA's DMA would fault; 3e090e3489).
q35's root ports use ACPI hotplug by default: device_add / device_del complete at once.
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.guest.machine import GUEST_IOMMU, Guest
from fixtures.guest.vfio import GuestVfioDevice
from fixtures.oracle.dma_event import DmaOp
from fixtures.oracle.expected_state import from_events
from fixtures.plugins.guest import GuestFactory
from fixtures.plugins.vfio_user import VfioUserHostFactory
from fixtures.rig.guest_rig import CheckedContainer
from fixtures.vfio_user.dma_engine import DmaDirection, DmaStatus

pytestmark = pytest.mark.guest

ROOT_PORT: dict[str, Any] = {
    "driver": "pcie-root-port",
    "id": "rp1",
    "bus": "pcie.0",
    "chassis": 1,
    "addr": "0x5",
}
BEHIND_ROOT_PORT = "0000:01:00.0"  # the guest numbers rp1's secondary bus 1


async def _wait_for_pci(g: Guest, bdf: str, present: bool, timeout: float = 20.0) -> None:
    await g.call("wait_pci", bdf=bdf, present=present, within=timeout, timeout=timeout + 5)


@pytest.mark.parametrize(
    "iommu",
    [
        pytest.param(GUEST_IOMMU, id="legacy"),
        pytest.param({**GUEST_IOMMU, "scalable-mode": True}, id="scalable"),
    ],
)
async def test_hotplugged_device_gets_exactly_the_live_mappings(
    guest: GuestFactory, vfio_user_host: VfioUserHostFactory, iommu: dict[str, Any]
) -> None:
    a = await vfio_user_host("devA")
    b = await vfio_user_host("devB")
    g = await guest(devices=[a.device_json(addr="0x3"), ROOT_PORT], iommu=iommu)
    c = CheckedContainer(g)
    await c.add(GuestVfioDevice(a, "0000:00:03.0"))
    await c.alloc("buf", 8 * 4096)
    await c.map("buf", 0x10_0000, size=4 * 4096)
    await c.map("buf", 0x80_0000, offset=4 * 4096, size=4 * 4096, write=False)
    await c.check()

    a_events = len(a.table.events)
    await g.machine.qmp("device_add", **b.device_json(bus="rp1"))
    await b.wait_connected()
    await _wait_for_pci(g, BEHIND_ROOT_PORT, present=True)
    dev_b = GuestVfioDevice(b, BEHIND_ROOT_PORT)
    await g.call("bind", bdf=BEHIND_ROOT_PORT)
    before_attach = len(b.table.events)
    assert not from_events(b.table.events), "devB had host mappings before joining the container"
    await c.add(dev_b)  # type1 attaches devB's group to the container's live domain

    await c.check()  # devB's host record == intent == its VT-d tables; devA's unchanged
    replayed = [e for e in b.table.events[before_attach:] if e.op is DmaOp.MAP]
    pages = sorted(p for e in replayed for p in range(e.iova, e.end, 4096))
    assert pages == sorted(c.intent.pages), "the replay did not map each live page exactly once"
    assert len(a.table.events) == a_events, (
        "the replay into devB also sent requests to devA: "
        + "; ".join(e.describe() for e in a.table.events[a_events:])
    )

    # The replayed mapping carries DMA: devB writes the guest buffer through it.
    b.engine.buffer[:8] = b"replayed"
    r = await dev_b.dma(g, DmaDirection.TO_MEMORY, dst=0x10_2000, length=8)
    assert r.status is DmaStatus.DONE, r
    assert bytes.fromhex(await g.call("read", buffer="buf", offset=0x2000, size=8)) == b"replayed"


async def test_cooperative_hot_unplug_leaves_no_host_mappings(
    guest: GuestFactory, vfio_user_host: VfioUserHostFactory
) -> None:
    b = await vfio_user_host("devB")
    g = await guest(devices=[ROOT_PORT, b.device_json(bus="rp1")])
    c = CheckedContainer(g)
    await c.add(GuestVfioDevice(b, BEHIND_ROOT_PORT))
    await c.alloc("buf", 4 * 4096)
    await c.map("buf", 0x10_0000)
    await c.check()

    # The guest's part: release every VFIO object, as a driver does on a removal request.
    await g.call("release_all")
    assert not from_events(b.table.events), "closing the container left host mappings"
    await g.machine.qmp("device_del", id="devB")
    await g.machine.wait_event("DEVICE_DELETED", timeout=20.0, match=_device("devB"))
    await b.wait_disconnected()
    await _wait_for_pci(g, BEHIND_ROOT_PORT, present=False)
    assert not from_events(b.table.events), "host mappings outlived the device"
    assert not b.table.violations(), [e.describe() for e in b.table.violations()]
    assert g.machine.running


def _device(name: str) -> Any:
    return lambda event: event.get("data", {}).get("device") == name
