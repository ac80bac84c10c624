"""Request streams for the simulator: Poisson arrivals with length distributions, or a trace CSV.

A stream is three equal-length lists (arrival seconds, prompt tokens, output tokens), sorted by
arrival. Lengths are drawn with the mean the user gives and a coefficient of variation (std/mean):

- fixed: every request the mean;
- uniform: mean x (1 +- sqrt(3) cv), the uniform law with that cv;
- normal: N(mean, (cv x mean)^2);
- lognormal: sigma^2 = ln(1 + cv^2), mu = ln(mean) - sigma^2 / 2 (so the mean is the mean).

Draws are rounded and clipped to at least one token, and to the engine's max_model_len (prompt
at most max_model_len - 1, prompt + output at most max_model_len, as vLLM caps generation); the
number of clipped requests is reported. Given lengths that cannot fit at all are bad input.

The trace CSV has a header; columns (case-insensitive, aliases accepted): `arrival` (seconds),
`prompt_tokens`, `output_tokens`. Pure Python (random, csv): importing numpy would cost more than
drawing 100,000 requests.

A stream holds at most MAX_REQUESTS requests: the simulator keeps every request's latencies for the
percentiles, so its memory and time grow with the count (`check_request_count`, also called by the
CLI before it loads anything).
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from planner.serving.specs import ServeInputError, TrafficSpec

# The most requests one stream may hold. Measured on the 2-core dev machine (Python 3.11), default
# traffic (Poisson 4/s, 1024 + 256 tokens), llama-3.1-8b on h100-sxm, chunked-prefill, `planner
# serve --json` end to end:
#   100,000 requests: 3.5 s, 74 MB peak RSS;  1,000,000 requests: 30 s, 440 MB peak RSS
# i.e. about 3 s and ~415 bytes (RSS) per additional request. tracemalloc at 200,000 requests puts
# 370 B/request in Python objects: stream 48, simulator arrays 64, state grown by the run 150
# (2.8 loop passes per request: KV samples, first/finish floats, heaps), report 108 (latency lists
# and their sorted copies). 100,000,000 requests, unbounded, ran 47 s into a MemoryError.
# --compare-schedulers multiplies the time (one simulation per scheduler), not the memory (each
# simulator is dropped before the next).
MAX_REQUESTS = 1_000_000
SECONDS_PER_100K = 3
# Coefficients of variation beyond this put nearly every draw at 1 token or at max-model-len, and
# much larger ones overflow the samplers (an infinite or NaN length); real traces sit below 3.
MAX_CV = 100.0

COLUMNS: dict[str, tuple[str, ...]] = {
    "arrival": ("arrival", "arrival_s", "arrival_time", "timestamp", "time", "t"),
    "prompt_tokens": ("prompt_tokens", "prompt", "prompt_len", "input_tokens", "input_len", "input_length"),
    "output_tokens": ("output_tokens", "output", "output_len", "new_tokens", "max_tokens", "output_length"),
}


@dataclass
class Requests:
    """A request stream, sorted by arrival."""

    arrival: list[float]
    prompt: list[int]
    output: list[int]
    clipped: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrival)


def check_request_count(n: int, field: str = "requests", got: str | None = None) -> None:
    """One-line error for a stream above MAX_REQUESTS, before anything is drawn, read or simulated."""
    if n > MAX_REQUESTS:
        raise ServeInputError(
            f"{field}: at most {MAX_REQUESTS:,} requests are simulated (got {got or f'{n:,}'}); memory and time grow "
            f"with the count (about {SECONDS_PER_100K:g} s per 100,000 on this machine)"
        )


def _check_cv(field: str, cv: float) -> None:
    if not (math.isfinite(cv) and 0 <= cv <= MAX_CV):
        raise ServeInputError(f"{field}: must be a number from 0 to {MAX_CV:g} (got {cv:g}); a larger spread puts "
                              "nearly every length at 1 token or at max-model-len")


def _draw(rng: random.Random, dist: str, mean: float, cv: float, n: int) -> list[int]:
    if dist == "fixed" or cv == 0:
        return [int(mean)] * n
    if dist == "uniform":
        half = math.sqrt(3.0) * cv * mean
        lo, hi = mean - half, mean + half
        return [max(1, round(rng.uniform(lo, hi))) for _ in range(n)]
    if dist == "normal":
        sd = cv * mean
        return [max(1, round(rng.gauss(mean, sd))) for _ in range(n)]
    if dist == "lognormal":
        s2 = math.log1p(cv * cv)
        mu, sigma = math.log(mean) - s2 / 2, math.sqrt(s2)
        return [max(1, round(rng.lognormvariate(mu, sigma))) for _ in range(n)]
    raise ServeInputError(f"length distribution: unknown '{dist}' (fixed, uniform, normal, lognormal)")


def poisson_arrivals(rate: float, n: int, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process (first request at t=0); rate inf: all at t=0."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, [0.0] * n
    expo = rng.expovariate
    for i in range(1, n):
        t += expo(rate)
        out[i] = t
    return out


def _clip(prompt: list[int], output: list[int], max_len: int) -> int:
    clipped = 0
    for i, (p, o) in enumerate(zip(prompt, output)):
        if p + o > max_len:
            clipped += 1
            p = min(p, max_len - 1)
            prompt[i], output[i] = p, max_len - p
    return clipped


def synthetic(t: TrafficSpec, max_model_len: int) -> Requests:
    """Poisson arrivals at t.rate, lengths from t's distributions, seeded by t.seed."""
    check_request_count(t.requests)
    fixed_p = t.prompt_dist == "fixed" or t.prompt_cv == 0
    fixed_o = t.output_dist == "fixed" or t.output_cv == 0
    if fixed_p and t.prompt_len >= max_model_len:
        raise ServeInputError(f"prompt-len: {t.prompt_len} leaves no room to generate within max-model-len {max_model_len}")
    if fixed_p and fixed_o and t.prompt_len + t.new_tokens > max_model_len:
        raise ServeInputError(
            f"prompt-len + new-tokens: {t.prompt_len} + {t.new_tokens} exceeds max-model-len {max_model_len}"
        )
    if not fixed_p:
        _check_cv("prompt-cv", t.prompt_cv)
    if not fixed_o:
        _check_cv("output-cv", t.output_cv)
    rng = random.Random(t.seed)
    arrival = poisson_arrivals(t.rate, t.requests, rng)
    if not math.isfinite(arrival[-1]) or arrival[-1] > MAX_TIME_S:
        raise ServeInputError(f"rate: {t.rate:g} requests/s spreads {t.requests:,} arrivals over {arrival[-1]:g} s, "
                              f"beyond the {MAX_TIME_S:g} s the simulated clock can carry")
    prompt = _draw(rng, t.prompt_dist, t.prompt_len, t.prompt_cv, t.requests)
    output = _draw(rng, t.output_dist, t.new_tokens, t.output_cv, t.requests)
    clipped = _clip(prompt, output, max_model_len)
    rate = "all at t=0" if math.isinf(t.rate) else f"Poisson {t.rate:g}/s"
    src = (f"{t.requests} requests, {rate}, prompt {t.prompt_dist} {t.prompt_len}"
           + ("" if fixed_p else f" cv {t.prompt_cv:g}") + f", output {t.output_dist} {t.new_tokens}"
           + ("" if fixed_o else f" cv {t.output_cv:g}") + f", seed {t.seed}")  # fmt: skip
    notes = [f"{clipped} requests clipped to max-model-len {max_model_len}"] if clipped else []
    return Requests(arrival, prompt, output, clipped=clipped, source=src, notes=notes)


