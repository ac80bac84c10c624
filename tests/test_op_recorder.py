"""The aten op recorder (planner.backends.dryrun.ops) and real CPU step timing
(planner.backends.timing) on tiny configs: kinds, FLOPs against torch's FlopCounterMode, bytes,
fake and real runs giving the same op list, memory figures unchanged by recording, and the timed
program being the recorded one. Seconds each."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("peft", reason="peft is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.backends import run_backend  # noqa: E402
from planner.backends.dryrun.ops import OP_KINDS, OpRecorder, kind_counts, op_kind  # noqa: E402
from planner.backends.measurement import Measurement, OpSummary  # noqa: E402
from planner.backends.timing import record_steps, time_steps  # noqa: E402
from planner.backends.tracked import run_tracked  # noqa: E402
from planner.models import model_config  # noqa: E402
from planner.plugins import technique  # noqa: E402
from planner.specs import Plan  # noqa: E402

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
GPT2 = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 1000, "n_embd": 64, "n_layer": 2,
    "n_head": 4, "n_positions": 256, "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, cfg in (("llama", LLAMA), ("gpt2", GPT2)):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        paths[name] = str(d)
    return paths


def _plan(path, **kw) -> Plan:
    base = {"task": "sft", "batch": 2, "seq": 32}
    if kw.get("task") == "generate":
        base = {"batch": 2}
    return Plan(model=path, **{**base, **kw})


def _run(plan, device, record_ops=True, steps=2) -> Measurement:
    return run_tracked(technique(plan.task), plan, model_config(plan.model), steps=steps, device=device,
                       record_ops=record_ops)


def _ops(summary: OpSummary) -> dict:
    """Everything of a summary but its notes (which say fake or real)."""
    d = summary.model_dump()
    d.pop("notes")
    return d


# -------------------------------------------------------------------------------------------
# kinds
# -------------------------------------------------------------------------------------------
VIEWS = [
    "aten.view.default", "aten._unsafe_view.default", "aten._reshape_alias.default", "aten.t.default",
    "aten.transpose.int", "aten.permute.default", "aten.expand.default", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int", "aten.narrow.default", "aten.split.Tensor",
    "aten.split_with_sizes.default", "aten.unbind.int", "aten.chunk.default", "aten.diagonal.default",
    "aten.detach.default", "aten.alias.default", "aten.as_strided.default", "aten.lift_fresh.default",
    "aten.view_as_real.default", "aten.view_as_complex.default", "aten.unfold.default", "aten.t_.default",
    "aten.transpose_.default", "aten.unsqueeze_.default", "aten.detach_.default",
]
NOT_VIEWS = {
    "aten.add_.Tensor": "elementwise", "aten.copy_.default": "elementwise", "aten.clone.default": "elementwise",
    "aten._to_copy.default": "elementwise", "aten.cat.default": "elementwise", "aten.embedding.default": "elementwise",
    "aten._log_softmax.default": "elementwise", "aten.nll_loss_forward.default": "elementwise",
    "aten.empty.memory_format": "elementwise", "aten.zeros.default": "elementwise", "aten.fill_.Scalar": "elementwise",
    "aten.view_copy.default": "elementwise", "aten.lift_fresh_copy.default": "elementwise",
    "aten.index.Tensor": "elementwise", "aten.mm.default": "matmul", "aten.addmm.default": "matmul",
    "aten.bmm.default": "matmul", "aten.baddbmm.default": "matmul", "aten.addmv.default": "matmul",
    "aten.mv.default": "matmul", "aten.dot.default": "matmul", "aten._int_mm.default": "matmul",
    "aten.linear.default": "matmul", "aten.addmm.out": "matmul",
    "aten._scaled_dot_product_flash_attention_for_cpu.default": "attention",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": "attention",
    "aten._scaled_dot_product_efficient_attention.default": "attention",
    "aten._flash_attention_backward.default": "attention", "aten._efficient_attention_forward.default": "attention",
    "aten._foreach_add_.List": "foreach", "aten._foreach_sqrt.default": "foreach",
    "aten._local_scalar_dense.default": "sync", "aten.nonzero.default": "sync", "aten.equal.default": "sync",
    "aten.masked_select.default": "sync", "profiler._record_function_enter_new.default": "other",
    "profiler._record_function_exit._RecordFunction": "other",
}


def test_view_classification_sample():
    """Views are read from torch's schemas (an output aliases an input, nothing is written, or
    the op is an in-place view), not from a list: a sample of both sides."""
    for name in VIEWS:
        assert op_kind(name) == "view", name
    for name, kind in NOT_VIEWS.items():
        assert op_kind(name) == kind, name
    # index is a sync only with a boolean index (the host must read how many are true)
    x = torch.zeros(4)
    assert op_kind("aten.index.Tensor", (x, [torch.tensor([0, 1])])) == "elementwise"
    assert op_kind("aten.index.Tensor", (x, [x > 0])) == "sync"
    assert set(OP_KINDS) >= {"matmul", "attention", "elementwise", "foreach", "view", "sync", "other"}


def test_flops_and_bytes_of_single_ops():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    xs = [torch.randn(3), torch.randn(5)]
    q = torch.randn(1, 2, 6, 4)
    k = torch.randn(1, 2, 6, 4, requires_grad=True)
    with OpRecorder() as rec:
        c = a @ b
        a.add_(1)
        a.view(32)
        torch._foreach_mul_(xs, 2.0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
        out.sum().backward()
    by = {r.name: r for r in rec.records}
    mm = by["aten.mm.default"]
    assert (mm.kind, mm.flops, mm.bytes_read, mm.bytes_written) == ("matmul", 2 * 4 * 8 * 16, (32 + 128) * 4, 64 * 4)
    assert mm.dtype == "float32" and mm.in_shapes == ((4, 8), (8, 16)) and mm.out_shapes == ((4, 16),)
    add = by["aten.add_.Tensor"]  # reads self (and the 0-dim other), writes self once
    assert add.kind == "elementwise" and add.bytes_written == 32 * 4
    view = by["aten.view.default"]
    assert (view.kind, view.bytes_read, view.bytes_written) == ("view", 0, 0)
    fe = by["aten._foreach_mul_.Scalar"]  # returns nothing: the written list comes from the schema
    assert (fe.kind, fe.bytes_read, fe.bytes_written) == ("foreach", 8 * 4, 8 * 4)
    fwd = by["aten._scaled_dot_product_flash_attention_for_cpu.default"]
    bwd = by["aten._scaled_dot_product_flash_attention_for_cpu_backward.default"]
    assert fwd.flops == 4 * 1 * 2 * 4 * (6 * 7 // 2)  # causal: S(S+1)/2 pairs
    assert bwd.flops == fwd.flops * 5 // 2
    assert c.shape == (4, 16)


# -------------------------------------------------------------------------------------------
# the program's ops: FLOPs, phases, fake = real, memory unchanged
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matmul_flops_equal_flop_counter(tiny, arch):
    """The recorder's matmul FLOPs of a full sft step are FlopCounterMode's on the same program
    (CPU SDPA has no formula there: attention is ours alone)."""
    from torch.utils.flop_counter import FlopCounterMode

    plan = _plan(tiny[arch])
    with FlopCounterMode(display=False) as fc:
        m = _run(plan, "fake", steps=1)
    counted = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    matmul = sum(v for k, v in counted.items() if op_kind(k) == "matmul")
    assert matmul and m.ops.total.kinds["matmul"].flops == matmul
    # forward: 2 x tokens x the linear layers' weights (gpt2: Conv1D's addmm; llama: mm)
    assert "matmul" not in m.ops.phases["loss"].kinds  # the head's matmul runs before the loss phase
    fwd = m.ops.phases["forward"].kinds["matmul"].flops
    bwd = m.ops.phases["backward"].kinds["matmul"].flops
    tokens = plan.batch * plan.seq
    if arch == "llama":
        h, i, v, kv = 64, 128, 1000, 2 * 16
        linear = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i) + h * v
        assert fwd == 2 * tokens * linear  # (transformers 5.24's rotary frequencies: a mul, not a matmul)
        assert bwd == 2 * fwd  # grad input + grad weight of every linear
        att = m.ops.total.kinds["attention"]
        per_layer_fwd = 4 * plan.batch * 4 * 16 * (plan.seq * (plan.seq + 1) // 2)
        assert att.count == 4 and att.flops == 2 * per_layer_fwd * 7 // 2  # 2 layers x (1 + 2.5)


def test_phase_split(tiny):
    m = _run(_plan(tiny["llama"]), "cpu")
    s = m.ops
    assert s.step == 1 and s.steps == [0, 1] and len(s.per_step) == 2
    assert list(s.phases) == ["setup", "forward", "loss", "backward", "optimizer"]
    fw, bw, opt = (kind_counts(s, p) for p in ("forward", "backward", "optimizer"))
    assert fw["matmul"] == 15 and bw["matmul"] == 30  # 7 linears x 2 layers + lm_head; 2 grads each
    assert fw["attention"] == 2 and bw["attention"] == 2
    assert "foreach" not in fw and "foreach" not in bw and opt["foreach"] > 0 and "matmul" not in opt
    # AdamW foreach keeps its step counters on the host on CUDA: one read per parameter and
    # bias correction, the counters' increment and its scalar are host ops, no synchronisation
    params = 2 * 9 + 3
    assert opt["host"] == 2 * params + 2 and "sync" not in opt
    assert s.phases["setup"].ops == {"aten.randint.low": 1}  # ctx.token_ids, before the forward phase
    matmuls = sum(p.kinds["matmul"].count for p in s.phases.values() if "matmul" in p.kinds)
    assert matmuls == s.total.kinds["matmul"].count
    # the first step creates AdamW's states (zeros, step counters): more ops than the steady one
    assert s.per_step[0]["host"].count > s.per_step[1]["host"].count


CASES = {
    "sft": dict(),
    "sft-lora": dict(method="lora", lora_rank=4),
    "generate": dict(task="generate", prompt_len=16, new_tokens=5),
    "dpo": dict(task="dpo"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_and_real_record_the_same_ops_and_memory_is_unchanged(tiny, case):
    plan = _plan(tiny["llama"], **CASES[case])
    fake = _run(plan, "fake")
    real = _run(plan, "cpu")
    assert _ops(fake.ops) == _ops(real.ops)
    assert fake.ops.total.kinds["matmul"].count > 0 and fake.ops.total.kinds["attention"].count > 0
    if case in ("sft", "dpo", "generate"):  # memory with the recorder (and generate's full decode) = without
        plain = _run(plan, "fake", record_ops=False)
        assert plain.ops is None
        for field in ("peak_allocated_bytes", "breakdown", "details", "phases", "peak_phase"):
            assert getattr(fake, field) == getattr(plain, field), field
    if case == "generate":
        assert list(fake.ops.phases) == ["setup", "prefill", "decode"]
        # every decode forward ran the model: 4 decode steps x (7 linears x 2 layers + lm_head)
        assert fake.ops.phases["decode"].kinds["matmul"].count == 4 * 15


def test_fused_logprobs_record_the_cuda_gemm_on_fake_tensors_only(tiny):
    """TRL's fused LM head (dpo --logprobs fused): its Triton tiles are invisible kernels in both
    runs; its gradient GEMM `addmm(..., out_dtype=float32, out=acc)` is CUDA's path, run on fake
    tensors only (on real ones TRL's torch fold runs with the modes off): the one difference."""
    plan = _plan(tiny["llama"], task="dpo", logprobs="fused")
    fake, real = _run(plan, "fake").ops.total.ops, _run(plan, "cpu").ops.total.ops
    assert {k for k in set(fake) | set(real) if fake.get(k) != real.get(k)} == {"aten.addmm.dtype_out"}
    assert "aten.addmm.dtype_out" not in real


def test_gpt2_fake_equals_real(tiny):
    plan = _plan(tiny["gpt2"])
    assert _ops(_run(plan, "fake").ops) == _ops(_run(plan, "cpu").ops)


def test_run_backend_record_ops_is_json(tiny):
    m = run_backend("dry-run", _plan(tiny["llama"]), "fake", steps=1, record_ops=True)
    doc = json.loads(m.model_dump_json())
    assert doc["ops"]["total"]["kinds"]["matmul"]["count"] == 45
    assert run_backend("dry-run", _plan(tiny["llama"]), "fake", steps=1).ops is None


# -------------------------------------------------------------------------------------------
# real CPU step timing
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sft", "generate"])
def test_time_steps_runs_the_recorded_program(tiny, case):
    plan = _plan(tiny["llama"], **CASES[case])
    tech = technique(plan.task)
    times = time_steps(tech, plan, model_config(plan.model), steps=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)
    # the timing path (no tracker, only the recorder) dispatches the tracked run's ops
    timed = record_steps(tech, plan, model_config(plan.model), steps=2).summary()
    tracked = _run(plan, "cpu").ops
    assert _ops(timed) == _ops(tracked)
