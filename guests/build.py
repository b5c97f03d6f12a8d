"""Build the test guest (kernel + initramfs) from Debian bookworm packages, cached by recipe.

Run as `python3 -m guests.build` from the top (stdlib only: it runs before the venv exists).
Prints the guest directory, which holds vmlinuz, initrd, client_key (OpenSSH private key for
paramiko), host_key.pub (to pin the guest's identity), manifest.json and, written last, the stamp.
`vmlinuz` is the suite's own build of Debian's linux-source-6.1 (guests/kernel.py, cached apart
from the image), an ELF that QEMU boots through its PVH entry: no decompressor runs in the guest.

Packages come from a private, freshly updated bookworm apt on the host's own Debian mirror
(guests/packages.py) and are unpacked with `dpkg-deb -x`: no root image, no mounts, no chroot.
The initramfs is an uncompressed cpio (newc) written here, so no cpio tool is needed either.
Keys are generated per build, never committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ci.private_apt import cache_root
from guests.cache import build_lock, prune, touch
from guests.kernel import build_kernel
from guests.kernel import recipe_hash as kernel_recipe_hash
from guests.packages import BuildError, bookworm_apt, download, unpack
from guests.packages import run as _run

HERE = Path(__file__).resolve().parent

GUEST_FILES = (HERE / "init", HERE / "agent.py")
# The recipe: anything that changes the image belongs here, in GUEST_FILES or in the kernel's
# recipe (all are hashed).
RECIPE_FILES = (Path(__file__), HERE / "packages.py", HERE / "cache.py")
PACKAGES = (
    "busybox-static",
    "dropbear-bin",
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "zlib1g",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libffi8",
    "libexpat1",
)
# From libpython3.11-stdlib only what the agent needs. Of both stdlib packages only the modules
# the agent's import actually loads go into the image (as recorded by the guest's Python at
# build time, see _agent_modules), plus the codecs Python's start-up may pick.
STDLIB_EXTRA = ("ctypes", "json")
DYNLOAD_EXTRA = ("_ctypes", "_json", "mmap")
STARTUP_MODULES = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
    "json",
)
GUEST_PROGRAMS = ("usr/sbin/dropbear", "usr/bin/python3.11")
# guests/agent.py prints it (the build may import only ci/, so it is spelled here too).
READY_MARKER = "VIOMMU-GUEST-READY"
RECIPE_VERSION = 3


def recipe_hash() -> str:
    h = hashlib.sha256()
    for f in (*RECIPE_FILES, *GUEST_FILES):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(kernel_recipe_hash().encode())
    return h.hexdigest()[:16]


def guest_dir() -> Path:
    return cache_root() / f"guest-{recipe_hash()}"


def is_built(d: Path) -> bool:
    return (d / "stamp").is_file()


# --- ELF DT_NEEDED, so the library closure needs no ldd and no host libraries -----------------


def elf_needed(path: Path) -> list[str]:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dyn = None
    for i in range(phnum):
        p_type, _f, p_off, p_vaddr, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:
            loads.append((p_vaddr, p_off, p_filesz))
        elif p_type == 2:
            dyn = (p_off, p_filesz)
    if dyn is None:
        return []

    def to_off(vaddr: int) -> int:
        for va, off, sz in loads:
            if va <= vaddr < va + sz:
                return off + vaddr - va
        raise BuildError(f"{path}: bad ELF dynamic section")

    needed, strtab = [], 0
    for i in range(0, dyn[1], 16):
        tag, val = struct.unpack_from("<qQ", data, dyn[0] + i)
        if tag == 0:
            break
        if tag == 1:
            needed.append(val)
        elif tag == 5:
            strtab = to_off(val)
    return [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in needed]


LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


def library_closure(merged: Path, programs: Iterable[Path]) -> set[str]:
    """Relative paths (inside `merged`) of every shared library the programs need."""
    seen: set[str] = set()
    todo = list(programs)
    while todo:
        for soname in elf_needed(todo.pop()):
            for d in LIB_DIRS:
                cand = merged / d / soname
                if cand.exists():
                    rel = f"{d}/{soname}"
                    if rel not in seen:
                        seen.add(rel)
                        todo.append(cand.resolve())
                    break
            else:
                raise BuildError(f"library {soname} not found in the unpacked packages")
    return seen


# --- the initramfs tree -------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.resolve(), dst)


def _tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def host_exec(merged: Path, program: str, *args: str) -> list[str]:
    """argv running a dynamic program of the unpacked packages through their own loader."""
    libs = ":".join(str(merged / d) for d in LIB_DIRS)
    loader = merged / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    return [str(loader), "--inhibit-cache", "--library-path", libs, str(merged / program), *args]


def assemble(roots: dict[str, Path], work: Path, out: Path) -> None:
    merged = work / "merged"
    for r in roots.values():
        _tree(r, merged)
    rootfs = work / "rootfs"
    for d in ("proc", "sys", "dev", "tmp", "run", "root/.ssh", "etc/dropbear", "mnt", "var"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "root").chmod(0o700)
    (rootfs / "root/.ssh").chmod(0o700)

    busybox = merged / "bin/busybox"
    _copy(busybox, rootfs / "bin/busybox")
    for applet in _run([str(busybox), "--list-full"]).split():
        link = rootfs / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")

    # Programs and their library closure at their Debian paths, plus the ELF interpreter.
    for prog in GUEST_PROGRAMS:
        _copy(merged / prog, rootfs / prog)
    (rootfs / "usr/bin/python3").symlink_to("python3.11")
    pyroot = "usr/lib/python3.11"
    _tree(roots["libpython3.11-minimal"] / pyroot, rootfs / pyroot)
    std = roots["libpython3.11-stdlib"] / pyroot
    for pkg in STDLIB_EXTRA:
        _tree(std / pkg, rootfs / pyroot / pkg)
    dynload = []
    for mod in DYNLOAD_EXTRA:
        (so,) = (std / "lib-dynload").glob(f"{mod}.cpython-*.so")
        _copy(so, rootfs / pyroot / "lib-dynload" / so.name)
        dynload.append(merged / pyroot / "lib-dynload" / so.name)
    for test_dir in (rootfs / pyroot).glob("*/test"):
        shutil.rmtree(test_dir)
    programs = [merged / p for p in GUEST_PROGRAMS] + dynload
    for rel in library_closure(merged, programs) | {"lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"}:
        _copy(merged / rel, rootfs / rel)
    (rootfs / "lib64").mkdir(exist_ok=True)
    (rootfs / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")

    # Identity: a host key pinned by the fixture and a client key paramiko loads.
    keys = work / "keys"
    keys.mkdir()
    hostkey = rootfs / "etc/dropbear/dropbear_ed25519_host_key"
    _run(host_exec(merged, "usr/bin/dropbearkey", "-t", "ed25519", "-f", str(hostkey)))
    host_pub = _run(host_exec(merged, "usr/bin/dropbearkey", "-y", "-f", str(hostkey)))
    client = keys / "client.dropbear"
    _run(host_exec(merged, "usr/bin/dropbearkey", "-t", "ed25519", "-f", str(client)))
    client_pub = _run(host_exec(merged, "usr/bin/dropbearkey", "-y", "-f", str(client)))
    conv = host_exec(merged, "usr/bin/dropbearconvert", "dropbear", "openssh")
    _run([*conv, str(client), str(out / "client_key")])
    (out / "client_key").chmod(0o600)
    (rootfs / "root/.ssh/authorized_keys").write_text(_pubkey_line(client_pub) + "\n")
    (rootfs / "root/.ssh/authorized_keys").chmod(0o600)
    (out / "host_key.pub").write_text(_pubkey_line(host_pub) + "\n")

    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "etc/shells").write_text("/bin/sh\n")
    _copy(HERE / "init", rootfs / "init")
    (rootfs / "init").chmod(0o755)
    _copy(HERE / "agent.py", rootfs / "usr/lib/viommu/agent.py")

    # Byte-compile with the guest's own Python so the guest never compiles under TCG.
    pycomp = host_exec(merged, "usr/bin/python3.11")
    env_py = [*pycomp, "-I", "-S", "-m", "compileall", "-q", "-j", "0"]
    _run([*env_py, "--invalidation-mode", "unchecked-hash", str(rootfs / pyroot)])
    _run([*env_py, "--invalidation-mode", "unchecked-hash", str(rootfs / "usr/lib/viommu")])
    # The agent must import in the guest's Python with only what the image carries; what the
    # import loads is all of the standard library the image keeps.
    keep = _agent_modules(merged, rootfs)
    _trim_stdlib(rootfs / pyroot, keep | {(rootfs / pyroot / "os.py").resolve()})  # prefix landmark
    _agent_modules(merged, rootfs)  # still imports after the trim
    _sourceless(rootfs / pyroot)
    _agent_modules(merged, rootfs)  # and from byte-code alone

    # Uncompressed: under TCG the guest kernel spends about half a second inflating a gzip'd
    # image, while copying the plain cpio (~25 MB, read by QEMU from the host page cache)
    # costs a fraction of that.
    with open(out / "initrd.tmp", "wb") as raw:
        write_cpio(rootfs, raw)
    os.replace(out / "initrd.tmp", out / "initrd")


# Run by the guest's Python with the image's tree as its home: import the agent as the harness
# does (-I -S), use it once, and list the files of every module loaded. The json package is kept
# too: the agent imports json.decoder when the C scanner meets a decoding error, which the probe
# makes it meet (the request's error message must name the error, not crash the session).
_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import agent
for m in sys.argv[2].split(","):
    __import__(m)
agent.json_loads(agent.json_dumps(agent.Agent().op_hello()))
try:
    agent.json_loads('{"id": 1, "op": "x')
    sys.exit("an unterminated JSON string decoded")
except ValueError as e:
    if "Unterminated string" not in str(e):
        sys.exit(f"unexpected JSON decoding error: {e!r}")
files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
print(agent.json_dumps(sorted(f for f in files if f)))
"""


