"""Named validation suites: plans whose estimate is checked against a backend's measurement.

- `smoke`: seconds on a CPU, run in CI (small public shapes, full scale, fake tensors).
- `dry-run`: the accuracy suite of the core engine: >= 24 cases over 6 model shapes (among them the
  untied Llama-3.1-8B and the 152k-vocabulary Qwen2.5-7B), every method, pure and mixed precision,
  checkpointing on and off, batch 1-8, sequence 512-4096, generation at batch 1-64. Minutes.
- `alignment`: rm, dpo and distill on two or more shapes each, with and without LoRA.
- `gpu`: a subset sized for a few minutes on one 80-141 GB GPU, run for real.
"""

from __future__ import annotations

from planner.specs import Plan


def _p(model: str, **kw) -> Plan:
    return Plan(model=model, **kw)


def _dry_run_suite() -> list[Plan]:
    gen = dict(task="generate")
    return [
        # Llama-3.2-1B: tied embeddings, 128k vocabulary
        _p("llama-3.2-1b", batch=1, seq=2048),
        _p("llama-3.2-1b", batch=4, seq=2048, grad_ckpt=True),
        _p("llama-3.2-1b", batch=2, seq=1024, precision="mixed-bf16"),
        _p("llama-3.2-1b", batch=8, seq=512, precision="mixed-bf16", grad_ckpt=True),
        _p("llama-3.2-1b", batch=2, seq=1024, optimizer="adamw-fused"),
        _p("llama-3.2-1b", batch=32, **gen, prompt_len=2048, new_tokens=128),
        # Llama-3.1-8B: untied head
        _p("llama-3.1-8b", batch=1, seq=2048),
        _p("llama-3.1-8b", batch=2, seq=4096, grad_ckpt=True),
        _p("llama-3.1-8b", batch=1, seq=2048, method="lora"),
        _p("llama-3.1-8b", batch=4, seq=2048, method="lora", grad_ckpt=True),
        _p("llama-3.1-8b", batch=1, seq=2048, method="qlora"),
        _p("llama-3.1-8b", batch=4, seq=2048, method="qlora", grad_ckpt=True),
        _p("llama-3.1-8b", batch=1, **gen, prompt_len=512, new_tokens=128),
        _p("llama-3.1-8b", batch=16, **gen, prompt_len=1024, new_tokens=256),
        # Qwen2.5-7B: 152k vocabulary, q/k/v biases
        _p("qwen2.5-7b", batch=1, seq=4096, grad_ckpt=True),
        _p("qwen2.5-7b", batch=2, seq=1024, method="lora"),
        _p("qwen2.5-7b", batch=8, seq=1024, method="qlora", grad_ckpt=True),
        _p("qwen2.5-7b", batch=1, seq=2048, method="lora", precision="mixed-bf16", grad_ckpt=True),
        _p("qwen2.5-7b", batch=64, **gen, prompt_len=512, new_tokens=64),
        # Qwen2.5-0.5B: tied, small hidden, large vocabulary relative to the model
        _p("qwen2.5-0.5b", batch=8, seq=1024),
        _p("qwen2.5-0.5b", batch=4, seq=2048, precision="mixed-bf16"),
        _p("qwen2.5-0.5b", batch=2, seq=512, precision="fp32"),
        _p("qwen2.5-0.5b", batch=2, seq=1024, attn="eager"),
        _p("qwen2.5-0.5b", batch=8, **gen, prompt_len=256, new_tokens=512),
        # 4-bit generation: no kbit preparation, no autocast (the hardening issue's +50% case)
        _p("qwen2.5-0.5b", batch=4, **gen, method="qlora", prompt_len=512, new_tokens=64),
        # Llama-3.2-3B and Mistral-7B: other widths, QLoRA variants, 8-bit optimizer
        _p("llama-3.2-3b", batch=2, seq=4096, method="lora", grad_ckpt=True),
        _p("llama-3.2-3b", batch=2, seq=1024, method="qlora", quant="fp4", double_quant=False),
        _p("mistral-7b", batch=1, seq=2048, grad_ckpt=True, optimizer="adamw-8bit"),
        _p("mistral-7b", batch=4, seq=1024, method="lora", optimizer="sgd"),
        # gradient accumulation: the later micro-batches run with every gradient held
        _p("qwen2.5-0.5b", batch=2, seq=1024, grad_accum=4),
        _p("llama-3.2-1b", batch=2, seq=1024, method="lora", grad_ckpt=True, grad_accum=2),
    ]


def _smoke_suite() -> list[Plan]:
    return [
        _p("qwen2.5-0.5b", batch=2, seq=512),
        _p("qwen2.5-0.5b", batch=2, seq=512, method="lora", grad_ckpt=True),
        _p("qwen2.5-0.5b", batch=2, seq=512, method="qlora", grad_ckpt=True),
        _p("qwen2.5-0.5b", batch=4, task="generate", prompt_len=128, new_tokens=16),
        _p("qwen2.5-0.5b", batch=2, seq=512, grad_accum=2),
    ]


