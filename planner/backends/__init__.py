"""Backends: a technique's step executed for real, measured.

- `dry-run` (device `fake`): the real program at full scale on fake tensors on the CPU, under a
  MemTracker (planner.backends.dryrun). Byte-exact for what it runs; no time.
- `real` (device `cpu` or `cuda`): real tensors. On the CPU (tiny configs, in tests) memory comes
  from the same tracker as the dry run, so both can be compared byte for byte; on CUDA from
  `torch.cuda.max_memory_allocated` / `max_memory_reserved`, the CUDA context from
  `torch.cuda.mem_get_info`, and time from CUDA events.

Both run the technique's `step(ctx)` (see `planner.backends.context.StepContext`): one piece of code.
torch and the model libraries are imported only when a backend runs.
"""

from __future__ import annotations

import difflib
import importlib.util

from planner.backends.measurement import Measurement

BACKENDS: dict[str, tuple[str, ...]] = {"dry-run": ("fake",), "real": ("cpu", "cuda")}
DEFAULT_DEVICE = {"dry-run": "fake", "real": "cuda"}
# what every backend imports (bitsandbytes, deepspeed and trl only for the plans that use them)
BACKEND_MODULES = ("torch", "transformers", "peft")

__all__ = ["BACKENDS", "Measurement", "check_backend", "run_backend"]


class BackendError(ValueError):
    pass


def check_backend(name: str, device: str | None) -> str:
    """The device the backend will use; one-line errors for unknown names or impossible devices."""
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, BACKENDS, n=2)
        hint = f"did you mean: {', '.join(close)}?" if close else f"choose from {', '.join(BACKENDS)}"
        raise BackendError(f"backend: unknown backend '{name}' ({hint})")
    device = device or DEFAULT_DEVICE[name]
    missing = [m for m in BACKEND_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(
            f"backend: {name} runs the real program and needs {', '.join(missing)}, which is not installed: "
            "pip install torch==2.13.0 (the CPU build; or your CUDA build), then pip install 'planner[backends]' "
            "(from a checkout: pip install -e '.[backends]')")
    if device not in BACKENDS[name]:
        why = {
            "dry-run": "the dry run executes on fake tensors on the CPU; use --backend real for cpu or cuda",
            "real": "real runs use real tensors: --device cpu (tiny models) or cuda",
        }[name]
        raise BackendError(f"device: backend {name} cannot run on '{device}' ({why})")
    if device == "cuda":
        try:
            import torch
        except ImportError:
            raise BackendError("device: backend real on cuda needs torch (pip install '.[backends]')") from None
        if not torch.cuda.is_available():
            raise BackendError("device: backend real cannot run on cuda here: torch.cuda.is_available() is False")
    return device


def run_backend(name: str, plan, device: str | None = None, steps: int = 3, record_ops: bool = False,
                allocator=None) -> Measurement:
    """Execute `plan` with the named backend and measure it.

    record_ops: also record the aten ops of the last step, with their kinds, FLOPs and bytes
    (`Measurement.ops`, planner.backends.dryrun.ops); dry-run and real on the CPU only. The memory
    figures are the same with and without it.
    allocator: an AllocatorConfig (or True: the defaults): record the run's allocation trace and
    simulate the caching allocator over it (`Measurement.allocator`; for the dry run also
    `reserved_bytes`); dry-run and real on the CPU only."""
    device = check_backend(name, device)
    from planner.models import model_config
    from planner.plugins import technique

    tech = technique(plan.task)
    if tech.step is None:
        raise BackendError(f"task: technique '{tech.name}' has no executable step; it cannot be validated")
    config = model_config(plan.model)
    if device == "cuda":
        if allocator not in (None, False):
            raise BackendError("alloc-conf: the allocator is simulated over a traced run (dry-run, or real on the cpu); "
                               "on cuda run the program with PYTORCH_CUDA_ALLOC_CONF set instead")
        if record_ops:
            raise BackendError("record_ops: ops are recorded by the dry-run backend or by real on the cpu, "
                               "not on cuda (a dispatch mode would slow the timed steps)")
        from planner.backends.cuda import run_cuda

        return run_cuda(tech, plan, config, steps=steps)
    from planner.backends.tracked import run_tracked

    if allocator is None or allocator is False:
        return run_tracked(tech, plan, config, steps=steps, device=device, record_ops=record_ops)
    from planner.backends import allocation
    from planner.engine.alloc_conf import AllocatorConfig

    conf = allocator if isinstance(allocator, AllocatorConfig) else AllocatorConfig()
    # the allocator sees the program's own sequence: every decode step runs (its cache grows a
    # position at a time), not the exact-peak shortcut
    meas = run_tracked(tech, plan, config, steps=steps, device=device, record_ops=record_ops,
                       trace=allocation.trace_options(plan), full_decode=True)
    ans = allocation.answer(meas.allocation_trace, plan, conf)
    meas.allocator = ans
    if meas.reserved_bytes is None:
        meas.reserved_bytes = ans.reserved_bytes
    return meas
