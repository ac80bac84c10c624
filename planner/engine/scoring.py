"""The memory timeline of a no-grad scoring forward: log-probabilities of given tokens.

The program: `with torch.no_grad(): logits = model(input_ids=ids, use_cache=False).logits`, then
`torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])`. Layers run without saving
anything; the peak is the largest layer's transients or the full batch x seq x vocab logits with
their fp32 copy and the fp32 log-softmax. A phase the program runs inside the plan's autocast
region (`Phase.autocast`: TRL scores the DPO reference inside compute_loss) computes its layers and
head in the autocast dtype (bf16 logits from casts of the head's input and weight); the others run
in the weights' dtypes. With `adapters=False` (peft's disable_adapter) no adapter op runs.
"""

from __future__ import annotations

import dataclasses

from planner.architecture import ModelSpec
from planner.engine.heads import TILED_HEADS, FusedTiles, fused_head_forward
from planner.engine.resident import Resident, resident
from planner.engine.tape import DTYPE_BYTES, Sym, Tape, tok
from planner.engine.timeline import CompiledTimeline, Timeline
from planner.engine.training import layer_cfg, resident_details, run_layer
from planner.specs import Plan


def _cfg(spec: ModelSpec, plan: Plan, res: Resident, adapters: bool, autocast: bool):
    cfg = layer_cfg(spec, plan, res, training=False)
    # peft's disable_adapter(): the adapters stay resident, the base layers run alone
    if not adapters:
        cfg = dataclasses.replace(cfg, loras={})
    if not autocast:  # the program runs this forward outside the plan's autocast region
        cfg = dataclasses.replace(cfg, autocast=None)
    return cfg


def _backbone(spec: ModelSpec, plan: Plan, adapters: bool, autocast: bool, prev: Sym = Sym()):
    """The no-grad decoder layers: a timeline with their peaks, and what the head needs."""
    res = resident(spec, plan)
    cfg = _cfg(spec, plan, res, adapters, autocast)
    dt = res.non_linear_dtype
    layer = run_layer(cfg, dt, False, grad=False)
    rope = Sym(t=2 * spec.head_dim * DTYPE_BYTES[dt]) if cfg.family in ("llama", "gemma2") else Sym()
    base = dict(parameters=Sym(c=res.param_bytes), buffers=Sym(c=res.buffer_bytes), other=Sym(c=res.quant_state_bytes))
    embeds = Sym(t=spec.hidden_size * DTYPE_BYTES[dt])  # `inputs_embeds`, referenced until the backbone returns
    tl = Timeline()
    for peak in layer.peaks:
        tl.add("forward", "last decoder layer", **base, activations=peak + rope + embeds + prev)
    return tl, res, cfg, layer, base, embeds


def _no_grad_forward(spec: ModelSpec, plan: Plan, keep_previous_logits: bool, adapters: bool = True,
                     autocast: bool = False):
    """The timeline of a no-grad forward up to the full logits, and what later moments need."""
    dt = resident(spec, plan).non_linear_dtype
    V = 1 if spec.head == "seq_cls" else spec.vocab_size  # a classification head scores each position once
    h = spec.hidden_size
    # under autocast the head computes in the autocast dtype from casts of its input and weight
    out_dt = (plan.compute_dtype if plan.autocast and autocast else None) or dt
    logits = Sym(t=V * DTYPE_BYTES[out_dt])
    prev = logits if keep_previous_logits else Sym()
    tl, res, _, _, base, embeds = _backbone(spec, plan, adapters, autocast, prev)
    casts = Sym(c=V * h * DTYPE_BYTES[out_dt], t=h * DTYPE_BYTES[out_dt]) if out_dt != dt else Sym()
    tl.add("forward", "lm_head", **base, activations=Sym(t=h * DTYPE_BYTES[dt]) + casts + embeds + logits + prev,
           details={"logits": logits + prev})
    return tl, res, base, logits, V, out_dt


def build(spec: ModelSpec, plan: Plan, loss: str = "logprobs", tiles: FusedTiles | None = None,
          adapters: bool = True, autocast: bool = False) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    if loss in TILED_HEADS:
        return build_fused(spec, plan, TILED_HEADS[loss], tiles or FusedTiles.for_positions(1 << 30), adapters,
                           autocast)
    tl, res, base, logits, V, dt = _no_grad_forward(spec, plan, keep_previous_logits=False, adapters=adapters,
                                                    autocast=autocast)
    if loss == "selective":  # TRL's Triton kernel: four fp32 per-token vectors beside the logits
        tl.add("score", "selective log-softmax kernel", **base, activations=logits + Sym(t=16), details={"logits": logits})
        return tl.compiled(), res, resident_details(res)
    fp32 = Sym(t=V * 4)
    lsm = logits + fp32 + (fp32 if dt != "fp32" else Sym())
    tl.add("score", "log_softmax over fp32 logits", **base, activations=lsm,
           details={"logits_fp32": fp32 * (2 if dt != "fp32" else 1), **({"logits": logits} if dt != "fp32" else {})})
    return tl.compiled(), res, resident_details(res)


def build_fused(spec: ModelSpec, plan: Plan, outputs: tuple[str, ...], tiles: FusedTiles,
                adapters: bool = True, autocast: bool = False) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    """`with torch.no_grad(): model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs` (TRL
    1.16.0's fused LM head, planner.engine.heads.fused): the layers, then the final norm's output,
    the gathered hidden states and one projection tile; no logits."""
    tl, res, cfg, layer, base, _ = _backbone(spec, plan, adapters, autocast)
    tp = Tape(grad=False)
    hn = tp.new(tok(spec.hidden_size), layer.out_dtype, False, "last_hidden_state")
    f = fused_head_forward(tp, hn, spec, cfg, res, tiles, outputs)
    tl.add("score", "fused lm_head tile", **base, activations=f.tile)
    return tl.compiled(), res, resident_details(res)


def build_forward(spec: ModelSpec, plan: Plan, autocast: bool = False) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    """`with torch.no_grad(): logits = model(input_ids=ids).logits`, the logits kept by the program
    (a teacher's, for a student's loss), released when the step ends."""
    tl, res, _, _, _, _ = _no_grad_forward(spec, plan, keep_previous_logits=False, autocast=autocast)
    return tl.compiled(), res, resident_details(res)
