"""The replayed programs (heldout-protocol.md): optimizers, the SFT step loop, generation."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# -------------------------------------------------------------------------------------------
# optimizers
# -------------------------------------------------------------------------------------------
class Bnb8bitAdamWReplay(torch.optim.Optimizer):
    """Allocates exactly what bitsandbytes 0.50.2's AdamW8bit / PagedAdamW8bit allocate on CUDA
    (Optimizer2State.init_state), without running their kernels (they cannot run on fake tensors):

    - parameters with numel < min_8bit_size (4096): fp32 state1, state2 like the parameter;
    - others: uint8 state1, state2 like the parameter, fp32 absmax1, absmax2 of ceil(numel/256),
      and the shared 256-entry fp32 quantization maps qmap1/qmap2 (moved to the GPU once);
    - paged: state buffers of parameters with numel >= 1e5 come from cudaMallocManaged (unified
      memory, outside the caching allocator): allocated here under the tracker's `alloc_exclude`
      so they are reported apart; absmax and small-parameter states stay on the device.
    The update itself (optimizer_update_8bit_blockwise / optimizer_update_32bit) works in place.
    """

    def __init__(self, params, *, paged: bool, tracker, lr: float = 1e-5, min_8bit_size: int = 4096):
        super().__init__(params, {"lr": lr})
        self.paged = paged
        self.tracker = tracker
        self.min_8bit_size = min_8bit_size
        self.qmaps: tuple[torch.Tensor, torch.Tensor] | None = None

    def _state_buffer(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.paged or p.numel() < 1e5:
            return torch.zeros_like(p, dtype=dtype)
        prev = self.tracker.alloc_exclude if self.tracker is not None else None
        if self.tracker is not None:
            self.tracker.alloc_exclude = "paged_optimizer_states"
        try:
            return torch.zeros_like(p, dtype=dtype)
        finally:
            if self.tracker is not None:
                self.tracker.alloc_exclude = prev

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["state1"] = self._state_buffer(p, torch.float32)
            state["state2"] = self._state_buffer(p, torch.float32)
            return
        if self.qmaps is None:
            self.qmaps = (torch.zeros(256, dtype=torch.float32), torch.zeros(256, dtype=torch.float32))
        state["state1"] = self._state_buffer(p, torch.uint8)
        state["qmap1"] = self.qmaps[0]
        state["state2"] = self._state_buffer(p, torch.uint8)
        state["qmap2"] = self.qmaps[1]
        blocks = -(-p.numel() // 256)
        state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32)
        state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                state["step"] += 1
        return None


def make_optimizer(plan, params: list[torch.Tensor], tracker) -> tuple[torch.optim.Optimizer, list[str]]:
    notes: list[str] = []
    name = plan.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, foreach=True), notes
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-5, fused=True), notes
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5, foreach=True), notes
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        notes.append(
            "bitsandbytes 8-bit AdamW replayed by allocating its states (its CUDA kernels update in place)"
        )
        return Bnb8bitAdamWReplay(params, paged=name.startswith("paged"), tracker=tracker), notes
    from planner.plugins import registry

    model = registry().optimizers.get(name)
    if model is None or model.build is None:
        raise ValueError(f"optimizer: '{name}' has no backend implementation")
    return model.build(params), notes


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


# -------------------------------------------------------------------------------------------
# SFT
# -------------------------------------------------------------------------------------------
def run_sft(plan, model, opt, tracker, vocab: int, steps: int, autocast: Callable[[], Any]) -> list[int]:
    """heldout-protocol.md's training step, repeated, each step's references released when it
    ends, as when each step is a function call (the H200 steps' reserved memory shows the measured
    programs did so: docs/allocator.md; keeping `out` into the next step makes three of twelve 10-21%
    high and changes none of their peaks). With plan.grad_accum > 1 (not
    part of the protocol), each step runs that many forward/backward micro-batches on
    `out.loss / grad_accum` before the optimizer step: gradients persist between micro-batches."""
    B, S = plan.batch, plan.seq
    accum = plan.grad_accum
    lm_head = model.get_output_embeddings()

    def to_loss_phase(_mod, _inp, _out):
        if tracker.phase == "forward":
            tracker.phase = "loss"

    handle = lm_head.register_forward_hook(to_loss_phase)
    step_end: list[int] = []
    out = None
    ids = None
    try:
        for step in range(steps):
            tracker.step = step
            for _micro in range(accum):
                tracker.phase = "forward"
                ids = torch.randint(0, vocab, (B, S))
                with autocast():
                    out = model(input_ids=ids, labels=ids)
                tracker.phase = "backward"
                (out.loss if accum == 1 else out.loss / accum).backward()
            tracker.phase = "optimizer"
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.phase = "between_steps"
            out = ids = None  # the step's locals go when it returns
            step_end.append(tracker.total)
    finally:
        handle.remove()
    del out, ids
    return step_end


# -------------------------------------------------------------------------------------------
# generation
# -------------------------------------------------------------------------------------------
class ScalarOracle:
    """Host-side reads (`.item()`, `bool(t)`) of the generation program, recorded on a real run
    and replayed in order on the fake run.

    `generate()` reads device values a FakeTensor does not have: special-token sanity checks,
    "is the mask all ones", and every step's "are all sequences finished". For the replayed
    program (all-ones mask, min_new_tokens == max_new_tokens) the answers do not depend on the
    weights or the width of the model, so they are recorded on a narrow real copy of the model
    (same vocabulary, special tokens, prompt and new tokens; batch min(batch, 2)). Each replayed read checks the
    dtype and size of what it reads against the recording, so a diverging program fails loudly.
    """

    def __init__(self) -> None:
        self.answers: list[tuple[str, int, Any]] = []
        self.pos = 0

    def record(self, t: torch.Tensor, value: Any) -> None:
        self.answers.append((str(t.dtype), t.numel(), value))

    def answer(self, t: torch.Tensor) -> Any:
        if self.pos >= len(self.answers):
            raise RuntimeError("generation replay made more host reads than the recorded run")
        dtype, numel, value = self.answers[self.pos]
        if (dtype, numel) != (str(t.dtype), t.numel()):
            raise RuntimeError(
                f"generation replay diverged at host read {self.pos}: "
                f"recorded {dtype}[{numel}], replay {t.dtype}[{t.numel()}]"
            )
        self.pos += 1
        return value


class _RecordReads(TorchDispatchMode):
    def __init__(self, oracle: ScalarOracle) -> None:
        super().__init__()
        self.oracle = oracle

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.oracle.record(args[0], out)
        return out


def narrow_config(config: dict) -> dict:
    """Same model type, vocabulary, special tokens and layer pattern; tiny width and depth."""
    d = dict(config)
    heads = int(d.get("num_attention_heads", 4))
    kv = int(d.get("num_key_value_heads") or heads)
    layers = min(int(d.get("num_hidden_layers", 2)), 2)
    d.update(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2 if kv < heads else 4,
        head_dim=16,
        num_hidden_layers=layers,
    )
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:layers]
    if "max_window_layers" in d:
        d["max_window_layers"] = min(int(d["max_window_layers"]), layers)
    return d


def record_generation_reads(
    plan,
    config: dict,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    full_decode: bool = False,
    batch: int | None = None,
) -> ScalarOracle:
    """Run the generation program for real on a narrow copy of the model, recording host reads."""
    from ._build import build_meta, materialize

    oracle = ScalarOracle()
    # generate() reads the same host values for any batch > 1 (batch 1 skips a padding check);
    # a replay whose reads differ in number, dtype or size fails loudly
    plan = plan.model_copy(update={"batch": batch or min(plan.batch, 2)})
    model, _ = build_meta(plan, narrow_config(config))
    model = materialize(model, None).model
    vocab = int(config["vocab_size"])

    class _NoTracker:
        phase = ""
        step = 0
        total = 0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small real ops: thread start-up costs more than it saves
    try:
        with _RecordReads(oracle), _fast_small_isin():
            run_generate(plan, model, _NoTracker(), vocab, autocast, full_decode)
    finally:
        torch.set_num_threads(threads)
    return oracle


@contextlib.contextmanager
def _fast_small_isin():
    """torch.isin(arange(vocab), eos_ids), which the min-length logits processors run every
    step, is slow on real CPU tensors for a 100k+ vocabulary; same values, computed by comparison."""
    orig = torch.isin

    @functools.wraps(orig)
    def isin(elements, test_elements, *args, **kwargs):
        if (
            not args
            and not kwargs
            and isinstance(elements, torch.Tensor)
            and isinstance(test_elements, torch.Tensor)
            and test_elements.numel() <= 16
        ):
            return (elements.unsqueeze(-1) == test_elements.reshape(-1)).any(-1)
        return orig(elements, test_elements, *args, **kwargs)

    torch.isin = isin
    try:
        yield
    finally:
        torch.isin = orig

def run_generate(
    plan,
    model,
    tracker,
    vocab: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    full_decode: bool = False,
) -> list[int]:
    """`model.generate(ids, attention_mask=ones, max_new_tokens=n, min_new_tokens=n,
    do_sample=False)` with transformers' default DynamicCache, run for real (host-side reads of
    fake tensors answered by a ScalarOracle).

    Unless full_decode: only the prefill, the first and the last decode forwards run the model;
    the decode forwards in between return logits of the model's shape and dtype, and the cache
    positions they would have added are added in one DynamicCache.update per layer just before
    the last forward (decode reads no cache length between steps). Every tensor of a decode step
    is at least as large at the last step as at any earlier one (the cache and the growing
    masks/ids), so the decode peak is the last step's; generate()'s own code (logits processors,
    stopping criteria, masks) runs at every step.
    `test_generate_shortcut_is_exact` checks the two give the same figures."""
    B, P, N = plan.batch, plan.prompt_len, plan.new_tokens
    tracker.phase = "prefill"
    tracker.step = 0
    ids = torch.randint(0, vocab, (B, P))
    mask = torch.ones(B, P, dtype=torch.long)
    with _generate_phases(model, tracker, N, full_decode), torch.no_grad(), autocast():
        res = model.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    tracker.phase = "between_steps"
    end = [tracker.total]
    del res
    return end


@contextlib.contextmanager
def _generate_phases(model, tracker, new_tokens: int, full_decode: bool, prefix: str = ""):
    """prefill = the first forward; decode = every later one (named `<prefix>prefill`, ...). Forward
    calls 0 (prefill), 1 and new_tokens-1 run the model; the others (unless full_decode) only return
    logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    state = {"calls": 0}
    # peft's generate() runs the transformers model's forward, not PeftModel.forward
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    orig_forward = base.forward

    @functools.wraps(orig_forward)  # generate() inspects the signature (logits_to_keep, ...)
    def forward(*args, **kwargs):
        k = state["calls"]
        state["calls"] += 1
        tracker.phase = prefix + ("prefill" if k == 0 else "decode")
        tracker.step = k
        if not full_decode and 1 < k < new_tokens - 1:
            # a middle decode step: the cache will have grown by one position (done in one go
            # before the last step); the logits have the shape the model would return
            state["pending"] = state.get("pending", 0) + 1
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            width, dtype = state["logits"]
            logits = torch.empty((input_ids.shape[0], 1, width), dtype=dtype)
            return CausalLMOutputWithPast(logits=logits, past_key_values=kwargs.get("cache", kwargs.get("past_key_values")))
        if state.get("pending"):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            n = state.pop("pending")
            for idx, layer in enumerate(cache.layers):
                keys, values = layer.keys, layer.values
                k_new = torch.empty((keys.shape[0], keys.shape[1], n, keys.shape[-1]), dtype=keys.dtype)
                v_new = torch.empty((values.shape[0], values.shape[1], n, values.shape[-1]), dtype=values.dtype)
                cache.update(k_new, v_new, idx)
                del k_new, v_new
        out = orig_forward(*args, **kwargs)
        state["logits"] = (out.logits.shape[-1], out.logits.dtype)
        return out

    base.forward = forward
    try:
        yield
    finally:
        del base.forward
