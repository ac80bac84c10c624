"""What to change when a plan does not fit, and how far a plan that fits could go.

Only the estimator runs here (pure Python, milliseconds per call), never a backend. Each candidate is
a whole new `Plan` (and, on many GPUs, layout) estimated from scratch by the same evaluator `fit`
uses, so a suggestion that says it fits does fit by the same rule.

Which changes apply follows from what the plan's technique reads (its `plan_fields`) and from the
models its workload trains, never from a technique's name: a technique that reads `grad_ckpt` gets
`--grad-ckpt`, one that reads `logprobs` gets the selective and fused log-prob programs, and so on.
Candidates, from the least to the most intrusive (the order suggestions are listed in, those that
fit first):
  0 `--attn sdpa` instead of eager (same math, no s^2 scores kept)
  1 `--grad-ckpt` (same math, one more forward of the layers)
  2 the same loss by a leaner program: `--logprobs selective|fused`, `--reference-pass before`,
    `--pair-forward separate`; `--optimizer adamw-8bit` (8-bit optimizer states)
  3 a smaller micro-batch: the largest that fits (bisection over the integers, so a batch of 10^30
    is answered at once); where the technique accumulates gradients, among the divisors of the
    global batch (batch x grad-accum), with grad-accum raised so the global batch stays the same
  4 `--precision bf16` (or fp16 on cards without bf16) instead of fp32 weights
  5 `--method lora`; frozen models elsewhere (`--frozen-placement offload|separate`), a 4-bit
    teacher (`--teacher-method qlora`), reference log-probs computed beforehand
  6 `--method qlora` instead of full or LoRA (for generation: 4-bit weights)
  7 shorter sequences (`--seq`, `--prompt-len`, `--new-tokens`) and smaller groups or mini-batches
    (`--group-size`, `--mini-batch`): the largest that fits, by bisection
  8 many GPUs: a higher ZeRO stage (or FSDP full-shard), CPU offload, tensor parallelism, more GPUs
When no single change fits, one combined suggestion is added (see `_combined`): the flag changes
that help at the smallest micro-batch, trimmed to those the plan needs, then the largest micro-batch
(and, if needed, the longest sequence) that fits with them.

`limits` answers the other question, for a plan that fits: the largest micro-batch and the longest
sequence (each length the technique reads) that still fit, everything else unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner import length_grid
from planner.specs import MAX_COUNT, Plan

Estimator = Callable[[Plan, Any], Any]
COMBINED_RANK = 10
LAYOUT_RANK = 8
# Exponential search for `limits` stops here: a plan that still fits at 2^62 sequences is reported
# as fitting "at least" that many (no real workload gets there: its inputs alone outgrow any card).
LIMIT_CAP = 1 << 62
# Divisors of the global batch are looked for this far below the largest fitting micro-batch
# before the suggestion keeps the micro-batch and rounds the accumulation up instead.
DIVISOR_SCAN = 1 << 18


@dataclass(frozen=True)
class Verdict:
    """What the evaluator says of one candidate."""

    peak_allocated_bytes: int
    device_bytes: int
    fits: bool


# (plan, layout fields) -> Verdict, or None when that combination is not a valid plan
Evaluator = Callable[[Plan, dict[str, Any]], "Verdict | None"]


class Suggestion(BaseModel):
    """One change to the plan and what the estimator says it costs."""

    model_config = ConfigDict(frozen=True)

    change: str = Field(description="the flags that make the change, e.g. '--grad-ckpt'")
    peak_allocated_bytes: int
    device_bytes: int
    fits: bool
    plan: Plan = Field(exclude=True, description="the changed plan (not serialized)")
    layout: dict[str, Any] = Field(default_factory=dict, exclude=True, description="the changed layout fields")
    rank: int = Field(default=0, exclude=True, description="how intrusive the change is (lower: smaller)")
    simulated: bool = Field(default=False, description="device_bytes and fits from the simulated caching allocator")

    @property
    def combined(self) -> bool:
        """Several changes at once (offered only when no single change fits)."""
        return self.rank == COMBINED_RANK

    def to_json(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device_bytes": self.device_bytes,
            "fits": self.fits,
            "simulated": self.simulated,
        }


class Limits(BaseModel):
    """How far a plan that fits goes: the largest value of each knob that still fits, the others
    unchanged. `None`: the knob does not apply; `at_least`: still fitting at the search's cap."""

    model_config = ConfigDict(frozen=True)

    max_batch: int | None = Field(default=None, description="largest micro-batch per GPU that fits")
    max_lengths: dict[str, int] = Field(default_factory=dict, description="longest seq / prompt_len / new_tokens that "
                                        "fits, on the length grid (a power-of-two step of at most 1/64 of it)")
    at_least: list[str] = Field(default_factory=list, description="knobs that still fit at the search's cap")


