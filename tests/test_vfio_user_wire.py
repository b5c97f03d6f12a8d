"""The vfio-user codec: layouts, round trips, and typed errors for malformed input."""

from __future__ import annotations

import contextlib
import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fixtures.vfio_user.errors import DmaLayoutMismatch, VfioUserProtocolError
from fixtures.vfio_user.wire import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    MAX_MESSAGE_SIZE,
    Command,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    Header,
    IrqInfo,
    IrqSet,
    Payload,
    RegionAccess,
    RegionInfo,
    Version,
    WriteMulti,
    decode_request,
    encode_error_reply,
    encode_message,
    encode_reply,
    parse_header,
)


def header_for(command: int, payload: bytes, flags: int = 0, msg_id: int = 7) -> Header:
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags)


def test_header_layout_is_id_command_size_flags_error() -> None:
    raw = Header(0x1234, 5, 48, FLAG_TYPE_REPLY | FLAG_ERROR, 22).pack()
    assert raw == struct.pack("=HHIII", 0x1234, 5, 48, 0x21, 22)
    assert len(raw) == 16


def test_parse_header_round_trip() -> None:
    header = Header(3, Command.DMA_MAP, 48, FLAG_NO_REPLY)
    parsed = parse_header(header.pack())
    assert parsed == header
    assert parsed.no_reply
    assert not parsed.is_reply


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x01\x00\x02\x00", "short header"),
        (struct.pack("=HHIII", 1, 1, 15, 0, 0), "size < header"),
        (struct.pack("=HHIII", 1, 1, MAX_MESSAGE_SIZE + 1, 0, 0), "oversized"),
        (struct.pack("=HHIII", 1, 1, 16, 0x2, 0), "type 2"),
        (struct.pack("=HHIII", 1, 1, 16, 0xF, 0), "type 15"),
    ],
)
def test_broken_framing_is_fatal(raw: bytes, why: str) -> None:
    with pytest.raises(VfioUserProtocolError) as info:
        parse_header(raw)
    assert info.value.fatal, why


def test_reply_echoes_id_and_command() -> None:
    request = Header(9, Command.REGION_READ, 32)
    reply = parse_header(encode_reply(request, b"abcd"))
    assert (reply.id, reply.command, reply.size) == (9, Command.REGION_READ, 20)
    assert reply.is_reply
    assert not reply.is_error


def test_error_reply_is_bare_header_with_errno() -> None:
    raw = encode_error_reply(Header(4, Command.DMA_MAP, 48), errno.EEXIST)
    assert len(raw) == HEADER_SIZE
    reply = parse_header(raw)
    assert reply.is_reply
    assert reply.is_error
    assert reply.error == errno.EEXIST


@pytest.mark.parametrize(
    ("command", "value"),
    [
        (Command.DMA_MAP, DmaMap(32, 3, 0x100000, 0x200000, 0x1000)),
        (Command.DMA_UNMAP, DmaUnmap(24, 2, 0, 0)),
        (Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0)),
        (Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 7, 0, 0, 0)),
        (Command.DEVICE_GET_IRQ_INFO, IrqInfo(16, 0, 2, 0)),
        (Command.REGION_WRITE, RegionAccess(0x24, 0, 4, b"\x01\0\0\0")),
        (Command.REGION_WRITE_MULTI, WriteMulti((RegionAccess(8, 0, 8, b"12345678"),))),
        (
            Command.DEVICE_SET_IRQS,
            IrqSet(20, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 0, 2, b"\x01\x00"),
        ),
    ],
)
def test_request_round_trip(command: Command, value: Payload) -> None:
    assert value is not None
    payload = value.encode()
    assert decode_request(header_for(command, payload), payload) == value


def test_sizes_match_qemu_structs() -> None:
    assert len(DmaMap(32, 0, 0, 0, 0).encode()) == 32  # VFIOUserDMAMap - header
    assert len(DmaUnmap(24, 0, 0, 0).encode()) == 24
    assert len(RegionInfo(32, 0, 0, 0, 0, 0).encode()) == 32
    assert len(RegionAccess(0, 0, 0).encode()) == 16  # VFIOUserRegionRW - header
    assert WriteMulti.ONE.size == 24  # VFIOUserWROne


def test_version_caps_are_nul_terminated_json() -> None:
    raw = Version(0, 0, {"capabilities": {"max_msg_fds": 16}}).encode()
    assert raw[:4] == b"\0\0\0\0"
    assert raw.endswith(b"}\0")
    assert Version.decode(raw).capabilities == {"capabilities": {"max_msg_fds": 16}}


@pytest.mark.parametrize(
    "tail",
    [b'{"a":1}', b"not json\0", b"[1,2]\0", b"\xff\xfe\0"],
    ids=["no-nul", "text", "list", "utf8"],
)
def test_bad_version_caps(tail: bytes) -> None:
    with pytest.raises(VfioUserProtocolError):
        Version.decode(b"\0\0\0\0" + tail)


def test_dma_access_uses_the_spec_layout() -> None:
    """u64 address, u64 count, data at payload offset 16 (what QEMU 11.1 speaks)."""
    raw = DmaAccess(0x1000, 4, b"wxyz").encode()
    assert raw[:16] == struct.pack("=QQ", 0x1000, 4)
    assert raw[16:] == b"wxyz"
    assert len(DmaAccess(0x1000, 8).encode()) == 16  # a DMA_READ request: 16 + 16 bytes
    assert DmaAccess.decode(raw, with_data=True) == DmaAccess(0x1000, 4, b"wxyz")


