"""ci/build-qemu's option probing and its incremental re-run, on fake QEMU trees.

The CI templates build QEMU with `ci/build-qemu`; what it passes to configure is read from the
tree's `configure --help`. Two fake trees stand for the two styles seen in released QEMU: an
old-style tree (10.2: the vfio-user client is a Kconfig default, no configure option) and a
new-style one (11.x: `--enable-vfio-user-client`). Their configure records its arguments and
writes build.ninja; a fake ninja "builds" the binary. A real build is `ci/build-qemu SRC`.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from ci.build_qemu import ConfigureOptions, configure_args, first_error
from tests.fake_toolchain import fake_toolchain

ROOT = Path(__file__).resolve().parent.parent

HELP_HEAD = """\
Usage: configure [options]
Options: [defaults in brackets after descriptions]

Standard options:
  --help                   print this message
  --target-list=LIST       set target list (default: build all)
  --without-default-features   default all --enable-* options to "disabled"
  --disable-install-blobs  install provided firmware blobs
  --enable-fdt[=CHOICE]    Whether and how to find the libfdt library

Optional features, enabled with --enable-FEATURE and
disabled with --disable-FEATURE, default is enabled if available
(unless built with --without-default-features):

  kvm             KVM acceleration support
  slirp           libslirp user mode network backend support
  vhost-kernel    vhost kernel backend support
  vhost-net       vhost-net kernel acceleration support
  vhost-user      vhost-user backend support
  vfio-user-server
                  vfio-user server support
"""
NEW_STYLE = HELP_HEAD + "  vfio-user-client vfio-user client support\n"
OLD_STYLE = HELP_HEAD
TAIL = "\nNOTE: The object files are built at the place where configure is launched\n"


def fake_tree(tmp_path: Path, help_text: str, *, kconfig_client: bool) -> Path:
    src = tmp_path / "qemu"
    (src / "pc-bios").mkdir(parents=True)
    if kconfig_client:
        (src / "hw" / "vfio-user").mkdir(parents=True)
    (src / "help.txt").write_text(help_text + TAIL)
    configure = src / "configure"
    configure.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            if [ "$1" = --help ]; then cat "{src}/help.txt"; exit 0; fi
            echo "$@" >> configure.calls
            for f in bios-256k.bin kvmvapic.bin linuxboot_dma.bin; do
              mkdir -p pc-bios; : > pc-bios/$f
            done
            echo "build qemu-system-x86_64: phony" > build.ninja
            """
        )
    )
    configure.chmod(0o755)
    return src


@pytest.fixture
def fake_ninja(tmp_path: Path) -> dict[str, str]:
    """PATH with a fake ninja, and build tools / pkg-config that say everything is there (the
    host's build dependencies are not this test's business)."""
    return fake_toolchain(
        tmp_path,
        '#!/bin/sh\n# ninja -C DIR -jN TARGET\necho "[1/1] Linking $4"\n'
        'printf "#!/bin/sh\\n" > "$2/$4"; chmod +x "$2/$4"; echo run >> "$2/ninja.calls"\n',
    )


