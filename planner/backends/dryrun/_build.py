"""Build the replayed model: on `meta` first (transformers, peft and bitsandbytes set-up code runs
unchanged), then every parameter and buffer is replaced by a fake (or, for device="cpu", real)
tensor of the same shape, dtype and requires_grad, keeping tied tensors tied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Built:
    model: nn.Module
    quant_state_tensors: list[torch.Tensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def hf_config(config: dict, *, use_cache: bool):
    from transformers import AutoConfig

    d = dict(config)
    model_type = d.pop("model_type")
    for k in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "quantization_config"):
        d.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **d)
    cfg.use_cache = use_cache
    return cfg


def _lora_config(plan, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    targets: Any = plan.target_list
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=plan.lora_rank,
        lora_alpha=plan.alpha,
        lora_dropout=plan.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )


def _replace_linear_4bit(model: nn.Module, plan) -> int:
    """Every nn.Linear but lm_head becomes bnb.nn.Linear4bit (on meta; weights made later)."""
    import bitsandbytes as bnb

    out_emb = model.get_output_embeddings()
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # the output head stays unquantized (transformers' 4-bit loading skips it): lm_head or score
            if type(child) is nn.Linear and child is not out_emb and name != "score":
                new = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=plan.double_quant,
                    quant_type=plan.quant,
                    quant_storage=torch.uint8,
                    device="meta",
                )
                if child.bias is not None:
                    new.bias = nn.Parameter(torch.empty_like(child.bias, device="meta"), requires_grad=False)
                setattr(parent, name, new)
                n += 1
    return n


def build_meta(plan, config: dict, train: bool | None = None, head: str = "causal_lm"):
    """The program's model set-up, run on the meta device. `train`: the model is trained (default:
    the plan's task is sft); `head`: causal_lm, or seq_cls (AutoModelForSequenceClassification with
    one label, as reward models are built)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if train is None:
        train = plan.task == "sft"
    cfg = hf_config(config, use_cache=not train)
    dtype = DTYPES[plan.weight_dtype]  # QLoRA: dtype of what is not quantized (before kbit prep)
    if head == "seq_cls":
        cfg.num_labels = 1
        if getattr(cfg, "pad_token_id", None) is None:  # batches of several sequences need one
            cfg.pad_token_id = cfg.eos_token_id if isinstance(getattr(cfg, "eos_token_id", None), int) else 0
    auto = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg, dtype=dtype, attn_implementation=plan.attn)
    notes: list[str] = []
    if plan.method == "qlora":
        n = _replace_linear_4bit(model, plan)
        notes.append(f"{n} nn.Linear -> bnb Linear4bit({plan.quant}, double_quant={plan.double_quant})")
    return prepare_for_plan(model, plan, train, head), notes


def prepare_for_plan(model, plan, train: bool, head: str = "causal_lm"):
    """What the programs do to a built (and, for QLoRA, quantized) model: kbit preparation,
    gradient checkpointing, LoRA adapters, eval mode for frozen models. Shared by every backend."""
    if plan.method == "qlora":
        model.is_loaded_in_4bit = True  # as transformers' 4-bit loading sets it (peft reads it)
        if train and plan.kbit_prep:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.grad_ckpt)
        elif train and plan.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    elif train and plan.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if plan.method == "lora":
            model.enable_input_require_grads()
    if plan.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(plan, "SEQ_CLS" if head == "seq_cls" else "CAUSAL_LM"))
    if not train:
        model.eval()
    return model


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [qs.absmax, qs.code]
    if getattr(qs, "offset", None) is not None:
        out.append(qs.offset)
    if getattr(qs, "state2", None) is not None:
        out += [qs.state2.absmax, qs.state2.code]
    return out