def _agent_modules(merged: Path, rootfs: Path) -> set[Path]:
    # The image's own python3.11 binary, so that its prefix (found from the binary's path;
    # -I ignores PYTHONHOME) is the image's tree, not the unpacked packages'.
    python = host_exec(merged, "usr/bin/python3.11")
    python[-1] = str(rootfs / "usr/bin/python3.11")
    argv = [*python, "-I", "-S", "-c", _PROBE, str(rootfs / "usr/lib/viommu")]
    argv.append(",".join(STARTUP_MODULES))
    # The guest's locale: none set (Python then runs in UTF-8 mode).
    out = _run_env(argv, {"LC_ALL": "C", "LANG": ""})
    files = {Path(f).resolve() for f in json.loads(out)}
    stray = [f for f in files if not f.is_relative_to(rootfs.resolve())]
    if stray:
        raise BuildError(f"the agent probe loaded modules from outside the image: {stray[0]}")
    return files


def _trim_stdlib(pyroot: Path, keep: set[Path]) -> None:
    """Delete every stdlib file the agent does not load (sources, their byte-code, extension
    modules); under TCG each megabyte of initramfs costs unpacking time at every boot."""
    for dirpath, _dirs, files in os.walk(pyroot):
        d = Path(dirpath)
        for name in files:
            f = d / name
            src = f
            if d.name == "__pycache__":  # NAME.cpython-311[.opt-N].pyc -> ../NAME.py
                src = d.parent / (name.split(".", 1)[0] + ".py")
            if src.resolve() not in keep:
                f.unlink()
    for dirpath, _dirs, _files in sorted(os.walk(pyroot), reverse=True):
        with contextlib.suppress(OSError):  # not empty
            Path(dirpath).rmdir()


