"""`planner calibrate`: the quick CPU calibration gives a valid, sane profile; the CLI writes it (and
nothing on bad input); `--from-steps` recovers known parameters from a synthetic predict function;
bad CSVs and bad profiles are one-line errors."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import sys
import types

import tempfile

import pytest

from planner.cli import main
from planner.profiles import DeviceProfile, HostCosts, MatmulShapes, ProfileError, RateCurve, load_profile, parse_profile

torch = pytest.importorskip("torch")

from planner.backends import calibrate as cal  # noqa: E402


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def assert_bad(code, out, err, *needles):
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("planner: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def quick():
    # one torch thread, as every timed figure of the time validation: with torch's default (two here),
    # any other process on a 2-core machine makes OpenMP threads wait on each other (a 36 us loss call
    # measured 2.9-3.9 ms so)
    return cal.run_calibration("cpu", quick=True, threads=1)


# ---- the calibration --------------------------------------------------------------------------------
def test_quick_calibration_is_a_valid_profile(quick):
    p = quick.profile
    assert isinstance(p, DeviceProfile)
    assert p.device == "cpu" and p.asynchronous is False and p.launch_s == 0.0
    assert p.id.startswith("cpu-") and p.host_cpu and p.name
    assert set(p.matmul) == {"fp32", "bf16"} and set(p.attention) == {"fp32", "bf16"}
    # the backward SDPA curves and the in-place memory curve are measured, not left to their defaults
    assert set(p.attention_backward) == {"fp32", "bf16"} and p.memory_inplace is not None
    assert p.memory_curve(True) is p.memory_inplace and p.memory_curve(True) != p.memory
    assert p.foreach_per_tensor is True  # the CPU's _foreach_* ops run one kernel per tensor
    # SDPA's shape models: each dtype's three passes, fitted to the sweep's shapes
    assert {dt: set(ms) for dt, ms in p.attention_shapes.items()} == {
        dt: {"forward", "decode", "backward"} for dt in ("fp32", "bf16")}
    prefill, decode, backward = cal.attention_shapes(cal.settings("cpu", True))
    for dt, ms in p.attention_shapes.items():
        assert [ms[ps].points for ps in ("forward", "decode", "backward")] == [len(prefill), len(decode), len(backward)]
        assert all(mo.rate(64, 64, 64) > 0 and math.isfinite(mo.rate(64, 64, 64)) for mo in ms.values())
    # JSON round trip through the loader's parser
    again = parse_profile(json.loads(json.dumps(p.model_dump(mode="json"))), "round trip")
    assert again == p


def test_curves_ascend_and_rates_are_positive(quick):
    p = quick.profile
    for curve in [*p.matmul.values(), *p.attention.values(), *p.attention_backward.values(), p.memory,
                  p.memory_inplace]:
        sizes = [s for s, _ in curve.points]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
        assert all(r > 0 and math.isfinite(r) for _, r in curve.points)
        assert len(curve.points) >= 2
    # the memory sweeps span KB to MB
    for curve in (p.memory, p.memory_inplace):
        assert curve.points[0][0] < 1e4 and curve.points[-1][0] > 1e6
    # the backward curves span the forward sweep's sizes (in the backward's FLOPs, 2.5x the forward's)
    for dt in ("fp32", "bf16"):
        fwd, bwd = p.attention[dt].points, p.attention_backward[dt].points
        assert len(bwd) >= 2 and bwd[0][0] <= 2.5 * fwd[0][0] * 1.01 and bwd[-1][0] >= 2.5 * fwd[-1][0] * 0.99


def test_host_costs_are_positive_and_plausible(quick):
    h = quick.profile.host
    for v in (h.op_s, h.view_s, h.module_s, h.sync_s):
        assert 0 < v < 1e-3
    assert 0 <= h.optimizer_tensor_s < 1e-2


def test_call_host_costs_are_measured(quick):
    """backward_call_s (a backward() call), optimizer_step_s (a step() + zero_grad()) and loss_s (a
    loss function call) come from the micro-benchmarks, each with its source; the first two are tens
    of microseconds of Python on any CPU, the loss's Python can be a few (>= 0)."""
    p = quick.profile
    h = p.host
    # backward_call_s is the intercept of a two-length slope, floored at 0: on a loaded machine the noise
    # can take it there (a fresh-clone CI beside another test suite, 2026-12-08: 0.0), so only its range
    # is behaviour, not its size
    assert 0 <= h.backward_call_s < 1e-3, h.backward_call_s
    assert 1e-6 < h.optimizer_step_s < 5e-3, h.optimizer_step_s
    assert 0 <= h.loss_s < 1e-3, h.loss_s
    src = p.sources
    assert "backward()" in src["host.backward_call_s"] and "chain" in src["host.backward_call_s"]
    assert "zero_grad(set_to_none=True)" in src["host.optimizer_step_s"]
    assert "zero_grad(set_to_none=True)" in src["host.optimizer_tensor_s"]
    assert "one kernel per tensor" in src["host.optimizer_step_s"]
    assert "ForCausalLMLoss" in src["host.loss_s"] and "grad_op_s" in src["host.loss_s"]
    assert "True on the CPU" in src["foreach_per_tensor"]


def test_attention_backward_and_inplace_sources(quick):
    src = quick.profile.sources
    for dt in ("fp32", "bf16"):
        s = src[f"attention_backward.{dt}"]
        assert "torch.autograd.grad" in s and "2.5x the forward" in s and "backward_call_s" in s
        assert "_scaled_dot_product_flash_attention_for_cpu_backward" in s and "spread" in s
    inplace = src["memory_inplace"]
    assert "add_" in inplace and "mul_" in inplace and "in place" in inplace
    assert "into new tensors" in src["memory"]
    for dt in ("fp32", "bf16"):  # the three layouts, each with its median rate
        s = src[f"matmul.{dt}"]
        assert "grad[M,N].mm(w[N,K])" in s and "grad.t()[N,M].mm(x[M,K])" in s
        assert "grad input" in s and "grad weight" in s and "x the forward's" in s


def test_autograd_host_costs_are_measured_and_positive(quick):
    """grad_op_s and backward_op_s are measured (not left to default to op_s); grad_op_s >= op_s is
    not guaranteed on a noisy machine: only that they are positive and sane."""
    h = quick.profile.host
    assert h.grad_op_s is not None and h.backward_op_s is not None
    assert 0 < h.grad_op_s < 1e-3 and 0 < h.backward_op_s < 1e-3
    assert h.op_cost("grad") == h.grad_op_s and h.op_cost("backward") == h.backward_op_s
    src = quick.profile.sources
    assert "requires grad" in src["host.grad_op_s"] and "TorchDispatchMode" in src["host.backward_op_s"]


# the step fit reproduces its own calibration programs within this (a shared 2-core machine: the
# quick calibration takes 2 rounds per program)
STEP_FIT_MEDIAN, STEP_FIT_WORST = 0.25, 0.6


