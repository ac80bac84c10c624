"""What the time model prices beyond FLOPs and bytes: a matmul's operand layout, a kernel's own cost,
gradient checkpointing's calls and hooks; each as the engine lists it against the real program."""

from __future__ import annotations

import collections
import json

import pytest

from planner.engine.cost import price
from planner.engine.tape import Op, OpList, Sym
from planner.profiles import MATMUL_LAYOUTS, DeviceProfile, HostCosts, KernelCost, ProfileError, RateCurve, parse_profile

FLAT = RateCurve(points=((1.0, 1e9),))


def profile(**kw) -> DeviceProfile:
    base = dict(id="t", name="t", device="cpu", host_cpu="t", asynchronous=False, matmul={"fp32": FLAT},
                memory=FLAT, launch_s=0.0, host=HostCosts(op_s=0.0, view_s=0.0, module_s=0.0))
    return DeviceProfile(**{**base, **kw})


def device_s(ops: list[Op], p: DeviceProfile) -> float:
    return price(OpList(ops), 1, 1, p).device_s


def test_a_matmul_is_priced_on_its_layouts_curve_where_the_profile_has_one():
    slow = RateCurve(points=((1.0, 1e8),))
    p = profile(matmul_layouts={"fp32": {"grad_input": slow}})
    f = Sym(c=1e6)
    assert device_s([Op("matmul", "mm", f, dtype="fp32", layout="grad_input")], p) == pytest.approx(1e-2)
    # another layout, or none, keeps the dtype's curve
    assert device_s([Op("matmul", "mm", f, dtype="fp32", layout="linear")], p) == pytest.approx(1e-3)
    assert device_s([Op("matmul", "mm", f, dtype="fp32")], p) == pytest.approx(1e-3)


def test_a_linear_layers_matmul_is_priced_by_its_shape_where_the_profile_has_a_shape_model():
    import math

    from planner.profiles import MatmulShapes

    # 1 GFLOP/s at K >= 1024, half that at K <= 64 (log-linear between), whatever M and N
    shapes = MatmulShapes(log_rate=math.log(1e9), terms={"k": ((64.0, -math.log(2)), (1024.0, 0.0))})
    p = profile(matmul_shapes={"fp32": {"linear": shapes}})
    f = 2 * 8 * 64 * 128
    assert device_s([Op("matmul", "mm", Sym(c=f), dtype="fp32", layout="linear", dims=(64, 128))], p) == (
        pytest.approx(f / 5e8))
    assert device_s([Op("matmul", "mm", Sym(c=f), dtype="fp32", layout="linear", dims=(4096, 2))], p) == (
        pytest.approx(f / 1e9))
    mid = shapes.rate(8, 256, 1)  # halfway in log K: 2^-0.5
    assert mid == pytest.approx(1e9 / math.sqrt(2))
    # M from the FLOPs: a term in M*K sees the tokens
    by_input = MatmulShapes(log_rate=math.log(1e9), terms={"mk": ((100.0, -math.log(4)), (1e4, 0.0))})
    q = profile(matmul_shapes={"fp32": {"grad_input": by_input}})
    small, big = (Sym(c=2 * 1 * 100 * 10), Sym(c=2 * 100 * 100 * 10))
    assert device_s([Op("matmul", "mm", small, dtype="fp32", layout="grad_input", dims=(100, 10))], q) == (
        pytest.approx(2000 / 2.5e8))
    assert device_s([Op("matmul", "mm", big, dtype="fp32", layout="grad_input", dims=(100, 10))], q) == (
        pytest.approx(2e5 / 1e9))
    # no dims (not a Linear layer's), or another layout: the FLOPs curve
    assert device_s([Op("matmul", "mm", Sym(c=f), dtype="fp32", layout="linear")], p) == pytest.approx(f / 1e9)
    assert device_s([Op("matmul", "mm", Sym(c=f), dtype="fp32", layout="grad_weight", dims=(64, 128))], p) == (
        pytest.approx(f / 1e9))
    # the scales carry over
    assert p.with_device_scale(0.5).matmul_shapes["fp32"]["linear"].rate(8, 64, 128) == pytest.approx(2.5e8)
    assert p.with_dtype_scale("fp32", 2.0).matmul_shapes["fp32"]["linear"].rate(8, 64, 128) == pytest.approx(1e9)
    assert p.with_dtype_scale("bf16", 2.0).matmul_shapes["fp32"]["linear"].rate(8, 64, 128) == pytest.approx(5e8)


def test_an_sdpa_kernel_is_priced_by_its_pass_and_shape_where_the_profile_has_shape_models():
    import math

    from planner.profiles import MatmulShapes

    # forward: 1 GFLOP/s at head dim >= 64, half that at 16; decode a tenth of that; backward flat 0.25
    fwd = MatmulShapes(log_rate=math.log(1e9), terms={"k": ((16.0, -math.log(2)), (64.0, 0.0))})
    p = profile(attention_shapes={"fp32": {"forward": fwd, "decode": fwd.scaled(0.1),
                                           "backward": MatmulShapes(log_rate=math.log(2.5e8), terms={"k": ((16.0, 0.0),)})}})
    heads, seq, tokens = 4, 512, 1024  # B = 2

    def sdpa(dim: int, name: str = "_scaled_dot_product_flash_attention", queries: int = 0) -> Op:
        hd = heads * dim  # the engine's causal FLOPs: 2 x heads x dim x T x (S + 1) (planner.engine.layers)
        flops = Sym(q=4 * hd) if queries == 1 else Sym(t=2 * hd, q=2 * hd)
        return Op("attention", name, flops, dtype="fp32", dims=(dim, queries))

    def secs(op: Op, prof: DeviceProfile = p, t: float = tokens, s: float = seq) -> float:
        return price(OpList([op]), t, s, prof).device_s

    f16 = 2 * heads * 16 * tokens * (seq + 1)
    f64 = 4 * f16
    assert secs(sdpa(16)) == pytest.approx(f16 / 5e8)  # equal FLOPs per head dim priced apart
    assert secs(sdpa(64)) == pytest.approx(f64 / 1e9)
    backward = "_scaled_dot_product_flash_attention_backward"
    assert secs(sdpa(16, backward)) == pytest.approx(f16 / 2.5e8)
    # a decode step (one query row): the decode model, T = batch over S = the cache's length
    assert secs(sdpa(64, queries=1), t=2, s=300) == pytest.approx(4 * heads * 64 * 2 * 300 / 1e8)
    # the model's M: B x heads x (S + 1) query rows for a prefill, 2 x B x heads for a decode step
    m_rows = MatmulShapes(log_rate=math.log(1e9), terms={"m": ((4104.0, 0.0), (4104.0 * 4, math.log(2)))})
    q = profile(attention_shapes={"fp32": {"forward": m_rows}})
    assert secs(sdpa(64), q) == pytest.approx(f64 / 1e9)  # M = 2 x 4 x 513
    assert secs(sdpa(64), q, t=4 * tokens) == pytest.approx(4 * f64 / 2e9)
    # without a model of its pass or dtype, or without dims: the attention curves
    slow = RateCurve(points=((1.0, 1e8),))
    r = profile(attention={"fp32": slow}, attention_shapes={"fp32": {"forward": fwd}})
    assert secs(sdpa(16, backward), r) == pytest.approx(f16 / 1e8)
    assert secs(sdpa(16, queries=1), r, t=2, s=300) == pytest.approx(4 * heads * 16 * 2 * 300 / 1e8)
    assert secs(Op("attention", "_scaled_dot_product_flash_attention", Sym(t=2 * heads * 16, q=2 * heads * 16),
                   dtype="fp32"), r) == pytest.approx(f16 / 1e8)
    assert secs(Op("attention", "_scaled_dot_product_flash_attention", Sym(t=2 * heads * 16, q=2 * heads * 16),
                   dtype="bf16", dims=(16, 0)), r) == pytest.approx(f16 / 1e9)  # bf16: no curve, the matmul's
    # the scales carry over
    assert p.with_device_scale(0.5).attention_shapes["fp32"]["decode"].rate(8, 64, 1) == pytest.approx(5e7)
    assert p.with_dtype_scale("fp32", 2.0).attention_shapes["fp32"]["forward"].rate(8, 64, 1) == pytest.approx(2e9)
    assert p.with_dtype_scale("bf16", 2.0).attention_shapes["fp32"]["forward"].rate(8, 64, 1) == pytest.approx(1e9)


def test_the_engines_sdpa_ops_carry_their_head_dim_and_a_decode_steps_its_one_query_row():
    from planner.engine.program import generate_program, train_step_program
    from planner.models import load_model
    from planner.specs import Plan

    plan = Plan(model="llama-3.1-8b", task="sft", precision="bf16", batch=1, seq=512)
    spec = load_model(plan.model)
    prog = train_step_program(spec, plan)
    att = [op for part in prog.phases.values() for s in part for op in s.ops.ops if op.kind == "attention"]
    assert {op.name for op in att} == {"_scaled_dot_product_flash_attention",
                                       "_scaled_dot_product_flash_attention_backward"}
    assert {op.dims for op in att} == {(128, 0)}
    gen = generate_program(spec, plan.model_copy(update={"task": "generate"}))
    decode = [op for s in gen.phases["decode"] for op in s.ops.ops if op.kind == "attention"]
    prefill = [op for s in gen.phases["prefill"] for op in s.ops.ops if op.kind == "attention"]
    assert decode and {op.dims for op in decode} == {(128, 1)}
    assert prefill and {op.dims for op in prefill} == {(128, 0)}


def test_layout_curves_scale_with_device_scale_and_dtype_scale():
    p = profile(matmul_layouts={"fp32": {"linear": FLAT}})
    assert p.with_device_scale(0.5).matmul_curve("fp32", "linear").rate(10) == pytest.approx(5e8)
    assert p.with_dtype_scale("fp32", 0.25).matmul_curve("fp32", "linear").rate(10) == pytest.approx(2.5e8)
    assert p.with_dtype_scale("bf16", 0.25).matmul_curve("fp32", "linear").rate(10) == pytest.approx(1e9)


def test_a_measured_kernel_costs_fixed_plus_its_bytes_at_its_own_rate():
    slow = RateCurve(points=((1e3, 1e8), (1e7, 4e8)))
    p = profile(kernels={"_log_softmax.fp32": KernelCost(fixed_s=2e-6, rate=slow)})
    b = Sym(c=1e6)  # 1 ms at the memory curve
    assert device_s([Op("elementwise", "_log_softmax", bytes=b, dtype="fp32")], p) == pytest.approx(
        2e-6 + slow.seconds(1e6))
    # another kernel, or the same in another dtype, stays on the memory curve
    assert device_s([Op("elementwise", "add", bytes=b, dtype="fp32")], p) == pytest.approx(1e-3)
    assert device_s([Op("elementwise", "_log_softmax", bytes=b, dtype="bf16")], p) == pytest.approx(1e-3)
    # without a rate of its own (small calls only) its size is the memory curve's; an integer kernel is
    # measured under fp32's name (the recorder's dtype without a floating-point tensor)
    q = profile(kernels={"clone.fp32": KernelCost(fixed_s=1e-5)})
    assert device_s([Op("elementwise", "clone", bytes=b, dtype="int64")], q) == pytest.approx(1e-5 + 1e-3)


