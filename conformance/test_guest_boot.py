"""The guest tier's foundation: the guest boots with DMAR on and its agent answers."""

from __future__ import annotations

import pytest

from fixtures.plugins.guest import SHARED_LOOP, SharedGuestFactory

pytestmark = [pytest.mark.guest, SHARED_LOOP]


async def test_guest_boots_with_dmar_and_agent_answers(shared_guest: SharedGuestFactory) -> None:
    # The guest the DMA cases share (one vfio-user device): its boot is what they stand on.
    g = (await shared_guest({"devA": 3})).guest
    assert g.agent.hello["release"] == g.image.kernel_release, "not the image's own kernel"
    assert "intel_iommu=on" in g.agent.hello["cmdline"]
    dmesg = await g.call("dmesg")
    assert any("DMAR: IOMMU enabled" in line for line in dmesg), "guest did not enable DMAR"
    # Every PCI device sits in an IOMMU group: the guest's intel-iommu driver owns them.
    assert all(dev["iommu_group"] is not None for dev in await g.call("pci"))
