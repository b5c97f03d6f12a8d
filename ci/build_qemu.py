"""Build a QEMU source tree with what the suite needs and print the binary to test.

Usage (from the top): python3 -m ci.build_qemu SRC [BUILD]   (ci/build-qemu SRC [BUILD])

SRC is a git checkout or an unpacked source package; BUILD defaults to SRC/build-viommu.
Configure options are not hard-coded: they are chosen from what `SRC/configure --help` offers,
because trees differ (10.2 has no `--enable-vfio-user-client`: its client is a Kconfig default;
11.x has the option). Re-running is incremental: configure runs again only when the chosen
options change, then ninja rebuilds what changed.

Source packages strip two things a build and a run need, and both are put back without
touching the host: the wheels configure installs offline (meson, pycotap: from PyPI into
python/wheels at the versions the tree's pythondeps.toml names) and the firmware blobs
(bios-256k.bin and the option ROMs: Debian's seabios / ipxe-qemu / qemu-system-data through a
private apt). When firmware had to be added, the printed path is a launcher
`BUILD/qemu-system-x86_64-suite` that passes `-L` for each firmware directory. A Debian source
package is meant extracted with its patches applied (`dpkg-source -x`, as `apt-get source` does).
Standard library only (it runs before the virtualenv exists).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ci.private_apt import PrivateApt, ProvisionError, unpack

TARGET = "x86_64-softmmu"
BINARY = "qemu-system-x86_64"
LAUNCHER = f"{BINARY}-suite"
# The feature names configure spells as --enable-NAME, in the order the suite needs them:
# vfio-user client (the device hosts), slirp (guest SSH), vhost-user / vhost-net / vhost-kernel
# (the vhost consumer), kvm (KVM runners).
WANTED_FEATURES = ("vfio-user-client", "slirp", "vhost-user", "vhost-net", "vhost-kernel", "kvm")
# Features a tree may lack without losing anything: where configure has no such option the
# tree builds it by default (10.2's vfio-user client is Kconfig `default y`).
KCONFIG_DEFAULT = {"vfio-user-client": "hw/vfio-user"}
FIRMWARE = ("bios-256k.bin", "kvmvapic.bin", "linuxboot_dma.bin")
FIRMWARE_PACKAGES = ("seabios", "ipxe-qemu", "qemu-system-data")
FIRMWARE_DIRS = ("usr/share/seabios", "usr/lib/ipxe/qemu", "usr/share/qemu")
CONFIG_STAMP = ".viommu-configure"


class BuildError(ProvisionError):
    """Building the tree failed; the message is the one line the user sees."""


@dataclass(frozen=True)
class ConfigureOptions:
    """What this tree's configure offers, read from its --help."""

    features: frozenset[str]  # --enable-NAME / --disable-NAME
    options: frozenset[str]  # other --long-options (without =VALUE)

    @classmethod
    def parse(cls, help_text: str) -> ConfigureOptions:
        features: set[str] = set()
        options = set(re.findall(r"^\s+(--[a-z0-9-]+)", help_text, re.M))
        in_features = False
        for line in help_text.splitlines():
            if re.match(r"^\S", line):
                # The heading runs over a few unindented lines ("disabled with ...",
                # "(unless built with ...)"); any other unindented line ends the list.
                if "--enable-FEATURE" in line:
                    in_features = True
                elif not line.startswith(("disabled", "(")):
                    in_features = False
                continue
            # "  kvm             KVM acceleration support", or the name alone on its line
            # when it is long ("  vfio-user-server" with the text on the next line).
            match = re.match(r"^  ([a-z0-9][a-z0-9-]*)(\s|$)", line)
            if in_features and match:
                features.add(match.group(1))
        for option in list(options):
            match = re.match(r"--enable-([a-z0-9-]+)$", option)
            if match:
                features.add(match.group(1))
        return cls(frozenset(features), frozenset(options))