@pytest.mark.parametrize("bad, needle", [
    ({"matmul_layouts": {"fp32": {"grad_x": [[1, 1]]}}}, "unknown layout 'grad_x'"),
    ({"matmul_layouts": {"int8": {"linear": [[1, 1]]}}}, "unknown dtype 'int8'"),
    ({"kernels": {"mean": {"fixed_s": 0}}}, "keys are 'aten name.dtype'"),
    ({"kernels": {"mean.fp32": {"fixed_s": -1}}}, "kernels.mean.fp32.fixed_s"),
    ({"kernels": {"mean.fp32": {"fixed_s": 0, "rate": {"points": [[1, -1]]}}}}, "kernels.mean.fp32.rate"),
    ({"host": {"op_s": 0, "view_s": 0, "module_s": 0, "checkpoint_s": -1}}, "host.checkpoint_s"),
    ({"matmul_shapes": {"fp32": {"linear": {"log_rate": 20, "terms": {"kk": [[1, 0]]}}}}}, "unknown term 'kk'"),
    ({"matmul_shapes": {"fp32": {"linear": {"log_rate": 20, "terms": {"k": [[64, 0], [8, 1]]}}}}}, "ascending"),
    ({"matmul_shapes": {"fp32": {"grad": {"log_rate": 20, "terms": {"k": [[64, 0]]}}}}}, "unknown layout 'grad'"),
    ({"attention_shapes": {"fp32": {"prefill": {"log_rate": 20, "terms": {"k": [[64, 0]]}}}}}, "unknown pass 'prefill'"),
    ({"attention_shapes": {"int4": {"forward": {"log_rate": 20, "terms": {"k": [[64, 0]]}}}}}, "unknown dtype 'int4'"),
])
def test_bad_profile_fields_are_one_line_errors(bad, needle):
    data = json.loads(profile().model_dump_json())
    for k, v in bad.items():
        if k == "matmul_layouts":
            v = {d: {lay: {"points": pts} for lay, pts in cs.items()} for d, cs in v.items()}
        data[k] = v
    with pytest.raises(ProfileError) as e:
        parse_profile(data, "p.json")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("profile: p.json: ")


def test_fit_kernel_takes_the_fixed_part_from_small_calls_and_the_rate_from_large_ones():
    from planner.backends.calibrate import KERNEL_BIG, fit_kernel

    op_s, fixed = 3e-6, 5e-6
    rate = RateCurve(points=((1e5, 2e9), (1e7, 8e9)))
    sizes = (64, 512, 4096, 1e5, 1e6, 1e7)
    samples = [(b, op_s + fixed + (rate.seconds(b) if b >= KERNEL_BIG else 0.0)) for b in sizes]
    f, r = fit_kernel(samples, op_s)
    assert f == pytest.approx(fixed)
    for b in (1e5, 1e6, 1e7):
        assert r.seconds(b) == pytest.approx(rate.seconds(b), rel=1e-9)
    # small calls only: a fixed part and no rate (the memory curve sizes them); large only: fixed 0
    f, r = fit_kernel([(64, op_s + 4e-6), (128, op_s + 6e-6)], op_s)
    assert f == pytest.approx(5e-6) and r is None
    f, r = fit_kernel([(1e6, op_s + 1e-3)], op_s)
    assert f == 0 and r.rate(1e6) == pytest.approx(1e9)


def test_checkpointing_prices_one_call_and_three_hooks_per_saved_tensor(tmp_path):
    from planner.engine.program import train_step_program
    from planner.models import load_model
    from planner.specs import Plan

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plan = Plan(model=str(tmp_path / "config.json"), batch=2, seq=16, grad_ckpt=True)
    spec = load_model(plan.model)
    prog = train_step_program(spec, plan)
    calls: collections.Counter = collections.Counter()
    for ph in prog.phases.values():
        for s in ph:
            for name, n in s.ops.calls.items():
                calls[name] += n * s.repeat
    assert calls["checkpoint_s"] == 3
    assert calls["saved_hook_s"] > 0 and calls["saved_hook_s"] % 9 == 0  # 3 hooks x 3 layers x slots
    off = train_step_program(spec, plan.model_copy(update={"grad_ckpt": False}))
    assert not any(s.ops.calls.get("checkpoint_s") for ph in off.phases.values() for s in ph)


# ---- against the real program (torch) ------------------------------------------------------------
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False}

