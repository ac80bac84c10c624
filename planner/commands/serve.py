"""`planner serve`: KV-cache capacity of a serving engine, and simulated throughput and latency.

Registered by planner/cli.py as a command (HELP, add_arguments, run). Start-up stays light: this
module imports only argparse at import time; `run` imports pydantic, the catalogs and the
simulator (pure Python, no numpy, torch or pandas).

Exit codes: 0 the setup fits (and was simulated), 1 it does not fit (vLLM would refuse to
start: weights alone exceed the card, no memory left for the cache, max-model-len too long),
2 bad input (one line on stderr), 130 interrupted (Ctrl-C).

Work is bounded: --requests above traffic.MAX_REQUESTS is refused before anything is loaded, and a
simulation beyond simulator.MAX_STEPS loop passes stops with a one-line error. A simulation that
runs longer than a second or two draws a progress bar on stderr (rich), unless --json is given or
stderr is not a terminal.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

HELP = "how many requests a card serves at once: KV-cache capacity, simulated throughput and latency"

EPILOG = """\
examples:
  planner serve --model llama-3.1-8b --gpu h100-sxm --max-model-len 8192 --rate 4 --requests 2000
  planner serve --model llama-3.1-70b --gpu h100-sxm --tp 4 --kv-dtype fp8 --compare-schedulers
  planner serve --model qwen2.5-7b --gpu l40s --trace requests.csv --json

exit codes: 0 fits, 1 does not fit (vLLM would not start), 2 bad input
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("engine (defaults follow vLLM)")
    g.add_argument("--model", "-m", required=False, metavar="M", help="catalog id, a config.json, or a model directory")
    g.add_argument("--gpu", "-g", metavar="ID", help="catalog card (see `planner gpus`)")
    g.add_argument("--gpu-memory", metavar="SIZE", help="custom card memory, e.g. 80GiB; with --gpu, that card with this memory")
    g.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel degree (default: 1)")
    g.add_argument("--weights-dtype", metavar="{bf16,fp16,fp32,fp8,int8,nf4}", help="weights of the decoder linears (default: the model's dtype)")
    g.add_argument("--kv-dtype", default="auto", metavar="{auto,bf16,fp16,fp32,fp8}", help="KV-cache dtype (default: auto = the serving dtype)")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block (default: 16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F", help="share of the card vLLM may use (default: 0.9)")
    g.add_argument("--max-model-len", type=int, metavar="N", help="longest sequence (default: the model's context)")
    g.add_argument("--max-num-seqs", type=int, metavar="N", help="most sequences per iteration (default: vLLM's for the card, 1024 or 256)")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="token budget per iteration (default: vLLM's for the card, 8192 or 2048)")
    g = p.add_argument_group("traffic")
    g.add_argument("--rate", type=float, default=4.0, metavar="R", help="Poisson arrivals per second, or inf for all at t=0 (default: 4)")
    g.add_argument("--requests", type=int, default=1000, metavar="N", help="requests to simulate (default: 1000)")
    g.add_argument("--prompt-len", type=int, default=1024, metavar="N", help="mean prompt tokens (default: 1024)")
    g.add_argument("--new-tokens", type=int, default=256, metavar="N", help="mean output tokens (default: 256)")
    g.add_argument("--prompt-dist", default="fixed", metavar="{fixed,uniform,normal,lognormal}", help="prompt length distribution (default: fixed)")
    g.add_argument("--output-dist", default="fixed", metavar="{fixed,uniform,normal,lognormal}", help="output length distribution (default: fixed)")
    g.add_argument("--prompt-cv", type=float, default=0.5, metavar="CV", help="prompt length std / mean (default: 0.5)")
    g.add_argument("--output-cv", type=float, default=0.5, metavar="CV", help="output length std / mean (default: 0.5)")
    g.add_argument("--trace", metavar="CSV", help="replay a trace: columns arrival (s), prompt_tokens, output_tokens")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    g = p.add_argument_group("scheduler and time model")
    g.add_argument("--scheduler", default=None, metavar="NAME", help="static, continuous or chunked-prefill (default: chunked-prefill, vLLM V1)")
    g.add_argument("--compare-schedulers", nargs="?", const="all", metavar="LIST", help="also simulate these schedulers (comma list; default: all) side by side")
    g.add_argument("--calibration", metavar="FILE", help="JSON/YAML with compute_efficiency, memory_efficiency, iteration_overhead_s, ...")
    g.add_argument("--engine-style", metavar="{vllm,transformers}", default=None,
                   help="the serving engine whose iteration overhead is simulated: vllm (CUDA graphs, 1 ms) or "
                        "transformers (eager continuous batching: the host time of one decode forward of the "
                        "replayed program) (default: vllm)")
    g.add_argument("--profile", metavar="FILE|ID",
                   help="device profile for the efficiencies and host costs (default: the card's, as for fit)")
    g.add_argument("--compute-efficiency", type=float, metavar="F", help="achieved / peak matmul FLOP/s")
    g.add_argument("--memory-efficiency", type=float, metavar="F", help="achieved / peak memory bandwidth")
    g.add_argument("--iteration-overhead-ms", type=float, metavar="MS", help="fixed time per engine iteration (default: 1)")
    g.add_argument("--peak-tflops", type=float, metavar="T", help="dense 16-bit peak of the card (custom cards)")
    g.add_argument("--bandwidth-gbps", type=float, metavar="GB/s", help="memory bandwidth of the card (custom cards)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print only JSON on stdout (warnings go to stderr)")
    g.add_argument("--capacity-only", action="store_true", help="skip the simulation")


