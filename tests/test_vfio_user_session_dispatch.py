"""The vfio-user session's dispatch over a real socket pair: a command is served in the reader
when nothing is queued or being served, and a handler that suspends is finished by the
worker, with commands still handled strictly in order, the reader still receiving (the
replies a handler waits for included) and a close mid-handler running its cleanup."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fixtures.vfio_user.session import Request, VfioUserSession
from fixtures.vfio_user.wire import (
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    Command,
    DmaAccess,
    DmaUnmap,
    Header,
    encode_message,
    encode_reply,
    parse_header,
)

TIMEOUT = 5.0
Handler = Callable[[Request], Awaitable[bytes | None]]


class Peer:
    """QEMU's end: sends commands, reads whole messages."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = b""

    async def send(self, msg_id: int, iova: int) -> None:
        payload = DmaUnmap(DmaUnmap.FIXED.size, 0, iova, 0x1000).encode()
        await self.loop.sock_sendall(self.sock, encode_message(msg_id, Command.DMA_UNMAP, payload))

    async def message(self) -> tuple[Header, bytes]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                if len(self.buf) >= HEADER_SIZE:
                    header = parse_header(self.buf[:HEADER_SIZE])
                    if len(self.buf) >= header.size:
                        body = self.buf[HEADER_SIZE : header.size]
                        self.buf = self.buf[header.size :]
                        return header, body
                chunk = await self.loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise ConnectionError("session closed the socket")
                self.buf += chunk


@pytest.fixture
async def pair() -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    host, qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.setblocking(False)
    yield host, qemu
    host.close()
    qemu.close()


async def start(host: socket.socket, handler: Handler) -> VfioUserSession:
    session = VfioUserSession(host, handler, name="dispatch")
    session.start()
    return session


def iova_of(req: Request) -> int:
    assert isinstance(req.payload, DmaUnmap)
    return req.payload.iova


async def test_a_handler_that_never_suspends_is_served_in_the_reader(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    host, qemu = pair
    tasks: list[str] = []

    async def handler(req: Request) -> bytes:
        task = asyncio.current_task()
        tasks.append(task.get_name() if task else "")
        return b"ok"

    session = await start(host, handler)
    peer = Peer(qemu)
    for i in range(3):
        await peer.send(i, i << 12)
        header, body = await peer.message()
        assert (header.id, header.flags, body) == (i, FLAG_TYPE_REPLY, b"ok")
    assert tasks == ["dispatch-reader"] * 3
    await session.close()


async def test_commands_behind_a_suspended_handler_wait_their_turn(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The first command's handler suspends (the worker finishes it); two more arrive
    meanwhile: each handler starts only after the one before has returned, replies in order."""
    host, qemu = pair
    gate = asyncio.Event()
    log: list[str] = []

    async def handler(req: Request) -> bytes:
        page = iova_of(req) >> 12
        log.append(f"start {page}")
        if page == 0:
            await gate.wait()
            task = asyncio.current_task()
            log.append(f"resumed in {task.get_name() if task else ''}")
        log.append(f"end {page}")
        return bytes([page])

    session = await start(host, handler)
    peer = Peer(qemu)
    for i in range(3):
        await peer.send(i, i << 12)
    async with asyncio.timeout(TIMEOUT):
        # the session has no event for "received"; its counter is polled
        while session.messages_in < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    assert log == ["start 0"]  # 1 and 2 are queued behind it
    gate.set()
    replies = [await peer.message() for _ in range(3)]
    assert [(h.id, body) for h, body in replies] == [(0, b"\0"), (1, b"\1"), (2, b"\2")]
    assert log == [
        "start 0",
        "resumed in dispatch-worker",
        "end 0",
        "start 1",
        "end 1",
        "start 2",
        "end 2",
    ]
    await session.close()


async def test_a_handler_waiting_for_a_host_request_gets_its_reply(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Begun in the reader, the handler sends a DMA_READ and waits for QEMU's reply: the reader
    must go on receiving (it would wait for itself if it awaited the handler)."""
    host, qemu = pair
    session: VfioUserSession | None = None

    async def handler(req: Request) -> bytes:
        assert session is not None
        reply, body = await session.request(Command.DMA_READ, DmaAccess(0x2000, 4).encode())
        assert not reply.is_error
        return DmaAccess.decode_read_reply(body, 4).data

    session = await start(host, handler)
    peer = Peer(qemu)
    await peer.send(7, 0)
    dma, _ = await peer.message()
    assert dma.command == Command.DMA_READ
    assert not dma.is_reply
    answer = DmaAccess(0x2000, 4, b"abcd").encode()
    await peer.loop.sock_sendall(qemu, encode_reply(dma, answer))
    header, body = await peer.message()
    assert (header.id, body) == (7, b"abcd")
    await session.close()


async def test_close_while_a_handler_is_suspended_runs_its_cleanup(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    host, qemu = pair
    entered, cleaned = asyncio.Event(), asyncio.Event()

    async def handler(req: Request) -> bytes:
        entered.set()
        try:
            await asyncio.Event().wait()  # never set
        finally:
            cleaned.set()
        return b""

    session = await start(host, handler)
    peer = Peer(qemu)
    await peer.send(1, 0)
    await peer.send(2, 0x1000)  # queued behind it: dropped at close
    await asyncio.wait_for(entered.wait(), TIMEOUT)
    await session.close()
    assert cleaned.is_set()
    assert all(task.done() for task in session._tasks)