def build(src: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ROOT / "ci" / "build-qemu", src, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_new_style_tree_gets_the_vfio_user_client_option(tmp_path: Path) -> None:
    offered = ConfigureOptions.parse(NEW_STYLE + TAIL)
    args, notes = configure_args(offered, tmp_path)
    assert args == [
        "--target-list=x86_64-softmmu",
        "--without-default-features",
        "--disable-install-blobs",
        "--enable-fdt=system",
        "--enable-vfio-user-client",
        "--enable-slirp",
        "--enable-vhost-user",
        "--enable-vhost-net",
        "--enable-vhost-kernel",
        "--enable-kvm",
    ]
    assert notes == []


def test_old_style_tree_builds_the_client_from_kconfig(tmp_path: Path) -> None:
    (tmp_path / "hw" / "vfio-user").mkdir(parents=True)
    args, notes = configure_args(ConfigureOptions.parse(OLD_STYLE + TAIL), tmp_path)
    assert "--enable-vfio-user-client" not in args
    assert "--enable-vhost-user" in args
    assert notes == ["vfio-user-client: no configure option, built by default (Kconfig)"]


def test_a_tree_without_a_feature_says_what_will_skip(tmp_path: Path) -> None:
    args, notes = configure_args(
        ConfigureOptions.parse(OLD_STYLE.replace("  slirp ", "  slurp ") + TAIL), tmp_path
    )
    assert "--enable-slirp" not in args
    assert "slirp: this tree cannot build it; the cases needing it will skip" in notes
    assert "vfio-user-client: this tree cannot build it; the cases needing it will skip" in notes


def test_a_feature_name_alone_on_its_line_is_still_a_feature() -> None:
    assert "vfio-user-server" in ConfigureOptions.parse(OLD_STYLE + TAIL).features
    assert "NOTE" not in ConfigureOptions.parse(OLD_STYLE + TAIL).features


@pytest.mark.parametrize(
    ("style", "client_arg"), [(NEW_STYLE, True), (OLD_STYLE, False)], ids=["new", "old"]
)
def test_build_configures_once_and_rebuilds_incrementally(
    tmp_path: Path, fake_ninja: dict[str, str], style: str, client_arg: bool
) -> None:
    src = fake_tree(tmp_path, style, kconfig_client=not client_arg)
    out = tmp_path / "build"
    first = build(src, out, fake_ninja)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(out / "qemu-system-x86_64")
    calls = (out / "configure.calls").read_text().splitlines()
    assert len(calls) == 1
    assert ("--enable-vfio-user-client" in calls[0].split()) is client_arg
    second = build(src, out, fake_ninja)
    assert second.returncode == 0, second.stderr
    assert len((out / "configure.calls").read_text().splitlines()) == 1  # not reconfigured
    assert (out / "ninja.calls").read_text().count("run") == 2


def test_missing_build_dependencies_are_named_as_packages(
    tmp_path: Path, fake_ninja: dict[str, str]
) -> None:
    src = fake_tree(tmp_path, NEW_STYLE, kconfig_client=False)
    pkg_config = Path(fake_ninja["PATH"].split(":")[0]) / "pkg-config"
    pkg_config.write_text('#!/bin/sh\n[ "$2" = slirp ] && exit 1; exit 0\n')
    result = build(src, tmp_path / "build", fake_ninja)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "build-qemu: missing build dependencies: apt-get install libslirp-dev"
    )


def test_configure_without_libfdt_names_the_package(
    tmp_path: Path, fake_ninja: dict[str, str]
) -> None:
    """QEMU 10.2 from Debian's +ds source (no dtc subproject) on a host without libfdt-dev."""
    src = fake_tree(tmp_path, NEW_STYLE, kconfig_client=False)
    configure = src / "configure"
    configure.write_text(
        configure.read_text().replace(
            'echo "$@" >> configure.calls',
            'echo "Library fdt found: NO"; echo "ERROR: Subproject dtc is buildable: NO"; exit 1',
        )
    )
    result = build(src, tmp_path / "build", fake_ninja)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "build-qemu: missing build dependencies: apt-get install libfdt-dev"
    )


def test_not_a_qemu_tree_is_one_line(tmp_path: Path, fake_ninja: dict[str, str]) -> None:
    result = build(tmp_path, tmp_path / "build", fake_ninja)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"build-qemu: {tmp_path}: no configure script (not a QEMU source tree)"
    )


def test_first_error_names_the_compiler_error() -> None:
    log = (
        "[10/20] Compiling C object libcommon.a.p/util_error.c.o\n"
        "FAILED: libsystem.a.p/hw_i386_intel_iommu.c.o\n"
        "cc -Werror=implicit-function-declaration -c ../hw/i386/intel_iommu.c\n"
        "../hw/i386/intel_iommu.c:42:5: error: 'x' undeclared (first use in this function)\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert first_error(log) == (
        "../hw/i386/intel_iommu.c:42:5: error: 'x' undeclared (first use in this function)"
    )
    assert first_error("ERROR: unknown option --enable-vfio-user-client\n") == (
        "ERROR: unknown option --enable-vfio-user-client"
    )
    assert first_error("nothing useful\nlast line\n") == "last line"
