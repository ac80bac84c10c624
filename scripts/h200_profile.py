"""Build planner/data/profiles/h200.json: the H200 from public figures, its host costs fitted on the
16 measured H200 steps (shared/reference/h200_measured_steps.csv).

    python scripts/h200_profile.py [--shape cpu-profile.json] [--out planner/data/profiles/h200.json]

Which figure comes from where:
- device: planner.engine.devices.derived_profile (datasheet peak x the measured ceilings of
  shared/reference/measured_ceilings.csv: 788.8 TFLOP/s bf16 matmul, 4258.8 GB/s copy; shaped by
  Calculon's H100 efficiency tables);
- launch_s: 2.5 us, the usual CUDA kernel launch latency on Hopper (a device-side floor per
  kernel; NVIDIA's "CUDA Graphs" blog measures 2-3 us per launch without graphs);
- host costs: their RATIOS (grad op / op, backward op / op, view / op, module / op, model / layer,
  the fixed Python of loss, backward(), optimizer.step() and generate() calls...)
  from a CPU profile measured by `planner calibrate` on this project's machines (`--shape`; the
  dispatcher and Python are the same code on both devices), with three parameters fitted to the 16
  steps (least squares on log(predicted / measured)), and one for the device:
    k                 the scale of every dispatcher/Python cost (a different, faster or slower, host)
    cuda_launch_host  host seconds a CUDA kernel launch adds to each kernel-running op
    generate_step_s   generate()'s per-step Python, fitted on the 4 generate rows
    device_scale      the fraction of the micro-benchmark ceilings eager kernels reach (<= 1)
Residuals of every step are written into the profile (`residuals`) and printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.engine.devices import derived_profile  # noqa: E402
from planner.engine.timing import step_seconds  # noqa: E402
from planner.gpus import load_gpu  # noqa: E402
from planner.models import load_model  # noqa: E402
from planner.profiles import HostCosts, parse_profile  # noqa: E402
from planner.specs import Plan  # noqa: E402

CSV = ROOT.parent / "shared" / "reference" / "h200_measured_steps.csv"
LAUNCH_S = 2.5e-6
SHAPE_FIELDS = ("grad_op_s", "backward_op_s", "view_s", "module_s", "layer_s", "model_s", "sync_s",
                "optimizer_tensor_s", "saved_hook_s", "loss_s", "backward_call_s", "optimizer_step_s",
                "generate_call_s")


def rows() -> list[tuple[Plan, float, str]]:
    out = []
    with CSV.open() as f:  # noqa: SIM117
        for r in csv.DictReader(f):
            kw = dict(model=r["model"], gpu="h200", task=r["task"], method=r["method"], precision=r["precision"],
                      batch=int(r["batch"]))
            if r["task"] == "generate":
                kw.update(prompt_len=int(r["prompt_len"]), new_tokens=int(r["new_tokens"]))
                target = float(r["generate_s"])
            else:
                kw.update(seq=int(r["seq"]), grad_ckpt=r["grad_ckpt"] == "1")
                if r["method"] != "full":
                    kw["lora_rank"] = int(r["lora_rank"])
                target = float(r["step_s"])
            plan = Plan(**kw)
            label = f"{r['model']} {r['task']} {r['method']} {r['precision']} b{r['batch']} " + (
                f"p{r['prompt_len']}+{r['new_tokens']}" if r["task"] == "generate"
                else f"s{r['seq']}{' ckpt' if r['grad_ckpt'] == '1' else ''}")
            out.append((plan, target, label))
    return out


def host_costs(shape: HostCosts, k: float, launch_host: float, gen: float) -> HostCosts:
    """The shape's costs scaled by k; kernel-running ops add the launch's host time."""
    s = shape.model_dump()
    op = shape.op_s * k + launch_host
    out = {f: (s[f] if s[f] is not None else shape.op_s) * k for f in SHAPE_FIELDS}
    out["grad_op_s"] += launch_host
    out["backward_op_s"] += launch_host
    return HostCosts(op_s=op, generate_step_s=gen, **out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, help="a CPU profile from planner calibrate (its host-cost ratios)")
    ap.add_argument("--out", default=str(ROOT / "planner" / "data" / "profiles" / "h200.json"))
    args = ap.parse_args()
    shape_prof = parse_profile(json.loads(Path(args.shape).read_text()), args.shape)
    shape = shape_prof.host
    gpu = load_gpu("h200")
    data = rows()
    models = {p.model: load_model(p.model) for p, _, _ in data}

    def profile(k: float, launch_host: float, gen: float, scale: float):
        return derived_profile(gpu, host_costs(shape, k, launch_host, gen), LAUNCH_S, "fitted (scripts/h200_profile.py)",
                               device_scale=min(scale, 1.0))

    def residuals(k: float, launch_host: float, gen: float, scale: float) -> list[float]:
        prof = profile(k, launch_host, gen, scale)
        return [math.log(step_seconds(p, models[p.model], prof) / t) for p, t, _ in data]

    def loss(x: tuple[float, ...]) -> float:
        if min(x) < 0 or x[3] > 1.0:
            return math.inf
        return sum(r * r for r in residuals(*x))

    # coordinate search in log space, then finer: four parameters, 16 rows
    x = [1.0, 5e-6, 0.01, 0.8]
    steps = [1.0, 1.0, 1.0, 0.2]
    best = loss(tuple(x))
    for _ in range(80):
        improved = False
        for i in range(4):
            for sign in (1, -1):
                trial = list(x)
                trial[i] = x[i] * math.exp(sign * steps[i]) if x[i] > 0 else 1e-7
                val = loss(tuple(trial))
                if val < best:
                    best, x, improved = val, trial, True
        if not improved:
            steps = [s / 2 for s in steps]
            if max(steps) < 1e-3:
                break
    res = residuals(*x)
    prof = profile(*x)
    labels = [lab for _, _, lab in data]
    rel = {lab: math.exp(r) - 1 for lab, r in zip(labels, res)}
    print(f"fitted: k = {x[0]:.4g}, cuda_launch_host = {x[1] * 1e6:.3f} us, generate_step_s = {x[2] * 1e3:.3f} ms, "
          f"device_scale = {x[3]:.3f}")
    print(f"{'step':<55}{'measured s':>12}{'predicted s':>13}{'error':>9}")
    for (p, t, lab), r in zip(data, res):
        print(f"{lab:<55}{t:12.4f}{t * math.exp(r):13.4f}{100 * (math.exp(r) - 1):8.1f}%")
    errs = [abs(v) for v in rel.values()]
    print(f"median |error| {100 * statistics.median(errs):.1f}%, worst {100 * max(errs):.1f}%")
    sources = dict(prof.sources)
    sources.update({
        "launch_s": "2.5 us, the usual CUDA kernel launch latency (not fitted)",
        "host": (f"ratios from {shape_prof.id} ({shape_prof.host_cpu}, planner calibrate {shape_prof.measured_on}); "
                 f"k = {x[0]:.4g}, cuda_launch_host = {x[1]:.3g} s, generate_step_s = {x[2]:.4g} s, "
                 f"device_scale = {x[3]:.4g} (of the measured ceilings) fitted on the "
                 "16 steps of shared/reference/h200_measured_steps.csv (torch 2.11, transformers 5.17), "
                 "least squares on log(predicted/measured)"),
    })
    out = prof.model_copy(update={
        "device_scale": min(x[3], 1.0),
        "id": "h200", "name": "NVIDIA H200 (public figures; host fitted on 16 measured steps)",
        "host_cpu": "the H200 measurement's host (shared/reference/h200_measured_steps.csv)",
        "sources": sources, "residuals": rel, "measured_on": "2026-12-02",
        "versions": {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0"},
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out.model_dump(mode="json"), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
