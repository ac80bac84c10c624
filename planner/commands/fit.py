"""`planner fit`: does a plan fit, on one GPU or many? Memory, time, suggestions and limits."""

from __future__ import annotations

import argparse
from typing import Any

from planner.commands.common import (ALLOC_CONF_HELP, EXIT_DOES_NOT_FIT, EXIT_FITS, BadInput, Out, add_layout_args,
                                     add_plan_args,
                                     alloc_conf_from, config_warnings, layout_fields, plan_from_args)

HELP = "does a plan fit a GPU? peak, reserved and device memory, with suggestions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_plan_args(p)
    g = p.add_argument_group("many GPUs (any of these switches to the distributed estimate: per-rank memory, collectives, step time)")
    add_layout_args(g, ("gpus", "gpus_per_node", "zero", "fsdp"))
    g.add_argument("--engine", metavar="{deepspeed,torch}",
                   help="what holds the model states: deepspeed (fp32 master weights, fp32 states for half-precision "
                        "plans) or torch (DDP / ZeroRedundancyOptimizer / FSDP, the plan's dtypes) "
                        "(default: deepspeed with --zero 1-3, else torch)")
    add_layout_args(g, ("offload",))
    g.add_argument("--cpu-memory", metavar="SIZE",
                   help="CPU memory of one node, which offloaded states must fit, e.g. 1TiB (default: 2TB, a DGX H100/H200)")
    g.add_argument("--tp", type=int, metavar="N", help="tensor-parallel degree (Megatron column/row splits)")
    g.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None, help="sequence parallelism with TP")
    g.add_argument("--pp", type=int, metavar="N", help="pipeline stages")
    g.add_argument("--pp-schedule", metavar="{1f1b,interleaved}", help="pipeline schedule (default: 1f1b)")
    g.add_argument("--pp-chunks", type=int, metavar="V", help="model chunks per stage for the interleaved schedule")
    g.add_argument("--global-batch", type=int, metavar="N", help="sequences per optimizer step (= batch x grad-accum x DP)")
    g.add_argument("--inter-node-gbps", type=float, metavar="G", help="inter-node gigabits/s per GPU, each direction (default: 400)")
    g = p.add_argument_group("caching allocator")
    g.add_argument("--alloc-conf", metavar="CONF", default=None,
                   help=ALLOC_CONF_HELP + "; the allocator is simulated over the step's allocation trace from the "
                        "engine's replay: reserved, the verdict on the card, the smallest card memory, and the settings "
                        "that make a step fit")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout (warnings go to stderr)")
    g.add_argument("--profile", metavar="FILE|ID",
                   help="device profile that prices the time: a file from `planner calibrate -o` or a catalog id "
                        "(default: the card's catalog profile, else one derived from its catalog figures)")
    g.add_argument("--json-schema", action="store_true",
                   help="print the JSON schema of the --json document (one GPU and many) and exit")
    g.add_argument("--no-suggest", dest="suggest", action="store_false",
                   help="skip the searches: changes that would fit, and how far a fitting plan goes")


def run(args: argparse.Namespace, out: Out) -> int:
    from planner.api import fit
    from planner.models import ModelError

    if args.json_schema:
        import json

        from planner.answer import json_schema

        out.print(json.dumps(json_schema(), indent=2))
        return EXIT_FITS

    try:
        layout = layout_fields(args)
        conf = alloc_conf_from(args)  # bad settings fail before any work
    except ValueError as e:
        raise BadInput(str(e)) from None
    for w in config_warnings(args):
        out.warn(w)
    if layout:
        return _run_fit_distributed(args, out, layout, conf)
    try:
        plan = plan_from_args(args)
        result = fit(plan, with_suggestions=args.suggest, profile=args.profile, alloc_conf=conf)
    except (ValueError, ModelError) as e:  # PlanError, GPUError, ModelError, engine input errors
        raise BadInput(str(e)) from None
    for w in result.warnings:
        out.warn(w)
    if args.json:
        import json

        out.print(json.dumps(result.to_json(), indent=2))
    else:
        _print_fit(result, out)
    return EXIT_FITS if result.fits else EXIT_DOES_NOT_FIT


