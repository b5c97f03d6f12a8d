"""QMP device_add / device_del of a plain PCI device behind a PCIe root port, with qtest
playing the guest's half of native hotplug (slot power through Slot Control).

This is the mechanism every hotplug-replay case builds on: a device appears on the root
port's secondary bus only once the OS powers the slot, and leaves (DEVICE_DELETED) only once
the OS powers it off.
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.qemu.errors import QMPTimeoutError
from fixtures.qemu.pci_config import PCI_VENDOR_ID, Bdf, PciConfig
from fixtures.qemu.pcie_hotplug import power_off_slot, power_on_slot, slot_occupied
from fixtures.qemu.qtest_machine import QTestMachine
from fixtures.qemu.spec import MachineSpec

pytestmark = pytest.mark.qtest

ROOT_PORT = Bdf(0, 2)
SLOT = Bdf(1, 0)  # device 0 on the root port's secondary bus
EDU_IDS = 0x11E8_1234  # device << 16 | vendor of QEMU's "edu" device

HOTPLUG_MACHINE = MachineSpec(
    accel="qtest",
    devices=[{"driver": "pcie-root-port", "id": "rp0", "bus": "pcie.0", "addr": "0x2"}],
    # Native PCIe hotplug on the root port (ACPI hotplug would need the guest's AML).
    extra_args=["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"],
)


async def plugged(launch: Any) -> tuple[QTestMachine, PciConfig]:
    machine = await launch(HOTPLUG_MACHINE)
    cfg = PciConfig(machine.qtest)
    await cfg.set_bridge_buses(ROOT_PORT, 1, 1)
    await machine.qmp("device_add", driver="edu", id="hp0", bus="rp0")
    return machine, cfg


def peripheral_ids(tree: list[dict[str, Any]]) -> set[str]:
    return {entry["name"] for entry in tree}


def pci_ids(buses: list[dict[str, Any]]) -> set[str]:
    """Every qdev id query-pci reports, bridges' secondary buses included."""
    ids: set[str] = set()

    def visit(devices: list[dict[str, Any]]) -> None:
        for device in devices:
            ids.add(device["qdev_id"])
            visit(device.get("pci_bridge", {}).get("devices", []))

    for bus in buses:
        visit(bus["devices"])
    return ids


async def test_hotplugged_device_appears_once_slot_is_powered(launch: Any) -> None:
    machine, cfg = await plugged(launch)
    assert await slot_occupied(cfg, ROOT_PORT), "presence detect not set by device_add"
    assert "hp0" in peripheral_ids(await machine.qmp("qom-list", path="/machine/peripheral"))
    assert "hp0" in pci_ids(await machine.qmp("query-pci"))
    await power_on_slot(cfg, ROOT_PORT)
    assert await cfg.read(SLOT, PCI_VENDOR_ID) == EDU_IDS


async def test_device_del_waits_for_the_guest_then_deletes(launch: Any) -> None:
    machine, cfg = await plugged(launch)
    await power_on_slot(cfg, ROOT_PORT)
    await machine.qmp("device_del", id="hp0")
    # A powered slot must not lose its device before the OS agrees.
    with pytest.raises(QMPTimeoutError):
        await machine.wait_event("DEVICE_DELETED", timeout=0.3)
    assert await cfg.read(SLOT, PCI_VENDOR_ID) == EDU_IDS
    await power_off_slot(cfg, ROOT_PORT)
    event = await machine.wait_event("DEVICE_DELETED", match=lambda e: e["data"]["device"] == "hp0")
    assert event["data"]["path"] == "/machine/peripheral/hp0"
    assert "hp0" not in peripheral_ids(await machine.qmp("qom-list", path="/machine/peripheral"))
    assert "hp0" not in pci_ids(await machine.qmp("query-pci"))
    assert await cfg.read(SLOT, PCI_VENDOR_ID, 2) == 0xFFFF


async def test_device_del_of_unpowered_slot_is_immediate(launch: Any) -> None:
    """A device the OS never powered was never visible: QEMU may drop it without asking."""
    machine, _cfg = await plugged(launch)
    await machine.qmp("device_del", id="hp0")
    await machine.wait_event("DEVICE_DELETED", match=lambda e: e["data"]["device"] == "hp0")
    assert "hp0" not in pci_ids(await machine.qmp("query-pci"))
