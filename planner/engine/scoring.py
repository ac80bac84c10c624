"""The memory timeline of a no-grad scoring forward: log-probabilities of given tokens.

The program: `with torch.no_grad(): logits = model(input_ids=ids, use_cache=False).logits`, then
`torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])`. Layers run without saving
anything; the peak is the largest layer's transients or the full batch x seq x vocab logits with
their fp32 copy and the fp32 log-softmax.
"""

from __future__ import annotations

from planner.architecture import ModelSpec
from planner.engine.resident import Resident, resident
from planner.engine.tape import DTYPE_BYTES, Sym
from planner.engine.timeline import CompiledTimeline, Timeline
from planner.engine.training import layer_cfg, resident_details, run_layer
from planner.specs import Plan


def _no_grad_forward(spec: ModelSpec, plan: Plan, keep_previous_logits: bool):
    """The timeline of a no-grad forward up to the full logits, and what later moments need."""
    res = resident(spec, plan)
    cfg = layer_cfg(spec, plan, res, training=False)
    dt = res.non_linear_dtype
    layer = run_layer(cfg, dt, False, grad=False)
    h = spec.hidden_size
    V = 1 if spec.head == "seq_cls" else spec.vocab_size  # a classification head scores each position once
    rope = Sym(t=2 * spec.head_dim * DTYPE_BYTES[dt]) if cfg.family in ("llama", "gemma2") else Sym()
    base = dict(parameters=Sym(c=res.param_bytes), buffers=Sym(c=res.buffer_bytes), other=Sym(c=res.quant_state_bytes))
    logits = Sym(t=V * DTYPE_BYTES[dt])
    embeds = Sym(t=h * DTYPE_BYTES[dt])  # `inputs_embeds`, referenced until the forward returns
    prev = logits if keep_previous_logits else Sym()
    tl = Timeline()
    for peak in layer.peaks:
        tl.add("forward", "last decoder layer", **base, activations=peak + rope + embeds + prev)
    tl.add("forward", "lm_head", **base, activations=Sym(t=h * DTYPE_BYTES[dt]) + embeds + logits + prev,
           details={"logits": logits + prev})
    return tl, res, base, logits, V, dt


def build(spec: ModelSpec, plan: Plan) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    tl, res, base, logits, V, dt = _no_grad_forward(spec, plan, keep_previous_logits=False)
    fp32 = Sym(t=V * 4)
    lsm = logits + fp32 + (fp32 if dt != "fp32" else Sym())
    tl.add("score", "log_softmax over fp32 logits", **base, activations=lsm,
           details={"logits_fp32": fp32 * (2 if dt != "fp32" else 1), **({"logits": logits} if dt != "fp32" else {})})
    return tl.compiled(), res, resident_details(res)


def build_forward(spec: ModelSpec, plan: Plan) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    """`with torch.no_grad(): logits = model(input_ids=ids).logits`, the logits kept by the program
    (a teacher's, for a student's loss). The previous step's logits are still bound while it runs."""
    tl, res, _, _, _, _ = _no_grad_forward(spec, plan, keep_previous_logits=True)
    return tl.compiled(), res, resident_details(res)
