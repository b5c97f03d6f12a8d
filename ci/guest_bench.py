"""Guest-tier figures for ci/bench: boot time and agent round-trip rate.

    figures = await guest_bench(qemu_binary)      # or: python -m ci.guest_bench QEMU
    -> {"guest_boot_s": median QEMU start -> first agent reply,
        "agent_map_unmap_per_s": VFIO map + unmap pairs per second, one agent request each,
        "guest_map_unmap_per_s": the same pairs run inside the guest (no round trips)}

Boots the built guest (guests/build.py) with one vfio-user device; every QEMU and server is
stopped and reaped before returning, also on error.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fixtures.guest.errors import GuestError
from fixtures.guest.machine import Guest, GuestImage, boot_guest, guest_spec
from fixtures.guest.vfio import GuestContainer, GuestVfioDevice
from fixtures.qemu.accelerator import choose_accelerator
from fixtures.qemu.machine import Machine, make_runtime_dir
from fixtures.qemu.spec import MachineSpec
from fixtures.vfio_user.server import VfioUserServer

IOVA = 0x10_0000


async def _one_guest(
    qemu: str, accel: str, image: GuestImage, work: Path, index: int, round_trips: int
) -> tuple[float, float, float]:
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
    try:
        spec = guest_spec(image, devices=[server.device_json(addr="0x3")])
        guest = await boot_guest(start, spec, image)
        boot = guest.boot_seconds
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
        return boot, agent_rate, guest_rate
    finally:
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
    return {
        "guest_boot_s": round(statistics.median(r[0] for r in results), 2),
        "agent_map_unmap_per_s": round(statistics.median(r[1] for r in results), 1),
        "guest_map_unmap_per_s": round(statistics.median(r[2] for r in results), 1),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ci.guest_bench QEMU_BINARY", file=sys.stderr)
        return 2
    for name, value in asyncio.run(guest_bench(argv[0])).items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
