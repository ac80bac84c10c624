"""The aten ops of a workload's phases, from the same replay that gives their memory.

A phase's program is a list of stretches in program order (the model's prologue, one decoder layer
repeated, the head, the loss, their backward, the optimizer step), each an OpList (planner.engine.
tape) with a repeat count, grouped by the tracker phase they run in (forward, loss, backward,
optimizer; prefill, decode). planner.engine.cost prices them; `phase_ops` expands them for the
comparison with the ops the dry run records from the real program.

The model-level ops follow transformers 5.24 as the dry run runs it (CUDA's behaviour): the
llama-family prologue is the embedding, create_causal_mask's ops for SDPA (arange, the cache
position arithmetic, and one host read: `(mask == 1).all()`), and the rotary embedding's cos/sin.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

from planner.architecture import ModelSpec
from planner.engine.heads import HEADS, TILED_HEADS, FusedTiles
from planner.engine.ops import ACCUMULATE_GRAD, SAVED_DETACH
from planner.engine.resident import Resident, resident
from planner.engine.tape import DTYPE_BYTES, Op, OpList, Sym
from planner.engine.training import layer_cfg, run_layer
from planner.specs import Plan

E, V = "elementwise", "view"
BACKWARD_CALL = "backward() call"  # the stretch of `loss.backward()`'s own Python (a train step's first)
ROTARY_FAMILIES = ("llama", "gemma2")


@dataclass(frozen=True)
class Stretch:
    """`repeat` copies of `ops` in a row (one decoder layer, L times); `sync`: the host waits for
    the device after it (a host read)."""

    name: str
    ops: OpList
    repeat: int = 1
    sync: bool = False
    per_sequence: bool = False  # sized per sequence (T = batch), not per token of the forward
    # in a phase run once per generated token: how many fewer times this stretch runs than the
    # phase (generate prepares no inputs after its last token)
    fewer: int = 0
    mode: str = "grad"  # nograd, grad (a forward autograd records), backward: the host cost of an op


@dataclass
class Program:
    """Stretches per tracker phase, phases in program order."""

    phases: dict[str, list[Stretch]] = field(default_factory=dict)

    def add(self, phase: str, name: str, ops: OpList, repeat: int = 1, sync: bool = False,
            per_sequence: bool = False, fewer: int = 0, mode: str = "grad") -> None:
        if repeat > 0 and (ops.ops or ops.modules or ops.calls):
            self.phases.setdefault(phase, []).append(Stretch(name, ops, repeat, sync, per_sequence, fewer, mode))

    def ops(self, phase: str | None = None, steps: int = 1) -> OpList:
        """The expanded op list of one phase (None: the whole program); a phase that runs once per
        generated token (decode) `steps` times."""
        out = OpList()
        for ph, stretches in self.phases.items():
            if phase is not None and ph != phase:
                continue
            for s in stretches:
                out.extend(s.ops, s.repeat * max(steps - s.fewer, 0) if s.fewer or steps != 1 else s.repeat)
        return out


def prologue_ops(spec: ModelSpec, emb_dtype: str, trainable_embeddings: bool, family: str,
                 input_rg: bool = False, mask: bool = True, single: bool = False,
                 attn: str = "sdpa") -> tuple[OpList, OpList]:
    """(forward, backward) ops of the model before its first layer: nn.Module calls of the model
    (CausalLM wrapper, backbone, embedding, rotary embedding), the embedding lookup, the causal
    mask (`attn` eager: built as a tensor), the rotary tables; the embedding's backward when it is
    trained. `single`: one sequence (the mask's position ids are not expanded to the batch)."""
    h = spec.hidden_size
    e = DTYPE_BYTES[emb_dtype]
    f, b = OpList(), OpList()
    f.modules += 3
    f.call("model_s")
    f.add(E, "embedding", bytes=Sym(t=2 * h * e + 8), dtype=emb_dtype)
    if trainable_embeddings:
        b.add(E, "embedding_dense_backward", bytes=Sym(c=spec.embedding_params * e, t=h * e + 8), dtype=emb_dtype)
        b.add(V, ACCUMULATE_GRAD, bytes=Sym(c=spec.embedding_params * e), dtype=emb_dtype)
    elif input_rg:  # enable_input_require_grads: the embedding output is a leaf that accumulates a grad
        b.add(V, "detach")
    if mask:  # generate() builds its inputs itself: no mask creation in its forwards
        # create_causal_mask (sdpa, no padding): cache_position = arange + past length, position
        # ids, _preprocess_mask_arguments' packed-sequence check and `fast_all(mask)`: one host read
        for name in ("arange", "add", "sub", "sub", "cat", "ne", "cumsum", "eq", "all"):
            f.add(E, name, bytes=Sym(t=16), dtype="int64")
        # _preprocess_mask_arguments expands the (1, S) position ids to the batch where it has more
        # than one sequence (`if batch_size != position_ids.shape[0]`, transformers 5.24 masking_utils)
        for name in ("unsqueeze",) + (() if single else ("expand",)) + ("slice", "slice", "slice", "select"):
            f.add(V, name)
        f.add("sync", "_local_scalar_dense")
    if attn == "eager":  # in every forward, generate()'s included
        f.extend(eager_mask_ops(emb_dtype))
    if family in ROTARY_FAMILIES:
        f.modules += 1
        hd = spec.head_dim
        f.add(V, "unsqueeze")
        # inv_freq @ positions in fp32 (_to_copy, mul), cat, cos and sin (each * attention_scaling),
        # both cast to the hidden dtype
        casts = 2 if emb_dtype != "fp32" else 0  # cos.to(x.dtype), sin.to(x.dtype): none for fp32
        for name, width in (("_to_copy", 1), ("mul", hd // 2), ("cat", hd), ("cos", hd), ("mul", hd),
                            ("sin", hd), ("mul", hd)) + (("_to_copy", hd),) * casts:
            f.add(E, name, bytes=Sym(t=2 * width * 4), dtype="fp32")
    return f, b


def eager_mask_ops(dtype: str) -> OpList:
    """create_causal_mask for eager attention, in every forward (transformers 5.25 eager_mask over
    sdpa_mask, no vmap): arange(B), arange(1), arange(S) + q_offset, arange(S) + kv_offset, each
    indexed to 4D (3 unsqueezes), `kv <= q`, expanded to the batch, then torch.where(mask, zeros((),
    dtype), finfo(dtype).min): the (B, 1, S, S) additive mask in the hidden states' dtype."""
    e = DTYPE_BYTES[dtype]
    f = OpList()
    for name in ("arange", "arange", "arange", "add", "arange", "add"):
        f.add(E, name, bytes=Sym(t=16), dtype="int64")
    f.add(V, "unsqueeze", count=12)
    f.add(E, "le", bytes=Sym(t=16, q=1), dtype="bool")
    f.add(V, "expand")
    f.add(E, "zeros", bytes=Sym(c=e), dtype=dtype)
    f.add(E, "scalar_tensor", bytes=Sym(c=e), dtype=dtype)
    f.add(E, "where", bytes=Sym(q=1 + e), dtype=dtype)
    return f


def optimizer_ops(name: str, res: Resident, extra: tuple[tuple[str, int, int], ...] = ()) -> OpList:
    """One `optimizer.step()` (+ zero_grad(set_to_none=True), which dispatches nothing) in the
    steady state: torch's foreach AdamW (CUDA's default: `_multi_tensor_adamw`) groups the trainable
    tensors by dtype (`_group_tensors_by_device_and_dtype`) and per group runs 8 _foreach_* ops
    (lerp/mul/addcmul on the moments, sqrt/div/add for the denominator, mul for weight decay,
    addcdiv for the update), steps its `step` counters on the host (lift_fresh and `_foreach_add_`:
    host ops, no kernel) and reads them back, two `.item()` per tensor for the bias corrections; inside two
    record_function scopes (bookkeeping). Bytes: passes over the group's elements in its dtype (read
    + written per op). `extra`: trainable tensors beside `res`'s, as (dtype, elements, tensors) (a head's,
    HeadRun.trainable)."""
    by_dtype: dict[str, list[int]] = {res.trainable_dtype: [res.trainable_elems, res.trainable_tensors]}
    for dt, elems, count in extra:
        g = by_dtype.setdefault(dt, [0, 0])
        g[0] += elems
        g[1] += count
    groups = [(dt, n, p) for dt, (n, p) in by_dtype.items() if p]
    tensors = sum(p for _, _, p in groups)
    out = OpList()
    out.call("optimizer_step_s")
    out.call("optimizer_tensor_s", tensors)
    out.add("other", "_record_function_enter_new", count=2)
    out.add("other", "_record_function_exit", count=2)
    for dt, n, p in groups:
        e = DTYPE_BYTES[dt]
        if name == "adamw":
            out.add("host", "lift_fresh")
            out.add("host", "_foreach_add_")
            out.add("host", "_local_scalar_dense", count=2 * p)
            # (op, passes over the elements: reads + writes)
            for op, passes in (("_foreach_mul_", 2), ("_foreach_lerp_", 3), ("_foreach_mul_", 2),
                               ("_foreach_addcmul_", 4), ("_foreach_sqrt", 2), ("_foreach_div_", 2),
                               ("_foreach_add_", 2), ("_foreach_addcdiv_", 4)):
                out.add("foreach", op, bytes=Sym(c=passes * n * e), dtype=dt, tensors=p)
        elif name == "adamw-fused":
            out.add("foreach", "_foreach_add_", bytes=Sym(c=8 * p), dtype="fp32", tensors=p)
            out.add("foreach", "_fused_adamw_", bytes=Sym(c=7 * n * e), dtype=dt, tensors=p)
        elif name == "sgd":
            out.add("foreach", "_foreach_add_", bytes=Sym(c=3 * n * e), dtype=dt, tensors=p)
        else:  # bitsandbytes' 8-bit optimizers: one update kernel per tensor
            out.add(E, "optimizer_update_8bit_blockwise", bytes=Sym(c=n * (3 * e + 2)), dtype=dt, count=p)
    return out


def checkpointed(layer) -> tuple[OpList, OpList, OpList]:
    """A decoder layer under transformers' gradient checkpointing (torch's non-reentrant
    checkpoint): (its forward, its recompute, its backward).

    The forward runs under saved-tensor hooks that keep nothing, so saved outputs are not detached.
    The recompute replays the forward until the last tensor its backward needs is saved and stops
    there (early stop: the last saving op's kernel and everything after it are not run). Every
    saved tensor that requires grad is detached twice, when the recompute packs it and when the
    backward unpacks it; the backward's own saved-output detaches go with the hooks. Host: one
    checkpoint() call (HostCosts.checkpoint_s) and three hook calls per saved tensor (saved_hook_s:
    pack in the forward, pack in the recompute, unpack in the backward). The hooks run for every
    saved tensor; `slots` counts those that require grad (33 of a llama layer's 38, 43 of 57 with
    LoRA, counted with saved_tensors_hooks on transformers 5.25): the hook count is that much low."""
    fwd = _without(layer.fwd.ops, SAVED_DETACH)
    fwd.modules = layer.fwd.modules
    fwd.call("checkpoint_s")  # the checkpoint() call's own Python (its forward's and recompute's set-up)
    fwd.call("saved_hook_s", layer.slots)  # torch.utils.checkpoint's pack hook, per saved tensor
    stop = layer.last_saving if layer.last_saving >= 0 else len(layer.fwd.ops)
    recompute = _without(layer.fwd.ops[:stop], SAVED_DETACH)
    recompute.add(V, "detach", count=2 * layer.slots)
    recompute.call("saved_hook_s", 2 * layer.slots)  # the recompute's pack hook and the backward's unpack
    recompute.modules = layer.fwd.modules
    bwd = _without(layer.bwd.ops, SAVED_DETACH)
    return fwd, recompute, bwd


def _with_layer_call(ops: OpList) -> OpList:
    """A decoder layer's forward ops with its own Python (HostCosts.layer_s) counted once."""
    if not ops.ops:
        return ops
    out = OpList(list(ops.ops), ops.modules, dict(ops.calls))
    out.call("layer_s")
    return out


def _host_call(name: str) -> OpList:
    """A call's own Python that dispatches no op, priced by the profile's HostCosts field `name`."""
    out = OpList()
    out.call(name)
    return out


def _without(ops, name: str) -> OpList:
    return OpList([op for op in ops if op.name != name])


def _without_one(ops: OpList, name: str, dtype: str) -> OpList:
    """`ops` less one op named `name` of `dtype` (the first; its count lowered by one)."""
    out, done = [], False
    for op in ops.ops:
        if not done and op.name == name and op.dtype == dtype:
            done = True
            if op.count > 1:
                out.append(dataclasses.replace(op, count=op.count - 1))
            continue
        out.append(op)
    return OpList(out, ops.modules, dict(ops.calls))


_cache: dict[tuple, tuple] = {}


def loss_program(ops: tuple[tuple[str, str, str], ...]) -> tuple[OpList, OpList]:
    """(forward, backward) of a technique's own loss ops (Phase.loss_ops): per-sequence values, a
    few bytes each; `loss.backward()` starts with ones_like."""
    f, b = OpList(), OpList()
    if not ops:
        return f, b
    if any(bwd for _, _, bwd in ops):
        b.add(E, "ones_like", bytes=Sym(c=8), dtype="fp32")
    for kind, name, bwd in ops:
        f.add(kind, name, bytes=Sym(t=16) if kind == E else Sym(), dtype="fp32")
        for item in filter(None, bwd.split(",")):
            bk, bn = item.split(":")
            b.add(bk, bn, bytes=Sym(t=16) if bk == E else Sym(), dtype="fp32")
    return f, b


def train_step_program(spec: ModelSpec, plan: Plan, loss: str = "causal_lm", tiles: FusedTiles | None = None,
                       passes: int = 1, loss_ops: tuple[tuple[str, str, str], ...] = (),
                       single: bool = False, micro_batches: int = 1) -> Program:  # fmt: skip
    """forward (prologue, L layers, head), loss, backward (the head's and the loss's, L layers with
    their recompute under checkpointing, the embedding's), optimizer. `single`: micro-batches of one
    sequence (the mask's position ids not expanded; ForCausalLMLoss's shifted labels need no copy).
    `micro_batches` > 1: gradient accumulation (`accumulated`)."""
    key = (id(spec), spec.id, spec.num_params, loss, tiles, passes, loss_ops, plan.method, plan.precision, plan.optimizer,
           plan.grad_ckpt, plan.attn, plan.lora_rank, plan.lora_targets, plan.quant, plan.double_quant, plan.kbit_prep,
           single, micro_batches)
    hit = _cache.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    if micro_batches > 1:
        one = train_step_program(spec, plan, loss, tiles, passes, loss_ops, single)
        prog = accumulated(one, micro_batches)
        _cache[key] = (spec, prog)
        return prog
    res = resident(spec, plan)
    cfg = dataclasses.replace(layer_cfg(spec, plan, res), one_sequence=single)
    L = spec.num_layers
    full = plan.method == "full"
    emb_dtype = res.non_linear_dtype
    input_rg = full or (plan.grad_ckpt and plan.method != "full")
    first = run_layer(cfg, emb_dtype, input_rg)
    steady = run_layer(cfg, first.out_dtype, True)
    if loss in TILED_HEADS:
        head = HEADS[loss](spec, cfg, res, steady.out_dtype, full, tiles=tiles or FusedTiles.for_positions(1 << 30))
    else:
        head = HEADS[loss](spec, cfg, res, steady.out_dtype, full)
    pro_f, pro_b = prologue_ops(spec, emb_dtype, full, cfg.family, input_rg, single=single, attn=plan.attn)
    head_loss = head.loss_ops
    if single and loss == "causal_lm":
        # labels[..., 1:].contiguous() of one row is contiguous already: no clone
        head_loss = _without_one(head_loss, "clone", "int64")
    if plan.grad_ckpt:
        fwd_layer, recompute, bwd_layer = checkpointed(steady)
        fwd0, bwd0 = fwd_layer, bwd_layer
    else:
        fwd_layer, recompute, bwd_layer = steady.fwd, OpList(), steady.bwd
        fwd0, bwd0 = first.fwd, first.bwd
    fwd0, fwd_layer, recompute = (_with_layer_call(x) for x in (fwd0, fwd_layer, recompute))
    prog = Program()
    for _ in range(passes):
        prog.add("forward", "prologue", pro_f)
        prog.add("forward", "decoder layer 0", fwd0)
        prog.add("forward", "decoder layer", fwd_layer, L - 1)
        prog.add("forward", "final norm and head", head.fwd_ops)
        prog.add("loss", "loss", head_loss)
        if head_loss.ops and not loss_ops:
            prog.add("loss", "loss function call", _host_call("loss_s"))
    tech_f, tech_b = loss_program(loss_ops)
    prog.add("loss", "the technique's loss", tech_f)
    if loss_ops:
        prog.add("loss", "the technique's loss function call", _host_call("loss_s"))
    prog.add("backward", BACKWARD_CALL, _host_call("backward_call_s"), mode="backward")
    prog.add("backward", "the technique's loss backward", tech_b, mode="backward")
    for _ in range(passes):
        prog.add("backward", "loss and head backward", head.bwd_ops, mode="backward")
        prog.add("backward", "decoder layer recompute", recompute, L)
        prog.add("backward", "decoder layer backward", bwd_layer, L - 1, mode="backward")
        prog.add("backward", "decoder layer 0 backward", bwd0, mode="backward")
        prog.add("backward", "embedding backward", pro_b, mode="backward")
    prog.add("optimizer", f"{plan.optimizer} step", optimizer_ops(plan.optimizer, res, head.trainable), mode="nograd")
    if len(_cache) > 1024:
        _cache.clear()
    _cache[key] = (spec, prog)
    return prog


def accumulated(one: Program, micro_batches: int) -> Program:
    """A step of `micro_batches` micro-batches (gradient accumulation, plugins/training.py): the
    forward, loss and backward stretches of `one` that many times, each backward started on
    `loss / grad_accum` (a 0-dim div, and DivBackward0's div of the gradient), the optimizer step once.
    In the later micro-batches each parameter's AccumulateGrad adds the new gradient into .grad in
    place (`add_`: reads both, writes one: 3 x its bytes) where the first stored it (a detach)."""
    div, div_backward = OpList(), OpList()
    div.add(E, "div", bytes=Sym(c=8), dtype="fp32")
    div_backward.add(E, "div", bytes=Sym(c=8), dtype="fp32")
    later = micro_batches - 1
    prog = Program()
    for part, stretches in one.phases.items():
        if part == "optimizer":
            continue
        for st in stretches:
            if part == "backward" and st.name == BACKWARD_CALL:
                prog.add(part, "loss / grad_accum", div, micro_batches)
                prog.add(part, "loss / grad_accum backward", div_backward, micro_batches, mode="backward")
            adds = _accumulating(st.ops)
            out = prog.phases.setdefault(part, [])
            if adds is st.ops:
                out.append(dataclasses.replace(st, repeat=st.repeat * micro_batches))
            else:  # the first micro-batch's AccumulateGrad stores .grad, the later ones add into it
                out += [st, dataclasses.replace(st, name=f"{st.name} (accumulating)", ops=adds, repeat=st.repeat * later)]
    for st in one.phases.get("optimizer", []):
        prog.phases.setdefault("optimizer", []).append(st)
    return prog


def repeated(one: Program, times: int) -> Program:
    """A program without an optimizer step run `times` times in a row (a phase once per micro-batch)."""
    prog = Program()
    for part, stretches in one.phases.items():
        prog.phases[part] = [dataclasses.replace(st, repeat=st.repeat * times) for st in stretches]
    return prog


def _accumulating(ops: OpList) -> OpList:
    """`ops` with each parameter's first-gradient AccumulateGrad (a detach) replaced by the in-place
    add of a later micro-batch; `ops` itself where it has none."""
    if not any(op.name == ACCUMULATE_GRAD for op in ops.ops):
        return ops
    out = OpList([Op(E, "add_", bytes=op.bytes * 3, dtype=op.dtype, count=op.count) if op.name == ACCUMULATE_GRAD
                  else op for op in ops.ops])
    out.modules, out.calls = ops.modules, dict(ops.calls)
    return out


# generate()'s work around each forward (transformers 5.24, greedy, min_new_tokens = max_new_tokens,
# as the dry run records it): preparing the next inputs (cache position, position ids), the logits
# of the last position in fp32, MinLength and MinNewTokensLength processors (isin, clone,
# scalar_tensor, where each), argmax, the finished-sequence arithmetic, cat of the ids, the stopping
# criteria (EOS check, max length) and one host read: `unfinished_sequences.max() == 0`
GENERATE_STEP_OPS: tuple[tuple[str, str], ...] = tuple(
    [(E, n) for n in ("arange", "add", "add", "cat", "arange", "isin", "clone", "scalar_tensor", "where",
                      "clone", "arange", "isin", "scalar_tensor", "where", "argmax", "mul", "rsub", "mul", "add", "cat",
                      "full", "full", "bitwise_or", "isin", "any", "bitwise_or", "bitwise_not", "bitwise_and", "max",
                      "eq")]
    + [(V, n) for n in ("view", "slice", "select", "unsqueeze", "slice")]
    + [("sync", "_local_scalar_dense")])
# the slices and clones of the inputs of the next forward, after every forward but the last
NEXT_INPUTS_OPS: tuple[tuple[str, str], ...] = ((V, "slice"), (E, "clone"), (V, "slice"), (E, "clone"))
# generate()'s set-up before the prefill: input checks and the attention mask (4 host reads), and with
# more than one sequence its right-padding check (`batch_size > 1`, transformers 5.24:
# torch.any(attention_mask[:, -1] == 0).item(): a select, an eq, an any and a host read)
GENERATE_SETUP_OPS: tuple[tuple[str, str], ...] = tuple(
    [(E, n) for n in ("ones_like", "isin", "any", "lt", "any", "cumsum", "sub", "eq", "masked_fill",
                      "eq", "all", "lt", "any", "ones", "clone")]
    + [(V, n) for n in ("lift_fresh", "lift_fresh", "unsqueeze", "select", "slice")]
    + [("sync", "_local_scalar_dense")] * 4)
RIGHT_PADDING_CHECK_OPS: tuple[tuple[str, str], ...] = ((V, "select"), (E, "eq"), (E, "any"),
                                                        ("sync", "_local_scalar_dense"))


SCORE_OPS = frozenset({"clone", "where", "argmax"})  # the processors' ops over the (batch, vocab) fp32 scores


def _fixed_ops(spec: tuple[tuple[str, str], ...], row_bytes: float, score_bytes: float = 0.0) -> OpList:
    """Small per-sequence ops (`row_bytes` each per sequence), those over the scores `score_bytes`."""
    out = OpList()
    for kind, name in spec:
        b = score_bytes if (name in SCORE_OPS and score_bytes) else row_bytes
        out.add(kind, name, bytes=Sym(t=b) if kind == E else Sym(), dtype="int64")
    return out


def generate_program(spec: ModelSpec, plan: Plan, loss_ops: tuple[tuple[str, str, str], ...] = (),
                     single: bool = False) -> Program:
    """model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False) on transformers'
    DynamicCache: set-up, the prefill (a no-grad forward over the prompt, logits of the last
    position), then per new token the same forward over one token per sequence. Each forward's
    layers append their K and V to the cache with torch.cat (a copy of the whole layer cache: its
    bytes grow with the context S), and each step ends in generate's bookkeeping and its host read.
    Sizes: T = batch x the forward's tokens (prompt, or 1), S = the context (prompt, or the cache).
    `single`: one sequence (no right-padding check in the set-up)."""
    key = ("generate", loss_ops, id(spec), spec.id, spec.num_params, plan.method, plan.precision, plan.attn, plan.lora_rank,
           plan.lora_targets, plan.quant, plan.double_quant, plan.kbit_prep, single)
    hit = _cache.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    res = resident(spec, plan)
    cfg = dataclasses.replace(layer_cfg(spec, plan, res, training=False), autocast=None, kv_cached=True,
                              one_sequence=single)
    act = res.non_linear_dtype
    layer = run_layer(cfg, act, False, grad=False)
    one = run_layer(dataclasses.replace(cfg, one_query=True), act, False, grad=False)  # a decode step's
    kv = spec.num_key_value_heads * spec.head_dim * DTYPE_BYTES[act]  # K (or V) bytes per token per layer
    # torch.cat([cache, new]) for K and for V: read the cache and the new tokens, write both. The
    # prefill's cache is empty (T new tokens); a decode step's holds the S - 1 earlier positions
    # of each sequence: bytes per step 2 x (S + 1) x kv per sequence, i.e. a T x S term
    prefill_cache, decode_cache = OpList(), OpList()
    prefill_cache.add(E, "cat", bytes=Sym(t=2 * kv), dtype=act, count=2)
    decode_cache.add(E, "cat", bytes=Sym(t=2 * kv, q=2 * kv), dtype=act, count=2)
    pro_f, _ = prologue_ops(spec, act, False, cfg.family, mask=False, attn=plan.attn)  # eager: a mask every forward
    from planner.engine.heads import final_norm
    from planner.engine.ops import Weight, linear
    from planner.engine.tape import Tape, tok

    tp = Tape(grad=False)
    x = tp.new(tok(spec.hidden_size), layer.out_dtype, False, "hidden")
    final_norm(tp, x, cfg)
    norm = tp.fwd
    tp = Tape(grad=False)
    tp.op(V, "slice")  # logits_to_keep = 1: the last position of each sequence only
    last = tp.new(tok(spec.hidden_size), layer.out_dtype, False, "last position")
    linear(tp, last, Weight(spec.hidden_size, spec.vocab_size, res.non_linear_dtype, False), None, "lm_head")
    step = _fixed_ops(GENERATE_STEP_OPS, 8.0, score_bytes=2 * 4 * spec.vocab_size)
    # next_token_logits = outputs.logits[:, -1, :].to(torch.float32)
    step.ops.append(Op(E, "_to_copy", bytes=Sym(t=spec.vocab_size * (DTYPE_BYTES[act] + 4)), dtype="fp32"))
    step.call("generate_step_s")
    prog = Program()
    setup = _fixed_ops(GENERATE_SETUP_OPS + (() if single else RIGHT_PADDING_CHECK_OPS), 8.0)
    setup.call("generate_call_s")
    prog.add("setup", "generate set-up", setup, sync=True, per_sequence=True, mode="nograd")
    # the technique's ops around its generation (preparing the prompts, a reward function)
    prog.add("setup", "the technique's ops", loss_program(loss_ops)[0], per_sequence=True, mode="nograd")
    nxt = _fixed_ops(NEXT_INPUTS_OPS, 8.0)
    first_update = OpList()
    first_update.add(V, "lift_fresh", count=2)  # DynamicLayer's lazy initialisation (prefill only)
    decode_layer = OpList([_decode_attention(op, kv) for op in one.fwd.ops], one.fwd.modules, dict(one.fwd.calls))
    # a decode step's SDPA sees a key length it has not seen before: a backend that builds a plan per
    # shape (cuDNN's SDPA builds and caches an execution graph) builds one per step, at the first
    # layer (the others find it cached); the prefill's shape is the warm-up call's
    decode_pro = _merge(pro_f, _host_call("attention_plan_s"))
    for phase in ("prefill", "decode"):
        prog.add(phase, "prologue", pro_f if phase == "prefill" else decode_pro, mode="nograd")
        layer_ops = _with_layer_call(_merge(layer.fwd, prefill_cache) if phase == "prefill"
                                     else _merge(decode_layer, decode_cache))
        prog.add(phase, "decoder layer", _merge(layer_ops, first_update) if phase == "prefill" else layer_ops,
                 spec.num_layers, mode="nograd")
        prog.add(phase, "final norm", norm, mode="nograd")
        prog.add(phase, "last-position logits", tp.fwd, per_sequence=True, mode="nograd")
        prog.add(phase, "next token", step, sync=True, per_sequence=True, mode="nograd")
        prog.add(phase, "inputs of the next forward", nxt, per_sequence=True, fewer=1 if phase == "decode" else 0,
                 mode="nograd")
    if len(_cache) > 1024:
        _cache.clear()
    _cache[key] = (spec, prog)
    return prog


def _decode_attention(op: Op, kv: int) -> Op:
    """A decode step's SDPA: each new token attends to all S cached positions (not the causal
    T(S + 1)/2 pairs of a prefill), and reads the cache's K and V."""
    if op.kind != "attention":
        return op
    per_pair = 2 * op.flops.t  # 4 x heads x dim
    dims = (op.dims[0], 1) if op.dims else op.dims  # one query row (planner.profiles.attention_pass)
    return Op(op.kind, op.name, Sym(q=per_pair), op.bytes + Sym(q=2 * kv), op.dtype, op.count, dims=dims)


def _merge(a: OpList, b: OpList) -> OpList:
    out = OpList(list(a.ops), a.modules, dict(a.calls))
    out.extend(b)
    return out


def forward_program(spec: ModelSpec, plan: Plan, kind: str = "score", adapters: bool = True,
                    autocast: bool = False, loss_ops: tuple[tuple[str, str, str], ...] = (),
                    single: bool = False) -> Program:  # fmt: skip
    """A no-grad forward over full sequences (planner.engine.scoring's programs): `model(ids).logits`
    (kind "forward": a teacher's logits, kept) or followed by log_softmax(logits.float()).gather(ids)
    (kind "score": a reference's log-probabilities). One phase, named after the kind. `single`: one
    sequence (the mask's position ids not expanded)."""
    from planner.engine.heads import final_norm
    from planner.engine.ops import Weight, cast, linear, unary
    from planner.engine.tape import Tape, tok

    key = ("forward", kind, adapters, autocast, loss_ops, id(spec), spec.id, spec.num_params, spec.head, plan.method,
           plan.precision, plan.attn, plan.lora_rank, plan.lora_targets, plan.quant, plan.double_quant, plan.kbit_prep,
           single)
    hit = _cache.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    res = resident(spec, plan)
    cfg = dataclasses.replace(layer_cfg(spec, plan, res, training=False), one_sequence=single)
    wrappers = 0
    if not adapters:  # peft's disable_adapter(): each lora.Linear still runs, as `self.base_layer(x)`
        # the LoRA-wrapped Linears (cfg.loras holds each under its path and its name)
        wrappers = sum(1 for lin in spec.layer_linears if lin.path in cfg.loras)
        cfg = dataclasses.replace(cfg, loras={})
    if not autocast:
        cfg = dataclasses.replace(cfg, autocast=None)
    act = res.non_linear_dtype
    layer = run_layer(cfg, act, False, grad=False)
    pro_f, _ = prologue_ops(spec, act, False, cfg.family, single=single, attn=plan.attn)
    tp = Tape(grad=False)
    x = tp.new(tok(spec.hidden_size), layer.out_dtype, False, "hidden")
    hn = final_norm(tp, x, cfg)
    if spec.head != "seq_cls":
        tp.op(V, "alias")  # hidden_states[:, slice(-logits_to_keep, None)]: the LM head's, not the score's
    out_features = 1 if spec.head == "seq_cls" else spec.vocab_size
    logits = linear(tp, hn, Weight(spec.hidden_size, out_features, res.non_linear_dtype, False), cfg.autocast, "head")
    if spec.head == "seq_cls":  # transformers' pooling at the last non-pad token (heads.pairwise)
        for name in ("ne", "_to_copy", "arange", "mul", "argmax", "arange"):
            tp.op(E, name, bytes=Sym(t=8), dtype="int64")
        tp.op(E, "index", bytes=Sym(t=4), dtype=logits.dtype)
    elif kind == "score":
        lf = cast(tp, logits, "fp32", "logits.float")
        unary(tp, lf, "log_softmax", aten="_log_softmax")
        tp.op(V, "unsqueeze")
        tp.op(E, "gather", bytes=Sym(t=16), dtype="fp32")
        tp.op(V, "squeeze")
    prog = Program()
    prog.add(kind, "prologue", pro_f, mode="nograd")
    layer_fwd = _with_layer_call(layer.fwd)
    layer_fwd = OpList(layer_fwd.ops, layer_fwd.modules + wrappers, dict(layer_fwd.calls))
    prog.add(kind, "decoder layer", layer_fwd, spec.num_layers, mode="nograd")
    prog.add(kind, "final norm, head and log-probabilities", tp.fwd, mode="nograd")
    prog.add(kind, "the technique's ops on the scores", loss_program(loss_ops)[0], mode="nograd")
    if wrappers:  # the context manager itself: per LoRA layer, off on entry and on again at exit
        prog.add(kind, "peft's disable_adapter()", OpList(calls={"disable_adapter_s": wrappers * spec.num_layers}),
                 mode="nograd")
    if len(_cache) > 1024:
        _cache.clear()
    _cache[key] = (spec, prog)
    return prog
