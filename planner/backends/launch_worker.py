"""One rank of `planner run`: the plan's training step, started by an existing launcher (torchrun,
the DeepSpeed launcher, accelerate launch), measured, written as JSON.

    python -m planner.backends.launch_worker --spec SPEC.json   (under a launcher: RANK, WORLD_SIZE...)

The spec (planner.backends.launch.write_spec) holds the plan, the layout, the model's config (random
weights: nothing is downloaded), the steps and the device. The step is sft's: a causal-LM loss over
random token ids, `grad_accum` micro-batches, then the optimizer, under:
- ZeRO (layout `zero`): deepspeed.initialize with the exported DeepSpeed config and torch's AdamW
  (foreach=False) wrapped (DeepSpeed's own optimizers JIT-compile C++); the engine's partitions are
  read from its own structures (`partitions`);
- several ranks otherwise: DDP (gloo on the CPU, nccl on CUDA);
- one rank: the model alone.
`--trainer trl` runs TRL's own trainer (planner.backends.trl_run) instead, in one process.

Each rank writes OUT/rank{r}.json: what it holds after its last step's backward (parameters, gradients)
and optimizer step (optimizer states), in bytes, read from the tensors; step times; on CUDA
max_memory_allocated / max_memory_reserved. A rank that fails writes OUT/rank{r}.error (the
exception, one line) before it exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

from planner.backends.held import PROGRESS
from planner.backends.held import numel as _numel
from planner.backends.held import states as _states
from planner.backends.held import tensor_bytes as _bytes



def partitions(engine: Any, stage: int) -> dict:
    """Partition sizes (elements) a ZeRO engine holds on this rank, read from DeepSpeed's own structures
    (the fields planner.backends.deepspeed_run.measured_partitions reads)."""
    import torch

    opt = engine.optimizer
    out: dict = {"optimizer_class": type(opt).__name__,
                 "reduce_bucket_size": int(getattr(opt, "reduce_bucket_size", 0) or 0),
                 "contiguous_gradients": bool(getattr(opt, "contiguous_gradients", False)),
                 "overlap_comm": bool(getattr(opt, "overlap_comm", False))}
    buffers = []
    for _dtype, bucket in (getattr(opt, "ipg_buckets", None) or {}).items():
        bufs = bucket.buffer if isinstance(bucket.buffer, (list, tuple)) else [bucket.buffer]
        buffers += [{"numel": _numel(b), "dtype": str(b.dtype)} for b in bufs if b is not None]
    out["ipg_bucket_buffers"] = buffers  # gradient-reduction staging buffers (reduce_bucket_size elements)
    gip = getattr(opt, "grads_in_partition", None)
    if isinstance(gip, torch.Tensor):
        out["grads_in_partition"] = {"numel": _numel(gip), "dtype": str(gip.dtype)}
    if stage in (1, 2):
        out["groups"] = []
        for i, fp32 in enumerate(opt.single_partition_of_fp32_groups):
            rank = opt.partition_id if hasattr(opt, "partition_id") else engine.global_rank
            flat = opt.bit16_groups_flat[i]
            parts = opt.parallel_partitioned_bit16_groups[i]
            state = opt.optimizer.state.get(fp32, {})
            out["groups"].append({
                "params": len(opt.bit16_groups[i]),
                "numel": sum(int(p.numel()) for p in opt.bit16_groups[i]),
                "flat_numel": _numel(flat),
                "flat_dtype": str(flat.dtype),
                "bit16_partition_numel": [_numel(p) for p in parts],
                "fp32_partition_numel": _numel(fp32),
                "fp32_dtype": str(fp32.dtype),
                "partition_padding": int(opt.groups_padding[i]),
                "state_numel": {k: _numel(v) for k, v in _states(state)},
                "state_dtype": {k: str(v.dtype) for k, v in _states(state)},
                "rank_in_group": int(rank),
            })
        if stage == 2 and getattr(opt, "averaged_gradients", None):
            out["averaged_gradient_numel"] = {str(k): sum(_numel(g) for g in v)
                                              for k, v in opt.averaged_gradients.items() if v is not None}
    else:
        params = []
        for name, p in engine.module.named_parameters():
            params.append({"name": name, "ds_numel": int(p.ds_numel), "partition_numel": _numel(p.ds_tensor),
                           "dtype": str(p.ds_tensor.dtype), "shape": list(p.ds_shape)})
        out["params"] = params
        out["fp16_partitioned_groups_flat_numel"] = [int(x) for x in opt.fp16_partitioned_groups_flat_numel]
        out["fp32_partitioned_groups_flat_numel"] = [_numel(t) for t in opt.fp32_partitioned_groups_flat]
        out["fp32_dtype"] = str(opt.fp32_partitioned_groups_flat[0].dtype)
        out["state_numel"] = []
        for t in opt.fp32_partitioned_groups_flat:
            st = opt.optimizer.state.get(t, {})
            out["state_numel"].append({k: _numel(v) for k, v in _states(st)})
        buf = getattr(opt, "grad_partitions_flat_buffer", None)
        if buf is not None:
            out["grad_partitions_flat_buffer"] = {"numel": _numel(buf), "dtype": str(buf.dtype)}
    return out


def gradient_holdings(engine: Any) -> dict:
    """Gradient memory a ZeRO optimizer holds now (bit16 module grads, reduced partitions, buckets)."""
    import torch

    zopt = engine.optimizer
    out: dict = {}
    gip = getattr(zopt, "grads_in_partition", None)
    if isinstance(gip, torch.Tensor):
        out["grads_in_partition"] = {"numel": _numel(gip), "dtype": str(gip.dtype)}
    avg = getattr(zopt, "averaged_gradients", None)
    if isinstance(avg, dict):  # ZeRO-1/2: the reduced gradients of this rank's partition
        storages = {}
        for grads in avg.values():
            for g in grads or []:
                if isinstance(g, torch.Tensor):
                    st = g.untyped_storage()
                    storages[st.data_ptr()] = (st.nbytes(), str(g.dtype))
        out["averaged_gradients"] = {"storage_bytes": sum(b for b, _ in storages.values()),
                                     "dtypes": sorted({d for _, d in storages.values()})}
    grads = [p.grad for p in engine.module.parameters() if getattr(p, "grad", None) is not None]
    out["module_grad_numel"] = sum(_numel(g) for g in grads)
    out["module_grad_dtypes"] = sorted({str(g.dtype) for g in grads})
    out["gradient_accumulation_dtype"] = str(getattr(zopt, "gradient_accumulation_dtype", None))
    return out


def watch_inner_step(engine: Any) -> dict:
    """A dict filled, at each step of the optimizer ZeRO wraps, with what ZeRO hands it (its fp32
    partitions and their fp32 gradient partitions) and the gradient holdings then."""
    at_step: dict = {}

    def inner_pre_step(inner: Any, _args: Any, _kwargs: Any) -> None:
        at_step["params"] = [{"numel": _numel(p), "dtype": str(p.dtype), "grad_numel": _numel(p.grad),
                              "grad_dtype": str(p.grad.dtype) if p.grad is not None else None}
                             for g in inner.param_groups for p in g["params"]]
        at_step.update(gradient_holdings(engine))

    engine.optimizer.optimizer.register_step_pre_hook(inner_pre_step)
    return at_step


def build_model(spec: dict) -> Any:
    """The plan's model from its config (random weights), in the plan's weight dtype, LoRA attached."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = spec["plan"]
    cfg = dict(spec["model_config"])
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    torch.manual_seed(spec.get("seed", 0))
    from planner.backends.dryrun._build import DTYPES
    from planner.specs import Plan

    # ZeRO holds the module in its half type itself (from the fp32 model it is given)
    dtype = DTYPES["fp32" if spec["layout"].get("zero") is not None else Plan(**plan).weight_dtype]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, use_cache=False, **cfg), dtype=dtype)
    if plan["attn"] == "eager":
        model.config._attn_implementation = "eager"
    if plan["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if plan["lora_targets"] == "all-linear" else plan["lora_targets"].split(",")
        alpha = plan["lora_alpha"] if plan["lora_alpha"] is not None else 2.0 * plan["lora_rank"]
        model = get_peft_model(model, LoraConfig(r=plan["lora_rank"], lora_alpha=alpha, lora_dropout=plan["lora_dropout"],
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    if plan["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if plan["method"] == "lora":
            model.enable_input_require_grads()
    return model


def make_optimizer(name: str, params: list, zero: bool) -> Any:
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name in ("adamw", "adamw-fused"):
        if zero:  # ZeRO wraps torch's AdamW; foreach=False: one kernel per tensor on the CPU
            return torch.optim.AdamW(params, lr=1e-4, foreach=False)
        return torch.optim.AdamW(params, lr=1e-4, fused=True) if name == "adamw-fused" else torch.optim.AdamW(params, lr=1e-4)
    raise SystemExit(f"optimizer {name}: planner run supports adamw, adamw-fused and sgd (bitsandbytes' need CUDA)")


def run(spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    plan, layout = spec["plan"], spec["layout"]
    device = spec["device"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    zero = layout.get("zero")
    backend = "gloo" if device == "cpu" else "nccl"
    if zero is not None:
        import importlib

        import deepspeed

        # the CPU accelerator JIT-compiles a shared-memory all-reduce (C++, minutes) at init; gloo suffices
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(backend)
    elif world > 1:
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device == "cuda":
        torch.cuda.set_device(local)
    dev = torch.device(device if device == "cpu" else f"cuda:{local}")
    if os.environ.get("PLANNER_RUN_FAIL_RANK") == str(rank):  # fault injection: the tests' failing rank
        raise RuntimeError(f"rank {rank} failed on purpose (PLANNER_RUN_FAIL_RANK)")
    model = build_model(spec)
    if zero is None:
        model.to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(plan["optimizer"], trainable, zero is not None)
    engine = None
    if zero is not None:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=spec["deepspeed_config"])
        step_model = engine
        at_inner_step = watch_inner_step(engine)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_model = DDP(model, device_ids=None if device == "cpu" else [local])
    else:
        step_model = model
    autocast = plan["precision"].startswith("mixed") and zero is None
    half = torch.bfloat16 if plan["precision"].endswith("bf16") else torch.float16
    vocab = spec["model_config"]["vocab_size"]
    gen = torch.Generator().manual_seed(1000 + rank)
    batch, seq, accum, steps = plan["batch"], plan["seq"], plan["grad_accum"], spec["steps"]
    times: list[float] = []
    held: dict[str, int] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(accum):
            ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
            with torch.autocast(device_type=device, dtype=half, enabled=autocast):
                loss = step_model(input_ids=ids, labels=ids).loss
            if engine is not None:
                engine.backward(loss)
            else:
                (loss / accum).backward()
            loss_sum += float(loss.detach())
        if step == steps - 1:
            held["parameter_bytes"] = _bytes(p.data for p in model.parameters())
            held["gradient_bytes"] = _bytes(p.grad for p in model.parameters())
            after_backward = gradient_holdings(engine) if engine is not None else {}
        if engine is not None:
            engine.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"{PROGRESS} step {step + 1}/{steps} loss {loss_sum / accum:.4f} {times[-1] * 1e3:.1f} ms", flush=True)
    inner = engine.optimizer.optimizer if engine is not None else opt
    held["optimizer_state_bytes"] = _bytes(v for st in inner.state.values() for _, v in _states(st))
    report: dict[str, Any] = {"rank": rank, "world_size": world, "local_rank": local, "device": device,
                              "step_s": times, "tokens_per_step": batch * seq * accum, "held": held,
                              "engine": "deepspeed" if engine is not None else "ddp" if world > 1 else "single"}
    if engine is not None:  # in the form planner.backends.deepspeed_run.measured_partitions reads
        report["partitions"] = {"stage": zero, "world_size": world, **partitions(engine, zero),
                                "at_inner_step": at_inner_step, "after_backward": after_backward}
    if device == "cuda":
        report["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        report["max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
        report["gpu_name"] = torch.cuda.get_device_name(local)
    from planner.backends.measurement import versions

    report["versions"] = versions(extra=("deepspeed", "accelerate"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        if spec.get("trainer") == "trl":
            from planner.backends.trl_run import run_trl

            report = run_trl(spec)
        else:
            report = run(spec)
    except BaseException as e:  # the parent names the rank and its message in the record
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(f"{type(e).__name__}: {' '.join(str(e).split())}\n")
            f.write(traceback.format_exc())
        raise
    with open(os.path.join(out, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    code = main()
    # The report is written and the process group destroyed: leave without C++ static destructors (a
    # DeepSpeed/gloo thread never joined can make libstdc++ abort the rank at exit: scripts/ds_zero_run.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
