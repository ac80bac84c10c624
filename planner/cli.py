"""The `planner` command line.

Start-up must stay fast (`planner fit` from a cold start in well under half a second): this module
imports only the standard library; each command imports what it needs when it runs. Commands are
registered in COMMANDS (name -> (help, add_arguments, run)); plugins can add more later.

Exit codes: 0 the plan fits (or a listing succeeded), 1 it does not fit, 2 bad input. Bad input of
any kind prints one line `planner: error: <message>` on stderr and nothing on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2

# Flags whose values go into the Plan (dest == Plan field name). Defaults are None so that only
# flags the user actually typed count as given.
PLAN_FLAGS: tuple[str, ...] = (
    "model", "gpu", "gpu_memory", "task", "method", "precision", "optimizer", "grad_ckpt", "attn",
    "batch", "seq", "grad_accum", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
    "quant", "double_quant", "kbit_prep", "prompt_len", "new_tokens", "teacher", "teacher_method",
    "ref_logprobs", "beta", "reward_model", "value_model", "group_size", "kl_coef", "ppo_epochs", "mini_batch",
    "frozen_placement", "hard_label_weight", "logprobs", "pair_forward", "reference_pass",
)  # fmt: skip


class UsageError(Exception):
    """Bad command line (argparse's complaints), reported on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


class _Out:
    def __init__(self, stdout: TextIO, stderr: TextIO):
        self.stdout = stdout
        self.stderr = stderr

    def print(self, *parts: Any) -> None:
        print(*parts, file=self.stdout)

    def warn(self, message: str) -> None:
        print(f"planner: warning: {message}", file=self.stderr)


class BadInput(Exception):
    """Raised by commands for bad input; main prints it as one line and exits 2."""


# ---------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------
LAYOUT_FLAGS: tuple[str, ...] = (
    "gpus", "gpus_per_node", "zero", "fsdp", "engine", "offload", "cpu_memory", "tp", "sp", "pp", "pp_schedule",
    "pp_chunks", "global_batch", "inter_node_gbps",
)


def _add_fit(p: argparse.ArgumentParser) -> None:
    _add_plan_args(p)
    g = p.add_argument_group("many GPUs (any of these switches to the distributed estimate: per-rank memory, collectives, step time)")
    g.add_argument("--gpus", type=int, metavar="N", help="GPUs in the job (data parallel = gpus / (tp x pp))")
    g.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per node (default: min(gpus, 8))")
    g.add_argument("--zero", type=int, metavar="{0,1,2,3}", help="ZeRO stage (default: 0)")
    g.add_argument("--fsdp", metavar="{full-shard,shard-grad-op}", help="torch FSDP sharding (ZeRO-3 / ZeRO-2 in torch)")
    g.add_argument("--engine", metavar="{deepspeed,torch}",
                   help="what holds the model states: deepspeed (fp32 master weights, fp32 states for half-precision "
                        "plans) or torch (DDP / ZeroRedundancyOptimizer / FSDP, the plan's dtypes) "
                        "(default: deepspeed with --zero 1-3, else torch)")
    g.add_argument("--offload", metavar="{none,optimizer,optimizer+params}", help="ZeRO offload to CPU (default: none)")
    g.add_argument("--cpu-memory", metavar="SIZE",
                   help="CPU memory of one node, which offloaded states must fit, e.g. 1TiB (default: 2TB, a DGX H100/H200)")
    g.add_argument("--tp", type=int, metavar="N", help="tensor-parallel degree (Megatron column/row splits)")
    g.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None, help="sequence parallelism with TP")
    g.add_argument("--pp", type=int, metavar="N", help="pipeline stages")
    g.add_argument("--pp-schedule", metavar="{1f1b,interleaved}", help="pipeline schedule (default: 1f1b)")
    g.add_argument("--pp-chunks", type=int, metavar="V", help="model chunks per stage for the interleaved schedule")
    g.add_argument("--global-batch", type=int, metavar="N", help="sequences per optimizer step (= batch x grad-accum x DP)")
    g.add_argument("--inter-node-gbps", type=float, metavar="G", help="inter-node gigabits/s per GPU, each direction (default: 400)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout (warnings go to stderr)")
    g.add_argument("--no-suggest", dest="suggest", action="store_false",
                   help="skip the searches: changes that would fit, and how far a fitting plan goes")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan_file", nargs="?", metavar="PLAN.yaml", help="plan file (keys: the flag names below); flags override it")
    g = p.add_argument_group("model and card")
    g.add_argument("--model", "-m", metavar="M", help="catalog id (see `planner models`), a config.json, or a model directory")
    g.add_argument("--gpu", "-g", metavar="ID", help="catalog card (see `planner gpus`)")
    g.add_argument("--gpu-memory", metavar="SIZE", help="custom card memory, e.g. 24GiB (2^30) or 24GB (1e9); with --gpu, that card with this memory")
    g = p.add_argument_group("workload")
    g.add_argument("--task", metavar="T", help="technique: sft (a training step), generate, or a plugin's (see `planner plugins`; default: sft)")
    g.add_argument("--method", metavar="{full,lora,qlora}", help="full fine-tuning, LoRA or QLoRA (default: full)")
    g.add_argument("--precision", metavar="P", help="fp32, bf16, fp16, mixed-bf16, mixed-fp16 (default: bf16)")
    g.add_argument("--optimizer", metavar="O", help="adamw, adamw-fused, adamw-8bit, paged-adamw-8bit, sgd (default: adamw)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None, help="gradient checkpointing (default: off)")
    g.add_argument("--attn", metavar="{sdpa,eager}", help="attention implementation (default: sdpa)")
    g.add_argument("--batch", "-b", type=int, metavar="N", help="sequences per micro-batch (default: 1)")
    g.add_argument("--seq", "-s", type=int, metavar="N", help="training sequence length in tokens (default: 2048)")
    g.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps (default: 1)")
    g = p.add_argument_group("LoRA / QLoRA (only with --method lora or qlora)")
    g.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank (default: 16)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="adapter alpha (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="adapter dropout (default: 0)")
    g.add_argument("--lora-targets", metavar="NAMES", help="'all-linear' or a comma list of module names (default: all-linear)")
    g.add_argument("--quant", metavar="{nf4,fp4}", help="4-bit type (default: nf4)")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None, help="double quantization, qlora only (default: on)")
    g.add_argument("--kbit-prep", action=argparse.BooleanOptionalAction, default=None, help="peft prepare_model_for_kbit_training, qlora only (default: on)")
    g = p.add_argument_group("generation (only with --task generate)")
    g.add_argument("--prompt-len", type=int, metavar="N", help="prompt tokens per sequence (default: 512)")
    g.add_argument("--new-tokens", type=int, metavar="N", help="generated tokens per sequence (default: 128)")
    g = p.add_argument_group("alignment and distillation (--task rm, dpo, ppo, grpo, distill)")
    g.add_argument("--teacher", metavar="M", help="distill: the frozen teacher (catalog id or config path; same vocabulary)")
    g.add_argument("--teacher-method", metavar="{full,qlora}", help="distill: how the teacher is held (default: full, bf16)")
    g.add_argument("--hard-label-weight", type=float, metavar="W", help="distill: weight of the hard-label loss mixed with KL (default: 0)")
    g.add_argument("--ref-logprobs", metavar="{model,precomputed}", help="dpo: a resident reference, or log-probs computed beforehand (default: model)")
    g.add_argument("--beta", type=float, metavar="B", help="dpo: beta of the loss (default: 0.1)")
    g.add_argument("--logprobs", metavar="{full,selective,fused}",
                   help="dpo: log_softmax over the full fp32 logits, TRL 1.16's selective_log_softmax over the logits, "
                        "or TRL 1.16's fused LM head (no logits) (default: full)")
    g.add_argument("--reference-pass", metavar="{after,before}",
                   help="dpo: score the reference after the policy's forward, its graph alive (TRL's order), or before it (default: after)")
    g.add_argument("--pair-forward", metavar="{concatenated,separate}",
                   help="rm/dpo: chosen and rejected in one forward (TRL), or in two forwards before one backward (default: concatenated)")
    g.add_argument("--reward-model", metavar="M", help="ppo/grpo: reward model (default: a reward function, no model)")
    g.add_argument("--value-model", metavar="M", help="ppo: value model (default: the policy's model)")
    g.add_argument("--group-size", type=int, metavar="G", help="grpo: completions per prompt, >= 2 (default: 8)")
    g.add_argument("--kl-coef", type=float, metavar="K", help="ppo/grpo: KL coefficient; 0 drops the reference (default: 0.04)")
    g.add_argument("--ppo-epochs", type=int, metavar="N", help="ppo: passes over each rollout (default: 1)")
    g.add_argument("--mini-batch", type=int, metavar="N", help="ppo: sequences per mini-batch (default: --batch)")
    g.add_argument("--frozen-placement", metavar="{resident,offload,separate}",
                   help="frozen models (reference, reward, teacher): on this GPU, offloaded to the CPU between their phases, or on other GPUs (default: resident)")