def configure_args(
    offered: ConfigureOptions, src: Path, *, have_libfdt: bool = True
) -> tuple[list[str], list[str]]:
    """(the configure arguments, notes for the user) for this tree."""
    args = [f"--target-list={TARGET}"]
    notes: list[str] = []
    if "--without-default-features" in offered.options:
        args.append("--without-default-features")
    if "--disable-install-blobs" in offered.options:
        args.append("--disable-install-blobs")
    if "fdt" in offered.features and have_libfdt:
        args.append("--enable-fdt=system")
    for feature in WANTED_FEATURES:
        if feature in offered.features:
            args.append(f"--enable-{feature}")
        elif feature in KCONFIG_DEFAULT and (src / KCONFIG_DEFAULT[feature]).is_dir():
            notes.append(f"{feature}: no configure option, built by default (Kconfig)")
        else:
            notes.append(f"{feature}: this tree cannot build it; the cases needing it will skip")
    return args, notes


def _run(
    cmd: Sequence[str | Path], *, cwd: Path | None = None, what: str, stream: bool = False
) -> str:
    """Run `cmd`; its output is returned, and with `stream` its progress is shown as it comes
    (a build takes minutes). A failure is one line: the first error in the output."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        # Progress, not the whole log: ninja's "[N/M]" every 250 steps and at the end.
        step = re.match(r"^\[(\d+)/(\d+)\]", line)
        if stream and step and (int(step[1]) % 250 == 0 or step[1] == step[2]):
            sys.stderr.write(f"build-qemu: {step[0]} {line[step.end() :].strip()[:80]}\n")
    output = "".join(lines)
    if proc.wait() != 0:
        raise BuildError(f"{what} failed: {first_error(output)}")
    return output


def first_error(output: str) -> str:
    """The line a developer wants first: a compiler or configure ERROR, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        # gcc/clang "file:line:col: error: ...", meson/configure "ERROR: ...".
        if re.search(r"(^|: )(fatal )?error: |^ERROR: ", line):
            return line
    return lines[-1] if lines else "no output"


def ensure_build_wheels(src: Path) -> None:
    """Put the wheels configure installs offline (pythondeps.toml's [meson] group: meson,
    pycotap) into python/wheels when a source package lacks them."""
    if not (src / "pythondeps.toml").is_file():
        return
    group = tomllib.loads((src / "pythondeps.toml").read_text()).get("meson", {})
    wheels = src / "python" / "wheels"
    wanted = [
        f"{name}=={spec['installed']}"
        for name, spec in group.items()
        if isinstance(spec, dict) and "installed" in spec
        and not any(wheels.glob(f"{name.replace('-', '_')}-*.whl"))
    ]  # fmt: skip
    if not wanted:
        return
    wheels.mkdir(parents=True, exist_ok=True)
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "-d", wheels, *wanted],
        what=f"pip download {' '.join(wanted)}",
    )  # fmt: skip


def missing_firmware(build: Path) -> list[str]:
    return [name for name in FIRMWARE if not (build / "pc-bios" / name).exists()]


def fetch_firmware(build: Path) -> Path:
    """Debian's firmware packages unpacked under BUILD/firmware (cached by a stamp)."""
    root = build / "firmware"
    stamp = root / "complete"
    if stamp.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    apt = PrivateApt(build / "firmware-apt", ["bookworm", "bookworm-updates"])
    apt.update()
    debs = apt.download(list(FIRMWARE_PACKAGES), build / "firmware-apt" / "debs")
    unpack(debs, root)
    shutil.rmtree(build / "firmware-apt")
    stamp.write_text(" ".join(FIRMWARE_PACKAGES) + "\n")
    return root


