"""One real DeepSpeed ZeRO training step on the CPU, run by torchrun; every rank writes what its engine
holds (partition sizes) as JSON. Used by planner.backends.deepspeed_run and its tests.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/ds_zero_run.py --stage 1,2,3 --out /tmp/ds \\
        --config tiny.json [--precision bf16] [--steps 1]

Writes OUT/rank{r}_stage{s}.json: the engine's partition sizes in elements (see
planner.backends.deepspeed_run for the fields). The optimizer is torch's AdamW (foreach=False), wrapped by ZeRO with
`zero_allow_untested_optimizer` (DeepSpeed's own optimizers would JIT-compile C++).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _numel(t) -> int:
    return int(t.numel()) if t is not None else 0


def _states(state: dict) -> list:
    """AdamW's tensor states (exp_avg, exp_avg_sq), not its scalar step."""
    import torch

    return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]


def partitions(engine, stage: int) -> dict:
    """Partition sizes (elements) this rank's engine holds, read from DeepSpeed's own structures."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, help="ZeRO stage(s), e.g. 2 or 1,2,3 (one engine each, in order)")
    ap.add_argument("--config", required=True, help="a transformers config.json (tiny)")
    ap.add_argument("--out", required=True, help="directory for rank<r>_stage<s>.json")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--shm", action="store_true", help="let DeepSpeed build its shared-memory CPU comm op (C++ JIT)")
    args = ap.parse_args(argv)

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    if not args.shm:
        # the CPU accelerator JIT-compiles a shared-memory all-reduce (C++, minutes) at init; gloo suffices
        import importlib

        # (`import deepspeed.comm.torch as m` would bind the real torch: deepspeed.comm re-exports it)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    with open(args.config) as f:
        cfg = json.load(f)
    model_type = cfg.pop("model_type")
    stages = [int(x) for x in str(args.stage).split(",")]
    if any(x not in (1, 2, 3) for x in stages):
        ap.error("--stage: ZeRO stages are 1, 2 and 3")
    os.makedirs(args.out, exist_ok=True)
    for stage in stages:
        t1 = time.perf_counter()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
        report = one_stage(model, cfg, stage, args)
        report["wall_s"] = round(time.perf_counter() - t1, 3)
        report["versions"] = {"deepspeed": deepspeed.__version__, "torch": torch.__version__}
        with open(os.path.join(args.out, f"rank{rank}_stage{stage}.json"), "w") as f:
            json.dump(report, f, indent=1)
        dist.barrier()
    dist.barrier()  # ZeRO-3 sometimes aborted at exit without these two
    dist.destroy_process_group()
    return 0


def one_stage(model, cfg: dict, stage: int, args) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    elif args.precision == "fp16":
        ds_config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    at_step: dict = {}

    def gradient_holdings() -> dict:
        """Gradient memory the ZeRO optimizer holds now (bit16 module grads, reduced partitions, buckets)."""
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

    def inner_pre_step(inner, _args, _kwargs):
        # what ZeRO hands the wrapped optimizer: its fp32 partitions and their fp32 gradient partitions
        at_step["params"] = [{"numel": _numel(p), "dtype": str(p.dtype), "grad_numel": _numel(p.grad),
                              "grad_dtype": str(p.grad.dtype) if p.grad is not None else None}
                             for g in inner.param_groups for p in g["params"]]
        at_step.update(gradient_holdings())

    engine.optimizer.optimizer.register_step_pre_hook(inner_pre_step)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        after_backward = gradient_holdings()
        engine.step()
        losses.append(float(loss.detach()))
    report = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "stage": stage, "precision": args.precision,
        "num_params": int(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())),
        "module_dtype": str(next(engine.module.parameters()).dtype),
        "losses": losses,
        **partitions(engine, stage),
        "at_inner_step": at_step,
        "after_backward": after_backward,
    }
    engine.destroy() if hasattr(engine, "destroy") else None
    return report


if __name__ == "__main__":
    code = main()
    # Every report is written and the process group destroyed by now. Leave without running C++ static
    # destructors: at interpreter exit a DeepSpeed/gloo worker thread that was never joined can make
    # libstdc++ abort the rank ("terminate called without an active exception", SIGABRT; CI, 2026-12-03),
    # which torchrun reports as a failed run although the step finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