def _inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, str, list[str]]:
    from planner.serving.roofline import load_calibration
    from planner.serving.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
    from planner.serving.specs import Calibration, ServeInputError, ServeSpec, TrafficSpec, build

    from planner.serving.traffic import check_request_count

    if not args.model:
        raise ServeInputError("model: give --model (a catalog id, a config.json or a model directory)")
    if not args.trace and not args.capacity_only:
        # first, before the model is loaded: a count beyond the bound would only end in a MemoryError
        check_request_count(args.requests)
    spec = build(ServeSpec, {
        "model": args.model, "gpu": args.gpu, "gpu_memory": args.gpu_memory, "tp": args.tp,
        "weights_dtype": args.weights_dtype, "kv_dtype": args.kv_dtype, "block_size": args.block_size,
        "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
    })  # fmt: skip
    traffic = build(TrafficSpec, {
        "rate": args.rate, "requests": args.requests, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "prompt_dist": args.prompt_dist, "output_dist": args.output_dist, "prompt_cv": args.prompt_cv,
        "output_cv": args.output_cv, "seed": args.seed, "trace": args.trace,
    })  # fmt: skip
    overhead = args.iteration_overhead_ms / 1000 if args.iteration_overhead_ms is not None else None
    flags = {
        "compute_efficiency": args.compute_efficiency, "memory_efficiency": args.memory_efficiency,
        "iteration_overhead_s": overhead, "peak_tflops": args.peak_tflops, "bandwidth_gb_per_s": args.bandwidth_gbps,
    }  # fmt: skip
    if args.calibration:
        cal = load_calibration(args.calibration, flags)
    else:
        given = {k: v for k, v in flags.items() if v is not None}
        cal = build(Calibration, {**given, "source": "flags" if given else ""})
    if args.engine_style is not None and args.engine_style not in ("vllm", "transformers"):
        from planner.commands.common import BadInput
        from planner.errors import did_you_mean

        raise BadInput(f"engine-style: unknown engine '{args.engine_style}'{did_you_mean(args.engine_style, ('vllm', 'transformers'))} "
                       "(choose from vllm, transformers)")
    cal = _profile_calibration(args, spec, cal)
    scheduler = args.scheduler or DEFAULT_SCHEDULER
    compare: list[str] = []
    if args.compare_schedulers:
        if args.compare_schedulers.strip() == "all":
            compare = list(SCHEDULERS)
        else:
            compare = [s.strip() for s in args.compare_schedulers.split(",") if s.strip()]
    return spec, traffic, cal, scheduler, compare


# A bar appears once a simulation has run this long and its pace says the whole run takes at
# least LONG_RUN_S: short runs never draw one, long ones show it within about a second.
SHOW_AFTER_S = 1.0
LONG_RUN_S = 2.0


