"""Fixtures for the qtest VT-d families (replay, flags, invalidation scopes, address-space
switching, stateful): `vtd_rig`, a factory of VtdRig (fixtures/rig/vtd_rig.py).

    rig = await vtd_rig(devices=("d0", "d1"), ports=1)

Every rig is checked once more at teardown: the type1 rules (disjoint maps, no bisecting
unmap, unmaps inside the notifier range, ...) over every connection's whole stream, so no case
can break them silently. A case whose body already failed is not reported twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from fixtures.plugins.harness import REPORTS_KEY, Launcher
from fixtures.plugins.vfio_user import VfioUserHostFactory
from fixtures.qemu.pci_config import Bdf, PciConfig
from fixtures.qemu.qtest_machine import QTestMachine
from fixtures.rig.vtd_rig import (
    COLD_SLOTS,
    MEMORY_MIB,
    PORT_SLOT0,
    RigDevice,
    RigFactory,
    VtdRig,
    rig_spec,
)
from fixtures.vtd.driver import VtdDriver


@pytest.fixture
async def vtd_rig(
    request: pytest.FixtureRequest, launch: Launcher, vfio_user_host: VfioUserHostFactory
) -> AsyncIterator[RigFactory]:
    rigs: list[VtdRig] = []

    async def start(
        *,
        devices: tuple[str, ...] = ("d0",),
        ports: int = 0,
        iommu: dict[str, Any] | None = None,
        scalable: bool = False,
        init: bool = True,
        trace: list[str] | None = None,
        memory_mib: int = MEMORY_MIB,
    ) -> VtdRig:
        props: dict[str, Any] = {"driver": "intel-iommu", "caching-mode": True, "aw-bits": 48}
        if scalable:
            props["scalable-mode"] = True
        props.update(iommu or {})
        hosts = [await vfio_user_host(name) for name in devices]
        spec = rig_spec(hosts, ports=ports, iommu=props, trace=trace, memory_mib=memory_mib)
        machine = await launch(spec)
        assert isinstance(machine, QTestMachine)
        cfg = PciConfig(machine.qtest)
        free_ports = []
        for i in range(ports):
            port_bdf = Bdf(0, PORT_SLOT0 + i)
            await cfg.set_bridge_buses(port_bdf, i + 1, i + 1)  # firmware's job; no firmware
            free_ports.append((f"rp{i}", port_bdf))
        rig_devices = {}
        for host, slot in zip(hosts, COLD_SLOTS, strict=False):
            await host.wait_connected()
            rig_devices[host.name] = RigDevice(host.name, Bdf(0, slot), host)
            await cfg.enable_bus_master(Bdf(0, slot))
        driver = VtdDriver(machine.qtest, machine.ram, scalable=scalable)
        rig = VtdRig(
            machine,
            driver,
            cfg,
            rig_devices,
            vfio_user_host,
            aw_bits=int(props.get("aw-bits", 48)),
            scalable=scalable,
            memory_mib=memory_mib,
            free_ports=free_ports,
        )
        rigs.append(rig)
        if init:
            await driver.init()
            await rig.check("after driver init")
        return rig

    yield start
    body = request.node.stash.get(REPORTS_KEY, {}).get("call")
    if body is not None and not body.passed:
        return
    broken = [v.describe() for rig in rigs for v in rig.violations()]
    if broken:
        pytest.fail("type1/notifier rules broken:\n" + "\n".join(broken), pytrace=False)
