"""`planner run`: a tiny plan through torchrun, the DeepSpeed launcher, accelerate and TRL's trainers on
CPU ranks (gloo); each record compares every rank's bytes with the estimate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from planner.cli import main  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-llama")


def _run(tmp_path: Path, *extra: str) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["run", "--model", TINY, "--device", "cpu", "--batch", "2", "--seq", "32", "--steps", "2",
                 "--out", str(tmp_path), "--json", *extra], stdout=out, stderr=err)
    rec = json.loads(out.getvalue()) if out.getvalue().strip().startswith("{") else None
    return code, rec, err.getvalue()


def _exact_bytes(rec: dict) -> None:
    for r in rec["measured"]["ranks"]:
        for b in r["bytes"]:
            assert b["measured"] == b["estimate"], (r["rank"], b)


def test_torchrun_two_cpu_ranks(tmp_path):
    code, rec, err = _run(tmp_path, "--nproc", "2")
    assert code == 0, err
    assert rec["status"] == "completed" and rec["processes"] == 2 and rec["launcher"] == "torchrun"
    assert [r["rank"] for r in rec["measured"]["ranks"]] == [0, 1]
    assert all(r["engine"] == "ddp" for r in rec["measured"]["ranks"])
    _exact_bytes(rec)
    assert rec["measured"]["median_step_s"] > 0 and rec["measured"]["tokens_per_s"] > 0
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "record.md").read_text().startswith("# planner run: sft")
    assert json.loads((run_dir / "plan.json").read_text())["layout"] == {"gpus": 2}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launcher_zero_on_two_cpu_ranks(tmp_path, stage):
    code, rec, err = _run(tmp_path, "--nproc", "2", "--zero", str(stage), "--launcher", "deepspeed")
    assert code == 0, err
    assert rec["status"] == "completed" and rec["launcher"] == "deepspeed"
    for r in rec["measured"]["ranks"]:
        assert r["engine"] == "deepspeed"
        # every partition DeepSpeed holds equals its layout to the element, on each rank
        assert r["exact"], r["zero"]
        by = {z["quantity"]: z for z in r["zero"]}
        assert by["zero_optimizer_states"]["measured"] == by["zero_optimizer_states"]["zero_py"]
    run_dir = next(tmp_path.iterdir())
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage


def test_accelerate_launch_two_cpu_ranks(tmp_path):
    code, rec, err = _run(tmp_path, "--nproc", "2", "--launcher", "accelerate")
    assert code == 0, err
    assert rec["status"] == "completed" and len(rec["measured"]["ranks"]) == 2
    _exact_bytes(rec)


@pytest.mark.parametrize("extra", [
    ("--task", "sft"),
    ("--task", "dpo", "--logprobs", "fused", "--method", "lora"),
])
def test_trl_trainer_one_cpu_process(tmp_path, extra):
    pytest.importorskip("trl")
    code, rec, err = _run(tmp_path, "--trainer", "trl", *extra)
    assert code == 0, err
    assert rec["status"] == "completed" and rec["trainer"] == "trl"
    assert rec["measured"]["ranks"][0]["engine"].startswith("trl ")
    _exact_bytes(rec)
    assert len(rec["measured"]["ranks"][0]["step_s"]) == 2


def test_a_failing_rank_stops_the_run_and_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANNER_RUN_FAIL_RANK", "1")
    code, rec, err = _run(tmp_path, "--nproc", "2")
    assert code == 1
    assert rec["status"] == "failed"
    assert rec["errors"][0]["rank"] == 1 and "failed on purpose" in rec["errors"][0]["message"]
    assert "rank 1 failed" in err


def test_dry_writes_the_configs_and_runs_nothing(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = main(["run", "--model", TINY, "--device", "cpu", "--nproc", "2", "--zero", "2", "--launcher", "deepspeed",
                 "--out", str(tmp_path), "--name", "d", "--dry"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    run_dir = tmp_path / "d"
    assert (run_dir / "ds_config.json").is_file() and (run_dir / "spec.json").is_file()
    assert not (run_dir / "ranks").exists()
    assert "deepspeed --num_gpus=2 --module planner.backends.launch_worker" in out.getvalue()


@pytest.mark.parametrize("extra,message", [
    (("--launcher", "slurm"), "launcher: unknown launcher 'slurm'"),
    (("--method", "qlora"), "method qlora: bitsandbytes' 4-bit layers need CUDA"),
    (("--task", "grpo"), "task grpo: planner run starts sft's step"),
    (("--trainer", "trl", "--nproc", "2"), "trainer trl: one process"),
    (("--zero", "2", "--precision", "fp32", "--nproc", "2"), "precision fp32: DeepSpeed holds the model in bf16"),
    (("--nproc", "0"), "nproc: must be >= 1"),
])
def test_bad_runs_are_one_line_errors(tmp_path, extra, message):
    out, err = io.StringIO(), io.StringIO()
    code = main(["run", "--model", TINY, "--device", "cpu", "--out", str(tmp_path), *extra], stdout=out, stderr=err)
    assert code == 2
    assert message in err.getvalue() and err.getvalue().count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_gpus_missing_launcher_missing_and_a_plan_that_does_not_fit(tmp_path, monkeypatch):
    import torch

    from planner.backends import launch
    from planner.specs import Plan

    tiny = Plan(model=TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(launch.RunError, match="the plan needs 2 GPUs and this machine has 0"):
        launch.check(tiny, {"gpus": 2}, "torchrun", "planner", "cuda", 2, 1)
    monkeypatch.setattr(launch, "_installed", lambda m: m != "deepspeed")
    with pytest.raises(launch.RunError, match=r"launcher deepspeed is not installed \(pip install deepspeed\)"):
        launch.check(tiny, {}, "deepspeed", "planner", "cpu", 1, 1)
    big = Plan(model="llama-3.1-70b", gpu="a10g", batch=1, seq=2048)
    _, reasons = launch.judge(big, {}, "cuda")
    assert reasons and "does not fit" in reasons[0]
    assert launch.judge(big, {}, "cpu")[1] == []  # a CPU run is not judged against a card


@pytest.mark.parametrize("extra,expect", [
    (("--launcher", "torchrun", "--nnodes", "2", "--master", "node0:29500"),
     "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 -m planner.backends.launch_worker"),
    (("--launcher", "deepspeed", "--nnodes", "2", "--hostfile", "hosts", "--zero", "3"),
     "deepspeed --num_gpus=2 --num_nodes=2 --hostfile=hosts --module planner.backends.launch_worker"),
    (("--launcher", "accelerate",), "accelerate launch --config_file accelerate_config.yaml -m planner.backends.launch_worker"),
])
def test_multi_node_and_accelerate_commands_go_through_the_launchers_options(tmp_path, extra, expect):
    out, err = io.StringIO(), io.StringIO()
    code = main(["run", "--model", TINY, "--device", "cpu", "--nproc", "2", "--out", str(tmp_path), "--name", "m",
                 "--dry", *extra], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert expect in out.getvalue()
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    nodes = 2 if "--nnodes" in extra else 1
    assert plan["layout"]["gpus"] == 2 * nodes


@pytest.mark.parametrize("extra,message", [
    (("--nnodes", "2"), "master: a multi-node torchrun needs --master HOST:PORT"),
    (("--nnodes", "2", "--launcher", "deepspeed"), "hostfile: a multi-node DeepSpeed run needs --hostfile FILE"),
])
def test_multi_node_runs_need_the_launchers_rendezvous(tmp_path, extra, message):
    err = io.StringIO()
    code = main(["run", "--model", TINY, "--device", "cpu", "--out", str(tmp_path), "--dry", *extra],
                stdout=io.StringIO(), stderr=err)
    assert code == 2 and message in err.getvalue()
    assert not any(tmp_path.iterdir())


def test_the_record_prices_the_step_with_a_cpu_profile(tmp_path):
    # the CPU profile the committed records were priced with (planner calibrate --device cpu --threads 1)
    profile = str(Path(__file__).resolve().parents[1] / "reports" / "runs" / "cpu-profile.json")
    code, rec, err = _run(tmp_path, "--profile", profile)
    assert code == 0, err
    est, measured = rec["estimate"]["step_s"], rec["measured"]["median_step_s"]
    assert est > 0 and measured > 0 and rec["estimate"]["profile"]
    md = next(tmp_path.iterdir()).joinpath("record.md").read_text()
    assert f"estimate {est * 1e3:.1f} ms" in md
