"""`planner plan`: the best plan that fits, across the knobs a user has not pinned.

The space: method x precision x optimizer x checkpointing x GPU count (1, 2, 4... up to a node, then
whole nodes) x TP x PP x model-state sharding (DDP, ZeRO 1-3 in DeepSpeed, FSDP full-shard or
shard-grad-op in torch) x CPU offload x micro-batch (powers of two dividing the global batch per
data-parallel rank; the accumulation follows); pipeline stages: powers of two and the divisors of the
layer count (Megatron's 105-layer 530B runs 35 stages), each with the 1F1B schedule and the interleaved
one at 2 and 4 model chunks per stage. Every candidate is priced by the engine itself
(planner.engine.distributed.estimate_distributed: per-rank memory, collectives, step time); what the
search skips it counts, and says why:
- regions a measured candidate dominates, before they are evaluated: the micro-batches above the first
  that does not fit (memory grows with the micro-batch at fixed everything else), the plans without
  checkpointing where the smallest micro-batch with it does not fit, precision mixed-* and plain adamw
  where bf16 and adamw-fused hold less and run faster (unless pinned);
- invalid layouts (TP that does not divide the heads, more stages than layers, a GPU count that is not
  TP x PP x DP).
The finalists (the top plans and the Pareto front) are re-estimated alone through `planner fit`'s own
path (the simulated caching allocator where one GPU is traced) and dropped when that verdict says
they do not fit.

Objectives: tokens-per-s (the most trained tokens per second), gpus (the fewest GPUs, then the
fastest), headroom (the most free memory on the busiest rank), cost (the least GPU-hour cost per
million trained tokens; prices from `--price CARD=USD_PER_HOUR`, the catalog lists none).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, Field

from planner.errors import PlannerInputError, did_you_mean
from planner.specs import Plan

OBJECTIVES = ("tokens-per-s", "gpus", "headroom", "cost")
METHODS = ("full", "lora", "qlora")
SHARDINGS: dict[str, dict[str, Any]] = {
    "ddp": {}, "zero1": {"zero": 1}, "zero2": {"zero": 2}, "zero3": {"zero": 3},
    "fsdp": {"fsdp": "full-shard"}, "fsdp-grad-op": {"fsdp": "shard-grad-op"},
}


class SearchError(PlannerInputError):
    """A search that cannot run (message: one line)."""


class Candidate(BaseModel):
    """One plan of the space, as the engine priced it."""

    plan: dict[str, Any]
    layout: dict[str, Any]
    gpus: int
    fits: bool
    device_bytes: int
    gpu_memory_bytes: int
    tokens_per_s: float
    step_s: float
    mfu: float | None = None
    cost_per_mtok: float | None = None
    engine: str = ""

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_memory_bytes - self.device_bytes

    def key(self, objective: str) -> tuple:
        """Smaller is better."""
        if objective == "gpus":
            return (self.gpus, -self.tokens_per_s)
        if objective == "headroom":
            return (-self.headroom_bytes, -self.tokens_per_s)
        if objective == "cost":
            return (self.cost_per_mtok if self.cost_per_mtok is not None else float("inf"), -self.tokens_per_s)
        return (-self.tokens_per_s, self.gpus)

    @property
    def grad_accum(self) -> int:
        lay = self.layout
        return lay["global_batch"] // (lay["micro_batch"] * (self.gpus // (lay["tp"] * lay["pp"])))

    def fit_fields(self) -> dict[str, Any]:
        """The plan as `planner fit` takes it: one GPU as a single-GPU plan (grad-accum), else with its layout."""
        if self.gpus == 1:
            return {**self.plan, "grad_accum": self.grad_accum}
        return {**self.plan, **{k: v for k, v in self.layout.items() if k != "micro_batch"}}

    def fit_command(self) -> str:
        parts = ["planner fit"]
        for k, v in self.fit_fields().items():
            flag = "--" + k.replace("_", "-")
            parts.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {v}")
        return " ".join(parts)


class SearchResult(BaseModel):
    objective: str
    space: int = Field(description="candidate plans in the space (valid layouts x knobs x micro-batches)")
    estimated: int = Field(description="candidates the engine priced")
    pruned: int = Field(description="candidates skipped because a priced one dominates them")
    invalid: int = Field(description="layouts the model or the layout rules refuse (TP not dividing heads, "
                                     "stages > layers)")
    fitting: int
    seconds: float
    best: list[Candidate]
    pareto: list[Candidate]
    closest: Candidate | None = None  # where nothing fits: the candidate that came closest
    dropped: list[str] = Field(default_factory=list)  # finalists the full fit path refused
    profile: str = ""
    notes: list[str] = Field(default_factory=list)


@dataclass
class Space:
    """The knob values the search tries (a pinned knob has one)."""

    methods: tuple[str, ...]
    precisions: tuple[str, ...]
    optimizers: tuple[str, ...]
    ckpts: tuple[bool, ...]
    gpu_counts: tuple[int, ...]
    tps: tuple[int, ...]
    pps: tuple[int, ...] | None
    shardings: tuple[str, ...]
    offloads: tuple[str, ...]
    micro_batches: tuple[int, ...] | None  # None: powers of two up to global / dp
    notes: list[str] = field(default_factory=list)
    chunks: tuple[int, ...] = (2, 4)  # interleaved schedule's model chunks per stage, tried where pp > 1
    schedules_1f1b: bool = True  # the 1F1B schedule too (False: the interleaved one is pinned)


def gpu_counts(max_gpus: int, per_node: int, min_gpus: int = 1) -> tuple[int, ...]:
    """1, 2, 4... up to a node, then whole nodes."""
    out = [n for n in (1 << i for i in range(0, 12)) if n <= min(per_node, max_gpus)]
    out += [k * per_node for k in range(2, max_gpus // per_node + 1)]
    return tuple(n for n in sorted(set(out)) if min_gpus <= n <= max_gpus)


def build_space(plan: Plan, pinned: set[str], layout_pins: dict[str, Any], max_gpus: int, per_node: int,
                min_gpus: int, bf16: bool) -> Space:
    notes: list[str] = []

    def pick(name: str, values: tuple) -> tuple:
        return (getattr(plan, name),) if name in pinned else values

    half = "bf16" if bf16 else "fp16"
    precisions = pick("precision", (half,))
    if "precision" not in pinned:
        notes.append(f"precision mixed-{half} skipped: {half} holds less and runs faster (pin it: --precision)")
    optimizers = pick("optimizer", ("adamw-fused", "adamw-8bit"))
    if "optimizer" not in pinned:
        notes.append("optimizer adamw skipped: adamw-fused holds less and runs faster (pin it: --optimizer)")
    if "gpus" in layout_pins:
        counts = (int(layout_pins["gpus"]),)
    else:
        counts = gpu_counts(max_gpus, per_node, min_gpus)
    tps = (int(layout_pins["tp"]),) if "tp" in layout_pins else (1, 2, 4, 8)
    pps = (int(layout_pins["pp"]),) if "pp" in layout_pins else None  # None: powers of two and the layers' divisors
    if "zero" in layout_pins:
        shardings: tuple[str, ...] = (f"zero{layout_pins['zero']}" if layout_pins["zero"] else "ddp",)
    elif "fsdp" in layout_pins:
        shardings = ("fsdp" if layout_pins["fsdp"] == "full-shard" else "fsdp-grad-op",)
    else:
        shardings = tuple(SHARDINGS)
    offloads = (layout_pins["offload"],) if "offload" in layout_pins else ("none", "optimizer", "optimizer+params")
    micro = (plan.batch,) if "batch" in pinned else None
    chunks: tuple[int, ...] = (2, 4)
    if layout_pins.get("pp_schedule") not in (None, "1f1b", "interleaved"):
        raise SearchError(f"pp_schedule: must be 1f1b or interleaved (got '{layout_pins['pp_schedule']}')")
    if "pp_schedule" in layout_pins:
        chunks = (int(layout_pins.get("pp_chunks") or 2),) if layout_pins["pp_schedule"] == "interleaved" else ()
    return Space(chunks=chunks, schedules_1f1b=layout_pins.get("pp_schedule") != "interleaved", methods=pick("method", METHODS), precisions=precisions, optimizers=optimizers,
                 ckpts=pick("grad_ckpt", (True, False)), gpu_counts=counts, tps=tps, pps=pps,
                 shardings=shardings, offloads=offloads, micro_batches=micro, notes=notes)


def _layouts(space: Space, spec: Any, per_node: int, global_batch: int) -> "tuple[list[dict[str, Any]], int]":
    """The layouts of the space (without the micro-batch), and how many of them the layout rules or the
    model refuse (planner.engine.distributed.layout: offload without the sharding it needs, TP not
    dividing the heads, more chunks than layers...)."""
    from planner.engine.distributed import make_layout

    out, invalid = [], 0
    layers = spec.num_layers
    pps = space.pps or tuple(sorted({1 << i for i in range(8) if 1 << i <= layers}
                                    | {d for d in range(1, layers + 1) if layers % d == 0}))

    def take(lay: dict[str, Any]) -> None:
        nonlocal invalid
        try:  # the micro-batch of 1 divides every global batch; larger ones are checked when priced
            make_layout(micro_batch=1, **lay).check_model(spec)
        except ValueError:
            invalid += 1
            return
        out.append(lay)

    for gpus, tp, pp, sh, off in itertools.product(space.gpu_counts, space.tps, pps, space.shardings,
                                                    space.offloads):
        # the space itself: TP within a node, whole data-parallel replicas, something to shard over
        if gpus % (tp * pp) or tp > min(per_node, gpus):
            continue
        dp = gpus // (tp * pp)
        if global_batch % dp or (dp == 1 and sh != "ddp"):
            continue
        fields: dict[str, Any] = dict(SHARDINGS[sh])
        if pp > 1 and (fields.get("zero", 0) >= 2 or fields.get("fsdp")):
            continue  # DeepSpeed's pipeline engine and Megatron take ZeRO-1 at most with pipeline stages
        lay = {"gpus": gpus, "gpus_per_node": min(per_node, gpus), "tp": tp, "pp": pp,
               "global_batch": global_batch, **fields}
        if off != "none":
            lay["offload"] = off
        if space.schedules_1f1b:
            take(lay)
        # the interleaved schedule: v model chunks per stage (Megatron's virtual pipeline)
        for v in space.chunks if pp > 1 else ():
            take({**lay, "pp_schedule": "interleaved", "pp_chunks": v})
    return out, invalid


def _micro_batches(space: Space, global_batch: int, dp: int) -> list[int]:
    per_rank = global_batch // dp
    if space.micro_batches is not None:
        return [b for b in space.micro_batches if per_rank % b == 0]
    return [b for b in (1 << i for i in range(0, 20)) if b <= per_rank and per_rank % b == 0]


def search(plan: Plan, *, global_batch: int, max_gpus: int, gpus_per_node: int = 8, min_gpus: int = 1,
           objective: str = "tokens-per-s", top: int = 10, pinned: set[str] | None = None,
           layout_pins: dict[str, Any] | None = None, prices: dict[str, float] | None = None,
           spec: Any = None, progress: Callable[[int, int], None] | None = None,
           estimate: Callable[..., Any] | None = None, final_check: bool = True) -> SearchResult:
    """Search the space around `plan` (module doc). `spec`: the model (default: the plan's catalog
    model); `estimate`: the pricing function (default: the engine's estimate_distributed)."""
    from planner.engine.distributed import estimate_distributed, make_layout
    from planner.gpus import resolve_gpu
    from planner.models import load_model

    if objective not in OBJECTIVES:
        raise SearchError(f"objective: unknown objective '{objective}'{did_you_mean(objective, OBJECTIVES)} "
                          f"(objectives: {', '.join(OBJECTIVES)})")
    pinned = set(pinned or ())
    layout_pins = {k: v for k, v in (layout_pins or {}).items() if v is not None}
    if max_gpus < 1 or min_gpus < 1 or min_gpus > max_gpus:
        raise SearchError(f"max_gpus: must be >= min_gpus >= 1 (got max {max_gpus}, min {min_gpus})")
    pinned_gpus = layout_pins.get("gpus") or layout_pins.get("tp", 1) * layout_pins.get("pp", 1)
    if pinned_gpus > max_gpus:
        raise SearchError(f"max_gpus: {max_gpus} is below the pinned layout's {pinned_gpus} GPUs")
    gpu = resolve_gpu(plan.gpu, plan.gpu_memory)
    if objective == "cost" and not (prices and gpu.id in prices):
        raise SearchError(f"cost: no price for {gpu.id}: the catalog lists none; give --price {gpu.id}=USD_PER_HOUR")
    spec = spec or load_model(plan.model)
    price = (prices or {}).get(gpu.id)
    run = estimate or estimate_distributed
    space = build_space(plan, pinned, layout_pins, max_gpus, gpus_per_node, min_gpus, gpu.bf16_tflops is not None)
    layouts, invalid = _layouts(space, spec, gpus_per_node, global_batch)
    combos = list(itertools.product(space.methods, space.precisions, space.optimizers))
    total_space = sum(len(_micro_batches(space, global_batch, lay["gpus"] // (lay["tp"] * lay["pp"])))
                      for lay in layouts) * len(combos) * len(space.ckpts)
    t0 = time.perf_counter()
    priced: list[Candidate] = []
    estimated = pruned = 0
    done = 0

    def price_one(p: Plan, lay: dict[str, Any], b: int) -> Candidate | None:
        nonlocal estimated, invalid
        try:
            layout = make_layout(micro_batch=b, **lay)
            p2 = p.model_copy(update={"batch": b, "grad_accum": layout.grad_accum})
        except ValueError:
            invalid += 1  # a combination the layout rules refuse
            return None
        estimated += 1
        try:
            e = run(p2, layout, spec, gpu)
        except ValueError:
            return None
        step = e.time.total_s
        cand = Candidate(plan=_plan_fields(p2), layout={**lay, "micro_batch": b}, gpus=lay["gpus"], fits=e.fits,
                         device_bytes=e.memory.device_bytes, gpu_memory_bytes=e.gpu_memory_bytes,
                         tokens_per_s=e.tokens_per_s, step_s=step, mfu=e.mfu, engine=e.engine)
        if price is not None and e.tokens_per_s:
            cand.cost_per_mtok = price * lay["gpus"] / 3600 / e.tokens_per_s * 1e6
        return cand

    for (method, precision, optimizer), lay in itertools.product(combos, layouts):
        dp = lay["gpus"] // (lay["tp"] * lay["pp"])
        bs = _micro_batches(space, global_batch, dp)
        base = plan.model_copy(update={"method": method, "precision": precision, "optimizer": optimizer})
        smallest_with_ckpt_fits = True
        for ckpt in sorted(space.ckpts, reverse=True):  # checkpointing first: it holds the least
            p = base.model_copy(update={"grad_ckpt": ckpt})
            if not ckpt and not smallest_with_ckpt_fits:
                pruned += len(bs)  # without checkpointing it holds more: nothing fits either
                continue
            for i, b in enumerate(bs):
                cand = price_one(p, lay, b)
                if cand is None:
                    continue
                priced.append(cand)
                if not cand.fits:
                    pruned += len(bs) - i - 1  # larger micro-batches hold more
                    if i == 0 and ckpt:
                        smallest_with_ckpt_fits = False
                    break
            done += len(bs)
            if progress is not None:
                progress(done, total_space)
    fitting = [c for c in priced if c.fits]
    best = sorted(fitting, key=lambda c: c.key(objective))
    pareto = pareto_front(fitting)
    dropped: list[str] = []
    if final_check:
        best, dropped = _confirmed(best, top)
        pareto = [c for c in pareto if c.fit_command() not in dropped]
    closest = None
    if not fitting and priced:
        closest = min(priced, key=lambda c: c.device_bytes - c.gpu_memory_bytes)
    from planner.engine.devices import profile_for

    prof = profile_for(gpu, None)
    return SearchResult(objective=objective, space=total_space, estimated=estimated, pruned=pruned, invalid=invalid,
                        fitting=len(fitting), seconds=round(time.perf_counter() - t0, 3), best=best[:top],
                        pareto=pareto, closest=closest, dropped=dropped, profile=f"{prof.id}: {prof.name}",
                        notes=space.notes)


def _plan_fields(p: Plan) -> dict[str, Any]:
    """The plan's settings a fit command needs (its non-default fields, the model, card and sizes)."""
    d = p.model_dump(exclude_defaults=True)
    for k in ("model", "gpu", "batch", "seq", "method", "precision", "optimizer", "grad_ckpt"):
        d[k] = getattr(p, k)
    d.pop("grad_accum", None)  # the layout's global batch decides it
    return {k: v for k, v in d.items() if v is not None}


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Plans no other beats on all of: tokens/s (more), GPUs (fewer), headroom (more).

    In order of tokens/s, with the most headroom seen so far per GPU count (few counts): a plan is
    dominated by a faster one with no more GPUs and no less headroom, or, among plans equally fast, by
    one no worse on both and better on one. O(n log n + n x GPU counts)."""
    from itertools import groupby

    front: list[Candidate] = []
    best_headroom: dict[int, int] = {}  # GPU count -> most headroom among strictly faster plans
    ordered = sorted(cands, key=lambda c: -c.tokens_per_s)
    for _, group in groupby(ordered, key=lambda c: c.tokens_per_s):
        same = list(group)
        for a in same:
            if any(g <= a.gpus and h >= a.headroom_bytes for g, h in best_headroom.items()):
                continue
            if any(b.gpus <= a.gpus and b.headroom_bytes >= a.headroom_bytes
                   and (b.gpus < a.gpus or b.headroom_bytes > a.headroom_bytes) for b in same):
                continue
            front.append(a)
        for a in same:
            best_headroom[a.gpus] = max(best_headroom.get(a.gpus, a.headroom_bytes), a.headroom_bytes)
    return sorted(front, key=lambda c: (c.gpus, -c.tokens_per_s))


def _confirmed(best: list[Candidate], top: int) -> tuple[list[Candidate], list[str]]:
    """The first `top` plans that `planner fit`'s own path says fit, alone."""
    from planner.api import fit, fit_distributed

    out, dropped = [], []
    for c in best:
        if len(out) >= top:
            break
        p = Plan(**c.plan)
        fields = {k: v for k, v in c.layout.items() if k != "micro_batch"}
        try:
            if c.gpus == 1:  # one GPU: fit's own verdict, from the simulated caching allocator where traced
                ok = fit(p.model_copy(update={"grad_accum": c.grad_accum}), with_suggestions=False).fits
            else:
                ok = fit_distributed(p, fields, with_suggestions=False).estimate.fits
        except ValueError:
            ok = False
        if ok:
            out.append(c)
        else:
            dropped.append(c.fit_command())
    return out, dropped
