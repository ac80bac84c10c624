"""Plans in and out (planner.configs): export then --from gives back the plan; the written files load
with the tools' own parsers; bad files are one-line errors naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.configs import ConfigError, read_configs
from planner.configs.export import render
from planner.models import load_model
from planner.plan_io import build_plan
from planner.specs import Plan

ROUND_TRIPS = [
    # (plan, layout, formats)
    (dict(model="qwen2.5-0.5b", batch=4, seq=2048, grad_ckpt=True, optimizer="adamw-fused"), {},
     ["trl", "llamafactory", "axolotl"]),
    (dict(model="llama-3.1-8b", method="lora", lora_rank=32, lora_targets="q_proj,v_proj", precision="mixed-bf16",
          batch=2, seq=1024, grad_accum=8), {}, ["trl"]),
    (dict(model="llama-3.1-8b", method="qlora", lora_dropout=0.05, double_quant=False, batch=4, seq=2048,
          grad_ckpt=True, optimizer="paged-adamw-8bit"), {}, ["trl", "llamafactory", "axolotl"]),
    (dict(model="qwen2.5-1.5b", method="lora", precision="fp32", batch=1, seq=512, attn="eager"), {},
     ["trl", "llamafactory", "axolotl"]),
    (dict(model="qwen2.5-0.5b", task="dpo", method="lora", beta=0.2, logprobs="fused", batch=2, seq=1024), {},
     ["trl", "axolotl"]),
    (dict(model="qwen2.5-0.5b", task="dpo", precision="mixed-bf16", beta=0.05, batch=1, seq=512), {},
     ["llamafactory"]),
    (dict(model="qwen2.5-0.5b", task="dpo", ref_logprobs="precomputed", logprobs="fused", batch=2, seq=512), {},
     ["trl"]),
    (dict(model="qwen2.5-0.5b", task="rm", method="lora", batch=4, seq=1024), {}, ["trl", "llamafactory"]),
    (dict(model="qwen2.5-0.5b", task="grpo", group_size=4, batch=2, new_tokens=256, kl_coef=0.04), {}, ["trl"]),
    # layouts: DeepSpeed through the trainer's `deepspeed` key and through accelerate's config file
    (dict(model="llama-3.1-8b", batch=2, seq=4096, grad_accum=4, grad_ckpt=True),
     {"gpus": 8, "zero": 2, "offload": "optimizer"}, ["trl", "accelerate"]),
    (dict(model="llama-3.1-8b", batch=1, seq=2048, grad_ckpt=True),
     {"gpus": 16, "gpus_per_node": 8, "zero": 3, "offload": "optimizer+params"}, ["llamafactory", "accelerate"]),
    (dict(model="qwen2.5-7b", method="lora", batch=2, seq=2048), {"gpus": 4, "zero": 3}, ["axolotl"]),
    (dict(model="qwen2.5-1.5b", precision="fp16", batch=4, seq=1024), {"gpus": 2, "zero": 1}, ["trl", "accelerate"]),
    (dict(model="qwen2.5-1.5b", batch=4, seq=1024), {"gpus": 2, "zero": 0}, ["llamafactory", "accelerate"]),
    (dict(model="llama-3.1-8b", batch=1, seq=2048), {"gpus": 4, "fsdp": "full-shard"}, ["trl", "accelerate"]),
    (dict(model="llama-3.1-8b", precision="mixed-bf16", batch=1, seq=2048), {"gpus": 8, "fsdp": "shard-grad-op"},
     ["accelerate", "trl"]),
    (dict(model="qwen2.5-0.5b", batch=8, seq=1024), {"gpus": 2}, ["trl", "accelerate"]),
    (dict(model="llama-3.1-70b", method="qlora", lora_targets="all-linear", batch=1, seq=512, grad_ckpt=True),
     {"gpus": 8, "fsdp": "full-shard", "offload": "optimizer+params"}, ["axolotl", "trl"]),
]


def _effective(plan: Plan) -> dict:
    """A plan's settings as they act: the model by catalog id, alpha resolved."""
    d = plan.model_dump()
    d["model"] = load_model(plan.model).id
    d["lora_alpha"] = plan.alpha
    return d


