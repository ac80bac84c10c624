"""What a model is made of, read from its HF config.json without torch or transformers.

The estimate path imports this module, so it must stay light: pydantic and the standard library
only. Every number here mirrors the module tree transformers 5.24 builds for
`AutoModelForCausalLM.from_config(config)`; tests/test_models_catalog.py builds each catalog model
on the meta device and checks the counts and layer-0 shapes against the real modules.

Things about that module tree that matter for memory and are easy to get wrong:

* mixtral: the experts are NOT nn.Linear. `MixtralExperts` holds two fused 3-D Parameters,
  `gate_up_proj` [E, 2*I, H] and `down_proj` [E, H, I], and the router `gate` is a
  `MixtralTopKRouter` with a bare [E, H] Parameter. LoRA "all-linear" (nn.Linear/Conv1D only) and
  bitsandbytes' Linear4bit swap (`type(m) is nn.Linear` or Conv1D) never touch them, so they stay
  in the load dtype under QLoRA. They are counted in `layer_other_params`, split out as
  `layer_expert_params` and `layer_router_params`.
* gpt2: the projections are HF `Conv1D` (weight stored [in, out], always with bias); both the
  attention output and the MLP output are named `c_proj`, so `path` tells them apart.
* phi3: fused `qkv_proj` and `gate_up_proj` linears.
* gemma2: four RMSNorms per layer (pre/post attention, pre/post feed-forward), plus an
  `embed_scale` scalar buffer on the scaled word embedding.
* rotary models keep `inv_freq` and `original_inv_freq` (fp32, head_dim/2 each) once per model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "gpt2", "opt")

# The class AutoModelForCausalLM builds for each model_type (what actually gets instantiated,
# whatever the config's `architectures` list says).
CAUSAL_LM_CLASS: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
}

# Defaults of the transformers 5.24 config classes for fields a config.json may omit. They are
# not uniform (mistral/mixtral default to 8 KV heads, qwen2 to 32, gemma2 to 4; llama/phi3 copy the
# attention heads), so a missing field is filled exactly as transformers would fill it.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False,
                "hidden_act": "silu", "sliding_window": 4096},
    "mixtral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False,
                "hidden_act": "silu", "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "tie_word_embeddings": False,
              "hidden_act": "silu", "sliding_window": 4096, "use_sliding_window": False},
    "gemma2": {"num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
               "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "phi3": {"num_key_value_heads": None, "max_position_embeddings": 4096, "tie_word_embeddings": False,
             "hidden_act": "silu", "sliding_window": None},
    "gpt2": {"n_positions": 1024, "n_inner": None, "tie_word_embeddings": True, "activation_function": "gelu_new",
             "add_cross_attention": False},
    "opt": {"max_position_embeddings": 2048, "tie_word_embeddings": True, "activation_function": "relu",
            "enable_bias": True, "layer_norm_elementwise_affine": True, "do_layer_norm_before": True,
            "_remove_final_layer_norm": False, "word_embed_proj_dim": None},
}

_DTYPES: dict[str, str] = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}

# OPT's learned positions carry two extra rows (a fairseq padding offset).
OPT_POSITION_OFFSET = 2


class ModelError(ValueError):
    """A model reference or config.json the planner cannot use; the message is one line."""


class LinearSpec(BaseModel):
    """One nn.Linear (or HF Conv1D) in ONE decoder layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="module attribute name, what PEFT target_modules matches (q_proj, c_proj, ...)")
    path: str = Field(description="dotted path inside the decoder layer (self_attn.q_proj); unique per layer")
    in_features: int
    out_features: int
    bias: bool
    count: int = Field(default=1, description=">1 only if a layer holds several identical modules")
    kind: Literal["linear", "conv1d"] = Field(default="linear", description="conv1d: HF Conv1D, weight is [in, out]")

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


