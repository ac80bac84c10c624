"""`planner validate`: the estimate against a backend's measurement, for one plan or a named suite."""

from __future__ import annotations

import argparse

from planner.commands.common import (ALLOC_CONF_HELP, BadInput, Out, add_plan_args, alloc_conf_from, config_warnings,
                                     plan_from_args)

HELP = "estimate vs a backend's measurement, for one plan or a named suite"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_args(p)
    g = p.add_argument_group("validation")
    from planner.suites import SUITES, TIME_SUITES

    g.add_argument("--suite", metavar="NAME",
                   help=f"run a named suite ({', '.join([*SUITES, *TIME_SUITES])}) and write reports/validation/NAME.md "
                        f"and .csv; time-cpu: real CPU step times against the engine's, with a profile calibrated in "
                        f"the same run (a few minutes)")
    g.add_argument("--backend", default="dry-run", metavar="B", help="dry-run (the real program on fake tensors) or real (default: dry-run)")
    g.add_argument("--device", default=None, metavar="D", help="fake (dry-run), cpu or cuda (real); default: fake for dry-run, cuda for real")
    g.add_argument("--out", default="reports/validation", metavar="DIR", help="where --suite writes its tables (default: reports/validation)")
    g.add_argument("--profile", metavar="FILE|ID",
                   help="device profile for the estimated step time (a file from `planner calibrate -o`, needed for "
                        "--device cpu; default on cuda: the card's profile)")
    g.add_argument("--alloc-conf", metavar="CONF", default=None,
                   help=ALLOC_CONF_HELP + "; the allocator is simulated over the dry run's allocation trace: "
                        "reserved, the verdict on --gpu, the smallest card memory")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout")


def run(args: argparse.Namespace, out: Out) -> int:
    from planner.backends import check_backend
    from planner.models import ModelError

    from planner.suites import TIME_SUITES

    if args.suite in TIME_SUITES:
        return _run_time_suite(args, out)
    try:
        alloc = alloc_conf_from(args)  # bad settings fail before any work
        device = check_backend(args.backend, args.device)
        if args.suite:
            from planner.suites import suite

            suite(args.suite)  # unknown names fail before any work
            plan = None
        else:
            plan = plan_from_args(args)
            for w in config_warnings(args):
                out.warn(w)
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
        if device == "cuda" and args.alloc_conf is not None:
            raise BadInput("alloc-conf: on cuda the real allocator runs: set PYTORCH_CUDA_ALLOC_CONF for the run instead")
        if device == "cuda":
            alloc = None
        row = validate.compare(plan, args.backend, device, profile=args.profile, allocator=alloc)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.json:
        import json

        out.print(json.dumps(validate.row_json(row), indent=2))
    else:
        for line in validate.format_row(row):
            out.print(line)
    return 0


def _run_time_suite(args: argparse.Namespace, out: Out) -> int:
    """`--suite time-cpu`: planner.backends.time_validation's table (it needs torch and transformers)."""
    import importlib.util
    import sys
    from pathlib import Path

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(f"suite: time-cpu runs real CPU steps and needs {' and '.join(missing)}: "
                       f"pip install torch==2.13.0 && pip install -e '.[backends]'")
    from planner.backends import time_validation as tv

    def log(text: str) -> None:
        print(f"[time-cpu] {text}", file=sys.stderr, flush=True)

    suite = tv.run_suite("full", log=log)
    md = Path(args.out) / f"{args.suite}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    tv.write_report(suite, md, f"planner validate --suite {args.suite}" + (f" --out {args.out}" if args.out != "reports/validation" else ""))
    if args.json:
        import json

        out.print(json.dumps({"suite": args.suite, "cases": len(suite.rows), "median_abs_error": suite.median_abs_error,
                              "worst_abs_error": abs(suite.worst.error), "worst_case": suite.worst.case.label,
                              "rows": [{"case": r.case.label, "measured_s": r.measured_s, "predicted_s": r.predicted_s,
                                        "error": r.error} for r in suite.rows]}, indent=2))
    else:
        out.print(f"{args.suite}: {tv.summary_line(suite)}")
        out.print(f"wrote {md} and .csv")
    return 0