def _round_trip(tmp_path: Path, fields: dict, layout: dict, fmt: str) -> tuple[Plan, dict]:
    plan = Plan(**fields)
    formats = [fmt] + (["accelerate"] if layout and fmt != "accelerate" and not layout.get("deepspeed_only") else [])
    files = render(plan, layout, formats)
    out = tmp_path / fmt
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    refs = [str(out / n) for n in files if n != "ds_config.json"] or [str(out / "ds_config.json")]
    got = read_configs(refs)
    back, _ = build_plan(got.plan, {})
    return back, got.layout


@pytest.mark.parametrize("fields,layout,formats", ROUND_TRIPS)
def test_export_then_from_gives_back_the_plan(tmp_path, fields, layout, formats):
    plan = Plan(**fields)
    for fmt in formats:
        if fmt == "accelerate":
            continue  # accelerate's config says the layout only: exported beside a trainer's
        back, got_layout = _round_trip(tmp_path, fields, layout, fmt)
        assert _effective(back) == _effective(plan), fmt
        want = {k: v for k, v in layout.items() if not (k == "offload" and v == "none")}
        assert got_layout == want, fmt


def test_what_a_format_cannot_express_is_an_error():
    with pytest.raises(ConfigError, match="trl: TRL's CLI has no trainer for task distill"):
        render(Plan(model="qwen2.5-0.5b", task="distill", teacher="qwen2.5-1.5b"), {}, ["trl"])
    with pytest.raises(ConfigError, match="prompt_len 1024 has no setting"):
        render(Plan(model="qwen2.5-0.5b", task="grpo", prompt_len=1024), {}, ["trl"])
    with pytest.raises(ConfigError, match="axolotl: precision mixed-bf16"):
        render(Plan(model="qwen2.5-0.5b", precision="mixed-bf16"), {}, ["axolotl"])
    with pytest.raises(ConfigError, match="tp: tensor and pipeline"):
        render(Plan(model="llama-3.1-8b"), {"gpus": 8, "tp": 2}, ["trl"])
    with pytest.raises(ConfigError, match="unknown format 'tlr'"):
        render(Plan(model="qwen2.5-0.5b"), {}, ["tlr"])
    with pytest.raises(ConfigError, match="llamafactory: its DPO computes log-probabilities from the full logits"):
        render(Plan(model="qwen2.5-0.5b", task="dpo", logprobs="fused"), {}, ["llamafactory"])


# ---- the tools' own parsers ------------------------------------------------------------------
PARSED = [
    (dict(model="qwen2.5-0.5b", method="qlora", batch=4, seq=1024), {}),
    (dict(model="qwen2.5-0.5b", task="dpo", method="lora", logprobs="fused", batch=2, seq=512), {}),
    (dict(model="qwen2.5-0.5b", task="grpo", group_size=4, batch=2, new_tokens=64), {}),
    (dict(model="qwen2.5-0.5b", task="rm", batch=2, seq=512), {}),
    (dict(model="llama-3.1-8b", batch=2, seq=2048, grad_accum=4), {"gpus": 8, "zero": 3, "offload": "optimizer"}),
    (dict(model="llama-3.1-8b", batch=1, seq=2048), {"gpus": 4, "fsdp": "full-shard"}),
]


