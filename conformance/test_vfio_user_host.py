"""QEMU's vfio-user client against our host: realize, hotplug, the host view of guest RAM,
device DMA, and how QEMU reacts when the host misbehaves (qtest tier, no guest OS).

The host side is our own vfio-user server (fixtures/vfio_user/server.py): what QEMU sends
over the socket is the host mapping state. Expectations come from the machine's layout
(RAM size, the q35 legacy windows) and the protocol, not from an earlier run's output.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import time
from typing import Any

import pytest

from conformance.known_bugs import U32_DMA_COUNT
from fixtures.oracle.dma_event import DmaOp
from fixtures.qemu.errors import QMPCommandError, QMPTimeoutError, QTestError
from fixtures.qemu.pci_config import PCI_VENDOR_ID, Bdf, PciConfig
from fixtures.qemu.pcie_hotplug import power_off_slot, power_on_slot
from fixtures.qemu.qtest_machine import QTestMachine
from fixtures.qemu.spec import MachineSpec
from fixtures.vfio_user.dma_engine import (
    BUFFER_OFFSET,
    MAGIC,
    REG_ERRNO,
    REG_FAULT_IOVA,
    REG_FAULT_REASON,
    REG_IRQ_ON_DONE,
    REG_MAGIC,
    REG_SRC,
    REG_STATUS,
    DmaDirection,
    DmaPath,
    DmaStatus,
    FaultReason,
    start_writes,
)
from fixtures.vfio_user.host_mapping_table import HostMappingTable
from fixtures.vfio_user.pci import BAR0_REGION, CONFIG_REGION, PCI_BASE_ADDRESS_0
from fixtures.vfio_user.server import VfioUserServer
from fixtures.vfio_user.wire import Command, DmaAccess, RegionAccess
from fixtures.vtd.driver import Domain, VtdDriver
from fixtures.vtd.page_tables import PAGE_4K

pytestmark = pytest.mark.qtest

VENDOR, DEVICE = 0x1B36, 0x00F0
RAM_MIB = 512
RAM_SIZE = RAM_MIB << 20
DEV_SLOT = Bdf(0, 3)
BAR0_GPA = 0xC000_0000  # in q35's 32-bit PCI hole, above the 0xb0000000 MMCONFIG window
# Legacy windows below 1 MiB where q35 may show something other than RAM (VGA/SMRAM at
# 0xa0000, PAM-controlled ROM shadows at 0xc0000-0xfffff).
LEGACY_START, LEGACY_END = 0xA0000, 0x100000

ROOT_PORT = Bdf(0, 2)
HOTPLUG_SLOT = Bdf(1, 0)


def spec_with(host: VfioUserServer, *, iommu: dict[str, Any] | None, **props: Any) -> MachineSpec:
    return MachineSpec(
        accel="qtest",
        memory_mib=RAM_MIB,
        iommu=iommu,
        devices=[host.device_json(addr=f"{DEV_SLOT.dev:#x}", **props)],
    )


def pci_devices(buses: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """query-pci flattened: qdev id -> entry, bridges' secondary buses included."""
    found: dict[str, dict[str, Any]] = {}

    def visit(devices: list[dict[str, Any]]) -> None:
        for device in devices:
            found[device["qdev_id"]] = device
            visit(device.get("pci_bridge", {}).get("devices", []))

    for bus in buses:
        visit(bus["devices"])
    return found


def assert_clean(host: VfioUserServer) -> None:
    """No protocol error on any connection and no type1 rule broken."""
    errors = [err for session in host.sessions for err in session.errors]
    assert errors == [], errors
    violations = [e.describe() for table in host.tables for e in table.violations()]
    assert violations == [], violations


async def start_with_device(
    launch: Any, vfio_user_host: Any, *, iommu: dict[str, Any] | None = None, **props: Any
) -> tuple[QTestMachine, VfioUserServer]:
    host = await vfio_user_host("dev0", vendor=VENDOR, device=DEVICE)
    machine = await launch(spec_with(host, iommu=iommu, **props))
    await host.wait_connected(timeout=5.0)
    return machine, host


async def map_bar0(machine: QTestMachine) -> PciConfig:
    """What firmware would do: place BAR0 and enable memory decode and bus mastering."""
    cfg = PciConfig(machine.qtest)
    await cfg.write(DEV_SLOT, PCI_BASE_ADDRESS_0, BAR0_GPA)
    await cfg.enable_bus_master(DEV_SLOT)
    return cfg


