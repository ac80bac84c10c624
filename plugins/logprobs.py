"""Sequence log-probabilities of given tokens, the two ways alignment programs compute them
(the plan field `logprobs`); both run inside the techniques' step functions.

- full: `log_softmax(model(ids).logits.float(), -1).gather(-1, ids)` summed per sequence, the
  hand-written program of shared/notes/heldout-protocol.md: batch x seq x vocab logits, their fp32
  copy and the fp32 log-softmax (saved for backward).
- selective: `trl.trainer.utils.selective_log_softmax(model(ids).logits, ids)` summed per sequence
  (TRL 1.16.0; what its ORPO/CPO trainers call): on CUDA a Triton kernel that keeps the logits (in
  their dtype) for backward and allocates only per-token vectors; no fp32 copy, no log-softmax.
- fused: TRL 1.16.0's fused LM head, as its DPOTrainer runs it: `add_fused_lm_head(model, outputs=...)`
  once, then `model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False).log_probs`
  summed per sequence. The head projects the last hidden states in tiles of 4096 tokens x 32768
  vocabulary entries and folds each tile into per-token online log-sum-exp statistics; the logits
  never exist.
On CUDA both TRL paths run Triton kernels; planner.backends.dryrun._patches.trl_triton_kernels makes CPU
runs allocate what those kernels allocate.
"""

from __future__ import annotations

from typing import Any

TRL_VERSION = "1.16.0"
# DPOTrainer (TRL 1.16.0) patches the policy with these outputs (entropy, mean logits and top-1 feed
# its metrics, not the loss) and a separate reference model with the default ("log_probs",)
POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
REFERENCE_OUTPUTS = ("log_probs",)


def ensure_fused_head(model: Any, outputs: tuple[str, ...]) -> None:
    """`add_fused_lm_head` on the model (on the base model under peft, as TRL does), once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_planner_fused_outputs", None) is not None:
        return
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base, outputs=outputs)
    base._planner_fused_outputs = outputs


def sequence_logprobs(model: Any, ids: Any, how: str, outputs: tuple[str, ...] = REFERENCE_OUTPUTS) -> tuple[Any, Any]:
    """Summed log-probabilities of `ids` under `model`, and the model's output (the caller keeps it
    bound as TRL's `_compute_loss` keeps `outputs`)."""
    import torch

    if how == "full":
        out = model(input_ids=ids, use_cache=False)
        lp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1).sum(-1)
        return lp, None
    if how == "selective":
        from trl.trainer.utils import selective_log_softmax

        out = model(input_ids=ids, use_cache=False)
        return selective_log_softmax(out.logits, ids).sum(-1), None
    if how != "fused":
        raise ValueError(f"logprobs: unknown method '{how}' (choose from full, selective, fused)")
    ensure_fused_head(model, outputs)
    out = model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False)
    seq_len = ids.shape[1] - 1
    return out.log_probs[:, -seq_len:].sum(dim=1), out