def _gpu_suite() -> list[Plan]:
    gen = dict(task="generate")
    return [
        _p("llama-3.2-1b", batch=4, seq=2048),
        _p("llama-3.2-1b", batch=4, seq=2048, precision="mixed-bf16", grad_ckpt=True),
        _p("llama-3.1-8b", batch=1, seq=2048),
        _p("llama-3.1-8b", batch=4, seq=2048, method="lora", grad_ckpt=True),
        _p("llama-3.1-8b", batch=4, seq=2048, method="qlora", grad_ckpt=True),
        _p("qwen2.5-7b", batch=2, seq=1024, method="lora"),
        _p("qwen2.5-7b", batch=16, **gen, prompt_len=1024, new_tokens=128),
        _p("qwen2.5-0.5b", batch=8, seq=1024),
    ]


def _alignment_suite() -> list[Plan]:
    """rm, dpo, distill, grpo and ppo on two shapes each, one with LoRA (the alignment issue's table),
    and the program variants (dpo's fused log-probs and reference order, rm/dpo pairs in two forwards)."""
    return [
        _p("qwen2.5-0.5b", task="rm", batch=4, seq=1024),
        _p("llama-3.2-1b", task="rm", batch=2, seq=2048, method="lora", grad_ckpt=True),
        _p("llama-3.2-3b", task="rm", batch=1, seq=1024),
        _p("qwen2.5-0.5b", task="dpo", batch=2, seq=1024),
        _p("llama-3.2-1b", task="dpo", batch=1, seq=2048, method="lora"),
        _p("llama-3.2-1b", task="dpo", batch=2, seq=1024, method="qlora", grad_ckpt=True),
        _p("llama-3.2-3b", task="dpo", batch=1, seq=1024, ref_logprobs="precomputed"),
        # the programs' variants: TRL 1.16's fused LM head, and the pair in two forwards
        _p("qwen2.5-0.5b", task="dpo", batch=2, seq=1024, logprobs="fused"),
        _p("llama-3.2-1b", task="dpo", batch=1, seq=2048, method="lora", logprobs="fused"),
        _p("qwen2.5-0.5b", task="dpo", batch=2, seq=1024, logprobs="selective"),
        _p("qwen2.5-0.5b", task="dpo", batch=2, seq=1024, pair_forward="separate"),
        _p("qwen2.5-0.5b", task="dpo", batch=2, seq=1024, reference_pass="before"),
        _p("llama-3.2-1b", task="rm", batch=2, seq=2048, method="lora", pair_forward="separate"),
        _p("qwen2.5-0.5b", task="distill", teacher="qwen2.5-1.5b", batch=2, seq=1024),
        _p("llama-3.2-1b", task="distill", teacher="llama-3.2-3b", batch=1, seq=2048, method="lora"),
        _p("llama-3.2-1b", task="distill", teacher="llama-3.1-8b", batch=1, seq=1024, grad_ckpt=True),
        # a frozen 4-bit teacher: no kbit preparation, bf16 logits
        _p("qwen2.5-0.5b", task="distill", teacher="qwen2.5-1.5b", teacher_method="qlora", batch=2, seq=512),
        _p("qwen2.5-0.5b", task="grpo", batch=2, group_size=4, prompt_len=256, new_tokens=64),
        _p("llama-3.2-1b", task="grpo", batch=1, group_size=4, prompt_len=256, new_tokens=64, method="lora"),
        _p("qwen2.5-0.5b", task="ppo", reward_model="qwen2.5-0.5b", batch=2, prompt_len=256, new_tokens=64),
        # gradient accumulation: a later micro-batch's reference or teacher runs with the gradients
        # and the previous micro-batch's outputs still bound
        _p("qwen2.5-0.5b", task="rm", batch=2, seq=1024, grad_accum=2),
        _p("qwen2.5-0.5b", task="dpo", batch=2, seq=1024, grad_accum=2, reference_pass="before"),
        _p("qwen2.5-0.5b", task="distill", teacher="qwen2.5-1.5b", batch=1, seq=1024, grad_accum=2, method="lora"),
        _p("llama-3.2-1b", task="ppo", reward_model="qwen2.5-0.5b", batch=2, prompt_len=256, new_tokens=64,
           method="lora", mini_batch=1),
    ]


SUITES = {"smoke": _smoke_suite, "dry-run": _dry_run_suite, "alignment": _alignment_suite, "gpu": _gpu_suite}
# suites of step time rather than memory: their cases live in planner.backends.time_validation
TIME_SUITES = ("time-cpu",)


def suite(name: str) -> list[Plan]:
    if name not in SUITES:
        import difflib

        names = [*SUITES, *TIME_SUITES]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise ValueError(f"suite: unknown suite '{name}'{hint}; choose from {', '.join(names)}")
    return SUITES[name]()
