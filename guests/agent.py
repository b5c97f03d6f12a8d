"""In-guest agent: guest userspace VFIO driven by the harness over one SSH channel.

Protocol: one JSON object per line, one reply per line, in order. guests/init pre-starts the
agent at boot (`listen`): it listens on 127.0.0.1:AGENT_PORT inside the guest only, prints the
ready marker on the console, and forks one child per connection (the harness reaches it through
the SSH session's direct-tcpip channel), so a session pays neither python3's start nor its
imports. `main` serves stdin/stdout instead.
Request `{"id": N, "op": NAME, ...args}`; reply `{"id": N, "ok": true, "result": ...}` or
`{"id": N, "ok": false, "error": TEXT, "errno": E}` (errno 0 when not an OSError).
The agent keeps its state (container, group and device fds, buffers) for the whole session, so
one session is one guest process with one type1 container set-up, as a real VFIO user has.

Runs under the guest's python3.11 with only the stdlib bits the image carries (ctypes, mmap,
json, fcntl): keep imports to those (guests/build.py keeps only what this module's import
loads). Addresses and sizes are plain integers.
"""

from __future__ import annotations

import _socket
import ctypes
import errno
import fcntl
import mmap
import os
import struct
import sys
import time

# typing (and what it pulls in) costs a fifth of the agent's start-up under TCG; the
# annotations are never evaluated (from __future__ import annotations), so only mypy needs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# VFIO ioctls: _IO(';', 100 + n) (include/uapi/linux/vfio.h).
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_UNSET_CONTAINER = 0x3B69
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_GET_INFO = 0x3B6B
VFIO_DEVICE_GET_REGION_INFO = 0x3B6C
VFIO_DEVICE_RESET = 0x3B6F
VFIO_IOMMU_MAP_DMA = 0x3B71
VFIO_IOMMU_UNMAP_DMA = 0x3B72
VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2

PAGE = 4096
BIND_WITHIN_S = 5.0  # a hotplugged function becomes matchable within this long (op_bind)
HUGE = 2 << 20
MAP_HUGETLB = 0x40000
MAP_POPULATE = 0x8000
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN = (1 << 55) - 1
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC
AGENT_PORT = 7007  # on the guest's loopback only: SSH (host key pinned, client key) is the way in
READY_MARKER = "VIOMMU-GUEST-READY"  # the harness waits for it on the serial console


def _json_codec() -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    """(dumps, loads) on the C accelerator `_json` alone: the `json` package imports `re` (and
    with it enum, functools, collections), about half of this module's start-up under TCG.
    Output equals json.dumps' defaults; any other Python gets the json package itself."""
    try:
        import _json

        class Context:  # the attributes the C scanner reads (json.decoder.JSONDecoder's)
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int

            @staticmethod
            def parse_constant(name: str) -> Any:
                raise ValueError(f"{name} is not valid JSON here")

        def no_default(obj: Any) -> Any:
            raise TypeError(f"{type(obj).__name__} is not JSON serializable")

        scan = _json.make_scanner(Context())  # type: ignore[arg-type]  # typeshed: a JSONDecoder
        encode = _json.make_encoder(
            None, no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
        )
    except (ImportError, AttributeError, TypeError):
        import json

        return json.dumps, json.loads

    def dumps(obj: Any) -> str:
        return "".join(encode(obj, 0))

    def loads(text: str) -> Any:
        s = text.strip(" \t\r\n")
        try:
            obj, end = scan(s, 0)
        except StopIteration as e:
            raise ValueError(f"expecting a JSON value at {e.value}") from None
        except SystemError:
            # An error inside a value (an unterminated string, a missing comma): the C scanner
            # raises json.JSONDecodeError (a ValueError) only when json.decoder is already in
            # sys.modules, else returns NULL with no exception set. Import it (the image keeps
            # it for this) on this error path only, and scan again for the real message.
            import json.decoder  # noqa: F401

            obj, end = scan(s, 0)
        if end != len(s):
            raise ValueError(f"extra data at {end}")
        return obj

    return dumps, loads


json_dumps, json_loads = _json_codec()


class AgentError(Exception):
    """A request the agent refuses (bad arguments or state); errno 0 on the wire."""


