"""VT-d register interface: what the capability registers advertise, and the GCMD/GSTS
handshakes a guest driver relies on before any mapping exists (VT-d spec ch. 10-11).

Expectations come from the properties each case sets and from the spec, never from what
QEMU reported in an earlier run.
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.qemu.qtest_machine import QTestMachine
from fixtures.qemu.spec import MachineSpec
from fixtures.vtd.registers import (
    CAP,
    DMAR_BASE,
    ECAP,
    GCMD,
    GCMD_QIE,
    GCMD_SRTP,
    GCMD_TE,
    GSTS,
    IQA,
    IQH,
    IQT,
    RTADDR,
    SAGAW_BIT,
    VER,
    Capability,
    ExtendedCapability,
    version,
)

pytestmark = pytest.mark.qtest


async def start(launch: Any, **iommu: Any) -> QTestMachine:
    machine = await launch(MachineSpec(accel="qtest", iommu={"driver": "intel-iommu", **iommu}))
    assert isinstance(machine, QTestMachine)
    return machine


async def cap(machine: QTestMachine) -> Capability:
    return Capability(await machine.qtest.readq(DMAR_BASE + CAP))


async def ecap(machine: QTestMachine) -> ExtendedCapability:
    return ExtendedCapability(await machine.qtest.readq(DMAR_BASE + ECAP))


async def test_version_register_is_a_released_spec_version(launch: Any) -> None:
    machine = await start(launch)
    major, _minor = version(await machine.qtest.readl(DMAR_BASE + VER))
    assert major >= 1


@pytest.mark.parametrize("caching_mode", [True, False])
async def test_cap_caching_mode_follows_property(launch: Any, caching_mode: bool) -> None:
    """CAP.CM is what makes a guest flush on every map: vfio's MAP notifier depends on it."""
    machine = await start(launch, **{"caching-mode": caching_mode})
    assert (await cap(machine)).caching_mode is caching_mode


@pytest.mark.parametrize("aw_bits", [39, 48])
async def test_mgaw_and_sagaw_follow_aw_bits(launch: Any, aw_bits: int) -> None:
    machine = await start(launch, **{"aw-bits": aw_bits})
    c = await cap(machine)
    assert c.mgaw == aw_bits
    assert c.sagaw & SAGAW_BIT[aw_bits], f"SAGAW {c.sagaw:#x} lacks the {aw_bits}-bit table"
    wider = [w for w in SAGAW_BIT if w > aw_bits and c.sagaw & SAGAW_BIT[w]]
    assert not wider, f"SAGAW {c.sagaw:#x} offers tables wider than MGAW {aw_bits}"


async def test_legacy_mode_refuses_unsupported_aw_bits(launch: Any) -> None:
    err = await launch.start_failure(
        MachineSpec(accel="qtest", iommu={"driver": "intel-iommu", "aw-bits": 52})
    )
    assert "aw-bits" in str(err)


async def test_cap_page_selective_invalidation_and_superpages(launch: Any) -> None:
    """The suite's PSI cases need CAP.PSI with a usable mask, and 2 MiB superpages."""
    c = await cap(machine := await start(launch))
    assert c.psi
    assert c.mamv >= 9, f"MAMV {c.mamv} cannot invalidate a 2 MiB range in one PSI"
    assert c.sllps & 1, "no 2 MiB second-level superpages"
    assert machine.running


async def test_ecap_queued_invalidation_and_pass_through(launch: Any) -> None:
    e = await ecap(await start(launch))
    assert e.qi, "no queued invalidation: the suite's invalidation descriptors need it"
    assert e.pt, "no pass-through context type"
    # The IOTLB registers (IVA, IOTLB) must sit inside the 4 KiB register page.
    assert 0x100 <= e.iro + 16 <= 0x1000 - 16 or 0 < e.iro < 0x1000 - 16


