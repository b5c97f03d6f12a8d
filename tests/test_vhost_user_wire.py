"""The vhost-user codec: layouts as QEMU's structs have them, round trips, typed errors."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fixtures.vhost_user.errors import VhostUserProtocolError
from fixtures.vhost_user.wire import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MAX_REGIONS,
    U64,
    VERSION,
    VRING_NOFD,
    Access,
    Empty,
    Header,
    IotlbMsg,
    IotlbType,
    MemoryRegion,
    MemoryTable,
    Request,
    VringAddr,
    VringFile,
    VringState,
    decode_reply_u64,
    decode_request,
    encode_ack,
    encode_message,
    encode_reply,
    parse_header,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def request_of(request: int, payload: bytes, flags: int = VERSION) -> Header:
    return Header(request, flags, len(payload))


def test_header_layout_is_request_flags_size() -> None:
    raw = Header(22, VERSION | FLAG_NEED_REPLY, 32).pack()
    assert raw == struct.pack("=III", 22, 0x9, 32)
    assert HEADER_SIZE == 12


def test_sizes_match_qemu_structs() -> None:
    assert len(IotlbMsg(0, 0, 0, 0, 1).encode()) == 32  # struct vhost_iotlb_msg, padded
    assert len(VringAddr(0, 0, 0, 0, 0, 0).encode()) == 40  # struct vhost_vring_addr
    assert len(VringState(0, 0).encode()) == 8
    assert len(MemoryRegion(0, 1, 0, 0).encode()) == 32
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7F00_0000_0000, 0),))
    assert len(table.encode()) == 8 + 32  # QEMU sends nregions, padding, nregions regions


def test_reply_sets_reply_and_clears_need_reply() -> None:
    request = Header(Request.SET_MEM_TABLE, VERSION | FLAG_NEED_REPLY, 40)
    reply = parse_header(encode_ack(request))
    assert reply == Header(Request.SET_MEM_TABLE, VERSION | FLAG_REPLY, 8)
    raw = encode_ack(request, ok=False)
    assert decode_reply_u64(reply, raw[HEADER_SIZE:], Request.SET_MEM_TABLE) == 1


@given(value=u64)
def test_u64_reply_round_trip(value: int) -> None:
    request = Header(Request.GET_FEATURES, VERSION, 0)
    raw = encode_reply(request, U64(value).encode())
    header = parse_header(raw[:HEADER_SIZE])
    assert decode_reply_u64(header, raw[HEADER_SIZE:], Request.GET_FEATURES) == value


@given(index=st.integers(0, 1), num=u32)
def test_vring_state_round_trip(index: int, num: int) -> None:
    for request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE):
        payload = VringState(index, num).encode()
        assert decode_request(request_of(request, payload), payload) == (
            request,
            VringState(index, num),
        )


@given(index=u32, flags=u32, desc=u64, used=u64, avail=u64, log=u64)
def test_vring_addr_round_trip(
    index: int, flags: int, desc: int, used: int, avail: int, log: int
) -> None:
    value = VringAddr(index, flags, desc, used, avail, log)
    payload = value.encode()
    assert decode_request(request_of(Request.SET_VRING_ADDR, payload), payload)[1] == value


@given(
    iova=st.integers(0, 2**63),
    size=st.integers(1, 2**63),
    uaddr=u64,
    perm=st.sampled_from(list(Access)),
    kind=st.sampled_from(list(IotlbType)),
)
def test_iotlb_round_trip(iova: int, size: int, uaddr: int, perm: Access, kind: IotlbType) -> None:
    value = IotlbMsg(iova, size, uaddr, perm, kind)
    payload = value.encode()
    assert decode_request(request_of(Request.IOTLB_MSG, payload), payload)[1] == value


@given(
    regions=st.lists(
        st.tuples(st.integers(1, 2**20), st.integers(0, 2**40), st.integers(0, 2**20)),
        min_size=1,
        max_size=MAX_REGIONS,
    )
)
def test_memory_table_round_trip(regions: list[tuple[int, int, int]]) -> None:
    gpa, built = 0, []
    for pages, uaddr, offset in regions:  # laid out back to back: never overlapping
        built.append(MemoryRegion(gpa, pages << 12, uaddr << 12, offset << 12))
        gpa += (pages + 1) << 12
    table = MemoryTable(tuple(built))
    payload = table.encode()
    header = request_of(Request.SET_MEM_TABLE, payload)
    assert decode_request(header, payload, nfds=len(built)) == (Request.SET_MEM_TABLE, table)
    # Also accepted: the spec struct's full 8-slot size.
    padded = payload + bytes((MAX_REGIONS - len(built)) * 32)
    assert decode_request(request_of(Request.SET_MEM_TABLE, padded), padded, len(built))[1] == (
        table
    )


def test_memory_table_maps_user_addresses_back_to_gpas() -> None:
    table = MemoryTable(
        (MemoryRegion(0, 0xA0000, 0x7000_0000, 0), MemoryRegion(0x100000, 0x1000, 0x9000, 0))
    )
    assert table.uaddr_to_gpa(0x7000_1234) == 0x1234
    assert table.uaddr_to_gpa(0x9FFF) == 0x100FFF
    assert table.uaddr_to_gpa(0xA000) is None
    assert table.uaddr_to_gpa(0x7000_0000 + 0xA0000) is None


@pytest.mark.parametrize(("value", "nfds"), [(0, 1), (1, 1), (VRING_NOFD, 0), (VRING_NOFD | 1, 0)])
def test_vring_file_index_and_nofd(value: int, nfds: int) -> None:
    payload = U64(value).encode()
    _, decoded = decode_request(request_of(Request.SET_VRING_KICK, payload), payload, nfds)
    assert decoded == VringFile(value & 0xFF, bool(value & VRING_NOFD))
    assert decoded.encode() == payload


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x01\x00\x00\x00\x01", "short header"),
        (struct.pack("=III", 1, 0, 0), "version 0"),
        (struct.pack("=III", 1, 2, 0), "version 2"),
        (struct.pack("=III", 1, 3 | FLAG_REPLY, 0), "version 3"),
        (struct.pack("=III", 1, VERSION, MAX_PAYLOAD + 1), "oversized"),
        (struct.pack("=III", 1, VERSION, 0xFFFFFFFF), "size 2^32-1"),
    ],
)
def test_broken_framing_is_fatal(raw: bytes, why: str) -> None:
    with pytest.raises(VhostUserProtocolError) as info:
        parse_header(raw)
    assert info.value.fatal, why


def _table(*regions: tuple[int, int], count: int | None = None) -> bytes:
    n = len(regions) if count is None else count
    return struct.pack("=II", n, 0) + b"".join(
        struct.pack("=QQQQ", gpa, size, 0x7F0000000000 + gpa, 0) for gpa, size in regions
    )


@pytest.mark.parametrize(
    ("request_code", "payload", "nfds", "why"),
    [
        (999, b"", 0, "unknown request"),
        (Request.GET_CONFIG, b"", 0, "not supported"),
        (Request.GET_FEATURES, b"\0" * 8, 0, "payload where none belongs"),
        (Request.SET_FEATURES, b"\0" * 4, 0, "short u64"),
        (Request.SET_VRING_NUM, b"\0" * 12, 0, "long vring state"),
        (Request.SET_VRING_ADDR, b"\0" * 32, 0, "short vring addr"),
        (Request.IOTLB_MSG, b"\0" * 26, 0, "unpadded iotlb"),
        (Request.IOTLB_MSG, IotlbMsg(0, 1, 0, 3, 9).encode(), 0, "iotlb type 9"),
        (Request.IOTLB_MSG, IotlbMsg(0, 1, 0, 4, 3).encode(), 0, "iotlb perm 4"),
        (Request.IOTLB_MSG, IotlbMsg(0, 0, 0, 0, 3).encode(), 0, "empty invalidate"),
        (Request.IOTLB_MSG, IotlbMsg(2**64 - 4096, 8192, 0, 0, 3).encode(), 0, "wraps"),
        (Request.SET_MEM_TABLE, _table((0, 4096)), 0, "regions without fds"),
        (Request.SET_MEM_TABLE, _table((0, 4096)), 2, "more fds than regions"),
        (Request.SET_MEM_TABLE, _table(count=0), 0, "zero regions"),
        (Request.SET_MEM_TABLE, _table((0, 4096), count=9), 9, "nine regions"),
        (Request.SET_MEM_TABLE, _table((0, 4096), (0, 4096)), 2, "overlap"),
        (Request.SET_MEM_TABLE, _table((0, 0)), 1, "empty region"),
        (Request.SET_MEM_TABLE, b"\1\0\0", 1, "no count"),
        (Request.SET_MEM_TABLE, _table((0, 4096)) + b"\0", 1, "odd size"),
        (Request.SET_VRING_KICK, U64(0).encode(), 0, "fd bit clear but no fd"),
        (Request.SET_VRING_CALL, U64(VRING_NOFD).encode(), 1, "nofd with an fd"),
        (Request.SET_VRING_ERR, U64(1 << 9).encode(), 1, "reserved bits"),
        (Request.SET_BACKEND_REQ_FD, b"", 0, "backend channel without fd"),
        (Request.SET_OWNER, b"", 1, "fd where none belongs"),
    ],
)
def test_malformed_request_is_a_message_error(
    request_code: int, payload: bytes, nfds: int, why: str
) -> None:
    with pytest.raises(VhostUserProtocolError) as info:
        decode_request(request_of(request_code, payload), payload, nfds)
    assert not info.value.fatal, why


def test_reply_or_reserved_flags_on_the_request_channel_are_rejected() -> None:
    for flags in (VERSION | FLAG_REPLY, VERSION | 0x10, VERSION | 0x8000_0000):
        with pytest.raises(VhostUserProtocolError):
            decode_request(Header(Request.SET_OWNER, flags, 0), b"")


def test_payload_shorter_than_header_says_is_fatal() -> None:
    with pytest.raises(VhostUserProtocolError) as info:
        decode_request(Header(Request.SET_FEATURES, VERSION, 8), b"\0" * 4)
    assert info.value.fatal


@given(data=st.binary(max_size=300), request=st.integers(0, 50), nfds=st.integers(0, 9))
def test_decoding_arbitrary_payloads_only_raises_typed_errors(
    data: bytes, request: int, nfds: int
) -> None:
    with contextlib.suppress(VhostUserProtocolError):
        decode_request(request_of(request, data), data, nfds)


@given(data=st.binary(min_size=12, max_size=12))
def test_parsing_arbitrary_headers_only_raises_typed_errors(data: bytes) -> None:
    version_ok = data[4] & 3 == VERSION
    size_ok = int.from_bytes(data[8:12], "little") <= MAX_PAYLOAD
    if version_ok and size_ok:
        header = parse_header(data)
        assert header.version == VERSION
        assert header.size <= MAX_PAYLOAD
    else:
        with pytest.raises(VhostUserProtocolError) as info:
            parse_header(data)
        assert info.value.fatal


def test_encode_message_refuses_oversized_payloads() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_message(Request.SET_OWNER, bytes(MAX_PAYLOAD + 1))
    assert Empty.decode(b"") == Empty()
