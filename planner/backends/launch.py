"""`planner run`: a plan executed through a launcher that exists (torchrun, the DeepSpeed launcher,
accelerate launch), or through TRL's own trainer, measured, and kept as a run record.

`prepare` checks the plan (on CUDA it must fit its card; the GPUs must be there; the launcher must be
installed), writes the run directory (the plan, the configs `planner export` writes for it, the
workers' spec) and the command; `execute` runs it, showing rank 0's steps as progress and keeping the
whole output in `run.log`; `record` reads the ranks' reports (planner.backends.launch_worker) and
compares them with the estimate where a CPU run can: per rank, the bytes of parameters, gradients and
optimizer states (ZeRO: the engine's partitions against DeepSpeed's layout to the element, and the
estimate's figure), step time and tokens/s, and on CUDA peak allocated and reserved.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from planner.specs import Plan

LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
TRAINERS = ("planner", "trl")
WORKER = "planner.backends.launch_worker"
INSTALL = {"deepspeed": "pip install deepspeed", "accelerate": "pip install accelerate", "trl": "pip install trl"}


class RunError(ValueError):
    """A run that cannot start (message: one line)."""


class RunRefused(Exception):
    """A CUDA plan the estimate says does not fit its card: refused before anything is written."""


@dataclass
class Prepared:
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    plan: Plan
    layout: dict[str, Any]
    nproc: int
    launcher: str
    trainer: str
    device: str
    steps: int
    estimate: Any  # the distributed estimate the record compares the ranks with (planner.backends.launch.judge)
    notes: list[str] = field(default_factory=list)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check(plan: Plan, layout: dict[str, Any], launcher: str, trainer: str, device: str, nproc: int,
          nnodes: int, hostfile: str | None = None, master: str | None = None) -> list[str]:
    """Why this run cannot start (RunError), or notes about it."""
    notes: list[str] = []
    if nnodes > 1 and launcher == "torchrun" and not master:
        raise RunError("master: a multi-node torchrun needs --master HOST:PORT (the rendezvous endpoint)")
    if nnodes > 1 and launcher == "deepspeed" and not hostfile:
        raise RunError("hostfile: a multi-node DeepSpeed run needs --hostfile FILE (its hosts and slots)")
    if nnodes > 1 and launcher == "accelerate":
        raise RunError("nnodes: a multi-node accelerate run takes its machines from the accelerate config; "
                       "use --launcher torchrun or deepspeed")
    if launcher not in LAUNCHERS:
        from planner.errors import did_you_mean

        raise RunError(f"launcher: unknown launcher '{launcher}'{did_you_mean(launcher, LAUNCHERS)} "
                       f"(launchers: {', '.join(LAUNCHERS)})")
    if trainer not in TRAINERS:
        raise RunError(f"trainer: unknown trainer '{trainer}' (trainers: {', '.join(TRAINERS)})")
    if device not in ("cpu", "cuda"):
        raise RunError(f"device: must be cpu or cuda (got '{device}')")
    for module in ("torch", "transformers", "peft"):
        if not _installed(module):
            raise RunError(f"{module} is not installed: pip install -e '.[backends]' (torch pinned first)")
    if launcher in ("deepspeed", "accelerate") and not _installed(launcher):
        raise RunError(f"launcher {launcher} is not installed ({INSTALL[launcher]})")
    if launcher == "deepspeed" and shutil.which("deepspeed") is None:
        raise RunError("launcher deepspeed: its `deepspeed` command is not on PATH (pip install deepspeed)")
    if launcher == "accelerate" and shutil.which("accelerate") is None:
        raise RunError("launcher accelerate: its `accelerate` command is not on PATH (pip install accelerate)")
    if trainer == "trl":
        if not _installed("trl"):
            raise RunError(f"trainer trl: TRL is not installed ({INSTALL['trl']})")
        if plan.task not in ("sft", "dpo"):
            raise RunError(f"trainer trl: planner run drives TRL's SFTTrainer and DPOTrainer (task sft or dpo), "
                           f"not {plan.task}")
        if nproc * nnodes > 1 or layout.get("zero") is not None or layout.get("fsdp"):
            raise RunError("trainer trl: one process (no --nproc, --zero or --fsdp with --trainer trl yet)")
    elif plan.task != "sft":
        raise RunError(f"task {plan.task}: planner run starts sft's step on every rank (other techniques run "
                       "through --trainer trl: sft and dpo)")
    if plan.method == "qlora" and device == "cpu":
        raise RunError("method qlora: bitsandbytes' 4-bit layers need CUDA (--device cuda)")
    if plan.optimizer not in ("adamw", "adamw-fused", "sgd"):
        raise RunError(f"optimizer {plan.optimizer}: planner run supports adamw, adamw-fused and sgd")
    if layout.get("fsdp") or layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1:
        raise RunError("layout: planner run starts DDP and DeepSpeed ZeRO steps (FSDP, TP and PP not yet)")
    if layout.get("offload", "none") != "none":
        raise RunError("offload: DeepSpeed's CPU offload needs its C++ Adam (not built here); run without --offload")
    if layout.get("zero") is not None and plan.method != "full":
        raise RunError("zero: planner run checks ZeRO's partitions of a full fine-tune (method full)")
    if layout.get("zero") is not None and plan.precision not in ("bf16", "fp16"):
        raise RunError(f"precision {plan.precision}: DeepSpeed holds the model in bf16 or fp16 (precision bf16 or fp16)")
    if layout.get("zero") is not None and launcher == "accelerate":
        raise RunError("launcher accelerate: ZeRO runs go through --launcher deepspeed or torchrun")
    if device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nnodes == 1 and nproc > have:
            raise RunError(f"nproc: the plan needs {nproc} GPUs and this machine has {have}")
    elif launcher == "deepspeed":
        notes.append("DeepSpeed on the CPU: DS_ACCELERATOR=cpu, gloo")
    return notes


def judge(plan: Plan, layout: dict[str, Any], device: str) -> tuple[Any, list[str]]:
    """The estimate the run is checked against, and why it cannot run (a CUDA plan that does not fit
    its card) as reasons; on the CPU the card is not the question (a 1 TiB custom card prices it)."""
    from planner.api import fit_distributed

    if device == "cpu" or plan.gpu is None and plan.gpu_memory is None:
        # the model states per rank do not depend on the card: a catalog card (its FLOP/s price the time)
        # with memory enough for any tiny plan
        plan = plan.model_copy(update={"gpu": plan.gpu or "h200", "gpu_memory": 1 << 40})
    fields = dict(layout) or {"gpus": 1}
    result = fit_distributed(plan, fields, with_suggestions=False)
    reasons: list[str] = []
    if device == "cuda" and not result.estimate.fits:
        m = result.estimate.memory
        reasons.append(f"it does not fit: the busiest rank needs {m.device_bytes / 2**30:.2f} GiB of "
                       f"{result.estimate.gpu_memory_bytes / 2**30:.2f} GiB (planner fit says why and what would)")
    return result, reasons


def prepare(plan: Plan, layout: dict[str, Any], *, launcher: str = "torchrun", trainer: str = "planner",
            device: str = "cpu", nproc: int = 1, nnodes: int = 1, hostfile: str | None = None,
            master: str | None = None, steps: int = 3, out_root: str | Path = "reports/runs",
            name: str | None = None) -> Prepared:
    from planner.configs.export import render
    from planner.models import model_config

    gpus = nproc * nnodes
    layout = {k: v for k, v in layout.items() if v is not None}
    if gpus > 1 or layout:
        layout = {**layout, "gpus": gpus}
        if nnodes > 1:
            layout["gpus_per_node"] = nproc
    notes = check(plan, layout, launcher, trainer, device, nproc, nnodes, hostfile, master)
    result, reasons = judge(plan, layout, device)
    if reasons:
        raise RunRefused(reasons[0])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = name or f"{stamp}-{plan.task}-{Path(plan.model).name}-{'trl' if trainer == 'trl' else launcher}"
    run_dir = Path(out_root) / label
    if run_dir.exists():
        raise RunError(f"out: {run_dir} exists")
    layout_fields = {k: v for k, v in layout.items() if k != "gpus" or v > 1 or "zero" in layout}
    formats = (["deepspeed"] if layout.get("zero") is not None else []) + (["trl"] if trainer == "trl" else [])
    files = render(plan, layout_fields, formats, command="planner run") if formats else {}
    spec: dict[str, Any] = {"plan": plan.model_dump(), "layout": layout_fields, "steps": steps, "device": device,
                            "model_config": model_config(plan.model), "out": "ranks",
                            "trainer": trainer, "seed": 0}
    if "ds_config.json" in files:
        ds = json.loads(files["ds_config.json"])
        ds["train_batch_size"] = plan.batch * plan.grad_accum * gpus  # what the Trainer fills for "auto"
        ds["gradient_clipping"] = 0.0
        ds.update(zero_allow_untested_optimizer=True, steps_per_print=10**9, wall_clock_breakdown=False)
        spec["deepspeed_config"] = ds
    if trainer == "trl":
        spec["trl_config"] = "trl_config.yaml"
    run_dir.mkdir(parents=True)
    for fname, text in files.items():
        (run_dir / fname).write_text(text)
    (run_dir / "plan.json").write_text(json.dumps({"plan": plan.model_dump(exclude_defaults=True),
                                                   "layout": layout_fields}, indent=2) + "\n")
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    spec_path = "spec.json"  # the command runs in the run directory: its paths are relative to it
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["TORCH_EXTENSIONS_DIR"] = str((run_dir / "torch_extensions").resolve())
    worker = ["-m", WORKER, "--spec", spec_path]
    if trainer == "trl":
        cmd = [sys.executable, *worker]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        if nnodes > 1:
            cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={master}"]
        else:
            cmd.append("--standalone")
        cmd += worker
    elif launcher == "deepspeed":
        cmd = ["deepspeed", f"--num_gpus={nproc}"]
        if nnodes > 1:
            cmd += [f"--num_nodes={nnodes}", f"--hostfile={hostfile}"]
        cmd += ["--module", WORKER, "--spec", spec_path]
    else:
        from planner.configs import accelerate as acc

        conf = acc.write(plan, layout_fields if gpus > 1 else {})
        if device == "cpu":
            conf["use_cpu"] = True
            conf["mixed_precision"] = "no"  # the worker's own autocast decides
        import yaml

        (run_dir / "accelerate_config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
        cmd = ["accelerate", "launch", "--config_file", "accelerate_config.yaml", *worker]
    (run_dir / "command.txt").write_text(" ".join(shlex.quote(c) for c in cmd) + "\n")
    return Prepared(run_dir, cmd, env, plan, layout_fields, gpus, launcher, trainer, device, steps, result.estimate,
                    notes)


def execute(p: Prepared, progress: Callable[[str], None] | None = None, timeout: float = 1800) -> int:
    """Run the command; rank 0's step lines go to `progress`, everything to run.log. The exit status."""
    from planner.backends.held import PROGRESS

    log = (p.run_dir / "run.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(p.command, env=p.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=p.run_dir, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            log.write(line)
            if PROGRESS in line and progress is not None:
                progress(line.split(PROGRESS, 1)[1].strip())
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                log.write(f"planner run: killed after {timeout:.0f} s\n")
                break
        return proc.wait()
    finally:
        log.close()


def record(p: Prepared, returncode: int, wall_s: float, profile: str | None = None) -> dict[str, Any]:
    """The run record: plan, estimate, per-rank measurements and their comparison, versions, device."""
    ranks_dir = p.run_dir / "ranks"
    reports = [json.loads(f.read_text()) for f in sorted(ranks_dir.glob("rank*.json"))] if ranks_dir.is_dir() else []
    errors = []
    for f in sorted(ranks_dir.glob("rank*.error")) if ranks_dir.is_dir() else []:
        lines = f.read_text().splitlines()
        errors.append({"rank": int(f.stem[4:]), "message": lines[0] if lines else ""})
    status = "completed" if returncode == 0 and len(reports) == p.nproc else "failed"
    if status == "failed" and not errors:
        tail = (p.run_dir / "run.log").read_text().strip().splitlines()[-1:] if (p.run_dir / "run.log").exists() else []
        errors.append({"rank": None, "message": f"the launcher exited with {returncode}" + (f": {tail[0]}" if tail else "")})
    est = p.estimate
    # the trained model's states (sft's "model", dpo's "policy"...): what the run's ranks hold and train
    states = next((v for v in est.model_states.values() if "gradients" in v), est.model_states.get("model", {}))
    numels = _numels(p) if any("partitions" in rep for rep in reports) else []
    rows = [_compare_rank(rep, states, p, numels) for rep in sorted(reports, key=lambda r: r["rank"])]
    times = [t for rep in reports for t in rep["step_s"][1:]] or [t for rep in reports for t in rep["step_s"]]
    step_s = sorted(times)[len(times) // 2] if times else None
    tokens = sum(rep["tokens_per_step"] for rep in reports)
    rec: dict[str, Any] = {
        "status": status, "errors": errors, "returncode": returncode,
        "command": " ".join(shlex.quote(c) for c in p.command),
        "launcher": p.launcher if p.trainer == "planner" else None, "trainer": p.trainer,
        "device": p.device, "processes": p.nproc, "steps": p.steps, "wall_s": round(wall_s, 3),
        "plan": p.plan.model_dump(exclude_defaults=True), "layout": p.layout,
        "estimate": {"engine": est.engine, "model_states_per_rank": states,
                     "peak_allocated_bytes": est.memory.peak_allocated_bytes, "reserved_bytes": est.memory.reserved_bytes,
                     "step_s": est.time.total_s if p.device == "cuda" else None},
        "measured": {"median_step_s": step_s, "tokens_per_s": tokens / step_s if step_s else None,
                     "ranks": rows},
        "versions": reports[0]["versions"] if reports else {},
        "gpu": reports[0].get("gpu_name") if reports else None,
        "notes": p.notes,
    }
    if profile is not None and p.device == "cpu" and step_s:
        rec["estimate"]["step_s"], rec["estimate"]["profile"] = _cpu_step(p, profile)
    (p.run_dir / "record.json").write_text(json.dumps(rec, indent=2) + "\n")
    (p.run_dir / "record.md").write_text(markdown(rec))
    return rec


def _cpu_step(p: Prepared, profile: str) -> tuple[float, str]:
    """The estimate's step time on this CPU under `profile` (a `planner calibrate -o` file)."""
    from planner.engine.timing import step_time
    from planner.models import load_model
    from planner.plugins import technique
    from planner.profiles import load_profile

    prof = load_profile(profile)
    work = technique(p.plan.task).workload(p.plan, load_model(p.plan.model))
    return step_time(work, prof).total_s, prof.id


def _compare_rank(rep: dict, states: dict, p: Prepared, numels: list[int]) -> dict[str, Any]:
    """One rank's bytes against the estimate's per-rank model states (and, under ZeRO, DeepSpeed's
    layout to the element: planner.backends.deepspeed_run)."""
    row: dict[str, Any] = {"rank": rep["rank"], "engine": rep["engine"], "step_s": rep["step_s"]}
    for k in ("max_memory_allocated", "max_memory_reserved"):
        if k in rep:
            row[k] = rep[k]
    if "partitions" in rep:
        from planner.backends import deepspeed_run as D
        from planner.models import load_model

        part = rep["partitions"]
        stage, dp = part["stage"], part["world_size"]
        half = "fp32" if p.plan.precision == "fp32" else p.plan.precision.replace("mixed-", "")
        measured = D.measured_partitions(part)
        expected = D.expected_partitions(numels, stage, dp, half, rank=rep["rank"])
        zero_py = D.zero_py_partitions(load_model(p.plan.model), p.plan, stage, dp)
        row["zero"] = D.compare(measured, expected, zero_py)
        row["exact"] = all(r["measured"] == r["expected"] for r in row["zero"])
        return row
    held = rep["held"]
    row["bytes"] = [{"quantity": q, "estimate": states.get(k), "measured": held[m]}
                    for q, k, m in (("parameters", "parameters", "parameter_bytes"),
                                    ("gradients", "gradients", "gradient_bytes"),
                                    ("optimizer states", "optimizer_states", "optimizer_state_bytes"))]
    row["exact"] = all(r["estimate"] == r["measured"] for r in row["bytes"])
    return row


def _numels(p: Prepared) -> list[int]:
    from planner.backends.deepspeed_run import param_numels
    from planner.models import model_config

    return param_numels(model_config(p.plan.model))


def _bytes(x: Any) -> str:
    return "" if x is None else f"{x:,.0f}"


def _error(est: Any, measured: Any) -> str:
    if est is None or not measured:
        return ""
    return f"{(est / measured - 1) * 100:+.2f}%"


def markdown(rec: dict[str, Any]) -> str:
    """The record as Markdown."""
    lines = [f"# planner run: {rec['plan'].get('task', 'sft')} {rec['plan']['model']} ({rec['status']})", "",
             f"- command: `{rec['command']}`",
             (f"- launcher {rec['launcher']}" if rec["trainer"] == "planner" else "- TRL's trainer, no launcher")
             + f", device {rec['device']}"
             + (f" ({rec['gpu']})" if rec.get("gpu") else "") + f", {rec['processes']} process(es), {rec['steps']} steps, "
             f"wall {rec['wall_s']:.1f} s",
             f"- plan: `{json.dumps(rec['plan'])}`, layout `{json.dumps(rec['layout'])}`",
             f"- estimate: {rec['estimate']['engine']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}"]
    for e in rec["errors"]:
        lines.append(f"- **failed**: rank {e['rank']}: {e['message']}")
    m = rec["measured"]
    if m["median_step_s"]:
        est = rec["estimate"].get("step_s")
        lines.append(f"- step time (median of the ranks' steps after the first): {m['median_step_s'] * 1e3:.1f} ms, "
                     f"{m['tokens_per_s']:,.0f} tokens/s" + (f"; estimate {est * 1e3:.1f} ms "
                     f"({(est / m['median_step_s'] - 1) * 100:+.1f}%, profile {rec['estimate'].get('profile', 'the card')})"
                     if est else "; no time estimate (give --profile FILE for a CPU run)"))
    lines += ["", "Bytes per rank (elements for partition_numel). ZeRO rows: the estimate (planner.engine.distributed.zero, "
              "n/dp without padding), DeepSpeed's layout to the element (planner.backends.deepspeed_run) and what the "
              "engine held; other rows: the estimate's model states and the tensors the rank held (parameters and "
              "gradients before the last optimizer step, optimizer states after it).", "",
              "| rank | quantity | estimate | DeepSpeed's layout | measured | measured = layout | estimate error |",
              "|---|---|---:|---:|---:|---|---:|"]
    for r in m["ranks"]:
        for z in r.get("zero", []):
            lines.append(f"| {r['rank']} | ZeRO-{z['stage']} {z['quantity']} | {_bytes(z['zero_py'])} | "
                         f"{_bytes(z['expected'])} | {_bytes(z['measured'])} | "
                         f"{'yes' if z['measured'] == z['expected'] else 'no'} | {_error(z['zero_py'], z['measured'])} |")
        for b in r.get("bytes", []):
            lines.append(f"| {r['rank']} | {b['quantity']} | {_bytes(b['estimate'])} |  | {_bytes(b['measured'])} |  | "
                         f"{_error(b['estimate'], b['measured'])} |")
        for k in ("max_memory_allocated", "max_memory_reserved"):
            if k in r:
                lines.append(f"| {r['rank']} | {k} |  |  | {_bytes(r[k])} |  |  |")
    return "\n".join(lines) + "\n"