async def run_dma(
    machine: QTestMachine,
    direction: DmaDirection,
    path: DmaPath,
    *,
    src: int = 0,
    dst: int = 0,
    length: int,
    timeout: float = 5.0,
) -> int:
    """Program the engine through BAR0 as a driver would; return the final STATUS."""
    qtest = machine.qtest
    for offset, width, value in start_writes(direction, path, src=src, dst=dst, length=length):
        write = qtest.writeq if width == 8 else qtest.writel
        await write(BAR0_GPA + offset, value)
    deadline = time.monotonic() + timeout
    while (status := await qtest.readl(BAR0_GPA + REG_STATUS)) == DmaStatus.BUSY:
        if time.monotonic() > deadline:
            pytest.fail(f"DMA still busy after {timeout} s")
        await asyncio.sleep(0.01)  # let QEMU's main loop run the DMA_READ/WRITE handlers
    return status


# --- realize and hotplug -------------------------------------------------------------


async def test_cold_plugged_device_realizes(launch: Any, vfio_user_host: Any) -> None:
    machine, host = await start_with_device(launch, vfio_user_host)
    entry = pci_devices(await machine.qmp("query-pci"))["dev0"]
    assert (entry["id"]["vendor"], entry["id"]["device"]) == (VENDOR, DEVICE)
    assert entry["slot"] == DEV_SLOT.dev
    peripherals = await machine.qmp("qom-list", path="/machine/peripheral")
    assert "dev0" in {p["name"] for p in peripherals}
    # Config space reads reach the host (vfio passes the ID registers through).
    cfg = PciConfig(machine.qtest)
    assert await cfg.read(DEV_SLOT, PCI_VENDOR_ID) == DEVICE << 16 | VENDOR
    first = [header.command for _, header, _ in host.requests[:1]]
    assert first == [Command.VERSION]
    assert {Command.DEVICE_GET_INFO, Command.DEVICE_GET_REGION_INFO} <= {
        header.command for _, header, _ in host.requests
    }
    assert_clean(host)


HOTPLUG_EXTRA = ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]


async def hotplug_machine(launch: Any) -> tuple[QTestMachine, PciConfig]:
    spec = MachineSpec(
        accel="qtest",
        memory_mib=RAM_MIB,
        iommu=None,
        devices=[{"driver": "pcie-root-port", "id": "rp0", "bus": "pcie.0", "addr": "0x2"}],
        extra_args=HOTPLUG_EXTRA,  # native PCIe hotplug: qtest can play the OS's part
    )
    machine = await launch(spec)
    cfg = PciConfig(machine.qtest)
    await cfg.set_bridge_buses(ROOT_PORT, 1, 1)
    return machine, cfg


async def test_hotplugged_device_realizes_and_unplugs(launch: Any, vfio_user_host: Any) -> None:
    machine, cfg = await hotplug_machine(launch)
    host = await vfio_user_host("hp0", vendor=VENDOR, device=DEVICE)
    await machine.qmp("device_add", **host.device_json(bus="rp0"))
    assert host.connected, "device_add returned before the client connected"
    assert "hp0" in pci_devices(await machine.qmp("query-pci"))
    assert_identity_map_of_ram(host)  # hotplug maps guest RAM like a cold plug
    await power_on_slot(cfg, ROOT_PORT)
    assert await cfg.read(HOTPLUG_SLOT, PCI_VENDOR_ID) == DEVICE << 16 | VENDOR

    await machine.qmp("device_del", id="hp0")
    with pytest.raises(QMPTimeoutError):  # a powered slot waits for the OS
        await machine.wait_event("DEVICE_DELETED", timeout=0.3)
    assert host.connected
    await power_off_slot(cfg, ROOT_PORT)
    event = await machine.wait_event("DEVICE_DELETED", match=lambda e: e["data"]["device"] == "hp0")
    assert event["data"]["path"] == "/machine/peripheral/hp0"
    await host.wait_disconnected(timeout=5.0)  # finalize closes the client's socket
    assert "hp0" not in pci_devices(await machine.qmp("query-pci"))
    assert host.table.mappings() == [], "unplug left host mappings behind"
    assert_clean(host)


