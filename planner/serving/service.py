"""`serve()`: capacity of one engine and the simulated service of a request stream, in one call."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from planner.serving.capacity import CapacityReport, Setup, capacity, resolve
from planner.serving.roofline import Roofline
from planner.serving.schedulers import DEFAULT_SCHEDULER, Scheduler, get_scheduler
from planner.serving.simulator import MAX_TIME_S, SimulationReport, SimulationTooLong, Simulator
from planner.serving.specs import Calibration, ServeSpec, TrafficSpec
from planner.serving.traffic import Requests, requests_for


class ServeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    capacity: CapacityReport
    traffic: dict[str, Any]
    roofline: dict[str, Any]
    simulations: list[SimulationReport]  # the chosen scheduler first
    warnings: list[str]

    @property
    def fits(self) -> bool:
        return self.capacity.fits

    def to_json(self) -> dict[str, Any]:
        cap = self.capacity
        out: dict[str, Any] = {
            "fits": cap.fits,
            "reason": cap.reason,
            "model": cap.model,
            "gpu": cap.gpu,
            "tp": cap.tp,
            "dtypes": {"serving": cap.serving_dtype, "weights": cap.weights_dtype, "kv_cache": cap.kv_cache.dtype},
            "limits": {"max_model_len": cap.max_model_len, "max_num_seqs": cap.max_num_seqs,
                       "max_num_batched_tokens": cap.max_num_batched_tokens,
                       "gpu_memory_utilization": cap.gpu_memory_utilization},
            "memory": cap.memory.model_dump(),
            "kv_cache": cap.kv_cache.model_dump(),
            "traffic": self.traffic,
            "roofline": self.roofline,
            "simulation": self.simulations[0].model_dump() if self.simulations else None,
            "warnings": self.warnings,
            "sources": cap.sources,
        }  # fmt: skip
        if len(self.simulations) > 1:
            out["comparison"] = {s.scheduler: s.model_dump() for s in self.simulations}
        return out


def serve(spec: ServeSpec, traffic: TrafficSpec | None = None, scheduler: str = DEFAULT_SCHEDULER,
          compare: list[str] | None = None, calibration: Calibration | None = None,
          simulate_traffic: bool = True) -> ServeResult:  # fmt: skip
    """Capacity of `spec`, then (if it fits) `traffic` simulated with `scheduler` and each of `compare`.

    Raises ServeInputError on bad input; a setup that does not fit returns `fits=False` and no simulation.
    """
    traffic = traffic or TrafficSpec()
    setup = resolve(spec)
    names = [scheduler] + [s for s in (compare or []) if s != scheduler]
    scheds = [get_scheduler(n) for n in names]  # unknown names fail before any work
    reqs = requests_for(traffic, setup.max_model_len) if simulate_traffic else None
    per_seq = traffic.prompt_len + traffic.new_tokens
    if reqs is not None and traffic.trace:
        per_seq = round(sum(reqs.prompt) / len(reqs) + sum(reqs.output) / len(reqs))
    cap = capacity(setup, per_seq)
    warnings = list(cap.warnings)
    roof_desc: dict[str, Any] = {}
    sims: list[SimulationReport] = []
    tinfo: dict[str, Any] = {}
    if reqs is not None:
        tinfo = {"source": reqs.source, "requests": len(reqs), "clipped": reqs.clipped}
        warnings += reqs.notes
    if cap.fits and reqs is not None:
        roof = Roofline(setup, calibration)
        roof_desc = roof.describe()
        derived = calibration is not None and calibration.source.startswith("device profile derived-")
        if setup.gpu.measured is None and (calibration is None or calibration.compute_efficiency is None or derived):
            warnings.append(f"no measured ceilings for {setup.gpu.name}: efficiencies from public figures and the H200's "
                            f"measured fractions (compute {roof.compute_efficiency:.3f}, memory "
                            f"{roof.memory_efficiency:.3f})")  # fmt: skip
        for sched in scheds:
            sims.append(simulate(setup, roof, reqs, cap.layer_blocks, sched))
    return ServeResult(capacity=cap, traffic=tinfo, roofline=roof_desc, simulations=sims, warnings=warnings)


def simulate(setup: Setup, roofline: Roofline, requests: Requests, pool: int, scheduler: str | Scheduler,
             aggregate: bool = True) -> SimulationReport:  # fmt: skip
    """Run `requests` through one engine with `scheduler` (a registered name or an instance)."""
    sched = get_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    name = sched.name or type(sched).__name__
    sim = Simulator(setup, roofline, requests, pool, aggregate=aggregate)
    sim.scheduler_name = name
    if len(requests):
        sched.run(sim)
    if not sim.now <= MAX_TIME_S:  # also catches inf and NaN
        # the float clock ran away (an --iteration-overhead-ms of 1e308 reached inf, and the latency
        # sums overflowed in the report); arrivals are bounded by the same MAX_TIME_S in traffic.py
        raise SimulationTooLong(f"simulation: {name} reached t = {sim.now:g} s, beyond the {MAX_TIME_S:g} s the "
                                "simulated clock can carry; check the time model (--iteration-overhead-ms, "
                                "--calibration, --peak-tflops, --bandwidth-gbps)")
    if sim.progress is not None:
        sim.progress(name, sim.done, sim.N)
    return sim.report(name)