def test_step_fit_reproduces_its_calibration_programs(quick):
    fit = quick.step_fit
    assert fit is not None and fit.fit is not None
    p = quick.profile
    assert p.host.layer_s > 0 or p.host.model_s > 0
    assert "host.generate_call_s" in cal.STEP_FIT
    for name in cal.step_fit_params("quick"):
        assert name in p.sources and "calibration programs" in p.sources[name], name
        assert cal.get_param(p, name) >= 0
    # the quick programs hold nothing compute-bound: the dtype scales are not fitted on them
    for name in ("dtype_scale.fp32", "dtype_scale.bf16"):
        assert name in cal.STEP_FIT and name not in cal.step_fit_params("quick") and name not in fit.fit.params
    assert p.device_scale == 1.0 and not p.dtype_scale
    assert "calibration forward" in p.sources["step fit"] and "generate" in p.sources["step fit"]
    # two generate programs with other numbers of new tokens (generate_call_s apart from generate_step_s)
    gens = [c for c in fit.cases if c.plan.task == "generate"]
    assert len({c.plan.new_tokens for c in gens}) == 2
    # residuals: one per calibration program, measured / predicted - 1, the same as the fit's rows
    assert set(p.residuals) == {c.label for c in fit.cases} and len(fit.cases) >= 5
    for r in fit.fit.rows:
        assert p.residuals[r.label] == pytest.approx(r.measured / r.predicted - 1)
        assert r.measured > 0 and r.predicted > 0
    assert fit.fit.median_abs_error < STEP_FIT_MEDIAN and fit.fit.worst_abs_error < STEP_FIT_WORST
    # the floors: a fitted module_s or backward_op_s is never below what the micro-benchmarks measured
    assert p.host.module_s > 0 and p.host.backward_op_s > 0
    assert p.id.startswith("cpu-") and "-fit" not in p.id


def test_step_fit_recovers_known_host_costs(quick, monkeypatch, tmp_path):
    """The fit on synthetic measurements (the calibration programs priced by a profile with known
    fixed_scale, backward_op_s, layer_s, model_s, generate_step_s, generate_call_s and the dtype scales)
    recovers them: each program's samples are spread around its time as this machine's two speed modes
    spread them (two fast, one slow; neither the quietest nor the median is the time), and the fit
    takes each program's mean."""
    from planner.backends import step_programs

    truth = {"fixed_scale": 1.8, "host.backward_op_s": 6e-6, "host.layer_s": 150e-6, "host.model_s": 700e-6, "host.generate_step_s": 200e-6,
             "host.generate_call_s": 1.5e-3, "dtype_scale.fp32": 0.8, "dtype_scale.bf16": 0.9}
    assert set(truth) == set(cal.STEP_FIT)
    micro = cal.with_params(quick.profile, {"host.backward_op_s": 2e-6, "host.layer_s": 0.0, "host.model_s": 0.0,
                                            "host.generate_step_s": 0.0, "host.generate_call_s": 0.0})
    known = cal.with_params(micro, truth)

    def fake_time_cases(cases, rounds, threads=1, progress=None, stage=""):
        for i, c in enumerate(cases):
            t = step_programs.predict(c, known).total_s
            k = 0.02 * (i % 5)
            c.samples = [t * (0.7 - k), t * 0.8, t * (1.5 + k)]  # mean t: two samples in the fast mode, one slow
        return cases

    monkeypatch.setattr(step_programs, "time_cases", fake_time_cases)
    fit = cal.fit_host_to_steps(micro, rounds=1, which="full")
    assert fit.fit.worst_abs_error < 1e-3  # relative residual; the parameters are checked to 1% below
    for name, v in truth.items():
        assert cal.get_param(fit.profile, name) == pytest.approx(v, rel=1e-2), name
    # a figure the fit would put below its micro-benchmark floor is held there
    floor = cal.with_params(micro, {"host.module_s": 20e-6})
    held = cal.fit_host_to_steps(floor, rounds=1, which="full", params=(*cal.STEP_FIT, "host.module_s"))
    assert held.profile.host.module_s == pytest.approx(20e-6)
    assert "held at 20 us, its floor" in held.profile.sources["host.module_s"]
    assert "host.module_s" not in held.fit.params


def test_step_fit_holds_fixed_scale_at_one(quick, monkeypatch):
    """fixed_scale's floor is 1 whatever the profile held: programs whose ops cost less than the hot
    loops' fixed figures (here 0.5x) get fixed_scale 1, held, and the other parameters fitted."""
    from planner.backends import step_programs

    known = cal.with_params(quick.profile, {"fixed_scale": 0.5, "host.layer_s": 150e-6})
    start = cal.with_params(quick.profile, {"fixed_scale": 0.3})

    def fake_time_cases(cases, rounds, threads=1, progress=None, stage=""):
        for c in cases:
            c.samples = [step_programs.predict(c, known).total_s] * rounds
        return cases

    monkeypatch.setattr(step_programs, "time_cases", fake_time_cases)
    fit = cal.fit_host_to_steps(start, rounds=1, which="quick", params=("fixed_scale", "host.layer_s"))
    assert fit.profile.fixed_scale == 1.0 and "fixed_scale" not in fit.fit.params
    assert "held at 1, its floor" in fit.profile.sources["fixed_scale"]
    assert fit.profile.host.layer_s < 150e-6  # it takes what the lower fixed costs leave


def test_device_scale_scales_every_curve_and_the_device_time(quick):
    p = quick.profile
    half = cal.with_params(p, {"device_scale": 0.5})
    assert half.device_scale == 0.5 and cal.get_param(half, "device_scale") == 0.5
    for dt, c in p.matmul.items():
        assert half.matmul[dt].rate(1e7) == pytest.approx(0.5 * c.rate(1e7))
    for dt, c in p.attention_backward.items():
        assert half.attention_backward[dt].rate(1e7) == pytest.approx(0.5 * c.rate(1e7))
    assert half.memory.rate(1e6) == pytest.approx(0.5 * p.memory.rate(1e6))
    for dt in ("fp32", "bf16"):
        assert half.memory_curve(False, dt).rate(1e6) == pytest.approx(0.5 * p.memory_curve(False, dt).rate(1e6))
        assert half.memory_curve(True, dt).rate(1e6) == pytest.approx(0.5 * p.memory_curve(True, dt).rate(1e6))
    assert half.memory_curve(True).rate(1e6) == pytest.approx(0.5 * p.memory_curve(True).rate(1e6))
    # relative to the current scale: back to 1 gives the original curves
    back = cal.with_params(half, {"device_scale": 1.0})
    assert back.memory.rate(1e6) == pytest.approx(p.memory.rate(1e6))
    assert half.host == p.host
    # a step's device time doubles, its host time stays
    from planner.backends import step_programs

    with tempfile.TemporaryDirectory() as root:
        case = cal.calibration_cases(root, "full")[-1]
        a, b = step_programs.predict(case, p), step_programs.predict(case, half)
    assert b.compute_s == pytest.approx(2 * a.compute_s, rel=0.05)


def test_memory_curves_by_dtype_come_from_the_sweeps_kinds_of_that_dtype(quick):
    p = quick.profile
    assert set(p.memory_by_dtype) == {"fp32", "bf16"} and set(p.memory_inplace_by_dtype) == {"fp32", "bf16"}
    assert p.memory_curve(False, "bf16") is p.memory_by_dtype["bf16"]
    assert p.memory_curve(True, "fp32") is p.memory_inplace_by_dtype["fp32"]
    assert p.memory_curve(False, "fp16") is p.memory and p.memory_curve(True) is p.memory_inplace  # no own curve
    assert "add bf16" in p.sources["memory_by_dtype"] and "add_ bf16" in p.sources["memory_inplace_by_dtype"]


