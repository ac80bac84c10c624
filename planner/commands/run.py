"""`planner run`: execute a plan through an existing launcher (torchrun, deepspeed, accelerate) or TRL's
trainer, measure every rank, and write a run record (reports/runs/)."""

from __future__ import annotations

import argparse

from planner.commands.common import (EXIT_DOES_NOT_FIT, EXIT_FITS, BadInput, Out, add_layout_args, add_plan_args,
                                     config_warnings, layout_fields, plan_from_args)

HELP = "run a plan through torchrun, the DeepSpeed launcher, accelerate or TRL's trainer, and record the measurement"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_args(p)
    g = p.add_argument_group("launch")
    g.add_argument("--launcher", default="torchrun", metavar="{torchrun,deepspeed,accelerate}",
                   help="the launcher that starts the ranks (default: torchrun)")
    g.add_argument("--trainer", default="planner", metavar="{planner,trl}",
                   help="planner: the plan's step on every rank; trl: TRL's own SFTTrainer/DPOTrainer from the "
                        "exported config on a synthetic dataset, one process (default: planner)")
    g.add_argument("--nproc", type=int, default=1, metavar="N", help="processes (GPUs) per node (default: 1)")
    g.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    g.add_argument("--hostfile", metavar="FILE", help="deepspeed: the hosts of a multi-node run")
    g.add_argument("--master", metavar="HOST:PORT", help="torchrun: the rendezvous endpoint of a multi-node run")
    add_layout_args(g, ("zero", "fsdp", "offload"))
    g.add_argument("--steps", type=int, default=3, metavar="K", help="optimizer steps (default: 3)")
    g.add_argument("--device", default="cuda", metavar="{cuda,cpu}", help="where the ranks run (default: cuda)")
    g.add_argument("--out", default="reports/runs", metavar="DIR", help="where run records go (default: reports/runs)")
    g.add_argument("--name", metavar="NAME", help="the run's directory name (default: time, task, model, launcher)")
    g.add_argument("--profile", metavar="FILE|ID", help="device profile that prices the estimated step time "
                                                        "(a CPU run needs one: planner calibrate -o FILE)")
    g.add_argument("--dry", action="store_true", help="write the configs and print the command, run nothing")
    g.add_argument("--json", action="store_true", help="print the run record as JSON")


def run(args: argparse.Namespace, out: Out) -> int:
    import time

    from planner.backends.launch import RunError, RunRefused, execute, prepare, record
    from planner.models import ModelError

    for name in ("nproc", "nnodes", "steps"):
        if getattr(args, name) < 1:
            raise BadInput(f"{name}: must be >= 1 (got {getattr(args, name)})")
    try:
        p = prepare(plan_from_args(args), layout_fields(args), launcher=args.launcher, trainer=args.trainer,
                    device=args.device, nproc=args.nproc, nnodes=args.nnodes, hostfile=args.hostfile,
                    master=args.master, steps=args.steps, out_root=args.out, name=args.name)
    except RunRefused as e:
        out.warn(f"refused: {e}")
        return EXIT_DOES_NOT_FIT
    except (RunError, ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    for w in config_warnings(args) + p.notes:
        out.warn(w)
    if args.dry:
        out.print(f"wrote {p.run_dir} (plan, configs, spec); the command (run it from there):")
        out.print(" ".join(p.command))
        return EXIT_FITS
    if not args.json:
        out.print(f"running {p.nproc} rank(s) through {p.launcher if p.trainer == 'planner' else 'TRL'} on {p.device}; "
                  f"log: {p.run_dir / 'run.log'}")
    t0 = time.perf_counter()
    code = execute(p, progress=None if args.json else (lambda line: out.print(f"  {line}")))
    rec = record(p, code, time.perf_counter() - t0, profile=args.profile)
    if args.json:
        import json

        out.print(json.dumps(rec, indent=2))
    else:
        out.print((p.run_dir / "record.md").read_text())
        out.print(f"record: {p.run_dir / 'record.json'} and record.md")
    if rec["status"] != "completed":
        for e in rec["errors"]:
            out.warn(f"rank {e['rank']} failed: {e['message']}" if e["rank"] is not None else e["message"])
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS
