"""The dry run's allocation trace (planner/backends/dryrun/_tracker.py) on tiny configs: fake
tensors trace what real tensors trace, the trace's books agree with the tracker's, and the set-up
is recorded in the order the real build allocates. Seconds each."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra)")
pytest.importorskip("peft", reason="peft is not installed (the backends extra)")

from planner.backends.dryrun._run import dry_run_impl  # noqa: E402
from planner.engine.allocator import replay  # noqa: E402
from planner.specs import Plan  # noqa: E402

from test_dryrun import LLAMA, QWEN2  # noqa: E402

MiB = 1 << 20


def _plan(**kw) -> Plan:
    return Plan(**{"model": "tiny", "batch": 1, "seq": 64, **kw})


def canonical(trace: list[tuple]) -> list[tuple]:
    """Ids renumbered in allocation order; each run of frees between two other events sorted (the
    order in which Python drops several references at once is not the program's)."""
    ids: dict[int, int] = {}
    out: list[tuple] = []
    run: list[tuple] = []
    for e in trace:
        if e[0] == "f":
            run.append(("f", ids.get(e[1], -1)))
            continue
        out += sorted(run)
        run = []
        if e[0] == "a":
            ids[e[1]] = len(ids)
            out.append(("a", ids[e[1]], e[2], e[3]))
        else:
            out.append(e)
    return out + sorted(run)


CASES = [
    ("llama", {}),
    ("llama", {"grad_ckpt": True}),
    ("llama", {"method": "lora", "lora_rank": 4}),
    ("qwen2", {"grad_ckpt": True}),
    ("qwen2", {"precision": "mixed-bf16"}),
]
CONFIGS = {"llama": dict(LLAMA, tie_word_embeddings=True), "qwen2": QWEN2}


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_fake_trace_equals_real_trace(arch, kw):
    fake = dry_run_impl(_plan(**kw), CONFIGS[arch], steps=2, device="fake", trace={})
    real = dry_run_impl(_plan(**kw), CONFIGS[arch], steps=2, device="cpu", trace={})
    assert canonical(fake.allocation_trace) == canonical(real.allocation_trace)


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_trace_books_agree_with_the_tracker(arch, kw):
    """Every tiny tensor lands in the small pool, split to its 512-byte rounding: the replay's peak
    allocated is the tracker's peak, and what stays allocated at the end is what the trace never
    freed."""
    r = dry_run_impl(_plan(**kw), CONFIGS[arch], steps=2, device="fake", trace={})
    trace = r.allocation_trace
    rep = replay(trace)
    assert rep.peak_allocated_bytes == r.peak_allocated_bytes
    freed = {e[1] for e in trace if e[0] == "f"}
    live = sum(-(-e[2] // 512) * 512 for e in trace if e[0] == "a" and e[1] not in freed)
    assert rep.allocated_end_bytes == live
    assert ("reset",) in trace
    phases = [e[1] for e in trace if e[0] == "phase"]
    assert phases[0] == "reset" and "0.forward" in phases and "1.optimizer" in phases


def test_setup_order_is_the_builds():
    """Base parameters and buffers in registration order, then the untied lm_head weight the build
    allocates and frees when it ties, then the adapters."""
    cfg = CONFIGS["llama"]
    r = dry_run_impl(_plan(method="lora", lora_rank=4), cfg, steps=1, device="fake", trace={})
    trace = r.allocation_trace
    setup = trace[: trace.index(("phase", "reset"))]
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    sizes = [e[2] for e in setup if e[0] == "a"]
    first = sizes[0]
    assert first == vocab * hidden * 2  # the bf16 embedding comes first
    # the only set-up block freed in the set-up: allocated, then freed at once
    untied = [i for i, e in enumerate(setup) if e[0] == "a" and i + 1 < len(setup) and setup[i + 1] == ("f", e[1])]
    assert len(untied) == 1 and sum(1 for e in setup if e[0] == "f") == 1
    assert setup[untied[0]][2] == first
    # the adapters (rank 4) come after the tie: every allocation after it is a LoRA matrix
    after = [e[2] for e in setup[untied[0] + 2:] if e[0] == "a"]
    assert after and all(s <= 4 * max(hidden, cfg["intermediate_size"]) * 4 for s in after)


def test_workspaces_enter_the_trace_once_per_thread():
    ws = {"forward": 32 * MiB, "backward": 32 * MiB}
    r = dry_run_impl(_plan(), CONFIGS["llama"], steps=2, device="fake", trace={"workspaces": ws})
    big = [e for e in r.allocation_trace if e[0] == "a" and e[2] == 32 * MiB]
    assert len(big) == 2
    reset = r.allocation_trace.index(("reset",))
    assert all(r.allocation_trace.index(e) > reset for e in big)  # made by the first matmuls
    warm = dry_run_impl(_plan(), CONFIGS["llama"], steps=2, device="fake",
                        trace={"workspaces": ws, "workspaces_before_setup": True})
    big = [i for i, e in enumerate(warm.allocation_trace) if e[0] == "a" and e[2] == 32 * MiB]
    assert big == [0, 1]  # a process that already ran matmuls: allocated before the model


def test_gradient_accumulations_run_in_place(monkeypatch):
    """autograd adds a tensor's gradients out of place under a dispatch mode and in place on a
    GPU (input_buffer.cpp): in the tied tiny Llama every backward add is such an accumulation
    (residual merges, norm inputs, the tied embedding), and none of them gets a block of its own."""
    from planner.backends.dryrun import _tracker

    orig = _tracker.DryRunTracker.__torch_dispatch__
    seen: dict = {"adds": 0}

    def dispatch(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add.Tensor and self._mod_tracker.is_bw and not torch.is_grad_enabled():
            seen["adds"] += 1
        seen["tracker"] = self
        return orig(self, func, types, args, kwargs)

    monkeypatch.setattr(_tracker.DryRunTracker, "__torch_dispatch__", dispatch)
    r = dry_run_impl(_plan(), CONFIGS["llama"], steps=1, device="cpu", trace={})
    assert seen["adds"] > 0
    assert seen["tracker"].accumulations_in_place == seen["adds"]
    rep = replay(r.allocation_trace)
    assert rep.peak_allocated_bytes <= r.peak_allocated_bytes


def test_kernel_workspace_sizes():
    """The internal allocations traced per op (kernel_workspaces.py), from their formulas."""
    from planner.backends.dryrun.kernel_workspaces import kernel_workspaces, sdpa_backend_for

    B, H, Hkv, S, D = 2, 32, 8, 300, 64
    q = torch.empty(B, H, S, D, dtype=torch.bfloat16, device="meta")
    k = torch.empty(B, Hkv, S, D, dtype=torch.bfloat16, device="meta")
    args = (q, q, k, k, q, torch.empty(B, H, S, device="meta"), 0.0, True)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    assert kernel_workspaces("cudnn")(op, args) == [B * H * S * D * 4 + B * H * S * 4]
    s128 = 384  # 300 rounded up to 128
    assert kernel_workspaces("flash")(op, args) == [B * s128 * H * D * 4, B * H * s128 * 4, B * S * H * D * 2,
                                                    B * S * H * D * 2]
    emb = torch.ops.aten.embedding_dense_backward.default
    grad = torch.empty(4, 2048, 896, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(4, 2048, dtype=torch.long, device="meta")
    n = 4 * 2048
    assert kernel_workspaces()(emb, (grad, ids, 151936, -1, False)) == [(n // 10 + n) * 896 * 4]
    small = torch.empty(1, 512, dtype=torch.long, device="meta")
    assert kernel_workspaces()(emb, (grad[:1, :512], small, 151936, -1, False)) == []
    assert kernel_workspaces()(torch.ops.aten.mm.default, (q, q)) == []
    assert sdpa_backend_for("9.0") == "cudnn" and sdpa_backend_for("8.0") == "flash" and sdpa_backend_for(None) == "flash"


def test_kernel_workspaces_are_freed_at_once():
    r = dry_run_impl(_plan(), CONFIGS["llama"], steps=1, device="fake", trace={"sdpa_backend": "flash"})
    t = r.allocation_trace
    plain = dry_run_impl(_plan(), CONFIGS["llama"], steps=1, device="fake", trace={}).allocation_trace
    extra = len(t) - len(plain)
    assert extra > 0 and extra % 2 == 0  # each workspace: an allocation and its free
    assert replay(t).peak_allocated_bytes >= replay(plain).peak_allocated_bytes


def test_a_step_releases_what_it_kept():
    """Each step's `out` goes when the step ends (as a step written as a function): the next step
    starts without the previous logits."""
    cfg = CONFIGS["llama"]
    plan = _plan()
    r = dry_run_impl(plan, cfg, steps=2, device="fake", trace={})
    trace = r.allocation_trace
    end_0 = trace.index(("phase", "0.between_steps"))
    start_1 = trace.index(("phase", "1.forward"))
    logits = plan.batch * plan.seq * cfg["vocab_size"] * 2
    held = replay(trace[:end_0]).allocated_end_bytes
    after = replay(trace[:start_1]).allocated_end_bytes
    assert held - after >= logits


def test_empty_cache_between_phases_enters_the_trace(tmp_path):
    """A step that calls `ctx.empty_cache()` (as RL trainers do between generation and training):
    the traced backends record it, and the simulated allocator returns the wholly free segments."""
    import dataclasses

    from planner.backends.tracked import run_tracked
    from planner.plugins import technique

    sft = technique("sft")

    def step_then_empty(ctx):
        sft.step(ctx)
        ctx.release()
        ctx.empty_cache()

    import json

    tech = dataclasses.replace(sft, step=step_then_empty)
    cfg = dict(CONFIGS["llama"], architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plan = Plan(model=str(tmp_path), batch=2, seq=128)
    m = run_tracked(tech, plan, cfg, steps=2, device="fake", trace={})
    trace = m.allocation_trace
    assert trace.count(("empty_cache",)) == 2
    at = trace.index(("empty_cache",))
    before = replay(trace[:at])
    after = replay(trace[: at + 1])
    assert after.reserved_end_bytes < before.reserved_end_bytes
    assert after.allocated_end_bytes == before.allocated_end_bytes
