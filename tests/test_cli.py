"""The `planner` command line, run in-process through main(argv), plus one run of the installed script.

Expected figures are computed from the engine and catalogs for the same plan, never copied.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main
from planner.engine import estimate
from planner.gpus import load_gpu
from planner.models import load_model, model_ids
from planner.specs import Plan
from planner.units import format_gib

ISSUE_EXAMPLE = ["fit", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--method", "qlora",
                 "--batch", "4", "--seq", "2048", "--grad-ckpt"]  # fmt: skip
SMALL_FITS = ["fit", "--model", "qwen2.5-0.5b", "--gpu", "h200", "--batch", "1", "--seq", "512"]
BIG_DOES_NOT_FIT = ["fit", "--model", "llama-3.1-8b", "--gpu", "t4", "--batch", "4", "--seq", "4096"]

MEMORY_KEYS = {"peak_allocated_bytes", "reserved_bytes", "device_bytes", "peak_phase", "stage", "breakdown",
               "details", "device_items", "outside_allocator", "phases"}  # fmt: skip


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(argv):
    code, out, err = run([*argv, "--json"])
    return code, json.loads(out), err


def expected_estimate(**fields):
    plan = Plan(**fields)
    return estimate(plan, load_model(plan.model), load_gpu(plan.gpu) if plan.gpu else None)


# ---- verdicts and exit codes -------------------------------------------------------------------
def test_issue_example_json_matches_the_engine():
    code, doc, err = run_json(ISSUE_EXAMPLE)
    est = expected_estimate(model="llama-3.1-8b", gpu="a100-80gb", method="qlora", batch=4, seq=2048, grad_ckpt=True)
    gpu = load_gpu("a100-80gb")
    # peak allocated and its breakdown are the engine's; reserved and the verdict the simulated allocator's
    # over the engine's own allocation trace of the step
    from planner.engine.simulation import simulate_plan

    sim = simulate_plan(Plan(model="llama-3.1-8b", gpu="a100-80gb", method="qlora", batch=4, seq=2048, grad_ckpt=True),
                        load_model("llama-3.1-8b"), gpu)
    device = sim.reserved_bytes + gpu.cuda_context_bytes
    assert doc["memory"]["peak_allocated_bytes"] == est.peak_allocated_bytes
    assert doc["memory"]["reserved_bytes"] == sim.reserved_bytes != est.reserved_bytes
    assert doc["memory"]["device_bytes"] == device
    assert doc["memory"]["peak_phase"] == est.peak_phase
    assert doc["memory"]["breakdown"] == est.breakdown
    assert doc["fits"] is sim.fits is True
    assert code == 0
    assert doc["headroom_bytes"] == gpu.memory_bytes - device
    assert doc["gpu"] == {"id": "a100-80gb", "name": gpu.name, "memory_bytes": gpu.memory_bytes}


def test_json_schema_keys():
    for argv in (SMALL_FITS, BIG_DOES_NOT_FIT):
        code, doc, _ = run_json(argv)
        assert {"fits", "gpu", "memory", "suggestions", "plan", "warnings"} <= set(doc)
        assert set(doc["gpu"]) == {"id", "name", "memory_bytes"}
        assert set(doc["memory"]) == MEMORY_KEYS
        assert isinstance(doc["fits"], bool) and isinstance(doc["warnings"], list)
        assert set(doc["plan"]) == set(Plan.model_fields)
        for s in doc["suggestions"]:
            assert set(s) == {"change", "peak_allocated_bytes", "device_bytes", "fits", "simulated"}


def test_exit_0_when_it_fits():
    code, doc, err = run_json(SMALL_FITS)
    assert doc["fits"] is True and code == 0
    assert doc["suggestions"] == []
    assert doc["memory"]["device_bytes"] <= doc["gpu"]["memory_bytes"]


def test_exit_1_when_it_does_not_fit_with_suggestions():
    code, doc, err = run_json(BIG_DOES_NOT_FIT)
    assert doc["fits"] is False and code == 1
    assert doc["memory"]["device_bytes"] > doc["gpu"]["memory_bytes"]
    assert doc["suggestions"], "a plan that does not fit gets suggestions"
    fits = [s["fits"] for s in doc["suggestions"]]
    assert fits == sorted(fits, reverse=True), "suggestions that fit come first"


def test_suggestions_in_json_re_estimate_to_what_they_claim():
    """Simulated suggestions (the plan's trace shape) against the simulated allocator's verdict, the
    others against the estimate with reserved scaled by the base plan's simulated-to-estimated ratio."""
    from planner.engine.alloc_conf import AllocatorConfig
    from planner.simulated import verdict

    code, doc, _ = run_json(BIG_DOES_NOT_FIT)
    gpu = load_gpu("t4")
    cap, ctx = gpu.memory_bytes, gpu.cuda_context_bytes
    base = {"model": "llama-3.1-8b", "gpu": "t4", "batch": 4, "seq": 4096}
    assert doc["allocator"]["simulated"]
    ratio = doc["allocator"]["reserved_bytes"] / expected_estimate(**base).reserved_bytes
    checked = simulated = 0
    for s in doc["suggestions"]:
        argv = s["change"].split()
        if argv[0] == "--alloc-conf":
            continue  # the allocator's own settings: tests/test_fit_allocator.py
        update = {}
        for flag, value in zip(argv[::2], argv[1::2]):
            update[flag.lstrip("-").replace("-", "_")] = int(value) if value.isdigit() else value
        if s["change"] == "--grad-ckpt":
            update = {"grad_ckpt": True}
        if len(argv) % 2 and s["change"] != "--grad-ckpt":
            continue  # combined suggestion with a bare flag: covered in test_suggest
        plan = Plan(**{**base, **update})
        est = expected_estimate(**{**base, **update})
        assert est.peak_allocated_bytes == s["peak_allocated_bytes"], s
        if s["simulated"]:
            reserved, fits = verdict(plan, load_model(plan.model), gpu, AllocatorConfig())
            simulated += 1
        else:
            reserved = int(est.reserved_bytes * ratio)
            fits = reserved + ctx <= cap
        assert s["device_bytes"] == reserved + ctx, s
        assert s["fits"] == fits, s
        checked += 1
    assert checked >= 3 and simulated >= 1


def test_json_stdout_is_only_json_and_fits_flag_consistent():
    code, out, err = run([*SMALL_FITS, "--json"])
    json.loads(out)  # the whole of stdout parses
    assert err == ""


# ---- human output -------------------------------------------------------------------------------
def test_human_output_fits():
    code, out, err = run(SMALL_FITS)
    assert code == 0
    est = expected_estimate(model="qwen2.5-0.5b", gpu="h200", batch=1, seq=512)
    gpu = load_gpu("h200")
    from planner.engine.simulation import simulate_plan

    sim = simulate_plan(Plan(model="qwen2.5-0.5b", gpu="h200", batch=1, seq=512), load_model("qwen2.5-0.5b"), gpu)
    device = sim.reserved_bytes + gpu.cuda_context_bytes
    assert "FITS: headroom " + format_gib(gpu.memory_bytes - device) in out
    for figure in (est.peak_allocated_bytes, sim.reserved_bytes, device, sim.min_capacity_bytes + gpu.cuda_context_bytes):
        assert format_gib(figure) in out
    assert "simulated: PyTorch's caching allocator" in out and "smallest card" in out
    assert "peak allocated" in out and "reserved" in out and "device" in out
    assert est.peak_phase in out
    for category, value in est.breakdown.items():
        if value:
            assert category in out
            assert f"{100 * value / est.peak_allocated_bytes:5.1f}%" in out
    assert "suggestions" not in out


def test_human_output_does_not_fit_lists_suggestions():
    code, out, err = run(BIG_DOES_NOT_FIT)
    assert code == 1
    assert "DOES NOT FIT: short by" in out
    assert "suggestions" in out and "--method qlora" in out


# ---- bad input: one line on stderr, nothing on stdout, exit 2 -------------------------------------
def assert_bad_input(argv, *fragments):
    code, out, err = run(argv)
    assert code == 2, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("planner: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_unknown_model_with_close_matches():
    assert_bad_input(["fit", "--model", "llama-3.1-8", "--gpu", "h200"], "model: unknown model 'llama-3.1-8'", "did you mean", "llama-3.1-8b")


def test_unknown_gpu_with_close_matches():
    assert_bad_input(["fit", "--model", "llama-3.1-8b", "--gpu", "a100"], "gpu: unknown gpu 'a100'", "did you mean", "a100-80gb")


def test_bad_input_with_json_writes_nothing_to_stdout():
    assert_bad_input(["fit", "--model", "nope-model", "--gpu", "h200", "--json"], "unknown model")


def test_config_json_missing_a_field(tmp_path):
    cfg = json.loads((Path(__file__).resolve().parents[1] / "planner/data/models/llama-3.2-1b.json").read_text())
    cfg.pop("_planner", None)
    cfg.pop("hidden_size")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    line = assert_bad_input(["fit", "--model", str(tmp_path / "config.json"), "--gpu", "h200"], "hidden_size")
    assert line.startswith("planner: error: model:")
    # the directory form too
    assert_bad_input(["fit", "--model", str(tmp_path), "--gpu", "h200"], "hidden_size")


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_bad_input(["fit", "--model", str(tmp_path / "config.json"), "--gpu", "h200"], "not valid JSON")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "0"], "batch: must be > 0 (got 0)"),
        (["--batch", "-1"], "batch: must be > 0 (got -1)"),
        (["--seq", "0"], "seq: must be > 0 (got 0)"),
        (["--method", "lora", "--lora-rank", "0"], "lora_rank: must be > 0 (got 0)"),
        (["--method", "qlora", "--lora-rank", "-4"], "lora_rank: must be > 0 (got -4)"),
        (["--task", "generate", "--new-tokens", "0"], "new_tokens: must be > 0 (got 0)"),
        (["--precision", "bf32"], "precision: must be one of fp32, bf16, fp16, mixed-bf16, mixed-fp16 (got 'bf32')"),
        (["--batch", "four"], "argument --batch/-b: invalid int value: 'four'"),
        (["--gpu-memory", "24G"], "gpu_memory: ambiguous size unit"),
    ],
)
def test_invalid_values(extra, message):
    assert_bad_input(["fit", "--model", "llama-3.2-1b", "--gpu", "h200", *extra], message)


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--lora-rank", "8"], "lora_rank"),
        (["--lora-alpha", "32"], "lora_alpha"),
        (["--lora-targets", "q_proj,v_proj"], "lora_targets"),
        (["--quant", "fp4"], "quant"),
        (["--no-double-quant"], "double_quant"),
        (["--method", "full", "--lora-dropout", "0.1"], "lora_dropout"),
        (["--method", "lora", "--no-kbit-prep"], "kbit_prep"),
    ],
)
def test_lora_options_with_method_full_or_lora(extra, field):
    assert_bad_input(["fit", "--model", "llama-3.2-1b", "--gpu", "h200", *extra], f"{field}: only applies with method")


