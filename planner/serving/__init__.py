"""Serving: how many requests a card holds at once, and what throughput and latency follow.

    from planner.serving import serve, ServeSpec, TrafficSpec
    result = serve(ServeSpec(model="llama-3.1-8b", gpu="h100-sxm", max_model_len=8192),
                   TrafficSpec(rate=4, requests=2000), compare=["static"])

Modules (each small, pure Python; the real serving engines that check the simulator live in
planner/backends/serving.py, and the `planner serve` command in planner/commands/serve.py):

- `specs`      ServeSpec, TrafficSpec, Calibration (pydantic), one-line input errors
- `capacity`   vLLM's KV-cache budget, blocks and concurrency; every constant with its source
- `traffic`    Poisson arrivals, length distributions, trace CSV
- `roofline`   iteration time: compute vs memory roofline, efficiencies, calibration
- `schedulers` registry (`SCHEDULERS`, `register_scheduler`): static, continuous, chunked-prefill
- `simulator`  the discrete-event engine and its report (percentiles, KV utilisation, preemptions)
- `service`    `serve()`: capacity, then the simulation of each scheduler asked for
"""

from __future__ import annotations

from typing import Any

__all__ = ["serve", "ServeSpec", "TrafficSpec", "Calibration", "register_scheduler", "SCHEDULERS"]

_LAZY = {
    "serve": "planner.serving.service",
    "ServeSpec": "planner.serving.specs",
    "TrafficSpec": "planner.serving.specs",
    "Calibration": "planner.serving.specs",
    "register_scheduler": "planner.serving.schedulers",
    "SCHEDULERS": "planner.serving.schedulers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'planner.serving' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module), name)
