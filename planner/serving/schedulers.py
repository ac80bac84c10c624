"""Batch schedulers, as a registry: `SCHEDULERS[name]` is a class, `register_scheduler(name, cls)` adds one.

A scheduler decides, before each engine iteration, which prefill chunks run and whether the
running sequences decode one token. It works through the simulator's primitives (the waiting
deque, `start_prefill`, `preempt_last`, `blocks`, `decode_need`, `free`), and returns
`(chunks, decode)`: a list of `(request, tokens)` prefill chunks and a bool. The simulator runs
the iteration, and when a scheduler answers "decode only" it advances many identical iterations
at once until something changes (a completion, a free-block shortage, or, when
`arrival_sensitive` says an arrival could be admitted, the next arrival).

A scheduler that is not iteration-level (static batching) overrides `run(sim)` instead.

Built in:
- `static` — request-level batching (HF `generate` on padded batches; Orca's baseline): when the
  engine is idle, take up to max_num_seqs waiting requests whose padded batch fits the cache
  (batch x (longest prompt + longest output)), prefill them padded to the longest prompt, decode
  until the longest output is done; every request returns when its batch ends.
- `continuous` — iteration-level batching without chunking (Orca; vLLM V0's default scheduler):
  whole prompts join between iterations when blocks allow (1 % watermark), prefill iterations run
  alone and stall the decodes, a running sequence that cannot get a block preempts the most
  recently admitted one (recompute).
- `chunked-prefill` — vLLM V1's scheduler: each iteration has a budget of
  max_num_batched_tokens; decodes first (one token each), then partial prefills, then new
  requests (FCFS), prompts split into chunks to fill the budget; preemption by recompute of the
  most recently admitted request when blocks run out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from planner.serving.simulator import Simulator

Chunks = list[tuple[int, int]]


class Scheduler:
    """Base class: iteration-level scheduling through `schedule`; override `run` for anything else."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def schedule(self, sim: Simulator) -> tuple[Chunks, bool]:
        raise NotImplementedError

    def arrival_sensitive(self, sim: Simulator) -> bool:
        """Could a request arriving now be admitted before the next completion? (True is always safe.)"""
        return True

    def run(self, sim: Simulator) -> None:
        sim.iterate(self)


def _preempt_until(sim: Simulator, blocks_needed: int) -> bool:
    """Preempt the most recently admitted requests until the decodes and `blocks_needed` fit. True if any."""
    any_ = False
    while sim.decode_need() + blocks_needed > sim.free and sim.running:
        sim.preempt_last()
        any_ = True
    return any_


class ContinuousBatching(Scheduler):
    name = "continuous"
    description = "iteration-level batching, whole-prompt prefill iterations (Orca, vLLM V0)"
    WATERMARK = 0.01  # vLLM V0 BlockSpaceManager watermark: keep 1 % of blocks free when admitting

    def schedule(self, sim: Simulator) -> tuple[Chunks, bool]:
        waiting = sim.waiting
        if waiting and len(sim.running) < sim.max_num_seqs:
            budget = max(sim.max_num_batched_tokens, sim.max_model_len)
            free = sim.free - (int(self.WATERMARK * sim.pool) if sim.running else 0)
            chunks: Chunks = []
            target = sim.target
            while waiting and len(sim.running) < sim.max_num_seqs:
                rid = waiting[0]
                c = target[rid]
                if c > budget:
                    break
                nb = sim.blocks(c)
                if nb > free:
                    break
                waiting.popleft()
                sim.start_prefill(rid)
                chunks.append((rid, c))
                budget -= c
                free -= nb
            if chunks:
                return chunks, False
        _preempt_until(sim, 0)
        return [], True

    def arrival_sensitive(self, sim: Simulator) -> bool:
        return not sim.waiting and len(sim.running) < sim.max_num_seqs


class ChunkedPrefill(Scheduler):
    name = "chunked-prefill"
    description = "iteration-level batching with a token budget, decodes first, prompts in chunks (vLLM V1)"

    def schedule(self, sim: Simulator) -> tuple[Chunks, bool]:
        preempted = _preempt_until(sim, 0)
        budget = sim.max_num_batched_tokens - sim.n_dec
        chunks: Chunks = []
        reserved = 0
        blocks = sim.blocks
        if sim.prefilling:
            for rid in list(sim.prefilling):
                if budget <= 0:
                    break
                if rid not in sim.prefilling:  # preempted below by an earlier request of this step
                    continue
                d = sim.prefilling[rid]
                c = min(sim.target[rid] - d, budget)
                nb = blocks(d + c) - blocks(d)
                while sim.decode_need() + reserved + nb > sim.free and sim.running:
                    victim = sim.preempt_last()
                    preempted = True
                    if victim == rid:
                        break
                if rid not in sim.prefilling:
                    break
                chunks.append((rid, c))
                budget -= c
                reserved += nb
        if not preempted:
            waiting = sim.waiting
            target = sim.target
            free = sim.free - sim.decode_need() - reserved
            while waiting and budget > 0 and len(sim.running) < sim.max_num_seqs:
                rid = waiting[0]
                c = target[rid]
                if c > budget:
                    c = budget
                nb = blocks(c)
                if nb > free:
                    break
                waiting.popleft()
                sim.start_prefill(rid)
                chunks.append((rid, c))
                budget -= c
                free -= nb
        return chunks, True

    def arrival_sensitive(self, sim: Simulator) -> bool:
        return not sim.waiting and len(sim.running) < sim.max_num_seqs


class StaticBatching(Scheduler):
    name = "static"
    description = "request-level batching: padded batches run to their longest output (HF generate)"

    def run(self, sim: Simulator) -> None:
        sim.run_static()


SCHEDULERS: dict[str, type[Scheduler]] = {}


def register_scheduler(name: str, cls: type[Scheduler]) -> None:
    """Make `cls` available as `--scheduler name` (a plugin may add its own)."""
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise TypeError(f"register_scheduler: {cls!r} is not a Scheduler subclass")
    SCHEDULERS[name] = cls


for _cls in (StaticBatching, ContinuousBatching, ChunkedPrefill):
    register_scheduler(_cls.name, _cls)

DEFAULT_SCHEDULER = "chunked-prefill"


def get_scheduler(name: str) -> Scheduler:
    from planner.errors import did_you_mean
    from planner.serving.specs import ServeInputError

    cls = SCHEDULERS.get(name)
    if cls is None:
        hint = did_you_mean(name, SCHEDULERS) or f" (known: {', '.join(SCHEDULERS)})"
        raise ServeInputError(f"scheduler: unknown scheduler '{name}'{hint}")
    return cls()
