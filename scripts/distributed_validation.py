"""Distributed validation: Llama-2-7B dry runs on a fake process group against estimate_distributed (sft
under FSDP / TP / FSDP x TP; the techniques dpo, rm, distill with every model FSDP2-wrapped), and real
DeepSpeed ZeRO partitions against planner.engine.distributed.zero. Writes the CSV (one row per comparison) and the
tables of reports/validation/distributed.md (the narrative there is written by hand).

    python scripts/distributed_validation.py --csv reports/validation/distributed.csv \\
        --tables /tmp/distributed-tables.md [--json /tmp/distributed.json] [--skip-deepspeed]

About 13 minutes on 2 cores (17 dry runs of 20-60 s, two torchrun launches).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

GIB = 2**30
LAYOUTS = {
    "FSDP8": {"gpus": 8, "fsdp": "full-shard"},
    "TP8": {"gpus": 8, "tp": 8},
    "FSDP4xTP2": {"gpus": 8, "tp": 2, "fsdp": "full-shard"},
}
PLANS = [("bf16", False), ("bf16", True), ("mixed-bf16", False), ("mixed-bf16", True)]
MOMENTS = ("loss backward", "backward", "optimizer")
# techniques: (task, plan fields); every model FSDP2-wrapped over 8 ranks, bf16, batch 1 (pairs for
# dpo and rm), seq 2048
TECHNIQUES = [("dpo", {}), ("dpo", {"reference_pass": "before"}), ("dpo", {"grad_ckpt": True}), ("rm", {}),
              ("distill", {"teacher": "llama-2-13b"})]
TRAIN_MOMENTS = ("loss", "loss backward", "backward", "optimizer")
ODD = {"model_type": "llama", "vocab_size": 1001, "hidden_size": 33, "head_dim": 8, "intermediate_size": 71,
       "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 256,
       "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def dry_runs(model: str, gpu_id: str) -> list[dict]:
    from planner.gpus import load_gpu
    from planner.models import load_model
    from planner.engine.distributed import layout_for_plan
    from planner.backends.fakepg import CATEGORIES, compare_with_estimate, dry_run_distributed, estimate_moments
    from planner.specs import Plan

    spec, gpu = load_model(model), load_gpu(gpu_id)
    rows = []
    for precision, ckpt in PLANS:
        plan = Plan(model=model, batch=1, seq=2048, precision=precision, grad_ckpt=ckpt)
        for name, kw in LAYOUTS.items():
            lay = layout_for_plan(1, 1, **kw)
            res = dry_run_distributed(plan, lay)
            cmp = compare_with_estimate(res, plan, lay, spec, gpu)
            moments = estimate_moments(plan, lay, spec, gpu)
            # the dry run's "backward" phase spans a layer's backward and the end of the backward
            end = moments.pop("end of backward", None)
            if end is not None and sum(end[c] for c in CATEGORIES) > sum(moments["backward"][c] for c in CATEGORIES):
                moments["backward"] = end
            row = {"layout": name, "precision": precision, "grad_ckpt": ckpt, "result": res.model_dump(),
                   "compare": cmp, "moments": moments}
            rows.append(row)
            print(f"{name:10s} {precision:10s} ckpt={ckpt!s:5s} dry {res.peak_allocated_bytes / GIB:7.3f} GiB "
                  f"({res.peak_phase}) est {cmp['estimate_wo_other'] / GIB:7.3f} ({cmp['estimate_phase']}) "
                  f"{cmp['error'] * 100:+6.2f}%  {res.wall_s:.0f} s", flush=True)
            for m in MOMENTS:
                d = res.phase_breakdowns.get(m, {})
                e = moments[m]
                print(f"    {m:13s} dry {sum(d.get(c, 0) for c in CATEGORIES) / GIB:7.3f} "
                      f"est {sum(e[c] for c in CATEGORIES if c != 'other') / GIB:7.3f}", flush=True)
    return rows


def technique_runs(model: str, gpu_id: str) -> list[dict]:
    """Each technique's own step under FSDP2 (planner.backends.fakepg.techniques) against the
    estimate, phase by phase. The estimate's cuBLAS workspaces (two in a training phase, one in a
    no-grad one) have no counterpart in a dry run and are left out."""
    from planner.engine.runtime import cublas_workspace_bytes
    from planner.gpus import load_gpu
    from planner.models import load_model
    from planner.engine.distributed import estimate_distributed, layout_for_plan
    from planner.backends.fakepg import compare_with_estimate, dry_run_distributed
    from planner.plugins import technique
    from planner.specs import Plan

    spec, gpu = load_model(model), load_gpu(gpu_id)
    rows = []
    for task, extra in TECHNIQUES:
        plan = Plan(model=model, task=task, batch=1, seq=2048, **extra)
        lay = layout_for_plan(1, 1, gpus=8, fsdp="full-shard")
        res = dry_run_distributed(plan, lay)
        cmp = compare_with_estimate(res, plan, lay, spec, gpu)
        est = estimate_distributed(plan, lay, spec, gpu)
        workload = technique(task).workload(plan, spec)
        train = next(ph.name for ph in workload.phases if ph.kind == "train_step")
        ws = {k: cublas_workspace_bytes(gpu.compute_capability, 2 if k.startswith(train + ".") else 1)
              for k in est.phases}
        phases = []
        for name, measured in res.phases.items():
            if name == "backward":  # the dry run's backward phase spans both backward moments
                keys = [f"{train}.backward", f"{train}.end of backward"]
            elif name in TRAIN_MOMENTS:
                keys = [f"{train}.{name}"]
            else:  # a no-grad phase of the workload: the largest of its moments
                keys = [k for k in est.phases if k.startswith(name + ".")]
            keys = [k for k in keys if k in est.phases]
            e = max((est.phases[k] - ws[k] for k in keys), default=None)
            phases.append({"phase": name, "dry_run": measured, "estimate": e,
                           "estimate_moment": max(keys, key=lambda k: est.phases[k]) if keys else "",
                           "breakdown": res.phase_breakdowns.get(name, {})})
        label = task + (" + ckpt" if extra.get("grad_ckpt") else "") + (f" (teacher {extra['teacher']})"
                                                                         if "teacher" in extra else "")
        if task == "dpo":
            label += f" (reference {plan.reference_pass} the policy's forward)"
        rows.append({"task": task, "label": label, "grad_ckpt": bool(extra.get("grad_ckpt")), "result": res.model_dump(),
                     "compare": cmp, "phases": phases, "model_states": est.model_states,
                     "estimate_phases": est.phases})
        print(f"FSDP8 {label:32s} dry {res.peak_allocated_bytes / GIB:7.3f} GiB ({res.peak_phase}) est "
              f"{cmp['estimate_wo_other'] / GIB:7.3f} ({cmp['estimate_phase']}) {cmp['error'] * 100:+6.2f}%  "
              f"{res.wall_s:.0f} s", flush=True)
        for p in phases:
            e = "-" if p["estimate"] is None else f"{p['estimate'] / GIB:7.3f}"
            print(f"    {p['phase']:14s} dry {p['dry_run'] / GIB:7.3f} est {e} ({p['estimate_moment']})", flush=True)
    return rows


def deepspeed_runs() -> list[dict]:
    from planner.architecture import spec_from_config
    from planner.backends import deepspeed_run as D
    from planner.specs import Plan

    numels = D.param_numels(ODD)
    spec = spec_from_config(ODD, id="tiny-odd")
    plan = Plan(model="tiny-odd", batch=1, seq=16)
    out = []
    for nproc in (2, 3):
        t0 = time.perf_counter()
        reports = D.run_zero(ODD, (1, 2, 3), nproc)
        wall = time.perf_counter() - t0
        for stage, ranks in reports.items():
            zp = D.zero_py_partitions(spec, plan, stage, nproc)
            for rep in ranks:
                m = D.measured_partitions(rep)
                e = D.expected_partitions(numels, stage, nproc, rank=rep["rank"])
                for r in D.compare(m, e, zp):
                    out.append({**r, "rank": rep["rank"], "wall_s": round(wall, 1),
                                "deepspeed": rep["versions"]["deepspeed"], "ipg_bucket_buffers": rep["ipg_bucket_buffers"]})
        print(f"ZeRO 1/2/3 with {nproc} ranks: {wall:.1f} s", flush=True)
    return out


def write_csv(path: str, dry: list[dict], ds: list[dict], tech: list[dict] | None = None) -> None:
    from planner.backends.fakepg import CATEGORIES

    fields = ["kind", "layout", "precision", "grad_ckpt", "moment", "quantity", "estimate_bytes", "measured_bytes",
              "difference_bytes", "error", "phase_estimate", "phase_measured", "wall_s", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in dry:
            res, cmp = r["result"], r["compare"]
            base = {"kind": "dry-run", "layout": r["layout"], "precision": r["precision"], "grad_ckpt": r["grad_ckpt"],
                    "wall_s": res["wall_s"]}
            w.writerow({**base, "moment": "peak", "quantity": "peak_allocated (estimate without cuBLAS workspace)",
                        "estimate_bytes": cmp["estimate_wo_other"], "measured_bytes": res["peak_allocated_bytes"],
                        "difference_bytes": cmp["estimate_wo_other"] - res["peak_allocated_bytes"],
                        "error": round(cmp["error"], 5), "phase_estimate": cmp["estimate_phase"],
                        "phase_measured": res["peak_phase"], "note": res["peak_module"]})
            for m in MOMENTS:
                d = res["phase_breakdowns"].get(m, {})
                e = r["moments"][m]
                for q in list(CATEGORIES) + ["detail:zero3_gathered"]:
                    est = int(e.get(q, 0))
                    meas = int(d.get("detail:gathered", 0)) if q == "detail:zero3_gathered" else int(d.get(q, 0))
                    if q == "other":
                        continue
                    w.writerow({**base, "moment": m, "quantity": q.removeprefix("detail:"), "estimate_bytes": est,
                                "measured_bytes": meas, "difference_bytes": est - meas,
                                "error": round(est / meas - 1, 5) if meas else "", "phase_estimate": m,
                                "phase_measured": m, "note": ""})
        for r in tech or []:
            res, cmp = r["result"], r["compare"]
            base = {"kind": f"dry-run {r['task']}", "layout": "FSDP8", "precision": "bf16", "grad_ckpt": r["grad_ckpt"],
                    "wall_s": res["wall_s"]}
            w.writerow({**base, "moment": "peak", "quantity": "peak_allocated (estimate without cuBLAS workspace)",
                        "estimate_bytes": cmp["estimate_wo_other"], "measured_bytes": res["peak_allocated_bytes"],
                        "difference_bytes": cmp["estimate_wo_other"] - res["peak_allocated_bytes"],
                        "error": round(cmp["error"], 5), "phase_estimate": cmp["estimate_phase"],
                        "phase_measured": res["peak_phase"], "note": r["label"] + "; " + res["peak_module"]})
            for p in r["phases"]:
                if p["estimate"] is None:
                    continue
                w.writerow({**base, "moment": p["phase"], "quantity": "phase peak_allocated (estimate without "
                            "cuBLAS workspace)", "estimate_bytes": int(p["estimate"]), "measured_bytes": p["dry_run"],
                            "difference_bytes": int(p["estimate"]) - p["dry_run"],
                            "error": round(p["estimate"] / p["dry_run"] - 1, 5), "phase_estimate": p["estimate_moment"],
                            "phase_measured": p["phase"], "note": r["label"]})
        for r in ds:
            w.writerow({"kind": f"deepspeed-zero{r['stage']}", "layout": f"dp{r['dp']} rank{r['rank']}",
                        "precision": "bf16", "grad_ckpt": False, "moment": "after step", "quantity": r["quantity"],
                        "estimate_bytes": r["zero_py"], "measured_bytes": r["measured"],
                        "difference_bytes": r["zero_py"] - r["measured"],
                        "error": round(r["zero_py"] / r["measured"] - 1, 6) if r["measured"] else "",
                        "phase_estimate": "", "phase_measured": "", "wall_s": r["wall_s"],
                        "note": f"DeepSpeed layout with padding predicts {r['expected']:g}"
                                + (" (exact)" if r["expected"] == r["measured"] else " (MISMATCH)")})


def technique_tables(tech: list[dict]) -> list[str]:
    out = ["### Techniques, FSDP8: per-rank peak and per-phase peaks, estimate vs dry run (GiB)", "",
           "| technique | estimate (w/o cuBLAS ws) | dry run | error | estimate moment | dry-run peak (phase, FSDP unit) | wall |",
           "|---|---:|---:|---:|---|---|---:|"]
    for r in tech:
        res, cmp = r["result"], r["compare"]
        out.append(f"| {r['label']} | {cmp['estimate_wo_other'] / GIB:.3f} | {res['peak_allocated_bytes'] / GIB:.3f} | "
                   f"{cmp['error'] * 100:+.2f}% | {cmp['estimate_phase']} | {res['peak_phase']}, {res['peak_module']} | "
                   f"{res['wall_s']:.0f} s |")
    out += ["", "| technique | dry-run phase | estimate moment | estimate | dry run | error | dry run: parameters / activations / temporaries / gathered |",
            "|---|---|---|---:|---:|---:|---|"]
    for r in tech:
        for p in r["phases"]:
            b = p["breakdown"]
            parts = " / ".join(f"{b.get(k, 0) / GIB:.3f}" for k in ("parameters", "activations", "temporaries",
                                                                     "detail:gathered"))
            if p["estimate"] is None:
                out.append(f"| {r['label']} | {p['phase']} | (none) | - | {p['dry_run'] / GIB:.3f} | - | {parts} |")
            else:
                out.append(f"| {r['label']} | {p['phase']} | {p['estimate_moment']} | {p['estimate'] / GIB:.3f} | "
                           f"{p['dry_run'] / GIB:.3f} | {(p['estimate'] / p['dry_run'] - 1) * 100:+.2f}% | {parts} |")
    return out + [""]


def tables(dry: list[dict], ds: list[dict], tech: list[dict] | None = None) -> str:
    from planner.backends.fakepg import CATEGORIES

    out = technique_tables(tech) if tech else []
    out += ["### Per-rank peak, estimate vs dry run (GiB)", "",
           "| layout | plan | estimate (w/o cuBLAS ws) | dry run | error | estimate moment | dry-run peak (phase, FSDP unit / module) | wall |",
           "|---|---|---:|---:|---:|---|---|---:|"]
    for r in dry:
        res, cmp = r["result"], r["compare"]
        plan = r["precision"] + (" + ckpt" if r["grad_ckpt"] else "")
        out.append(f"| {r['layout']} | {plan} | {cmp['estimate_wo_other'] / GIB:.3f} | "
                   f"{res['peak_allocated_bytes'] / GIB:.3f} | {cmp['error'] * 100:+.2f}% | {cmp['estimate_phase']} | "
                   f"{res['peak_phase']}, {res['peak_module']} | {res['wall_s']:.0f} s |")
    out += ["", "### Terms at the estimator's three moments (GiB; estimate / dry run)", ""]
    for r in dry:
        res = r["result"]
        plan = r["precision"] + (" + ckpt" if r["grad_ckpt"] else "")
        out += [f"**{r['layout']}, {plan}**", "",
                "| moment | total | " + " | ".join(c for c in CATEGORIES if c != "other") + " | gathered |",
                "|---|---:|" + "---:|" * (len(CATEGORIES))]
        for m in MOMENTS:
            d = res["phase_breakdowns"].get(m, {})
            e = r["moments"][m]
            cells = [f"{e[c] / GIB:.3f} / {d.get(c, 0) / GIB:.3f}" for c in CATEGORIES if c != "other"]
            tot = f"{sum(e[c] for c in CATEGORIES if c != 'other') / GIB:.3f} / {sum(d.get(c, 0) for c in CATEGORIES) / GIB:.3f}"
            g = f"{e['detail:zero3_gathered'] / GIB:.3f} / {d.get('detail:gathered', 0) / GIB:.3f}"
            out.append(f"| {m} | {tot} | " + " | ".join(cells) + f" | {g} |")
        fsdp = {k.removeprefix("detail:"): v for k, v in res["phase_breakdowns"].get("backward", {}).items()
                if k.startswith("detail:") and k != "detail:gathered"}
        if fsdp:
            out += ["", "FSDP categories at the dry run's backward peak: "
                    + ", ".join(f"{k} {v / GIB:.3f}" for k, v in fsdp.items()), ""]
        else:
            out.append("")
    if ds:
        out += ["### DeepSpeed ZeRO partitions per rank (bytes; tiny Llama, 84,513 parameters, bf16, AdamW)", "",
                "| stage | dp | rank | quantity | planner.engine.distributed.zero | DeepSpeed layout (padding) | measured | zero.py − measured |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in ds:
            mark = "" if r["expected"] == r["measured"] else " **≠**"
            out.append(f"| ZeRO-{r['stage']} | {r['dp']} | {r['rank']} | {r['quantity']} | {r['zero_py']:g} | "
                       f"{r['expected']:g}{mark} | {r['measured']:g} | {r['zero_py'] - r['measured']:+g} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("--tables", required=True)
    ap.add_argument("--json")
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument("--only-techniques", action="store_true", help="the technique dry runs only (no sft, no ZeRO)")
    ap.add_argument("--from-json", help="reuse a previous --json instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.load(open(args.from_json))
        dry, ds, tech = data["dry"], data["deepspeed"], data.get("techniques", [])
    else:
        tech = technique_runs(args.model, args.gpu)
        dry = [] if args.only_techniques else dry_runs(args.model, args.gpu)
        ds = [] if args.skip_deepspeed or args.only_techniques else deepspeed_runs()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dry": dry, "deepspeed": ds, "techniques": tech}, f)
    write_csv(args.csv, dry, ds, tech)
    with open(args.tables, "w") as f:
        f.write(tables(dry, ds, tech))
    return 0


if __name__ == "__main__":
    sys.exit(main())
