"""The driver's GSTS as read with its last register write (VtdDriver.gsts) against the reference,
a GSTS read of its own, on a real QEMU: after GCMD writes, queue submissions, a register
write behind the driver's back and a QMP system_reset, the value the rig's check uses is the
one a new read gives, and a check right after a submission costs no qtest exchange."""

from __future__ import annotations

import pytest

from fixtures.rig.vtd_rig import D0, RigFactory
from fixtures.vtd.registers import GCMD, GCMD_QIE, GSTS

pytestmark = pytest.mark.qtest


async def test_gsts_read_with_the_last_write_is_a_new_reads_value(vtd_rig: RigFactory) -> None:
    rig = await vtd_rig(devices=("d0",))
    driver, qtest = rig.driver, rig.machine.qtest

    async def agrees() -> int:
        value = await driver.gsts()
        assert value == await qtest.readl(driver.base + GSTS)  # the reference
        return value

    async with rig.switch_step("attach d0"):  # the rig's check runs after each window
        await driver.attach_and_flush(D0, driver.domain(1))
    epoch = qtest.epoch
    assert not await driver.translation_enabled()
    assert qtest.epoch == epoch  # read with the submission's IQT write: no exchange
    await agrees()
    async with rig.switch_step("DMAR on"):
        await driver.enable_translation()
        epoch = qtest.epoch
        assert await driver.translation_enabled()
        assert qtest.epoch == epoch  # read with the GCMD write
    await agrees()
    async with rig.step("global IOTLB flush"):
        await driver.iotlb_global()
    assert await agrees() == await driver.gsts()
    # Behind the driver's back: TE off, QIE kept (the qtest exchange makes the cache stale).
    async with rig.switch_step("GCMD written behind the driver"):
        await qtest.writel(driver.base + GCMD, GCMD_QIE)
        assert not await driver.translation_enabled()
    async with rig.switch_step("DMAR on again"):
        await driver.enable_translation()
    assert await driver.translation_enabled()
    # QMP: a system reset turns translation off without any qtest exchange.
    async with rig.switch_step("system_reset"):
        await rig.machine.qmp("system_reset")
        assert not await driver.translation_enabled()
    await agrees()
