"""`planner run --trainer trl`: TRL's own SFTTrainer or DPOTrainer, configured from the TRL config
`planner export` wrote (read by TRL's TrlParser, as `trl sft --config` reads it), on a synthetic dataset
built here: random token ids through a word-level tokenizer made on the spot (nothing is downloaded).
One process. What it measures is launch_worker's: the bytes of parameters and gradients before the
last optimizer step, of the optimizer's states after it, and each step's time.

The dataset: sft, `seq` token ids per example (a pre-tokenized dataset, which TRL takes as is); dpo, a
prompt of seq // 2 words and chosen / rejected completions of seq - seq // 2 - 1 words (the EOS TRL adds
makes seq tokens each). Enough examples for `steps` optimizer steps.
"""

from __future__ import annotations

import time
from typing import Any


def tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over "t0".."t{V-1}": word i is token i (t1 EOS, t2 pad)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t2")


def dataset(task: str, rows: int, seq: int, vocab_size: int, seed: int = 0) -> Any:
    import random

    from datasets import Dataset

    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, vocab_size)}" for _ in range(n))

    if task == "sft":
        return Dataset.from_dict({"input_ids": [[rng.randrange(3, vocab_size) for _ in range(seq)] for _ in range(rows)]})
    prompt = seq // 2
    completion = seq - prompt - 1
    return Dataset.from_dict({"prompt": [words(prompt) for _ in range(rows)],
                              "chosen": [" " + words(completion) for _ in range(rows)],
                              "rejected": [" " + words(completion) for _ in range(rows)]})


def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

    from planner.backends.held import PROGRESS
    from planner.backends.held import states as _states
    from planner.backends.held import tensor_bytes as _bytes
    from planner.backends.measurement import versions

    plan = spec["plan"]
    task, steps, device = plan["task"], spec["steps"], spec["device"]
    config_class = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig}[task]
    out_dir = "trl_output"
    extra = ["--output_dir", out_dir, "--max_steps", str(steps), "--report_to", "none", "--save_strategy", "no",
             "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "0"]
    if device == "cpu":
        extra += ["--use_cpu", "true"]
    _, args, model_args = TrlParser((ScriptArguments, config_class, ModelConfig)).parse_args_and_config(
        args=["--config", spec["trl_config"], *extra], fail_with_unknown_args=True)
    cfg = dict(spec["model_config"])
    model_type = cfg.pop("model_type")
    for k in ("architectures", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    # "auto" would load a checkpoint's dtype; a model built from its config has none: fp32
    dtype = torch.float32 if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype,
                                             attn_implementation=model_args.attn_implementation or "sdpa")
    tok = tokenizer(spec["model_config"]["vocab_size"])
    rows = plan["batch"] * plan["grad_accum"] * steps
    data = dataset(task, rows, plan["seq"], spec["model_config"]["vocab_size"])
    held: dict[str, int] = {}
    times: list[float] = []

    class Measure(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            m = kw["model"]
            held["parameter_bytes"] = _bytes(p.data for p in m.parameters())
            held["gradient_bytes"] = _bytes(p.grad for p in m.parameters())

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            print(f"{PROGRESS} step {state.global_step}/{steps} {times[-1] * 1e3:.1f} ms", flush=True)

    trainer_class = {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer}[task]
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tok,
                            peft_config=get_peft_config(model_args), callbacks=[Measure()])
    trainer.train()
    held["optimizer_state_bytes"] = _bytes(v for st in trainer.optimizer.state.values() for _, v in _states(st))
    return {"rank": 0, "world_size": 1, "local_rank": 0, "device": device, "step_s": times,
            "tokens_per_step": plan["batch"] * plan["seq"] * plan["grad_accum"] * (2 if task == "dpo" else 1),
            "held": held, "engine": f"trl {type(trainer).__name__}", "versions": versions(extra=("accelerate",))}