@pytest.mark.parametrize("fields,layout", PARSED)
def test_trl_parses_the_exported_config(tmp_path, monkeypatch, fields, layout):
    trl = pytest.importorskip("trl")
    from trl import ModelConfig, ScriptArguments, TrlParser

    config = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig, "rm": trl.RewardConfig}
    plan = Plan(**fields)
    files = render(plan, layout, ["trl"])
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)  # the Trainer opens the DeepSpeed file from the working directory
    parser = TrlParser((ScriptArguments, config[plan.task], ModelConfig))
    # this machine has no GPU: bf16 needs use_cpu for TrainingArguments to accept it here
    script, args, model = parser.parse_args_and_config(
        args=["--config", str(tmp_path / "trl_config.yaml"), "--use_cpu", "true"], fail_with_unknown_args=True)
    rows = plan.batch * (plan.group_size if plan.task == "grpo" else 1)
    assert args.per_device_train_batch_size == rows
    assert args.gradient_accumulation_steps == plan.grad_accum
    assert args.bf16 is (plan.precision in ("bf16", "mixed-bf16"))
    assert model.model_name_or_path == load_model(plan.model).hf_id
    assert model.use_peft is (plan.method != "full")
    assert model.load_in_4bit is (plan.method == "qlora")
    if plan.task == "grpo":
        assert args.num_generations == plan.group_size and args.max_completion_length == plan.new_tokens
    else:
        assert args.max_length == plan.seq
    if layout.get("zero") is not None:
        assert args.deepspeed == "ds_config.json"
    if layout.get("fsdp"):
        assert args.fsdp and args.fsdp_config["reshard_after_forward"] is (layout["fsdp"] == "full-shard")


@pytest.mark.parametrize("fields,layout", [p for p in PARSED if p[1]])
def test_accelerate_and_deepspeed_load_the_exported_configs(tmp_path, monkeypatch, fields, layout):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    plan = Plan(**fields)
    files = render(plan, layout, ["accelerate"] + (["deepspeed"] if layout.get("zero") is not None else []))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    cfg = load_config_from_file(str(tmp_path / "accelerate_config.yaml"))
    assert cfg.num_processes == layout["gpus"]
    if layout.get("fsdp"):
        assert str(cfg.distributed_type).endswith("FSDP")
        assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        return
    assert str(cfg.distributed_type).endswith("DEEPSPEED")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = json.loads((tmp_path / "ds_config.json").read_text())
    # the HF Trainer fills "auto" before DeepSpeed reads the file; here one process (no torch.distributed)
    ds["train_batch_size"] = plan.batch * plan.grad_accum
    ds["gradient_clipping"] = 1.0
    conf = DeepSpeedConfig(ds)
    assert conf.zero_optimization_stage == layout["zero"]
    assert conf.train_micro_batch_size_per_gpu == plan.batch
    assert conf.gradient_accumulation_steps == plan.grad_accum
    assert conf.bfloat16_config.enabled is (plan.precision == "bf16")
    assert str(conf.zero_config.offload_optimizer.device).endswith("cpu")


# ---- reading: errors and warnings ----------------------------------------------------------------
def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_a_bad_value_names_the_file_and_key(tmp_path):
    f = _write(tmp_path, "t.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\noptim: adafactor\n")
    with pytest.raises(ConfigError) as e:
        read_configs([f])
    assert str(e.value).startswith(f"{f}: optim: 'adafactor' is not modelled")
    assert "\n" not in str(e.value)
    f = _write(tmp_path, "ds.json", '{"zero_optimization": {"stage": 5}}')
    with pytest.raises(ConfigError, match=r"ds.json: zero_optimization.stage: ZeRO stages are 0-3 \(got 5\)"):
        read_configs([f])
    f = _write(tmp_path, "bad.json", '{"zero_optimization": {"stage": 2},}')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 1"):
        read_configs([f])
    f = _write(tmp_path, "x.yaml", "foo: 1\n")
    with pytest.raises(ConfigError, match=r"not a config of a format the planner reads"):
        read_configs([f])
    with pytest.raises(ConfigError, match="no such file"):
        read_configs([str(tmp_path / "missing.yaml")])


def test_files_that_disagree_are_an_error_unless_a_flag_decides(tmp_path):
    trl = _write(tmp_path, "t.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\nper_device_train_batch_size: 4\n")
    ds = _write(tmp_path, "ds.json", '{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}')
    with pytest.raises(ConfigError, match=r"batch: .*t.yaml gives 4, .*ds.json gives 2"):
        read_configs([trl, ds])
    got = read_configs([trl, ds], given={"batch"})
    assert got.layout == {"zero": 1}