class Buffer:
    """An anonymous (or hugetlb) mapping of this process, the unit the harness maps for DMA."""

    def __init__(self, size: int, hugepage: bool) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE
        if hugepage:
            if size % HUGE:
                raise AgentError("hugepage buffers are whole 2 MiB pages")
            flags |= MAP_HUGETLB
        self.size = size
        self.hugepage = hugepage
        self.mem = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        # Touch every page so each has a frame before the first pagemap read.
        for off in range(0, size, PAGE):
            self.mem[off] = 0

    def gpas(self) -> list[int]:
        """The guest-physical address of each 4 KiB page, from /proc/self/pagemap."""
        n = self.size // PAGE
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((self.vaddr // PAGE) * 8)
            raw = f.read(n * 8)
        out = []
        for (entry,) in struct.iter_unpack("<Q", raw):
            if not entry & PAGEMAP_PRESENT or not entry & PAGEMAP_PFN:
                raise AgentError("page not present or PFN hidden (agent must run as root)")
            out.append((entry & PAGEMAP_PFN) * PAGE)
        return out


class Device:
    def __init__(self, fd: int, bdf: str) -> None:
        self.fd = fd
        self.bdf = bdf
        self.regions: dict[int, tuple[int, int, int]] = {}  # index -> (flags, size, offset)

    def region(self, index: int) -> tuple[int, int, int]:
        if index not in self.regions:
            buf = bytearray(struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0))
            fcntl.ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf, True)
            _argsz, flags, _i, _cap, size, offset = struct.unpack("<IIIIQQ", buf)
            self.regions[index] = (flags, size, offset)
        return self.regions[index]

    def access(self, index: int, offset: int, width: int, value: int | None) -> int:
        _flags, size, base = self.region(index)
        if width not in (1, 2, 4, 8) or offset < 0 or offset + width > size:
            raise AgentError(f"region {index} access {offset:#x}/{width} outside {size:#x}")
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
        if value is None:
            return struct.unpack(fmt, os.pread(self.fd, width, base + offset))[0]
        if os.pwrite(self.fd, struct.pack(fmt, value), base + offset) != width:
            raise AgentError("short region write")
        return value


