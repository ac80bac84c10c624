"""Suggestions: each one re-estimated here with the real engine, so a claim to fit is checked."""

from __future__ import annotations

import pytest

from planner.api import fit
from planner.engine import estimate
from planner.gpus import load_gpu
from planner.models import load_model
from planner.specs import Plan
from planner.suggest import Suggestion, suggest

# Full fine-tuning of an 8B model on a 24 GiB card: far too big, many changes help.
TRAIN = dict(model="llama-3.1-8b", gpu="rtx-4090", method="full", batch=8, seq=4096, attn="eager")
# 70B generation with a long prompt and a big batch on an 80 GiB card.
GENERATE = dict(model="llama-3.1-70b", gpu="a100-80gb", method="qlora", task="generate", batch=64, prompt_len=8192, new_tokens=1024)


def suggestions_for(**fields) -> tuple[Plan, list[Suggestion], int]:
    plan = Plan(**fields)
    gpu = load_gpu(plan.gpu)
    model = load_model(plan.model)
    return plan, suggest(plan, model, gpu.memory_bytes, estimate=lambda p, m: estimate(p, m, gpu)), gpu.memory_bytes


def _gpu(plan: Plan):
    return load_gpu(plan.gpu) if plan.gpu else None


def device(plan: Plan) -> int:
    return estimate(plan, load_model(plan.model), _gpu(plan)).device_bytes


def check_claims(suggestions: list[Suggestion], capacity: int) -> None:
    for s in suggestions:
        est = estimate(s.plan, load_model(s.plan.model), _gpu(s.plan))
        assert est.device_bytes == s.device_bytes, s.change
        assert est.peak_allocated_bytes == s.peak_allocated_bytes, s.change
        assert s.fits == (est.device_bytes <= capacity), s.change


def test_training_plan_that_does_not_fit():
    plan, sugg, cap = suggestions_for(**TRAIN)
    assert device(plan) > cap
    assert sugg
    check_claims(sugg, cap)
    base = device(plan)
    assert all(s.device_bytes < base for s in sugg), "every suggestion lowers the estimate"
    changes = [s.change for s in sugg]
    # every single flag change that lowers the estimate is offered, and none that does not
    singles = {
        "--attn sdpa": {"attn": "sdpa"},
        "--grad-ckpt": {"grad_ckpt": True},
        "--optimizer adamw-8bit": {"optimizer": "adamw-8bit"},
        "--method lora": {"method": "lora"},
        "--method qlora": {"method": "qlora"},
    }
    for change, update in singles.items():
        lower = device(Plan(**{**plan.model_dump(), **update})) < base
        assert (change in changes) == lower, change
    assert any(c.startswith("--batch") for c in changes) and any(c.startswith("--seq") for c in changes)


def test_fitting_suggestions_come_first_smallest_change_first():
    _, sugg, _ = suggestions_for(**TRAIN)
    fits = [s.fits for s in sugg]
    assert fits == sorted(fits, reverse=True)
    for group in (True, False):
        ranks = [s.rank for s in sugg if s.fits is group]
        assert ranks == sorted(ranks)


def test_each_suggestion_is_one_change():
    plan, sugg, _ = suggestions_for(**TRAIN)
    for s in sugg:
        if s.combined:  # only when no single change fits
            continue
        changed = {k for k, v in s.plan.model_dump().items() if getattr(plan, k) != v}
        assert changed and changed <= {"batch", "grad_accum"} or len(changed) == 1, (s.change, changed)