def test_a_tools_default_yields_to_a_file_that_states_the_field(tmp_path):
    # TRL's default batch (8) gives way to the DeepSpeed file's; its default bf16 autocast over fp32 weights
    # to DeepSpeed's bf16, which casts the model to bf16 (fp32 master weights in the optimizer)
    trl = _write(tmp_path, "t.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\n")
    ds = _write(tmp_path, "ds.json", '{"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": true}, '
                                     '"zero_optimization": {"stage": 2}}')
    got = read_configs([trl, ds])
    assert got.plan["batch"] == 2 and got.plan["precision"] == "bf16"
    alone = read_configs([trl])
    assert alone.plan["batch"] == 8 and alone.plan["grad_ckpt"] is True and alone.plan["optimizer"] == "adamw-fused"
    fp16 = _write(tmp_path, "ds16.json", '{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    bf = _write(tmp_path, "t2.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\nbf16: true\n")
    with pytest.raises(ConfigError, match="precision: .*t2.yaml gives 'mixed-bf16', .*ds16.json implies 'fp16'"):
        read_configs([bf, fp16])


def test_keys_not_modelled_are_named_in_a_warning(tmp_path):
    f = _write(tmp_path, "t.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\nlearning_rate: 1.0e-5\n"
                                   "use_liger_kernel: true\nneftune_noise_alpha: 5\n")
    got = read_configs([f])
    line = next(w for w in got.warnings if "not modelled" in w)
    assert "use_liger_kernel" in line and "neftune_noise_alpha" in line and "learning_rate" not in line


def test_deepspeed_batch_rule_is_checked(tmp_path):
    acc = _write(tmp_path, "a.yaml", "distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n"
                                     "  deepspeed_config_file: ds.json\n")
    _write(tmp_path, "ds.json", '{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, '
                                '"train_batch_size": 32, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match=r"train_batch_size 32 is not micro-batch 2 x accumulation 2 x 4 processes"):
        read_configs([acc])


def test_cli_reads_from_and_exports(tmp_path):
    from planner.cli import main
    import io

    trl = _write(tmp_path, "t.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\nper_device_train_batch_size: 2\n"
                                     "max_length: 512\nuse_peft: true\nlora_r: 8\nuse_liger_kernel: true\n")
    out, err = io.StringIO(), io.StringIO()
    code = main(["fit", "--from", trl, "--gpu", "a10g", "--no-suggest", "--json"], stdout=out, stderr=err)
    assert code == 0
    doc = json.loads(out.getvalue())
    assert doc["plan"]["batch"] == 2 and doc["plan"]["method"] == "lora" and doc["plan"]["lora_rank"] == 8
    assert "use_liger_kernel" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    code = main(["export", "--from", trl, "--batch", "4", "--to", "trl,llamafactory", "-o", str(tmp_path / "x")],
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    back = read_configs([str(tmp_path / "x" / "llamafactory_config.yaml")])
    assert back.plan["batch"] == 4 and back.plan["lora_rank"] == 8
    # nothing is overwritten without --force, and bad input is one line with exit 2
    code = main(["export", "--from", trl, "--to", "trl", "-o", str(tmp_path / "x")], stdout=io.StringIO(), stderr=err)
    assert code == 2
    err = io.StringIO()
    code = main(["fit", "--from", _write(tmp_path, "b.yaml", "model_name_or_path: x/y\noptim: lion\n"), "--gpu", "a10g"],
                stdout=io.StringIO(), stderr=err)
    assert code == 2 and err.getvalue().count("\n") == 1 and "optim: 'lion' is not modelled" in err.getvalue()


# ---- published configs (tests/data/configs, sources in SOURCES.md) ----------------------------
DATA = Path(__file__).parent / "data" / "configs"

# each file's settings as written in it (or the tool's default where it is silent, named so)
PUBLISHED = {
    "trl/trl-example-sft.yaml": (  # only the model: TRL 1.16's defaults (batch 8, max_length 1024, fp32 load + bf16)
        dict(task="sft", model="Qwen/Qwen2.5-0.5B", batch=8, seq=1024, grad_ckpt=True, precision="mixed-bf16",
             optimizer="adamw-fused"), {}),
    "trl/zephyr-7b-sft-qlora.yaml": (
        dict(task="sft", model="mistralai/Mistral-7B-v0.1", method="qlora", batch=4, grad_accum=2, seq=2048,
             lora_rank=16, lora_alpha=16.0, lora_dropout=0.05, precision="bf16", attn="sdpa", double_quant=False,
             lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"), {}),
    "trl/zephyr-7b-dpo-full.yaml": (
        dict(task="dpo", model="alignment-handbook/zephyr-7b-sft-full", batch=8, grad_accum=2, seq=1024, beta=0.01,
             optimizer="adamw", precision="mixed-bf16", logprobs="fused"), {}),
    "trl/smollm2-1.7b-sft.yaml": (
        dict(task="sft", model="HuggingFaceTB/SmolLM2-1.7B", batch=4, grad_accum=4, seq=8192, precision="bf16"), {}),
    "trl/openr1-distill-7b-sft.yaml": (
        dict(task="sft", batch=2, grad_accum=8, seq=32768, precision="bf16"), {}),
    "trl/qwen2.5-1.5b-grpo.yaml": (  # 16 completions per device = 1 prompt x num_generations 16
        dict(task="grpo", model="qwen2.5-1.5b", batch=1, group_size=16, prompt_len=512, new_tokens=1024,
             kl_coef=0.0), {}),
    "llamafactory/llama3-lora-sft.yaml": (
        dict(task="sft", model="llama-3-8b", method="lora", lora_rank=8, lora_targets="all-linear", batch=1,
             grad_accum=8, seq=2048, grad_ckpt=True, precision="bf16"), {}),
    "llamafactory/qwen3-lora-sft.yaml": (
        dict(task="sft", method="lora", lora_rank=8, batch=1, grad_accum=8, seq=2048), {}),
    "llamafactory/qwen3-lora-dpo.yaml": (dict(task="dpo", method="lora", beta=0.1, batch=1, grad_accum=8), {}),
    "llamafactory/qwen3-lora-reward.yaml": (dict(task="rm", method="lora", batch=1, grad_accum=8), {}),
    "llamafactory/qwen3-qlora-sft-bnb.yaml": (dict(task="sft", method="qlora", quant="nf4", double_quant=True), {}),
    "axolotl/llama-3-lora-1b.yml": (
        dict(task="sft", model="llama-3.2-1b", method="lora", lora_rank=16, lora_alpha=32.0, lora_dropout=0.05,
             batch=2, grad_accum=2, seq=2048, grad_ckpt=True, optimizer="adamw-8bit", precision="bf16"), {}),
    "axolotl/llama-3-qlora-1b.yml": (
        dict(task="sft", method="qlora", lora_rank=32, lora_alpha=16.0, batch=2, grad_accum=4,
             optimizer="adamw-8bit"), {}),
    "axolotl/llama-3-fft-8b.yaml": (
        dict(task="sft", model="llama-3.1-8b", method="full", batch=1, grad_accum=8, seq=8192,
             optimizer="paged-adamw-8bit", precision="bf16"), {}),
    "axolotl/qwen2-dpo.yaml": (
        dict(task="dpo", model="Qwen/Qwen2.5-0.5B", method="full", batch=2, grad_accum=4, seq=2048,
             optimizer="adamw-8bit"), {}),
    "axolotl/llama-3-qlora-fsdp-70b.yaml": (
        dict(task="sft", method="qlora", lora_rank=8, lora_targets="all-linear", batch=1, grad_accum=4, seq=512),
        {"fsdp": "full-shard", "offload": "optimizer+params"}),
    "accelerate/accelerate-fsdp.yaml": (dict(precision="mixed-bf16"), {"gpus": 2, "fsdp": "full-shard"}),
    "accelerate/trl-fsdp2.yaml": (dict(precision="mixed-bf16"), {"gpus": 8, "fsdp": "full-shard"}),
    "accelerate/accelerate-multi-gpu.yaml": (dict(precision="mixed-bf16"), {"gpus": 2}),
    "accelerate/alignment-handbook-ddp.yaml": (dict(), {"gpus": 8}),
    "accelerate/alignment-handbook-zero3.yaml": (dict(), {"gpus": 8, "zero": 3}),
    "accelerate/open-r1-zero2.yaml": (dict(), {"gpus": 8, "zero": 2}),
    "accelerate/accelerate-single-accelerator.yaml": (dict(), {}),
    "deepspeed/axolotl-zero2.json": (dict(), {"zero": 2, "offload": "optimizer"}),
    "deepspeed/axolotl-zero3-bf16.json": (dict(precision="bf16"), {"zero": 3}),
    "deepspeed/llamafactory-ds-z2.json": (dict(), {"zero": 2}),
    "deepspeed/llamafactory-ds-z3.json": (dict(), {"zero": 3}),
    "deepspeed/llamafactory-ds-z3-offload.json": (dict(), {"zero": 3, "offload": "optimizer+params"}),
    "deepspeed/transformers-ds-config-zero2.json": (dict(optimizer="adamw"), {"zero": 2, "offload": "optimizer"}),
    "deepspeed/accelerate-zero-stage1.json": (dict(precision="fp16", grad_accum=1, optimizer="adamw"), {"zero": 1}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_are_read_into_the_plan_they_describe(name):
    plan, layout = PUBLISHED[name]
    got = read_configs([str(DATA / name)])
    for k, v in plan.items():
        assert got.plan.get(k) == v, (k, got.plan.get(k))
    assert got.layout == layout


def test_each_format_has_at_least_two_published_examples():
    for fmt in ("trl", "accelerate", "deepspeed", "llamafactory", "axolotl"):
        assert sum(1 for n in PUBLISHED if n.startswith(fmt + "/")) >= 2, fmt
        listed = (DATA / "SOURCES.md").read_text()
        for n in PUBLISHED:
            assert f"`{n}`" in listed, n  # every file used names its source


def test_published_configs_that_name_other_files(tmp_path, monkeypatch):
    import shutil

    # LLaMA-Factory's example names its DeepSpeed file from the repository's root, where it is run
    (tmp_path / "examples" / "deepspeed").mkdir(parents=True)
    shutil.copy(DATA / "deepspeed/llamafactory-ds-z3.json", tmp_path / "examples/deepspeed/ds_z3_config.json")
    shutil.copy(DATA / "llamafactory/qwen3-full-sft.yaml", tmp_path / "qwen3_full_sft.yaml")
    monkeypatch.chdir(tmp_path)
    got = read_configs(["qwen3_full_sft.yaml"])
    assert got.plan["method"] == "full" and got.plan["precision"] == "mixed-bf16" and got.plan["grad_accum"] == 2
    assert got.layout == {"zero": 3}
    # accelerate's template names its DeepSpeed file beside its own folder
    (tmp_path / "config_yaml_templates").mkdir()
    (tmp_path / "deepspeed_config_templates").mkdir()
    shutil.copy(DATA / "accelerate/accelerate-deepspeed.yaml", tmp_path / "config_yaml_templates/deepspeed.yaml")
    shutil.copy(DATA / "deepspeed/accelerate-zero-stage1.json",
                tmp_path / "deepspeed_config_templates/zero_stage1_config.json")
    got = read_configs([str(tmp_path / "config_yaml_templates/deepspeed.yaml")])
    assert got.layout == {"gpus": 2, "zero": 1} and got.plan["precision"] == "fp16"


@pytest.mark.parametrize("name,message", [
    ("axolotl/llama-3-instruct-dpo-lora-8b.yml", "load_in_8bit: 8-bit (LLM.int8) models are not modelled"),
    ("trl/zephyr-7b-dpo-qlora.yaml", "optim: 'paged_adamw_32bit' is not modelled"),
    ("axolotl/llama-3-qlora-8b.yml", "optimizer: 'paged_adamw_32bit' is not modelled"),
])
def test_published_configs_with_what_the_planner_does_not_model(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_configs([str(DATA / name)])
    if "optim" in message:  # a flag for the setting reads the rest of the file
        got = read_configs([str(DATA / name)], given={"optimizer"})
        assert got.plan["method"] == "qlora"


# LLaMA-Factory and axolotl do not install here: their key schemas, extracted from their sources
# (tests/data/configs/schemas/*.txt: repository, commit and files in each header), check what is written
SCHEMAS = DATA / "schemas"


def _keys(name: str) -> set[str]:
    return {line.strip() for line in (SCHEMAS / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("fields,layout", [
    (dict(model="qwen2.5-0.5b", method="qlora", batch=4, seq=1024, grad_ckpt=True, attn="eager"), {}),
    (dict(model="qwen2.5-0.5b", task="dpo", method="lora", logprobs="fused", batch=2, seq=512), {}),
    (dict(model="llama-3.1-8b", batch=2, seq=2048, grad_accum=4), {"gpus": 8, "zero": 3, "offload": "optimizer"}),
    (dict(model="llama-3.1-8b", method="qlora", double_quant=False, batch=1, seq=512),
     {"gpus": 8, "fsdp": "full-shard", "offload": "optimizer+params"}),
])
def test_axolotl_export_uses_its_schema_keys(fields, layout):
    import yaml

    data = yaml.safe_load(render(Plan(**fields), layout, ["axolotl"])["axolotl_config.yaml"])
    unknown = set(data) - _keys("axolotl_keys.txt")
    assert not unknown  # axolotl drops unknown keys silently: each one would be a setting lost


@pytest.mark.parametrize("fields,layout", [
    (dict(model="qwen2.5-0.5b", method="qlora", batch=4, seq=1024, attn="eager"), {}),
    (dict(model="qwen2.5-0.5b", task="dpo", method="lora", batch=2, seq=512), {}),
    (dict(model="qwen2.5-0.5b", task="rm", precision="mixed-bf16", batch=2, seq=512), {}),
    (dict(model="llama-3.1-8b", batch=2, seq=2048, grad_accum=4), {"gpus": 8, "zero": 2}),
])
def test_llamafactory_export_uses_its_schema_keys_and_values(fields, layout):
    import yaml

    data = yaml.safe_load(render(Plan(**fields), layout, ["llamafactory"])["llamafactory_config.yaml"])
    assert not set(data) - _keys("llamafactory_keys.txt")  # LLaMA-Factory's parse_dict rejects unknown keys
    # and the values its Literal fields take (it checks them only when it runs)
    assert data["stage"] in ("pt", "sft", "rm", "ppo", "dpo", "kto")
    assert data["finetuning_type"] in ("lora", "oft", "freeze", "full")
    assert data["flash_attn"] in ("auto", "disabled", "sdpa", "fa2", "fa3")
    assert data.get("quantization_method", "bnb") == "bnb" and data.get("quantization_type", "nf4") in ("nf4", "fp4")


@pytest.mark.parametrize("name,text,message", [
    ("ds.json", '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}',
     "zero_optimization.offload_optimizer.device: 'nvme' is not modelled"),
    ("ds.json", '{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}',
     "zero_optimization.offload_param: parameters offloaded without the optimizer is not modelled"),
    ("a.yaml", "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 3\n"
               "  offload_optimizer_device: nvme\n", "deepspeed_config.offload_optimizer_device: 'nvme' is not modelled"),
    ("a.yaml", "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 3\n"
               "  offload_param_device: cpu\n",
     "deepspeed_config.offload_param_device: parameters offloaded without the optimizer is not modelled"),
])
def test_offload_that_is_not_modelled_is_an_error_in_either_format(tmp_path, name, text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        read_configs([_write(tmp_path, name, text)])


def test_offload_reads_the_same_from_deepspeed_and_accelerate(tmp_path):
    ds = _write(tmp_path, "ds.json", '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, '
                                     '"offload_param": {"device": "cpu"}}}')
    acc = _write(tmp_path, "a.yaml", "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n"
                                     "  zero_stage: 3\n  offload_optimizer_device: cpu\n  offload_param_device: cpu\n")
    assert read_configs([ds]).layout["offload"] == read_configs([acc]).layout["offload"] == "optimizer+params"
