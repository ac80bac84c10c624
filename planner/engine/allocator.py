"""PyTorch's CUDA caching allocator (torch 2.11-2.13, native backend), simulated in pure Python.

Every rule below is the C++ of c10/cuda/CUDACachingAllocator.cpp (`DeviceCachingAllocator`),
function by function; ../shared/notes/allocator.md summarises them. Sizes are bytes.

- `round_size`: a request below 512 B becomes 512 B (kMinBlockSize); larger ones round up to a
  multiple of 512, or, with `roundup_power2_divisions`, to the next of `d` equal steps between two
  powers of two (`roundup_power2_next_division`).
- `get_pool`: requests up to 1 MiB (kSmallSize) use the small pool, larger ones the large pool.
- `get_allocation_size` (segment size on a miss): <= 1 MiB -> 2 MiB (kSmallBuffer); < 10 MiB
  (kMinLargeAlloc) -> 20 MiB (kLargeBuffer); larger -> rounded up to 2 MiB (kRoundLarge).
- `get_free_block`: best fit over the pool's free blocks ordered by (stream, size, address), same
  stream only; with `max_split_size` a request below it never takes a block at or above it, and a
  request at or above it takes a block only if less than `max_non_split_rounding` larger.
- `should_split`: small pool (or expandable segments): split if the remainder is >= 512 B; large
  pool: only if the request is below `max_split_size` and the remainder is > 1 MiB. An unsplit
  block's slack counts as allocated (`allocated_bytes += block->size`).
- `free_block`: merge with the free neighbours of the same segment (same mapped state); never
  across segments.
- `malloc` on a miss: garbage collection (only with a memory fraction and a threshold), then
  cudaMalloc; on failure `release_available_cached_blocks` (only with `max_split_size`: oversize
  cached blocks, largest first) and retry; then `release_cached_blocks` (every wholly free
  segment; with expandable segments every free page) and retry (`num_alloc_retries`); then OOM.
- Expandable segments (`expandable_segments:True`): one address range per (stream, pool), mapped in
  pages of 2 MiB (small pool) or 20 MiB (large pool); `try_allocate_expandable_block` maps the
  pages a request needs after the last free block; `release_cached_blocks` unmaps wholly free
  pages.

The simulated card has `capacity_bytes` for the allocator (None: unlimited); cudaMalloc (or a page
map) fails when reserved would pass it. Addresses are virtual: segments are laid out in order, so
ties between equal free blocks go to the older segment, as cudaMalloc's rising addresses usually do.
"""

from __future__ import annotations

import functools
import gc
import math
from bisect import bisect_left, insort
from dataclasses import dataclass, field, replace as dataclass_replace

from pydantic import BaseModel, Field

from planner.engine.alloc_conf import AllocatorConfig, ROUNDUP_INTERVALS

KMIN_BLOCK = 512  # kMinBlockSize
KSMALL_SIZE = 1 << 20  # kSmallSize: largest "small" request
KSMALL_BUFFER = 2 << 20  # kSmallBuffer: small-pool segment, and its expandable page
KLARGE_BUFFER = 20 << 20  # kLargeBuffer: segment for 1-10 MiB requests, and the large expandable page
KMIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
KROUND_LARGE = 2 << 20  # kRoundLarge
SIZE_MAX = (1 << 64) - 1
SMALL, LARGE = 0, 1


class OutOfMemory(Exception):
    """What CUDA's 'CUDA out of memory' would be: the request that failed after every retry."""

    def __init__(self, size: int, allocated: int, reserved: int, capacity: int | None, segment: int = 0) -> None:
        self.size, self.allocated, self.reserved, self.capacity = size, allocated, reserved, capacity
        # the capacity that would have let this cudaMalloc through, everything before unchanged
        self.needed = reserved + segment
        super().__init__(
            f"out of memory: tried to allocate {size} bytes with {allocated} allocated and {reserved} reserved"
            f" of {capacity} bytes"
        )


class Block:
    __slots__ = ("stream", "size", "addr", "pool", "allocated", "prev", "next", "mapped", "segment",
                 "requested", "gc_base")

    def __init__(self, stream: int, size: int, addr: int, pool: int, segment: "Segment") -> None:
        self.stream, self.size, self.addr, self.pool, self.segment = stream, size, addr, pool, segment
        self.allocated = False
        self.prev: Block | None = None
        self.next: Block | None = None
        self.mapped = True
        self.requested = 0
        self.gc_base = 0

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def key(self) -> tuple[int, int, int]:
        return (self.stream, self.size, self.addr)


@dataclass(eq=False)
class Segment:
    """One cudaMalloc (or, expandable, one reserved address range with pages mapped on demand)."""

    stream: int
    pool: int
    addr: int
    size: int
    expandable: bool = False
    page: int = 0


@dataclass
class Stats:
    allocated: int = 0
    reserved: int = 0
    requested: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    num_alloc_retries: int = 0
    num_ooms: int = 0
    segments_allocated: int = 0
    segments_released: int = 0
    max_reserved: int = 0  # over the whole run (not reset by reset_peak)


class _Pool:
    """A BlockPool: free mapped blocks ordered by (stream, size, address); unmapped ones by address."""

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.keys: list[tuple[int, int, int]] = []
        self.blocks: dict[tuple[int, int, int], Block] = {}
        self.unmapped: list[tuple[int, int]] = []  # (stream, addr)
        self.unmapped_blocks: dict[tuple[int, int], Block] = {}
        self.get_free_calls = 0

    def insert(self, b: Block) -> None:
        k = b.key()
        insort(self.keys, k)
        self.blocks[k] = b
        b.gc_base = self.get_free_calls

    def erase(self, b: Block) -> None:
        k = b.key()
        i = bisect_left(self.keys, k)
        del self.keys[i]
        del self.blocks[k]

    def insert_unmapped(self, b: Block) -> None:
        k = (b.stream, b.addr)
        insort(self.unmapped, k)
        self.unmapped_blocks[k] = b

    def erase_unmapped(self, b: Block) -> None:
        k = (b.stream, b.addr)
        del self.unmapped[bisect_left(self.unmapped, k)]
        del self.unmapped_blocks[k]