class ModelSpec(BaseModel):
    """A decoder-only causal LM as transformers 5.24 builds it, in numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    hf_id: str | None
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: Literal["bf16", "fp16", "fp32"]
    hidden_act: str
    gated_mlp: bool
    num_experts: int = 0
    experts_per_token: int = 0
    sliding_window: int | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    # Dropout probabilities as the config sets them: active in training mode (a model built with
    # from_config is in training mode), so they decide which masks the step keeps.
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_linears: list[LinearSpec]
    # which head the model is built with: the LM head, or a one-score classification head
    # (AutoModelForSequenceClassification, num_labels=1: reward models)
    head: Literal["causal_lm", "seq_cls"] = "causal_lm"
    layer_other_params: int = Field(description="params in one layer outside layer_linears: norms, experts, router")
    layer_norm_params: int = Field(description="the norm part of layer_other_params")
    layer_expert_params: int = Field(default=0, description="fused 3-D expert tensors, part of layer_other_params")
    layer_router_params: int = Field(default=0, description="MoE router weight (not nn.Linear), part of layer_other_params")
    embedding_params: int
    position_embedding_params: int
    final_norm_params: int
    lm_head_params: int
    extra_params: int
    buffer_bytes_fp32: int

    @property
    def linear_params_per_layer(self) -> int:
        return sum(lin.params for lin in self.layer_linears)

    @property
    def params_per_layer(self) -> int:
        return self.linear_params_per_layer + self.layer_other_params

    @property
    def num_params(self) -> int:
        """All parameters; a tied lm_head shares the embedding and is counted once (lm_head_params is 0)."""
        return (
            self.num_layers * self.params_per_layer
            + self.embedding_params
            + self.position_embedding_params
            + self.final_norm_params
            + self.lm_head_params
            + self.extra_params
        )


class _Config:
    """Field access on a raw config dict with transformers' aliases and defaults, and one-line errors."""

    _MISSING = object()

    def __init__(self, cfg: dict[str, Any], model_type: str, where: str) -> None:
        self.cfg, self.where = cfg, where
        self.defaults = _DEFAULTS[model_type]

    def req(self, *names: str) -> Any:
        """First present name; required unless transformers has a default for it."""
        for n in names:
            if self.cfg.get(n) is not None:
                return self.cfg[n]
        for n in names:
            if n in self.defaults:
                return self.defaults[n]
        raise ModelError(f"model: config.json at {self.where} is missing field '{names[0]}'")

    def opt(self, name: str, default: Any = None) -> Any:
        """An optional field: explicit null stays null (sliding_window: null means no window)."""
        if name in self.cfg:
            return self.cfg[name]
        return self.defaults.get(name, default)

    def name(self, *names: str) -> str:
        """The alias the config actually uses (n_embd or hidden_size), so errors quote the file's own key."""
        return next((n for n in names if self.cfg.get(n) is not None), names[0])

    def check_pos_int(self, name: str, value: Any) -> int:
        # bool is an int subclass, and 4096.0 would build a Linear with a float size: both are typos
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"model: config.json at {self.where} has field '{name}' = {value!r}, expected a positive integer")
        return value

    def pos_int(self, *names: str) -> int:
        return self.check_pos_int(self.name(*names), self.req(*names))

    def opt_pos_int(self, name: str) -> int | None:
        """An optional size: absent or null means transformers derives it; anything else must be a
        positive integer (a 0 would otherwise be read as 'absent' by `or`, or build a zero-width layer)."""
        value = self.opt(name)
        return None if value is None else self.check_pos_int(name, value)

    def fail(self, message: str) -> ModelError:
        return ModelError(f"model: config.json at {self.where}: {message}")

    def check_divides(self, heads_key: str, heads: int, size_key: str, size: int, why: str) -> None:
        if size % heads:
            raise self.fail(f"{heads_key} {heads} does not divide {size_key} {size} ({why})")


def _dtype(cfg: dict[str, Any], where: str) -> str:
    raw = cfg.get("torch_dtype") or cfg.get("dtype")  # transformers 5 writes `dtype`, older configs `torch_dtype`
    if raw is None:
        return "fp32"  # transformers builds in fp32 when the config names no dtype (gpt2)
    key = str(raw).removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"model: config.json at {where} has dtype {raw!r} (expected float32, bfloat16 or float16)")
    return _DTYPES[key]


def _rotary_factor(c: _Config) -> float:
    """Share of head_dim that is rotated (phi-style partial rotary; 1.0 for the catalog's models)."""
    rope = c.cfg.get("rope_parameters") or c.cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        rope = {}
    factor = c.cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise c.fail(f"partial_rotary_factor {factor!r} is not a number in (0, 1]")
    return float(factor)


