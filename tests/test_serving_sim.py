"""The serving simulator: invariants, aggregation against step-by-step, schedulers, traffic."""

from __future__ import annotations

import math
import time

import pytest

from planner.serving.capacity import capacity, resolve
from planner.serving.roofline import Roofline, sum_max_lines
from planner.serving.schedulers import SCHEDULERS, ChunkedPrefill, Scheduler, get_scheduler, register_scheduler
from planner.serving.service import serve
from planner.serving.service import simulate
from planner.serving.simulator import Simulator
from planner.serving.specs import Calibration, ServeInputError, ServeSpec, TrafficSpec
from planner.serving.traffic import Requests, load_trace, synthetic

BUILTIN = ("static", "continuous", "chunked-prefill")


def engine(**kw):
    spec = ServeSpec(**{"model": "llama-3.1-8b", "gpu": "h100-sxm", "max_model_len": 8192, **kw})
    setup = resolve(spec)
    cap = capacity(setup, 1280)
    return setup, Roofline(setup), cap.layer_blocks


def mixed(n=400, rate=20.0, seed=0, max_len=8192, **kw):
    t = TrafficSpec(rate=rate, requests=n, prompt_dist="lognormal", prompt_len=1024, prompt_cv=0.8,
                    output_dist="uniform", new_tokens=256, output_cv=0.5, seed=seed, **kw)  # fmt: skip
    return synthetic(t, max_len)


def run_sim(scheduler, setup, roof, pool, reqs, aggregate=True):
    sched = get_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
    sim = Simulator(setup, roof, reqs, pool, aggregate=aggregate)
    sched.run(sim)
    return sim, sim.report(sched.name)


# ---- invariants ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", BUILTIN)
@pytest.mark.parametrize("tight", [False, True])
def test_invariants(scheduler, tight):
    # tight: a small card, so that the cache fills, requests queue and (iteration-level) get preempted
    kw = {"gpu_memory": "24GiB", "max_model_len": 4096} if tight else {}
    setup, roof, pool = engine(**kw)
    reqs = mixed(300, rate=40.0 if tight else 8.0, max_len=setup.max_model_len)
    sim, rep = run_sim(scheduler, setup, roof, pool, reqs)
    n = len(reqs)
    assert sim.done == n and rep.requests == n
    assert all(not math.isnan(x) for x in sim.finish)
    for i in range(n):
        ttft = sim.first[i] - reqs.arrival[i]
        e2e = sim.finish[i] - reqs.arrival[i]
        assert 0 <= ttft <= e2e
    assert rep.ttft_s.p50 <= rep.ttft_s.p90 <= rep.ttft_s.p99 <= rep.ttft_s.max
    assert rep.tpot_s.p50 >= 0 and rep.e2e_s.p50 >= 0
    # tokens conserved: every output token is sampled once, either at a prefill's end or by a decode step
    pad_decode = rep.padded_tokens - sim.padded_prefill
    assert sim.first_tokens + rep.decode_tokens == sum(reqs.output) + pad_decode
    assert rep.prefill_tokens == sum(reqs.prompt) + sim.padded_prefill + rep.recomputed_tokens
    if rep.preemptions == 0:
        assert rep.recomputed_tokens == 0 and sim.first_tokens == n
    assert sim.free == pool or scheduler == "static"
    assert 0 <= rep.kv_utilisation.mean <= rep.kv_utilisation.max <= 1
    # throughput below the roofline: every iteration reads the weights, every useful token costs its FLOPs
    flops_floor = (sum(reqs.prompt) + sum(o - 1 for o in reqs.output)) * roof.flops_token / roof.flops_rate
    assert rep.duration_s >= flops_floor
    assert rep.tokens_per_s <= sum(reqs.output) / flops_floor
    if tight and scheduler != "static":
        assert rep.preemptions > 0


@pytest.mark.parametrize("scheduler", BUILTIN)
def test_offline_batch_respects_the_busy_floor(scheduler):
    setup, roof, pool = engine()
    reqs = mixed(200, rate=math.inf)
    _, rep = run_sim(scheduler, setup, roof, pool, reqs)
    assert rep.duration_s >= rep.iterations * (roof.weight_bytes / roof.byte_rate + roof.fixed) * (1 - 1e-9)


