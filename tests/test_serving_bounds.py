"""`planner serve` refuses work it cannot finish (too many requests, runaway simulations, float
overflow) with one line on stderr, before doing the work where the inputs already say so; long runs
draw a progress bar on a terminal only.

The "before any work" claims are checked by behaviour: the functions that would do the work are
replaced by ones that fail the test if called. Bounds are shrunk with monkeypatch where the real
ones would make a test slow; the code reads them at call time, so the same code paths run.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from planner import cli
from planner.commands import serve as serve_cli
from planner.serving import service, simulator, traffic
from planner.serving.capacity import capacity, resolve
from planner.serving.roofline import Roofline
from planner.serving.schedulers import get_scheduler
from planner.serving.service import simulate
from planner.serving.simulator import Simulator, SimulationTooLong, reporting_progress
from planner.serving.specs import ServeInputError, ServeSpec, TrafficSpec
from planner.serving.traffic import MAX_REQUESTS, check_request_count, synthetic

BASE = ["serve", "--model", "llama-3.1-8b", "--gpu", "h100-sxm"]


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    if "serve" not in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, "serve", (serve_cli.HELP, serve_cli.add_arguments, serve_cli.run))


def run(argv, stderr=None):
    out, err = io.StringIO(), stderr or io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, out, err, prefix):
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"planner: error: {prefix}"), err


def _forbid(monkeypatch, *targets):
    """Make each (module, name) fail the test when called."""
    for module, name in targets:
        def boom(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} was called")

        monkeypatch.setattr(module, name, boom)


# ---- the request bound ----------------------------------------------------------------------------
def test_the_issue_example_is_refused_before_any_work(monkeypatch):
    import planner.models

    _forbid(monkeypatch, (service, "serve"), (service, "simulate"), (traffic, "synthetic"),
            (traffic, "poisson_arrivals"), (planner.models, "load_model"))  # fmt: skip
    code, out, err = run([*BASE, "--requests", "100000000"])
    assert_one_line_error(code, out, err, "requests: at most 1,000,000 requests are simulated (got 100,000,000); ")
    assert "memory and time grow with the count" in err and "per 100,000 on this machine" in err


def test_the_bound_itself_is_allowed():
    check_request_count(MAX_REQUESTS)
    with pytest.raises(ServeInputError, match=r"^requests: at most "):
        check_request_count(MAX_REQUESTS + 1)


def test_library_callers_get_the_bound_before_anything_is_drawn(monkeypatch):
    _forbid(monkeypatch, (traffic, "poisson_arrivals"), (traffic, "_draw"))
    with pytest.raises(ServeInputError, match=r"^requests: at most 1,000,000 requests"):
        synthetic(TrafficSpec(requests=MAX_REQUESTS + 1), 8192)


def test_capacity_only_ignores_the_request_count():
    code, out, err = run([*BASE, "--requests", "100000000", "--capacity-only"])
    assert code == 0 and "KV cache" in out, err


def _trace(path: Path, rows: int) -> Path:
    path.write_text("arrival,prompt_tokens,output_tokens\n" + "".join(f"{i * 0.1},100,20\n" for i in range(rows)))
    return path


def test_a_trace_beyond_the_bound_is_refused_before_simulating(tmp_path, monkeypatch):
    monkeypatch.setattr(traffic, "MAX_REQUESTS", 5)
    path = _trace(tmp_path / "t.csv", 5)
    code, out, err = run([*BASE, "--trace", str(path), "--json"])
    assert code == 0 and json.loads(out)["traffic"]["requests"] == 5, err
    _forbid(monkeypatch, (service, "simulate"))
    path = _trace(tmp_path / "t.csv", 6)
    code, out, err = run([*BASE, "--trace", str(path)])
    assert_one_line_error(code, out, err, f"trace: at most 5 requests are simulated (got more than 5 rows in {path})")


def test_a_trace_is_read_lazily_up_to_the_bound(tmp_path, monkeypatch):
    """Rows past the bound are never parsed: a bad row after it does not decide the error."""
    monkeypatch.setattr(traffic, "MAX_REQUESTS", 3)
    path = tmp_path / "t.csv"
    path.write_text("arrival,prompt_tokens,output_tokens\n0,10,10\n1,10,10\n2,10,10\n3,10,10\nnot,a,row\n")
    with pytest.raises(ServeInputError, match="^trace: at most 3 requests"):
        traffic.load_trace(path, 8192)


def test_a_trace_spanning_beyond_the_clock(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival,prompt_tokens,output_tokens\n0,10,10\n1e308,10,10\n")
    code, out, err = run([*BASE, "--trace", str(path)])
    assert_one_line_error(code, out, err, f"trace {path}: arrivals span 1e+308 s")


# ---- the other traffic inputs -----------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "field"), [
    (["--rate", "0"], "rate"),
    (["--rate", "-3"], "rate"),
    (["--rate", "nan"], "rate"),
    (["--rate", "5e-324"], "rate"),  # arrivals overflow to inf s: a NaN traceback before
    (["--requests", "0"], "requests"),
    (["--requests", "-5"], "requests"),
    (["--prompt-len", "0"], "prompt-len"),
    (["--prompt-len", "1000000000000"], "prompt-len"),
    (["--new-tokens", "1000000000000000"], "prompt-len + new-tokens"),
    (["--prompt-dist", "lognormal", "--prompt-cv", "1e300"], "prompt-cv"),  # NaN lengths before
    (["--prompt-dist", "uniform", "--prompt-cv", "inf"], "prompt-cv"),
    (["--output-dist", "normal", "--output-cv", "inf"], "output-cv"),  # an OverflowError before
    (["--output-dist", "lognormal", "--output-cv", "101"], "output-cv"),
    (["--prompt-cv", "nan", "--prompt-dist", "uniform"], "prompt-cv"),
])  # fmt: skip
def test_bad_traffic_is_one_line_and_never_simulated(monkeypatch, flags, field):
    _forbid(monkeypatch, (service, "simulate"))
    code, out, err = run([*BASE, "--requests", "50", *flags])
    assert_one_line_error(code, out, err, f"{field}: ")


def test_the_largest_cv_still_runs():
    code, out, err = run([*BASE, "--requests", "50", "--prompt-dist", "lognormal", "--prompt-cv", "100", "--json"])
    assert code == 0, err
    assert json.loads(out)["simulation"]["requests"] == 50


def test_a_runaway_clock_is_one_line():
    code, out, err = run([*BASE, "--requests", "2000", "--iteration-overhead-ms", "1e308"])
    assert_one_line_error(code, out, err, "simulation: chunked-prefill reached t = ")
    assert "--iteration-overhead-ms" in err


# ---- the step bound -----------------------------------------------------------------------------------
def _engine(**kw):
    setup = resolve(ServeSpec(**{"model": "llama-3.1-8b", "gpu": "h100-sxm", **kw}))
    return setup, Roofline(setup), capacity(setup, 1280).layer_blocks


def test_the_step_bound_stops_a_long_run(monkeypatch):
    monkeypatch.setattr(simulator, "CHECK_EVERY", 64)
    monkeypatch.setattr(simulator, "MAX_STEPS", 640)
    monkeypatch.setattr(simulator, "PROJECT_AFTER", 10**9)  # the hard bound alone
    code, out, err = run([*BASE, "--requests", "2000", "--json"])
    assert_one_line_error(code, out, err, "simulation: chunked-prefill reached the limit of 640 engine steps for 2,000 requests")


def test_a_thrashing_run_is_stopped_early_by_its_pace(monkeypatch):
    """300 sequences of 100,010 tokens admitted at once into a cache of about 4: each step preempts.
    The full run takes ~2.4M passes (14 s); its pace refuses it after the first checkpoint past PROJECT_AFTER."""
    monkeypatch.setattr(simulator, "CHECK_EVERY", 1024)
    monkeypatch.setattr(simulator, "PROJECT_AFTER", 8192)
    monkeypatch.setattr(simulator, "MAX_STEPS", 200_000)
    setup, roof, pool = _engine()
    t = TrafficSpec(requests=300, rate=math.inf, prompt_len=10, new_tokens=100_000)
    sim = Simulator(setup, roof, synthetic(t, setup.max_model_len), pool)
    with pytest.raises(SimulationTooLong, match=r"^simulation: chunked-prefill is on pace for [\d,]+ \(over the limit") as e:
        get_scheduler("chunked-prefill").run(sim)
    assert sim.passes < 200_000 and sim.done < 300 and sim.preemptions > 0
    assert "preemptions" in str(e.value) and "--max-num-seqs" in str(e.value)
    assert isinstance(e.value, ServeInputError)  # the CLI's bad-input path, exit 2


def test_an_ordinary_run_is_not_refused_by_its_pace(monkeypatch):
    """Pace projection on a steady run stays near its true total: a bound above it lets it finish."""
    monkeypatch.setattr(simulator, "CHECK_EVERY", 256)
    monkeypatch.setattr(simulator, "PROJECT_AFTER", 1024)
    setup, roof, pool = _engine()
    reqs = synthetic(TrafficSpec(requests=3000, rate=4.0), setup.max_model_len)
    free = Simulator(setup, roof, reqs, pool)
    get_scheduler("chunked-prefill").run(free)
    monkeypatch.setattr(simulator, "MAX_STEPS", free.passes + 1)
    bounded = simulate(setup, roof, reqs, pool, "chunked-prefill")
    assert bounded.requests == 3000 and bounded.iterations == free.report("chunked-prefill").iterations


# ---- static batching with a sliding window: closed form vs step by step ---------------------------------
@pytest.mark.parametrize(("prompt", "new"), [(1000, 6000), (5000, 2000), (4000, 97), (100, 3996), (7000, 1191)])
def test_static_sliding_window_closed_form_matches_the_step_by_step_sum(prompt, new):
    setup = resolve(ServeSpec(model="gemma-2-2b", gpu="h100-sxm"))
    assert setup.sliding_layers and setup.window  # the branch under test
    roof = Roofline(setup)
    pool = capacity(setup, prompt + new).layer_blocks
    t = TrafficSpec(requests=40, rate=math.inf, prompt_len=prompt, new_tokens=new, prompt_dist="uniform",
                    prompt_cv=0.2, output_dist="uniform", output_cv=0.2)  # fmt: skip
    reqs = synthetic(t, setup.max_model_len)
    fast = simulate(setup, roof, reqs, pool, "static", aggregate=True)
    ref = simulate(setup, roof, reqs, pool, "static", aggregate=False)
    assert fast.iterations == ref.iterations and fast.padded_tokens == ref.padded_tokens
    assert fast.duration_s == pytest.approx(ref.duration_s, rel=1e-9)
    assert fast.e2e_s.p99 == pytest.approx(ref.e2e_s.p99, rel=1e-9)


# ---- progress --------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reports_reach_every_request_of_every_scheduler(monkeypatch):
    monkeypatch.setattr(simulator, "CHECK_EVERY", 32)
    setup, roof, pool = _engine()
    reqs = synthetic(TrafficSpec(requests=500, rate=50.0), setup.max_model_len)
    calls: list[tuple[str, int, int]] = []
    with reporting_progress(lambda s, done, n: calls.append((s, done, n))):
        for name in ("static", "chunked-prefill"):
            simulate(setup, roof, reqs, pool, name)
    assert {n for _, _, n in calls} == {500}
    mid = [c for c in calls if c[0] == "chunked-prefill"]
    assert len(mid) > 1 and mid[-1] == ("chunked-prefill", 500, 500)  # checkpoints, then the end
    assert [d for _, d, _ in mid] == sorted(d for _, d, _ in mid)  # done never goes back
    assert calls[[c[0] for c in calls].index("chunked-prefill") - 1] == ("static", 500, 500)
    before = len(calls)
    simulate(setup, roof, reqs, pool, "static")  # outside the block: nobody is told
    assert len(calls) == before


def test_a_long_run_draws_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(serve_cli, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(serve_cli, "LONG_RUN_S", 0.0)
    monkeypatch.setattr(simulator, "CHECK_EVERY", 64)
    err = _Terminal()
    code, out, text = run([*BASE, "--requests", "3000", "--compare-schedulers", "static"], stderr=err)
    assert code == 0
    assert "simulating chunked-prefill" in text and "simulation, side by side" in out
    assert "simulating" not in out  # the bar stays on stderr


@pytest.mark.parametrize("terminal", [False, True])
def test_no_bar_with_json_or_without_a_terminal(monkeypatch, terminal):
    monkeypatch.setattr(serve_cli, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(serve_cli, "LONG_RUN_S", 0.0)
    monkeypatch.setattr(simulator, "CHECK_EVERY", 64)
    argv = [*BASE, "--requests", "3000"] + (["--json"] if terminal else [])
    code, out, err = run(argv, stderr=_Terminal() if terminal else io.StringIO())
    assert code == 0 and "simulating" not in err


def test_interrupt_is_one_line_not_a_traceback(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "serve", interrupted)
    code, out, err = run([*BASE, "--requests", "100"])
    assert code == 130 and out == "" and err == "planner: interrupted\n"