def _floor_pow2(v: int) -> int:
    return 1 << (v.bit_length() - 1)


class CachingAllocator:
    """One device's caching allocator. `malloc` returns a handle; `free` takes it back."""

    def __init__(
        self,
        config: AllocatorConfig | None = None,
        capacity_bytes: int | None = None,
        memory_fraction: float | None = None,
        total_memory_bytes: int | None = None,
    ) -> None:
        self.config = config or AllocatorConfig()
        if self.config.backend != "native":
            from planner.errors import PlanError

            raise PlanError(
                "alloc-conf backend: only the native caching allocator is simulated (cudaMallocAsync hands"
                " pooling to the CUDA driver, whose policy is not published)"
            )
        c = self.config
        self.max_split = SIZE_MAX if c.max_split_size_bytes is None else c.max_split_size_bytes
        self.max_non_split_rounding = c.max_non_split_rounding_bytes
        self.divisions = c.roundup_power2_divisions
        self.expandable = c.expandable_segments
        self.capacity = capacity_bytes
        # set_per_process_memory_fraction: a limit of its own, and what enables garbage collection
        self.total_memory = total_memory_bytes if total_memory_bytes is not None else capacity_bytes
        self.allowed: int | None = None
        if memory_fraction is not None:
            if self.total_memory is None:
                raise ValueError("memory_fraction needs the card's total memory")
            self.allowed = int(memory_fraction * self.total_memory)
        self.gc_threshold = c.garbage_collection_threshold
        self.pools = (_Pool(SMALL), _Pool(LARGE))
        self.live: dict[int, Block] = {}
        self.stats = Stats()
        self._next_addr = 1 << 32
        self._next_handle = 0
        self._expandable: dict[tuple[int, int], list[Segment]] = {}

    # ---- sizes --------------------------------------------------------------------------
    def round_size(self, size: int) -> int:
        if size < KMIN_BLOCK:
            return KMIN_BLOCK
        log_size = size.bit_length() - 1
        index = min(max(log_size - 20, 0), ROUNDUP_INTERVALS - 1)
        div = self.divisions[index]
        if div > 1 and size > KMIN_BLOCK * div:
            return self._roundup_power2_next_division(size, div)
        return -(-size // KMIN_BLOCK) * KMIN_BLOCK

    @staticmethod
    def _roundup_power2_next_division(size: int, divisions: int) -> int:
        if size & (size - 1) == 0:
            return size
        floor = _floor_pow2(size)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        low = size & ~(step - 1)
        return size if low == size else low + step

    @staticmethod
    def allocation_size(size: int) -> int:
        if size <= KSMALL_SIZE:
            return KSMALL_BUFFER
        if size < KMIN_LARGE_ALLOC:
            return KLARGE_BUFFER
        return -(-size // KROUND_LARGE) * KROUND_LARGE

    # ---- stats --------------------------------------------------------------------------
    def _reserve(self, n: int) -> None:
        s = self.stats
        s.reserved += n
        if s.reserved > s.peak_reserved:
            s.peak_reserved = s.reserved
        if s.reserved > s.max_reserved:
            s.max_reserved = s.reserved

    def reset_peak(self) -> None:
        """torch.cuda.reset_peak_memory_stats(): peaks restart from the current figures."""
        self.stats.peak_allocated = self.stats.allocated
        self.stats.peak_reserved = self.stats.reserved

    # ---- malloc / free ------------------------------------------------------------------
    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """Allocate; returns a handle. Raises OutOfMemory when every retry failed."""
        size = self.round_size(nbytes)
        pool = self.pools[SMALL if size <= KSMALL_SIZE else LARGE]
        alloc_size = self.allocation_size(size)
        block = self._get_free_block(pool, stream, size)
        if block is None:
            if self.allowed is not None and self.gc_threshold > 0.0:
                self._garbage_collect()
            block = self._alloc_block(pool, stream, size, alloc_size)
            if block is None and self._release_available_cached_blocks(pool, stream, size):
                block = self._alloc_block(pool, stream, size, alloc_size)
            if block is None and self._release_cached_blocks():
                self.stats.num_alloc_retries += 1
                block = self._alloc_block(pool, stream, size, alloc_size)
            if block is None:
                self.stats.num_ooms += 1
                raise OutOfMemory(size, self.stats.allocated, self.stats.reserved, self.capacity, alloc_size)
        block = self._alloc_found_block(block, pool, size, nbytes)
        h = self._next_handle
        self._next_handle += 1
        self.live[h] = block
        return h

    def free(self, handle: int) -> None:
        block = self.live.pop(handle)
        s = self.stats
        s.allocated -= block.size
        s.requested -= block.requested
        block.allocated = False
        pool = self.pools[block.pool]
        for cand in (block.prev, block.next):
            self._try_merge(block, cand, pool)
        pool.insert(block)

    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool == SMALL or self.expandable:
            return remaining >= KMIN_BLOCK
        return size < self.max_split and remaining > KSMALL_SIZE

    def _alloc_found_block(self, block: Block, pool: _Pool, size: int, nbytes: int) -> Block:
        if self._should_split(block, size):
            remaining = block
            block = Block(remaining.stream, size, remaining.addr, remaining.pool, remaining.segment)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.addr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated = True
        block.requested = nbytes
        s = self.stats
        s.allocated += block.size
        s.requested += nbytes
        if s.allocated > s.peak_allocated:
            s.peak_allocated = s.allocated
        return block

    def _try_merge(self, dst: Block, src: Block | None, pool: _Pool) -> int:
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src is dst.prev:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        size = src.size
        dst.size += size
        if src.mapped:
            pool.erase(src)
        else:
            pool.erase_unmapped(src)
        return size

    def _get_free_block(self, pool: _Pool, stream: int, size: int) -> Block | None:
        if self.allowed is not None and self.gc_threshold > 0.0:
            pool.get_free_calls += 1
        keys = pool.keys
        i = bisect_left(keys, (stream, size, 0))
        if i == len(keys) or keys[i][0] != stream:
            return None
        b = pool.blocks[keys[i]]
        if b.segment.expandable:
            if self.expandable:
                def expandable_size(x: Block) -> int:
                    return x.size + (x.next.size if x.next is not None and not x.next.mapped else 0)

                j = i + 1
                while (b.segment.expandable and j < len(keys) and keys[j][0] == stream
                       and expandable_size(pool.blocks[keys[j]]) < expandable_size(b)):
                    i, j = j, j + 1
                    b = pool.blocks[keys[i]]
            else:  # expandable segments turned off since: skip their blocks
                while b.segment.expandable:
                    i += 1
                    if i == len(keys) or keys[i][0] != stream:
                        return None
                    b = pool.blocks[keys[i]]
        if size < self.max_split and b.size >= self.max_split:
            return None
        if size >= self.max_split and b.size >= size + self.max_non_split_rounding:
            return None
        pool.erase(b)
        return b

    # ---- segments -----------------------------------------------------------------------
    def _fits(self, n: int) -> bool:
        """Would the driver give `n` more bytes? (The memory fraction is checked once, in
        `_alloc_block`, against the segment size, as alloc_block does.)"""
        return self.capacity is None or self.stats.reserved + n <= self.capacity

    def _alloc_block(self, pool: _Pool, stream: int, size: int, alloc_size: int) -> Block | None:
        if self.allowed is not None and self.stats.reserved + alloc_size > self.allowed:
            return None
        if self.expandable:
            return self._try_allocate_expandable_block(pool, stream, size)
        if not self._fits(alloc_size):
            return None
        seg = Segment(stream, pool.kind, self._next_addr, alloc_size)
        self._next_addr += alloc_size + KROUND_LARGE  # a gap: blocks of two segments never touch
        self._reserve(alloc_size)
        self.stats.segments_allocated += 1
        return Block(stream, alloc_size, seg.addr, pool.kind, seg)

    def _release_block(self, b: Block, pool: _Pool) -> None:
        """cudaFree of a wholly free, unsplit, non-expandable block (it is in the pool)."""
        pool.erase(b)
        self.stats.reserved -= b.size
        self.stats.segments_released += 1

    def _release_available_cached_blocks(self, pool: _Pool, stream: int, size: int) -> bool:
        if self.max_split == SIZE_MAX:
            return False
        key_size = max(size, self.max_split)
        keys = pool.keys
        i = bisect_left(keys, (stream, key_size, 0))
        if i == len(keys) or keys[i][0] != stream or pool.blocks[keys[i]].segment.expandable:
            if i == 0:
                return False
            released = 0
            i -= 1
            while released < key_size:
                b = pool.blocks[keys[i]]
                if b.size < self.max_split or b.stream != stream:
                    break
                first = i == 0
                if not b.segment.expandable:
                    released += b.size
                    self._release_block(b, pool)
                if first:
                    break
                i -= 1
            return released >= key_size
        self._release_block(pool.blocks[keys[i]], pool)
        return True

    def _release_cached_blocks(self) -> bool:
        """release_cached_blocks (also torch.cuda.empty_cache): large pool, then small."""
        for pool in (self.pools[LARGE], self.pools[SMALL]):
            to_unmap = []
            for k in list(pool.keys):
                b = pool.blocks[k]
                if b.segment.expandable:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    self._release_block(b, pool)
            for b in to_unmap:
                self._unmap_block(b, pool)
                if b.prev is None and b.next is None:
                    self._release_expandable_segment(b, pool)
        return True

    def empty_cache(self) -> None:
        self._release_cached_blocks()

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: free old unsplit large blocks until reserved is below
        threshold x allowed (only when a memory fraction is set, as in the C++)."""
        assert self.allowed is not None
        threshold = int(self.gc_threshold * self.allowed)
        if self.stats.reserved <= threshold:
            return
        target = self.stats.reserved - threshold
        pool = self.pools[LARGE]
        ages = [pool.get_free_calls - b.gc_base for b in pool.blocks.values() if not b.is_split]
        total_age, count = sum(ages), len(ages)
        if count == 0:
            return
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            threshold_age = total_age / count
            freed = False
            for k in list(pool.keys):
                b = pool.blocks[k]
                age = pool.get_free_calls - b.gc_base
                if not b.is_split and not b.segment.expandable and age >= threshold_age:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b, pool)

    # ---- expandable segments ------------------------------------------------------------
    def _address_space(self) -> int:
        # prop.totalGlobalMem / 8 * 9; an unlimited card gets 64 TiB of address space
        total = self.total_memory if self.total_memory is not None else 1 << 46
        return total // 8 * 9

    def _find_expandable_block(self, pool: _Pool, stream: int, size: int) -> Block:
        def allocatable(b: Block | None) -> bool:
            return b is not None and not b.allocated

        def has_space(b: Block | None) -> bool:
            n = 0
            while n < size and allocatable(b):
                n += b.size  # type: ignore[union-attr]
                b = b.next  # type: ignore[union-attr]
            return n >= size

        i = bisect_left(pool.unmapped, (stream, 0))
        while i < len(pool.unmapped) and pool.unmapped[i][0] == stream:
            c = pool.unmapped_blocks[pool.unmapped[i]]
            if allocatable(c.prev):
                c = c.prev  # type: ignore[assignment]
            if has_space(c):
                return c
            i += 1
        page = KSMALL_BUFFER if pool.kind == SMALL else KLARGE_BUFFER
        space = self._address_space() // page * page
        seg = Segment(stream, pool.kind, self._next_addr, space, expandable=True, page=page)
        self._next_addr += space + page
        self._expandable.setdefault((stream, pool.kind), []).append(seg)
        cand = Block(stream, space, seg.addr, pool.kind, seg)
        cand.mapped = False
        pool.insert_unmapped(cand)
        return cand

    def _map_block(self, b: Block, size: int, pool: _Pool) -> bool:
        page = b.segment.page
        mapped = -(-size // page) * page
        if not self._fits(mapped):
            return False
        pool.erase_unmapped(b)
        b.mapped = True
        if mapped < b.size:
            rest = Block(b.stream, b.size - mapped, b.addr + mapped, b.pool, b.segment)
            rest.mapped = False
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            pool.insert_unmapped(rest)
            b.size = mapped
        self._try_merge(b, b.prev, pool)
        self._try_merge(b, b.next, pool)
        pool.insert(b)
        self._reserve(mapped)
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, stream: int, size: int) -> Block | None:
        c = self._find_expandable_block(pool, stream, size)
        if not c.mapped and not self._map_block(c, min(c.size, size), pool):
            return None
        while c.size < size:
            nxt = c.next
            assert nxt is not None and not nxt.mapped
            if not self._map_block(nxt, min(size - c.size, nxt.size), pool):
                return None
            c = nxt  # map_block merged it with the free block before: that block is now `nxt`
        pool.erase(c)
        return c

    def _unmap_block(self, b: Block, pool: _Pool) -> None:
        page = b.segment.page
        base = b.segment.addr
        begin = base + -(-(b.addr - base) // page) * page
        end = base + (b.addr + b.size - base) // page * page
        if begin >= end:
            return
        pool.erase(b)
        before = begin - b.addr
        if before > 0:
            f = Block(b.stream, before, b.addr, b.pool, b.segment)
            f.prev, f.next = b.prev, b
            if b.prev is not None:
                b.prev.next = f
            b.prev = f
            pool.insert(f)
        after = b.addr + b.size - end
        if after > 0:
            f = Block(b.stream, after, end, b.pool, b.segment)
            f.prev, f.next = b, b.next
            if b.next is not None:
                b.next.prev = f
            b.next = f
            pool.insert(f)
        b.addr, b.size, b.mapped = begin, end - begin, False
        self._try_merge(b, b.prev, pool)
        self._try_merge(b, b.next, pool)
        pool.insert_unmapped(b)
        self.stats.reserved -= end - begin

    def _release_expandable_segment(self, b: Block, pool: _Pool) -> None:
        pool.erase_unmapped(b)
        segs = self._expandable.get((b.stream, pool.kind), [])
        if b.segment in segs:
            segs.remove(b.segment)


# ---- traces -------------------------------------------------------------------------------
# A trace is a list of events in program order:
#   ("a", id, nbytes, stream)  allocate; ("f", id) free; ("reset",) reset_peak_memory_stats;
#   ("empty_cache",); ("phase", name) a marker (e.g. "step0.forward").


@dataclass
class ReplayResult:
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    reserved_end_bytes: int
    allocated_end_bytes: int
    num_alloc_retries: int
    num_ooms: int
    oom: OutOfMemory | None = None
    oom_event: int | None = None
    phase_peak_reserved: dict[str, int] = field(default_factory=dict)
    segments_allocated: int = 0
    # the most the allocator held at any moment of the run, set-up included (not reset by "reset")
    max_reserved_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.oom is None


class CodedTrace:
    """A trace as parallel lists, for the fast replay: `ops` (ALLOC, FREE, PHASE, RESET, EMPTY_CACHE),
    `args` (an allocation's or free's handle: small integers; a phase's index into `names`), `szi` (an
    allocation's index into `sizes`). The engine's symbolic trace evaluates to one by filling `sizes`
    alone (planner.engine.steptrace.SymbolicTrace.coded). Single stream only."""

    __slots__ = ("ops", "args", "szi", "sizes", "names", "handles")

    def __init__(self, ops: list[int], args: list[int], szi: list[int], sizes: list[int], names: list[str],
                 handles: int) -> None:
        self.ops, self.args, self.szi, self.sizes, self.names, self.handles = ops, args, szi, sizes, names, handles

    def __len__(self) -> int:
        return len(self.ops)

    def with_sizes(self, sizes: list[int]) -> "CodedTrace":
        return CodedTrace(self.ops, self.args, self.szi, sizes, self.names, self.handles)

    @classmethod
    def from_events(cls, trace: list[tuple]) -> "CodedTrace | None":
        """The tuple trace coded; None when it uses another stream than 0 (the general replay runs it)."""
        ops: list[int] = []
        args: list[int] = []
        szi: list[int] = []
        handles: dict[int, int] = {}
        sizes: dict[int, int] = {}
        names: dict[str, int] = {}
        for ev in trace:
            op = ev[0]
            if op == "a":
                if ev[3] != 0:
                    return None
                h = handles.setdefault(ev[1], len(handles))
                ops.append(ALLOC)
                args.append(h)
                szi.append(sizes.setdefault(ev[2], len(sizes)))
            elif op == "f":
                h = handles.get(ev[1])
                ops.append(FREE)
                args.append(-1 if h is None else h)
                szi.append(-1)
            elif op == "phase":
                ops.append(PHASE)
                args.append(names.setdefault(ev[1], len(names)))
                szi.append(-1)
            elif op == "reset":
                ops.append(RESET)
                args.append(0)
                szi.append(-1)
            elif op == "empty_cache":
                ops.append(EMPTY_CACHE)
                args.append(0)
                szi.append(-1)
            else:
                raise ValueError(f"allocation trace: unknown event {ev!r}")
        return cls(ops, args, szi, list(sizes), list(names), len(handles))


ALLOC, FREE, PHASE, RESET, EMPTY_CACHE = 0, 1, 2, 3, 4


def _gc_paused(fn):
    """A replay makes and drops tens of thousands of linked blocks (prev/next cycles), and a bisection
    copies them: the cyclic collector's passes over them cost about as much as the replay itself
    (measured: the smallest card of an 8B training trace, 300 ms -> 200 ms without them). The
    collector is paused for the call; the cycles left are its next pass's."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused


@_gc_paused
def replay(
    trace: "list[tuple] | CodedTrace",
    config: AllocatorConfig | None = None,
    capacity_bytes: int | None = None,
    memory_fraction: float | None = None,
    total_memory_bytes: int | None = None,
) -> ReplayResult:
    """Run a trace through the allocator; stops at the first allocation that fails. Settings without
    expandable segments or a memory fraction take the fast path (`_replay_fast`, the same rules)."""
    config = config or AllocatorConfig()
    if memory_fraction is None and not config.expandable_segments and config.backend == "native":
        coded = trace if isinstance(trace, CodedTrace) else CodedTrace.from_events(trace)
        if coded is not None:
            return _replay_fast(coded, config, capacity_bytes)
    return replay_general(_decode(trace) if isinstance(trace, CodedTrace) else trace, config, capacity_bytes,
                          memory_fraction, total_memory_bytes)


def replay_general(trace: list[tuple], config: AllocatorConfig | None = None, capacity_bytes: int | None = None,
                   memory_fraction: float | None = None, total_memory_bytes: int | None = None) -> ReplayResult:
    """`replay` through `CachingAllocator` itself (every setting, any stream)."""
    a = CachingAllocator(config, capacity_bytes, memory_fraction, total_memory_bytes)
    handles: dict[int, int] = {}
    phase = "setup"
    phase_peaks: dict[str, int] = {}
    oom = None
    at = None
    s = a.stats
    malloc, free = a.malloc, a.free
    for n, ev in enumerate(trace):
        op = ev[0]
        if op == "a":
            if ev[2] == 0:  # CUDACachingAllocator::allocate: zero bytes never reach malloc
                continue
            try:
                handles[ev[1]] = malloc(ev[2], ev[3])
            except OutOfMemory as e:
                oom, at = e, n
                break
        elif op == "f":
            h = handles.pop(ev[1], None)
            if h is not None:
                free(h)
        elif op == "phase":
            phase_peaks[phase] = max(phase_peaks.get(phase, 0), s.peak_reserved)
            phase = ev[1]
        elif op == "reset":
            a.reset_peak()
        elif op == "empty_cache":
            a.empty_cache()
        else:
            raise ValueError(f"allocation trace: unknown event {ev!r}")
    return _result(s, phase, phase_peaks, oom, at)


def _result(s: "Stats | _FastState", phase: str, phase_peaks: dict[str, int], oom: "OutOfMemory | None",
            at: int | None) -> ReplayResult:
    """A replay's answer from its counters; the phase still open gets its peak."""
    peaks = dict(phase_peaks)
    peaks[phase] = max(peaks.get(phase, 0), s.peak_reserved)
    return ReplayResult(
        peak_allocated_bytes=s.peak_allocated,
        peak_reserved_bytes=s.peak_reserved,
        reserved_end_bytes=s.reserved,
        allocated_end_bytes=s.allocated,
        num_alloc_retries=s.num_alloc_retries,
        num_ooms=s.num_ooms,
        oom=oom,
        oom_event=at,
        phase_peak_reserved=peaks,
        segments_allocated=s.segments_allocated,
        max_reserved_bytes=s.max_reserved,
    )


def _decode(ct: CodedTrace) -> list[tuple]:
    out: list[tuple] = []
    for op, arg, si in zip(ct.ops, ct.args, ct.szi):
        if op == ALLOC:
            out.append(("a", arg, ct.sizes[si], 0))
        elif op == FREE:
            out.append(("f", arg))
        elif op == PHASE:
            out.append(("phase", ct.names[arg]))
        elif op == RESET:
            out.append(("reset",))
        else:
            out.append(("empty_cache",))
    return out


class _FB:
    """A block of the fast replay: `key` = size << 48 | addr orders a pool's free blocks as
    (size, address) do; `whole` blocks span their segment."""

    __slots__ = ("size", "addr", "small", "used", "prev", "next", "req")

    def __init__(self, size: int, addr: int, small: bool) -> None:
        self.size, self.addr, self.small = size, addr, small
        self.used = False
        self.prev: _FB | None = None
        self.next: _FB | None = None
        self.req = 0


_ADDR_BITS = 48


@dataclass
class _FastState(Stats):
    """The fast replay's allocator: `Stats`' counters, free blocks per pool (sorted keys and key ->
    block), live blocks by handle. `clone` copies it (a bisection's probes resume from the run they
    share)."""

    keys: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    blocks: tuple[dict[int, _FB], dict[int, _FB]] = field(default_factory=lambda: ({}, {}))
    live: list[_FB | None] = field(default_factory=list)
    next_addr: int = 1 << 32
    phase: str = "setup"
    phase_peaks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, handles: int) -> "_FastState":
        return cls(live=[None] * max(handles, 1))

    def clone(self) -> "_FastState":
        copies: dict[int, _FB] = {}

        def cp(b: _FB | None) -> _FB | None:
            if b is None:
                return None
            n = copies.get(id(b))
            if n is None:
                n = _FB(b.size, b.addr, b.small)
                n.used, n.req, n.prev, n.next = b.used, b.req, b.prev, b.next
                copies[id(b)] = n
            return n

        blocks = ({k: cp(b) for k, b in self.blocks[0].items()}, {k: cp(b) for k, b in self.blocks[1].items()})
        live = [cp(b) if b is not None else None for b in self.live]
        for n in list(copies.values()):
            n.prev, n.next = cp(n.prev), cp(n.next)
        return dataclass_replace(self, keys=(list(self.keys[0]), list(self.keys[1])), blocks=blocks, live=live,
                                   phase_peaks=dict(self.phase_peaks))


def _replay_fast(ct: CodedTrace, config: AllocatorConfig, capacity: int | None) -> ReplayResult:
    """`CachingAllocator` for one stream, no expandable segments and no memory fraction, inlined: the
    same rounding, pools, best fit, split and merge rules, `max_split_size` and free-and-retry
    (tested equal to the general replay)."""
    state, _, oom, at, _ = _run_fast(ct, config, capacity, _FastState.empty(ct.handles))
    return _result(state, state.phase, state.phase_peaks, oom, at)


Band = tuple[int, float]  # capacities lo..hi (hi may be infinite) whose runs share a state
Split = tuple[int, float, int]  # a band and the reserved total that splits it


def _run_fast(ct: CodedTrace, config: AllocatorConfig, capacity: int | None, state: _FastState, start: int = 0,
              band: Band | None = None) -> "tuple[_FastState, int, OutOfMemory | None, int | None, Split | None]":
    """Run events from `start` on `state` (changed in place): (state, the index reached, the failure,
    its event, at a stop the band and the total that splits it). `band`: `state` is where the run of every capacity in it stands
    (`capacity` is one of them); a cudaMalloc whose reserved total some of them allow and some not
    stops the run before that event (the split is returned, None when the run went to its end); one
    that only the retries make ambiguous narrows the band to `capacity`'s side."""
    probe = CachingAllocator(config)
    max_split = probe.max_split
    max_nsr = probe.max_non_split_rounding
    # per distinct request: its rounded size, pool and the segment a miss allocates
    rounded = [probe.round_size(n) for n in ct.sizes]
    small_of = [r <= KSMALL_SIZE for r in rounded]
    seg_of = [CachingAllocator.allocation_size(r) for r in rounded]
    shift = _ADDR_BITS
    keys, blocks, live = state.keys, state.blocks, state.live
    allocated, reserved, peak_alloc, peak_res, max_res = (state.allocated, state.reserved, state.peak_allocated,
                                                          state.peak_reserved, state.max_reserved)
    retries, segments, ooms, next_addr = state.num_alloc_retries, state.segments_allocated, state.num_ooms, state.next_addr
    phase, phase_peaks = state.phase, state.phase_peaks
    oom = None
    at = None
    names = ct.names
    sizes = ct.sizes
    limited = capacity is not None
    split_limited = max_split != SIZE_MAX
    banded = band is not None
    band_lo, band_hi = band if band is not None else (0, 0)
    stopped: Split | None = None

    def narrow(need: int) -> None:
        """After a retry freed memory: the capacities on `capacity`'s side of `need` stay in the band."""
        nonlocal band_lo, band_hi
        if banded and band_lo < need <= band_hi:
            if capacity is not None and capacity >= need:
                band_lo = need
            else:
                band_hi = need - 1

    def release_cached() -> None:
        nonlocal reserved
        for pk in (0, 1):
            ks, bs = keys[pk], blocks[pk]
            keep = []
            for k in ks:
                b = bs[k]
                if b.prev is None and b.next is None:
                    del bs[k]
                    reserved -= b.size
                else:
                    keep.append(k)
            ks[:] = keep

    def release_available(pk: int, size: int) -> bool:
        """release_available_cached_blocks (only with max_split_size): oversize cached blocks."""
        nonlocal reserved
        ks, bs = keys[pk], blocks[pk]
        key_size = max(size, max_split)
        i = bisect_left(ks, key_size << shift)
        if i == len(ks):
            if i == 0:
                return False
            released = 0
            i -= 1
            while released < key_size:
                b = bs[ks[i]]
                if b.size < max_split:
                    break
                first = i == 0
                released += b.size
                reserved -= b.size
                del bs[ks[i]]
                del ks[i]
                if first:
                    break
                i -= 1
            return released >= key_size
        b = bs[ks[i]]
        reserved -= b.size
        del bs[ks[i]]
        del ks[i]
        return True

    ops, args, szi = ct.ops, ct.args, ct.szi
    reached = len(ops)
    for n in range(start, len(ops)):
        op = ops[n]
        if op == 0:  # ALLOC
            si = szi[n]
            nbytes = sizes[si]
            if nbytes == 0:
                continue
            size = rounded[si]
            small = small_of[si]
            pk = 1 if small else 0
            ks, bs = keys[pk], blocks[pk]
            # get_free_block: best fit by (size, address)
            block = None
            i = bisect_left(ks, size << shift)
            if i < len(ks):
                b = bs[ks[i]]
                if not ((size < max_split and b.size >= max_split) or
                        (size >= max_split and b.size >= size + max_nsr)):
                    del bs[ks[i]]
                    del ks[i]
                    block = b
            if block is None:
                seg = seg_of[si]
                if banded and band_lo < reserved + seg <= band_hi:
                    reached = n  # nothing changed yet: the event runs from here on
                    stopped = (band_lo, band_hi, reserved + seg)
                    break
                ok = not limited or reserved + seg <= capacity
                if not ok and split_limited and release_available(pk, size):
                    narrow(reserved + seg)
                    ok = reserved + seg <= capacity
                if not ok:
                    release_cached()
                    retries += 1
                    narrow(reserved + seg)
                    ok = reserved + seg <= capacity
                if not ok:
                    ooms += 1
                    oom = OutOfMemory(size, allocated, reserved, capacity, seg)
                    at = n
                    break
                block = _FB(seg, next_addr, small)
                next_addr += seg + KROUND_LARGE
                reserved += seg
                segments += 1
                if reserved > peak_res:
                    peak_res = reserved
                    if reserved > max_res:
                        max_res = reserved
            # split: small pool any remainder of 512 B or more; large only below max_split, > 1 MiB left
            remaining = block.size - size
            if (remaining >= KMIN_BLOCK) if small else (size < max_split and remaining > KSMALL_SIZE):
                front = _FB(size, block.addr, small)
                front.prev = block.prev
                if front.prev is not None:
                    front.prev.next = front
                front.next = block
                block.prev = front
                block.addr += size
                block.size = remaining
                k = (remaining << shift) | block.addr
                insort(ks, k)
                bs[k] = block
                block = front
            block.used = True
            block.req = nbytes
            allocated += block.size
            if allocated > peak_alloc:
                peak_alloc = allocated
            live[args[n]] = block
        elif op == 1:  # FREE
            h = args[n]
            if h < 0:
                continue
            b = live[h]
            if b is None:
                continue
            live[h] = None
            allocated -= b.size
            b.used = False
            pk = 1 if b.small else 0
            ks, bs = keys[pk], blocks[pk]
            p = b.prev
            if p is not None and not p.used:
                k = (p.size << shift) | p.addr
                del ks[bisect_left(ks, k)]
                del bs[k]
                b.addr = p.addr
                b.size += p.size
                b.prev = p.prev
                if b.prev is not None:
                    b.prev.next = b
            q = b.next
            if q is not None and not q.used:
                k = (q.size << shift) | q.addr
                del ks[bisect_left(ks, k)]
                del bs[k]
                b.size += q.size
                b.next = q.next
                if b.next is not None:
                    b.next.prev = b
            k = (b.size << shift) | b.addr
            insort(ks, k)
            bs[k] = b
        elif op == 2:  # PHASE
            phase_peaks[phase] = max(phase_peaks.get(phase, 0), peak_res)
            phase = names[args[n]]
        elif op == 3:  # RESET
            peak_alloc, peak_res = allocated, reserved
        else:  # EMPTY_CACHE
            release_cached()
    state.allocated, state.reserved, state.peak_allocated, state.peak_reserved = allocated, reserved, peak_alloc, peak_res
    state.max_reserved, state.num_alloc_retries, state.segments_allocated = max_res, retries, segments
    state.num_ooms, state.next_addr = ooms, next_addr
    state.phase = phase
    return state, reached, oom, at, stopped


# ---- answers --------------------------------------------------------------------------------
class AllocatorSuggestion(BaseModel):
    """Settings under which a step that did not fit the card fits, with its figures under them."""

    alloc_conf: str
    reserved_bytes: int
    min_capacity_bytes: int
    fragmentation_bytes: int


class AllocatorAnswer(BaseModel):
    """What the simulated caching allocator says about one traced program.

    reserved_bytes: the simulation's max_memory_reserved on an unlimited card (what a large card
      reports); peak_allocated_bytes: its max_memory_allocated (block sizes: 512-byte rounding and
      unsplit slack included), both counted from the trace's reset (set-up blocks included).
    fits: the same trace under `capacity_bytes` for the allocator (the card less its CUDA context):
      no allocation failed after the allocator's free-and-retry (None without a capacity).
    min_capacity_bytes: the least allocator memory that runs the trace, by bisection to 2 MiB on
      [peak allocated, reserved]. The bisection assumes that more memory never makes the trace fail;
      the allocator does not promise it (an early free-and-retry can leave a tidier cache than no
      retry), so the answer is always a capacity the trace was replayed under and ran;
      fragmentation_bytes: how much of it is not allocated at the allocated peak (min capacity -
      peak allocated).
    """

    alloc_conf: str = ""
    reserved_bytes: int
    peak_allocated_bytes: int
    capacity_bytes: int | None = None
    fits: bool | None = None
    oom_request_bytes: int | None = None
    num_alloc_retries: int = 0
    min_capacity_bytes: int
    fragmentation_bytes: int
    events: int
    segments: int
    # where the step does not fit: allocator settings under which the same trace fits this card
    suggestions: list[AllocatorSuggestion] = Field(default_factory=list)



@_gc_paused
def min_capacity(trace: list[tuple], config: AllocatorConfig | None = None, unlimited: ReplayResult | None = None,
                 step: int = KROUND_LARGE) -> int:
    """The least allocator capacity (a multiple of `step`) under which the trace runs: bisection on
    [peak allocated, reserved], where a run that fits under the probe also bounds the answer by the
    most it held (under that much it runs the same). Where a fitting run held less than it was given,
    that total is most often the answer itself (the probe met the limits the answer meets and ran
    through their retries): the capacity one step below it is probed next, and where it fails the
    search ends there (measured on the 8B plans of benchmarks/fit_speed.py: 11 probes -> 2-3)."""
    config = config or AllocatorConfig()
    unlimited = unlimited or replay(trace, config)
    # below the largest live total nothing fits; at the unlimited run's reserved everything does
    lo = -(-max(unlimited.peak_allocated_bytes, 1) // step) - 1
    hi = -(-max(unlimited.peak_reserved_bytes, unlimited.max_reserved_bytes) // step)
    probe = _probes(trace, config, (lo + 1) * step)
    below = False  # the next probe is the one just below a fitting run's total
    while hi - lo > 1:
        mid = hi - 1 if below else (lo + hi) // 2
        run = probe(mid * step, keep=((lo + mid) // 2 * step, (mid + hi) // 2 * step))  # the next probe's two choices
        if run.fits:
            # a run that held at most P never met a limit between P and mid: under P it runs the same
            held = -(-run.max_reserved_bytes // step)
            below = held < mid
            hi = min(mid, held)
        else:
            lo, below = mid, False
    return hi * step


def _probes(trace: "list[tuple] | CodedTrace", config: AllocatorConfig, least: int):
    """fn(capacity, keep=()) -> the trace's replay under that capacity (>= `least`). The runs of many
    capacities are one run until a cudaMalloc that some of them allow and some not. On the fast path a
    probe stops at such a split when it parts from a capacity in `keep` (the bisection's next probes)
    and keeps the state there, with the band of capacities it holds for; a later probe resumes from
    the latest kept state its capacity shares, so a bisection runs little more than the trace once."""
    coded = trace if isinstance(trace, CodedTrace) else None
    if coded is None or config.expandable_segments or config.backend != "native":
        return lambda capacity, keep=(): replay(trace, config, capacity_bytes=capacity)
    # (band, event index, state): every capacity in the band reaches the state before that event
    shared: list[tuple[Band, int, _FastState]] = [((least, math.inf), 0, _FastState.empty(coded.handles))]

    def run(capacity: int, keep: "tuple[int, ...]" = ()) -> ReplayResult:
        band, start, base = max((s for s in shared if s[0][0] <= capacity <= s[0][1]), key=lambda s: s[1])
        state = base.clone()
        wanted = [k for k in keep if band[0] <= k <= band[1]]
        while True:
            # only a split between this capacity and a wanted one is worth a kept state: stop at those
            near = (min(*wanted, capacity), max(*wanted, capacity)) if wanted else None
            state, start, oom, at, stopped = _run_fast(coded, config, capacity, state, start, near)
            if stopped is None:
                return _result(state, state.phase, state.phase_peaks, oom, at)
            lo, hi, need = stopped
            if any(lo <= k <= hi and (k >= need) != (capacity >= need) for k in wanted):
                shared.append(((lo, hi), start, state.clone()))
            wanted = [k for k in wanted if lo <= k <= hi and (k >= need) == (capacity >= need)]

    return run


# settings tried when a step does not fit: expandable segments (no per-request segments to strand
# free memory in), and a split limit that keeps large cached blocks whole for large requests
SUGGESTED_CONFS = ("expandable_segments:True", "max_split_size_mb:512", "max_split_size_mb:128")


def suggest(trace: list[tuple], config: AllocatorConfig, capacity_bytes: int) -> list[AllocatorSuggestion]:
    """Settings (on top of `config`) under which the trace fits `capacity_bytes`, fewest bytes first."""
    from planner.engine.alloc_conf import parse_alloc_conf

    base = config.to_conf()
    out = []
    for extra in SUGGESTED_CONFS:
        key = extra.split(":")[0]
        if key in base:
            continue
        conf = parse_alloc_conf(",".join(x for x in (base, extra) if x))
        if not replay(trace, conf, capacity_bytes=capacity_bytes).fits:
            continue
        free = replay(trace, conf)
        need = min_capacity(trace, conf, free)
        out.append(AllocatorSuggestion(alloc_conf=conf.to_conf(), reserved_bytes=free.peak_reserved_bytes,
                                       min_capacity_bytes=need, fragmentation_bytes=need - free.peak_allocated_bytes))
    return sorted(out, key=lambda s: s.min_capacity_bytes)


@_gc_paused
def simulate(trace: "list[tuple] | CodedTrace", config: AllocatorConfig | None = None,
             capacity_bytes: int | None = None) -> AllocatorAnswer:
    """Reserved, the verdict under `capacity_bytes` and the smallest capacity, for one trace; where it
    does not fit, the allocator settings that would make it fit."""
    config = config or AllocatorConfig()
    if not isinstance(trace, CodedTrace):  # coded once for the many replays below
        trace = CodedTrace.from_events(trace) or trace
    free = replay(trace, config)
    need = min_capacity(trace, config, free)
    fits, oom_size, retries = None, None, free.num_alloc_retries
    if capacity_bytes is not None and free.peak_reserved_bytes <= capacity_bytes:
        fits = True  # the run never asks for more than the card: the same run as on an unlimited card
    elif capacity_bytes is not None:
        bounded = replay(trace, config, capacity_bytes=capacity_bytes)
        fits = bounded.fits
        oom_size = bounded.oom.size if bounded.oom is not None else None
        retries = bounded.num_alloc_retries
    return AllocatorAnswer(
        alloc_conf=config.to_conf(),
        reserved_bytes=free.peak_reserved_bytes,
        peak_allocated_bytes=free.peak_allocated_bytes,
        capacity_bytes=capacity_bytes,
        fits=fits,
        oom_request_bytes=oom_size,
        num_alloc_retries=retries,
        min_capacity_bytes=need,
        fragmentation_bytes=need - free.peak_allocated_bytes,
        events=len(trace),
        segments=free.segments_allocated,
        suggestions=suggest(trace, config, capacity_bytes) if fits is False else [],
    )