# ---- aggregation is exact -----------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["continuous", "chunked-prefill"])
@pytest.mark.parametrize("case", ["light", "tight", "sliding"])
def test_aggregated_decode_equals_step_by_step(scheduler, case):
    if case == "sliding":
        setup, roof, pool = engine(model="gemma-2-2b", gpu="l40s", max_model_len=8192, gpu_memory_utilization=0.5)
        reqs = mixed(120, rate=6.0, max_len=8192, seed=3)
        reqs = Requests(reqs.arrival, [p * 4 for p in reqs.prompt], reqs.output)  # cross the 4096 window
        reqs.prompt[:] = [min(p, 7000) for p in reqs.prompt]
    elif case == "tight":
        setup, roof, pool = engine(gpu_memory="24GiB", max_model_len=4096)
        reqs = mixed(150, rate=40.0, max_len=4096, seed=1)
    else:
        setup, roof, pool = engine()
        reqs = mixed(150, rate=4.0, seed=2)
    fast, a = run_sim(scheduler, setup, roof, pool, reqs, aggregate=True)
    slow, b = run_sim(scheduler, setup, roof, pool, reqs, aggregate=False)
    assert a.iterations == b.iterations
    assert a.preemptions == b.preemptions
    assert a.decode_tokens == b.decode_tokens and a.prefill_tokens == b.prefill_tokens
    for x, y in zip(fast.finish, slow.finish):
        assert x == pytest.approx(y, rel=1e-9, abs=1e-9)
    for x, y in zip(fast.first, slow.first):
        assert x == pytest.approx(y, rel=1e-9, abs=1e-9)
    if case == "tight":
        assert a.preemptions > 0


def test_sum_max_lines_closed_form():
    for a1, b1, a2, b2, m in [(1, 0.5, 3, 0.1, 20), (5, -0.2, 1, 0.3, 30), (2, 1, 2, 1, 7), (0, 0, 1, 0, 5), (3, 0, 1, 0.5, 1)]:
        assert sum_max_lines(a1, b1, a2, b2, m) == pytest.approx(sum(max(a1 + b1 * j, a2 + b2 * j) for j in range(m)))


# ---- continuous beats static --------------------------------------------------------------------
def test_continuous_batching_beats_static_on_a_mixed_trace():
    setup, roof, pool = engine(max_num_seqs=32)
    reqs = mixed(400, rate=10.0, seed=4)
    reps = {s: run_sim(s, setup, roof, pool, reqs)[1] for s in BUILTIN}
    for s in ("continuous", "chunked-prefill"):
        assert reps[s].tokens_per_s > reps["static"].tokens_per_s
        assert reps[s].e2e_s.p50 < reps["static"].e2e_s.p50
        assert reps[s].ttft_s.p90 < reps["static"].ttft_s.p90
        assert reps[s].iterations < reps["static"].iterations
        assert reps[s].padded_tokens == 0 < reps["static"].padded_tokens
    # chunked prefill does not stall decodes behind whole-prompt iterations
    assert reps["chunked-prefill"].tpot_s.p99 < reps["continuous"].tpot_s.p99


def test_static_batches_wait_for_their_longest_request():
    setup, roof, pool = engine(max_num_seqs=4)
    reqs = Requests([0.0] * 4, [100, 100, 100, 100], [10, 50, 10, 10])
    sim, rep = run_sim("static", setup, roof, pool, reqs)
    assert len(set(sim.finish)) == 1 and rep.iterations == 50
    assert rep.padded_tokens == 3 * 40
    sim, rep = run_sim("continuous", setup, roof, pool, reqs)
    assert rep.iterations == 1 + 49 and sim.finish[0] < sim.finish[1]


# ---- the registry -------------------------------------------------------------------------------
class OneAtATime(Scheduler):
    """A plugin scheduler: one request at a time, whole prompt, then decode."""

    name = "one-at-a-time"

    def schedule(self, sim):
        if not sim.running and sim.waiting:
            rid = sim.waiting.popleft()
            sim.start_prefill(rid)
            return [(rid, sim.target[rid])], False
        return [], True


def test_register_a_scheduler_plugin(monkeypatch):
    monkeypatch.setitem(SCHEDULERS, "one-at-a-time", OneAtATime)
    register_scheduler("one-at-a-time", OneAtATime)
    res = serve(ServeSpec(model="llama-3.1-8b", gpu="h100-sxm", max_model_len=8192),
                TrafficSpec(rate=2, requests=50), scheduler="one-at-a-time", compare=["chunked-prefill"])  # fmt: skip
    one, cont = res.simulations
    assert one.scheduler == "one-at-a-time" and one.max_running == 1
    assert one.requests == 50 and cont.tokens_per_s >= one.tokens_per_s * 0.99
    with pytest.raises(TypeError):
        register_scheduler("bad", object)  # type: ignore[arg-type]
    with pytest.raises(ServeInputError, match="did you mean: continuous"):
        get_scheduler("contin")
    assert isinstance(get_scheduler("chunked-prefill"), ChunkedPrefill)