def _rotary_buffer_bytes(c: _Config, head_dim: int) -> int:
    """`inv_freq` + `original_inv_freq`: fp32, one entry per rotated pair, once per model."""
    dim = int(head_dim * _rotary_factor(c))
    return 2 * ((dim + 1) // 2) * 4


def _lin(name: str, path: str, i: int, o: int, bias: bool, kind: Literal["linear", "conv1d"] = "linear") -> LinearSpec:
    return LinearSpec(name=name, path=path, in_features=i, out_features=o, bias=bias, kind=kind)


def _rotary_family(c: _Config, model_type: str) -> dict[str, Any]:
    """llama, mistral, mixtral, qwen2, gemma2, phi3: pre-norm RMSNorm decoders with rotary positions."""
    h = c.pos_int("hidden_size")
    layers = c.pos_int("num_hidden_layers")
    heads = c.pos_int("num_attention_heads")
    # null copies the attention heads (MHA), as the config classes' __post_init__ do
    kv = c.opt_pos_int("num_key_value_heads") or heads
    if heads % kv:
        # repeat_kv expands each KV head to heads // kv query heads: 7 heads over 8 KV heads gives
        # 0 groups, 8 over 3 gives 6 of 8 heads; transformers builds both and fails in the forward
        default = "" if "num_key_value_heads" in c.cfg else f" (the {model_type} config's default; the file does not set it)"
        raise c.fail(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}{default}")
    explicit_hd = c.opt_pos_int("head_dim")  # gemma2's class default (256) counts as given
    if model_type in ("llama", "gemma2"):
        # LlamaConfig/Gemma2Config.validate_architecture reject it even when head_dim is explicit
        c.check_divides("num_attention_heads", heads, "hidden_size", h, f"transformers' {model_type} config requires it")
    elif explicit_hd is None:
        # the width is derived as hidden_size // num_attention_heads: a remainder is silently dropped
        # (q_proj narrower than the residual stream), which is a typo, not a model anyone trained
        c.check_divides("num_attention_heads", heads, "hidden_size", h, "head_dim is derived as hidden_size // "
                        "num_attention_heads; give head_dim to choose another width")
    # head_dim * heads != hidden_size is allowed when head_dim is explicit (gemma2-9b: 16 x 256 vs 3584)
    hd = explicit_hd or h // heads
    if hd > 4 and hd % 2 and int(hd * _rotary_factor(c)) == hd:
        # RotaryEmbeddingConfigMixin.validate_rope: rotation works on pairs, so a fully rotated head
        # must be even (transformers lets heads <= 4 through for its tiny test checkpoints)
        how = "" if explicit_hd else " (hidden_size // num_attention_heads)"
        raise c.fail(f"head_dim {hd}{how} is odd; rotary positions rotate pairs of channels, so transformers "
                     "requires an even head_dim (or a partial_rotary_factor below 1)")
    inter = c.pos_int("intermediate_size")
    vocab = c.pos_int("vocab_size")
    q, kvd = heads * hd, kv * hd

    attn_bias = bool(c.opt("attention_bias", False)) if model_type in ("llama", "gemma2") else False
    if model_type == "phi3":
        linears = [
            _lin("o_proj", "self_attn.o_proj", q, h, False),
            _lin("qkv_proj", "self_attn.qkv_proj", h, q + 2 * kvd, False),
            _lin("gate_up_proj", "mlp.gate_up_proj", h, 2 * inter, False),
            _lin("down_proj", "mlp.down_proj", inter, h, False),
        ]
    else:
        qkv_bias = True if model_type == "qwen2" else attn_bias  # qwen2 hard-codes q/k/v bias, o_proj none
        linears = [
            _lin("q_proj", "self_attn.q_proj", h, q, qkv_bias),
            _lin("k_proj", "self_attn.k_proj", h, kvd, qkv_bias),
            _lin("v_proj", "self_attn.v_proj", h, kvd, qkv_bias),
            _lin("o_proj", "self_attn.o_proj", q, h, attn_bias),
        ]
        if model_type != "mixtral":
            mlp_bias = bool(c.opt("mlp_bias", False)) if model_type == "llama" else False
            linears += [
                _lin("gate_proj", "mlp.gate_proj", h, inter, mlp_bias),
                _lin("up_proj", "mlp.up_proj", h, inter, mlp_bias),
                _lin("down_proj", "mlp.down_proj", inter, h, mlp_bias),
            ]

    experts = per_tok = expert_params = router_params = 0
    if model_type == "mixtral":
        experts = c.pos_int("num_local_experts", "num_experts")
        per_tok = c.pos_int("num_experts_per_tok")
        if per_tok > experts:
            # torch.topk(k > E) fails in the router's forward; the config class does not check it
            raise c.fail(f"num_experts_per_tok {per_tok} exceeds {c.name('num_local_experts', 'num_experts')} {experts}")
        expert_params = experts * (2 * inter * h + h * inter)  # gate_up_proj [E,2I,H] + down_proj [E,H,I]
        router_params = experts * h  # MixtralTopKRouter.weight [E,H], a bare Parameter

    norms = (4 if model_type == "gemma2" else 2) * h
    tie = bool(c.opt("tie_word_embeddings"))
    sliding = c.opt("sliding_window")
    if model_type == "qwen2" and not c.opt("use_sliding_window"):
        sliding = None  # Qwen2Config drops the window unless use_sliding_window is set
    if sliding is not None:
        # checked only where transformers uses it: a window of 0 masks every key (NaN attention)
        sliding = c.check_pos_int("sliding_window", sliding)
    buffers = _rotary_buffer_bytes(c, hd) + (4 if model_type == "gemma2" else 0)  # + gemma2 embed_scale scalar
    act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
    return dict(
        hidden_size=h, num_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.pos_int("max_position_embeddings"),
        tie_word_embeddings=tie, hidden_act=str(c.opt(act_key) or c.opt("hidden_act") or "silu"), gated_mlp=True,
        num_experts=experts, experts_per_token=per_tok, sliding_window=sliding,
        attention_dropout=float(c.opt("attention_dropout") or 0.0),
        final_logit_softcapping=c.opt("final_logit_softcapping") if model_type == "gemma2" else None,
        attn_logit_softcapping=c.opt("attn_logit_softcapping") if model_type == "gemma2" else None,
        layer_linears=linears, layer_other_params=norms + expert_params + router_params, layer_norm_params=norms,
        layer_expert_params=expert_params, layer_router_params=router_params,
        embedding_params=vocab * h, position_embedding_params=0, final_norm_params=h,
        lm_head_params=0 if tie else vocab * h, extra_params=0, buffer_bytes_fp32=buffers,
    )


def _gpt2(c: _Config) -> dict[str, Any]:
    """GPT-2: Conv1D projections with bias, LayerNorm (weight + bias), learned positions, tied head."""
    h = c.pos_int("n_embd", "hidden_size")
    layers = c.pos_int("n_layer", "num_hidden_layers")
    heads = c.pos_int("n_head", "num_attention_heads")
    positions = c.pos_int("n_positions", "max_position_embeddings")
    vocab = c.pos_int("vocab_size")
    heads_key, h_key = c.name("n_head", "num_attention_heads"), c.name("n_embd", "hidden_size")
    c.check_divides(heads_key, heads, h_key, h, "GPT2Attention requires it")
    inner = c.opt_pos_int("n_inner") or 4 * h  # GPT2MLP: n_inner None -> 4 * hidden
    if c.opt("add_cross_attention"):
        raise ModelError(f"model: config.json at {c.where} sets add_cross_attention, which the planner does not model")
    linears = [
        _lin("c_attn", "attn.c_attn", h, 3 * h, True, "conv1d"),
        _lin("c_proj", "attn.c_proj", h, h, True, "conv1d"),
        _lin("c_fc", "mlp.c_fc", h, inner, True, "conv1d"),
        _lin("c_proj", "mlp.c_proj", inner, h, True, "conv1d"),
    ]
    tie = bool(c.opt("tie_word_embeddings"))
    return dict(
        hidden_size=h, num_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=h // heads,
        intermediate_size=inner, vocab_size=vocab, max_position_embeddings=positions, tie_word_embeddings=tie,
        hidden_act=str(c.opt("activation_function")), gated_mlp=False,
        resid_dropout=float(c.opt("resid_pdrop") if c.opt("resid_pdrop") is not None else 0.1),
        embed_dropout=float(c.opt("embd_pdrop") if c.opt("embd_pdrop") is not None else 0.1),
        attention_dropout=float(c.opt("attn_pdrop") if c.opt("attn_pdrop") is not None else 0.1),
        layer_linears=linears, layer_other_params=4 * h, layer_norm_params=4 * h,
        embedding_params=vocab * h, position_embedding_params=positions * h, final_norm_params=2 * h,
        lm_head_params=0 if tie else vocab * h, extra_params=0, buffer_bytes_fp32=0,
    )


def _opt(c: _Config) -> dict[str, Any]:
    """OPT: biased linears, LayerNorms, learned positions (+2 offset rows), optional project_in/out."""
    h = c.pos_int("hidden_size")
    layers = c.pos_int("num_hidden_layers")
    heads = c.pos_int("num_attention_heads")
    ffn = c.pos_int("ffn_dim")
    vocab = c.pos_int("vocab_size")
    positions = c.pos_int("max_position_embeddings")
    c.check_divides("num_attention_heads", heads, "hidden_size", h, "OPTAttention requires it")
    proj = c.opt_pos_int("word_embed_proj_dim") or h  # embeddings and lm_head live in this width
    bias = bool(c.opt("enable_bias"))
    ln = 2 * h if c.opt("layer_norm_elementwise_affine") else 0
    linears = [  # registration order in OPTAttention: k, v, q, out
        _lin("k_proj", "self_attn.k_proj", h, h, bias),
        _lin("v_proj", "self_attn.v_proj", h, h, bias),
        _lin("q_proj", "self_attn.q_proj", h, h, bias),
        _lin("out_proj", "self_attn.out_proj", h, h, bias),
        _lin("fc1", "fc1", h, ffn, bias),
        _lin("fc2", "fc2", ffn, h, bias),
    ]
    final_ln = ln if c.opt("do_layer_norm_before") and not c.opt("_remove_final_layer_norm") else 0
    tie = bool(c.opt("tie_word_embeddings"))
    return dict(
        hidden_size=h, num_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=h // heads,
        intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=positions, tie_word_embeddings=tie,
        hidden_act=str(c.opt("activation_function")), gated_mlp=False,
        resid_dropout=float(c.opt("dropout") if c.opt("dropout") is not None else 0.1),
        attention_dropout=float(c.opt("attention_dropout") or 0.0),
        layer_linears=linears, layer_other_params=2 * ln, layer_norm_params=2 * ln,
        embedding_params=vocab * proj, position_embedding_params=(positions + OPT_POSITION_OFFSET) * h,
        final_norm_params=final_ln, lm_head_params=0 if tie else vocab * proj,
        extra_params=2 * proj * h if proj != h else 0,  # project_in + project_out, no bias
        buffer_bytes_fp32=0,
    )


def spec_from_config(
    cfg: dict[str, Any], *, id: str, name: str | None = None, hf_id: str | None = None, where: str = "<config>"
) -> ModelSpec:
    """Describe the model a raw HF config dict builds. `where` names the file in error messages."""
    if not isinstance(cfg, dict):
        raise ModelError(f"model: config.json at {where} is not a JSON object")
    model_type = cfg.get("model_type")
    if not model_type:
        raise ModelError(f"model: config.json at {where} is missing field 'model_type'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model: unsupported model_type '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    c = _Config(cfg, model_type, where)
    if model_type == "gpt2":
        fields = _gpt2(c)
    elif model_type == "opt":
        fields = _opt(c)
    else:
        fields = _rotary_family(c, model_type)
    return ModelSpec(
        id=id, name=name or id, hf_id=hf_id, model_type=model_type, architecture=CAUSAL_LM_CLASS[model_type],
        torch_dtype=_dtype(cfg, where), **fields,
    )


_SEQ_CLS: dict[int, tuple[ModelSpec, ModelSpec]] = {}


def seq_cls_spec(spec: ModelSpec) -> ModelSpec:
    """The same backbone with transformers' sequence-classification head (`score`: hidden -> 1, no
    bias) instead of the LM head. Cached per spec so that estimates reuse their compiled timelines."""
    hit = _SEQ_CLS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    out = spec.model_copy(update={
        "head": "seq_cls",
        "lm_head_params": 0,
        "tie_word_embeddings": False,
        "extra_params": spec.extra_params + spec.hidden_size,
    })
    _SEQ_CLS[id(spec)] = (spec, out)
    return out