class _ProgressBar:
    """Receives the simulator's progress reports (scheduler, done, requests) and draws a transient
    rich bar on `stream` for runs that turn out long; rich is imported only then."""

    def __init__(self, stream: TextIO, simulations: int) -> None:
        self.stream = stream
        self.simulations = max(simulations, 1)
        self.start = time.monotonic()
        self.done: dict[str, int] = {}  # per scheduler: each reports its own count, the last one at the end
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, scheduler: str, done: int, requests: int) -> None:
        self.done[scheduler] = done
        total = requests * self.simulations
        completed = sum(self.done.values())
        if self.bar is None:
            elapsed = time.monotonic() - self.start
            if completed >= total or elapsed < SHOW_AFTER_S or elapsed * total / max(completed, 1) < LONG_RUN_S:
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("simulating {task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("requests"), TimeElapsedColumn(), console=Console(file=self.stream), transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(scheduler, total=total)
        self.bar.update(self.task, completed=completed, description=scheduler)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _progress_bar(args: argparse.Namespace, out: Any, simulations: int) -> _ProgressBar | None:
    stream = getattr(out, "stderr", None)
    if args.json or args.capacity_only or stream is None:
        return None
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return None  # piped or captured stderr: no control codes in logs
    return _ProgressBar(stream, simulations)


def run(args: argparse.Namespace, out: Any) -> int:
    from planner.commands.common import BadInput
    from planner.serving.service import serve
    from planner.serving.simulator import SimulationStalled, reporting_progress
    from planner.serving.specs import ServeInputError

    bar: _ProgressBar | None = None
    try:
        spec, traffic, cal, scheduler, compare = _inputs(args)
        bar = _progress_bar(args, out, 1 + len([s for s in compare if s != scheduler]))
        with reporting_progress(bar):
            result = serve(spec, traffic, scheduler=scheduler, compare=compare, calibration=cal,
                           simulate_traffic=not args.capacity_only)  # fmt: skip
    except (ServeInputError, SimulationStalled) as e:  # SimulationTooLong is a ServeInputError
        raise BadInput(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C during a long simulation: one line, not a traceback
        if bar is not None:
            bar.close()
        print("planner: interrupted", file=out.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    for w in result.warnings:
        out.warn(w)
    if args.json:
        import json

        out.print(json.dumps(result.to_json(), indent=2))
    else:
        _print(result, out)
    return 0 if result.fits else 1


# ---- text output ----------------------------------------------------------------------------------
def _gib(b: float) -> str:
    return f"{b / (1 << 30):.2f} GiB"


def _size(b: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _secs(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}s"
    if x >= 1:
        return f"{x:.2f}s"
    return f"{x * 1000:.1f}ms"


def _print(result: Any, out: Any) -> None:
    cap = result.capacity
    kv, mem = cap.kv_cache, cap.memory
    per = " per rank" if cap.tp > 1 else ""
    out.print(f"model   {cap.model} on {cap.gpu}" + (f" x {cap.tp} (tensor parallel)" if cap.tp > 1 else ""))
    out.print(f"engine  {cap.weights_dtype} weights, {kv.dtype} KV cache, block {kv.block_size}, max-model-len "
              f"{cap.max_model_len}, max-num-seqs {cap.max_num_seqs}, max-num-batched-tokens {cap.max_num_batched_tokens}")
    out.print("")
    if cap.fits:
        out.print(f"FITS: {kv.blocks} KV blocks, {kv.max_concurrent_sequences} concurrent sequences of "
                  f"{kv.tokens_per_sequence} tokens")
    else:
        out.print(f"DOES NOT FIT: {cap.reason}")
    out.print("")
    out.print(f"memory{per} (vLLM: total x utilization - weights - activation peak - non-torch = KV budget):")
    rows = [
        ("total (CUDA)", mem.total, ""),
        ("requested", mem.requested, f"x {cap.gpu_memory_utilization:g}"),
        ("weights", mem.weights, f"{cap.weights_dtype} linears, {cap.serving_dtype} embeddings/norms, rotary cache"),
        ("activation peak", mem.activation_peak, f"profiling run: sampler {_gib(mem.activation_sampler)}, "
                                                 f"forward {_gib(mem.activation_forward)}"),
        ("non-torch", mem.non_torch, "NCCL, cuBLAS and other allocations outside torch"),
        ("KV budget", mem.kv_budget, f"{_gib(mem.kv_allocated)} in whole blocks"),
        ("outside budget", mem.cuda_context + mem.cuda_graphs_estimate, "CUDA context + CUDA graphs, in the reserve"),
    ]  # fmt: skip
    for label, value, note in rows:
        out.print(f"  {label:<16}{_gib(value):>12}   {note}".rstrip())
    out.print("")
    out.print("KV cache:")
    out.print(f"  per token       {_size(kv.bytes_per_token):>12}   2 x layers x KV heads x head_dim x bytes"
              + (f"; {_size(kv.bytes_per_token_per_rank)} per rank ({kv.kv_heads_per_rank} KV head(s) each"
                 + (", replicated" if kv.kv_heads_replicated else "") + ")" if cap.tp > 1 else ""))
    if kv.sliding_window:
        out.print(f"  sliding window  {kv.sliding_window:>12}   tokens kept by {kv.sliding_layers} sliding layers")
    out.print(f"  blocks          {kv.blocks:>12}   of {kv.block_size} tokens ({_size(kv.block_bytes_per_rank)} each{per}) "
              f"= {kv.tokens:,} tokens")
    out.print(f"  concurrency     {kv.max_concurrent_sequences:>12}   sequences of {kv.tokens_per_sequence} tokens "
              f"(scheduler limit {kv.scheduler_limit}); {kv.max_concurrency_at_max_model_len:g}x at max-model-len")
    if not result.simulations:
        return
    t = result.traffic
    r = result.roofline
    out.print("")
    out.print(f"traffic  {t['source']}")
    out.print(f"time     roofline at {r['compute_efficiency']:.3f} of {r['peak_tflops']:g} TFLOP/s and "
              f"{r['memory_efficiency']:.3f} of {r['bandwidth_gb_per_s']:g} GB/s ({r['efficiency_source']}), "
              f"{r['iteration_overhead_s'] * 1000:g} ms per iteration")
    sims = result.simulations
    if len(sims) == 1:
        _print_one(sims[0], out)
    else:
        _print_table(sims, out)


def _print_one(s: Any, out: Any) -> None:
    out.print("")
    out.print(f"simulation ({s.scheduler}):")
    out.print(f"  throughput      {s.tokens_per_s:>10.1f} output tokens/s, {s.requests_per_s:.3f} requests/s "
              f"({s.total_tokens_per_s:.1f} total tokens/s over {_secs(s.duration_s)})")
    out.print(f"  latency         {'p50':>10} {'p90':>10} {'p99':>10}")
    for name, p in (("TTFT", s.ttft_s), ("TPOT", s.tpot_s), ("E2E", s.e2e_s)):
        out.print(f"    {name:<12}{_secs(p.p50):>10} {_secs(p.p90):>10} {_secs(p.p99):>10}")
    out.print(f"  batch           mean {s.mean_running:.1f} running, max {s.max_running}; {s.iterations:,} iterations")
    kvu = s.kv_utilisation
    line = " ".join(f"{100 * x:.0f}" for x in kvu.timeline)
    out.print(f"  KV utilisation  mean {100 * kvu.mean:.1f}%, max {100 * kvu.max:.1f}%; over time (%): {line}")
    out.print(f"  preemptions     {s.preemptions} ({s.preempted_requests} requests, {s.recomputed_tokens:,} tokens recomputed)")
    if s.padded_tokens:
        out.print(f"  padded tokens   {s.padded_tokens:,}")


def _print_table(sims: list[Any], out: Any) -> None:
    out.print("")
    names = [s.scheduler for s in sims]
    rows: list[tuple[str, list[str]]] = [
        ("output tokens/s", [f"{s.tokens_per_s:.1f}" for s in sims]),
        ("requests/s", [f"{s.requests_per_s:.3f}" for s in sims]),
    ]
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        for q in ("p50", "p90", "p99"):
            rows.append((f"{label} {q}", [_secs(getattr(getattr(s, key), q)) for s in sims]))
    rows += [
        ("iterations", [f"{s.iterations:,}" for s in sims]),
        ("mean running", [f"{s.mean_running:.1f}" for s in sims]),
        ("padded tokens", [f"{s.padded_tokens:,}" for s in sims]),
        ("preemptions", [str(s.preemptions) for s in sims]),
        ("KV util mean", [f"{100 * s.kv_utilisation.mean:.1f}%" for s in sims]),
        ("KV util max", [f"{100 * s.kv_utilisation.max:.1f}%" for s in sims]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    out.print("simulation, side by side:")
    out.print("  " + " " * w0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths)))
    for label, cells in rows:
        out.print("  " + label.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))


def _profile_calibration(args: argparse.Namespace, spec: Any, cal: Any) -> Any:
    """The iteration-time figures from the device profile (planner.serving.engines), unless the
    user gave them; a card no profile can price keeps the roofline's documented defaults."""
    from planner.engine.devices import profile_for
    from planner.gpus import resolve_gpu
    from planner.models import load_model
    from planner.profiles import ProfileError
    from planner.serving.engines import calibration_from_profile

    try:
        gpu = resolve_gpu(spec.gpu, spec.gpu_memory)
        profile = profile_for(gpu, args.profile)
    except ProfileError as e:
        if args.profile is not None:
            from planner.commands.common import BadInput

            raise BadInput(str(e)) from None
        return cal
    except ValueError:  # the card: reported by the capacity step in its own words
        return cal
    try:
        model = load_model(spec.model)
    except ValueError:  # the model: likewise
        return cal
    return calibration_from_profile(profile, gpu, model, args.engine_style or "vllm", base=cal)
