"""Time of one step on one device, from the op list of the replayed program (planner.engine.program)
priced by a device profile (planner.profiles) with host and device overlapped (planner.engine.cost).

A workload's phases run in order; each is the program of its kind:
- train_step: forward, loss, backward (with the recompute under checkpointing), optimizer step,
  at T = batch x seq tokens per pass;
- generate: generate()'s set-up, the prefill (T = batch x prompt), and new_tokens - 1 decode steps,
  each a forward of one token per sequence over the cache, priced at the mean context length (the
  decode step's cost is linear in the context: attention pairs, the cache's torch.cat copies);
- score / forward: a no-grad forward (+ log-softmax and gather for score).
Every host read (a mask check, generate's stopping check) and the end of the step synchronise.
`step_time` gives the step's time split into device compute and exposed host overhead, per phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

from planner.engine.cost import StretchCost, compose, price
from planner.engine.resident import lora_targets
from planner.workload import Phase, Workload

if TYPE_CHECKING:
    from planner.engine.program import Program
    from planner.gpus import GPUSpec
    from planner.profiles import DeviceProfile


@dataclass(frozen=True)
class PhaseTime:
    """Seconds of one phase of a step: total = compute + host (the host overhead the device waited
    for); `parts` the same split per part of the phase's program (forward, backward, decode...)."""

    total_s: float
    compute_s: float
    host_s: float
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepTime:
    total_s: float
    compute_s: float
    host_s: float
    phases: dict[str, PhaseTime]


def _program(ph: Phase, workload: Workload) -> "Program":
    from planner.engine.heads import TILED_HEADS, FusedTiles
    from planner.engine.program import forward_program, generate_program, repeated, train_step_program

    use = workload.model(ph.role)
    single = ph.batch == 1  # one sequence: transformers skips a few ops (planner.engine.program)
    if ph.kind == "train_step":
        tiles = FusedTiles.for_positions(ph.batch * (ph.seq - 1)) if ph.loss in TILED_HEADS else None
        return train_step_program(use.spec, use.setup, ph.loss, tiles, ph.passes, ph.loss_ops, single=single,
                                  micro_batches=ph.micro_batches)
    if ph.kind == "generate":
        prog = generate_program(use.spec, use.setup, ph.loss_ops, single=single)
    else:
        prog = forward_program(use.spec, use.setup, ph.kind, adapters=ph.adapters, autocast=ph.autocast,
                               loss_ops=ph.loss_ops, single=single)
    if ph.micro_batches == 1:
        return prog
    # cached as the programs are: phase_time's cache is keyed by the program's identity
    hit = _repeated.get((id(prog), ph.micro_batches))
    if hit is None or hit[0] is not prog:
        hit = (prog, repeated(prog, ph.micro_batches))
        if len(_repeated) > 1024:
            _repeated.clear()
        _repeated[(id(prog), ph.micro_batches)] = hit
    return hit[1]


_repeated: dict[tuple[int, int], tuple] = {}


_phase_times: dict[tuple, tuple] = {}


def phase_time(ph: Phase, workload: Workload, profile: "DeviceProfile") -> PhaseTime:
    """One phase's time (module doc). `parts`: the device seconds of each part of its program."""
    prog = _program(ph, workload)
    # programs are cached per plan shape: a phase at numbers seen before is priced once
    key = (id(prog), ph.kind, ph.batch, ph.seq, ph.new_tokens, id(profile))
    hit = _phase_times.get(key)
    if hit is not None and hit[0] is prog and hit[1] is profile:
        return hit[2]
    steps = max(ph.new_tokens - 1, 0) if ph.kind == "generate" else 0
    costs: list[StretchCost] = []
    parts: dict[str, float] = {}
    for part, stretches in prog.phases.items():
        decode = part == "decode"
        if decode and steps == 0:
            continue
        # a decode step: one token per sequence over the cache, priced at the mean context
        tokens, seq = (ph.batch, ph.seq + ph.new_tokens / 2) if decode else (ph.batch * ph.seq, ph.seq)
        step_costs = []
        for s in stretches:
            c = price(s.ops, ph.batch if s.per_sequence else tokens, seq, profile, s.mode)
            n = s.repeat * ((steps - s.fewer) / steps if decode and s.fewer else 1)
            step_costs.append(StretchCost(c.host_s * n, c.device_s * n, s.sync))
        if decode:  # every step ends in a host read: one step composed, `steps` times
            one = compose(step_costs, profile.asynchronous, profile.host.sync_s)
            costs.append(StretchCost(one.total_s * steps, one.compute_s * steps, True))
            parts[part] = one.compute_s * steps
        else:
            costs.extend(step_costs)
            parts[part] = sum(c.device_s for c in step_costs)
    t = compose(costs, profile.asynchronous, profile.host.sync_s)
    out = PhaseTime(t.total_s, t.compute_s, t.host_exposed_s, parts)
    if len(_phase_times) > 4096:
        _phase_times.clear()
    _phase_times[key] = (prog, profile, out)
    return out