async def test_replug_after_unplug_gets_a_fresh_table(launch: Any, vfio_user_host: Any) -> None:
    machine, _cfg = await hotplug_machine(launch)
    host = await vfio_user_host("hp0", vendor=VENDOR, device=DEVICE)
    for _ in range(2):
        await machine.qmp("device_add", **host.device_json(bus="rp0"))
        await machine.qmp("device_del", id="hp0")  # unpowered slot: immediate
        await machine.wait_event("DEVICE_DELETED", match=lambda e: e["data"]["device"] == "hp0")
        await host.wait_disconnected(timeout=5.0)
        machine.events.clear()
    assert len(host.sessions) == 2
    first, second = host.tables
    assert accepted_maps(first), "no DMA_MAP on the first connection"
    assert accepted_maps(first) == accepted_maps(second)  # same RAM, same maps, fresh socket
    assert_clean(host)


def accepted_maps(table: HostMappingTable) -> list[tuple[int, int, int | None, bool, bool]]:
    return [
        (e.iova, e.size, e.gpa, e.read, e.write)
        for e in table.events
        if e.op is DmaOp.MAP and e.accepted
    ]


# --- the host view of guest RAM ------------------------------------------------------


def assert_identity_map_of_ram(host: VfioUserServer) -> None:
    """DMA address == GPA for every RAM mapping, all RAM outside the legacy windows is
    mapped read-write, and only ROM (no fd, read-only) is mapped beyond RAM."""
    mappings = host.table.mappings()
    ram = [m for m in mappings if m.offset is not None]
    others = [m for m in mappings if m.offset is None]
    assert ram, "no fd-backed mapping: guest RAM was not shared with the host"
    for m in ram:
        assert m.offset == m.iova, f"{m.iova:#x}+{m.size:#x} -> offset {m.offset:#x}"
        assert m.end <= RAM_SIZE, f"RAM mapping {m.iova:#x}+{m.size:#x} beyond RAM"
        assert m.read
        assert m.write
    # The firmware ROMs have no fd: the host's offset-0 rule for such maps is exercised here.
    assert others, "no fd-less (ROM) mapping: the firmware is not in the device's view"
    for m in others:
        assert not m.write, f"non-RAM mapping {m.iova:#x}+{m.size:#x} is writable"
    covered = sorted((m.iova, m.end) for m in ram)
    needed = [(0, LEGACY_START), (LEGACY_END, RAM_SIZE)]
    for start, end in needed:
        pos = start
        for m_start, m_end in covered:
            if m_start <= pos < m_end:
                pos = m_end
        assert pos >= end, f"RAM {pos:#x}..{end:#x} not mapped; mappings {covered}"


async def test_identity_map_without_viommu(launch: Any, vfio_user_host: Any) -> None:
    _machine, host = await start_with_device(launch, vfio_user_host, iommu=None)
    assert_identity_map_of_ram(host)
    assert_clean(host)


async def test_identity_map_with_intel_iommu_and_dmar_off(launch: Any, vfio_user_host: Any) -> None:
    """DMAR is off until the guest sets GCMD.TE: the device sees system RAM untranslated."""
    _machine, host = await start_with_device(
        launch, vfio_user_host, iommu={"driver": "intel-iommu", "caching-mode": True}
    )
    assert_identity_map_of_ram(host)
    assert_clean(host)


# --- device DMA --------------------------------------------------------------------


DMA_PATHS = [
    pytest.param(DmaPath.HOST_IOMMU, id="host-iommu"),
    pytest.param(DmaPath.CLIENT, id="client", marks=U32_DMA_COUNT),
]


