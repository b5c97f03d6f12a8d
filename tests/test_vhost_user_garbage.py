"""Thousands of malformed front-end messages at the vhost-user backend over a real socketpair:
no hang, no unhandled exception, no fd leak.

Each round sends one of: a well-framed request with a random code, payload, flags and fds
(the backend applies it, rejects it with a non-zero ack, or closes when it cannot give the
reply QEMU would wait for), a broken header (bad version, oversized: the backend must
close), a message cut short by the peer's close, too many fds, or garbage on the
backend-request channel. After every round the client either sees its probe answered (the
connection survived) or sees the backend close, and reconnects. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fixtures.vhost_user.backend import VhostUserBackend
from fixtures.vhost_user.record import NoTranslation, Translation
from fixtures.vhost_user.wire import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD,
    U64,
    VERSION,
    VRING_NOFD,
    Access,
    BackendRequest,
    Header,
    IotlbMsg,
    IotlbType,
    MemoryRegion,
    MemoryTable,
    Request,
    VringState,
    encode_message,
    encode_reply,
    parse_header,
)

MESSAGES = 10_000
STEP_TIMEOUT = 5.0


class GarbageFrontEnd:
    """Plays a broken QEMU on the other end of a socketpair."""

    def __init__(self, backend: VhostUserBackend, rng: random.Random, ram_fd: int) -> None:
        self.backend = backend
        self.rng = rng
        self.ram_fd = ram_fd
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.backend_peer: socket.socket | None = None
        self.buf = b""
        self.reconnects = 0
        self.probe = 0
        self.devnull = os.open(os.devnull, os.O_RDONLY)

    async def connect(self) -> None:
        self.close()
        if self.backend.current is not None:
            await asyncio.wait_for(self.backend.current.closed.wait(), STEP_TIMEOUT)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self.backend.adopt(theirs)
        self.sock, self.buf = ours, b""
        self.reconnects += 1

    def close(self) -> None:
        for sock in (self.sock, self.backend_peer):
            if sock is not None:
                sock.close()
        self.sock = self.backend_peer = None

    async def send(self, data: bytes, fds: list[int] | None = None) -> bool:
        assert self.sock is not None
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], fds)
                data = data[sent:]
            if data:
                await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), STEP_TIMEOUT)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def _fill(self, n: int) -> bool:
        assert self.sock is not None
        while len(self.buf) < n:
            try:
                chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), STEP_TIMEOUT)
            except ConnectionResetError:
                return False
            if not chunk:
                return False
            self.buf += chunk
        return True

    async def read_message(self) -> tuple[Header, bytes] | None:
        if not await self._fill(HEADER_SIZE):
            return None
        header = parse_header(self.buf[:HEADER_SIZE])
        if not await self._fill(HEADER_SIZE + header.size):
            return None
        end = HEADER_SIZE + header.size
        body, self.buf = self.buf[HEADER_SIZE:end], self.buf[end:]
        return header, body

    async def survived(self) -> bool:
        """SET_VRING_BASE n, GET_VRING_BASE: True if the reply carries n, False on close."""
        self.probe = (self.probe + 1) & 0xFFFF
        set_base = encode_message(Request.SET_VRING_BASE, VringState(1, self.probe).encode())
        get_base = encode_message(Request.GET_VRING_BASE, VringState(1, 0).encode())
        if not await self.send(set_base + get_base):
            return False
        while (message := await self.read_message()) is not None:
            header, body = message
            assert header.is_reply, header
            if header.request == Request.GET_VRING_BASE and VringState.decode(body) == (
                VringState(1, self.probe)
            ):
                return True
        return False

    async def expect_close(self) -> None:
        while await self.read_message() is not None:
            pass

    # ---- garbage ------------------------------------------------------------------------
    def fds(self, n: int) -> list[int]:
        return [self.rng.choice([self.devnull, self.ram_fd, self.ram_fd]) for _ in range(n)]

    def payload_for(self, request: int) -> bytes:
        rng = self.rng
        if request == Request.SET_MEM_TABLE and rng.random() < 0.7:
            regions = tuple(
                MemoryRegion(
                    i << 30,
                    rng.choice([4096, 4096, 1 << 15, 1 << 16, 1 << 40, 0, 2**64 - 1]),
                    rng.randrange(0, 2**47),
                    rng.choice([0, 0, 4096, 2**63]),
                )
                for i in range(rng.randrange(1, 4))
            )
            try:
                return MemoryTable(regions).encode()
            except struct.error:
                return b""
        if request == Request.IOTLB_MSG and rng.random() < 0.7:
            if rng.random() < 0.5:  # what QEMU sends
                kind = rng.choice([IotlbType.UPDATE, IotlbType.INVALIDATE])
                perm, size, iova = rng.choice(list(Access)), 4096 << rng.randrange(0, 20), 0
            else:
                kind = rng.choice([*IotlbType, 0, 7, 255])
                perm = rng.choice([*Access, 4, 255])
                size = rng.choice([0, 1, 4096, 2**64 - 1])
                iova = rng.randrange(0, 2**64)
            uaddr = rng.choice([0x7F00_0000_0000, rng.randrange(0, 2**64)])
            return IotlbMsg(iova, size, uaddr, perm, kind).encode()
        if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL) and rng.random() < 0.7:
            return U64(rng.choice([0, 1, 2, VRING_NOFD, VRING_NOFD | 1, 1 << 9])).encode()
        if request in (Request.SET_VRING_NUM, Request.SET_VRING_ENABLE) and rng.random() < 0.7:
            return VringState(
                rng.randrange(0, 3), rng.choice([0, 1, 2, 256, 3, 2**32 - 1])
            ).encode()
        size = rng.choice([0, 1, 4, 8, 12, 16, 31, 32, 40, 64, 264, rng.randrange(0, 600)])
        return rng.randbytes(size)

    def framed(self) -> tuple[bytes, list[int]]:
        rng = self.rng
        request = rng.choice([*range(1, 45), rng.randrange(45, 2**32)])
        payload = self.payload_for(request)
        flags = VERSION | rng.choice([0, 0, 0, FLAG_NEED_REPLY, FLAG_NEED_REPLY, FLAG_REPLY, 0x10])
        if rng.random() < 0.8:  # mostly the fds the request should carry: deeper code paths
            nfds = self.fitting_fds(request, payload)
        else:
            nfds = rng.choice([0, 1, 2, 3])
        return encode_message(request, payload, flags=flags), self.fds(nfds)

    @staticmethod
    def fitting_fds(request: int, payload: bytes) -> int:
        if request == Request.SET_MEM_TABLE and len(payload) >= 4:
            return min(struct.unpack_from("=I", payload)[0], 8)
        if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            return 0 if len(payload) == 8 and payload[1] & 1 else 1
        return 1 if request == Request.SET_BACKEND_REQ_FD else 0

    async def backend_channel_garbage(self) -> bool:
        """Hand over a backend-request channel, then send replies nobody asked for on it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        message = encode_message(Request.SET_BACKEND_REQ_FD, flags=FLAG_NEED_REPLY)
        sent = await self.send(message, [theirs.fileno()])
        theirs.close()
        if self.backend_peer is not None:
            self.backend_peer.close()
        self.backend_peer = ours
        ours.setblocking(False)
        junk = self.rng.choice(
            [
                encode_reply(Header(BackendRequest.IOTLB_MSG, 0, 0), U64(0).encode()),
                encode_message(BackendRequest.IOTLB_MSG, IotlbMsg(0, 1, 0, 3, 2).encode()),
                struct.pack("=III", 1, 0, 0),  # bad version: the channel closes
                self.rng.randbytes(self.rng.randrange(1, 40)),
            ]
        )
        if not sent:
            return False
        await self.loop.sock_sendall(ours, junk)
        return await self.survived()


