"""The vhost-user plugin's capability probe and command-line pieces (no QEMU needed)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fixtures.plugins.vhost_user import vhost_user_support
from fixtures.vhost_user.backend import VhostUserBackend
from fixtures.vhost_user.errors import VhostUserError
from fixtures.vhost_user.netdev import VhostUserNet

NETDEVS = "Available netdev backend types:\nsocket\nuser\n{extra}"
NET_PROPS = "virtio-net-pci options:\n  ats=<bool>\n  iommu_platform=<bool>\n{extra}"


def fake_qemu(tmp_path: Path, netdevs: str, props: str) -> str:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        f"  help) printf '%s\\n' '{netdevs}' ;;\n"
        f"  *) printf '%s\\n' '{props}' ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_qemu_without_vhost_user_netdev_skips_with_the_reason(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path, NETDEVS.format(extra="tap"), NET_PROPS.format(extra=""))
    reason = vhost_user_support(binary)
    assert reason is not None
    assert "no vhost-user netdev" in reason
    assert binary in reason


def test_qemu_without_needed_properties_names_them(tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path, NETDEVS.format(extra="vhost-user"), NET_PROPS.format(extra=""))
    reason = vhost_user_support(binary)
    assert reason is not None
    assert "disable-legacy" in reason
    assert "netdev" in reason


def test_qemu_with_everything_is_supported(tmp_path: Path) -> None:
    props = NET_PROPS.format(extra="  disable-legacy=<OnOffAuto>\n  netdev=<str>")
    binary = fake_qemu(tmp_path, NETDEVS.format(extra="vhost-user\nvhost-vdpa"), props)
    assert vhost_user_support(binary) is None


def test_missing_binary_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    assert "cannot be probed" in (vhost_user_support(str(tmp_path / "nope")) or "")


def test_command_line_pieces_name_one_chardev_and_netdev(tmp_path: Path) -> None:
    net = VhostUserNet("net0", VhostUserBackend("net0", tmp_path))
    args = net.args()
    assert args[0] == "-chardev"
    assert args[1] == f"socket,id=net0-chr,path={tmp_path / 'net0.sock'}"
    assert args[2:] == ["-netdev", "vhost-user,id=net0-net,chardev=net0-chr,vhostforce=on"]
    device = net.device_json(bus="rp0")
    assert device["netdev"] == "net0-net"
    assert device["iommu_platform"] is True
    assert device["ats"] is True
    assert device["disable-legacy"] == "on"
    assert device["bus"] == "rp0"


@pytest.mark.parametrize("mode", [0o755, 0o750])
async def test_backend_refuses_a_socket_directory_others_can_enter(
    tmp_path: Path, mode: int
) -> None:
    socket_dir = tmp_path / "sock"
    socket_dir.mkdir(mode=mode)
    socket_dir.chmod(mode)
    backend = VhostUserBackend("net0", socket_dir)
    with pytest.raises(VhostUserError, match="mode"):
        await backend.start()
    await backend.stop()