def _file_values(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """A plan file's plan settings and layout settings (both empty without a file)."""
    from planner.plan_io import load_plan_file

    if not getattr(args, "plan_file", None):
        return None, {}
    values = load_plan_file(args.plan_file, extra_keys=LAYOUT_FLAGS)
    layout = {k: values.pop(k) for k in LAYOUT_FLAGS if k in values}
    return values, layout


def _plan_from_args(args: argparse.Namespace) -> Any:
    from planner.plan_io import build_plan

    flags = {name: getattr(args, name) for name in PLAN_FLAGS}
    file_values, _ = _file_values(args)
    plan, _given = build_plan(file_values, flags)
    return plan


def _layout_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Layout settings from the plan file, overridden by flags (sizes parsed, one-line errors)."""
    from planner.plan_io import layout_values

    _, fields = _file_values(args)
    fields.update({k: getattr(args, k) for k in LAYOUT_FLAGS if getattr(args, k, None) is not None})
    return layout_values(fields)


def _run_fit(args: argparse.Namespace, out: _Out) -> int:
    from planner.api import fit
    from planner.models import ModelError

    try:
        layout = _layout_fields(args)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if layout:
        return _run_fit_distributed(args, out, layout)
    try:
        plan = _plan_from_args(args)
        result = fit(plan, with_suggestions=args.suggest)
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


def _run_fit_distributed(args: argparse.Namespace, out: _Out, layout_fields: dict[str, Any]) -> int:
    from planner.api import fit_distributed
    from planner.models import ModelError

    try:
        plan = _plan_from_args(args)
        if layout_fields.get("global_batch") is not None and args.grad_accum is not None:
            raise BadInput("global_batch: give --global-batch or --grad-accum, not both")
        result = fit_distributed(plan, layout_fields, with_suggestions=args.suggest)
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


def _print_distributed(result: Any, out: _Out) -> None:
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
    out.print(f"  peak allocated  {format_gib(m.peak_allocated_bytes):>12}   reserved {format_gib(m.reserved_bytes)}   "
              f"peak phase {m.peak_phase}")
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


def _print_fit(result: Any, out: _Out) -> None:
    from planner.units import format_gib

    m, gpu = result.memory, result.gpu
    cap = gpu.memory_bytes
    out.print(f"model   {result.model.id} ({result.model.name})")
    out.print(f"gpu     {gpu.name}: {format_gib(cap)} usable")
    out.print(f"plan    {_plan_summary(result.plan)}")
    out.print("")
    if result.fits:
        out.print(f"FITS: headroom {format_gib(result.headroom_bytes)} ({100 * result.headroom_bytes / cap:.1f}% of the card)")
    else:
        out.print(f"DOES NOT FIT: short by {format_gib(-result.headroom_bytes)} (needs {format_gib(m.device_bytes)} of {format_gib(cap)})")
    out.print("")
    rows = [
        ("peak allocated", m.peak_allocated_bytes, "most bytes live in the allocator (max_memory_allocated)"),
        ("reserved", m.reserved_bytes, "plus the caching allocator's rounding and fragmentation"),
        ("device", m.device_bytes, f"plus CUDA context and workspaces; must fit {format_gib(cap)}"),
    ]
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
    t = result.time_json()
    if t["step_s"]:
        out.print("")
        out.print("time (roofline on the card's ceilings, one efficiency set per GPU type):")
        for ph, sec in t["phases_s"].items():
            out.print(f"  {ph:<14}{sec * 1e3:10.1f} ms")
        out.print(f"  step          {t['step_s'] * 1e3:10.1f} ms   {t['tokens_per_s']:,.0f} tokens/s")
    _print_limits(result, out)
    _print_suggestions(result, result.fits, out)


FLOPS_CONVENTION = ("FLOPs count the attention pairs the kernel computes: s(s+1)/2 per sequence with SDPA's "
                    "causal kernels, s^2 with eager attention")
LIMIT_LABELS = {"seq": "sequence", "prompt_len": "prompt", "new_tokens": "new tokens"}


def _print_limits(result: Any, out: _Out) -> None:
    lim = result.limits
    if lim is None or (lim.max_batch is None and not lim.max_lengths):
        return
    out.print("")
    out.print("how far it goes (each alone, everything else unchanged):")
    if lim.max_batch is not None:
        more = " (at least)" if "batch" in lim.at_least else ""
        out.print(f"  largest micro-batch   {lim.max_batch:>12,}{more}")
    for field, v in lim.max_lengths.items():
        more = " (at least)" if field in lim.at_least else ""
        out.print(f"  longest {LIMIT_LABELS.get(field, field):<13} {v:>12,} tokens{more}")


def _print_suggestions(result: Any, fits: bool, out: _Out) -> None:
    from planner.units import format_gib

    if fits:
        return
    out.print("")
    if result.suggestions:
        out.print("suggestions (each re-estimated; smallest change first):")
        width = max(len(s.change) for s in result.suggestions)
        for s in result.suggestions:
            verdict = ("fits" if s.fits else "still too big") + (" (changes combined)" if s.combined else "")
            out.print(
                f"  {s.change:<{width}}  peak {format_gib(s.peak_allocated_bytes):>12}  "
                f"device {format_gib(s.device_bytes):>12}  {verdict}"
            )
    else:
        out.print("suggestions: none of the single changes tried lowers the estimate")


def _print_items(out: _Out, title: str, items: dict[str, int], total: int | None = None) -> None:
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


# ---------------------------------------------------------------------------------------------------
# models, gpus
# ---------------------------------------------------------------------------------------------------
def _add_json_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")


def _table(rows: list[list[str]], header: list[str], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _run_models(args: argparse.Namespace, out: _Out) -> int:
    from planner.models import list_models
    from planner.units import format_count

    rows = [dict(r) for r in list_models()]
    if args.json:
        import json

        out.print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        out.print("(no models)")
        return 0
    keys = list(rows[0])
    numeric = {i for i, k in enumerate(keys) if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)}
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if k in ("params", "num_params") and isinstance(v, (int, float)):
                cells.append(format_count(v))
            elif v is None:
                cells.append("-")
            else:
                cells.append(str(v))
        body.append(cells)
    header = [{"hf_id": "hub id"}.get(k, k) for k in keys]  # the JSON key stays hf_id, as in ModelSpec
    for line in _table(body, header, numeric):
        out.print(line)
    return 0


def _run_gpus(args: argparse.Namespace, out: _Out) -> int:
    from planner.gpus import list_gpus
    from planner.units import format_gib

    gpus = list_gpus()
    if args.json:
        import json

        out.print(json.dumps([g.model_dump(mode="json") for g in gpus], indent=2))
        return 0

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    header = ["id", "name", "memory", "marketed", "bf16 TFLOP/s", "fp16 TFLOP/s", "HBM/GDDR GB/s", "link", "GB/s (both dirs)", "memory from"]
    body = [
        [
            g.id, g.name, format_gib(g.memory_bytes), f"{num(g.memory_marketed_gb)} GB", num(g.bf16_tflops),
            num(g.fp16_tflops), num(g.mem_bandwidth_gb_per_s), g.interconnect or "-",
            num(g.interconnect_gb_per_s_both_directions), g.memory_confidence or "-",
        ]
        for g in gpus
    ]
    for line in _table(body, header, {2, 3, 4, 5, 6, 8}):
        out.print(line)
    out.print("")
    out.print("memory: what the CUDA runtime reports as total (torch.cuda.mem_get_info()[1]); `planner gpus --json` gives sources")
    return 0


# ---------------------------------------------------------------------------------------------------
# plugins
# ---------------------------------------------------------------------------------------------------
def _run_plugins(args: argparse.Namespace, out: _Out) -> int:
    from planner.plugins import registry

    reg = registry(scan=True)
    rows = [
        {"name": p.name, "version": p.version, "source": p.source,
         "registers": {k: sorted(v) for k, v in p.registers.items()}}
        for p in reg.plugins
    ]
    if args.json:
        import json

        out.print(json.dumps(rows, indent=2))
        return 0
    body = [[r["name"], r["version"] or "-", r["source"],
             "; ".join(f"{k}: {', '.join(v)}" for k, v in r["registers"].items()) or "-"] for r in rows]
    for line in _table(body, ["plugin", "version", "from", "registers"], set()):
        out.print(line)
    return 0


# ---------------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------------
def _add_validate(p: argparse.ArgumentParser) -> None:
    _add_plan_args(p)
    g = p.add_argument_group("validation")
    from planner.suites import SUITES

    g.add_argument("--suite", metavar="NAME",
                   help=f"run a named suite ({', '.join(SUITES)}) and write reports/validation/NAME.md and .csv")
    g.add_argument("--backend", default="dry-run", metavar="B", help="dry-run (the real program on fake tensors) or real (default: dry-run)")
    g.add_argument("--device", default=None, metavar="D", help="fake (dry-run), cpu or cuda (real); default: fake for dry-run, cuda for real")
    g.add_argument("--out", default="reports/validation", metavar="DIR", help="where --suite writes its tables (default: reports/validation)")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _run_validate(args: argparse.Namespace, out: _Out) -> int:
    from planner.backends import check_backend
    from planner.models import ModelError

    try:
        device = check_backend(args.backend, args.device)
        if args.suite:
            from planner.suites import suite

            suite(args.suite)  # unknown names fail before any work
            plan = None
        else:
            plan = _plan_from_args(args)
    except (ValueError, ModelError) as e:
        raise BadInput(str(e)) from None
    from pathlib import Path

    from planner import validate

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
        row = validate.compare(plan, args.backend, device)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.json:
        import json

        out.print(json.dumps(validate.row_json(row), indent=2))
    else:
        for line in validate.format_row(row):
            out.print(line)
    return 0


# name -> (help, add_arguments, run); plugins add more through register_commands.
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, _Out], int]]
COMMANDS: dict[str, Command] = {
    "fit": ("does a plan fit a GPU? peak, reserved and device memory, with suggestions", _add_fit, _run_fit),
    "models": ("list the model catalog", _add_json_only, _run_models),
    "gpus": ("list the GPU catalog", _add_json_only, _run_gpus),
    "plugins": ("list the loaded plugins and what each registers", _add_json_only, _run_plugins),
    "validate": ("estimate vs a backend's measurement, for one plan or a named suite", _add_validate, _run_validate),
}


def _add_serve_command() -> None:
    from planner.serving import cli as serve_cli

    COMMANDS["serve"] = (serve_cli.HELP, serve_cli.add_arguments, serve_cli.run)


_add_serve_command()

EPILOG = """\
examples:
  planner fit --model llama-3.1-8b --gpu a100-80gb --method qlora --batch 4 --seq 2048 --grad-ckpt
  planner fit --model llama-3.1-70b --gpu h100-sxm --gpus 16 --zero 3 --tp 2 --batch 2 --seq 4096 --grad-ckpt
  planner fit --model llama-3.2-1b --task distill --teacher llama-3.1-8b --gpu a100-80gb
  planner validate --model qwen2.5-0.5b --method lora --batch 4      (estimate vs a dry run of the real program)
  planner serve --model llama-3.1-8b --gpu h100-sxm --rate 4
  planner fit plan.yaml --batch 8 --json
  planner fit --model ./my-model/config.json --gpu-memory 24GiB --task generate --new-tokens 512

exit codes: 0 fits, 1 does not fit, 2 bad input
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
    out = _Out(stdout or sys.stdout, stderr or sys.stderr)
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
        return 130
    except BrokenPipeError:  # `planner models | head`: stop quietly
        if out.stdout is sys.__stdout__:
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
