"""`planner validate`: the estimate against a backend's measurement, for one plan or a named suite."""

from __future__ import annotations

import argparse

from planner.commands.common import BadInput, Out, add_plan_args, plan_from_args

HELP = "estimate vs a backend's measurement, for one plan or a named suite"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_args(p)
    g = p.add_argument_group("validation")
    from planner.suites import SUITES

    g.add_argument("--suite", metavar="NAME",
                   help=f"run a named suite ({', '.join(SUITES)}) and write reports/validation/NAME.md and .csv")
    g.add_argument("--backend", default="dry-run", metavar="B", help="dry-run (the real program on fake tensors) or real (default: dry-run)")
    g.add_argument("--device", default=None, metavar="D", help="fake (dry-run), cpu or cuda (real); default: fake for dry-run, cuda for real")
    g.add_argument("--out", default="reports/validation", metavar="DIR", help="where --suite writes its tables (default: reports/validation)")
    g.add_argument("--profile", metavar="FILE|ID",
                   help="device profile for the estimated step time (a file from `planner calibrate -o`, needed for "
                        "--device cpu; default on cuda: the card's profile)")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout")


def run(args: argparse.Namespace, out: Out) -> int:
    from planner.backends import check_backend
    from planner.models import ModelError

    try:
        device = check_backend(args.backend, args.device)
        if args.suite:
            from planner.suites import suite

            suite(args.suite)  # unknown names fail before any work
            plan = None
        else:
            plan = plan_from_args(args)
    except (ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    from pathlib import Path

    from planner.backends import validation as validate

    if args.suite:
        rows = validate.run_suite(args.suite, Path(args.out), args.backend, device)
        s = validate.summary(rows)
        if args.json:
            import json

            out.print(json.dumps({"suite": args.suite, "summary": s, "rows": [validate.row_json(r) for r in rows]}, indent=2))
        else:
            out.print(f"{args.suite}: {s['cases']} cases, peak allocated median |error| {s['median_abs_err_pct']:.2f}%, "
                      f"worst {s['worst_abs_err_pct']:.2f}%; categories within tolerance in {s['categories_ok']} of {s['cases']}")
            out.print(f"wrote {Path(args.out) / (args.suite + '.md')} and .csv")
        return 0
    try:
        row = validate.compare(plan, args.backend, device, profile=args.profile)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.json:
        import json

        out.print(json.dumps(validate.row_json(row), indent=2))
    else:
        for line in validate.format_row(row):
            out.print(line)
    return 0