@pytest.mark.parametrize("path", DMA_PATHS)
async def test_dma_copy_lands_at_the_right_gpa(
    launch: Any, vfio_user_host: Any, path: DmaPath
) -> None:
    """Without a vIOMMU IOVA == GPA: a copy through either path moves exactly these bytes.
    (The client path also pins QEMU's DMA_READ/WRITE layout: the spec's u64 count.)"""
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    assert await machine.qtest.readl(BAR0_GPA + REG_MAGIC) == MAGIC
    src, dst, pattern = 0x200000 - 40, 0x300000 + 12, bytes(range(256)) * 2  # crosses a page
    await machine.qtest.memwrite(src, pattern)
    before = await machine.qtest.memread(dst - 16, 16)
    status = await run_dma(machine, DmaDirection.COPY, path, src=src, dst=dst, length=len(pattern))
    assert status == DmaStatus.DONE, host.engine.transfers[-1].detail or host.engine.transfers
    written = await machine.qtest.memread(dst, len(pattern))
    assert written == pattern, DmaAccess.explain_landed(written, pattern)
    assert machine.ram.read(dst, len(pattern)) == pattern
    assert await machine.qtest.memread(dst - 16, 16) == before, "DMA wrote before its target"
    assert host.engine.transfers[-1].path is path
    # BAR0 is not mmap-able, so its writes arrive posted; config writes wait for a reply.
    writes = [
        (payload.region, header.no_reply)
        for _, header, payload in host.requests
        if header.command == Command.REGION_WRITE and isinstance(payload, RegionAccess)
    ]
    assert (BAR0_REGION, True) in writes
    assert (BAR0_REGION, False) not in writes
    assert (CONFIG_REGION, False) in writes
    assert (CONFIG_REGION, True) not in writes
    assert_clean(host)


@pytest.mark.parametrize("path", DMA_PATHS)
async def test_dma_buffer_round_trip(launch: Any, vfio_user_host: Any, path: DmaPath) -> None:
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    message = b"vfio-user DMA to guest RAM\0"
    for i in range(0, len(message), 4):
        word = int.from_bytes(message[i : i + 4].ljust(4, b"\0"), "little")
        await machine.qtest.writel(BAR0_GPA + BUFFER_OFFSET + i, word)
    target = 0x123000
    status = await run_dma(machine, DmaDirection.TO_MEMORY, path, dst=target, length=len(message))
    assert status == DmaStatus.DONE, host.engine.transfers[-1].detail
    written = machine.ram.read(target, len(message))
    assert written == message, DmaAccess.explain_landed(written, message)
    machine.ram.write(target + 0x10000, b"from guest RAM!!")
    status = await run_dma(machine, DmaDirection.FROM_MEMORY, path, src=target + 0x10000, length=16)
    assert status == DmaStatus.DONE
    assert bytes(host.engine.buffer[:16]) == b"from guest RAM!!"
    assert_clean(host)


async def test_dma_to_unmapped_iova_faults_on_the_host_path(
    launch: Any, vfio_user_host: Any
) -> None:
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    beyond_ram = RAM_SIZE + 0x1000
    sentinel = machine.ram.read(0x400000, 64)
    status = await run_dma(
        machine, DmaDirection.COPY, DmaPath.HOST_IOMMU, src=0x400000, dst=beyond_ram, length=64
    )
    assert status == DmaStatus.FAULT
    assert await machine.qtest.readl(BAR0_GPA + REG_FAULT_REASON) == FaultReason.UNMAPPED
    assert await machine.qtest.readq(BAR0_GPA + REG_FAULT_IOVA) == beyond_ram
    assert host.engine.faults[-1].fault_iova == beyond_ram
    assert machine.ram.read(0x400000, 64) == sentinel


async def test_dma_to_rom_faults_read_only(launch: Any, vfio_user_host: Any) -> None:
    """The BIOS ROM is mapped read-only (no fd): a device write there is an IOMMU fault."""
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    rom = 0xFFFF_F000
    status = await run_dma(machine, DmaDirection.TO_MEMORY, DmaPath.HOST_IOMMU, dst=rom, length=8)
    assert status == DmaStatus.FAULT
    assert await machine.qtest.readl(BAR0_GPA + REG_FAULT_REASON) == FaultReason.PERMISSION
    assert host.engine.faults[-1].fault_iova == rom


async def test_client_path_dma_to_unassigned_address(launch: Any, vfio_user_host: Any) -> None:
    """QEMU answers a DMA_WRITE to an address nothing decodes with an error reply
    (hw/vfio-user/pci.c maps MEMTX_DECODE_ERROR to ENODEV)."""
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    status = await run_dma(
        machine, DmaDirection.TO_MEMORY, DmaPath.CLIENT, dst=RAM_SIZE + 0x1000, length=8
    )
    assert status == DmaStatus.FAULT
    assert await machine.qtest.readl(BAR0_GPA + REG_FAULT_REASON) == FaultReason.CLIENT_ERROR
    assert await machine.qtest.readl(BAR0_GPA + REG_ERRNO) == errno.ENODEV
    assert host.engine.faults[-1].errno == errno.ENODEV


