"""Run a request trace on transformers' own engines, on the CPU, and count what they do.

Two real engines on one tiny random-weight llama (the counts do not depend on the weights:
greedy decoding with EOS disabled, every request generates exactly its output length):

- continuous batching: transformers' built-in engine (`model.init_continuous_batching`, the
  machinery behind `generate_batch`), paged attention (`paged|sdpa` on CPU), FIFO scheduler with a
  token budget per forward (`max_batch_tokens`) and at most `max_requests_per_batch` requests;
  requests are queued before the loop starts, so the run is deterministic;
- static batching: HF `generate` on left-padded batches of `batch_size` consecutive requests,
  each batch run to its longest output (`min_new_tokens = max_new_tokens`).

A forward pre-hook on the decoder counts forward passes and the query tokens fed to each
(`input_ids.numel()`, padding included). Useful tokens are the prompts plus every generated token
but the last (which is never fed back); padded tokens are the rest. The comparison is by forward
passes and padded tokens, not wall time (the CPU engine's wall time says nothing about a GPU).

The same trace is then simulated (`simulator.py`) with the schedulers that mirror each engine
(`chunked-prefill` with the same token budget and request limit; `static` with the batch size as
max_num_seqs), all requests arriving at t=0: the predicted forward passes and padded tokens are
reported beside the counted ones.

Needs torch and transformers (the `backends` extra); import it only where they are installed.
Regenerate the report: `python -m planner.backends.serving --out reports/validation/serving-cpu.md`.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}

# A mixed-length trace: short and long prompts, short and long outputs (the case where
# request-level batching pads most).
MIXED_PROMPTS: tuple[int, ...] = (5, 40, 12, 70, 9, 33, 100, 20)
MIXED_OUTPUTS: tuple[int, ...] = (30, 3, 17, 8, 25, 12, 4, 40)


class EngineRun(BaseModel):
    """What one engine did on one trace."""

    model_config = ConfigDict(frozen=True)

    engine: str
    requests: int
    forwards: int
    tokens: int  # query tokens fed to the model, padding included
    useful_tokens: int  # prompts + generated tokens but the last of each request
    padded_tokens: int
    outputs_ok: bool  # every request got exactly its output length
    wall_s: float
    settings: dict[str, Any]


class BackendComparison(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: list[int]
    output_tokens: list[int]
    continuous: EngineRun
    static: EngineRun
    simulated_continuous: dict[str, int]  # forwards, padded_tokens predicted by the simulator
    simulated_static: dict[str, int]


def tiny_model(config: dict[str, Any] | None = None, seed: int = 0) -> Any:
    """A random-weight LlamaForCausalLM (fp32, eval mode) from TINY_LLAMA updated with `config`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in {**TINY_LLAMA, **(config or {})}.items() if k not in ("model_type", "architectures")}
    cfg.pop("torch_dtype", None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_prompts(lengths: list[int] | tuple[int, ...], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts (token 0 is kept for padding)."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


@contextlib.contextmanager
def count_forwards(model: Any) -> Iterator[list[int]]:
    """Yields a list that gets the number of query tokens of every forward of `model`'s decoder."""
    calls: list[int] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is not None:
            calls.append(int(ids.numel()))
        else:
            emb = kwargs["inputs_embeds"]
            calls.append(int(emb.shape[0] * emb.shape[1]))

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _useful(prompts: list[list[int]], outputs: list[int]) -> int:
    return sum(len(p) for p in prompts) + sum(o - 1 for o in outputs)


def run_continuous(model: Any, prompts: list[list[int]], outputs: list[int], max_batch_tokens: int = 64,
                   max_requests: int = 8, page_size: int = 16, num_blocks: int = 1024,
                   timeout_s: float = 600.0) -> EngineRun:  # fmt: skip
    """The trace on transformers' continuous batching; all requests queued before the loop starts."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(outputs))
    settings = {"max_batch_tokens": max_batch_tokens, "max_requests_per_batch": max_requests,
                "page_size": page_size, "num_blocks": num_blocks, "use_cuda_graph": False,
                "allow_block_sharing": False}  # fmt: skip
    cb = ContinuousBatchingConfig(**settings)
    t0 = time.perf_counter()
    with count_forwards(model) as calls:
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        settings["attn_implementation"] = model.config._attn_implementation
        ids = [manager.add_request(p, max_new_tokens=o) for p, o in zip(prompts, outputs)]
        manager.start()
        results: dict[str, Any] = {}
        try:
            deadline = time.monotonic() + timeout_s
            while len(results) < len(ids):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"continuous batching: {len(results)}/{len(ids)} requests after {timeout_s:.0f}s")
                r = manager.get_result(timeout=0.05)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError("continuous batching: the generation thread stopped early")
        finally:
            manager.stop(block=True, timeout=10)
            manager.destroy()
    wall = time.perf_counter() - t0
    ok = all(len(results[i].generated_tokens) == o for i, o in zip(ids, outputs))
    fed = sum(calls)
    useful = _useful(prompts, outputs)
    return EngineRun(engine="transformers continuous batching", requests=len(prompts), forwards=len(calls),
                     tokens=fed, useful_tokens=useful, padded_tokens=fed - useful, outputs_ok=ok, wall_s=wall,
                     settings=settings)  # fmt: skip


def run_static(model: Any, prompts: list[list[int]], outputs: list[int], batch_size: int = 8) -> EngineRun:
    """The trace on HF generate, `batch_size` consecutive requests per left-padded batch."""
    import torch
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    ok = True
    with count_forwards(model) as calls, torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            bp, bo = prompts[s : s + batch_size], outputs[s : s + batch_size]
            width = max(len(p) for p in bp)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in bp])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in bp])
            n = max(bo)
            gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=n, min_new_tokens=n)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            ok = ok and out.shape[1] == width + n
    wall = time.perf_counter() - t0
    fed = sum(calls)
    useful = _useful(prompts, outputs)
    return EngineRun(engine="HF generate, static padded batches", requests=len(prompts), forwards=len(calls),
                     tokens=fed, useful_tokens=useful, padded_tokens=fed - useful, outputs_ok=ok, wall_s=wall,
                     settings={"batch_size": batch_size, "padding": "left"})  # fmt: skip


def simulate_trace(prompt_lens: list[int], outputs: list[int], scheduler: str, max_batch_tokens: int,
                   max_requests: int, config: dict[str, Any] | None = None, block_size: int = 16) -> dict[str, int]:  # fmt: skip
    """Forward passes and padded tokens the simulator predicts for the trace (all requests at t=0)."""
    from planner.serving.capacity import capacity, resolve
    from planner.serving.roofline import Roofline
    from planner.serving.service import simulate
    from planner.serving.specs import ServeSpec
    from planner.serving.traffic import Requests

    cfg = {**TINY_LLAMA, **(config or {})}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(cfg), encoding="utf-8")
        setup = resolve(ServeSpec(model=str(path), gpu="h100-sxm", max_num_seqs=max_requests,
                                  max_num_batched_tokens=max(max_batch_tokens, max_requests), block_size=block_size))  # fmt: skip
    cap = capacity(setup, max(p + o for p, o in zip(prompt_lens, outputs)))
    reqs = Requests(arrival=[0.0] * len(prompt_lens), prompt=list(prompt_lens), output=list(outputs), source="trace")
    rep = simulate(setup, Roofline(setup), reqs, cap.layer_blocks, scheduler)
    return {"forwards": rep.iterations, "padded_tokens": rep.padded_tokens,
            "tokens": rep.prefill_tokens + rep.decode_tokens, "preemptions": rep.preemptions}  # fmt: skip


def compare(prompt_lens: list[int] | tuple[int, ...] = MIXED_PROMPTS, outputs: list[int] | tuple[int, ...] = MIXED_OUTPUTS,
            max_batch_tokens: int = 128, max_requests: int = 4, batch_size: int | None = None,
            seed: int = 0) -> BackendComparison:  # fmt: skip
    """Run the trace on both engines and the simulator. `batch_size` defaults to `max_requests`: both
    engines then hold at most that many requests at once, and the trace has more requests than that."""
    bsz = batch_size or max_requests
    model = tiny_model(seed=seed)
    prompts = make_prompts(prompt_lens, TINY_LLAMA["vocab_size"], seed)
    outs = list(outputs)
    cont = run_continuous(model, prompts, outs, max_batch_tokens=max_batch_tokens, max_requests=max_requests)
    stat = run_static(model, prompts, outs, batch_size=bsz)
    sim_c = simulate_trace(list(prompt_lens), outs, "chunked-prefill", max_batch_tokens, max_requests)
    sim_s = simulate_trace(list(prompt_lens), outs, "static", max_batch_tokens, bsz)
    return BackendComparison(prompt_tokens=list(prompt_lens), output_tokens=outs, continuous=cont, static=stat,
                             simulated_continuous=sim_c, simulated_static=sim_s)  # fmt: skip


def markdown(cases: list[tuple[str, BackendComparison]], versions: dict[str, str]) -> str:
    lines = [
        "# Continuous vs static batching on transformers' CPU engines",
        "",
        "Generated by `python -m planner.backends.serving` (`planner/backends/serving.py`). A tiny random-weight",
        "llama (2 layers, hidden 64, 4 heads, 2 KV heads), greedy, EOS disabled, all requests queued at t=0.",
        "Counted with a forward pre-hook on the decoder: forward passes and query tokens fed (padding included).",
        "`sim` columns: the simulator's prediction for the same trace (`chunked-prefill` with the same token",
        "budget and request limit for the continuous engine, `static` with the same batch size).",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        "",
        "| trace | engine | forwards | sim forwards | tokens fed | useful | padded | sim padded | outputs ok | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, c in cases:
        for run, sim in ((c.continuous, c.simulated_continuous), (c.static, c.simulated_static)):
            lines.append(
                f"| {name} | {run.engine} ({', '.join(f'{k}={v}' for k, v in run.settings.items() if k in ('max_batch_tokens', 'max_requests_per_batch', 'batch_size', 'attn_implementation'))}) "
                f"| {run.forwards} | {sim['forwards']} | {run.tokens} | {run.useful_tokens} | {run.padded_tokens} "
                f"| {sim['padded_tokens']} | {run.outputs_ok} | {run.wall_s:.1f} |"
            )
    lines += ["", "Traces (prompt tokens / output tokens per request):", ""]
    for name, c in cases:
        lines.append(f"- {name}: prompts {c.prompt_tokens}; outputs {c.output_tokens}")
    lines += ["", "Wall time is the CPU engine's and is not compared (it says nothing about a GPU).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch
    import transformers

    p = argparse.ArgumentParser(description="continuous vs static batching on transformers' CPU engines")
    p.add_argument("--out", help="write the markdown report here (default: stdout)")
    p.add_argument("--requests", type=int, default=32, help="requests in the random mixed-length trace (default: 32)")
    args = p.parse_args(argv)
    rng = random.Random(1)
    n = args.requests
    rand_p = [rng.choice((4, 8, 16, 32, 64, 128)) + rng.randrange(4) for _ in range(n)]
    rand_o = [rng.choice((2, 4, 8, 16, 32, 64)) + rng.randrange(4) for _ in range(n)]
    cases = [
        ("mixed-8", compare()),
        ("mixed-8, one batch", compare(max_batch_tokens=64, max_requests=8)),
        (f"random-{n}", compare(rand_p, rand_o, max_batch_tokens=128, max_requests=8)),
    ]
    text = markdown(cases, {"torch": torch.__version__, "transformers": transformers.__version__})
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
