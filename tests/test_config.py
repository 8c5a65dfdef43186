"""One config mechanism: unknown keys with a hint, types, ranges and choices, the same one-line shape for every
config users write; checking never mutates; config and the CLI's table import no torch."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rugpt_ray.config import (
    LoraConfig,
    ModelConfig,
    TrainConfig,
    check_train_config,
    preset,
    read_deepspeed_json,
)
from rugpt_ray.data.prepare import DataConfig
from rugpt_ray.errors import UserError
from rugpt_ray.generation import GenerationConfig
from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.tuning.plan import SweepConfig

REPO = Path(__file__).resolve().parents[1]
DATA = dict(inputs=["a.txt"], tokenizer="tok", seq_len=8, out="out")
SERVE = dict(models={"m": "path"}, tokenizer="tok")


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig.from_dict({"lerning_rate": 1}), "train config: unknown keys ['lerning_rate']"),
    (lambda: TrainConfig.from_dict({"seq_lenn": 8}), "train config: unknown keys ['seq_lenn'] (did you mean "
                                                     "'seq_len'?)"),
    (lambda: ModelConfig.from_dict({"n_heads": 8}), "model config: unknown keys ['n_heads'] (did you mean 'n_head'?)"),
    (lambda: SweepConfig.from_dict({"shceduler": "asha"}), "sweep spec: unknown keys ['shceduler'] (did you mean "
                                                            "'scheduler'?)"),
    (lambda: DataConfig.from_dict({**DATA, "seqlen": 8}), "prepare-data: unknown keys ['seqlen'] (did you mean"),
    (lambda: ServeConfig.from_dict({**SERVE, "max_batchsize": 8}), "serve config: unknown keys ['max_batchsize'] "
                                                                   "(did you mean 'max_batch_size'?)"),
    (lambda: TrainConfig.from_dict({"lr": "fast"}), "train config: lr must be float, got str 'fast'"),
    (lambda: TrainConfig.from_dict({"num_workers": True}), "train config: num_workers must be int, got bool True"),
    (lambda: TrainConfig(seq_len=0), "train config: seq_len must be >= 1, got 0"),
    (lambda: TrainConfig(zero_stage=4), "train config: zero_stage must be 0-3, got 4"),
    (lambda: TrainConfig(adam_beta2=1.5), "train config: adam_beta2 must be in [0, 1], got 1.5"),
    (lambda: TrainConfig(decay="exponential"), "train config: decay 'exponential' is not one of cosine, linear, "
                                               "constant"),
    (lambda: ModelConfig(n_layer=0), "model config: n_layer must be >= 1, got 0"),
    (lambda: ModelConfig(sparse_mode="some"), "model config: sparse_mode 'some' is not one of none, all"),
    (lambda: SweepConfig(num_samples=0), "sweep spec: num_samples must be >= 1, got 0"),
    (lambda: SweepConfig(reduction_factor=1), "sweep spec: reduction_factor must be > 1, got 1"),
    (lambda: SweepConfig(mode="best"), "sweep spec: mode 'best' is not one of min, max"),
    (lambda: DataConfig(**{**DATA, "seq_len": 0}), "prepare-data: seq_len must be >= 1, got 0"),
    (lambda: ServeConfig.from_dict({**SERVE, "max_batch_size": 0}), "serve config: max_batch_size must be >= 1, "
                                                                   "got 0"),
    (lambda: ServeConfig.from_dict({**SERVE, "adapters": {"m": {"path": "a"}}}), "serve config: adapter 'm': the "
                                                                                  "name is already a model's"),
    (lambda: ServeConfig.from_dict({**SERVE, "adapters": {"a": {"path": "a", "base": "x"}}}),
     "serve config: adapter 'a': base 'x' is not in models (m)"),
    (lambda: GenerationConfig(top_p=1.5), "generation: top_p must be in (0, 1], got 1.5"),
    (lambda: GenerationConfig(presence_penalty=3), "generation: presence_penalty must be in [-2, 2], got 3"),
    (lambda: GenerationConfig.from_dict({"top_kk": 3}), "generation: unknown keys ['top_kk'] (did you mean 'top_k'?)"),
])
def test_every_config_says_what_and_where_in_one_line(make, message):
    with pytest.raises(UserError) as error:
        make()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_small_configs_list_their_keys_when_nothing_is_close():
    with pytest.raises(UserError, match=r"unknown keys \['zzz'\]; known: \['alpha', 'dropout', 'r', 'targets'\]"):
        LoraConfig.from_dict({"zzz": 1})


def test_ints_pass_as_floats_and_none_where_allowed():
    cfg = TrainConfig.from_dict({"lr": 1, "max_steps": None, "max_tokens": 1000, "threads_per_worker": None})
    assert cfg.lr == 1 and cfg.total_steps() == math.ceil(1000 / cfg.tokens_per_step())


def test_a_changed_config_is_checked_again():
    cfg = TrainConfig()
    with pytest.raises(UserError, match="micro_batch must be >= 1, got 0"):
        dataclasses.replace(cfg, micro_batch=0)
    assert cfg.micro_batch == 4


def test_checking_a_run_applies_the_deepspeed_json_to_a_new_config(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 1}, "sparse_attention": {"mode": "fixed", "block": 16}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = TrainConfig(train_data="x.txt", deepspeed_config=str(tmp_path / "ds.json"), preset="tiny",
                      model={"sparse_mode": "all"})
    before = cfg.to_dict()
    plan = check_train_config(cfg)
    assert cfg.to_dict() == before  # nothing mutated
    ran = plan.config
    assert (ran.micro_batch, ran.grad_accum, ran.precision, ran.zero_stage) == (2, 3, "bf16", 1)
    assert plan.deepspeed["train_micro_batch_size_per_gpu"] == 2 and "sparse_attention" not in plan.deepspeed
    assert plan.model["sparse_attention"]["num_local_blocks"] == 4  # the JSON's block replaces the preset's whole
    assert plan.model["sparse_attention"]["num_different_global_patterns"] == 1
    assert plan.model["sparse_mode"] == "all"


def test_one_reader_for_the_seeds_deepspeed_json(tmp_path):
    whole, bare, bad = tmp_path / "whole.json", tmp_path / "bare.json", tmp_path / "bad.json"
    whole.write_text(json.dumps({"fp16": {"enabled": True}, "sparse_attention": {"mode": "fixed"}}))
    bare.write_text(json.dumps({"mode": "fixed", "block": 16}))
    bad.write_text("[1, 2]")
    assert read_deepspeed_json(str(whole), "deepspeed_config") == ({"fp16": {"enabled": True}}, {"mode": "fixed"})
    assert read_deepspeed_json(str(bare), "--sparse-config") == ({}, {"mode": "fixed", "block": 16})
    assert read_deepspeed_json(None, "deepspeed_config") == ({}, None)
    with pytest.raises(UserError, match="deepspeed_config .*bad.json: expected a mapping of keys to values"):
        read_deepspeed_json(str(bad), "deepspeed_config")
    with pytest.raises(UserError, match="none.json: No such file or directory"):
        read_deepspeed_json(str(tmp_path / "none.json"), "deepspeed_config")


def test_a_preset_is_normalized_without_touching_the_caller():
    sparse = {"mode": "fixed", "num_local_blocks": 4}
    cfg = preset("tiny", sparse_attention=sparse)
    assert sparse == {"mode": "fixed", "num_local_blocks": 4}
    assert cfg.sparse_attention["num_global_blocks"] == 1  # DeepSpeed's default filled in
    with pytest.raises(UserError, match="unknown preset 'huge'; known: tiny, small"):
        preset("huge")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"],
                                  ["train", "--config", "jobs/configs/tiny-cpu.yaml", "zero_stage=9"],
                                  ["train", "--config", "jobs/configs/tiny-cpu.yaml", "seq_len=4096"]])
def test_help_and_bad_config_errors_import_no_torch_and_no_ray(argv):
    code = ("import sys; from rugpt_ray.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))\n"
            "sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "IMPORTED []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.returncode == (0 if "--help" in argv else 2), out.stderr