# --- fault injection -----------------------------------------------------------------


async def test_server_closing_the_socket(launch: Any, vfio_user_host: Any) -> None:
    """The host dies mid-run. QEMU keeps running (no abort), BAR reads fail as all ones
    (vfio_region_read's error value), and QMP still lists the device."""
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    assert await machine.qtest.readl(BAR0_GPA + REG_MAGIC) == MAGIC
    await host.disconnect()
    await host.wait_disconnected(timeout=2.0)
    assert await machine.qtest.readl(BAR0_GPA + REG_MAGIC) == 0xFFFF_FFFF
    assert machine.running
    assert "dev0" in pci_devices(await machine.qmp("query-pci"))
    assert host.session is not None
    assert host.session.close_reason == "host closed the socket"


async def test_reply_that_never_comes(launch: Any, vfio_user_host: Any) -> None:
    """A REGION_READ the host never answers: QEMU gives up after x-msg-timeout, the access
    reads as all ones, and the connection survives for the next access."""
    timeout_ms = 300
    props: dict[str, Any] = {"x-msg-timeout": timeout_ms}
    machine, host = await start_with_device(launch, vfio_user_host, **props)
    await map_bar0(machine)
    host.withhold_replies(Command.REGION_READ)
    started = time.monotonic()
    value = await machine.qtest.readl(BAR0_GPA + REG_MAGIC)
    waited = time.monotonic() - started
    assert value == 0xFFFF_FFFF
    assert waited >= timeout_ms / 1000 * 0.9, f"QEMU gave up after {waited:.3f} s"
    assert [h.command for h in host.withheld_requests] == [Command.REGION_READ]
    host.withhold_replies()
    assert await machine.qtest.readl(BAR0_GPA + REG_MAGIC) == MAGIC
    assert host.connected
    assert "timed out waiting for reply" in machine.stderr_tail(lines=20)


async def test_realize_fails_cleanly_when_a_reply_never_comes(
    launch: Any, vfio_user_host: Any
) -> None:
    """device_add against a host that stops answering during realize: QEMU logs the
    timeout, device_add fails with EFAULT ("Bad address": vfio_user_get_region_info turns
    a failed send_wait into -EFAULT), the half-made device is gone and its socket closed."""
    machine, _cfg = await hotplug_machine(launch)
    host = await vfio_user_host("hp0", vendor=VENDOR, device=DEVICE)
    host.withhold_replies(Command.DEVICE_GET_REGION_INFO)
    expected = "failed to get region 0 info: Bad address"
    with pytest.raises(QMPCommandError) as refused:
        await machine.qmp("device_add", **host.device_json(bus="rp0", **{"x-msg-timeout": 200}))
    assert expected in refused.value.desc
    assert "hp0" not in pci_devices(await machine.qmp("query-pci"))
    await host.wait_disconnected(timeout=5.0)
    assert "vfio_user_get_region_info: timed out waiting for reply" in machine.stderr_tail()
    assert [h.command for h in host.withheld_requests] == [Command.DEVICE_GET_REGION_INFO]


# --- mapping changes the host never hears about -------------------------------------------
# A host mapping QEMU could not make or remove leaves the device's view of guest memory wrong,
# so it must never pass silently: each failed DMA_MAP/UNMAP is reported with the range and the
# errno (hw/vfio-user/container.c turns a failed send or a missing reply into -EFAULT), and a
# guest RAM mapping QEMU cannot make while running stops QEMU (listener.c: "DMA mapping failed,
# unable to continue") rather than run a device that does not see RAM.

TRANSLATED_IOVA = 0x1_0000_0000
TRANSLATED_GPA = 0x0200_0000
LOST = rf"= -{errno.EFAULT} \({os.strerror(errno.EFAULT)}\)"


def lost_map(iova: int, size: int) -> str:
    return rf"vfio_container_dma_map\(0x[0-9a-f]+, {iova:#x}, {size:#x}, 0x[0-9a-f]+\) {LOST}"


def lost_unmap(iova: int, size: int | None = None) -> str:
    sized = f"{size:#x}" if size is not None else "0x[0-9a-f]+"
    return rf"vfio_container_dma_unmap\(0x[0-9a-f]+, {iova:#x}, {sized}\) {LOST}"


