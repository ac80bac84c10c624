"""The plugin system: built-ins through the same hooks, a third-party plugin from an entry point,
broken plugins, and the CLI commands that list and use what plugins register."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from planner import plugins
from planner.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "planner-score"


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def installed_score_plugin(tmp_path, monkeypatch, fresh_plugins):
    """Install the example plugin the way pip would expose it: a dist-info with an entry point."""
    dist = tmp_path / "planner_score-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: planner-score\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[planner]\nscore = planner_score\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("planner_score", None)


def test_builtin_techniques_come_from_builtin_plugins(fresh_plugins):
    reg = plugins.registry()
    assert {"sft", "generate"} <= set(reg.techniques)
    owners = {p.name: p for p in reg.plugins}
    assert "sft" in owners["planner_plugins.training"].registers["techniques"]
    assert reg.techniques["generate"].plugin == "planner_plugins.generation"


def test_planner_plugins_lists_them(fresh_plugins):
    code, out, _ = run(["plugins", "--json"])
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["planner_plugins.training"]["registers"]["techniques"] == ["sft"]
    assert rows["planner_plugins.training"]["source"] == "built-in"


def test_third_party_plugin_is_listed_and_estimated(installed_score_plugin):
    code, out, _ = run(["plugins", "--json"])
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["score"]["version"] == "0.1.0"
    assert rows["score"]["registers"]["techniques"] == ["score"]
    assert "planner-score" in rows["score"]["source"]

    code, out, err = run(["fit", "--task", "score", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm",
                          "--batch", "4", "--seq", "1024", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["plan"]["task"] == "score"
    assert set(doc["memory"]["phases"]) == {"forward", "score"}
    # a no-grad forward: no gradients, no optimizer states
    assert doc["memory"]["breakdown"]["gradients"] == 0
    assert doc["memory"]["breakdown"]["optimizer_states"] == 0


def test_third_party_option_rules(installed_score_plugin):
    code, _, err = run(["fit", "--task", "score", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--new-tokens", "8"])
    assert code == 2
    assert "new_tokens: only applies with task generate" in err


def test_unknown_technique_suggests_close_names(fresh_plugins):
    code, out, err = run(["fit", "--task", "sfft", "--model", "gpt2", "--gpu", "t4"])
    assert code == 2 and out == ""
    assert "task: unknown technique 'sfft' (did you mean: sft" in err
    assert len(err.strip().splitlines()) == 1


def test_broken_plugin_warns_once_and_the_rest_works(tmp_path, monkeypatch, fresh_plugins):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[planner]\nbroken = broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plugin 'broken' failed to load") as rec:
        reg = plugins.registry(scan=True)
    assert len([w for w in rec if "broken" in str(w.message)]) == 1
    assert "sft" in reg.techniques


def test_duplicate_names_are_refused(fresh_plugins):
    from planner_plugins.training import SFT

    class Dup:
        from planner.hookspecs import hookimpl

        @staticmethod
        @hookimpl
        def register_techniques(register):
            register(SFT)

    with pytest.warns(UserWarning, match="technique 'sft' is already registered by plugin 'planner_plugins.training'"):
        plugins.register_plugin(Dup(), name="dup")
    assert plugins.registry().techniques["sft"].plugin == "planner_plugins.training"


def test_plugin_commands_are_added(tmp_path, monkeypatch, fresh_plugins):
    (tmp_path / "hello_plugin.py").write_text(textwrap.dedent('''
        from planner.hookspecs import hookimpl

        def _add(p):
            p.add_argument("--name", default="world")

        def _run(args, out):
            out.print(f"hello {args.name}")
            return 0

        @hookimpl
        def register_commands(commands):
            commands["hello"] = ("say hello", _add, _run)
    '''))
    dist = tmp_path / "hello_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[planner]\nhello = hello_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(["hello", "--name", "planner"])
    assert (code, out.strip()) == (0, "hello planner"), err


def test_plugin_models_and_hardware_are_usable(tmp_path, monkeypatch, fresh_plugins):
    (tmp_path / "catalog_plugin.py").write_text(textwrap.dedent('''
        from planner.gpus import GPUSpec
        from planner.hookspecs import hookimpl

        @hookimpl
        def register_models(register):
            register("tiny-llama", {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "max_position_embeddings": 256})

        @hookimpl
        def register_hardware(register):
            register(GPUSpec(id="lab-card-16", name="Lab card 16 GiB", memory_bytes=16 << 30))
    '''))
    dist = tmp_path / "catalog_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: catalog-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[planner]\ncatalog = catalog_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(["fit", "--model", "tiny-llama", "--gpu", "lab-card-16", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["gpu"]["memory_bytes"] == 16 << 30
    assert doc["model"]["num_params"] == 2 * (4 * 64 * 64 // 1 - 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 2 * 1000 * 64 + 64


def test_plugin_optimizer_is_estimated_and_runs(fresh_plugins, tmp_path):
    """An optimizer added by a plugin: one state tensor (momentum SGD), no step transient."""
    import torch

    from planner.engine.optimizers import OptimizerModel
    from planner.hookspecs import hookimpl

    class MomentumPlugin:
        @staticmethod
        @hookimpl
        def register_optimizers(register):
            register(OptimizerModel(
                name="sgd-momentum",
                state_bytes_per_element=lambda dtype: {"fp32": 4, "bf16": 2, "fp16": 2}[dtype],
                step_temp_bytes_per_element=lambda dtype: 0,
                build=lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True),
            ))

    plugins.register_plugin(MomentumPlugin(), name="momentum")
    code, out, err = run(["fit", "--model", "llama-3.2-1b", "--gpu", "h100-sxm", "--optimizer", "sgd-momentum",
                          "--batch", "1", "--seq", "256", "--json"])
    assert code == 0, err
    from planner.models import load_model

    assert json.loads(out)["memory"]["breakdown"]["optimizer_states"] == 2 * load_model("llama-3.2-1b").num_params
    code, _, err = run(["fit", "--model", "gpt2", "--gpu", "t4", "--optimizer", "sgd-momentun"])
    assert code == 2 and "did you mean: sgd-momentum" in err


def test_third_party_technique_is_validated_by_its_backend(installed_score_plugin, tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    code, out, err = run(["validate", "--task", "score", "--model", str(tmp_path / "tiny"), "--batch", "2",
                          "--seq", "16", "--backend", "real", "--device", "cpu", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    m = doc["measurement"]
    assert m["backend"] == "real" and m["peak_allocated_bytes"] > 0
    assert m["breakdown"]["gradients"] == 0 and m["breakdown"]["optimizer_states"] == 0
    assert m["step_time_s"] > 0 and m["tokens_per_s"] > 0
    assert "forward" in m["phases"] and not {"backward", "optimizer"} & set(m["phases"])