def test_neither_gpu_nor_memory():
    line = assert_bad_input(["fit", "--model", "llama-3.2-1b"])
    assert line == "planner: error: gpu: give --gpu ID or --gpu-memory SIZE"


def test_no_model():
    assert_bad_input(["fit", "--gpu", "h200"], "model: give --model")


def test_unknown_flag_and_no_command():
    assert_bad_input(["fit", "--model", "x", "--gpu", "h200", "--bogus"], "unrecognized arguments: --bogus")
    assert_bad_input([], "give a command")
    assert_bad_input(["nonsense"], "invalid choice")


# ---- warnings -----------------------------------------------------------------------------------
def test_sequence_beyond_context_is_a_warning_not_an_error():
    model = load_model("gpt2")
    seq = 2 * model.max_position_embeddings
    code, out, err = run(["fit", "--model", "gpt2", "--gpu", "h200", "--seq", str(seq)])
    assert code in (0, 1)
    assert "planner: warning: seq:" in err and str(model.max_position_embeddings) in err
    assert "FITS" in out
    code, out, err = run(["fit", "--model", "gpt2", "--gpu", "h200", "--seq", str(seq), "--json"])
    doc = json.loads(out)  # stdout stays pure JSON
    assert any("max_position_embeddings" in w for w in doc["warnings"])
    assert "planner: warning:" in err