def step_time(workload: Workload, profile: "DeviceProfile") -> StepTime:
    """Every phase of one step (all of a technique's phases), in order."""
    phases = {ph.name: phase_time(ph, workload, profile) for ph in workload.phases}
    total = sum(p.total_s for p in phases.values())
    compute = sum(p.compute_s for p in phases.values())
    return StepTime(total, compute, max(total - compute, 0.0), phases)


def step_flops(workload: Workload) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step: every phase's forward (and, for a training phase,
    backward and recompute), attention counted as the kernel computes it (planner.engine.compute)."""
    from planner.engine import compute

    model = hardware = 0.0
    for ph in workload.phases:
        use = workload.model(ph.role)
        spec, setup = use.spec, use.setup
        fl = dict(method=setup.method, lora_rank=setup.lora_rank, causal=setup.attn == "sdpa",
                  lora_targets=lora_targets(spec, setup) if setup.method != "full" else [])
        rows = ph.batch * ph.passes * ph.micro_batches
        if ph.kind == "train_step":
            f = compute.micro_batch_flops(spec, rows * ph.seq, ph.seq, grad_ckpt=setup.grad_ckpt, **fl)
            model, hardware = model + f.model, hardware + f.hardware
        elif ph.kind in ("score", "forward"):
            fwd = compute.micro_batch_flops(spec, rows * ph.seq, ph.seq, **fl).forward
            model, hardware = model + fwd, hardware + fwd
        elif ph.kind == "generate":
            steps = max(ph.new_tokens - 1, 0)
            mean_len = ph.seq + ph.new_tokens / 2
            fwd = (compute.micro_batch_flops(spec, ph.batch * ph.seq, ph.seq, **fl).forward
                   + compute.micro_batch_flops(spec, ph.batch * steps, int(mean_len), **{**fl, "causal": False}).forward)
            model, hardware = model + fwd * ph.micro_batches, hardware + fwd * ph.micro_batches
    return model, hardware


def peak_flops(workload: Workload, gpu: "GPUSpec") -> float:
    """The card's dense peak for the fastest dtype the workload's models compute in (a frozen bf16
    reference beside an fp32 policy runs at the bf16 rate): what MFU and HFU are measured against, so
    that achieved FLOP/s never exceed it."""
    from planner.engine import compute

    return max(compute.peak_flops(gpu, use.setup.matmul_dtype) for use in workload.models)


def tokens_counted(workload: Workload) -> str:
    """What `tokens_per_step` counts, in words: the trained tokens of a step that trains, else the
    generated tokens."""
    kinds = {ph.kind for ph in workload.phases}
    if "train_step" in kinds:
        return "trained tokens (sequences x length x micro-batches of the training phases)"
    if "generate" in kinds:
        return "generated tokens (sequences x new tokens)"
    return "scored tokens (sequences x length of the forwards)"


def tokens_per_step(workload: Workload) -> int:
    """Trained tokens of one step (batch x passes x seq x micro-batches of each train_step phase); for
    a step that trains nothing the tokens it generates (batch x new_tokens); else the tokens its
    forwards score."""
    trained = sum(ph.batch * ph.passes * ph.seq * ph.micro_batches for ph in workload.phases
                  if ph.kind == "train_step")
    if trained:
        return trained
    generated = sum(ph.batch * ph.new_tokens * ph.micro_batches for ph in workload.phases if ph.kind == "generate")
    return generated or sum(ph.batch * ph.seq * ph.micro_batches for ph in workload.phases)


def step_seconds(plan, model, profile: "DeviceProfile", gpu: "GPUSpec | None" = None) -> float:
    """Seconds of one step of `plan` on `model` (all phases of a technique's step; for generate one
    whole generate() call) priced by `profile`. `gpu` is accepted for the calibration interface;
    the profile alone describes the device."""
    from planner.plugins import technique

    return step_time(technique(plan.task).workload(plan, model), profile).total_s


HEAD_STRETCHES = frozenset({"final norm and head", "loss", "the technique's loss", "loss and head backward",
                            "the technique's loss backward"})
EMBEDDING_STRETCHES = frozenset({"prologue", "embedding backward"})


# train_micro_batch's answers by their arguments: a plan search prices the same micro-batch under many
# shardings and offloads, whose compute is the same (planner.search). Bounded; the profile is held
# with its answer so that its id is not reused while the entry lives.
_MICRO_BATCH_CACHE: dict[tuple, tuple[Any, tuple[float, float]]] = {}
_MICRO_BATCH_CACHE_SIZE = 4096


def train_micro_batch(spec, setup, profile: "DeviceProfile", rows: int, seq: int, *, first_stage: bool = True,
                      last_stage: bool = True, loss: str = "causal_lm", passes: int = 1,
                      loss_ops: tuple = ()) -> tuple[float, float]:
    """Memoised `_train_micro_batch` (the arguments' values, the profile's identity)."""
    key = (spec.model_dump_json(), setup.model_dump_json(), id(profile), rows, seq, first_stage, last_stage, loss,
           passes, loss_ops)
    hit = _MICRO_BATCH_CACHE.get(key)
    if hit is not None and hit[0] is profile:
        return hit[1]
    out = _train_micro_batch(spec, setup, profile, rows, seq, first_stage=first_stage, last_stage=last_stage,
                             loss=loss, passes=passes, loss_ops=loss_ops)
    if len(_MICRO_BATCH_CACHE) >= _MICRO_BATCH_CACHE_SIZE:
        _MICRO_BATCH_CACHE.pop(next(iter(_MICRO_BATCH_CACHE)))
    _MICRO_BATCH_CACHE[key] = (profile, out)
    return out


def _train_micro_batch(spec, setup, profile: "DeviceProfile", rows: int, seq: int, *, first_stage: bool = True,
                       last_stage: bool = True, loss: str = "causal_lm", passes: int = 1,
                       loss_ops: tuple = ()) -> tuple[float, float]:
    """(forward + loss, backward) seconds of one micro-batch of `rows` sequences through `spec` (a
    rank's share of a model: planner.engine.distributed.shard.rank_spec) priced by `profile`, for the
    distributed estimate: a pipeline stage without the embedding (not the first) or without the head
    (not the last) leaves those stretches out; the optimizer step is priced apart."""
    from planner.engine.heads import TILED_HEADS, FusedTiles
    from planner.engine.program import train_step_program

    tiles = FusedTiles.for_positions(rows * (seq - 1)) if loss in TILED_HEADS else None
    prog = train_step_program(spec, setup, loss, tiles, passes, loss_ops, single=rows == 1)
    skip = (set() if first_stage else EMBEDDING_STRETCHES) | (set() if last_stage else HEAD_STRETCHES)
    out = []
    for parts in (("forward", "loss"), ("backward",)):
        costs = []
        for part in parts:
            for s in prog.phases.get(part, []):
                if s.name in skip:
                    continue
                c = price(s.ops, rows * seq, seq, profile, s.mode)
                costs.append(StretchCost(c.host_s * s.repeat, c.device_s * s.repeat, s.sync))
        out.append(compose(costs, profile.asynchronous, profile.host.sync_s).total_s)
    return out[0], out[1]
