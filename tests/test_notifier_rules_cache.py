"""FindingCache (check_stream resumed where a checked stream and its segments left off)
against the reference: every rule run over the whole stream from scratch (FINDINGS.enabled
False), on random streams and segments of every kind, good and bad, grown, cut back, forked
and repeated, with switch segments reaching back over events already judged."""

from __future__ import annotations

import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.oracle.dma_event import DmaEvent, DmaOp
from fixtures.oracle.notifier_rules import (
    FINDINGS,
    RULES,
    FindingCache,
    NotifierFlag,
    Over,
    Segment,
    StreamContext,
    address_space_switch,
    check_stream,
    in_place_change,
    noop_invalidation,
    pasid_invalidation,
    replay,
)

P = 0x1000
IR = 0xFEE0_0000
PLACES = (0, 1, 2, 3, IR // P - 1, IR // P, (1 << 27) - 1, (1 << 36) - 1)  # pages


def event(seq: int, op: DmaOp, dev: str, page: int, pages: int, err: int, t: float) -> DmaEvent:
    gpa = 0x10_0000 + page * P % 0x1000_0000 if op is DmaOp.MAP else None
    mapped = op is DmaOp.MAP
    return DmaEvent(seq, t, dev, op, page * P, pages * P, gpa, mapped, mapped, err)


ops = st.lists(
    st.tuples(
        st.sampled_from([DmaOp.MAP, DmaOp.MAP, DmaOp.UNMAP, DmaOp.UNMAP_ALL]),
        st.sampled_from(["d0", "d1"]),
        st.sampled_from(PLACES),
        st.integers(1, 3),
        st.sampled_from([0, 0, 0, errno.EEXIST, errno.EINVAL]),
    ),
    max_size=30,
)
segs = st.lists(
    st.tuples(
        st.sampled_from(["replay", "noop", "change", "switch", "pasid"]),
        st.integers(0, 30),  # window start (event index)
        st.integers(0, 8),  # window length
        st.sampled_from([None, "d0", "d1"]),
        st.sampled_from(PLACES),
        st.booleans(),
    ),
    max_size=10,
)
moves = st.lists(
    st.tuples(st.sampled_from(["grow", "cut", "fork", "same"]), st.integers(0, 12)),
    max_size=12,
)


def segment(
    kind: str, events: tuple[DmaEvent, ...], dev: str | None, page: int, flag: bool
) -> Segment:
    if kind == "replay":
        return replay(events, dev)
    if kind == "noop":
        return noop_invalidation(events, dev)
    if kind == "change":
        return in_place_change(events, [(page * P, 2 * P)], dev, remapped=flag)
    if kind == "switch":
        return address_space_switch(events)
    return pasid_invalidation(events, int(flag), {"d0": 0, "d1": 1})


def test_every_rule_says_what_it_folds_over() -> None:
    assert {r.over for r in RULES} <= {Over.EVENTS, Over.SEGMENTS}


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    specs=segs,
    moves=moves,
    aw_bits=st.sampled_from([39, 48]),
    unmap_only=st.booleans(),
)
def test_finding_cache_equals_checking_from_scratch(
    ops: list[tuple[DmaOp, str, int, int, int]],
    specs: list[tuple[str, int, int, str | None, int, bool]],
    moves: list[tuple[str, int]],
    aw_bits: int,
    unmap_only: bool,
) -> None:
    full = tuple(event(i, *o, t=i / 10) for i, o in enumerate(ops))
    other = tuple(event(i, o[0], o[1], o[2] + 1, *o[3:], t=i / 10) for i, o in enumerate(ops))
    made = [segment(k, full[a : a + n], dev, page, f) for k, a, n, dev, page, f in specs]
    flags = {"d1": NotifierFlag.UNMAP} if unmap_only else {}
    cache = FindingCache(size=3)
    length, count = 0, 0
    for move, at in [("grow", 0), *moves, ("grow", len(full))]:
        stream = full[:length]
        if move == "grow":
            length = min(len(full), length + at)
            count = min(len(made), count + at // 2 + 1)
            stream = full[:length]
        elif move == "cut":
            length, count = min(length, at), min(count, at // 2)
            stream = full[:length]
        elif move == "fork":
            cut = min(at, length)
            stream = full[:cut] + other[cut:length]
        segments = tuple(made[:count])
        scratch = StreamContext(stream, aw_bits, segments, flags)
        want = [v for r in RULES for v in r.check(scratch)]
        got = cache.violations(StreamContext(stream, aw_bits, segments, flags))
        assert got == want, (move, at, length, count)
    # check_stream through the shared cache sorts the same list
    FINDINGS.enabled = False
    try:
        want_sorted = check_stream(stream, aw_bits=aw_bits, segments=segments, notifier_flags=flags)
    finally:
        FINDINGS.enabled = True
    assert check_stream(stream, aw_bits=aw_bits, segments=segments, notifier_flags=flags) == (
        want_sorted
    )


def test_switch_segment_over_an_event_already_judged_is_rechecked() -> None:
    """An UNMAP touching the interrupt window is a notifier_range finding until a switch
    segment added later covers it (vfio's listener traffic): the cache must not keep it."""
    cache = FindingCache()
    bad = event(0, DmaOp.UNMAP, "d0", IR // P - 1, 2, 0, 0.0)
    later = event(1, DmaOp.MAP, "d0", 5, 1, 0, 0.1)
    first = cache.violations(StreamContext((bad,), 48, (), {}))
    assert [v.rule for v in first] == ["notifier_range"]
    segments = (address_space_switch([bad]),)
    assert cache.violations(StreamContext((bad, later), 48, segments, {})) == []


def test_a_new_device_in_the_stream_rechecks_segments() -> None:
    """A change segment naming no device concerns every device of the stream: one that was
    empty when it was first checked has none, then one."""
    cache = FindingCache()
    segments = (in_place_change([], [(0, P)]),)
    assert cache.violations(StreamContext((), 48, segments, {})) == []
    mapped = event(0, DmaOp.MAP, "d0", 9, 1, 0, 0.0)
    got = cache.violations(StreamContext((mapped,), 48, segments, {}))
    assert [v.rule for v in got] == ["changed_translation_unmap_first"]