def test_an_elementwise_op_is_priced_on_its_dtypes_memory_curve():
    from planner.engine.cost import OpList, price
    from planner.engine.tape import Sym

    slow, fast = RateCurve(points=((1.0, 1e9),)), RateCurve(points=((1.0, 4e9),))
    p = base_profile().model_copy(update={"memory": fast, "memory_by_dtype": {"bf16": slow},
                                          "memory_inplace_by_dtype": {"bf16": slow}})

    def device(name, dtype):
        ops = OpList()
        ops.add("elementwise", name, bytes=Sym(c=1e6), dtype=dtype)
        return price(ops, 1.0, 1.0, p, mode="nograd").device_s

    assert device("add", "bf16") == pytest.approx(1e6 / 1e9) and device("add", "fp32") == pytest.approx(1e6 / 4e9)
    assert device("add_", "bf16") == pytest.approx(1e6 / 1e9)
    assert device("add_", "fp32") == pytest.approx(1e6 / 4e9)  # no memory_inplace: memory's
    pr = cal.Prices.of(p)
    for name, dt in (("add", "bf16"), ("add", "fp32"), ("add_", "bf16")):
        assert pr.op(cal.Op(name, "kernel", bytes=1e6, dtype=dt))[1] == pytest.approx(device(name, dt)), (name, dt)


def test_dtype_scale_scales_that_dtypes_curves_only(quick):
    p = quick.profile
    half = cal.with_params(p, {"dtype_scale.bf16": 0.5})
    assert half.dtype_scale == {"bf16": 0.5} and cal.get_param(half, "dtype_scale.bf16") == 0.5
    assert cal.get_param(half, "dtype_scale.fp32") == 1.0  # a dtype left out reads as its default
    for table in ("matmul", "attention", "attention_backward"):
        before, after = getattr(p, table), getattr(half, table)
        assert after["bf16"].rate(1e7) == pytest.approx(0.5 * before["bf16"].rate(1e7)), table
        assert after["fp32"] == before["fp32"], table
    assert half.memory == p.memory and half.device_scale == p.device_scale
    back = cal.with_params(half, {"dtype_scale.bf16": 1.0})  # relative to the current factor
    assert back.matmul["bf16"].rate(1e7) == pytest.approx(p.matmul["bf16"].rate(1e7))
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        p.with_dtype_scale("int3", 1.0)


def test_matmul_fixed_cost_adds_to_every_matmul_of_its_dtype(quick):
    """matmul_fixed_s[dtype]: device seconds each matmul of that dtype takes beyond FLOPs / rate (times
    the profile's fixed_scale, as every per-op fixed cost), in the engine and in Prices alike; other
    dtypes and other kinds of op are priced as before."""
    from planner.engine.cost import OpList, price
    from planner.engine.tape import Sym

    p = quick.profile
    fixed = cal.with_params(p, {"matmul_fixed_s.bf16": 1e-3})
    assert fixed.matmul_fixed_s == {"bf16": 1e-3} and cal.get_param(fixed, "matmul_fixed_s.bf16") == 1e-3
    assert cal.get_param(fixed, "matmul_fixed_s.fp32") == 0.0
    assert {"dtype_scale.bf16", "matmul_fixed_s.fp32"} <= set(cal.float_paths())

    def device(profile, kind, dtype, flops=3e7):
        ops = OpList()
        ops.add(kind, "mm" if kind == "matmul" else "add", flops=Sym(c=flops), bytes=Sym(c=1e5), dtype=dtype)
        return price(ops, 1.0, 1.0, profile, mode="nograd").device_s

    fs = p.fixed_scale
    assert device(fixed, "matmul", "bf16") == pytest.approx(device(p, "matmul", "bf16") + 1e-3 * fs, rel=1e-9)
    assert device(fixed, "matmul", "fp32") == device(p, "matmul", "fp32")
    assert device(fixed, "elementwise", "bf16", flops=0.0) == device(p, "elementwise", "bf16", flops=0.0)
    for dt in ("bf16", "fp32"):  # Prices, what the calibration takes off its measurements, agrees
        _, d = cal.Prices.of(fixed).op(cal.Op("mm", "matmul", flops=3e7, bytes=1e5, dtype=dt))
        assert d == pytest.approx(device(fixed, "matmul", dt), rel=1e-9), dt
    # a step's device time grows by (its bf16 matmuls) x the fixed cost (one large enough that no
    # matmul stays bound by its bytes)
    from planner.backends import step_programs

    huge = cal.with_params(p, {"matmul_fixed_s.bf16": 1.0})
    with tempfile.TemporaryDirectory() as root:
        case = cal.calibration_cases(root, "full")[-1]  # the medium bf16 sft step
        assert case.plan.precision == "bf16"
        n = bf16_matmuls(case)
        a, b = step_programs.predict(case, p), step_programs.predict(case, huge)
    assert n > 10
    assert b.compute_s - a.compute_s == pytest.approx(n * 1.0 * fs, rel=1e-3)


def bf16_matmuls(case) -> int:
    """The bf16 matmul kernels (with FLOPs) of the engine's program of a case."""
    from planner.engine.tape import ZERO
    from planner.engine.timing import _program

    wl = case.workload()
    n = 0
    for ph in wl.phases:
        prog = _program(ph, wl)
        for part in prog.phases:
            ops = prog.ops(part, max(ph.new_tokens - 1, 0) if part == "decode" else 1)
            n += sum(o.count for o in ops.ops if o.kind == "matmul" and o.dtype == "bf16" and o.flops != ZERO)
    return n


def test_the_quick_set_leaves_the_full_only_parameters_alone():
    quick_params, full = cal.step_fit_params("quick"), cal.step_fit_params("full")
    assert set(full) == set(cal.STEP_FIT)
    assert not set(quick_params) & set(cal.FULL_ONLY) and set(quick_params) | set(cal.FULL_ONLY) >= set(full)


def test_full_calibration_has_compute_bound_programs_for_device_scale(tmp_path, quick):
    from planner.backends import step_programs

    cases = cal.calibration_cases(tmp_path, "full")
    hidden = {md["hidden"] for md in cal.CALIBRATION_MEDIUM}
    medium = [c for c in cases if c.model.hidden_size in hidden]
    # each dtype's scale from more than one shape
    assert collections.Counter(c.plan.precision for c in medium) == {"fp32": len(hidden), "bf16": len(hidden)}
    assert len(hidden) >= 2
    for c in medium:  # priced by this machine's profile, device time is most of their step
        t = step_programs.predict(c, quick.profile)
        assert t.compute_s > 0.5 * t.total_s, c.label
    assert len({c.model.num_layers for c in cases if c.plan.task == "generate"}) == 2


def test_calibration_programs_are_not_the_validation_programs(tmp_path):
    from planner.backends.time_validation import validation_cases

    calib = cal.calibration_cases(tmp_path / "c", "full")
    valid = validation_cases(tmp_path / "v", "full")
    shape = lambda c: (c.model.hidden_size, c.model.num_layers, c.plan.batch, c.plan.seq, c.plan.prompt_len)  # noqa: E731
    assert {shape(c) for c in calib}.isdisjoint({shape(c) for c in valid})
    assert {c.model.hidden_size for c in calib}.isdisjoint({c.model.hidden_size for c in valid})


