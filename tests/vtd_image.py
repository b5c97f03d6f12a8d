"""VT-d tables built in Python, in a sparse image of guest RAM.

`TableImage` is a memory reader/writer (`read`, `write`, `alloc() -> page GPA`, `pages()` to copy
into real guest RAM). `SecondLevelTables(image, levels)` builds a second-stage tree (`map`,
`unmap`, `.root`); `LegacyTables(image)` / `ScalableTables(image)` build root and context (and
PASID) structures (`attach`, `detach`, `.rtaddr`). Used by the oracle's self-tests (tests/); qtest
cases program the vIOMMU through fixtures/vtd/driver.py, whose writer is independent of this one.
The walker (fixtures.oracle.walk) reads what both write.
"""

from __future__ import annotations

from collections.abc import Iterator

from fixtures.oracle.structures import (
    PAGE_MASK,
    PAGE_SIZE,
    ContextEntry,
    PasidDirEntry,
    PasidEntry,
    Pgtt,
    RootEntry,
    ScalableContextEntry,
    ScalableRootEntry,
    SecondLevelPte,
    TranslationType,
    level_shift,
    level_size,
    pasid_dir_index,
    pasid_table_index,
)


class TableImage:
    """Sparse bytes addressed by GPA; unwritten memory reads as zeros below `limit`."""

    def __init__(self, *, first_page: int = 0x10_0000, limit: int = 1 << 32) -> None:
        self._pages: dict[int, bytearray] = {}
        self._next = first_page
        self.limit = limit

    def read(self, addr: int, size: int) -> bytes:
        if addr < 0 or addr + size > self.limit:
            raise ValueError(f"{addr:#x}+{size:#x} outside the image")
        out = bytearray()
        while size:
            page, off = addr & PAGE_MASK, addr & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            data = self._pages.get(page)
            out += data[off : off + n] if data is not None else bytes(n)
            addr, size = addr + n, size - n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > self.limit:
            raise ValueError(f"{addr:#x}+{len(data):#x} outside the image")
        pos = 0
        while pos < len(data):
            page, off = addr & PAGE_MASK, addr & (PAGE_SIZE - 1)
            n = min(len(data) - pos, PAGE_SIZE - off)
            buf = self._pages.setdefault(page, bytearray(PAGE_SIZE))
            buf[off : off + n] = data[pos : pos + n]
            addr, pos = addr + n, pos + n

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))

    def alloc(self) -> int:
        """A fresh zeroed 4 KiB page."""
        page = self._next
        self._next += PAGE_SIZE
        self._pages[page] = bytearray(PAGE_SIZE)
        return page

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """(gpa, 4 KiB) for every page written, to copy into guest RAM."""
        for gpa in sorted(self._pages):
            yield gpa, bytes(self._pages[gpa])


class SecondLevelTables:
    """A second-stage page-table tree: non-leaf entries are RW, leaves carry the perms."""

    def __init__(self, image: TableImage, levels: int = 4, *, aw_bits: int = 48) -> None:
        self.image = image
        self.levels = levels
        self.aw_bits = aw_bits
        self.root = image.alloc()

    def _slot(self, iova: int, level: int, *, create: bool) -> int | None:
        """Address of the entry for `iova` at `level`, creating tables above it."""
        table = self.root
        for lvl in range(self.levels, level, -1):
            addr = table + 8 * ((iova >> level_shift(lvl)) & 511)
            pte = SecondLevelPte(int.from_bytes(self.image.read(addr, 8), "little"), lvl)
            if pte.present and pte.is_leaf:
                raise ValueError(f"iova {iova:#x} is inside a level-{lvl} leaf")
            if not pte.present:
                if not create:
                    return None
                new = self.image.alloc()
                self.image.write(addr, SecondLevelPte.make(new, lvl).encode())
                table = new
            else:
                table = pte.addr(self.aw_bits)
        return table + 8 * ((iova >> level_shift(level)) & 511)

    def map(
        self,
        iova: int,
        gpa: int,
        size: int,
        *,
        read: bool = True,
        write: bool = True,
        page_size: int = PAGE_SIZE,
    ) -> None:
        level = {level_size(n): n for n in (1, 2, 3)}[page_size]
        if (iova | gpa | size) % page_size:
            raise ValueError("iova, gpa and size must be page_size aligned")
        for off in range(0, size, page_size):
            slot = self._slot(iova + off, level, create=True)
            assert slot is not None
            pte = SecondLevelPte.make(gpa + off, level, read=read, write=write, ps=level > 1)
            self.image.write(slot, pte.encode())

    def set_entry(self, iova: int, level: int, raw: int) -> int:
        """Write a raw entry (edge cases: reserved bits, odd perms); returns its address."""
        slot = self._slot(iova, level, create=True)
        assert slot is not None
        self.image.write_u64(slot, raw)
        return slot

    def unmap(self, iova: int, size: int, *, page_size: int = PAGE_SIZE) -> None:
        """Clear the leaves of that size covering [iova, iova+size)."""
        level = {level_size(n): n for n in (1, 2, 3)}[page_size]
        for off in range(0, size, page_size):
            slot = self._slot(iova + off, level, create=False)
            if slot is not None:
                self.image.write_u64(slot, 0)


