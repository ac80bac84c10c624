"""The PPO clipped objective and GRPO's group-relative advantages on fixed tensors, against values
worked out by hand; and the RL techniques' bad input."""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.cli import main  # noqa: E402
from planner_plugins.rl import grpo_advantages, ppo_clipped_loss  # noqa: E402


def test_grpo_advantages_are_group_relative():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    adv = grpo_advantages(rewards, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 5, unbiased std sqrt(20/3)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(20 / 3)
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
                -3 / (s2 + 1e-4), -1 / (s2 + 1e-4), 1 / (s2 + 1e-4), 3 / (s2 + 1e-4)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert adv.view(2, 4).sum(dim=1).abs().max() < 1e-5  # zero mean within each group


def test_ppo_clipped_loss_takes_the_pessimistic_term():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([2.0, 1.0, -1.0, -3.0])
    # ratio*A vs clamp(ratio, 0.8, 1.2)*A, the minimum of each:
    # 1.5*2=3.0 vs 1.2*2=2.4 -> 2.4; 0.5*1=0.5 vs 0.8*1=0.8 -> 0.5;
    # 1.1*-1=-1.1 vs 1.1*-1=-1.1 -> -1.1; 0.7*-3=-2.1 vs 0.8*-3=-2.4 -> -2.4
    expected = -(2.4 + 0.5 - 1.1 - 2.4) / 4
    assert ppo_clipped_loss(new, old, adv).item() == pytest.approx(expected, rel=1e-6)
    assert ppo_clipped_loss(new, old, adv, eps=10.0).item() == pytest.approx(-(3.0 + 0.5 - 1.1 - 2.1) / 4, rel=1e-6)


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv,message", [
    (["--task", "grpo", "--group-size", "1"], "group_size: GRPO needs at least 2 completions per prompt"),
    (["--task", "ppo"], "reward_model: ppo needs --reward-model"),
    (["--task", "ppo", "--reward-model", "qwen-2.5-0.5b"], "reward_model: unknown model 'qwen-2.5-0.5b' (did you mean: qwen2.5-0.5b"),
    (["--task", "ppo", "--reward-model", "qwen2.5-0.5b", "--value-model", "lama-3.2-1b"], "value_model: unknown model"),
    (["--task", "dpo", "--ppo-epochs", "2"], "ppo_epochs: only applies with task ppo (task is dpo)"),
    (["--task", "dpo", "--group-size", "4"], "group_size: only applies with task grpo (task is dpo)"),
    (["--task", "distill", "--teacher", "lama"], "unknown model 'lama'"),
    (["--task", "distill", "--teacher", "llama-3.2-1b"], "teacher: llama-3.2-1b has a vocabulary of 128256 tokens"),
    (["--task", "distill"], "teacher: distill needs --teacher"),
])
def test_bad_alignment_input_is_one_line(argv, message):
    code, out, err = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", *argv])
    assert code == 2 and out == "", err
    assert message in err and len(err.strip().splitlines()) == 1