def _sourceless(pyroot: Path) -> None:
    """Keep each stdlib module as its byte-code alone (NAME.pyc beside where NAME.py was, which
    Python imports without a source): the sources are about 40% of the kept stdlib's bytes.
    Tracebacks then show no source line for stdlib frames; the agent keeps its source."""
    for pyc in list(pyroot.rglob("__pycache__/*.cpython-311.pyc")):
        src = pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
        if src.exists():
            os.replace(pyc, src.with_suffix(".pyc"))
            src.unlink()
    for cache in list(pyroot.rglob("__pycache__")):
        with contextlib.suppress(OSError):  # not empty: a .pyc without its source stays
            cache.rmdir()


def _run_env(argv: list[str], env: dict[str, str]) -> str:
    p = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **env}
    )
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"the agent does not import in the guest's Python: {last}")
    return p.stdout


def _pubkey_line(dropbearkey_y: str) -> str:
    for line in dropbearkey_y.splitlines():
        if line.startswith("ssh-"):
            return " ".join(line.split()[:2])
    raise BuildError("dropbearkey -y printed no public key")


# --- cpio newc ------------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for n in sorted(dirnames + filenames):
            yield base / n


def write_cpio(root: Path, out: io.BufferedIOBase) -> None:
    ino = 1

    def header(name: str, mode: int, size: int, nlink: int) -> bytes:
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(nb), 0)
        h = b"070701" + b"".join(b"%08X" % f for f in fields) + nb
        return h + b"\0" * (-len(h) % 4)

    for p in _walk(root):
        rel = p.relative_to(root).as_posix()
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(p).encode()
        elif stat.S_ISREG(st.st_mode):
            data = p.read_bytes()
        else:
            data = b""
        nlink = 2 if stat.S_ISDIR(st.st_mode) else 1
        out.write(header(rel, st.st_mode, len(data), nlink) + data + b"\0" * (-len(data) % 4))
        ino += 1
    name = b"TRAILER!!!\0"
    h = b"070701" + b"".join(b"%08X" % f for f in (0,) * 11 + (len(name), 0)) + name
    out.write(h + b"\0" * (-len(h) % 4))


