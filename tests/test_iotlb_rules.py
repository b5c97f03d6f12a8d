"""The invalidation-only notifier rules accept the streams VT-d semantics allow and reject the
ones a QEMU breaking a rule would produce (each rejected stream names the rule)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from fixtures.oracle.iotlb_rules import (
    X86_SECTIONS,
    Consumer,
    Invalidation,
    Leaf,
    NotifierKind,
    Scope,
    Violation,
    check_safety,
    check_translation,
    check_unsolicited_updates,
    check_window,
    crop,
    expected,
)

UNMAP = Consumer(NotifierKind.UNMAP, domain=1, sid=0x100)
DEVTLB = Consumer(NotifierKind.DEVIOTLB_UNMAP, domain=1, sid=0x100)
LOW, HIGH = ((s, e - s) for s, e in X86_SECTIONS)


@dataclass(frozen=True)
class Ev:
    type: str
    iova: int
    size: int
    perm: int = 0
    gpa: int | None = None
    direction: str = "qemu"


def inv(iova: int, size: int) -> Ev:
    return Ev("INVALIDATE", iova, size)


def rules(violations: Iterable[Violation]) -> list[str]:
    return [v.rule for v in violations]


PSI = Invalidation(Scope.PSI, domain=1, addr=0x2000_0000, am=3)
STRADDLE = Invalidation(Scope.PSI, domain=1, addr=0xFE00_0000, am=13)
DEV = Invalidation(Scope.DEV_IOTLB, sid=0x100, addr=0x2000_3000, pages=4)


@pytest.mark.parametrize(
    ("descriptor", "consumer", "events"),
    [
        (PSI, UNMAP, [inv(0x2000_0000, 0x8000)]),
        (STRADDLE, UNMAP, [inv(0xFEF0_0000, 0x110_0000), inv(0xFE00_0000, 0xE0_0000)]),
        (Invalidation(Scope.PSI, domain=2, addr=0x2000_0000), UNMAP, []),
        (Invalidation(Scope.DSI, domain=1), UNMAP, [inv(*HIGH), inv(*LOW)]),
        (Invalidation(Scope.DSI, domain=2), UNMAP, []),
        (Invalidation(Scope.GLOBAL), UNMAP, [inv(*LOW), inv(*HIGH)]),
        (
            Invalidation(Scope.CC_GLOBAL),
            UNMAP,
            [inv(0, 0x8000_0000), inv(0x8000_0000, 0x7EE0_0000), inv(*HIGH), inv(*LOW)],
        ),
        (Invalidation(Scope.CC_DEVICE, sid=0x200), UNMAP, []),
        (DEV, UNMAP, []),
        (DEV, DEVTLB, [inv(0x2000_0000, 0x4000)]),  # ATS size encoding aligns the range
        (Invalidation(Scope.DEV_IOTLB, sid=0x300, addr=0), DEVTLB, []),
        (PSI, DEVTLB, []),
        (Invalidation(Scope.GLOBAL), DEVTLB, []),
        (Invalidation(Scope.CC_GLOBAL), DEVTLB, []),
    ],
    ids=[
        "psi",
        "psi-straddling-window",
        "psi-other-domain",
        "dsi",
        "dsi-other-domain",
        "global",
        "cc-global-in-pieces",
        "cc-other-device",
        "dev-iotlb-to-unmap",
        "dev-iotlb-to-deviotlb",
        "dev-iotlb-other-sid",
        "psi-to-deviotlb",
        "global-to-deviotlb",
        "cc-to-deviotlb",
    ],
)
def test_accepted_streams(descriptor: Invalidation, consumer: Consumer, events: list[Ev]) -> None:
    assert check_window(descriptor, events, consumer) == []


@pytest.mark.parametrize(
    ("descriptor", "consumer", "events", "rule"),
    [
        # A QEMU that delivered regardless of the notifier's flags:
        (DEV, UNMAP, [inv(0x2000_0000, 0x4000)], "unmap_only"),
        (PSI, DEVTLB, [inv(0x2000_0000, 0x8000)], "deviotlb"),
        (Invalidation(Scope.DSI, domain=1), DEVTLB, [inv(*LOW), inv(*HIGH)], "deviotlb"),
        # A QEMU that walked the tables for an UNMAP-only notifier (MAP events):
        (PSI, UNMAP, [inv(0x2000_0000, 0x8000), Ev("UPDATE", 0x2000_0000, 0x1000)], "unmap_only"),
        # Wrong ranges: one page short, uncropped, twice, missing a section.
        (PSI, UNMAP, [inv(0x2000_0000, 0x7000)], "unmap_only"),
        (STRADDLE, UNMAP, [inv(0xFE00_0000, 0x200_0000)], "unmap_only"),
        (PSI, UNMAP, [inv(0x2000_0000, 0x8000)] * 2, "unmap_only"),
        (Invalidation(Scope.GLOBAL), UNMAP, [inv(*LOW)], "unmap_only"),
        (Invalidation(Scope.CC_DOMAIN, domain=1), UNMAP, [inv(*LOW), inv(0, 0x1000)], "unmap_only"),
        (
            Invalidation(Scope.CC_GLOBAL),
            UNMAP,
            [inv(*LOW), inv(0xFEE0_0000, 0x20_0000)],
            "unmap_only",
        ),
        (Invalidation(Scope.PSI, domain=2, addr=0), UNMAP, [inv(0, 0x1000)], "unmap_only"),
        (DEV, DEVTLB, [inv(0x2000_3000, 0x1000)], "deviotlb"),  # S bit ignored
    ],
    ids=[
        "dev-iotlb-to-unmap",
        "psi-to-deviotlb",
        "dsi-to-deviotlb",
        "page-walk-update",
        "psi-short",
        "psi-uncropped",
        "psi-twice",
        "global-one-section",
        "cc-domain-uncovered",
        "cc-global-into-window",
        "psi-other-domain",
        "dev-iotlb-size-ignored",
    ],
)
def test_rejected_streams(
    descriptor: Invalidation, consumer: Consumer, events: list[Ev], rule: str
) -> None:
    found = check_window(descriptor, events, consumer)
    assert found, "the rule did not bite"
    assert set(rules(found)) == {rule}
    assert all(descriptor.describe() in v.describe() for v in found)


def test_expectation_of_a_straddling_psi_is_cropped_per_section() -> None:
    assert sorted(expected(STRADDLE, UNMAP).exact) == [
        (0xFE00_0000, 0xE0_0000),
        (0xFEF0_0000, 0x110_0000),
    ]
    assert crop((0xFEE0_0000, 0x10_0000), X86_SECTIONS) == []  # the window itself


def test_updates_only_answer_misses_or_the_start_up_rings() -> None:
    miss = Ev("MISS", 0x4000_0123, 0, direction="backend")
    answer = Ev("UPDATE", 0x4000_0000, 0x1000, 3, 0x400_0000)
    ring = Ev("UPDATE", 0x10_0000_2000, 0x1000, 3, 0x300_2000)
    assert check_unsolicited_updates([ring, miss, answer], allowed=[0x10_0000_2000]) == []
    restarted = [ring, miss, answer, ring]  # vhost started twice: the used ring fetched twice
    assert check_unsolicited_updates(restarted, allowed=[0x10_0000_2000]) == []
    assert rules(check_unsolicited_updates([ring, answer])) == ["unmap_only"] * 2
    assert rules(check_unsolicited_updates([miss, answer, answer])) == ["unmap_only"]


def test_safety_wants_every_held_translation_invalidated() -> None:
    held = [Ev("UPDATE", 0x4000_0000, 0x20_0000, 3, 0x400_0000)]
    changed = [(0x4001_0000, 0x1000)]
    assert check_safety(held, changed, [inv(0x4000_0000, 0x20_0000)]) == []
    assert check_safety(held, changed, [inv(0x4001_0000, 0x1000)]) == []  # the overlap is enough
    assert check_safety(held, [(0x5000_0000, 0x1000)], []) == []  # not held: nothing to do
    assert rules(check_safety(held, changed, [])) == ["safety"]
    assert rules(check_safety(held, changed, [inv(0x4001_0000, 0x800)])) == ["safety"]
    two = [(0x4000_0000, 0x1000), (0x4010_0000, 0x1000)]
    assert rules(check_safety(held, two, [inv(0x4000_0000, 0x1000)])) == ["safety"]


@pytest.mark.parametrize(
    ("update", "problems"),
    [
        (Ev("UPDATE", 0x4000_1000, 0x1000, 1, 0x400_1000), 0),
        (Ev("UPDATE", 0x4000_1000, 0x1000, 3, 0x400_1000), 1),  # RW for a read-only leaf
        (Ev("UPDATE", 0x4000_1000, 0x1000, 1, 0x400_2000), 1),  # wrong page
        (Ev("UPDATE", 0x4000_0000, 0x2000, 1, 0x400_1000), 1),  # not the leaf's range
        (Ev("UPDATE", 0x4000_1000, 0x1000, 1, None), 1),  # outside the memory table
    ],
)
def test_translation_equals_the_walked_leaf(update: Ev, problems: int) -> None:
    leaf = Leaf(0x4000_1000, 0x1000, 0x400_1000, read=True, write=False)
    found = check_translation(update, leaf)
    assert len(found) == problems, [v.describe() for v in found]
    assert set(rules(found)) <= {"translation"}


def test_translation_for_an_unmapped_iova_is_a_violation() -> None:
    assert rules(check_translation(Ev("UPDATE", 0, 0x1000, 3, 0), None)) == ["translation"]


def test_enum_typed_records_are_read_structurally() -> None:
    import enum

    class Kind(enum.Enum):
        INVALIDATE = 3

    class Way(enum.Enum):
        FROM_QEMU = "qemu"

    @dataclass(frozen=True)
    class Rec:
        type: Kind
        iova: int
        size: int
        perm: int = 0
        gpa: int | None = None
        direction: Way = Way.FROM_QEMU

    assert check_window(PSI, [Rec(Kind.INVALIDATE, 0x2000_0000, 0x8000)], UNMAP) == []
    assert check_window(DEV, [Rec(Kind.INVALIDATE, 0x2000_0000, 0x4000)], UNMAP) != []
