"""The `planner` command line: parses, dispatches to a command module, reports bad input.

Start-up must stay fast (`planner fit` from a cold start in well under half a second): this module
and the command modules import only the standard library at import time; each command imports what
it needs when it runs. Commands live in planner/commands/ (one module each, on top of planner.api)
and are registered in COMMANDS (name -> (help, add_arguments, run)); plugins add more through
`register_commands`.

Exit codes: 0 the plan fits (or a listing succeeded), 1 it does not fit, 2 bad input, 130
interrupted. Bad input of any kind prints one line `planner: error: <message>` on stderr and nothing
on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from planner.commands import calibrate, catalog, dryrun, export, fit, plan, run, serve, validate
from planner.commands.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, BadInput, Out


class UsageError(Exception):
    """Bad command line (argparse's complaints), reported on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# name -> (help, add_arguments, run); plugins add more through register_commands.
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Out], int]]
COMMANDS: dict[str, Command] = {
    "fit": (fit.HELP, fit.add_arguments, fit.run),
    "models": ("list the model catalog", catalog.add_arguments, catalog.run_models),
    "gpus": ("list the GPU catalog", catalog.add_arguments, catalog.run_gpus),
    "plugins": ("list the loaded plugins and what each registers", catalog.add_arguments, catalog.run_plugins),
    "validate": (validate.HELP, validate.add_arguments, validate.run),
    "serve": (serve.HELP, serve.add_arguments, serve.run),
    "calibrate": (calibrate.HELP, calibrate.add_arguments, calibrate.run),
    "export": (export.HELP, export.add_arguments, export.run),
    "run": (run.HELP, run.add_arguments, run.run),
    "dryrun": (dryrun.HELP, dryrun.add_arguments, dryrun.run),
    "plan": (plan.HELP, plan.add_arguments, plan.run),
}

EPILOG = """\
examples:
  planner fit --model llama-3.1-8b --gpu a100-80gb --method qlora --batch 4 --seq 2048 --grad-ckpt
  planner fit --model llama-3.1-70b --gpu h100-sxm --gpus 16 --zero 3 --tp 2 --batch 2 --seq 4096 --grad-ckpt
  planner fit --model llama-3.2-1b --task distill --teacher llama-3.1-8b --gpu a100-80gb
  planner validate --model qwen2.5-0.5b --method lora --batch 4      (estimate vs a dry run of the real program)
  planner serve --model llama-3.1-8b --gpu h100-sxm --rate 4
  planner fit plan.yaml --batch 8 --json
  planner fit --from trl_config.yaml --from accelerate_config.yaml --gpu h100-sxm   (the configs you train with)
  planner export --model llama-3.1-8b --method qlora --batch 4 --grad-ckpt --to trl,accelerate -o run/
  planner fit --model ./my-model/config.json --gpu-memory 24GiB --task generate --new-tokens 512

  planner plan --model llama-3.1-8b --gpu h100-sxm --seq 2048 --global-batch 64 --max-gpus 8   (the best plan that fits)
  planner dryrun examples/steps/dpo_loop.py:both_forwards_first --task dpo --model llama-3.2-1b --batch 2 --seq 1024
  planner run --model examples/models/tiny-llama --device cpu --nproc 2 --zero 2 --launcher deepspeed --batch 2 --seq 64

exit codes: 0 fits (run: ran to its end), 1 does not fit (run: refused, or a rank failed), 2 bad input
"""


def _all_commands(argv: list[str]) -> dict[str, Command]:
    """Built-in commands, plus plugins' when the command is not a built-in or help is asked for
    (loading plugins costs start-up time the common commands should not pay)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in COMMANDS and not (argv and argv[0] in ("-h", "--help")):
        return COMMANDS
    from planner.plugins import registry

    extra = {k: v for k, v in registry(scan=True).commands.items() if k not in COMMANDS}
    return {**COMMANDS, **extra}


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="planner",
        description="Memory, communication and time planner for LLM training, alignment and serving, checked against real programs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"planner {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in (commands or COMMANDS).items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        if name == "fit":
            p.epilog = EPILOG
            p.formatter_class = argparse.RawDescriptionHelpFormatter
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def _version() -> str:
    try:
        from planner import __version__

        return str(__version__)
    except Exception:
        return "0.1.0"


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    out = Out(stdout or sys.stdout, stderr or sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_all_commands(argv))
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out.stdout, out.stderr  # argparse's --help/--version print there
        try:
            args = parser.parse_args(argv)
        finally:
            sys.stdout, sys.stderr = old
        if getattr(args, "_run", None) is None:
            raise UsageError(f"give a command: {', '.join(COMMANDS)} (see planner --help)")
        return args._run(args, out)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except (UsageError, BadInput) as e:
        msg = " ".join(str(e).split())
        print(f"planner: error: {msg}", file=out.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C during a long search or simulation: no traceback
        print("planner: interrupted", file=out.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `planner models | head`: stop quietly
        if out.stdout is sys.__stdout__:
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
