"""QTestClient.pipeline over a real unix socket, a scripted peer playing QEMU's qtest server
(it answers each line in turn, as qtest_process_inbuf does): answers in order, interrupt lines
between them kept aside, a FAIL raised only after every answer is read (the next command gets
its own answer), and one write for the whole batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fixtures.qemu.errors import QTestError
from fixtures.qemu.qtest import QTestClient

TIMEOUT = 5.0


class Peer:
    """Answers `readl ADDR` with ADDR + 1, `writel ...` with OK, anything else with FAIL; an
    `IRQ raise 3` line precedes the answer to a write to 0x30."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lines: list[str] = []
        self.reads: list[int] = []  # bytes per read of the socket (the batches as they came)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        buf = b""
        while chunk := await self.reader.read(4096):
            self.reads.append(len(chunk))
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                words = line.split()
                if words[0] == "readl":
                    self.writer.write(f"OK {int(words[1], 16) + 1:#x}\n".encode())
                elif words[0] == "writel":
                    if int(words[1], 16) == 0x30:
                        self.writer.write(b"IRQ raise 3\n")
                    self.writer.write(b"OK\n")
                else:
                    self.writer.write(f"FAIL unknown command '{words[0]}'\n".encode())
            await self.writer.drain()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[QTestClient, Peer]]:
    qtest = QTestClient(tmp_path / "qtest.sock")
    await qtest.listen()
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "qtest.sock"))
    await qtest.accept(TIMEOUT)
    peer = Peer(reader, writer)
    yield qtest, peer
    await qtest.close()
    writer.close()
    peer.task.cancel()
    await asyncio.gather(peer.task, return_exceptions=True)


async def test_answers_come_back_in_order_from_one_write(
    client: tuple[QTestClient, Peer],
) -> None:
    qtest, peer = client
    answers = await qtest.pipeline("readl 0x10", "writel 0x20 0x1", "readl 0x40")
    assert answers == ["0x11", "", "0x41"]
    assert peer.lines == ["readl 0x10", "writel 0x20 0x1", "readl 0x40"]
    assert peer.reads == [len("readl 0x10\nwritel 0x20 0x1\nreadl 0x40\n")]


async def test_interrupt_lines_between_answers_are_kept_aside(
    client: tuple[QTestClient, Peer],
) -> None:
    qtest, _ = client
    assert await qtest.writel_readl(0x30, 0x5, 0x50) == 0x51
    assert qtest.irq_lines == ["IRQ raise 3"]


async def test_a_fail_is_raised_after_every_answer_is_read(
    client: tuple[QTestClient, Peer],
) -> None:
    qtest, _ = client
    with pytest.raises(QTestError, match="'bogus 0x1' answered \"FAIL unknown command"):
        await qtest.pipeline("readl 0x10", "bogus 0x1", "readl 0x20")
    assert await qtest.readl(0x60) == 0x61  # the stream is in step: its own answer


async def test_one_command_is_a_pipeline_of_one(client: tuple[QTestClient, Peer]) -> None:
    qtest, _ = client
    assert await qtest.command("readl 0x70") == "0x71"
    assert await qtest.pipeline() == []
