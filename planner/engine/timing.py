"""Time of one step on one GPU, phase by phase, from a roofline (planner.engine.compute).

- training and scoring phases: matmul FLOPs at the card's peak times its efficiency factors, plus
  the memory traffic of the elementwise kernels (compute-bound for real batch sizes);
- the optimizer step: memory-bound (parameters, gradients and states read, parameters and states
  written);
- generation: the prefill is a forward over batch x prompt tokens (compute-bound); each decode step
  reads the weights and the KV cache once (bandwidth-bound) unless its FLOPs take longer.
One efficiency set per GPU type (the H200's is measured; see planner.engine.compute).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.engine.resident import lora_targets, resident
from planner.workload import Workload

if TYPE_CHECKING:
    from planner.gpus import GPUSpec


def phase_times(workload: Workload, gpu: "GPUSpec") -> dict[str, float]:
    """Seconds of each phase of one step of `workload` on `gpu`."""
    from planner.engine.generation import kv_bytes_per_token
    from planner.engine import compute

    eff = compute.efficiency(gpu)
    out: dict[str, float] = {}
    for ph in workload.phases:
        use = workload.model(ph.role)
        spec, setup = use.spec, use.setup
        targets = lora_targets(spec, setup) if setup.method != "full" else []
        kw = dict(dtype=setup.compute_dtype, method=setup.method, lora_rank=setup.lora_rank, lora_targets=targets,
                  flash=setup.attn == "sdpa", eff=eff)
        rows = ph.batch * ph.passes  # two forwards of a pair's halves cost what one of both costs
        if ph.kind == "train_step":
            t = compute.micro_batch_time(spec, rows * ph.seq, ph.seq, gpu, grad_ckpt=setup.grad_ckpt, **kw)
            res = resident(spec, setup)
            # read param, grad, 2 states; write param, 2 states (AdamW), in the trainable dtype
            per_elem = 7 * (4 if res.trainable_dtype == "fp32" else 2)
            out[ph.name] = t.total + compute.optimizer_step_time(res.trainable_elems, per_elem, gpu, eff)
        elif ph.kind in ("score", "forward"):
            out[ph.name] = compute.micro_batch_time(spec, rows * ph.seq, ph.seq, gpu, **kw).forward
        elif ph.kind == "generate":
            prefill = compute.micro_batch_time(spec, ph.batch * ph.seq, ph.seq, gpu, **kw).forward
            res = resident(spec, setup)
            bw = (gpu.mem_bandwidth_gb_per_s or 1000.0) * 1e9 * eff.memory * eff.software
            kv = kv_bytes_per_token(spec, res.non_linear_dtype)
            mean_len = ph.seq + ph.new_tokens / 2
            read = res.param_bytes + kv * ph.batch * mean_len
            step_compute = compute.micro_batch_time(spec, ph.batch, int(mean_len), gpu, causal=False, **kw).forward
            out[ph.name] = prefill + max(ph.new_tokens - 1, 0) * max(read / bw, step_compute)
    return out


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
        rows = ph.batch * ph.passes
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
            model, hardware = model + fwd, hardware + fwd
    return model, hardware


def tokens_counted(workload: Workload) -> str:
    """What `tokens_per_step` counts, in words."""
    kinds = {ph.kind for ph in workload.phases}
    parts = []
    if "train_step" in kinds:
        parts.append("trained tokens (sequences x length)")
    if "generate" in kinds:
        parts.append("generate's prompt and new tokens")
    return " + ".join(parts) or "none (no training or generation phase)"


def tokens_per_step(workload: Workload) -> int:
    return sum(ph.batch * ph.passes * (ph.seq + ph.new_tokens) for ph in workload.phases if ph.kind in ("train_step", "generate"))