class Agent:
    def __init__(self) -> None:
        self.containers: dict[str, int] = {}
        self.container_iommu: dict[str, bool] = {}
        self.groups: dict[int, tuple[int, str | None]] = {}  # group -> (fd, container)
        self.devices: dict[str, Device] = {}
        self.buffers: dict[str, Buffer] = {}
        self.done = False
        self.after_reply: list[int] = []

    # --- introspection -----------------------------------------------------------------

    def op_hello(self) -> dict[str, Any]:
        with open("/proc/cmdline") as f:
            cmdline = f.read().strip()
        return {"pid": os.getpid(), "release": os.uname().release, "cmdline": cmdline}

    def op_pci(self) -> list[dict[str, Any]]:
        out = []
        base = "/sys/bus/pci/devices"
        for bdf in sorted(os.listdir(base)):
            d = f"{base}/{bdf}"
            out.append(
                {
                    "bdf": bdf,
                    "vendor": int(_read(f"{d}/vendor"), 16),
                    "device": int(_read(f"{d}/device"), 16),
                    "class": int(_read(f"{d}/class"), 16),
                    "driver": _link_name(f"{d}/driver"),
                    "iommu_group": _group_of(bdf),
                }
            )
        return out

    def op_wait_pci(self, bdf: str, present: bool = True, within: float = 20.0) -> float:
        """Wait until the device is (or is no longer) enumerated; returns the seconds waited."""
        t0 = time.monotonic()
        while os.path.exists(f"/sys/bus/pci/devices/{bdf}") != present:
            if time.monotonic() - t0 > within:
                raise AgentError(f"{bdf} {'did not appear' if present else 'is still there'}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def op_dmesg(self) -> list[str]:
        """The kernel log so far, one message per line (reads /dev/kmsg without blocking)."""
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        lines = []
        try:
            while True:
                try:
                    rec = os.read(fd, 8192).decode(errors="replace")
                except BlockingIOError:
                    break
                except OSError as e:  # EPIPE: overwritten records; keep reading
                    if e.errno == errno.EPIPE:
                        continue
                    raise
                head, _, msg = rec.partition(";")
                usec = int(head.split(",")[2])
                lines.append(f"[{usec / 1e6:12.6f}] {msg.splitlines()[0] if msg else ''}")
        finally:
            os.close(fd)
        return lines

    # --- binding and the VFIO object graph ----------------------------------------------

    def op_bind(self, bdf: str) -> int:
        """Bind a PCI device to vfio-pci; returns its IOMMU group number."""
        d = f"/sys/bus/pci/devices/{bdf}"
        if _link_name(f"{d}/driver") != "vfio-pci":
            if os.path.exists(f"{d}/driver"):
                _write(f"{d}/driver/unbind", bdf)
            _write(f"{d}/driver_override", "vfio-pci")
            # A hotplugged function is in sysfs before the kernel lets a driver match it
            # (pci_bus_add_device allows matching only after the BARs are assigned): a probe
            # in that window binds nothing, so probe again until it binds or time runs out.
            deadline = time.monotonic() + BIND_WITHIN_S
            while True:
                _write("/sys/bus/pci/drivers_probe", bdf)
                if _link_name(f"{d}/driver") == "vfio-pci" or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        if _link_name(f"{d}/driver") != "vfio-pci":
            raise AgentError(f"{bdf} did not bind to vfio-pci within {BIND_WITHIN_S} s")
        group = _group_of(bdf)
        if group is None:
            raise AgentError(f"{bdf} has no IOMMU group (is DMAR on?)")
        deadline = time.monotonic() + 5
        while not os.path.exists(f"/dev/vfio/{group}"):
            if time.monotonic() > deadline:
                raise AgentError(f"/dev/vfio/{group} did not appear")
            time.sleep(0.01)
        return group

    def op_unbind(self, bdf: str) -> None:
        d = f"/sys/bus/pci/devices/{bdf}"
        if os.path.exists(f"{d}/driver"):
            _write(f"{d}/driver/unbind", bdf)

    def op_open_container(self, container: str = "c0") -> dict[str, Any]:
        if container in self.containers:
            raise AgentError(f"container {container} already open")
        fd = os.open("/dev/vfio/vfio", os.O_RDWR)
        if fcntl.ioctl(fd, VFIO_GET_API_VERSION) != VFIO_API_VERSION:
            os.close(fd)
            raise AgentError("unexpected VFIO API version")
        self.containers[container] = fd
        self.container_iommu[container] = False
        return {
            "type1": bool(fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)),
            "type1v2": bool(fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)),
        }

    def op_attach_group(self, group: int, container: str = "c0", v2: bool = True) -> None:
        """Open /dev/vfio/GROUP, add it to the container; the first group sets the IOMMU."""
        cfd = self._container(container)
        if group not in self.groups:
            gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
            self.groups[group] = (gfd, None)
        gfd, current = self.groups[group]
        if current is not None:
            raise AgentError(f"group {group} already in container {current}")
        status = bytearray(struct.pack("<II", 8, 0))
        fcntl.ioctl(gfd, VFIO_GROUP_GET_STATUS, status, True)
        if not struct.unpack("<II", status)[1] & VFIO_GROUP_FLAGS_VIABLE:
            raise AgentError(f"group {group} is not viable (bind every device in it)")
        fcntl.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, struct.pack("<i", cfd))
        self.groups[group] = (gfd, container)
        if not self.container_iommu[container]:
            fcntl.ioctl(cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU if v2 else VFIO_TYPE1_IOMMU)
            self.container_iommu[container] = True

    def op_open_device(self, group: int, bdf: str) -> dict[str, Any]:
        gfd, container = self.groups.get(group, (None, None))
        if gfd is None or container is None:
            raise AgentError(f"group {group} is not attached to a container")
        # A mutable buffer with mutate_flag: ioctl returns the call's result, here the fd.
        fd = int(fcntl.ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"), True))
        dev = Device(fd, bdf)
        self.devices[bdf] = dev
        flags, size, _offset = dev.region(0)
        return {"bar0_size": size, "bar0_flags": flags}

    def op_close_device(self, bdf: str) -> None:
        os.close(self.devices.pop(bdf).fd)

    def op_detach_group(self, group: int) -> None:
        gfd, container = self.groups.pop(group)
        if container is not None:
            fcntl.ioctl(gfd, VFIO_GROUP_UNSET_CONTAINER)
        os.close(gfd)

    def op_close_container(self, container: str = "c0") -> None:
        os.close(self.containers.pop(container))
        del self.container_iommu[container]

    def op_release_all(self) -> None:
        """Close every device, group and container (the guest's part of a hot-unplug)."""
        for bdf in list(self.devices):
            self.op_close_device(bdf)
        for group in list(self.groups):
            self.op_detach_group(group)
        for container in list(self.containers):
            self.op_close_container(container)

    # --- buffers and type1 mappings --------------------------------------------------

    def op_alloc(self, name: str, size: int, hugepage: bool = False) -> dict[str, Any]:
        if name in self.buffers:
            raise AgentError(f"buffer {name} exists")
        if size <= 0 or size % PAGE:
            raise AgentError("buffer size must be a positive multiple of 4 KiB")
        if hugepage:
            _reserve_hugepages(size // HUGE)
        buf = Buffer(size, hugepage)
        self.buffers[name] = buf
        return {"vaddr": buf.vaddr, "gpas": buf.gpas()}

    def op_free(self, name: str) -> None:
        self.buffers.pop(name).mem.close()

    def op_gpas(self, name: str) -> list[int]:
        return self._buffer(name).gpas()

    def op_map(
        self,
        buffer: str,
        iova: int,
        offset: int = 0,
        size: int | None = None,
        read: bool = True,
        write: bool = True,
        container: str = "c0",
    ) -> None:
        buf = self._buffer(buffer)
        size = buf.size - offset if size is None else size
        if offset < 0 or size <= 0 or offset + size > buf.size:
            raise AgentError("map range outside the buffer")
        flags = (VFIO_DMA_MAP_FLAG_READ if read else 0) | (VFIO_DMA_MAP_FLAG_WRITE if write else 0)
        arg = struct.pack("<IIQQQ", 32, flags, buf.vaddr + offset, iova, size)
        fcntl.ioctl(self._container(container), VFIO_IOMMU_MAP_DMA, arg)

    def op_unmap(self, iova: int, size: int, container: str = "c0") -> int:
        """Returns the number of bytes type1 reports unmapped."""
        arg = bytearray(struct.pack("<IIQQ", 24, 0, iova, size))
        fcntl.ioctl(self._container(container), VFIO_IOMMU_UNMAP_DMA, arg, True)
        return struct.unpack("<IIQQ", arg)[3]

    def op_churn(
        self, buffer: str, iova: int, count: int, size: int | None = None, container: str = "c0"
    ) -> dict[str, Any]:
        """Map then unmap the same range `count` times inside the guest; returns the rate."""
        buf = self._buffer(buffer)
        size = buf.size if size is None else size
        cfd = self._container(container)
        m = struct.pack("<IIQQQ", 32, 3, buf.vaddr, iova, size)
        u = struct.pack("<IIQQ", 24, 0, iova, size)
        t0 = time.monotonic()
        for _ in range(count):
            fcntl.ioctl(cfd, VFIO_IOMMU_MAP_DMA, m)
            fcntl.ioctl(cfd, VFIO_IOMMU_UNMAP_DMA, u)
        dt = time.monotonic() - t0
        return {"count": count, "seconds": dt}

    def op_read(self, buffer: str, offset: int = 0, size: int | None = None) -> str:
        buf = self._buffer(buffer)
        size = buf.size - offset if size is None else size
        return buf.mem[offset : offset + size].hex()

    def op_write(self, buffer: str, data: str, offset: int = 0) -> None:
        raw = bytes.fromhex(data)
        buf = self._buffer(buffer)
        if offset < 0 or offset + len(raw) > buf.size:
            raise AgentError("write outside the buffer")
        buf.mem[offset : offset + len(raw)] = raw

    def op_fill(self, buffer: str, byte: int, offset: int = 0, size: int | None = None) -> None:
        buf = self._buffer(buffer)
        size = buf.size - offset if size is None else size
        buf.mem[offset : offset + size] = bytes([byte]) * size

    # --- device register access (the DMA engine's layout is the harness's business) ------

    def op_region(self, bdf: str, ops: list[list[Any]], index: int = 0) -> list[int]:
        """Run register accesses in order; returns the value of each read and poll.

        Each op is ["r", offset, width], ["w", offset, width, value] or
        ["poll", offset, width, mask, value, timeout_s] (wait until reg & mask == value).
        """
        dev = self._device(bdf)
        results = []
        for op in ops:
            kind, offset, width = op[0], op[1], op[2]
            if kind == "r":
                results.append(dev.access(index, offset, width, None))
            elif kind == "w":
                dev.access(index, offset, width, op[3])
            elif kind == "poll":
                mask, want, timeout = op[3], op[4], op[5]
                deadline = time.monotonic() + timeout
                while True:
                    v = dev.access(index, offset, width, None)
                    if v & mask == want:
                        break
                    if time.monotonic() > deadline:
                        raise AgentError(f"poll {offset:#x}: {v:#x} & {mask:#x} != {want:#x}")
                    time.sleep(0.001)
                results.append(v)
            else:
                raise AgentError(f"unknown region op {kind!r}")
        return results

    def op_reset_device(self, bdf: str) -> None:
        fcntl.ioctl(self._device(bdf).fd, VFIO_DEVICE_RESET)

    # --- session and machine -------------------------------------------------------------

    def op_sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def op_exit(self) -> None:
        self.done = True

    def op_reboot(self) -> None:
        self.after_reply.append(RB_AUTOBOOT)

    def op_poweroff(self) -> None:
        self.after_reply.append(RB_POWER_OFF)

    # --- plumbing ------------------------------------------------------------------------

    def _container(self, name: str) -> int:
        if name not in self.containers:
            raise AgentError(f"no container {name}")
        return self.containers[name]

    def _buffer(self, name: str) -> Buffer:
        if name not in self.buffers:
            raise AgentError(f"no buffer {name}")
        return self.buffers[name]

    def _device(self, bdf: str) -> Device:
        if bdf not in self.devices:
            raise AgentError(f"device {bdf} not open")
        return self.devices[bdf]

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        rid = req.pop("id", None)
        op = req.pop("op", "")
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            return {"id": rid, "ok": False, "error": f"unknown op {op!r}", "errno": 0}
        try:
            return {"id": rid, "ok": True, "result": fn(**req)}
        except OSError as e:
            return {"id": rid, "ok": False, "error": f"{op}: {e}", "errno": e.errno or 0}
        except (AgentError, TypeError, ValueError, KeyError) as e:
            return {"id": rid, "ok": False, "error": f"{op}: {e!r}", "errno": 0}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _group_of(bdf: str) -> int | None:
    name = _link_name(f"/sys/bus/pci/devices/{bdf}/iommu_group")
    return int(name) if name is not None else None


def _reserve_hugepages(extra: int) -> None:
    path = "/proc/sys/vm/nr_hugepages"
    free = int(_read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"))
    if free < extra:
        _write(path, str(int(_read(path)) + extra - free))
        if int(_read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")) < extra:
            raise AgentError("the guest cannot reserve enough 2 MiB hugepages")


def serve(inp: Any, out: Any) -> None:
    agent = Agent()
    out.write(json_dumps({"id": None, "ok": True, "result": agent.op_hello()}) + "\n")
    out.flush()
    for line in inp:
        if not line.strip():
            continue
        try:
            req = json_loads(line)
            if not isinstance(req, dict):
                raise ValueError("request is not an object")
        except ValueError as e:
            reply: dict[str, Any] = {"id": None, "ok": False, "error": f"bad request: {e}"}
            reply["errno"] = 0
        else:
            reply = agent.handle(req)
        out.write(json_dumps(reply) + "\n")
        out.flush()
        if agent.after_reply:
            os.sync()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.reboot(agent.after_reply[0])
        if agent.done:
            break


def main() -> None:
    serve(sys.stdin, sys.stdout)


def _read_first_line(path: str) -> str:
    with open(path) as f:
        return f.readline().strip()


def listen(port: int = AGENT_PORT) -> None:
    """The pre-started agent: bind, print the ready marker, then one forked child per
    connection. The child serves that connection with a fresh Agent and exits at its end, so
    one session is still one guest process whose exit releases every VFIO object it held."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    uptime = _read_first_line("/proc/uptime").split()[0]
    cmdline = _read_first_line("/proc/cmdline")
    print(f"{READY_MARKER} uptime={uptime} kernel={os.uname().release} cmdline={cmdline}")
    sys.stdout.flush()
    while True:
        fd, _addr = sock._accept()  # type: ignore[attr-defined]  # the C socket's own accept
        while True:  # reap the children of sessions that ended (their fds are closed already)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if os.fork() == 0:
            status = 1
            try:
                sock.close()
                with (
                    open(fd, encoding="utf-8", newline="\n", closefd=False) as inp,
                    open(fd, "w", encoding="utf-8", newline="\n", closefd=False) as out,
                ):
                    serve(inp, out)
                status = 0
            except ConnectionError:  # the harness or its SSH connection went away mid-reply
                status = 0
            except BaseException:  # the traceback goes to the console (the serial log)
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(status)
        os.close(fd)


if __name__ == "__main__":
    main()