async def translating(machine: QTestMachine) -> tuple[VtdDriver, Domain]:
    """The VT-d driver up, DEV_SLOT in domain 1 (no mappings yet), DMAR on."""
    driver = VtdDriver(machine.qtest, machine.ram)
    await driver.init()
    domain = driver.domain(1)
    await driver.attach_and_flush(DEV_SLOT, domain)
    await driver.enable_translation()
    return driver, domain


@pytest.mark.qemu_stderr(r"timed out waiting for reply", r"vfio_container_dma_(un)?map\(")
async def test_unanswered_iommu_map_and_unmap_are_reported_with_their_range(
    launch: Any, vfio_user_host: Any
) -> None:
    """Under translation QEMU sends a PSI's DMA_MAP / DMA_UNMAP and waits for the reply
    (vfio_iommu_map_notify, outside a listener transaction). A host that never answers: after
    x-msg-timeout QEMU reports the map and then the unmap, each with the IOVA and size the
    guest invalidated and -EFAULT, and keeps running."""
    iommu = {"driver": "intel-iommu", "caching-mode": True}
    machine, host = await start_with_device(
        launch, vfio_user_host, iommu=iommu, **{"x-msg-timeout": 200}
    )
    await map_bar0(machine)
    driver, domain = await translating(machine)
    host.withhold_replies(Command.DMA_MAP)
    await driver.map(domain, TRANSLATED_IOVA, TRANSLATED_GPA, PAGE_4K)
    host.withhold_replies(Command.DMA_UNMAP)
    await driver.unmap(domain, TRANSLATED_IOVA, PAGE_4K)
    host.withhold_replies()
    assert [h.command for h in host.withheld_requests] == [Command.DMA_MAP, Command.DMA_UNMAP]
    stderr = machine.stderr_path.read_text(errors="replace")
    for expected in (lost_map(TRANSLATED_IOVA, PAGE_4K), lost_unmap(TRANSLATED_IOVA, PAGE_4K)):
        assert re.search(expected, stderr), f"no line matching {expected!r} in:\n{stderr[-800:]}"
    assert machine.running


@pytest.mark.qemu_bug(
    before=(11, 1),
    reason="after the host closes the socket, vfio-user requests are still queued on the dead "
    "connection (hw/vfio-user/proxy.c): the RAM DMA_UNMAPs of the DMAR-enable transaction fail "
    "silently (stderr only 'vfio_wait_reqs - timed out'), every later request waits out "
    "x-msg-timeout ('timed out waiting for reply'), and DMAR off maps no RAM without stopping "
    "QEMU",
)
@pytest.mark.qemu_stderr(
    r"vfio_container_dma_(un)?map\(",
    r"hardware error: vfio: DMA mapping failed",
    r"[Uu]nable to write to socket|[Bb]roken pipe|not connected|server closed",
)
async def test_ram_mapping_changes_after_the_host_is_gone_are_reported_and_stop_qemu(
    launch: Any, vfio_user_host: Any
) -> None:
    """The host process dies while DMAR is off (RAM identity-mapped). Turning DMAR on removes
    the RAM sections inside a listener transaction (the asynchronous send): each unmap fails
    and is reported from GPA 0 with -EFAULT. Turning DMAR off again must map RAM, which cannot
    reach the host: QEMU stops with vfio's hardware error instead of running on."""
    iommu = {"driver": "intel-iommu", "caching-mode": True}
    machine, host = await start_with_device(launch, vfio_user_host, iommu=iommu)
    await map_bar0(machine)
    assert_identity_map_of_ram(host)
    await host.disconnect()
    await host.wait_disconnected(timeout=2.0)
    driver, _domain = await translating(machine)
    stderr = machine.stderr_path.read_text(errors="replace")
    assert re.search(lost_unmap(0), stderr), f"RAM unmap at GPA 0 not reported:\n{stderr[-800:]}"
    assert machine.running
    machine.exit_expected = True
    with pytest.raises(QTestError):
        await driver.disable_translation()
    for _ in range(250):  # hw_error() dumps the CPU state, then aborts
        if not machine.running:
            break
        await asyncio.sleep(0.02)
    assert machine.exitcode == -signal.SIGABRT, machine.crash_report()
    stderr = machine.stderr_path.read_text(errors="replace")
    assert re.search(r"vfio_container_dma_map\(0x[0-9a-f]+, 0x0, ", stderr), stderr[-800:]
    assert "vfio: DMA mapping failed, unable to continue" in stderr


@pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU bug: a reply arriving after x-msg-timeout is dropped as 'unexpected reply' but "
        "only its 16-byte header is read (hw/vfio-user/proxy.c vfio_user_recv_one: "
        "'goto err' before reading the body); the body is then parsed as the next header, "
        "'bad header size' is fatal and the proxy goes to VFIO_PROXY_ERROR. QEMU 11.1.3 "
        "stderr: 'unexpected reply' / 'bad header size', then every later access waits out "
        "x-msg-timeout ('vfio_user_device_io_region_read: timed out waiting for reply')"
    ),
)
async def test_late_reply_is_discarded_and_the_device_keeps_working(
    launch: Any, vfio_user_host: Any
) -> None:
    """A slow host answers a REGION_READ after QEMU gave up. The spec matches replies by
    id; a reply nobody waits for must be discarded whole, leaving the stream in sync."""
    props: dict[str, Any] = {"x-msg-timeout": 200}
    machine, host = await start_with_device(launch, vfio_user_host, **props)
    await map_bar0(machine)
    host.withhold_replies(Command.REGION_READ)
    assert await machine.qtest.readl(BAR0_GPA + REG_MAGIC) == 0xFFFF_FFFF  # timed out
    host.withhold_replies()
    assert await host.release_withheld() == 1  # the late reply, with its 4 data bytes
    await asyncio.sleep(0.2)
    assert await machine.qtest.readl(BAR0_GPA + REG_MAGIC) == MAGIC
    assert host.connected


async def test_system_reset_resets_the_device_and_restores_the_identity_map(
    launch: Any, vfio_user_host: Any
) -> None:
    """system_reset reaches the host as DEVICE_RESET (the device advertises RESET), the
    engine's registers go back to power-on values, and the host table is again an identity
    map of RAM with every type1 rule kept across the reset's unmap/map traffic."""
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    await machine.qtest.writeq(BAR0_GPA + REG_SRC, 0x1234_5000)
    resets_before = host.device.resets
    await machine.qmp("system_reset")
    await machine.wait_event("RESET")
    await machine.qtest.readl(0)  # a qtest round trip: QEMU's reset work is done
    assert host.device.resets > resets_before
    assert host.engine.regs[REG_SRC : REG_SRC + 8] == bytes(8)
    assert_identity_map_of_ram(host)
    assert_clean(host)


async def test_intx_from_the_host_reaches_the_ioapic_and_is_unmasked_after_eoi(
    launch: Any, vfio_user_host: Any
) -> None:
    """The host raises INTx by writing the eventfd QEMU passed with SET_IRQS. The index is
    AUTOMASKED: QEMU must unmask it (SET_IRQS UNMASK) after the guest's EOI, here the next
    BAR access, or the second completion would stay silent."""
    machine, host = await start_with_device(launch, vfio_user_host)
    await map_bar0(machine)
    await machine.qtest.irq_intercept_in("ioapic")
    await machine.qtest.writel(BAR0_GPA + REG_IRQ_ON_DONE, 1)
    raises: list[str] = []
    for _ in range(2):
        status = await run_dma(
            machine, DmaDirection.COPY, DmaPath.HOST_IOMMU, src=0x1000, dst=0x2000, length=8
        )
        assert status == DmaStatus.DONE
        for _ in range(50):  # QEMU's main loop reads the eventfd between qtest commands
            raises = [line for line in machine.qtest.irq_lines if line.startswith("IRQ raise")]
            if len(raises) == len(host.engine.transfers):
                break
            await machine.qtest.readl(BAR0_GPA + REG_STATUS)
            await asyncio.sleep(0.01)
    assert len(raises) == 2, machine.qtest.irq_lines
    for _ in range(50):  # a BAR access is the EOI that lowers the line
        await machine.qtest.readl(BAR0_GPA + REG_STATUS)
        if machine.qtest.irq_lines[-1].startswith("IRQ lower"):
            break
        await asyncio.sleep(0.01)
    assert machine.qtest.irq_lines[-1].startswith("IRQ lower"), machine.qtest.irq_lines
    pins = {line.split()[-1] for line in machine.qtest.irq_lines}
    assert len(pins) == 1, machine.qtest.irq_lines  # one INTx line, raised and lowered
    assert_clean(host)
