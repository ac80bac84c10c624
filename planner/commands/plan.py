"""`planner plan`: the best plan that fits, across the knobs not pinned, ranked by an objective."""

from __future__ import annotations

import argparse
from typing import Any

from planner.commands.common import (EXIT_DOES_NOT_FIT, EXIT_FITS, PLAN_FLAGS, BadInput, Out, add_layout_args,
                                     add_plan_args, config_warnings, file_values)

HELP = "search the best plan that fits: method, precision, optimizer, checkpointing, micro-batch, ZeRO/FSDP, TP, PP, GPUs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_args(p)
    g = p.add_argument_group("search (a knob given by its usual flag is pinned: --method lora, --zero 3, --tp 2...)")
    g.add_argument("--global-batch", type=int, metavar="N", help="sequences per optimizer step (required)")
    g.add_argument("--max-gpus", type=int, default=8, metavar="N", help="the most GPUs a plan may use (default: 8)")
    g.add_argument("--min-gpus", type=int, default=1, metavar="N", help="the fewest GPUs a plan may use (default: 1)")
    g.add_argument("--gpus-per-node", type=int, default=8, metavar="N", help="GPUs per node (default: 8)")
    add_layout_args(g, ("gpus", "zero", "fsdp", "offload"))
    g.add_argument("--tp", type=int, metavar="N", help="pin the tensor-parallel degree")
    g.add_argument("--pp", type=int, metavar="N", help="pin the pipeline stages")
    g.add_argument("--pp-schedule", metavar="{1f1b,interleaved}", help="pin the pipeline schedule")
    g.add_argument("--pp-chunks", type=int, metavar="V", help="with --pp-schedule interleaved: pin the chunks per stage")
    g.add_argument("--objective", default="tokens-per-s", metavar="{tokens-per-s,gpus,headroom,cost}",
                   help="what ranks the plans (default: tokens-per-s)")
    g.add_argument("--price", action="append", default=[], metavar="CARD=USD",
                   help="GPU-hour price for --objective cost (repeatable; the catalog lists none)")
    g.add_argument("--top", type=int, default=10, metavar="N", help="plans shown (default: 10)")
    g.add_argument("--save", metavar="DIR", help="write each plan shown as DIR/plan-N.yaml (a plan file fit reads)")
    g = p.add_argument_group("serving (--serve: the highest request rate a card sustains under latency goals)")
    g.add_argument("--serve", action="store_true", help="search the request rate instead of a training plan "
                                                        "(vLLM-style engine: planner serve's simulator)")
    g.add_argument("--ttft-p99", type=float, metavar="S", help="goal: p99 time to first token, seconds")
    g.add_argument("--tpot-p99", type=float, metavar="S", help="goal: p99 time per output token, seconds")
    g.add_argument("--requests", type=int, default=1000, metavar="N", help="requests simulated per rate (default: 1000)")
    g = p.add_argument_group("limits of one plan")
    g.add_argument("--max-batch", action="store_true",
                   help="instead of searching: the largest micro-batch that fits the plan as given (fit's limit)")
    g.add_argument("--max-seq", action="store_true",
                   help="instead of searching: the longest sequence that fits the plan as given (fit's limit)")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _prices(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        card, sep, usd = item.partition("=")
        try:
            value = float(usd)
        except ValueError:
            value = -1.0
        if not sep or not card or value <= 0:
            raise BadInput(f"price: give CARD=USD_PER_HOUR with a positive price (got '{item}')")
        out[card.strip()] = value
    return out


def run(args: argparse.Namespace, out: Out) -> int:
    from planner.models import ModelError
    from planner.plan_io import build_plan
    from planner.search import SearchError, search

    if args.serve:
        return _serve(args, out)
    if args.max_batch or args.max_seq:
        return _limits(args, out)
    if args.global_batch is None:
        raise BadInput("global_batch: give --global-batch N (sequences per optimizer step)")
    if args.top < 1:
        raise BadInput(f"top: must be >= 1 (got {args.top})")
    try:
        values, _ = file_values(args)
        flags = {name: getattr(args, name) for name in PLAN_FLAGS}
        plan, given = build_plan(values, flags)
        if plan.gpu is None and plan.gpu_memory is None:
            raise BadInput("gpu: give --gpu ID (the card the plans run on)")
        pins = {k: getattr(args, k) for k in ("gpus", "zero", "fsdp", "offload", "tp", "pp", "pp_schedule", "pp_chunks")}
        progress = _progress(out, args.json)
        cards = _cards() if plan.gpu == "any" else [plan.gpu]
        results = []
        for card in cards:
            one = plan.model_copy(update={"gpu": card}) if card is not None else plan
            results.append(search(one, global_batch=args.global_batch, max_gpus=args.max_gpus, min_gpus=args.min_gpus,
                                  gpus_per_node=args.gpus_per_node, objective=args.objective, top=args.top,
                                  pinned=given, layout_pins=pins, prices=_prices(args.price), progress=progress))
        progress(None, None)
        result = results[0] if len(results) == 1 else _merge(results, args.objective, args.top)
    except (SearchError, ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    for w in config_warnings(args):
        out.warn(w)
    if args.save and result.best:
        _save(result, args.save)
    if args.json:
        import json

        doc = result.model_dump()
        for key in ("best", "pareto"):
            for c, d in zip(getattr(result, key), doc[key]):
                d["fit_command"] = c.fit_command()
        out.print(json.dumps(doc, indent=2))
    else:
        _print(result, out, args.top)
    return EXIT_FITS if result.best else EXIT_DOES_NOT_FIT


def _cards() -> list[str]:
    """`--gpu any`: every card of the catalog with the FLOP/s that price training time."""
    from planner.gpus import gpu_ids, load_gpu

    cards = {g: load_gpu(g) for g in gpu_ids()}
    return [g for g, spec in cards.items() if spec.bf16_tflops or spec.fp16_tflops]


def _merge(results: list, objective: str, top: int):
    """One answer from the searches of several cards (`--gpu any`)."""
    best = sorted((c for r in results for c in r.best), key=lambda c: c.key(objective))[:top]
    from planner.search import pareto_front

    first = results[0]
    return first.model_copy(update={
        "space": sum(r.space for r in results), "estimated": sum(r.estimated for r in results),
        "pruned": sum(r.pruned for r in results), "invalid": sum(r.invalid for r in results),
        "fitting": sum(r.fitting for r in results), "seconds": round(sum(r.seconds for r in results), 3),
        "best": best, "pareto": pareto_front([c for r in results for c in r.pareto]),
        "closest": None if best else min((r.closest for r in results if r.closest),
                                         key=lambda c: c.device_bytes - c.gpu_memory_bytes, default=None),
        "dropped": [d for r in results for d in r.dropped],
        "profile": "each card's own profile (" + "; ".join(sorted({r.profile for r in results})) + ")"})


def _serve(args: argparse.Namespace, out: Out) -> int:
    """--serve: the highest Poisson request rate within the latency goals (planner.serving.rate_search)."""
    from planner.serving.rate_search import max_rate
    from planner.serving.specs import ServeSpec, TrafficSpec

    if not args.model or not args.gpu:
        raise BadInput("serve: give --model and --gpu")
    try:
        spec = ServeSpec(model=args.model, gpu=args.gpu, tp=args.tp or 1)
        traffic = TrafficSpec(requests=args.requests, **{k: getattr(args, k) for k in ("prompt_len", "new_tokens")
                                                          if getattr(args, k) is not None})
        ans = max_rate(spec, traffic, args.ttft_p99, args.tpot_p99)
    except ValueError as e:
        from planner.errors import one_line

        raise BadInput(one_line(str(e))) from None
    if args.json:
        import json

        out.print(json.dumps(ans.model_dump(), indent=2))
        return EXIT_FITS if ans.best else EXIT_DOES_NOT_FIT
    goals = ", ".join(f"{k} <= {v:g} s" for k, v in (("p99 TTFT", ans.ttft_p99_goal_s), ("p99 TPOT", ans.tpot_p99_goal_s))
                      if v is not None)
    if not ans.fits:
        out.print(f"DOES NOT FIT: {ans.reason}")
        return EXIT_DOES_NOT_FIT
    out.print(f"goals: {goals}; {traffic.requests} requests of {traffic.prompt_len} + {traffic.new_tokens} tokens per "
              f"rate, Poisson arrivals; {len(ans.probes)} rates simulated (to {ans.tolerance:.0%})")
    if ans.best is None:
        m = ans.missed
        out.print(f"NO RATE MEETS THE GOALS: even {m.rate:.3g} requests/s gives p99 TTFT {m.ttft_p99_s:.3f} s, "
                  f"p99 TPOT {m.tpot_p99_s:.4f} s")
        return EXIT_DOES_NOT_FIT
    b = ans.best
    out.print(f"highest rate: {b.rate:.2f} requests/s: p99 TTFT {b.ttft_p99_s:.3f} s, p99 TPOT {b.tpot_p99_s:.4f} s, "
              f"{b.tokens_per_s:,.0f} output tokens/s")
    if ans.missed is not None:
        m = ans.missed
        out.print(f"  at {m.rate:.2f} requests/s: p99 TTFT {m.ttft_p99_s:.3f} s, p99 TPOT {m.tpot_p99_s:.4f} s (misses)")
    out.print(f"  planner serve --model {args.model} --gpu {args.gpu} --tp {args.tp or 1} --rate {b.rate:.2f} "
              f"--requests {traffic.requests} --prompt-len {traffic.prompt_len} --new-tokens {traffic.new_tokens}")
    return EXIT_FITS


def _limits(args: argparse.Namespace, out: Out) -> int:
    """--max-batch / --max-seq: fit's limits for the plan as given."""
    from planner.api import fit
    from planner.models import ModelError
    from planner.plan_io import build_plan

    try:
        values, _ = file_values(args)
        plan, _ = build_plan(values, {name: getattr(args, name) for name in PLAN_FLAGS})
        result = fit(plan, with_suggestions=True)
    except (ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    lim = result.limits
    if not result.fits or lim is None:
        out.print("the plan as given does not fit: nothing to grow (planner fit says what would fit)")
        return EXIT_DOES_NOT_FIT
    answer = {}
    if args.max_batch:
        answer["max_batch"] = lim.max_batch
    if args.max_seq:
        answer["max_seq"] = lim.max_lengths.get("seq")
    answer["at_least"] = [k for k in lim.at_least if k in ("batch", "seq")]
    if args.json:
        import json

        out.print(json.dumps(answer, indent=2))
    else:
        for k, v in answer.items():
            if k != "at_least":
                more = " (at least: the search's cap)" if k.removeprefix("max_") in answer["at_least"] else ""
                out.print(f"{k.replace('_', ' ')}: {v}{more}")
    return EXIT_FITS


def _progress(out: Out, quiet: bool):
    """A progress bar on stderr once the search has run a second (rich), closed by progress(None, None)."""
    import time

    state: dict[str, Any] = {"t0": time.perf_counter(), "bar": None, "task": None}

    def update(done: int | None, total: int | None) -> None:
        bar = state["bar"]
        if done is None:
            if bar is not None:
                bar.stop()
            return
        if bar is None and not quiet and time.perf_counter() - state["t0"] > 1.0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            bar = Progress("searching", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=Console(file=out.stderr), transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task("plans", total=total)
        if bar is not None:
            bar.update(state["task"], completed=done, total=total)

    return update


def _layout_text(c: Any) -> str:
    lay = c.layout
    dp = lay["gpus"] // (lay["tp"] * lay["pp"])
    parts = [f"dp{dp}"] + [f"tp{lay['tp']}"] * (lay["tp"] > 1) + [f"pp{lay['pp']}"] * (lay["pp"] > 1)
    if lay.get("zero"):
        parts.append(f"zero{lay['zero']}")
    if lay.get("fsdp"):
        parts.append(f"fsdp {lay['fsdp']}")
    if lay.get("offload"):
        parts.append(f"offload {lay['offload']}")
    return " ".join(parts)


def _row(i: int, c: Any) -> str:
    p = c.plan
    accum = c.grad_accum
    mfu = f"{c.mfu:.0%}" if c.mfu is not None else ""
    cost = f"  ${c.cost_per_mtok:.3f}/Mtok" if c.cost_per_mtok is not None else ""
    return (f"{i:>3} {c.plan['gpu']:<10} {c.gpus:>5}  {_layout_text(c):<30} {p['method']:<6} {p['precision']:<10} {p['optimizer']:<12} "
            f"{'yes' if p['grad_ckpt'] else 'no':<5} {c.layout['micro_batch']:>3} x {accum:<4} "
            f"{c.device_bytes / 2**30:>8.2f} {c.headroom_bytes / 2**30:>9.2f} {c.tokens_per_s:>10,.0f} {mfu:>5}{cost}")


HEADER = (f"{'#':>3} {'card':<10} {'GPUs':>5}  {'layout':<30} {'method':<6} {'precision':<10} {'optimizer':<12} {'ckpt':<5} "
          f"{'micro x accum':<13} {'GiB/rank':>8} {'headroom':>9} {'tokens/s':>10} {'MFU':>5}")


def _print(r: Any, out: Out, top: int) -> None:
    out.print(f"searched {r.space:,} candidate plans in {r.seconds:.1f} s: {r.estimated:,} priced by the engine, "
              f"{r.pruned:,} skipped (a priced plan dominates them), {r.invalid:,} layouts the layout rules or the "
              f"model refuse; "
              f"{r.fitting:,} fit")
    out.print(f"time from profile {r.profile} (the ranking is as good as this profile)")
    for n in r.notes:
        out.print(f"  {n}")
    out.print("")
    if not r.best:
        if r.closest is not None:
            c = r.closest
            out.print(f"NOTHING FITS: the closest plan needs {c.device_bytes / 2**30:.2f} GiB on its busiest rank of "
                      f"{c.gpu_memory_bytes / 2**30:.2f} GiB (short by {(c.device_bytes - c.gpu_memory_bytes) / 2**30:.2f} GiB):")
            out.print(HEADER)
            out.print(_row(1, c))
            out.print(f"      {c.fit_command()}")
        else:
            out.print("NOTHING FITS: no candidate could be priced (every layout was invalid for the model)")
        return
    out.print(f"best by {r.objective}:")
    out.print(HEADER)
    for i, c in enumerate(r.best, 1):
        out.print(_row(i, c))
        out.print(f"      {c.fit_command()}")
    if r.dropped:
        out.print(f"({len(r.dropped)} finalist(s) dropped: planner fit's own verdict says they do not fit)")
    out.print("")
    out.print(f"Pareto front (tokens/s vs GPUs vs headroom: no other plan is better on all three): {len(r.pareto)} plans; "
              f"the fastest for each GPU count:")
    seen = set()
    for c in r.pareto:
        if c.gpus in seen:
            continue
        seen.add(c.gpus)
        out.print(_row(len(seen), c))


def _save(r: Any, where: str) -> None:
    from pathlib import Path

    import yaml

    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(r.best, 1):
        fields = c.fit_fields()
        (d / f"plan-{i}.yaml").write_text(f"# planner plan, #{i} by {r.objective}: {c.tokens_per_s:,.0f} tokens/s\n"
                                          + yaml.safe_dump(fields, sort_keys=False))
