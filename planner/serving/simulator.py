"""A discrete-event simulator of one serving engine: requests arrive, a scheduler batches them, the
roofline times each iteration, and paged KV blocks bound what runs at once.

Fast by construction (100,000 requests in a few seconds of pure Python):
- no per-token or per-sequence work per iteration: decoding sequences are summarised by their
  count, the sum of their context lengths (the KV read and attention work of a step) and a
  histogram of their length modulo the block size (how many need a new block at each step:
  sequence i, whose length is c_i + G at decode counter G, needs one when (c_i + G) % block_size
  == 0);
- completions come from a heap keyed by the decode counter at which each sequence finishes;
- between events nothing changes but the lengths, so a run of decode-only iterations is advanced
  in one go: its time is a sum of max(compute line, memory line) in closed form
  (`roofline.sum_max_lines`), the blocks it takes come from the histogram, and it stops at the next
  completion, at the step before blocks run out, at a sliding-window crossing, or (when the
  scheduler could admit it) at the next arrival, found by bisection on the closed-form time.

Token accounting: a request of p prompt tokens and o output tokens is prefilled (the iteration that
finishes its prompt samples token 1), then decodes o - 1 times; its KV holds p + o - 1 tokens at
the end. Preemption is by recompute, as vLLM does: the request's blocks are freed, it goes back to
the front of the queue, and later prefills its prompt plus the tokens generated so far.
Latencies: TTFT = first token - arrival; TPOT = (finish - first token) / (o - 1); E2E = finish -
arrival. Throughput = output tokens / (last finish - first arrival).

Bounded work: what a run costs is the number of passes through the event loop (one per prefill
iteration, one per decode stretch, one per static batch), not the request count alone. Long prompts
split into many chunks, and a KV cache that thrashes (more admitted sequences than fit, preempted
and recomputed over and over) both multiply it. A run that needs more than MAX_STEPS passes stops
with a one-line `SimulationTooLong`, early when its pace so far projects well beyond the bound.
A caller can watch progress through `reporting_progress` (the CLI draws a bar from it).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

from planner.serving.roofline import Roofline, steps_to_reach, sum_max_lines
from planner.serving.specs import ServeInputError
from planner.serving.traffic import MAX_TIME_S, Requests

if TYPE_CHECKING:
    from planner.serving.capacity import Setup

TIMELINE_BINS = 10


class IterationScheduler(Protocol):
    """What `Simulator.iterate` asks of a scheduler (planner.serving.schedulers.Scheduler is one);
    a protocol, so that the simulator does not import the schedulers that drive it."""

    name: str

    def schedule(self, sim: "Simulator") -> tuple[list[tuple[int, int]], bool]: ...

    def arrival_sensitive(self, sim: "Simulator") -> bool: ...

# Event-loop passes one simulation may take. Measured on the 2-core dev machine (Python 3.11): a
# pass costs 6-8 us (2.4M passes of a thrashing chunked-prefill run: 14 s; 2.8M passes of 1,000,000
# ordinary requests, llama-3.1-8b on h100-sxm at 4/s, 1024 + 256 tokens: ~23 s of simulation), so
# the bound is about 30-40 s of work, and above what traffic.MAX_REQUESTS ordinary requests need.
MAX_STEPS = 5_000_000
# From this many passes on, a run whose pace (passes per finished request) projects beyond
# PROJECTION_MARGIN x MAX_STEPS stops at once instead of running into the bound; the margin keeps
# a run whose early pace is a little pessimistic from being refused.
PROJECT_AFTER = 500_000
PROJECTION_MARGIN = 1.5
# Passes between progress reports and bound checks (a power of two: one AND per pass; ~0.1 s).
CHECK_EVERY = 1 << 14

# (scheduler, requests done, requests in the stream), called every CHECK_EVERY passes and at the end
ProgressFn = Callable[[str, int, int], None]
_PROGRESS: ContextVar[ProgressFn | None] = ContextVar("planner_serving_progress", default=None)


@contextmanager
def reporting_progress(fn: ProgressFn | None) -> Iterator[None]:
    """Within this block, every simulation reports its progress to `fn` (the service layer need not
    pass it through: a context variable carries it to the Simulator)."""
    token = _PROGRESS.set(fn)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class Percentiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    p50: float
    p90: float
    p99: float
    mean: float
    max: float


class KVUtilisation(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float  # time-weighted share of the blocks in use
    max: float
    timeline: list[float]  # time-weighted mean in TIMELINE_BINS equal slices of the run


class SimulationReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    scheduler: str
    requests: int
    duration_s: float  # first arrival to last finish
    tokens_per_s: float  # output tokens per second
    total_tokens_per_s: float  # prompt + output tokens per second
    requests_per_s: float
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    preemptions: int
    preempted_requests: int
    iterations: int  # model forward passes
    prefill_tokens: int  # tokens run in prefill, recompute and padding included
    decode_tokens: int  # tokens run in decode steps, padding included
    padded_tokens: int  # static batching: pad tokens computed
    recomputed_tokens: int  # prefill tokens beyond the prompts: recompute after preemption (padding excluded)
    mean_running: float  # time-weighted sequences in the batch
    max_running: int
    kv_utilisation: KVUtilisation
    output_tokens: int
    prompt_tokens: int


def percentiles(values: list[float]) -> Percentiles:
    """p50/p90/p99 with linear interpolation between order statistics (numpy's default), mean and max."""
    if not values:
        return Percentiles(p50=0.0, p90=0.0, p99=0.0, mean=0.0, max=0.0)
    xs = sorted(values)
    n = len(xs)

    def q(p: float) -> float:
        pos = p * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Percentiles(p50=q(0.5), p90=q(0.9), p99=q(0.99), mean=math.fsum(xs) / n, max=xs[-1])


class SimulationStalled(RuntimeError):
    """The scheduler can make no progress (a bug in a scheduler, or a request that can never fit)."""


class SimulationTooLong(ServeInputError):
    """The traffic needs more event-loop passes than MAX_STEPS (bad input: too much to simulate)."""


class Simulator:
    """State of one engine over one request stream; schedulers act on it through its primitives."""

    def __init__(self, setup: Setup, roofline: Roofline, requests: Requests, pool: int, aggregate: bool = True) -> None:
        n = len(requests)
        self.aggregate = aggregate  # False: one decode iteration at a time (the reference the tests compare with)
        self.N = n
        self.arr = requests.arrival
        self.prompt = requests.prompt
        self.out = requests.output
        self.roof = roofline
        self.bs = setup.block_size
        self.F = setup.full_layers
        self.Wl = setup.sliding_layers
        self.W = setup.window if setup.window else 1 << 62
        self.pool = pool
        self.free = pool
        self.max_num_seqs = setup.max_num_seqs
        self.max_num_batched_tokens = setup.max_num_batched_tokens
        self.max_model_len = setup.max_model_len
        nan = float("nan")
        self.first = [nan] * n
        self.finish = [nan] * n
        self.preempted = [0] * n
        self.target = list(self.prompt)  # tokens to prefill in the current admission
        self.generated = [0] * n  # output tokens produced before the current decode run
        self.coff = [0] * n  # c_i: KV length = c_i + G while decoding
        self.epoch = [0] * n
        self.below = [False] * n  # sliding layers still filling their window
        self.waiting: deque[int] = deque()
        self.running: dict[int, None] = {}  # admission order; the last is preempted first
        self.prefilling: dict[int, int] = {}  # request -> prompt tokens already computed
        self.G = 0
        self.n_dec = 0
        self.C = 0
        self.cnt = [0] * self.bs
        self.nb = 0
        self.Cb = 0
        self.cntb = [0] * self.bs
        self.fin_heap: list[tuple[int, int, int]] = []
        self.cross_heap: list[tuple[int, int, int]] = []
        self.now = 0.0
        self.ai = 0
        self.done = 0
        self.iterations = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.padded_tokens = 0
        self.padded_prefill = 0
        self.just_preempted = False  # a preemption in this step: the next step is scheduled afresh
        self.first_tokens = 0  # tokens sampled at the end of a prefill (one per admission that completes it)
        self.preemptions = 0
        self.max_running = 0
        # one sample per pass: typed arrays take 24 bytes a pass where lists of boxed numbers took ~75
        self.samples_t = array("d")
        self.samples_used = array("q")
        self.samples_run = array("q")
        self.passes = 0
        self.scheduler_name = ""
        self.progress = _PROGRESS.get()

    # ---- primitives for schedulers ---------------------------------------------------------
    def blocks(self, tokens: int) -> int:
        """Layer-blocks held by a sequence of `tokens` tokens."""
        bs = self.bs
        n = self.F * (-(-tokens // bs))
        if self.Wl:
            n += self.Wl * (-(-min(tokens, self.W) // bs))
        return n

    def decode_need(self) -> int:
        """Layer-blocks the decoding sequences take in the next decode step."""
        if not self.n_dec:
            return 0
        r = (-self.G) % self.bs
        return self.F * self.cnt[r] + self.Wl * self.cntb[r]

    def start_prefill(self, rid: int) -> None:
        """Admit `rid` (already taken off the waiting queue) to the running batch."""
        self.running[rid] = None
        self.prefilling[rid] = 0
        if len(self.running) > self.max_running:
            self.max_running = len(self.running)

    def preempt_last(self) -> int:
        """Preempt the most recently admitted running request (recompute); returns it."""
        rid, _ = self.running.popitem()
        if rid in self.prefilling:
            self.free += self.blocks(self.prefilling.pop(rid))
        else:
            g0 = self.target[rid] - self.coff[rid]
            self.generated[rid] += self.G - g0
            self._drop_decoder(rid)
            self.target[rid] = self.prompt[rid] + self.generated[rid]
        self.waiting.appendleft(rid)
        self.preempted[rid] += 1
        self.preemptions += 1
        self.just_preempted = True
        return rid

    # ---- internals ----------------------------------------------------------------------
    def _drop_decoder(self, rid: int) -> None:
        c = self.coff[rid]
        self.free += self.blocks(c + self.G)
        self.n_dec -= 1
        self.C -= c
        r = c % self.bs
        self.cnt[r] -= 1
        if self.below[rid]:
            self.below[rid] = False
            self.nb -= 1
            self.Cb -= c
            self.cntb[r] -= 1
        self.epoch[rid] += 1

    def _to_decode(self, rid: int) -> None:
        """`rid` finished its prefill in the iteration that just ended: token 1 (of this admission)."""
        if self.generated[rid] == 0:
            self.first[rid] = self.now
        self.generated[rid] += 1
        self.first_tokens += 1
        rem = self.out[rid] - self.generated[rid]
        if rem <= 0:
            del self.running[rid]
            self.free += self.blocks(self.target[rid])
            self.finish[rid] = self.now
            self.done += 1
            return
        g = self.G
        c = self.target[rid] - g
        self.coff[rid] = c
        self.epoch[rid] += 1
        ep = self.epoch[rid]
        self.n_dec += 1
        self.C += c
        r = c % self.bs
        self.cnt[r] += 1
        if self.Wl and c + g < self.W:
            self.below[rid] = True
            self.nb += 1
            self.Cb += c
            self.cntb[r] += 1
            heapq.heappush(self.cross_heap, (self.W - c, rid, ep))
        heapq.heappush(self.fin_heap, (g + rem, rid, ep))

    def _completions(self) -> None:
        heap, epoch, G = self.fin_heap, self.epoch, self.G
        while heap and heap[0][0] <= G:
            _, rid, ep = heapq.heappop(heap)
            if ep != epoch[rid]:
                continue
            del self.running[rid]
            self.generated[rid] = self.out[rid]
            self._drop_decoder(rid)
            self.finish[rid] = self.now
            self.done += 1

    def _crossings(self) -> None:
        heap, G = self.cross_heap, self.G
        while heap and heap[0][0] <= G:
            _, rid, ep = heapq.heappop(heap)
            if ep != self.epoch[rid] or not self.below[rid]:
                continue
            self.below[rid] = False
            c = self.coff[rid]
            self.nb -= 1
            self.Cb -= c
            self.cntb[c % self.bs] -= 1

    def _need(self, k: int) -> int:
        """Layer-blocks the decodes take over the next k steps."""
        bs, F, Wl, cnt, cntb, G = self.bs, self.F, self.Wl, self.cnt, self.cntb, self.G
        q, rest = divmod(k, bs)
        need = q * (F * self.n_dec + Wl * self.nb)
        for j in range(rest):
            r = (-(G + j)) % bs
            need += F * cnt[r] + Wl * cntb[r]
        return need

    def _steps_with_blocks(self, kmax: int) -> int:
        """The most decode steps (<= kmax) whose new blocks fit in the free ones."""
        per = self.F * self.n_dec + self.Wl * self.nb
        if per == 0 or self.free >= per * (kmax // self.bs + 1):  # kmax steps take at most that many
            return kmax
        bs, F, Wl, cnt, cntb, G = self.bs, self.F, self.Wl, self.cnt, self.cntb, self.G
        q = min(self.free // per, kmax // bs)
        steps, used = q * bs, q * per
        free = self.free
        while steps < kmax:
            r = (-(G + steps)) % bs
            nd = F * cnt[r] + Wl * cntb[r]
            if used + nd > free:
                break
            used += nd
            steps += 1
        return steps

    def _sample(self) -> None:
        self.samples_t.append(self.now)
        self.samples_used.append(self.pool - self.free)
        self.samples_run.append(len(self.running))
        self.passes += 1
        if not self.passes & (CHECK_EVERY - 1):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Report progress; stop a run beyond MAX_STEPS passes, or projected well beyond it."""
        if self.progress is not None:
            self.progress(self.scheduler_name, self.done, self.N)
        p = self.passes
        projected = p * self.N / max(self.done, 1)
        if p >= MAX_STEPS or (p >= PROJECT_AFTER and projected > PROJECTION_MARGIN * MAX_STEPS):
            thrash = f", {self.preemptions:,} preemptions" if self.preemptions else ""
            how = "reached" if p >= MAX_STEPS else f"is on pace for {projected:,.0f} (over"
            tail = "" if p >= MAX_STEPS else ")"
            raise SimulationTooLong(
                f"simulation: {self.scheduler_name} {how} the limit of {MAX_STEPS:,} engine steps{tail} for "
                f"{self.N:,} requests (after {p:,} steps {self.done:,} are done{thrash}); the work grows with "
                f"--requests, with prompt chunks "
                f"(--prompt-len over --max-num-batched-tokens) and with preemptions (more sequences admitted than "
                f"the KV cache holds): lower --requests, --prompt-len, --new-tokens or --rate, or cap --max-num-seqs"
            )

    def _slide_keys(self, d: int, c: int) -> int:
        """sum_{t=d+1}^{d+c} min(t, W)."""
        W = self.W
        if d + c <= W:
            return c * d + c * (c + 1) // 2
        if d >= W:
            return c * W
        below = W - d
        return below * (d + 1 + W) // 2 + (d + c - W) * W

    # ---- the iteration-level loop --------------------------------------------------------
    def iterate(self, sched: IterationScheduler) -> None:
        self.scheduler_name = sched.name or type(sched).__name__
        N, arr, waiting, roof = self.N, self.arr, self.waiting, self.roof
        F, Wl, W = self.F, self.Wl, self.W
        stall = 0
        while self.done < N:
            now = self.now
            ai = self.ai
            while ai < N and arr[ai] <= now:
                waiting.append(ai)
                ai += 1
            self.ai = ai
            if not self.running and not waiting:
                self.now = arr[ai]
                continue
            if self.cross_heap:
                self._crossings()
            self.just_preempted = False
            chunks, decode = sched.schedule(self)
            n = self.n_dec
            G = self.G
            if not chunks and (not decode or not n):
                stall += 1
                if stall > 2:
                    raise SimulationStalled(
                        f"scheduler '{sched.name}' made no progress at t={now:.3f}s "
                        f"({len(waiting)} waiting, {len(self.running)} running, {self.free} free layer-blocks)"
                    )
                continue
            stall = 0
            s_full = self.C + n * (G + 1)
            s_slide = (self.Cb + self.nb * (G + 1) + (n - self.nb) * W) if Wl else 0
            if not chunks:
                # ---- a stretch of decode-only iterations ----
                heap, epoch = self.fin_heap, self.epoch
                while heap and heap[0][2] != epoch[heap[0][1]]:
                    heapq.heappop(heap)
                k = heap[0][0] - G
                if self.cross_heap:
                    k = min(k, max(1, self.cross_heap[0][0] - G))
                k = self._steps_with_blocks(k if self.aggregate and not self.just_preempted else 1)
                if k <= 0:  # the scheduler let a step through that does not fit: take it alone
                    k = 1
                keys0 = F * s_full + Wl * s_slide
                slope = F * n + Wl * self.nb
                a1, b1, a2, b2, c0 = roof.decode_lines(n, keys0, slope)
                if ai < N and k > 1 and sched.arrival_sensitive(self):
                    k = steps_to_reach(a1, b1, a2, b2, c0, k, arr[ai] - now)
                self.free -= self._need(k)
                self.now = now + sum_max_lines(a1, b1, a2, b2, k) + c0 * k
                self.G = G + k
                self.iterations += k
                self.decode_tokens += n * k
                self._completions()
                self._sample()
                continue
            # ---- one iteration with prefill chunks (and the decodes, if any) ----
            if decode and n:
                need = self.decode_need()
                tokens = rows = n
                keys = F * s_full + Wl * s_slide
            else:
                need = tokens = rows = keys = 0
            kv_read = keys
            target, prefilling = self.target, self.prefilling
            pre = 0
            for rid, c in chunks:
                d = prefilling[rid]
                tokens += c
                pre += c
                need += self.blocks(d + c) - self.blocks(d)
                keys += F * (c * d + c * (c + 1) // 2)
                kv_read += F * (d + c)
                if Wl:
                    keys += Wl * self._slide_keys(d, c)
                    kv_read += Wl * min(d + c, W)
                if d + c >= target[rid]:
                    rows += 1
            self.free -= need
            self.now = now + roof.step_time(tokens, rows, keys, kv_read)
            self.iterations += 1
            self.prefill_tokens += pre
            if decode and n:
                self.decode_tokens += n
                self.G = G + 1
            for rid, c in chunks:
                d = prefilling[rid] + c
                if d >= target[rid]:
                    del prefilling[rid]
                    self._to_decode(rid)
                else:
                    prefilling[rid] = d
            self._completions()
            self._sample()

    # ---- request-level (static) batching ------------------------------------------------
    def run_static(self) -> None:
        self.scheduler_name = self.scheduler_name or "static"
        N, arr, prompt, out, roof = self.N, self.arr, self.prompt, self.out, self.roof
        F, Wl, W, waiting = self.F, self.Wl, self.W, self.waiting
        while self.done < N:
            now = self.now
            ai = self.ai
            while ai < N and arr[ai] <= now:
                waiting.append(ai)
                ai += 1
            self.ai = ai
            if not waiting:
                self.now = arr[ai]
                continue
            batch: list[int] = []
            pmax = omax = 0
            while waiting and len(batch) < self.max_num_seqs:
                rid = waiting[0]
                p2, o2 = max(pmax, prompt[rid]), max(omax, out[rid])
                if (len(batch) + 1) * self.blocks(p2 + o2) > self.pool:
                    break
                waiting.popleft()
                batch.append(rid)
                pmax, omax = p2, o2
            if not batch:
                raise SimulationStalled(f"static: request {waiting[0]} does not fit the KV cache on its own")
            B = len(batch)
            self.free = self.pool - B * self.blocks(pmax + omax)
            self.running = dict.fromkeys(batch)
            self.max_running = max(self.max_running, B)
            keys = F * B * (pmax * (pmax + 1) // 2) + (Wl * B * self._slide_keys(0, pmax) if Wl else 0)
            kv = F * B * pmax + Wl * B * min(pmax, W)
            t_pre = roof.step_time(B * pmax, B, keys, kv)
            steps = omax - 1  # decode steps: context pmax + j + 1 at step j
            if steps > 0:
                if Wl and pmax + omax > W and not self.aggregate:
                    # the reference: one step at a time (O(longest output) per batch)
                    t_dec = 0.0
                    for j in range(steps):
                        ctx = pmax + j + 1
                        kj = B * (F * ctx + Wl * min(ctx, W))
                        t_dec += roof.step_time(B, B, kj, kj)
                elif Wl and pmax + omax > W:
                    # the same sum in closed form, in two linear pieces: while the context (pmax + j + 1)
                    # is within the window every layer's keys grow, after it only the full layers' do.
                    # The loop above cost ~8,000 step_time calls per batch (gemma-2, 8k context): 1,000,000
                    # requests in ~220 s, now O(1) per batch.
                    j_c = min(steps, max(0, W - pmax))  # first step whose context exceeds W
                    a1, b1, a2, b2, c0 = roof.decode_lines(B, (F + Wl) * B * (pmax + 1), (F + Wl) * B)
                    t_dec = sum_max_lines(a1, b1, a2, b2, j_c) + c0 * j_c
                    a1, b1, a2, b2, c0 = roof.decode_lines(B, B * (F * (pmax + 1 + j_c) + Wl * W), F * B)
                    t_dec += sum_max_lines(a1, b1, a2, b2, steps - j_c) + c0 * (steps - j_c)
                else:
                    layers = F + Wl
                    a1, b1, a2, b2, c0 = roof.decode_lines(B, layers * B * (pmax + 1), layers * B)
                    t_dec = sum_max_lines(a1, b1, a2, b2, steps) + c0 * steps
            else:
                t_dec = 0.0
            t_first = now + t_pre
            self.now = t_end = t_first + t_dec
            for rid in batch:
                self.first[rid] = t_first
                self.finish[rid] = t_end
            self.done += B
            self.iterations += 1 + steps
            self.prefill_tokens += B * pmax
            self.decode_tokens += B * steps
            pad_pre = sum(pmax - prompt[r] for r in batch)
            self.padded_prefill += pad_pre
            self.padded_tokens += pad_pre + sum(omax - out[r] for r in batch)
            self.first_tokens += B
            self._sample()
            self.running = {}
            self.free = self.pool

    # ---- results -----------------------------------------------------------------------
    def _kv_stats(self, t0: float, t1: float) -> tuple[KVUtilisation, float]:
        ts, used, run = self.samples_t, self.samples_used, self.samples_run
        span = t1 - t0
        pool = self.pool or 1
        bins = [0.0] * TIMELINE_BINS
        width = span / TIMELINE_BINS if span > 0 else 1.0
        total = run_total = 0.0
        prev = t0
        mx = 0
        for t, u, r in zip(ts, used, run):
            dt = t - prev
            if dt > 0:
                total += u * dt
                run_total += r * dt
                b = int(((prev - t0) / 2 + (t - t0) / 2) / width)  # halves: prev + t overflows near 1e308
                bins[min(max(b, 0), TIMELINE_BINS - 1)] += u * dt
            if u > mx:
                mx = u
            prev = t
        if span <= 0:
            return KVUtilisation(mean=0.0, max=mx / pool, timeline=[0.0] * TIMELINE_BINS), 0.0
        kv = KVUtilisation(
            mean=round(total / span / pool, 4), max=round(mx / pool, 4),
            timeline=[round(b / width / pool, 4) for b in bins],
        )  # fmt: skip
        return kv, run_total / span

    def report(self, scheduler: str) -> SimulationReport:
        N = self.N
        arr, first, fin, out, prompt = self.arr, self.first, self.finish, self.out, self.prompt
        t0 = arr[0] if N else 0.0
        t1 = max(fin) if N else 0.0
        span = t1 - t0
        ttft = [first[i] - arr[i] for i in range(N)]
        e2e = [fin[i] - arr[i] for i in range(N)]
        tpot = [(fin[i] - first[i]) / (out[i] - 1) for i in range(N) if out[i] > 1]
        out_tok = sum(out)
        prompt_tok = sum(prompt)
        kv, mean_run = self._kv_stats(t0, t1)
        per_s = (lambda x: x / span) if span > 0 else (lambda x: 0.0)
        return SimulationReport(
            scheduler=scheduler, requests=N, duration_s=span, tokens_per_s=per_s(out_tok),
            total_tokens_per_s=per_s(out_tok + prompt_tok), requests_per_s=per_s(N),
            ttft_s=percentiles(ttft), tpot_s=percentiles(tpot), e2e_s=percentiles(e2e),
            preemptions=self.preemptions, preempted_requests=sum(1 for x in self.preempted if x),
            iterations=self.iterations, prefill_tokens=self.prefill_tokens, decode_tokens=self.decode_tokens,
            padded_tokens=self.padded_tokens,
            recomputed_tokens=self.prefill_tokens - self.padded_prefill - prompt_tok,
            mean_running=round(mean_run, 3), max_running=self.max_running, kv_utilisation=kv,
            output_tokens=out_tok, prompt_tokens=prompt_tok,
        )  # fmt: skip