async def _drive(backend: VhostUserBackend, seed: int, ram_fd: int) -> dict[str, int]:
    rng = random.Random(seed)
    client = GarbageFrontEnd(backend, rng, ram_fd)
    counts = dict.fromkeys(["framed", "bad-header", "truncated", "fd-flood", "backend-chan"], 0)
    await client.connect()
    try:
        for _ in range(MESSAGES):
            kind = rng.choices(list(counts), weights=[80, 6, 5, 4, 5])[0]
            counts[kind] += 1
            assert client.sock is not None
            if kind == "framed":
                data, fds = client.framed()
                if await client.send(data, fds) and await client.survived():
                    continue
            elif kind == "backend-chan":
                if await client.backend_channel_garbage():
                    continue
            elif kind == "bad-header":
                flags = rng.choice([0, 2, 3, 0x7])
                size = rng.choice([0, 8, MAX_PAYLOAD + 1, 2**32 - 1])
                if flags & 3 == VERSION:
                    size = MAX_PAYLOAD + 1 + rng.randrange(0, 2**20)  # keep it broken
                raw = struct.pack("=III", rng.randrange(0, 40), flags, size)
                cut = raw[: rng.choice([12, 12, 5])]
                if await client.send(cut):
                    if len(cut) < HEADER_SIZE:
                        client.sock.shutdown(socket.SHUT_WR)
                    await client.expect_close()
            elif kind == "truncated":
                payload = rng.randbytes(rng.randrange(1, 64))
                raw = encode_message(rng.randrange(1, 40), payload)
                if await client.send(
                    raw[: rng.randrange(1, len(raw))], client.fds(rng.choice([0, 1]))
                ):
                    client.sock.shutdown(socket.SHUT_WR)
                    await client.expect_close()
            else:  # fd-flood: more fds than any message may carry
                data, _ = client.framed()
                if await client.send(data, client.fds(rng.randrange(9, 40))):
                    await client.expect_close()
            await client.connect()
    finally:
        client.close()
        os.close(client.devnull)
    counts["reconnects"] = client.reconnects
    return counts


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def _ram_file() -> Iterator[int]:
    with tempfile.TemporaryFile() as ram:
        ram.truncate(1 << 16)
        yield ram.fileno()


