"""Stateful fuzzing, legacy and scalable mode: random sequences of map / unmap / remap / split /
merge / invalidate (every scope) / DMAR toggle / attach / hotplug / unplug over 1-3 devices and
2 domains. After every step the rig checks each device's host record against the walk of the
tables in guest RAM and every notifier / type1 rule; an invalidation that changes nothing must
produce no traffic (63b88968f1). A failure shrinks to the step list hypothesis prints (a
replayable program).

Each example gets a fresh QEMU. The machine runs in a worker thread (hypothesis is synchronous);
every step is a coroutine handed to the test's event loop, where QEMU's qtest and QMP sockets
and the vfio-user hosts live.

Known QEMU bugs (each pinned by a strict xfail elsewhere) are not generated: a live 2 MiB leaf
is split the way Linux does it (unmap + flush, then the PTEs + flush), never in place
(test_split_2m_leaf_into_4k_ptes), a translated device is not moved onto 4 KiB pages where its
old domain has a 2 MiB leaf (the same bug through a context switch), and no leaf straddles the
interrupt window
(test_leaf_straddling_interrupt_window_keeps_its_translation).

VIOMMU_FUZZ_KNOWN_BUGS=1 generates both split paths too (to watch the bug found and shrunk).
`--fuzz-examples N` runs N random examples (default: FUZZ_EXAMPLES_CI derandomized ones).
With VIOMMU_FUZZ_STATS=path the case writes {"ops", "seconds", "fuzz_ops_per_s", "examples",
"steps"} there (ci/bench).
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fixtures.oracle.expected_state import Range
from fixtures.qemu.pci_config import Bdf
from fixtures.rig.vtd_rig import DATA_BASE, IOVA, RigFactory, VtdRig
from fixtures.vtd.page_tables import PAGE_2M, PAGE_4K, SecondLevelTables

pytestmark = pytest.mark.qtest

FUZZ_EXAMPLES_CI = 6
STEPS = 25
STEP_TIMEOUT_S = 60.0
IOVA_BASE = IOVA
REGIONS = 3  # 2 MiB IOVA regions per domain: small, so operations collide
GPA_PAGES = 0x2000  # 32 MiB of target pages above DATA_BASE
DOMAINS = (1, 2)


class Scope(enum.Enum):
    """How a table edit (or a no-op) is flushed."""

    PSI = "psi"  # page-selective IOTLB invalidations covering the change
    PSI_REGION = "psi-region"  # one PSI wider than the change: the whole 2 MiB region
    DSI = "dsi"  # domain-selective IOTLB
    GLOBAL = "global"  # global IOTLB
    CC_DOMAIN = "cc-domain"  # domain-selective context cache
    CC_GLOBAL = "cc-global"  # global context cache
    P_IOTLB_PSI = "p-iotlb-psi"  # PASID-based IOTLB page-selective (scalable mode)
    P_IOTLB_PASID = "p-iotlb-pasid"  # PASID-based IOTLB PASID-selective (scalable mode)


# In legacy mode there are no PASID-based descriptors: their legacy counterparts instead.
LEGACY_EQUIVALENT = {Scope.P_IOTLB_PSI: Scope.PSI, Scope.P_IOTLB_PASID: Scope.DSI}
# IOTLB scopes: they sync a changed translation as UNMAP then MAP of it, nothing else, and
# an invalidation of them that changes nothing produces no traffic. A context-cache scope is
# not for flushing page-table edits: QEMU unmaps the whole address space and replays it (the
# state check still runs).
IOTLB_SCOPES = frozenset(
    {
        Scope.PSI,
        Scope.PSI_REGION,
        Scope.DSI,
        Scope.GLOBAL,
        Scope.P_IOTLB_PSI,
        Scope.P_IOTLB_PASID,
    }
)
SCOPES = st.sampled_from(Scope)
# VIOMMU_FUZZ_KNOWN_BUGS=1: also split live leaves in place (finds and shrinks the known bug).
KNOWN_BUGS = os.environ.get("VIOMMU_FUZZ_KNOWN_BUGS") == "1"


@dataclass
class FuzzStats:
    """Verified invalidation operations (an invalidation step whose check passed) and time."""

    ops: int = 0
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0

    def record(self) -> dict[str, float]:
        rate = self.ops / self.seconds if self.seconds else 0.0
        return {
            "ops": self.ops,
            "steps": self.steps,
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            "fuzz_ops_per_s": round(rate, 1),
        }


def region_iova(region: int) -> int:
    return IOVA_BASE + region * PAGE_2M


# One 4 KiB page's translation as the host sees it: the leaf it belongs to and where it goes.
PageState = tuple[int, int, int, bool, bool]  # (leaf iova, leaf size, gpa, read, write)


def pages_of(tables: SecondLevelTables, iova: int, size: int) -> dict[int, PageState]:
    """Every mapped 4 KiB page of [iova, iova+size) in a domain's tables (the driver's own
    record of what it wrote)."""
    out: dict[int, PageState] = {}
    for leaf in tables.leaves():
        lo, hi = max(leaf.iova, iova), min(leaf.iova + leaf.size, iova + size)
        for page in range(lo, hi, PAGE_4K):
            out[page] = (leaf.iova, leaf.size, leaf.gpa + page - leaf.iova, leaf.read, leaf.write)
    return out


def runs(pages: Iterable[int]) -> list[Range]:
    """Sorted 4 KiB pages as (iova, size) runs."""
    out: list[Range] = []
    for page in sorted(pages):
        if out and out[-1][0] + out[-1][1] == page:
            out[-1] = (out[-1][0], out[-1][1] + PAGE_4K)
        else:
            out.append((page, PAGE_4K))
    return out


class VtdStateMachine(RuleBasedStateMachine):
    loop: ClassVar[asyncio.AbstractEventLoop]
    factory: ClassVar[RigFactory]
    stats: ClassVar[FuzzStats]
    serial: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        VtdStateMachine.serial += 1
        self.tag = f"x{VtdStateMachine.serial}"
        self.rig: VtdRig | None = None
        # Per domain and region: None (empty), "2M" (one leaf) or "4K" (a page table).
        self.kind: dict[tuple[int, int], str | None] = {}
        # What each device's context entry points at (by BDF: a re-plugged device inherits it).
        self.context: dict[Bdf, int | str] = {}
        self.dmar = False
        self.cold: list[str] = []
        self.hotplugged: list[str] = []
        self.plugs = 0

    # ---- plumbing ----------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(STEP_TIMEOUT_S)

    @property
    def r(self) -> VtdRig:
        assert self.rig is not None
        return self.rig

    def attached(self) -> list[str]:
        return [n for n, d in self.r.devices.items() if d.present]

    def scope(self, scope: Scope) -> Scope:
        return LEGACY_EQUIVALENT.get(scope, scope) if not self.r.scalable else scope

    async def _flush(self, did: int, iova: int, size: int, scope: Scope) -> None:
        driver = self.r.driver
        match self.scope(scope):
            case Scope.P_IOTLB_PSI:
                await driver.flush_range(driver.domain(did), iova, size)
            case Scope.P_IOTLB_PASID:
                await driver.piotlb_pasid(did, 0)
            case Scope.PSI:
                await driver.iotlb_range(did, iova, size)
            case Scope.PSI_REGION:
                await driver.iotlb_psi(did, iova - (iova - IOVA_BASE) % PAGE_2M, 9)
            case Scope.DSI:
                await driver.iotlb_domain(did)
            case Scope.GLOBAL:
                await driver.iotlb_global()
            case Scope.CC_DOMAIN:
                await driver.cc_domain(did)
            case Scope.CC_GLOBAL:
                await driver.cc_global()
            case other:
                raise ValueError(f"unknown invalidation scope {other!r}")

    def translating(self, did: int) -> list[str]:
        """Present devices whose DMA goes through domain `did`'s tables now."""
        if not self.dmar:
            return []
        return [n for n in self.attached() if self.context.get(self.r.devices[n].bdf) == did]

    def silent_elsewhere(self, scope: Scope) -> bool:
        """An IOTLB invalidation reaches the devices of other domains without traffic (the
        global flush's known whole-space UNMAPs of context-less devices aside)."""
        scope = self.scope(scope)
        return scope in IOTLB_SCOPES and not (scope is Scope.GLOBAL and self._unmaps_contextless())

    async def _change(
        self, label: str, did: int, iova: int, size: int, scope: Scope, edit: Callable[[], None]
    ) -> None:
        """Edit domain `did`'s tables within [iova, iova+size) and flush them with `scope`, in
        the window that says what happened: pages whose translation was replaced or removed
        are a change window for the devices translating through the domain (UNMAP first,
        nothing outside those pages), devices elsewhere stay quiet; an edit that only adds
        pages is an ordinary step (the state check), one that changes nothing a no-op."""
        tables = self.r.driver.domain(did).tables
        before = pages_of(tables, iova, size)
        start = self.r.driver.invalidations
        edit()
        after = pages_of(tables, iova, size)
        changed = [p for p, was in before.items() if after.get(p) != was]
        added = [p for p in after if p not in before]
        devices = self.translating(did)
        others = [n for n in self.attached() if n not in devices]
        quiet = others if self.silent_elsewhere(scope) else []
        title = f"{label} [{self.scope(scope).value}]"
        if changed and devices and self.scope(scope) in IOTLB_SCOPES:
            # A new leaf beside the replaced ones would be MAPped outside the changed pages.
            lonely = {after[p][:2] for p in added} - {after[p][:2] for p in changed if p in after}
            if lonely:
                raise AssertionError(f"{title}: new leaves {lonely} beside replaced ones")
            step = self.r.change_step(
                title,
                runs(changed),
                devices,
                remapped=all(p in after for p in changed),
                quiet=quiet,
            )
        elif not changed and not added and self.silent_elsewhere(scope):
            step = self.r.noop_step(title)
        else:
            step = self.r.step(title)
        async with step:
            await self._flush(did, iova, size, scope)
        self.stats.ops += self.r.driver.invalidations - start
        self.stats.steps += 1

    def change(
        self, label: str, did: int, iova: int, size: int, scope: Scope, edit: Callable[[], None]
    ) -> None:
        self.run(self._change(label, did, iova, size, scope, edit))

    def regions(self, *kinds: str | None) -> list[tuple[int, int]]:
        """(domain, region) pairs whose content is one of `kinds`."""
        return [(d, r) for d in DOMAINS for r in range(REGIONS) if self.kind.get((d, r)) in kinds]

    # ---- set-up ------------------------------------------------------------------------------
    @initialize(
        cold=st.integers(min_value=1, max_value=2),
        domains=st.lists(st.sampled_from(DOMAINS), min_size=2, max_size=2),
        dmar=st.booleans(),
        scalable=st.booleans(),
    )
    def start(self, cold: int, domains: list[int], dmar: bool, scalable: bool) -> None:
        names = tuple(f"{self.tag}d{i}" for i in range(cold))
        self.cold = list(names)
        self.rig = self.run(self.factory(devices=names, ports=1, scalable=scalable))
        self.stats.examples += 1

        async def attach() -> None:
            for name, did in zip(names, domains, strict=False):
                self.context[self.r.devices[name].bdf] = did
                await self.r.driver.attach_and_flush(
                    self.r.devices[name].bdf, self.r.driver.domain(did)
                )
            if dmar:
                await self.r.driver.enable_translation()

        self.run(self._switch("initial attach", attach()))
        self.dmar = dmar
        for did in DOMAINS:
            self.r.driver.domain(did)

    async def _switch(self, label: str, coro: Coroutine[Any, Any, Any]) -> None:
        async with self.r.switch_step(label):
            await coro

    def teardown(self) -> None:
        if self.rig is None:
            return
        rig = self.rig

        async def stop() -> None:
            await rig.machine.shutdown()
            for dev in rig.devices.values():
                await dev.host.stop()

        self.run(stop())

    # ---- table edits, each flushed with a random covering scope -----------------------------
    @precondition(lambda self: self.rig is not None and bool(self.regions(None, "4K")))
    @rule(
        data=st.data(),
        first=st.integers(0, 511),
        count=st.integers(1, 16),
        gpa_page=st.integers(0, GPA_PAGES - 16),
        write=st.booleans(),
        scope=SCOPES,
    )
    def map_pages(
        self, data: st.DataObject, first: int, count: int, gpa_page: int, write: bool, scope: Scope
    ) -> None:
        """Map a run of 4 KiB pages in a region without a 2 MiB leaf: pages already mapped are
        remapped (one step, a change window), the others newly mapped (a second step)."""
        did, region = data.draw(st.sampled_from(self.regions(None, "4K")), label="region")
        count = min(count, 512 - first)
        iova = region_iova(region) + first * PAGE_4K
        size = count * PAGE_4K
        gpa = DATA_BASE + gpa_page * PAGE_4K
        tables = self.r.driver.domain(did).tables
        self.kind[(did, region)] = "4K"
        mapped = list(pages_of(tables, iova, size))
        new = [page for page in range(iova, iova + size, PAGE_4K) if page not in mapped]

        def write_runs(pages: list[int]) -> Callable[[], None]:
            def edit() -> None:
                for start, length in runs(pages):
                    tables.map(start, gpa + start - iova, length, write=write)

            return edit

        label = f"d{did} {iova:#x}+{count}p"
        if mapped:
            self.change(f"remap {label}", did, iova, size, scope, write_runs(mapped))
        if new:
            self.change(f"map {label}", did, iova, size, scope, write_runs(new))

    @precondition(lambda self: self.rig is not None and bool(self.regions("4K")))
    @rule(data=st.data(), first=st.integers(0, 511), count=st.integers(1, 64), scope=SCOPES)
    def unmap_pages(self, data: st.DataObject, first: int, count: int, scope: Scope) -> None:
        did, region = data.draw(st.sampled_from(self.regions("4K")), label="region")
        count = min(count, 512 - first)
        iova = region_iova(region) + first * PAGE_4K
        tables = self.r.driver.domain(did).tables
        self.change(
            f"unmap d{did} {iova:#x}+{count}p",
            did,
            iova,
            count * PAGE_4K,
            scope,
            lambda: tables.unmap(iova, count * PAGE_4K),
        )

    @precondition(lambda self: self.rig is not None)
    @rule(
        did=st.sampled_from(DOMAINS),
        region=st.integers(0, REGIONS - 1),
        gpa_2m=st.integers(0, GPA_PAGES // 512 - 1),
        write=st.booleans(),
        scope=SCOPES,
    )
    def map_2m(self, did: int, region: int, gpa_2m: int, write: bool, scope: Scope) -> None:
        """A 2 MiB leaf: new, retargeting an old leaf, or merging a page table (in place)."""
        iova = region_iova(region)
        dom = self.r.driver.domain(did)
        self.kind[(did, region)] = "2M"
        gpa = DATA_BASE + gpa_2m * PAGE_2M
        self.change(
            f"2M leaf d{did} {iova:#x}",
            did,
            iova,
            PAGE_2M,
            scope,
            lambda: dom.tables.merge(iova, gpa, write=write),
        )

    @precondition(lambda self: self.rig is not None and bool(self.regions("2M", "4K")))
    @rule(data=st.data(), scope=SCOPES)
    def drop_region(self, data: st.DataObject, scope: Scope) -> None:
        """The whole 2 MiB region goes at once (PDE cleared): a leaf or a full page table."""
        did, region = data.draw(st.sampled_from(self.regions("2M", "4K")), label="region")
        iova = region_iova(region)
        tables = self.r.driver.domain(did).tables
        self.kind[(did, region)] = None
        self.change(
            f"drop region d{did} {iova:#x}",
            did,
            iova,
            PAGE_2M,
            scope,
            lambda: tables.clear_pointer(iova, 2),
        )

    @precondition(lambda self: self.rig is not None and bool(self.regions("2M")))
    @rule(data=st.data(), scope=SCOPES)
    def split(self, data: st.DataObject, scope: Scope) -> None:
        """A 2 MiB leaf becomes 512 PTEs with the same translation, Linux-style: unmap + flush,
        then the page table + flush (the in-place split is a known QEMU bug, see module doc)."""
        did, region = data.draw(st.sampled_from(self.regions("2M")), label="region")
        iova = region_iova(region)
        tables = self.r.driver.domain(did).tables
        leaf = next(lf for lf in tables.leaves() if lf.iova == iova)
        self.kind[(did, region)] = "4K"
        if KNOWN_BUGS:
            self.change(
                f"split d{did} {iova:#x} in place",
                did,
                iova,
                PAGE_2M,
                scope,
                lambda: tables.split(iova),
            )
            return
        self.change(
            f"split d{did} {iova:#x}: unmap",
            did,
            iova,
            PAGE_2M,
            scope,
            lambda: tables.clear_pointer(iova, 2),
        )
        self.change(
            f"split d{did} {iova:#x}: PTEs",
            did,
            iova,
            PAGE_2M,
            scope,
            lambda: tables.map(iova, leaf.gpa, PAGE_2M, read=leaf.read, write=leaf.write),
        )

    # ---- pure invalidations ------------------------------------------------------------------
    @precondition(lambda self: self.rig is not None)
    @rule(
        did=st.sampled_from(DOMAINS),
        region=st.integers(0, REGIONS - 1),
        scope=SCOPES,
    )
    def invalidate_unchanged(self, did: int, region: int, scope: Scope) -> None:
        """Nothing changed since the last flush: IOTLB scopes must be silent."""
        start = self.r.driver.invalidations

        async def go() -> None:
            label = f"no-op {self.scope(scope).value} d{did}"
            step = self.r.noop_step(label) if self.silent_elsewhere(scope) else self.r.step(label)
            async with step:
                await self._flush(did, region_iova(region), PAGE_2M, scope)

        self.run(go())
        self.stats.ops += self.r.driver.invalidations - start
        self.stats.steps += 1

    # ---- devices -----------------------------------------------------------------------------
    @precondition(lambda self: self.rig is not None)
    @rule()
    def toggle_dmar(self) -> None:
        async def go() -> None:
            if self.dmar:  # the driver waits for GSTS.TES on every change: no need to read it
                await self.r.driver.disable_translation()
            else:
                await self.r.driver.enable_translation()

        self.run(self._switch("toggle DMAR", go()))
        self.dmar = not self.dmar
        self.stats.steps += 1

    @precondition(lambda self: self.rig is not None and bool(self.attached()))
    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.attached()), label="device")
        bdf = self.r.devices[name].bdf
        targets = [
            t
            for t in (*DOMAINS, "pt", "none")
            if KNOWN_BUGS or not self._moves_onto_smaller_leaf(bdf, t)
        ]
        target_domain = data.draw(st.sampled_from(targets), label="target")
        self.context[bdf] = target_domain

        async def go() -> None:
            driver = self.r.driver
            if target_domain == "none":
                driver.detach(bdf)
                await driver.flush_context(bdf, 1)
            else:
                did = 1 if target_domain == "pt" else int(target_domain)
                await driver.attach_and_flush(
                    bdf, driver.domain(did), pass_through=target_domain == "pt"
                )

        self.run(self._switch(f"{name} -> {target_domain}", go()))
        self.stats.steps += 1

    def _unmaps_contextless(self) -> bool:
        """With DMAR on, a global IOTLB flush makes QEMU unmap the whole address space of every
        device without a present context, mapped or not: known, pinned by
        test_global_iotlb_is_silent_for_a_detached_device; still checked for state and rules."""
        if KNOWN_BUGS or not self.dmar:
            return False
        return any(
            self.context.get(self.r.devices[name].bdf, "none") == "none" for name in self.attached()
        )

    def _moves_onto_smaller_leaf(self, bdf: Bdf, target: int | str) -> bool:
        """A translated device moved to a domain with 4 KiB pages where its old domain has a
        live 2 MiB leaf: the known vtd_page_walk_one split bug again, reached through the
        context switch (test_device_moved_onto_smaller_leaves_of_another_domain)."""
        source = self.context.get(bdf)
        if not isinstance(source, int) or not isinstance(target, int) or source == target:
            return False
        return any(
            self.kind.get((source, r)) == "2M" and self.kind.get((target, r)) == "4K"
            for r in range(REGIONS)
        )

    @precondition(lambda self: self.rig is not None and bool(self.r.free_ports))
    @rule()
    def hotplug(self) -> None:
        self.plugs += 1
        name = f"{self.tag}h{self.plugs}"

        async def go() -> None:
            label = f"hotplug {name}"
            # DMAR off: vfio's listener maps RAM (and may re-split it), not a replay.
            step = self.r.replay_step(label, name) if self.dmar else self.r.switch_step(label)
            async with step:
                await self.r.hotplug(name)

        self.run(go())
        self.hotplugged.append(name)
        self.stats.steps += 1

    @precondition(lambda self: bool(self.hotplugged))
    @rule()
    def unplug(self) -> None:
        name = self.hotplugged.pop()

        async def go() -> None:
            async with self.r.step(f"unplug {name}"):
                await self.r.unplug(name)

        self.run(go())
        self.stats.steps += 1


@pytest.mark.slow
async def test_random_driver_sequences_keep_host_equal_to_tables(
    vtd_rig: RigFactory, request: pytest.FixtureRequest
) -> None:
    examples = request.config.getoption("fuzz_examples") or FUZZ_EXAMPLES_CI
    # The CI-sized run is the same program every time, so a gate's baseline and candidate run
    # identical sequences; --fuzz-examples or --hypothesis-seed explore at random.
    exploring = request.config.getoption("fuzz_examples") or request.config.getoption(
        "hypothesis_seed", None
    )
    stats = FuzzStats()

    class Machine(VtdStateMachine):
        pass

    Machine.loop = asyncio.get_running_loop()
    Machine.factory = staticmethod(vtd_rig)
    Machine.stats = stats
    config = settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not exploring,
    )
    start = time.monotonic()
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: run_state_machine_as_test(Machine, settings=config)
        )
    finally:
        stats.seconds = time.monotonic() - start
        record = stats.record()
        print(f"\nfuzz_ops_per_s: {record['fuzz_ops_per_s']} {json.dumps(record)}")
        if path := os.environ.get("VIOMMU_FUZZ_STATS"):
            await asyncio.to_thread(Path(path).write_text, json.dumps(record) + "\n")