def _run_fit_distributed(args: argparse.Namespace, out: Out, layout_fields: dict[str, Any], conf: Any = None) -> int:
    from planner.api import fit_distributed
    from planner.models import ModelError

    try:
        plan = plan_from_args(args)
        if layout_fields.get("global_batch") is not None and args.grad_accum is not None:
            raise BadInput("global_batch: give --global-batch or --grad-accum, not both")
        result = fit_distributed(plan, layout_fields, with_suggestions=args.suggest, alloc_conf=conf)
    except (ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    for w in result.warnings:
        out.warn(w)
    if args.json:
        import json

        out.print(json.dumps(result.to_json(), indent=2))
    else:
        _print_distributed(result, out)
    return EXIT_FITS if result.estimate.fits else EXIT_DOES_NOT_FIT


def _print_distributed(result: Any, out: Out) -> None:
    from planner.units import format_gib

    e, lay = result.estimate, result.estimate.layout
    m = e.memory
    out.print(f"model   {result.plan.model}")
    out.print(f"gpus    {lay.gpus} x {result.gpu.name} ({format_gib(result.gpu.memory_bytes)} each), "
              f"{lay.per_node} per node: DP {lay.dp} x TP {lay.tp} x PP {lay.pp}, {e.semantics}")
    out.print(f"batch   micro-batch {lay.micro_batch} x seq {result.plan.seq}, global batch {lay.global_batch}, "
              f"{lay.grad_accum} micro-batches per step")
    out.print(f"engine  {e.engine}")
    out.print("")
    verdict = "FITS" if e.fits else "DOES NOT FIT"
    gpu_line = f"busiest rank (stage {m.stage}) needs {format_gib(m.device_bytes)} of {format_gib(e.gpu_memory_bytes)}"
    if e.cpu_bytes_per_node > e.cpu_memory_bytes:
        out.print(f"{verdict}: the offloaded states need {format_gib(e.cpu_bytes_per_node)} of CPU memory per node, "
                  f"more than its {format_gib(e.cpu_memory_bytes)} (--cpu-memory); on the GPU the {gpu_line}")
    else:
        out.print(f"{verdict}: {gpu_line}")
    out.print(f"  peak allocated  {format_gib(m.peak_allocated_bytes):>12}   reserved {format_gib(m.reserved_bytes)} "
              f"(rounding model; the allocator is not simulated per rank yet)   peak phase {m.peak_phase}")
    for cat, b in m.breakdown.items():
        if b:
            out.print(f"  {cat:<18}{format_gib(b):>12}")
    if e.cpu_bytes_per_node:
        out.print(f"  CPU memory per node (offload): {format_gib(e.cpu_bytes_per_node)} of {format_gib(e.cpu_memory_bytes)}")
    if e.phases:
        out.print("")
        out.print(f"peak of each phase on the busiest rank ({e.technique}):")
        phase_of = (lambda k: k.split(".", 1)[0]) if e.technique != "sft" else (lambda k: "")
        for name, b in e.phases.items():
            ph = phase_of(name)
            models = ", ".join(e.resident.get(ph, [])) if ph else ""
            secs = e.phase_seconds.get(ph)
            tail = (f"   models {models}" if models else "") + (f"   {secs:.3f} s (phase)" if secs is not None else "")
            out.print(f"  {name:<28}{format_gib(b):>12}{tail}")
    out.print("")
    out.print("collectives per step (bytes per rank, time; exposed = not hidden behind compute):")
    for c in e.collectives:
        out.print(f"  {c.name:<44} {c.kind:<15} x{c.count:<5} {c.bytes_per_rank / 1e9:9.2f} GB  {c.time_s * 1e3:9.1f} ms"
                  f"  exposed {c.exposed_s * 1e3:8.1f} ms  ({c.link})")
    t = e.time
    out.print("")
    out.print(f"step time {t.total_s:.3f} s = compute {t.compute_s:.3f} + exposed comm {t.exposed_comm_s:.3f} "
              f"+ bubble {t.bubble_s:.3f}")
    out.print(f"throughput {e.tokens_per_s:,.0f} tokens/s, MFU {e.mfu:.1%}, {e.tflops_per_gpu:.0f} TFLOP/s per GPU "
              f"(hardware FLOPs, recompute included)")
    out.print(f"  {FLOPS_CONVENTION}")
    _print_limits(result, out)
    _print_suggestions(result, e.fits, out)


def _plan_summary(plan: Any) -> str:
    from planner.plugins import technique
    from planner.specs import Plan

    fields = set(technique(plan.task).plan_fields)
    parts = [plan.task, plan.method, plan.precision]
    if "optimizer" in fields:
        parts.append(plan.optimizer)
    if "seq" in fields:
        parts.append(f"batch {plan.batch} x seq {plan.seq}")
    else:
        parts.append(f"batch {plan.batch}")
    if "prompt_len" in fields or "new_tokens" in fields:
        parts.append(f"prompt {plan.prompt_len} + {plan.new_tokens} new tokens")
    if "grad_accum" in fields and plan.grad_accum > 1:
        parts.append(f"grad-accum {plan.grad_accum}")
    if "grad_ckpt" in fields and plan.grad_ckpt:
        parts.append("grad-ckpt")
    # the technique's own options where they differ from their defaults
    shown = {"optimizer", "seq", "prompt_len", "new_tokens", "grad_accum", "grad_ckpt"}
    for name in sorted(fields - shown):
        value = getattr(plan, name)
        if value != Plan.model_fields[name].default:
            parts.append(f"{name.replace('_', '-')} {value}")
    if plan.method in ("lora", "qlora"):
        parts.append(f"rank {plan.lora_rank}")
    if plan.method == "qlora":
        parts.append(plan.quant + ("" if plan.double_quant else ", no double-quant"))
    parts.append(f"attn {plan.attn}")
    return ", ".join(parts)


def _print_fit(result: Any, out: Out) -> None:
    from planner.units import format_gib

    m, gpu = result.memory, result.gpu
    cap = gpu.memory_bytes
    out.print(f"model   {result.model.id} ({result.model.name})")
    out.print(f"gpu     {gpu.name}: {format_gib(cap)} usable")
    out.print(f"plan    {_plan_summary(result.plan)}")
    out.print("")
    a = result.allocator
    if result.fits and result.headroom_bytes < 0 and a is not None:
        out.print(f"FITS after the allocator's free-and-retry: a large card would hold {format_gib(m.device_bytes)}; "
                  f"this one runs it in {format_gib(cap)} (smallest card {format_gib(a.min_capacity_bytes + gpu.cuda_context_bytes)})")
    elif result.fits:
        out.print(f"FITS: headroom {format_gib(result.headroom_bytes)} ({100 * result.headroom_bytes / cap:.1f}% of the card)")
    elif a is not None and m.device_bytes <= cap:
        out.print(f"DOES NOT FIT: reserved fits ({format_gib(m.device_bytes)} with the CUDA context, of {format_gib(cap)}) "
                  f"but the caching allocator cannot place a {format_gib(a.oom_request_bytes or 0)} request on this card")
    else:
        out.print(f"DOES NOT FIT: short by {format_gib(-result.headroom_bytes)} (needs {format_gib(m.device_bytes)} of {format_gib(cap)})")
    out.print("")
    if a is not None:
        conf = a.alloc_conf or "defaults"
        reserved_note = f"simulated: PyTorch's caching allocator over the step's {a.events} events ({conf})"
    else:
        reserved_note = f"rounding model, not simulated: {result.allocator_note}"
    rows = [
        ("peak allocated", m.peak_allocated_bytes, "most bytes live in the allocator (max_memory_allocated)"),
        ("reserved", m.reserved_bytes, reserved_note),
        ("device", m.device_bytes, f"plus the CUDA context; must fit {format_gib(cap)}"),
    ]
    if a is not None:
        ctx = gpu.cuda_context_bytes
        rows.append(("smallest card", a.min_capacity_bytes + ctx,
                     f"the least memory the step runs in (fragmentation {format_gib(a.fragmentation_bytes)} over the "
                     f"allocated peak {format_gib(a.peak_allocated_bytes)})"))
        verdict = "runs" if a.fits else f"a {format_gib(a.oom_request_bytes or 0)} request fails after free-and-retry"
        if a.fits and a.num_alloc_retries:
            verdict += f" after {a.num_alloc_retries} free-and-retr{'y' if a.num_alloc_retries == 1 else 'ies'}"
        rows.append(("on this card", a.capacity_bytes or 0, f"for the allocator (the card less its CUDA context): {verdict}"))
    for label, value, note in rows:
        out.print(f"  {label:<15} {format_gib(value):>12}   {note}")
    out.print(f"  {'peak phase':<15} {m.peak_phase:>12}")
    _print_items(out, "breakdown at the peak", m.breakdown, total=m.peak_allocated_bytes)
    _print_items(out, "details at the peak", m.details)
    _print_items(out, "beyond the allocator (in device)", m.device_items)
    _print_items(out, "outside the allocator (not counted on the card)", m.outside_allocator)
    _print_items(out, "peak allocated per phase", m.phases)
    if len(result.resident) > 1 or any(len(v) > 1 for v in result.resident.values()):
        out.print("")
        out.print("resident models per phase (roles):")
        for ph, roles in result.resident.items():
            out.print(f"  {ph:<14}{', '.join(roles)}")
    _print_time(result.document().time, out)
    _print_limits(result, out)
    _print_suggestions(result, result.fits, out)


def _print_time(t: Any, out: Out) -> None:
    """The step time split (device compute, exposed host overhead, exposed communication, pipeline
    bubble), per phase, then tokens/s and the FLOP utilisations, each labelled."""
    if not t.step_s:
        out.print("")
        out.print(f"time: {t.time_model}")
        return
    ms = 1e3
    out.print("")
    out.print(f"time ({t.time_model.split(';', 1)[-1].strip()}):")
    out.print(f"  {'phase':<14}{'step':>11}{'GPU compute':>14}{'host (exposed)':>17}")
    for name, ph in t.phases.items():
        out.print(f"  {name:<14}{ph.step_s * ms:8.1f} ms{ph.compute_s * ms:11.1f} ms{ph.host_s * ms:14.1f} ms")
    out.print(f"  step {t.step_s * ms:.1f} ms = GPU compute {(t.compute_s or 0) * ms:.1f} + exposed host overhead "
              f"{(t.host_s or 0) * ms:.1f} + exposed communication {(t.exposed_comm_s or 0) * ms:.1f} + pipeline bubble "
              f"{(t.bubble_s or 0) * ms:.1f}")
    rate = f"{t.tokens_per_s:,.0f} tokens/s ({t.tokens_counted})" if t.tokens_per_s else "no tokens counted"
    util = ""
    if t.mfu is not None:
        util = (f", MFU {t.mfu:.1%} (model FLOPs), HFU {t.hfu:.1%} (hardware FLOPs, recompute included), "
                f"{t.tflops_per_gpu:.0f} TFLOP/s")
    out.print(f"  {rate}{util}")


FLOPS_CONVENTION = ("FLOPs count the attention pairs the kernel computes: s(s+1)/2 per sequence with SDPA's "
                    "causal kernels, s^2 with eager attention")
LIMIT_LABELS = {"seq": "sequence", "prompt_len": "prompt", "new_tokens": "new tokens"}


def _print_limits(result: Any, out: Out) -> None:
    lim = result.limits
    if lim is None or (lim.max_batch is None and not lim.max_lengths):
        return
    out.print("")
    out.print("how far it goes (each alone, everything else unchanged):")
    if lim.max_batch is not None:
        more = " (at least)" if "batch" in lim.at_least else ""
        out.print(f"  largest micro-batch   {lim.max_batch:>12,}{more}")
    for field, v in lim.max_lengths.items():
        out.print(f"  longest {LIMIT_LABELS.get(field, field):<13} {v:>12,} tokens{_length_note(result, field, v)}")


def _length_note(result: Any, field: str, v: int) -> str:
    """What a length limit is stated to (planner.length_grid): its grid step, or the plan's own value."""
    from planner import length_grid

    if field in result.limits.at_least:
        return " (at least)"
    if v == getattr(result.plan, field, None) and length_grid.floor(v) != v:
        return " (the plan's own: no longer one on the grid fits)"
    step = length_grid.next_above(v) - v
    return f" (to a step of {step})" if step > 1 else ""


def _print_suggestions(result: Any, fits: bool, out: Out) -> None:
    from planner.units import format_gib

    if fits:
        return
    out.print("")
    if result.suggestions:
        out.print("suggestions (each re-estimated; smallest change first):")
        width = max(len(s.change) for s in result.suggestions)
        for s in result.suggestions:
            verdict = ("fits" if s.fits else "still too big") + (" (changes combined)" if s.combined else "")
            if getattr(result, "allocator", None) is not None and not s.simulated:
                verdict += " (estimated, not simulated)"
            out.print(
                f"  {s.change:<{width}}  peak {format_gib(s.peak_allocated_bytes):>12}  "
                f"device {format_gib(s.device_bytes):>12}  {verdict}"
            )
    else:
        out.print("suggestions: none of the single changes tried lowers the estimate")


def _print_items(out: Out, title: str, items: dict[str, int], total: int | None = None) -> None:
    from planner.units import format_gib

    items = {k: v for k, v in items.items() if v}
    if not items:
        return
    out.print("")
    out.print(f"{title}:")
    width = max(len(k) for k in items)
    for key, value in items.items():
        share = f"  {100 * value / total:5.1f}%" if total else ""
        out.print(f"  {key:<{width}}  {format_gib(value):>12}{share}")
