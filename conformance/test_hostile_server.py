"""A hostile vfio-user server: replies QEMU's client must survive (qtest tier, no guest OS).

The server answers honestly except for one misbehaviour (fixtures/vfio_user/hostile.py, the
server's `misbehaviour` hook). Each case device_adds the device into a PCIe root port and pins
what QEMU does: refuse the device with a clear error (device_add fails, the half-made device is
gone and its socket closed) or realize it. Whatever the outcome, QEMU must keep running, answer
QMP, leak no fd of the hostile reply, leave guest RAM untouched, and still take an honest
device in the other root port afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
from typing import Any, cast

import pytest

from fixtures.qemu.errors import QEMUExitedError, QMPCommandError, QTestError
from fixtures.qemu.pci_config import Bdf, PciConfig
from fixtures.qemu.pcie_hotplug import power_on_slot
from fixtures.qemu.qtest_machine import QTestMachine
from fixtures.qemu.spec import DEFAULT_TRACE, MachineSpec
from fixtures.vfio_user import hostile
from fixtures.vfio_user.pci import BAR0_REGION, CONFIG_REGION
from fixtures.vfio_user.server import VfioUserServer
from fixtures.vfio_user.wire import HEADER_SIZE, MAX_DATA_XFER, Command, DmaAccess
from fixtures.vtd.driver import VtdDriver

pytestmark = [
    pytest.mark.qtest,
    # Refusing a broken device, QEMU's vfio-user client may fail to unmap what it never mapped.
    pytest.mark.qemu_stderr(r"vfio_container_dma_unmap\(.*\(Bad address\)"),
]

RAM_MIB = 256
MSG_TIMEOUT_MS = 500  # x-msg-timeout: a reply QEMU waits for in vain costs this much
PORTS = (Bdf(0, 2), Bdf(0, 4))


ABORTS_IN_REALIZE_ERROR_PATH = pytest.mark.qemu_bug(
    before=(11, 1),
    reason=(
        "device_add refused by the vfio-user client's realize aborts QEMU: the error path "
        "takes a mutex that was never initialised ('util/qemu-thread-posix.c:92: "
        "qemu_mutex_lock_impl: Assertion `mutex->initialized' failed', SIGABRT, after "
        "'unexpected reply' / 'unexpected FDs in reply' / an absurd DEVICE_GET_INFO count)"
    ),
)


async def hostile_machine(launch: Any, *, trace: list[str] | None = None) -> QTestMachine:
    spec = MachineSpec(
        accel="qtest",
        memory_mib=RAM_MIB,
        iommu=None,
        trace=list(DEFAULT_TRACE if trace is None else trace),
        devices=[
            {
                "driver": "pcie-root-port",
                "id": f"rp{i}",
                "bus": "pcie.0",
                "addr": hex(p.dev),
                "chassis": i + 1,
                "slot": i + 1,
            }
            for i, p in enumerate(PORTS)
        ],
        extra_args=["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"],
    )
    machine = await launch(spec)
    assert isinstance(machine, QTestMachine)
    cfg = PciConfig(machine.qtest)
    for i, port in enumerate(PORTS):
        await cfg.set_bridge_buses(port, i + 1, i + 1)
    return machine


def open_fds(machine: QTestMachine) -> int:
    assert machine.pid is not None
    return len(os.listdir(f"/proc/{machine.pid}/fd"))


async def pci_ids(machine: QTestMachine) -> set[str]:
    found: set[str] = set()

    def visit(devices: list[dict[str, Any]]) -> None:
        for device in devices:
            found.add(device["qdev_id"])
            visit(device.get("pci_bridge", {}).get("devices", []))

    for bus in await machine.qmp("query-pci"):
        visit(bus["devices"])
    return found


async def plug_hostile(
    launch: Any, vfio_user_host: Any, misbehaviour: hostile.Rewrite
) -> tuple[QTestMachine, VfioUserServer, str | None]:
    """device_add a device whose server misbehaves; (machine, host, device_add's error or None
    if QEMU took the device). Checks QEMU survived and an honest device still plugs."""
    machine = await hostile_machine(launch)
    fds_before = open_fds(machine)
    ram_before = machine.ram.read(0, machine.ram.size)
    host = await vfio_user_host("bad0")
    host.misbehaviour = misbehaviour
    # A crash must fail the case itself (so that a known one is a strict xfail), not only the
    # launcher's teardown: the checks below assert QEMU is still running.
    machine.exit_expected = True
    props = {"x-msg-timeout": MSG_TIMEOUT_MS}
    error: str | None = None
    try:
        await machine.qmp("device_add", **host.device_json(bus="rp0", **props))
    except QMPCommandError as refused:
        error = refused.desc
    assert misbehaviour.hits > 0, "the misbehaviour never happened"
    assert machine.running, f"QEMU died: {machine.stderr_tail()}"
    present = "bad0" in await pci_ids(machine)
    if error is not None:
        assert not present, f"device_add failed ({error}) but bad0 is on the bus"
        await host.wait_disconnected(timeout=5.0)
        assert open_fds(machine) <= fds_before, "a refused device left fds open in QEMU"
    else:
        assert present
    assert machine.ram.read(0, machine.ram.size) == ram_before, "guest RAM changed"
    honest = await vfio_user_host("ok0")
    await machine.qmp("device_add", **honest.device_json(bus="rp1", **props))
    assert "ok0" in await pci_ids(machine)
    # QEMU survived the misbehaviour: from here on a crash (at quit, say) is the launcher's to
    # report again, or it would pass unseen.
    machine.exit_expected = False
    return machine, host, error


# --- VERSION -----------------------------------------------------------------------------


CAPS = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": MAX_DATA_XFER}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(b"{not json\0", "malformed capabilities", id="malformed-json"),
        pytest.param(b"[1, 2]\0", "not an object", id="not-an-object"),
        pytest.param(json.dumps(CAPS).encode(), "corrupt version reply", id="no-nul"),
        pytest.param(
            json.dumps({"capabilities": {"max_data_xfer_size": 1 << 40}}).encode() + b"\0",
            "max_data_xfer_size",
            id="max-xfer-2^40",
        ),
        pytest.param(
            json.dumps({"capabilities": {"max_msg_fds": -1}}).encode() + b"\0",
            "max_msg_fds",
            id="negative-max-fds",
        ),
    ],
)
async def test_version_with_bad_caps_is_refused(
    launch: Any, vfio_user_host: Any, text: bytes, message: str
) -> None:
    _machine, _host, error = await plug_hostile(launch, vfio_user_host, hostile.version_caps(text))
    assert error is not None
    assert message in error, error


async def test_version_with_oversized_caps_is_refused(launch: Any, vfio_user_host: Any) -> None:
    """512 KiB of (valid) JSON: bigger than the buffer QEMU sized for its own request."""
    big = {"capabilities": {"padding": "x" * (512 << 10)}}
    caps = json.dumps(big).encode() + b"\0"
    _machine, _host, error = await plug_hostile(launch, vfio_user_host, hostile.version_caps(caps))
    assert error is not None, "QEMU took a device whose VERSION reply overflowed its buffer"


@pytest.mark.qemu_bug(
    before=(11, 1),
    reason="a bare-header VERSION reply is accepted: vfio_user_validate_version "
    "(hw/vfio-user/proxy.c) checks reply[hdr.size - sizeof(*msgp) - 1] (index -5 for a "
    "16-byte reply) and then parses the major/minor and capabilities left in its own request "
    "buffer, so the device realizes without the server ever naming a version",
)
async def test_version_reply_without_payload(launch: Any, vfio_user_host: Any) -> None:
    """A VERSION reply that is the bare header: no version, no capabilities."""
    misbehaviour = hostile.Rewrite(Command.VERSION, lambda _h, _p, _r: b"")
    _machine, _host, error = await plug_hostile(launch, vfio_user_host, misbehaviour)
    assert error is not None, "QEMU took a VERSION reply without a version"


# --- DEVICE_GET_INFO / REGION_INFO ---------------------------------------------------------


@pytest.mark.parametrize(
    ("regions", "irqs"),
    [
        pytest.param(0xFFFF_FFFF, 5, id="regions-2^32-1", marks=ABORTS_IN_REALIZE_ERROR_PATH),
        pytest.param(9, 0xFFFF_FFFF, id="irqs-2^32-1", marks=ABORTS_IN_REALIZE_ERROR_PATH),
        pytest.param(0, 0, id="none"),
    ],
)
async def test_device_info_with_absurd_counts_is_refused(
    launch: Any, vfio_user_host: Any, regions: int, irqs: int
) -> None:
    misbehaviour = hostile.device_info(num_regions=regions, num_irqs=irqs)
    _machine, _host, error = await plug_hostile(launch, vfio_user_host, misbehaviour)
    assert error is not None, f"QEMU took a device with {regions} regions, {irqs} IRQs"


ABORTS_ON_BAR_SIZE = pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU bug: a REGION_INFO whose BAR size is not a power of two aborts QEMU at "
        "device_add: vfio_bar_register -> pci_register_bar (hw/pci/pci.c:1515) asserts "
        "is_power_of_2(size) on the size the server sent ('pci_register_bar: Assertion "
        "`is_power_of_2(size)' failed', SIGABRT); a server's reply must not be able to kill "
        "QEMU (realize should fail)"
    ),
)


@pytest.mark.parametrize(
    ("index", "size", "offset", "refused"),
    [
        # Taken as is: a 2^63 BAR, a region offset that wraps (the offset is only used for
        # the device fd's mmap, which vfio-user does not have), a 16-byte config space.
        pytest.param(BAR0_REGION, 1 << 63, None, False, id="bar0-2^63"),
        pytest.param(BAR0_REGION, 0x1000, (1 << 64) - 0x10, False, id="bar0-offset-wraps"),
        pytest.param(
            CONFIG_REGION,
            0x10,
            None,
            False,
            id="config-16-bytes",
            marks=pytest.mark.qemu_bug(
                before=(11, 1),
                # Heap corruption: whether glibc notices (and aborts) varies run to run, so
                # this one cannot be strict; an XPASS here is not a fix.
                strict=False,
                reason="a 16-byte config region corrupts QEMU's heap at device_add "
                "('malloc(): invalid size (unsorted)', SIGABRT): the vfio-pci realize reads "
                "and emulates 256 bytes of config space from a region the server sized 16",
            ),
        ),
        pytest.param(
            BAR0_REGION, (1 << 64) - 0x1000, None, True, id="bar0-2^64-4k", marks=ABORTS_ON_BAR_SIZE
        ),
    ],
)
async def test_region_info_that_overflows(
    launch: Any, vfio_user_host: Any, index: int, size: int, offset: int | None, refused: bool
) -> None:
    misbehaviour = hostile.region_info(index, size=size, offset=offset)
    _machine, _host, error = await plug_hostile(launch, vfio_user_host, misbehaviour)
    assert (error is not None) == refused, error


# --- framing: ids, commands, fds, sizes -----------------------------------------------------


@ABORTS_IN_REALIZE_ERROR_PATH
async def test_reply_with_wrong_id_is_refused(launch: Any, vfio_user_host: Any) -> None:
    _machine, _host, error = await plug_hostile(
        launch, vfio_user_host, hostile.wrong_id(Command.DEVICE_GET_INFO)
    )
    assert error is not None


async def test_reply_with_wrong_command_is_taken(launch: Any, vfio_user_host: Any) -> None:
    """QEMU matches a reply by id only (vfio_user_recv_one): a DEVICE_GET_INFO reply with
    DMA_MAP in its command field is taken as the answer, and the device realizes."""
    _machine, _host, error = await plug_hostile(
        launch, vfio_user_host, hostile.wrong_command(Command.DEVICE_GET_INFO, Command.DMA_MAP)
    )
    assert error is None


@ABORTS_IN_REALIZE_ERROR_PATH
@pytest.mark.parametrize("count", [pytest.param(1, id="one"), pytest.param(40, id="forty")])
async def test_reply_with_unexpected_fds(launch: Any, vfio_user_host: Any, count: int) -> None:
    _machine, _host, error = await plug_hostile(
        launch, vfio_user_host, hostile.with_fds(Command.DEVICE_GET_INFO, count)
    )
    assert error is not None


@pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU bug: a REGION_READ reply 2 bytes longer than asked kills QEMU with SIGSEGV at "
        "device_add: vfio_user_recv_one (hw/vfio-user/proxy.c) reports 'reply larger than "
        "recv buffer' and jumps to 'err' without reading the body, the body is parsed as the "
        "next header ('bad header size', proxy goes to VFIO_PROXY_ERROR), then 'vfio_wait_reqs "
        "- timed out' and the process segfaults in the realize's error path"
    ),
)
async def test_region_read_reply_of_the_wrong_size(launch: Any, vfio_user_host: Any) -> None:
    misbehaviour = hostile.region_read(count_delta=2, data_delta=2, region=CONFIG_REGION)
    _machine, _host, error = await plug_hostile(launch, vfio_user_host, misbehaviour)
    assert error is not None


# --- unsolicited requests ------------------------------------------------------------------

FLOOD_READS, FLOOD_UNKNOWN = 1000, 250
# QEMU serves the flood and QMP from one main loop: on a loaded machine an answer can take
# many seconds. The case pins that QMP is answered, not how fast.
FLOOD_QMP_TIMEOUT_S = 120.0
UNKNOWN_COMMAND = 0x7FFF  # no vfio-user command has this number
FLOOD_GPA = 0x10_0000  # guest RAM the flood's DMA_READs read (no vIOMMU: GPA == IOVA)


async def test_flood_of_unsolicited_requests_is_answered_and_qemu_stays_responsive(
    launch: Any, vfio_user_host: Any
) -> None:
    """A device process floods QEMU with requests no one asked for: 1000 DMA_READs and 250
    requests of a command that does not exist, all in flight at once. QEMU answers every one
    (the reads with their data, the unknown command with ENOSYS, as hw/vfio-user/pci.c's
    request handler does), answers QMP while the flood is in flight, leaks no fd, writes no
    guest RAM, and the device still answers config reads afterwards."""
    machine = await hostile_machine(launch)
    host = await vfio_user_host("fl0")
    # An honest host: QEMU's own reply timeout, not the hostile cases' short one (a loaded
    # machine answers a realize-time REGION_WRITE later than MSG_TIMEOUT_MS).
    await machine.qmp("device_add", **host.device_json(bus="rp0"))
    await host.wait_connected(timeout=5.0)
    device = Bdf(1, 0)
    cfg = PciConfig(machine.qtest)
    await power_on_slot(cfg, PORTS[0])  # a device in a powered-off slot does no DMA
    for bdf in (PORTS[0], device):  # a DMA_READ crosses the port's bus-master window too
        await cfg.enable_bus_master(bdf)
    vendor = await cfg.read(device, 0, 2)
    fds_before = open_fds(machine)
    ram_before = machine.ram.read(0, machine.ram.size)
    session = host.session
    assert session is not None
    reads = [
        session.request(
            Command.DMA_READ, DmaAccess(FLOOD_GPA + 8 * i, 8).encode(), timeout=FLOOD_QMP_TIMEOUT_S
        )
        for i in range(FLOOD_READS)
    ]
    unknown = [
        session.request(cast("Command", UNKNOWN_COMMAND), b"", timeout=FLOOD_QMP_TIMEOUT_S)
        for _ in range(FLOOD_UNKNOWN)
    ]
    flood = asyncio.ensure_future(asyncio.gather(*reads, *unknown))
    try:
        status = await machine.qmp("query-status", timeout=FLOOD_QMP_TIMEOUT_S)
        assert status["status"] == "running"
        replies = await asyncio.wait_for(flood, 2 * FLOOD_QMP_TIMEOUT_S)
    finally:
        flood.cancel()
    read_errors = [h.error for h, _ in replies[:FLOOD_READS] if h.is_error]
    assert read_errors == [], f"{len(read_errors)} DMA_READs refused: {sorted(set(read_errors))}"
    unknown_replies = {(h.is_error, h.error) for h, _ in replies[FLOOD_READS:]}
    assert unknown_replies == {(True, errno.ENOSYS)}, unknown_replies
    assert machine.running
    assert open_fds(machine) <= fds_before, "the flood left fds open in QEMU"
    assert machine.ram.read(0, machine.ram.size) == ram_before, "guest RAM changed"
    assert await cfg.read(device, 0, 2) == vendor
    assert host.connected


@pytest.mark.xfail(
    strict=True,
    reason=(
        "QEMU bug: fds on a server->client request leak in QEMU. vfio_user_recv_one "
        "(hw/vfio-user/proxy.c) stores them with vfio_user_getfds(numfds), which leaves "
        "recv_fds 0 (g_malloc0), so vfio_user_putfds closes none when vfio_user_pci_process_req "
        "refuses the request (EINVAL). 11.1.3 and 10.2.2: 3 requests with 1 fd leave 3 more fds "
        "open in QEMU, with 200 fds 48 (16 kept per message): a device process can exhaust "
        "QEMU's fd table"
    ),
)
@pytest.mark.parametrize("count", [pytest.param(1, id="one"), pytest.param(200, id="two-hundred")])
async def test_requests_carrying_fds_are_refused_and_the_fds_closed(
    launch: Any, vfio_user_host: Any, count: int
) -> None:
    """No host->client request takes a file descriptor. A device process sending DMA_READs
    with `count` fds attached gets EINVAL for each (hw/vfio-user/pci.c), QEMU keeps none of
    the fds, and the next honest DMA_READ is served."""
    machine = await hostile_machine(launch)
    host = await vfio_user_host("fd0")
    # An honest host: QEMU's own reply timeout, not the hostile cases' short one (a loaded
    # machine answers a realize-time REGION_WRITE later than MSG_TIMEOUT_MS).
    await machine.qmp("device_add", **host.device_json(bus="rp0"))
    await host.wait_connected(timeout=5.0)
    cfg = PciConfig(machine.qtest)
    await power_on_slot(cfg, PORTS[0])
    for bdf in (PORTS[0], Bdf(1, 0)):
        await cfg.enable_bus_master(bdf)
    session = host.session
    assert session is not None
    fds_before = open_fds(machine)
    read = DmaAccess(FLOOD_GPA, 8).encode()
    for _ in range(3):
        fds = tuple(os.open(os.devnull, os.O_RDONLY) for _ in range(count))
        header, _ = await session.request(Command.DMA_READ, read, fds=fds, timeout=10)
        assert (header.is_error, header.error) == (True, errno.EINVAL), header.describe()
    assert open_fds(machine) <= fds_before, "QEMU kept fds a request carried"
    header, _ = await session.request(Command.DMA_READ, read, timeout=10)
    assert not header.is_error, header.describe()
    assert machine.running


# --- a server dying in the middle of a reply -------------------------------------------------

CUT_KEEP = HEADER_SIZE + 2  # the reply's header and two bytes of its body leave, then nothing
CUT_MSG_TIMEOUT_MS = 3000  # x-msg-timeout: QEMU waits this long for the rest


async def die_after_part_is_read(machine: QTestMachine, host: VfioUserServer, cut: Any) -> None:
    """Once QEMU has read the cut reply's part (its trace says so: the read that came back
    short, EAGAIN next), the server's socket closes, as a crashed server's does. QEMU must see
    the part and the EOF in two reads: seen in one, it fails the request cleanly."""
    short_read = re.compile(
        rf"vfio_user_recv_read +id 0x[0-9a-f]+ read {CUT_KEEP - HEADER_SIZE:#x}$", re.M
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CUT_MSG_TIMEOUT_MS / 1000
    while loop.time() < deadline:  # polled: the trace is a file QEMU appends to
        if cut.hits and short_read.search(machine.trace_path.read_text(errors="replace")):
            break
        await asyncio.sleep(0.01)
    await host.disconnect("host died in the middle of a reply")


@pytest.mark.xfail(
    strict=True,
    raises=QTestError,
    reason=(
        "QEMU bug (finding 24): a server that dies in the middle of its reply to the last "
        "DMA_UNMAP of DMAR enable kills QEMU with SIGSEGV (NULL write) in "
        "vfio_user_wait_reqs (hw/vfio-user/proxy.c). vfio_user_recv_one takes the reply's "
        "request off the pending list on its header, the short body leaves it in part_recv, "
        "and the EOF read by vfio_user_complete goes to 'fatal' without completing it "
        "('server closed socket'); after x-msg-timeout the waiter QTAILQ_REMOVEs it from the "
        "pending list again (tql_prev already NULL) before it prints 'vfio_wait_reqs - timed "
        "out'. 10/10 on 11.1.3; the kernel logs 'segfault at 0 ... error 6' at "
        "vfio_user_wait_reqs+0x17f. vfio_user_send_wait has the same removal: a realize-time "
        "reply cut the same way segfaults at vfio_user_send_wait+0x1a9"
    ),
)
async def test_server_dying_mid_reply_to_dmar_enable_unmaps(
    launch: Any, vfio_user_host: Any
) -> None:
    """DMAR on switches the device's address space: vfio unmaps every RAM section it mapped
    (DMA_UNMAPs sent without waiting, vfio_user_dma_unmap 'async_ops 1') and waits for the
    last at the listener's commit. The server answers all but that one, sends the start of
    its reply and dies. QEMU must report the lost unmap and run on: the GCMD write completes,
    QMP answers, and the device's connection is gone."""
    host = await vfio_user_host("cut0")
    device = Bdf(0, 3)
    props = {"x-msg-timeout": CUT_MSG_TIMEOUT_MS}
    spec = MachineSpec(
        accel="qtest",
        memory_mib=RAM_MIB,
        devices=[host.device_json(bus="pcie.0", addr=hex(device.dev), **props)],
        trace=[*DEFAULT_TRACE, "vfio_user_recv_*"],
    )
    machine = await launch(spec)
    assert isinstance(machine, QTestMachine)
    await host.wait_connected(timeout=5.0)
    await PciConfig(machine.qtest).enable_bus_master(device)
    driver = VtdDriver(machine.qtest, machine.ram)
    await driver.init()
    sections = len(host.table)  # each is unmapped when DMAR goes on
    assert sections > 1, f"vfio mapped {sections} RAM sections: nothing to be in flight"
    cut = hostile.cut_reply(Command.DMA_UNMAP, nth=sections, keep=CUT_KEEP)
    host.misbehaviour = cut
    machine.exit_expected = True  # a crash fails the case itself (the strict xfail's pin)
    dying = asyncio.ensure_future(die_after_part_is_read(machine, host, cut))
    try:
        await driver.enable_translation()
        await dying
    finally:
        dying.cancel()
    assert cut.hits == 1, f"{cut.seen} DMA_UNMAPs, not the {sections} sections"
    assert machine.running, f"QEMU died: {machine.stderr_tail()}"
    assert (await machine.qmp("query-status"))["status"] == "running"
    await host.wait_disconnected(timeout=5.0)