LAYOUT_CASES = {
    "sft full bf16": dict(seq=16),
    "sft lora": dict(seq=16, method="lora"),
    "sft lora checkpointing": dict(seq=16, method="lora", grad_ckpt=True),
    "sft fp32": dict(seq=16, precision="fp32"),
    "dpo": dict(task="dpo", seq=16),
}


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_engine_matmul_layouts_equal_the_programs(name, tmp_path):
    """Per operand layout and Linear shape, the matmuls of one steady step: the engine's tags against
    the layouts of the mm calls the real CPU program makes (their operands' strides, planner.backends.
    calibrate.matmul_layout) and the (in, out) their operands' shapes give (linear_dims)."""
    pytest.importorskip("torch", reason="torch is not installed (the backends extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the backends extra)")
    import torch

    from planner.backends.calibrate import count_ops
    from planner.backends.timing import run_step, timed_program
    from planner.engine.timing import _program
    from planner.models import load_model
    from planner.plugins import technique
    from planner.specs import Plan

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    plan = Plan(model=str(tmp_path / "config.json"), batch=2, **LAYOUT_CASES[name])
    tech = technique(plan.task)
    with timed_program(tech, plan, TINY) as ctx:
        run_step(tech, ctx, 0)
        ops, _, _ = count_ops(torch, lambda: run_step(tech, ctx, 1))
    real = collections.Counter((o.layout, o.dims) for o in ops if o.kind == "matmul")
    w = tech.workload(plan, load_model(plan.model))
    eng: collections.Counter = collections.Counter()
    for ph in w.phases:
        prog = _program(ph, w)
        for stretches in prog.phases.values():
            for s in stretches:
                for op in s.ops.ops:
                    if op.kind == "matmul":
                        eng[(op.layout, op.dims)] += op.count * s.repeat
    # and each a Linear layer's (in, out) as its operands' shapes give them (what matmul_shapes prices)
    assert eng == real and {lay for lay, _ in real} >= set(MATMUL_LAYOUTS)
    assert all(dims for lay, dims in real if lay)


def test_a_decode_step_builds_one_attention_plan_and_training_none(tmp_path):
    """attention_plan_s: once per decode step (its key length is new), whatever the layers; nothing
    in a training step, whose shapes repeat."""
    from planner.engine.timing import step_time
    from planner.models import load_model
    from planner.plugins import technique
    from planner.specs import Plan

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = str(tmp_path / "config.json")
    base = profile(matmul={"bf16": FLAT, "fp32": FLAT})
    built = base.model_copy(update={"host": base.host.model_copy(update={"attention_plan_s": 0.5})})
    for new_tokens in (2, 9):
        plan = Plan(model=model, task="generate", batch=2, prompt_len=8, new_tokens=new_tokens)
        wl = technique("generate").workload(plan, load_model(model))
        gap = step_time(wl, built).total_s - step_time(wl, base).total_s
        assert gap == pytest.approx(0.5 * (new_tokens - 1))
    train = technique("sft").workload(Plan(model=model, batch=2, seq=16), load_model(model))
    assert step_time(train, built).total_s == step_time(train, base).total_s


def test_eager_attention_matmuls_equal_the_programs(tmp_path):
    """Eager attention's batched matmuls (q k^T and probs v, over every (query, key) pair, and their
    backward's): the engine's matmul FLOPs of one step equal those of the mm/bmm calls the real CPU
    program makes (the Linear layers' and the head's included)."""
    pytest.importorskip("torch", reason="torch is not installed (the backends extra)")
    pytest.importorskip("transformers", reason="transformers is not installed (the backends extra)")
    import torch

    from planner.backends.calibrate import count_ops
    from planner.backends.timing import run_step, timed_program
    from planner.engine.timing import _program
    from planner.models import load_model
    from planner.plugins import technique
    from planner.specs import Plan

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    plan = Plan(model=str(tmp_path / "config.json"), batch=2, seq=16, attn="eager")
    tech = technique(plan.task)
    with timed_program(tech, plan, TINY) as ctx:
        run_step(tech, ctx, 0)
        ops, _, _ = count_ops(torch, lambda: run_step(tech, ctx, 1))
    real = sum(o.flops for o in ops if o.kind == "matmul")
    w = tech.workload(plan, load_model(plan.model))
    eng = 0.0
    for ph in w.phases:
        T, S = ph.batch * ph.seq, ph.seq
        for stretches in _program(ph, w).phases.values():
            for s in stretches:
                t = ph.batch if s.per_sequence else T
                eng += sum(op.count * s.repeat * (op.flops.c + op.flops.t * t + op.flops.q * t * S)
                           for op in s.ops.ops if op.kind == "matmul")
    assert eng == pytest.approx(real, rel=1e-9)


