"""Plans from YAML files and flags: key spellings, overrides, and one-line errors."""

from __future__ import annotations

import pytest

from planner.errors import PlanError
from planner.plan_io import build_plan, load_plan_file, plan_from_file, validation_message
from planner.specs import PRECISIONS, Plan
from planner.units import GiB


def write(tmp_path, text, name="plan.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_keys_with_underscores_or_dashes(tmp_path):
    p = write(
        tmp_path,
        "model: llama-3.1-8b\ngpu: a100-80gb\nmethod: qlora\ngrad-ckpt: true\nlora-rank: 8\n"
        "lora_targets: [q_proj, v_proj]\ngpu-memory: 40GiB\n",
    )
    plan, given = plan_from_file(p)
    assert plan.method == "qlora" and plan.grad_ckpt is True and plan.lora_rank == 8
    assert plan.lora_targets == "q_proj,v_proj"
    assert plan.gpu_memory == 40 * GiB
    assert given == {"model", "gpu", "method", "grad_ckpt", "lora_rank", "lora_targets", "gpu_memory"}


def test_flags_override_the_file(tmp_path):
    p = write(tmp_path, "model: llama-3.1-8b\ngpu: a100-80gb\nbatch: 8\nseq: 4096\n")
    plan, given = plan_from_file(p, {"batch": 2, "seq": None, "gpu": "h200"})
    assert plan.batch == 2  # flag wins
    assert plan.seq == 4096  # flag not given (None): the file's value stays
    assert plan.gpu == "h200"
    assert "seq" in given and "batch" in given


def test_only_given_values_count(tmp_path):
    plan, given = build_plan(None, {"model": "m", "gpu": "h200", "batch": None, "lora_rank": None})
    assert given == {"model", "gpu"}
    assert plan.batch == Plan.model_fields["batch"].default


def test_unknown_key_names_it_with_close_matches(tmp_path):
    p = write(tmp_path, "model: llama-3.1-8b\nlora_rnk: 8\n")
    with pytest.raises(PlanError) as e:
        load_plan_file(p)
    assert str(e.value) == f"{p}: unknown key 'lora_rnk' (did you mean: lora_rank?)"


def test_unknown_key_without_a_close_match(tmp_path):
    p = write(tmp_path, "model: x\nzzzz: 1\n")
    with pytest.raises(PlanError, match=r"unknown key 'zzzz'$"):
        load_plan_file(p)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model: [unclosed\n", "invalid YAML at line"),
        ("- just\n- a list\n", "must be a mapping"),
        ("model: x\nmodel: y\nmodel_: z\n", "unknown key 'model_'"),
        ("model: x\nbatch: 1\nbatch: 2\n", None),  # YAML itself keeps the last duplicate
    ],
)
def test_bad_yaml_is_one_line(tmp_path, text, fragment):
    p = write(tmp_path, text)
    if fragment is None:
        assert load_plan_file(p)["batch"] == 2
        return
    with pytest.raises(PlanError) as e:
        load_plan_file(p)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(p))


def test_same_key_spelled_two_ways(tmp_path):
    p = write(tmp_path, "model: x\ngrad_ckpt: true\ngrad-ckpt: false\n")
    with pytest.raises(PlanError, match="given twice"):
        load_plan_file(p)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(PlanError, match="no such file"):
        load_plan_file(tmp_path / "nope.yaml")
    with pytest.raises(PlanError, match="is a directory"):
        load_plan_file(tmp_path)


def test_empty_file_is_an_empty_plan(tmp_path):
    assert load_plan_file(write(tmp_path, "")) == {}
    with pytest.raises(PlanError, match=r"^model: give --model"):
        plan_from_file(write(tmp_path, "# nothing\n", "empty.yaml"))


def test_precision_error_lists_the_allowed_values():
    with pytest.raises(PlanError) as e:
        build_plan(None, {"model": "m", "precision": "bf32"})
    assert str(e.value) == f"precision: must be one of {', '.join(PRECISIONS)} (got 'bf32')"


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"batch": 0}, "batch: must be > 0 (got 0)"),
        ({"batch": -3}, "batch: must be > 0 (got -3)"),
        ({"seq": 0}, "seq: must be > 0 (got 0)"),
        ({"grad_accum": 0}, "grad_accum: must be > 0 (got 0)"),
        ({"method": "lora", "lora_rank": 0}, "lora_rank: must be > 0 (got 0)"),
        ({"method": "lora", "lora_dropout": 1.5}, "lora_dropout: must be < 1.0 (got 1.5)"),
        ({"task": "generate", "new_tokens": 0}, "new_tokens: must be > 0 (got 0)"),
        ({"batch": "four"}, "batch: must be a whole number (got 'four')"),
        ({"batch": 2.5}, "batch: must be a whole number (got 2.5)"),
        ({"grad_ckpt": "maybe"}, "grad_ckpt: must be true or false (got 'maybe')"),
        ({"method": "qlra"}, "method: must be one of full, lora, qlora (got 'qlra')"),
        ({"gpu_memory": "24G"}, "gpu_memory: ambiguous size unit in '24G': write 24GiB (2^30) or 24GB (10^9)"),
        ({"gpu_memory": 0}, "gpu_memory: size must be > 0 (got 0)"),
    ],
)
def test_invalid_values_are_one_line(flags, message):
    with pytest.raises(PlanError) as e:
        build_plan(None, {"model": "m", **flags})
    assert str(e.value) == message


def test_several_errors_in_one_line():
    with pytest.raises(PlanError) as e:
        build_plan(None, {"model": "m", "batch": 0, "seq": 0})
    assert str(e.value) == "batch: must be > 0 (got 0); seq: must be > 0 (got 0)"


@pytest.mark.parametrize(
    "flags, field",
    [
        ({"lora_rank": 8}, "lora_rank"),
        ({"lora_alpha": 16}, "lora_alpha"),
        ({"lora_targets": "q_proj"}, "lora_targets"),
        ({"quant": "fp4"}, "quant"),
        ({"double_quant": False}, "double_quant"),
        ({"method": "lora", "kbit_prep": False}, "kbit_prep"),
        ({"prompt_len": 100}, "prompt_len"),
        ({"task": "generate", "seq": 100}, "seq"),
        ({"task": "generate", "grad_ckpt": True}, "grad_ckpt"),
    ],
)
def test_options_that_do_not_apply_are_rejected(flags, field):
    with pytest.raises(PlanError) as e:
        build_plan(None, {"model": "m", **flags})
    assert str(e.value).startswith(f"{field}: only applies with")


def test_lora_option_from_the_file_with_method_full_from_a_flag(tmp_path):
    p = write(tmp_path, "model: m\nmethod: lora\nlora_rank: 8\n")
    assert plan_from_file(p)[0].lora_rank == 8
    with pytest.raises(PlanError, match="^lora_rank: only applies with method lora or qlora"):
        plan_from_file(p, {"method": "full"})


def test_validation_message_direct():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        Plan(model="m", attn="flash")
    assert validation_message(e.value) == "attn: must be one of sdpa, eager (got 'flash')"
    with pytest.raises(ValidationError) as e:
        Plan(model="m", lora_targets=" , ")
    assert validation_message(e.value).startswith("lora_targets: give 'all-linear'")
