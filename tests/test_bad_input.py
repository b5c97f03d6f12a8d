"""Bad input gets one clear line naming the cause, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fixtures.qemu.accelerator import choose_accelerator, hardware_kvm_available
from fixtures.qemu.capabilities import Capabilities
from fixtures.qemu.errors import MissingFeature
from tests.inner_run import run_pytest, write_case

USES_QEMU = """
    from fixtures.qemu.spec import MachineSpec

    async def test_case(launch):
        await launch(MachineSpec(accel="qtest"))
"""


def fake_qemu(tmp_path: Path, real: str, script: str) -> Path:
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(f"#!/bin/sh\nREAL={real}\n{script}\n")
    path.chmod(0o755)
    return path


def test_missing_qemu_path_is_one_line(tmp_path: Path) -> None:
    code, out = run_pytest(write_case(tmp_path, USES_QEMU), "--qemu", "/nonexistent/qemu")
    assert code == 4, out
    assert "--qemu /nonexistent/qemu: no such file" in out
    assert "Traceback" not in out


def test_qemu_that_is_not_qemu_is_one_line(tmp_path: Path) -> None:
    not_qemu = fake_qemu(tmp_path, "/bin/true", "echo 'not a QEMU' >&2; exit 3")
    code, out = run_pytest(write_case(tmp_path, USES_QEMU), "--qemu", str(not_qemu))
    assert code != 0, out
    assert "exited 3: not a QEMU" in out
    assert "Traceback" not in out


def test_qemu_exiting_at_start_reports_its_stderr(tmp_path: Path, qemu_binary: str) -> None:
    # Answers the capability probe (-machine none) like the real one, then fails to start.
    script = (
        'case "$*" in *"-machine none"*) exec "$REAL" "$@";; esac\n'
        'echo "qemu-system-x86_64: simulated start failure" >&2; exit 1'
    )
    broken = fake_qemu(tmp_path, qemu_binary, script)
    code, out = run_pytest(write_case(tmp_path, USES_QEMU), "--qemu", str(broken))
    assert code == 1, out
    assert "QEMU exited at start with status 1: qemu-system-x86_64: simulated start failure" in out
    assert "Traceback" not in out


def caps_without(*missing: str) -> Capabilities:
    devices = {"intel-iommu", "vfio-user-pci", "pcie-root-port"} - set(missing)
    return Capabilities(
        binary="/opt/qemu",
        version=(10, 0, 0),
        package="",
        devices=devices,
        accelerators={"tcg"},
        device_properties={"intel-iommu": {"caching-mode": "bool"}},
    )


def test_missing_device_skips_with_reason() -> None:
    with pytest.raises(MissingFeature, match=r"QEMU 10\.0\.0 at /opt/qemu has no device"):
        caps_without("vfio-user-pci").require_device("vfio-user-pci")


def test_missing_property_skips_with_reason() -> None:
    with pytest.raises(MissingFeature, match="intel-iommu lacks properties scalable-mode"):
        caps_without().require_device("intel-iommu", "caching-mode", "scalable-mode")


def test_missing_accelerator_skips_with_reason() -> None:
    with pytest.raises(MissingFeature, match="has no qtest accelerator"):
        caps_without().require_accelerator("qtest")


MISSING_DEVICE = """
    from fixtures.qemu.spec import MachineSpec

    async def test_case(launch):
        await launch(MachineSpec(accel="qtest", devices=[{"driver": "no-such-device"}]))
"""


def test_launch_turns_a_missing_feature_into_a_skip_with_its_text(
    tmp_path: Path, qemu_binary: str
) -> None:
    code, out = run_pytest(write_case(tmp_path, MISSING_DEVICE), "--qemu", qemu_binary, "-rs")
    assert code == 0, out
    assert "1 skipped" in out, out
    assert f"at {qemu_binary} has no device 'no-such-device'" in out, out
    assert "Traceback" not in out


def test_auto_accel_needs_hardware_kvm_module(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.write_text("kvm_pvm 65536 0 - Live 0x0\nkvm 1200000 1 kvm_pvm, Live 0x0\n")
    assert not hardware_kvm_available(modules)  # the paravirtual kvm_pvm runs no Linux guest
    assert choose_accelerator("tcg") == "tcg"
    assert choose_accelerator("kvm") == "kvm"
    with pytest.raises(ValueError, match="--accel must be"):
        choose_accelerator("hvf")


QMP_ERROR = """
    import pytest
    from fixtures.qemu.errors import QMPCommandError
    from fixtures.qemu.spec import MachineSpec

    async def test_case(launch):
        m = await launch(MachineSpec(accel="qtest"))
        with pytest.raises(QMPCommandError) as err:
            await m.qmp("device_del", id="no-such-device")
        assert err.value.error_class == "DeviceNotFound"
        assert "no-such-device" in err.value.desc
"""


def test_qmp_error_is_typed_with_qemus_text(tmp_path: Path, qemu_binary: str) -> None:
    code, out = run_pytest(write_case(tmp_path, QMP_ERROR), "--qemu", qemu_binary)
    assert code == 0, out


QEMU_DIES = """
    import os
    import signal
    from fixtures.qemu.spec import MachineSpec

    async def test_case(launch):
        m = await launch(MachineSpec(accel="qtest"))
        os.kill(m.pid, signal.SIGKILL)
        await m.qtest.readl(0xFED90000)
"""


def test_qtest_connection_lost_names_how_qemu_exited(tmp_path: Path, qemu_binary: str) -> None:
    code, out = run_pytest(write_case(tmp_path, QEMU_DIES), "--qemu", qemu_binary)
    assert code == 1, out
    # EOF or a reset, whichever the dying QEMU gives: either names the signal in its line.
    assert re.search(
        r"QTestError: qtest: (QEMU closed the connection|connection lost) on 'readl 0xfed90000'"
        r".* \(QEMU exited with signal SIGKILL\)$",
        out,
        re.M,
    ), out
    assert "Traceback" not in out