def test_a_reference_scored_with_the_adapters_off_pays_peft_disable_adapter():
    """TRL's DPO with LoRA scores its reference by the policy inside peft's disable_adapter(): its cost
    (host.disable_adapter_s per LoRA layer, on and off) is priced once per such forward, nowhere else."""
    from planner.engine.timing import step_time
    from planner.models import load_model
    from planner.plugins import technique
    from planner.specs import Plan

    model = load_model("llama-3.2-1b")
    lora = Plan(model="llama-3.2-1b", task="dpo", method="lora", batch=1, seq=64)  # all-linear: 7 a layer
    full = Plan(model="llama-3.2-1b", task="dpo", batch=1, seq=64)
    base = profile()
    costly = profile(host=HostCosts(op_s=0.0, view_s=0.0, module_s=0.0, disable_adapter_s=1e-3))
    for plan, per_step in ((lora, 1e-3 * 7 * model.num_layers), (full, 0.0)):
        w = technique("dpo").workload(plan, model)
        extra = step_time(w, costly).total_s - step_time(w, base).total_s
        assert extra == pytest.approx(per_step, abs=1e-12), plan.method


def test_module_calls_of_a_forward_with_the_adapters_off_follow_peft(tmp_path):
    """With disable_adapter() each lora.Linear runs its wrapper and its base layer (2 module calls, was
    counted 3: cfg.loras holds each LoRA under its path and its name); the engine's change in module
    calls from adapters on to off equals the real program's (forward pre-hooks on every module)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from planner.backends.step_programs import llama_config, write_config
    from planner.engine.program import forward_program
    from planner.models import load_model
    from planner.specs import Plan

    raw = llama_config(2, 64, heads=4, kv_heads=2)
    path = write_config(tmp_path, "llama-2x64", raw)
    from planner.backends.dryrun._build import hf_config

    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(hf_config(raw, use_cache=False)),
                             peft.LoraConfig(r=8, target_modules="all-linear"))
    calls = collections.Counter()
    for m in pm.modules():
        m.register_forward_pre_hook(lambda *a: calls.update(["call"]))
    ids = torch.randint(0, 100, (2, 16))
    real = {}
    for adapters in (True, False):
        calls.clear()
        with torch.no_grad():
            if adapters:
                pm(input_ids=ids, use_cache=False)
            else:
                with pm.disable_adapter():
                    pm(input_ids=ids, use_cache=False)
        real[adapters] = calls["call"]
    spec = load_model(path)
    plan = Plan(model=path, task="dpo", method="lora", batch=2, seq=16)
    engine = {a: sum(s.ops.modules * s.repeat for st in forward_program(spec, plan, "score", adapters=a).phases.values()
                     for s in st) for a in (True, False)}
    assert engine[False] - engine[True] == real[False] - real[True] == -2 * 7 * 3  # 3 fewer calls a LoRA Linear


ACCUM_PLANS = {
    "sft": dict(model="llama-3.1-8b", batch=1, seq=2048),
    "sft lora ckpt": dict(model="llama-3.1-8b", batch=4, seq=1024, method="lora", grad_ckpt=True),
    "rm": dict(model="qwen2.5-0.5b", task="rm", batch=2, seq=1024),
    "dpo": dict(model="qwen2.5-0.5b", task="dpo", batch=2, seq=1024, reference_pass="before"),
    "distill": dict(model="qwen2.5-0.5b", task="distill", teacher="qwen2.5-1.5b", batch=2, seq=512),
}


@pytest.mark.parametrize("name", list(ACCUM_PLANS))
def test_gradient_accumulation_runs_every_phase_per_micro_batch_and_the_optimizer_once(name):
    """A step of k micro-batches: its time grows by the same amount per micro-batch added (each runs
    the forward, loss and backward; the later ones add into .grad where the first stores it), the
    optimizer step is priced once, and it trains k times the tokens at k times the FLOPs."""
    from planner.engine.devices import profile_for
    from planner.engine.timing import step_flops, step_time, tokens_per_step
    from planner.gpus import resolve_gpu
    from planner.models import load_model
    from planner.plugins import technique
    from planner.specs import Plan

    prof = profile_for(resolve_gpu("h200", None), None)

    def at(k: int):
        plan = Plan(gpu="h200", grad_accum=k, **ACCUM_PLANS[name])
        w = technique(plan.task).workload(plan, load_model(plan.model))
        return w, step_time(w, prof)

    (w1, t1), (_, t2), (_, t3), (w4, t4) = at(1), at(2), at(3), at(4)
    per_micro = t3.total_s - t2.total_s  # one more later micro-batch (and its loss / grad_accum)
    assert per_micro > 0.5 * t1.total_s
    assert t4.total_s - t3.total_s == pytest.approx(per_micro, rel=1e-6)
    assert t2.total_s - t1.total_s == pytest.approx(per_micro, rel=0.05)  # the first stores .grad, the rest add
    train = next(ph.name for ph in w1.phases if ph.kind == "train_step")
    assert t4.phases[train].parts["optimizer"] == pytest.approx(t1.phases[train].parts["optimizer"], rel=1e-9)
    for part in ("forward", "backward"):
        assert t4.phases[train].parts[part] > 3.9 * t1.phases[train].parts[part]
    assert tokens_per_step(w4) == 4 * tokens_per_step(w1)
    assert step_flops(w4)[0] == pytest.approx(4 * step_flops(w1)[0])


def test_gradient_accumulation_memory_holds_the_gradients_through_the_later_micro_batches():
    """A full fine-tune's later micro-batch runs its forward and backward with every .grad held: the
    peak rises by no more than the gradients (and the previous micro-batch's logits), and a LoRA step's
    barely moves (its gradients are the adapters')."""
    from planner.engine import estimate
    from planner.models import load_model
    from planner.specs import Plan

    m = load_model("llama-3.2-1b")
    one = estimate(Plan(model="llama-3.2-1b", batch=4, seq=2048), m)
    acc = estimate(Plan(model="llama-3.2-1b", batch=4, seq=2048, grad_accum=4), m)
    grads = acc.breakdown["gradients"]
    assert grads > 2e9  # 1.24B bf16 gradients
    assert one.peak_allocated_bytes < acc.peak_allocated_bytes <= one.peak_allocated_bytes + grads + 4 * 2048 * 128256 * 2
    assert acc.peak_phase in ("forward", "loss", "backward")
    lora = dict(model="llama-3.2-1b", batch=4, seq=2048, method="lora")
    l1, l4 = estimate(Plan(**lora), m), estimate(Plan(**lora, grad_accum=4), m)
    assert 0 <= l4.peak_allocated_bytes - l1.peak_allocated_bytes < 0.02 * l1.peak_allocated_bytes + 4 * 2048 * 128256 * 2


@pytest.mark.parametrize("model", ["gpt2", "opt-350m", "llama-3.2-1b", "qwen2.5-0.5b"])
def test_a_training_programs_forward_flops_are_the_models_count(model):
    """Every family's program prices its attention: the forward's matmul and SDPA FLOPs equal the
    model's count (planner.engine.compute; GPT-2's fused c_attn went unpriced before)."""
    from planner.engine import compute
    from planner.engine.program import train_step_program
    from planner.models import load_model
    from planner.specs import Plan

    plan = Plan(model=model, task="sft", precision="bf16", batch=1, seq=1024)
    spec = load_model(model)
    prog = train_step_program(spec, plan)
    fwd = sum(v * s.repeat for s in prog.phases["forward"] for v in s.ops.flops(1024, 1024).values())
    assert fwd == pytest.approx(compute.micro_batch_flops(spec, 1024, 1024, causal=True).forward, rel=1e-9)
    assert any(op.kind == "attention" for s in prog.phases["forward"] for op in s.ops.ops)