async def test_thousands_of_malformed_messages(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    socket_dir = Path(tempfile.mkdtemp(prefix="vhu-garbage-", dir="/tmp"))
    backend = VhostUserBackend("garbage", socket_dir, message_timeout=0.5)
    fds_before = _open_fds()
    started = time.monotonic()
    with _ram_file() as ram_fd:
        try:
            counts = await asyncio.wait_for(_drive(backend, 20261201, ram_fd), timeout=120)
        finally:
            elapsed = time.monotonic() - started
            await backend.stop()
            socket_dir.rmdir()  # noqa: ASYNC240 (empty directory, no I/O to speak of)
    assert sum(v for k, v in counts.items() if k != "reconnects") == MESSAGES
    assert counts["reconnects"] > 200, counts  # the fatal kinds really closed connections
    errors = backend.errors
    assert any(getattr(e, "fatal", False) for e in errors)
    assert any(not getattr(e, "fatal", True) for e in errors)
    internal = [str(e) for e in errors if "internal error" in str(e)]
    assert internal == [], internal[:5]
    reasons = [c.close_reason for c in backend.connections]
    assert all(r is not None for r in reasons), "a connection was left open"
    assert [r.getMessage() for r in caplog.records] == []
    assert _open_fds() <= fds_before, "fds leaked (SCM_RIGHTS, mappings or sockets)"
    assert elapsed < 60, f"{MESSAGES} messages took {elapsed:.1f} s"
    print(f"{MESSAGES} messages in {elapsed:.1f} s: {counts}")


# ---- translate() against a scripted front-end ----------------------------------------------------


async def _fake_qemu(
    backend: VhostUserBackend, answer: str
) -> tuple[Translation | NoTranslation, list[str]]:
    """Connect, hand over a memory table and a backend channel, then answer one MISS."""
    loop = asyncio.get_running_loop()
    front, theirs = socket.socketpair()
    back, back_theirs = socket.socketpair()
    front.setblocking(False)
    back.setblocking(False)
    backend.adopt(theirs)
    with _ram_file() as ram_fd:
        table = MemoryTable((MemoryRegion(0x100000, 1 << 16, 0x7F00_0000_0000, 0),)).encode()
        socket.send_fds(front, [encode_message(Request.SET_MEM_TABLE, table)], [ram_fd])
    socket.send_fds(front, [encode_message(Request.SET_BACKEND_REQ_FD)], [back_theirs.fileno()])
    back_theirs.close()
    seen: list[str] = []

    async def qemu_side() -> None:
        raw = await asyncio.wait_for(loop.sock_recv(back, 44), STEP_TIMEOUT)
        header = parse_header(raw[:HEADER_SIZE])
        miss = IotlbMsg.decode(raw[HEADER_SIZE:])
        seen.append(f"{BackendRequest(header.request).name} {IotlbType(miss.type).name}")
        assert header.need_reply
        base = miss.iova & ~0xFFF
        if answer in ("update", "update-outside"):
            uaddr = 0x7F00_0000_2000 if answer == "update" else 0x1000
            update = IotlbMsg(base, 0x1000, uaddr, Access.RW, IotlbType.UPDATE).encode()
            await loop.sock_sendall(
                front, encode_message(Request.IOTLB_MSG, update, flags=FLAG_NEED_REPLY)
            )
            ack = await asyncio.wait_for(loop.sock_recv(front, 20), STEP_TIMEOUT)
            seen.append(f"ack {U64.decode(ack[HEADER_SIZE:]).value}")
        if answer == "invalidate":
            inval = IotlbMsg(base, 0x1000, 0, Access.NONE, IotlbType.INVALIDATE).encode()
            await loop.sock_sendall(front, encode_message(Request.IOTLB_MSG, inval))
        if answer == "garbage":
            await loop.sock_sendall(back, b"\xff" * 12)
            return
        if answer != "silence":
            ok = U64(1 if answer == "fail" else 0).encode()
            await loop.sock_sendall(back, encode_reply(header, ok))

    try:
        await backend.wait_until(
            lambda: backend.current is not None and backend.current.backend_channel is not None,
            "backend channel",
        )
        task = asyncio.create_task(qemu_side())
        result = await backend.translate(0x4000_0123, Access.RO, timeout=0.5)
        await asyncio.wait_for(task, STEP_TIMEOUT)
    finally:
        front.close()
        back.close()
    return result, seen


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("update", Translation),
        ("update-outside", Translation),
        ("invalidate", NoTranslation),
        ("fail", NoTranslation),
        ("ok-without-update", NoTranslation),
        ("silence", NoTranslation),
        ("garbage", NoTranslation),
    ],
)
async def test_translate_never_hangs_and_says_what_came(answer: str, expected: type) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="vhu-xlate-", dir="/tmp"))
    backend = VhostUserBackend("xlate", socket_dir)
    fds_before = _open_fds()
    try:
        result, seen = await _fake_qemu(backend, answer)
    finally:
        await backend.stop()
        socket_dir.rmdir()  # noqa: ASYNC240
    assert isinstance(result, expected), (result, backend.report())
    assert seen[0] == "IOTLB_MSG MISS"
    miss = backend.record[0]
    assert (miss.type, miss.iova, miss.perm) == (IotlbType.MISS, 0x4000_0123, Access.RO)
    if answer == "update":
        assert isinstance(result, Translation)
        assert result.gpa == 0x100000 + 0x2000 + 0x123  # uaddr back through the memory table
        assert result.perm is Access.RW
        assert seen[1] == "ack 0"
    if answer == "update-outside":
        assert isinstance(result, Translation)
        assert result.gpa is None
    if answer == "fail":
        assert isinstance(result, NoTranslation)
        assert result.reply == 1
    if answer == "garbage":
        assert any(getattr(e, "fatal", False) for e in backend.errors)
    assert _open_fds() <= fds_before, "fds leaked"
