"""The guest's kernel: Debian bookworm's linux-source-6.1 built with guests/kernel.config.

    kernel = build_kernel(cache, apt_opts, debs)   # cached: cache/kernel-RECIPE/vmlinux
    -> GuestKernel(vmlinux=..., release="6.1.N-viommu", source="linux-source-6.1_6.1.N-1_all.deb")

Why not Debian's packaged kernel: under TCG its boot took about 1.9 s to /init, this one's
about 0.8 s, with the same driver code for everything the cases exercise (see kernel.config).
The build is `make allnoconfig` with kernel.config forced on top, checked afterwards: an option
kconfig dropped (an unmet dependency) fails the build by name rather than giving a guest that
lacks it. QEMU boots the ELF `vmlinux` through its PVH entry, checked here too.

The host needs only a C toolchain and make (build-essential; perl is essential on Debian).
flex, bison, m4, bc and libelf's headers for objtool come as bookworm .debs from the private
apt, unpacked into a tool root that the build's PATH and library path put first: nothing is
installed on the host. One build takes about 4 minutes on 2 cores and is shared by every guest
image built from the same kernel recipe (kernel.config, the packages, BUILD_VERSION).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from guests.cache import build_lock, prune, touch
from guests.packages import BuildError, download, run, unpack_merged

__all__ = ["CONFIG", "GuestKernel", "build_kernel", "dropped_options", "has_pvh_note"]

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "kernel.config"
SOURCE_PACKAGE = "linux-source-6.1"
TOOL_PACKAGES = ("flex", "bison", "m4", "bc", "libreadline8", "libelf-dev", "libelf1")
HOST_TOOLS = ("gcc", "make", "ld", "perl")
# Bump when the build itself changes (make's arguments or environment, the steps): the kernel
# recipe hashes this, not the file.
BUILD_VERSION = 1
MAKE_TIMEOUT_S = 3600.0  # about 4 minutes on 2 idle cores; a loaded CI runner is slower


@dataclass(frozen=True)
class GuestKernel:
    vmlinux: Path
    release: str  # `uname -r` in the guest
    source: str  # the source package's .deb


def recipe_hash() -> str:
    """What the kernel is built from: the config, the packages and BUILD_VERSION. Not this
    file's text: a 4-minute rebuild for every edit of it would be a poor trade."""
    h = hashlib.sha256(CONFIG.read_bytes())
    h.update(repr((BUILD_VERSION, SOURCE_PACKAGE, TOOL_PACKAGES)).encode())
    return h.hexdigest()[:16]


def _options(text: str) -> dict[str, str]:
    """CONFIG_X -> value of a .config text ('n' for '# CONFIG_X is not set')."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            found[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            found[m.group(1)] = "n"
    return found


def dropped_options(wanted: str, got: str) -> list[str]:
    """The options of `wanted` (a config fragment) that the resulting .config `got` does not
    have as asked, as 'CONFIG_X=asked (got)'."""
    have = _options(got)
    return [
        f"{k}={v} (got {have.get(k, 'n')})"
        for k, v in _options(wanted).items()
        if have.get(k, "n") != v
    ]


def has_pvh_note(elf: bytes) -> bool:
    """Whether the ELF has a Xen note of type XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _f, p_off, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        pos, end = p_off, p_off + p_filesz
        while p_type == 4 and pos + 12 <= end:  # PT_NOTE: namesz, descsz, type, name, desc
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _load(d: Path) -> GuestKernel | None:
    if not (d / "stamp").is_file():
        return None
    release, source = (d / "stamp").read_text().split()[:2]
    touch(d)
    return GuestKernel(d / "vmlinux", release, source)


