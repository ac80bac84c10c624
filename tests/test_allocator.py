"""The caching-allocator simulation, rule by rule (planner/engine/allocator.py).

Each test is a hand-written event sequence whose outcome follows from the C++ of
c10/cuda/CUDACachingAllocator.cpp (torch 2.11): the function named in the test is the rule."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.engine.alloc_conf import AllocatorConfig, parse_alloc_conf
from planner.engine.allocator import CachingAllocator, OutOfMemory, replay
from planner.errors import PlanError

MiB = 1 << 20


def alloc(conf: str = "", **kw) -> CachingAllocator:
    return CachingAllocator(parse_alloc_conf(conf), **kw)


# ---- round_size ---------------------------------------------------------------------------
def test_round_size_512_bytes():
    a = alloc()
    assert [a.round_size(n) for n in (1, 511, 512, 513, 1536)] == [512, 512, 512, 1024, 1536]


def test_roundup_power2_divisions():
    a = alloc("roundup_power2_divisions:4")
    # 1200 MiB: floor 1024 MiB, 4 divisions of 256 MiB -> 1280 MiB; a power of two stays itself
    assert a.round_size(1200 * MiB) == 1280 * MiB
    assert a.round_size(1024 * MiB) == 1024 * MiB
    # sizes up to 512 x divisions keep the 512-byte rounding
    assert a.round_size(1500) == 1536
    per = alloc("roundup_power2_divisions:[256:1,512:2,>:8]")
    assert per.round_size(300 * MiB) == 300 * MiB  # below 512 MB: 1 division = plain rounding
    assert per.round_size(600 * MiB) == 768 * MiB  # 512-1024 MB: 2 divisions of 256 MiB
    assert per.round_size(1100 * MiB) == 1152 * MiB  # beyond: 8 divisions of 128 MiB


# ---- pools and segment sizes (get_pool, get_allocation_size) -------------------------------
def test_segment_sizes():
    a = alloc()
    a.malloc(1000)
    assert a.stats.reserved == 2 * MiB  # small pool: a 2 MiB segment
    a.malloc(MiB + 1)
    assert a.stats.reserved == 22 * MiB  # 1-10 MiB: a 20 MiB segment
    a.malloc(25 * MiB + 5)  # (the 20 MiB segment's free 19 MiB cannot hold it)
    assert a.stats.reserved == 48 * MiB  # larger: rounded up to 2 MiB (26 MiB)


def test_small_requests_share_a_segment():
    a = alloc()
    for _ in range(100):
        a.malloc(10_000)
    assert a.stats.reserved == 2 * MiB
    assert a.stats.allocated == 100 * 10_240


# ---- split rules (should_split) and slack --------------------------------------------------
def test_large_remainder_of_one_mib_is_not_split_and_counts_as_allocated():
    a = alloc()
    h = a.malloc(16 * MiB)
    a.free(h)
    a.malloc(15 * MiB + 512 * 1024)  # remainder 0.5 MiB <= kSmallSize: block kept whole
    assert a.stats.allocated == 16 * MiB
    assert a.stats.requested == 15 * MiB + 512 * 1024
    assert a.stats.reserved == 16 * MiB


def test_large_remainder_over_one_mib_is_split():
    a = alloc()
    h = a.malloc(16 * MiB)
    a.free(h)
    a.malloc(14 * MiB)
    assert a.stats.allocated == 14 * MiB
    a.malloc(2 * MiB)  # the 2 MiB remainder serves it: no new segment
    assert a.stats.reserved == 16 * MiB


# ---- best fit (get_free_block) -------------------------------------------------------------
def test_best_fit_takes_the_smallest_block_that_fits():
    a = alloc()
    big, small = a.malloc(30 * MiB), a.malloc(12 * MiB)
    a.free(big)
    a.free(small)
    a.malloc(11 * MiB)  # the 12 MiB block (remainder 1 MiB: not split)
    assert a.stats.allocated == 12 * MiB
    a.malloc(29 * MiB)
    assert a.stats.reserved == 42 * MiB


def test_streams_do_not_share_blocks():
    a = alloc()
    a.free(a.malloc(30 * MiB, stream=0))
    a.malloc(30 * MiB, stream=1)
    assert a.stats.reserved == 60 * MiB


# ---- merging (free_block, try_merge_blocks) ------------------------------------------------
def test_merge_within_a_segment():
    a = alloc()
    x, y = a.malloc(2 * MiB), a.malloc(2 * MiB)  # both in one 20 MiB segment
    assert a.stats.reserved == 20 * MiB
    a.free(x)
    a.free(y)
    a.malloc(19 * MiB)  # the merged 20 MiB block; 1 MiB slack
    assert a.stats.reserved == 20 * MiB
    assert a.stats.allocated == 20 * MiB


def test_no_merge_across_segments():
    a = alloc()
    x, y = a.malloc(12 * MiB), a.malloc(12 * MiB)
    a.free(x)
    a.free(y)
    a.malloc(20 * MiB)  # 24 MiB free, but in two segments
    assert a.stats.reserved == 44 * MiB


# ---- max_split_size_mb, max_non_split_rounding_mb ------------------------------------------
def test_oversize_blocks_are_not_split_for_small_requests():
    a = alloc("max_split_size_mb:64")
    a.free(a.malloc(100 * MiB))
    a.malloc(30 * MiB)  # may not take the 100 MiB block
    assert a.stats.reserved == 130 * MiB


def test_oversize_request_takes_a_block_only_within_the_rounding():
    a = alloc("max_split_size_mb:64")
    a.free(a.malloc(130 * MiB))
    a.malloc(100 * MiB)  # 130 >= 100 + 20: not taken
    assert a.stats.reserved == 230 * MiB
    b = alloc("max_split_size_mb:64,max_non_split_rounding_mb:40")
    b.free(b.malloc(130 * MiB))
    b.malloc(100 * MiB)  # 130 < 100 + 40: taken whole
    assert b.stats.reserved == 130 * MiB
    assert b.stats.allocated == 130 * MiB


def test_release_available_cached_blocks_frees_oversize_blocks_largest_first():
    a = alloc("max_split_size_mb:64", capacity_bytes=300 * MiB)
    x, y = a.malloc(100 * MiB), a.malloc(90 * MiB)
    a.malloc(80 * MiB)
    a.free(x)
    a.free(y)
    # 150 MiB: no cached block; cudaMalloc fails (270 + 150 > 300); the 100 and 90 MiB blocks are
    # released, largest first, until 150 MiB are free; the retry succeeds without a full release
    a.malloc(150 * MiB)
    assert a.stats.reserved == 230 * MiB
    assert a.stats.num_alloc_retries == 0


# ---- out of memory: release_cached_blocks and retry ----------------------------------------
def test_failed_cudamalloc_frees_wholly_free_segments_and_retries():
    a = alloc(capacity_bytes=100 * MiB)
    a.free(a.malloc(60 * MiB))
    a.malloc(70 * MiB)
    assert a.stats.reserved == 70 * MiB
    assert a.stats.num_alloc_retries == 1


def test_fragmentation_out_of_memory():
    a = alloc(capacity_bytes=60 * MiB)
    a.free(a.malloc(40 * MiB))
    a.malloc(10 * MiB)  # split from the 40 MiB segment
    a.free(a.malloc(30 * MiB))  # the rest of it, freed: the segment is not wholly free
    with pytest.raises(OutOfMemory):
        a.malloc(40 * MiB)  # 10 MiB allocated of 60, yet 40 + 40 > 60 and nothing can be released
    assert a.stats.num_ooms == 1


def test_expandable_segments_avoid_that_fragmentation():
    a = alloc("expandable_segments:True", capacity_bytes=60 * MiB)
    a.free(a.malloc(40 * MiB))
    a.malloc(10 * MiB)
    a.free(a.malloc(30 * MiB))
    a.malloc(40 * MiB)  # the free tail of the mapped range plus newly mapped pages
    assert a.stats.reserved <= 60 * MiB
    assert a.stats.num_ooms == 0


# ---- empty_cache ---------------------------------------------------------------------------
def test_empty_cache_releases_only_wholly_free_segments():
    a = alloc()
    keep = a.malloc(12 * MiB)
    x, y = a.malloc(2 * MiB), a.malloc(2 * MiB)  # one 20 MiB segment
    a.free(a.malloc(30 * MiB))
    a.free(x)
    assert keep in a.live
    a.empty_cache()
    assert a.stats.reserved == 12 * MiB + 20 * MiB  # the live 12 MiB and the half-used 20 MiB
    a.free(y)
    a.empty_cache()
    assert a.stats.reserved == 12 * MiB


# ---- expandable segments -------------------------------------------------------------------
def test_expandable_segments_map_pages_on_demand():
    a = alloc("expandable_segments:True")
    a.malloc(30 * MiB)
    assert a.stats.reserved == 40 * MiB  # two 20 MiB pages
    a.malloc(5 * MiB)  # fits in the mapped tail (split down to 512 B)
    assert a.stats.reserved == 40 * MiB
    a.malloc(20 * MiB)  # 5 MiB left mapped + one more page
    assert a.stats.reserved == 60 * MiB
    n = alloc()
    for size in (30, 5, 20):
        n.malloc(size * MiB)
    assert n.stats.reserved == 30 * MiB + 20 * MiB + 20 * MiB


def test_expandable_empty_cache_unmaps_free_pages():
    a = alloc("expandable_segments:True")
    live = a.malloc(1 * MiB + 1)  # large pool, the first 20 MiB page
    tmp = a.malloc(50 * MiB)
    assert a.stats.reserved == 60 * MiB
    a.free(tmp)
    a.empty_cache()  # the pages wholly free are unmapped; the one holding `live` stays
    assert a.stats.reserved == 20 * MiB
    a.free(live)
    a.empty_cache()
    assert a.stats.reserved == 0


def test_expandable_small_pool_pages_are_two_mib():
    a = alloc("expandable_segments:True")
    a.malloc(1000)
    assert a.stats.reserved == 2 * MiB


# ---- garbage_collection_threshold ----------------------------------------------------------
def test_garbage_collection_needs_a_memory_fraction():
    conf = "garbage_collection_threshold:0.5"
    a = alloc(conf)  # no fraction: garbage collection never runs (as in the C++)
    for size in (30, 40):
        a.free(a.malloc(size * MiB))
    a.malloc(45 * MiB)
    assert a.stats.reserved == (30 + 40 + 46) * MiB
    g = alloc(conf, memory_fraction=0.5, total_memory_bytes=200 * MiB)  # allowed 100, threshold 50
    for size in (30, 40):
        g.free(g.malloc(size * MiB))
    # the miss: reserved 70 > 50: blocks at least as old as the average are released (the 30 MiB
    # one, freed before the last search), then the new 46 MiB segment
    g.malloc(45 * MiB)
    assert g.stats.reserved == (40 + 46) * MiB


def test_memory_fraction_limits_reserved():
    a = alloc(memory_fraction=0.5, total_memory_bytes=100 * MiB)
    a.malloc(40 * MiB)
    with pytest.raises(OutOfMemory):
        a.malloc(20 * MiB)


def test_cuda_malloc_async_is_refused():
    with pytest.raises(PlanError, match="cudaMallocAsync"):
        alloc("backend:cudaMallocAsync")


# ---- traces ------------------------------------------------------------------------------
def test_replay_reset_and_phases():
    trace = [("a", 1, 30 * MiB, 0), ("f", 1), ("phase", "0.forward"), ("reset",), ("a", 2, 10 * MiB, 0),
             ("phase", "0.backward"), ("a", 3, 40 * MiB, 0), ("empty_cache",)]
    r = replay(trace)
    assert r.peak_allocated_bytes == 50 * MiB  # the reset dropped the first 30 MiB peak
    assert r.peak_reserved_bytes == 70 * MiB  # 30 cached + 40 new; the 10 MiB came from the cache
    assert r.reserved_end_bytes == 70 * MiB  # empty_cache: both segments hold a live block: kept
    assert r.phase_peak_reserved["0.backward"] == 70 * MiB


def test_replay_stops_at_the_out_of_memory():
    r = replay([("a", 1, 40 * MiB, 0), ("a", 2, 40 * MiB, 0), ("a", 3, 1, 0)], capacity_bytes=60 * MiB)
    assert not r.fits
    assert r.oom_event == 1
    assert r.oom.size == 40 * MiB


def test_unknown_event_is_an_error():
    with pytest.raises(ValueError, match="unknown event"):
        replay([("x", 1)])


# ---- invariants over random programs -------------------------------------------------------
def _check_tiling(a: CachingAllocator) -> None:
    """Blocks tile their segments: neighbours touch, prev/next agree, free blocks are in a pool."""
    seen = set()
    for pool in a.pools:
        for b in pool.blocks.values():
            assert not b.allocated
            seen.add(id(b))
    for b in a.live.values():
        assert b.allocated and id(b) not in seen
        for n in (b.prev, b.next):
            if n is not None:
                assert (n.next is b) if n is b.prev else (n.prev is b)
        if b.next is not None:
            assert b.addr + b.size == b.next.addr
    assert a.stats.allocated == sum(b.size for b in a.live.values())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), conf=st.sampled_from(["", "expandable_segments:True", "max_split_size_mb:40",
                                                            "roundup_power2_divisions:4"]))
def test_random_programs_keep_the_books(seed, conf):
    rng = random.Random(seed)
    a = alloc(conf)
    live = []
    for _ in range(300):
        if live and rng.random() < 0.45:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            size = rng.choice([rng.randint(1, 4096), rng.randint(1, 2 * MiB), rng.randint(MiB, 80 * MiB)])
            live.append(a.malloc(size))
        s = a.stats
        assert s.requested <= s.allocated <= s.reserved <= s.peak_reserved
        if rng.random() < 0.05:
            a.empty_cache()
            assert a.stats.allocated <= a.stats.reserved
    _check_tiling(a)
    for h in live:
        a.free(h)
    a.empty_cache()
    assert a.stats.allocated == 0 and a.stats.reserved == 0


def _random_trace(rng: random.Random, n: int = 400) -> list[tuple]:
    """Allocations of every size class, frees in any order, phases, a reset and empty_cache calls."""
    trace: list[tuple] = []
    live: list[int] = []
    handle = 0
    for i in range(n):
        r = rng.random()
        if live and r < 0.42:
            trace.append(("f", live.pop(rng.randrange(len(live)))))
        elif r < 0.44:
            trace.append(("empty_cache",))
        elif r < 0.46:
            trace.append(("phase", f"{i}.x"))
        elif r < 0.47:
            trace.append(("reset",))
        else:
            handle += 1
            size = rng.choice([0, rng.randint(1, 4096), rng.randint(1, 2 * MiB), rng.randint(MiB, 80 * MiB)])
            trace.append(("a", handle, size, 0))
            live.append(handle)
    return trace


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), conf=st.sampled_from(["", "max_split_size_mb:40", "roundup_power2_divisions:4",
                                                            "max_split_size_mb:20,roundup_power2_divisions:2"]))
def test_fast_replay_and_its_resumed_probes_equal_the_general_replay(seed, conf):
    """`replay` takes the inlined fast path for these settings; `min_capacity`'s probes resume from the
    states their capacities share with earlier probes'. Both must give the general replay's answer field
    for field."""
    from planner.engine.allocator import CodedTrace, _probes, _replay_fast, replay_general

    rng = random.Random(seed)
    trace = _random_trace(rng)
    config = parse_alloc_conf(conf)
    coded = CodedTrace.from_events(trace)
    unlimited = replay_general(trace, config)
    least = unlimited.peak_allocated_bytes
    probe = _probes(coded, config, least)
    top = max(unlimited.max_reserved_bytes, least + 1)

    def fields(r):  # the failure as its numbers (exceptions compare by identity)
        return {**vars(r), "oom": r.oom and vars(r.oom)}

    # in no particular order: each probe resumes from the states earlier ones shared
    for capacity in (None, least, (least + top) // 2, top, *(rng.randint(least, top) for _ in range(8))):
        want = fields(replay_general(trace, config, capacity_bytes=capacity))
        assert fields(_replay_fast(coded, config, capacity)) == want
        if capacity is not None:
            assert fields(probe(capacity, keep=(rng.randint(least, top), rng.randint(least, top)))) == want


# ---- configuration -------------------------------------------------------------------------
def test_parse_defaults_and_round_trip():
    assert parse_alloc_conf(None) == AllocatorConfig()
    assert parse_alloc_conf("") == AllocatorConfig()
    text = "expandable_segments:True,max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:4]"
    conf = parse_alloc_conf(text)
    assert conf.expandable_segments and conf.max_split_size_bytes == 128 * MiB
    assert parse_alloc_conf(conf.to_conf()) == conf
    assert parse_alloc_conf(" expandable_segments : True ") == parse_alloc_conf("expandable_segments:True")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("expandable_segment:True", "did you mean: expandable_segments"),
        ("max_split_size_mb:10", "must be >= 20"),
        ("max_split_size_mb:-64", "non-negative integer"),
        ("max_split_size_mb:abc", "non-negative integer"),
        ("expandable_segments:yes", "True or False"),
        ("garbage_collection_threshold:1.5", "(0.0, 1.0)"),
        ("garbage_collection_threshold:x", "expected a number"),
        ("roundup_power2_divisions:3", "power of 2"),
        ("roundup_power2_divisions:[300:2]", "powers of 2"),
        ("roundup_power2_divisions:[256:1", "closing ']'"),
        ("backend:fast", "native or cudaMallocAsync"),
        ("expandable_segments", "expected ':'"),
        ("expandable_segments:True max_split_size_mb:64", "expected ','"),
    ],
)
def test_parse_errors_are_one_line(text, needle):
    with pytest.raises(PlanError) as e:
        parse_alloc_conf(text)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("alloc-conf")


# ---- answers: verdict, smallest card, fragmentation ----------------------------------------
def _fragmenting_trace() -> list[tuple]:
    # 40 MiB freed, 10 MiB split from it and kept, 30 MiB taken and freed, then 40 MiB: with room to
    # spare it needs a second segment (80 MiB); with less, nothing can be released and it fails
    return [("a", 1, 40 * MiB, 0), ("f", 1), ("a", 2, 10 * MiB, 0), ("a", 3, 30 * MiB, 0), ("f", 3),
            ("a", 4, 40 * MiB, 0)]


def test_min_capacity_and_fragmentation():
    from planner.engine.allocator import min_capacity, simulate

    trace = _fragmenting_trace()
    assert min_capacity(trace) == 80 * MiB
    ans = simulate(trace, capacity_bytes=60 * MiB)
    assert ans.reserved_bytes == 80 * MiB and ans.peak_allocated_bytes == 50 * MiB
    assert ans.fits is False and ans.oom_request_bytes == 40 * MiB
    assert ans.min_capacity_bytes == 80 * MiB and ans.fragmentation_bytes == 30 * MiB
    assert simulate(trace, capacity_bytes=80 * MiB).fits is True


def test_expandable_segments_turn_the_no_fit_into_a_fit():
    from planner.engine.allocator import simulate

    trace = _fragmenting_trace()
    ans = simulate(trace, parse_alloc_conf("expandable_segments:True"), capacity_bytes=60 * MiB)
    assert ans.fits is True
    assert ans.min_capacity_bytes == 60 * MiB  # three 20 MiB pages hold the 50 MiB peak
    assert ans.alloc_conf == "expandable_segments:True"


@pytest.mark.parametrize("seed", [7, 11, 23])
def test_min_capacity_is_a_capacity_that_runs(seed):
    """The search's answer runs and the capacity one bisection step below it does not (the search
    may end at a fitting run's total after one failing probe below it)."""
    from planner.engine.allocator import min_capacity

    rng = random.Random(seed)
    trace, live, n = [], [], 0
    for _ in range(400):
        if live and rng.random() < 0.5:
            trace.append(("f", live.pop(rng.randrange(len(live)))))
        else:
            n += 1
            trace.append(("a", n, rng.randint(MiB, 60 * MiB), 0))
            live.append(n)
    need = min_capacity(trace)
    assert replay(trace, capacity_bytes=need).fits
    assert not replay(trace, capacity_bytes=need - 2 * MiB).fits


def test_suggestions_name_the_settings_that_fit():
    from planner.engine.allocator import simulate

    ans = simulate(_fragmenting_trace(), capacity_bytes=60 * MiB)
    assert ans.fits is False
    confs = [s.alloc_conf for s in ans.suggestions]
    assert "expandable_segments:True" in confs
    for s in ans.suggestions:  # each one verified: the trace replayed under it fits the card
        assert replay(_fragmenting_trace(), parse_alloc_conf(s.alloc_conf), capacity_bytes=60 * MiB).fits
        assert s.min_capacity_bytes <= 60 * MiB
    assert simulate(_fragmenting_trace(), capacity_bytes=80 * MiB).suggestions == []
