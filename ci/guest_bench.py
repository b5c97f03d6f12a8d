"""Guest-tier figures for ci/bench: boot time and agent round-trip rate.

    figures = await guest_bench(qemu_binary)      # or: python -m ci.guest_bench QEMU
    -> {"guest_boot_s": median QEMU start -> first agent reply,
        "agent_map_unmap_per_s": VFIO map + unmap pairs per second, one agent request each,
        "guest_map_unmap_per_s": the same pairs run inside the guest (no round trips),
        "boot_*_s": the boot's breakdown (medians), see BREAKDOWN}

The breakdown is timed on the host: the serial console is polled every 5 ms and each stage
marker guests/init prints is stamped when it appears. The guest's own clock is no use for
this under TCG: on a loaded host its TSC calibration can be off by an order of magnitude.
`--kernel-log` boots once more without `quiet` and prints every console line with its host
time (the kernel's part of the boot; printing slows it a little).

Boots the built guest (guests/build.py) with one vfio-user device; every QEMU and server is
stopped and reaped before returning, also on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fixtures.guest.errors import GuestError
from fixtures.guest.machine import (
    READY_MARKER,
    Guest,
    GuestImage,
    boot_guest,
    guest_spec,
    kernel_cmdline,
)
from fixtures.guest.session import GuestSession
from fixtures.guest.vfio import GuestContainer, GuestVfioDevice
from fixtures.qemu.accelerator import choose_accelerator
from fixtures.qemu.machine import Machine, make_runtime_dir
from fixtures.qemu.spec import MachineSpec
from fixtures.vfio_user.server import VfioUserServer

IOVA = 0x10_0000
# (figure, from-marker, to-marker): markers are serial-line prefixes guests/init prints;
# "start" is QEMU's spawn, "agent" the first agent reply.
BREAKDOWN = (
    ("boot_kernel_s", "start", "VIOMMU-BOOT init"),  # firmware, kernel, initramfs unpack
    ("boot_init_net_s", "VIOMMU-BOOT init", "VIOMMU-BOOT net"),  # lo and eth0 up, addresses
    # dropbear start, the agent's python3 start and imports, its listen; it prints the marker
    ("boot_init_ready_s", "VIOMMU-BOOT net", READY_MARKER),
    ("boot_ready_to_agent_s", READY_MARKER, "agent"),  # SSH handshake, direct-tcpip, fork, hello
)


class SerialClock:
    """Host-side timestamps of serial console lines, polled every 5 ms while running."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path = path
        self.t0 = t0
        self.lines: list[tuple[float, str]] = []
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        pending = b""  # an incomplete last line
        offset = 0
        while True:
            with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
                pending += chunk
            now = time.monotonic() - self.t0
            *complete, pending = pending.split(b"\n")
            for line in complete:
                self.lines.append((now, line.decode(errors="replace").rstrip("\r")))
            await asyncio.sleep(0.005)

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _one_guest(
    qemu: str,
    accel: str,
    image: GuestImage,
    work: Path,
    index: int,
    round_trips: int,
    append: str | None = None,
    log: list[tuple[float, str]] | None = None,
) -> tuple[float, float, float, dict[str, float]]:
    server = VfioUserServer("devA", work / f"sock-{index}")
    machines: list[Machine] = []

    async def start(spec: MachineSpec) -> Machine:
        run_dir = work / f"qemu-{index}"
        run_dir.mkdir(mode=0o700)
        machine = Machine(qemu, spec, accel, run_dir, make_runtime_dir())
        machines.append(machine)
        await machine.launch()
        return machine

    await server.start()
    guest: Guest | None = None
    clock: SerialClock | None = None
    t0 = time.monotonic()

    def on_machine(g: Guest) -> None:
        nonlocal clock
        clock = SerialClock(g.machine.serial_path, t0)

    try:
        spec = guest_spec(image, devices=[server.device_json(addr="0x3")], append=append)
        guest = await boot_guest(start, spec, image, on_machine=on_machine)
        boot = guest.boot_seconds
        assert clock is not None
        await asyncio.sleep(0.01)  # the poller's last look at the serial file
        stamps = {"start": 0.0, "agent": boot}
        figures: dict[str, float] = {}
        for name, a, b in BREAKDOWN:
            ta = stamps.get(a, clock.first(a))
            tb = stamps.get(b, clock.first(b))
            if ta is not None and tb is not None:
                figures[name] = tb - ta
        if log is not None:
            log += clock.lines
        # A second session on the booted guest: what the SSH handshake and a session's
        # agent (a fork of the one started at boot, reached by direct-tcpip) cost on their own.
        t1 = time.monotonic()
        extra = await GuestSession.open(guest.port, image.client_key, image.host_key_line)
        figures["agent_session_open_s"] = time.monotonic() - t1
        await extra.close()
        c = GuestContainer(guest)
        await c.add(GuestVfioDevice(server, "0000:00:03.0"))
        await c.alloc("buf", 4096)
        t0 = time.monotonic()
        for _ in range(round_trips):
            await guest.call("map", buffer="buf", iova=IOVA)
            await guest.call("unmap", iova=IOVA, size=4096)
        agent_rate = round_trips / (time.monotonic() - t0)
        churn = await guest.call("churn", buffer="buf", iova=IOVA, count=1000, timeout=120.0)
        guest_rate = churn["count"] / churn["seconds"]
        return boot, agent_rate, guest_rate, figures
    finally:
        if clock is not None:
            await clock.stop()
        if guest is not None:
            await guest.collect()
        for machine in machines:
            await machine.shutdown()
            shutil.rmtree(machine.runtime_dir, ignore_errors=True)
        await server.stop()


async def guest_bench(
    qemu: str, *, boots: int = 3, round_trips: int = 200, accel: str = "auto"
) -> dict[str, float]:
    found = GuestImage.locate()
    if isinstance(found, str):
        raise GuestError(found)
    chosen = choose_accelerator(accel)
    with tempfile.TemporaryDirectory(prefix="viommu-guest-bench-") as tmp:
        results = [
            await _one_guest(qemu, chosen, found, Path(tmp), i, round_trips) for i in range(boots)
        ]
    out = {
        "guest_boot_s": round(statistics.median(r[0] for r in results), 2),
        "agent_map_unmap_per_s": round(statistics.median(r[1] for r in results), 1),
        "guest_map_unmap_per_s": round(statistics.median(r[2] for r in results), 1),
    }
    for name in [b[0] for b in BREAKDOWN] + ["agent_session_open_s"]:
        values = [r[3][name] for r in results if name in r[3]]
        if values:
            out[name] = round(statistics.median(values), 3)
    return out


async def kernel_log(qemu: str, accel: str = "auto") -> list[tuple[float, str]]:
    """One boot without `quiet`: every console line with its host time since QEMU's spawn."""
    found = GuestImage.locate()
    if isinstance(found, str):
        raise GuestError(found)
    log: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="viommu-guest-bench-") as tmp:
        append = kernel_cmdline(extra="loglevel=7")  # overrides quiet (parsed later)
        await _one_guest(qemu, choose_accelerator(accel), found, Path(tmp), 0, 1, append, log)
    return log


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--kernel-log"]
    if len(args) != 1:
        print("usage: python -m ci.guest_bench [--kernel-log] QEMU_BINARY", file=sys.stderr)
        return 2
    if "--kernel-log" in argv:
        for t, line in asyncio.run(kernel_log(args[0])):
            print(f"{t:8.3f} {line}")
        return 0
    for name, value in asyncio.run(guest_bench(args[0])).items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
