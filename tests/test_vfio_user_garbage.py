"""10,000 malformed messages at a real server over a real unix socket: no hang, no crash.

Each message is one of: a well-framed command with a random payload and flags (the server
answers or rejects it and carries on), a stray reply, a message with fds it may not carry,
a broken header (the server must close), a truncated message followed by the client's
close, or too many fds. After every message the client either sees its probe answered
(the connection survived) or sees the server close, and reconnects. Every wait has a
timeout: a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest

from fixtures.vfio_user.server import VfioUserServer
from fixtures.vfio_user.wire import (
    FLAG_NO_REPLY,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Command,
    DeviceInfo,
    Header,
    Version,
    encode_message,
    parse_header,
)

MESSAGES = 10_000
STEP_TIMEOUT = 5.0
PROBE_ID = 0xFFFF


class GarbageClient:
    def __init__(self, path: Path, rng: random.Random) -> None:
        self.path = path
        self.rng = rng
        self.sock: socket.socket | None = None
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.reconnects = 0
        self.replies = 0
        self.devnull = os.open(os.devnull, os.O_RDONLY)

    async def connect(self) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.wait_for(self.loop.sock_connect(sock, str(self.path)), STEP_TIMEOUT)
        self.sock, self.buf = sock, b""
        self.reconnects += 1
        version = Version(0, 0, {"capabilities": {"max_msg_fds": 16}}).encode()
        await self.send(encode_message(1, Command.VERSION, version))
        reply = await self.read_message()
        assert reply is not None, "server closed during the handshake"
        assert reply[0].is_reply
        assert not reply[0].is_error

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def send(self, data: bytes, nfds: int = 0) -> bool:
        """Send; False if the server already closed the connection."""
        assert self.sock is not None
        try:
            if nfds:
                fds = array.array("i", [self.devnull] * nfds)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
                sent = self.sock.sendmsg([data], anc)
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
        """The next message from the server, or None once it closed the connection."""
        if not await self._fill(HEADER_SIZE):
            return None
        header = parse_header(self.buf[:HEADER_SIZE])
        if not await self._fill(header.size):
            return None
        body, self.buf = self.buf[HEADER_SIZE : header.size], self.buf[header.size :]
        return header, body

    async def survived(self) -> bool:
        """Probe with DEVICE_GET_INFO: True if answered, False if the server closed."""
        probe = Header(PROBE_ID, Command.DEVICE_GET_INFO, 32).pack()
        if not await self.send(probe + DeviceInfo(16, 0, 0, 0).encode()):
            return False
        while (message := await self.read_message()) is not None:
            self.replies += 1
            if message[0].id == PROBE_ID and message[0].command == Command.DEVICE_GET_INFO:
                return True
        return False

    async def expect_close(self) -> None:
        while await self.read_message() is not None:
            pass

    # --- garbage -------------------------------------------------------------------

    def _header(self, command: int, payload: bytes, flags: int) -> bytes:
        msg_id = self.rng.randrange(0, 0xFFFF)  # never PROBE_ID
        return Header(msg_id, command, HEADER_SIZE + len(payload), flags).pack() + payload

    def framed(self) -> tuple[bytes, int]:
        rng = self.rng
        # Mostly real commands (deeper code paths), some unknown ones; never VERSION with a
        # random major (that closes by design) and never a reply-type message here.
        command = rng.choice([*range(2, 19), rng.randrange(19, 0x10000)])
        size = rng.choice([0, 1, 8, 12, 16, 20, 24, 31, 32, 40, 64, 200, rng.randrange(0, 4096)])
        payload = bytearray(rng.randbytes(size))
        if command in (Command.REGION_READ, Command.REGION_WRITE) and size >= 16:
            # aim at real regions and small offsets so the device model is exercised
            struct.pack_into("=QI", payload, 0, rng.randrange(0, 0x1100), rng.choice([0, 7, 9]))
            if command == Command.REGION_WRITE:
                struct.pack_into("=I", payload, 12, max(0, size - 16))
        flags = rng.choice([0, 0, 0, FLAG_NO_REPLY, rng.randrange(0, 0x40) & ~0xE])
        nfds = rng.choice([0, 0, 0, 0, 1, 2, 5])
        return self._header(command, bytes(payload), flags), nfds


async def _drive(server: VfioUserServer, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    client = GarbageClient(server.socket_path, rng)
    counts = dict.fromkeys(["framed", "reply", "bad-header", "truncated", "fd-flood"], 0)
    await client.connect()
    try:
        for _ in range(MESSAGES):
            kind = rng.choices(list(counts), weights=[80, 5, 6, 5, 4])[0]
            counts[kind] += 1
            if kind == "framed":
                data, nfds = client.framed()
                if await client.send(data, nfds) and await client.survived():
                    continue
            elif kind == "reply":
                data = client._header(
                    rng.randrange(0, 20),
                    rng.randbytes(rng.randrange(0, 40)),
                    FLAG_TYPE_REPLY | rng.choice([0, 0x20]),
                )
                if await client.send(data) and await client.survived():
                    continue
            elif kind == "bad-header":
                size = rng.choice([0, 1, 15, MAX_MESSAGE_SIZE + 1, 0xFFFFFFFF])
                flags = rng.choice([0, 2, 3, 0xF, 0x1F])
                raw = struct.pack("=HHIII", 1, rng.randrange(0, 20), size, flags, 0)
                if size >= HEADER_SIZE and flags & 0xF in (0, 1):
                    raw = struct.pack("=HHIII", 1, 4, size, 2, 0)  # keep it broken: type 2
                cut = raw[: rng.choice([16, 16, 3])]
                if await client.send(cut):
                    if len(cut) < HEADER_SIZE:
                        assert client.sock is not None  # send() succeeded: connected
                        client.sock.shutdown(socket.SHUT_WR)
                    await client.expect_close()
            elif kind == "truncated":
                payload = rng.randbytes(rng.randrange(1, 64))
                raw = client._header(rng.randrange(1, 16), payload, 0)
                if await client.send(raw[: rng.randrange(1, len(raw))]):
                    assert client.sock is not None  # send() succeeded: connected
                    client.sock.shutdown(socket.SHUT_WR)
                    await client.expect_close()
            else:  # fd-flood: more fds than max_msg_fds
                data, _ = client.framed()
                if await client.send(data, rng.randrange(17, 60)):
                    await client.expect_close()
            await client.connect()
    finally:
        client.close()
        os.close(client.devnull)
    counts["reconnects"] = client.reconnects
    return counts


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_ten_thousand_malformed_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    socket_dir = Path("/tmp") / f"vu-garbage-{os.getpid()}"
    server = VfioUserServer("garbage", socket_dir, message_timeout=1.0)
    caplog.set_level(logging.ERROR)
    await server.start()
    fds_before = _open_fds()
    started = time.monotonic()
    try:
        counts = await asyncio.wait_for(_drive(server, seed=20261121), timeout=120)
    finally:
        elapsed = time.monotonic() - started
        await server.stop()
        socket_dir.rmdir()
    assert sum(counts[k] for k in ("framed", "reply", "bad-header", "truncated", "fd-flood")) == (
        MESSAGES
    )
    assert counts["reconnects"] > 500, counts  # the fatal kinds really closed connections
    errors = [e for s in server.sessions for e in s.errors]
    assert any(e.fatal for e in errors)
    assert any(not e.fatal for e in errors)
    internal = [s.close_reason for s in server.sessions if "internal" in (s.close_reason or "")]
    assert internal == [], internal[:5]
    assert [r.getMessage() for r in caplog.records] == []
    assert _open_fds() <= fds_before, "fds leaked (SCM_RIGHTS or sockets)"
    assert elapsed < 60, f"{MESSAGES} messages took {elapsed:.1f} s"
    print(f"{MESSAGES} messages in {elapsed:.1f} s: {counts}")