@pytest.mark.parametrize(
    ("prop", "field"),
    [
        ("intremap", "ir"),
        ("device-iotlb", "device_tlb"),
        ("snoop-control", "sc"),
        ("scalable-mode", "smts"),
    ],
)
@pytest.mark.parametrize("enabled", [True, False])
async def test_ecap_follows_property(launch: Any, prop: str, field: str, enabled: bool) -> None:
    value: bool | str = enabled
    if prop == "intremap":  # an OnOffAuto property
        value = "on" if enabled else "off"
    e = await ecap(await start(launch, **{prop: value}))
    assert getattr(e, field) is enabled, f"ECAP {e.raw:#x}: {field} with {prop}={enabled}"


async def test_scalable_mode_advertises_pasid(launch: Any) -> None:
    e = await ecap(await start(launch, **{"scalable-mode": True}))
    assert e.smts
    assert e.slts, "scalable mode without second-stage translation"


INV_WAIT_DESC = 0x5 | 1 << 5  # invalidation wait descriptor, status write (SW)


async def gsts(machine: QTestMachine) -> int:
    return await machine.qtest.readl(DMAR_BASE + GSTS)


async def gcmd(machine: QTestMachine, value: int) -> None:
    await machine.qtest.writel(DMAR_BASE + GCMD, value)


async def test_translation_starts_disabled(launch: Any) -> None:
    assert await gsts(await start(launch)) & (GCMD_TE | GCMD_QIE | GCMD_SRTP) == 0


async def test_srtp_latches_root_table_pointer(launch: Any) -> None:
    machine = await start(launch)
    root = 0x100000
    await machine.qtest.writeq(DMAR_BASE + RTADDR, root)
    assert await machine.qtest.readq(DMAR_BASE + RTADDR) == root
    await gcmd(machine, GCMD_SRTP)
    assert await gsts(machine) & GCMD_SRTP, "GSTS.RTPS not set after GCMD.SRTP"


async def test_qie_enable_and_disable(launch: Any) -> None:
    machine = await start(launch)
    queue = 0x200000
    await machine.qtest.writeq(DMAR_BASE + IQA, queue)  # one 4 KiB page of 128-bit descriptors
    await machine.qtest.writeq(DMAR_BASE + IQT, 0)
    await gcmd(machine, GCMD_QIE)
    assert await gsts(machine) & GCMD_QIE, "GSTS.QIES not set after GCMD.QIE"
    assert await machine.qtest.readq(DMAR_BASE + IQH) == 0, "queue head not at 0 when enabled"
    # Spec 11.4.4.1: QI may be turned off only once the queue has drained through a wait
    # descriptor; submit one with a status write and see the status land.
    status_addr, token = 0x201000, 0xC0FFEE
    descriptor = (INV_WAIT_DESC | token << 32).to_bytes(8, "little")
    machine.ram.write(queue, descriptor + status_addr.to_bytes(8, "little"))
    await machine.qtest.writeq(DMAR_BASE + IQT, 1 << 4)  # tail = descriptor 1 (128-bit)
    assert machine.ram.read_u64(status_addr) & 0xFFFFFFFF == token, "wait status not written"
    assert await machine.qtest.readq(DMAR_BASE + IQH) == 1 << 4, "queue head did not advance"
    await gcmd(machine, 0)
    assert not await gsts(machine) & GCMD_QIE, "GSTS.QIES still set after clearing GCMD.QIE"


async def test_te_enable_keeps_other_persistent_bits(launch: Any) -> None:
    """GCMD is write-only: software writes TE together with the bits already on (QIE)."""
    machine = await start(launch)
    await machine.qtest.writeq(DMAR_BASE + RTADDR, 0x100000)
    await gcmd(machine, GCMD_SRTP)
    await machine.qtest.writeq(DMAR_BASE + IQA, 0x200000)
    await gcmd(machine, GCMD_QIE)
    await gcmd(machine, GCMD_QIE | GCMD_TE)
    status = await gsts(machine)
    assert status & GCMD_TE, "GSTS.TES not set after GCMD.TE"
    assert status & GCMD_QIE, "enabling TE dropped QIE"
    await gcmd(machine, GCMD_QIE)
    status = await gsts(machine)
    assert not status & GCMD_TE, "GSTS.TES still set after clearing GCMD.TE"
    assert status & GCMD_QIE
