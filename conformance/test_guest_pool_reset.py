"""The shared guest's reset check (fixtures/rig/guest_pool.py) lends a guest again only in its
fresh boot's state, and rejects a reset that leaves a host mapping or a bound device behind.

The cases drive a pool of their own (the worker's launcher and hosts; it reuses guests even
under VIOMMU_GUEST_REUSE=0), so each sees its own leases released; in file order the first
case's guest, reset, is the one the second case's check rejects (either way the case holds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from fixtures.guest.machine import GUEST_IOMMU, Guest, kernel_cmdline
from fixtures.guest.session import GuestSession
from fixtures.guest.vfio import GuestVfioDevice
from fixtures.plugins.guest import SHARED_LOOP
from fixtures.rig.guest_pool import GuestLease, GuestPool
from fixtures.rig.guest_rig import CheckedContainer

pytestmark = [pytest.mark.guest, SHARED_LOOP]

DEVICES = {"devR": 5}
APPEND = kernel_cmdline()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pool(guest_pool: GuestPool) -> AsyncIterator[GuestPool]:
    own = GuestPool(guest_pool.launch, guest_pool.new_host, guest_pool.image, reuse=True)
    try:
        yield own
    finally:
        await own.close()


async def _lease(pool: GuestPool) -> GuestLease:
    return await pool.acquire(DEVICES, iommu=GUEST_IOMMU, append=APPEND)


async def _map_one_page(lease: GuestLease, guest: Guest | None = None) -> CheckedContainer:
    """devR in a container of `guest` (default: the lease's own agent), one page mapped."""
    c = CheckedContainer(guest or lease.guest)
    await c.add(GuestVfioDevice(lease.hosts["devR"], lease.bdf("devR")))
    await c.alloc("buf", 4096)
    await c.map("buf", 0x10_0000)
    await c.check()
    return c


async def test_a_reset_that_checks_out_lends_the_guest_again_with_empty_records(
    pool: GuestPool,
) -> None:
    first = await _lease(pool)
    await _map_one_page(first)  # left mapped: releasing the container is the reset's part
    host, agent_pid = first.hosts["devR"], first.guest.agent.hello["pid"]
    assert await pool.release(first, reusable=True) is None
    second = await _lease(pool)
    try:
        assert second.guest is first.guest
        assert second.origin == "reset"
        assert second.hosts["devR"] is host
        assert host.table.events == [], "the new record is not empty"
        assert len(host.table) == 0
        assert second.guest.agent.hello["pid"] != agent_pid, "the old agent process serves on"
        await _map_one_page(second)  # the reset guest works as a fresh one does
    finally:
        assert await pool.release(second, reusable=True) is None


async def test_the_reset_rejects_a_mapping_the_host_kept(pool: GuestPool) -> None:
    lease = await _lease(pool)
    g = lease.guest
    # A second agent process of the case holds a mapped container: the reset releases only
    # the lease's own session, so the host keeps that mapping.
    other = await GuestSession.open(g.port, g.image.client_key, g.image.host_key_line)
    try:
        kept = Guest(g.machine, g.image, port=g.port, session=other)
        await _map_one_page(lease, kept)
        reason = await pool.release(lease, reusable=True)
    finally:
        await other.close()
    assert reason is not None
    assert "devR still maps 1 ranges" in reason, reason
    assert not g.machine.running, "a guest whose reset failed was kept"


async def test_the_reset_rejects_a_device_left_bound(pool: GuestPool) -> None:
    lease = await _lease(pool)
    # Another device of the guest left on vfio-pci: the PCI listing is no longer the fresh one.
    await lease.guest.call("bind", bdf="0000:00:1f.3")
    reason = await pool.release(lease, reusable=True)
    assert reason is not None
    assert "0000:00:1f.3 driver vfio-pci" in reason, reason
    assert not lease.guest.machine.running
