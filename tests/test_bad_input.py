"""The bad-input contract, as a catalog: every case exits 2 with one line on stderr, nothing on stdout,
no traceback, nothing written (run in an empty directory that must stay as the fixtures left it)."""

from __future__ import annotations

import io
import json
import os

import pytest

from planner.cli import main

FIT = ["fit", "--model", "llama-3.1-8b", "--gpu", "h100-sxm"]
MANY = [*FIT, "--gpus", "8"]

# name -> (argv, text the message must contain); FILE/DIR stand for the fixture paths made below
CASES: dict[str, tuple[list[str], str]] = {
    "no command": ([], "give a command"),
    "unknown command": (["fitt"], "fitt"),
    "no model": (["fit", "--gpu", "h100-sxm"], "model:"),
    "unknown model": (["fit", "--model", "lama-3.1-8b", "--gpu", "h100-sxm"], "did you mean"),
    "no gpu": (["fit", "--model", "llama-3.1-8b"], "gpu:"),
    "unknown gpu": (["fit", "--model", "llama-3.1-8b", "--gpu", "h10"], "did you mean"),
    "bad size unit": ([*FIT, "--gpu-memory", "24XB"], "gpu_memory:"),
    "negative size": ([*FIT, "--gpu-memory=-5GiB"], "gpu_memory:"),
    "batch zero": ([*FIT, "--batch", "0"], "batch: must be > 0"),
    "batch negative": ([*FIT, "--batch=-1"], "batch: must be > 0"),
    "batch not a number": ([*FIT, "--batch", "abc"], "--batch"),
    "batch beyond 10^30": ([*FIT, "--batch", "1" + "0" * 31], "batch: must be <= 10^30"),
    "seq beyond 10^30": ([*FIT, "--seq", "9" * 40], "seq: must be <= 10^30"),
    "seq zero": ([*FIT, "--seq", "0"], "seq: must be > 0"),
    "unknown precision": ([*FIT, "--precision", "bf32"], "precision: must be one of"),
    "unknown method": ([*FIT, "--method", "qlorra"], "method: must be one of"),
    "unknown optimizer": ([*FIT, "--optimizer", "adamw9"], "optimizer:"),
    "unknown task": ([*FIT, "--task", "dpoo"], "did you mean"),
    "unknown attention": ([*FIT, "--attn", "flash"], "attn: must be one of"),
    "lora option without lora": ([*FIT, "--lora-rank", "8"], "lora_rank: only applies"),
    "qlora option with lora": ([*FIT, "--method", "lora", "--quant", "nf4"], "quant: only applies"),
    "generation option for sft": ([*FIT, "--prompt-len", "5"], "prompt_len: only applies"),
    "teacher for sft": ([*FIT, "--teacher", "gpt2"], "teacher: only applies"),
    "kbit prep for generation": ([*FIT, "--task", "generate", "--method", "qlora", "--kbit-prep"], "kbit_prep:"),
    "distill without teacher": ([*FIT, "--task", "distill"], "teacher:"),
    "distill other vocabulary": ([*FIT, "--task", "distill", "--teacher", "gpt2"], "vocabulary"),
    "ppo without reward model": ([*FIT, "--task", "ppo"], "reward_model:"),
    "grpo group of one": ([*FIT, "--task", "grpo", "--group-size", "1"], "group_size:"),
    "dropout above one": ([*FIT, "--method", "lora", "--lora-dropout", "1.5"], "lora_dropout:"),
    "negative kl": ([*FIT, "--task", "grpo", "--kl-coef=-1"], "kl_coef:"),
    "logprobs for rm": ([*FIT, "--task", "rm", "--logprobs", "fused"], "logprobs: only applies"),
    "zero gpus": ([*FIT, "--gpus", "0"], "gpus:"),
    "zero and fsdp together": ([*MANY, "--zero", "3", "--fsdp", "full-shard"], "not both"),
    "more per node than gpus": ([*MANY, "--gpus-per-node", "16"], "gpus_per_node:"),
    "partial nodes": ([*FIT, "--gpus", "12", "--gpus-per-node", "8"], "whole nodes"),
    "tp not dividing gpus": ([*MANY, "--tp", "3"], "does not divide the 8 GPUs"),
    "zero stage 5": ([*MANY, "--zero", "5"], "zero:"),
    "offload without zero": ([*MANY, "--offload", "optimizer"], "offload:"),
    "param offload at zero 2": ([*MANY, "--zero", "2", "--offload", "optimizer+params"], "offload:"),
    "sp without tp": ([*MANY, "--sp"], "sp:"),
    "interleaved without chunks": ([*MANY, "--pp", "2", "--pp-schedule", "interleaved"], "pp_chunks:"),
    "torch engine at zero 3": ([*MANY, "--engine", "torch", "--zero", "3"], "zero: torch shards"),
    "unknown engine": ([*MANY, "--engine", "megatron"], "engine:"),
    "bad cpu memory": ([*MANY, "--zero", "3", "--cpu-memory", "lots"], "cpu_memory:"),
    "global batch not divisible": ([*MANY, "--global-batch", "7"], "global_batch:"),
    "global batch and accumulation": ([*MANY, "--global-batch", "16", "--grad-accum", "2"], "global_batch:"),
    "tp beyond kv heads": ([*FIT, "--gpus", "16", "--tp", "16"], "KV heads"),
    "more stages than layers": (["fit", "--model", "llama-3.2-1b", "--gpu", "h100-sxm", "--gpus", "64",
                                 "--pp", "64"], "pp:"),
    "unknown unit on cpu memory": ([*MANY, "--zero", "3", "--cpu-memory", "2PB!"], "cpu_memory:"),
    "missing plan file": (["fit", "nosuch.yaml"], "no such file"),
    "invalid yaml": (["fit", "FILE:bad.yaml"], "invalid YAML"),
    "unknown plan key": (["fit", "FILE:unknown.yaml"], "unknown key 'lora_rnk'"),
    "plan file not a mapping": (["fit", "FILE:list.yaml"], "must be a mapping"),
    "plan key twice": (["fit", "FILE:twice.yaml"], "given twice"),
    "plan file layout key invalid": (["fit", "FILE:gpus.yaml"], "gpus:"),
    "plan file is a directory": (["fit", "DIR"], "is a directory"),
    "missing config file": (["fit", "--model", "nosuch/config.json", "--gpu", "h100-sxm"], "no such file"),
    "directory without config": (["fit", "--model", "DIR", "--gpu", "h100-sxm"], "no config.json"),
    "config not json": (["fit", "--model", "FILE:broken.json", "--gpu", "h100-sxm"], "not valid JSON"),
    "config without model_type": (["fit", "--model", "FILE:notype.json", "--gpu", "h100-sxm"], "model_type"),
    "config unsupported type": (["fit", "--model", "FILE:bert.json", "--gpu", "h100-sxm"], "unsupported model_type"),
    "config kv heads not dividing": (["fit", "--model", "FILE:kv.json", "--gpu", "h100-sxm"], "num_key_value_heads"),
    "config negative vocabulary": (["fit", "--model", "FILE:vocab.json", "--gpu", "h100-sxm"], "vocab_size"),
    "config hidden not dividing heads": (["fit", "--model", "FILE:gpt2.json", "--gpu", "h100-sxm"], "n_embd"),
    "unknown hub id": (["fit", "--model", "meta-llama/Llama-3.1-8B-Instructt", "--gpu", "h100-sxm"], "meta-llama/"),
    "unknown suite": (["validate", "--suite", "nosuch"], "suite:"),
    "unknown backend": (["validate", "--model", "gpt2", "--backend", "gpu"], "backend:"),
    "dry run on cuda": (["validate", "--model", "gpt2", "--device", "cuda"], "device:"),
    "unknown allocator key": (["validate", "--model", "gpt2", "--alloc-conf", "expandable_segment:True"],
                              "did you mean: expandable_segments"),
    "malformed allocator value": (["validate", "--model", "gpt2", "--alloc-conf", "expandable_segments:yes"],
                                  "True or False"),
    "negative allocator size": (["validate", "--model", "gpt2", "--alloc-conf", "max_split_size_mb:-64"],
                                "max_split_size_mb"),
    "allocator size too small": (["validate", "--model", "gpt2", "--alloc-conf", "max_split_size_mb:8"], ">= 20"),
    "serve unknown model": (["serve", "--model", "nosuch", "--gpu", "h100-sxm"], "model:"),
    "serve unknown gpu": (["serve", "--model", "llama-3.1-8b", "--gpu", "nosuch"], "gpu:"),
    "serve negative rate": (["serve", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--rate=-1"], "rate"),
    "serve too many requests": (["serve", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--requests",
                                 "100000000"], "requests:"),
    "models with an unknown flag": (["models", "--bogus"], "--bogus"),
}

FIXTURES = {
    "bad.yaml": "model: [unclosed\n",
    "unknown.yaml": "model: gpt2\ngpu: h100-sxm\nlora_rnk: 8\n",
    "list.yaml": "- model\n- gpt2\n",
    "twice.yaml": "model: gpt2\ngpu: h100-sxm\nmethod: lora\nlora-rank: 8\nlora_rank: 16\n",
    "gpus.yaml": "model: gpt2\ngpu: h100-sxm\ngpus: eight\n",
    "broken.json": "{\"model_type\": \"llama\",",
    "notype.json": json.dumps({"hidden_size": 64}),
    "bert.json": json.dumps({"model_type": "bert", "hidden_size": 64}),
    "kv.json": json.dumps({"model_type": "llama", "hidden_size": 448, "num_hidden_layers": 2, "num_attention_heads": 7,
                           "num_key_value_heads": 8, "intermediate_size": 512, "vocab_size": 1000}),
    "vocab.json": json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 128, "vocab_size": -3}),
    "gpt2.json": json.dumps({"model_type": "gpt2", "n_embd": 100, "n_layer": 2, "n_head": 3, "vocab_size": 1000}),
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in FIXTURES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "empty-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _resolve(argv: list[str], root) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("FILE:"):
            out.append(str(root / a[5:]))
        elif a == "DIR":
            out.append(str(root / "empty-dir"))
        else:
            out.append(a)
    return out


def _listing(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs}


def test_the_catalog_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, workdir):
    argv, needle = CASES[name]
    before = _listing(workdir)
    out, err = io.StringIO(), io.StringIO()
    code = main(_resolve(argv, workdir), stdout=out, stderr=err)
    lines = err.getvalue().splitlines()
    assert code == 2, (code, err.getvalue(), out.getvalue()[:300])
    assert out.getvalue() == ""
    assert len(lines) == 1 and lines[0].startswith("planner: error: "), lines
    assert "Traceback" not in err.getvalue()
    assert needle in lines[0], lines[0]
    assert _listing(workdir) == before, "nothing is written"