# --- the cached build -----------------------------------------------------------------------


def build(force: bool = False) -> Path:
    final = guest_dir()
    if is_built(final) and not force:
        touch(final)
        return final
    root = cache_root()  # created 0700
    with build_lock(root / f"{final.name}.lock"):
        if is_built(final) and not force:
            return final
        debs = root / "debs"
        debs.mkdir(exist_ok=True)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=root, prefix=f"{final.name}.build-") as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir(mode=0o700)
            apt_opts = bookworm_apt(root)
            kernel = build_kernel(root, apt_opts, debs)
            shutil.copy2(kernel.vmlinux, out / "vmlinuz")
            files = download(PACKAGES, debs, apt_opts)
            roots = unpack(files, work / "pkgs")
            assemble(roots, work, out)
            info: dict[str, object] = {
                "kernel_release": kernel.release,
                "kernel_source": kernel.source,
            }
            info["packages"] = {n: p.name for n, p in sorted(files.items())}
            info["recipe"] = recipe_hash()
            info["ready_marker"] = READY_MARKER
            info["build_seconds"] = f"{time.monotonic() - t0:.1f}"
            (out / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
            final.chmod(0o700)
            (final / "stamp").write_text(f"{recipe_hash()}\n")  # last: marks a complete build
        prune(root, "guest-", keep=final)
    return final


def main(argv: list[str]) -> int:
    force = "--force" in argv
    try:
        print(build(force=force))
    except BuildError as e:
        print(f"guest build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
