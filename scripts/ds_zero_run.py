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


# the engine's partitions, read as `planner run`'s ranks read them
from planner.backends.launch_worker import gradient_holdings, partitions, watch_inner_step  # noqa: E402


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
    at_step = watch_inner_step(engine)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        after_backward = gradient_holdings(engine)
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
