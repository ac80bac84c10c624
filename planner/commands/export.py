"""`planner export`: a plan written as the configs of TRL, accelerate, DeepSpeed, LLaMA-Factory or axolotl."""

from __future__ import annotations

import argparse

from planner.commands.common import (EXIT_FITS, BadInput, Out, add_layout_args, add_plan_args, config_warnings,
                                     layout_fields, plan_from_args)

HELP = "write a plan as the configs people train with (TRL, accelerate, DeepSpeed, LLaMA-Factory, axolotl)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_args(p)
    g = p.add_argument_group("layout (as planner fit takes it; --zero writes a DeepSpeed config)")
    add_layout_args(g, ("gpus", "gpus_per_node", "zero", "fsdp", "offload"))
    g = p.add_argument_group("export")
    g.add_argument("--to", required=True, metavar="FORMAT[,FORMAT]",
                   help="trl, accelerate, deepspeed, llamafactory, axolotl (comma list for several)")
    g.add_argument("-o", "--out", required=True, metavar="DIR", help="directory the files are written to")
    g.add_argument("--force", action="store_true", help="overwrite files that exist")
    g.add_argument("--json", action="store_true", help="print the files written as JSON (name -> path)")


def run(args: argparse.Namespace, out: Out) -> int:
    import shlex
    import sys
    from pathlib import Path

    from planner.configs.export import render
    from planner.engine.distributed.layout import Layout

    try:
        layout = layout_fields(args)
        plan = plan_from_args(args)
        if layout:
            Layout(**layout)  # the same checks fit makes (ZeRO stage range, offload values...)
        formats = [f.strip().lower() for f in args.to.split(",") if f.strip()]
        files = render(plan, layout, formats, command="planner " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except ValueError as e:
        raise BadInput(_one_line(e)) from None
    for w in config_warnings(args):
        out.warn(w)
    target = Path(args.out)
    if target.exists() and not target.is_dir():
        raise BadInput(f"out: {target} is a file, not a directory")
    exists = [n for n in files if (target / n).exists()]
    if exists and not args.force:
        raise BadInput(f"out: {target / exists[0]} exists (give --force to overwrite)")
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
        written[name] = str(target / name)
    if args.json:
        import json

        out.print(json.dumps(written, indent=2))
    else:
        for name, path in written.items():
            out.print(f"wrote {path}")
    return EXIT_FITS


def _one_line(e: Exception) -> str:
    from planner.errors import one_line

    return one_line(str(e))
