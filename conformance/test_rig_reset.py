"""The rig pool's reset and its check (fixtures/rig/reset.py), on a real QEMU: a reset QEMU
looks like its fresh start and runs a case like one; the check rejects a reset that leaves a
device or a mapping behind, and the pool then falls back to a fresh QEMU and says why."""

from __future__ import annotations

import pytest

import fixtures.rig.reset as reset
from fixtures.rig.reset import RigPool, snapshot
from fixtures.rig.vtd_rig import VtdRig

pytestmark = pytest.mark.qtest


async def used_rig(pool: RigPool, *, scalable: bool = False) -> VtdRig:
    """A pooled rig after a case's worth of state: two translated domains with leaves, DMAR
    on, and a hotplugged device."""
    rig = await pool.acquire(devices=2, ports=1, scalable=scalable)
    first, second = rig.devices
    await rig.translate({first: 1, second: 2})
    await rig.populate(1)
    await rig.populate(2)
    async with rig.replay_step("hotplug h0", "h0"):
        await rig.hotplug("h0")
    return rig


@pytest.mark.parametrize("scalable", [False, True], ids=["legacy", "scalable"])
async def test_reset_qemu_checks_out_and_runs_a_case_again(
    vtd_rig_pool: RigPool, scalable: bool
) -> None:
    rig = await used_rig(vtd_rig_pool, scalable=scalable)
    await vtd_rig_pool.release(rig, reusable=True)
    again = await vtd_rig_pool.acquire(devices=2, ports=1, scalable=scalable)
    assert again.machine is rig.machine, vtd_rig_pool.origin(again)
    assert not vtd_rig_pool.fell_back(again), vtd_rig_pool.origin(again)
    assert vtd_rig_pool.reuses == 1
    # The reset rig starts from the fresh state: only the cold devices, each host's new
    # record holding what the reset did (identity map of RAM, DMAR off).
    assert list(again.devices) == [n for n, d in rig.devices.items() if d.port is None]
    assert all(len(dev.host.tables) == 1 for dev in again.devices.values())
    first, second = again.devices
    await again.translate({first: 2, second: 1})
    await again.populate(2)
    await again.populate(1)


async def fell_back_on_reuse(pool: RigPool, rig: VtdRig) -> str:
    """Give `rig` back as reusable and take the next one: it must be a fresh QEMU, not the
    reset one. Returns the pool's account of why."""
    await pool.release(rig, reusable=True)
    again = await pool.acquire(devices=2, ports=1)
    why = pool.origin(again)
    assert pool.fell_back(again), why
    assert again.machine is not rig.machine, why
    return why


async def test_snapshot_names_a_leftover_mapping_and_device(vtd_rig_pool: RigPool) -> None:
    """What the reset check compares: a QEMU with a mapping and a device more than at its
    fresh start differs in its hosts' mappings, its devices and its PCI topology."""
    rig = await vtd_rig_pool.acquire(devices=2, ports=1)
    hosts = [dev.host for dev in rig.devices.values()]
    fresh = await snapshot(rig, hosts, 1)
    assert fresh.differences(await snapshot(rig, hosts, 1)) == []
    used = await used_rig(vtd_rig_pool)  # the same configuration: a second QEMU
    used_hosts = [dev.host for name, dev in used.devices.items() if dev.port is None]
    found = (await snapshot(used, used_hosts, 1)).differences(vtd_rig_pool.reference(used))
    text = "\n".join(found)
    assert "hosts:" in text, text
    assert "0x100000000+0x1000" in text, text
    assert "/machine/peripheral/h0" in text, text
    assert "PCI topology" in text, text
    assert "VT-d registers" in text, text


async def test_reset_leaving_a_device_falls_back_to_a_fresh_qemu(
    vtd_rig_pool: RigPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_drain = reset.drain

    async def drain_but_keep_hotplugged(rig: VtdRig) -> None:
        kept = {n: d for n, d in rig.devices.items() if d.port is not None}
        for name in kept:
            del rig.devices[name]
        try:
            await real_drain(rig)
        finally:
            rig.devices.update(kept)

    monkeypatch.setattr(reset, "drain", drain_but_keep_hotplugged)
    rig = await used_rig(vtd_rig_pool)
    why = await fell_back_on_reuse(vtd_rig_pool, rig)
    assert "/machine/peripheral/h0" in why, why
    assert "PCI topology" in why, why
    assert not rig.machine.running  # the QEMU that did not reset cleanly is gone


async def test_reset_leaving_a_mapping_falls_back_to_a_fresh_qemu(
    vtd_rig_pool: RigPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_drain(rig: VtdRig) -> None:
        for name, dev in list(rig.devices.items()):
            if dev.present and dev.port is not None:
                async with rig.step(f"unplug {name}"):
                    await rig.unplug(name)

    monkeypatch.setattr(reset, "drain", no_drain)
    rig = await used_rig(vtd_rig_pool)
    why = await fell_back_on_reuse(vtd_rig_pool, rig)
    assert "holds mappings" in why, why
    # The reused hosts' records were left alone: the old rig still judges its whole stream.
    assert all(dev.host.table.events for dev in rig.devices.values() if dev.port is None)


async def test_a_failed_example_is_not_reused(vtd_rig_pool: RigPool) -> None:
    rig = await vtd_rig_pool.acquire(devices=1)
    await vtd_rig_pool.release(rig, reusable=False)
    again = await vtd_rig_pool.acquire(devices=1)
    assert again.machine is not rig.machine
    assert not rig.machine.running
    assert not vtd_rig_pool.fell_back(again)
    assert vtd_rig_pool.reuses == 0