def test_every_figure_has_a_source_and_the_check_reports_its_error(quick):
    p = quick.profile
    for key in ("host.op_s", "host.view_s", "host.module_s", "host.sync_s", "host.optimizer_tensor_s", "launch_s",
                "host.grad_op_s", "host.backward_op_s", "host.layer_s", "host.model_s", "host.generate_step_s",
                "host.generate_call_s", "host.backward_call_s", "host.optimizer_step_s", "host.loss_s",
                "matmul.fp32", "matmul.bf16", "attention.fp32", "attention.bf16", "attention.backward",
                "attention_backward.fp32", "attention_backward.bf16", "memory", "memory_inplace",
                "foreach_per_tensor", "machine", "check", "step fit"):  # fmt: skip
        assert p.sources.get(key), key
    assert "median of 3 interleaved rounds" in p.sources["matmul.fp32"] and "spread" in p.sources["matmul.fp32"]
    assert "error" in p.sources["check"]
    assert p.versions["torch"] == torch.__version__ and p.versions["python"]
    assert len(p.measured_on) == 10 and p.measured_on[4] == "-"
    assert quick.checks and all(c.measured_s > 0 and c.predicted_s > 0 and math.isfinite(c.error) for c in quick.checks)


def test_quick_is_quick(quick):
    assert quick.elapsed_s < 60


# ---- the pieces -------------------------------------------------------------------------------------
def test_binned_curve_takes_medians_in_log_bins():
    pts = [(1000.0, 1.0), (1100.0, 3.0), (1200.0, 2.0), (1e6, 10.0), (1.1e6, 30.0)]
    c = cal.binned_curve(pts)
    assert [r for _, r in c.points] == [2.0, 20.0]
    assert 1000 <= c.points[0][0] <= 1200 and 1e6 <= c.points[1][0] <= 1.1e6