# ---- calibration --------------------------------------------------------------------------------
def test_calibration_moves_the_time_model():
    setup = resolve(ServeSpec(model="llama-3.1-8b", gpu="h200", max_model_len=8192))
    base = Roofline(setup)
    assert base.compute_efficiency == pytest.approx(788.8 / 989) and base.memory_efficiency == pytest.approx(4258.8 / 4800)
    slow = Roofline(setup, Calibration(memory_efficiency=0.5, iteration_overhead_s=0.004))
    reqs = mixed(100, rate=2.0)
    pool = capacity(setup, 1280).layer_blocks
    a = simulate(setup, base, reqs, pool, "chunked-prefill")
    b = simulate(setup, slow, reqs, pool, "chunked-prefill")
    assert b.tpot_s.p50 > a.tpot_s.p50 * 1.5


def test_calibration_file(tmp_path):
    from planner.serving.roofline import load_calibration

    f = tmp_path / "cal.json"
    f.write_text('{"compute_efficiency": 0.6, "iteration_overhead_s": 0.002}')
    cal = load_calibration(f, {"memory_efficiency": 0.7})
    assert (cal.compute_efficiency, cal.memory_efficiency, cal.iteration_overhead_s) == (0.6, 0.7, 0.002)
    f.write_text('{"compute_efficency": 0.6}')
    with pytest.raises(ServeInputError, match="unknown key 'compute_efficency'"):
        load_calibration(f)
    f.write_text('{"compute_efficiency": 1.5}')
    with pytest.raises(ServeInputError, match="compute-efficiency"):
        load_calibration(f)


# ---- traffic ------------------------------------------------------------------------------------
def test_poisson_and_length_distributions():
    t = TrafficSpec(rate=5.0, requests=20000, prompt_dist="lognormal", prompt_len=1000, prompt_cv=1.0,
                    output_dist="normal", new_tokens=200, output_cv=0.2, seed=7)  # fmt: skip
    r = synthetic(t, 1 << 20)
    gaps = [b - a for a, b in zip(r.arrival, r.arrival[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.2, rel=0.03)
    assert sum(r.prompt) / len(r) == pytest.approx(1000, rel=0.05)
    assert sum(r.output) / len(r) == pytest.approx(200, rel=0.02)
    assert min(r.prompt) >= 1 and min(r.output) >= 1
    u = synthetic(TrafficSpec(requests=5000, prompt_dist="uniform", prompt_len=100, prompt_cv=0.5), 1 << 20)
    assert min(u.prompt) >= 100 - 87 and max(u.prompt) <= 100 + 87
    assert synthetic(TrafficSpec(requests=3, rate=math.inf), 4096).arrival == [0.0, 0.0, 0.0]
    clipped = synthetic(TrafficSpec(requests=2000, prompt_dist="lognormal", prompt_len=3000, prompt_cv=1.0), 4096)
    assert clipped.clipped > 0 and all(p + o <= 4096 for p, o in zip(clipped.prompt, clipped.output))


@pytest.mark.parametrize("rate", [0, -1.0, float("nan")])
def test_rate_must_be_positive(rate):
    with pytest.raises(ValueError):
        TrafficSpec(rate=rate)


def test_trace_csv(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("Arrival,Prompt_Tokens,output_tokens\n0.5,100,20\n0.0,50,10\n1.25,7,1\n")
    r = load_trace(f, 4096)
    assert r.arrival == [0.0, 0.5, 1.25] and r.prompt == [50, 100, 7] and r.output == [10, 20, 1]
    f.write_text("arrival,prompt\n0,10\n")
    with pytest.raises(ServeInputError, match="missing column"):
        load_trace(f, 4096)
    f.write_text("arrival,prompt_tokens,output_tokens\n0,10,5\n1,-3,5\n")
    with pytest.raises(ServeInputError, match="row 3: prompt_tokens must be a positive integer"):
        load_trace(f, 4096)
    f.write_text("arrival,prompt_tokens,output_tokens\n-1,10,5\n")
    with pytest.raises(ServeInputError, match=">= 0"):
        load_trace(f, 4096)
    f.write_text("arrival,prompt_tokens,output_tokens\n0,4000,500\n")
    with pytest.raises(ServeInputError, match="exceed max-model-len"):
        load_trace(f, 4096)
    with pytest.raises(ServeInputError, match="cannot read"):
        load_trace(tmp_path / "nope.csv", 4096)


# ---- speed --------------------------------------------------------------------------------------
def test_twenty_thousand_requests_in_well_under_the_budget():
    setup, roof, pool = engine()
    t = TrafficSpec(rate=20.0, requests=20000, prompt_dist="lognormal", prompt_len=1024, new_tokens=256)
    reqs = synthetic(t, 8192)
    start = time.perf_counter()
    rep = simulate(setup, roof, reqs, pool, "continuous")
    assert time.perf_counter() - start < 5.0  # the benchmark's budget is 10 s for 100,000
    assert rep.requests == 20000
