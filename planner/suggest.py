"""What to change when a plan does not fit: the smallest single changes, each re-estimated.

Only the estimator runs here (pure Python, milliseconds per call), never a backend. Each candidate is
a whole new `Plan` (validated) estimated from scratch, so a suggestion that says it fits does fit by
the same rule `fit` uses: `device_bytes <= gpu.memory_bytes`.

Candidates, from the least to the most intrusive (the order suggestions are listed in, those that
fit first):
  0 `--attn sdpa` instead of eager (same math, no s^2 scores kept)
  1 `--grad-ckpt` (same math, ~30% more compute)
  2 `--optimizer adamw-8bit` (8-bit optimizer states)
  3 a smaller micro-batch: the largest that fits; for training, among the divisors of the global
    batch (batch x grad-accum), with grad-accum raised so the global batch stays exactly the same
  4 `--precision bf16` (or fp16 on cards without bf16) instead of fp32 weights
  5 `--method lora` instead of full fine-tuning
  6 `--method qlora` instead of full or LoRA (for generation: 4-bit weights)
  7 shorter sequences (`--seq`, `--prompt-len`, `--new-tokens`): the largest that fits, found by
    halving and then refining between the last failing and the first fitting length
When no single change fits, one combined suggestion is added (see `_combined`): the flag changes
that help at the smallest micro-batch, trimmed to those the plan needs, then the largest micro-batch
(and, if needed, the longest sequence) that fits with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.specs import Plan

Estimator = Callable[[Plan, Any], Any]
COMBINED_RANK = 10


class Suggestion(BaseModel):
    """One change to the plan and what the estimator says it costs."""

    model_config = ConfigDict(frozen=True)

    change: str = Field(description="the flags that make the change, e.g. '--grad-ckpt'")
    peak_allocated_bytes: int
    device_bytes: int
    fits: bool
    plan: Plan = Field(exclude=True, description="the changed plan (not serialized)")
    rank: int = Field(default=0, exclude=True, description="how intrusive the change is (lower: smaller)")

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
        }


class _Searcher:
    def __init__(self, plan: Plan, model: Any, capacity: int, estimate: Estimator):
        self.plan = plan
        self.model = model
        self.capacity = capacity
        self.estimate = estimate
        self._cache: dict[tuple, tuple[Plan, Any] | None] = {}

    def run(self, base: Plan, update: dict[str, Any]) -> tuple[Plan, Any] | None:
        """Estimate `base` with `update` applied; None if that plan is not valid."""
        data = base.model_dump()
        data.update(update)
        key = tuple(sorted(data.items(), key=lambda kv: kv[0]))
        if key in self._cache:
            return self._cache[key]
        try:
            new = Plan(**data)
        except ValidationError:
            self._cache[key] = None
            return None
        result = (new, self.estimate(new, self.model))
        self._cache[key] = result
        return result

    def fits(self, est: Any) -> bool:
        return est.device_bytes <= self.capacity

    def suggestion(self, change: str, res: tuple[Plan, Any], rank: int) -> Suggestion:
        plan, est = res
        return Suggestion(
            change=change,
            peak_allocated_bytes=est.peak_allocated_bytes,
            device_bytes=est.device_bytes,
            fits=self.fits(est),
            plan=plan,
            rank=rank,
        )

    # -- searches over one integer knob -------------------------------------------------------
    def largest_fitting(self, base: Plan, values: list[int], update: Callable[[int], dict]) -> tuple[int, tuple] | None:
        """Largest value in ascending `values` whose plan fits (memory grows with the value);
        falls back to the smallest value (not fitting) when none fits. None if nothing is valid."""
        lo, hi = 0, len(values) - 1
        best: tuple[int, tuple] | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            res = self.run(base, update(values[mid]))
            if res is not None and self.fits(res[1]):
                best = (values[mid], res)
                lo = mid + 1
            else:
                hi = mid - 1
        if best is None and values:
            res = self.run(base, update(values[0]))
            if res is not None:
                best = (values[0], res)
        return best

    def batch_change(self, base: Plan) -> tuple[str, tuple] | None:
        if base.batch <= 1:
            return None
        if base.task == "sft":
            total = base.batch * base.grad_accum
            values = [d for d in range(1, base.batch) if total % d == 0]
            found = self.largest_fitting(base, values, lambda b: {"batch": b, "grad_accum": total // b})
            if found is None:
                return None
            b, res = found
            return f"--batch {b} --grad-accum {total // b}", res
        found = self.largest_fitting(base, list(range(1, base.batch)), lambda b: {"batch": b})
        if found is None:
            return None
        b, res = found
        return f"--batch {b}", res

    def length_change(self, base: Plan, field: str, flag: str, floor: int = 16) -> tuple[str, tuple] | None:
        """Largest length that fits: halve until one fits, then refine between it and its double."""
        current = getattr(base, field)
        if current <= 1:
            return None
        tried_fail = current
        value = current // 2
        last: tuple[int, tuple] | None = None
        while value >= 1:
            res = self.run(base, {field: value})
            if res is None:
                break
            last = (value, res)
            if self.fits(res[1]):
                break
            tried_fail = value
            if value <= floor:
                break
            value //= 2
        if last is None:
            return None
        value, res = last
        if self.fits(res[1]) and tried_fail > value:
            step = 1
            while step * 2 <= value // 16:
                step *= 2
            values = list(range(value, tried_fail, step))
            found = self.largest_fitting(base, values, lambda v: {field: v})
            if found is not None and self.fits(found[1][1]):
                value, res = found
        return f"{flag} {value}", res


def suggest(
    plan: Plan,
    model: Any,
    capacity_bytes: int,
    estimate: Estimator | None = None,
    bf16_supported: bool = True,
    combine: bool = True,
) -> list[Suggestion]:
    """Single changes that shrink the plan, re-estimated; fitting ones first, smallest change first.

    `capacity_bytes` is the card's memory (what device_bytes must fit). `estimate` defaults to the
    engine's. A change is offered only if it lowers device_bytes.
    """
    if estimate is None:
        from planner.engine import estimate as engine_estimate

        estimate = engine_estimate
    s = _Searcher(plan, model, capacity_bytes, estimate)
    base = s.run(plan, {})
    if base is None:
        return []
    base_device = base[1].device_bytes
    out: list[Suggestion] = []
    cheap: list[tuple[int, str, dict]] = []  # every single flag change tried, for the combined suggestion

    def add(change: str, res: tuple | None, rank: int) -> None:
        if res is None or res[1].device_bytes >= base_device:
            return
        out.append(s.suggestion(change, res, rank))

    def single(update: dict, change: str, rank: int) -> None:
        cheap.append((rank, change, update))
        add(change, s.run(plan, update), rank)

    train = plan.task == "sft"
    if plan.attn == "eager":
        single({"attn": "sdpa"}, "--attn sdpa", 0)
    if train and not plan.grad_ckpt:
        single({"grad_ckpt": True}, "--grad-ckpt", 1)
    if train and plan.optimizer in ("adamw", "adamw-fused"):
        single({"optimizer": "adamw-8bit"}, "--optimizer adamw-8bit", 2)
    bc = s.batch_change(plan)
    if bc is not None:
        add(bc[0], bc[1], 3)
    if plan.precision == "fp32":
        half = "bf16" if bf16_supported else "fp16"
        single({"precision": half}, f"--precision {half}", 4)
    if train and plan.method == "full":
        single({"method": "lora"}, "--method lora", 5)
    if plan.method != "qlora" and (train or plan.method == "full"):
        single({"method": "qlora"}, "--method qlora", 6)
    length_fields = [("seq", "--seq")] if train else [("new_tokens", "--new-tokens"), ("prompt_len", "--prompt-len")]
    for field, flag in length_fields:
        lc = s.length_change(plan, field, flag)
        if lc is not None:
            add(lc[0], lc[1], 7)

    if combine and not any(x.fits for x in out):
        combo = _combined(s, plan, cheap, length_fields)
        if combo is not None:
            out.append(combo)

    out.sort(key=lambda x: (not x.fits, x.rank, x.device_bytes))
    return out


def _combined(s: _Searcher, plan: Plan, cheap: list[tuple[int, str, dict]], length_fields) -> Suggestion | None:
    """Several changes together, for when no single one fits.

    1. At the smallest micro-batch (grad-accum raised to keep the global batch), take the flag
       changes in order, keeping each that lowers the estimate (QLoRA replaces LoRA when lower),
       until the plan fits; if the flags are not enough, shorten the sequence too.
    2. Drop every flag change the plan still fits without (most intrusive first).
    3. Raise the micro-batch back to the largest that fits with the changes kept.
    """
    reduced: dict[str, Any] = {}
    if plan.batch > 1:
        reduced = {"batch": 1, "grad_accum": plan.batch * plan.grad_accum} if plan.task == "sft" else {"batch": 1}
    flags: dict[str, Any] = {}
    labels: dict[str, str] = {}
    res = s.run(plan, reduced)
    if res is None:
        return None
    for _, change, upd in sorted(cheap, key=lambda c: c[0]):
        if s.fits(res[1]):
            break
        trial = s.run(plan, {**reduced, **flags, **upd})
        if trial is not None and trial[1].device_bytes < res[1].device_bytes:
            flags.update(upd)
            labels.update({k: change for k in upd})
            res = trial
    lengths: dict[str, int] = {}
    length_labels: list[str] = []
    for field, flag in length_fields:
        if s.fits(res[1]):
            break
        lc = s.length_change(res[0], field, flag)
        if lc is not None and lc[1][1].device_bytes < res[1].device_bytes:
            lengths[field] = getattr(lc[1][0], field)
            length_labels.append(lc[0])
            res = lc[1]
    if not s.fits(res[1]):
        return None
    for key in sorted(flags, key=lambda k: -next(r for r, c, _ in cheap if c == labels[k])):
        trimmed = {k: v for k, v in flags.items() if k != key}
        trial = s.run(plan, {**reduced, **trimmed, **lengths})
        if trial is not None and s.fits(trial[1]):
            flags = trimmed
            labels.pop(key)
            res = trial
    parts = [c for _, c, _ in sorted(cheap, key=lambda c: c[0]) if c in labels.values()]
    full_batch = s.run(plan, {**flags, **lengths})
    if full_batch is not None and s.fits(full_batch[1]):
        res = full_batch
    elif reduced:
        bc = s.batch_change(full_batch[0]) if full_batch is not None else None
        if bc is not None and s.fits(bc[1][1]):
            parts.append(bc[0])
            res = bc[1]
    parts += length_labels
    if not s.fits(res[1]) or len(parts) < 2:
        return None
    return s.suggestion(" ".join(parts), res, COMBINED_RANK)