@pytest.mark.xfail(
    strict=True,
    raises=QEMUExitedError,
    reason=(
        "QEMU bug (finding 24): a server that dies in the middle of a realize-time reply "
        "(DEVICE_GET_INFO: the header and 2 bytes, then EOF) kills QEMU with SIGSEGV (NULL "
        "write) at device_add, in vfio_user_send_wait (hw/vfio-user/proxy.c): the same "
        "request taken off the pending list twice as in vfio_user_wait_reqs, after "
        "x-msg-timeout ('server closed socket'; the kernel logs 'segfault at 0 ... error 6' "
        "at vfio_user_send_wait+0x1a9). 10/10 on 11.1.3"
    ),
)
async def test_server_dying_mid_reply_at_realize(launch: Any, vfio_user_host: Any) -> None:
    """The reply QEMU's realize waits for (vfio_user_send_wait) starts, then the server dies:
    device_add must fail with the closed socket, and QEMU run on."""
    machine = await hostile_machine(launch, trace=["vfio_user_recv_*"])
    host = await vfio_user_host("cut1")
    cut = hostile.cut_reply(Command.DEVICE_GET_INFO, nth=1, keep=CUT_KEEP)
    host.misbehaviour = cut
    machine.exit_expected = True  # a crash fails the case itself (the strict xfail's pin)
    props = {"x-msg-timeout": CUT_MSG_TIMEOUT_MS}
    dying = asyncio.ensure_future(die_after_part_is_read(machine, host, cut))
    try:
        with pytest.raises(QMPCommandError, match=r"server closed socket|EOF|timed out"):
            await machine.qmp("device_add", **host.device_json(bus="rp0", **props))
        await dying
    finally:
        dying.cancel()
    assert cut.hits == 1
    assert machine.running, f"QEMU died: {machine.stderr_tail()}"
    assert "cut1" not in await pci_ids(machine)
