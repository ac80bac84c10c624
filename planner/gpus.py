"""GPU catalog: the cards the planner knows, and custom cards given by memory size.

The facts live in `planner/data/gpus.json` (copied, with their sources, from the shared reference
tables; nothing outside the package is read at run time). Its "about" block states the rules:
`memory_bytes` is what the CUDA runtime reports as total (`torch.cuda.mem_get_info()[1]`), which is
what an estimate's `device_bytes` must fit; marketed "GB" sizes are GiB-sized memory, less 1/16 for
ECC on GDDR datacenter cards, less what the driver keeps back.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field

from planner.errors import GPUError, did_you_mean
from planner.units import SizeError, format_gib, parse_size

__all__ = ["GPUSpec", "GPUError", "load_gpu", "gpu_ids", "list_gpus", "custom_gpu", "resolve_gpu", "catalog_about"]

# Measured on the H200 (visible 139.80 GiB - free at start 139.29 GiB = 0.51 GiB = 522 MiB); the default
# for every card and for custom cards. Kept here too so a custom card needs no catalog lookup.
DEFAULT_CUDA_CONTEXT_BYTES = 522 * (1 << 20)


class MeasuredCeilings(BaseModel):
    """Ceilings measured on one card (shared/reference/measured_ceilings.csv)."""

    model_config = ConfigDict(frozen=True)

    bf16_matmul_tflops: float
    copy_gb_per_s: float
    cuda_visible_gib: float
    cuda_free_at_start_gib: float
    torch: str
    date: str
    how: str = ""


class GPUSpec(BaseModel):
    """One accelerator. Sizes in bytes, rates in TFLOP/s and GB/s (1e9 bytes/s)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    memory_bytes: int = Field(gt=0, description="total the CUDA runtime reports (mem_get_info()[1])")
    memory_marketed_gb: float | None = None
    memory_type: str | None = None
    memory_ecc_carveout: bool = False
    memory_source: str = ""
    memory_confidence: str = ""
    bf16_tflops: float | None = None
    fp16_tflops: float | None = None
    mem_bandwidth_gb_per_s: float | None = None
    interconnect: str | None = None
    interconnect_gb_per_s_both_directions: float | None = None
    confidence: str = ""
    compute_capability: str | None = Field(default=None, description="CUDA sm version, e.g. '9.0' (None: not CUDA)")
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    cuda_context_source: str = ""
    measured: MeasuredCeilings | None = None
    reference_name: str | None = None
    vendor: str | None = None
    custom: bool = False

    @property
    def interconnect_gb_per_s_per_direction(self) -> float | None:
        """Datasheets quote the sum of both directions; one direction carries half."""
        if self.interconnect_gb_per_s_both_directions is None:
            return None
        return self.interconnect_gb_per_s_both_directions / 2

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / (1 << 30)


@lru_cache(maxsize=1)
def _catalog() -> tuple[dict, dict[str, GPUSpec]]:
    text = resources.files("planner").joinpath("data/gpus.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    gpus = {row["id"]: GPUSpec(**row) for row in raw["gpus"]}
    return raw.get("about", {}), gpus


def catalog_about() -> dict:
    """The catalog's documented rules (memory, context, interconnect, units, sources)."""
    return dict(_catalog()[0])


def gpu_ids() -> list[str]:
    return list(_catalog()[1])


def list_gpus() -> list[GPUSpec]:
    return list(_catalog()[1].values())


def load_gpu(gpu_id: str) -> GPUSpec:
    """The catalog card `gpu_id` (case-insensitive); GPUError with close matches otherwise."""
    gpus = _catalog()[1]
    key = gpu_id.strip().lower()
    if key in gpus:
        return gpus[key]
    from planner.plugins import registry  # cards a plugin registers (register_hardware)

    plugged = registry(scan=True).hardware
    for gid, g in plugged.items():
        if gid.lower() == key:
            return g
    known = {**gpus, **plugged}
    hint = did_you_mean(key, known) or f" (known: {', '.join(known)})"
    raise GPUError(f"gpu: unknown gpu '{gpu_id}'{hint}")


def custom_gpu(memory: int | str, base: GPUSpec | None = None) -> GPUSpec:
    """A card defined by its memory (bytes, or a size like '24GiB' / '24GB').

    With `base`, the card is that catalog card with its memory replaced (a MIG slice, a card whose
    driver reports less); otherwise only the memory is known.
    """
    try:
        nbytes = parse_size(memory)
    except SizeError as e:
        raise GPUError(f"gpu_memory: {e}") from None
    label = format_gib(nbytes)
    if base is not None:
        return base.model_copy(
            update={
                "id": f"{base.id}@{label.replace(' ', '')}",
                "name": f"{base.name} (memory set to {label})",
                "memory_bytes": nbytes,
                "memory_source": "given by the user (--gpu-memory)",
                "memory_confidence": "given",
                "custom": True,
            }
        )
    return GPUSpec(
        id="custom",
        name=f"custom card ({label})",
        memory_bytes=nbytes,
        memory_source="given by the user (--gpu-memory)",
        memory_confidence="given",
        cuda_context_source="default: measured on the H200 (0.51 GiB)",
        custom=True,
    )


def resolve_gpu(gpu: str | None, gpu_memory: int | str | None) -> GPUSpec:
    """The card a plan names: `gpu` id, `gpu_memory` size, or both (the card with that memory)."""
    if gpu is None and gpu_memory is None:
        raise GPUError("gpu: give --gpu ID or --gpu-memory SIZE")
    base = load_gpu(gpu) if gpu is not None else None
    if gpu_memory is None:
        assert base is not None
        return base
    return custom_gpu(gpu_memory, base=base)