def test_counted_ops_and_their_flops():
    import torch.nn.functional as F

    x, w = torch.randn(8, 16), torch.randn(32, 16)
    ops, modules, _ = cal.count_ops(torch, lambda: F.linear(x, w))
    assert [o.kind for o in ops] == ["view", "matmul"] and modules == 0
    assert ops[1].flops == 2 * 8 * 16 * 32 and ops[1].bytes == (8 * 16 + 32 * 16 + 8 * 32) * 4
    b, h, s, d = 1, 2, 16, 8
    q = torch.randn(b, h, s, d)
    ops, _, _ = cal.count_ops(torch, lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    att = [o for o in ops if o.kind == "attention"]
    assert len(att) == 1 and att[0].flops == 4 * b * h * d * s * (s + 1) / 2
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    _, modules, _ = cal.count_ops(torch, lambda: mlp(torch.randn(2, 4)))
    assert modules == 3


def test_prices_sum_host_and_device_on_the_cpu_and_overlap_on_cuda():
    curve = RateCurve(points=((1.0, 1e9),))
    ops = [cal.Op("mm", "matmul", flops=1e6, bytes=0.0), cal.Op("view", "view"), cal.Op("add", "kernel", bytes=1e3)]
    cpu = cal.Prices(op_s=1e-6, view_s=5e-7, module_s=2e-6, matmul={"fp32": curve}, memory=curve)
    host, device, total = cpu.total(ops, modules=1)
    assert host == pytest.approx(2e-6 + 5e-7 + 2e-6) and device == pytest.approx(1e-3 + 1e-6)
    assert total == pytest.approx(host + device)
    gpu = cal.Prices(op_s=1e-6, view_s=5e-7, launch_s=2e-6, asynchronous=True, matmul={"fp32": curve}, memory=curve)
    host, device, total = gpu.total(ops)
    assert total == pytest.approx(max(host, device)) and device == pytest.approx(1e-3 + 1e-6 + 4e-6)
    assert gpu.fixed(ops) == pytest.approx(4e-6) and cpu.fixed(ops) == pytest.approx(2.5e-6)


def test_prices_follow_the_engine_for_backward_attention_inplace_and_foreach():
    """Prices (what the calibration takes off its measurements) prices a backward SDPA kernel on the
    attention_backward curve, an in-place op on memory_inplace, and a _foreach_* op over n tensors
    on a per-tensor device as n kernels (n launches) streaming all its bytes at the rate of the whole
    list's bytes (host once): what planner.engine.cost does."""
    fwd, bwd = RateCurve(points=((1.0, 4e10),)), RateCurve(points=((1.0, 1e10),))
    new, inplace = RateCurve(points=((1.0, 1e9),)), RateCurve(points=((1.0, 1e10),))
    pr = cal.Prices(op_s=1e-6, view_s=5e-7, launch_s=1e-7, matmul={"fp32": fwd}, attention={"fp32": fwd},
                    attention_backward={"fp32": bwd}, memory=new, memory_inplace=inplace, foreach_per_tensor=True)
    name = "_scaled_dot_product_flash_attention_for_cpu"
    assert pr.op(cal.Op(name, "attention", flops=1e8))[1] == pytest.approx(1e-7 + 1e8 / 4e10)
    assert pr.op(cal.Op(name + "_backward", "attention", flops=2.5e8))[1] == pytest.approx(1e-7 + 2.5e8 / 1e10)
    assert pr.op(cal.Op("add", "kernel", bytes=1e6))[1] == pytest.approx(1e-7 + 1e6 / 1e9)
    assert pr.op(cal.Op("add_", "kernel", bytes=1e6))[1] == pytest.approx(1e-7 + 1e6 / 1e10)
    host, device = pr.op(cal.Op("_foreach_mul_", "kernel", bytes=1e6, tensors=10))
    assert host == 1e-6 and device == pytest.approx(10 * 1e-7 + 1e6 / 1e10)
    # the rate is the curve's at the list's bytes (a list beyond the cache streams at its rate), not at one
    # tensor's: 10 tensors of 1e5 bytes on a curve 10x slower at 1e6 bytes than at 1e5
    falling = RateCurve(points=((1e5, 1e10), (1e6, 1e9)))
    big = dataclasses.replace(pr, memory_inplace=falling)
    assert big.op(cal.Op("_foreach_mul_", "kernel", bytes=1e6, tensors=10))[1] == pytest.approx(10 * 1e-7 + 1e6 / 1e9)
    assert pr.fixed([cal.Op("_foreach_mul_", "kernel", bytes=1e6, tensors=10)]) == pytest.approx(1e-6 + 10 * 1e-7)
    one = dataclasses.replace(pr, foreach_per_tensor=False)  # CUDA: one multi-tensor kernel
    assert one.op(cal.Op("_foreach_mul_", "kernel", bytes=1e6, tensors=10))[1] == pytest.approx(1e-7 + 1e6 / 1e10)


def test_prices_of_a_calibrated_profile_match_the_engine(quick):
    """The same ops priced by Prices.of(profile) and by planner.engine.cost.price: equal device time."""
    from planner.engine.cost import OpList, price
    from planner.engine.tape import Sym

    p = quick.profile
    pr = cal.Prices.of(p)
    cases = [("foreach", "_foreach_addcdiv_", 0.0, 4e6, 37, "fp32"), ("foreach", "_foreach_sqrt", 0.0, 1e5, 12, "bf16"),
             ("elementwise", "add_", 0.0, 3e6, 1, "fp32"), ("elementwise", "add", 0.0, 3e6, 1, "bf16"),
             ("attention", "_scaled_dot_product_flash_attention_for_cpu_backward", 2e8, 1e6, 1, "bf16"),
             ("attention", "_scaled_dot_product_flash_attention_for_cpu", 8e7, 1e6, 1, "bf16"),
             ("matmul", "mm", 3e7, 1e5, 1, "bf16")]  # fmt: skip
    for kind, name, flops, nbytes, tensors, dt in cases:
        ops = OpList()
        ops.add(kind, name, flops=Sym(c=flops), bytes=Sym(c=nbytes), dtype=dt, tensors=tensors)
        engine = price(ops, 1.0, 1.0, p, mode="nograd")
        ckind = {"foreach": "kernel", "elementwise": "kernel"}.get(kind, kind)
        host, device = pr.op(cal.Op(name, ckind, flops=flops, bytes=nbytes, dtype=dt, tensors=tensors))
        assert device == pytest.approx(engine.device_s, rel=1e-9), name
        assert host == pytest.approx(engine.host_s, rel=1e-9), name


def test_counted_foreach_ops_carry_their_tensors_and_writes():
    xs, ys = [torch.ones(4) for _ in range(3)], [torch.ones(4) for _ in range(3)]
    ops, _, _ = cal.count_ops(torch, lambda: torch._foreach_mul_(xs, 2.0))
    assert [(o.name, o.tensors) for o in ops] == [("_foreach_mul_", 3)]
    assert ops[0].bytes == 2 * 3 * 16  # each tensor read and written (the op returns nothing)
    ops, _, _ = cal.count_ops(torch, lambda: torch._foreach_add_(xs, ys))
    assert ops[0].tensors == 3 and ops[0].bytes == 3 * 3 * 16
    ops, _, _ = cal.count_ops(torch, lambda: xs[0].add_(ys[0]))
    assert ops[0].name == "add_" and ops[0].tensors == 1 and ops[0].bytes == 3 * 16


def test_sweep_shapes_stay_within_bounds():
    for quick_mode in (True, False):
        st = cal.settings("cpu", quick_mode)
        shapes = cal.matmul_shapes(st)
        assert 2 <= len(shapes) <= st.mm_cases + st.mm_shape_cases
        assert all(2 * m * k * n <= st.mm_max_flops for m, k, n in shapes)
        assert 64 in {k for _, k, _ in shapes}  # tiny models' shapes are in
        # a LoRA rank as K (B's input) and as N (A's output)
        assert min(st.mm_narrow) in {k for _, k, _ in shapes} and min(st.mm_narrow) in {n for _, _, n in shapes}
        sizes = cal.memory_sizes(st)
        assert sizes == sorted(sizes) and sizes[-1] <= 2.6e8
        # the backward SDPA shapes are forward shapes (their time ratios), several of them
        assert set(st.sdpa_backward) <= set(st.sdpa_shapes) and len(st.sdpa_backward) >= 2
        assert min(st.sdpa_backward, key=lambda s: s[2] * s[3]) == min(st.sdpa_shapes, key=lambda s: s[2] * s[3])


# ---- the CLI ----------------------------------------------------------------------------------------
def test_cli_quick_writes_the_profile(tmp_path):
    path = tmp_path / "cpu.json"
    code, out, err = run(["calibrate", "--quick", "-o", str(path)])
    assert code == 0, err
    p = load_profile(path)
    assert p.device == "cpu"
    assert "wrote" in out and "check" in out and "error" in out and "host costs" in out
    assert [f.name for f in tmp_path.iterdir()] == ["cpu.json"]  # no temporary file left


@pytest.fixture
def patched(monkeypatch, quick):
    monkeypatch.setattr(cal, "run_calibration", lambda *a, **k: quick)
    return quick


def test_cli_no_steps_skips_the_step_fit(tmp_path):
    path = tmp_path / "cpu.json"
    code, out, err = run(["calibrate", "--quick", "--no-steps", "-o", str(path)])
    assert code == 0, err
    p = load_profile(path)
    assert p.host.layer_s == 0 and p.host.model_s == 0 and "step fit" not in p.sources and not p.residuals
    assert p.host.grad_op_s > 0 and p.host.backward_op_s > 0
    assert "step fit" not in out and "check (forward timed vs predicted from this profile" in out
    assert_bad(*run(["calibrate", "--from-steps", "x.csv", "--profile", "p.json", "--no-steps"]), "no-steps")


def test_cli_summary_shows_the_step_fit(tmp_path, patched):
    code, out, err = run(["calibrate", "--quick", "-o", str(tmp_path / "p.json")])
    assert code == 0, err
    assert "step fit:" in out and "fitted to the calibration programs" in out and "calibration sft full" in out
    code, out, err = run(["calibrate", "--quick", "-o", str(tmp_path / "p.json"), "--json"])
    doc = json.loads(out)
    assert doc["step_fit"]["rows"] and "host.model_s" in doc["step_fit"]["fitted"]


def test_cli_without_out_prints_the_profile_json(patched):
    code, out, err = run(["calibrate", "--quick"])
    assert code == 0 and "error" not in err
    assert parse_profile(json.loads(out), "stdout") == patched.profile


def test_cli_json_summary(tmp_path, patched):
    code, out, err = run(["calibrate", "--quick", "-o", str(tmp_path / "p.json"), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["profile"] == str(tmp_path / "p.json") and doc["check"] and "error" in doc["check"][0]
    assert set(doc["host"]) == set(HostCosts.model_fields)


@pytest.mark.parametrize("where", ["missing-dir/p.json", "DIR"])
def test_cli_bad_out_path_writes_nothing(tmp_path, patched, where):
    target = str(tmp_path) if where == "DIR" else str(tmp_path / where)
    before = sorted(os.listdir(tmp_path))
    assert_bad(*run(["calibrate", "--quick", "-o", target]), "out:")
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_failed_calibration_writes_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise cal.CalibrationError("calibrate: no usable measurement for a curve")

    monkeypatch.setattr(cal, "run_calibration", boom)
    assert_bad(*run(["calibrate", "-o", str(tmp_path / "p.json")]), "no usable measurement")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_without_a_gpu_is_one_line():
    assert_bad(*run(["calibrate", "--device", "cuda"]), "device: cuda is not available")


def test_cli_unknown_device_and_misplaced_flags():
    assert_bad(*run(["calibrate", "--device", "tpu"]), "device: unknown device 'tpu'")
    assert_bad(*run(["calibrate", "--profile", "x.json"]), "--profile only applies with --from-steps")
    assert_bad(*run(["calibrate", "--threads", "0"]), "threads:")


def test_cli_without_torch_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert_bad(*run(["calibrate", "--quick"]), "pip install torch")


# ---- fitting to whole-step measurements -------------------------------------------------------------
TRUE = {"host.op_s": 4e-6, "host.module_s": 2e-6, "launch_s": 3e-6}
HEADER = ("model,task,method,precision,batch,seq,grad_ckpt,lora_rank,prompt_len,new_tokens,step_s,first_step_s,"
          "tokens_per_s,prefill_s,generate_s,peak_allocated_bytes,peak_reserved_bytes,cublas_workspaces_in_peak_bytes")
PLANS = [  # the h200_measured_steps.csv layout: (plan columns, target column)
    ("qwen2.5-0.5b,sft,full,bf16,1,512,0,,,", "step_s"),
    ("qwen2.5-0.5b,sft,full,bf16,4,2048,1,,,", "step_s"),
    ("llama-3.2-1b,sft,full,bf16,1,512,0,,,", "step_s"),
    ("llama-3.2-1b,sft,lora,bf16,4,2048,1,16,,", "step_s"),
    ("llama-3.2-1b,sft,full,mixed-bf16,4,1024,0,,,", "step_s"),
    ("llama-3.2-1b,generate,full,bf16,1,,,,512,64", "generate_s"),
    ("llama-3.2-1b,generate,full,bf16,16,,,,2048,64", "generate_s"),
]


def synthetic_predict(plan, model, profile, gpu):
    """An asynchronous step of known structure: the host's ops and module calls against the device's
    kernels and work; seconds."""
    if plan.task == "generate":
        host = plan.new_tokens * (900 * profile.host.op_s + 180 * profile.host.module_s)
        device = plan.new_tokens * (700 * profile.launch_s + 2e-5 * plan.batch) + 1e-9 * plan.batch * plan.prompt_len
        return max(host, device) + 0.2 * min(host, device)
    ckpt = 2 if plan.grad_ckpt else 1
    ops = (3000 + 400 * ckpt) * (2 if plan.method == "lora" else 1)
    host = ops * profile.host.op_s + 500 * ckpt * profile.host.module_s
    device = 2500 * ckpt * profile.launch_s + 4e-9 * plan.batch * plan.seq * ckpt
    return max(host, device) + 0.1 * min(host, device) + 1e-3


def base_profile(**host) -> DeviceProfile:
    curve = RateCurve(points=((1e6, 1e11), (1e12, 5e14)))
    return DeviceProfile(id="test-gpu", name="a test card", device="cuda", host_cpu="test", asynchronous=True,
                         matmul={"bf16": curve}, memory=RateCurve(points=((1e3, 1e9), (1e9, 4e12))), launch_s=0.0,
                         host=HostCosts(**{"op_s": 1e-5, "view_s": 1e-6, "module_s": 5e-7, **host}),
                         sources={"host.op_s": "a guess"})  # fmt: skip


def write_steps(tmp_path, true=TRUE, plans=PLANS, name="steps.csv"):
    truth = cal.with_params(base_profile(), true)
    lines = [HEADER]
    for i, (cols, target) in enumerate(plans, start=1):
        rows = cal.read_steps(_one(tmp_path, cols, target))
        t = synthetic_predict(rows[0].plan, rows[0].model, truth, None)
        step, gen = (f"{t:.12g}", "") if target == "step_s" else ("", f"{t:.12g}")
        lines.append(f"{cols},{step},,,,{gen},,,")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _one(tmp_path, cols, target):
    p = tmp_path / "one.csv"
    step, gen = ("1", "") if target == "step_s" else ("", "1")
    p.write_text(f"{HEADER}\n{cols},{step},,,,{gen},,,\n")
    return p


def test_fit_recovers_known_parameters(tmp_path):
    rows = cal.read_steps(write_steps(tmp_path))
    assert [r.target for r in rows] == [t for _, t in PLANS]
    fit = cal.fit_profile(base_profile(), rows, synthetic_predict, csv_name="steps.csv")
    for name, true in TRUE.items():
        assert fit.params[name] == pytest.approx(true, rel=1e-3), name
        assert cal.get_param(fit.profile, name) == pytest.approx(true, rel=1e-3)
    assert fit.worst_abs_error < 1e-4
    assert set(fit.profile.residuals) == {r.label for r in rows}
    assert all(abs(v) < 1e-4 for v in fit.profile.residuals.values())
    assert "steps.csv" in fit.profile.sources["fit"] and "steps.csv" in fit.profile.sources["host.op_s"]
    assert fit.profile.host.view_s == base_profile().host.view_s  # what is not fitted stays


def test_fit_of_a_chosen_subset(tmp_path):
    rows = cal.read_steps(write_steps(tmp_path))
    base = base_profile(module_s=TRUE["host.module_s"])
    fit = cal.fit_profile(base, rows, synthetic_predict, params=["host.op_s", "launch_s"])
    assert set(fit.params) == {"host.op_s", "launch_s"}
    assert fit.params["launch_s"] == pytest.approx(TRUE["launch_s"], rel=1e-3)
    assert fit.params["host.op_s"] == pytest.approx(TRUE["host.op_s"], rel=1e-3)


def test_nelder_mead_finds_a_bounded_minimum():
    x, fx, evals = cal.nelder_mead(lambda v: (v[0] - 3) ** 2 + 10 * (v[1] + 1) ** 2, [0.0, 0.0], [1.0, 1.0])
    assert x[0] == pytest.approx(3, abs=1e-4) and x[1] == pytest.approx(-1, abs=1e-4) and evals < 600


@pytest.fixture
def fake_cost_model(monkeypatch):
    mod = types.ModuleType("planner.engine.timing")
    mod.step_seconds = synthetic_predict
    monkeypatch.setitem(sys.modules, "planner.engine.timing", mod)
    import planner.engine

    monkeypatch.setattr(planner.engine, "cost", mod, raising=False)


def _base_file(tmp_path, **host):
    p = tmp_path / "base.json"
    p.write_text(json.dumps(base_profile(**host).model_dump(mode="json")))
    return p


def test_cli_from_steps_writes_the_fitted_profile(tmp_path, fake_cost_model):
    steps, base = write_steps(tmp_path), _base_file(tmp_path)
    out_path = tmp_path / "fit.json"
    code, out, err = run(["calibrate", "--from-steps", str(steps), "--profile", str(base), "-o", str(out_path)])
    assert code == 0, err
    p = load_profile(out_path)
    assert p.host.op_s == pytest.approx(TRUE["host.op_s"], rel=1e-3)
    assert len(p.residuals) == len(PLANS) and str(steps) in p.sources["fit"]
    assert "median" in out and "worst" in out and "predicted" in out and "llama-3.2-1b" in out
    code, out, err = run(["calibrate", "--from-steps", str(steps), "--profile", str(base), "-o", str(out_path),
                          "--json", "--fit", "host.op_s,launch_s"])  # fmt: skip
    doc = json.loads(out)
    assert code == 0 and set(doc["fitted"]) == {"host.op_s", "launch_s"} and len(doc["rows"]) == len(PLANS)


def test_cli_from_steps_needs_a_base_profile(tmp_path):
    assert_bad(*run(["calibrate", "--from-steps", str(write_steps(tmp_path))]), "--profile BASE")


def set_cell(header, rows, row, column, value):
    cols = header.split(",")
    cells = rows[row - 1].split(",")
    cells[cols.index(column)] = value
    return header, [*rows[: row - 1], ",".join(cells), *rows[row:]]


@pytest.mark.parametrize("edit, needles", [
    (lambda h, r: (h.replace("step_s", "stp_s", 1), r), ["steps.csv", "unknown column 'stp_s'", "did you mean"]),
    (lambda h, r: set_cell(h, r, 2, "step_s", ""), ["steps.csv", "row 2, column step_s: missing"]),
    (lambda h, r: set_cell(h, r, 7, "generate_s", ""), ["steps.csv", "row 7, column generate_s: missing"]),
    (lambda h, r: set_cell(h, r, 1, "batch", "one"), ["steps.csv", "row 1, column batch: must be a whole number"]),
    (lambda h, r: set_cell(h, r, 3, "step_s", "fast"), ["steps.csv", "row 3, column step_s: not a number"]),
    (lambda h, r: set_cell(h, r, 1, "model", "qwen9"), ["steps.csv", "row 1, column model"]),
    (lambda h, r: set_cell(h, r, 1, "method", "fulll"), ["steps.csv", "row 1, column method"]),
    (lambda h, r: set_cell(h, r, 1, "lora_rank", "8"), ["steps.csv", "row 1, column lora_rank"]),
], ids=["unknown column", "missing target", "missing generate target", "bad plan value", "bad measured value",
        "unknown model", "bad method", "option that does not apply"])  # fmt: skip
def test_cli_bad_csv_is_one_line(tmp_path, edit, needles):
    path = write_steps(tmp_path)
    header, *rows = path.read_text().splitlines()
    header, rows = edit(header, rows)
    path.write_text("\n".join([header, *rows]) + "\n")
    before = sorted(os.listdir(tmp_path))
    assert_bad(*run(["calibrate", "--from-steps", str(path), "--profile", str(_base_file(tmp_path)),
                     "-o", str(tmp_path / "fit.json")]), *needles)  # fmt: skip
    assert not (tmp_path / "fit.json").exists()
    assert set(os.listdir(tmp_path)) - set(before) <= {"base.json"}


def test_bad_measured_value_and_no_rows(tmp_path):
    p = tmp_path / "steps.csv"
    p.write_text(f"{HEADER}\nqwen2.5-0.5b,sft,full,bf16,1,512,0,,,,fast,,,,,,,\n")
    with pytest.raises(cal.StepsError, match=r"steps.csv: row 1, column step_s: not a number"):
        cal.read_steps(p)
    p.write_text(f"{HEADER}\n")
    with pytest.raises(cal.StepsError, match="no data rows"):
        cal.read_steps(p)
    with pytest.raises(cal.StepsError, match="no such file"):
        cal.read_steps(tmp_path / "nope.csv")


def test_bad_fit_parameter_names():
    with pytest.raises(cal.StepsError, match=r"unknown parameter 'host.ops'.*did you mean"):
        cal.parse_fit_params("host.ops")
    with pytest.raises(cal.StepsError, match="named twice"):
        cal.parse_fit_params("launch_s,launch_s")
    assert cal.parse_fit_params(None) == cal.DEFAULT_FIT
    assert "host.optimizer_tensor_s" in cal.float_paths() and "launch_s" in cal.float_paths()
    assert {"host.grad_op_s", "host.backward_op_s", "host.layer_s"} <= set(cal.float_paths())
    # an unset optional host cost reads as what prices in its place (op_s)
    assert cal.get_param(base_profile(), "host.backward_op_s") == base_profile().host.op_s


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.pop("launch_s"), "launch_s: required field missing"),
    (lambda d: d["host"].update(op_s=-1e-6), "host.op_s"),
    (lambda d: d["memory"].update(points=[[2.0, 1.0], [1.0, 1.0]]), "ascending"),
    (lambda d: d.update(matmul_fixed_s={"bf16": -1e-6}), "matmul_fixed_s: bf16: must be >= 0"),
    (lambda d: d.update(dtype_scale={"bf16": 0.0}), "dtype_scale: bf16: must be > 0"),
    (lambda d: d.update(dtype_scale={"bf17": 1.0}), "dtype_scale: unknown dtype 'bf17'"),
], ids=["missing field", "negative value", "descending curve", "negative matmul fixed cost", "zero dtype scale",
        "unknown dtype"])  # fmt: skip