def test_dma_access_short_data() -> None:
    with pytest.raises(VfioUserProtocolError):
        DmaAccess.decode(struct.pack("=QQ", 0, 8) + b"abc", with_data=True)


@pytest.mark.parametrize(
    ("command", "payload", "expected_errno"),
    [
        (99, b"", errno.ENOSYS),
        (Command.DIRTY_PAGES, b"", errno.ENOSYS),
        (Command.DMA_MAP, b"\0" * 31, errno.EINVAL),
        (Command.DMA_UNMAP, b"", errno.EINVAL),
        (Command.REGION_WRITE, struct.pack("=QII", 0, 0, 8) + b"abc", errno.EINVAL),
        (Command.REGION_READ, struct.pack("=QII", 0, 0, 1 << 30), errno.E2BIG),
        (Command.REGION_WRITE_MULTI, struct.pack("=Q", 201), errno.EINVAL),
        (Command.REGION_WRITE_MULTI, struct.pack("=Q", 2) + b"\0" * 24, errno.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("=IIIII", 20, 0x3F, 0, 0, 1), errno.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("=IIIII", 20, 0x100 | 0x21, 0, 0, 1), errno.EINVAL),
        (Command.DMA_READ, struct.pack("=QI", 0, 4) + b"\0" * 4, errno.EINVAL),
    ],
)
def test_malformed_requests_raise_typed_errors(
    command: int, payload: bytes, expected_errno: int
) -> None:
    with pytest.raises(VfioUserProtocolError) as info:
        decode_request(header_for(command, payload), payload)
    assert info.value.errno == expected_errno
    assert not info.value.fatal


def test_fds_only_where_the_protocol_carries_them() -> None:
    payload = DeviceInfo(16, 0, 0, 0).encode()
    with pytest.raises(VfioUserProtocolError):
        decode_request(header_for(Command.DEVICE_GET_INFO, payload), payload, nfds=1)
    dma = DmaMap(32, 3, 0, 0, 4096).encode()
    decode_request(header_for(Command.DMA_MAP, dma), dma, nfds=1)
    with pytest.raises(VfioUserProtocolError):
        decode_request(header_for(Command.DMA_MAP, dma), dma, nfds=2)
    irqs = IrqSet(20, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 0, 2).encode()
    decode_request(header_for(Command.DEVICE_SET_IRQS, irqs), irqs, nfds=2)
    with pytest.raises(VfioUserProtocolError):
        decode_request(header_for(Command.DEVICE_SET_IRQS, irqs), irqs, nfds=3)
    none = IrqSet(20, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, 1).encode()
    with pytest.raises(VfioUserProtocolError):
        decode_request(header_for(Command.DEVICE_SET_IRQS, none), none, nfds=1)


def test_payload_length_must_match_header() -> None:
    payload = DeviceInfo(16, 0, 0, 0).encode()
    wrong = Header(1, Command.DEVICE_GET_INFO, HEADER_SIZE + 8)
    with pytest.raises(VfioUserProtocolError) as info:
        decode_request(wrong, payload)
    assert info.value.fatal


def test_encode_message_sets_size() -> None:
    raw = encode_message(5, Command.DMA_READ, b"x" * 16)
    assert parse_header(raw) == Header(5, Command.DMA_READ, 32, 0, 0)


@given(st.binary(max_size=64), st.integers(0, 0xFFFF), st.integers(0, 0x3F))
def test_random_payloads_raise_only_typed_errors(payload: bytes, command: int, flags: int) -> None:
    header = Header(1, command, HEADER_SIZE + len(payload), flags & ~FLAG_TYPE_REPLY)
    with contextlib.suppress(VfioUserProtocolError):
        decode_request(header, payload, nfds=command & 3)


@given(st.binary(min_size=16, max_size=16))
def test_random_headers_raise_only_typed_errors(raw: bytes) -> None:
    size = struct.unpack_from("=I", raw, 4)[0]
    kind = struct.unpack_from("=I", raw, 8)[0] & 0xF
    if HEADER_SIZE <= size <= MAX_MESSAGE_SIZE and kind in (0, 1):
        assert parse_header(raw).size == size
    else:
        with pytest.raises(VfioUserProtocolError) as info:
            parse_header(raw)
        assert info.value.fatal


def test_a_dma_read_reply_with_a_u32_count_is_named_not_diffed() -> None:
    """QEMU 10.2's VFIOUserDMARW: {u64 offset, u32 count, data at 12}, padded to 16 + count."""
    data = bytes(range(1, 33))
    qemu_10_2 = struct.pack("=QI", 0x1000, len(data)) + data + bytes(4)
    with pytest.raises(DmaLayoutMismatch, match=r"u32 count.*hw/vfio-user/protocol.h.*u64 count"):
        DmaAccess.decode_read_reply(qemu_10_2, len(data))
    spec = DmaAccess(0x1000, len(data), data).encode()
    assert DmaAccess.decode_read_reply(spec, len(data)).data == data


def test_a_dma_write_read_with_a_u32_count_is_recognised_in_memory() -> None:
    sent = b"vfio-user DMA to guest RAM\0"
    assert DmaAccess.landed_with_u32_count(bytes(4) + sent[:-4], sent)
    assert not DmaAccess.landed_with_u32_count(sent, sent)
    assert not DmaAccess.landed_with_u32_count(bytes(len(sent)), sent)