def _make_4bit_weight(linear, real_empty) -> tuple[Any, list[torch.Tensor]]:
    """Packed weight and QuantState shaped exactly as bitsandbytes' quantize_4bit makes them,
    backed by never-written CPU tensors (bitsandbytes cannot wrap a fake tensor)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    w = linear.weight
    N, K = linear.out_features, linear.in_features
    n = N * K
    blocksize = w.blocksize or 64
    blocks = -(-n // blocksize)
    packed = real_empty(((n + 1) // 2, 1), torch.uint8)
    code = real_empty((16,), torch.float32)
    if w.compress_statistics:
        blocks2 = -(-blocks // 256)
        state2 = QuantState(
            absmax=real_empty((blocks2,), torch.float32),
            code=real_empty((256,), torch.float32),
            blocksize=256,
            dtype=torch.float32,
        )
        qs = QuantState(
            absmax=real_empty((blocks,), torch.uint8),
            shape=torch.Size([N, K]),
            dtype=torch.bfloat16,
            blocksize=blocksize,
            code=code,
            quant_type=w.quant_type,
            offset=real_empty((), torch.float32),
            state2=state2,
        )
    else:
        qs = QuantState(
            absmax=real_empty((blocks,), torch.float32),
            shape=torch.Size([N, K]),
            dtype=torch.bfloat16,
            blocksize=blocksize,
            code=code,
            quant_type=w.quant_type,
        )
    p = bnb.nn.Params4bit(
        data=packed,
        requires_grad=False,
        quant_state=qs,
        blocksize=blocksize,
        compress_statistics=w.compress_statistics,
        quant_type=w.quant_type,
        quant_storage=torch.uint8,
        module=linear,
        bnb_quantized=True,
    )
    return p, _quant_state_tensors(qs)


def materialize(model: nn.Module, fake_mode, seed: int = 0) -> Built:
    """Replace meta parameters/buffers. fake_mode=None: real CPU tensors with small random values."""
    gen = torch.Generator().manual_seed(seed)

    def new_tensor(shape, dtype) -> torch.Tensor:
        if fake_mode is not None:
            with fake_mode:
                return torch.empty(shape, dtype=dtype, device="cpu")
        t = torch.empty(shape, dtype=dtype, device="cpu")
        if t.is_floating_point():
            with torch.no_grad():
                t.normal_(0.0, 0.02, generator=gen)
        elif t.numel():
            t.zero_()
        return t

    def real_empty(shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device="cpu")
        if fake_mode is None and t.numel():
            with torch.no_grad():
                if t.is_floating_point():
                    t.uniform_(0.5, 1.0, generator=gen)
                else:
                    t.random_(0, 255, generator=gen)
        return t

    built = Built(model=model)
    mapping: dict[int, torch.Tensor] = {}
    linear4bit = None
    try:
        import bitsandbytes as bnb

        linear4bit = bnb.nn.Linear4bit
    except Exception:  # noqa: BLE001 - bnb optional unless qlora
        pass

    for mod in model.modules():
        if linear4bit is not None and isinstance(mod, linear4bit):
            key = id(mod.weight)
            if key not in mapping:
                p, qs = _make_4bit_weight(mod, real_empty)
                mapping[key] = p
                built.quant_state_tensors += qs
            mod._parameters["weight"] = mapping[key]
            mod.support_avx512bf16_for_cpu = False  # never repack weights for the CPU kernel
            mod.compute_type_is_set = True
        for name, p in list(mod._parameters.items()):
            if p is None or (linear4bit is not None and isinstance(mod, linear4bit) and name == "weight"):
                continue
            key = id(p)
            if key not in mapping:
                mapping[key] = nn.Parameter(new_tensor(p.shape, p.dtype), requires_grad=p.requires_grad)
            mod._parameters[name] = mapping[key]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            key = id(b)
            if key not in mapping:
                mapping[key] = new_tensor(b.shape, b.dtype)
            mod._buffers[name] = mapping[key]
    # the rotary inverse frequencies must be sane for real runs (values do not matter on fake)
    if fake_mode is None:
        for mod in model.modules():
            inv = mod._buffers.get("inv_freq") if hasattr(mod, "_buffers") else None
            if inv is not None:
                with torch.no_grad():
                    dim = inv.numel()
                    inv.copy_(1.0 / (10000 ** (torch.arange(dim, dtype=torch.float32) / dim)))
            orig = getattr(mod, "original_inv_freq", None)
            if isinstance(orig, torch.Tensor) and orig.device.type == "meta":
                mod.original_inv_freq = mod._buffers.get("inv_freq")
    else:
        for mod in model.modules():
            orig = getattr(mod, "original_inv_freq", None)
            if isinstance(orig, torch.Tensor) and orig.device.type == "meta":
                mod.original_inv_freq = mod._buffers.get("inv_freq")
    params = {id(p): p for p in model.parameters()}
    built.counts = {
        "params": sum(p.numel() for p in params.values()),
        "trainable_params": sum(p.numel() for p in params.values() if p.requires_grad),
        "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "trainable_param_bytes": sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad),
    }
    return built