def test_no_warning_within_context():
    model = load_model("gpt2")
    code, out, err = run(["fit", "--model", "gpt2", "--gpu", "h200", "--seq", str(model.max_position_embeddings)])
    assert err == ""


def test_generation_beyond_context_warns():
    model = load_model("gpt2")
    code, out, err = run(["fit", "--model", "gpt2", "--gpu", "h200", "--task", "generate",
                          "--prompt-len", str(model.max_position_embeddings), "--new-tokens", "64"])  # fmt: skip
    assert code in (0, 1) and "planner: warning: prompt_len + new_tokens" in err


# ---- plan files ---------------------------------------------------------------------------------
def test_yaml_plan_with_unknown_key(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("model: llama-3.1-8b\ngpu: a100-80gb\nlora_rnk: 8\n")
    line = assert_bad_input(["fit", str(p)])
    assert line == f"planner: error: {p}: unknown key 'lora_rnk' (did you mean: lora_rank?)"


def test_flags_override_yaml(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("model: llama-3.2-1b\ngpu: a100-80gb\nbatch: 8\nseq: 1024\ngrad-ckpt: true\n")
    code, doc, err = run_json(["fit", str(p), "--batch", "2", "--gpu", "h200"])
    assert doc["plan"]["batch"] == 2 and doc["plan"]["seq"] == 1024 and doc["plan"]["grad_ckpt"] is True
    assert doc["gpu"]["id"] == "h200"
    est = expected_estimate(model="llama-3.2-1b", gpu="h200", batch=2, seq=1024, grad_ckpt=True)
    assert doc["memory"]["peak_allocated_bytes"] == est.peak_allocated_bytes
    code, doc, err = run_json(["fit", str(p), "--no-grad-ckpt"])
    assert doc["plan"]["grad_ckpt"] is False and doc["plan"]["batch"] == 8


def test_unreadable_yaml(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("model: [llama\n")
    assert_bad_input(["fit", str(p)], "invalid YAML")
    assert_bad_input(["fit", str(tmp_path / "missing.yaml")], "no such file")


def test_custom_card_from_memory_size():
    code, doc, _ = run_json(["fit", "--model", "qwen2.5-0.5b", "--gpu-memory", "24GiB", "--seq", "512"])
    assert doc["gpu"]["memory_bytes"] == 24 * 2**30 and doc["gpu"]["id"] == "custom"
    est = expected_estimate(model="qwen2.5-0.5b", gpu_memory=24 * 2**30, seq=512)
    assert doc["fits"] == (est.device_bytes <= 24 * 2**30)


# ---- catalogs -----------------------------------------------------------------------------------
def test_models_table_and_json():
    code, out, err = run(["models"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[0] == "id" and set(lines[1]) <= {"-", " "}
    for mid in model_ids():
        assert any(line.startswith(mid + " ") for line in lines), mid
    code, out, err = run(["models", "--json"])
    rows = json.loads(out)
    assert [r["id"] for r in rows] == model_ids()


def test_gpus_table_and_json():
    code, out, err = run(["gpus"])
    assert code == 0
    h200 = load_gpu("h200")
    row = next(line for line in out.splitlines() if line.startswith("h200 "))
    assert format_gib(h200.memory_bytes) in row
    code, out, err = run(["gpus", "--json"])
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["h200"]["memory_bytes"] == h200.memory_bytes


def test_help():
    code, out, err = run(["--help"])
    assert code == 0 and "fit" in out and "models" in out and "gpus" in out
    code, out, err = run(["fit", "--help"])
    assert code == 0 and "--gpu-memory" in out and "exit codes" in out


# ---- the installed console script ---------------------------------------------------------------
def test_installed_console_script():
    exe = shutil.which("planner", path=str(Path(sys.executable).parent)) or shutil.which("planner")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([exe, *ISSUE_EXAMPLE, "--json"], capture_output=True, text=True, env=env, timeout=60)
    doc = json.loads(proc.stdout)
    assert proc.returncode == (0 if doc["fits"] else 1)
    assert set(doc["memory"]) == MEMORY_KEYS
    proc = subprocess.run([exe, "fit", "--model", "llama-3.1-8b", "--gpu", "h10"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("planner: error: gpu: unknown gpu 'h10'")


def test_fit_imports_nothing_heavy():
    code = (
        "import sys; from planner.cli import main; "
        f"rc = main({ISSUE_EXAMPLE!r} + ['--json'], stdout=open('/dev/null', 'w')); "
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'numpy', 'peft') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