Result = tuple[Plan, dict[str, Any], Verdict]


class _Searcher:
    def __init__(self, evaluate: Evaluator, fields: set[str]):
        self.evaluate = evaluate
        self.fields = fields
        self._cache: dict[tuple, Result | None] = {}

    def run(self, base: Plan, update: dict[str, Any], layout: dict[str, Any] | None = None) -> Result | None:
        """Evaluate `base` with `update` applied (and `layout`); None if that plan is not valid."""
        data = base.model_dump()
        data.update(update)
        lay = dict(layout or {})
        key = (tuple(sorted(data.items())), tuple(sorted(lay.items())))
        if key in self._cache:
            return self._cache[key]
        try:
            new = Plan(**data)
        except (ValidationError, ValueError):
            self._cache[key] = None
            return None
        verdict = self.evaluate(new, lay)
        result = None if verdict is None else (new, lay, verdict)
        self._cache[key] = result
        return result

    def suggestion(self, change: str, res: Result, rank: int) -> Suggestion:
        plan, layout, v = res
        return Suggestion(change=change, peak_allocated_bytes=v.peak_allocated_bytes, device_bytes=v.device_bytes,
                          fits=v.fits, plan=plan, layout=layout, rank=rank)

    # -- searches over one integer knob -------------------------------------------------------
    def largest_fitting(self, lo: int, hi: int, attempt: Callable[[int], Result | None]) -> tuple[int, Result] | None:
        """Largest v in [lo, hi] whose plan fits (memory grows with v), by bisection over the
        integers; falls back to `lo` (not fitting) when none fits. None if `lo` is not valid."""
        best: tuple[int, Result] | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            res = attempt(mid)
            if res is not None and res[2].fits:
                best = (mid, res)
                lo = mid + 1
            else:
                hi = mid - 1
        return best

    def smaller(self, base: Plan, layout: dict, field: str, floor: int, flag: str,
                gridded: bool = False) -> tuple[str, Result] | None:
        """The largest value of `field` below the current one (>= floor) that fits, or `floor`;
        `gridded`: the largest on the length grid (planner.length_grid)."""
        current = getattr(base, field)
        if current is None or current <= floor:
            return None
        found = self.largest_fitting(floor, current - 1, lambda v: self.run(base, {field: v}, layout))
        if found is None:
            res = self.run(base, {field: floor}, layout)
            return None if res is None else (f"{flag} {floor}", res)
        if gridded and (v := max(length_grid.floor(found[0]), floor)) != found[0]:
            res = self.run(base, {field: v}, layout)
            if res is not None:
                found = (v, res)
        return f"{flag} {found[0]}", found[1]

    def batch_change(self, base: Plan, layout: dict) -> tuple[str, Result] | None:
        if base.batch <= 1:
            return None
        if "grad_accum" not in self.fields:
            return self.smaller(base, layout, "batch", 1, "--batch")
        total = base.batch * base.grad_accum

        def attempt(b: int) -> Result | None:
            return self.run(base, {"batch": b, "grad_accum": -(-total // b)}, layout)

        found = self.largest_fitting(1, base.batch - 1, attempt)
        b = found[0] if found is not None else 1
        d = _largest_divisor_at_most(total, b)
        res = self.run(base, {"batch": d, "grad_accum": total // d}, layout) if d else attempt(b)
        if res is None:
            return None
        p = res[0]
        return f"--batch {p.batch} --grad-accum {p.grad_accum}", res

    def length_change(self, base: Plan, layout: dict, field: str, flag: str) -> tuple[str, Result] | None:
        """Largest length on the length grid that fits, by bisection below the current one (memory grows
        with length)."""
        return self.smaller(base, layout, field, 1, flag, gridded=True)


def _largest_divisor_at_most(n: int, limit: int) -> int | None:
    """The largest divisor of n that is <= limit, looked for in the DIVISOR_SCAN values below
    limit (and among n's small cofactors); None if none is found there."""
    for d in range(limit, max(0, limit - DIVISOR_SCAN), -1):
        if n % d == 0:
            return d
    for q in range(-(-n // limit), -(-n // limit) + DIVISOR_SCAN):
        if n % q == 0 and n // q <= limit:
            return n // q
    return None


# ---- the candidates -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One candidate: its rank (how intrusive), flags, and the Plan fields (or, for a layout change,
    the layout fields; None removes one) it sets. Changes of one `group` are alternatives tried in
    order: the first that fits is offered, or the lowest if none fits (more GPUs: the fewest)."""

    rank: int
    label: str
    update: dict[str, Any]
    group: str | None = None


def plan_changes(plan: Plan, fields: set[str], trains: bool, bf16_supported: bool) -> list[Change]:
    """Every single flag change that applies to the plan's technique and is not already made."""
    out: list[Change] = []
    if plan.attn == "eager":
        out.append(Change(0, "--attn sdpa", {"attn": "sdpa"}))
    if "grad_ckpt" in fields and not plan.grad_ckpt:
        out.append(Change(1, "--grad-ckpt", {"grad_ckpt": True}))
    if "logprobs" in fields and plan.logprobs == "full":
        out.append(Change(2, "--logprobs selective", {"logprobs": "selective"}))
        out.append(Change(2, "--logprobs fused", {"logprobs": "fused"}))
    if "reference_pass" in fields and plan.reference_pass == "after" and plan.ref_logprobs == "model":
        out.append(Change(2, "--reference-pass before", {"reference_pass": "before"}))
    if "pair_forward" in fields and plan.pair_forward == "concatenated":
        out.append(Change(2, "--pair-forward separate", {"pair_forward": "separate"}))
    if "optimizer" in fields and plan.optimizer in ("adamw", "adamw-fused"):
        out.append(Change(2, "--optimizer adamw-8bit", {"optimizer": "adamw-8bit"}))
    if plan.precision == "fp32":
        half = "bf16" if bf16_supported else "fp16"
        out.append(Change(4, f"--precision {half}", {"precision": half}))
    if trains and plan.method == "full":
        out.append(Change(5, "--method lora", {"method": "lora"}))
    if "frozen_placement" in fields and plan.frozen_placement == "resident":
        out.append(Change(5, "--frozen-placement offload", {"frozen_placement": "offload"}))
        out.append(Change(5, "--frozen-placement separate", {"frozen_placement": "separate"}))
    if "teacher_method" in fields and plan.teacher_method == "full":
        out.append(Change(5, "--teacher-method qlora", {"teacher_method": "qlora"}))
    if "ref_logprobs" in fields and plan.ref_logprobs == "model":
        out.append(Change(5, "--ref-logprobs precomputed", {"ref_logprobs": "precomputed"}))
    if plan.method != "qlora" and (trains or plan.method == "full"):
        out.append(Change(6, "--method qlora", {"method": "qlora"}))
    return out


# the lengths a technique may read, in the order they are shortened
LENGTH_FIELDS: tuple[tuple[str, str], ...] = (("seq", "--seq"), ("new_tokens", "--new-tokens"),
                                               ("prompt_len", "--prompt-len"))
# other sizes a technique may read that trade memory for its algorithm's statistics: (field, flag, floor)
SIZE_FIELDS: tuple[tuple[str, str, int], ...] = (("group_size", "--group-size", 2), ("mini_batch", "--mini-batch", 1))


def _lengths(fields: set[str]) -> list[tuple[str, str]]:
    return [(f, flag) for f, flag in LENGTH_FIELDS if f in fields]


def technique_facts(plan: Plan, model: Any) -> tuple[set[str], bool]:
    """(the Plan fields the plan's technique reads, whether its workload trains a model)."""
    from planner.plugins import technique

    tech = technique(plan.task)
    fields = set(tech.plan_fields)
    try:
        trains = any(m.trainable for m in tech.workload(plan, model).models)
    except Exception:  # noqa: BLE001 - a workload that cannot be built for this plan trains nothing we can change
        trains = "optimizer" in fields
    return fields, trains


def suggest(
    plan: Plan,
    model: Any,
    capacity_bytes: int | None = None,
    estimate: Estimator | None = None,
    bf16_supported: bool = True,
    combine: bool = True,
    evaluate: Evaluator | None = None,
    layout: dict[str, Any] | None = None,
    layout_changes: list[Change] | None = None,
) -> list[Suggestion]:
    """Single changes that shrink the plan, re-estimated; fitting ones first, smallest change first.

    One GPU: `capacity_bytes` is the card's memory (what device_bytes must fit) and `estimate(plan,
    model)` the engine's estimate (default: planner.engine.estimate). Many GPUs: `evaluate(plan,
    layout)` judges a candidate, `layout` is the plan's layout fields and `layout_changes` the layout
    changes to try (see `layout_changes`). A change is offered only if it lowers device_bytes.
    """
    if evaluate is None:
        evaluate = single_gpu_evaluator(model, capacity_bytes, estimate)
    layout = dict(layout or {})
    fields, trains = technique_facts(plan, model)
    s = _Searcher(evaluate, fields)
    base = s.run(plan, {}, layout)
    if base is None:
        return []
    base_device = base[2].device_bytes
    out: list[Suggestion] = []
    changes = plan_changes(plan, fields, trains, bf16_supported)

    def add(change: str, res: Result | None, rank: int) -> None:
        if res is None or res[2].device_bytes >= base_device:
            return
        out.append(s.suggestion(change, res, rank))

    for c in changes:
        add(c.label, s.run(plan, c.update, layout), c.rank)
    bc = s.batch_change(plan, layout)
    if bc is not None:
        add(bc[0], bc[1], 3)
    for field, flag in _lengths(fields):
        lc = s.length_change(plan, layout, field, flag)
        if lc is not None:
            add(lc[0], lc[1], 7)
    for field, flag, floor in SIZE_FIELDS:
        if field in fields:
            sc = s.smaller(plan.model_copy(update={field: getattr(plan, field) or plan.batch}), layout, field, floor, flag)
            if sc is not None:
                add(sc[0], sc[1], 7)
    groups: dict[str, list[Suggestion]] = {}
    for c in layout_changes or []:
        res = s.run(plan, {}, {**layout, **c.update})
        if c.group is None:
            add(c.label, res, c.rank)
        elif res is not None and res[2].device_bytes < base_device:
            groups.setdefault(c.group, []).append(s.suggestion(c.label, res, c.rank))
    for alternatives in groups.values():
        fitting = [x for x in alternatives if x.fits]
        out.append(fitting[0] if fitting else min(alternatives, key=lambda x: x.device_bytes))

    if combine and not any(x.fits for x in out):
        combo = _combined(s, plan, layout, changes, _lengths(fields))
        if combo is not None:
            out.append(combo)

    out.sort(key=lambda x: (not x.fits, x.rank, x.device_bytes))
    return out


def single_gpu_evaluator(model: Any, capacity_bytes: int | None, estimate: Estimator | None = None) -> Evaluator:
    """Judge a plan on one card: the engine's device figure against `capacity_bytes`."""
    if capacity_bytes is None:
        raise ValueError("suggest: give capacity_bytes (one GPU) or an evaluator (many GPUs)")
    if estimate is None:
        from planner.engine import estimate as engine_estimate

        estimate = engine_estimate

    def evaluate(p: Plan, _layout: dict[str, Any]) -> Verdict | None:
        try:
            est = estimate(p, model)
        except ValueError:
            return None
        return Verdict(est.peak_allocated_bytes, est.device_bytes, est.device_bytes <= capacity_bytes)

    return evaluate


def _combined(s: _Searcher, plan: Plan, layout: dict, cheap: list[Change], length_fields) -> Suggestion | None:
    """Several changes together, for when no single one fits.

    1. At the smallest micro-batch (grad-accum raised to keep the global batch), take the flag
       changes in order, keeping each that lowers the estimate (QLoRA replaces LoRA when lower),
       until the plan fits; if the flags are not enough, shorten the sequence too.
    2. Drop every flag change the plan still fits without (most intrusive first).
    3. Raise the micro-batch back to the largest that fits with the changes kept.
    """
    reduced: dict[str, Any] = {}
    if plan.batch > 1:
        reduced = {"batch": 1, "grad_accum": plan.batch * plan.grad_accum} if "grad_accum" in s.fields else {"batch": 1}
    flags: dict[str, Any] = {}
    labels: dict[str, str] = {}
    res = s.run(plan, reduced, layout)
    if res is None:
        return None
    ordered = sorted(cheap, key=lambda c: c.rank)
    for c in ordered:
        if res[2].fits:
            break
        trial = s.run(plan, {**reduced, **flags, **c.update}, layout)
        if trial is not None and trial[2].device_bytes < res[2].device_bytes:
            flags.update(c.update)
            labels.update({k: c.label for k in c.update})
            res = trial
    lengths: dict[str, int] = {}
    length_labels: list[str] = []
    for field, flag in length_fields:
        if res[2].fits:
            break
        lc = s.length_change(res[0], layout, field, flag)
        if lc is not None and lc[1][2].device_bytes < res[2].device_bytes:
            lengths[field] = getattr(lc[1][0], field)
            length_labels.append(lc[0])
            res = lc[1]
    if not res[2].fits:
        return None
    rank_of = {c.label: c.rank for c in cheap}
    for key in sorted(flags, key=lambda k: -rank_of[labels[k]]):
        trimmed = {k: v for k, v in flags.items() if k != key}
        trial = s.run(plan, {**reduced, **trimmed, **lengths}, layout)
        if trial is not None and trial[2].fits:
            flags = trimmed
            labels.pop(key)
            res = trial
    parts = [c.label for c in ordered if c.label in labels.values()]
    full_batch = s.run(plan, {**flags, **lengths}, layout)
    if full_batch is not None and full_batch[2].fits:
        res = full_batch
    elif reduced:
        bc = s.batch_change(full_batch[0], layout) if full_batch is not None else None
        if bc is not None and bc[1][2].fits:
            parts.append(bc[0])
            res = bc[1]
    parts += length_labels
    if not res[2].fits or len(parts) < 2:
        return None
    return s.suggestion(" ".join(dict.fromkeys(parts)), res, COMBINED_RANK)


MAX_GPUS_SUGGESTED = 4096


def layout_changes(layout: Any, fields: dict[str, Any], spec: Any) -> list[Change]:
    """Layout changes to try for a plan on many GPUs (`layout`: its planner.engine.distributed.Layout, `fields`
    what the user gave): a higher sharding stage in the same engine, CPU offload, tensor parallelism
    inside a node (keeping the global batch), and more GPUs (the fewest doublings that fit, keeping
    the micro-batch and the accumulation)."""
    out: list[Change] = []
    st, engine = layout.stage, layout.engine_name
    if layout.fsdp is None and engine == "deepspeed":
        out += [Change(LAYOUT_RANK, f"--zero {z}", {"zero": z}) for z in range(st + 1, 4)]
    elif layout.fsdp is None:  # torch DDP: FSDP shards, or DeepSpeed's stages
        out += [Change(LAYOUT_RANK, "--fsdp shard-grad-op", {"fsdp": "shard-grad-op", "zero": None}),
                Change(LAYOUT_RANK, "--fsdp full-shard", {"fsdp": "full-shard", "zero": None})]
        if fields.get("engine") is None:
            out += [Change(LAYOUT_RANK, f"--zero {z}", {"zero": z}) for z in range(max(st, 0) + 1, 4)]
    elif layout.fsdp == "shard-grad-op":
        out.append(Change(LAYOUT_RANK, "--fsdp full-shard", {"fsdp": "full-shard"}))
    if layout.offload == "none" and st >= 1 and layout.fsdp is None:
        out.append(Change(LAYOUT_RANK, "--offload optimizer", {"offload": "optimizer"}))
    if st == 3 and layout.offload != "optimizer+params":
        out.append(Change(LAYOUT_RANK, "--offload optimizer+params", {"offload": "optimizer+params"}))
    for t in (2, 4, 8):
        if t > layout.tp and t % layout.tp == 0 and t <= layout.per_node and layout.gpus % (t * layout.pp) == 0:
            out.append(Change(LAYOUT_RANK, f"--tp {t}", {"tp": t, "global_batch": layout.batch}))
    if st >= 1:  # without sharding, more GPUs do not lower a rank's memory
        n = layout.gpus * 2
        while n <= MAX_GPUS_SUGGESTED:
            out.append(Change(LAYOUT_RANK + 1, f"--gpus {n}", {"gpus": n, "global_batch": None}, group="gpus"))
            n *= 2
    return out


# ---- how far a fitting plan goes ----------------------------------------------------------------
def limits(plan: Plan, model: Any, evaluate: Evaluator, layout: dict[str, Any] | None = None,
           fits: bool | None = None) -> Limits:
    """The largest micro-batch and the longest sequence (each length the technique reads) that
    still fit, each with everything else unchanged: doubling until the plan stops fitting, then
    bisection between the last fitting and the first failing value. A length is stated on the length
    grid (planner.length_grid: at most 1/64 below the exact one), or the plan's own when none above
    it on the grid fits. `fits`: the caller's verdict on the plan itself where it has a better one
    than `evaluate`'s (the simulated allocator's, whose free-and-retry can run a step whose reserved on
    an unlimited card exceeds the card); None: `evaluate`'s."""
    layout = dict(layout or {})
    fields, _ = technique_facts(plan, model)
    s = _Searcher(evaluate, fields)
    at_least: list[str] = []

    def grow(field: str) -> int | None:
        current = getattr(plan, field)
        base = s.run(plan, {}, layout)
        if base is None or not (base[2].fits if fits is None else fits):
            return None
        lo, hi = current, None
        step = max(current, 1)
        while hi is None:
            nxt = min(lo + step, LIMIT_CAP, MAX_COUNT)
            res = s.run(plan, {field: nxt}, layout)
            if res is None or not res[2].fits:
                hi = nxt - 1
            elif nxt >= min(LIMIT_CAP, MAX_COUNT):
                at_least.append(field)
                return nxt
            else:
                lo, step = nxt, step * 2
        found = s.largest_fitting(lo, hi, lambda v: s.run(plan, {field: v}, layout))
        best = found[0] if found is not None else lo
        # a length is stated on the length grid (never below the plan's own value, which fits)
        return best if field == "batch" else max(length_grid.floor(best), current)

    max_batch = grow("batch")
    lengths = {f: v for f, _ in _lengths(fields) if (v := grow(f)) is not None}
    return Limits(max_batch=max_batch, max_lengths=lengths, at_least=at_least)
