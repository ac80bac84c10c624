"""`planner models`, `planner gpus`, `planner plugins`: the catalogs and the loaded plugins."""

from __future__ import annotations

import argparse

from planner.commands.common import Out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")


def _table(rows: list[list[str]], header: list[str], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def run_models(args: argparse.Namespace, out: Out) -> int:
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


def run_gpus(args: argparse.Namespace, out: Out) -> int:
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


def run_plugins(args: argparse.Namespace, out: Out) -> int:
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
