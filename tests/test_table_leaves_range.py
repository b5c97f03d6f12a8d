"""The ranged leaf walk (SecondLevelTables.leaves(lo, hi), which skips tables outside the range)
against the reference: the full walk filtered to the leaves overlapping [lo, hi), over
hypothesis-generated tables of 3 and 4 levels, first-stage tables included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.vtd.page_tables import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    FirstStageTables,
    SecondLevelTables,
    TablePageAllocator,
)

RAM = 0x80_0000
SIZES = (PAGE_4K, PAGE_2M, PAGE_1G)


class Memory:
    def __init__(self) -> None:
        self.data = bytearray(RAM)

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.data[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        self.data[addr : addr + len(data)] = data


# Edits near each other (so ranges cut through tables) and near the top of the widths.
BASES = (0, 1 << 32, (1 << 39) - PAGE_1G, (1 << 48) - PAGE_1G)
edit = st.tuples(
    st.sampled_from(("map", "unmap", "clear")),
    st.sampled_from(BASES),
    st.integers(0, 3),  # which 1 GiB ... 4 KiB slot below the base
    st.integers(0, 3),
    st.sampled_from(SIZES),
    st.integers(1, 3),  # pages of that size
    st.booleans(),
)
bound = st.one_of(
    st.sampled_from(BASES),
    st.integers(0, 1 << 48),
    st.builds(lambda b, o: b + o, st.sampled_from(BASES), st.integers(0, 4 * PAGE_1G)),
)


@settings(max_examples=100, deadline=None)
@given(
    levels=st.sampled_from((3, 4)),
    first_stage=st.booleans(),
    edits=st.lists(edit, max_size=12),
    lo=bound,
    length=st.one_of(st.integers(0, 4 * PAGE_2M), st.integers(0, 1 << 48)),
)
def test_ranged_walk_equals_filtered_full_walk(
    levels: int,
    first_stage: bool,
    edits: list[tuple[str, int, int, int, int, int, bool]],
    lo: int,
    length: int,
) -> None:
    mem = Memory()
    alloc = TablePageAllocator(mem, 0x1000, RAM)
    tables = (
        FirstStageTables(mem, alloc, fs1gp=True)
        if first_stage
        else SecondLevelTables(mem, alloc, levels)
    )
    top = 1 << (12 + 9 * tables.levels)
    for op, base, gig, page, size, count, write in edits:
        iova = (base + gig * PAGE_1G + page * size) % top
        iova -= iova % size
        span = min(count * size, top - iova)
        if size == PAGE_1G and tables.levels < 4:
            continue
        try:
            if op == "map":
                tables.map(iova, 0, span, write=write, page_size=size)
            elif op == "unmap":
                tables.unmap(iova, span, page_size=size)
            else:
                tables.clear_pointer(iova, {PAGE_4K: 2, PAGE_2M: 3, PAGE_1G: 4}[size])
        except ValueError:
            continue  # a leaf in the way, or a size the tables cannot hold: no edit
    hi = lo + length
    full = list(tables.leaves())
    assert list(tables.leaves(lo, hi)) == [
        leaf for leaf in full if leaf.iova < hi and lo < leaf.iova + leaf.size
    ]
    assert list(tables.leaves(0, None)) == full
