"""`planner dryrun FILE.py:FUNC`: a user's own training step, dry-run at full scale on fake tensors."""

from __future__ import annotations

import argparse

from planner.commands.common import ALLOC_CONF_HELP, EXIT_FITS, BadInput, Out, add_plan_args, alloc_conf_from, plan_from_args

HELP = "dry-run your own training step (FILE.py:FUNCTION) at full scale on fake tensors: peak, breakdown, phase"

SAFETY = ("The file is imported and its function run in this process, as any Python script you run: run only "
          "code you trust. Nothing is downloaded; nothing is written.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"{HELP}.\n\n{SAFETY}"
    p.add_argument("step", metavar="FILE.py:FUNCTION",
                   help="step(ctx) (a technique's step: ctx.model(role), ctx.optimizer(role), ctx.token_ids(b, s), "
                        "ctx.phase(name)) or step(model, optimizer, batch) (batch: input_ids and labels, random)")
    add_plan_args(p)
    g = p.add_argument_group("dry run")
    g.add_argument("--steps", type=int, default=2, metavar="K", help="times the step runs (default: 2)")
    g.add_argument("--device", default="fake", metavar="{fake,cpu}",
                   help="fake: full scale on fake tensors; cpu: real tensors (tiny configs) (default: fake)")
    g.add_argument("--alloc-conf", metavar="CONF", default=None,
                   help=ALLOC_CONF_HELP + "; reserved is simulated over the run's allocation trace")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout")


def run(args: argparse.Namespace, out: Out) -> int:
    from planner.backends import BackendError
    from planner.dryrun import DryrunError, measure
    from planner.models import ModelError

    # the positional PLAN.yaml of add_plan_args would take the step's place: a plan file goes by --from
    try:
        conf = alloc_conf_from(args)
        plan = plan_from_args(args)
        result = measure(args.step, plan, steps=args.steps, device=args.device, alloc_conf=conf)
    except (DryrunError, BackendError, ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    if args.json:
        import json

        doc = result.model_dump()
        doc["difference"] = result.difference
        out.print(json.dumps(doc, indent=2))
        return EXIT_FITS
    _print(result, out)
    return EXIT_FITS


def _print(r, out: Out) -> None:
    from planner.units import format_gib

    out.print(f"step    {r.step} ({r.signature}), task {r.task}, {r.steps} step(s) on "
              f"{'fake tensors (full scale)' if r.device == 'fake' else 'real CPU tensors'}")
    out.print("")
    est = r.estimate_peak_allocated_bytes
    diff = f"   estimate {format_gib(est)} ({r.difference * 100:+.2f}% measured vs estimate)" if est else ""
    out.print(f"  peak allocated  {format_gib(r.peak_allocated_bytes):>12}{diff}")
    if r.reserved_bytes is not None:
        out.print(f"  reserved        {format_gib(r.reserved_bytes):>12}   simulated: the caching allocator over the run's trace")
    out.print(f"  peak phase      {r.peak_phase or '':>12}")
    if r.peak_op:
        out.print(f"  peak op         {r.peak_op}")
    out.print("")
    out.print("breakdown at the peak (measured, and the technique's estimate):")
    for k, v in r.breakdown.items():
        if v or r.estimate_breakdown.get(k):
            e = r.estimate_breakdown.get(k)
            out.print(f"  {k:<18}{format_gib(v):>12}" + (f"   {format_gib(e):>12}" if e is not None else ""))
    if r.details:
        out.print("")
        out.print("details at the peak:")
        for k, v in r.details.items():
            out.print(f"  {k:<18}{format_gib(v):>12}")
    if r.phases:
        out.print("")
        out.print("peak allocated per phase:")
        for k, v in r.phases.items():
            out.print(f"  {k:<18}{format_gib(v):>12}")
    if r.estimate_note:
        out.print("")
        out.print(f"estimate: {r.estimate_note}")
