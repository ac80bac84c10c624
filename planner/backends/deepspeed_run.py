"""Real DeepSpeed ZeRO-1/2/3 steps on the CPU, and the partitions they allocate, predicted to the element.

`run_zero(config, stages, nproc)` launches `torchrun --nproc_per_node N scripts/ds_zero_run.py` (gloo,
DS_ACCELERATOR=cpu, torch's AdamW wrapped by ZeRO) and returns each rank's report: the sizes read
from the engine (ZeRO-1/2: the flat bit16 buffer, `parallel_partitioned_bit16_groups`,
`single_partition_of_fp32_groups`, AdamW's states; ZeRO-3: every parameter's `ds_tensor` against its
`ds_numel`, `fp32_partitioned_groups_flat`, `grad_partitions_flat_buffer`; both: the fp32 gradient
partition handed to the wrapped optimizer, the gradient-reduction bucket buffers).

`expected_partitions(numels, stage, dp)` says what DeepSpeed 0.19 allocates per rank, padding included:
- ZeRO-1/2: all trainable parameters of a group are flattened into one bit16 buffer padded to a
  multiple of 2·dp elements (`nccl_start_alignment_factor` 2: 4-byte aligned partition starts), then
  cut into dp equal partitions: P = ceil(n / 2dp) · 2. The fp32 master partition, each AdamW state
  and the fp32 gradient partition have P elements on every rank; the padding (dp·P − n) sits at the
  end of the last rank's partition. Each rank keeps the whole padded bit16 buffer (the module's
  parameters are views into it). After backward the reduced bit16 gradients of the partition are kept
  per parameter, whole: every parameter overlapping [rank·P, (rank+1)·P) counts in full, plus the
  rank's share of the padding (DeepSpeed
  0.19.8, bf16, default gradient_accumulation_dtype = bf16; ZeRO-1 and ZeRO-2 alike).
- ZeRO-3: each parameter is padded to a multiple of dp and split evenly: ceil(n_i / dp) elements per
  rank; the rank's bit16 partition, fp32 master, AdamW states, fp32 gradient partition and the
  persistent bit16 `grad_partitions_flat_buffer` all have P3 = Σ ceil(n_i / dp) elements.
`zero_py_partitions(spec, plan, stage, dp)` is the same per-rank figure from planner.engine.distributed.zero (no
padding: n/dp as a real number) so the two can be compared term by term (`compare`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ds_zero_run.py"
NCCL_START_ALIGNMENT_FACTOR = 2  # deepspeed/runtime/zero/stage_1_and_2.py: 4-byte alignment / sizeof(fp16)
HALF = {"bf16": 2, "fp16": 2, "fp32": 4}


class PartitionFigures(BaseModel):
    """Bytes one rank holds for the model states under ZeRO (elements x dtype bytes)."""

    stage: int
    dp: int
    bit16_params: float = Field(description="ZeRO-1/2: the whole padded flat buffer; ZeRO-3: the rank's partitions")
    fp32_master: float
    optimizer_states: float = Field(description="AdamW exp_avg + exp_avg_sq")
    fp32_grads: float = Field(description="the fp32 gradient partition the wrapped optimizer steps on")
    bit16_grads: float = Field(description="reduced bit16 gradients of the rank's partition after backward "
                                           "(ZeRO-1/2: every parameter overlapping the partition, whole; ZeRO-3: "
                                           "grad_partitions_flat_buffer, persistent)")
    partition_numel: float = Field(description="P: elements of the rank's partition")
    padding_numel: int = 0

    @property
    def zero_optimizer_states(self) -> float:
        """planner.engine.distributed.zero's `optimizer_states` category: master + states + fp32 gradients."""
        return self.fp32_master + self.optimizer_states + self.fp32_grads


def expected_partitions(numels: list[int], stage: int, dp: int, precision: str = "bf16",
                        rank: int = 0) -> PartitionFigures:
    """What DeepSpeed allocates on `rank` for trainable parameters of these sizes (module doc)."""
    h = HALF[precision]
    n = sum(numels)
    if stage in (1, 2):
        align = NCCL_START_ALIGNMENT_FACTOR * dp
        flat = math.ceil(n / align) * align
        p = flat // dp
        lo, hi = rank * p, (rank + 1) * p
        overlapping, offset = 0, 0
        for x in numels:  # the reduced gradients keep each parameter that overlaps the partition whole
            if offset < hi and offset + x > lo:
                overlapping += x
            offset += x
        pad = max(0, min(p, hi - n))  # the alignment padding, at the end of the last partition(s)
        return PartitionFigures(stage=stage, dp=dp, bit16_params=flat * h, fp32_master=4 * p, optimizer_states=8 * p,
                                fp32_grads=4 * p, bit16_grads=(overlapping + pad) * h, partition_numel=p,
                                padding_numel=pad)
    if stage == 3:
        p = sum(math.ceil(x / dp) for x in numels)
        return PartitionFigures(stage=3, dp=dp, bit16_params=p * h, fp32_master=4 * p, optimizer_states=8 * p,
                                fp32_grads=4 * p, bit16_grads=p * h, partition_numel=p, padding_numel=p * dp - n)
    raise ValueError("stage: ZeRO stages are 1, 2 and 3")


def zero_py_partitions(spec, plan, stage: int, dp: int) -> PartitionFigures:
    """The same figures from planner.engine.distributed.zero (DeepSpeed semantics; n/dp without padding)."""
    from planner.engine.distributed.layout import make_layout
    from planner.engine.distributed.zero import plan_states

    lay = make_layout(gpus=dp, zero=stage, micro_batch=plan.batch)
    st = plan_states(spec, plan, lay)
    n = st.fp32_grads / 4  # trainable elements
    return PartitionFigures(
        stage=stage, dp=dp,
        bit16_params=st.params_trainable / (dp if stage >= 3 else 1),
        fp32_master=4 * n / dp,
        optimizer_states=(st.optimizer - 4 * n) / dp,
        fp32_grads=st.fp32_grads / dp,
        bit16_grads=st.grads / (dp if stage >= 2 else 1),
        partition_numel=n / dp,
    )


def measured_partitions(report: dict) -> PartitionFigures:
    """The figures read from one rank's engine (scripts/ds_zero_run.py's JSON)."""
    stage, dp = report["stage"], report["world_size"]
    size = {"torch.bfloat16": 2, "torch.float16": 2, "torch.float32": 4}
    at = report.get("at_inner_step", {})
    fp32_grads = sum(p["grad_numel"] * size[p["grad_dtype"]] for p in at.get("params", []) if p["grad_dtype"])
    if stage in (1, 2):
        groups = report["groups"]
        flat = sum(g["flat_numel"] * size[g["flat_dtype"]] for g in groups)
        master = sum(g["fp32_partition_numel"] * size[g["fp32_dtype"]] for g in groups)
        states = sum(v * size[g["state_dtype"][k]] for g in groups for k, v in g["state_numel"].items())
        p = sum(g["fp32_partition_numel"] for g in groups)
        pad = sum(g["partition_padding"] for g in groups)
        grads = report.get("after_backward", {}).get("averaged_gradients", {}).get("storage_bytes", 0)
        return PartitionFigures(stage=stage, dp=dp, bit16_params=flat, fp32_master=master, optimizer_states=states,
                                fp32_grads=fp32_grads, bit16_grads=grads, partition_numel=p, padding_numel=pad)
    params = report["params"]
    bit16 = sum(x["partition_numel"] * size[x["dtype"]] for x in params)
    p = sum(x["partition_numel"] for x in params)
    master = sum(report["fp32_partitioned_groups_flat_numel"]) * size[report["fp32_dtype"]]
    states = sum(v * 4 for st in report["state_numel"] for v in st.values())
    buf = report.get("grad_partitions_flat_buffer") or {"numel": 0, "dtype": "torch.float32"}
    return PartitionFigures(stage=3, dp=dp, bit16_params=bit16, fp32_master=master, optimizer_states=states,
                            fp32_grads=fp32_grads, bit16_grads=buf["numel"] * size[buf["dtype"]], partition_numel=p,
                            padding_numel=sum(x["partition_numel"] * dp - x["ds_numel"] for x in params))


FIELDS = ("bit16_params", "fp32_master", "optimizer_states", "fp32_grads", "bit16_grads")


def compare(measured: PartitionFigures, expected: PartitionFigures, zero_py: PartitionFigures) -> list[dict[str, Any]]:
    """Rows: quantity, planner.engine.distributed.zero, DeepSpeed's layout with padding, measured (bytes)."""
    rows = []
    for f in FIELDS + ("partition_numel",):
        rows.append({"stage": measured.stage, "dp": measured.dp, "quantity": f, "zero_py": getattr(zero_py, f),
                     "expected": getattr(expected, f), "measured": getattr(measured, f)})
    rows.append({"stage": measured.stage, "dp": measured.dp, "quantity": "zero_optimizer_states",
                 "zero_py": zero_py.zero_optimizer_states, "expected": expected.zero_optimizer_states,
                 "measured": measured.zero_optimizer_states})
    return rows


def param_numels(config: dict) -> list[int]:
    """Trainable parameter sizes of the transformers model `config` builds, in module order (on meta)."""
    import torch

    from planner.backends.dryrun._build import hf_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config, use_cache=False))
    return [p.numel() for p in model.parameters() if p.requires_grad]


def run_zero(config: dict, stages: tuple[int, ...] = (1, 2, 3), nproc: int = 2, *, precision: str = "bf16",
             out_dir: str | None = None, timeout: float = 600, seq: int = 16) -> dict[int, list[dict]]:
    """Run scripts/ds_zero_run.py under torchrun (CPU, gloo); {stage: [rank reports]}.

    DeepSpeed's C++ ops are never built: the script passes a torch optimizer and skips the CPU
    shared-memory comm op; TORCH_EXTENSIONS_DIR points into the temporary directory anyway."""
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"{SCRIPT} is missing (it ships with the repository, not the package)")
    with tempfile.TemporaryDirectory(prefix="ds_zero_") as tmp:
        out = Path(out_dir or tmp) / "reports"
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(config))
        env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(Path(tmp) / "torch_extensions"),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(SCRIPT), "--stage", ",".join(map(str, stages)), "--config", str(cfg_path), "--out", str(out),
               "--precision", precision, "--seq", str(seq)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{tail}")
        reports: dict[int, list[dict]] = {}
        for s in stages:
            reports[s] = [json.loads((out / f"rank{r}_stage{s}.json").read_text()) for r in range(nproc)]
        for rs in reports.values():
            for r in rs:
                r["launcher_wall_s"] = round(time.perf_counter() - t0, 3)
        return reports


__all__ = ["PartitionFigures", "compare", "expected_partitions", "measured_partitions", "param_numels", "run_zero",
           "zero_py_partitions"]
