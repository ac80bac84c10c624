"""The catalog and ModelSpec against the real transformers modules, built on the meta device.

Meta tensors have shapes but no storage, so even the 405B model builds in well under a second.
torch/transformers are imported inside the tests: the spec side must work without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from planner.architecture import SUPPORTED_MODEL_TYPES, ModelSpec
from planner.models import ModelError, list_models, load_model, model_config, model_ids

REQUIRED_IDS = {
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b",
    "llama-3.1-405b", "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "gemma-2-2b",
    "gemma-2-9b", "phi-3-mini", "gpt2", "gpt2-xl", "opt-13b",
}


def _build_meta(cfg: dict[str, Any], dtype: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(config)


def _decoder_layer(model: Any) -> Any:
    if hasattr(model, "transformer"):  # GPT2LMHeadModel
        return model.transformer.h[0]
    if hasattr(model.model, "decoder"):  # OPTForCausalLM
        return model.model.decoder.layers[0]
    return model.model.layers[0]


def test_catalog_has_the_required_models() -> None:
    ids = model_ids()
    assert REQUIRED_IDS <= set(ids), REQUIRED_IDS - set(ids)
    assert len(ids) >= 20
    assert {load_model(i).model_type for i in ids} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_id", model_ids())
def test_spec_matches_transformers_meta_model(model_id: str) -> None:
    import torch
    from transformers.pytorch_utils import Conv1D

    spec = load_model(model_id)
    cfg = model_config(model_id)
    assert "_planner" not in cfg
    model = _build_meta(cfg, dtype=torch.float32)  # fp32: buffers in their default dtype

    assert type(model).__name__ == spec.architecture
    # parameters() deduplicates, so a tied lm_head is counted once, as in spec.num_params
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert spec.buffer_bytes_fp32 == sum(b.numel() * b.element_size() for b in model.buffers())

    layer = _decoder_layer(model)
    layer_params = sum(p.numel() for p in layer.parameters())
    assert spec.linear_params_per_layer + spec.layer_other_params == layer_params

    # every nn.Linear / Conv1D in layer 0, by path, with its shape and bias
    real = {}
    for path, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            real[path] = ("linear", mod.in_features, mod.out_features, mod.bias is not None)
        elif isinstance(mod, Conv1D):
            assert tuple(mod.weight.shape) == (mod.nx, mod.nf)  # Conv1D stores [in, out]
            real[path] = ("conv1d", mod.nx, mod.nf, mod.bias is not None)
    described = {lin.path: (lin.kind, lin.in_features, lin.out_features, lin.bias) for lin in spec.layer_linears}
    assert described == real
    for lin in spec.layer_linears:
        assert lin.path.rsplit(".", 1)[-1] == lin.name and lin.count == 1

    # the norm part of layer_other_params is the norm modules' weights (and biases)
    norms = sum(
        p.numel() for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() for p in m.parameters()
    )
    assert spec.layer_norm_params == norms

    # the spec's view of the config agrees with what transformers resolved
    c = model.config
    assert spec.num_layers == c.num_hidden_layers
    assert spec.hidden_size == c.hidden_size
    assert spec.num_attention_heads == c.num_attention_heads
    assert spec.vocab_size == c.vocab_size
    assert spec.tie_word_embeddings == bool(c.tie_word_embeddings)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == spec.tie_word_embeddings and (spec.lm_head_params == 0) == tied


def test_mixtral_experts_are_fused_parameters_not_linears() -> None:
    import torch

    spec = load_model("mixtral-8x7b")
    model = _build_meta(model_config("mixtral-8x7b"))
    moe = model.model.layers[0].mlp
    assert not isinstance(moe.gate, torch.nn.Linear)  # MixtralTopKRouter holds a bare [E, H] Parameter
    assert tuple(moe.experts.gate_up_proj.shape) == (8, 2 * 14336, 4096)
    assert tuple(moe.experts.down_proj.shape) == (8, 4096, 14336)
    assert spec.layer_expert_params == moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()
    assert spec.layer_router_params == moe.gate.weight.numel()
    assert spec.layer_other_params == spec.layer_norm_params + spec.layer_expert_params + spec.layer_router_params
    assert (spec.num_experts, spec.experts_per_token) == (8, 2)
    assert [lin.name for lin in spec.layer_linears] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_known_parameter_counts() -> None:
    # published totals, as an independent check on the bundled configs
    assert load_model("llama-2-7b").num_params == 6_738_415_616
    assert load_model("llama-3.1-8b").num_params == 8_030_261_248
    assert load_model("mistral-7b").num_params == 7_248_023_552
    assert load_model("mixtral-8x7b").num_params == 46_702_792_704
    assert load_model("qwen2.5-7b").num_params == 7_615_616_512
    assert load_model("gpt2").num_params == 124_439_808


def test_spec_fields_for_special_architectures() -> None:
    g = load_model("gemma-2-9b")
    assert (g.final_logit_softcapping, g.attn_logit_softcapping, g.sliding_window) == (30.0, 50.0, 4096)
    assert g.head_dim == 256 and g.layer_norm_params == 4 * g.hidden_size and g.tie_word_embeddings
    assert g.torch_dtype == "fp32"
    q = load_model("qwen2.5-7b")
    assert q.sliding_window is None  # use_sliding_window is false
    assert [lin.bias for lin in q.layer_linears[:4]] == [True, True, True, False]
    p = load_model("phi-3-mini")
    assert [lin.name for lin in p.layer_linears] == ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    gpt = load_model("gpt2")
    assert {lin.kind for lin in gpt.layer_linears} == {"conv1d"} and gpt.torch_dtype == "fp32"
    assert gpt.position_embedding_params == 1024 * 768 and gpt.lm_head_params == 0
    o = load_model("opt-350m")
    assert o.extra_params == 2 * 512 * 1024 and o.final_norm_params == 0  # project_in/out; post-norm OPT
    assert o.position_embedding_params == (2048 + 2) * 1024
    assert load_model("llama-3.2-1b").head_dim == 64 and load_model("mistral-7b").vocab_size == 32768


def test_list_models_rows() -> None:
    rows = list_models()
    assert [r["id"] for r in rows] == model_ids()
    row = next(r for r in rows if r["id"] == "llama-3.1-70b")
    assert row["layers"] == 80 and row["kv_heads"] == 8 and row["context"] == 131072 and row["params"] > 7e10


def test_local_config_file_and_directory(tmp_path: Path) -> None:
    cfg = model_config("qwen2.5-0.5b")
    mdir = tmp_path / "my-qwen"
    mdir.mkdir()
    (mdir / "config.json").write_text(json.dumps(cfg))
    by_file = load_model(str(mdir / "config.json"))
    by_dir = load_model(str(mdir))
    assert by_file.id == by_dir.id == "my-qwen"
    assert by_file.hf_id is None
    assert by_file.num_params == by_dir.num_params == load_model("qwen2.5-0.5b").num_params
    assert model_config(str(mdir)) == cfg
    loose = tmp_path / "tiny.json"
    loose.write_text(json.dumps(cfg | {"num_hidden_layers": 2}))
    assert load_model(str(loose)).id == "tiny" and load_model(str(loose)).num_layers == 2


def test_aliases_and_transformers_defaults(tmp_path: Path) -> None:
    gpt = tmp_path / "gpt.json"
    gpt.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}))
    s = load_model(str(gpt))
    assert (s.hidden_size, s.intermediate_size, s.max_position_embeddings, s.tie_word_embeddings) == (64, 256, 1024, True)
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}))
    s = load_model(str(llama))
    assert (s.num_key_value_heads, s.head_dim, s.torch_dtype) == (4, 16, "fp32")
    # transformers' own default differs by family: MistralConfig fills 8 KV heads
    mistral = tmp_path / "mistral.json"
    mistral.write_text(json.dumps({"model_type": "mistral", "hidden_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 16, "intermediate_size": 128, "vocab_size": 100}))
    s = load_model(str(mistral))
    assert s.num_key_value_heads == 8
    for path in (gpt, llama, mistral):
        model = _build_meta(model_config(str(path)))
        assert load_model(str(path)).num_params == sum(p.numel() for p in model.parameters())


def test_missing_field_names_the_field(tmp_path: Path) -> None:
    cfg = model_config("llama-3.2-1b")
    del cfg["num_attention_heads"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert str(e.value) == f"model: config.json at {path} is missing field 'num_attention_heads'"
    opt = model_config("opt-13b")
    del opt["ffn_dim"]
    path.write_text(json.dumps(opt))
    with pytest.raises(ModelError, match="missing field 'ffn_dim'"):
        load_model(str(tmp_path))


def test_unknown_id_suggests_close_matches() -> None:
    with pytest.raises(ModelError) as e:
        load_model("llama-3-8bb")
    msg = str(e.value)
    assert msg.startswith("model: unknown model 'llama-3-8bb' (did you mean: llama-3-8b")
    assert msg.endswith("?)") and "\n" not in msg
    with pytest.raises(ModelError, match="unknown model 'zzz'"):
        model_config("zzz")


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match=r"^model: config.json at .* is not valid JSON \(.*line 1") as e:
        load_model(str(bad))
    assert "\n" not in str(e.value)
    bad.write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelError, match=r"^model: unsupported model_type 'bert' \(supported: llama, mistral, "):
        load_model(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json in directory"):
        load_model(str(empty))
    with pytest.raises(ModelError, match="no such file"):
        load_model(str(tmp_path / "missing.json"))
    assert issubclass(ModelError, ValueError)


def test_spec_is_frozen_and_validated() -> None:
    spec = load_model("gpt2")
    assert isinstance(spec, ModelSpec)
    with pytest.raises(Exception):
        spec.hidden_size = 1  # type: ignore[misc]
    assert ModelSpec.model_validate(spec.model_dump()).num_params == spec.num_params


def test_estimate_path_does_not_import_torch() -> None:
    code = "import sys, planner.models as m; m.load_model('llama-3.1-8b'); m.list_models(); " \
           "sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