def build_kernel(root: Path, apt_opts: list[str], debs: Path) -> GuestKernel:
    final = root / f"kernel-{recipe_hash()}"
    if (done := _load(final)) is not None:
        return done
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        raise BuildError(
            f"the guest kernel is built from source and needs {', '.join(missing)} on the host: "
            "apt-get install build-essential"
        )
    with build_lock(root / f"{final.name}.lock"):
        if (done := _load(final)) is not None:
            return done
        print(
            f"guest build: building the guest kernel from {SOURCE_PACKAGE} (about 4 minutes on "
            "2 cores, once per kernel recipe)",
            file=sys.stderr,
        )
        t0 = time.monotonic()
        log = root / f"{final.name}.build.log"
        with tempfile.TemporaryDirectory(dir=root, prefix=f"{final.name}.build-") as tmp:
            work = Path(tmp)
            files = download([SOURCE_PACKAGE, *TOOL_PACKAGES], debs, apt_opts)
            tools = work / "tools"
            unpack_merged([files[p] for p in TOOL_PACKAGES], tools)
            unpack_merged([files[SOURCE_PACKAGE]], work / "source")
            tree = _extract_tree(work / "source", work / "tree")
            make = _make_argv(tree, tools)
            env = _tool_env(tools)
            with open(log, "w") as out:
                _make([*make, "allnoconfig", f"KCONFIG_ALLCONFIG={CONFIG}"], env, out, log)
                dropped = dropped_options(CONFIG.read_text(), (tree / ".config").read_text())
                if dropped:
                    asked = ", ".join(dropped)
                    raise BuildError(
                        f"kconfig dropped options guests/kernel.config asks for: {asked}"
                    )
                _make([*make, "vmlinux"], env, out, log)
            release = run([*make, "-s", "kernelrelease"], env=env).strip()
            vmlinux = tree / "vmlinux"
            if not has_pvh_note(vmlinux.read_bytes()):
                raise BuildError("the built vmlinux has no PVH entry note (CONFIG_PVH)")
            out_dir = work / "out"
            out_dir.mkdir(mode=0o700)
            shutil.copy2(vmlinux, out_dir / "vmlinux")
            shutil.copy2(tree / ".config", out_dir / "config")
            if final.exists():
                shutil.rmtree(final)
            os.replace(out_dir, final)
            source = files[SOURCE_PACKAGE].name
            (final / "stamp").write_text(f"{release} {source}\n")  # last: a complete build
        log.unlink()
        # 139 MB that only a new kernel recipe needs again: not worth a CI cache's upload.
        with contextlib.suppress(FileNotFoundError):
            files[SOURCE_PACKAGE].unlink()
        print(
            f"guest build: kernel {release} built in {time.monotonic() - t0:.0f} s", file=sys.stderr
        )
        prune(root, "kernel-", keep=final)
    built = _load(final)
    assert built is not None
    return built


def _extract_tree(source_root: Path, into: Path) -> Path:
    (tarball,) = (source_root / "usr/src").glob("linux-source-*.tar.xz")
    into.mkdir()
    # Python's lzma: no xz on the host needed (15-30 s for the 1.3 GB tree).
    with tarfile.open(tarball, "r:xz") as t:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: no links out, no special bits
            t.extractall(into, filter="data")
        else:  # bookworm's 3.11.2; Debian's signed source package, not untrusted input
            t.extractall(into)
    (tree,) = [d for d in into.iterdir() if d.is_dir()]
    return tree


def _make_argv(tree: Path, tools: Path) -> list[str]:
    lib = tools / "usr/lib/x86_64-linux-gnu"
    return [
        "make",
        "-C",
        str(tree),
        f"-j{os.cpu_count() or 1}",
        f"HOSTCFLAGS=-I{tools / 'usr/include'}",  # objtool's libelf headers
        f"HOSTLDFLAGS=-L{lib}",
        "KBUILD_BUILD_USER=viommu",
        "KBUILD_BUILD_HOST=guest-build",
    ]


def _tool_env(tools: Path) -> dict[str, str]:
    libs = [tools / "usr/lib/x86_64-linux-gnu", tools / "lib/x86_64-linux-gnu"]
    old = os.environ.get("LD_LIBRARY_PATH")
    return {
        **os.environ,
        "PATH": f"{tools / 'usr/bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LD_LIBRARY_PATH": ":".join([*map(str, libs), *([old] if old else [])]),
        "M4": str(tools / "usr/bin/m4"),  # flex and bison run m4 by this name
        "BISON_PKGDATADIR": str(tools / "usr/share/bison"),
        "LC_ALL": "C",
    }


def _make(argv: list[str], env: dict[str, str], out: IO[str], log: Path) -> None:
    # Its own process group, killed whole on a timeout or Ctrl-C: make's compilers go with it.
    try:
        p = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    except OSError as e:
        raise BuildError(f"kernel build ({argv[-1]}): {e}") from e
    try:
        rc = p.wait(timeout=MAKE_TIMEOUT_S)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise BuildError(f"kernel build ({argv[-1]}) ran over {MAKE_TIMEOUT_S:.0f} s") from e
        raise
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["(no output)"]
        raise BuildError(f"kernel build failed ({argv[-1]}): {errors[0].strip()}; log: {log}")