def write_launcher(build: Path, data_dirs: Iterable[Path]) -> Path:
    launcher = build / LAUNCHER
    dirs = " ".join(f'-L "{d}"' for d in data_dirs)
    launcher.write_text(
        "#!/bin/sh\n# QEMU built by ci/build-qemu, with the firmware the source package lacks.\n"
        f'exec "{build / BINARY}" {dirs} "$@"\n'
    )
    launcher.chmod(0o755)
    return launcher


# What a build needs on the host, as (program or pkg-config module, Debian package).
BUILD_TOOLS = (
    ("ninja", "ninja-build"), ("cc", "gcc"), ("make", "make"), ("flex", "flex"),
    ("bison", "bison"), ("pkg-config", "pkg-config"),
)  # fmt: skip
BUILD_LIBRARIES = (
    ("glib-2.0", "libglib2.0-dev"), ("pixman-1", "libpixman-1-dev"), ("slirp", "libslirp-dev"),
    ("zlib", "zlib1g-dev"),
)  # fmt: skip
# Use the system's libfdt when there is one (libfdt-dev has no .pc file). QEMU 10.2's x86_64
# build needs it, and Debian's +ds source has no dtc subproject to fall back on.
LIBFDT_HEADER = Path("/usr/include/libfdt.h")
NO_DTC = "Subproject dtc is buildable: NO"


def missing_build_dependencies() -> list[str]:
    """The Debian packages a build still needs on this host (checked before configure, so the
    user gets one line naming them rather than a configure log)."""
    missing = [package for program, package in BUILD_TOOLS if shutil.which(program) is None]
    if shutil.which("pkg-config"):
        for module, package in BUILD_LIBRARIES:
            found = subprocess.run(["pkg-config", "--exists", module], check=False)
            if found.returncode != 0:
                missing.append(package)
    return missing


def build_tree(src: Path, build: Path, *, jobs: int | None = None) -> Path:
    src, build = src.resolve(), build.resolve()
    configure = src / "configure"
    if not configure.is_file():
        raise BuildError(f"{src}: no configure script (not a QEMU source tree)")
    missing = missing_build_dependencies()
    if missing:
        raise BuildError(f"missing build dependencies: apt-get install {' '.join(missing)}")
    offered = ConfigureOptions.parse(_run([configure, "--help"], cwd=src, what="configure --help"))
    args, notes = configure_args(offered, src, have_libfdt=LIBFDT_HEADER.is_file())
    for note in notes:
        print(f"build-qemu: {note}", file=sys.stderr)
    build.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join([str(src), *args]).encode()).hexdigest()
    stamp = build / CONFIG_STAMP
    if not (build / "build.ninja").is_file() or not stamp.is_file() or stamp.read_text() != digest:
        ensure_build_wheels(src)
        print(f"build-qemu: configure {' '.join(args)}", file=sys.stderr)
        stamp.unlink(missing_ok=True)
        try:
            _run([configure, *args], cwd=build, what="configure")
        except BuildError as err:
            if NO_DTC in str(err):
                raise BuildError("missing build dependencies: apt-get install libfdt-dev") from None
            raise
        stamp.write_text(digest)
    _run(
        ["ninja", "-C", build, f"-j{jobs or os.cpu_count() or 1}", BINARY],
        what=f"ninja {BINARY}",
        stream=True,
    )
    binary = build / BINARY
    if not binary.is_file():
        raise BuildError(f"the build produced no {binary}")
    if not missing_firmware(build):
        return binary
    firmware = fetch_firmware(build)
    return write_launcher(build, [build / "pc-bios", *(firmware / d for d in FIRMWARE_DIRS)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="QEMU source tree")
    parser.add_argument("build", type=Path, nargs="?", help="build directory")
    parser.add_argument("-j", "--jobs", type=int, help="ninja jobs (default: all cores)")
    options = parser.parse_args(argv)
    try:
        path = build_tree(options.src, options.build or options.src / "build-viommu",
                          jobs=options.jobs)  # fmt: skip
    except (ProvisionError, OSError) as err:
        print(f"build-qemu: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