class LegacyTables:
    """Legacy root table plus one context table per bus, allocated on demand."""

    def __init__(self, image: TableImage) -> None:
        self.image = image
        self.rtaddr = image.alloc()

    def _context_table(self, bus: int) -> int:
        addr = self.rtaddr + bus * RootEntry.SIZE
        root = RootEntry.decode(self.image.read(addr, RootEntry.SIZE))
        if root.present:
            return root.ctp
        table = self.image.alloc()
        self.image.write(addr, RootEntry.make(table).encode())
        return table

    def attach(
        self,
        bus: int,
        devfn: int,
        *,
        domain_id: int,
        slpt: int = 0,
        levels: int = 4,
        tt: TranslationType = TranslationType.MULTI_LEVEL,
    ) -> int:
        """Point (bus, devfn) at a second-level tree; returns the context entry's address."""
        addr = self._context_table(bus) + devfn * ContextEntry.SIZE
        entry = ContextEntry.make(slpt, domain_id, levels=levels, tt=tt)
        self.image.write(addr, entry.encode())
        return addr

    def detach(self, bus: int, devfn: int) -> None:
        addr = self._context_table(bus) + devfn * ContextEntry.SIZE
        self.image.write(addr, bytes(ContextEntry.SIZE))


class ScalableTables:
    """Scalable-mode root table, context tables, PASID directories and tables."""

    def __init__(self, image: TableImage) -> None:
        self.image = image
        self.rtaddr = image.alloc()

    def _context_table(self, bus: int, devfn: int) -> int:
        addr = self.rtaddr + bus * ScalableRootEntry.SIZE
        root = ScalableRootEntry.decode(self.image.read(addr, ScalableRootEntry.SIZE))
        if root.present(devfn):
            return root.ctp(devfn)
        table = self.image.alloc()
        lower = root.ctp(0) if root.present(0) else None
        upper = root.ctp(128) if root.present(128) else None
        if devfn >= 128:
            upper = table
        else:
            lower = table
        self.image.write(addr, ScalableRootEntry.make(lower, upper).encode())
        return table

    def _pasid_dir(self, bus: int, devfn: int) -> int:
        addr = self._context_table(bus, devfn) + (devfn & 0x7F) * ScalableContextEntry.SIZE
        ce = ScalableContextEntry.decode(self.image.read(addr, ScalableContextEntry.SIZE))
        if ce.present:
            return ce.pasid_dir
        pasid_dir = self.image.alloc()
        self.image.write(addr, ScalableContextEntry.make(pasid_dir).encode())
        return pasid_dir

    def attach(
        self,
        bus: int,
        devfn: int,
        pasid: int = 0,
        *,
        domain_id: int,
        pgtt: Pgtt = Pgtt.SECOND_STAGE,
        slpt: int = 0,
        levels: int = 4,
        flpt: int = 0,
    ) -> int:
        """Install the PASID entry for (bus, devfn, pasid); returns its address."""
        dir_addr = self._pasid_dir(bus, devfn) + pasid_dir_index(pasid) * PasidDirEntry.SIZE
        pde = PasidDirEntry.decode(self.image.read(dir_addr, PasidDirEntry.SIZE))
        if not pde.present:
            pde = PasidDirEntry.make(self.image.alloc())
            self.image.write(dir_addr, pde.encode())
        addr = pde.table + pasid_table_index(pasid) * PasidEntry.SIZE
        entry = PasidEntry.make(pgtt, domain_id, ssptptr=slpt, levels=levels, fsptptr=flpt)
        self.image.write(addr, entry.encode())
        return addr

    def detach(self, bus: int, devfn: int, pasid: int = 0) -> None:
        dir_addr = self._pasid_dir(bus, devfn) + pasid_dir_index(pasid) * PasidDirEntry.SIZE
        pde = PasidDirEntry.decode(self.image.read(dir_addr, PasidDirEntry.SIZE))
        if pde.present:
            addr = pde.table + pasid_table_index(pasid) * PasidEntry.SIZE
            self.image.write(addr, bytes(PasidEntry.SIZE))