def test_batch_suggestion_keeps_the_global_batch_and_is_the_largest_that_fits():
    plan, sugg, cap = suggestions_for(model="llama-3.2-1b", gpu="rtx-4090", batch=16, seq=2048, grad_accum=2)
    assert device(plan) > cap
    s = next(s for s in sugg if s.change.startswith("--batch"))
    assert s.plan.batch * s.plan.grad_accum == plan.batch * plan.grad_accum
    assert s.change == f"--batch {s.plan.batch} --grad-accum {s.plan.grad_accum}"
    assert s.plan.batch < plan.batch
    if s.fits:
        total = plan.batch * plan.grad_accum
        larger = [d for d in range(s.plan.batch + 1, plan.batch) if total % d == 0]
        if larger:
            bigger = Plan(**{**plan.model_dump(), "batch": larger[0], "grad_accum": total // larger[0]})
            assert device(bigger) > cap
    else:
        assert s.plan.batch == 1


def test_sequence_suggestion_is_the_largest_found_that_fits():
    plan, sugg, cap = suggestions_for(model="llama-3.2-1b", gpu="rtx-4090", batch=4, seq=16384)
    s = next(s for s in sugg if s.change.startswith("--seq"))
    new = s.plan.seq
    assert s.change == f"--seq {new}" and new < plan.seq
    if s.fits:
        # it lies between the halving that fits and the one before it, which does not
        twice = Plan(**{**plan.model_dump(), "seq": 2 * new})
        assert 2 * new >= plan.seq or device(twice) > cap


def test_changes_already_made_are_not_suggested():
    _, sugg, _ = suggestions_for(**{**TRAIN, "attn": "sdpa", "grad_ckpt": True, "optimizer": "adamw-8bit"})
    changes = [s.change for s in sugg]
    assert not any(c.startswith(("--attn", "--grad-ckpt", "--optimizer")) for c in changes)


def test_qlora_suggested_for_lora_but_not_lora_again():
    plan, sugg, _ = suggestions_for(**{**TRAIN, "method": "lora", "batch": 1, "seq": 1024})
    changes = [s.change for s in sugg]
    assert "--method lora" not in changes
    qlora_lower = device(Plan(**{**plan.model_dump(), "method": "qlora"})) < device(plan)
    assert ("--method qlora" in changes) == qlora_lower


def test_generation_suggestions():
    plan, sugg, cap = suggestions_for(**GENERATE)
    assert device(plan) > cap
    check_claims(sugg, cap)
    changes = {s.change.split()[0] for s in sugg}
    assert {"--batch", "--new-tokens", "--prompt-len"} <= changes
    assert not changes & {"--grad-ckpt", "--optimizer", "--seq"}
    b = next(s for s in sugg if s.change.startswith("--batch"))
    assert b.change == f"--batch {b.plan.batch}"
    if b.fits and b.plan.batch + 1 < plan.batch:
        assert device(Plan(**{**plan.model_dump(), "batch": b.plan.batch + 1})) > cap


def test_combined_suggestion_when_no_single_change_fits():
    plan, sugg, cap = suggestions_for(model="llama-3.1-8b", gpu="t4", batch=16, seq=8192, precision="fp32")
    single = [s for s in sugg if not s.combined]
    assert single and not any(s.fits for s in single)
    combined = [s for s in sugg if s.combined]
    assert len(combined) == 1 and combined[0].fits
    assert combined[0] is sugg[0]
    assert len(combined[0].change.split("--")) > 2
    check_claims(combined, cap)


def test_fit_returns_suggestions_only_when_it_does_not_fit():
    small = fit(Plan(model="qwen2.5-0.5b", gpu="h200", seq=512))
    assert small.fits and small.suggestions == []
    plan = Plan(**TRAIN)
    big = fit(plan)
    assert not big.fits and big.suggestions
    assert big.headroom_bytes == big.gpu.memory_bytes - big.memory.device_bytes < 0
    # the plan is traced (eager attention included): each suggestion's figure is what fit says of it
    # alone where it was simulated (the plan's trace shape), else its estimate with reserved scaled by
    # the plan's simulated-to-estimated ratio (planner.simulated)
    assert big.allocator is not None
    ratio = big.allocator.reserved_bytes / estimate(plan, load_model(plan.model), big.gpu).reserved_bytes
    context = big.gpu.cuda_context_bytes
    assert any(s.simulated for s in big.suggestions) and any(not s.simulated for s in big.suggestions)
    for s in big.suggestions:
        est = estimate(s.plan, load_model(s.plan.model), big.gpu)
        assert est.peak_allocated_bytes == s.peak_allocated_bytes, s.change
        if s.simulated:
            alone = fit(s.plan, with_suggestions=False)
            assert (s.device_bytes, s.fits) == (alone.memory.device_bytes, alone.fits), s.change
        else:
            assert s.device_bytes == int(est.reserved_bytes * ratio) + context, s.change
            assert s.fits == (s.device_bytes <= big.gpu.memory_bytes), s.change


def test_fp16_suggested_on_cards_without_bf16():
    plan = Plan(model="llama-3.2-1b", gpu="t4", precision="fp32", batch=8, seq=4096)
    gpu = load_gpu("t4")
    sugg = suggest(plan, load_model(plan.model), gpu.memory_bytes, estimate=estimate, bf16_supported=False)
    changes = [s.change for s in sugg]
    assert "--precision fp16" in changes and "--precision bf16" not in changes


@pytest.mark.parametrize("capacity_gib", [1, 4, 16])
def test_claims_hold_at_several_capacities(capacity_gib):
    plan = Plan(model="llama-3.2-1b", gpu_memory=capacity_gib * 2**30, batch=8, seq=4096)
    sugg = suggest(plan, load_model(plan.model), capacity_gib * 2**30, estimate=estimate)
    check_claims(sugg, capacity_gib * 2**30)