def test_bad_profile_file_is_one_line(tmp_path, change, needle):
    doc = base_profile().model_dump(mode="json")
    change(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=needle) as e:
        load_profile(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    assert_bad(*run(["calibrate", "--from-steps", str(write_steps(tmp_path)), "--profile", str(bad)]), needle)


def test_memory_bound_matmuls_are_left_to_the_memory_term():
    memory = RateCurve(points=((1.0, 1e9),))
    # (FLOPs, bytes, time, fixed, spread): in the same bin a compute-bound shape and a GEMV whose bytes
    # take all its time; the curve takes the compute-bound one's rate
    raw = [(1e6, 1e3, 1e-5 + 1e-6, 1e-6, 0.0), (1.1e6, 1e6, 1e-3, 0.0, 0.0)]
    curve, kept = cal.matmul_curve(raw, memory)
    assert kept == 1 and curve.points[0][1] == pytest.approx(1e11)
    # a bin of only memory-bound shapes keeps them
    curve, kept = cal.matmul_curve(raw[1:], memory)
    assert kept == 0 and curve.points[0][1] == pytest.approx(1.1e9)


def test_fit_to_noisy_steps_reports_the_residuals(tmp_path):
    path = write_steps(tmp_path)
    header, *rows = path.read_text().splitlines()
    noisy = []
    for i, line in enumerate(rows):  # +-4% on every target
        cells = line.split(",")
        col = 10 if cells[10] else 14
        cells[col] = f"{float(cells[col]) * (1.04 if i % 2 else 0.96):.12g}"
        noisy.append(",".join(cells))
    path.write_text("\n".join([header, *noisy]) + "\n")
    fit = cal.fit_profile(base_profile(), cal.read_steps(path), synthetic_predict)
    assert 0.01 < fit.worst_abs_error < 0.1
    for r in fit.rows:
        assert fit.profile.residuals[r.label] == pytest.approx(r.measured / r.predicted - 1)
    assert fit.params["host.op_s"] == pytest.approx(TRUE["host.op_s"], rel=0.15)


def test_backward_slope_falls_back_when_noise_makes_it_non_positive():
    """The per-op backward cost is the slope between two chain lengths; a CI runner measured a
    longer chain no slower than the shorter one, which gave 0: the fallback is the longer chain's
    cost per op (its fixed cost shared), never 0 while the backward costs something."""
    from planner.backends.calibrate import backward_slope

    per_op, fixed, how = backward_slope(30e-6, 70e-6, 10, 30)
    assert per_op == pytest.approx(2e-6) and fixed == pytest.approx(10e-6) and "slope" in how
    per_op, fixed, how = backward_slope(80e-6, 70e-6, 10, 30)  # noise: the longer chain measured faster
    assert per_op == pytest.approx(70e-6 / 30) and fixed == 0.0 and "not positive" in how


def test_spread_shapes_vary_each_dimension_on_its_own():
    grid = [(m, k, n) for m in (1, 16, 256) for k in (8, 64, 512) for n in (8, 64, 512)]
    taken = [(16, 64, 64)]
    out = cal.spread_shapes(grid, 9, taken)
    assert len(out) == len(set(out)) == 9 and not set(out) & set(taken) and set(out) <= set(grid)
    # the extremes of every dimension come first, each with the others at both of theirs
    for d in range(3):
        assert {s[d] for s in out} >= {min(g[d] for g in grid), max(g[d] for g in grid)}
        for lo_hi in (min(g[d] for g in grid), max(g[d] for g in grid)):
            others = [s for s in out if s[d] == lo_hi]
            assert all(len({s[e] for s in others}) >= 2 for e in range(3) if e != d)
    assert sorted(cal.spread_shapes(grid, 100)) == sorted(grid)


def test_fit_matmul_shapes_recovers_a_separable_rate_and_picks_its_terms():
    """Times made from a known rate (K's dot-product length and the K x N weight's size, as a CPU's bf16
    grad-input kernel shows them) plus a fixed part: the fit picks a term set with kn, and predicts
    shapes it was not given within a few percent; times without any shape dependence give a flat model."""
    import math

    def rate(m, k, n):
        return 4e9 * min(1.0, (k / 1024) ** 0.25) * (1.0 if k * n <= 2**15 else (2**15 / (k * n)) ** 0.3)

    fixed = 2e-6
    grid = [(m, k, n) for m in (1, 4, 16, 64, 256, 1024) for k in (8, 64, 256, 1024, 4096)
            for n in (8, 64, 256, 1024, 4096)]
    train = cal.spread_shapes(grid, 60)
    pts = [(m, k, n, fixed + 2 * m * k * n / rate(m, k, n), fixed) for m, k, n in train]
    model = cal.fit_matmul_shapes(pts)
    assert "kn" in model.terms and model.points == 60
    held = [s for s in grid if s not in train and 2 * s[0] * s[1] * s[2] >= 1e6]
    errs = sorted(abs(model.rate(*s) / rate(*s) - 1) for s in held)
    assert errs[len(errs) // 2] < 0.05 and errs[-1] < 0.25
    flat = cal.fit_matmul_shapes([(m, k, n, fixed + 2 * m * k * n / 3e9, fixed) for m, k, n in train])
    assert all(flat.rate(*s) == pytest.approx(3e9, rel=2e-2) for s in grid if 2 * s[0] * s[1] * s[2] >= 1e6)
    assert flat.residual < 1e-2 and math.isfinite(flat.log_rate)
    with pytest.raises(cal.CalibrationError):
        cal.fit_matmul_shapes(pts[:3])


def test_a_named_linear_layer_gets_its_measured_offset():
    """A layer shape that runs 1.6x slower than the smooth rate around it (as the CPU's bf16 grad-input
    kernel at K = 256 did): the fit alone, which smooths, leaves it off; with the layer named, the model
    plus its measured offset prices its timed shapes within a few percent, at every M, and leaves the
    other shapes' rates as they were."""
    def rate(m, k, n):
        return 4e9 * min(1.0, (k / 1024) ** 0.25)

    fixed = 2e-6
    grid = [(m, k, n) for m in (1, 4, 16, 64, 256, 1024) for k in (8, 64, 256, 1024, 4096) for n in (8, 64, 1024, 4096)]
    train = cal.spread_shapes(grid, 50)
    layer = (256, 1024)  # its K and N also in other shapes of the sweep, at the smooth rate
    st = cal.Settings(repeats=1, sample_s=0.0, max_calls=1, mm_tokens=(1, 16, 256, 1024), mm_hidden=(64,), mm_max_dim=64,
                      mm_max_flops=0, mm_cases=0, mm_dtypes=("fp32",), mem_bytes=(1.0, 2.0), mem_points=1, sdpa_shapes=(),
                      sdpa_backward=(), attn_dtypes=(), opt_tensors=(1, 2), dispatch_calls=1, check_llama=False,
                      mm_shape_max_flops=4e8, mm_layer_dims=(layer,))
    own = cal.layer_shapes(st)
    assert own == [(16, *layer), (256, *layer)]  # the two largest M within 4e8 FLOPs

    def timed(s):
        slow = 1.6 if s[1:] == layer else 1.0
        return (*s, fixed + slow * 2 * s[0] * s[1] * s[2] / rate(*s), fixed)

    pts = [timed(s) for s in train + own]
    plain = cal.fit_matmul_shapes(pts)
    named = cal.fit_matmul_shapes(pts, [layer])
    assert set(named.measured) == {"256x1024"} and not plain.measured
    off = {}
    for m in (16, 256, 1024):  # 1024: not timed, the offset holds for every M
        want = rate(m, *layer) / 1.6
        off[m] = (abs(named.rate(m, *layer) / want - 1), abs(plain.rate(m, *layer) / want - 1))
    assert max(n for n, _ in off.values()) < 0.05 < max(p for _, p in off.values()), off
    assert named.rate(64, 1024, 64) == plain.rate(64, 1024, 64)
    assert named.scaled(2.0).rate(256, *layer) == pytest.approx(2 * named.rate(256, *layer))
    with pytest.raises(ValueError, match="KxN"):
        MatmulShapes(log_rate=1.0, terms={"m": ((1.0, 0.0),)}, measured={"256-1024": 0.1})


def test_linear_layer_dims_of_models():
    """Each decoder layer's (in, out) and the LM head's, once each."""
    from planner.models import load_model

    m = load_model("llama-3.1-8b")
    dims = cal.linear_layer_dims([m, m])
    assert (4096, 4096) in dims and (4096, 1024) in dims and (4096, 14336) in dims and (14336, 4096) in dims
    assert (4096, 128256) in dims and len(dims) == len(set(dims)) == 5


def test_calibrate_unknown_model_is_one_line(capsys):
    from planner.cli import main

    assert main(["calibrate", "--quick", "--model", "lama-3.1-8b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model 'lama-3.1-8b'" in err and "llama-3.1-8b" in err


def test_calibration_measures_peft_disable_adapter(quick):
    """A peft model's disable_adapter() context is timed per LoRA layer (tens to hundreds of us here)."""
    p = quick.profile
    assert 1e-6 < p.host.disable_adapter_s < 1e-2
    assert "disable_adapter()" in p.sources["host.disable_adapter_s"] and "LoRA layers" in p.sources["host.disable_adapter_s"]


def test_a_fit_that_drives_a_positive_scale_to_zero_returns_a_valid_profile():
    """Measurements every figure of the profile overshoots: the fit wants fixed_scale at 0, which a
    profile may not hold (its scales are positive); the fit stops just above it, and the result
    validates (it raised a ValidationError when a contended machine's calibration did this)."""
    rows = [cal.StepRow(i, f"row {i}", None, None, None, "step_s", 1e-9 * i, 1.0) for i in range(1, 4)]

    def predict(plan, model, profile, gpu):  # grows with fixed_scale, never below 1 s
        return 1.0 + profile.fixed_scale

    fit = cal.fit_profile(base_profile(), rows, predict, params=["fixed_scale"], max_evals=80)
    assert 0 < fit.profile.fixed_scale < 1e-6
    DeviceProfile.model_validate(fit.profile.model_dump())


def test_the_sdpa_shape_sweep_spreads_each_pass_within_its_flops_and_prices_as_the_recorder_counts():
    """attention_shapes: the settings' count of each pass, prefill and backward causal and decode one query
    row, within the FLOPs caps, each a distinct point of the shape model; a shape's FLOPs and (M, K, N)
    are those the recorder gives the real call (classify) and the engine's op at the same T and S."""
    import torch
    import torch.nn.functional as F

    from planner.engine.tape import Sym

    st = cal.settings("cpu", False)
    prefill, decode, backward = cal.attention_shapes(st)
    assert (len(prefill), len(decode), len(backward)) == st.attn_shape_cases
    assert all(a.causal and a.queries == a.keys for a in prefill + backward) and all(a.queries == 1 for a in decode)
    assert max(a.flops for a in prefill + decode) <= st.attn_shape_max_flops
    assert max(a.flops for a in backward) <= st.attn_shape_max_flops / 4
    for shapes in (prefill, decode, backward):
        points = [(round(a.mkn()[0]), a.dim, a.keys) for a in shapes]
        assert len(set(points)) == len(points)
        assert len({a.dim for a in shapes}) >= 4 and len({a.keys for a in shapes}) >= 4  # K and N each vary
    for a in (cal.AttentionShape(2, 4, 2, 24, 24, 16), cal.AttentionShape(1, 8, 4, 1, 40, 32)):
        q = torch.randn(a.batch, a.queries, a.heads, a.dim).transpose(1, 2)
        k, v = (torch.randn(a.batch, a.kv_heads, a.keys, a.dim) for _ in range(2))
        ops, _, _ = cal.count_ops(torch, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=a.causal,
                                                                                enable_gqa=True))  # fmt: skip
        att = [o for o in ops if o.kind == "attention"]
        assert len(att) == 1 and att[0].flops == a.flops
        assert att[0].dims == (a.dim, a.keys) and att[0].queries == a.queries
        # the engine's op (planner.engine.layers.sdpa_ops; a decode step: program._decode_attention) at T, S
        hd = a.heads * a.dim
        if a.causal:
            f = Sym(t=2 * hd, q=2 * hd).at(a.batch * a.keys, a.keys)
        else:
            f = Sym(q=4 * hd).at(a.batch, a.keys)
        assert float(f) == a.flops and float(f) / (2 * a.dim * a.keys) == a.mkn()[0]
