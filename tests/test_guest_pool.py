"""The shared guests' pure parts (the reset check's snapshot comparison, the xdist work unit)
and the collection check on cases that lease a guest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fixtures.oracle.walk import DeviceMode, Translation
from fixtures.plugins.guest import SHARED_GUEST_MODULES, SHARED_GUEST_UNIT, work_unit
from fixtures.rig.guest_pool import DeviceContext, GuestConfig, GuestSnapshot
from tests.inner_run import run_pytest, write_case

PCI = (
    (("bdf", "0000:00:01.0"), ("driver", "virtio-pci"), ("iommu_group", 1)),
    (("bdf", "0000:00:03.0"), ("driver", None), ("iommu_group", 2)),
)
CONTEXT = DeviceContext("0000:00:03.0", DeviceMode.TRANSLATED, 4, 1 << 48, ())
FRESH = GuestSnapshot(PCI, (CONTEXT,), (("devA", 0),))


def test_an_equal_snapshot_has_no_differences() -> None:
    assert GuestSnapshot(PCI, (CONTEXT,), (("devA", 0),)).differences(FRESH) == []


def test_a_device_left_bound_is_named() -> None:
    bound = (PCI[0], (("bdf", "0000:00:03.0"), ("driver", "vfio-pci"), ("iommu_group", 2)))
    (line,) = dataclasses.replace(FRESH, pci=bound).differences(FRESH)
    assert "0000:00:03.0 driver vfio-pci" in line
    assert "fresh" in line


def test_a_leaf_left_in_the_tables_is_named() -> None:
    leaf = Translation(iova=0x10_0000, gpa=0x20_0000, size=0x1000, read=True, write=True)
    left = dataclasses.replace(CONTEXT, translations=(leaf,))
    (line,) = dataclasses.replace(FRESH, contexts=(left,)).differences(FRESH)
    assert line.startswith("0000:00:03.0: translated, 4 levels, 1 leaves != fresh")


def test_another_address_width_or_mode_differs() -> None:
    for changed in (
        dataclasses.replace(CONTEXT, levels=3),
        dataclasses.replace(CONTEXT, mode=DeviceMode.PASS_THROUGH),
    ):
        assert dataclasses.replace(FRESH, contexts=(changed,)).differences(FRESH)


def test_a_live_host_mapping_differs() -> None:
    (line,) = dataclasses.replace(FRESH, host_mappings=(("devA", 1),)).differences(FRESH)
    assert line.startswith("host mappings")


def test_configurations_are_equal_whatever_the_order_of_iommu_properties() -> None:
    a = GuestConfig.of({"devA": 3}, {"caching-mode": True, "intremap": "on"}, "quiet")
    b = GuestConfig.of({"devA": 3}, {"intremap": "on", "caching-mode": True}, "quiet")
    assert a == b
    assert a.bdf("devA") == "0000:00:03.0"
    assert a != GuestConfig.of({"devA": 4}, {"intremap": "on", "caching-mode": True}, "quiet")


def test_the_shared_modules_are_one_work_unit_and_every_other_case_its_own() -> None:
    for module in SHARED_GUEST_MODULES:
        assert work_unit(f"{module}::test_x[legacy]") == SHARED_GUEST_UNIT
    other = "conformance/test_guest_hotplug.py::test_cooperative_hot_unplug_leaves_no_host_mappings"
    assert work_unit(other) == other


def test_a_case_leasing_a_guest_outside_the_listed_modules_is_a_usage_error(
    tmp_path: Path,
) -> None:
    case = write_case(
        tmp_path,
        """
        async def test_leases(shared_guest):
            pass
        """,
    )
    code, out = run_pytest(case, "-p", "fixtures.plugins.guest")
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "test_inner.py::test_leases leases a shared guest: add test_inner.py to" in out, out
    assert "Traceback" not in out, out