# Arrival times (s) above this are refused: the clock is a float, and sums near 1.8e308 overflow to
# inf (what a rate of 5e-324/s did). 1e15 s is 30 million years, beyond any trace.
MAX_TIME_S = 1e15


def _column(header: list[str], name: str) -> int | None:
    low = [h.strip().lower() for h in header]
    for alias in COLUMNS[name]:
        if alias in low:
            return low.index(alias)
    return None


def _number(text: str, where: str, col: str, integer: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ServeInputError(f"{where}: {col} is not a number (got {text.strip()!r})") from None
    if math.isnan(v) or math.isinf(v):
        raise ServeInputError(f"{where}: {col} must be finite (got {text.strip()!r})")
    if integer:
        if v != int(v) or v < 1:
            raise ServeInputError(f"{where}: {col} must be a positive integer (got {text.strip()})")
    elif v < 0:
        raise ServeInputError(f"{where}: {col} must be >= 0 seconds (got {text.strip()})")
    return v


def load_trace(path: str | Path, max_model_len: int) -> Requests:
    """A trace CSV (arrival, prompt_tokens, output_tokens), sorted by arrival, checked row by row."""
    try:
        return _read_trace(Path(path), max_model_len)
    except (OSError, UnicodeDecodeError) as e:
        raise ServeInputError(f"trace: cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    except csv.Error as e:
        raise ServeInputError(f"trace {path}: not a CSV file ({e})") from None


def _read_trace(p: Path, max_model_len: int) -> Requests:
    path = str(p)
    # Read row by row, so that a trace above MAX_REQUESTS is refused at row MAX_REQUESTS + 2 rather
    # than after loading a file of any size into memory.
    with p.open(encoding="utf-8", newline="") as f:
        rows = (r for r in csv.reader(f) if r and any(c.strip() for c in r))
        header = next(rows, None)
        if header is None:
            raise ServeInputError(f"trace {path}: empty file (expected a header: arrival, prompt_tokens, output_tokens)")
        out = _trace_rows(path, header, rows, max_model_len)
    out.sort(key=lambda r: r[0])
    t0 = out[0][0]
    if out[-1][0] - t0 > MAX_TIME_S:
        raise ServeInputError(f"trace {path}: arrivals span {out[-1][0] - t0:g} s, beyond the {MAX_TIME_S:g} s "
                              "the simulated clock can carry")
    return Requests(
        arrival=[a - t0 for a, _, _ in out], prompt=[r[1] for r in out], output=[r[2] for r in out],
        source=f"trace {path} ({len(out)} requests)",
    )  # fmt: skip


def _trace_rows(path: str, header: list[str], rows: Iterator[list[str]], max_model_len: int) -> list[tuple[float, int, int]]:
    idx = {name: _column(header, name) for name in COLUMNS}
    missing = [name for name, i in idx.items() if i is None]
    if missing:
        found = ", ".join(h.strip() for h in header) or "nothing"
        raise ServeInputError(
            f"trace {path}: missing column(s) {', '.join(missing)} (expected arrival, prompt_tokens, output_tokens; "
            f"found: {found})"
        )
    ia, ip, io = idx["arrival"], idx["prompt_tokens"], idx["output_tokens"]
    assert ia is not None and ip is not None and io is not None
    width = max(ia, ip, io)
    out: list[tuple[float, int, int]] = []
    for n, row in enumerate(rows, start=2):
        if n - 1 > MAX_REQUESTS:
            check_request_count(n - 1, field="trace", got=f"more than {MAX_REQUESTS:,} rows in {path}")
        where = f"trace {path} row {n}"
        if len(row) <= width:
            raise ServeInputError(f"{where}: {len(row)} fields, expected at least {width + 1}")
        a = _number(row[ia], where, header[ia].strip(), integer=False)
        pr = int(_number(row[ip], where, header[ip].strip(), integer=True))
        o = int(_number(row[io], where, header[io].strip(), integer=True))
        if pr + o > max_model_len:
            raise ServeInputError(f"{where}: {pr} prompt + {o} output tokens exceed max-model-len {max_model_len}")
        out.append((a, pr, o))
    if not out:
        raise ServeInputError(f"trace {path}: no requests after the header")
    return out


def requests_for(t: TrafficSpec, max_model_len: int) -> Requests:
    """The stream a TrafficSpec describes: its trace if it names one, else synthetic traffic."""
    if t.trace:
        return load_trace(t.trace, max_model_len)
    return synthetic(t, max_model_len)
