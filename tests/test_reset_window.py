"""The pooled QEMU's reset zeroes only the part of the driver's table window the old driver
handed out (its allocator's high-water mark), on a real QEMU: the reset still checks out
and equals the fresh start (the reference: the whole window compared), and a stray write
above the mark, which nothing zeroes, fails the reset check and the pool falls back."""

from __future__ import annotations

import pytest

from fixtures.rig.reset import RigPool
from fixtures.vtd.driver import TABLE_WINDOW

pytestmark = pytest.mark.qtest


async def test_reset_after_tables_equals_the_fresh_window(vtd_rig_pool: RigPool) -> None:
    rig = await vtd_rig_pool.acquire(devices=1)
    (name,) = rig.devices
    await rig.translate({name: 1})
    await rig.populate(1)
    mark = rig.driver.alloc.high_water
    assert TABLE_WINDOW[0] < mark < TABLE_WINDOW[1]
    await vtd_rig_pool.release(rig, reusable=True)
    again = await vtd_rig_pool.acquire(devices=1)
    assert again.machine is rig.machine, vtd_rig_pool.origin(again)
    assert not vtd_rig_pool.fell_back(again), vtd_rig_pool.origin(again)
    start, end = TABLE_WINDOW
    assert again.machine.ram.read(start, end - start) == vtd_rig_pool.reference(again).window


async def test_a_stray_write_above_the_mark_fails_the_reset(vtd_rig_pool: RigPool) -> None:
    rig = await vtd_rig_pool.acquire(devices=1)
    stray = TABLE_WINDOW[1] - 8
    assert stray >= rig.driver.alloc.high_water
    rig.machine.ram.write(stray, b"\xff" * 8)
    await vtd_rig_pool.release(rig, reusable=True)
    again = await vtd_rig_pool.acquire(devices=1)
    why = vtd_rig_pool.origin(again)
    assert vtd_rig_pool.fell_back(again), why
    assert f"table window pages differ: {stray & ~0xFFF:#x}" in why, why
