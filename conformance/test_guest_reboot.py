"""Guest reboot and DMAR disabled on the kernel command line: the host state follows.

Seeds: 2cc9ddcceb (stale IOMMU region after reset) and address-space switching
(vtd_switch_address_space): with DMAR off the device sees all of guest RAM at IOVA == GPA;
a system reset returns to that identity until the rebooted guest enables DMAR again.
"""

from __future__ import annotations

import pytest

from fixtures.guest.machine import GUEST_MEMORY_MIB, kernel_cmdline
from fixtures.guest.vfio import GuestVfioDevice
from fixtures.oracle.expected_state import from_events, identity_map
from fixtures.plugins.guest import SHARED_LOOP, GuestFactory, SharedGuestFactory
from fixtures.plugins.vfio_user import VfioUserHostFactory
from fixtures.rig.guest_rig import CheckedContainer, host_vs_tables
from fixtures.vfio_user.dma_engine import DmaDirection, DmaStatus

pytestmark = pytest.mark.guest

DEV_A_BDF = "0000:00:03.0"
HIGH_RAM = (0x10_0000, (GUEST_MEMORY_MIB << 20) - 0x10_0000)  # RAM above the BIOS area


@SHARED_LOOP
async def test_reboot_drops_the_old_mappings_and_maps_anew(
    shared_guest: SharedGuestFactory,
) -> None:
    # The plain one-device guest the DMA cases share: after the reboot its reset check must
    # find it as its first boot left it.
    lease = await shared_guest({"devA": 3})
    srv, g = lease.hosts["devA"], lease.guest
    dev = GuestVfioDevice(srv, DEV_A_BDF)
    c = CheckedContainer(g)
    await c.add(dev)
    await c.alloc("buf", 4 * 4096)
    await c.map("buf", 0x10_0000)
    await c.check()

    boots = g.boots
    await g.reboot()
    assert g.boots == boots + 1
    # Rebooted, DMAR on again, nobody maps yet: the host holds what the tables give the
    # device now (its default domain), and nothing of the first boot's mappings.
    problems, host = await host_vs_tables(g, dev)
    assert not problems, "\n\n".join(problems)
    stale = [r for r in host if r.iova < 0x10_4000 and r.end > 0x10_0000]
    assert not stale, f"first boot's mapping survived the reboot: {stale}"

    c = CheckedContainer(g)  # a new agent process: new container
    await c.add(dev)
    await c.alloc("buf2", 2 * 4096)
    await c.map("buf2", 0x10_0000)
    await c.check()
    srv.engine.buffer[:6] = b"again!"
    r = await dev.dma(g, DmaDirection.TO_MEMORY, dst=0x10_1000, length=6)
    assert r.status is DmaStatus.DONE, r
    assert bytes.fromhex(await g.call("read", buffer="buf2", offset=0x1000, size=6)) == b"again!"


async def test_dmar_off_on_the_command_line_leaves_the_identity_map(
    guest: GuestFactory, vfio_user_host: VfioUserHostFactory
) -> None:
    """intel_iommu=off: the guest never enables translation, so the device keeps seeing
    system RAM: the host holds IOVA == GPA over all RAM, and device DMA to a buffer's GPA
    lands in the buffer."""
    srv = await vfio_user_host("devA")
    g = await guest(devices=[srv.device_json(addr="0x3")], append=kernel_cmdline(dmar=False))
    dmesg = await g.call("dmesg")
    assert not any("DMAR: IOMMU enabled" in line for line in dmesg)
    pci = {d["bdf"]: d for d in await g.call("pci")}
    assert pci[DEV_A_BDF]["iommu_group"] is None, "an IOMMU group without DMAR"

    host = from_events(srv.table.events)
    high = list(host.runs_within(HIGH_RAM[0], HIGH_RAM[0] + HIGH_RAM[1]))
    assert high == list(identity_map([HIGH_RAM])), (
        f"host record above 1 MiB is not the identity map of RAM: {high}"
    )
    low = [r for r in host.runs_within(0, HIGH_RAM[0]) if r.gpa != r.iova]
    assert not low, f"non-identity host maps below 1 MiB: {low}"
    assert not srv.table.violations(), [e.describe() for e in srv.table.violations()]

    info = await g.call("alloc", name="buf", size=2 * 4096)
    gpa = info["gpas"][1]
    srv.engine.buffer[:8] = b"identity"
    t = await srv.engine.run(DmaDirection.TO_MEMORY, dst=gpa + 0x10, length=8)
    assert t.status is DmaStatus.DONE, t
    assert bytes.fromhex(await g.call("read", buffer="buf", offset=0x1010, size=8)) == b"identity"
