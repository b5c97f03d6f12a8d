"""HostMappingTable follows Linux VFIO type1 (v2) rules and records every verdict."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle.dma_event import DmaOp
from fixtures.vfio_user.host_mapping_table import DmaFault, HostMappingTable

K = 4096


@pytest.fixture
def table() -> HostMappingTable:
    clock = itertools.count()
    return HostMappingTable("dev0", clock=lambda: float(next(clock)))


def rw(table: HostMappingTable, iova: int, size: int, gpa: int | None = None) -> int:
    return table.map(iova, size, offset=iova if gpa is None else gpa, read=True, write=True)


def spans(table: HostMappingTable) -> list[tuple[int, int]]:
    return [(m.iova, m.size) for m in table.mappings()]


def test_map_is_recorded_with_gpa_and_perms(table: HostMappingTable) -> None:
    assert table.map(0x10000, 2 * K, offset=0x7000, read=True, write=False) == 0
    (event,) = table.events
    assert (event.seq, event.op, event.iova, event.size, event.gpa) == (
        0,
        DmaOp.MAP,
        0x10000,
        2 * K,
        0x7000,
    )
    assert (event.read, event.write, event.errno, event.device) == (True, False, 0, "dev0")


@pytest.mark.parametrize(
    ("iova", "size"),
    [(0, 2 * K), (K, K), (2 * K, 4 * K), (3 * K, K), (0, 16 * K)],
    ids=["same-start", "inside", "tail", "last-page", "covering"],
)
def test_overlapping_map_is_eexist(table: HostMappingTable, iova: int, size: int) -> None:
    assert rw(table, K, 3 * K) == 0
    assert rw(table, iova, size) == errno.EEXIST
    assert spans(table) == [(K, 3 * K)]
    assert [e.errno for e in table.violations()] == [errno.EEXIST]


def test_adjacent_maps_are_fine(table: HostMappingTable) -> None:
    assert rw(table, K, K) == 0
    assert rw(table, 0, K) == 0
    assert rw(table, 2 * K, K) == 0
    assert spans(table) == [(0, K), (K, K), (2 * K, K)]
    assert table.violations() == []


@pytest.mark.parametrize(
    ("iova", "size", "read", "write"),
    [
        (0, 0, True, True),
        (1, K, True, True),
        (0, K + 1, True, True),
        (0, K, False, False),
        ((1 << 64) - K, 2 * K, True, True),
    ],
    ids=["empty", "unaligned-iova", "unaligned-size", "no-perm", "wraps"],
)
def test_invalid_map_is_einval(
    table: HostMappingTable, iova: int, size: int, read: bool, write: bool
) -> None:
    assert table.map(iova, size, offset=0, read=read, write=write) == errno.EINVAL
    assert len(table) == 0
    assert table.events[-1].errno == errno.EINVAL


def test_exact_unmap(table: HostMappingTable) -> None:
    rw(table, K, 2 * K)
    err, removed = table.unmap(K, 2 * K)
    assert err == 0
    assert [(m.iova, m.size) for m in removed] == [(K, 2 * K)]
    assert len(table) == 0


@pytest.mark.parametrize(
    ("iova", "size"),
    [(2 * K, K), (K, K), (2 * K, 8 * K), (0, 2 * K)],
    ids=["middle", "head", "tail-and-beyond", "before-and-head"],
)
def test_bisecting_unmap_is_einval(table: HostMappingTable, iova: int, size: int) -> None:
    rw(table, K, 3 * K)
    err, removed = table.unmap(iova, size)
    assert err == errno.EINVAL
    assert removed == []
    assert spans(table) == [(K, 3 * K)]
    assert table.violations()[-1].op is DmaOp.UNMAP


def test_oversized_unmap_removes_everything_inside(table: HostMappingTable) -> None:
    rw(table, K, K)
    rw(table, 4 * K, 2 * K)
    rw(table, 10 * K, K)
    err, removed = table.unmap(0, 8 * K)
    assert err == 0
    assert [(m.iova, m.size) for m in removed] == [(K, K), (4 * K, 2 * K)]
    assert spans(table) == [(10 * K, K)]


def test_empty_unmap_is_accepted(table: HostMappingTable) -> None:
    rw(table, 8 * K, K)
    assert table.unmap(0, 4 * K) == (0, [])
    assert table.violations() == []


def test_unmap_all(table: HostMappingTable) -> None:
    rw(table, 0, K)
    rw(table, 1 << 40, 16 * K)
    err, removed = table.unmap_all()
    assert err == 0
    assert len(removed) == 2
    assert len(table) == 0
    assert table.events[-1].op is DmaOp.UNMAP_ALL
    assert table.unmap_all(0, K)[0] == errno.EINVAL  # type1: ALL wants iova == size == 0


@pytest.mark.parametrize(("iova", "size"), [(0, 0), (1, K), (0, 3)])
def test_invalid_unmap_is_einval(table: HostMappingTable, iova: int, size: int) -> None:
    assert table.unmap(iova, size)[0] == errno.EINVAL


def test_max_mappings_is_enospc() -> None:
    table = HostMappingTable("dev0", max_mappings=2)
    rw(table, 0, K)
    rw(table, K, K)
    assert rw(table, 2 * K, K) == errno.ENOSPC


def test_record_keeps_arrival_order(table: HostMappingTable) -> None:
    rw(table, 0, K)
    rw(table, 0, K)
    table.unmap(0, K)
    assert [(e.seq, e.op, e.errno) for e in table.events] == [
        (0, DmaOp.MAP, 0),
        (1, DmaOp.MAP, errno.EEXIST),
        (2, DmaOp.UNMAP, 0),
    ]
    assert [e.time for e in table.events] == sorted(e.time for e in table.events)


def test_translate_splits_across_mappings(table: HostMappingTable) -> None:
    rw(table, 0, K, gpa=0x50000)
    rw(table, K, K, gpa=0x20000)
    pieces = table.translate(K - 8, 16, write=True)
    assert [(p.iova, p.length, p.offset) for p in pieces] == [
        (K - 8, 8, 0x50000 + K - 8),
        (K, 8, 0x20000),
    ]


def test_translate_faults(table: HostMappingTable) -> None:
    table.map(0, K, offset=0, read=True, write=False)
    table.map(K, K, offset=None, read=True, write=True)
    with pytest.raises(DmaFault) as info:
        table.translate(0, 4, write=True)
    assert info.value.reason == DmaFault.PERMISSION
    with pytest.raises(DmaFault) as info:
        table.translate(K - 2, 4, write=False)
    assert (info.value.reason, info.value.iova) == (DmaFault.NO_BACKING, K)
    with pytest.raises(DmaFault) as info:
        table.translate(5 * K, 1, write=False)
    assert (info.value.reason, info.value.iova) == (DmaFault.UNMAPPED, 5 * K)


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 31), st.integers(1, 8)), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_against_a_page_model(requests: list[tuple[bool, int, int]]) -> None:
    """Page-granular reference: maps never overlap; unmaps never cut a mapping."""
    table = HostMappingTable("dev0")
    owner: dict[int, int] = {}  # page -> start page of the mapping that holds it
    starts: dict[int, int] = {}  # start page -> length in pages
    for is_map, page, npages in requests:
        pages = set(range(page, page + npages))
        if is_map:
            expected = errno.EEXIST if pages & owner.keys() else 0
            assert rw(table, page * K, npages * K) == expected
            if not expected:
                starts[page] = npages
                owner.update((p, page) for p in pages)
        else:
            hit = {owner[p] for p in pages if p in owner}
            cut = any(not set(range(s, s + starts[s])) <= pages for s in hit)
            assert table.unmap(page * K, npages * K)[0] == (errno.EINVAL if cut else 0)
            if not cut:
                for s in hit:
                    for p in range(s, s + starts.pop(s)):
                        del owner[p]
        assert spans(table) == sorted((s * K, n * K) for s, n in starts.items())


def test_map_offset_is_page_aligned_and_zero_without_an_fd(table: HostMappingTable) -> None:
    """The offset is type1's vaddr (page-aligned, else EINVAL); a map that passed no fd must
    say offset 0 (vfio-user spec), whatever else is right about it."""
    assert table.map(0, K, offset=0x123, read=True, write=True) == errno.EINVAL
    assert table.map(0, K, offset=None, read=True, write=False, unmapped_offset=1) == errno.EINVAL
    assert len(table) == 0
    assert table.map(0, K, offset=None, read=True, write=False) == 0
    assert table.map(K, K, offset=0x5000, read=True, write=True) == 0
    assert [e.errno for e in table.events] == [errno.EINVAL, errno.EINVAL, 0, 0]
