"""What a fake-process-group dry run reports: per-rank peaks and breakdowns (torch's MemTracker and
FSDPMemTracker categories)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

CATEGORIES = ("parameters", "buffers", "gradients", "activations", "optimizer_states", "temporaries", "other")
# FSDPMemTracker's categories -> the estimator's (planner.engine.distributed.ranks.RankMemory.breakdown)
FSDP_CATEGORY = {
    "Sharded Param": "parameters",
    "Unsharded Param": "parameters",
    "All Gather": "parameters",
    "Buffer": "buffers",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Reduce Scatter": "gradients",
    "Activation": "activations",
    "Inputs": "activations",
    "Temp": "temporaries",
    "OptState": "optimizer_states",
}
FSDP_DETAIL = {
    "Sharded Param": "sharded_params",
    "Unsharded Param": "unsharded_params",
    "All Gather": "all_gather_buffers",
    "Sharded Grad": "sharded_grads",
    "Unsharded Grad": "unsharded_grads",
    "Reduce Scatter": "reduce_scatter_buffers",
}


class DistributedDryRunResult(BaseModel):
    """One rank's memory in a distributed training step (planner.backends.fakepg).

    peak_allocated_bytes: most bytes live on the rank at once (its model-state shards, gathered
      parameters, gradients, activations, optimizer states and temporaries), storages rounded to 512
      bytes; counted from after the model, its sharding and the optimizer were set up.
    breakdown: the estimator's categories at that peak (sums to the peak). FSDP's gathered
      parameters and all-gather buffers are in `parameters`, its unsharded gradients and
      reduce-scatter buffers in `gradients`; `details` has them apart (FSDPMemTracker's categories),
      and `gathered` = unsharded_params + all_gather_buffers + unsharded_grads + reduce_scatter_buffers
      (the estimator's `zero3_gathered`).
    peak_phase: forward, loss (lm_head and the loss), loss backward (from `.backward()` until the
      gradient reaches the last decoder layer), backward (the decoder layers), optimizer.
    phases / phase_breakdowns: the peak of each phase and the breakdown at that moment (the
      estimator's moments are "loss backward", "backward" and "optimizer"); keys `detail:*` there are
      the details at that moment.
    peak_module: the innermost module running at the peak ("[bw]": in backward).
    """

    layout: dict[str, Any]
    world_size: int
    rank: int = 0
    mesh: dict[str, int]
    vocab: str = "parallel"
    mixed_precision_policy: str = ""
    peak_allocated_bytes: int
    breakdown: dict[str, int]
    details: dict[str, int] = Field(default_factory=dict)
    peak_phase: str
    peak_step: int = 0
    peak_op: str = ""
    peak_module: str = ""
    phases: dict[str, int] = Field(default_factory=dict)
    phase_breakdowns: dict[str, dict[str, int]] = Field(default_factory=dict)
    step_end_bytes: list[int] = Field(default_factory=list)
    params: dict[str, int] = Field(default_factory=dict)
    wall_s: float
    device: str = "fake"
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def to_measurement(self):
        """As a planner.backends.Measurement (backend "dry-run", device "fake")."""
        from planner.backends.measurement import Measurement

        return Measurement(backend="dry-run", device=self.device, peak_allocated_bytes=self.peak_allocated_bytes,
                           breakdown=dict(self.breakdown), details=dict(self.details), peak_phase=self.peak_phase,
                           phases=dict(self.phases), wall_s=self.wall_s,
                           device_name=f"rank {self.rank} of {self.world_size} (fake process group)",
                           versions=dict(self.versions), notes=list(self.notes))
